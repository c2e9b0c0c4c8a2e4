"""The benchmark workloads, each written three ways: a vijax model, a NumPyro model, and a
hand-written unconstrained log density for the pure-JAX floor.

* ``logistic``: Bayesian logistic regression, ``w ~ Normal(0, 1)^D``,
  ``y_n ~ Bernoulli(sigmoid(x_n . w))``, N = 10,000, D = 50, synthetic data from a fixed seed.
* ``eight_schools``: centred eight schools (Rubin 1981), ``mu ~ Normal(0, 5)``,
  ``tau ~ HalfCauchy(5)``, ``theta_j ~ Normal(mu, tau)``, ``y_j ~ Normal(theta_j, sigma_j)``.
* ``hier_linreg``: hierarchical linear regression, G = 100 groups x 50 points,
  ``mu_a, mu_b ~ Normal(0, 5)``, ``tau_a, tau_b, sigma ~ HalfNormal(2)``,
  ``a_g ~ Normal(mu_a, tau_a)``, ``b_g ~ Normal(mu_b, tau_b)`` (centred),
  ``y_n ~ Normal(a_{g_n} + b_{g_n} x_n, sigma)`` with an integer group index ``g_n``;
  dim = 205. Synthetic data from a fixed seed.
* ``logistic_large``: the logistic regression at N = 1,000,000, D = 100 (for accelerators:
  400 MB of float32 data).

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
LARGE_N, LARGE_D = 1_000_000, 100
HLR_GROUPS, HLR_PER_GROUP = 100, 50
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


# --- hierarchical linear regression (centred) ------------------------------------------------
def _hlr_data(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2024 + seed)
    a = 1.0 + 0.5 * rng.normal(size=HLR_GROUPS)
    b = -0.5 + 0.3 * rng.normal(size=HLR_GROUPS)
    g = np.repeat(np.arange(HLR_GROUPS), HLR_PER_GROUP)
    x = rng.normal(size=g.size)
    y = a[g] + b[g] * x + rng.normal(size=g.size)
    return {"x": x.astype(np.float32), "y": y.astype(np.float32), "g": g.astype(np.int32)}


def _hlr_log_joint(z, data):
    lp = dist.Normal(0.0, 5.0).log_prob(z["mu_a"]) + dist.Normal(0.0, 5.0).log_prob(z["mu_b"])
    lp += (dist.HalfNormal(2.0).log_prob(z["tau_a"]) + dist.HalfNormal(2.0).log_prob(z["tau_b"])
           + dist.HalfNormal(2.0).log_prob(z["sigma"]))
    lp += dist.Normal(z["mu_a"], z["tau_a"]).log_prob(z["a"]).sum()
    lp += dist.Normal(z["mu_b"], z["tau_b"]).log_prob(z["b"]).sum()
    g = data["g"]
    mean = z["a"][g] + z["b"][g] * data["x"]
    return lp + dist.Normal(mean, z["sigma"]).log_prob(data["y"]).sum()


def _hlr_vijax() -> vj.Model:
    positive = constraints.positive
    return vj.Model(_hlr_log_joint, {
        "mu_a": vj.Latent(), "mu_b": vj.Latent(), "tau_a": vj.Latent(support=positive),
        "tau_b": vj.Latent(support=positive), "sigma": vj.Latent(support=positive),
        "a": vj.Latent(shape=(HLR_GROUPS,)), "b": vj.Latent(shape=(HLR_GROUPS,))})


def _hlr_numpyro(x, y, g):
    mu_a = numpyro.sample("mu_a", dist.Normal(0.0, 5.0))
    mu_b = numpyro.sample("mu_b", dist.Normal(0.0, 5.0))
    tau_a = numpyro.sample("tau_a", dist.HalfNormal(2.0))
    tau_b = numpyro.sample("tau_b", dist.HalfNormal(2.0))
    sigma = numpyro.sample("sigma", dist.HalfNormal(2.0))
    a = numpyro.sample("a", dist.Normal(mu_a, tau_a).expand([HLR_GROUPS]).to_event(1))
    b = numpyro.sample("b", dist.Normal(mu_b, tau_b).expand([HLR_GROUPS]).to_event(1))
    numpyro.sample("y", dist.Normal(a[g] + b[g] * x, sigma).to_event(1), obs=y)


def _hlr_log_density(theta, data):
    # theta = (mu_a, mu_b, log tau_a, log tau_b, log sigma, a_1..G, b_1..G); each positive
    # latent is exp of its coordinate, log-Jacobian = the coordinate itself.
    z = {"mu_a": theta[0], "mu_b": theta[1], "tau_a": jnp.exp(theta[2]),
         "tau_b": jnp.exp(theta[3]), "sigma": jnp.exp(theta[4]),
         "a": theta[5:5 + HLR_GROUPS], "b": theta[5 + HLR_GROUPS:]}
    return _hlr_log_joint(z, data) + theta[2] + theta[3] + theta[4]


# --- logistic regression at accelerator scale -----------------------------------------------
def _large_data(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(4321 + seed)
    x = rng.standard_normal(size=(LARGE_N, LARGE_D), dtype=np.float32) / np.float32(
        math.sqrt(LARGE_D))
    w = rng.normal(size=LARGE_D).astype(np.float32)
    y = rng.random(LARGE_N, dtype=np.float32) < 1.0 / (1.0 + np.exp(-x @ w))
    return {"x": x, "y": y.astype(np.float32)}


def _large_vijax() -> vj.Model:
    return vj.Model(_logistic_log_joint, {"w": vj.Latent(shape=(LARGE_D,))})


WORKLOADS = {
    "logistic": Workload("logistic", LOGISTIC_D, _logistic_data, _logistic_vijax,
                         _logistic_numpyro, _logistic_log_density),
    "eight_schools": Workload("eight_schools", 10, _schools_data, _schools_vijax,
                              _schools_numpyro, _schools_log_density),
    "hier_linreg": Workload("hier_linreg", 5 + 2 * HLR_GROUPS, _hlr_data, _hlr_vijax,
                            _hlr_numpyro, _hlr_log_density),
    "logistic_large": Workload("logistic_large", LARGE_D, _large_data, _large_vijax,
                               _logistic_numpyro, _logistic_log_density),
}


def get_workload(name: str) -> Workload:
    return WORKLOADS[name]
