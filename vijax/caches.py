"""Dropping the compiled programs vijax and JAX hold, for long-lived processes."""

from __future__ import annotations

import gc

import jax

from vijax import (
    curvature,
    driver,
    loop,
    many,
    precondition,
    program,
    result,
    start,
    stream,
    trust,
)

__all__ = ["clear_caches"]


def clear_caches() -> None:
    """Drop every compiled program vijax and JAX hold (the next fit compiles again): for
    long-lived processes that fit many different models (each compiled program keeps its
    machine code mapped in memory). vijax also drops JAX's compiled programs by itself before
    a new compile when the process holds more than half of Linux's limit on memory mappings
    (:mod:`vijax.memory_maps`): about 70 fits of freshly built models had reached it."""
    for module in (start, program, driver, trust, loop, many, precondition, result,
                   curvature, stream):
        for value in vars(module).values():
            if hasattr(value, "cache_clear"):
                value.cache_clear()
    jax.clear_caches()
    gc.collect()
