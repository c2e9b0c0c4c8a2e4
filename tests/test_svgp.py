"""Sparse variational GPs against the exact GP, Titsias' bound and Monte Carlo."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vijax.gp as gp
from tests.conftest import count_compiles, precision
from vijax.gp.fit import _run_chunk

RNG = np.random.default_rng(0)
N = 24
X = np.sort(RNG.uniform(0, 5, N))
Y = np.sin(2 * X) + 0.2 * RNG.normal(size=N)
XS = np.linspace(-1, 6, 9)
KERNEL = gp.Matern52(0.9, 1.1) + gp.RBF(3.0, 0.5)
NOISE = 0.04


def _random_q(p, m):
    A = RNG.normal(size=(m, m))
    return p._replace(q_mean=jnp.asarray(RNG.normal(size=m)),
                      q_scale_tril=jnp.asarray(np.tril(0.3 * A, -1) + np.diag(
                          np.exp(0.3 * RNG.normal(size=m)))))


@jax.jit(static_argnums=0)
def _optimal_q(model, p, X, y):
    def f(m, S):
        return gp.elbo(model, p._replace(q_mean=m, q_scale_tril=S), X, y)
    m, S = gp.natgrad_step(f, p.q_mean, p.q_scale_tril, 1.0)
    return p._replace(q_mean=m, q_scale_tril=S)


def test_inducing_at_data_recovers_exact_gp():
    """Z = X (M = N, fixed), optimal q: the SVGP posterior is the exact GP posterior at test
    points and the ELBO is the exact log marginal likelihood (float64). The jitter (1e-12
    relative) perturbs both by about jitter * cond(Kmm) < 1e-7."""
    with precision("float64"):
        model = gp.SVGP(KERNEL, gp.Gaussian(NOISE), inducing=X, train_inducing=False,
                        jitter=1e-12)
        p = _random_q(gp.init_params(model, X, Y, jax.random.key(0)), N)
        p = _optimal_q(model, p, X, Y)
        mean, var = jax.jit(gp.predict_f, static_argnums=0)(model, p, XS)
        ref_mean, ref_var = gp.exact_posterior(KERNEL, p.kernel, X, Y, NOISE, XS)
        np.testing.assert_allclose(mean, ref_mean, atol=1e-7)
        np.testing.assert_allclose(var, ref_var, atol=1e-7)
        lml = gp.exact_log_marginal(KERNEL, p.kernel, X, Y, NOISE)
        np.testing.assert_allclose(gp.elbo(model, p, X, Y), lml, rtol=1e-9, atol=1e-7)


@pytest.mark.parametrize("seed", [0, 1])
def test_one_natgrad_step_reaches_collapsed_bound(seed):
    """From any q, one full-batch natural-gradient step with gamma = 1 gives the optimal
    q(u): the ELBO equals Titsias' collapsed bound (M = 7 < N, float64)."""
    with precision("float64"):
        Z = np.random.default_rng(seed).uniform(0, 5, 7)
        model = gp.SVGP(KERNEL, gp.Gaussian(NOISE), inducing=Z)
        p = _random_q(gp.init_params(model, X, Y, jax.random.key(seed)), 7)
        before = jax.jit(gp.elbo, static_argnums=0)(model, p, X, Y)
        p = _optimal_q(model, p, X, Y)
        bound = gp.collapsed_bound(KERNEL, p.kernel, Z, X, Y, NOISE)
        assert before < bound - 1.0
        np.testing.assert_allclose(gp.elbo(model, p, X, Y), bound, rtol=1e-10)


