"""Full-rank Gaussian guide: q(theta) = N(loc, L L^T) with a lower-triangular Cholesky factor."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpyro.distributions as dist

from vijax.guides.base import Guide, make_guide, softplus, softplus_inverse
from vijax.guides.meanfield import _check_init_scale

__all__ = ["FullRank"]


@dataclasses.dataclass(frozen=True)
class FullRank:
    """Gaussian with a dense covariance ``Sigma = L L^T``.

    Params: ``{"loc": (dim,), "raw_tril": (dim, dim), "raw_diag": (dim,)}``;
    ``L = diag(s) (I + N)``, ``s = softplus(raw_diag)``, ``N = strict_lower(raw_tril)``
    (entries of ``raw_tril`` on and above the diagonal are unused). The off-diagonal entries
    are measured in units of their row's scale (``L_ij = s_i N_ij``), so a step of the
    optimizer changes a coordinate's spread in proportion to it whatever the posterior's
    scales: with absolute entries (``L_ij = raw_ij``) Adam's steps of ~0.05 overwhelm a
    coordinate with sd 0.05 (the noise scale of an AR(5) fit blew up at step 500).
    Draw ``theta = loc + L eps``; ``log q = -sum log s - |eps|^2/2 - dim/2 log 2 pi``
    (``diag(L) = s``); entropy ``H = sum log s + dim/2 (1 + log 2 pi)``.
    :meth:`scale_tril` and :meth:`params_from` convert to and from ``(loc, L)``.

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

        _scale_tril = FullRank.scale_tril

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

    @staticmethod
    def scale_tril(params) -> jax.Array:
        """The Cholesky factor ``L`` (dim, dim) of the covariance from the params."""
        raw = params["raw_tril"]
        s = softplus(params["raw_diag"])
        unit = jnp.tril(raw, -1) + jnp.eye(raw.shape[-1], dtype=raw.dtype)
        return s[..., :, None] * unit

    @staticmethod
    def params_from(loc, scale_tril) -> dict[str, jax.Array]:
        """Params of ``N(loc, L L^T)`` for a lower-triangular ``L`` (dim, dim) with a positive
        diagonal (dtype of ``loc``)."""
        loc = jnp.asarray(loc)
        chol = jnp.asarray(scale_tril, loc.dtype)
        diag = jnp.diagonal(chol)
        return {"loc": loc, "raw_tril": jnp.tril(chol / diag[:, None], -1),
                "raw_diag": softplus_inverse(diag)}
