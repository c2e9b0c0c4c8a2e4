"""The seven linear regressions: ``y[n] ~ Normal(X[n] @ beta, sigma)`` with posterior-specific
design matrices and priors (each written from its ``model.md``).

| posterior | design (columns) | prior on beta | prior on sigma |
|---|---|---|---|
| ``earnings-earn_height`` | 1, height | flat | flat |
| ``earnings-logearn_interaction`` | 1, height, male, height * male (y = log earn) | flat | flat |
| ``kidiq-kidscore_interaction`` | 1, mom_hs, mom_iq, mom_hs * mom_iq | flat | Half-Cauchy(0, 2.5) |
| ``mesquite-logmesquite_logvas`` | 1, lcv, lca, lcs, lth, ld, group (logs) | flat | flat |
| ``nes2000-nes`` | 1, real_ideo, race_adj, age 2/3/4 dummies, educ1, gender, income | flat | flat |
| ``sblri-blr`` | X (no intercept) | Normal(0, 10) | Half-Normal(0, 10) |
| ``kilpisjarvi_mod-kilpisjarvi`` | 1, x (latents alpha, beta) | Normal(pmu, ps) | flat |

"Flat" is the improper constant density on the support (NumPyro: ``ImproperUniform``).
kilpisjarvi has scalar latents ``alpha``, ``beta`` (as reported) and x = year + 2000.
"""

from __future__ import annotations

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

__all__ = ["earn_height", "logearn_interaction", "kidscore_interaction", "logmesquite_logvas",
           "nes", "blr", "kilpisjarvi"]


def _regression(name: str, design: np.ndarray, y: np.ndarray,
                beta_prior: dist.Distribution | None,
                sigma_prior: dist.Distribution | None) -> Posterior:
    """``y ~ Normal(design @ beta, sigma)`` with latents ``beta`` (k,) real, ``sigma`` > 0.

    Args:
        design: ``(N, k)`` design matrix; y: ``(N,)`` responses.
        beta_prior: scalar distribution applied to every ``beta[i]`` iid, or ``None`` (flat).
        sigma_prior: distribution of ``sigma`` on (0, inf), or ``None`` (flat).
    """
    k = design.shape[1]
    data = as_data(X=design, y=y)

    def log_joint(z, data):
        lp = dist.Normal(data["X"] @ z["beta"], z["sigma"]).log_prob(data["y"]).sum()
        if beta_prior is not None:
            lp = lp + beta_prior.log_prob(z["beta"]).sum()
        if sigma_prior is not None:
            lp = lp + sigma_prior.log_prob(z["sigma"])
        return lp

    def numpyro_model(data):
        beta = numpyro.sample("beta", dist.ImproperUniform(constraints.real, (), (k,))
                              if beta_prior is None else beta_prior.expand([k]).to_event(1))
        sigma = numpyro.sample("sigma", dist.ImproperUniform(constraints.positive, (), ())
                               if sigma_prior is None else sigma_prior)
        numpyro.sample("y", dist.Normal(data["X"] @ beta, sigma).to_event(1), obs=data["y"])

    shapes = {"beta": (k,), "sigma": ()}
    latents = {"beta": vj.Latent((k,)), "sigma": vj.Latent(support=constraints.positive)}
    derived, to_latents = identity_maps(shapes)
    return Posterior(name, vj.Model(log_joint, latents, data=data), data, numpyro_model,
                     derived, read_reference(name), (), to_latents)


def _columns(*cols) -> np.ndarray:
    """Stack columns (numbers broadcast, e.g. the intercept ``1.0``) into ``(N, k)``."""
    n = max(np.size(c) for c in cols)
    return np.stack([np.broadcast_to(np.asarray(c, np.float64), (n,)) for c in cols], -1)


def earn_height() -> Posterior:
    """earnings-earn_height: earn ~ N(beta1 + beta2 height, sigma), flat priors (raw scale)."""
    name = "earnings-earn_height"
    raw = read_raw(name)
    return _regression(name, _columns(1.0, raw["height"]), np.asarray(raw["earn"], float),
                       None, None)


def logearn_interaction() -> Posterior:
    """earnings-logearn_interaction: log earn on height, male and height x male, flat priors."""
    name = "earnings-logearn_interaction"
    raw = read_raw(name)
    height, male = np.asarray(raw["height"], float), np.asarray(raw["male"], float)
    return _regression(name, _columns(1.0, height, male, height * male),
                       np.log(np.asarray(raw["earn"], float)), None, None)


