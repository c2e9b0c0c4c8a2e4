"""One guide family fitted by one compiled loop: the pipeline target -> guide -> objective ->
loop (compiled once per configuration), the chunks run on the host with their progress bar,
and the result assembled from the loop's final state."""

from __future__ import annotations

import math
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vijax.checks import _check_int, _check_key, _check_log_joint, _resolve_dtype
from vijax.convergence import Convergence, ConvState, block_params, describe_stop
from vijax.data import Feed
from vijax.estimators import resolve_estimator
from vijax.feeding import (
    _check_batch_axis,
    _chunk_args,
    _data_feed,
    _epochs,
    _feed_args,
    _next_chunk,
    _placed_data,
    _psis_default,
)
from vijax.loop import FitState, init_state, stopped
from vijax.memory import check_fit_memory, estimate_fit_memory
from vijax.model import Model
from vijax.optim import default_optimizer
from vijax.placement import (
    Placement,
    place_replicated,
    place_rows,
    place_tree,
    state_shardings,
    to_host,
)
from vijax.program import Problem, compile_problem, parameter_count
from vijax.result import Diagnostics, FitResult
from vijax.start import (
    _check_init_found,
    _check_source,
    _fixed_init,
    _source_loc,
    _warm_params,
)
from vijax.trust import (
    _check_finite_params,
    _nonfinite_error,
    _placed_psis_check,
    _psis_check,
    warn_if_untrusted,
)

__all__ = ["fit_single", "family_defaults", "run_chunks"]


# ---------------------------------------------------------------------------------------------
# compiled pieces: vijax.program (one program per problem)
def _pipeline(target, spec, num_particles: int, optimizer, chunk_len: int,
              estimator="auto", rule: Convergence | None = None, feed: Feed | None = None):
    """``(guide, objective, run_chunk, start, restart)`` of the problem (the benchmarks' and
    tests' handle on the compiled loop; :func:`vijax.program.compile_problem`)."""
    p = compile_problem(Problem(target, spec, estimator, num_particles, optimizer, chunk_len,
                                rule, feed))
    return p.guide, p.objective, p.run_chunk, p.start, p.restart




# ---------------------------------------------------------------------------------------------
def family_defaults(spec, target, estimator, num_particles, optimizer) -> tuple[Any, Any, Any]:
    """``(estimator, num_particles, optimizer)`` of a new fit of ``spec``, ``None`` replaced by
    the defaults: the ``"auto"`` estimator, 1 particle (8 with discrete latents, for the
    score function's leave-one-out baseline), :func:`vijax.default_optimizer` at the
    family's ``default_learning_rate``."""
    estimator = resolve_estimator("auto" if estimator is None else estimator)
    if num_particles is None:
        num_particles = 8 if target.discrete else 1
    if optimizer is None:
        optimizer = default_optimizer(getattr(spec, "default_learning_rate", 0.05))
    return estimator, num_particles, optimizer


