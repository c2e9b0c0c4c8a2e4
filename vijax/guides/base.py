"""The one functional interface every guide family implements.

A guide is a bundle of pure functions over a flat unconstrained vector ``theta`` of length
``dim``; its parameters are a pytree. Objectives only ever call these functions, so every
objective works with every guide.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["Guide", "make_guide", "params_dtype", "softplus", "softplus_inverse"]


class Guide(NamedTuple):
    """A variational family q(theta; params) over ``theta`` of shape ``(dim,)``.

    Every family is a reparameterisation ``theta = transform(params, eps)`` of standard normal
    noise ``eps ~ N(0, I_noise_dim)``, so objectives draw the noise of all particles at once
    (one ``(K, noise_dim)`` draw per step) and ``vmap`` the transform.

    Attributes:
        name: family name (``"meanfield"``, ...).
        dim: length of ``theta``.
        noise_dim: length of the standard normal noise ``eps`` of one draw (0: point mass).
        init: ``(key, loc (dim,)) -> params``, a distribution centred at ``loc``.
        transform: ``(params, eps (noise_dim,)) -> (theta (dim,), log_q scalar)``.
        sample: ``(key, params) -> (theta (dim,), log_q scalar)``, one reparameterised draw.
        log_q: ``(params, theta (dim,)) -> scalar`` log density.
        entropy: ``params -> scalar`` closed-form entropy, or ``None`` where none exists.
        mean: ``params -> (dim,)`` the mean of ``theta`` under q, or ``None`` where it has no
            closed form (flows).
        no_jacobian: latents whose log-Jacobian the objective omits (point masses: their
            optimum is then the mode of the constrained density, as MAP means).
        point_mass: whether q is a point mass everywhere (draws are all equal).
        n_discrete: number of discrete elements at the end of ``theta`` (category indices,
            see :mod:`vijax.target`); 0 for models without discrete latents.
        discrete_log_q: ``(params, theta) -> scalar`` log mass of ``theta``'s discrete part
            alone (``None`` when ``n_discrete == 0``); estimators build their
            score-function term from it.
        discrete_entropy: ``params -> scalar`` entropy of the discrete part alone.
    """

    name: str
    dim: int
    noise_dim: int
    init: Callable[[jax.Array, jax.Array], Any]
    transform: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]
    sample: Callable[[jax.Array, Any], tuple[jax.Array, jax.Array]]
    log_q: Callable[[Any, jax.Array], jax.Array]
    entropy: Callable[[Any], jax.Array] | None
    mean: Callable[[Any], jax.Array] | None
    no_jacobian: frozenset = frozenset()
    point_mass: bool = False
    n_discrete: int = 0
    discrete_log_q: Callable[[Any, jax.Array], jax.Array] | None = None
    discrete_entropy: Callable[[Any], jax.Array] | None = None


def params_dtype(params) -> Any:
    """The floating dtype of a guide's parameters."""
    return jax.tree_util.tree_leaves(params)[0].dtype


def make_guide(name: str, dim: int, noise_dim: int, init, transform, log_q, entropy, mean,
               no_jacobian: frozenset = frozenset(), point_mass: bool = False) -> Guide:
    """Assemble a :class:`Guide`; ``sample`` draws ``eps ~ N(0, I)`` and applies ``transform``."""

    def sample(key, params):
        eps = jax.random.normal(key, (noise_dim,), params_dtype(params))
        return transform(params, eps)

    return Guide(name, dim, noise_dim, init, transform, sample, log_q, entropy, mean,
                 no_jacobian, point_mass)


def softplus(x: jax.Array) -> jax.Array:
    """``log(1 + exp(x))``, the map from raw parameters to positive scales."""
    return jax.nn.softplus(x)


def softplus_inverse(y: jax.Array) -> jax.Array:
    """Stable inverse of softplus for ``y > 0``: ``y + log(-expm1(-y))``.

    Accurate for tiny ``y`` (``~ log y``) and large ``y`` (``~ y``), where the naive
    ``log(exp(y) - 1)`` underflows or overflows.
    """
    y = jnp.asarray(y)
    return y + jnp.log(-jnp.expm1(-y))
