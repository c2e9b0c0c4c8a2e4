"""Fits made of several fits: the Laplace approximation (MAP stage, then the Hessian) and the
automatic guide ladder (``guide="auto"``). Both compose :func:`vijax.fit`."""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vijax.convergence import Convergence
from vijax.guides.delta import Delta
from vijax.guides.fullrank import FullRank
from vijax.guides.ladder import Ladder
from vijax.guides.laplace import Laplace
from vijax.guides.lowrank import LowRank
from vijax.guides.meanfield import MeanField
from vijax.guides.resolve import build_guide, resolve_spec
from vijax.guides.whitened import Whitened
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
    loc, h = _newton_mode(target, loc, data)
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


@functools.lru_cache(maxsize=32)
def _newton_fns(target):
    """Compiled ``(theta, data) -> (-log p~, gradient, Hessian)`` and ``-log p~``, one pair
    per target (so a repeat Laplace fit does not compile them again)."""
    def neg(t, data):
        return -target.log_density(t, data)

    both = jax.jit(lambda t, data: (neg(t, data), jax.grad(neg)(t, data),
                                    jax.hessian(neg)(t, data)))
    return both, jax.jit(neg)


def _newton_mode(target, loc: jax.Array, data, max_iter: int = 50
                 ) -> tuple[jax.Array, np.ndarray]:
    """Polish a stochastic-optimizer mode with damped Newton steps (Levenberg-Marquardt);
    returns the mode and the Hessian of ``-log p~`` there (float64, on the host).

    The MAP stage's Adam iterates hover around the mode at a distance set by the step size,
    not by the posterior's scale, and on badly scaled posteriors (coefficients of order 1e4,
    |corr| 0.999) they may not reach it at all in the step budget; Newton's method converges
    in a few steps from there. Each iteration solves ``(H + lam D) step = g`` with
    ``D = diag(|H_ii|)`` and the smallest ``lam`` in (0, 1e-6, 1e-5, ...) that makes the
    matrix positive definite *and* the step lower ``-log p~`` (so far from the mode it is a
    scaled gradient step, near it a Newton step). Stops when the Newton decrement
    ``g^T step / 2`` is below 1e-8 per dimension or no step lowers the objective (rounding).
    """
    value_grad_hess_fn, value_fn = _newton_fns(target)

    def value_grad_hess(t):
        return value_grad_hess_fn(t, data)

    def value(t):
        return value_fn(t, data)

    dtype = loc.dtype
    f, g, h = value_grad_hess(loc)
    for _ in range(max_iter):
        h64, g64, f0 = np.asarray(h, np.float64), np.asarray(g, np.float64), float(f)
        if not (np.all(np.isfinite(h64)) and np.all(np.isfinite(g64)) and np.isfinite(f0)):
            break
        h64 = 0.5 * (h64 + h64.T)
        d = np.abs(np.diag(h64)) + 1e-12 * max(1.0, float(np.max(np.abs(h64))))
        moved = False
        for lam in (0.0, *(10.0 ** np.arange(-6, 9))):
            try:
                chol = np.linalg.cholesky(h64 + lam * np.diag(d))
            except np.linalg.LinAlgError:
                continue
            step = np.linalg.solve(chol.T, np.linalg.solve(chol, g64))
            if lam == 0.0 and 0.5 * float(g64 @ step) < 1e-8 * loc.size:
                return loc, h64
            cand = loc - jnp.asarray(step, dtype)
            fc = float(value(cand))
            if np.isfinite(fc) and fc < f0:
                loc, moved = cand, True
                break
        if not moved:
            break
        f, g, h = value_grad_hess(loc)
    return loc, np.asarray(h, np.float64)


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
    # the loss at the Newton-polished mode, not the MAP stage's last Adam iterates
    final = float(_newton_fns(target)[1](params["loc"], bound))
    diagnostics = mode.diagnostics._replace(
        objective="neg_log_joint (MAP stage, with log-Jacobian)", final_loss=final,
        k_hat=k_hat, ess=ess,
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
    user_rule = kw.pop("convergence", "auto")
    have_laplace = False
    for i, rung in enumerate(rungs):
        later = rungs[i + 1:]
        if have_laplace and rung in ("meanfield", "lowrank") and "fullrank" in later:
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
            res = _fit()(model, data, guide=rung_spec, init_from=prev,
                         init=init if prev is None else None, convergence=rule, **rung_kw)
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
        if rung == "laplace":
            have_laplace = True
        # the Laplace rung is final only when no variational rung follows: a Gaussian fitted
        # to the ELBO in its whitened coordinates matches the mean where the mode does not
        # (skewed scale parameters); NaN (not computed, point mass) never passes; -inf (flat
        # weights: q is exact) does
        final = rung not in ("delta", "laplace") or not any(r in _VARIATIONAL for r in later)
        if final and rung != "delta" and d.k_hat < spec.threshold:
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


_VARIATIONAL = ("meanfield", "lowrank", "fullrank", "iaf")
IAF_PARTICLES = 4
"""Particles per step of the IAF rung unless ``num_particles`` is given: on posteriordb's
gp_pois_regr the whitened IAF with one particle ended 0.13 nats *worse* than the full-rank
Gaussian it started from (49.23 vs 49.09), with four 0.8 nats better (48.29), at about twice
the time per step (the particles are vectorised)."""
WHITENED_CONVERGENCE = Convergence(window=500, patience=2)
"""The stopping rule of the whitened rungs (under ``convergence="auto"``): they start near
their optimum, so the default rule (window 200) stops at 600 steps with a 400-iterate average
whose Monte Carlo error is about 0.1 posterior sd; 500-step blocks average 1,000 iterates."""


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


def _fit():
    from vijax.fit import fit

    return fit
