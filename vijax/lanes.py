"""The lanes of ``vj.fit_many``: their keys, which data leaves they batch, their slices of the
data, and the lane programs (start, chunk, PSIS) vmapped and jitted, on one device or split
over a mesh axis (:mod:`vijax.placement`)."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vijax.loop import stopped
from vijax.placement import Placement, jit_lanes, place_tree, resolve_placement

__all__ = []


def _lane_keys(keys: Any) -> jax.Array:
    """``(L,)`` typed PRNG keys from an int L, a sequence of int seeds, or a key array."""
    if isinstance(keys, int | np.integer) and not isinstance(keys, bool):
        if keys < 1:
            raise ValueError(f"keys as a lane count must be >= 1, got {keys}")
        return jax.random.split(jax.random.key(0), int(keys))
    if isinstance(keys, jax.Array) and jax.dtypes.issubdtype(keys.dtype, jax.dtypes.prng_key):
        if keys.ndim != 1 or keys.shape[0] < 1:
            raise ValueError(f"keys must be a (L,) array of PRNG keys, got shape {keys.shape}")
        return keys
    if isinstance(keys, Sequence) and keys and all(
            isinstance(k, int | np.integer) and not isinstance(k, bool) for k in keys):
        return jnp.stack([jax.random.key(int(k)) for k in keys])
    raise TypeError("keys must be a lane count (int), a list of int seeds or a (L,) array of "
                    f"PRNG keys (jax.random.split(key, L)), got {keys!r}")


def _axes_key(axes):
    leaves, treedef = jax.tree_util.tree_flatten(axes, is_leaf=lambda x: x is None)
    return tuple(leaves), treedef


def _lanes_of(data, axes) -> int | None:
    """The common leading size of the batched data leaves (``None`` if nothing is batched)."""
    if axes is None:
        return None
    sizes = {}
    flat_axes = jax.tree_util.tree_flatten(axes, is_leaf=lambda x: x is None)[0]
    if axes == 0:
        parts = [(jax.tree_util.keystr(p), x)
                 for p, x in jax.tree_util.tree_flatten_with_path(data)[0]]
    else:
        try:
            prefix = jax.tree_util.tree_map(lambda a, d: (a, d), axes, data,
                                            is_leaf=lambda x: x is None)
        except ValueError as e:
            raise ValueError(f"data_axes must be 0, None or a pytree prefix of the data with "
                             f"0/None leaves: {e}") from None
        parts = []
        for path, (a, sub) in jax.tree_util.tree_flatten_with_path(
                prefix, is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2)[0]:
            if a not in (0, None):
                raise ValueError(f"data_axes entries must be 0 or None, got {a!r}")
            if a == 0:
                parts += [(jax.tree_util.keystr(path) + jax.tree_util.keystr(q), x)
                          for q, x in jax.tree_util.tree_flatten_with_path(sub)[0]]
        if not any(a == 0 for a in flat_axes):
            return None
    for where, leaf in parts:
        shape = np.shape(leaf)
        if not shape:
            raise ValueError(f"data{where} is batched (data_axes 0) but is a scalar")
        sizes[where] = shape[0]
    if len(set(sizes.values())) > 1:
        raise ValueError(f"batched data leaves need the same leading (lane) size; got {sizes}")
    return next(iter(sizes.values())) if sizes else None


def _slice(tree, i):
    return jax.tree_util.tree_map(lambda x: x[i], tree)


def _lane_data(data, axes, i):
    if axes is None:
        return data
    if axes == 0:
        return _slice(data, i)
    return jax.tree_util.tree_map(lambda a, d: d if a is None else _slice(d, i), axes, data,
                                  is_leaf=lambda x: x is None)


@functools.lru_cache(maxsize=64)
def _batched(pipeline_fn, axes_key, kind: str, placement: Placement | None = None,
             key_impl: str | None = None):
    """``pipeline_fn`` vmapped over lanes and jitted. With a ``placement`` every output is
    split along the lane axis (:func:`vijax.placement.jit_lanes`), and the loop keys leave
    ``start`` and enter ``run`` as their key data (``key_impl`` names the PRNG): a typed key
    array's buffer comes out of a compiling call split as ``P(axis, None)`` and out of later
    calls as ``P(axis)``, which would give the chunk program a second dispatch entry on a
    refit (JAX 0.10); a plain uint32 array keeps the one sharding it is given."""
    leaves, treedef = axes_key
    axes = jax.tree_util.tree_unflatten(treedef, leaves)
    if kind == "start":
        fn = jax.vmap(pipeline_fn, in_axes=(0, axes, None, None))
    elif kind == "run":
        fn = jax.vmap(pipeline_fn, in_axes=(0, axes, 0, None, None, None, None))
    else:  # PSIS log weights: (keys, params, data, model params)
        fn = jax.vmap(pipeline_fn, in_axes=(0, 0, axes, 0))
    if placement is None:
        return jax.jit(fn)
    if kind == "start":
        def lanes_fn(*args):
            *out, k_loop = fn(*args)
            return (*out, jax.random.key_data(k_loop))
    elif kind == "run":
        def lanes_fn(state, data, k_loop, *args):
            return fn(state, data, jax.random.wrap_key_data(k_loop, impl=key_impl), *args)
    else:
        lanes_fn = fn
    return jit_lanes(lanes_fn, placement)


@functools.lru_cache(maxsize=16)
def _chunk_summary(placement: Placement | None):
    """Jitted ``(state, losses (L, chunk), n_valid) -> (steps taken by the first n_valid
    lanes, whether every lane has stopped, mean finite loss of the chunk)``: what the host
    reads after each chunk, as three replicated scalars (padding lanes left out)."""

    def summary(state, losses, n_valid):
        valid = jnp.arange(losses.shape[0]) < n_valid
        seen = valid[:, None] & jnp.isfinite(losses)
        mean = jnp.sum(jnp.where(seen, losses, 0)) / jnp.sum(seen)
        return (jnp.sum(jnp.where(valid, state.step, 0)), jnp.all(stopped(state) | ~valid),
                mean)

    return jax.jit(summary, out_shardings=None if placement is None else placement.replicated)


def _data_shardings(data, axes, placement: Placement, shared_only: bool = False):
    """Batched data leaves (data_axes 0) split along the lane axis (``None`` for them when
    ``shared_only``), shared ones replicated."""
    split = None if shared_only else placement.rows
    if axes is None:
        return jax.tree_util.tree_map(lambda _: placement.replicated, data)
    if axes == 0:
        return jax.tree_util.tree_map(lambda _: split, data)
    return jax.tree_util.tree_map(
        lambda a, d: jax.tree_util.tree_map(
            lambda _: placement.replicated if a is None else split, d),
        axes, data, is_leaf=lambda x: x is None)


def _group_data(data, axes, idx: np.ndarray, placement: Placement | None):
    """The data of lanes ``idx``; on a mesh the batched leaves split along the lane axis
    (the shared ones are already replicated: :func:`_place_shared`)."""
    gdata = data if axes is None else _lane_data(data, axes, idx)
    if placement is None or axes is None:
        return gdata
    return place_tree(gdata, _data_shardings(gdata, axes, placement))


def _place_shared(data, axes, placement: Placement | None):
    """``data`` with its shared leaves (data_axes ``None``) replicated over the mesh, once
    for every group of lanes; the batched leaves as they are."""
    if placement is None or axes == 0:
        return data
    shardings = _data_shardings(data, axes, placement, shared_only=True)
    return jax.tree_util.tree_map(lambda d, s: d if s is None else place_tree(d, s), data,
                                  shardings, is_leaf=lambda x: x is None)


def _placement_of(mesh) -> Placement | None:
    """``mesh=`` -> the lanes' :class:`Placement`: a mesh's axis ``"lanes"`` if it has one,
    else as :func:`vijax.placement.resolve_placement` (``"data"`` or its only axis)."""
    if isinstance(mesh, jax.sharding.Mesh) and "lanes" in mesh.axis_names:
        mesh = Placement(mesh, "lanes")
    return resolve_placement(mesh)
