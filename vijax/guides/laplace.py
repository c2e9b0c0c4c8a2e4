"""Laplace approximation: MAP in unconstrained space, then the Gaussian at the mode with the
inverse Hessian of the negative log density as covariance.

``fit(..., guide="laplace")`` runs two stages: (1) maximise the unconstrained target density
``log p~(theta)`` (log joint plus log-Jacobian; ``Delta(jacobian=True)``) with the compiled loop;
(2) Newton steps (Levenberg-Marquardt damped, each accepted only if it lowers ``-log p~``)
polish the mode, which Adam's iterates only hover around at a distance set by its step size
(and on badly scaled posteriors, coefficients of order 1e4, may not reach in the budget);
``H = -hessian(log p~)(theta_map)`` by automatic differentiation, and
``q = N(theta_map, H^{-1})``, stored as a full-rank Gaussian (``L = chol(H^{-1})``), so the
result samples, summarises and is diagnosed (PSIS) like any Gaussian guide. A Hessian that is
not positive definite (a saddle point, a flat direction; judged on the diagonally scaled
Hessian, so that scales 1e8 apart are not mistaken for flatness) raises, naming the latents in
the offending directions.
"""

from __future__ import annotations

import dataclasses

from vijax.guides.base import Guide
from vijax.guides.fullrank import FullRank

__all__ = ["Laplace"]


@dataclasses.dataclass(frozen=True)
class Laplace:
    """Laplace approximation at the unconstrained mode (see the module docstring).

    Params: those of :class:`FullRank` (``loc``, ``raw_tril``, ``raw_diag``).

    Example:
        >>> import vijax as vj
        >>> vj.guides.Laplace().name
        'laplace'
    """

    name = "laplace"
    default_learning_rate = 0.05

    def build(self, dim: int, names: tuple[str, ...]) -> Guide:
        return FullRank().build(dim, names)._replace(name="laplace")
