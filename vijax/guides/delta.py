"""Delta guide: a point mass q(theta) = delta(theta - loc); fitting it gives the MAP estimate."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from vijax.guides.base import Guide, make_guide

__all__ = ["Delta"]


@dataclasses.dataclass(frozen=True)
class Delta:
    """Point-mass guide (MAP). Params: ``{"loc": (dim,)}``.

    The objective maximises the log joint *without* the log-Jacobian of the latents it
    covers, so the optimum is the mode of the posterior density of the constrained values
    (the usual MAP, as NumPyro's ``AutoDelta``), not of their unconstrained images.
    ``Delta(jacobian=True)`` keeps the log-Jacobian: the mode of the unconstrained density
    (the first stage of :class:`vijax.guides.Laplace`).

    Example:
        >>> import vijax as vj
        >>> vj.guides.Delta().name
        'delta'
    """

    jacobian: bool = False
    name = "delta"
    default_learning_rate = 0.05

    def build(self, dim: int, names: tuple[str, ...]) -> Guide:
        def init(key, loc):
            del key
            return {"loc": loc}

        def transform(params, eps):
            del eps  # no noise: noise_dim is 0
            return params["loc"], jnp.zeros((), params["loc"].dtype)

        def log_q(params, theta):
            # A point mass has no density; 0 keeps ELBO-style objectives equal to log p(loc).
            return jnp.zeros((), theta.dtype)

        def entropy(params):
            return jnp.zeros((), params["loc"].dtype)

        # jacobian=True maximises the unconstrained density instead (the Laplace stage)
        no_jacobian = frozenset() if self.jacobian else frozenset(names)
        return make_guide("delta", dim, 0, init, transform, log_q, entropy,
                          lambda p: p["loc"], no_jacobian, point_mass=True)