def kidscore_interaction() -> Posterior:
    """kidiq-kidscore_interaction: kid_score on mom_hs, mom_iq and their product (uncentred);
    flat beta, sigma ~ Half-Cauchy(0, 2.5)."""
    name = "kidiq-kidscore_interaction"
    raw = read_raw(name)
    hs, iq = np.asarray(raw["mom_hs"], float), np.asarray(raw["mom_iq"], float)
    return _regression(name, _columns(1.0, hs, iq, hs * iq),
                       np.asarray(raw["kid_score"], float), None, dist.HalfCauchy(2.5))


def logmesquite_logvas() -> Posterior:
    """mesquite-logmesquite_logvas: log weight on log canopy volume, area, shape, total height,
    density, and group; flat priors."""
    name = "mesquite-logmesquite_logvas"
    raw = {k: np.asarray(v, float) for k, v in read_raw(name).items() if k != "N"}
    d1, d2 = raw["diam1"], raw["diam2"]
    design = _columns(1.0, np.log(d1 * d2 * raw["canopy_height"]), np.log(d1 * d2),
                      np.log(d1 / d2), np.log(raw["total_height"]), np.log(raw["density"]),
                      raw["group"])
    return _regression(name, design, np.log(raw["weight"]), None, None)


def nes() -> Posterior:
    """nes2000-nes: partyid7 on ideology, race, age dummies (levels 2-4), education, gender and
    income, as stored numerically; flat priors."""
    name = "nes2000-nes"
    raw = {k: np.asarray(v, float) for k, v in read_raw(name).items() if k != "N"}
    age = raw["age_discrete"]
    design = _columns(1.0, raw["real_ideo"], raw["race_adj"], age == 2, age == 3, age == 4,
                      raw["educ1"], raw["gender"], raw["income"])
    return _regression(name, design, raw["partyid7"], None, None)


def blr() -> Posterior:
    """sblri-blr: y ~ N(X beta, sigma), beta[d] ~ N(0, 10), sigma ~ Half-Normal(0, 10)."""
    name = "sblri-blr"
    raw = read_raw(name)
    return _regression(name, np.asarray(raw["X"], float), np.asarray(raw["y"], float),
                       dist.Normal(0.0, 10.0), dist.HalfNormal(10.0))


def kilpisjarvi() -> Posterior:
    """kilpisjarvi_mod-kilpisjarvi: y ~ N(alpha + beta x, sigma) with x = year + 2000 (a needle:
    corr(alpha, beta) ~ -0.99999); alpha ~ N(pmualpha, psalpha), beta ~ N(pmubeta, psbeta),
    sigma flat."""
    name = "kilpisjarvi_mod-kilpisjarvi"
    raw = read_raw(name)
    data = as_data(**{k: raw[k] for k in ("x", "y", "pmualpha", "psalpha", "pmubeta",
                                          "psbeta")})

    def log_joint(z, data):
        lp = dist.Normal(data["pmualpha"], data["psalpha"]).log_prob(z["alpha"])
        lp = lp + dist.Normal(data["pmubeta"], data["psbeta"]).log_prob(z["beta"])
        mean = z["alpha"] + z["beta"] * data["x"]
        return lp + dist.Normal(mean, z["sigma"]).log_prob(data["y"]).sum()

    def numpyro_model(data):
        alpha = numpyro.sample("alpha", dist.Normal(data["pmualpha"], data["psalpha"]))
        beta = numpyro.sample("beta", dist.Normal(data["pmubeta"], data["psbeta"]))
        sigma = numpyro.sample("sigma", dist.ImproperUniform(constraints.positive, (), ()))
        numpyro.sample("y", dist.Normal(alpha + beta * data["x"], sigma).to_event(1),
                       obs=data["y"])

    latents = {"alpha": vj.Latent(), "beta": vj.Latent(),
               "sigma": vj.Latent(support=constraints.positive)}
    derived, to_latents = identity_maps({"alpha": (), "beta": (), "sigma": ()})
    return Posterior(name, vj.Model(log_joint, latents, data=data), data, numpyro_model,
                     derived, read_reference(name), (), to_latents)
