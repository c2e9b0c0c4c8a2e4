"""Objectives: Monte Carlo estimates of the negative ELBO, written for one draw and vmapped.

    ELBO(params) = E_q[log p~(theta)] + H[q]            (closed-form entropy H, when known)
                 = E_q[log p~(theta) - log q(theta)]     (otherwise)

with ``theta = g(eps; params)`` reparameterised, ``p~`` the unconstrained target density
(:mod:`vijax.target`). With ``K = num_particles`` draws the estimate is the average over the K
draws; its gradient is an unbiased estimate of the ELBO gradient (Kingma & Welling 2014;
Titsias & Lazaro-Gredilla 2014). The loss is what is minimised: ``neg_elbo``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from vijax.guides.base import Guide, params_dtype

__all__ = ["Objective", "elbo"]


class Objective(NamedTuple):
    """A loss to minimise. ``loss(key, params, data) -> scalar`` (e.g. the negative ELBO)."""

    name: str
    loss: Callable[[jax.Array, Any, Any], jax.Array]


def elbo(target, guide: Guide, num_particles: int = 1) -> Objective:
    """Reparameterised negative ELBO with ``num_particles`` draws vectorised by ``vmap``.

    Args:
        target: the :class:`vijax.target.Target` (its ``log_density(theta, data)``).
        guide: the guide functions.
        num_particles: K, the number of draws averaged per estimate.

    Returns:
        ``Objective("neg_elbo", loss)`` with ``loss(key, params, data) -> scalar``
        (``"neg_log_joint"`` for point-mass guides, where it is ``-log p~(loc)``).
    """
    no_jacobian = guide.no_jacobian
    use_entropy = guide.entropy is not None

    def one_draw(eps, params, data):
        theta, log_q = guide.transform(params, eps)
        log_p = target.log_density(theta, data, no_jacobian)
        return log_p if use_entropy else log_p - log_q

    def loss(key, params, data):
        k = 1 if guide.point_mass else num_particles
        # the noise of all particles in one draw: (K, noise_dim)
        eps = jax.random.normal(key, (k, guide.noise_dim), params_dtype(params))
        if k == 1:
            terms = one_draw(eps[0], params, data)[None]
        else:
            terms = jax.vmap(one_draw, in_axes=(0, None, None))(eps, params, data)
        value = jnp.mean(terms)
        if use_entropy:
            value = value + guide.entropy(params)
        return -value

    # With a point mass the "ELBO" is log p(loc): name the loss for what it is.
    return Objective("neg_log_joint" if guide.point_mass else "neg_elbo", loss)
