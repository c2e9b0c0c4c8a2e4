"""Low-rank-plus-diagonal Gaussian guide: q(theta) = N(loc, W W^T + diag(d^2))."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpyro.distributions as dist

from vijax.guides.base import Guide, softplus, softplus_inverse
from vijax.guides.meanfield import _check_init_scale

__all__ = ["LowRank"]


@dataclasses.dataclass(frozen=True)
class LowRank:
    """Gaussian with covariance ``W W^T + diag(d^2)``, ``W`` of shape ``(dim, rank)``.

    Params: ``{"loc": (dim,), "cov_factor": (dim, rank), "raw_diag": (dim,)}`` with
    ``d = softplus(raw_diag)``. Draw ``theta = loc + W e1 + d * e2``; ``log q`` and the
    closed-form entropy come from numpyro's ``LowRankMultivariateNormal`` (Woodbury and the
    matrix determinant lemma, O(dim rank^2)).

    Args:
        rank: number of columns of ``W``; ``None`` means ``max(1, round(sqrt(dim)))``
            (NumPyro's default). Must not exceed the dimension.
        init_scale: initial marginal scale per coordinate (unconstrained space).

    Example:
        >>> import vijax as vj
        >>> vj.guides.LowRank(rank=2).rank
        2
    """

    rank: int | None = None
    init_scale: float = 0.1
    name = "lowrank"

    def __post_init__(self) -> None:
        if self.rank is not None and (isinstance(self.rank, bool)
                                      or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"LowRank rank must be a positive int or None, got {self.rank!r}")
        _check_init_scale(self.init_scale)

    def resolved_rank(self, dim: int) -> int:
        rank = self.rank if self.rank is not None else max(1, round(math.sqrt(dim)))
        if rank > dim:
            raise ValueError(f"LowRank rank={rank} is larger than the dimension {dim} of the "
                             "unconstrained latents it covers; use rank <= dim or 'fullrank'")
        return rank

    def build(self, dim: int, names: tuple[str, ...]) -> Guide:
        rank = self.resolved_rank(dim)
        init_scale = self.init_scale
        # Split the initial variance between W (a little, random: W = 0 is a saddle point of
        # the ELBO) and the diagonal, so the initial marginal scale is init_scale.
        w_scale = init_scale * 0.1 / math.sqrt(rank)

        def init(key, loc):
            w = w_scale * jax.random.normal(key, (dim, rank), loc.dtype)
            diag = jnp.sqrt(jnp.maximum(init_scale**2 - rank * w_scale**2, 1e-12))
            return {"loc": loc, "cov_factor": w,
                    "raw_diag": jnp.full_like(loc, softplus_inverse(diag))}

        def _dist(params):
            d = softplus(params["raw_diag"])
            return dist.LowRankMultivariateNormal(params["loc"], params["cov_factor"], d**2)

        def sample(key, params):
            k1, k2 = jax.random.split(key)
            loc, w = params["loc"], params["cov_factor"]
            d = softplus(params["raw_diag"])
            theta = (loc + w @ jax.random.normal(k1, (rank,), loc.dtype)
                     + d * jax.random.normal(k2, (dim,), loc.dtype))
            return theta, _dist(params).log_prob(theta)

        def log_q(params, theta):
            return _dist(params).log_prob(theta)

        def entropy(params):
            return _dist(params).entropy()

        return Guide("lowrank", dim, init, sample, log_q, entropy, lambda p: p["loc"])
