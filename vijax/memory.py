"""Device memory of a fit, estimated before anything compiles: printed when it is large, and a
clear error when it cannot fit, instead of an allocation failure deep inside XLA.

:func:`estimate_fit_memory` sizes, per device, in bytes:

* ``state``: the loop state (guide parameters, optimizer state, iterate average, stopping-rule
  state, model parameters): the exact shapes of the state ``program.start`` returns, from
  ``jax.eval_shape`` (a trace, no compile). On a mesh the per-row tables of local latents are
  split by rows (:func:`vijax.placement.state_shardings`); everything else is replicated.
* ``data``: the device-resident data: all of it on one device; on a mesh each device holds
  ``rows / devices`` rows (padded to a multiple of the devices for minibatches). ``0`` for a
  stream (the data stay in host memory).
* ``batch``: one step's minibatch: ``B`` rows on one device, ``B / devices`` of a stream split
  over a mesh; ``0`` for full-data fits (the step reads the data themselves). A minibatch
  taken from device-resident data split over a mesh counts ``B + B / devices`` rows per
  device: each device picks the batch's rows it holds into a whole batch (the other rows
  zero), and one reduce-scatter leaves it its share
  (:meth:`vijax.placement.Placement.take_rows`). ``fit_many``: the lanes' gathered data.
* ``activations``: the intermediate values of the compiled chunk (see below).
* ``streamed``: a stream's two chunks of batches on device (the one running and the next,
  shipped while it runs: ``2 * chunk_len * B / devices`` rows).

**Activations.** The chunk program is traced (``jit(...).trace``, as its first call would
trace it: for a fit on one device the trace is cached and that call reuses it) and its jaxpr
is walked in program order keeping the set of live values: a value is live from the equation
that defines it to its last use; a nested program (the scans, ``pjit``, ``cond`` branches,
``remat``) adds its own peak of live values while it runs. The estimate is the peak of that
sum, less the step's batch (one of those values, counted as ``batch``). It counts every
intermediate XLA keeps apart, but XLA fuses elementwise chains into single kernels and
reuses buffers, so the estimate is an upper bound of the order of XLA's own
(``compiled.memory_analysis()``: temp plus output bytes; ``tests/test_memory.py``). Measured
on CPU (jax 0.10.2, logistic regressions of 1,000 x 5 to 20,000 x 200, mean-field and
full-rank guides, 1 to 8 particles, and a model with a 4,096-row local table, on one device
and split over 4): 1.0-1.3x XLA's bytes when a minibatch or the loop state dominates,
1.5-1.7x for full-data steps with one particle, 3x with 4-8 particles (XLA fuses the
particles' elementwise chains). On a mesh the program each device
runs is traced at its share of the rows, since XLA's partitioner splits the row-sized
values and keeps the parameter-sized ones whole.

:func:`check_fit_memory` prints the estimate (one block on stderr) when it is large (total
over 1 GiB or over a quarter of the device's memory) and raises :class:`DeviceMemoryError`
when the total exceeds 90% of the device's memory, naming the largest parts and what shrinks
them. ``VIJAX_MEMORY_CHECK=0`` (or ``off``) turns both off; ``VIJAX_MEMORY_CHECK=warn``
prints but never raises.
"""

from __future__ import annotations

import os
import sys
from typing import Any, NamedTuple, TextIO

import jax
import jax.numpy as jnp
import numpy as np

from vijax.data import Feed, Minibatch
from vijax.device_memory import (
    device_memory_limit,
    device_name,
    format_bytes,
    nbytes,
    peak_live_bytes,
    tree_bytes,
)
from vijax.loop import make_chunk_runner
from vijax.placement import Placement, padded_rows, state_shardings

__all__ = ["MemoryEstimate", "DeviceMemoryError", "estimate_fit_memory", "check_fit_memory",
           "device_memory_limit", "peak_live_bytes", "ENV"]

ENV = "VIJAX_MEMORY_CHECK"
"""Environment variable: ``0``/``off``/``false`` turns the memory check off, ``warn`` keeps
the printout and never raises."""

LARGE_BYTES = 1 << 30  # a fit this large is announced before it compiles ...
LARGE_FRACTION = 0.25  # ... or one that takes this share of the device's memory
MARGIN = 0.9  # the total may take at most this share of the device's memory

_PARTS = ("state", "data", "batch", "activations", "streamed")
_WHAT = {
    "state": "parameters, optimizer state, iterate average, stopping rule",
    "data": "device-resident data",
    "batch": "one step's batch",
    "activations": "intermediate values of one step of the compiled chunk",
    "streamed": "two chunks of streamed batches",
}


