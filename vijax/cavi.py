"""Coordinate-ascent variational inference (CAVI) for the Bayesian Gaussian mixture.

The model (Bishop, *Pattern Recognition and Machine Learning*, 2006, section 10.2), with data
``x`` of shape ``(N, D)`` and ``K`` components::

    pi ~ Dirichlet(alpha0 * 1_K)
    Lambda_k ~ Wishart(W0, nu0),  mu_k | Lambda_k ~ Normal(m0, (beta0 Lambda_k)^-1)
    z_n ~ Categorical(pi),        x_n | z_n = k ~ Normal(mu_k, Lambda_k^-1)

The mean-field family ``q(z) q(pi) prod_k q(mu_k, Lambda_k)`` has the conjugate optimal
factors ``q(z_n) = Cat(r_n)``, ``q(pi) = Dirichlet(alpha)`` and ``q(mu_k, Lambda_k) =
Normal(mu_k | m_k, (beta_k Lambda_k)^-1) Wishart(Lambda_k | W_k, nu_k)``. With ``y = x - m0``,
``N_k = sum_n r_nk``, ``s_k = sum_n r_nk y_n`` and ``S_k = sum_n r_nk y_n y_n^T``, one sweep is

* M-step (PRML 10.58-10.63): ``alpha_k = alpha0 + N_k``, ``beta_k = beta0 + N_k``,
  ``nu_k = nu0 + N_k``, ``m_k = m0 + s_k / beta_k``,
  ``W_k^-1 = W0^-1 + S_k - s_k s_k^T / beta_k`` (PRML's 10.62 written in sums, so that an
  empty component needs no division by ``N_k``);
* E-step (PRML 10.46-10.67): ``log r_nk = E[log pi_k] + E[log|Lambda_k|] / 2 - D/2 log(2 pi)
  - (D / beta_k + nu_k (x_n - m_k)^T W_k (x_n - m_k)) / 2 + const``, normalised over ``k``.

Each update maximises the evidence lower bound (ELBO) exactly in its block, so the ELBO never
decreases (Blei, Kucukelbir & McAuliffe 2017, "Variational inference: a review for
statisticians", section 3). The ELBO is computed in closed form (PRML 10.70-10.77, grouped as
expected log likelihood minus KL divergences)::

    ELBO = sum_nk r_nk [E log pi_k + E log|Lambda_k| / 2 - D/2 log(2 pi)
                        - D / (2 beta_k) - nu_k (x_n - m_k)^T W_k (x_n - m_k) / 2]
           + H[q(z)] - KL(q(pi) || p(pi)) - sum_k KL(q(mu_k, Lambda_k) || p(mu_k, Lambda_k))

with ``KL(q(mu, Lambda) || p(mu, Lambda)) = (D beta0 / beta + beta0 nu (m - m0)^T W (m - m0)
- D + D log(beta / beta0)) / 2 + KL(Wishart(W, nu) || Wishart(W0, nu0))``. The Dirichlet KL
and the Wishart entropy are numpyro's.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
from jax.scipy.special import entr, multigammaln
from numpyro.distributions import constraints
from numpyro.distributions.kl import kl_divergence
from numpyro.distributions.util import multidigamma

from vijax.model import Latent, Model, Param

__all__ = ["GMMPrior", "CAVIResult", "cavi_gmm", "default_gmm_prior", "gmm_model"]


class GMMPrior(NamedTuple):
    """Conjugate prior of the Bayesian Gaussian mixture (module docstring).

    Attributes:
        alpha0: Dirichlet concentration of each component's weight (> 0).
        beta0: prior precision of a mean, in units of its component's precision (> 0).
        m0: ``(D,)`` prior mean of the component means.
        W0: ``(D, D)`` Wishart scale matrix (symmetric positive definite);
            ``E[Lambda_k] = nu0 W0``.
        nu0: Wishart degrees of freedom (> D - 1).
    """

    alpha0: Any
    beta0: Any
    m0: Any
    W0: Any
    nu0: Any


class CAVIResult(NamedTuple):
    """The fitted ``q(z) q(pi) prod_k q(mu_k, Lambda_k)`` (numpy arrays of the fit's dtype).

    Attributes:
        alpha: ``(K,)`` Dirichlet concentrations of ``q(pi)``.
        beta: ``(K,)`` precision scales of ``q(mu_k | Lambda_k)``.
        m: ``(K, D)`` means of ``q(mu_k)``.
        W: ``(K, D, D)`` Wishart scale matrices of ``q(Lambda_k)``.
        nu: ``(K,)`` Wishart degrees of freedom of ``q(Lambda_k)``.
        r: ``(N, K)`` responsibilities ``q(z_n = k)``.
        elbo: ``(iterations,)`` float64 ELBO after the first M-step (entry 0, from the
            initial responsibilities) and after each later sweep (E-step then M-step); the
            last entry is the ELBO of the returned parameters.
        converged: whether the last relative ELBO change was ``<= tol``.
        iterations: number of ELBO evaluations (``len(elbo)``).
        prior: the :class:`GMMPrior` used.
    """

    alpha: np.ndarray
    beta: np.ndarray
    m: np.ndarray
    W: np.ndarray
    nu: np.ndarray
    r: np.ndarray
    elbo: np.ndarray
    converged: bool
    iterations: int
    prior: GMMPrior


class _Globals(NamedTuple):
    alpha: jax.Array  # (K,)
    beta: jax.Array  # (K,)
    m: jax.Array  # (K, D), centred: the mean minus m0
    W: jax.Array  # (K, D, D)
    prec_chol: jax.Array  # (K, D, D) lower Cholesky factor of W^-1
    nu: jax.Array  # (K,)


def default_gmm_prior(x: Any, num_components: int) -> GMMPrior:
    """The default prior, scaled by the data: scikit-learn's ``BayesianGaussianMixture``
    defaults (``weight_concentration_prior_type="dirichlet_distribution"``).

    ``alpha0 = 1 / K``, ``beta0 = 1`` (a mean is a priori as uncertain as one draw of its
    component), ``m0 = mean(x)``, ``nu0 = D`` (the weakest proper Wishart with an integer
    degree of freedom) and ``W0 = cov(x)^-1`` (``E[Lambda_k] = D cov(x)^-1``). The Wishart
    tail ``exp(-tr(cov(x) Lambda_k) / 2)`` makes components much narrower than the whole data
    a priori unlikely: with few points per component the prior merges clusters. The data
    covariance (``ddof = 1``) must be of full rank.

    Args:
        x: ``(N, D)`` data.
        num_components: ``K``.

    Returns:
        a :class:`GMMPrior` of float64 numpy values.

    Example:
        >>> default_gmm_prior(np.array([[0.0, 1.0], [2.0, 1.0], [1.0, 3.0]]), 2).alpha0
        0.5
    """
    x = np.asarray(x, np.float64)
    d = x.shape[1]
    cov = np.atleast_2d(np.cov(x, rowvar=False)) if x.shape[0] > 1 else np.zeros((d, d))
    try:
        np.linalg.cholesky(cov)
        ok = np.all(np.isfinite(cov)) and np.linalg.cond(cov) < 1e12
    except np.linalg.LinAlgError:
        ok = False
    if not ok:
        raise ValueError("the default prior needs a data covariance of full rank (N > D and no "
                         "collinear columns); pass prior=GMMPrior(...) explicitly")
    return GMMPrior(alpha0=1.0 / num_components, beta0=1.0, m0=x.mean(0),
                    W0=np.linalg.inv(cov), nu0=float(d))


# ---------------------------------------------------------------------------------------------
# validation (host, numpy)
def _check_data(x: Any) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim != 2:
        raise ValueError(f"x must be 2-D (N observations, D dimensions), got shape {arr.shape}")
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"x must have at least one row and one column, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
        raise TypeError(f"x must be real numbers, got dtype {arr.dtype}")
    bad = np.nonzero(~np.isfinite(arr).all(axis=1))[0]
    if bad.size:
        raise ValueError(f"x has non-finite values (NaN or inf) in row {bad[0]}"
                         + (f" and {bad.size - 1} other row(s)" if bad.size > 1 else ""))
    return arr.astype(np.float64)


def _check_prior(prior: Any, d: int) -> GMMPrior:
    if not isinstance(prior, GMMPrior):
        raise TypeError(f"prior must be a GMMPrior, got {type(prior).__name__}")
    p = GMMPrior(*(np.asarray(v, np.float64) for v in prior))
    for name in ("alpha0", "beta0", "nu0"):
        v = getattr(p, name)
        if v.shape != () or not np.isfinite(v) or v <= 0:
            raise ValueError(f"prior.{name} must be a finite positive scalar, got {v!r}")
    if p.m0.shape != (d,) or not np.all(np.isfinite(p.m0)):
        raise ValueError(f"prior.m0 must be a finite vector of shape ({d},), got shape "
                         f"{p.m0.shape}")
    if p.W0.shape != (d, d) or not np.all(np.isfinite(p.W0)):
        raise ValueError(f"prior.W0 must be a finite ({d}, {d}) matrix, got shape {p.W0.shape}")
    if not np.allclose(p.W0, p.W0.T, rtol=1e-10, atol=0):
        raise ValueError("prior.W0 must be symmetric positive definite; it is not symmetric")
    try:
        np.linalg.cholesky(p.W0)
    except np.linalg.LinAlgError:
        raise ValueError("prior.W0 must be symmetric positive definite; its Cholesky "
                         "factorisation failed") from None
    if p.nu0 <= d - 1:
        raise ValueError(f"prior.nu0 must be > D - 1 = {d - 1} for a proper Wishart, got "
                         f"{float(p.nu0)}")
    return p


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        rng = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ValueError(f"{name} must be {rng}, got {value}")
    return int(value)


@contextlib.contextmanager
def _precision(dtype: np.dtype):
    if dtype == np.float64:
        # jax >= 0.6 has jax.enable_x64; older releases have it in jax.experimental
        enable = getattr(jax, "enable_x64", None)
        if enable is None:
            from jax.experimental import enable_x64 as enable
        with enable(True):
            yield
    else:
        yield


# ---------------------------------------------------------------------------------------------
# the updates (device, jitted); data centred at m0, so the prior mean is 0 inside
@functools.partial(jax.jit, static_argnames=("k",))
def _kmeanspp(key: jax.Array, y: jax.Array, k: int) -> jax.Array:
    """``(N, K)`` one-hot responsibilities of the nearest of K centres seeded by k-means++
    (Arthur & Vassilvitskii 2007: each next centre drawn with probability ~ squared distance
    to the nearest centre so far)."""
    keys = jax.random.split(key, k)
    first = y[jax.random.randint(keys[0], (), 0, y.shape[0])]
    centres = jnp.zeros((k, y.shape[1]), y.dtype).at[0].set(first)

    def add(i, centres):
        d2 = jnp.sum((y[:, None, :] - centres[None]) ** 2, -1)
        d2 = jnp.min(jnp.where(jnp.arange(k) < i, d2, jnp.inf), axis=1)
        logits = jnp.where(d2 > 0, jnp.log(jnp.maximum(d2, 1e-300)), -jnp.inf)
        logits = jnp.where(jnp.all(d2 <= 0), 0.0, logits)  # all points taken: uniform
        return centres.at[i].set(y[jax.random.categorical(keys[i], logits)])

    centres = jax.lax.fori_loop(1, k, add, centres)
    nearest = jnp.argmin(jnp.sum((y[:, None, :] - centres[None]) ** 2, -1), axis=1)
    return jax.nn.one_hot(nearest, k, dtype=y.dtype)


def _m_step(y: jax.Array, r: jax.Array, prior: GMMPrior, w0_inv: jax.Array) -> _Globals:
    n_k = r.sum(0)
    s = r.T @ y  # (K, D)
    ss = jnp.einsum("nk,nd,ne->kde", r, y, y)
    beta = prior.beta0 + n_k
    w_inv = w0_inv + ss - s[:, :, None] * s[:, None, :] / beta[:, None, None]
    w_inv = (w_inv + jnp.swapaxes(w_inv, -1, -2)) / 2
    chol = jnp.linalg.cholesky(w_inv)
    eye = jnp.broadcast_to(jnp.eye(y.shape[1], dtype=y.dtype), w_inv.shape)
    w = jax.scipy.linalg.cho_solve((chol, True), eye)
    return _Globals(prior.alpha0 + n_k, beta, s / beta[:, None], (w + jnp.swapaxes(w, -1, -2)) / 2,
                    chol, prior.nu0 + n_k)


def _expected_terms(y: jax.Array, g: _Globals) -> tuple[jax.Array, jax.Array]:
    """``(E log|Lambda_k| (K,), E_q[log pi_k + log N(y_n | mu_k, Lambda_k^-1)] (N, K))``."""
    d = y.shape[1]
    logdet_w = -2 * jnp.sum(jnp.log(jnp.diagonal(g.prec_chol, axis1=-2, axis2=-1)), -1)
    e_logdet = multidigamma(g.nu / 2, d) + d * math.log(2.0) + logdet_w
    e_logpi = jax.scipy.special.digamma(g.alpha) - jax.scipy.special.digamma(g.alpha.sum())
    diff = y[:, None, :] - g.m[None]  # (N, K, D)
    sol = jax.scipy.linalg.solve_triangular(g.prec_chol[None], diff[..., None], lower=True)
    quad = jnp.sum(sol[..., 0] ** 2, -1)  # (x_n - m_k)^T W_k (x_n - m_k)
    log_rho = (e_logpi + 0.5 * e_logdet - 0.5 * d * math.log(2 * math.pi)
               - 0.5 * (d / g.beta + g.nu * quad))
    return e_logdet, log_rho


def _e_step(y: jax.Array, g: _Globals) -> jax.Array:
    return jax.nn.softmax(_expected_terms(y, g)[1], axis=1)


def _elbo(y: jax.Array, r: jax.Array, g: _Globals, prior: GMMPrior,
          w0_inv: jax.Array) -> jax.Array:
    d = y.shape[1]
    e_logdet, log_rho = _expected_terms(y, g)
    expected_loglik = jnp.sum(r * log_rho)  # E log p(x | z, mu, Lambda) + E log p(z | pi)
    kl_pi = kl_divergence(dist.Dirichlet(g.alpha),
                          dist.Dirichlet(jnp.full_like(g.alpha, prior.alpha0)))
    quad_m = jnp.einsum("kd,kde,ke->k", g.m, g.W, g.m)  # (m_k - m0)^T W_k (m_k - m0)
    kl_mu = 0.5 * (d * prior.beta0 / g.beta + prior.beta0 * g.nu * quad_m - d
                   + d * jnp.log(g.beta / prior.beta0))
    # KL(Wishart(W, nu) || Wishart(W0, nu0)) = -H[q] - E_q[log p(Lambda)]
    log_b0 = (-0.5 * prior.nu0 * jnp.linalg.slogdet(prior.W0)[1]
              - 0.5 * prior.nu0 * d * math.log(2.0) - multigammaln(prior.nu0 / 2, d))
    cross = (log_b0 + 0.5 * (prior.nu0 - d - 1) * e_logdet
             - 0.5 * g.nu * jnp.einsum("de,ked->k", w0_inv, g.W))
    kl_lambda = -dist.Wishart(g.nu, scale_matrix=g.W).entropy() - cross
    return expected_loglik + jnp.sum(entr(r)) - kl_pi - jnp.sum(kl_mu + kl_lambda)


@functools.partial(jax.jit, static_argnames=("max_iters",))
def _run(y: jax.Array, r0: jax.Array, prior: GMMPrior, tol: jax.Array, max_iters: int):
    """The whole CAVI loop as one ``lax.while_loop``; ``y`` is centred at ``prior.m0``."""
    w0_inv = jnp.linalg.inv(prior.W0)
    w0_inv = (w0_inv + w0_inv.T) / 2
    g = _m_step(y, r0, prior, w0_inv)
    history = jnp.full((max_iters,), jnp.nan, y.dtype).at[0].set(_elbo(y, r0, g, prior, w0_inv))

    def cond(state):
        it, _, _, _, done = state
        return (it < max_iters) & ~done

    def body(state):
        it, _, g, history, _ = state
        r = _e_step(y, g)
        g = _m_step(y, r, prior, w0_inv)
        elbo = _elbo(y, r, g, prior, w0_inv)
        done = jnp.abs(elbo - history[it - 1]) <= tol * jnp.abs(elbo)
        return it + 1, r, g, history.at[it].set(elbo), done

    init = (jnp.asarray(1), r0, g, history, jnp.asarray(False))
    return jax.lax.while_loop(cond, body, init)


def cavi_gmm(x: Any, num_components: int, *, prior: GMMPrior | None = None,
             max_iters: int = 500, tol: float = 1e-8, key: jax.Array | int | None = None,
             dtype: Any = np.float64) -> CAVIResult:
    """Fit the Bayesian Gaussian mixture (module docstring) by coordinate-ascent VI.

    The responsibilities start as the one-hot assignment to the nearest of ``K`` centres
    seeded by k-means++ (drawn with ``key``); then sweeps of M-step (``q(pi)``,
    ``q(mu, Lambda)``) and E-step (``q(z)``) run inside one compiled ``lax.while_loop`` until
    the relative ELBO change ``|L_t - L_{t-1}| / |L_t|`` is at most ``tol`` or ``max_iters``
    ELBO evaluations are spent. CAVI finds a local optimum: for multimodal problems refit with
    other keys and keep the highest final ELBO.

    Args:
        x: ``(N, D)`` real data, finite.
        num_components: ``K``, ``1 <= K <= N``.
        prior: a :class:`GMMPrior`; ``None``: :func:`default_gmm_prior` (scaled by the data).
        max_iters: most ELBO evaluations (>= 1; the history's length is static: one compiled
            program per value).
        tol: relative ELBO change at which to stop (>= 0).
        key: a JAX PRNG key or an int seed for the k-means++ initialisation; ``None``: 0.
        dtype: ``np.float64`` (default; computed with JAX's 64-bit mode switched on for this
            call only) or ``np.float32`` (the ELBO then rises only up to float32 rounding).

    Returns:
        a :class:`CAVIResult` (``alpha (K,)``, ``beta (K,)``, ``m (K, D)``,
        ``W (K, D, D)``, ``nu (K,)``, ``r (N, K)``, ``elbo (iterations,)``, ``converged``,
        ``iterations``, ``prior``).

    Example:
        >>> rng = np.random.default_rng(0)
        >>> x = np.concatenate([rng.normal(-5, 1, (50, 2)), rng.normal(5, 1, (50, 2))])
        >>> res = cavi_gmm(x, 2, key=0)
        >>> res.converged, res.m.shape, bool(np.all(np.diff(res.elbo) >= 0))
        (True, (2, 2), True)
        >>> np.round(np.sort(res.m[:, 0])).tolist()
        [-5.0, 5.0]
    """
    arr = _check_data(x)
    n, d = arr.shape
    k = _check_int("num_components", num_components, 1, n)
    max_iters = _check_int("max_iters", max_iters, 1)
    if isinstance(tol, bool) or not isinstance(tol, int | float | np.floating | np.integer) \
            or not tol >= 0:
        raise ValueError(f"tol must be a number >= 0, got {tol!r}")
    dtype = np.dtype(dtype)
    if dtype not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    prior = _check_prior(default_gmm_prior(arr, k) if prior is None else prior, d)
    if key is None:
        key = 0
    if isinstance(key, int | np.integer) and not isinstance(key, bool):
        key = jax.random.key(int(key))
    elif not (isinstance(key, jax.Array) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key)):
        raise TypeError(f"key must be a JAX PRNG key (jax.random.key) or an int, got {key!r}")

    with _precision(dtype):
        y = jnp.asarray(arr - prior.m0, dtype)
        p = GMMPrior(*(jnp.asarray(v, dtype) for v in prior))
        r0 = _kmeanspp(key, y, k)
        it, r, g, history, done = _run(y, r0, p._replace(m0=jnp.zeros_like(p.m0)),
                                        jnp.asarray(tol, dtype), max_iters)
        it = int(it)
        out = jax.device_get((g, r, history))
    g, r, history = out
    elbo = np.asarray(history[:it], np.float64)
    if not np.all(np.isfinite(elbo)):
        bad = int(np.nonzero(~np.isfinite(elbo))[0][0])
        raise FloatingPointError(f"the ELBO became non-finite at iteration {bad}; in float32 "
                                 "try dtype=np.float64, or check the prior's scale")
    return CAVIResult(alpha=g.alpha, beta=g.beta, m=(g.m + prior.m0).astype(dtype), W=g.W,
                      nu=g.nu, r=r, elbo=elbo, converged=bool(done), iterations=it,
                      prior=prior)


def gmm_model(prior: GMMPrior, num_components: int, *, weights: str = "latent") -> Model:
    """The same mixture as a :class:`vijax.Model` for gradient VI, with ``z`` marginalised.

    Latents ``pi`` ``(K,)`` (simplex), ``mu`` ``(K, D)`` and ``Lambda`` ``(K, D, D)``
    (positive definite); factorised form with ``log_prior`` the Dirichlet, Wishart and
    Normal densities of the module docstring and, per observation (``data = {"x": (N, D)}``),
    ``log_likelihood_n = logsumexp_k [log pi_k + log N(x_n | mu_k, Lambda_k^-1)]``. The ELBO
    of a fit of it bounds the same ``log p(x)`` as :func:`cavi_gmm`'s, over a different family
    (a Gaussian in the unconstrained ``(pi, mu, Lambda)``, no factor over ``z``).

    Args:
        prior: a :class:`GMMPrior` (``m0 (D,)`` and ``W0 (D, D)`` give ``D``).
        num_components: ``K`` (>= 1).
        weights: ``"latent"`` (``pi`` has a posterior) or ``"param"``: ``pi`` is a
            :class:`vijax.Param` (a point estimate, initialised uniform, with no prior:
            ``alpha0 < 1`` would make its MAP run to the simplex's edge): fitting then
            maximises the bound on ``log p(x | pi)`` over ``q(mu, Lambda)`` and ``pi``
            jointly, variational EM (maximum likelihood for ``pi``).

    Returns:
        a factorised :class:`vijax.Model`.

    Example:
        >>> m = gmm_model(GMMPrior(1.0, 1.0, np.zeros(2), np.eye(2), 2.0), 3)
        >>> sorted(m.latents), m.latents["Lambda"].shape
        (['Lambda', 'mu', 'pi'], (3, 2, 2))
    """
    k = _check_int("num_components", num_components, 1)
    d = int(np.shape(prior.m0)[0])
    prior = _check_prior(prior, d)
    if weights not in ("latent", "param"):
        raise ValueError(f"weights must be 'latent' or 'param', got {weights!r}")
    alpha0, beta0, m0, w0, nu0 = (np.asarray(v, np.float64) for v in prior)

    def log_prior(z):
        lam = z["Lambda"]
        lp = dist.Dirichlet(jnp.full((k,), alpha0)).log_prob(z["pi"]) if weights == "latent" \
            else 0.0
        lp += dist.Wishart(nu0, scale_matrix=w0).log_prob(lam).sum()
        return lp + dist.MultivariateNormal(m0, precision_matrix=beta0 * lam).log_prob(
            z["mu"]).sum()

    def log_likelihood(z, data):
        comp = dist.MultivariateNormal(z["mu"], precision_matrix=z["Lambda"])
        return jax.nn.logsumexp(jnp.log(z["pi"]) + comp.log_prob(data["x"][:, None, :]), -1)

    latents = {"mu": Latent((k, d)), "Lambda": Latent((k, d, d), constraints.positive_definite)}
    params = {}
    if weights == "latent":
        latents["pi"] = Latent((k,), constraints.simplex)
    else:
        params["pi"] = Param((k,), support=constraints.simplex)
    return Model(log_prior=log_prior, log_likelihood=log_likelihood, latents=latents,
                 params=params)
