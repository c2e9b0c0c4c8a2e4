"""Minibatches streamed from host memory: the data stays in numpy arrays or memory-mapped
``.npy`` files, and each chunk's batches are gathered on the host and shipped to the device
(asynchronous ``jax.device_put``) while the previous chunk runs.

The rows of every step are computed by the loop's own index code (:func:`vijax.data.
device_indices`, the same as :func:`vijax.data.host_indices`): exactly the rows a
device-resident fit of the same data draws, so a streamed fit equals a device-resident one
bitwise, and a resumed fit continues mid-epoch where it stopped. Device memory holds two
chunks of batches (``2 * chunk_size * batch_size`` rows), whatever N.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import numpy as np

from vijax.data import Minibatch, advance, device_indices, position_at

__all__ = ["HostData", "host_data"]


class HostData:
    """Host-resident data for streaming: a pytree of numpy arrays (``np.memmap`` included)
    whose leaves share the leading observation axis of length ``n``."""

    def __init__(self, leaves: list[np.ndarray], treedef, names: list[str], n: int, dtype):
        self.leaves = leaves
        self.treedef = treedef
        self.names = names
        self.n = n
        self.dtype = dtype

    def batch_shapes(self, batch_size: int):
        """Shapes and dtypes of one batch (a pytree of ``jax.ShapeDtypeStruct``)."""
        return jax.tree_util.tree_unflatten(self.treedef, [
            jax.ShapeDtypeStruct((batch_size,) + leaf.shape[1:], self._cast(leaf))
            for leaf in self.leaves])

    def _cast(self, leaf: np.ndarray):
        if leaf.dtype.kind == "f":
            return np.dtype(self.dtype)
        if leaf.dtype.kind == "b":
            return np.dtype(bool)
        return np.dtype(np.int32)

    def gather(self, rows: np.ndarray) -> Any:
        """Rows ``rows`` (any shape ``S``) of every leaf, cast to the fit's dtypes: leaves of
        shape ``S + leaf.shape[1:]``. Rows are read in increasing order (a memory map is
        read front to back) and put back in the asked order."""
        flat = rows.reshape(-1)
        order = np.argsort(flat, kind="stable")
        out = []
        for leaf, name in zip(self.leaves, self.names, strict=True):
            got = np.empty((flat.size,) + leaf.shape[1:], self._cast(leaf))
            got[order] = leaf[flat[order]]
            if got.dtype.kind == "f" and not np.all(np.isfinite(got)):
                bad = int(flat[np.argwhere(~np.isfinite(got.reshape(flat.size, -1)))[0, 0]])
                raise ValueError(f"data leaf {name}: row {bad} is not finite; remove or "
                                 "impute the row before fitting")
            if leaf.dtype.kind in "iu" and got.dtype == np.int32:
                if np.any(leaf[flat[order]] != got[order]):
                    raise ValueError(f"data leaf {name}: values outside the int32 range")
            out.append(got.reshape(rows.shape + leaf.shape[1:]))
        return jax.tree_util.tree_unflatten(self.treedef, out)

    def chunk(self, mb: Minibatch, first_step: int, steps: int, seed: int) -> Any:
        """The batches of ``steps`` steps from ``first_step``, as device arrays of leading
        shape ``(steps, B)`` (the transfer is asynchronous). The rows come from the device's
        own index program (:func:`vijax.data.device_indices`, compiled, faster than numpy),
        started at the exact ``(epoch, offset)`` of ``first_step``."""
        return jax.device_put(self.gather(self.chunk_rows(mb, first_step, steps, seed)))

    def chunk_rows(self, mb: Minibatch, first_step: int, steps: int, seed: int) -> np.ndarray:
        """The rows ``(steps, B)`` (int64) of ``steps`` steps from ``first_step``."""
        epoch, offset = position_at(mb, first_step, self.n)
        rows = np.asarray(_chunk_rows(mb, steps)(np.int32(epoch), np.int32(offset),
                                                 np.uint32(seed), np.int32(self.n)))
        return rows.astype(np.int64)


@functools.lru_cache(maxsize=32)
def _chunk_rows(mb: Minibatch, steps: int):
    """Jitted ``(epoch, offset, seed, n) -> rows (steps, B)``: the rows of ``steps``
    consecutive steps, by the loop's own index and position code."""

    def run(epoch, offset, seed, n):
        def body(pos, _):
            return advance(mb, pos, n), device_indices(mb, pos, seed, n)

        return jax.lax.scan(body, (epoch, offset), None, length=steps)[1]

    return jax.jit(run)


def host_data(data: Any, dtype) -> HostData:
    """Check a pytree of host arrays for streaming: numpy arrays or memory maps (a ``.npy``
    opened with ``np.load(path, mmap_mode="r")``), numbers only, one leading size."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(data)
    if not leaves:
        raise ValueError("stream=True needs data: a pytree of numpy arrays (or memory-mapped "
                         ".npy files) whose leading axis is the observation axis")
    arrays, names, sizes = [], [], {}
    for path, leaf in leaves:
        name = jax.tree_util.keystr(path) or "data"
        if isinstance(leaf, jax.Array):
            raise TypeError(f"stream=True: data leaf {name} is already a device array; "
                            "streaming reads host memory: pass numpy arrays or "
                            "np.load(path, mmap_mode='r'), or drop stream=True to minibatch "
                            "device-resident data")
        if not isinstance(leaf, np.ndarray):
            raise TypeError(f"stream=True: data leaf {name} is a {type(leaf).__name__}; "
                            "give numpy arrays or memory maps (np.load(path, mmap_mode='r'))")
        if leaf.dtype.kind not in "biuf":
            raise TypeError(f"stream=True: data leaf {name} has dtype {leaf.dtype}; only "
                            "numbers can be streamed")
        if leaf.ndim == 0:
            raise ValueError(f"stream=True: data leaf {name} is a scalar; every leaf needs "
                             "a leading observation axis")
        arrays.append(leaf)
        names.append(name)
        sizes.setdefault(leaf.shape[0], []).append(name)
    if len(sizes) > 1:
        detail = "; ".join(f"{n} rows: {', '.join(w)}" for n, w in sorted(sizes.items()))
        raise ValueError(f"stream=True: the data leaves have different leading sizes "
                         f"({detail}); every leaf's leading axis must be the observation "
                         "axis")
    return HostData(arrays, treedef, names, int(next(iter(sizes))), dtype)
