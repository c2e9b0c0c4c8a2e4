"""Whitened guides (a family fitted in coordinates whitened by an earlier Gaussian), the
Newton-polished Laplace mode, and the ladder that uses both on a badly scaled posterior."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest

import vijax as vj
from vijax.guides import IAF, FullRank, LowRank, MeanField, Whitened, whitening

_T = np.array([[2.0, 0.0, 0.0], [0.5, 0.1, 0.0], [-1.0, 3.0, 4.0]])


@pytest.mark.parametrize("spec", [Whitened(FullRank(init_scale=1.0)),
                                  Whitened(MeanField(init_scale=1.0), full=False),
                                  Whitened(LowRank(rank=1, init_scale=1.0), full=False),
                                  pytest.param(Whitened(IAF()), marks=pytest.mark.slow)],
                         ids=lambda s: f"{s.name}-{s.full}")
def test_whitened_density_entropy_and_mean_are_those_of_the_pushforward(spec):
    g = spec.build(3, ("x",))
    shift = jnp.array([1.0, 2.0, 3.0])
    p = g.init(jax.random.key(0), shift)
    assert np.allclose(p["shift"], shift) and np.allclose(p["tril" if spec.full else "scale"],
                                                          np.eye(3) if spec.full else 1.0)
    t = jnp.asarray(_T if spec.full else np.diag(_T), jnp.float32)
    p = {**p, ("tril" if spec.full else "scale"): t}
    # perturb the base away from its initial state so the check is not at a symmetric point
    p["base"] = jax.tree_util.tree_map(
        lambda a: a + 0.1 * jax.random.normal(jax.random.key(3), a.shape, a.dtype), p["base"])
    eps = jax.random.normal(jax.random.key(1), (g.noise_dim,))
    theta, log_q = jax.jit(g.transform)(p, eps)  # jitted: eager flows take seconds
    np.testing.assert_allclose(log_q, jax.jit(g.log_q)(p, theta), rtol=1e-5, atol=1e-5)
    base = spec.base.build(3, ("x",))
    u, log_q_base = jax.jit(base.transform)(p["base"], eps)
    dense = np.asarray(t) if spec.full else np.diag(np.asarray(t))
    np.testing.assert_allclose(theta, shift + dense @ u, rtol=1e-5, atol=1e-5)
    log_det = np.sum(np.log(np.abs(np.diag(dense))))
    np.testing.assert_allclose(log_q, log_q_base - log_det, rtol=1e-5, atol=1e-5)
    if base.entropy is not None:
        got = jax.jit(lambda q: (g.entropy(q), g.mean(q), base.entropy(q["base"]),
                                       base.mean(q["base"])))(p)
        np.testing.assert_allclose(got[0], got[2] + log_det, rtol=1e-5)
        np.testing.assert_allclose(got[1], shift + dense @ got[3], rtol=1e-5)
    # no gradient reaches the fixed shift and T
    grads = jax.jit(jax.grad(lambda q: g.transform(q, eps)[1]
                             + jnp.sum(g.transform(q, eps)[0])))(p)
    assert not np.any(grads["shift"]) and not np.any(grads["tril" if spec.full else "scale"])


def test_whitening_closed_form_and_refusals():
    sd, rho = np.array([1e-3, 1e3]), 0.99
    cov = np.array([[1.0, rho], [rho, 1.0]]) * np.outer(sd, sd)
    full = whitening(np.array([1.0, 2.0]), cov, full=True)
    np.testing.assert_allclose(full["tril"] @ full["tril"].T, cov, rtol=1e-10)
    assert np.allclose(full["shift"], [1.0, 2.0]) and np.all(np.triu(full["tril"], 1) == 0)
    diag = whitening(np.zeros(2), cov, full=False)  # conditional sds sd_i sqrt(1 - rho^2)
    np.testing.assert_allclose(diag["scale"], sd * np.sqrt(1 - rho**2), rtol=1e-8)
    with pytest.raises(ValueError, match="not positive definite"):
        whitening(np.zeros(2), np.ones((2, 2)), full=True)
    with pytest.raises(ValueError, match="not finite"):
        whitening(np.array([np.nan, 0.0]), np.eye(2), full=True)
    with pytest.raises(TypeError, match="Whitened base must be a guide family"):
        Whitened("fullrank")
    with pytest.raises(ValueError, match="variational family"):
        Whitened(vj.guides.Laplace())


# A regression on an uncentred covariate (x near 50, sd 1) with responses of order 1e4: the
# intercept and slope have |corr| ~ 0.9998 and sds 10^3 apart, the scaling of posteriordb's
# earnings posteriors. Known noise sd and a Gaussian prior: the posterior is exactly Gaussian.
_N, _SIGMA, _TAU = 200, 1e4, 1e5
_rng = np.random.default_rng(0)
_X = np.stack([np.ones(_N), 50.0 + _rng.normal(size=_N)], axis=1)
_Y = _X @ np.array([-6e4, 1.3e3]) + _SIGMA * _rng.normal(size=_N)
_PREC = _X.T @ _X / _SIGMA**2 + np.eye(2) / _TAU**2
_COV = np.linalg.inv(_PREC)
_MEAN = _COV @ (_X.T @ _Y) / _SIGMA**2
REGRESSION = vj.Model(
    lambda z, d: dist.Normal(0.0, _TAU).log_prob(z["b"]).sum()
    + dist.Normal(d["x"] @ z["b"], _SIGMA).log_prob(d["y"]).sum(),
    {"b": vj.Latent((2,))}, data={"x": jnp.asarray(_X, jnp.float32),
                                 "y": jnp.asarray(_Y, jnp.float32)})


def test_laplace_polishes_the_mode_on_a_badly_scaled_posterior():
    # Adam's MAP stage cannot cover 6e4 units in 2,000 steps of ~0.05; Newton steps can
    res = vj.fit(REGRESSION, guide="laplace", progress=False, key=jax.random.key(0))
    sd = np.sqrt(np.diag(_COV))
    loc = np.asarray(res.params["loc"], np.float64)
    np.testing.assert_array_less(np.abs(loc - _MEAN) / sd, 0.01)
    draws = np.asarray(res.sample(jax.random.key(1), 4000)["b"], np.float64)
    np.testing.assert_allclose(np.cov(draws, rowvar=False) / np.outer(sd, sd),
                               _COV / np.outer(sd, sd), atol=0.1)  # 4,000 draws: se ~0.02
    assert res.diagnostics.final_loss == pytest.approx(
        -float(REGRESSION.target.log_density(jnp.asarray(loc, jnp.float32), REGRESSION.data)),
        rel=1e-6)


def test_ladder_fits_the_badly_scaled_posterior_in_whitened_coordinates(tmp_path):
    res = vj.fit(REGRESSION, guide="auto", progress=False, key=jax.random.key(0))
    d = res.diagnostics
    # Laplace whitens; mean-field and low-rank are skipped for the full-rank Gaussian
    assert [r[0] for r in d.ladder] == ["laplace", "fullrank"] and d.rung == "fullrank"
    assert isinstance(res.guide_spec, Whitened) and res.guide_spec.full
    sd = np.sqrt(np.diag(_COV))
    draws = np.asarray(res.sample(jax.random.key(1), 10_000)["b"], np.float64)
    # the exact answer is in the family: errors are the fit's Monte Carlo error (~0.03 sd)
    np.testing.assert_array_less(np.abs(draws.mean(0) - _MEAN) / sd, 0.15)
    np.testing.assert_allclose(draws.std(0) / sd, 1.0, atol=0.1)
    corr = np.corrcoef(draws, rowvar=False)[0, 1]
    assert corr == pytest.approx(_COV[0, 1] / sd.prod(), abs=1e-3)
    # the whitened result saves and loads like any other
    path = tmp_path / "w.vijax"
    res.save(path)
    back = vj.load(path, REGRESSION)
    assert back.guide_spec == res.guide_spec
    np.testing.assert_array_equal(back.sample(jax.random.key(2), 5)["b"],
                                  res.sample(jax.random.key(2), 5)["b"])


def test_ladder_whitens_only_up_to_max_fullrank_dim():
    from types import SimpleNamespace

    from vijax.stages import _rung_spec

    def prev(dim, point_mass=False):
        return SimpleNamespace(guide=SimpleNamespace(point_mass=point_mass),
                               target=SimpleNamespace(dim=dim))

    ladder = vj.guides.Ladder(max_fullrank_dim=50)
    assert _rung_spec("fullrank", prev(50), ladder) == Whitened(FullRank(init_scale=1.0))
    assert _rung_spec("meanfield", prev(50), ladder) == Whitened(MeanField(init_scale=1.0),
                                                                 full=False)
    assert _rung_spec("iaf", prev(50), ladder) == Whitened(IAF())
    # above it (the whitening needs a dense covariance), from a point mass, or from nothing:
    # the plain family
    assert _rung_spec("meanfield", prev(51), ladder) == MeanField()
    assert _rung_spec("lowrank", prev(10, point_mass=True), ladder) == LowRank()
    assert _rung_spec("laplace", None, ladder) == vj.guides.Laplace()
