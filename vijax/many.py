"""Many fits as one program: ``vj.fit_many`` vmaps the whole fit (initialisation, compiled loop,
stopping rule, PSIS check) over lanes.

A lane is one fit: its own PRNG key and, optionally, its own slice of the data (a batch of
datasets of equal shapes, or hyper-parameters passed as batched data). Every lane carries its
own loop state, so each has its own stopping rule and non-finite guard: a lane that has
converged or failed keeps its state (its steps change nothing) while the others go on, and the
program ends when every lane is done. Lane ``i`` computes exactly what ``vj.fit`` computes with
lane ``i``'s key and data (up to floating-point differences of the batched kernels).

With a mesh (``mesh=``, :mod:`vijax.placement`) the lanes are split over a mesh axis: the
vmapped programs are compiled with every output split along the lane axis, so the loop state
leaves each chunk with the shardings it came in with, and each device runs its own lanes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vijax.checks import (
    DEFAULT_CHUNK,
    DEFAULT_STEPS,
    _check_int,
    _check_log_joint,
    _check_loop_options,
    _resolve_dtype,
    check_data,
    default_psis_draws,
)
from vijax.convergence import ConvState, block_params_batched, describe_stop, resolve_convergence
from vijax.driver import _final_loss, _progress_bar
from vijax.estimators import resolve_estimator
from vijax.guides.resolve import resolve_spec
from vijax.lanes import (
    _axes_key,
    _batched,
    _chunk_summary,
    _group_data,
    _lane_data,
    _lane_keys,
    _lanes_of,
    _place_shared,
    _placement_of,
    _slice,
)
from vijax.memory import check_fit_memory, estimate_fit_memory
from vijax.model import Model
from vijax.optim import default_optimizer
from vijax.placement import (
    padded_rows,
    place_lanes,
    place_tree,
    to_host,
)
from vijax.program import Problem, compile_problem, parameter_count
from vijax.psis import psis
from vijax.result import Diagnostics, FitResult
from vijax.start import _fixed_init

__all__ = ["fit_many", "FitManyResult"]


class FitManyResult(Sequence):
    """The lanes of :func:`fit_many`: ``res[i]`` is lane i as a :class:`vijax.FitResult`.

    Attributes:
        losses: ``(L, n)`` losses per lane, NaN after a lane stopped (n = steps of the
            longest lane).
        diagnostics: list of L :class:`vijax.Diagnostics`.
        errors: list of L messages (``None`` for lanes that did not fail).
        params: the fitted guide parameters, batched ``(L, ...)``.
        mparams: the model's parameters (:class:`vijax.Param`), unconstrained, batched
            ``(L, ...)`` (``None`` without parameters); ``res[i].model_params`` constrained.
    """

    def __init__(self, model, spec, guide, params, state, losses, diagnostics, errors,
                 optimizer, init_points, loop_keys, estimator, data, axes):
        self.model, self.guide_spec, self.guide = model, spec, guide
        self.params, self.mparams = model.target.split_params(params)
        self.state, self.losses = state, losses
        self.diagnostics, self.errors = diagnostics, errors
        self._optimizer, self._init_points, self._loop_keys = optimizer, init_points, loop_keys
        self._estimator, self._data, self._axes = estimator, data, axes

    def __len__(self) -> int:
        return len(self.diagnostics)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if isinstance(i, bool) or not isinstance(i, int | np.integer):
            raise TypeError(f"lane index must be an int, got {i!r}")
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"lane {i} out of range for {n} lanes")
        i = int(i) % n
        d = self.diagnostics[i]
        return FitResult(
            model=self.model.with_data(_lane_data(self._data, self._axes, i)),
            guide=self.guide, guide_spec=self.guide_spec, params=_slice(self.params, i),
            last_params=_slice(self.model.target.split_params(self.state.params)[0], i),
            opt_state=_slice(self.state.opt_state, i),
            mparams=None if self.mparams is None else _slice(self.mparams, i),
            losses=self.losses[i, :d.n_steps], diagnostics=d, optimizer=self._optimizer,
            init_point=self._init_points[i], state=_slice(self.state, i),
            loop_key=self._loop_keys[i], estimator=self._estimator)

    def final_losses(self) -> np.ndarray:
        """``(L,)`` final loss per lane (NaN for failed lanes)."""
        return np.array([d.final_loss if d.stop_reason != "failed" else np.nan
                         for d in self.diagnostics])

    def best(self, by: str = "loss") -> FitResult:
        """The best lane that did not fail: lowest final loss (``by="loss"``, i.e. highest
        ELBO) or lowest PSIS k-hat (``by="k_hat"``)."""
        if by not in ("loss", "k_hat"):
            raise ValueError(f"best(by=...) must be 'loss' or 'k_hat', got {by!r}")
        score = self.final_losses() if by == "loss" else np.array(
            [d.k_hat if d.stop_reason != "failed" else np.nan for d in self.diagnostics])
        if by == "loss":
            score = np.where(np.isfinite(score), score, np.nan)
        if np.all(np.isnan(score)):  # k-hat may be -inf (flat weights): the best there is
            raise ValueError(f"no lane has a {by}: every lane failed or the diagnostic "
                             "was not computed (psis_draws=0)")
        return self[int(np.nanargmin(score))]

    def __repr__(self) -> str:
        done = sum(d.converged for d in self.diagnostics)
        failed = sum(d.stop_reason == "failed" for d in self.diagnostics)
        return (f"FitManyResult({len(self)} lanes of {self.guide.name}: {done} converged, "
                f"{failed} failed)")


def fit_many(model: Model, data: Any = None, *, keys: Any = None, data_axes: Any = None,
             guide: Any = None, steps: int = DEFAULT_STEPS, optimizer=None,
             num_particles: int | None = None, init=None, average: float = 0.5,
             chunk_size: int = DEFAULT_CHUNK, dtype: Any = None, estimator: Any = None,
             convergence: Any = "auto", max_consecutive_nonfinite: int = 100,
             progress: bool | None = None, psis_draws: int | None = None,
             lanes_per_batch: int | None = None, mesh: Any = None) -> FitManyResult:
    """Fit L problems as one vmapped, compiled program (see the module docstring).

    Args:
        model: the :class:`vijax.Model`.
        data: the data pytree (default: the model's bound data).
        keys: the lanes' PRNG keys: a lane count ``L`` (keys split from ``key(0)``), a list
            of int seeds, or a ``(L,)`` key array (``jax.random.split(key, L)``). ``None``:
            ``L`` from the batched data, keys split from ``key(0)``.
        data_axes: which data leaves are batched along a leading lane axis: ``None`` (all
            shared: restarts of one model), ``0`` (every leaf batched), or a pytree prefix of
            the data with 0/None leaves (e.g. ``{"y": None, "prior_scale": 0}``).
        lanes_per_batch: run at most this many lanes at once (for batches that do not fit in
            device memory); the batches run one after another through the same compiled
            program (the last one padded). ``None``: all lanes at once.
        mesh: split the lanes over the devices of a ``jax.sharding.Mesh`` (its axis
            ``"lanes"``, else ``"data"``, else its only axis) or a :class:`vijax.Placement`
            (a mesh and the axis). Every leaf of the ``(L, ...)`` loop state, the ``(L,)``
            lane keys and the batched data leaves (data_axes 0, ``(L, ...)``) are split
            along their leading lane axis over the ``D`` devices of that axis; the shared
            data leaves (data_axes ``None``), ``init`` and the other mesh axes hold
            replicas. A lane count (or each batch of ``lanes_per_batch``) that is not a
            multiple of ``D`` is padded to one with copies of its first lane, dropped from
            the result. The chunk program runs compiled once, the state keeping its
            shardings from chunk to chunk; PSIS runs split over the lanes too. The result
            is brought back to one device and is the same as without a mesh (up to
            floating-point differences). ``None``: one device.
        guide, steps, optimizer, num_particles, init, average, chunk_size, dtype, estimator,
        convergence, max_consecutive_nonfinite, progress, psis_draws: as in :func:`vijax.fit`
            (``init`` is shared by all lanes), except that ``guide`` defaults to
            ``"meanfield"`` and is fitted in the model's own coordinates (as ``vj.fit``
            with ``precondition=None``): the staged defaults are not batched yet.
            A model's parameters (:class:`vijax.Param`) are fitted per lane
            (``res[i].model_params``); minibatches are not batched across lanes yet.

    Returns:
        A :class:`FitManyResult`: ``res[i]`` is lane i's :class:`vijax.FitResult`;
        ``res.best()`` the lane with the highest final ELBO; a lane whose fit failed (its
        loss stayed non-finite) is marked ``stop_reason="failed"`` with its message in
        ``res.errors[i]`` and does not stop the others.

    Example:
        >>> import jax, numpyro.distributions as dist, vijax as vj
        >>> m = vj.Model(lambda z, d: dist.Normal(d["mu"], 1.0).log_prob(z["x"]),
        ...              {"x": vj.Latent()})
        >>> mesh = jax.make_mesh((len(jax.devices()),), ("lanes",))  # optional: split lanes
        >>> res = vj.fit_many(m, {"mu": jax.numpy.arange(4.0)}, data_axes=0, steps=300,
        ...                   progress=False, mesh=mesh)
        >>> len(res), res[3].diagnostics.n_steps <= 300
        (4, True)
    """
    if psis_draws is None and isinstance(model, Model):
        psis_draws = default_psis_draws(model.target.dim)
    steps, chunk_size, limit, psis_draws = _check_loop_options(
        model, steps, chunk_size, max_consecutive_nonfinite, psis_draws, average, progress)
    rule = resolve_convergence(convergence)
    placement = _placement_of(mesh)
    target = model.target
    if target.locals is not None:
        what = (f"local latents ({list(target.locals.names)})" if target.has_locals else
                f"Bayesian layers ({[b.name for b in target.layers]})")
        raise ValueError(f"fit_many does not fit models with {what} yet: fit each dataset "
                         "with vj.fit")
    spec = resolve_spec("meanfield" if guide is None else guide)
    estimator = resolve_estimator("auto" if estimator is None else estimator)
    if num_particles is None:
        num_particles = 8 if target.discrete else 1
    num_particles = _check_int("num_particles", num_particles)
    if optimizer is None:
        optimizer = default_optimizer(getattr(spec, "default_learning_rate", 0.05))
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(f"optimizer must be an optax.GradientTransformation, got {optimizer!r}")
    dtype = _resolve_dtype(dtype)
    data = check_data(model.data if data is None else data, dtype)
    if data_axes is not None and data is None:
        raise ValueError("data_axes is given but there is no data")
    n_data = _lanes_of(data, data_axes)
    if keys is None:
        if n_data is None:
            raise ValueError("give keys= (a lane count, seeds or a key array) or batched data "
                             "(data_axes=0) so that the number of lanes is known")
        keys = n_data
    lane_keys = _lane_keys(keys)
    n_lanes = lane_keys.shape[0]
    if n_data is not None and n_data != n_lanes:
        raise ValueError(f"{n_lanes} keys but the batched data has {n_data} lanes")
    if lanes_per_batch is not None:
        lanes_per_batch = _check_int("lanes_per_batch", lanes_per_batch)
    chunk_len = min(chunk_size, steps)
    _check_log_joint(model, target, _lane_data(data, data_axes, 0), dtype)
    if rule is not None:
        rule = rule.sized(*parameter_count(target, spec, dtype.name))
    program = compile_problem(Problem(target, spec, estimator, num_particles, optimizer,
                                      chunk_len, rule))
    guide_fns, objective, runner, start = (program.guide, program.objective,
                                           program.run_chunk, program.start)
    fixed, mask = _fixed_init(target, init, dtype)
    group = n_lanes if lanes_per_batch is None else min(lanes_per_batch, n_lanes)
    width = padded_rows(group, placement)  # lanes per program: a multiple of the devices
    # device memory, before anything is compiled or placed (vijax.memory)
    check_fit_memory(estimate_fit_memory(
        program, data, key=lane_keys[0], dtype=dtype, lanes=width, lanes_total=n_lanes,
        data_axes=data_axes, placement=placement), what="vj.fit_many")
    if placement is None:  # (on a mesh the data go to the devices only split by lanes)
        data = jax.tree_util.tree_map(jnp.asarray, data)
    axes_key = _axes_key(data_axes)
    key_impl = None if placement is None else jax.random.key_impl(lane_keys)
    vstart = _batched(start, axes_key, "start", placement, key_impl)
    vrun = _batched(runner, axes_key, "run", placement, key_impl)
    summary = _chunk_summary(placement)
    run_data = _place_shared(data, data_axes, placement)
    if placement is not None:
        fixed, mask = place_tree((fixed, mask), (placement.replicated,) * 2)

    t0 = time.perf_counter()
    outs = []
    with _progress_bar(progress, steps * n_lanes, objective.name) as bar:
        done_before = 0
        for g0 in range(0, n_lanes, group):
            n_valid = min(group, n_lanes - g0)
            idx = np.arange(g0, g0 + width)
            idx = np.where(idx < g0 + n_valid, idx, g0)  # padding: copies of the first lane
            gkeys = lane_keys[idx] if placement is None else place_lanes(lane_keys[idx],
                                                                         placement)
            gdata = _group_data(run_data, data_axes, idx, placement)
            tries, theta0, ok, state, k_loop = vstart(gkeys, gdata, fixed, mask)
            # a lane without a finite initial point fails alone: it never runs
            state = state._replace(failed=state.failed | ~ok)
            total = jnp.int32(steps)
            avg_start = jnp.int32(steps - math.floor(average * steps))
            first_end, lim = jnp.int32(chunk_len), jnp.int32(limit)
            chunks = []
            for _ in range(math.ceil(steps / chunk_len)):
                state, losses = vrun(state, gdata, k_loop, total, avg_start, first_end, lim)
                chunks.append(losses)
                done, all_stopped, mean = summary(state, losses, jnp.int32(n_valid))
                bar.update(done_before + int(done), mean)
                if bool(all_stopped):
                    break
            done_before += int(done)
            if placement is not None:  # the lanes back on one device, gathered
                state, chunks, ok, tries, theta0, k_loop = to_host(
                    (state, chunks, ok, tries, theta0, k_loop))
                k_loop = jax.random.wrap_key_data(k_loop, impl=key_impl)
            keep = slice(0, n_valid)
            outs.append(jax.tree_util.tree_map(lambda x, keep=keep: x[keep], (
                state, np.concatenate([np.asarray(c) for c in chunks], axis=1), ok, tries,
                theta0, k_loop)))
    state, losses, ok, tries, theta0, k_loop = jax.tree_util.tree_map(
        lambda *xs: np.concatenate(xs) if isinstance(xs[0], np.ndarray) else
        jnp.concatenate(xs), *outs)
    wall = time.perf_counter() - t0

    converged = (np.asarray(state.conv.converged) if isinstance(state.conv, ConvState)
                 else np.zeros(n_lanes, bool))
    if isinstance(state.conv, ConvState):
        params = block_params_batched(state.conv, state.avg_params,
                                      np.asarray(state.conv.converged))
    else:
        params = state.avg_params

    k_hat = np.full(n_lanes, np.nan)
    ess = np.full(n_lanes, np.nan)
    readings = ["not computed"] * n_lanes
    if psis_draws and not guide_fns.point_mass:
        sampler = program.weighted_sampler(psis_draws)
        vsample = _batched(sampler, axes_key, "psis", placement)
        psis_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0x5151))(lane_keys)
        gparams, mparams = target.split_params(params)
        if placement is None:
            _, lw = vsample(psis_keys, gparams, data, mparams)
        else:  # split over the lanes (padded with copies of lane 0), gathered back
            idx = np.arange(padded_rows(n_lanes, placement))
            idx = np.where(idx < n_lanes, idx, 0)
            pkeys, pparams, pm = place_lanes(_slice((psis_keys, gparams, mparams), idx),
                                             placement)
            _, lw = vsample(pkeys, pparams, _group_data(run_data, data_axes, idx, placement),
                            pm)
            lw = to_host(lw)[:n_lanes]
        lw = np.asarray(lw, np.float64)
        for i in range(n_lanes):
            row = lw[i]
            if np.any(np.isfinite(row)):
                r = psis(np.where(np.isfinite(row), row, -np.inf))
                k_hat[i], ess[i], readings[i] = r.k_hat, r.ess, r.reading
    elif guide_fns.point_mass:
        readings = ["not applicable (point mass)"] * n_lanes

    diagnostics, errors = [], []
    failed = np.asarray(state.failed)
    n_steps = np.asarray(state.step)
    for i in range(n_lanes):
        row = losses[i, :n_steps[i]]
        if not bool(ok[i]):
            reason = "failed"
            errors.append(f"lane {i}: no initial point with a finite log joint and gradient "
                          f"in {int(tries[i])} tries")
        elif bool(failed[i]):
            reason = "failed"
            errors.append(f"lane {i}: {limit} consecutive steps were not finite (last at step "
                          f"{int(n_steps[i]) - 1}); res[{i}].state holds its last finite state")
        else:
            reason = "converged" if converged[i] else "max_steps"
            errors.append(None)
        diagnostics.append(Diagnostics(
            n_steps=int(n_steps[i]), n_nonfinite_skipped=int(state.n_nonfinite[i]),
            wall_time=wall, objective=objective.name, num_particles=num_particles,
            final_loss=_final_loss(row), estimator=objective.estimator,
            converged=reason == "converged", stop_reason=reason, max_steps=steps,
            k_hat=float(k_hat[i]), ess=float(ess[i]), k_hat_reading=readings[i],
            psis_draws=psis_draws if np.isfinite(k_hat[i]) else 0,
            criterion=describe_stop(jax.tree_util.tree_map(lambda x, i=i: x[i], state.conv),
                                    reason == "converged",
                                    () if guide_fns.noise_dim else ("gradient",))
            if isinstance(state.conv, ConvState) else "no stopping rule (convergence=None)"))
    return FitManyResult(model, spec, guide_fns, params, state, losses, diagnostics, errors,
                         optimizer, theta0, k_loop, estimator, data, data_axes)