@pytest.mark.parametrize("lik, y", [
    (gp.Bernoulli("logit"), np.array([0.0, 1.0, 1.0, 0.0])),
    (gp.Bernoulli("probit"), np.array([1.0, 0.0, 1.0, 1.0])),
    (gp.Poisson(), np.array([0.0, 3.0, 7.0, 1.0])),
    (gp.StudentT(3.0, 0.5), np.array([0.3, -2.0, 4.0, 0.0])),
])
def test_expected_log_prob_matches_monte_carlo(lik, y):
    """Gauss-Hermite (20 points) or closed-form E_q[log p(y|f)] agrees with a 200,000-draw
    Monte Carlo estimate within 4 Monte Carlo standard errors (float64)."""
    with precision("float64"):
        mu = jnp.array([-1.0, 0.3, 1.5, 0.0])
        var = jnp.array([0.5, 2.0, 0.3, 1.0])
        params = lik.init_params(jnp.float64)
        got = lik.expected_log_prob(params, jnp.asarray(y), mu, var)
        f = mu + jnp.sqrt(var) * jax.random.normal(jax.random.key(0), (200_000, 4), jnp.float64)
        lp = lik.log_prob(params, f, jnp.asarray(y))
        mc, se = lp.mean(0), lp.std(0) / np.sqrt(lp.shape[0])
        assert np.all(np.abs(got - mc) < 4 * se), (got, mc, se)
        if isinstance(lik, gp.Poisson):  # the closed form agrees with quadrature too
            gh = gp.Likelihood.expected_log_prob(lik, params, jnp.asarray(y), mu, var)
            np.testing.assert_allclose(got, gh, rtol=1e-8)


def test_minibatch_elbo_is_unbiased():
    """Averaging the N/B-scaled ELBO over the batches of a partition of the data gives the
    full-data ELBO exactly: each epoch's batches are such a partition, so the estimate is
    unbiased (float64, Bernoulli likelihood so the expectation is by quadrature)."""
    with precision("float64"):
        yb = (Y > 0).astype(float)
        model = gp.SVGP(gp.RBF(1.0, 1.0), "bernoulli", inducing=5)
        p = _random_q(gp.init_params(model, X, yb, jax.random.key(0)), 5)
        elbo = jax.jit(gp.elbo, static_argnums=0)
        full = elbo(model, p, X, yb)
        perm = RNG.permutation(N)
        for B in (4, 6, 8):
            parts = [elbo(model, p, X[idx], yb[idx], num_data=N)
                     for idx in perm.reshape(-1, B)]
            np.testing.assert_allclose(np.mean(parts), full, rtol=1e-12)
            assert np.std(parts) > 0  # the batches do differ


def test_fit_gaussian_natgrad_matches_collapsed_bound_float32_and_64():
    """A full-batch natgrad + Adam fit ends at an ELBO equal to the collapsed bound at its
    own hyper-parameters and Z (q optimal), above the initial ELBO; finite in float32."""
    for dtype in ("float32", "float64"):
        with precision(dtype):
            model = gp.SVGP(gp.RBF(), "gaussian", inducing=8)
            res = gp.fit_svgp(model, X, Y, steps=200, key=jax.random.key(0))
            p = res.params
            bound = gp.collapsed_bound(model.kernel, p.kernel, p.Z, X, Y,
                                       p.likelihood["noise"])
            assert np.all(np.isfinite(res.elbo_trace)) and res.n_nonfinite_skipped == 0
            tol = 1e-6 if dtype == "float64" else 1e-2
            # the last step's natgrad used the previous hyper-parameters: a tiny gap remains
            assert abs(res.elbo(X, Y) - float(bound)) < 1e-3 * abs(float(bound)) + tol
            assert res.elbo_trace[-1] > res.elbo_trace[0]
            mean, var = res.predict(XS)
            assert mean.shape == var.shape == (9,) and np.all(var > 0)


@pytest.mark.parametrize("natural", [True, pytest.param(False, marks=pytest.mark.slow)])
def test_minibatch_classification(natural):
    """Minibatched Bernoulli SVGP on two moons: natgrad + Adam (and, slow, Adam-only) raise
    the ELBO and classify the training data well; predictive probabilities lie in (0, 1)."""
    from sklearn.datasets import make_moons

    Xm, ym = make_moons(300, noise=0.2, random_state=0)
    model = gp.SVGP(gp.RBF(), "bernoulli", inducing=12)
    res = gp.fit_svgp(model, Xm, ym, steps=300, batch_size=64, natural_gradients=natural,
                      key=jax.random.key(1))
    p1, _ = res.predict_y(Xm)
    assert np.all((p1 > 0) & (p1 < 1))
    assert np.mean((p1 > 0.5) == ym) > 0.9
    assert res.elbo_trace[-20:].mean() > res.elbo_trace[:20].mean()


