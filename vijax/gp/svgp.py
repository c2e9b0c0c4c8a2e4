"""The sparse variational GP (Hensman et al. 2013, 2015) in the whitened parameterisation.

Inducing values ``u = f(Z)`` at inducing inputs ``Z (M, D)`` are written ``u = L v`` with
``L L^T = K(Z, Z) + jitter``, ``p(v) = N(0, I)`` and ``q(v) = N(m, S S^T)`` (``S`` lower
triangular). With ``A = L^-1 K(Z, X)`` the marginals of ``q(f)`` at the rows of ``X`` are

    mu_i  = mean + A_i^T m,    var_i = k(x_i, x_i) - |A_i|^2 + |S^T A_i|^2,

and the ELBO on a batch of B rows out of N is the unbiased estimate

    ELBO = (N / B) sum_i E_{q(f_i)}[log p(y_i | f_i)] - KL(N(m, S S^T) || N(0, I)),
    KL   = (tr(S S^T) + m^T m - M - 2 sum log|S_jj|) / 2.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from vijax.gp.kernels import RBF
    >>> X = jnp.linspace(0, 1, 10); y = jnp.sin(6 * X)
    >>> model = SVGP(RBF(), "gaussian", inducing=4)
    >>> p = init_params(model, X, y, jax.random.key(0))
    >>> p.Z.shape, p.q_scale_tril.shape
    ((4, 1), (4, 4))
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vijax.gp._linalg import default_jitter, jittered_cholesky, tri_solve
from vijax.gp.kernels import Kernel, as_2d
from vijax.gp.likelihoods import Gaussian, Poisson, StudentT, get_likelihood

__all__ = ["SVGP", "SVGPParams", "init_params", "marginals", "kl_divergence", "elbo",
           "predict_f", "check_data", "kmeans_inducing"]


class SVGPParams(NamedTuple):
    """All SVGP parameters, constrained.

    Attributes:
        kernel: the kernel's hyper-parameter pytree.
        likelihood: dict of likelihood hyper-parameters.
        mean: scalar constant mean (0 and not trained for ``mean="zero"``).
        Z: inducing inputs ``(M, D)``.
        q_mean: ``m``, ``(M,)``.
        q_scale_tril: ``S``, ``(M, M)`` lower triangular with a positive diagonal.
    """

    kernel: Any
    likelihood: dict
    mean: jax.Array
    Z: jax.Array
    q_mean: jax.Array
    q_scale_tril: jax.Array


@dataclasses.dataclass(frozen=True, eq=False)
class SVGP:
    """A sparse variational GP: configuration only, no state (parameters live in
    :class:`SVGPParams`).

    Args:
        kernel: a :class:`vijax.gp.kernels.Kernel`.
        likelihood: a :class:`vijax.gp.likelihoods.Likelihood` or a name (``"gaussian"``,
            ``"bernoulli"``, ``"bernoulli-probit"``, ``"poisson"``, ``"studentt"``).
        inducing: an int M (Z initialised by k-means on the training inputs) or inputs
            ``(M,)`` / ``(M, D)``.
        mean: ``"zero"``, ``"constant"`` (learned; initialised from y) or a fixed float.
        whiten: only the whitened parameterisation ``u = L v`` is implemented.
        train_inducing: optimise Z (default) or keep it fixed.
        jitter: relative jitter on ``K(Z, Z)``; ``None``: 1e-4 (float32) / 1e-8 (float64).
    """

    kernel: Kernel
    likelihood: Any = "gaussian"
    inducing: Any = 64
    mean: Any = "zero"
    whiten: bool = True
    train_inducing: bool = True
    jitter: float | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.kernel, Kernel):
            raise TypeError(f"kernel must be a vijax.gp.kernels.Kernel, got {self.kernel!r}")
        object.__setattr__(self, "likelihood", get_likelihood(self.likelihood))
        if self.whiten is not True:
            raise NotImplementedError("whiten=False is not implemented; use whiten=True")
        if isinstance(self.mean, str):
            if self.mean not in ("zero", "constant"):
                raise ValueError(f"mean must be 'zero', 'constant' or a float, got {self.mean!r}")
        elif not np.isfinite(float(self.mean)):
            raise ValueError(f"mean must be finite, got {self.mean!r}")
        if isinstance(self.inducing, int | np.integer):
            if isinstance(self.inducing, bool) or self.inducing < 1:
                raise ValueError(f"inducing must be a positive int or an array of inputs, got "
                                 f"{self.inducing!r}")
        else:
            Z = np.asarray(self.inducing, dtype=float)
            if Z.ndim not in (1, 2) or Z.shape[0] < 1 or not np.all(np.isfinite(Z)):
                raise ValueError(f"inducing inputs must be a finite (M,) or (M, D) array, got "
                                 f"shape {Z.shape}")
        if self.jitter is not None and not (self.jitter >= 0):
            raise ValueError(f"jitter must be >= 0, got {self.jitter!r}")

    @property
    def learns_mean(self) -> bool:
        return self.mean == "constant"


def check_data(svgp: SVGP, X: Any, y: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate training data on the host: ``X (N,)|(N, D)``, ``y (N,)`` (or ``(N, 1)``),
    finite, labels in the likelihood's support. Errors name the argument."""
    X = np.asarray(X, dtype=float)
    y = np.asarray(y, dtype=float)
    if X.ndim == 1:
        X = X[:, None]
    if X.ndim != 2 or X.shape[0] == 0:
        raise ValueError(f"X must be (N,) or (N, D) with N >= 1, got shape {X.shape}")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.ndim != 1:
        raise ValueError(f"y must be (N,), got shape {y.shape}")
    if X.shape[0] != y.shape[0]:
        raise ValueError(f"X and y disagree: X has {X.shape[0]} rows, y has {y.shape[0]}")
    for name, arr in (("X", X), ("y", y)):
        bad = ~np.isfinite(arr.reshape(arr.shape[0], -1)).all(axis=1)
        if bad.any():
            raise ValueError(f"{name} has non-finite values (NaN or inf) in rows "
                             f"{np.flatnonzero(bad)[:5].tolist()}; drop or impute them")
    svgp.likelihood.check_y(y)
    if not isinstance(svgp.inducing, int | np.integer):
        d = np.asarray(svgp.inducing).reshape(len(svgp.inducing), -1).shape[1]
        if d != X.shape[1]:
            raise ValueError(f"inducing inputs have {d} columns but X has {X.shape[1]}")
    m = _num_inducing(svgp)
    if m > X.shape[0]:
        warnings.warn(f"more inducing points than data (inducing={m}, N={X.shape[0]}): "
                      "the sparse GP costs more than an exact GP here", stacklevel=3)
    return X, y


