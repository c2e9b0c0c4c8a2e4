"""Scale-aware optimisation by default: where a fit's coordinates are whitened, and how.

Adam's steps are about its step size in absolute units whatever the gradient's scale, so one
step size cannot suit a posterior whose scales differ by orders of magnitude, and an
ill-conditioned valley is crossed at a crawl that the loss barely registers. ``vj.fit``
therefore fits every family (``precondition="auto"``) in coordinates whitened by the
curvature of the log density at its mode (:class:`vijax.guides.Whitened`): the mode is found by
damped Newton steps from the initial point (:func:`newton_mode`), the Hessian there is taken by
the first method that works on the model (:mod:`vijax.curvature`: forward-over-reverse,
reverse-over-reverse for ``custom_vjp``/``odeint`` densities, else finite differences of
gradients), and the fit runs in ``u`` with ``theta = mode + T u``. The staged fit itself is
:func:`vijax.stages.fit_preconditioned`; this module holds the configuration and the
target-level numerics (no fitting).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vijax.curvature import hessian_fn

__all__ = ["Precondition", "resolve_precondition", "preconditionable", "newton_mode",
           "PRECONDITIONED_FAMILIES"]

PRECONDITIONED_FAMILIES = ("delta", "meanfield", "lowrank", "fullrank", "iaf", "spline",
                           "realnvp")


@dataclasses.dataclass(frozen=True)
class Precondition:
    """How ``vj.fit`` whitens a fit's coordinates (``precondition=`` of :func:`vijax.fit`).

    Args:
        max_dim: whiten models of at most this many unconstrained dimensions (the curvature
            is a dense ``(dim, dim)`` Hessian: ``dim`` gradient passes and ``O(dim^2)``
            memory); larger models are fitted in their own coordinates.
        max_k_hat: the Laplace approximation at the mode whitens the fit only when its PSIS
            k-hat is below this; otherwise (a funnel, whose curvature at the mode is
            many orders of magnitude off the bulk of the posterior) a mean-field Gaussian
            fitted in the model's own coordinates provides the whitening.

    Example:
        >>> import vijax as vj
        >>> vj.Precondition(max_dim=500).max_dim
        500
    """

    max_dim: int = 1000
    max_k_hat: float = 1.0

    def __post_init__(self) -> None:
        m = self.max_dim
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"Precondition max_dim must be an int >= 1, got {m!r}")
        k = self.max_k_hat
        if isinstance(k, bool) or not isinstance(k, int | float) or not k > 0:
            raise ValueError(f"Precondition max_k_hat must be a positive number, got {k!r}")
        object.__setattr__(self, "max_k_hat", float(k))


def resolve_precondition(precondition: Any) -> Precondition | None:
    """``"auto"``/``True`` -> ``Precondition()``; ``None``/``False`` -> off; an object as is."""
    if precondition is None or precondition is False:
        return None
    if precondition is True or (isinstance(precondition, str) and precondition == "auto"):
        return Precondition()
    if isinstance(precondition, Precondition):
        return precondition
    raise TypeError(f"precondition must be 'auto', True, False/None or a "
                    f"vj.Precondition(...), got {precondition!r}")


def preconditionable(spec, target, precondition: Precondition) -> bool:
    """Whether ``fit`` whitens this guide on this model: a single family (not a structured
    dict, not already whitened), continuous latents only, at most ``max_dim`` dimensions."""
    from vijax.guides.whitened import Whitened

    return (getattr(spec, "name", None) in PRECONDITIONED_FAMILIES
            and not isinstance(spec, Whitened) and not target.discrete
            and 1 <= target.dim <= precondition.max_dim)


@functools.lru_cache(maxsize=64)
def _negative_density(target, no_jacobian: frozenset):
    """``(theta, data) -> -log p~(theta)``: one function object per target, so that the
    compiled curvature (:func:`vijax.curvature.hessian_fn` caches on it) is reused."""
    def neg(theta, data):
        return -target.log_density(theta, data, no_jacobian)

    return neg


@functools.lru_cache(maxsize=64)
def _value_fn(target, no_jacobian: frozenset):
    return jax.jit(_negative_density(target, no_jacobian))


def curvature_at(target, theta, data, no_jacobian: frozenset = frozenset()):
    """``Curvature(value, grad, hess, method)`` of ``-log p~`` at ``theta`` (see
    :mod:`vijax.curvature`)."""
    return hessian_fn(_negative_density(target, no_jacobian))(theta, data)


def newton_mode(target, theta: jax.Array, data, no_jacobian: frozenset = frozenset(),
                max_iter: int = 100) -> tuple[jax.Array, np.ndarray, str, bool]:
    """The mode of ``log p~`` by damped Newton steps (Levenberg-Marquardt) from ``theta``.

    Each iteration solves ``(H + lam D) step = g`` with ``D = diag(|H_ii|)`` and the smallest
    ``lam`` in (0, 1e-6, 1e-5, ..., 1e8) that makes the matrix positive definite *and* the step
    lower ``-log p~`` (far from the mode a scaled gradient step, near it a Newton step), in
    float64 on the host. Stops when the Newton decrement ``g^T H^-1 g / 2`` is below 1e-8 per
    dimension (converged) or no step lowers the objective.

    Returns:
        ``(mode (dim,), H (dim, dim) float64 at the mode, method, converged)``; ``method``
        names how the Hessian was computed.
    """
    value = _value_fn(target, no_jacobian)
    dtype = theta.dtype
    f, g, h, method = curvature_at(target, theta, data, no_jacobian)
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
            if lam == 0.0 and 0.5 * float(g64 @ step) < 1e-8 * theta.size:
                return theta, h64, method, True
            cand = theta - jnp.asarray(step, dtype)
            fc = float(value(cand, data))
            if np.isfinite(fc) and fc < f0:
                theta, moved = cand, True
                break
        if not moved:
            break
        f, g, h, method = curvature_at(target, theta, data, no_jacobian)
    h64 = np.asarray(h, np.float64)
    converged = False
    if np.all(np.isfinite(h64)):
        # rounding may stop the steps at the mode: converged if H is positive definite and
        # the remaining Newton step is below a thousandth of the local scale
        try:
            chol = np.linalg.cholesky(0.5 * (h64 + h64.T))
            step = np.linalg.solve(chol.T, np.linalg.solve(chol, np.asarray(g, np.float64)))
            converged = bool(np.all(np.abs(step) * np.sqrt(np.abs(np.diag(h64))) < 1e-2))
        except np.linalg.LinAlgError:
            pass
    return theta, h64, method, converged
