"""Normalizing-flow guides: a Gaussian base guide pushed through a stack of bijections.

With base draw ``x_0 = g(eps)`` of density ``q_0`` and layers ``x_k = f_k(x_{k-1})``,

    theta = x_L,    log q(theta) = log q_0(x_0) - sum_k log|det J_{f_k}(x_{k-1})|.

Sampling with ``log q`` is one forward pass. Layer k acts in coordinates permuted by ``P_k``
(the identity for even k, the reversal for odd k): ``f_k(x) = P_k^T h_k(P_k x)``, so
autoregressive orders and coupling masks alternate while a stack of fresh (identity) layers
is exactly the identity and the flow starts as its base.

The network weights of all layers are stored as **one flat vector** (``params["layers"]``,
shape ``(n_weights,)``), cut into each layer's arrays inside the transform (slices and
reshapes, fused by XLA). The optimizer, the non-finite guard and the iterate averaging then
touch one array instead of one per weight matrix, which on CPU makes a flow step ~25% cheaper
(``benchmarks/flow_step_overhead.py``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vijax.guides.base import Guide, make_guide
from vijax.guides.meanfield import MeanField

__all__ = ["Layer", "build_flow_guide", "default_hidden", "check_flow_config"]


class Layer(NamedTuple):
    """One bijection of ``(dim,)`` vectors with learnable parameters.

    ``init(key, dtype) -> params`` (identity map); ``forward(params, x) -> (y, log|det J|)``;
    ``inverse(params, y) -> (x, log|det J| of forward at x)``.
    """

    init: Callable[[jax.Array, Any], Any]
    forward: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]
    inverse: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]


def unit_base():
    """The default base of a flow: ``MeanField(init_scale=1.0)``."""
    return MeanField(init_scale=1.0)


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


class _Packing(NamedTuple):
    """How the flat weight vector is cut: the layers' pytree structure, shapes and offsets."""

    treedef: Any
    shapes: tuple[tuple[int, ...], ...]
    offsets: tuple[int, ...]
    size: int


def _packing(layers: Sequence[Layer]) -> _Packing:
    shapes_tree = jax.eval_shape(
        lambda k: tuple(layer.init(k, jnp.float32) for layer in layers), jax.random.key(0))
    leaves, treedef = jax.tree_util.tree_flatten(shapes_tree)
    shapes = tuple(tuple(leaf.shape) for leaf in leaves)
    sizes = [math.prod(sh) for sh in shapes]
    offsets = tuple(int(o) for o in np.cumsum([0] + sizes[:-1]))
    return _Packing(treedef, shapes, offsets, int(sum(sizes)))


def _unpack(packing: _Packing, flat: jax.Array):
    # one split (its gradient is one concatenate), not a slice per leaf (whose gradients
    # are full-length pads that XLA adds up)
    pieces = jnp.split(flat, packing.offsets[1:])
    leaves = [p.reshape(sh) for p, sh in zip(pieces, packing.shapes, strict=True)]
    return jax.tree_util.tree_unflatten(packing.treedef, leaves)


def build_flow_guide(name: str, dim: int, names: tuple[str, ...], base_spec,
                     layers: Sequence[Layer]) -> Guide:
    """Assemble a flow Guide from a Gaussian base spec and layers (permutations alternate).

    Params: ``{"base": base params, "layers": (n_weights,) flat vector of all layer weights}``.
    """
    base = base_spec.build(dim, names)
    # the reversal is its own inverse; x[::-1] is a cheap reverse, x[perm] would be a gather
    flips = [k % 2 == 1 for k in range(len(layers))]

    def permute(flip, x):
        return x[::-1] if flip else x
    packing = _packing(layers)

    def init(key, loc):
        keys = jax.random.split(key, len(layers) + 1)
        weights = tuple(layer.init(k, loc.dtype)
                        for layer, k in zip(layers, keys[1:], strict=True))
        flat = jnp.concatenate([jnp.ravel(w) for w in jax.tree_util.tree_leaves(weights)])
        return {"base": base.init(keys[0], loc), "layers": flat}

    def push(params, x):
        total = jnp.zeros((), x.dtype)
        weights = _unpack(packing, params["layers"])
        for layer, p, flip in zip(layers, weights, flips, strict=True):
            y, log_det = layer.forward(p, permute(flip, x))
            x, total = permute(flip, y), total + log_det
        return x, total

    def transform(params, eps):
        x0, log_q0 = base.transform(params["base"], eps)
        theta, log_det = push(params, x0)
        return theta, log_q0 - log_det

    def log_q(params, theta):
        x, total = theta, jnp.zeros((), theta.dtype)
        weights = _unpack(packing, params["layers"])
        for layer, p, flip in reversed(list(zip(layers, weights, flips, strict=True))):
            y, log_det = layer.inverse(p, permute(flip, x))
            x, total = permute(flip, y), total + log_det
        return base.log_q(params["base"], x) - total

    return make_guide(name, dim, base.noise_dim, init, transform, log_q, None, None,
                      base.no_jacobian)
