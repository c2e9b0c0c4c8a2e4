"""Monotone rational-quadratic spline (Durkan et al. 2019, "Neural Spline Flows"), elementwise.

On ``[-B, B]`` the map is a monotone rational-quadratic spline with ``K`` bins: knots
``(x_k, y_k)`` from softmax-normalised widths and heights (each at least ``min_bin``), and
positive derivatives ``d_k`` at the knots (``d_0 = d_K = 1``). Outside ``[-B, B]`` it is the
identity (linear tails of slope 1, matching the boundary derivatives). In bin k, with
``s = h_k / w_k`` and ``xi = (x - x_k) / w_k``,

    y = y_k + h_k (s xi^2 + d_k xi (1 - xi)) / (s + (d_{k+1} + d_k - 2 s) xi (1 - xi)),
    dy/dx = s^2 (d_{k+1} xi^2 + 2 s xi (1 - xi) + d_k (1 - xi)^2) / den^2,

and the inverse solves the quadratic ``a xi^2 + b xi + c = 0`` in the stable form
``xi = 2c / (-b - sqrt(b^2 - 4ac))``. Raw parameters of zero give the identity.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["rq_spline", "num_params"]

MIN_BIN = 1e-3
MIN_DERIVATIVE = 1e-3


def num_params(num_bins: int) -> int:
    """Raw parameters per element: K widths, K heights, K - 1 inner derivatives."""
    return 3 * num_bins - 1


def _knots(raw, bound):
    num_bins = raw.shape[-1]
    frac = MIN_BIN + (1.0 - MIN_BIN * num_bins) * jax.nn.softmax(raw)
    knots = jnp.concatenate([jnp.zeros((1,), raw.dtype), jnp.cumsum(frac)])
    knots = 2.0 * bound * knots - bound
    return knots.at[0].set(-bound).at[-1].set(bound)


def rq_spline(x, raw, bound: float, inverse: bool = False):
    """Spline of one scalar ``x`` with raw parameters ``raw (3K - 1,)``.

    Returns ``(y, log|dy/dx|)`` (forward) or ``(x, log|dy/dx| at x)`` (inverse).
    """
    num_bins = (raw.shape[-1] + 1) // 3
    xs = _knots(raw[:num_bins], bound)
    ys = _knots(raw[num_bins:2 * num_bins], bound)
    # softplus shifted so that a zero raw derivative is 1 (identity at initialisation)
    shift = jnp.log(jnp.expm1(1.0 - MIN_DERIVATIVE))
    inner = MIN_DERIVATIVE + jax.nn.softplus(raw[2 * num_bins:] + shift)
    one = jnp.ones((1,), raw.dtype)
    d = jnp.concatenate([one, inner, one])

    inside = jnp.abs(x) < bound
    v = jnp.clip(x, -bound, bound)  # keep the unused branch finite (and its gradient)
    knots = ys if inverse else xs
    k = jnp.clip(jnp.searchsorted(knots, v, side="right") - 1, 0, num_bins - 1)
    xk, wk = xs[k], xs[k + 1] - xs[k]
    yk, hk = ys[k], ys[k + 1] - ys[k]
    dk, dk1 = d[k], d[k + 1]
    s = hk / wk
    if inverse:
        dy = v - yk
        a = hk * (s - dk) + dy * (dk1 + dk - 2.0 * s)
        b = hk * dk - dy * (dk1 + dk - 2.0 * s)
        c = -s * dy
        disc = jnp.maximum(b**2 - 4.0 * a * c, 0.0)
        xi = jnp.clip(2.0 * c / (-b - jnp.sqrt(disc)), 0.0, 1.0)
        out = xk + xi * wk
    else:
        xi = jnp.clip((v - xk) / wk, 0.0, 1.0)
        out = yk + hk * (s * xi**2 + dk * xi * (1 - xi)) / (
            s + (dk1 + dk - 2.0 * s) * xi * (1 - xi))
    den = s + (dk1 + dk - 2.0 * s) * xi * (1 - xi)
    log_det = (2.0 * jnp.log(s) + jnp.log(dk1 * xi**2 + 2.0 * s * xi * (1 - xi)
                                          + dk * (1 - xi) ** 2) - 2.0 * jnp.log(den))
    return jnp.where(inside, out, x), jnp.where(inside, log_det, 0.0)
