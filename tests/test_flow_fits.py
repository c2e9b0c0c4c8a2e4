"""Flow guides against the full-rank Gaussian on targets whose shape no Gaussian has: a 2-D
banana, Neal's funnel (d = 10) and a skewed 2-D target, at the same step budget.

Scores from S = 16,000 draws of each fitted q: the ELBO estimate mean(log p~ - log q), whose
Monte Carlo standard error is sd / sqrt(S) (about 0.01 here; the margins asserted are 4
standard errors of the difference), and PSIS k-hat (whose sampling sd is about
(1 + k) / sqrt(M) with M = 3 sqrt(S) tail draws, about 0.09; the spline's measured margins over
the Gaussian are 0.3-0.4 on the banana and the skewed target).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import vijax as vj
from tests.conftest import raw_fit

S = 16_000


def _banana(z, d):
    x = z["x"]
    return dist.Normal(0, 2.0).log_prob(x[0]) + dist.Normal(0.25 * x[0] ** 2, 0.5).log_prob(x[1])


def _funnel(z, d):
    return (dist.Normal(0, 3.0).log_prob(z["v"])
            + dist.Normal(0, jnp.exp(z["v"] / 2)).log_prob(z["x"]).sum())


def _skewed(z, d):
    # each coordinate is the log of a Gamma(0.5) variable: strongly left-skewed
    return jnp.sum(0.5 * z["y"] - jnp.exp(z["y"]))


TARGETS = {
    "banana": vj.Model(_banana, {"x": vj.Latent((2,))}),
    "funnel": vj.Model(_funnel, {"v": vj.Latent(), "x": vj.Latent((9,))}),
    "skewed": vj.Model(_skewed, {"y": vj.Latent((2,))}),
}


@functools.cache
def _score(target: str, guide: str):
    # the same step budget for every guide (no early stopping); k-hat computed below
    res = raw_fit(TARGETS[target], guide=guide, steps=2000, num_particles=4,
                 key=jax.random.key(0), convergence=None, psis_draws=0, progress=False)
    g, t = res.guide, res.target

    @jax.jit
    def log_weights(keys, params):
        def one(k):
            theta, log_q = g.sample(k, params)
            return t.log_density(theta, None) - log_q
        return jax.vmap(one)(keys)

    w = np.asarray(log_weights(jax.random.split(jax.random.key(1), S), res.params), np.float64)
    return w.mean(), w.std() / np.sqrt(S), vj.psis(w).k_hat


# the banana runs in the default suite; the funnel and the skewed target (about a minute
# together on 2 cores) with -m slow
SLOW = pytest.mark.slow


@pytest.mark.parametrize("target", [pytest.param(t, marks=SLOW) for t in sorted(TARGETS)])
def test_spline_flow_beats_fullrank(target):
    elbo_g, se_g, k_g = _score(target, "fullrank")
    elbo_f, se_f, k_f = _score(target, "spline")
    assert elbo_f > elbo_g + 4 * np.hypot(se_g, se_f), (elbo_f, elbo_g)
    if target != "funnel":
        assert k_f < k_g - 0.1, (k_f, k_g)
    else:
        # at this budget neither q makes importance sampling of the funnel reliable (both
        # k-hat > 0.7, measured 0.83 and 0.74): the ELBO, not k-hat, separates them
        assert min(k_f, k_g) > 0.5


@pytest.mark.parametrize("target", [pytest.param("banana", marks=SLOW),
                                    pytest.param("funnel", marks=SLOW)])
def test_iaf_beats_fullrank_elbo(target):
    # IAF steps are affine in each coordinate given the others, so it cannot skew the marginal
    # of independent coordinates: the skewed target is the coupling spline's job.
    elbo_g, se_g, _ = _score(target, "fullrank")
    elbo_f, se_f, _ = _score(target, "iaf")
    assert elbo_f > elbo_g + 4 * np.hypot(se_g, se_f), (elbo_f, elbo_g)
