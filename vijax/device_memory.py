"""Sizes of values on a device, the peak of live values of a traced program, and a device's
memory: the measuring tools of :mod:`vijax.memory`'s estimate."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.extend.core as jcore
import numpy as np

__all__ = ["format_bytes", "nbytes", "tree_bytes", "peak_live_bytes", "device_memory_limit",
           "device_name"]

_GiB, _MiB, _KiB = 1 << 30, 1 << 20, 1 << 10


def format_bytes(n: int) -> str:
    """``n`` bytes in B, KiB, MiB or GiB (3 significant digits)."""
    for unit, size in (("GiB", _GiB), ("MiB", _MiB), ("KiB", _KiB)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n} B"


# ---------------------------------------------------------------------------------------------
# sizes
def _itemsize(dtype) -> int:
    if jax.dtypes.issubdtype(dtype, jax.dtypes.extended):  # PRNG keys: key<fry> is 8 bytes
        return int(getattr(dtype, "itemsize", 8))
    return int(np.dtype(jax.dtypes.canonicalize_dtype(dtype)).itemsize)


def nbytes(x) -> int:
    """Bytes of an array (or abstract value) on device (64-bit types as JAX holds them)."""
    shape = getattr(x, "shape", None)
    dtype = getattr(x, "dtype", None)
    if shape is None or dtype is None:
        return 0
    return math.prod(shape) * _itemsize(dtype)


def tree_bytes(tree) -> int:
    return sum(nbytes(x) for x in jax.tree_util.tree_leaves(tree))


# ---------------------------------------------------------------------------------------------
# activations: the peak of live values of a jaxpr
def peak_live_bytes(jaxpr) -> int:
    """Peak bytes of the values a jaxpr computes that are alive at one time (its inputs and
    constants excluded).

    A value lives from its defining equation to its last use (to the end if it is an
    output). An equation holding nested jaxprs (``pjit``, ``cond`` branches, ``remat``)
    adds the largest of their own peaks while it runs, its outputs among them. A loop
    (``scan``, ``while``) holds its carried values (its outputs) for as long as it runs, and
    its body's values on top of them: its peak is ``outputs + body peak``, the outputs taking
    over the buffers of operands that die there (a nested loop carries its enclosing body's
    buffers; a program's own arguments are never taken over: they are not donated).

    Args:
        jaxpr: a ``ClosedJaxpr`` or ``Jaxpr`` (``jax.make_jaxpr(f)(*args)``).

    Returns:
        Bytes (int).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> f = lambda x: jnp.sum(jnp.sin(x) * 2.0)  # sin(x), its double, the sum
        >>> peak_live_bytes(jax.make_jaxpr(f)(jnp.ones(1000)))  # sin(x) and 2 sin(x)
        8000
    """
    return _peak(getattr(jaxpr, "jaxpr", jaxpr), {}, False)


_LOOPS = ("scan", "while")


def _peak(jaxpr, seen: dict, in_loop: bool) -> int:
    """:func:`peak_live_bytes` of ``jaxpr``; ``in_loop``: it is a loop's body, whose inputs
    are the loop's buffers (a loop inside it may carry its values in them)."""
    key = (id(jaxpr), in_loop)
    if key in seen:
        return seen[key]
    last: dict = {}  # value -> index of the equation that uses it last
    for i, eqn in enumerate(jaxpr.eqns):
        for v in eqn.invars:
            if isinstance(v, jcore.Var):
                last[v] = i
    for v in jaxpr.outvars:
        if isinstance(v, jcore.Var):
            last[v] = len(jaxpr.eqns)
    buffers = set(jaxpr.invars) if in_loop else set()
    held: dict = {}  # live values defined here -> bytes
    live = peak = 0
    for i, eqn in enumerate(jaxpr.eqns):
        outs = [(v, nbytes(v.aval)) for v in eqn.outvars if not isinstance(v, jcore.DropVar)]
        out = sum(b for _, b in outs)
        loop = eqn.primitive.name in _LOOPS
        inner = max((_peak(getattr(j, "jaxpr", j), seen, loop)
                     for j in jcore.jaxprs_in_params(eqn.params)), default=0)
        dying = {v for v in eqn.invars if isinstance(v, jcore.Var) and last.get(v) == i}
        if loop:
            reused = sum(nbytes(v.aval) for v in dying if v in held or v in buffers)
            peak = max(peak, live + inner + max(out - reused, 0))
        else:
            peak = max(peak, live + max(inner, out))
        for v, b in outs:
            if last.get(v, -1) > i:
                held[v] = b
                live += b
        for v in dying:
            if v in held:
                live -= held.pop(v)
    seen[key] = peak
    return peak


# ---------------------------------------------------------------------------------------------
# the device's memory
def device_memory_limit(device: Any = None, sharing: int = 1) -> tuple[int | None, str]:
    """``(bytes, source)``: the memory of ``device`` (default: JAX's first device).

    GPU and TPU: ``bytes_limit`` of ``device.memory_stats()``. CPU: the host's
    ``MemAvailable`` (``/proc/meminfo``) divided by ``sharing``, the CPU devices of one fit
    that share it. ``(None, reason)`` when neither is known.
    """
    device = jax.devices()[0] if device is None else device
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001 (a backend without memory stats)
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"]), f"bytes_limit of {device_name(device)}"
    if device.platform == "cpu":
        avail = _mem_available()
        if avail is not None:
            share = max(int(sharing), 1)
            per = f" / {share} devices" if share > 1 else ""
            return avail // share, f"host MemAvailable{per}"
    return None, "unknown"


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def device_name(device) -> str:
    return f"{device.platform}:{device.id}"
