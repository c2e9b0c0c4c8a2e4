"""A long-lived process that keeps compiling new models stays under the kernel's limit on
memory mappings: compiled programs are dropped (and recompiled on use) past half of it."""

import sys

import jax
import numpyro.distributions as dist
import pytest

import vijax as vj
import vijax.memory_maps as mm

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"),
                                reason="memory-mapping counts are read from /proc")


def test_relieve_drops_compiled_programs_past_the_threshold(monkeypatch):
    assert mm.max_maps() > 0 and mm.maps_in_use() > 0
    assert not mm.relieve()  # a test process is far below half the limit
    monkeypatch.setattr(mm, "THRESHOLD", 0.0)  # every compile finds the process "full"

    @vj.model(mu=vj.Latent())
    def m(z, y):
        return dist.Normal(0, 1).log_prob(z["mu"]) + dist.Normal(z["mu"], 1).log_prob(y).sum()

    before = mm.maps_in_use()
    res = vj.fit(m, jax.numpy.ones(3), guide="meanfield", steps=50, convergence=None,
                 progress=False, psis_draws=0)
    assert mm.relieve() and mm.maps_in_use() <= before + 2000
    again = vj.fit(m, jax.numpy.ones(3), guide="meanfield", steps=50, convergence=None,
                   progress=False, psis_draws=0)  # the cached program recompiles: same fit
    assert float(again.losses[-1]) == float(res.losses[-1])