def _num_inducing(svgp: SVGP) -> int:
    return int(svgp.inducing) if isinstance(svgp.inducing, int | np.integer) else len(
        svgp.inducing)


def kmeans_inducing(X: np.ndarray, M: int, seed: int, iters: int = 10) -> np.ndarray:
    """M inducing inputs: M distinct random rows of X refined by ``iters`` Lloyd steps
    (k-means); for ``M > N`` the rows of X plus perturbed copies. ``(M, D)``."""
    rng = np.random.default_rng(seed)
    n = X.shape[0]
    if M >= n:
        extra = X[rng.integers(0, n, M - n)]
        return np.concatenate([X, extra + 1e-3 * (X.std(0) + 1e-12) * rng.normal(
            size=extra.shape)])
    Z = X[rng.choice(n, M, replace=False)].copy()
    scale = X.std(0) + 1e-12
    for _ in range(iters):
        d = (((X[:, None, :] - Z[None]) / scale) ** 2).sum(-1)
        label = d.argmin(1)
        counts = np.bincount(label, minlength=M)
        sums = np.zeros_like(Z)
        np.add.at(sums, label, X)
        Z = np.where(counts[:, None] > 0, sums / np.maximum(counts, 1)[:, None], Z)
    return Z


def init_params(svgp: SVGP, X: Any, y: Any, key: jax.Array) -> SVGPParams:
    """Initial parameters from the data: k-means Z (for an int ``inducing``), lengthscales
    at the per-dimension std of X, kernel variance at var(y) for Gaussian / Student-t
    likelihoods (1 otherwise), noise at 0.1 var(y), constant mean at mean(y) (log mean for
    Poisson), ``q(v) = N(0, I)`` (the prior)."""
    Xn, yn = check_data(svgp, X, y)
    dtype = jnp.asarray(0.0).dtype
    seed = int(jax.random.randint(key, (), 0, 2**31 - 1))
    if isinstance(svgp.inducing, int | np.integer):
        Z = kmeans_inducing(Xn, int(svgp.inducing), seed)
    else:
        Z = np.asarray(svgp.inducing, float).reshape(len(svgp.inducing), -1)
    lik = svgp.likelihood
    regression = isinstance(lik, Gaussian | StudentT)
    y_var = float(np.var(yn)) if regression and np.var(yn) > 0 else 1.0
    x_std = np.where(Xn.std(0) > 0, Xn.std(0), 1.0)
    if svgp.mean == "constant":
        mean = (np.log(np.mean(yn) + 1e-3) if isinstance(lik, Poisson)
                else float(np.mean(yn)) if regression else 0.0)
    else:
        mean = 0.0 if svgp.mean == "zero" else float(svgp.mean)
    m = Z.shape[0]
    return SVGPParams(
        kernel=svgp.kernel.init_params(dtype, x_std, y_var if regression else 1.0),
        likelihood=lik.init_params(dtype, y_var),
        mean=jnp.asarray(mean, dtype), Z=jnp.asarray(Z, dtype),
        q_mean=jnp.zeros(m, dtype), q_scale_tril=jnp.eye(m, dtype=dtype))


