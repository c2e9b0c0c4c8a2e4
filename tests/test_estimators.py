"""Gradient estimators: unbiasedness against closed-form / quadrature gradients, variance
properties (STL at the optimum, DReG vs IWAE, RLOO vs no baseline), discrete latents fitted to
an enumerable posterior, a mixed discrete/continuous model, and validation."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints

import vijax as vj
from tests.conftest import raw_fit
from vijax.guides.base import softplus, softplus_inverse
from vijax.guides.resolve import build_guide, resolve_spec
from vijax.objective import make_objective

MU, SIGMA = 0.5, 1.5
GAUSS_1D = vj.Model(lambda z, d: dist.Normal(MU, SIGMA).log_prob(z["x"]), {"x": vj.Latent()})
# q = N(0, 1): away from the optimum, so every gradient component is far from zero
PARAMS_1D = {"loc": jnp.array([0.0]), "raw_scale": jnp.array([float(softplus_inverse(1.0))])}
N_GRAD = 20_000


def _elbo_closed_form(params):
    m, s = params["loc"][0], softplus(params["raw_scale"][0])
    return (-0.5 * jnp.log(2 * jnp.pi * SIGMA**2) - ((m - MU) ** 2 + s**2) / (2 * SIGMA**2)
            + jnp.log(s) + 0.5 * jnp.log(2 * jnp.pi * jnp.e))


def _bound_by_quadrature(params, k: int, alpha: float, nodes: int = 60):
    """``E[1/(1-a) log mean_k w_k^(1-a)]`` over K iid draws by tensor Gauss-Hermite."""
    x, w = np.polynomial.hermite.hermgauss(nodes)
    eps, wt = jnp.asarray(np.sqrt(2.0) * x), jnp.asarray(w / np.sqrt(np.pi))
    m, s = params["loc"][0], softplus(params["raw_scale"][0])
    theta = m + s * eps
    log_w = dist.Normal(MU, SIGMA).log_prob(theta) - dist.Normal(m, s).log_prob(theta)
    grids = jnp.meshgrid(*[log_w] * k, indexing="ij")
    weights = jnp.prod(jnp.stack(jnp.meshgrid(*[wt] * k, indexing="ij")), axis=0)
    stacked = jnp.stack(grids, axis=-1) * (1.0 - alpha)
    inner = (jax.scipy.special.logsumexp(stacked, axis=-1) - jnp.log(k)) / (1.0 - alpha)
    return jnp.sum(weights * inner)


def _flat(tree):
    return jnp.concatenate([jnp.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


def _grad_samples(model, spec, estimator, params, k, n=N_GRAD, state=None, seed=0):
    """``(n, n_params)`` loss gradients at ``params`` from n independent keys."""
    guide = build_guide(resolve_spec(spec), model.target)
    obj = make_objective(model.target, guide, estimator, k)
    st = obj.init_state(jnp.float32) if state is None else state

    @jax.jit
    def grads(keys):
        return jax.vmap(lambda key: _flat(jax.grad(lambda p: obj.loss(key, p, None, st)[0])(
            params)))(keys)

    return np.asarray(grads(jax.random.split(jax.random.key(seed), n)), np.float64)


def _assert_mean_matches(samples, expected, n_se=5.0):
    mean = samples.mean(0)
    se = samples.std(0, ddof=1) / np.sqrt(samples.shape[0])
    assert np.all(np.abs(mean - expected) < n_se * se + 1e-6), (mean, expected, se)


ELBO_ESTIMATORS = {
    "reparam": "reparam", "stl": "stl", "score-rloo": vj.estimators.Score("rloo"),
    "score-none": vj.estimators.Score(None),
}


@pytest.mark.parametrize("name", list(ELBO_ESTIMATORS))
def test_elbo_estimators_are_unbiased(name):
    expected = -np.asarray(_flat(jax.grad(_elbo_closed_form)(PARAMS_1D)))
    samples = _grad_samples(GAUSS_1D, "meanfield", ELBO_ESTIMATORS[name], PARAMS_1D, k=4)
    _assert_mean_matches(samples, expected)


def test_score_with_moving_average_baseline_is_unbiased():
    # any baseline from past steps is independent of the current draws: mid-run state
    expected = -np.asarray(_flat(jax.grad(_elbo_closed_form)(PARAMS_1D)))
    state = {"mean": jnp.float32(-1.3), "count": jnp.int32(7)}
    samples = _grad_samples(GAUSS_1D, "meanfield", vj.estimators.Score("ema"), PARAMS_1D, k=1,
                            state=state)
    _assert_mean_matches(samples, expected)


@pytest.mark.parametrize("name,estimator,alpha", [
    ("iwae", "iwae", 0.0), ("dreg", "dreg", 0.0), ("renyi", vj.estimators.Renyi(0.5), 0.5),
    ("score-vimco", vj.estimators.Score("vimco"), 0.0)])
def test_multi_sample_estimators_match_the_bound_gradient(name, estimator, alpha):
    # K = 2 in one dimension: the bound is a 2-D Gauss-Hermite integral, differentiated exactly
    expected = -np.asarray(_flat(jax.grad(_bound_by_quadrature)(PARAMS_1D, 2, alpha)))
    samples = _grad_samples(GAUSS_1D, "meanfield", estimator, PARAMS_1D, k=2)
    _assert_mean_matches(samples, expected)


def test_iwae_bound_grows_with_k_and_exceeds_the_elbo():
    elbo = float(_elbo_closed_form(PARAMS_1D))
    bounds = [float(_bound_by_quadrature(PARAMS_1D, k, 0.0, nodes=24)) for k in (1, 2, 3)]
    assert abs(bounds[0] - elbo) < 1e-5
    assert elbo < bounds[1] < bounds[2] < 0.0  # log Z = 0
    # the reported loss is the negative bound: its Monte Carlo mean matches the quadrature
    guide = build_guide(resolve_spec("meanfield"), GAUSS_1D.target)
    obj = make_objective(GAUSS_1D.target, guide, "iwae", 2)
    losses = jax.jit(jax.vmap(lambda key: obj.loss(key, PARAMS_1D, None, ())[0]))(
        jax.random.split(jax.random.key(3), N_GRAD))
    se = float(jnp.std(losses)) / np.sqrt(N_GRAD)
    assert obj.name == "neg_iwae_bound"
    assert abs(float(jnp.mean(losses)) + bounds[1]) < 5 * se


GAUSS_3D_COV = np.array([[1.0, 0.6, 0.2], [0.6, 2.0, -0.4], [0.2, -0.4, 0.5]])
GAUSS_3D = vj.Model(lambda z, d: dist.MultivariateNormal(
    jnp.array([1.0, -1.0, 0.5]), jnp.asarray(GAUSS_3D_COV)).log_prob(z["x"]),
    {"x": vj.Latent((3,))})


def test_stl_gradient_vanishes_when_q_is_the_posterior():
    chol = np.linalg.cholesky(GAUSS_3D_COV)
    # q set to the posterior exactly, in the full-rank guide's parameterisation
    params = vj.guides.FullRank.params_from(jnp.array([1.0, -1.0, 0.5]), chol)
    stl = _grad_samples(GAUSS_3D, "fullrank", "stl", params, k=1, n=2000)
    rep = _grad_samples(GAUSS_3D, "fullrank", "reparam", params, k=1, n=2000)
    print(f"gradient variance at the optimum: STL {stl.var(0).sum():.2e}, "
          f"reparam {rep.var(0).sum():.2e}")
    assert np.max(np.abs(stl)) < 1e-3, np.max(np.abs(stl))
    assert np.mean(rep.var(0)) > 0.1


def test_dreg_has_lower_variance_than_iwae():
    params = {"loc": jnp.array([0.3, -0.5, 0.0]), "raw_scale": jnp.full((3,), 0.0)}
    iwae = _grad_samples(GAUSS_3D, "meanfield", "iwae", params, k=8, n=4000)
    dreg = _grad_samples(GAUSS_3D, "meanfield", "dreg", params, k=8, n=4000)
    ratio = iwae.var(0).sum() / dreg.var(0).sum()
    print(f"IWAE / DReG gradient variance (K = 8): {ratio:.2f}")
    assert ratio > 1.5
    # the same expectation (a two-sample comparison within Monte Carlo error)
    se = np.sqrt(iwae.var(0) / len(iwae) + dreg.var(0) / len(dreg))
    assert np.all(np.abs(iwae.mean(0) - dreg.mean(0)) < 5 * se)


# --- discrete latents ----------------------------------------------------------------------
MUS = jnp.array([-1.0, 0.0, 2.0])
Y3 = jnp.array([0.5, -1.2, 2.5])


@vj.model(z=vj.Latent((3,), constraints.integer_interval(0, 2)),
          b=vj.Latent(support=constraints.boolean))
def DISCRETE(z, y):
    lp = dist.Normal(MUS[z["z"]], 1.0).log_prob(y).sum()
    return lp + dist.Bernoulli(probs=0.3).log_prob(z["b"]) + dist.Normal(
        2.0 * z["b"], 1.0).log_prob(1.5)


def _exact_kl(res) -> float:
    """KL(q || posterior) by enumerating all 54 configurations."""
    pz = np.asarray(jax.nn.softmax(res.params["discrete"]["z"]), np.float64)
    pb = np.asarray(jax.nn.softmax(res.params["discrete"]["b"]), np.float64)[0]
    log_joint = jax.jit(DISCRETE.log_joint)
    logs, qs = [], []
    for zs in itertools.product(range(3), repeat=3):
        for b in range(2):
            qs.append(np.prod([pz[i, zs[i]] for i in range(3)]) * pb[b])
            logs.append(float(log_joint({"z": jnp.array(zs), "b": jnp.array(b)}, Y3)))
    qs, logs = np.array(qs), np.array(logs)
    log_z = np.logaddexp.reduce(logs)
    return float(np.sum(qs * (np.log(qs) - (logs - log_z))))


def test_discrete_latents_are_fitted_to_the_exact_posterior():
    res = raw_fit(DISCRETE, Y3, steps=1500, key=jax.random.key(0))
    assert res.diagnostics.num_particles == 8
    assert "rloo" in res.diagnostics.estimator and "z, b" in res.diagnostics.estimator
    kl = _exact_kl(res)
    assert kl < 0.02, kl
    draws = res.sample(jax.random.key(1), 4000)
    assert draws["z"].dtype == jnp.int32 and draws["z"].shape == (4000, 3)
    assert set(np.unique(draws["z"])) <= {0, 1, 2} and set(np.unique(draws["b"])) <= {0, 1}
    # mean() is exact: E[value] from the categorical probabilities; draws agree within MC error
    mean = res.mean()
    np.testing.assert_allclose(np.asarray(draws["z"]).mean(0), mean["z"], atol=0.05)
    assert "z[2]" in str(res.summary())


def test_rloo_reduces_score_function_variance():
    guide = build_guide(resolve_spec("meanfield"), DISCRETE.target)
    params = guide.init(jax.random.key(0), jnp.zeros((DISCRETE.target.full_dim,)))

    def variance(baseline):
        obj = make_objective(DISCRETE.target, guide, vj.estimators.Score(baseline), 8)
        g = jax.jit(jax.vmap(lambda key: _flat(jax.grad(
            lambda p: obj.loss(key, p, Y3, ())[0])(params))))(
            jax.random.split(jax.random.key(1), 2000))
        return float(jnp.sum(jnp.var(g, axis=0)))

    factor = variance(None) / variance("rloo")
    print(f"score-function gradient variance, no baseline / RLOO (K = 8): {factor:.1f}")
    assert factor > 3.0


GMM_Y = jnp.array([-3.4, -2.1, -3.0, -2.6, -3.9, -2.8, 2.7, 3.5, 2.2, 3.1, 3.8, 2.9])


@vj.model(mu=vj.Latent((2,)), z=vj.Latent((12,), constraints.boolean))
def GMM(p, y):
    prior = dist.Normal(0.0, 5.0).log_prob(p["mu"]).sum()
    return prior + dist.Normal(p["mu"][p["z"]], 1.0).log_prob(y).sum()


def test_mixed_discrete_and_continuous_model_trains_stably():
    res = raw_fit(GMM, GMM_Y, steps=1500, key=jax.random.key(0))
    assert res.diagnostics.n_nonfinite_skipped == 0
    assert np.all(np.isfinite(res.losses))
    probs = np.asarray(jax.nn.softmax(res.params["discrete"]["z"]))[:, 1]
    side = probs > 0.5  # which component each point joined (labels may switch)
    assert np.all(side[:6] == side[0]) and np.all(side[6:] != side[0])
    assert np.all(np.maximum(probs, 1 - probs) > 0.9)
    mu = np.asarray(res.mean()["mu"])
    # given the assignments, mu_j | y ~ N(sum y_j / (n_j + 1/25), ...): sd 0.41
    left, right = float(GMM_Y[:6].sum() / (6 + 1 / 25)), float(GMM_Y[6:].sum() / (6 + 1 / 25))
    got = sorted(mu)
    assert abs(got[0] - left) < 0.25 and abs(got[1] - right) < 0.25, got


@pytest.mark.parametrize("guide", ["delta", "lowrank", pytest.param("iaf",
                                                                    marks=pytest.mark.slow)])
def test_discrete_latents_with_other_guides(guide):
    spec = vj.guides.IAF(num_layers=2, hidden=(8,)) if guide == "iaf" else guide
    res = raw_fit(GMM, GMM_Y, guide=spec, steps=300, key=jax.random.key(0))
    assert res.guide.name.endswith("+categorical")
    assert np.isfinite(res.diagnostics.final_loss)


# --- every estimator with every guide family (one compiled step each) -----------------------
ESTIMATORS = ["reparam", "stl", "iwae", "dreg", "renyi", "score"]
GUIDES = ["meanfield", "lowrank", "fullrank", "iaf", "realnvp", "spline"]
# the default suite runs each estimator with one guide family (each family once); the whole
# cross product (36 compiles) runs with -m slow
PAIRS = [pytest.param(e, g, marks=() if i == j else pytest.mark.slow)
         for i, e in enumerate(ESTIMATORS) for j, g in enumerate(GUIDES)]


@pytest.mark.parametrize("estimator,guide", PAIRS)
def test_every_estimator_with_every_guide_family(estimator, guide):
    spec = {"iaf": vj.guides.IAF(num_layers=2, hidden=(8,)),
            "realnvp": vj.guides.RealNVP(num_layers=2, hidden=(8,)),
            "spline": vj.guides.Spline(num_layers=2, hidden=(8,))}.get(guide, guide)
    res = raw_fit(GAUSS_3D, guide=spec, steps=20, num_particles=2, estimator=estimator,
                 chunk_size=20, key=jax.random.key(0))
    assert res.losses.shape == (20,) and np.all(np.isfinite(res.losses))
    assert res.diagnostics.objective == {"iwae": "neg_iwae_bound", "dreg": "neg_iwae_bound",
                                         "renyi": "neg_renyi_bound"}.get(estimator, "neg_elbo")


def test_estimator_in_float64():
    from tests.conftest import precision

    with precision("float64"):
        res = raw_fit(GAUSS_3D, steps=50, num_particles=2, estimator="dreg",
                     key=jax.random.key(0))
    assert res.losses.dtype == np.float64


# --- validation -------------------------------------------------------------------------------
def test_estimator_validation():
    with pytest.raises(ValueError, match="unknown estimator 'elbo'"):
        raw_fit(GAUSS_1D, estimator="elbo")
    with pytest.raises(TypeError, match="estimator must be one of"):
        raw_fit(GAUSS_1D, estimator=3)
    with pytest.raises(ValueError, match="alpha = 1 is the ELBO"):
        vj.estimators.Renyi(alpha=1.0)
    with pytest.raises(ValueError, match="alpha must be a finite number >= 0"):
        vj.estimators.Renyi(alpha=-0.5)
    with pytest.raises(ValueError, match="baseline must be one of"):
        vj.estimators.Score(baseline="mean")
    with pytest.raises(ValueError, match="decay must be in"):
        vj.estimators.Score(baseline="ema", decay=1.0)
    with pytest.raises(ValueError, match="needs num_particles >= 2, got 1"):
        raw_fit(GAUSS_1D, estimator="score", steps=5)
    with pytest.raises(ValueError, match="point mass.*'iwae' needs one"):
        raw_fit(GAUSS_1D, guide="delta", estimator="iwae", steps=5)


def test_discrete_latent_validation():
    lp = lambda z, d: jnp.sum(z["n"]) * 0.0  # noqa: E731
    with pytest.raises(ValueError, match="latent 'n' has a discrete support.*not finite"):
        vj.Model(lp, {"n": vj.Latent(support=constraints.nonnegative_integer)})
    with pytest.raises(ValueError, match="'n' has 100001 values per element"):
        vj.Model(lp, {"n": vj.Latent(support=constraints.integer_interval(0, 100_000))})
    with pytest.raises(ValueError, match="discrete latent\\(s\\) \\['z'\\] get a categorical"):
        raw_fit(GMM, GMM_Y, guide={"mu": "meanfield", "z": "meanfield"}, steps=5)
    with pytest.raises(ValueError, match="discrete latent 'z': value .* is not integer"):
        raw_fit(GMM, GMM_Y, init={"z": np.full(12, 0.5)}, steps=5)
    with pytest.raises(ValueError, match="latent 'z': value .* outside its support"):
        raw_fit(GMM, GMM_Y, init={"z": np.full(12, 2)}, steps=5)
