"""Mean-field Gaussian guide: q(theta) = prod_i Normal(theta_i | loc_i, scale_i)."""

from __future__ import annotations

import dataclasses
import math

import jax.numpy as jnp

from vijax.guides.base import Guide, make_guide, softplus, softplus_inverse

__all__ = ["MeanField"]

_HALF_LOG_2PI_E = 0.5 * (1.0 + math.log(2.0 * math.pi))


def _check_init_scale(init_scale: float) -> None:
    if not (isinstance(init_scale, int | float) and init_scale > 0 and init_scale < float("inf")):
        raise ValueError(f"init_scale must be a positive finite number, got {init_scale!r}")


@dataclasses.dataclass(frozen=True)
class MeanField:
    """Diagonal Gaussian. Params: ``{"loc": (dim,), "raw_scale": (dim,)}``, ``scale =
    softplus(raw_scale)``.

    Draw ``theta = loc + scale * eps``, ``eps ~ N(0, I)``;
    ``log q = sum_i [-log scale_i - eps_i^2 / 2] - dim/2 log(2 pi)``;
    entropy ``H = sum_i log scale_i + dim/2 (1 + log 2 pi)``.

    Args:
        init_scale: initial scale of every coordinate (unconstrained space).

    Example:
        >>> import vijax as vj
        >>> vj.guides.MeanField(init_scale=0.1).name
        'meanfield'
    """

    init_scale: float = 0.1
    name = "meanfield"
    default_learning_rate = 0.05

    def __post_init__(self) -> None:
        _check_init_scale(self.init_scale)

    def build(self, dim: int, names: tuple[str, ...]) -> Guide:
        init_scale = self.init_scale

        def init(key, loc):
            del key
            return {"loc": loc,
                    "raw_scale": jnp.full_like(loc, softplus_inverse(init_scale))}

        def log_q(params, theta):
            scale = softplus(params["raw_scale"])
            eps = (theta - params["loc"]) / scale
            return (-jnp.sum(jnp.log(scale)) - 0.5 * jnp.sum(eps**2)
                    - 0.5 * dim * jnp.log(2 * jnp.pi).astype(theta.dtype))

        def transform(params, eps):
            loc = params["loc"]
            scale = softplus(params["raw_scale"])
            log_q = (-jnp.sum(jnp.log(scale)) - 0.5 * jnp.sum(eps**2)
                     - 0.5 * dim * jnp.log(2 * jnp.pi).astype(loc.dtype))
            return loc + scale * eps, log_q

        def entropy(params):
            scale = softplus(params["raw_scale"])
            return jnp.sum(jnp.log(scale)) + dim * jnp.asarray(_HALF_LOG_2PI_E, scale.dtype)

        return make_guide("meanfield", dim, dim, init, transform, log_q, entropy,
                          lambda p: p["loc"])
