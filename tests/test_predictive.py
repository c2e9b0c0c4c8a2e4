"""vj.predictive: the draws of res.sample mapped through a function, chunk by chunk.

One small fit (the Bayesian linear regression of conftest, full-rank guide) serves the module;
every check compares with quantities of the fitted q itself, so the fit's accuracy does not
enter the tolerances, only Monte Carlo error of the predictive draws.
"""

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vijax as vj
from tests.conftest import LinearRegression, count_compiles, raw_fit

# the module, not the function vijax/__init__ re-exports under the same name
pred = importlib.import_module("vijax.predictive")

N = 50  # draws in the exactness checks: not a multiple of the chunk sizes below


@pytest.fixture(scope="module")
def res(blr, blr_model):
    return raw_fit(blr_model, blr.data, guide="fullrank", steps=300, key=jax.random.key(0),
                  convergence=None, progress=False, psis_draws=0)


def identity(z):
    return z


def derived(z):
    """A nested pytree of derived quantities of one draw."""
    return {"norm": jnp.sqrt(jnp.sum(z["w"] ** 2)), "pair": (z["w"][:2], 2.0 * z["w"])}


def test_identity_equals_sample(res):
    key = jax.random.key(3)
    draws = vj.predictive(res, identity, key, N)
    ref = res.sample(key, N)
    assert set(draws) == set(ref) == {"w"}
    assert draws["w"].shape == (N, LinearRegression.D) and draws["w"].dtype == ref["w"].dtype
    # the same keys, so the same draws; equal up to rounding (another batch size may give
    # XLA another kernel for the batched matrix-vector product of the full-rank guide)
    np.testing.assert_allclose(draws["w"], ref["w"], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("batch_size", [7, N, 1000])
def test_chunks_do_not_change_the_result(res, batch_size):
    key = jax.random.key(4)
    whole = vj.predictive(res, derived, key, N)
    chunked = vj.predictive(res, derived, key, N, batch_size=batch_size)
    assert jax.tree_util.tree_structure(chunked) == jax.tree_util.tree_structure(whole)
    assert chunked["pair"][0].shape == (N, 2) and chunked["norm"].shape == (N,)
    for a, b in zip(jax.tree_util.tree_leaves(chunked), jax.tree_util.tree_leaves(whole),
                    strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)


def test_second_call_compiles_nothing(res):
    vj.predictive(res, derived, jax.random.key(5), N, batch_size=7)
    with count_compiles() as n_compiles:
        out = vj.predictive(res, derived, jax.random.key(6), N, batch_size=7)
        jax.block_until_ready(out)
    assert n_compiles[0] == 0


def test_default_batch_size_bounds_the_chunk_bytes(res, monkeypatch):
    sizes = []
    build = pred._chunk_fn

    def spy(*args):
        run = build(*args)

        def recorded(keys, fn_keys, *params):
            sizes.append(keys.shape[0])
            return run(keys, fn_keys, *params)

        return recorded

    monkeypatch.setattr(pred, "_chunk_fn", spy)
    # derived() returns 1 + 2 + 3 float32 per draw (24 bytes): 170 bytes hold 7 draws
    monkeypatch.setattr(pred, "_CHUNK_BYTES", 170)
    out = vj.predictive(res, derived, jax.random.key(7), 25)
    assert sizes == [7, 7, 7, 7] and out["norm"].shape == (25,)


def test_posterior_predictive_replicates(blr, res):
    """y_rep = X w + sigma eps: its mean is X E_q[w] and its noise is N(0, sigma^2)."""
    x, sigma, n = blr.X, LinearRegression.sigma, 3000
    fn_mean = lambda z: {"mu": x @ z["w"], "w": z["w"]}
    fn_rep = lambda k, z: x @ z["w"] + sigma * jax.random.normal(k, (x.shape[0],))
    key = jax.random.key(8)
    y_rep = np.asarray(vj.predictive(res, fn_rep, key, n, with_key=True), np.float64)
    assert y_rep.shape == (n, LinearRegression.N)
    # the same key: the same draws of w
    mean = vj.predictive(res, fn_mean, key, n, batch_size=1000)
    mu, w = (np.asarray(mean[k], np.float64) for k in ("mu", "w"))

    # the mean of each y_rep[i] against X E_q[w] (exact for a Gaussian guide): within 5
    # Monte Carlo standard errors sd(y_rep[i]) / sqrt(n)
    expected = x @ np.asarray(res.mean()["w"], np.float64)
    se = y_rep.std(0, ddof=1) / np.sqrt(n)
    np.testing.assert_array_less(np.abs(y_rep.mean(0) - expected), 5 * se)

    # the residual y_rep - X w_s is the simulated noise: N(0, sigma^2), independent of w.
    # Its mean over n * N values has standard error sigma / sqrt(n N), its sd a relative
    # standard error of about 1 / sqrt(2 n N); correlations with w_s have 1 / sqrt(n).
    resid = y_rep - mu
    m = resid.size
    assert abs(resid.mean()) < 5 * sigma / np.sqrt(m)
    assert abs(resid.std() / sigma - 1) < 5 / np.sqrt(2 * m)
    corr = np.corrcoef(resid[:, 0], w[:, 0])[0, 1]
    assert abs(corr) < 5 / np.sqrt(n)


def test_validation(res):
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        vj.predictive(res, identity, key, 0)
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        vj.predictive(res, identity, key, 2.0)
    with pytest.raises(ValueError, match="n must be an int >= 1"):
        vj.predictive(res, identity, key, True)
    with pytest.raises(ValueError, match="batch_size must be an int >= 1"):
        vj.predictive(res, identity, key, 5, batch_size=0)
    with pytest.raises(TypeError, match="key must be one JAX PRNG key"):
        vj.predictive(res, identity, 0, 5)
    with pytest.raises(TypeError, match="key must be one JAX PRNG key"):
        vj.predictive(res, identity, jax.random.split(key, 2), 5)
    with pytest.raises(TypeError, match="fn must be a function"):
        vj.predictive(res, "w", key, 5)
    with pytest.raises(TypeError, match="res must be a vj.FitResult"):
        vj.predictive({"w": 1.0}, identity, key, 5)
    with pytest.raises(TypeError, match="with_key must be True or False"):
        vj.predictive(res, identity, key, 5, with_key=1)


def test_errors_in_fn_name_it_and_the_latents(res):
    key = jax.random.key(0)

    def needs_b(z):
        return z["b"]

    with pytest.raises(ValueError, match=r"fn='.*needs_b' failed .* \{w: float32\[3\]\}.*"
                                         r"KeyError: 'b'"):
        vj.predictive(res, needs_b, key, 5)
    with pytest.raises(ValueError, match=r"failed .*dot_general"):
        vj.predictive(res, lambda z: jnp.ones((4, 4)) @ z["w"], key, 5)
    with pytest.raises(TypeError, match=r"must return a pytree of arrays, but it returned str"):
        vj.predictive(res, lambda z: "w", key, 5)
    with pytest.raises(TypeError, match=r"returned NoneType with no array leaves"):
        vj.predictive(res, lambda z: None, key, 5)
    with pytest.raises(ValueError, match=r"fn\(key, z\).*failed"):  # with_key: two arguments
        vj.predictive(res, identity, key, 5, with_key=True)
