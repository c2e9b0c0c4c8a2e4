"""Small networks for flow layers, from ``jax.example_libraries.stax`` and ``numpyro.nn``.

Both are used as pure ``(init, apply)`` pairs with parameters as pytrees. The last dense layer
is zeroed at initialisation, so a fresh flow layer outputs zeros and starts as the identity.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.example_libraries import stax
from numpyro.nn import AutoregressiveNN

__all__ = ["made", "mlp"]


def _zero_last(params):
    """Zero the weights and bias of the last dense layer of a stax params list."""
    params = list(params)
    for i in range(len(params) - 1, -1, -1):
        if params[i]:  # activations have ()
            params[i] = tuple(jnp.zeros_like(p) for p in params[i])
            break
    return params


def mlp(in_dim: int, hidden: Sequence[int], out_dim: int):
    """Dense ELU network ``(in_dim,) -> (out_dim,)``: ``(init(key, dtype), apply(params, x))``."""
    layers = []
    for h in hidden:
        layers += [stax.Dense(h), stax.Elu]
    init_fn, apply = stax.serial(*layers, stax.Dense(out_dim))

    def init(key, dtype):
        _, params = init_fn(key, (in_dim,))
        return jax.tree_util.tree_map(lambda p: p.astype(dtype), _zero_last(params))

    return init, apply


def made(dim: int, hidden: Sequence[int]):
    """MADE (Germain et al. 2015) via numpyro's ``AutoregressiveNN``: ``x (dim,) -> (m, s)``,
    each ``(dim,)``, where output ``i`` depends on ``x[:i]`` only."""
    init_fn, apply = AutoregressiveNN(dim, list(hidden), param_dims=[1, 1],
                                      permutation=jnp.arange(dim), nonlinearity=stax.Elu)

    def init(key, dtype):
        _, params = init_fn(key, (dim,))
        return jax.tree_util.tree_map(lambda p: p.astype(dtype), _zero_last(params))

    return init, apply
