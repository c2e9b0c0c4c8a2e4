"""Natural-gradient steps for the Gaussian ``q(v) = N(m, S S^T)`` (Salimbeni et al. 2018,
"Natural gradients in practice"; Hensman et al. 2013).

With natural parameters ``theta = (Sigma^-1 m, -Sigma^-1 / 2)`` and expectation parameters
``eta = (m, Sigma + m m^T)``, the natural gradient of the ELBO with respect to ``theta`` is
its ordinary gradient with respect to ``eta``, so one step of size ``gamma`` is

    theta' = theta + gamma * dELBO/deta.

For a Gaussian likelihood the ELBO is linear in ``eta`` apart from the entropy, and one
full-batch step with ``gamma = 1`` lands on the optimal ``q`` (the collapsed Titsias bound).

Example:
    >>> import jax.numpy as jnp
    >>> f = lambda m, S: -0.5 * jnp.sum((m - 1.0) ** 2) - 0.5 * jnp.sum(S**2) + jnp.sum(
    ...     jnp.log(jnp.diagonal(S)))            # the ELBO of q against N(1, I)
    >>> m, S = natgrad_step(f, jnp.zeros(2), 3.0 * jnp.eye(2), 1.0)
    >>> [round(float(v), 4) for v in (*m, S[0, 0])]
    [1.0, 1.0, 1.0]
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from vijax.gp._linalg import tri_solve

__all__ = ["natgrad_step", "natgrad_value_and_step", "to_natural", "from_natural"]


def _sym(A: jax.Array) -> jax.Array:
    return 0.5 * (A + A.T)


def to_natural(q_mean: jax.Array, q_scale_tril: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(Sigma^-1 m, -Sigma^-1 / 2)`` from ``m (M,)`` and ``S (M, M)``."""
    eye = jnp.eye(q_mean.shape[0], dtype=q_mean.dtype)
    S_inv = tri_solve(q_scale_tril, eye)
    prec = S_inv.T @ S_inv
    return prec @ q_mean, -0.5 * prec


def from_natural(theta1: jax.Array, theta2: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``m`` and lower-triangular ``S`` with ``S S^T = (-2 theta2)^-1``.

    ``S`` comes from the Cholesky factor of the precision with its order reversed
    (``chol(J P J) = Lt`` gives ``P^-1 = (J Lt^-T J)(J Lt^-T J)^T`` with ``J Lt^-T J`` lower
    triangular), so no explicit inverse is factorised again. A precision that is not
    positive definite gives NaN, which the fit loop's guard skips and counts."""
    prec = _sym(-2.0 * theta2)
    Lt = jnp.linalg.cholesky(prec[::-1, ::-1])
    eye = jnp.eye(theta1.shape[0], dtype=theta1.dtype)
    S = tri_solve(Lt, eye).T[::-1, ::-1]
    m = S @ (S.T @ theta1)
    return m, S


def natgrad_step(elbo_fn: Callable[[jax.Array, jax.Array], jax.Array], q_mean: jax.Array,
                 q_scale_tril: jax.Array, gamma: Any) -> tuple[jax.Array, jax.Array]:
    """One natural-gradient ascent step on ``q(v) = N(m, S S^T)``.

    Args:
        elbo_fn: ``(m (M,), S (M, M)) -> ELBO`` (a scalar to maximise; other parameters
            closed over).
        q_mean, q_scale_tril: the current ``m`` and ``S``.
        gamma: step size in ``(0, 1]``.

    Returns:
        the new ``(m, S)``.
    """
    return natgrad_value_and_step(elbo_fn, q_mean, q_scale_tril, gamma)[1]


def natgrad_value_and_step(elbo_fn: Callable[[jax.Array, jax.Array], jax.Array],
                           q_mean: jax.Array, q_scale_tril: jax.Array,
                           gamma: Any) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """As :func:`natgrad_step`, also returning ``elbo_fn`` at the current ``q`` (before the
    step; computed by the same pass as its gradient)."""

    def elbo_of_eta(eta1, eta2):
        cov = _sym(eta2) - jnp.outer(eta1, eta1)
        return elbo_fn(eta1, jnp.linalg.cholesky(cov))

    eta2 = q_scale_tril @ q_scale_tril.T + jnp.outer(q_mean, q_mean)
    value, (g1, g2) = jax.value_and_grad(elbo_of_eta, argnums=(0, 1))(q_mean, eta2)
    theta1, theta2 = to_natural(q_mean, q_scale_tril)
    return value, from_natural(theta1 + gamma * g1, theta2 + gamma * _sym(g2))
