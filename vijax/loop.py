"""The compiled optimisation loop: ``lax.scan`` chunks of steps inside one ``jit``.

One call runs ``chunk_len`` steps on device. Keys are derived per global step
(``fold_in(key, step)``, all of a chunk's at once), so the draws do not depend on the chunk
size; steps past ``total_steps`` (the last chunk may be partial) change nothing. The data, key,
step budget and averaging start are arguments, so a refit on new data of the same shapes reuses
the compiled program.

Each step: ``(loss, est_state), g = value_and_grad(objective.loss, has_aux=True)``; a step
whose loss or gradient is not finite leaves parameters and optimizer state unchanged and is
counted; otherwise ``params <- optax.apply_updates(params, optimizer.update(g, ...))``. (An
optimizer that turns finite gradients into non-finite parameters, e.g. a NaN step size, is
caught after the fit.) Tail iterate averaging (Polyak-Ruppert, as recommended for stochastic
VI by Dhaka et al. 2020) keeps ``avg = mean(params_t for t >= avg_start)``.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from vijax.convergence import (
    Convergence,
    ConvState,
    enter_chunk,
    init_conv_state,
    leave_chunk,
    update_conv_state,
)
from vijax.data import Feed, advance, device_indices, kl_weight_at, take
from vijax.objective import Objective
from vijax.placement import Placement, placed_jit

__all__ = ["FitState", "init_state", "make_chunk_runner", "stopped"]

_GROUP = 64
"""Most steps per inner scan. XLA's CPU runtime runs a loop body whose buffers all hold at most
512 bytes on the calling thread, one operation after the other; one larger buffer (a chunk's
500 losses or keys) makes it hand the body's independent operations to its thread pool, which
on a small model costs more than the operations (eight schools: 5.2 against 3.7 µs a step).
A chunk is therefore a scan over groups of at most 64 steps (64 keys of 8 bytes, 64 losses)."""


class FitState(NamedTuple):
    """Loop state (a pytree). ``step`` counts steps taken (skipped ones included)."""

    params: Any
    opt_state: Any
    avg_params: Any
    step: jax.Array  # int32 scalar
    n_nonfinite: jax.Array  # int32 scalar: steps skipped for a non-finite loss or gradient
    est_state: Any = ()  # the estimator's own state (e.g. a moving-average baseline)
    n_consecutive: Any = None  # int32: current run of consecutive skipped steps
    failed: Any = None  # bool: the run of skipped steps reached the limit; the loop stopped
    conv: Any = ()  # vijax.convergence.ConvState, or () without a stopping rule
    data_pos: Any = ()  # minibatches: (epoch, offset) int32 of the next batch; else ()


def init_state(params, optimizer: optax.GradientTransformation, est_state: Any = (),
               rule: Convergence | None = None, feed: Feed | None = None) -> FitState:
    zero = jnp.zeros((), jnp.int32)
    conv = () if rule is None else init_conv_state(
        params, jax.tree_util.tree_leaves(params)[0].dtype)
    pos = (zero, zero) if feed is not None and feed.minibatch is not None else ()
    return FitState(params, optimizer.init(params), params, zero, zero, est_state, zero,
                    jnp.array(False), conv, pos)


def stopped(state: FitState) -> jax.Array:
    """Whether the loop has stopped early (converged or failed)."""
    conv = state.conv.converged if isinstance(state.conv, ConvState) else jnp.array(False)
    return state.failed | conv


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return functools.reduce(jnp.logical_and, leaves, jnp.array(True))


def _batch(feed: Feed, data, feed_args, xs, state: FitState, dtype, rows_needed=False,
           take_rows=None):
    """The step's data (with its row indices, ``(batch, rows)``, when ``rows_needed``), the
    objective's ``(scale, kl_weight)`` and the next data position."""
    mb = feed.minibatch
    n = feed_args["n"] if mb is not None else None
    pos = state.data_pos
    if mb is None:
        batch, scale = data, jnp.ones((), dtype)
        rows = jnp.arange(jax.tree_util.tree_leaves(data)[0].shape[0], dtype=jnp.int32) \
            if rows_needed else None
    elif mb.streamed:  # (a stream has no per-row guide tables: the rows are not needed)
        batch, scale = xs, n.astype(dtype) / mb.batch_size
        rows = jnp.zeros((mb.batch_size,), jnp.int32)
        pos = advance(mb, pos, n)
    else:
        rows = device_indices(mb, pos, feed_args["seed"], n)
        # the compile step's placement may take the rows where they live
        batch = take(data, rows) if take_rows is None else take_rows(data, rows)
        scale = n.astype(dtype) / mb.batch_size
        pos = advance(mb, pos, n)
    kl = kl_weight_at(feed.kl, state.step, state.data_pos, mb, n, dtype)
    return ((batch, rows) if rows_needed else batch), (scale, kl), pos


