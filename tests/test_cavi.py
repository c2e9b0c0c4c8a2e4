"""CAVI for the Bayesian Gaussian mixture (vijax/cavi.py) against the truth: scikit-learn's
implementation of the same updates, a Monte Carlo estimate of the ELBO from numpyro
densities, the true centres of simulated clusters, and gradient VI on the same model."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from scipy import stats
from scipy.optimize import linear_sum_assignment

import vijax as vj
from tests.conftest import count_compiles, precision
from vijax.cavi import GMMPrior, cavi_gmm, default_gmm_prior, gmm_model

CENTRES = np.array([[0.0, 0.0], [4.0, 0.0], [0.0, 4.0]])
SD = 0.5


def _clusters(n_per: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.concatenate([rng.normal(c, SD, (n_per, 2)) for c in CENTRES])


def _match(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The permutation ``p`` of b's rows closest to a's: ``b[p] ~ a`` (Hungarian)."""
    cost = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
    rows, cols = linear_sum_assignment(cost)
    return cols[np.argsort(rows)]


@pytest.fixture(scope="module")
def fitted():
    x = _clusters(100, 0)  # N = 300, K = 3, D = 2
    return x, cavi_gmm(x, 3, key=1)


def test_elbo_is_monotone_and_converges(fitted):
    _, res = fitted
    assert res.converged and res.iterations == len(res.elbo) > 1
    # every block update is an exact maximiser, so the ELBO never drops (float64 rounding only)
    assert np.all(np.diff(res.elbo) >= -1e-9 * np.abs(res.elbo[1:]))
    assert res.r.shape == (300, 3) and np.allclose(res.r.sum(1), 1)


def test_recovers_the_true_centres(fitted):
    _, res = fitted
    p = _match(CENTRES, res.m)
    m, w, beta, nu = res.m[p], res.W[p], res.beta[p], res.nu[p]
    # q(mu_k) is a Student-t with covariance W_k^-1 / (beta_k (nu_k - D - 1)); the posterior
    # mean is within a few posterior sds of the truth: 4 sd per coordinate
    sd = np.sqrt(np.diagonal(np.linalg.inv(w), axis1=1, axis2=2) / (beta * (nu - 3))[:, None])
    assert np.all(np.abs(m - CENTRES) < 4 * sd), (m, sd)
    assert np.allclose(res.alpha[p], res.prior.alpha0 + 100, atol=1.0)