class DeviceMemoryError(MemoryError):
    """A fit whose estimated device memory (:class:`MemoryEstimate`) exceeds the device's."""


class MemoryEstimate(NamedTuple):
    """Estimated device memory of a fit, per device, in bytes (see the module docstring).

    Attributes:
        state, data, batch, activations, streamed: the parts; ``total`` their sum.
        limit: the device's memory (``None``: unknown): ``bytes_limit`` of its
            ``memory_stats()`` (GPU, TPU), or on CPU the host's available memory shared by
            the devices of the fit.
        devices: devices the fit's rows (or lanes) are split over.
        device: the first device, in words (``"cpu:0"``, ``"cuda:0"``).
        limit_source: where ``limit`` came from, in words.
        lanes: fits run at once on each device (``fit_many``), else 1.
        many: the estimate is ``fit_many``'s (its advice names lanes).
    """

    state: int
    data: int
    batch: int
    activations: int
    streamed: int
    total: int
    limit: int | None
    devices: int = 1
    device: str = ""
    limit_source: str = ""
    lanes: int = 1
    many: bool = False

    def largest(self) -> list[tuple[str, int]]:
        """The nonzero parts, largest first: ``[(name, bytes), ...]``."""
        parts = [(p, getattr(self, p)) for p in _PARTS if getattr(self, p)]
        return sorted(parts, key=lambda x: -x[1])

    def describe(self, what: str = "the fit") -> str:
        """A short table of the parts in KiB/MiB/GiB.

        Example:
            >>> print(MemoryEstimate(2**30, 0, 0, 3 * 2**20, 0, 2**30 + 3 * 2**20, None,
            ...                      device="cpu:0").describe())  # doctest: +ELLIPSIS
            device memory of the fit per device (estimate, cpu:0):
              state          1.00 GiB  parameters, optimizer state, iterate average, ...
              activations    3.00 MiB  intermediate values of one step of the compiled chunk
              total          1.00 GiB  of an unknown limit
        """
        where = ", ".join(x for x in (self.device, f"split over {self.devices} devices"
                                      if self.devices > 1 else "",
                                      f"{self.lanes} lanes at once per device"
                                      if self.lanes > 1 else "") if x)
        lines = [f"device memory of {what} per device (estimate{', ' + where if where else ''}):"]
        for name in _PARTS:
            b = getattr(self, name)
            if b:
                lines.append(f"  {name:<12} {format_bytes(b):>10}  {_WHAT[name]}")
        if self.limit is None:
            tail = "of an unknown limit"
        else:
            tail = (f"of {format_bytes(self.limit)} ({100 * self.total / self.limit:.0f}%; "
                    f"{self.limit_source})")
        lines.append(f"  {'total':<12} {format_bytes(self.total):>10}  {tail}")
        return "\n".join(lines)


def _abstract(tree):
    """Every array leaf as a ``jax.ShapeDtypeStruct`` (64-bit types as JAX holds them)."""

    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype)
        a = np.asarray(x)
        return jax.ShapeDtypeStruct(a.shape, jax.dtypes.canonicalize_dtype(a.dtype))

    return jax.tree_util.tree_map(leaf, tree)


def _with_rows(tree, rows: int):
    """Every leaf with its leading (row) axis of length ``rows``."""
    return jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct((rows,) + tuple(a.shape[1:]), a.dtype), tree)


def _row_count(tree) -> int:
    leaves = jax.tree_util.tree_leaves(tree)
    return int(leaves[0].shape[0]) if leaves and leaves[0].shape else 0


# ---------------------------------------------------------------------------------------------
# the estimate
_DETECT = "detect"


