"""``guide="auto"``: the ladder of guide families, fitted from the simplest up.

delta -> laplace -> meanfield -> lowrank -> fullrank (when ``dim <= max_fullrank_dim``) ->
iaf, each rung warm-started from the one below (``init_from``), stopping at the first
variational rung whose PSIS k-hat is below ``threshold`` (Yao et al. 2018: 0.7). The delta rung
(a point mass, no k-hat) only provides the starting point.

Every rung above a fitted distribution is fitted in coordinates *whitened* by it
(:class:`vijax.guides.Whitened`: ``theta = mean + T u``, ``T`` the Cholesky factor of its
covariance for full-rank and IAF, its conditional sds for mean-field and low-rank), starting
at that distribution, so that the optimizer's steps are in posterior sds and correlations are
gone before the fit starts. When the Laplace rung succeeds (a positive definite Hessian at the
Newton-polished mode), mean-field and low-rank are skipped for the full-rank Gaussian (they
exist for dimensions where a dense covariance is too costly), and Laplace is chosen only when
no variational rung follows it: its mean is the mode, which misses the mean of skewed scale
parameters by up to ~0.4 sd on posteriordb's arK and kidiq where the whitened full-rank fit
does not. The fit itself is :func:`vijax.stages.fit_ladder`.
"""

from __future__ import annotations

import dataclasses

__all__ = ["Ladder", "RUNGS"]

RUNGS = ("delta", "laplace", "meanfield", "lowrank", "fullrank", "iaf")


@dataclasses.dataclass(frozen=True)
class Ladder:
    """Configuration of the automatic guide ladder.

    Args:
        threshold: stop at the first rung with PSIS k-hat below this (0 < threshold).
        rungs: the families to climb, a sub-sequence of ``RUNGS`` in that order.
        max_fullrank_dim: skip the full-rank rung above this many unconstrained dimensions.

    Example:
        >>> import vijax as vj
        >>> vj.guides.Ladder(threshold=0.5).rungs[-1]
        'iaf'
    """

    threshold: float = 0.7
    rungs: tuple[str, ...] = RUNGS
    max_fullrank_dim: int = 200
    name = "auto"

    def __post_init__(self) -> None:
        t = self.threshold
        if isinstance(t, bool) or not isinstance(t, int | float) or not 0 < t < float("inf"):
            raise ValueError(f"Ladder threshold must be a positive number, got {t!r}")
        rungs = tuple(self.rungs)
        if not rungs or any(r not in RUNGS for r in rungs) or \
                list(rungs) != sorted(rungs, key=RUNGS.index) or len(set(rungs)) != len(rungs):
            raise ValueError(f"Ladder rungs must be a non-empty sub-sequence of {RUNGS} in that "
                             f"order, got {self.rungs!r}")
        m = self.max_fullrank_dim
        if isinstance(m, bool) or not isinstance(m, int) or m < 1:
            raise ValueError(f"Ladder max_fullrank_dim must be an int >= 1, got {m!r}")
        object.__setattr__(self, "rungs", rungs)
        object.__setattr__(self, "threshold", float(t))
