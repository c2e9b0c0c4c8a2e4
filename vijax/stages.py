"""Fits made of several fits: the Laplace approximation (MAP stage, then the Hessian), the
automatic guide ladder (``guide="auto"``) and a family fitted in preconditioned coordinates.
Their inner fits go through :func:`_fit` (``vj.fit`` without preconditioning): staged ones
back to :func:`fit_staged`, every other family to one run of :mod:`vijax.driver`."""

from __future__ import annotations

import dataclasses
import time
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vijax.checks import (
    _check_key,
    _resolve_dtype,
    check_data,
    check_fit_options,
    default_psis_draws,
)
from vijax.convergence import Convergence, ConvergenceWarning
from vijax.driver import family_defaults, fit_single
from vijax.estimators import resolve_estimator
from vijax.guides.delta import Delta
from vijax.guides.fullrank import FullRank
from vijax.guides.ladder import Ladder
from vijax.guides.laplace import Laplace
from vijax.guides.lowrank import LowRank
from vijax.guides.meanfield import MeanField
from vijax.guides.resolve import build_guide, resolve_spec
from vijax.guides.whitened import Whitened
from vijax.optim import default_optimizer
from vijax.precondition import _value_fn, newton_mode
from vijax.result import Diagnostics, FitResult
from vijax.start import initial_point
from vijax.trust import _psis_check, warn_if_untrusted

__all__ = ["fit_staged", "laplace_params"]


def fit_staged(spec, model, data, kw: dict[str, Any]) -> FitResult:
    """Dispatch for the multi-stage fits (``kw``: the other arguments of ``fit``): Laplace,
    the ladder, and any family fitted in preconditioned coordinates."""
    if isinstance(spec, Laplace):
        return fit_laplace(spec, model, data, {k: v for k, v in kw.items()
                                               if k != "precondition"})
    if isinstance(spec, Ladder):
        return fit_ladder(spec, model, data, kw)
    return fit_preconditioned(spec, model, data, kw)


def laplace_params(target, loc: jax.Array, data) -> dict[str, jax.Array]:
    """Full-rank Gaussian parameters ``N(mode, H^{-1})``, ``H = -hessian(log p~)(mode)``,
    the mode polished by Newton steps from ``loc`` (:func:`vijax.precondition.newton_mode`).

    Raises ``ValueError`` naming the latents of the directions where ``H`` is not positive
    definite (or not finite)."""
    mode, h, _, _ = newton_mode(target, loc, data)
    return _gaussian_at(target, mode, h)


def _gaussian_at(target, loc: jax.Array, h: np.ndarray) -> dict[str, jax.Array]:
    dtype = loc.dtype
    if not np.all(np.isfinite(h)):
        bad = sorted({b.name for b in target.blocks
                      if not np.all(np.isfinite(h[b.offset:b.offset + b.size]))})
        raise ValueError(f"laplace: the Hessian of the negative log density at the mode is not "
                         f"finite (latent(s) {bad}); the mode is on a boundary or the density "
                         "is not twice differentiable there")
    h = 0.5 * (h + h.T)
    # judged on the diagonally scaled Hessian (a correlation-like matrix), so that a
    # posterior whose scales differ by orders of magnitude is not mistaken for a flat one
    diag = np.abs(np.diag(h))
    s = 1.0 / np.sqrt(np.where(diag > 0, diag, 1.0))
    eig, vec = np.linalg.eigh(s[:, None] * h * s[None, :])
    tol = 1e-8 * max(1.0, float(np.max(np.abs(eig))))
    if eig[0] <= tol or np.any(diag == 0):
        names = []
        for j in np.flatnonzero(eig <= tol):
            v = np.abs(vec[:, j])
            for b in target.blocks:
                if np.max(v[b.offset:b.offset + b.size]) > 0.3 and b.name not in names:
                    names.append(b.name)
        raise ValueError(
            f"laplace: the Hessian of the negative log density at the mode is not positive "
            f"definite (smallest eigenvalue {eig[0]:.3g}) in directions of latent(s) {names}: "
            "the optimum is a saddle point or the density is flat there, so there is no "
            "Gaussian at a mode; use a variational guide (e.g. 'fullrank')")
    cov = s[:, None] * ((vec / eig) @ vec.T) * s[None, :]
    chol = np.linalg.cholesky(0.5 * (cov + cov.T))
    return FullRank.params_from(loc, jnp.asarray(chol, dtype))