def test_matches_scikit_learn(fitted):
    # scikit-learn's BayesianGaussianMixture runs the same updates (Bishop 10.2) with the same
    # default prior; from its own k-means start it reaches the same fixed point
    from sklearn.mixture import BayesianGaussianMixture

    x, res = fitted
    sk = BayesianGaussianMixture(n_components=3, weight_concentration_prior_type=(
        "dirichlet_distribution"), reg_covar=0.0, tol=1e-12, max_iter=1000,
        random_state=0).fit(x)
    p = _match(sk.means_, res.m)
    np.testing.assert_allclose(res.m[p], sk.means_, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(res.alpha[p], sk.weight_concentration_, rtol=1e-6)
    np.testing.assert_allclose(res.beta[p], sk.mean_precision_, rtol=1e-6)
    np.testing.assert_allclose(res.nu[p], sk.degrees_of_freedom_, rtol=1e-6)
    # scikit-learn stores W_k^-1 / nu_k as covariances_
    np.testing.assert_allclose(np.linalg.inv(res.W[p] * res.nu[p, None, None]),
                               sk.covariances_, rtol=1e-6)


def test_elbo_equals_its_monte_carlo_estimate(fitted):
    """The closed form against E_q[log p(x, z, pi, mu, Lambda) - log q] from draws of q and
    numpyro's densities; and the marginal bound E_q[log p(x, pi, mu, Lambda) - log q(pi, mu,
    Lambda)] (gmm_model's density, z summed out) is at least as high."""
    x, res = fitted
    pr, k, n, s = res.prior, 3, len(x), 4000
    rng = np.random.default_rng(2)
    pi = rng.dirichlet(res.alpha, s)
    lam = np.stack([stats.wishart(df=res.nu[j], scale=res.W[j]).rvs(s, random_state=rng)
                    for j in range(k)], 1)  # (s, K, D, D)
    chol = np.linalg.cholesky(np.linalg.inv(res.beta[None, :, None, None] * lam))
    mu = res.m + np.einsum("skde,ske->skd", chol, rng.normal(size=(s, k, 2)))
    z = (rng.random((s, n, 1)) > np.cumsum(res.r, 1)[None]).sum(-1)  # (s, N)
    model = gmm_model(pr, k)

    def log_ratios(pi, lam, mu, z):
        lp = dist.Dirichlet(jnp.full(k, pr.alpha0)).log_prob(pi)
        lp += dist.Wishart(pr.nu0, scale_matrix=pr.W0).log_prob(lam).sum(1)
        lp += dist.MultivariateNormal(pr.m0, precision_matrix=pr.beta0 * lam).log_prob(mu).sum(1)
        lq = dist.Dirichlet(res.alpha).log_prob(pi)
        lq += dist.Wishart(res.nu, scale_matrix=res.W).log_prob(lam).sum(1)
        lq += dist.MultivariateNormal(res.m, precision_matrix=res.beta[:, None, None] * lam
                                      ).log_prob(mu).sum(1)
        lam_z = jnp.take_along_axis(lam, z[:, :, None, None], 1)
        mu_z = jnp.take_along_axis(mu, z[:, :, None], 1)
        lik = jnp.log(jnp.take_along_axis(pi, z, 1)) + dist.MultivariateNormal(
            mu_z, precision_matrix=lam_z).log_prob(x)
        lq_z = dist.Categorical(probs=res.r).log_prob(z)
        return lp + lik.sum(1) - lq - lq_z.sum(1), lp - lq

    def marginal_log_lik(pi, lam, mu):
        return jnp.sum(model.log_likelihood({"pi": pi, "Lambda": lam, "mu": mu}, {"x": x}))

    with precision("float64"):
        full, prior_ratio = (np.asarray(a) for a in jax.jit(log_ratios)(pi, lam, mu, z))
        # the z-marginal bound on 400 of the draws (its batched (draws, N, K) Gaussian
        # densities are the expensive part)
        m = 400
        marginal = prior_ratio[:m] + np.asarray(jax.jit(jax.vmap(marginal_log_lik))(
            pi[:m], lam[:m], mu[:m]))
    # tolerance: 4 Monte Carlo standard errors of the mean of s independent draws
    se = full.std(ddof=1) / np.sqrt(s)
    assert abs(full.mean() - res.elbo[-1]) < 4 * se, (full.mean(), res.elbo[-1], se)
    se_m = marginal.std(ddof=1) / np.sqrt(m)
    assert marginal.mean() > res.elbo[-1] - 4 * se_m


def test_float32_agrees_with_float64(fitted):
    x, res = fitted
    res32 = cavi_gmm(x, 3, key=1, dtype=np.float32)
    assert res32.m.dtype == np.float32 and res32.r.dtype == np.float32
    # the k-means++ draws differ between dtypes, so the labels may too
    np.testing.assert_allclose(res32.m[_match(res.m, res32.m)], res.m, atol=1e-3)
    np.testing.assert_allclose(res32.elbo[-1], res.elbo[-1], rtol=1e-5)


def test_new_data_of_the_same_shape_compiles_nothing(fitted):
    x, res = fitted
    with count_compiles() as n:
        again = cavi_gmm(x + 1.0, 3, key=1)
    assert n[0] == 0
    np.testing.assert_allclose(again.m, res.m + 1.0, atol=1e-6)


def test_prior_validation_and_default():
    x = _clusters(5, 0)
    prior = default_gmm_prior(x, 3)
    assert prior.alpha0 == pytest.approx(1 / 3) and prior.nu0 == 2.0
    np.testing.assert_allclose(prior.W0, np.linalg.inv(np.cov(x.T)))


X5 = np.random.default_rng(0).normal(size=(5, 3))


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((np.zeros(5), 2), {}, ValueError, "2-D"),
    ((np.array([[0.0, 1.0], [np.nan, 2.0], [1.0, 1.0]]), 2), {}, ValueError, "row 1"),
    ((np.eye(3), 0), {}, ValueError, r"num_components must be in \[1, 3\]"),
    ((np.eye(3), 4), {}, ValueError, "num_components"),
    ((np.eye(3), 2.0), {}, TypeError, "num_components must be an int"),
    ((np.eye(2), 1), {}, ValueError, "full rank"),
    ((X5, 2), {"prior": GMMPrior(1.0, 1.0, np.zeros(3), -np.eye(3), 3.0)}, ValueError,
     "W0 must be symmetric positive definite"),
    ((X5, 2), {"prior": GMMPrior(1.0, 1.0, np.zeros(3), [[1, 1, 0], [0, 1, 0],
                                                                [0, 0, 1]], 3.0)},
     ValueError, "not symmetric"),
    ((X5, 2), {"prior": GMMPrior(1.0, 1.0, np.zeros(3), np.eye(3), 1.5)}, ValueError,
     "nu0 must be > D - 1 = 2"),
    ((X5, 2), {"prior": GMMPrior(1.0, 1.0, np.zeros(2), np.eye(3), 3.0)}, ValueError,
     r"m0 must be a finite vector of shape \(3,\)"),
    ((X5, 2), {"prior": GMMPrior(0.0, 1.0, np.zeros(3), np.eye(3), 3.0)}, ValueError,
     "alpha0 must be a finite positive scalar"),
    ((X5, 2), {"max_iters": 0}, ValueError, "max_iters"),
    ((X5, 2), {"tol": -1.0}, ValueError, "tol"),
    ((X5, 2), {"key": "seed"}, TypeError, "key"),
    ((X5, 2), {"dtype": np.int32}, ValueError, "dtype"),
])
def test_bad_inputs_are_named(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        cavi_gmm(*args, **kwargs)


@pytest.mark.slow
def test_cavi_and_gradient_vi_agree_on_the_component_means():
    """Both fit q to the same posterior of mu (gradient VI with z summed out, a full-rank
    Gaussian over the unconstrained (pi, mu, Lambda)). With clusters 8 sds apart every
    q(z_n) is one-hot to within 1e-10, so CAVI's mean-field over z costs nothing and the two
    q means of mu differ by much less than the posterior sd: 0.25 sd, plus 4 Monte Carlo
    standard errors of the gradient-VI mean (4,000 draws)."""
    x = _clusters(20, 3)
    res = cavi_gmm(x, 3, key=0)
    with precision("float64"):
        fit = vj.fit(gmm_model(res.prior, 3), {"x": x}, guide="fullrank", key=0,
                     progress=False, dtype=np.float64, init={"mu": CENTRES[::-1]})
        draws = np.asarray(fit.sample(jax.random.key(1), 4000)["mu"])
    mean = draws.mean(0)
    p = _match(mean, res.m)
    sd = np.sqrt(np.diagonal(np.linalg.inv(res.W[p]), axis1=1, axis2=2)
                 / (res.beta[p] * (res.nu[p] - 3))[:, None])
    se = draws.std(0) / np.sqrt(len(draws))
    assert np.all(np.abs(mean - res.m[p]) < 0.25 * sd + 4 * se), (mean, res.m[p], sd)
