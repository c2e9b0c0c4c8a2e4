"""Time-series posteriors: ``arK-arK`` (AR(5) regression) and ``garch-garch11`` (GARCH(1,1)).

**garch11's dependent constraint.** ``alpha1 in (0, 1)`` and ``0 < beta1 < 1 - alpha1`` is the
open 2-simplex: ``w = (alpha1, beta1, 1 - alpha1 - beta1)`` with every entry positive. The model
declares the latent ``alpha1_beta1 = w`` with support ``constraints.simplex`` (shape (3,)), so
vijax and NumPyro both map it by numpyro's stick-breaking bijection, whose log-Jacobian is that
of the map onto the first two coordinates ``(alpha1, beta1)``. The density is flat on the
triangle in ``(alpha1, beta1)``, as ``model.md`` requires (no ``1 / (1 - alpha1)`` factor):
the vijax log joint adds nothing for ``w``; the NumPyro model samples it from
``Dirichlet(1, 1, 1)``, whose density is the constant 2 on the simplex.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

import vijax as vj
from benchmarks.posteriors.base import (
    Posterior,
    as_data,
    identity_maps,
    read_raw,
    read_reference,
)

__all__ = ["ark", "garch11", "garch_log_likelihood"]


def ark() -> Posterior:
    """arK-arK: ``y[t] ~ N(alpha + sum_k beta[k] y[t-k], sigma)`` for t = K+1..T (K = 5);
    alpha, beta[k] ~ N(0, 10), sigma ~ Half-Cauchy(0, 2.5).

    Data: ``lags`` ``(T-K, K)`` with ``lags[i, k-1] = y[K+i-k]`` (0-based ``y``) and ``y``
    ``(T-K,)`` the modelled observations ``y[K:]``.
    """
    name = "arK-arK"
    raw = read_raw(name)
    y, k = np.asarray(raw["y"], np.float64), int(raw["K"])
    t = np.arange(k, y.shape[0])
    lags = np.stack([y[t - j] for j in range(1, k + 1)], -1)
    data = as_data(lags=lags, y=y[k:])

    def log_joint(z, data):
        lp = dist.Normal(0.0, 10.0).log_prob(z["alpha"])
        lp = lp + dist.Normal(0.0, 10.0).log_prob(z["beta"]).sum()
        lp = lp + dist.HalfCauchy(2.5).log_prob(z["sigma"])
        mean = z["alpha"] + data["lags"] @ z["beta"]
        return lp + dist.Normal(mean, z["sigma"]).log_prob(data["y"]).sum()

    def numpyro_model(data):
        alpha = numpyro.sample("alpha", dist.Normal(0.0, 10.0))
        beta = numpyro.sample("beta", dist.Normal(0.0, 10.0).expand([k]).to_event(1))
        sigma = numpyro.sample("sigma", dist.HalfCauchy(2.5))
        numpyro.sample("y", dist.Normal(alpha + data["lags"] @ beta, sigma).to_event(1),
                       obs=data["y"])

    latents = {"alpha": vj.Latent(), "beta": vj.Latent((k,)),
               "sigma": vj.Latent(support=constraints.positive)}
    derived, to_latents = identity_maps({"alpha": (), "beta": (k,), "sigma": ()})
    return Posterior(name, vj.Model(log_joint, latents, data=data), data, numpyro_model,
                     derived, read_reference(name), (), to_latents)


def garch_log_likelihood(mu, alpha0, alpha1, beta1, y, sigma1):
    """GARCH(1,1) log likelihood ``sum_t log N(y[t] | mu, s[t])``.

    ``s[1] = sigma1``; ``s[t]^2 = alpha0 + alpha1 (y[t-1] - mu)^2 + beta1 s[t-1]^2`` for
    t = 2..T (a ``lax.scan`` over ``y[:-1]``).

    Args:
        mu, alpha0, alpha1, beta1: scalars; y: ``(T,)``; sigma1: scalar.
    """

    def step(var_prev, y_prev):
        var = alpha0 + alpha1 * (y_prev - mu) ** 2 + beta1 * var_prev
        return var, var

    var1 = jnp.square(sigma1)
    _, var = jax.lax.scan(step, var1, y[:-1])
    scale = jnp.sqrt(jnp.concatenate([var1[None], var]))
    return dist.Normal(mu, scale).log_prob(y).sum()


def garch11() -> Posterior:
    """garch-garch11: GARCH(1,1) with a flat density on ``mu`` (real), ``alpha0`` (> 0) and
    ``(alpha1, beta1)`` on the triangle ``alpha1, beta1 > 0``, ``alpha1 + beta1 < 1`` (the
    latent ``alpha1_beta1 = (alpha1, beta1, 1 - alpha1 - beta1)``, a simplex; see the module
    docstring)."""
    name = "garch-garch11"
    raw = read_raw(name)
    data = as_data(y=raw["y"], sigma1=raw["sigma1"])

    def log_lik(mu, alpha0, w, data):
        return garch_log_likelihood(mu, alpha0, w[0], w[1], data["y"], data["sigma1"])

    def log_joint(z, data):  # flat prior: the likelihood only
        return log_lik(z["mu"], z["alpha0"], z["alpha1_beta1"], data)

    def numpyro_model(data):
        mu = numpyro.sample("mu", dist.ImproperUniform(constraints.real, (), ()))
        alpha0 = numpyro.sample("alpha0", dist.ImproperUniform(constraints.positive, (), ()))
        w = numpyro.sample("alpha1_beta1", dist.Dirichlet(jnp.ones(3)))
        numpyro.factor("y", log_lik(mu, alpha0, w, data))

    latents = {"mu": vj.Latent(), "alpha0": vj.Latent(support=constraints.positive),
               "alpha1_beta1": vj.Latent((3,), constraints.simplex)}
    scalars_derived, scalars_to_latents = identity_maps({"mu": (), "alpha0": ()})

    def derived(draws):
        w = np.asarray(draws["alpha1_beta1"])
        return {**scalars_derived(draws), "alpha1": w[:, 0], "beta1": w[:, 1]}

    def to_latents(ref):
        a1, b1 = (np.asarray(ref[k], np.float64) for k in ("alpha1", "beta1"))
        return {**scalars_to_latents(ref), "alpha1_beta1": np.stack([a1, b1, 1 - a1 - b1], -1)}

    return Posterior(name, vj.Model(log_joint, latents, data=data), data, numpyro_model,
                     derived, read_reference(name), (), to_latents)
