"""``fit`` of a model with local latents: the global family plus one guide factor per local
latent (:mod:`vijax.guides.local`), the local objective (:mod:`vijax.objective_local`), the
same compiled loop and data feed as every fit (full data or minibatches, streams, KL
weights), and a per-row importance check in place of the global PSIS check
(:mod:`vijax.local_result`)."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vijax.checks import _check_int, _check_key, _resolve_dtype, _trace
from vijax.convergence import Convergence, ConvState, block_params
from vijax.data import Feed
from vijax.driver import (
    _assemble,
    _place_state,
    _resumable_state,
    _skipped_before,
    run_chunks,
)
from vijax.feeding import _data_feed, _placed_data
from vijax.guides.amortized import LocalTable
from vijax.guides.local import LocalSpec, example_row, resolve_local_spec, row_signature
from vijax.local_weights import row_check
from vijax.memory import check_fit_memory, estimate_fit_memory
from vijax.model import Model
from vijax.optim import local_default_optimizer
from vijax.placement import Placement, place_replicated, place_rows, to_host
from vijax.program import Problem, compile_problem
from vijax.result import FitResult
from vijax.start import _fixed_init
from vijax.trust import _nonfinite_error, warn_if_untrusted

__all__ = ["fit_local", "local_spec", "check_local_model"]


def local_spec(guide: Any, model: Model, data: Any, resolve_global) -> LocalSpec:
    """The :class:`LocalSpec` of ``guide=`` for ``model`` on ``data`` (one row's structure
    and the number of rows are part of it: the encoders' input, the tables' length)."""
    global_spec, factors = resolve_local_spec(guide, model.target, resolve_global)
    row, n = row_signature(data)
    return LocalSpec(global_spec, factors, row, n)


def check_local_model(model: Model, batch: Any, dtype) -> None:
    """Trace the density of a model with local latents on abstract values: ``log_prior`` of
    the global latents (a scalar, not reading local latents), ``log_likelihood`` of a batch
    with local latents of shape ``(B,) + shape`` (one float per row)."""
    target = model.target
    layout = target.locals
    theta = jax.ShapeDtypeStruct((target.full_dim,), dtype)
    leaves = jax.tree_util.tree_leaves(batch)
    if not leaves:
        what = "local latents" if target.has_locals else "Bayesian layers"
        raise ValueError(f"a model with {what} needs data: the leading axis of every "
                         "data leaf is the observation axis")
    b = int(np.shape(leaves[0])[0])
    shapes = {bl.name: bl.shape for bl in target.blocks}
    shapes.update({bl.name: (b,) + bl.shape for bl in layout.blocks})

    def prior(t):
        z = target.values(t)
        try:
            return model.log_prior(z)
        except KeyError as e:
            if e.args and e.args[0] in layout.names:
                raise ValueError(f"log_prior reads local latent {e.args[0]!r}; a local "
                                 "latent's prior belongs in log_likelihood (one term per "
                                 "row)") from None
            raise

    out = _trace(lambda: jax.eval_shape(prior, theta), "log_prior", shapes)
    if not (hasattr(out, "shape") and out.shape == () and jnp.issubdtype(out.dtype,
                                                                           jnp.floating)):
        raise ValueError(f"log_prior must return a float scalar, got {out}")
    local = {bl.name: jax.ShapeDtypeStruct((b,) + bl.shape, jnp.int32 if bl.discrete
                                           else dtype) for bl in layout.blocks}

    def lik(t, zl, d):
        return model.log_likelihood({**target.values(t), **zl}, d)

    out = _trace(lambda: jax.eval_shape(lik, theta, local, batch), "log_likelihood", shapes)
    if getattr(out, "shape", None) != (b,):
        raise ValueError(f"log_likelihood must return one value per observation: for a batch "
                         f"of {b} rows it returned {getattr(out, 'shape', out)}; with local "
                         f"latents z[name] has shape (B,) + its declared shape")
    for bl in layout.discrete:
        if bl.observed is not None:
            if not isinstance(batch, dict) or bl.observed not in batch:
                raise ValueError(f"local latent {bl.name!r} is observed in data key "
                                 f"{bl.observed!r}, which the data does not have")
            shape = tuple(np.shape(batch[bl.observed]))
            if shape != (b,) + bl.shape:
                raise ValueError(f"data key {bl.observed!r} (observed values of "
                                 f"{bl.name!r}) has shape {shape}; expected {(b,) + bl.shape}"
                                 " (a value outside the support marks an unobserved row)")


def fit_local(model: Model, data: Any, guide: Any, resolve_global, *, steps: int, optimizer,
              key: Any,
              num_particles: int, init, average: float, chunk_size: int, dtype: Any,
              estimator, rule: Convergence | None, max_consecutive: int,
              progress: bool | None, psis_draws: int | None = None,
              resume: FitResult | None = None,
              batch_size: int | None = None, shuffle: str = "epoch", stream: bool = False,
              kl_weight: Any = None, placement: Placement | None = None) -> FitResult:
    """The single-family driver (:func:`vijax.driver.fit_single`) for a model with local
    latents; the arguments are ``fit``'s, checked (``guide`` as given, or the resumed
    result's spec; ``resolve_global``: the global latents' family from what ``guide`` leaves
    for them; ``estimator``, ``optimizer`` may be ``None``: the defaults)."""
    from vijax.driver import family_defaults

    target = model.target
    if num_particles is not None:
        num_particles = _check_int("num_particles", num_particles)
    dtype = _resolve_dtype(dtype)
    data, host, feed, n_obs = _data_feed(model, data, dtype, batch_size, shuffle, stream,
                                         kl_weight, resume)
    if feed is None:  # the whole data each step; the local objective is always weighted
        feed = Feed(None, None)
    b = feed.minibatch.batch_size if feed.minibatch is not None else None
    probe = host.gather(np.arange(b)) if host is not None else data
    check_local_model(model, probe, dtype)
    if n_obs is None:
        n_obs = int(np.shape(jax.tree_util.tree_leaves(data)[0])[0])
    spec = guide if isinstance(guide, LocalSpec) else local_spec(
        guide, model, data if host is None else probe, resolve_global)
    if host is not None and any(isinstance(s, LocalTable) for _, s in spec.factors):
        raise ValueError("a LocalTable guide holds one row of parameters per observation of "
                         "device-resident data; a stream has no such rows: use "
                         "vj.guides.Amortized or drop stream=True")
    placed = None
    if placement is not None:
        tables = [n for n, s in spec.factors if isinstance(s, LocalTable)]
        if tables and n_obs % placement.size:
            raise ValueError(f"local latents {tables} have a LocalTable guide (one row of "
                             f"parameters per observation), split with the data over the "
                             f"{placement.size} devices of mesh axis {placement.axis!r}: N = "
                             f"{n_obs} rows do not split evenly; use a mesh axis whose size "
                             "divides N, or vj.guides.Amortized")
        _placed_data(model, data, host, feed if feed.minibatch is not None else None,
                     placement, place=False)
    if num_particles is None:  # a sampled local discrete latent: K draws for its baseline
        sampled = any(target.locals.block(n).discrete and getattr(s, "enumerate", None)
                      is False for n, s in spec.factors)
        num_particles = 8 if sampled else 1
    if resume is None:
        estimator, _, _ = family_defaults(spec, target, estimator, 1, optimizer)
        if optimizer is None:
            optimizer = local_default_optimizer(
                getattr(spec.global_spec, "default_learning_rate", 0.05),
                bool(target.params))
    chunk_len = min(chunk_size, steps)
    if rule is not None:
        noise = n_obs / b if b is not None and b < n_obs else 0.0
        rule = rule.sized(*_count(target, spec, dtype), noise_ratio=noise)
    program = compile_problem(Problem(target, spec, estimator, num_particles, optimizer,
                                      chunk_len, rule, feed, placement))
    guide_fns, objective, runner, start = (program.guide, program.objective,
                                           program.run_chunk, program.start)
    key = _check_key(key)
    # device memory, before anything is compiled or placed (vijax.memory)
    check_fit_memory(estimate_fit_memory(program, data, key=key, dtype=dtype, host=host))
    if placement is not None:
        placed = _placed_data(model, data, host, feed if feed.minibatch is not None else None,
                              placement)
        if placed is None:  # a stream: the start sees the first batch
            placed = place_rows(probe, placement)
    elif host is None:  # (on a mesh the data go to the devices only split by rows)
        data = jax.tree_util.tree_map(jnp.asarray, data)
    t0 = time.perf_counter()
    if resume is not None:
        state, k_loop, theta0 = _resumable_state(resume, rule), resume.loop_key, \
            resume.init_point
        if placement is not None:
            state, k_loop = _place_state(state, k_loop, placement)
        previous = np.asarray(resume.losses)
    else:
        fixed, mask = _fixed_init(target, init, dtype)
        first = data if host is None else probe
        if placement is not None:
            key_p, fixed, mask = place_replicated((key, fixed, mask), placement)
            first = placed
        else:
            key_p = key
        _, theta0, _, state, k_loop = start(key_p, first, fixed, mask)
        previous = np.zeros((0,), dtype)
    state, losses, n_run, wall = run_chunks(
        runner, state, data if placed is None else placed, k_loop, steps=steps,
        chunk_len=chunk_len, average=average, max_consecutive=max_consecutive, feed=feed,
        host=host, n_obs=n_obs, progress=progress, name=objective.name, previous=previous,
        t0=t0, placement=placement)
    if placement is not None:  # the result lives on one device, whatever the mesh
        state, k_loop, theta0 = to_host((state, k_loop, theta0))
    begin = int(state.step) - n_run
    conv = state.conv if isinstance(state.conv, ConvState) else None
    converged = conv is not None and bool(conv.converged)
    params = block_params(conv) if converged else state.avg_params
    if bool(state.failed) or int(state.n_nonfinite) - _skipped_before(resume) == n_run:
        last = _assemble(model, guide_fns, spec, params, state, losses, objective, optimizer,
                         theta0, k_loop, estimator, num_particles, wall, begin + steps,
                         "failed", None, feed)
        raise _nonfinite_error(target, guide_fns, objective, optimizer, state, None, k_loop,
                               max_consecutive if bool(state.failed) else 0, last,
                               num_particles)
    if not all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(params)):
        raise FloatingPointError("the fit ended with non-finite guide or model parameters; "
                                 "lower the learning rate")
    res = _assemble(model, guide_fns, spec, params, state, losses, objective, optimizer,
                    theta0, k_loop, estimator, num_particles, wall, begin + steps,
                    "converged" if converged else "max_steps", None, feed)
    if target.layers and not target.has_locals:
        res = dataclasses.replace(res, diagnostics=res.diagnostics._replace(
            k_hat_reading="not computed (Bayesian layers: their KL enters the bound in closed "
                          "form and the weights are never importance-weighted; check the "
                          "predictive with vj.metrics)"))
    elif psis_draws != 0:
        med, _, reading, draws = row_check(
            res, data if host is None else host.gather(np.arange(min(host.n, 4096))),
            jax.random.fold_in(key, 7), num_samples=min(psis_draws or 1000, 1000))
        res = dataclasses.replace(res, diagnostics=res.diagnostics._replace(
            k_hat=med, k_hat_reading=reading, psis_draws=draws))
    warn_if_untrusted(res, stacklevel=4)
    return res


def _count(target, spec: LocalSpec, dtype) -> tuple[int, bool]:
    """Parameter elements of the guide (global and local) and the model parameters."""
    from vijax.guides.local import build_local
    from vijax.guides.resolve import build_guide

    guide = build_guide(spec.global_spec, target)
    row = example_row(spec.row)
    shapes = [jax.eval_shape(guide.init, jax.random.key(0),
                             jax.ShapeDtypeStruct((target.full_dim,), dtype))]
    for f in build_local(spec, target, row):
        shapes.append(jax.eval_shape(lambda k, f=f: f.init(k, row, spec.n_rows, dtype),
                                     jax.random.key(0)))
    n = int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)))
    return n + sum(bl.size for bl in target.params), False
