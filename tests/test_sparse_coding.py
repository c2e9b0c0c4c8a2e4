"""Sparse coding / predictive sparse decomposition (Kavukcuoglu et al. 2008) as MAP inference
of local latents with a Laplace prior: the delta family of a local guide, per row (a table:
the exact per-row MAP, which is a LASSO problem) and amortized (an encoder that predicts the
codes)."""

import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest

import vijax as vj

sklearn = pytest.importorskip("sklearn.linear_model")

N, P, K = 40, 8, 4
SIGMA, B = 0.3, 0.5


@pytest.fixture(scope="module")
def problem():
    rng = np.random.default_rng(0)
    dictionary = rng.normal(size=(P, K))
    codes = rng.laplace(size=(N, K)) * (rng.random((N, K)) < 0.5)
    x = (codes @ dictionary.T + SIGMA * rng.normal(size=(N, P))).astype(np.float32)

    def lik(z, d):
        mean = z["s"] @ jnp.asarray(dictionary, jnp.float32).T
        return (dist.Normal(mean, SIGMA).log_prob(d["x"]).sum(-1)
                + dist.Laplace(0.0, B).log_prob(z["s"]).sum(-1))

    model = vj.Model(log_prior=lambda z: jnp.zeros(()), log_likelihood=lik,
                     latents={"s": vj.Latent((K,), local=True)})
    # the per-row MAP minimises ||x - D s||^2 / (2 sigma^2) + ||s||_1 / b; scikit-learn's
    # Lasso minimises ||x - D s||^2 / (2 P) + alpha ||s||_1: the same with alpha = sigma^2/(P b)
    lasso = sklearn.Lasso(alpha=SIGMA**2 / (P * B), fit_intercept=False, tol=1e-12,
                          max_iter=100_000)
    exact = np.stack([lasso.fit(dictionary, x[i]).coef_ for i in range(N)])
    return model, x, dictionary, exact


def _objective(codes, x, dictionary):
    r = x - codes @ dictionary.T
    return float(np.sum(r**2) / (2 * SIGMA**2) + np.abs(codes).sum() / B)


def test_table_delta_is_the_per_row_map(problem):
    model, x, dictionary, exact = problem
    res = vj.fit(model, {"x": x}, guide={"s": vj.guides.LocalTable(family="delta")},
                 steps=4000, optimizer=optax.adam(0.02), convergence=None, progress=False)
    codes = vj.local_posterior(res, {"x": x})["s"]["loc"]
    # Adam with a constant step of 0.02 keeps oscillating at the L1 kinks on the scale of its
    # step; the tail average brings it within a fraction of one step of the exact codes (whose
    # scale is ~4), so 0.02 is below the step and 0.5% of the scale
    assert np.abs(codes - exact).max() < 0.02
    assert res.diagnostics.objective == "neg_elbo"


def test_amortized_delta_predicts_codes(problem):
    model, x, dictionary, exact = problem
    res = vj.fit(model, {"x": x}, guide={"s": vj.guides.Amortized(family="delta")},
                 steps=3000, optimizer=optax.adam(3e-3), convergence=None, progress=False)
    codes = vj.local_posterior(res, {"x": x})["s"]["loc"]
    best, zero = _objective(exact, x, dictionary), _objective(np.zeros_like(exact), x,
                                                             dictionary)
    got = _objective(codes, x, dictionary)
    # an encoder is an approximation of the per-row optimiser (PSD's point): it must close
    # most of the gap between the zero code and the exact MAP on the data it was trained on
    assert best <= got + 1e-3
    assert (got - best) < 0.1 * (zero - best)


def test_delta_local_guide_refuses_multi_sample_bounds(problem):
    model, x, _, _ = problem
    with pytest.raises(ValueError, match="point-mass"):
        vj.fit(model, {"x": x}, guide={"s": vj.guides.Amortized(family="delta")},
               estimator="iwae", num_particles=4, steps=10, progress=False)
