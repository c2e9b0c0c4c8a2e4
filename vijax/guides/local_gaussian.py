"""The Gaussian families of a local guide factor, read from a flat raw vector per row.

``"meanfield"``: ``raw = (loc (d,), raw_scale (d,))`` with ``scale = softplus(raw_scale + c)``,
``c = softplus^-1(init_scale)`` (a zero raw vector is ``N(0, init_scale^2)``); ``"fullrank"``:
the same followed by the ``d (d-1) / 2`` strictly lower entries of ``L = diag(s) (I + N)``
(row-major). Every function is batched over leading axes.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from vijax.guides.base import softplus, softplus_inverse

__all__ = ["gaussian_family"]

_LOG_2PI = math.log(2.0 * math.pi)


def gaussian_family(size: int, init_scale: float, family: str):
    """``(out_size, draw, log_prob, mean)`` of a Gaussian family read from a raw vector."""
    n_low = size * (size - 1) // 2 if family == "fullrank" else 0
    out = 2 * size + n_low
    rows, cols = jnp.tril_indices(size, -1)

    def parts(raw):
        loc = raw[..., :size]
        c = softplus_inverse(jnp.asarray(init_scale, raw.dtype))
        s = softplus(raw[..., size:2 * size] + c)
        return loc, s, raw[..., 2 * size:]

    def tril(s, low):
        n = jnp.zeros(s.shape + (size,), s.dtype).at[..., rows, cols].set(low)
        return s[..., :, None] * (jnp.eye(size, dtype=s.dtype) + n)

    def draw(params, raw, eps):
        loc, s, low = parts(raw)
        if family == "fullrank":
            u = loc + jnp.einsum("...ij,...j->...i", tril(s, low), eps)
        else:
            u = loc + s * eps
        log_q = -jnp.sum(jnp.log(s), -1) - 0.5 * jnp.sum(eps**2, -1) - 0.5 * size * _LOG_2PI
        return u, log_q

    def log_prob(params, raw, u):
        loc, s, low = parts(raw)
        if family == "fullrank":
            eps = jax.scipy.linalg.solve_triangular(tril(s, low), (u - loc)[..., None],
                                                    lower=True)[..., 0]
        else:
            eps = (u - loc) / s
        return -jnp.sum(jnp.log(s), -1) - 0.5 * jnp.sum(eps**2, -1) - 0.5 * size * _LOG_2PI

    return out, draw, log_prob, lambda params, raw: parts(raw)[0]
