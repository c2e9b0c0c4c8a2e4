"""The stopping rule, evaluated on device inside the compiled loop.

"Converged" must mean that the returned estimate has stopped moving *in units of the
posterior's own scale*, not that the loss changes less per block than its Monte Carlo noise
(slow drift along an ill-conditioned valley does exactly that). Steps are grouped in
consecutive blocks of ``window`` steps, aligned to the global step count (so a resumed fit
sees the same blocks as an uninterrupted one). At the end of block ``b`` three things are
checked:

1. **Gradient signal-to-noise** (the main criterion). Over the last two blocks (``n`` steps)
   every parameter element ``i`` has a mean gradient ``gbar_i`` and a per-step standard
   deviation ``s_i``; ``r_i = |gbar_i| / s_i``. For the reparameterised ELBO of a Gaussian
   family near the optimum, the mean gradient of a location is ``H (m_avg - m*)`` and its
   per-step noise ``~ sqrt(diag H)``, so in coordinates whitened by the posterior's curvature
   (vijax's default, :mod:`vijax.precondition`) ``r_i`` *is* the distance of the blocks'
   iterate average (the returned estimate) from the optimum in posterior standard deviations.
   Because the mean gradient is taken at the iterates the estimate averages, this is a test of
   the estimate itself, not of the last iterate (Dhaka et al. 2020 test the iterates with
   R-hat and the average with its Monte Carlo standard error; this combines both in one
   statistic). The block passes when ``max_i r_i <= tol + sqrt(2 log(2 P) / n)``: ``tol``
   (default 0.1 sd) plus the level the maximum of ``P`` noise-only ratios reaches (a max over
   many weights of a flow would otherwise never pass). Parameters with no gradient (held
   fixed) are ignored.
2. **The loss has stalled**: ``m_{b-k} - m_b < z * sqrt((v_{b-k} + v_b) / window) + rtol |m_b|``
   (the block means of the loss, their variances ``v``) both for the previous block
   (``k = 1``) and for the block ``LAG`` = 4 blocks back: a flow whose loss still falls by
   0.09 nats a block, within one block's noise, had fallen 0.36 over four, and stopping it
   there left a banana's sd at 0.33 of the truth. So no fit stops before ``LAG + 1`` blocks.
3. **The loss is not rising**: ``m_b <= best + z * se + rtol |m_b|`` with ``best`` the lowest
   block mean so far. A diverging optimizer (a negative or huge step size) raises the loss;
   that is never convergence.

The fit has converged after ``patience`` consecutive blocks passing all three, never within
its first ``min_steps`` steps nor in its first compiled chunk. The returned parameters are
then the average of the iterates over the last two blocks; blocks are aligned to the global
step count, so ``k`` steps resumed for ``m`` more return what ``k + m`` uninterrupted steps
return.
``ConvState`` keeps the last block's figures (``grad_ratio``, ``grad_threshold``,
``loss_drop``, ``loss_rise``) for the diagnostics, which state which criterion held or failed.

No host synchronisation per step: the host reads the ``converged`` flag once per chunk, and
steps after convergence inside a chunk change nothing.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

LAG = 4
"""Blocks back for the second loss comparison of criterion 2."""

__all__ = ["Convergence", "ConvergenceWarning", "ConvState", "init_conv_state", "update_conv_state",
           "enter_chunk", "leave_chunk", "resolve_convergence", "auto_window", "describe_stop",
           "block_params", "block_params_batched"]


class ConvergenceWarning(UserWarning):
    """A fit whose result should not be trusted as it is: it did not converge, PSIS says q
    is unreliable, or steps were skipped. The message says which and what to do."""


@dataclasses.dataclass(frozen=True)
class Convergence:
    """Configuration of the stopping rule (see the module docstring).

    Args:
        window: steps per block (>= 10), or ``None``: chosen from the number ``P`` of
            parameter elements (:func:`auto_window`) so that two blocks resolve ``tol``.
        patience: consecutive passing blocks needed to stop (>= 1).
        z: loss-noise threshold in standard errors (> 0).
        rtol: relative tolerance on the change of the block mean of the loss (>= 0).
        tol: largest accepted distance of the estimate from the optimum, in posterior
            standard deviations as measured by the gradient signal-to-noise ratio (> 0).
        min_steps: never stop before this many steps (>= 0).
        gradient_test: apply criterion 1; ``fit`` turns it off for point masses (MAP), whose
            gradient has no Monte Carlo noise to measure a distance against (their iterates
            converge with a gradient of one sign).
        noise_ratio: ``r``, the extra gradient variance of minibatches relative to the
            Monte Carlo variance of the draws (``fit`` sets ``r = N / B`` for B of N
            observations: in whitened coordinates a minibatch gradient has variance about
            ``N / B`` per coordinate). The gradient test's tolerance becomes
            ``tol / sqrt(1 + r)`` (the per-step sd is inflated by ``sqrt(1 + r)``) and the
            automatic window grows by ``1 + r`` to keep the test's power: certifying an
            estimate within ``tol`` posterior sds takes about ``(1 + r) / tol^2`` steps,
            i.e. ``1 / tol^2`` epochs.

    Example:
        >>> import vijax as vj
        >>> vj.Convergence(window=100, patience=3).window
        100
    """

    window: int | None = None
    patience: int = 2
    z: float = 2.0
    rtol: float = 1e-4
    tol: float = 0.1
    min_steps: int = 0
    gradient_test: bool = True
    noise_ratio: float = 0.0

    def __post_init__(self) -> None:
        for name, low in (("window", 10), ("patience", 1), ("min_steps", 0)):
            v = getattr(self, name)
            if name == "window" and v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < low:
                raise ValueError(f"Convergence {name} must be an int >= {low}, got {v!r}")
        for name, positive in (("z", True), ("rtol", False), ("tol", True),
                               ("noise_ratio", False)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not (
                    (v > 0 if positive else v >= 0) and v < float("inf")):
                raise ValueError(f"Convergence {name} must be a finite number "
                                 f"{'> 0' if positive else '>= 0'}, got {v!r}")
            object.__setattr__(self, name, float(v))

    def sized(self, n_params: int, point_mass: bool = False,
              noise_ratio: float = 0.0) -> Convergence:
        """This rule with ``window=None`` replaced by :func:`auto_window` of ``n_params``
        (times ``1 + noise_ratio``), without the gradient test for a point mass, and with
        the minibatch ``noise_ratio`` (unless the rule sets its own)."""
        rule = self if not point_mass else dataclasses.replace(self, gradient_test=False)
        if noise_ratio and not rule.noise_ratio:
            rule = dataclasses.replace(rule, noise_ratio=float(noise_ratio))
        if rule.window is not None:
            return rule
        w = auto_window(n_params, rule.tol)
        if rule.noise_ratio:
            w = min(2**30, 50 * math.ceil(w * (1.0 + rule.noise_ratio) / 50))
        return dataclasses.replace(rule, window=w)


def auto_window(n_params: int, tol: float = 0.1) -> int:
    """Steps per block so that the noise level of the gradient test over two blocks,
    ``sqrt(2 log(2 P) / (2 window))``, is at most ``tol``: ``log(2 P) / tol^2`` rounded up to
    a multiple of 50, between 200 and 1,000 (P = 10: 300; P = 1,000: 800).

    Example:
        >>> auto_window(10)
        300
    """
    w = math.log(2 * max(int(n_params), 1)) / tol**2
    return int(min(1000, max(200, 50 * math.ceil(w / 50))))


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
    """Per-block accumulators, the last two blocks' parameter averages and gradient sums,
    and the last block's figures (for the diagnostics)."""

    total: jax.Array  # sum of finite losses in the current block
    total_sq: jax.Array  # sum of their squares
    count: jax.Array  # int32: finite losses in the current block
    in_block: jax.Array  # int32: steps taken in the current block
    prev_mean: jax.Array
    prev_var: jax.Array
    has_prev: jax.Array  # bool
    streak: jax.Array  # int32: consecutive passing blocks
    converged: jax.Array  # bool
    block_avg: Any  # mean of the iterates in the current block
    last_avg: Any  # mean of the iterates in the last complete block
    prev_avg: Any  # ... and in the complete block before it
    g_sum: Any = ()  # sum of the finite steps' gradients in the current block
    g_sq: Any = ()  # sum of their squares
    prev_g_sum: Any = ()
    prev_g_sq: Any = ()
    prev_count: Any = None  # int32: finite steps in the previous block
    best_mean: Any = None  # lowest block mean of the loss so far, and its variance
    best_var: Any = None
    n_blocks: Any = None  # int32: complete blocks
    grad_ratio: Any = None  # last block's max |mean gradient| / sd
    grad_threshold: Any = None  # and the threshold it was compared with
    loss_drop: Any = None  # last block: previous mean - mean, and the noise threshold
    loss_noise: Any = None
    loss_rise: Any = None  # last block: mean - best (> loss_noise: rising)
    hist_mean: Any = None  # (LAG,) block means of the loss, ring buffer by n_blocks % LAG
    hist_var: Any = None


