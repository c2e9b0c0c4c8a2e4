"""Where a fit's arrays live: a :class:`Placement` names a ``jax.sharding.Mesh`` and the mesh
axis that the data's rows (or ``fit_many``'s lanes) are split over.

Placement is decided in two places only (``DESIGN.md``): where data is put on devices
(:func:`place_rows`, :func:`place_replicated`, :func:`place_stream_chunk`) and where programs
are compiled (:func:`placed_jit`, and the minibatch gather the compile step hands the loop,
:meth:`Placement.take_rows`). The target, guides, objective and loop body never mention
a mesh: XLA's SPMD partitioner splits the compiled program (GSPMD), so a sharded fit computes
what the single-device fit computes, with sums over rows reduced across devices.

Across processes (``jax.distributed``), every process runs the same program on the same
global arrays; each process puts only its own devices' shards in place
(``jax.make_array_from_callback`` and ``jax.make_array_from_process_local_data``), and reads
back replicated values (the loop state, the losses, the stopping decision), which are the
same in every process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

__all__ = ["Placement", "resolve_placement", "place_rows", "place_replicated",
           "place_stream_chunk", "placed_jit", "to_host", "padded_rows", "state_shardings",
           "place_tree", "jit_placed_outputs", "place_lanes", "jit_lanes"]


class Placement(NamedTuple):
    """A mesh and the axis the data rows (``vj.fit``) or lanes (``vj.fit_many``) are split
    over; the other axes of the mesh hold replicas.

    Attributes:
        mesh: a ``jax.sharding.Mesh`` (e.g. ``jax.make_mesh((8,), ("data",))``).
        axis: the name of the mesh axis to split over.

    Example:
        >>> import jax, vijax as vj
        >>> mesh = jax.make_mesh((len(jax.devices()),), ("data",))
        >>> vj.Placement(mesh, "data").size == len(jax.devices())
        True
    """

    mesh: Mesh
    axis: str = "data"

    @property
    def size(self) -> int:
        """Devices along the split axis (the number of shards)."""
        return int(self.mesh.shape[self.axis])

    @property
    def rows(self) -> NamedSharding:
        """The sharding of an array split along its leading axis."""
        return NamedSharding(self.mesh, P(self.axis))

    @property
    def replicated(self) -> NamedSharding:
        """The sharding of an array held whole on every device of the mesh."""
        return NamedSharding(self.mesh, P())

    def take_rows(self, data: Any, rows: jax.Array) -> Any:
        """Inside a compiled program: rows ``rows (B,)`` (global indices, the same on every
        device) of data split by rows, returned split by rows (each device gets ``B /
        devices`` of them). Each device picks the requested rows it holds, zeros elsewhere,
        and one reduce-scatter sums the pieces into each device's share: exactly the rows
        a single device's ``take`` gives, with one collective of the batch's size."""
        axis = self.axis

        def local(block, rows):
            n_local = jax.tree_util.tree_leaves(block)[0].shape[0]
            at = rows - jax.lax.axis_index(axis) * n_local
            mine = (at >= 0) & (at < n_local)
            at = jnp.where(mine, at, 0)

            def one(a):
                got = jnp.take(a, at, axis=0)
                kind = got.dtype
                if kind == jnp.bool_:
                    got = got.astype(jnp.int32)
                got = jnp.where(mine.reshape((-1,) + (1,) * (got.ndim - 1)), got,
                                jnp.zeros_like(got))
                got = jax.lax.psum_scatter(got, axis, scatter_dimension=0, tiled=True)
                return got.astype(kind)

            return jax.tree_util.tree_map(one, block)

        return jax.shard_map(local, mesh=self.mesh, in_specs=(P(axis), P()),
                             out_specs=P(axis))(data, rows)

    def describe(self) -> str:
        shape = ", ".join(f"{k}={v}" for k, v in self.mesh.shape.items())
        procs = jax.process_count()
        where = f" in {procs} processes" if procs > 1 else ""
        return f"split over mesh axis {self.axis!r} ({self.size} devices of mesh {shape}{where})"


def resolve_placement(mesh: Any) -> Placement | None:
    """``mesh=`` of ``fit`` / ``fit_many`` -> :class:`Placement` (``None``: one device).

    A ``Mesh`` splits over its axis named ``"data"`` (``fit``) or ``"lanes"`` (``fit_many``),
    or over its only axis; a :class:`Placement` names the axis itself."""
    if mesh is None:
        return None
    if isinstance(mesh, Placement):
        placement = mesh
    elif isinstance(mesh, Mesh):
        names = tuple(mesh.axis_names)
        for preferred in ("data", "lanes"):
            if preferred in names:
                placement = Placement(mesh, preferred)
                break
        else:
            if len(names) != 1:
                raise ValueError(f"mesh has axes {names} and none is named 'data' or 'lanes': "
                                 "say which one to split over, mesh=vj.Placement(mesh, "
                                 "axis=...)")
            placement = Placement(mesh, names[0])
    else:
        raise TypeError(f"mesh must be a jax.sharding.Mesh or a vj.Placement, got "
                        f"{type(mesh).__name__}")
    if not isinstance(placement.mesh, Mesh):
        raise TypeError(f"vj.Placement(mesh, axis): mesh must be a jax.sharding.Mesh, got "
                        f"{type(placement.mesh).__name__}")
    if placement.axis not in placement.mesh.axis_names:
        raise ValueError(f"mesh axis {placement.axis!r} does not exist: the mesh's axes are "
                         f"{tuple(placement.mesh.axis_names)}")
    return placement._replace(mesh=_auto(placement.mesh))


def _auto(mesh: Mesh) -> Mesh:
    """The same devices and axes with XLA choosing the shardings inside programs
    (``AxisType.Auto``; ``jax.make_mesh`` makes ``Explicit`` axes, under which every
    gather of a sharded operand would need an annotation in the model's own code)."""
    auto = jax.sharding.AxisType.Auto
    if all(t == auto for t in mesh.axis_types):
        return mesh
    return Mesh(mesh.devices, mesh.axis_names, axis_types=(auto,) * len(mesh.axis_names))


def padded_rows(n: int, placement: Placement | None) -> int:
    """``n`` rounded up to a multiple of the number of shards."""
    if placement is None:
        return n
    d = placement.size
    return -(-n // d) * d


def place_rows(data: Any, placement: Placement, rows: int | None = None) -> Any:
    """Every leaf of ``data`` (numpy, memory maps or jax arrays, leading axis the rows) as a
    global array split by rows over ``placement``; padded to ``rows`` rows first (by
    repeating the first row) when given. Each process transfers only the shards of its own
    devices (``jax.make_array_from_callback``), so every process passes the same full data
    (a memory map reads only the pages of its rows); a leaf that already has the sharding is
    kept as it is."""
    sharding = placement.rows

    def put(a):
        if isinstance(a, jax.Array) and a.sharding == sharding and (
                rows is None or a.shape[0] == rows):
            return a
        if isinstance(a, jax.Array) and not a.is_fully_addressable:
            raise ValueError(f"a data leaf of shape {a.shape} is a global array with sharding "
                             f"{a.sharding}; give the full data (numpy or a memory map) in "
                             "every process, or an array split by rows over the mesh")
        host = np.asarray(a) if isinstance(a, jax.Array) else a
        target = host.shape[0] if rows is None else rows
        shape = (target,) + tuple(host.shape[1:])
        n = host.shape[0]

        def piece(index):
            sl = index[0]
            lo, hi, _ = sl.indices(target)
            got = np.asarray(host[lo:min(hi, n)])
            if hi > n:
                got = np.concatenate([got, np.repeat(np.asarray(host[:1]), hi - max(lo, n),
                                                     axis=0)], axis=0)
            return got[(slice(None),) + tuple(index[1:])]

        return jax.make_array_from_callback(shape, sharding, piece)

    return jax.tree_util.tree_map(put, data)


def place_replicated(tree: Any, placement: Placement) -> Any:
    """Every leaf of ``tree`` held whole on every device of the mesh (parameters, keys)."""
    return place_tree(tree, jax.tree_util.tree_map(lambda _: placement.replicated, tree))


def place_stream_chunk(gather: Callable[[np.ndarray], Any], rows: np.ndarray,
                       placement: Placement) -> Any:
    """A streamed chunk's batches ``(steps, B, ...)``, split over the batch axis: each
    process gathers from host memory only the batch columns of its own devices and hands
    them over with ``jax.make_array_from_process_local_data``. ``gather(rows)`` returns the
    data of the rows ``rows`` (any shape) as a pytree of numpy arrays."""
    sharding = NamedSharding(placement.mesh, P(None, placement.axis))
    steps, b = rows.shape
    cols = _local_columns(sharding, (steps, b))
    local = gather(rows[:, cols.start:cols.stop])
    return jax.tree_util.tree_map(
        lambda a: jax.make_array_from_process_local_data(sharding, a, (steps, b) + a.shape[2:]),
        local)


def _local_columns(sharding: NamedSharding, shape: tuple[int, int]) -> slice:
    """The contiguous range of batch columns held by this process's devices."""
    idx = sharding.addressable_devices_indices_map(shape)
    starts = sorted({(s[1].indices(shape[1])[0], s[1].indices(shape[1])[1])
                     for s in idx.values()})
    lo, hi = starts[0][0], starts[-1][1]
    covered = sum(b - a for a, b in starts)
    if covered != hi - lo:
        raise ValueError("this process's devices do not hold one contiguous block of the "
                         "mesh axis; order the mesh's devices by process (jax.make_mesh "
                         "does)")
    return slice(lo, hi)


def _signature(tree: Any) -> tuple:
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple(getattr(x, "sharding", None) for x in leaves)


class placed_jit:  # noqa: N801 (used like jax.jit)
    """``jax.jit(fn)`` whose first argument (the loop state) leaves the call with exactly the
    shardings it came in with, so that chunk after chunk runs one compiled program and the
    state is never resharded between chunks; the other outputs are replicated. One compiled
    program per input sharding (the cache holds the jitted functions)."""

    def __init__(self, fn: Callable, placement: Placement, n_out: int = 2,
                 donate: tuple[int, ...] = ()):
        self.fn, self.placement, self.n_out, self.donate = fn, placement, n_out, donate
        self._jitted: dict = {}

    def jitted(self, state: Any):
        """The jitted function for a state of this structure and these shardings."""
        key = _signature(state)
        got = self._jitted.get(key)
        if got is None:
            shardings = jax.tree_util.tree_map(lambda x: x.sharding, state)
            rest = (self.placement.replicated,) * (self.n_out - 1)
            got = jax.jit(self.fn, out_shardings=(shardings,) + rest,
                          donate_argnums=self.donate)
            self._jitted[key] = got
        return got

    def __call__(self, state, *args):
        return self.jitted(state)(state, *args)


def to_host(tree: Any) -> Any:
    """Every leaf as an array on this process's default device: replicated leaves from the
    local copy, split leaves gathered from all processes (for results, checkpoints and
    PSIS after a sharded fit)."""

    def get(a):
        if not isinstance(a, jax.Array):
            return a
        if jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            data = to_host(jax.random.key_data(a))
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(a))
        if a.is_fully_addressable or a.is_fully_replicated:
            return jnp.asarray(np.asarray(a))
        from jax.experimental import multihost_utils
        return jnp.asarray(multihost_utils.process_allgather(a, tiled=True))

    return jax.tree_util.tree_map(get, tree)


def _is_table(path) -> bool:
    """A per-row table of local-latent guide parameters (``params["local"][name]["table"]``,
    and its mirrors in the optimizer state and the iterate average)."""
    keys = [getattr(k, "key", None) for k in path]
    return bool(keys) and keys[-1] == "table" and "local" in keys


def state_shardings(tree: Any, placement: Placement) -> Any:
    """The sharding of every leaf of a loop state (or any pytree holding guide parameters):
    the per-row tables of local latents split by rows with their data, everything else
    (global parameters, optimizer state, counters, keys) replicated."""
    return jax.tree_util.tree_map_with_path(
        lambda path, leaf: placement.rows if _is_table(path) and np.ndim(leaf) >= 1
        else placement.replicated, tree)


def place_tree(tree: Any, shardings: Any) -> Any:
    """Host (or single-device) values put on the mesh with the given shardings; each process
    transfers only its own devices' shards."""

    def put(a, sharding):
        if isinstance(a, jax.Array) and a.sharding == sharding:
            return a
        if isinstance(a, jax.Array) and jax.dtypes.issubdtype(a.dtype, jax.dtypes.prng_key):
            data = place_tree(np.asarray(jax.random.key_data(a)), sharding)
            return jax.random.wrap_key_data(data, impl=jax.random.key_impl(a))
        host = np.asarray(a)
        return jax.make_array_from_callback(host.shape, sharding, lambda i: host[i])

    return jax.tree_util.tree_map(put, tree, shardings)


def jit_placed_outputs(fn: Callable, placement: Placement) -> Callable:
    """``jax.jit(fn)`` whose outputs are placed by :func:`state_shardings` (the shapes are
    traced once per input structure with ``jax.eval_shape``): the start of a sharded fit
    returns its loop state already replicated, with its tables split by rows."""
    cache: dict = {}

    def call(*args):
        key = jax.tree_util.tree_structure(args), tuple(
            (np.shape(x), str(getattr(x, "dtype", type(x))))
            for x in jax.tree_util.tree_leaves(args))
        got = cache.get(key)
        if got is None:
            shapes = jax.eval_shape(fn, *args)
            got = jax.jit(fn, out_shardings=state_shardings(shapes, placement))
            cache[key] = got
        return got(*args)

    return call


def place_lanes(tree: Any, placement: Placement) -> Any:
    """Every leaf of ``tree`` (PRNG keys included) split along its leading axis over
    ``placement`` (``fit_many``'s lanes: keys, batched data); the leading size must be a
    multiple of ``placement.size``. Each process transfers only its own devices' shards."""
    return place_tree(tree, jax.tree_util.tree_map(lambda _: placement.rows, tree))


def jit_lanes(fn: Callable, placement: Placement) -> Callable:
    """``jax.jit(fn)`` whose every output is split along its leading axis over ``placement``
    (``fit_many``'s vmapped programs, whose outputs all lead with the lane axis). A loop
    state that comes in split so leaves a call with exactly the shardings it came in with:
    chunk after chunk runs one compiled program and nothing is resharded between chunks."""
    return jax.jit(fn, out_shardings=placement.rows)