def _jitter(svgp: SVGP, dtype: Any) -> float:
    return default_jitter(dtype) if svgp.jitter is None else svgp.jitter


def _projection(svgp: SVGP, p: SVGPParams, X: jax.Array) -> jax.Array:
    """``A = L^-1 K(Z, X)``, ``(M, n)``."""
    L = jittered_cholesky(svgp.kernel(p.kernel, p.Z), _jitter(svgp, X.dtype))
    return tri_solve(L, svgp.kernel(p.kernel, p.Z, X))


def marginals(svgp: SVGP, p: SVGPParams, X: Any) -> tuple[jax.Array, jax.Array]:
    """Mean and variance of ``q(f_i)`` at the rows of ``X (n,)|(n, D)``; ``(n,)`` each."""
    X = as_2d(X)
    A = _projection(svgp, p, X)
    SA = p.q_scale_tril.T @ A
    var = svgp.kernel.diag(p.kernel, X) - jnp.sum(A * A, 0) + jnp.sum(SA * SA, 0)
    return p.mean + A.T @ p.q_mean, jnp.maximum(var, 0.0)


def kl_divergence(q_mean: jax.Array, q_scale_tril: jax.Array) -> jax.Array:
    """``KL(N(m, S S^T) || N(0, I))``, a scalar."""
    d = jnp.diagonal(q_scale_tril)
    return 0.5 * (jnp.sum(q_scale_tril**2) + jnp.dot(q_mean, q_mean) - q_mean.shape[0]
                  - 2.0 * jnp.sum(jnp.log(jnp.abs(d))))


def elbo(svgp: SVGP, p: SVGPParams, X: Any, y: Any, num_data: Any = None) -> jax.Array:
    """``(N / B) sum_i E_q[log p(y_i | f_i)] - KL`` on a batch ``X (B,)|(B, D)``,
    ``y (B,)`` out of ``num_data = N`` rows (default B: the full-data ELBO). A scalar."""
    y = jnp.asarray(y)
    mu, var = marginals(svgp, p, X)
    ell = jnp.sum(svgp.likelihood.expected_log_prob(p.likelihood, y, mu, var))
    scale = 1.0 if num_data is None else num_data / y.shape[0]
    return scale * ell - kl_divergence(p.q_mean, p.q_scale_tril)


def predict_f(svgp: SVGP, p: SVGPParams, Xnew: Any, full_cov: bool = False) -> tuple:
    """Predictive ``q(f*)``: mean ``(n*,)`` and variance ``(n*,)`` (or covariance
    ``(n*, n*)`` with ``full_cov``)."""
    if not full_cov:
        return marginals(svgp, p, Xnew)
    X = as_2d(Xnew)
    A = _projection(svgp, p, X)
    SA = p.q_scale_tril.T @ A
    return p.mean + A.T @ p.q_mean, svgp.kernel(p.kernel, X) - A.T @ A + SA.T @ SA