def init_conv_state(params, dtype) -> ConvState:
    zero_f, zero_i = jnp.zeros((), dtype), jnp.zeros((), jnp.int32)
    nan = jnp.full((), jnp.nan, dtype)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    return ConvState(zero_f, zero_f, zero_i, zero_i, zero_f, zero_f, jnp.array(False), zero_i,
                     jnp.array(False), params, params, params, zeros, zeros, zeros, zeros,
                     zero_i,
                     jnp.full((), jnp.inf, dtype), zero_f, zero_i, nan, nan, nan, nan, nan,
                     jnp.zeros((LAG,), dtype), jnp.zeros((LAG,), dtype))


def _gradient_test(c: ConvState, g_sum, g_sq, count, dtype):
    """``(max ratio, threshold)`` over the current and the previous block."""
    n = (count + c.prev_count).astype(dtype)
    n_safe = jnp.maximum(n, 2.0)
    leaves = []
    n_free = jnp.zeros((), dtype)
    for s, q, ps, pq in zip(*(jax.tree_util.tree_leaves(t) for t in
                                (g_sum, g_sq, c.prev_g_sum, c.prev_g_sq)), strict=True):
        mean = (s + ps) / n_safe
        var = jnp.maximum((q + pq) / n_safe - mean * mean, 0.0) * n_safe / (n_safe - 1.0)
        free = var > 0
        ratio = jnp.where(free, jnp.abs(mean) / jnp.sqrt(jnp.where(free, var, 1.0)), 0.0)
        # a parameter whose gradient is constant and non-zero is not at an optimum
        ratio = jnp.where(~free & (mean != 0), jnp.inf, ratio)
        leaves.append(jnp.max(ratio, initial=0.0))
        n_free = n_free + jnp.sum(free).astype(dtype)
    worst = jnp.max(jnp.stack(leaves)) if leaves else jnp.zeros((), dtype)
    return worst, jnp.sqrt(2.0 * jnp.log(2.0 * jnp.maximum(n_free, 1.0)) / n_safe)