def _mode(model, data, kw: dict[str, Any], no_jacobian: frozenset
          ) -> tuple[jax.Array, np.ndarray, str, FitResult | None, Any]:
    """The mode of ``log p~`` (with the log-Jacobian of the latents not in ``no_jacobian``):
    damped Newton from the initial point; where that does not reach a mode with a positive
    definite Hessian (a saddle, a far start), an Adam MAP stage first, then Newton again.

    Returns ``(mode, H, method, map_stage_result or None, bound data)``."""
    target = model.target
    dtype = _resolve_dtype(kw.get("dtype"))
    bound = jax.tree_util.tree_map(jnp.asarray, check_data(
        model.data if data is None else data, dtype))
    theta0 = initial_point(model, bound, kw.get("key"), kw.get("init"), dtype)
    mode, h, method, ok = newton_mode(target, theta0, bound, no_jacobian)
    if ok:
        return mode, h, method, None, bound
    stage_kw = {k: v for k, v in kw.items() if k not in ("psis_draws", "precondition")}
    with _quiet():
        stage = _fit(model, data, guide=Delta(jacobian=not no_jacobian), psis_draws=0,
                     **stage_kw)
    mode, h, method, _ = newton_mode(target, stage.params["loc"], bound, no_jacobian)
    return mode, h, method, stage, bound


def fit_laplace(spec: Laplace, model, data, kw: dict[str, Any]) -> FitResult:
    target = model.target
    if target.discrete:
        raise ValueError(f"laplace needs continuous latents; {list(target.discrete_names)} "
                         "are discrete (use a variational guide)")
    t0 = time.perf_counter()
    mode, h, method, stage, bound = _mode(model, data, kw, frozenset())
    params = _gaussian_at(target, mode, h)
    guide = build_guide(spec, target)
    psis_draws = _psis_count(kw.get("psis_draws"), target)
    check = _psis_check(target, guide, params, _check_key(kw.get("key")), psis_draws, bound)
    k_hat, ess, reading, n = (float("nan"), float("nan"), "not computed", 0) \
        if check is None else check
    final = float(_value_fn(target, frozenset())(params["loc"], bound))
    how = f"Newton-polished mode; Hessian by {method}"
    if stage is None:
        diagnostics = Diagnostics(
            n_steps=0, n_nonfinite_skipped=0, wall_time=time.perf_counter() - t0,
            objective="neg_log_joint at the mode (with log-Jacobian)", num_particles=1,
            final_loss=final, estimator="none (Newton)", converged=True,
            stop_reason="converged", max_steps=0, k_hat=k_hat, ess=ess,
            k_hat_reading=reading, psis_draws=n,
            criterion="converged: Newton decrement below 1e-8 per dimension",
            preconditioning=how)
        losses, optimizer, estimator, init_point = np.zeros((0,), np.asarray(mode).dtype), \
            default_optimizer(), resolve_estimator("auto"), mode
    else:
        diagnostics = stage.diagnostics._replace(
            objective="neg_log_joint (MAP stage, with log-Jacobian)", final_loss=final,
            k_hat=k_hat, ess=ess, k_hat_reading=reading, psis_draws=n,
            wall_time=time.perf_counter() - t0, preconditioning=how)
        losses, optimizer, estimator, init_point = stage.losses, stage.optimizer, \
            stage.estimator, stage.init_point
    return FitResult(model=model, guide=guide, guide_spec=spec, params=params,
                     last_params=params, opt_state=(), losses=losses,
                     diagnostics=diagnostics, optimizer=optimizer,
                     init_point=init_point, state=None, loop_key=None,
                     estimator=estimator)


def _psis_count(psis_draws, target) -> int:
    return default_psis_draws(target.dim) if psis_draws is None else int(psis_draws)


class _quiet(warnings.catch_warnings):
    """Inner fits of a staged fit do not warn: the staged fit judges its final result."""

    def __enter__(self):
        out = super().__enter__()
        warnings.simplefilter("ignore", ConvergenceWarning)
        return out


