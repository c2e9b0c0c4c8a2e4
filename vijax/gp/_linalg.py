"""Cholesky factors with a scale-relative jitter, shared by the exact and sparse GP code."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

__all__ = ["default_jitter", "jittered_cholesky", "tri_solve"]


def default_jitter(dtype: Any) -> float:
    """Relative jitter added to ``K(Z, Z)``: ``jitter * mean(diag K) * I``. 1e-4 in float32
    (its Cholesky loses about ``cond(K) * 6e-8`` relative accuracy, so a smooth kernel on
    dense inducing inputs needs ``cond <~ 1e4``), 1e-8 in float64."""
    return 1e-8 if jnp.dtype(dtype) == jnp.float64 else 1e-4


def jittered_cholesky(K: jax.Array, jitter: float) -> jax.Array:
    """Lower Cholesky factor of ``K + jitter * mean(diag K) * I``, ``(M, M)``."""
    scale = jnp.mean(jnp.diagonal(K))
    return jnp.linalg.cholesky(K + (jitter * scale) * jnp.eye(K.shape[0], dtype=K.dtype))


def tri_solve(L: jax.Array, B: jax.Array, trans: bool = False) -> jax.Array:
    """``L^-1 B`` (or ``L^-T B`` with ``trans``) for lower-triangular ``L``."""
    return solve_triangular(L, B, lower=True, trans=1 if trans else 0)