def _step(objective, optimizer, rule, data, step_key, total_steps, avg_start, first_chunk_end,
          max_consecutive, state: FitState, feed: Feed | None = None, feed_args=None, xs=None,
          take_rows=None):
    active = (state.step < total_steps) & ~stopped(state)
    if feed is None:  # the whole data every step, unweighted
        (loss, est_state), grads = jax.value_and_grad(objective.loss, argnums=1,
                                                      has_aux=True)(
            step_key, state.params, data, state.est_state)
        data_pos = state.data_pos
    else:
        dtype = jax.tree_util.tree_leaves(state.params)[0].dtype
        batch, weights, data_pos = _batch(feed, data, feed_args, xs, state, dtype,
                                          objective.needs_rows, take_rows)
        (loss, est_state), grads = jax.value_and_grad(objective.loss, argnums=1,
                                                      has_aux=True)(
            step_key, state.params, batch, state.est_state, weights)
        data_pos = jax.tree_util.tree_map(lambda new, old: jnp.where(active, new, old),
                                          data_pos, state.data_pos)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    # a step is skipped when its loss or gradient is not finite, or when the optimizer turns
    # them into non-finite parameters (e.g. a NaN step size)
    finite = jnp.isfinite(loss) & _all_finite(grads) & _all_finite(params)
    ok = active & finite

    # Selects, not lax.cond: they fuse with the update into one pass over each array, and on
    # an accelerator a cond costs a device-to-host copy of its predicate every step. A
    # skipped step (non-finite, past the budget, or after stopping) keeps params and
    # optimizer state bitwise.
    def keep(new, old):
        return jnp.where(ok, new, old)

    params = jax.tree_util.tree_map(keep, params, state.params)
    opt_state = jax.tree_util.tree_map(keep, opt_state, state.opt_state)
    est_state = jax.tree_util.tree_map(keep, est_state, state.est_state)

    # mean over steps >= avg_start; before that the average tracks the iterate
    n = jnp.maximum(state.step - avg_start + 1, 1).astype(loss.dtype)
    averaging = state.step >= avg_start

    def average(a, p):
        return jnp.where(active, jnp.where(averaging, a + (p - a) / n, p), a)

    avg = jax.tree_util.tree_map(average, state.avg_params, params)
    skipped = active & ~finite
    n_consecutive = jnp.where(active, jnp.where(finite, 0, state.n_consecutive + 1),
                              state.n_consecutive)
    failed = state.failed | (active & (n_consecutive >= max_consecutive))
    conv = state.conv
    if rule is not None:
        conv = update_conv_state(rule, conv, jnp.where(ok, loss, jnp.nan), params, grads,
                                 state.step, first_chunk_end, active)
    new = FitState(params, opt_state, avg, state.step + active.astype(jnp.int32),
                   state.n_nonfinite + skipped.astype(jnp.int32), est_state, n_consecutive,
                   failed, conv, data_pos)
    return new, jnp.where(active, loss, jnp.nan)


@functools.lru_cache(maxsize=128)
def make_chunk_runner(objective: Objective, optimizer: optax.GradientTransformation,
                      chunk_len: int, rule: Convergence | None = None,
                      feed: Feed | None = None, placement: Placement | None = None):
    """Jitted ``run(state, data, key, total_steps, avg_start, first_chunk_end,
    max_consecutive, feed_args=None) -> (state, losses (chunk_len,))``.

    Cached on its (hashable) arguments: one compiled program per configuration. Steps past
    ``total_steps``, after convergence or after ``max_consecutive`` consecutive skipped steps
    change nothing and their losses are NaN; the host trims them. With a ``feed``
    (:mod:`vijax.data`), ``feed_args`` holds ``n`` (int32, the observations) and ``seed``
    (uint32, the shuffle) for device-resident minibatches, or ``n`` and ``xs`` (the chunk's
    batches, leading axis ``chunk_len``) for a host stream; the objective is weighted.

    With a ``placement`` (:mod:`vijax.placement`, chosen by the compile step), the program
    is compiled for arrays on its mesh: the state leaves a call with the shardings it came
    in with (one program for every chunk), and a minibatch of data split by rows is taken
    where the rows live and split by rows too (:meth:`vijax.placement.Placement.take_rows`:
    each device computes the likelihood of its share of the batch).
    """
    streamed = feed is not None and feed.minibatch is not None and feed.minibatch.streamed
    groups = -(-chunk_len // _GROUP)
    per_group = -(-chunk_len // groups)  # groups * per_group >= chunk_len, padding < groups

    def run(state, data, key, total_steps, avg_start, first_chunk_end, max_consecutive,
            feed_args=None):
        def body(state, xs):
            i, step_key = xs
            batch = None
            if streamed:  # the i-th of the chunk's batches (a padding step reads the last)
                batch = jax.tree_util.tree_map(
                    lambda a: jax.lax.dynamic_index_in_dim(a, jnp.minimum(i, chunk_len - 1),
                                                           keepdims=False), feed_args["xs"])
            return _step(objective, optimizer, rule, data, step_key, last, avg_start,
                         first_chunk_end, max_consecutive, state, feed, feed_args, batch,
                         take_rows)

        # the chunk's active steps are its first ones (an inactive step stays inactive), so
        # step i of the chunk is global step state.step + i: its key is computed up front;
        # steps past the chunk (padding of the last group) are inactive
        last = jnp.minimum(total_steps, state.step + chunk_len)
        i = jnp.arange(groups * per_group, dtype=jnp.int32)
        keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(key, state.step + i)
        xs = jax.tree_util.tree_map(lambda a: a.reshape((groups, per_group) + a.shape[1:]),
                                    (i, keys))
        if rule is not None:
            state = state._replace(conv=enter_chunk(state.conv))
        state, losses = jax.lax.scan(lambda s, x: jax.lax.scan(body, s, x), state, xs)
        if rule is not None:
            state = state._replace(conv=leave_chunk(state.conv, rule))
        return state, losses.reshape(-1)[:chunk_len]

    take_rows = None if placement is None else placement.take_rows
    donate = (0,) if jax.default_backend() != "cpu" else ()
    if placement is not None:
        return placed_jit(run, placement, 2, donate)
    return jax.jit(run, donate_argnums=donate)