def unit_family(spec):
    """``spec`` with its Gaussian (or flow base's) initial scale at 1: in whitened
    coordinates, the spread of the approximation it starts from."""
    if hasattr(spec, "init_scale"):
        return dataclasses.replace(spec, init_scale=1.0)
    base = getattr(spec, "base", None)
    if base is not None and hasattr(base, "init_scale"):
        return dataclasses.replace(spec, base=dataclasses.replace(base, init_scale=1.0))
    return spec


_DENSE = ("fullrank", "iaf", "spline", "realnvp")


def fit_preconditioned(spec, model, data, kw: dict[str, Any]) -> FitResult:
    """``spec``'s family fitted in coordinates whitened by the curvature at the mode
    (:mod:`vijax.precondition`); ``delta``: the Newton-polished MAP itself."""
    pre = kw["precondition"]
    target = model.target
    inner = {k: v for k, v in kw.items() if k not in ("precondition", "init_from")}
    t0 = time.perf_counter()
    if spec.name == "delta":
        no_jac = frozenset(target.names) if not spec.jacobian else frozenset()
        mode, h, method, stage, bound = _mode(model, data, kw, no_jac)
        if stage is None:  # Newton reached the mode: the MAP, exactly (one step of the
            # loop builds the result's structures; its parameters are then set to the mode)
            res = _fit(model, data, guide=spec, **{
                **inner, "steps": 1, "convergence": None, "psis_draws": 0,
                "init": {k: v for k, v in target.constrain(mode).items()
                         if k in target.names}})
        else:
            res = stage
        final = float(_value_fn(target, no_jac)(mode, bound))
        params = {**res.params, "loc": mode}
        d = res.diagnostics._replace(
            final_loss=final, wall_time=time.perf_counter() - t0, converged=True,
            stop_reason="converged", criterion="converged: Newton decrement below 1e-8 per "
            "dimension at the mode", preconditioning=f"Newton-polished mode; Hessian by "
            f"{method}")
        state = res.state._replace(params=params) if res.state is not None else None
        return dataclasses.replace(res, params=params, last_params=params, diagnostics=d,
                                   state=state)
    note = ""
    source = None
    with _quiet():
        try:
            lap = fit_laplace(Laplace(), model, data, {**inner, "psis_draws": max(
                1000, _psis_count(kw.get("psis_draws"), target))})
            k = lap.diagnostics.k_hat
            if np.isfinite(k) and k < pre.max_k_hat or k == -np.inf:
                source = lap
                note = (f"whitened by the Laplace approximation at the mode (Hessian by "
                        f"{lap.diagnostics.preconditioning.split('Hessian by ')[-1]}; its "
                        f"k-hat {k:.2f})")
            else:
                note = (f"the Laplace approximation at the mode has k-hat {k:.2f} >= "
                        f"{pre.max_k_hat} (its curvature does not describe the posterior); ")
        except (ValueError, TypeError, FloatingPointError) as e:
            note = f"no Laplace approximation ({type(e).__name__}: {str(e)[:160]}); "
        if source is None:
            try:
                source = _fit(model, data, guide=MeanField(), **inner)
                note += ("whitened by a mean-field Gaussian fitted in the model's own "
                         f"coordinates (k-hat {source.diagnostics.k_hat:.2f})")
            except (ValueError, FloatingPointError) as e:  # a warm start never sinks the fit
                note += (f"not whitened: the mean-field warm start failed "
                         f"({type(e).__name__}: {str(e)[:160]})")
        if source is None:
            res = _fit(model, data, guide=spec, **inner)
        else:
            whitened = Whitened(base=unit_family(spec), full=spec.name in _DENSE)
            res = _fit(model, data, guide=whitened, init_from=source,
                       **{**inner, "init": None})
    d = res.diagnostics._replace(wall_time=time.perf_counter() - t0, preconditioning=note)
    res = dataclasses.replace(res, diagnostics=d)
    warn_if_untrusted(res, stacklevel=5)
    return res


