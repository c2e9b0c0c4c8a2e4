"""Fits against closed-form posteriors.

Tolerances: the fitted parameters are averaged iterates of a stochastic optimiser, so their
error is Monte Carlo error of the gradient noise. Measured over 8 seeds on this exact problem
(4,000 steps, 8 particles, default optimizer), the root-mean-square error of the fitted mean
is 0.008 posterior sd for every Gaussian family, and of the covariance entries (relative to
sqrt(S_ii S_jj)) 0.010 (full-rank), 0.007 (mean-field) and 0.034 (low-rank, whose rank = dim
parameterisation has a flat direction between its diagonal and its factor). The bounds below
are about 6-14 times those standard errors, so a false failure is essentially impossible while
a wrong gradient, entropy or Jacobian (errors of 0.2 sd and more) fails.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints

import vijax as vj
from tests.conftest import precision, raw_fit

MEAN_TOL = 0.05  # in posterior sd
COV_TOL = {"fullrank": 0.1, "lowrank": 0.2, "meanfield": 0.1}


def _covariance(guide_name, params):
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    if guide_name == "fullrank":
        L = np.diag(np.logaddexp(0, p["raw_diag"])) @ (np.tril(p["raw_tril"], -1)
                                                       + np.eye(len(p["raw_diag"])))
        return L @ L.T
    if guide_name == "lowrank":
        s = np.logaddexp(0, p["raw_scale"])
        raw = p["cov_factor"]
        w = np.tril(raw, -1)[:, :raw.shape[1]] + np.diag(np.logaddexp(0, np.diag(raw)))
        w = s[:, None] * w
        return w @ w.T + np.diag(s**2)
    return np.diag(np.logaddexp(0, p["raw_scale"]) ** 2)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("guide", ["fullrank", "lowrank", "meanfield"])
def test_linear_regression_gaussian_guides(blr, blr_model, guide, dtype):
    spec = vj.guides.LowRank(rank=blr.D) if guide == "lowrank" else guide
    with precision(dtype) as dt:
        res = raw_fit(blr_model, blr.data, guide=spec, steps=4000, num_particles=8,
                     key=jax.random.key(1))
        assert res.params["loc"].dtype == dt
        # the default stopping rule ends the fit; its averaged iterate must be as accurate
        assert res.losses.shape == (res.diagnostics.n_steps,) and res.losses.dtype == dt
        assert res.diagnostics.converged and res.diagnostics.n_steps < 4000
        # the public API agrees: mean() is exact for real latents, draws have the right shapes
        np.testing.assert_allclose(res.mean()["w"], res.params["loc"], rtol=1e-6)
        draws = res.sample(jax.random.key(2), 7)["w"]
        assert draws.shape == (7, blr.D) and draws.dtype == dt
    sd = np.sqrt(np.diag(blr.cov))
    np.testing.assert_array_less(np.abs(np.asarray(res.params["loc"]) - blr.mean) / sd, MEAN_TOL)
    # mean-field's optimum keeps the exact mean and has variances 1 / Lambda_ii
    ref = np.diag(1 / np.diag(blr.precision)) if guide == "meanfield" else blr.cov
    err = (_covariance(guide, res.params) - ref) / np.sqrt(np.outer(np.diag(ref), np.diag(ref)))
    np.testing.assert_array_less(np.abs(err), COV_TOL[guide])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_delta_is_map(blr, blr_model, dtype):
    # the linear-regression posterior is Gaussian: its mode is its mean (deterministic
    # optimisation, so the tolerance is optimiser convergence, not Monte Carlo error)
    with precision(dtype):
        res = raw_fit(blr_model, blr.data, guide="delta", steps=3000, key=jax.random.key(0))
        draws = res.sample(jax.random.key(0), 3)["w"]
    np.testing.assert_array_equal(draws[0], draws[2])
    sd = np.sqrt(np.diag(blr.cov))
    np.testing.assert_array_less(np.abs(np.asarray(res.params["loc"]) - blr.mean) / sd, 1e-3)


def test_delta_map_is_the_constrained_mode():
    # p(t) = Gamma(3, 2): the mode of t is (3 - 1) / 2 = 1; the mode of log t would be 3/2.
    m = vj.Model(lambda z, d: dist.Gamma(3.0, 2.0).log_prob(z["t"]),
                 {"t": vj.Latent(support=constraints.positive)})
    res = raw_fit(m, guide="delta", steps=2000, key=jax.random.key(0))
    np.testing.assert_allclose(res.mean()["t"], 1.0, rtol=1e-3)


def test_normal_normal_with_positive_latent_summary():
    # y_i ~ N(mu, 1), mu ~ N(0, 10^2): posterior N(sum y / (n + 1/100), 1 / (n + 1/100)).
    # Plus an independent positive latent with a LogNormal(0, 0.5) density: in log space it
    # is exactly N(0, 0.5^2), so a mean-field guide is exact for both.
    y = np.array([0.3, 1.2, -0.4, 2.0, 0.9])
    prec = len(y) + 1 / 100
    m = vj.Model(lambda z, d: dist.Normal(0, 10).log_prob(z["mu"])
                 + dist.Normal(z["mu"], 1.0).log_prob(d).sum()
                 + dist.LogNormal(0.0, 0.5).log_prob(z["s"]),
                 {"mu": vj.Latent(), "s": vj.Latent(support=constraints.positive)})
    res = raw_fit(m, y, guide="meanfield", steps=4000, num_particles=8, key=jax.random.key(3))
    s = res.summary(n=20000)
    # Monte Carlo error of summary stats from 20,000 draws: mean 0.007 sd, sd 0.005 sd
    post_sd = 1 / np.sqrt(prec)
    assert abs(s["mu"]["mean"] - y.sum() / prec) < 0.05 * post_sd
    assert abs(s["mu"]["sd"] / post_sd - 1) < 0.1
    # LogNormal(0, 0.5): median 1, 5% quantile exp(-1.645 * 0.5)
    assert abs(s["s"]["q50"] - 1.0) < 0.05
    assert abs(s["s"]["q05"] - np.exp(-1.6449 * 0.5)) < 0.05
    text = str(s)
    assert "mu" in text and "s" in text and "95%" in text


def test_structured_guide_blocks(blr, blr_model):
    m = vj.Model(lambda z, d: blr_model.log_joint({"w": jnp.stack([z["a"], *z["b"]])}, d),
                 {"a": vj.Latent(), "b": vj.Latent(shape=(2,))})
    res = raw_fit(m, blr.data, guide={"a": "meanfield", "b": vj.guides.FullRank()}, steps=4000,
                 num_particles=8, key=jax.random.key(0))
    assert res.guide.name == "structured(a:meanfield, b:fullrank)"
    mean = np.concatenate([np.atleast_1d(res.mean()["a"]), res.mean()["b"]])
    sd = np.sqrt(np.diag(blr.cov))
    np.testing.assert_array_less(np.abs(mean - blr.mean) / sd, MEAN_TOL)
