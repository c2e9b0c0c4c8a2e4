"""The compiled optimisation loop: ``lax.scan`` chunks of steps inside one ``jit``.

One call runs ``chunk_len`` steps on device. Keys are derived per global step
(``fold_in(key, step)``), so the draws do not depend on the chunk size; steps past
``total_steps`` (the last chunk may be partial) change nothing. The data, key,
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

from vijax.objective import Objective

__all__ = ["FitState", "init_state", "make_chunk_runner"]


class FitState(NamedTuple):
    """Loop state (a pytree). ``step`` counts steps taken (skipped ones included)."""

    params: Any
    opt_state: Any
    avg_params: Any
    step: jax.Array  # int32 scalar
    n_nonfinite: jax.Array  # int32 scalar: steps skipped for a non-finite loss or gradient
    est_state: Any = ()  # the estimator's own state (e.g. a moving-average baseline)


def init_state(params, optimizer: optax.GradientTransformation, est_state: Any = ()
               ) -> FitState:
    zero = jnp.zeros((), jnp.int32)
    return FitState(params, optimizer.init(params), params, zero, zero, est_state)


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return functools.reduce(jnp.logical_and, leaves, jnp.array(True))


def _step(objective, optimizer, data, key, total_steps, avg_start, state: FitState):
    active = state.step < total_steps
    (loss, est_state), grads = jax.value_and_grad(objective.loss, argnums=1, has_aux=True)(
        jax.random.fold_in(key, state.step), state.params, data, state.est_state)
    finite = jnp.isfinite(loss) & _all_finite(grads)
    ok = active & finite
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)

    # Selects, not lax.cond: they fuse with the update into one pass over each array, and on
    # an accelerator a cond costs a device-to-host copy of its predicate every step. A
    # skipped step (non-finite, or past the budget) keeps params and optimizer state bitwise.
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
    new = FitState(params, opt_state, avg, state.step + active.astype(jnp.int32),
                   state.n_nonfinite + (active & ~finite).astype(jnp.int32), est_state)
    return new, jnp.where(active, loss, jnp.nan)


@functools.lru_cache(maxsize=128)
def make_chunk_runner(objective: Objective, optimizer: optax.GradientTransformation,
                      chunk_len: int):
    """Jitted ``run(state, data, key, total_steps, avg_start) -> (state, losses (chunk_len,))``.

    Cached on its (hashable) arguments: one compiled program per configuration. Steps past
    ``total_steps`` change nothing and their losses are NaN; the host trims them.
    """

    def run(state, data, key, total_steps, avg_start):
        def body(state, _):
            return _step(objective, optimizer, data, key, total_steps, avg_start, state)

        return jax.lax.scan(body, state, None, length=chunk_len)

    donate = (0,) if jax.default_backend() != "cpu" else ()
    return jax.jit(run, donate_argnums=donate)


def _loss_dtype(state: FitState):
    return jax.tree_util.tree_leaves(state.params)[0].dtype
