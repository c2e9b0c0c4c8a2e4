"""Weight priors of Bayesian layers: Gaussian (exact KL to a Gaussian q) and Blundell et al.
(2015)'s scale mixture of two Gaussians (KL estimated from one draw of the weights)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

__all__ = ["Normal", "ScaleMixture", "gaussian_kl"]


def _positive(owner: str, name: str, value) -> float:
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{owner}: {name} must be a number, got {value!r}") from None
    if not (v > 0 and math.isfinite(v)):
        raise ValueError(f"{owner}: {name} must be positive and finite, got {value!r}")
    return v


def gaussian_kl(loc: jax.Array, scale: jax.Array, prior_scale: float) -> jax.Array:
    """``sum KL(N(loc, scale^2) || N(0, prior_scale^2))`` over all elements (exact)."""
    r = scale / prior_scale
    return jnp.sum(0.5 * (r**2 + (loc / prior_scale) ** 2 - 1.0) - jnp.log(r))


@dataclasses.dataclass(frozen=True)
class Normal:
    """Independent ``N(0, scale^2)`` prior on every weight and bias; the KL of a mean-field
    Gaussian posterior to it is exact.

    Example:
        >>> Normal(0.5).scale
        0.5
    """

    scale: float = 1.0
    exact_kl = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", _positive("vj.nn.Normal", "scale", self.scale))

    def kl(self, loc: jax.Array, scale: jax.Array, key: jax.Array | None) -> jax.Array:
        del key
        return gaussian_kl(loc, scale, self.scale)

    def log_prob(self, w: jax.Array) -> jax.Array:
        return jnp.sum(-0.5 * (w / self.scale) ** 2 - jnp.log(self.scale)
                       - 0.5 * math.log(2 * math.pi))


@dataclasses.dataclass(frozen=True)
class ScaleMixture:
    """Blundell et al. (2015)'s prior ``pi N(0, scale1^2) + (1 - pi) N(0, scale2^2)`` on
    every weight and bias (``scale2`` small: a spike that pulls unneeded weights to 0).

    Its KL to a Gaussian has no closed form: it is estimated by ``log q(w) - log p(w)`` at one
    draw ``w ~ q`` per step (unbiased; it adds Monte Carlo noise to the ELBO's gradient).

    Example:
        >>> ScaleMixture().pi
        0.5
    """

    pi: float = 0.5
    scale1: float = 1.0
    scale2: float = math.exp(-6.0)
    exact_kl = False

    def __post_init__(self) -> None:
        try:
            pi = float(self.pi)
        except (TypeError, ValueError):
            raise TypeError(f"vj.nn.ScaleMixture: pi must be a number, got {self.pi!r}") \
                from None
        if not 0.0 < pi < 1.0:
            raise ValueError(f"vj.nn.ScaleMixture: pi must lie in (0, 1), got {self.pi!r}")
        object.__setattr__(self, "pi", pi)
        for name in ("scale1", "scale2"):
            object.__setattr__(self, name, _positive("vj.nn.ScaleMixture", name,
                                                     getattr(self, name)))

    def log_prob(self, w: jax.Array) -> jax.Array:
        def comp(s, p):
            return math.log(p) - 0.5 * (w / s) ** 2 - math.log(s) - 0.5 * math.log(2 * math.pi)

        return jnp.sum(logsumexp(jnp.stack([comp(self.scale1, self.pi),
                                            comp(self.scale2, 1.0 - self.pi)]), axis=0))

    def kl(self, loc: jax.Array, scale: jax.Array, key: jax.Array | None) -> jax.Array:
        key = jax.random.key(0) if key is None else key
        eps = jax.random.normal(key, loc.shape, loc.dtype)
        w = loc + scale * eps
        log_q = jnp.sum(-0.5 * eps**2 - jnp.log(scale) - 0.5 * math.log(2 * math.pi))
        return log_q - self.log_prob(w)
