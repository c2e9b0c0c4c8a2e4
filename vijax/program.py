"""The compile step: a :class:`Problem` (a hashable description of one compiled fit) becomes a
:class:`Program` (the compiled pieces), once per problem.

``Problem`` holds everything the compiled code depends on: the model's target (its latents,
parameters and density), the guide spec, the estimator, the particles, the optimizer, the
chunk length, the stopping rule and the data feed (minibatches, KL weight). It holds no data
and no key: those are arguments of the programs, so a refit on new data of the same shapes,
or with a new key, reuses them. ``fit``, ``fit_many`` (which vmaps the programs over lanes)
and the staged fits (through ``fit``'s single-family driver) all compile through
:func:`compile_problem`; ``vijax.caches.clear_caches`` empties its cache.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vijax.convergence import Convergence
from vijax.data import Feed
from vijax.guides.base import Guide
from vijax.guides.local import LocalSpec, build_local, example_row, lift_global
from vijax.guides.resolve import build_guide
from vijax.loop import init_state, make_chunk_runner
from vijax.memory_maps import relieve
from vijax.objective import Objective, make_objective
from vijax.objective_local import make_local_objective
from vijax.objective_wake_sleep import is_wake_sleep, make_wake_sleep_objective
from vijax.placement import Placement, jit_placed_outputs
from vijax.result import _weighted_sampler
from vijax.start import _init_finder

__all__ = ["Problem", "Program", "compile_problem", "parameter_count"]


class Problem(NamedTuple):
    """What one compiled fit is (hashable: the compile key).

    Attributes:
        target: the model's :class:`vijax.target.Target` (hashed by identity; models of one
            structure share it).
        spec: the resolved guide spec (``vj.guides.MeanField()``, ...).
        estimator: the resolved estimator configuration.
        num_particles: draws per step (>= 1).
        optimizer: the optax ``GradientTransformation``.
        chunk_len: steps per compiled chunk.
        rule: the sized stopping rule (:class:`vijax.Convergence`) or ``None``.
        feed: the data feed (:class:`vijax.data.Feed`) or ``None`` (all the data each step).
        placement: the mesh and axis the data rows are split over
            (:class:`vijax.Placement`), or ``None``: one device. The programs are compiled
            for arrays placed so (:mod:`vijax.placement`); nothing else depends on it.
    """

    target: Any
    spec: Any
    estimator: Any
    num_particles: int
    optimizer: Any
    chunk_len: int
    rule: Convergence | None = None
    feed: Feed | None = None
    placement: Placement | None = None


class Program(NamedTuple):
    """The compiled pieces of a :class:`Problem`.

    Attributes:
        problem: what was compiled.
        guide: the guide's functions; ``objective`` the loss.
        start: jitted ``(key, data, fixed, mask) -> (tries, theta0, ok, state, loop_key)``:
            the initial point (``fixed`` unconstrained values where ``mask``), the guide
            centred on it, the loop state (``(guide params, model params)`` for a model with
            parameters).
        run_chunk: jitted ``(state, data, loop_key, total_steps, avg_start,
            first_chunk_end, max_consecutive, feed_args=None) -> (state, losses
            (chunk_len,))`` (:func:`vijax.loop.make_chunk_runner`).
        restart: jitted ``params -> state``: a fresh loop state at given parameters (warm
            starts).
    """

    problem: Problem
    guide: Guide
    objective: Objective
    start: Callable
    run_chunk: Callable
    restart: Callable

    def weighted_sampler(self, n: int, constrained: bool = True) -> Callable:
        """Jitted ``(key, guide params, data, model params=None) -> (draws, log w (n,))``
        for PSIS (cached per ``n``)."""
        return _weighted_sampler(self.problem.target, self.guide, n, constrained)


def compile_problem(problem: Problem) -> Program:
    """The :class:`Program` of ``problem``: built once per problem (an LRU cache of 128), each
    piece compiled by ``jax.jit`` on its first call. A new problem first makes room in the
    process's memory mappings when they run short (:mod:`vijax.memory_maps`)."""
    relieve()  # reads /proc/self/maps: well under a millisecond for a small process
    return _compiled_problem(problem)


