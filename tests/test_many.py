"""Many fits as one program (fit_many), the Laplace guide and the automatic ladder."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from scipy import stats

import vijax as vj
from tests.conftest import raw_fit

Y = jnp.asarray(np.random.default_rng(0).normal(1.0, 2.0, 30))


@vj.model(mu=vj.Latent(), s=vj.Latent(support=dist.constraints.positive))
def NORMAL(z, y):
    return (dist.Normal(0, 10).log_prob(z["mu"]) + dist.HalfNormal(5).log_prob(z["s"])
            + dist.Normal(z["mu"], z["s"]).log_prob(y).sum())


YS = jnp.stack([Y, Y + 1.0, 2.0 * Y])
KEYS = jax.random.split(jax.random.key(7), 3)


def test_lanes_equal_separate_fits():
    many = vj.fit_many(NORMAL, YS, data_axes=0, keys=KEYS, progress=False)
    assert len(many) == 3 and many.errors == [None, None, None]
    for i in range(3):
        one = raw_fit(NORMAL, YS[i], key=KEYS[i], progress=False)
        lane = many[i]
        assert lane.diagnostics.n_steps == one.diagnostics.n_steps
        assert lane.diagnostics.converged == one.diagnostics.converged
        for a, b in zip(jax.tree_util.tree_leaves(lane.params),
                        jax.tree_util.tree_leaves(one.params), strict=True):
            np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(lane.losses, one.losses, rtol=1e-4)
        assert abs(lane.diagnostics.k_hat - one.diagnostics.k_hat) < 1e-3
        # a lane is a full FitResult bound to its own data
        np.testing.assert_array_equal(lane.model.data, YS[i])
        assert lane.sample(jax.random.key(0), 5)["s"].shape == (5,)
    # lanes stop on their own: different data, different numbers of steps
    assert len({d.n_steps for d in many.diagnostics}) > 1


def test_restarts_with_shared_data_and_best():
    many = vj.fit_many(NORMAL, Y, keys=[0, 1, 2, 3], progress=False)
    assert len(many) == 4 and many.losses.shape[0] == 4
    best = many.best()
    assert best.diagnostics.final_loss == np.nanmin(many.final_losses())
    assert many.best(by="k_hat").diagnostics.k_hat == min(d.k_hat for d in many.diagnostics)
    assert "4 lanes of meanfield" in repr(many)
    assert [r.diagnostics.n_steps for r in many[1:3]] == [d.n_steps for d in
                                                          many.diagnostics[1:3]]


def test_a_failing_lane_fails_alone():
    # the data's "bad" flag makes the density NaN beyond x = 1.5 (the optimum is at 3)
    def model_fn(z, d):
        lp = -0.5 * jnp.sum((z["x"] - 3.0) ** 2)
        return jnp.where(d["bad"] & (z["x"][0] > 1.5), jnp.nan, lp)

    m = vj.Model(model_fn, {"x": vj.Latent((2,))})
    data = {"bad": jnp.array([False, True, False])}
    many = vj.fit_many(m, data, data_axes=0, keys=3, steps=3000, progress=False,
                       init={"x": np.zeros(2)}, max_consecutive_nonfinite=5)
    reasons = [d.stop_reason for d in many.diagnostics]
    assert reasons[1] == "failed" and reasons[0] != "failed" and reasons[2] != "failed"
    assert "5 consecutive steps were not finite" in many.errors[1]
    assert many.errors[0] is None
    np.testing.assert_allclose(many[0].mean()["x"], 3.0, atol=0.1)
    assert all(np.all(np.isfinite(np.asarray(x)))
               for x in jax.tree_util.tree_leaves(many[1].state.params))
    assert many.best().diagnostics.stop_reason != "failed"


@pytest.mark.slow  # 7-9 s on 2 cores; kept out of the default suite's time
def test_lanes_per_batch_gives_the_same_lanes():
    full = vj.fit_many(NORMAL, YS, data_axes=0, keys=KEYS, progress=False, convergence=None,
                       steps=400, psis_draws=0)
    parts = vj.fit_many(NORMAL, YS, data_axes=0, keys=KEYS, progress=False,
                        convergence=None, steps=400, psis_draws=0, lanes_per_batch=2)
    for a, b in zip(jax.tree_util.tree_leaves(full.params),
                    jax.tree_util.tree_leaves(parts.params), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_batched_hyper_parameters_with_a_data_axes_prefix():
    def model_fn(z, d):
        return (dist.Normal(0.0, d["prior_sd"]).log_prob(z["mu"])
                + dist.Normal(z["mu"], 1.0).log_prob(d["y"]).sum())

    m = vj.Model(model_fn, {"mu": vj.Latent()})
    data = {"y": Y, "prior_sd": jnp.array([0.01, 1.0, 100.0])}
    many = vj.fit_many(m, data, data_axes={"y": None, "prior_sd": 0}, progress=False)
    means = [float(many[i].mean()["mu"]) for i in range(3)]
    exact = [float(Y.sum() / (Y.size + 1 / s**2)) for s in (0.01, 1.0, 100.0)]
    np.testing.assert_allclose(means, exact, atol=0.05)


def test_fit_many_validation():
    with pytest.raises(ValueError, match="3 keys but the batched data has 2 lanes"):
        vj.fit_many(NORMAL, YS[:2], data_axes=0, keys=3)
    with pytest.raises(ValueError, match="give keys="):
        vj.fit_many(NORMAL, Y)
    with pytest.raises(TypeError, match="keys must be a lane count"):
        vj.fit_many(NORMAL, Y, keys="many")
    with pytest.raises(ValueError, match="same leading \\(lane\\) size"):
        vj.fit_many(vj.Model(lambda z, d: -z["a"] ** 2 + 0 * d["u"].sum() + 0 * d["v"].sum(),
                             {"a": vj.Latent()}),
                    {"u": jnp.ones(3), "v": jnp.ones(4)}, data_axes=0)
    with pytest.raises(ValueError, match="best\\(by=...\\) must be"):
        vj.fit_many(NORMAL, Y, keys=2, steps=50, progress=False, psis_draws=0).best("elbo")


@pytest.mark.slow
def test_simulation_based_calibration():
    """200 datasets from the conjugate normal model, one fit_many call; ranks of the true mean
    among 99 posterior draws are uniform (chi-square over 10 bins, alpha = 0.01); a guide
    whose sd is halved fails the same test."""
    n_data, n_obs, n_draws = 200, 10, 99
    rng = np.random.default_rng(1)
    mu_true = rng.normal(0.0, 1.0, n_data)
    ys = jnp.asarray(mu_true[:, None] + rng.normal(size=(n_data, n_obs)))
    m = vj.Model(lambda z, y: dist.Normal(0.0, 1.0).log_prob(z["mu"])
                 + dist.Normal(z["mu"], 1.0).log_prob(y).sum(), {"mu": vj.Latent()})
    many = vj.fit_many(m, ys, data_axes=0, keys=n_data, progress=False, num_particles=4)

    def ranks(scale_factor):
        out = []
        for i in range(n_data):
            p = many[i].params
            loc, sd = float(p["loc"][0]), float(jnp.logaddexp(0, p["raw_scale"][0]))
            draws = loc + scale_factor * sd * rng.normal(size=n_draws)
            out.append(int(np.sum(draws < mu_true[i])))
        counts = np.bincount(np.asarray(out) // 10, minlength=10)
        return stats.chisquare(counts).pvalue

    p_good, p_bad = ranks(1.0), ranks(0.5)
    print(f"SBC chi-square p-values: fitted guide {p_good:.3f}, halved sd {p_bad:.2e}")
    assert p_good > 0.01 and p_bad < 0.01


# --- Laplace ------------------------------------------------------------------------------------
def test_laplace_matches_the_exact_linear_regression_posterior(blr, blr_model):
    res = raw_fit(blr_model, blr.data, guide="laplace", progress=False, key=jax.random.key(0))
    assert res.guide.name == "laplace" and res.guide_spec == vj.guides.Laplace()
    sd = np.sqrt(np.diag(blr.cov))
    np.testing.assert_array_less(np.abs(np.asarray(res.params["loc"]) - blr.mean) / sd, 1e-3)
    chol = np.asarray(vj.guides.FullRank.scale_tril(res.params))
    np.testing.assert_allclose(chol @ chol.T, blr.cov, rtol=1e-3, atol=1e-6)
    # the Gaussian posterior is exactly Gaussian: importance ratios are constant
    assert res.diagnostics.k_hat < 0.3
    with pytest.raises(ValueError, match="no loop state to continue"):
        raw_fit(blr_model, blr.data, resume=res)


def test_laplace_refuses_a_saddle_and_names_the_latents():
    # log p = -x^2/2 + y^2/2 - y^4/4 (maximum of y at +-1, a saddle at y = 0 reached from 0)
    m = vj.Model(lambda z, d: -0.5 * z["x"] ** 2 + 0.5 * z["y"] ** 2 - 0.25 * z["y"] ** 4
                 + 0.0 * jnp.sum(z["x"]), {"x": vj.Latent(), "y": vj.Latent()})
    with pytest.raises(ValueError, match=r"not positive definite .*latent\(s\) \['y'\]"):
        raw_fit(m, guide="laplace", init={"x": 0.3, "y": 0.0}, progress=False,
               optimizer=__import__("optax").sgd(0.1))
    with pytest.raises(ValueError, match="'laplace' applies to the whole model"):
        raw_fit(m, guide={"x": "laplace", "y": "meanfield"})


# --- the ladder -----------------------------------------------------------------------------------
INDEPENDENT = vj.Model(lambda z, d: dist.Normal(jnp.array([1.0, -2.0, 0.5]),
                                                jnp.array([0.5, 2.0, 1.0])
                                                ).log_prob(z["x"]).sum(),
                       {"x": vj.Latent((3,))})
_COV = np.array([[1.0, 0.95, 0.9], [0.95, 1.0, 0.95], [0.9, 0.95, 1.0]])
CORRELATED = vj.Model(lambda z, d: dist.MultivariateNormal(
    jnp.zeros(3), jnp.asarray(_COV)).log_prob(z["x"]), {"x": vj.Latent((3,))})
NO_LAPLACE = vj.guides.Ladder(rungs=("delta", "meanfield", "lowrank", "fullrank", "iaf"))


@pytest.mark.slow  # 7-9 s on 2 cores; kept out of the default suite's time
def test_ladder_stops_at_meanfield_on_an_independent_gaussian():
    res = raw_fit(INDEPENDENT, guide=NO_LAPLACE, progress=False, key=jax.random.key(0))
    d = res.diagnostics
    assert d.rung == "meanfield" and [r[0] for r in d.ladder] == ["delta", "meanfield"]
    assert d.k_hat < 0.7 and all(r[3] > 0 and r[4] == "" for r in d.ladder)
    # (the default ladder, Laplace then a whitened full-rank Gaussian: test_whitened.py)
    only = vj.guides.Ladder(rungs=("delta", "laplace"))  # no variational rung: laplace is final
    assert raw_fit(INDEPENDENT, guide=only, progress=False).diagnostics.rung == "laplace"


@pytest.mark.slow  # 23 s on 2 cores
def test_ladder_climbs_past_meanfield_on_a_correlated_gaussian():
    res = raw_fit(CORRELATED, guide=NO_LAPLACE, progress=False, key=jax.random.key(0))
    d = res.diagnostics
    rungs = [r[0] for r in d.ladder]
    assert rungs[:2] == ["delta", "meanfield"] and d.rung in ("lowrank", "fullrank", "iaf")
    assert d.ladder[1][2] > 0.7  # mean-field's k-hat on this posterior
    assert d.k_hat < 0.7


def test_ladder_skips_a_rung_that_cannot_be_fitted():
    # the saddle of test_laplace_refuses_a_saddle...: laplace fails, the ladder goes on
    m = vj.Model(lambda z, d: -0.5 * z["x"] ** 2 + 0.5 * z["y"] ** 2 - 0.25 * z["y"] ** 4,
                 {"x": vj.Latent(), "y": vj.Latent()})
    # (sgd(0.1) on this bimodal y diverges after ~5,000 steps: the test is about the skip)
    res = raw_fit(m, guide=vj.guides.Ladder(rungs=("laplace", "meanfield")), progress=False,
                  steps=2000,
                 key=jax.random.key(0), optimizer=__import__("optax").sgd(0.1),
                 init={"x": 0.3, "y": 0.0})
    rungs = res.diagnostics.ladder
    assert rungs[0][0] == "laplace" and "not positive definite" in rungs[0][4]
    assert res.diagnostics.rung == "meanfield"
    with pytest.raises(ValueError, match="Ladder rungs must be a non-empty sub-sequence"):
        vj.guides.Ladder(rungs=("meanfield", "delta"))
    with pytest.raises(ValueError, match="psis_draws must be > 0"):
        raw_fit(CORRELATED, guide="auto", psis_draws=0)
