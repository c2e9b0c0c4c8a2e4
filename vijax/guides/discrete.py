"""The guide of discrete latents: independent categoricals, one per element, and its
combination with the continuous guide.

For a discrete latent whose elements take ``V`` values, q has one logit vector per element,
``params["discrete"][name]`` of shape ``(size, V)`` (all zero at start: uniform). The
combined guide draws ``theta = (theta_c, k)``: ``theta_c`` from the continuous guide and the
category indices ``k`` by the inverse CDF of ``u = Phi(eps)`` for one standard normal
``eps`` per element (so all particles' noise is still one ``(K, noise_dim)`` normal draw).
``k`` carries no gradient: estimators add a score-function term for it
(:mod:`vijax.estimators`) through ``discrete_log_q(params, theta)``, the log mass of the
indices at fixed ``k`` as a function of the logits.

Params of the combined guide: ``{"continuous": continuous guide params, "discrete": {name:
(size, V) logits}}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import ndtr

from vijax.guides.base import Guide

__all__ = ["with_discrete"]


def _sample_index(logits: jax.Array, eps: jax.Array) -> jax.Array:
    """Category indices ``(size,)`` from logits ``(size, V)`` and normal noise ``(size,)``."""
    cdf = jnp.cumsum(jax.nn.softmax(logits, axis=-1), axis=-1)
    u = ndtr(eps)[:, None]
    return jnp.sum(cdf[:, :-1] < u, axis=-1)


def _log_mass(logits: jax.Array, k: jax.Array) -> jax.Array:
    log_p = jax.nn.log_softmax(logits, axis=-1)
    return jnp.sum(jnp.take_along_axis(log_p, k[:, None], axis=-1))


def _entropy(logits: jax.Array) -> jax.Array:
    log_p = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.sum(jnp.exp(log_p) * log_p)


def with_discrete(cont: Guide, target) -> Guide:
    """The guide over ``theta = (theta_c, k)``: ``cont`` times independent categoricals."""
    blocks = target.discrete
    dim, n_d = target.dim, target.n_discrete
    nc = cont.noise_dim
    starts = np.cumsum([0] + [b.size for b in blocks])

    def split_k(theta):
        k = jnp.round(theta[dim:]).astype(jnp.int32)
        return [k[a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]

    def discrete_log_q(params, theta):
        logits = params["discrete"]
        return sum(_log_mass(logits[b.name], k)
                   for b, k in zip(blocks, split_k(theta), strict=True))

    def discrete_entropy(params):
        return sum(_entropy(params["discrete"][b.name]) for b in blocks)

    def init(key, loc):
        logits = {b.name: jnp.zeros((b.size, b.num_values), loc.dtype) for b in blocks}
        return {"continuous": cont.init(key, loc[:dim]), "discrete": logits}

    def transform(params, eps):
        theta_c, log_q_c = cont.transform(params["continuous"], eps[:nc])
        ks = [_sample_index(jax.lax.stop_gradient(params["discrete"][b.name]),
                            eps[nc + a:nc + c])
              for b, a, c in zip(blocks, starts[:-1], starts[1:], strict=True)]
        k = jnp.concatenate(ks).astype(theta_c.dtype)
        theta = jnp.concatenate([theta_c, k])
        return theta, log_q_c + discrete_log_q(params, theta)

    def sample(key, params):
        eps = jax.random.normal(key, (nc + n_d,), jax.tree_util.tree_leaves(params)[0].dtype)
        return transform(params, eps)

    def log_q(params, theta):
        return cont.log_q(params["continuous"], theta[:dim]) + discrete_log_q(params, theta)

    def entropy(params):
        return cont.entropy(params["continuous"]) + discrete_entropy(params)

    def mean(params):
        expected = [jax.nn.softmax(params["discrete"][b.name], axis=-1)
                    @ jnp.arange(b.num_values, dtype=params["discrete"][b.name].dtype)
                    for b in blocks]
        return jnp.concatenate([cont.mean(params["continuous"]), *expected])

    return Guide(f"{cont.name}+categorical", dim + n_d, nc + n_d, init, transform, sample,
                 log_q, entropy if cont.entropy is not None else None,
                 mean if cont.mean is not None else None, cont.no_jacobian, False,
                 n_d, discrete_log_q, discrete_entropy)