def fit_ladder(spec: Ladder, model, data, kw: dict[str, Any]) -> FitResult:
    target = model.target
    if kw.get("psis_draws", 1) == 0:
        raise ValueError("guide='auto' chooses by PSIS k-hat: psis_draws must be > 0")
    kw = dict(kw)
    pre = kw.pop("precondition", None)
    max_k_hat = 1.0 if pre is None else pre.max_k_hat
    rungs = [r for r in spec.rungs
             if not (r == "fullrank" and target.dim > spec.max_fullrank_dim)
             and not (r == "laplace" and target.discrete)]
    records, fitted, chosen, prev = [], [], None, kw.pop("init_from", None)
    init = kw.pop("init", None)
    user_rule = kw.pop("convergence", "auto")
    have_laplace = False
    best_loss = np.inf  # the lowest final loss of a variational rung so far
    for i, rung in enumerate(rungs):
        later = rungs[i + 1:]
        if rung == "delta" and "laplace" in later:
            continue  # the Laplace rung finds the mode itself (Newton from the initial point)
        if rung == "lowrank" and "fullrank" in later:
            continue  # low rank is for dimensions where a dense covariance costs too much
        if have_laplace and rung == "meanfield" and "fullrank" in later:
            continue  # whitened by the Laplace covariance, full rank costs little more
        t0 = time.perf_counter()
        rung_spec = _rung_spec(rung, prev, spec)
        rule = user_rule
        if isinstance(rung_spec, Whitened) and isinstance(user_rule, str) and \
                user_rule == "auto":
            rule = WHITENED_CONVERGENCE
        rung_kw = kw
        if rung == "iaf" and kw.get("num_particles") is None and not target.discrete:
            rung_kw = {**kw, "num_particles": IAF_PARTICLES}
        try:
            with _quiet():
                res = _fit(model, data, guide=rung_spec, init_from=prev,
                           init=init if prev is None else None, convergence=rule, **rung_kw)
        except (ValueError, TypeError, FloatingPointError) as e:
            # a rung that cannot be fitted here (e.g. laplace at a saddle point, a non-finite
            # run) is recorded and skipped; the next rung starts from the last good one
            records.append((rung, float("nan"), float("nan"), time.perf_counter() - t0,
                            f"{type(e).__name__}: {e}"))
            continue
        d = res.diagnostics
        variational = rung in _VARIATIONAL
        # a rung that blew up (non-finite, or far worse than a simpler rung it started
        # from) is never returned, and nothing builds on it
        worse = variational and np.isfinite(best_loss) and \
            d.final_loss > best_loss + max(5.0, 0.05 * abs(best_loss))
        if variational and (not np.isfinite(d.final_loss) or worse):
            records.append((rung, d.final_loss, d.k_hat, time.perf_counter() - t0,
                            f"rejected: final loss {d.final_loss:.4g} against "
                            f"{best_loss:.4g} for a simpler rung"))
            continue
        records.append((rung, d.final_loss, d.k_hat, time.perf_counter() - t0, ""))
        fitted.append((rung, res))
        if variational:
            best_loss = min(best_loss, d.final_loss)
        if rung == "laplace":
            # the curvature at the mode whitens the next rungs only where it describes the
            # posterior (not at a funnel's neck: there the mean-field rung comes first)
            if np.isfinite(d.k_hat) and d.k_hat < max_k_hat or d.k_hat == -np.inf:
                have_laplace, prev = True, res
        else:
            prev = res
        # the Laplace rung is final only when no variational rung follows: a Gaussian fitted
        # to the ELBO in its whitened coordinates matches the mean where the mode does not
        # (skewed scale parameters); NaN (not computed, point mass) never passes; -inf (flat
        # weights: q is exact) does
        final = rung not in ("delta", "laplace") or not any(r in _VARIATIONAL for r in later)
        if final and rung != "delta" and d.k_hat < spec.threshold and \
                "PSIS-corrected" not in d.k_hat_reading:
            chosen = res
            break
    if not fitted:
        raise ValueError("guide='auto': no rung could be fitted: " + "; ".join(
            f"{r[0]}: {r[4]}" for r in records))
    if chosen is None:
        # no rung met the threshold: the variational rung with the best bound (lowest
        # loss: the smallest KL(q || p), comparable across families), else the lowest k-hat
        # (by rung name: with discrete latents the guide's own name has a suffix)
        scored = [r for name, r in fitted if name in _VARIATIONAL
                  and np.isfinite(r.diagnostics.final_loss)]
        if scored:
            chosen = min(scored, key=lambda r: r.diagnostics.final_loss)
        else:
            scored = [r for _, r in fitted if not np.isnan(r.diagnostics.k_hat)] or \
                [r for _, r in fitted]
            chosen = min(scored, key=lambda r: np.nan_to_num(
                r.diagnostics.k_hat, nan=np.inf, neginf=-np.inf))
    diagnostics = chosen.diagnostics._replace(ladder=tuple(records),
                                              rung=chosen.guide_spec.name)
    res = dataclasses.replace(chosen, diagnostics=diagnostics)
    warn_if_untrusted(res, stacklevel=5)
    return res


