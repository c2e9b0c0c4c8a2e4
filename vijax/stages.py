"""Fits made of several fits: the Laplace approximation (MAP stage, then the Hessian) and the
automatic guide ladder (``guide="auto"``). Both compose :func:`vijax.fit`."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vijax.guides.base import softplus_inverse
from vijax.guides.delta import Delta
from vijax.guides.ladder import Ladder
from vijax.guides.laplace import Laplace
from vijax.guides.resolve import build_guide, resolve_spec
from vijax.result import FitResult

__all__ = ["fit_staged", "laplace_params"]


def fit_staged(spec, model, data, kw: dict[str, Any]) -> FitResult:
    """Dispatch for the two multi-stage guides (``kw``: the other arguments of ``fit``)."""
    if isinstance(spec, Laplace):
        return fit_laplace(spec, model, data, kw)
    if isinstance(spec, Ladder):
        return fit_ladder(spec, model, data, kw)
    raise TypeError(f"not a staged guide: {spec!r}")


def laplace_params(target, loc: jax.Array, data) -> dict[str, jax.Array]:
    """Full-rank Gaussian parameters ``N(loc, H^{-1})``, ``H = -hessian(log p~)(loc)``.

    Raises ``ValueError`` naming the latents of the directions where ``H`` is not positive
    definite (or not finite)."""
    dtype = loc.dtype
    hess = jax.jit(jax.hessian(lambda t: -target.log_density(t, data)))(loc)
    h = np.asarray(hess, np.float64)
    if not np.all(np.isfinite(h)):
        bad = sorted({b.name for b in target.blocks
                      if not np.all(np.isfinite(h[b.offset:b.offset + b.size]))})
        raise ValueError(f"laplace: the Hessian of the negative log density at the mode is not "
                         f"finite (latent(s) {bad}); the mode is on a boundary or the density "
                         "is not twice differentiable there")
    h = 0.5 * (h + h.T)
    eig, vec = np.linalg.eigh(h)
    tol = 1e-8 * max(1.0, float(np.max(np.abs(eig))))
    if eig[0] <= tol:
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
    cov = (vec / eig) @ vec.T
    chol = np.linalg.cholesky(0.5 * (cov + cov.T))
    return {"loc": loc, "raw_tril": jnp.asarray(np.tril(chol, -1), dtype),
            "raw_diag": softplus_inverse(jnp.asarray(np.diag(chol), dtype))}


def fit_laplace(spec: Laplace, model, data, kw: dict[str, Any]) -> FitResult:
    from vijax.fit import _check_key, _psis_check, check_data

    target = model.target
    if target.discrete:
        raise ValueError(f"laplace needs continuous latents; {list(target.discrete_names)} "
                         "are discrete (use a variational guide)")
    psis_draws = kw.pop("psis_draws")
    mode = _fit()(model, data, guide=Delta(jacobian=True), psis_draws=0, **kw)
    loc = mode.params["loc"]
    bound = jax.tree_util.tree_map(jnp.asarray, check_data(
        model.data if data is None else data, loc.dtype))
    params = laplace_params(target, loc, bound)
    guide = build_guide(spec, target)
    check = _psis_check(target, guide, params, _check_key(kw.get("key")), psis_draws, bound)
    k_hat, ess, reading, n = (float("nan"), float("nan"), "not computed", 0) \
        if check is None else check
    diagnostics = mode.diagnostics._replace(
        objective="neg_log_joint (MAP stage, with log-Jacobian)", k_hat=k_hat, ess=ess,
        k_hat_reading=reading, psis_draws=n)
    return FitResult(model=model, guide=guide, guide_spec=spec, params=params,
                     last_params=params, opt_state=(), losses=mode.losses,
                     diagnostics=diagnostics, optimizer=mode.optimizer,
                     init_point=mode.init_point, state=None, loop_key=None,
                     estimator=mode.estimator)


def fit_ladder(spec: Ladder, model, data, kw: dict[str, Any]) -> FitResult:
    target = model.target
    if kw.get("psis_draws", 1) == 0:
        raise ValueError("guide='auto' chooses by PSIS k-hat: psis_draws must be > 0")
    rungs = [r for r in spec.rungs
             if not (r == "fullrank" and target.dim > spec.max_fullrank_dim)
             and not (r == "laplace" and target.discrete)]
    records, fitted, chosen, prev = [], [], None, kw.pop("init_from", None)
    init = kw.pop("init", None)
    for rung in rungs:
        t0 = time.perf_counter()
        try:
            res = _fit()(model, data, guide=resolve_spec(rung), init_from=prev,
                         init=init if prev is None else None, **kw)
        except (ValueError, FloatingPointError) as e:
            # a rung that cannot be fitted here (e.g. laplace at a saddle point, a non-finite
            # run) is recorded and skipped; the next rung starts from the last good one
            records.append((rung, float("nan"), float("nan"), time.perf_counter() - t0,
                            f"{type(e).__name__}: {e}"))
            continue
        d = res.diagnostics
        records.append((rung, d.final_loss, d.k_hat, time.perf_counter() - t0, ""))
        fitted.append(res)
        prev = res
        # NaN (not computed, point mass) never passes; -inf (flat weights: q is exact) does
        if rung != "delta" and d.k_hat < spec.threshold:
            chosen = res
            break
    if not fitted:
        raise ValueError("guide='auto': no rung could be fitted: " + "; ".join(
            f"{r[0]}: {r[4]}" for r in records))
    if chosen is None:  # no rung met the threshold: the one with the lowest k-hat
        scored = [r for r in fitted if not np.isnan(r.diagnostics.k_hat)] or fitted
        chosen = min(scored, key=lambda r: np.nan_to_num(r.diagnostics.k_hat, nan=np.inf,
                                                         neginf=-np.inf))
    diagnostics = chosen.diagnostics._replace(ladder=tuple(records),
                                              rung=chosen.guide_spec.name)
    return dataclasses.replace(chosen, diagnostics=diagnostics)


def _fit():
    from vijax.fit import fit

    return fit
