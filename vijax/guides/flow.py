"""Normalizing-flow guides: a Gaussian base guide pushed through a stack of bijections.

With base draw ``x_0 = g(eps)`` of density ``q_0`` and layers ``x_k = f_k(x_{k-1})``,

    theta = x_L,    log q(theta) = log q_0(x_0) - sum_k log|det J_{f_k}(x_{k-1})|.

Sampling with ``log q`` is one forward pass. Layer k acts in coordinates permuted by ``P_k``
(the identity for even k, the reversal for odd k): ``f_k(x) = P_k^T h_k(P_k x)``, so
autoregressive orders and coupling masks alternate while a stack of fresh (identity) layers
is exactly the identity and the flow starts as its base.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vijax.guides.base import Guide, make_guide

__all__ = ["Layer", "build_flow_guide", "default_hidden", "check_flow_config"]


class Layer(NamedTuple):
    """One bijection of ``(dim,)`` vectors with learnable parameters.

    ``init(key, dtype) -> params`` (identity map); ``forward(params, x) -> (y, log|det J|)``;
    ``inverse(params, y) -> (x, log|det J| of forward at x)``.
    """

    init: Callable[[jax.Array, Any], Any]
    forward: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]
    inverse: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]


def default_hidden(dim: int) -> tuple[int, int]:
    """Two hidden layers of ``clip(4 dim, 32, 512)`` units."""
    width = int(min(max(4 * dim, 32), 512))
    return (width, width)


def default_layers(dim: int) -> int:
    """``clip(ceil(log2(dim)) + 2, 3, 8)`` layers: more for higher dimensions."""
    return int(min(max(math.ceil(math.log2(max(dim, 1))) + 2, 3), 8))


def check_flow_config(kind: str, num_layers: Any, hidden: Any) -> None:
    if num_layers is not None and (isinstance(num_layers, bool)
                                   or not isinstance(num_layers, int) or num_layers < 1):
        raise ValueError(f"{kind} num_layers must be a positive int or None, got {num_layers!r}")
    if hidden is not None:
        if isinstance(hidden, int) or not isinstance(hidden, Sequence) or len(hidden) == 0:
            raise ValueError(f"{kind} hidden must be a non-empty tuple of layer widths (e.g. "
                             f"(64, 64)) or None, got {hidden!r}")
        if any(isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in hidden):
            raise ValueError(f"{kind} hidden widths must be positive ints, got {hidden!r}")


def build_flow_guide(name: str, dim: int, names: tuple[str, ...], base_spec,
                     layers: Sequence[Layer]) -> Guide:
    """Assemble a flow Guide from a Gaussian base spec and layers (permutations alternate)."""
    base = base_spec.build(dim, names)
    perms = [np.arange(dim) if k % 2 == 0 else np.arange(dim)[::-1]
             for k in range(len(layers))]
    inv_perms = [np.argsort(p) for p in perms]

    def init(key, loc):
        keys = jax.random.split(key, len(layers) + 1)
        return {"base": base.init(keys[0], loc),
                "layers": tuple(layer.init(k, loc.dtype) for layer, k in zip(layers, keys[1:],
                                                                              strict=True))}

    def push(params, x):
        total = jnp.zeros((), x.dtype)
        for layer, p, perm, inv in zip(layers, params["layers"], perms, inv_perms,
                                       strict=True):
            y, log_det = layer.forward(p, x[perm])
            x, total = y[inv], total + log_det
        return x, total

    def transform(params, eps):
        x0, log_q0 = base.transform(params["base"], eps)
        theta, log_det = push(params, x0)
        return theta, log_q0 - log_det

    def log_q(params, theta):
        x, total = theta, jnp.zeros((), theta.dtype)
        for layer, p, perm, inv in reversed(list(zip(layers, params["layers"], perms,
                                                     inv_perms, strict=True))):
            y, log_det = layer.inverse(p, x[perm])
            x, total = y[inv], total + log_det
        return base.log_q(params["base"], x) - total

    return make_guide(name, dim, base.noise_dim, init, transform, log_q, None, None,
                      base.no_jacobian)
