"""Reference results for Gaussian-likelihood GPs: the exact log marginal likelihood and
posterior (``O(N^3)``), and Titsias' (2009) collapsed sparse bound.

Example:
    >>> import jax.numpy as jnp
    >>> from vijax.gp.kernels import RBF
    >>> k = RBF(lengthscale=1.0, variance=1.0)
    >>> X = jnp.linspace(0, 5, 8); y = jnp.sin(X)
    >>> p = k.init_params()
    >>> bool(collapsed_bound(k, p, X, X, y, 0.1) <= exact_log_marginal(k, p, X, y, 0.1) + 1e-3)
    True
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from vijax.gp._linalg import default_jitter, jittered_cholesky, tri_solve
from vijax.gp.kernels import Kernel, as_2d

__all__ = ["exact_log_marginal", "exact_posterior", "collapsed_bound"]


def _noisy_cholesky(kernel, params, X, noise):
    K = kernel(params, X)
    return jnp.linalg.cholesky(K + noise * jnp.eye(K.shape[0], dtype=K.dtype))


def exact_log_marginal(kernel: Kernel, params: Any, X: Any, y: Any, noise: Any,
                       mean: Any = 0.0) -> jax.Array:
    """``log N(y | mean, K + noise I)`` for ``X (N,)|(N, D)``, ``y (N,)``; a scalar."""
    X, y = as_2d(X), jnp.asarray(y)
    L = _noisy_cholesky(kernel, params, X, noise)
    a = tri_solve(L, y - mean)
    return (-0.5 * jnp.dot(a, a) - jnp.sum(jnp.log(jnp.diagonal(L)))
            - 0.5 * y.shape[0] * math.log(2 * math.pi))


def exact_posterior(kernel: Kernel, params: Any, X: Any, y: Any, noise: Any, Xnew: Any,
                    mean: Any = 0.0) -> tuple[jax.Array, jax.Array]:
    """Posterior mean and variance of ``f(Xnew)`` given ``y = f(X) + eps``,
    ``eps ~ N(0, noise I)``: ``m = mean + K*^T (K + noise I)^-1 (y - mean)``,
    ``v = k** - diag(K*^T (K + noise I)^-1 K*)``; ``(n*,)`` each."""
    X, Xnew, y = as_2d(X), as_2d(Xnew), jnp.asarray(y)
    L = _noisy_cholesky(kernel, params, X, noise)
    A = tri_solve(L, kernel(params, X, Xnew))
    m = mean + A.T @ tri_solve(L, y - mean)
    return m, kernel.diag(params, Xnew) - jnp.sum(A * A, axis=0)


def collapsed_bound(kernel: Kernel, params: Any, Z: Any, X: Any, y: Any, noise: Any,
                    mean: Any = 0.0, jitter: float | None = None) -> jax.Array:
    """Titsias' bound ``log N(y | mean, Qnn + noise I) - tr(Knn - Qnn) / (2 noise)`` with
    ``Qnn = Knm Kmm^-1 Kmn`` for inducing inputs ``Z (M, D)``; the optimum of the SVGP
    ELBO over ``q(u)`` for a Gaussian likelihood. ``O(N M^2)``; a scalar."""
    X, Z, y = as_2d(X), as_2d(Z), jnp.asarray(y)
    jitter = default_jitter(X.dtype) if jitter is None else jitter
    n = y.shape[0]
    L = jittered_cholesky(kernel(params, Z), jitter)
    sigma = jnp.sqrt(noise)
    A = tri_solve(L, kernel(params, Z, X)) / sigma
    AAT = A @ A.T
    LB = jnp.linalg.cholesky(AAT + jnp.eye(AAT.shape[0], dtype=AAT.dtype))
    r = y - mean
    c = tri_solve(LB, A @ r) / sigma
    return (-0.5 * n * math.log(2 * math.pi) - jnp.sum(jnp.log(jnp.diagonal(LB)))
            - 0.5 * n * jnp.log(noise) - 0.5 * jnp.dot(r, r) / noise + 0.5 * jnp.dot(c, c)
            - 0.5 * jnp.sum(kernel.diag(params, X)) / noise + 0.5 * jnp.trace(AAT))