def enter_chunk(c: ConvState) -> ConvState:
    """``c`` in the layout :func:`update_conv_state` works on inside a compiled chunk, where a
    block's end moves nothing: ``last_avg`` and ``prev_avg`` hold the averages of the blocks
    of even and odd index (a block writes its own slot), and a block that has just ended
    keeps its sums and ``in_block == window`` until the next block's first step restarts them.
    :func:`leave_chunk` is the inverse (both once per chunk)."""
    last_avg, prev_avg = _slots(c)
    return c._replace(last_avg=last_avg, prev_avg=prev_avg)


def leave_chunk(c: ConvState, rule: Convergence) -> ConvState:
    """The :class:`ConvState` of a chunk's final state in :func:`enter_chunk`'s layout."""
    ended = c.in_block == rule.window

    def restarted(x):
        return jax.tree_util.tree_map(lambda v: jnp.where(ended, jnp.zeros_like(v), v), x)

    last, prev = _slots(c)  # the same selects map slots back to (last, previous)
    return c._replace(last_avg=last, prev_avg=prev, total=restarted(c.total),
                      total_sq=restarted(c.total_sq), count=restarted(c.count),
                      in_block=restarted(c.in_block), g_sum=restarted(c.g_sum),
                      g_sq=restarted(c.g_sq))


def _slots(c: ConvState):
    """``(last_avg, prev_avg)`` exchanged when the last complete block's index
    (``n_blocks - 1``) is odd: maps (last, previous) to (even slot, odd slot) and back."""
    swap = c.n_blocks % 2 == 0

    def pick(a, b):
        return jax.tree_util.tree_map(lambda x, y: jnp.where(swap, y, x), a, b)

    return pick(c.last_avg, c.prev_avg), pick(c.prev_avg, c.last_avg)


_BLOCK_FIELDS = ("prev_mean", "prev_var", "has_prev", "streak", "converged", "last_avg",
                 "prev_avg", "prev_g_sum", "prev_g_sq", "prev_count", "best_mean", "best_var",
                 "n_blocks", "grad_ratio", "grad_threshold", "loss_drop", "loss_noise",
                 "loss_rise", "hist_mean", "hist_var")
