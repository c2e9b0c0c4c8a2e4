"""The stopping rule, evaluated on device inside the compiled loop.

Steps are grouped in consecutive blocks of ``window`` steps. At the end of block ``b`` the
mean ``m_b`` and variance ``v_b`` of its (finite) losses are compared with those of block
``b - 1``: the block *stalls* when the loss did not decrease significantly,

    m_{b-1} - m_b  <  z * sqrt((v_{b-1} + v_b) / window)  +  rtol * |m_b|,

i.e. the improvement is within ``z`` standard errors of zero (Monte Carlo noise of the loss
estimates) or below a relative tolerance. The fit has converged after ``patience`` consecutive
stalled blocks, and never within its first ``min_steps`` steps (nor in the first compiled
chunk). Like Stan's ADVI rule it compares windowed means of the objective, but the threshold is
the measured noise rather than a fixed relative change, so it neither stops on noise nor waits
forever when the loss is flat up to noise.

Known limit: a fit that still improves, but by less per block than the Monte Carlo noise of
the loss, looks converged (slow drift along a funnel's neck); a longer ``window`` (the noise of
a block mean falls as ``1/sqrt(window)`` while the drift grows with it) or ``convergence=None``
lets it go on.

At convergence the returned parameters are the average of the iterates over the last two
blocks (both at the optimum up to noise); without convergence, the tail average of ``fit``.
No host synchronisation per step: the host reads the ``converged`` flag once per chunk, and
steps after convergence inside a chunk change nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["Convergence", "ConvState", "init_conv_state", "update_conv_state",
           "resolve_convergence"]


@dataclasses.dataclass(frozen=True)
class Convergence:
    """Configuration of the stopping rule (see the module docstring).

    Args:
        window: steps per block (>= 10).
        patience: consecutive stalled blocks needed to stop (>= 1).
        z: noise threshold in standard errors (> 0).
        rtol: relative tolerance on the improvement of the block mean (>= 0).
        min_steps: never stop before this many steps (>= 0).

    Example:
        >>> import vijax as vj
        >>> vj.Convergence(window=100, patience=3).window
        100
    """

    window: int = 200
    patience: int = 2
    z: float = 2.0
    rtol: float = 1e-4
    min_steps: int = 0

    def __post_init__(self) -> None:
        for name, low in (("window", 10), ("patience", 1), ("min_steps", 0)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"Convergence {name} must be an int >= {low}, got {v!r}")
        for name, positive in (("z", True), ("rtol", False)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not (
                    (v > 0 if positive else v >= 0) and v < float("inf")):
                raise ValueError(f"Convergence {name} must be a finite number "
                                 f"{'> 0' if positive else '>= 0'}, got {v!r}")
            object.__setattr__(self, name, float(v))


def resolve_convergence(convergence: Any) -> Convergence | None:
    """``"auto"`` -> ``Convergence()``; ``None`` -> no rule; an object is checked."""
    if convergence is None:
        return None
    if isinstance(convergence, str) and convergence == "auto":
        return Convergence()
    if isinstance(convergence, Convergence):
        return convergence
    raise TypeError(f"convergence must be 'auto', None or a vj.Convergence(...), got "
                    f"{convergence!r}")


class ConvState(NamedTuple):
    """Per-block accumulators and the running parameter averages of the last two blocks."""

    total: jax.Array  # sum of finite losses in the current block
    total_sq: jax.Array  # sum of their squares
    count: jax.Array  # int32: finite losses in the current block
    in_block: jax.Array  # int32: steps taken in the current block
    prev_mean: jax.Array
    prev_var: jax.Array
    has_prev: jax.Array  # bool
    streak: jax.Array  # int32: consecutive stalled blocks
    converged: jax.Array  # bool
    block_avg: Any  # mean of the iterates in the current block
    prev_block_avg: Any  # mean of the iterates in the previous block


def init_conv_state(params, dtype) -> ConvState:
    zero_f, zero_i = jnp.zeros((), dtype), jnp.zeros((), jnp.int32)
    return ConvState(zero_f, zero_f, zero_i, zero_i, zero_f, zero_f, jnp.array(False), zero_i,
                     jnp.array(False), params, params)


def update_conv_state(rule: Convergence, c: ConvState, loss, params, step, first_chunk_end,
                      active) -> ConvState:
    """One step's update (selects only, no branches); ``step`` is the step just taken."""
    finite = jnp.isfinite(loss) & active
    x = jnp.where(finite, loss, 0.0)
    total, total_sq = c.total + x, c.total_sq + x * x
    count = c.count + finite.astype(jnp.int32)
    in_block = c.in_block + active.astype(jnp.int32)
    n_in = in_block.astype(loss.dtype)
    block_avg = jax.tree_util.tree_map(
        lambda a, p: jnp.where(active, a + (p - a) / jnp.maximum(n_in, 1.0), a),
        c.block_avg, params)

    end = active & (in_block == rule.window)
    n = jnp.maximum(count, 1).astype(loss.dtype)
    mean = total / n
    var = jnp.maximum(total_sq / n - mean * mean, 0.0) * n / jnp.maximum(n - 1.0, 1.0)
    se = jnp.sqrt((c.prev_var + var) / rule.window)
    stalled = c.has_prev & (count > 1) & (
        c.prev_mean - mean < rule.z * se + rule.rtol * jnp.abs(mean))
    streak = jnp.where(end, jnp.where(stalled, c.streak + 1, 0), c.streak)
    may_stop = (step + 1 >= rule.min_steps) & (step + 1 > first_chunk_end)
    converged = c.converged | (end & (streak >= rule.patience) & may_stop)

    def at_end(new, old):
        return jnp.where(end, new, old)

    zero = jnp.zeros((), loss.dtype)
    return ConvState(
        total=at_end(zero, total), total_sq=at_end(zero, total_sq),
        count=at_end(jnp.zeros((), jnp.int32), count),
        in_block=at_end(jnp.zeros((), jnp.int32), in_block),
        prev_mean=at_end(mean, c.prev_mean), prev_var=at_end(var, c.prev_var),
        has_prev=c.has_prev | end, streak=streak, converged=converged,
        # at a block's end its average becomes the previous block's (unless the fit stops
        # here: then both are kept for converged_params); the next block's average restarts
        # from its first iterate (n = 1)
        block_avg=block_avg,
        prev_block_avg=jax.tree_util.tree_map(
            lambda new, old: jnp.where(end & ~converged, new, old), block_avg,
            c.prev_block_avg))


def converged_params(c: ConvState):
    """The average over the last two complete blocks."""
    return jax.tree_util.tree_map(lambda a, b: 0.5 * (a + b), c.block_avg, c.prev_block_avg)
