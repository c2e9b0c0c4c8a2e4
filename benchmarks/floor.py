"""The floor: a hand-written reparameterised ELBO loop in pure JAX, one ``lax.scan`` under ``jit``.

Nothing but the maths: per step, K draws ``theta = loc + L eps`` (vmapped), the negative ELBO
``-(mean_k log p~(theta_k) + H[q])`` with the closed-form Gaussian entropy ``H``, its gradient,
one optax update. No step mask, no non-finite guard, no iterate averaging. Step keys are split
up front inside the compiled program and fed to the scan.

* mean-field: ``theta = loc + softplus(raw) * eps``, ``H = sum log scale + dim/2 (1 + log 2 pi)``;
* low-rank: ``theta = loc + W e1 + d * e2`` with ``d = softplus(raw)``,
  ``Sigma = W W^T + diag(d^2)``, ``log det Sigma = 2 sum log d + log det(I_r + W^T D^-2 W)``
  (matrix determinant lemma), ``H = log det Sigma / 2 + dim/2 (1 + log 2 pi)``;
* full-rank (vijax's parameterisation): ``theta = loc + L eps``, ``L = diag(s) (I + N)`` with
  ``N`` strictly lower triangular, ``H = sum log s + dim/2 (1 + log 2 pi)``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

__all__ = ["make_floor"]

_HALF_LOG_2PI_E = 0.5 * (1.0 + math.log(2.0 * math.pi))


def _softplus_inverse(y: float) -> float:
    return y + math.log(-math.expm1(-y))


def _meanfield(dim: int):
    def init(key, loc):
        del key
        return {"loc": loc, "raw": jnp.full_like(loc, _softplus_inverse(0.1))}

    def draw(key, p):
        return p["loc"] + jax.nn.softplus(p["raw"]) * jax.random.normal(key, (dim,))

    def entropy(p):
        return jnp.sum(jnp.log(jax.nn.softplus(p["raw"]))) + dim * _HALF_LOG_2PI_E

    return init, draw, entropy


def _lowrank(dim: int, rank: int):
    def init(key, loc):
        w = 0.01 / math.sqrt(rank) * jax.random.normal(key, (dim, rank))
        return {"loc": loc, "w": w, "raw": jnp.full_like(loc, _softplus_inverse(0.1))}

    def draw(key, p):
        k1, k2 = jax.random.split(key)
        return (p["loc"] + p["w"] @ jax.random.normal(k1, (rank,))
                + jax.nn.softplus(p["raw"]) * jax.random.normal(k2, (dim,)))

    def entropy(p):
        d = jax.nn.softplus(p["raw"])
        wd = p["w"] / d[:, None]
        chol = jnp.linalg.cholesky(jnp.eye(rank) + wd.T @ wd)
        log_det = 2.0 * jnp.sum(jnp.log(d)) + 2.0 * jnp.sum(jnp.log(jnp.diagonal(chol)))
        return 0.5 * log_det + dim * _HALF_LOG_2PI_E

    return init, draw, entropy


def _fullrank(dim: int):
    """vijax's parameterisation: ``L = diag(s) (I + strict_lower(raw_tril))``,
    ``s = softplus(raw_diag)``, so ``H = sum log s + dim/2 (1 + log 2 pi)``."""
    def init(key, loc):
        del key
        return {"loc": loc, "raw_tril": jnp.zeros((dim, dim)),
                "raw_diag": jnp.full_like(loc, _softplus_inverse(0.1))}

    def draw(key, p):
        scale_tril = jax.nn.softplus(p["raw_diag"])[:, None] * (
            jnp.tril(p["raw_tril"], -1) + jnp.eye(dim))
        return p["loc"] + scale_tril @ jax.random.normal(key, (dim,))

    def entropy(p):
        return jnp.sum(jnp.log(jax.nn.softplus(p["raw_diag"]))) + dim * _HALF_LOG_2PI_E

    return init, draw, entropy


def make_floor(log_density: Callable[[jax.Array, Any], jax.Array], dim: int, guide: str,
               rank: int, num_particles: int, optimizer: optax.GradientTransformation):
    """Build the floor for one configuration.

    Args:
        log_density: ``(theta (dim,), data) -> scalar`` unconstrained log density.
        dim: length of ``theta``.
        guide: ``"meanfield"``, ``"lowrank"`` or ``"fullrank"``.
        rank: columns of ``W`` for the low-rank guide.
        num_particles: K draws per gradient estimate.
        optimizer: optax transformation.

    Returns:
        ``(init, run)``: jitted ``init(key) -> (params, opt_state)`` (``loc`` uniform in
        (-2, 2), as vijax and NumPyro start) and
        ``run(params, opt_state, data, key, steps) -> (params, opt_state, losses (steps,))``
        (``steps`` static: one compiled program per length).
    """
    init_q, draw, entropy = (_meanfield(dim) if guide == "meanfield" else _fullrank(dim)
                             if guide == "fullrank" else _lowrank(dim, rank))

    def neg_elbo(params, key, data):
        if num_particles == 1:
            return -(log_density(draw(key, params), data) + entropy(params))
        keys = jax.random.split(key, num_particles)
        thetas = jax.vmap(draw, in_axes=(0, None))(keys, params)
        log_p = jax.vmap(log_density, in_axes=(0, None))(thetas, data)
        return -(jnp.mean(log_p) + entropy(params))

    @jax.jit
    def init(key):
        k_loc, k_q = jax.random.split(key)
        params = init_q(k_q, jax.random.uniform(k_loc, (dim,), minval=-2.0, maxval=2.0))
        return params, optimizer.init(params)

    @functools.partial(jax.jit, static_argnames="steps")
    def run(params, opt_state, data, key, steps):
        def step(carry, k):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(neg_elbo)(params, k, data)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            return (optax.apply_updates(params, updates), opt_state), loss

        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state),
                                                   jax.random.split(key, steps))
        return params, opt_state, losses

    return init, run