def fit_single(model: Model, data: Any, spec, *, steps: int, optimizer, key: Any,
               num_particles: int, init, average: float, chunk_size: int, dtype: Any,
               init_from: FitResult | None, estimator, rule: Convergence | None,
               max_consecutive: int, progress: bool | None, psis_draws: int | None,
               resume: FitResult | None = None, batch_size: int | None = None,
               shuffle: str = "epoch", stream: bool = False, kl_weight: Any = None,
               placement: Placement | None = None) -> FitResult:
    """:func:`vijax.fit` of one family (not a staged fit): the initial point, the compiled
    loop run chunk by chunk until the stopping rule or ``steps``, the end-of-fit checks
    (:mod:`vijax.trust`) and the result.

    The arguments are ``fit``'s, with the loop options checked (:func:`vijax.checks.
    check_fit_options`: ``rule`` the resolved stopping rule, ``max_consecutive`` the limit of
    consecutive non-finite steps), ``spec`` a resolved guide spec and, for a new fit, the
    defaults filled in (:func:`family_defaults`); ``resume``: a result whose loop continues
    (its spec, estimator, optimizer, particles and dtype given here as they are);
    ``placement``: the mesh the data rows are split over (:mod:`vijax.placement`)."""
    target = model.target
    num_particles = _check_int("num_particles", num_particles)
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(f"optimizer must be an optax.GradientTransformation, got {optimizer!r}")
    dtype = _resolve_dtype(dtype)
    data, host, feed, n_obs = _data_feed(model, data, dtype, batch_size, shuffle, stream,
                                         kl_weight, resume)
    chunk_len = min(chunk_size, steps)
    _check_log_joint(model, target, data if host is None else host.batch_shapes(
        feed.minibatch.batch_size), dtype)
    if placement is not None:
        _placed_data(model, data, host, feed, placement, place=False)
    if (feed is not None and feed.minibatch is not None) or placement is not None:
        _check_batch_axis(model, target, data if host is None else host.batch_shapes(
            feed.minibatch.batch_size), dtype)
    if psis_draws is None:
        psis_draws = _psis_default(target.dim, n_obs if feed is not None else None)
    if rule is not None:
        noise = n_obs / feed.minibatch.batch_size if (
            feed is not None and feed.minibatch is not None
            and feed.minibatch.batch_size < n_obs) else 0.0
        rule = rule.sized(*parameter_count(target, spec, dtype.name), noise_ratio=noise)
    program = compile_problem(Problem(target, spec, estimator, num_particles, optimizer,
                                      chunk_len, rule, feed, placement))
    guide_fns, objective, runner, start, restart = (
        program.guide, program.objective, program.run_chunk, program.start, program.restart)
    key = _check_key(key)
    # device memory, before anything is compiled or placed (vijax.memory)
    check_fit_memory(estimate_fit_memory(program, data, key=key, dtype=dtype, host=host))
    placed = None if placement is None else _placed_data(model, data, host, feed, placement)
    if host is not None:  # the initial point and the checks use the first batch
        data = jax.tree_util.tree_map(jnp.asarray,
                                      host.gather(np.arange(feed.minibatch.batch_size)))
    elif placement is None:  # (on a mesh the data go to the devices only split by rows)
        data = jax.tree_util.tree_map(jnp.asarray, data)
    run_data = data if placed is None else placed
    if placement is not None and host is not None:  # the first batch, for the start
        run_data = place_rows(data, placement)

    t0 = time.perf_counter()
    if resume is not None:
        state, k_loop, theta0 = _resumable_state(resume, rule), resume.loop_key, \
            resume.init_point
        if placement is not None:
            state, k_loop = _place_state(state, k_loop, placement)
        previous = np.asarray(resume.losses)
    else:
        if init_from is not None:
            if init is not None:
                raise ValueError("give init or init_from, not both")
            _check_source(target, init_from, dtype)
            fixed = _source_loc(init_from).astype(dtype)
            fixed[target.dim:] = np.round(fixed[target.dim:])  # discrete: nearest index
            mask = np.ones((target.full_dim,), bool)
        else:
            fixed, mask = _fixed_init(target, init, dtype)
        if placement is not None:
            key, fixed, mask = place_replicated((key, fixed, mask), placement)
        tries, theta0, ok, state, k_loop = start(key, run_data, fixed, mask)
        _check_init_found(target, tries, theta0, ok, mask)
        if init_from is not None:
            gparams, mparams = target.split_params(state.params)
            warm = _warm_params(spec, gparams, init_from)
            if target.params and init_from.mparams is not None:
                mparams = init_from.mparams
            if warm is not None or (target.params and init_from.mparams is not None):
                gparams = gparams if warm is None else warm
                params = (gparams, mparams) if target.params else gparams
                if placement is not None:
                    params = place_replicated(params, placement)
                state = restart(params)
        previous = np.zeros((0,), dtype)

    state, losses, n_run, wall = run_chunks(
        runner, state, run_data, k_loop, steps=steps, chunk_len=chunk_len, average=average,
        max_consecutive=max_consecutive, feed=feed, host=host, n_obs=n_obs,
        progress=progress, name=objective.name, previous=previous, t0=t0,
        placement=placement)
    if placement is not None:  # the result lives on one device, whatever the mesh
        state, k_loop, theta0 = to_host((state, k_loop, theta0))
    begin = int(state.step) - n_run

    conv = state.conv if isinstance(state.conv, ConvState) else None
    converged = conv is not None and bool(conv.converged)
    # converged: the average of the last two blocks (at the optimum up to noise); else the
    # tail average over the last ``average`` fraction of all steps
    params = block_params(conv) if converged else state.avg_params
    if bool(state.failed) or int(state.n_nonfinite) - _skipped_before(resume) == n_run:
        last = _assemble(model, guide_fns, spec, params, state, losses, objective, optimizer,
                         theta0, k_loop, estimator, num_particles, wall, begin + steps,
                         "failed", None, feed)
        raise _nonfinite_error(target, guide_fns, objective, optimizer, state, data, k_loop,
                               max_consecutive if bool(state.failed) else 0, last,
                               1 if guide_fns.point_mass else num_particles)
    _check_finite_params(target, guide_fns, state, n_run)
    gparams, mparams = target.split_params(params)
    if placed is not None:  # draws in bounded chunks against the rows split over the mesh
        check = _placed_psis_check(target, guide_fns, gparams, key, psis_draws, placed,
                                   observation_count_of(data), mparams, placement)
    elif feed is None:
        check = _psis_check(target, guide_fns, gparams, key, psis_draws, data, mparams)
    else:
        check = _psis_check(target, guide_fns, gparams, key, psis_draws,
                            data if host is None else host, mparams, blocked=True)
    res = _assemble(model, guide_fns, spec, params, state, losses, objective, optimizer,
                    theta0, k_loop, estimator, num_particles, wall, begin + steps,
                    "converged" if converged else "max_steps", check, feed)
    warn_if_untrusted(res, stacklevel=4)  # the warning names the line that called vj.fit
    return res