@functools.lru_cache(maxsize=128)
def _compiled_problem(problem: Problem) -> Program:
    target, feed, rule, optimizer = problem.target, problem.feed, problem.rule, \
        problem.optimizer
    if isinstance(problem.spec, LocalSpec):
        return _compile_local(problem)
    if is_wake_sleep(problem.estimator):
        raise ValueError(f"estimator {problem.estimator.name!r} (wake-sleep) trains amortized "
                         "guides of local latents (vj.Latent(..., local=True)); this model "
                         "has none: use 'reparam', 'iwae' or another estimator")
    guide = build_guide(problem.spec, target)
    if feed is None:
        objective = make_objective(target, guide, problem.estimator, problem.num_particles)
    else:
        objective = make_objective(target, guide, problem.estimator, problem.num_particles,
                                   weighted=True, kl_weighted=feed.kl is not None)
    runner = make_chunk_runner(objective, optimizer, problem.chunk_len, rule, feed,
                               problem.placement)
    find = _init_finder(target, guide.no_jacobian)

    def with_model_params(gparams, dtype):
        return (gparams, target.param_init(dtype)) if target.params else gparams

    def start(key, data, fixed, mask):  # everything before the first step: one program
        k_init, k_guide, k_loop = jax.random.split(key, 3)
        tries, theta, ok = find(k_init, data, fixed, mask)
        params = with_model_params(guide.init(k_guide, theta), theta.dtype)
        state = init_state(params, optimizer, objective.init_state(theta.dtype), rule, feed)
        return tries, theta, ok, state, k_loop

    def restart(params):  # warm starts
        return init_state(params, optimizer, objective.init_state(
            jax.tree_util.tree_leaves(params)[0].dtype), rule, feed)

    return Program(problem, guide, objective, *_jit_start(problem, start, restart, runner))


def _jit_start(problem: Problem, start, restart, runner):
    """``(start, run_chunk, restart)`` compiled for the problem's placement: on a mesh the
    loop state comes out of ``start`` and ``restart`` replicated (per-row tables split by
    rows), as the chunk runner keeps it."""
    if problem.placement is None:
        return jax.jit(start), runner, jax.jit(restart)
    return (jit_placed_outputs(start, problem.placement), runner,
            jit_placed_outputs(restart, problem.placement))


def _compile_local(problem: Problem) -> Program:
    """The program of a model with local latents (:mod:`vijax.objective_local`): the global
    family lifted to ``params["global"]``, one factor per local latent; the initial point is
    ``fixed`` where given and 0 elsewhere (no search: the local latents have no mode of
    their own before the encoders are trained)."""
    target, feed, rule, optimizer, spec = problem.target, problem.feed, problem.rule, \
        problem.optimizer, problem.spec
    gguide = build_guide(spec.global_spec, target)
    factors = build_local(spec, target, example_row(spec.row))
    if is_wake_sleep(problem.estimator) and target.layers:
        raise ValueError(f"wake-sleep trains the guides of local latents; the Bayesian layers "
                         f"({[b.name for b in target.layers]}) are trained by the ELBO: use "
                         "estimator='reparam' or 'stl'")
    if is_wake_sleep(problem.estimator):  # vijax.objective_wake_sleep
        rows = feed.minibatch.batch_size if feed.minibatch is not None else spec.n_rows
        objective = make_wake_sleep_objective(
            target, gguide, factors, problem.estimator, problem.num_particles,
            specs=spec.factors, row=spec.row, batch_size=max(int(rows), 1),
            kl_weighted=feed.kl is not None)
    else:
        objective = make_local_objective(target, gguide, factors, problem.estimator,
                                         problem.num_particles, kl_weighted=feed.kl is not None)
    guide = lift_global(gguide)
    runner = make_chunk_runner(objective, optimizer, problem.chunk_len, rule, feed,
                               problem.placement)
    row = example_row(spec.row)

    def params_at(key, theta):
        k_guide, *keys = jax.random.split(key, len(factors) + 1)
        local = {f.name: f.init(k, jax.tree_util.tree_map(
            lambda a: a.astype(theta.dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a,
            row), spec.n_rows, theta.dtype) for f, k in zip(factors, keys, strict=True)}
        gparams = {"global": gguide.init(k_guide, theta), "local": local}
        if not target.params:
            return gparams
        # the Bayesian layers' random initial weights (other fits keep their key path)
        return gparams, target.param_init(theta.dtype, jax.random.fold_in(key, _LAYER_STREAM))

    def start(key, data, fixed, mask):
        del data
        k_init, k_loop = jax.random.split(key)
        theta = jnp.where(mask, fixed, jnp.zeros_like(fixed))
        params = params_at(k_init, theta)
        state = init_state(params, optimizer, objective.init_state(theta.dtype), rule, feed)
        return jnp.ones((), jnp.int32), theta, jnp.array(True), state, k_loop

    def restart(params):
        return init_state(params, optimizer, objective.init_state(
            jax.tree_util.tree_leaves(params)[0].dtype), rule, feed)

    return Program(problem, guide, objective, *_jit_start(problem, start, restart, runner))


_LAYER_STREAM = 0x4C415952  # fold_in counter of the Bayesian layers' initial weights


@functools.lru_cache(maxsize=128)
def parameter_count(target, spec, dtype_name: str) -> tuple[int, bool]:
    """Number of parameter elements of ``spec``'s guide (and the model's parameters) for
    ``target`` and whether the guide is a point mass (they size the stopping rule)."""
    guide = build_guide(spec, target)
    shapes = jax.eval_shape(guide.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((target.full_dim,), np.dtype(dtype_name)))
    n = int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)))
    n += sum(b.size for b in target.params)
    return n, bool(guide.point_mass and not target.discrete)