"""The fields of :class:`ConvState` that change only at a block's end."""


def _close_block(rule: Convergence, c: ConvState, step, first_chunk_end, ratio,
                 floor) -> tuple:
    """The :data:`_BLOCK_FIELDS` once the block whose sums ``c`` holds (this step included)
    is complete: its figures, the three criteria (``ratio`` and ``floor`` from
    :func:`_gradient_test`), the stop decision."""
    dtype = c.total.dtype
    n = jnp.maximum(c.count, 1).astype(dtype)
    mean = c.total / n
    var = jnp.maximum(c.total_sq / n - mean * mean, 0.0) * n / jnp.maximum(n - 1.0, 1.0)
    se = jnp.sqrt((c.prev_var + var) / rule.window)
    noise = rule.z * se + rule.rtol * jnp.abs(mean)
    drop = c.prev_mean - mean
    slot = c.n_blocks % LAG
    old_mean, old_var = c.hist_mean[slot], c.hist_var[slot]
    old_noise = rule.z * jnp.sqrt((old_var + var) / rule.window) + rule.rtol * jnp.abs(mean)
    # (so no fit stops before LAG + 1 blocks)
    long_stalled = (c.n_blocks >= LAG) & (old_mean - mean < old_noise)
    stalled = c.has_prev & (c.count > 1) & (drop < noise) & long_stalled
    rise = mean - c.best_mean
    not_rising = rise <= rule.z * jnp.sqrt((c.best_var + var) / rule.window) \
        + rule.rtol * jnp.abs(mean)
    threshold = (rule.tol / math.sqrt(1.0 + rule.noise_ratio) if rule.noise_ratio
                 else rule.tol) + floor
    small_gradient = c.has_prev & ((ratio <= threshold) | (not rule.gradient_test))
    passed = stalled & not_rising & small_gradient
    streak = jnp.where(passed, c.streak + 1, 0)
    may_stop = (step + 1 >= rule.min_steps) & (step + 1 > first_chunk_end)
    better = (c.count > 1) & (mean < c.best_mean)
    odd = c.n_blocks % 2 == 1  # this block's index: it writes its own slot

    def own_slot(mine, slot_avg):
        return jax.tree_util.tree_map(lambda a, b: jnp.where(mine, a, b), c.block_avg,
                                      slot_avg)

    new = dict(
        prev_mean=mean, prev_var=var, has_prev=jnp.ones_like(c.has_prev), streak=streak,
        converged=c.converged | ((streak >= rule.patience) & may_stop),
        last_avg=own_slot(~odd, c.last_avg), prev_avg=own_slot(odd, c.prev_avg),
        prev_g_sum=c.g_sum, prev_g_sq=c.g_sq, prev_count=c.count,
        best_mean=jnp.where(better, mean, c.best_mean),
        best_var=jnp.where(better, var, c.best_var), n_blocks=c.n_blocks + 1,
        grad_ratio=jnp.where(c.has_prev, ratio, jnp.nan), grad_threshold=threshold,
        loss_drop=jnp.where(c.has_prev, drop, jnp.nan), loss_noise=noise, loss_rise=rise,
        hist_mean=c.hist_mean.at[slot].set(mean), hist_var=c.hist_var.at[slot].set(var))
    return tuple(new[f] for f in _BLOCK_FIELDS)


