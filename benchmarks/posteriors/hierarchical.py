"""Eight schools (Rubin 1981), both parameterisations of the same posterior.

``eight_schools-eight_schools_centered`` reuses the vijax and NumPyro models of
``benchmarks.flow_targets`` (latents ``mu``, ``tau``, ``theta``); the non-centred one samples
``theta_trans`` and reports ``theta = mu + tau * theta_trans``. posteriordb uses the same
(non-centred NUTS) reference draws for both.
"""

from __future__ import annotations

import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

import vijax as vj
from benchmarks import flow_targets
from benchmarks.posteriors.base import (
    Posterior,
    as_data,
    elementwise,
    identity_maps,
    read_raw,
    read_reference,
    stack,
)

__all__ = ["eight_schools_centered", "eight_schools_noncentered"]


def _schools_data(name: str) -> dict:
    raw = read_raw(name)
    return as_data(y=raw["y"], sigma=raw["sigma"])


def eight_schools_centered() -> Posterior:
    """Centred eight schools (Neal's funnel in ``(theta, log tau)``): ``theta[j] ~ N(mu, tau)``,
    ``mu ~ N(0, 5)``, ``tau ~ Half-Cauchy(0, 5)``, ``y[j] ~ N(theta[j], sigma[j])``."""
    name = flow_targets.SCHOOLS
    target = flow_targets.get_target("eight_schools")
    data = _schools_data(name)
    derived, to_latents = identity_maps({"theta": (8,), "mu": (), "tau": ()})

    def numpyro_model(data):
        target.numpyro_model(**data)

    return Posterior(name, vj.Model(target.log_joint, dict(target.latents), data=data), data,
                     numpyro_model, derived, read_reference(name), (), to_latents)


def eight_schools_noncentered() -> Posterior:
    """Non-centred eight schools: ``theta_trans[j] ~ N(0, 1)``, ``mu ~ N(0, 5)``,
    ``tau ~ Half-Cauchy(0, 5)``, ``y[j] ~ N(mu + tau theta_trans[j], sigma[j])``; reports
    ``theta = mu + tau theta_trans``."""
    name = "eight_schools-eight_schools_noncentered"
    data = _schools_data(name)

    def log_joint(z, data):
        mu, tau, theta_trans = z["mu"], z["tau"], z["theta_trans"]
        lp = dist.Normal(0.0, 5.0).log_prob(mu) + dist.HalfCauchy(5.0).log_prob(tau)
        lp = lp + dist.Normal(0.0, 1.0).log_prob(theta_trans).sum()
        theta = mu + tau * theta_trans
        return lp + dist.Normal(theta, data["sigma"]).log_prob(data["y"]).sum()

    def numpyro_model(data):
        mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
        tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
        theta_trans = numpyro.sample("theta_trans", dist.Normal(0.0, 1.0).expand([8]).to_event(1))
        numpyro.sample("y", dist.Normal(mu + tau * theta_trans, data["sigma"]).to_event(1),
                       obs=data["y"])

    def derived(draws):
        mu, tau = np.asarray(draws["mu"]), np.asarray(draws["tau"])
        theta = mu[:, None] + tau[:, None] * np.asarray(draws["theta_trans"])
        return {**elementwise("theta", theta), "mu": mu, "tau": tau}

    def to_latents(ref):
        mu, tau = (np.asarray(ref[k], np.float64) for k in ("mu", "tau"))
        return {"mu": mu, "tau": tau,
                "theta_trans": (stack(ref, "theta", 8) - mu[:, None]) / tau[:, None]}

    latents = {"mu": vj.Latent(), "tau": vj.Latent(support=constraints.positive),
               "theta_trans": vj.Latent((8,))}
    return Posterior(name, vj.Model(log_joint, latents, data=data), data, numpyro_model,
                     derived, read_reference(name), (), to_latents)
