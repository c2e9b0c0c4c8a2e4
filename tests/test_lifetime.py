"""No cache keeps a user's dataset alive after the fit: the compile caches key on the model's
structure and the data's shapes, never on the data itself (checked with a weak reference to
the data array after the fit and its result are dropped).

Exception, by design: a NumPyro model's leaves that the model reads with NumPy (sizes,
indices, masks computed from the data) are constants of its compiled program, held by the
adapter's bounded cache of model templates (see vijax.numpyro_adapter).
"""

import gc
import weakref

import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest

import vijax as vj

MODEL = vj.Model(log_prior=lambda z: dist.Normal(0, 1).log_prob(z["w"]),
                 log_likelihood=lambda z, d: dist.Normal(d["x"] * z["w"], 1).log_prob(d["y"]),
                 latents={"w": vj.Latent()})


def _numpyro_model(x, y=None):
    w = numpyro.sample("w", dist.Normal(0, 1))
    with numpyro.plate("n", x.shape[0]):
        numpyro.sample("y", dist.Normal(x * w, 1), obs=y)


def _fit_and_drop(kind: str) -> weakref.ref:
    x = np.random.default_rng(0).normal(size=200).astype(np.float32)
    y = 2 * x
    ref = weakref.ref(x)
    kw = dict(progress=False, steps=300, guide="meanfield")
    if kind == "numpyro":
        res = vj.fit(vj.from_numpyro(_numpyro_model, x, y=y), **kw, precondition=None)
    elif kind == "minibatch":
        res = vj.fit(MODEL, {"x": x, "y": y}, batch_size=20, **kw)
    elif kind == "stream":
        res = vj.fit(MODEL, {"x": x, "y": y}, batch_size=20, stream=True, **kw)
    elif kind == "bound":
        res = vj.fit(MODEL.with_data({"x": x, "y": y}), **kw, precondition=None)
    else:
        res = vj.fit(MODEL, {"x": x, "y": y}, **kw)
    assert np.isfinite(res.diagnostics.final_loss)
    del x, y, res
    return ref


@pytest.mark.parametrize("kind", ["default", pytest.param("bound", marks=pytest.mark.slow),
                                  "minibatch", "stream",
                                  pytest.param("numpyro", marks=pytest.mark.slow)])
def test_the_data_is_freed_after_the_fit(kind):
    ref = _fit_and_drop(kind)
    gc.collect()
    alive = ref() is not None
    assert not alive, f"{kind}: something still holds the data after the fit"