def estimate_fit_memory(program, data: Any, *, key: Any, fixed: Any = None, mask: Any = None,
                        dtype: Any = None, state: Any = None, host: Any = None, lanes: int = 1,
                        lanes_total: int | None = None, data_axes: Any = None,
                        placement: Placement | None = None,
                        limit: int | None | str = _DETECT) -> MemoryEstimate:
    """Estimate the device memory of a fit per device, compiling nothing.

    Args:
        program: the fit's :class:`vijax.program.Program` (its problem gives the feed, the
            particles, the chunk length and the placement).
        data: the data as the driver holds them before placing them (numpy or device
            arrays, all rows); ``None`` for a stream (``host``). ``fit_many``: all lanes'
            data.
        key: the key ``program.start`` is called with (``fit_many``: one lane's key, or the
            lanes' keys).
        fixed, mask: the other arguments of ``program.start`` (only their shapes matter);
            ``None``: ``(full_dim,)`` of ``dtype`` (default float32) and of bool, as a fresh
            fit (or a resumed one: its state has the shapes of a fresh one) passes them.
        state: a loop state to size instead of tracing the start (a resumed fit; ``key``
            is then its loop key).
        host: a stream's :class:`vijax.stream.HostData`.
        lanes: ``fit_many``: lanes run at once (a batch of ``lanes_per_batch``);
            ``lanes_total`` all lanes (their final states are kept on device); ``data_axes``
            which data leaves are batched over lanes; ``placement`` the mesh the lanes are
            split over. A single fit takes its placement from ``program.problem``.
        limit: the device's memory in bytes (``None``: unknown); ``"detect"`` (default):
            :func:`device_memory_limit` of the fit's first device.

    Returns:
        A :class:`MemoryEstimate`.

    Example:
        >>> import jax, numpy as np, numpyro.distributions as dist, vijax as vj
        >>> from vijax.program import Problem, compile_problem
        >>> from vijax.guides.resolve import resolve_spec
        >>> from vijax.estimators import resolve_estimator
        >>> import optax
        >>> m = vj.Model(lambda z, d: dist.Normal(z["x"], 1.0).log_prob(d["y"]).sum(),
        ...              {"x": vj.Latent()})
        >>> prog = compile_problem(Problem(m.target, resolve_spec("meanfield"),
        ...     resolve_estimator("auto"), 1, optax.adam(0.1), 100))
        >>> data = {"y": np.zeros(1000, np.float32)}
        >>> est = estimate_fit_memory(prog, data, key=jax.random.key(0), dtype=np.float32)
        >>> est.data, est.state > 0, est.total < 2**20
        (4000, True, True)
    """
    problem = program.problem
    feed: Feed | None = problem.feed
    mb: Minibatch | None = feed.minibatch if feed is not None else None
    many = lanes > 1 or lanes_total is not None or data_axes is not None
    if many:
        split = placement
    else:
        split = problem.placement
    d = 1 if split is None else split.size

    # the data the start and the loop see (abstract), and the resident parts
    if host is not None:
        if mb is None:
            raise ValueError("a stream (host=) needs a minibatch feed")
        first = host.batch_shapes(mb.batch_size)
        row = tree_bytes(first) // mb.batch_size
        n = host.n
    else:
        first = _abstract(data)
        n = _row_count(first)
        row = tree_bytes(first) // n if n else 0
    if many:
        lane0 = _lane_slice(first, data_axes)
        start_data = run_data = lane0
    elif split is not None and mb is not None and host is None:
        start_data = run_data = _with_rows(first, padded_rows(n, split))
    else:
        start_data = first
        run_data = () if host is not None else first

    # the loop state
    if state is None:
        k = _abstract(key)
        if many and getattr(k, "ndim", 0) >= 1:
            k = jax.ShapeDtypeStruct((), k.dtype)
        dim = (problem.target.full_dim,)
        fixed = jax.ShapeDtypeStruct(dim, jax.dtypes.canonicalize_dtype(
            np.float32 if dtype is None else dtype)) if fixed is None else _abstract(fixed)
        mask = jax.ShapeDtypeStruct(dim, np.bool_) if mask is None else _abstract(mask)
        out = jax.eval_shape(program.start, k, start_data, fixed, mask)
        state_shapes, loop_key = out[3], out[4]
    else:
        state_shapes, loop_key = _abstract(state), _abstract(key)
    state_bytes = _state_bytes(state_shapes, None if many else split)

    # the chunk program's activations, traced at what one device runs
    acts = _activations(program, state_shapes, run_data, loop_key, host, d)

    # data, batch, stream per device
    in_program = 0
    if many:
        per = -(-lanes // d)
        kept = -(-max(lanes_total or lanes, lanes) // d)
        state_bytes *= kept
        acts *= per
        shared, batched = _split_lanes(first, data_axes)
        data_bytes = tree_bytes(shared) + -(-tree_bytes(batched) // d)
        batch_bytes = tree_bytes(_lane_slice(batched, 0)) * per if data_axes is not None else 0
        streamed = 0
    else:
        if host is not None:
            data_bytes = 0
        elif split is None:
            data_bytes = tree_bytes(first)
        else:
            rows = padded_rows(n, split) if mb is not None else n
            data_bytes = row * (rows // d)
        # the step's batch: gathered (or sliced from the stream) inside the traced step
        in_program = row * (mb.batch_size // d) if mb is not None else 0
        batch_bytes = in_program
        if mb is not None and host is None and split is not None:
            # rows taken from data split by rows: each device picks its own rows into a
            # whole batch (the others zero), reduce-scattered into its share
            batch_bytes = row * (mb.batch_size + mb.batch_size // d)
        streamed = 2 * problem.chunk_len * row * (mb.batch_size // d) if host is not None else 0
    acts = max(acts - in_program, 0)

    device = split.mesh.devices.flat[0] if split is not None else jax.devices()[0]
    if limit == _DETECT:
        limit_bytes, source = device_memory_limit(device, d)
    else:
        limit_bytes, source = (None if limit is None else int(limit)), "given"
    total = state_bytes + data_bytes + batch_bytes + acts + streamed
    return MemoryEstimate(int(state_bytes), int(data_bytes), int(batch_bytes), int(acts),
                          int(streamed), int(total), limit_bytes, d, device_name(device), source,
                          -(-lanes // d) if many else 1, many)


def _state_bytes(shapes, placement: Placement | None) -> int:
    """Bytes per device of a loop state: the per-row tables split over the placement's
    devices, the rest whole on each."""
    if placement is None:
        return tree_bytes(shapes)
    shardings = state_shardings(shapes, placement)
    total = 0
    for leaf, sharding in zip(jax.tree_util.tree_leaves(shapes),
                              jax.tree_util.tree_leaves(shardings), strict=True):
        b = nbytes(leaf)
        total += -(-b // placement.size) if sharding == placement.rows else b
    return total


def _activations(program, state, data, loop_key, host, devices: int) -> int:
    """Peak live bytes of the chunk program (:func:`peak_live_bytes`), traced at one
    device's share of the rows."""
    problem = program.problem
    if problem.placement is not None:
        # what one device runs: the unplaced program at its share of the rows and the batch
        feed = problem.feed
        if feed is not None and feed.minibatch is not None:
            mb = feed.minibatch
            feed = feed._replace(minibatch=mb._replace(batch_size=max(mb.batch_size // devices,
                                                                      1)))
        local = data if data == () else _with_rows(data, max(_row_count(data) // devices, 1))
        runner = make_chunk_runner(program.objective, problem.optimizer, problem.chunk_len,
                                   problem.rule, feed, None)
        try:
            return peak_live_bytes(runner.trace(*_chunk_args(
                problem.chunk_len, feed, _local_state(state, problem.placement), local,
                loop_key, host)).jaxpr)
        except (TypeError, ValueError):
            # an objective whose shapes are fixed at the global batch: its program at
            # global shapes, an upper bound
            return peak_live_bytes(jax.make_jaxpr(program.run_chunk.fn)(*_chunk_args(
                problem.chunk_len, problem.feed, state, data, loop_key, host)))
    # the trace is cached: the chunk's first call reuses it
    return peak_live_bytes(program.run_chunk.trace(*_chunk_args(
        problem.chunk_len, problem.feed, state, data, loop_key, host)).jaxpr)


def _local_state(state, placement: Placement):
    """One device's share of a loop state: the per-row tables split by rows."""
    rows = placement.rows
    return jax.tree_util.tree_map(
        lambda a, sh: jax.ShapeDtypeStruct((-(-a.shape[0] // placement.size),)
                                           + tuple(a.shape[1:]), a.dtype) if sh == rows else a,
        state, state_shardings(state, placement))


def _chunk_args(chunk_len: int, feed, state, data, loop_key, host) -> tuple:
    """Abstract arguments of a chunk runner (:func:`vijax.loop.make_chunk_runner`), as the
    drivers pass them (:func:`vijax.driver.run_chunks`)."""
    i32 = jax.ShapeDtypeStruct((), jnp.int32)
    feed_args = None
    if feed is not None:
        feed_args = {"n": i32}
        if host is not None:
            xs = host.batch_shapes(feed.minibatch.batch_size)
            feed_args["xs"] = jax.tree_util.tree_map(
                lambda a: jax.ShapeDtypeStruct((chunk_len,) + a.shape, a.dtype), xs)
        else:
            feed_args["seed"] = jax.ShapeDtypeStruct((), jnp.uint32)
    return state, data, loop_key, i32, i32, i32, i32, feed_args


def _lane_slice(tree, axes):
    """One lane's data: the batched leaves (``axes`` 0) without their lane axis."""
    if axes is None:
        return tree

    def drop(a):
        return jax.ShapeDtypeStruct(tuple(a.shape[1:]), a.dtype)

    if axes == 0:
        return jax.tree_util.tree_map(drop, tree)
    return jax.tree_util.tree_map(
        lambda a, sub: sub if a is None else jax.tree_util.tree_map(drop, sub), axes, tree,
        is_leaf=lambda x: x is None)


def _split_lanes(tree, axes) -> tuple[list, list]:
    """``(shared leaves, batched leaves)`` of ``fit_many``'s data."""
    if axes is None:
        return jax.tree_util.tree_leaves(tree), []
    if axes == 0:
        return [], jax.tree_util.tree_leaves(tree)
    shared, batched = [], []
    jax.tree_util.tree_map(
        lambda a, sub: (shared if a is None else batched).extend(
            jax.tree_util.tree_leaves(sub)), axes, tree, is_leaf=lambda x: x is None)
    return shared, batched


# ---------------------------------------------------------------------------------------------
# the check
def check_fit_memory(estimate: MemoryEstimate, *, what: str = "vj.fit",
                     margin: float = MARGIN, file: TextIO | None = None) -> None:
    """Print ``estimate`` to stderr when it is large, and raise when it cannot fit.

    Large: a total over 1 GiB (``LARGE_BYTES``) or over a quarter of the device's memory.
    Cannot fit: a total over ``margin`` (90%) of the device's memory; the error names the
    largest parts and the options that shrink them. ``VIJAX_MEMORY_CHECK=0`` turns the check
    off, ``=warn`` prints without raising.

    Raises:
        DeviceMemoryError: the estimate exceeds ``margin`` of ``estimate.limit``.

    Example:
        >>> est = MemoryEstimate(2**20, 0, 0, 2**20, 0, 2**21, 2**40)
        >>> check_fit_memory(est)  # 2 MiB of 1 TiB: nothing printed, nothing raised
    """
    mode = os.environ.get(ENV, "1").strip().lower()
    if mode in ("0", "off", "false", "no"):
        return
    limit = estimate.limit
    large = estimate.total > LARGE_BYTES or (
        limit is not None and estimate.total > LARGE_FRACTION * limit)
    over = limit is not None and estimate.total > margin * limit
    if large and not over:
        print(estimate.describe(what), file=sys.stderr if file is None else file, flush=True)
    if over and mode == "warn":
        print(estimate.describe(what), file=sys.stderr if file is None else file, flush=True)
        return
    if over:
        raise DeviceMemoryError(_advice(estimate, what, margin))


_ADVICE = {
    "data": "split the data's rows over devices (mesh=jax.make_mesh((n,), ('data',))) or "
            "keep them in host memory (stream=True with batch_size=)",
    "activations": "a smaller batch_size=, fewer num_particles=, or mesh= to split the rows "
                   "over devices",
    "batch": "a smaller batch_size=, or mesh= to split each batch over devices",
    "streamed": "a smaller chunk_size= or batch_size=",
    "state": "a smaller guide (guide='meanfield' or 'lowrank' rather than 'fullrank'), "
             "float32 (dtype=) or a smaller model",
}
_ADVICE_LANES = {  # fit_many
    "state": "fewer lanes (every lane's final state stays on device), or mesh= to split the "
             "lanes over devices",
    "activations": "lanes_per_batch= (fewer lanes at once), fewer num_particles=, or mesh= "
                   "to split the lanes over devices",
    "data": "mesh= to split the lanes' data over devices",
    "batch": "lanes_per_batch= (fewer lanes at once)",
}


def _advice(est: MemoryEstimate, what: str, margin: float) -> str:
    parts = est.largest()[:2]
    names = " and ".join(f"{p} ({format_bytes(b)})" for p, b in parts)
    table = _ADVICE_LANES if est.many else _ADVICE
    tips = "; ".join(f"{p}: {table.get(p, _ADVICE[p])}" for p, _ in parts)
    return (f"{what} needs an estimated {format_bytes(est.total)} of device memory per "
            f"device, more than {100 * margin:.0f}% of the {format_bytes(est.limit)} "
            f"available ({est.limit_source}); the largest parts are {names}. To shrink them, "
            f"{tips}. (Set {ENV}=0 to run anyway.)\n{est.describe(what)}")