def test_refit_same_shapes_compiles_nothing():
    """The chunk program takes data, key and step size as arguments: a second fit on new
    data of the same shapes reuses it."""
    model = gp.SVGP(gp.RBF(), "gaussian", inducing=6)
    gp.fit_svgp(model, X, Y, steps=20, key=jax.random.key(0))
    before = _run_chunk._cache_size()
    with count_compiles() as n:  # the default optimizer is one object, not a new adam
        gp.fit_svgp(model, X, -Y, steps=20, key=jax.random.key(2))
    assert _run_chunk._cache_size() == before
    assert n[0] <= 6  # only small host-side helpers (init), never the chunk program


@pytest.mark.slow
def test_poisson_and_studentt_fit_finite():
    """Non-Gaussian regression likelihoods fit without NaN (quadrature and closed form)."""
    counts = RNG.poisson(np.exp(np.sin(X)))
    res = gp.fit_svgp(gp.SVGP(gp.Matern32(), "poisson", inducing=6, mean="constant"), X,
                      counts, steps=100, key=jax.random.key(0))
    assert np.isfinite(res.elbo(X, counts)) and res.n_nonfinite_skipped == 0
    res = gp.fit_svgp(gp.SVGP(gp.RBF(), gp.StudentT(), inducing=6), X, Y, steps=100,
                      batch_size=12, key=jax.random.key(0))
    assert np.isfinite(res.elbo(X, Y))


@pytest.mark.parametrize("call, match", [
    (lambda: gp.fit_svgp(gp.SVGP(gp.RBF()), X, Y[:-1], steps=1, key=jax.random.key(0)),
     "X has 24 rows, y has 23"),
    (lambda: gp.fit_svgp(gp.SVGP(gp.RBF()), np.where(X > 4, np.nan, X), Y, steps=1,
                         key=jax.random.key(0)), "X has non-finite values"),
    (lambda: gp.SVGP(gp.RBF(), likelihood="gausian"), "likelihood='gausian'"),
    (lambda: gp.SVGP(gp.RBF(), mean="linear"), "mean must be"),
    (lambda: gp.SVGP(gp.RBF(), gp.Gaussian(noise=-0.1)), "Gaussian: noise init -0.1"),
    (lambda: gp.SVGP(gp.RBF(lengthscale=-1.0)), "RBF: lengthscale init -1.0"),
    (lambda: gp.fit_svgp(gp.SVGP(gp.RBF(), "bernoulli", inducing=4), X, Y, steps=1,
                         key=jax.random.key(0)), "y: a Bernoulli likelihood needs labels"),
    (lambda: gp.fit_svgp(gp.SVGP(gp.RBF(), inducing=4), X, Y, steps=1, batch_size=100,
                         key=jax.random.key(0)), "batch_size must be"),
    (lambda: gp.fit_svgp(gp.SVGP(gp.RBF(), inducing=np.zeros((3, 2))), X, Y, steps=1,
                         key=jax.random.key(0)), "inducing inputs have 2 columns"),
])
def test_bad_inputs_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_more_inducing_points_than_data_warns():
    with pytest.warns(UserWarning, match="more inducing points than data"):
        gp.init_params(gp.SVGP(gp.RBF(), inducing=N + 5), X, Y, jax.random.key(0))


def test_nonfinite_step_is_skipped_and_counted():
    """A step whose update is not finite (here a NaN natgrad step size at step 3) is skipped,
    counted, and reported with a warning; the fit continues from the previous state."""
    yb = (Y > 0).astype(float)
    model = gp.SVGP(gp.RBF(), "bernoulli", inducing=5)
    with pytest.warns(RuntimeWarning, match="1 of 10 steps had a non-finite"):
        res = gp.fit_svgp(model, X, yb, steps=10, key=jax.random.key(0),
                          natgrad_step=lambda t: jnp.where(t == 3, jnp.nan, 0.1))
    assert res.n_nonfinite_skipped == 1
    assert all(np.all(np.isfinite(v)) for v in jax.tree.leaves(res.params))
