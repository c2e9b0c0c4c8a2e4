"""Gaussian-process posteriors on the ``gp_pois_regr`` data (11 inputs ``x = -10, -8, ..., 10``):
``gp_pois_regr-gp_regr`` (GP regression, latent function marginalised) and
``gp_pois_regr-gp_pois_regr`` (latent GP with Poisson counts, non-centred).

Kernel: squared exponential ``K[i, j] = alpha^2 exp(-(x[i] - x[j])^2 / (2 rho^2))``.

**Jitter in float32.** ``gp_pois_regr`` factors ``K + 1e-10 I``, which is numerically singular
in float32: at 36% of the reference draws ``jnp.linalg.cholesky`` returns NaN in float32
(posteriordb's ``model.md`` asks for float64). In float32 the jitter is therefore raised to
``1e-10 + 1e-6 alpha^2`` (a relative jitter of 1e-6; 3e-7 was the smallest with no NaN for
``rho`` from 0.1 to 1e4). Its effect on the target is to add independent noise of sd
``1e-3 alpha`` (about 0.003 at the posterior median of alpha) to every ``f[i]`` under the prior,
far below the posterior sds of ``f``. In float64 the jitter is exactly 1e-10, the posteriordb
model; all validation (``benchmarks.posteriors.check``) runs in float64.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from jax.scipy.linalg import solve_triangular
from jax.scipy.special import gammaln
from numpyro.distributions import constraints
from scipy import linalg

import vijax as vj
from benchmarks.posteriors.base import (
    Posterior,
    as_data,
    elementwise,
    identity_maps,
    read_raw,
    read_reference,
    stack,
)

__all__ = ["gp_regr", "gp_pois_regr", "se_kernel", "JITTER", "FLOAT32_REL_JITTER"]

JITTER = 1e-10
FLOAT32_REL_JITTER = 1e-6


def se_kernel(x, rho, alpha):
    """``(N, N)`` squared-exponential kernel ``alpha^2 exp(-(x_i - x_j)^2 / (2 rho^2))``."""
    d2 = jnp.square(x[:, None] - x[None, :])
    return jnp.square(alpha) * jnp.exp(-d2 / (2 * jnp.square(rho)))


def _jitter(alpha, dtype):
    """The diagonal jitter: 1e-10, plus ``1e-6 alpha^2`` in float32 (module docstring)."""
    if np.dtype(dtype) == np.float32:
        return JITTER + FLOAT32_REL_JITTER * alpha**2
    return JITTER


def gp_regr() -> Posterior:
    """gp_regr: ``y ~ MVN(0, K + sigma I)`` (``sigma`` is the noise *variance*, as in
    ``model.md``); ``rho ~ Gamma(25, 4)``, ``alpha ~ Half-Normal(0, 2)``,
    ``sigma ~ Half-Normal(0, 1)``."""
    name = "gp_pois_regr-gp_regr"
    raw = read_raw(name)
    data = as_data(x=raw["x"], y=raw["y"])

    def log_joint(z, data):
        rho, alpha, sigma = z["rho"], z["alpha"], z["sigma"]
        lp = dist.Gamma(25.0, 4.0).log_prob(rho) + dist.HalfNormal(2.0).log_prob(alpha)
        lp = lp + dist.HalfNormal(1.0).log_prob(sigma)
        y = data["y"]
        chol = jnp.linalg.cholesky(se_kernel(data["x"], rho, alpha)
                                   + sigma * jnp.eye(y.shape[0], dtype=y.dtype))
        white = solve_triangular(chol, y, lower=True)  # L^-1 y
        log_norm = jnp.sum(jnp.log(jnp.diag(chol))) + 0.5 * y.shape[0] * jnp.log(2 * jnp.pi)
        return lp - 0.5 * jnp.sum(jnp.square(white)) - log_norm

    def numpyro_model(data):
        rho = numpyro.sample("rho", dist.Gamma(25.0, 4.0))
        alpha = numpyro.sample("alpha", dist.HalfNormal(2.0))
        sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
        n = data["y"].shape[0]
        cov = se_kernel(data["x"], rho, alpha) + sigma * jnp.eye(n, dtype=data["y"].dtype)
        numpyro.sample("y", dist.MultivariateNormal(jnp.zeros(n, data["y"].dtype),
                                                    covariance_matrix=cov), obs=data["y"])

    latents = {k: vj.Latent(support=constraints.positive) for k in ("rho", "alpha", "sigma")}
    derived, to_latents = identity_maps({"rho": (), "alpha": (), "sigma": ()})
    return Posterior(name, vj.Model(log_joint, latents, data=data), data, numpyro_model,
                     derived, read_reference(name), (), to_latents)


def gp_pois_regr() -> Posterior:
    """gp_pois_regr: ``f = L f_tilde`` with ``L = chol(K + jitter I)``, ``f_tilde ~ N(0, I)``,
    ``k[i] ~ Poisson(exp(f[i]))``; ``rho ~ Gamma(25, 4)``, ``alpha ~ Half-Normal(0, 2)``.

    The reference reports ``f`` (derived), not ``f_tilde``: ``derived`` computes ``f`` in float64
    numpy with the jitter the model used for draws of that dtype; ``to_latents`` inverts it in
    float64, ``f_tilde = L^-1 f``. That solve is ill-conditioned (the smallest singular value
    of ``L`` is about ``sqrt(1e-10)``), but not too much for the float32 reference ``f``:
    perturbing every reference ``f`` by its float32 rounding error changes the recovered
    ``f_tilde`` by at most 0.01 (the last element; 0 to two decimals elsewhere) and the target's
    gradients negligibly, and ``L f_tilde`` reproduces ``f`` to 1e-8.
    """
    name = "gp_pois_regr-gp_pois_regr"
    raw = read_raw(name)
    data = as_data(x=raw["x"], k=raw["k"])
    n = len(raw["x"])
    x64 = np.asarray(raw["x"], np.float64)

    def latent_f(z, data):
        alpha = z["alpha"]
        jitter = _jitter(alpha, alpha.dtype)
        cov = se_kernel(data["x"], z["rho"], alpha) + jitter * jnp.eye(n, dtype=alpha.dtype)
        return jnp.linalg.cholesky(cov) @ z["f_tilde"]

    def log_joint(z, data):
        lp = dist.Gamma(25.0, 4.0).log_prob(z["rho"]) + dist.HalfNormal(2.0).log_prob(z["alpha"])
        lp = lp + dist.Normal(0.0, 1.0).log_prob(z["f_tilde"]).sum()
        f, k = latent_f(z, data), data["k"]
        return lp + jnp.sum(k * f - jnp.exp(f) - gammaln(k + 1.0))

    def numpyro_model(data):
        rho = numpyro.sample("rho", dist.Gamma(25.0, 4.0))
        alpha = numpyro.sample("alpha", dist.HalfNormal(2.0))
        f_tilde = numpyro.sample("f_tilde", dist.Normal(0.0, 1.0).expand([n]).to_event(1))
        f = latent_f({"rho": rho, "alpha": alpha, "f_tilde": f_tilde}, data)
        numpyro.sample("k", dist.Poisson(jnp.exp(f)).to_event(1), obs=data["k"])

    def cholesky64(rho, alpha, dtype):
        """``(n, N, N)`` float64 Cholesky factors for ``(n,)`` draws of rho and alpha."""
        rho, alpha = np.asarray(rho, np.float64), np.asarray(alpha, np.float64)
        d2 = np.square(x64[:, None] - x64[None, :])
        cov = alpha[:, None, None] ** 2 * np.exp(-d2 / (2 * rho[:, None, None] ** 2))
        jitter = np.broadcast_to(_jitter(alpha, dtype), alpha.shape)
        return np.linalg.cholesky(cov + jitter[:, None, None] * np.eye(n))

    def derived(draws):
        f_tilde = np.asarray(draws["f_tilde"])
        chol = cholesky64(draws["rho"], draws["alpha"], f_tilde.dtype)
        f = np.einsum("sij,sj->si", chol, f_tilde.astype(np.float64))
        return {"rho": np.asarray(draws["rho"]), "alpha": np.asarray(draws["alpha"]),
                **elementwise("f", f)}

    def to_latents(ref):
        chol = cholesky64(ref["rho"], ref["alpha"], np.float64)
        f = stack(ref, "f", n)
        f_tilde = np.stack([linalg.solve_triangular(c, v, lower=True)
                            for c, v in zip(chol, f, strict=True)])
        return {"rho": np.asarray(ref["rho"], np.float64),
                "alpha": np.asarray(ref["alpha"], np.float64), "f_tilde": f_tilde}

    latents = {"rho": vj.Latent(support=constraints.positive),
               "alpha": vj.Latent(support=constraints.positive), "f_tilde": vj.Latent((n,))}
    return Posterior(name, vj.Model(log_joint, latents, data=data), data, numpyro_model,
                     derived, read_reference(name), (), to_latents)
