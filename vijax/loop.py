"""The compiled optimisation loop: ``lax.scan`` chunks of steps inside one ``jit``.

One call runs ``chunk_len`` steps on device. Keys are derived per global step
(``fold_in(key, step)``), so the draws do not depend on the chunk size; steps past
``total_steps`` are skipped by ``lax.cond`` (the last chunk may be partial). The data, key,
step budget and averaging start are arguments, so a refit on new data of the same shapes reuses
the compiled program.

Each step: ``loss, g = value_and_grad(objective.loss)``; a step whose loss or gradient is not
finite leaves parameters and optimizer state unchanged and is counted; otherwise
``params <- optax.apply_updates(params, optimizer.update(g, ...))``. (An optimizer that turns
finite gradients into non-finite parameters, e.g. a NaN step size, is caught after the fit.)
Tail iterate averaging
(Polyak-Ruppert, as recommended for stochastic VI by Dhaka et al. 2020) keeps
``avg = mean(params_t for t >= avg_start)``.
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


def init_state(params, optimizer: optax.GradientTransformation) -> FitState:
    zero = jnp.zeros((), jnp.int32)
    return FitState(params, optimizer.init(params), params, zero, zero)


def _all_finite(tree) -> jax.Array:
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)]
    return functools.reduce(jnp.logical_and, leaves, jnp.array(True))


def _step(objective, optimizer, data, key, total_steps, avg_start, state: FitState):
    loss, grads = jax.value_and_grad(objective.loss, argnums=1)(
        jax.random.fold_in(key, state.step), state.params, data)
    ok = jnp.isfinite(loss) & _all_finite(grads)

    def apply(s):
        updates, opt_state = optimizer.update(grads, s.opt_state, s.params)
        return optax.apply_updates(s.params, updates), opt_state

    # one branch, not a select per leaf: a skipped step leaves params and optimizer state
    # bitwise unchanged
    params, opt_state = jax.lax.cond(ok, apply, lambda s: (s.params, s.opt_state), state)

    def running_mean(a):
        n = (state.step - avg_start + 1).astype(loss.dtype)
        return jax.tree_util.tree_map(lambda x, p: x + (p - x) / n, a, params)

    # mean over steps >= avg_start; before that the average tracks the iterate
    avg = jax.lax.cond(state.step >= avg_start, running_mean, lambda a: params,
                       state.avg_params)
    new = FitState(params, opt_state, avg, state.step + 1,
                   state.n_nonfinite + (~ok).astype(jnp.int32))
    return new, loss


@functools.lru_cache(maxsize=128)
def make_chunk_runner(objective: Objective, optimizer: optax.GradientTransformation,
                      chunk_len: int):
    """Jitted ``run(state, data, key, total_steps, avg_start) -> (state, losses (chunk_len,))``.

    Cached on its (hashable) arguments: one compiled program per configuration. Losses of
    skipped steps (past ``total_steps``) are NaN; the host trims them.
    """

    def run(state, data, key, total_steps, avg_start):
        def body(state, _):
            active = state.step < total_steps
            return jax.lax.cond(
                active,
                functools.partial(_step, objective, optimizer, data, key, total_steps,
                                  avg_start),
                lambda s: (s, jnp.full((), jnp.nan, _loss_dtype(s))),
                state)

        return jax.lax.scan(body, state, None, length=chunk_len)

    donate = (0,) if jax.default_backend() != "cpu" else ()
    return jax.jit(run, donate_argnums=donate)


def _loss_dtype(state: FitState):
    return jax.tree_util.tree_leaves(state.params)[0].dtype