def run_chunks(runner, state, data, k_loop, *, steps: int, chunk_len: int, average: float,
               max_consecutive: int, feed, host, n_obs, progress, name: str,
               previous: np.ndarray, t0: float, placement: Placement | None = None):
    """The host's chunk loop of a fit: ``runner`` (a program's ``run_chunk``) called until
    the stopping rule or ``steps``, a stream's next batches gathered and shipped while a
    chunk runs, the progress bar updated per chunk. Returns ``(state, losses (all steps run,
    ``previous`` included), steps run now, wall seconds since t0)``. With a ``placement``,
    ``state``, ``data`` and ``k_loop`` are already on its mesh, and a stream's batches are
    placed there chunk by chunk."""
    begin = int(state.step)
    total = jnp.asarray(begin + steps, jnp.int32)
    # the averaging window is a fraction of all steps (a resumed fit's included)
    avg_start = jnp.asarray(begin + steps - math.floor(average * (begin + steps)), jnp.int32)
    first_chunk_end = jnp.asarray(begin + chunk_len, jnp.int32)
    limit = jnp.asarray(max_consecutive, jnp.int32)
    chunks = []
    args = _feed_args(feed, host, n_obs, k_loop)
    loop_data = () if host is not None else data
    n_chunks = math.ceil(steps / chunk_len)
    with _progress_bar(progress, steps, name, _epochs(feed, n_obs)) as bar:
        pending = None if host is None else _next_chunk(host, feed, begin, chunk_len,
                                                        args["seed_host"], placement)
        for i in range(n_chunks):
            feed_args = None if feed is None else _chunk_args(args, pending)
            state, losses = runner(state, loop_data, k_loop, total, avg_start,
                                   first_chunk_end, limit, feed_args)
            if host is not None and i + 1 < n_chunks:
                # the next chunk's batches: gathered and shipped while this chunk runs
                pending = _next_chunk(host, feed, begin + (i + 1) * chunk_len, chunk_len,
                                      args["seed_host"], placement)
            chunks.append(losses)
            bar.update(int(state.step) - begin, losses)
            if bool(stopped(state)):
                break
    n_run = int(state.step) - begin
    losses = np.concatenate([previous] + [np.asarray(c) for c in chunks])[:begin + n_run]
    return state, losses, n_run, time.perf_counter() - t0


def _place_state(state, k_loop, placement: Placement):
    """A result's loop state (and key) put on the mesh as the compiled loop keeps it."""
    return place_tree(state, state_shardings(state, placement)), place_replicated(
        k_loop, placement)


def observation_count_of(data) -> int:
    return int(np.shape(jax.tree_util.tree_leaves(data)[0])[0])


