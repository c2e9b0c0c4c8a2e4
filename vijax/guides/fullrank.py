"""Full-rank Gaussian guide: q(theta) = N(loc, L L^T) with a lower-triangular Cholesky factor."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpyro.distributions as dist

from vijax.guides.base import Guide, make_guide, softplus, softplus_inverse
from vijax.guides.meanfield import _check_init_scale

__all__ = ["FullRank"]


@dataclasses.dataclass(frozen=True)
class FullRank:
    """Gaussian with a dense covariance ``Sigma = L L^T``.

    Params: ``{"loc": (dim,), "raw_tril": (dim, dim), "raw_diag": (dim,)}``;
    ``L = strict_lower(raw_tril) + diag(softplus(raw_diag))`` (entries of ``raw_tril`` on and
    above the diagonal are unused). Draw ``theta = loc + L eps``;
    ``log q = -sum log diag(L) - |eps|^2/2 - dim/2 log 2 pi``;
    entropy ``H = sum log diag(L) + dim/2 (1 + log 2 pi)``.

    Args:
        init_scale: initial scale per coordinate (``L = init_scale * I``).

    Example:
        >>> import vijax as vj
        >>> vj.guides.FullRank().name
        'fullrank'
    """

    init_scale: float = 0.1
    name = "fullrank"
    default_learning_rate = 0.05

    def __post_init__(self) -> None:
        _check_init_scale(self.init_scale)

    def build(self, dim: int, names: tuple[str, ...]) -> Guide:
        init_scale = self.init_scale

        def init(key, loc):
            del key
            return {"loc": loc, "raw_tril": jnp.zeros((dim, dim), loc.dtype),
                    "raw_diag": jnp.full_like(loc, softplus_inverse(init_scale))}

        def _scale_tril(params):
            return (jnp.tril(params["raw_tril"], -1)
                    + jnp.diag(softplus(params["raw_diag"])))

        def transform(params, eps):
            loc = params["loc"]
            scale_tril = _scale_tril(params)
            log_q = (-jnp.sum(jnp.log(jnp.diagonal(scale_tril))) - 0.5 * jnp.sum(eps**2)
                     - 0.5 * dim * jnp.log(2 * jnp.pi).astype(loc.dtype))
            return loc + scale_tril @ eps, log_q

        def log_q(params, theta):
            return dist.MultivariateNormal(params["loc"], scale_tril=_scale_tril(params)
                                           ).log_prob(theta)

        def entropy(params):
            return dist.MultivariateNormal(params["loc"], scale_tril=_scale_tril(params)
                                           ).entropy()

        return make_guide("fullrank", dim, dim, init, transform, log_q, entropy,
                          lambda p: p["loc"])