def update_conv_state(rule: Convergence, c: ConvState, loss, params, grads, step,
                      first_chunk_end, active) -> ConvState:
    """One step's update of ``c`` in :func:`enter_chunk`'s layout; ``step`` is the step just
    taken; ``loss`` is NaN (and ``grads`` ignored) for a skipped step.

    Per step: the running sums of the loss, the gradient and the iterates. A block's end (once
    per ``window`` steps) reads every parameter: on the CPU it is a branch, whose untaken side
    passes the block's fields through; on an accelerator a branch costs a host round trip per
    step, so it is computed every step and selected."""
    finite = jnp.isfinite(loss) & active
    dtype = loss.dtype
    fresh = c.in_block == rule.window  # the previous step ended a block: its sums restart

    def restart(v):
        return jnp.where(fresh, jnp.zeros_like(v), v)

    x = jnp.where(finite, loss, 0.0)
    in_block = restart(c.in_block) + active.astype(jnp.int32)
    n_in = in_block.astype(dtype)
    block_avg = jax.tree_util.tree_map(
        lambda a, p: jnp.where(active, a + (p - a) / jnp.maximum(n_in, 1.0), a),
        c.block_avg, params)
    g = jax.tree_util.tree_map(lambda v: jnp.where(finite, v, 0.0), grads)
    c = c._replace(
        total=restart(c.total) + x, total_sq=restart(c.total_sq) + x * x,
        count=restart(c.count) + finite.astype(jnp.int32), in_block=in_block,
        block_avg=block_avg,
        g_sum=jax.tree_util.tree_map(lambda s, v: restart(s) + v, c.g_sum, g),
        g_sq=jax.tree_util.tree_map(lambda s, v: restart(s) + v * v, c.g_sq, g))
    end = active & (in_block == rule.window)
    block = tuple(getattr(c, f) for f in _BLOCK_FIELDS)
    running = c._replace(**{f: None for f in _BLOCK_FIELDS})

    def close(block, running, test):
        return _close_block(rule, running._replace(**dict(zip(_BLOCK_FIELDS, block, strict=True))),
                            step, first_chunk_end, *test)

    if jax.default_backend() == "cpu":
        # two branches: the gradient test reads the previous block's sums, the close
        # overwrites them; apart, neither needs a copy of them
        test = jax.lax.cond(end, lambda c: _gradient_test(c, c.g_sum, c.g_sq, c.count, dtype),
                            lambda c: (jnp.zeros((), dtype), jnp.zeros((), dtype)), c)
        block = jax.lax.cond(end, close, lambda block, *_: block, block, running, test)
    else:
        test = _gradient_test(c, c.g_sum, c.g_sq, c.count, dtype)
        block = jax.tree_util.tree_map(lambda a, b: jnp.where(end, a, b),
                                       close(block, running, test), block)
    return c._replace(**dict(zip(_BLOCK_FIELDS, block, strict=True)))


def block_params(c: ConvState):
    """The estimate: the average of the iterates over the last two complete blocks (over
    the last one when only one completed); ``None`` before the first block completes. The
    blocks are aligned to the global step count, so a resumed fit returns what an
    uninterrupted one does."""
    n = int(c.n_blocks)
    if n == 0:
        return None
    if n == 1:
        return c.last_avg
    return jax.tree_util.tree_map(lambda a, b: 0.5 * (a + b), c.last_avg, c.prev_avg)


def block_params_batched(c: ConvState, fallback, use):
    """:func:`block_params` for a leading lane axis (``fit_many``) where ``use`` (L,) is
    true, ``fallback``'s elsewhere and for lanes with no complete block."""
    n = jnp.where(jnp.asarray(use), c.n_blocks, 0)

    def pick(last, prev, fb):
        shape = (-1,) + (1,) * (last.ndim - 1)
        two = jnp.reshape(n >= 2, shape)
        one = jnp.reshape(n == 1, shape)
        return jnp.where(two, 0.5 * (last + prev), jnp.where(one, last, fb))

    return jax.tree_util.tree_map(pick, c.last_avg, c.prev_avg, fallback)


def describe_stop(c: ConvState, converged: bool, skip: tuple[str, ...] = ()) -> str:
    """One line: which criterion fired (or failed) and its measured figures (``skip``:
    ``("gradient",)`` when the gradient test was off)."""
    if not isinstance(c, ConvState) or int(c.n_blocks) < 2:
        return "too few steps for the stopping rule (fewer than two blocks)"
    ratio, thr = float(c.grad_ratio), float(c.grad_threshold)
    drop, noise, rise = float(c.loss_drop), float(c.loss_noise), float(c.loss_rise)
    grad = "" if "gradient" in skip else \
        f"gradient signal-to-noise {ratio:.3g} (threshold {thr:.3g}); "
    figures = (f"{grad}loss change "
               f"per block {-drop:+.3g} (noise {noise:.3g}); above the best block by "
               f"{rise:.3g}")
    if converged:
        return "converged: " + figures
    reasons = []
    if not ratio <= thr and "gradient" not in skip:
        reasons.append("the mean gradient is still significant (the estimate is still "
                       "moving)")
    if not drop < noise:
        reasons.append("the loss was still decreasing")
    if rise > noise:
        reasons.append("the loss rose above its best block (a diverging optimizer?)")
    return "not converged: " + ("; ".join(reasons) or "criteria met too recently") + "; " \
        + figures
