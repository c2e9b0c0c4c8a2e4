"""The benchmark workloads, each written three ways: a vijax model, a NumPyro model, and a
hand-written unconstrained log density for the pure-JAX floor.

* ``logistic``: Bayesian logistic regression, ``w ~ Normal(0, 1)^D``,
  ``y_n ~ Bernoulli(sigmoid(x_n . w))``, N = 10,000, D = 50, synthetic data from a fixed seed.
* ``eight_schools``: centred eight schools (Rubin 1981), ``mu ~ Normal(0, 5)``,
  ``tau ~ HalfCauchy(5)``, ``theta_j ~ Normal(mu, tau)``, ``y_j ~ Normal(theta_j, sigma_j)``.

The vijax model and the floor share the same log joint function (numpyro distributions'
``log_prob``), so the floor differs from vijax only in the inference code; the floor maps the
unconstrained vector to the latents by hand (``tau = exp(u)``, as numpyro's
``biject_to(positive)``, plus the log-Jacobian ``u``). All three forms define the same
posterior, so their negative ELBOs agree.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints

import vijax as vj

__all__ = ["Workload", "WORKLOADS", "get_workload"]

LOGISTIC_N, LOGISTIC_D = 10_000, 50
SCHOOLS_Y = np.array([28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0], np.float32)
SCHOOLS_SIGMA = np.array([15.0, 10.0, 16.0, 11.0, 9.0, 11.0, 10.0, 18.0], np.float32)


@dataclasses.dataclass(frozen=True)
class Workload:
    """One benchmark problem in the three forms.

    Attributes:
        name: short name used in tables.
        dim: length of the unconstrained latent vector.
        make_data: ``seed -> data`` dict of float32 numpy arrays; seed 0 is the reference data,
            other seeds give new data of the same shapes (for repeat fits).
        make_vijax_model: ``() -> vj.Model`` (a fresh object: a fresh compile-cache key).
        numpyro_model: NumPyro model called as ``numpyro_model(**data)``.
        log_density: ``(theta (dim,), data) -> scalar`` unconstrained log density, log-Jacobian
            included, for the floor (the model's log joint after a hand-written change of
            variables).
    """

    name: str
    dim: int
    make_data: Callable[[int], dict[str, np.ndarray]]
    make_vijax_model: Callable[[], vj.Model]
    numpyro_model: Callable[..., None]
    log_density: Callable[[jax.Array, Any], jax.Array]


# --- logistic regression --------------------------------------------------------------------
def _logistic_data(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234 + seed)
    x = rng.normal(size=(LOGISTIC_N, LOGISTIC_D)) / math.sqrt(LOGISTIC_D)
    w = rng.normal(size=LOGISTIC_D)
    y = rng.random(LOGISTIC_N) < 1.0 / (1.0 + np.exp(-x @ w))
    return {"x": x.astype(np.float32), "y": y.astype(np.float32)}


def _logistic_log_joint(z, data):
    lp = dist.Normal(0.0, 1.0).log_prob(z["w"]).sum()
    return lp + dist.Bernoulli(logits=data["x"] @ z["w"]).log_prob(data["y"]).sum()


def _logistic_vijax() -> vj.Model:
    return vj.Model(_logistic_log_joint, {"w": vj.Latent(shape=(LOGISTIC_D,))})


def _logistic_numpyro(x, y):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    numpyro.sample("y", dist.Bernoulli(logits=x @ w), obs=y)


def _logistic_log_density(theta, data):
    return _logistic_log_joint({"w": theta}, data)


# --- eight schools (centred) ----------------------------------------------------------------
def _schools_data(seed: int) -> dict[str, np.ndarray]:
    y = SCHOOLS_Y.copy()
    if seed:
        y = y + np.random.default_rng(seed).normal(scale=2.0, size=8).astype(np.float32)
    return {"y": y, "sigma": SCHOOLS_SIGMA.copy()}


def _schools_log_joint(z, data):
    lp = dist.Normal(0.0, 5.0).log_prob(z["mu"]) + dist.HalfCauchy(5.0).log_prob(z["tau"])
    lp += dist.Normal(z["mu"], z["tau"]).log_prob(z["theta"]).sum()
    return lp + dist.Normal(z["theta"], data["sigma"]).log_prob(data["y"]).sum()


def _schools_vijax() -> vj.Model:
    return vj.Model(_schools_log_joint, {"mu": vj.Latent(),
                                         "tau": vj.Latent(support=constraints.positive),
                                         "theta": vj.Latent(shape=(8,))})


def _schools_numpyro(y, sigma):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    theta = numpyro.sample("theta", dist.Normal(mu, tau).expand([8]).to_event(1))
    numpyro.sample("y", dist.Normal(theta, sigma).to_event(1), obs=y)


def _schools_log_density(theta, data):
    # theta = (mu, log tau, theta_1..8); tau = exp(log tau), log|d tau / d log tau| = log tau.
    z = {"mu": theta[0], "tau": jnp.exp(theta[1]), "theta": theta[2:]}
    return _schools_log_joint(z, data) + theta[1]


WORKLOADS = {
    "logistic": Workload("logistic", LOGISTIC_D, _logistic_data, _logistic_vijax,
                         _logistic_numpyro, _logistic_log_density),
    "eight_schools": Workload("eight_schools", 10, _schools_data, _schools_vijax,
                              _schools_numpyro, _schools_log_density),
}


def get_workload(name: str) -> Workload:
    return WORKLOADS[name]
