"""Keeping a long-lived process under the kernel's limit on memory mappings.

Every compiled XLA CPU program keeps its machine code in memory mappings (about 900 per fit of
a small model: the fit's start, loop and checks); Linux refuses new mappings past
``vm.max_map_count`` (65,530 by default), and LLVM then fails with "Cannot allocate memory".
A process that fits ~70 freshly built models (a loop over datasets or splits) reached it. Before
each new compile, :func:`relieve` drops JAX's compiled programs when the process holds more than
half the limit: later calls recompile, nothing is lost.
"""

from __future__ import annotations

import gc
import os

import jax

__all__ = ["maps_in_use", "max_maps", "relieve", "THRESHOLD"]

THRESHOLD = 0.5
"""Fraction of ``vm.max_map_count`` above which compiled programs are dropped."""


def max_maps() -> int | None:
    """The kernel's limit on this process's memory mappings (``None`` off Linux)."""
    try:
        with open("/proc/sys/vm/max_map_count") as f:
            return int(f.read())
    except (OSError, ValueError):
        return None


def maps_in_use() -> int | None:
    """This process's memory mappings (``None`` off Linux)."""
    try:
        with open(f"/proc/{os.getpid()}/maps", "rb") as f:
            return sum(1 for _ in f)
    except OSError:
        return None


def relieve() -> bool:
    """Drop JAX's compiled programs (``jax.clear_caches``) when the process holds more than
    :data:`THRESHOLD` of its mapping limit; ``True`` when it did."""
    limit, used = max_maps(), None
    if limit is None:
        return False
    used = maps_in_use()
    if used is None or used <= THRESHOLD * limit:
        return False
    jax.clear_caches()
    gc.collect()
    return True