def _resumable_state(res: FitResult, rule) -> FitState:
    """The result's loop state with its stop flags cleared (and the rule's state fitted)."""
    state = res.state
    if rule is None:
        conv = ()
    elif isinstance(state.conv, ConvState):
        conv = state.conv._replace(converged=jnp.array(False), streak=jnp.int32(0))
    else:
        conv = init_state(state.params, optax.identity(), (), rule).conv
    return state._replace(failed=jnp.array(False), n_consecutive=jnp.int32(0), conv=conv)


def _skipped_before(res: FitResult | None) -> int:
    return 0 if res is None else int(res.state.n_nonfinite)


# ---------------------------------------------------------------------------------------------
# progress, once per chunk
class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, done, losses):
        pass


class _Bar(_NoBar):
    """tqdm bar updated once per chunk: steps, mean loss of the chunk, steps/s."""

    def __init__(self, steps: int, name: str, epoch: float | None = None):
        from tqdm.auto import tqdm

        self._epoch = epoch
        if epoch:
            self._bar = tqdm(total=round(steps / epoch, 2), unit="epoch", leave=False,
                             dynamic_ncols=True)
        else:
            self._bar = tqdm(total=steps, unit="step", leave=False, dynamic_ncols=True)
        self._name = name
        self._done = 0

    def __exit__(self, *exc):
        self._bar.close()
        return False

    def update(self, done, losses):
        x = np.asarray(losses)
        x = x[np.isfinite(x)]
        if x.size:
            self._bar.set_postfix({self._name: f"{x.mean():.4g}"}, refresh=False)
        if self._epoch:
            self._bar.update(round((done - self._done) / self._epoch, 2))
        else:
            self._bar.update(done - self._done)
        self._done = done


def _progress_bar(progress: bool | None, steps: int, name: str, epoch: int | None = None):
    """A bar in steps, or in epochs (``epoch`` steps each) for minibatched fits."""
    if progress is None:
        progress = sys.stderr.isatty()
    return _Bar(steps, name, epoch) if progress else _NoBar()


# ---------------------------------------------------------------------------------------------
# the result
def _final_loss(losses: np.ndarray) -> float:
    """Mean of the finite losses among the last 10% of steps (NaN if there are none)."""
    tail = losses[-max(1, losses.size // 10):]
    tail = tail[np.isfinite(tail)]
    return float(tail.mean()) if tail.size else float("nan")


def _assemble(model, guide_fns, spec, params, state, losses, objective, optimizer, theta0,
              k_loop, estimator, num_particles, wall, max_steps, reason, check,
              feed=None) -> FitResult:
    k_hat, ess, reading, draws = (float("nan"), float("nan"), "not computed", 0) \
        if check is None else check
    diagnostics = Diagnostics(
        n_steps=int(state.step), n_nonfinite_skipped=int(state.n_nonfinite), wall_time=wall,
        objective=objective.name, num_particles=num_particles, final_loss=_final_loss(losses),
        estimator=objective.estimator, converged=reason == "converged", stop_reason=reason,
        max_steps=int(max_steps), k_hat=k_hat, ess=ess, k_hat_reading=reading,
        psis_draws=draws,
        criterion=describe_stop(state.conv, reason == "converged",
                                () if guide_fns.noise_dim else ("gradient",))
        if isinstance(state.conv, ConvState) else
        "no stopping rule (convergence=None): ran exactly the steps asked for")
    if feed is not None:
        parts = [x for x in (_describe_minibatch(feed.minibatch),
                             feed.kl.describe() if feed.kl is not None else "") if x]
        diagnostics = diagnostics._replace(data="; ".join(parts))
    gparams, mparams = model.target.split_params(params)
    return FitResult(model=model, guide=guide_fns, guide_spec=spec, params=gparams,
                     last_params=model.target.split_params(state.params)[0],
                     opt_state=state.opt_state, losses=losses,
                     diagnostics=diagnostics, optimizer=optimizer, init_point=theta0,
                     state=state, loop_key=k_loop, estimator=estimator, mparams=mparams,
                     feed=feed)


def _describe_minibatch(mb) -> str:
    if mb is None:
        return ""
    how = "streamed from host memory" if mb.streamed else "device-resident"
    order = "reshuffled every epoch" if mb.shuffle == "epoch" else "drawn with replacement"
    return f"minibatches of {mb.batch_size} ({how}, {order}, scaled by N/B)"
