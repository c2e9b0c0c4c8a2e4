"""Posteriors with discrete states summed out: ``low_dim_gauss_mix-low_dim_gauss_mix`` (a
two-component normal mixture) and ``hmm_example-hmm_example`` (a two-state Gaussian HMM,
forward algorithm).

Both order their component means to remove label switching: the latent ``mu`` has support
``constraints.ordered_vector`` (resp. ``positive_ordered_vector``), and its normal prior is a
density on that region (not renormalised: a constant). NumPyro has no distribution with that
support and a normal density, so the NumPyro models sample ``mu`` from ``ImproperUniform`` on
the ordered support and add the prior with ``numpyro.factor``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpyro
import numpyro.distributions as dist
from jax.scipy.special import logsumexp
from numpyro.distributions import constraints

import vijax as vj
from benchmarks.posteriors.base import (
    Posterior,
    as_data,
    identity_maps,
    read_raw,
    read_reference,
)

__all__ = ["low_dim_gauss_mix", "hmm_example", "hmm_log_likelihood"]


def low_dim_gauss_mix() -> Posterior:
    """low_dim_gauss_mix: ``y[n] ~ theta N(mu[1], sigma[1]) + (1 - theta) N(mu[2], sigma[2])``;
    ``mu`` ordered with ``mu[k] ~ N(0, 2)``, ``sigma[k] ~ Half-Normal(0, 2)``,
    ``theta ~ Beta(5, 5)``."""
    name = "low_dim_gauss_mix-low_dim_gauss_mix"
    data = as_data(y=read_raw(name)["y"])

    def log_joint(z, data):
        mu, sigma, theta = z["mu"], z["sigma"], z["theta"]
        lp = dist.Normal(0.0, 2.0).log_prob(mu).sum() + dist.HalfNormal(2.0).log_prob(sigma).sum()
        lp = lp + dist.Beta(5.0, 5.0).log_prob(theta)
        log_w = jnp.stack([jnp.log(theta), jnp.log1p(-theta)])
        comp = dist.Normal(mu, sigma).log_prob(data["y"][:, None]) + log_w  # (N, 2)
        return lp + logsumexp(comp, axis=-1).sum()

    def numpyro_model(data):
        mu = numpyro.sample("mu", dist.ImproperUniform(constraints.ordered_vector, (), (2,)))
        numpyro.factor("mu_prior", dist.Normal(0.0, 2.0).log_prob(mu).sum())
        sigma = numpyro.sample("sigma", dist.HalfNormal(2.0).expand([2]).to_event(1))
        theta = numpyro.sample("theta", dist.Beta(5.0, 5.0))
        mix = dist.MixtureSameFamily(dist.Categorical(probs=jnp.stack([theta, 1 - theta])),
                                     dist.Normal(mu, sigma))
        numpyro.sample("y", mix.expand(data["y"].shape).to_event(1), obs=data["y"])

    latents = {"mu": vj.Latent((2,), constraints.ordered_vector),
               "sigma": vj.Latent((2,), constraints.positive),
               "theta": vj.Latent(support=constraints.unit_interval)}
    derived, to_latents = identity_maps({"mu": (2,), "sigma": (2,), "theta": ()})
    return Posterior(name, vj.Model(log_joint, latents, data=data), data, numpyro_model,
                     derived, read_reference(name), (), to_latents)


def hmm_log_likelihood(log_trans, mu, y):
    """Log likelihood of a Gaussian HMM (unit emission sd), hidden states summed out.

    Forward algorithm in log space: ``g[1, k] = log N(y[1] | mu[k], 1)`` (no initial-state
    term), ``g[t, k] = logsumexp_j(g[t-1, j] + log_trans[j, k]) + log N(y[t] | mu[k], 1)``,
    result ``logsumexp_k g[N, k]``.

    Args:
        log_trans: ``(K, K)``, ``log P(z[t] = k | z[t-1] = j)`` at ``[j, k]``.
        mu: ``(K,)`` emission means; y: ``(N,)``.
    """
    log_emit = dist.Normal(mu, 1.0).log_prob(y[:, None])  # (N, K)

    def step(g_prev, log_e):
        return logsumexp(g_prev[:, None] + log_trans, axis=0) + log_e, None

    g, _ = jax.lax.scan(step, log_emit[0], log_emit[1:])
    return logsumexp(g)


def hmm_example() -> Posterior:
    """hmm_example: 2-state HMM with transition rows ``theta1``, ``theta2`` (uniform on the
    simplex) and positive ordered emission means, ``mu[1] ~ N(3, 1)``, ``mu[2] ~ N(10, 1)``."""
    name = "hmm_example-hmm_example"
    data = as_data(y=read_raw(name)["y"])

    def prior_loc():  # built inside the traced functions: float32 or float64 like the latents
        return jnp.array([3.0, 10.0])

    def log_lik(theta1, theta2, mu, data):
        return hmm_log_likelihood(jnp.log(jnp.stack([theta1, theta2])), mu, data["y"])

    def log_joint(z, data):  # uniform simplex priors: no term
        lp = dist.Normal(prior_loc(), 1.0).log_prob(z["mu"]).sum()
        return lp + log_lik(z["theta1"], z["theta2"], z["mu"], data)

    def numpyro_model(data):
        theta1 = numpyro.sample("theta1", dist.Dirichlet(jnp.ones(2)))
        theta2 = numpyro.sample("theta2", dist.Dirichlet(jnp.ones(2)))
        mu = numpyro.sample("mu", dist.ImproperUniform(constraints.positive_ordered_vector,
                                                       (), (2,)))
        numpyro.factor("mu_prior", dist.Normal(prior_loc(), 1.0).log_prob(mu).sum())
        numpyro.factor("y", log_lik(theta1, theta2, mu, data))

    latents = {"theta1": vj.Latent((2,), constraints.simplex),
               "theta2": vj.Latent((2,), constraints.simplex),
               "mu": vj.Latent((2,), constraints.positive_ordered_vector)}
    derived, to_latents = identity_maps({"theta1": (2,), "theta2": (2,), "mu": (2,)})
    return Posterior(name, vj.Model(log_joint, latents, data=data), data, numpyro_model,
                     derived, read_reference(name), (), to_latents)