_VARIATIONAL = ("meanfield", "lowrank", "fullrank", "iaf")
IAF_PARTICLES = 4
"""Particles per step of the IAF rung unless ``num_particles`` is given: on posteriordb's
gp_pois_regr the whitened IAF with one particle ended 0.13 nats *worse* than the full-rank
Gaussian it started from (49.23 vs 49.09), with four 0.8 nats better (48.29), at about twice
the time per step (the particles are vectorised)."""
WHITENED_CONVERGENCE = Convergence()
"""The stopping rule of the whitened rungs (under ``convergence="auto"``): the default one,
whose gradient test is in posterior sds in whitened coordinates."""


_UNIT = {"meanfield": MeanField(init_scale=1.0), "lowrank": LowRank(init_scale=1.0),
         "fullrank": FullRank(init_scale=1.0)}


def _rung_spec(rung: str, prev: FitResult | None, ladder: Ladder):
    """A rung's guide: above a fitted distribution (not a point mass), the family is fitted
    in coordinates whitened by it (:class:`Whitened`: dense for full-rank and IAF, diagonal
    for mean-field and low-rank), starting at its spread. Only up to ``max_fullrank_dim``
    dimensions: the whitening is computed from the dense covariance (O(dim^2) memory,
    O(dim^3) time), so larger models climb the plain families as before."""
    spec = resolve_spec(rung)
    if prev is None or prev.guide.point_mass or rung not in _VARIATIONAL \
            or prev.target.dim > ladder.max_fullrank_dim:
        return spec
    return Whitened(base=_UNIT.get(rung, spec), full=rung in ("fullrank", "iaf"))


def _fit(model, data, *, guide, steps, optimizer, key, num_particles, init, average,
         chunk_size, dtype, estimator, convergence, max_consecutive_nonfinite, progress,
         psis_draws, init_from=None) -> FitResult:
    """``vj.fit(model, data, guide=guide, precondition=None, ...)`` for the fits a staged fit
    is made of (the arguments are ``fit``'s, as the outer fit got them): Laplace and the
    ladder come back to :func:`fit_staged`, every other family is one run of the driver."""
    steps, chunk_size, max_consecutive, psis_draws, rule = check_fit_options(
        model, steps, chunk_size, max_consecutive_nonfinite, psis_draws, average, progress,
        convergence)
    spec = resolve_spec(guide)
    if isinstance(spec, Laplace | Ladder):
        return fit_staged(spec, model, data, dict(
            steps=steps, optimizer=optimizer, key=key, num_particles=num_particles, init=init,
            average=average, chunk_size=chunk_size, dtype=dtype, init_from=init_from,
            estimator=estimator, convergence=convergence,
            max_consecutive_nonfinite=max_consecutive_nonfinite, progress=progress,
            psis_draws=psis_draws, precondition=None))
    estimator, num_particles, optimizer = family_defaults(spec, model.target, estimator,
                                                          num_particles, optimizer)
    return fit_single(model, data, spec, steps=steps, optimizer=optimizer, key=key,
                      num_particles=num_particles, init=init, average=average,
                      chunk_size=chunk_size, dtype=dtype, init_from=init_from,
                      estimator=estimator, rule=rule, max_consecutive=max_consecutive,
                      progress=progress, psis_draws=psis_draws)
