"""vijax.metrics: every metric against a hand computation (numpy loops written here, scipy for
the normal CDF and root finding), coverage and ECE on synthetic predictions with known answers
(tolerances from the binomial standard error), and the result-level functions on a Bayesian
linear regression whose predictive is known in closed form."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from scipy import optimize, special, stats

import vijax as vj
from tests.conftest import LinearRegression, precision
from vijax import metrics

DTYPES = ["float32", "float64"]


def _tol(dtype):
    return {"rtol": 2e-5, "atol": 2e-5} if dtype == np.float32 else {"rtol": 1e-10,
                                                                       "atol": 1e-10}


# ----------------------------------------------------------------------- hand computations


def _hand_regression(loc, scale, y, levels):
    """Loops over points and draws, in float64."""
    s, n = loc.shape
    out = {k: np.zeros(n) for k in ("mean", "epi", "ale", "ll")}
    lower, upper = np.zeros((len(levels), n)), np.zeros((len(levels), n))
    for j in range(n):
        m = sum(loc[i, j] for i in range(s)) / s
        out["mean"][j] = m
        out["epi"][j] = sum((loc[i, j] - m) ** 2 for i in range(s)) / s
        out["ale"][j] = sum(scale[i, j] ** 2 for i in range(s)) / s
        dens = sum(math.exp(-0.5 * ((y[j] - loc[i, j]) / scale[i, j]) ** 2)
                   / (scale[i, j] * math.sqrt(2 * math.pi)) for i in range(s)) / s
        out["ll"][j] = math.log(dens)

        def cdf(q, j=j):
            return np.mean([stats.norm.cdf(q, loc[i, j], scale[i, j]) for i in range(s)])

        for k, a in enumerate(levels):
            for arr, p in ((lower, (1 - a) / 2), (upper, (1 + a) / 2)):
                arr[k, j] = optimize.brentq(lambda q, p=p: cdf(q) - p, -100, 100, xtol=1e-13)
    return out, lower, upper


def _hand_classification(p, y, n_bins):
    s, n, c = p.shape
    pbar = np.array([[sum(p[i, j, k] for i in range(s)) / s for k in range(c)]
                     for j in range(n)])

    def entropy(q):
        return -sum(v * math.log(v) for v in q if v > 0)

    total = np.array([entropy(pbar[j]) for j in range(n)])
    ale = np.array([sum(entropy(p[i, j]) for i in range(s)) / s for j in range(n)])
    # mutual information as the mean KL(p_s || pbar): independent of total - aleatoric
    mi = np.array([sum(sum(p[i, j, k] * math.log(p[i, j, k] / pbar[j, k])
                           for k in range(c) if p[i, j, k] > 0) for i in range(s)) / s
                   for j in range(n)])
    ll = np.array([math.log(pbar[j, y[j]]) for j in range(n)])
    pred = [max(range(c), key=lambda k, j=j: pbar[j, k]) for j in range(n)]
    err = sum(pred[j] != y[j] for j in range(n)) / n
    brier = sum(sum((pbar[j, k] - (k == y[j])) ** 2 for k in range(c)) for j in range(n)) / n
    ece, counts = 0.0, []
    for m in range(n_bins):
        lo, hi = m / n_bins, (m + 1) / n_bins
        members = [j for j in range(n) if lo < max(pbar[j]) <= hi]
        counts.append(len(members))
        if members:
            acc = sum(pred[j] == y[j] for j in members) / len(members)
            conf = sum(max(pbar[j]) for j in members) / len(members)
            ece += len(members) / n * abs(acc - conf)
    return dict(pbar=pbar, total=total, ale=ale, mi=mi, ll=ll, err=err, brier=brier, ece=ece,
                counts=counts)


@pytest.mark.parametrize("dtype", DTYPES)
def test_regression_against_hand_computation(dtype):
    rng = np.random.default_rng(0)
    s, n, levels = 7, 5, (0.5, 0.9)
    loc = rng.normal(size=(s, n)) * 2
    scale = rng.uniform(0.3, 1.5, size=(s, n))
    y = rng.normal(size=n) * 2
    hand, lower, upper = _hand_regression(loc, scale, y, levels)
    with precision(dtype) as dt:
        m = metrics.regression_from_draws(loc.astype(dt), scale.astype(dt), y.astype(dt),
                                          levels=levels)
        tol = _tol(dt)
        assert m.mean.dtype == dt and m.lower.dtype == dt and m.test_ll.dtype == dt
        np.testing.assert_allclose(m.mean, hand["mean"], **tol)
        np.testing.assert_allclose(m.epistemic_var, hand["epi"], **tol)
        np.testing.assert_allclose(m.aleatoric_var, hand["ale"], **tol)
        # the mixture's variance from its second moment: E[y^2] - E[y]^2
        second = np.mean(scale**2 + loc**2, axis=0)
        np.testing.assert_allclose(m.total_var, second - hand["mean"] ** 2, **tol)
        np.testing.assert_allclose(m.total_var, m.epistemic_var + m.aleatoric_var, **tol)
        np.testing.assert_allclose(m.log_lik, hand["ll"], **tol)
        np.testing.assert_allclose(m.test_ll, hand["ll"].mean(), **tol)
        rmse = math.sqrt(sum((hand["mean"][j] - y[j]) ** 2 for j in range(n)) / n)
        np.testing.assert_allclose(m.rmse, rmse, **tol)
        qtol = {"rtol": 0, "atol": 1e-4 if dt == np.float32 else 1e-9}
        np.testing.assert_allclose(m.lower, lower, **qtol)
        np.testing.assert_allclose(m.upper, upper, **qtol)
        inside = (lower <= y) & (y <= upper)
        np.testing.assert_allclose(m.coverage, inside.mean(axis=1))
        np.testing.assert_allclose(m.width, (upper - lower).mean(axis=1), **qtol)
        assert "RMSE" in str(m) and "90%" in m.summary()


def test_one_draw_is_the_gaussian():
    loc, scale, y = np.array([[0.5, -1.0]]), np.array([[2.0, 0.1]]), np.array([0.0, -1.05])
    m = metrics.regression_from_draws(loc, scale, y, levels=(0.95,))
    z = stats.norm.ppf(0.975)
    np.testing.assert_allclose(m.upper[0], loc[0] + z * scale[0], rtol=1e-5)
    np.testing.assert_allclose(m.log_lik, stats.norm.logpdf(y, loc[0], scale[0]), rtol=1e-5)
    np.testing.assert_allclose(m.epistemic_var, 0.0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_mixture_log_lik_of_a_student_t(dtype):
    rng = np.random.default_rng(7)
    s, n, df = 5, 6, 4.0
    loc, scale, y = rng.normal(size=(s, n)), rng.uniform(0.5, 2, (s, n)), rng.normal(size=n)
    hand = [math.log(sum(stats.t.pdf(y[j], df, loc[i, j], scale[i, j]) for i in range(s)) / s)
            for j in range(n)]
    with precision(dtype) as dt:
        lp = dist.StudentT(df, loc.astype(dt), scale.astype(dt)).log_prob(y.astype(dt))
        out = metrics.mixture_log_lik(lp)
        assert out.dtype == dt
        np.testing.assert_allclose(out, hand, **_tol(dt))
    # a zero density is -inf, not an error; NaN is
    assert metrics.mixture_log_lik(np.array([[-np.inf], [-np.inf]]))[0] == -np.inf
    with pytest.raises(ValueError, match=r"log_prob has 1 NaN"):
        metrics.mixture_log_lik(np.array([[0.0], [np.nan]]))


def test_coverage_of_a_correctly_specified_mixture_is_nominal():
    # y drawn from the same bimodal mixture the metrics see: coverage ~ Binomial(N, level)/N.
    # A moment-matched Gaussian would cover ~69% at the 50% level here, so the check tells the
    # two apart.
    rng = np.random.default_rng(1)
    s, n = 20, 4000
    loc = np.where(rng.uniform(size=(s, n)) < 0.5, -2.0, 2.0) + 0.1 * rng.normal(size=(s, n))
    scale = rng.uniform(0.3, 0.7, size=(s, n))
    pick = rng.integers(s, size=n)
    y = loc[pick, np.arange(n)] + scale[pick, np.arange(n)] * rng.normal(size=n)
    levels = np.array([0.5, 0.9, 0.95])
    m = metrics.regression_from_draws(loc.astype(np.float32), scale.astype(np.float32),
                                      y.astype(np.float32), levels=levels)
    se = np.sqrt(levels * (1 - levels) / n)  # binomial standard error
    np.testing.assert_array_less(np.abs(np.asarray(m.coverage) - levels), 4 * se)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("from_logits", [False, True])
def test_classification_against_hand_computation(dtype, from_logits):
    rng = np.random.default_rng(2)
    s, n, c, n_bins = 6, 40, 4, 5
    logits = 1.5 * rng.normal(size=(s, n, c))
    p = special.softmax(logits, axis=-1)
    y = rng.integers(c, size=n)
    hand = _hand_classification(p, y, n_bins)
    with precision(dtype) as dt:
        x = (logits if from_logits else p).astype(dt)
        m = metrics.classification_from_draws(x, y, from_logits=from_logits, n_bins=n_bins)
        tol = _tol(dt)
        assert m.probs.dtype == dt and m.ece.dtype == dt
        np.testing.assert_allclose(m.probs, hand["pbar"], **tol)
        np.testing.assert_allclose(m.log_lik, hand["ll"], **tol)
        np.testing.assert_allclose(m.test_ll, hand["ll"].mean(), **tol)
        np.testing.assert_allclose(m.error, hand["err"], **tol)
        np.testing.assert_allclose(m.brier, hand["brier"], **tol)
        np.testing.assert_allclose(m.ece, hand["ece"], **tol)
        np.testing.assert_array_equal(m.bin_count, hand["counts"])
        np.testing.assert_allclose(m.total_entropy, hand["total"], **tol)
        np.testing.assert_allclose(m.aleatoric_entropy, hand["ale"], **tol)
        np.testing.assert_allclose(m.epistemic, hand["mi"], **tol)  # the KL form of the MI
        np.testing.assert_allclose(m.total_entropy, m.aleatoric_entropy + m.epistemic, **tol)
        assert "ECE" in str(m)


def test_classification_zero_probabilities_are_finite():
    p = np.array([[[1.0, 0.0, 0.0], [0.0, 0.5, 0.5]]])
    m = metrics.classification_from_draws(p, np.array([0, 1]))
    assert np.isfinite(m.total_entropy).all() and np.isfinite(m.test_ll)
    np.testing.assert_allclose(m.total_entropy, [0.0, math.log(2)], atol=1e-7)
    # a true class of probability 0 is an honest -inf log-likelihood, not NaN
    assert metrics.classification_from_draws(p, np.array([1, 1])).log_lik[0] == -np.inf


def _binary_predictions(rng, n, accuracy_of):
    """Confidence c ~ U(0.5, 1) on a random predicted class; correct with prob accuracy_of(c)."""
    conf = rng.uniform(0.5, 1.0, size=n)
    pred = rng.integers(2, size=n)
    correct = rng.uniform(size=n) < accuracy_of(conf)
    y = np.where(correct, pred, 1 - pred)
    p1 = np.where(pred == 1, conf, 1 - conf)
    return np.stack([1 - p1, p1], axis=-1)[None], y, conf


def test_ece_of_calibrated_predictions_is_within_monte_carlo_error():
    rng = np.random.default_rng(3)
    n = 20_000
    probs, y, _ = _binary_predictions(rng, n, lambda c: c)
    m = metrics.classification_from_draws(probs, y)
    # E|acc_m - conf_m| <= sqrt(conf(1-conf)/n_m) <= 0.5/sqrt(n_m) per bin: the bias of ECE
    # under perfect calibration; allow 3 times the weighted sum
    counts = np.asarray(m.bin_count)
    bound = np.sum(counts / n * 0.5 / np.sqrt(np.maximum(counts, 1)))
    assert float(m.ece) < 3 * bound, (float(m.ece), bound)


def test_ece_of_a_known_miscalibration():
    # accuracy a(c) = 0.5 + (c - 0.5)/2 < c: the gap has one sign, so binning loses nothing
    # and ECE -> E|a(c) - c| = E[(c - 0.5)/2] = 0.125 for c ~ U(0.5, 1)
    rng = np.random.default_rng(4)
    n = 20_000
    probs, y, _ = _binary_predictions(rng, n, lambda c: 0.5 + (c - 0.5) / 2)
    m = metrics.classification_from_draws(probs, y)
    se = 0.5 / math.sqrt(n)  # sd of the pooled accuracy error, at most 0.5/sqrt(N)
    assert abs(float(m.ece) - 0.125) < 4 * se + 0.005, float(m.ece)  # + the near-0 bin bias
    # and the reliability diagram's bins average the confidences they hold
    filled = np.asarray(m.bin_count) > 0
    edges = np.arange(1, 16) / 15
    assert np.all(np.asarray(m.bin_confidence)[filled] <= edges[filled] + 1e-6)


# ----------------------------------------------------------------------------- bad inputs


def test_regression_bad_inputs():
    loc, scale, y = np.zeros((3, 4)), np.ones((3, 4)), np.zeros(4)
    with pytest.raises(ValueError, match=r"scale has shape \(3, 5\) but loc has shape \(3, 4\)"):
        metrics.regression_from_draws(loc, np.ones((3, 5)), y)
    with pytest.raises(ValueError, match=r"y has shape \(5,\).*\(N,\) = \(4,\)"):
        metrics.regression_from_draws(loc, scale, np.zeros(5))
    with pytest.raises(ValueError, match=r"loc must have 2 dimensions.*got shape \(4,\)"):
        metrics.regression_from_draws(np.zeros(4), scale, y)
    with pytest.raises(ValueError, match=r"scale must be > 0.*-1\.0"):
        metrics.regression_from_draws(loc, scale * -1, y)
    with pytest.raises(ValueError, match=r"scale must be > 0"):
        metrics.regression_from_draws(loc, scale * 0, y)
    with pytest.raises(ValueError, match=r"S = 0"):
        metrics.regression_from_draws(np.zeros((0, 4)), np.ones((0, 4)), y)
    with pytest.raises(ValueError, match=r"loc has 1 non-finite value.*\(1, 2\)"):
        metrics.regression_from_draws(_nan_at((3, 4), (1, 2)), scale, y)
    with pytest.raises(ValueError, match=r"y has 1 non-finite"):
        metrics.regression_from_draws(loc, scale, np.array([0, np.inf, 0, 0]))
    with pytest.raises(TypeError, match=r"loc must be a floating array.*int"):
        metrics.regression_from_draws(np.zeros((3, 4), int), scale, y)
    with pytest.raises(ValueError, match=r"levels must lie strictly between 0 and 1"):
        metrics.regression_from_draws(loc, scale, y, levels=(0.5, 1.0))


def _nan_at(shape, index):
    x = np.zeros(shape)
    x[index] = np.nan
    return x


def test_classification_bad_inputs():
    p = np.full((2, 3, 4), 0.25)
    y = np.array([0, 1, 3])
    with pytest.raises(ValueError, match=r"outside \[0, C\) = \[0, 4\).*y\[1\] = 4"):
        metrics.classification_from_draws(p, np.array([0, 4, 1]))
    with pytest.raises(ValueError, match=r"outside \[0, C\).*y\[0\] = -1"):
        metrics.classification_from_draws(p, np.array([-1, 0, 1]))
    with pytest.raises(ValueError, match=r"y has shape \(2,\) but probs has shape \(2, 3, 4\)"):
        metrics.classification_from_draws(p, np.array([0, 1]))
    with pytest.raises(TypeError, match=r"y must be integer.*float"):
        metrics.classification_from_draws(p, y.astype(float))
    with pytest.raises(ValueError, match=r"S = 0"):
        metrics.classification_from_draws(np.zeros((0, 3, 4)), y)
    with pytest.raises(ValueError, match=r"sum to 1.*from_logits=True"):
        metrics.classification_from_draws(p * 1.1, y)
    with pytest.raises(ValueError, match=r"lie in \[0, 1\]"):
        metrics.classification_from_draws(p - 0.5, y)
    with pytest.raises(ValueError, match=r"probs must have 3 dimensions.*\(3, 4\)"):
        metrics.classification_from_draws(p[0], y)
    with pytest.raises(ValueError, match=r"probs has 1 non-finite"):
        metrics.classification_from_draws(p + _nan_at(p.shape, (1, 2, 0)), y,
                                          from_logits=True)
    with pytest.raises(ValueError, match=r"n_bins must be an int >= 1"):
        metrics.classification_from_draws(p, y, n_bins=0)


# --------------------------------------------------------------------------- result level


@pytest.fixture(scope="module")
def blr_fit():
    blr = LinearRegression(0)
    res = vj.fit(vj.Model(_blr_log_joint, {"w": vj.Latent(shape=(blr.D,))}), blr.data,
                 guide="fullrank", steps=1500, key=jax.random.key(0), convergence=None,
                 progress=False, psis_draws=0, precondition=None)
    return blr, res


def _blr_log_joint(z, d):
    lr = LinearRegression
    return (dist.Normal(0.0, lr.s).log_prob(z["w"]).sum()
            + dist.Normal(d["X"] @ z["w"], lr.sigma).log_prob(d["y"]).sum())


def test_regression_metrics_match_the_exact_predictive(blr_fit):
    blr, res = blr_fit
    rng = np.random.default_rng(5)
    x_test = rng.normal(size=(6, blr.D))
    y_test = x_test @ blr.mean + blr.sigma * rng.normal(size=6)
    n = 4000

    def fn(z):
        return x_test @ z["w"], blr.sigma  # a scalar noise sd, broadcast over the points

    m = metrics.regression_metrics(res, fn, y_test, jax.random.key(1), n)
    exact_mean = x_test @ blr.mean
    exact_epi = np.einsum("nd,de,ne->n", x_test, blr.cov, x_test)
    # 4 Monte Carlo standard errors of the mean over n draws, plus a quarter of a posterior sd
    # for the fit itself (this stochastic fit's mean is off by ~0.15 sd)
    np.testing.assert_array_less(np.abs(np.asarray(m.mean) - exact_mean),
                                 4 * np.sqrt(exact_epi / n) + 0.25 * np.sqrt(exact_epi))
    # variance estimate: relative sd sqrt(2/n) ~ 0.022; q's variances are within ~10% of the
    # posterior's for this fit
    np.testing.assert_allclose(m.epistemic_var, exact_epi, rtol=0.2)
    np.testing.assert_allclose(m.aleatoric_var, blr.sigma**2, rtol=1e-5)
    exact_ll = stats.norm.logpdf(y_test, exact_mean, np.sqrt(exact_epi + blr.sigma**2))
    np.testing.assert_allclose(m.log_lik, exact_ll, atol=0.05)
    # the result-level function is predictive followed by the array-level one
    loc, _ = vj.predictive(res, fn, jax.random.key(1), n)
    ref = metrics.regression_from_draws(loc, np.full(loc.shape, blr.sigma, np.float32), y_test)
    np.testing.assert_allclose(m.log_lik, ref.log_lik, rtol=1e-6)


def test_classification_metrics_is_predictive_then_from_draws(blr_fit):
    blr, res = blr_fit
    x_test = np.random.default_rng(6).normal(size=(8, blr.D))
    labels = np.array([0, 1, 1, 0, 1, 0, 0, 1])

    def fn(z):
        return jnp.stack([jnp.zeros(8), jnp.asarray(x_test, jnp.float32) @ z["w"]], axis=-1)

    m = metrics.classification_metrics(res, fn, labels, jax.random.key(2), 64, n_bins=4)
    ref = metrics.classification_from_draws(vj.predictive(res, fn, jax.random.key(2), 64),
                                            labels, from_logits=True, n_bins=4)
    for a, b in zip(m, ref, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6)


def test_result_level_bad_fn_outputs(blr_fit):
    blr, res = blr_fit
    with pytest.raises(TypeError, match=r"must return a pair \(loc, scale\)"):
        metrics.regression_metrics(res, lambda z: z["w"], np.zeros(3), jax.random.key(0), 4)
    with pytest.raises(ValueError, match=r"scale must be a scalar or of shape \(N,\)"):
        metrics.regression_metrics(res, lambda z: (z["w"], jnp.ones(2)), np.zeros(3),
                                   jax.random.key(0), 4)
    with pytest.raises(ValueError, match=r"scale must be > 0"):
        metrics.regression_metrics(res, lambda z: (z["w"], -1.0), np.zeros(3),
                                   jax.random.key(0), 4)
    with pytest.raises(ValueError, match=r"logits of shape \(N, C\).*\(3,\)"):
        metrics.classification_metrics(res, lambda z: z["w"], np.zeros(3, int),
                                       jax.random.key(0), 4)
