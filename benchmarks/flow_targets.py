"""The four targets of the flow benchmark (``bench_flows.py``), each written twice: a vijax model
and a NumPyro model of the same normalised density, with reference summaries to score against.

* ``banana``: ``x0 ~ N(0, 2^2)``, ``x1 | x0 ~ N(x0^2 / 4, 0.5^2)``; ``log Z = 0``. Exact
  marginals: ``x0 ~ N(0, 4)``; ``x1 = z^2 + 0.5 e`` with ``z, e ~ N(0, 1)``, so ``E x1 = 1``,
  ``var x1 = 0.25 + var(z^2) = 2.25``; quantiles of ``x1`` by quadrature of
  ``P(x1 <= q) = E_z[Phi((q - z^2) / 0.5)]``.
* ``funnel``: Neal's funnel in d = 10, ``v ~ N(0, 3^2)``, ``x_1..9 | v ~ N(0, exp(v/2)^2)``;
  ``log Z = 0``. ``v ~ N(0, 9)`` exactly; each ``x_i`` has mean 0, ``sd = exp(9/4)`` and
  quantiles by quadrature of ``E_v[Phi(q exp(-v/2))]`` (its sd is a useless summary: the
  fourth moment is ``3 exp(18)``, so ``x_i`` is scored by quantiles only).
* ``eight_schools``: posteriordb ``eight_schools-eight_schools_centered`` (10 parameters).
* ``one_comp``: posteriordb ``one_comp_mm_elim_abs-one_comp_mm_elim_abs`` (4 parameters), a
  one-compartment ODE (first-order absorption, Michaelis-Menten elimination) solved by
  fixed-step RK4 (:func:`concentrations`).

The posteriordb files (``data.json``, ``reference.json``, ``model.md``) are copied into
``benchmarks/data/posteriordb/`` (BSD 3-Clause, see ``LICENSE-posteriordb.md`` there); each
model below is written from its ``model.md``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints
from scipy import optimize, special, stats

import vijax as vj

__all__ = ["FlowTarget", "TARGETS", "get_target", "concentrations", "ODE_SUBSTEPS"]

DATA_DIR = Path(__file__).resolve().parent / "data" / "posteriordb"
QUANTILES = (0.05, 0.5, 0.95)


@dataclasses.dataclass(frozen=True)
class FlowTarget:
    """One target in both forms, with what it is scored against.

    Attributes:
        name: short name used in tables.
        title: what it is (for the report).
        latents: the vijax latents in order; the NumPyro model has one site per latent with the
            same name, shape and support, so both unconstrain through numpyro's ``biject_to``.
        log_joint: ``(z, data) -> scalar`` with constrained latents (the vijax model).
        numpyro_model: NumPyro model called as ``numpyro_model(**data)``.
        data: dict of float32 numpy arrays (empty for the synthetic targets).
        reference: reference parameter name -> ``{"mean", "sd", "q05", "q50", "q95"}``.
        moment_params: parameters scored by standardised mean error and sd ratio.
        quantile_params: heavy-tailed parameters scored by quantile errors only.
        derived: ``constrained draws dict -> {reference parameter name: (n,) array}``.
        log_z: the exact log normalising constant, or ``None`` when unknown.
        source: where the reference comes from.
    """

    name: str
    title: str
    latents: dict[str, vj.Latent]
    log_joint: Callable[[dict, Any], jax.Array]
    numpyro_model: Callable[..., None]
    data: dict[str, np.ndarray]
    reference: dict[str, dict[str, float]]
    moment_params: tuple[str, ...]
    quantile_params: tuple[str, ...]
    derived: Callable[[dict], dict[str, np.ndarray]]
    log_z: float | None
    source: str

    def make_vijax_model(self) -> vj.Model:
        """A fresh ``vj.Model`` (a fresh compile-cache key)."""
        return vj.Model(self.log_joint, dict(self.latents))

    @property
    def dim(self) -> int:
        return self.make_vijax_model().target.dim


def _elementwise(name: str, draws: np.ndarray) -> dict[str, np.ndarray]:
    """``(n, k)`` draws of a vector latent -> ``{"name[1]": (n,), ...}`` (1-based, as Stan)."""
    return {f"{name}[{i + 1}]": draws[:, i] for i in range(draws.shape[1])}


def _quantile_by_cdf(cdf: Callable[[float], float], p: float, bracket: float) -> float:
    return optimize.brentq(lambda q: cdf(q) - p, -bracket, bracket, xtol=1e-12) + 0.0  # no -0.0


# --- banana ---------------------------------------------------------------------------------
def _banana_log_joint(z, data):
    del data
    return (dist.Normal(0.0, 2.0).log_prob(z["x0"])
            + dist.Normal(0.25 * z["x0"] ** 2, 0.5).log_prob(z["x1"]))


def _banana_numpyro():
    x0 = numpyro.sample("x0", dist.Normal(0.0, 2.0))
    numpyro.sample("x1", dist.Normal(0.25 * x0**2, 0.5))


@functools.cache
def _banana_reference() -> dict[str, dict[str, float]]:
    z = np.linspace(-12.0, 12.0, 24_001)
    w = stats.norm.pdf(z) * (z[1] - z[0])

    def cdf(q):  # P(z^2 + 0.5 e <= q)
        return float(np.sum(w * special.ndtr((q - z**2) / 0.5)))

    x1 = {f"q{round(100 * p):02d}": _quantile_by_cdf(cdf, p, 60.0) for p in QUANTILES}
    x0 = {f"q{round(100 * p):02d}": 2.0 * float(stats.norm.ppf(p)) for p in QUANTILES}
    return {"x0": {"mean": 0.0, "sd": 2.0, **x0}, "x1": {"mean": 1.0, "sd": 1.5, **x1}}


def _banana_derived(draws):
    return {"x0": np.asarray(draws["x0"]), "x1": np.asarray(draws["x1"])}


# --- Neal's funnel, d = 10 --------------------------------------------------------------------
FUNNEL_K = 9


def _funnel_log_joint(z, data):
    del data
    return (dist.Normal(0.0, 3.0).log_prob(z["v"])
            + dist.Normal(0.0, jnp.exp(z["v"] / 2)).log_prob(z["x"]).sum())


def _funnel_numpyro():
    v = numpyro.sample("v", dist.Normal(0.0, 3.0))
    numpyro.sample("x", dist.Normal(0.0, jnp.exp(v / 2)).expand([FUNNEL_K]).to_event(1))


@functools.cache
def _funnel_reference() -> dict[str, dict[str, float]]:
    v = np.linspace(-40.0, 40.0, 40_001)
    w = stats.norm.pdf(v, scale=3.0) * (v[1] - v[0])

    def cdf(q):  # P(exp(v/2) e <= q)
        return float(np.sum(w * special.ndtr(q * np.exp(-v / 2))))

    xq = {f"q{round(100 * p):02d}": _quantile_by_cdf(cdf, p, 1e4) for p in QUANTILES}
    vq = {f"q{round(100 * p):02d}": 3.0 * float(stats.norm.ppf(p)) for p in QUANTILES}
    ref = {"v": {"mean": 0.0, "sd": 3.0, **vq}}
    for i in range(FUNNEL_K):
        ref[f"x[{i + 1}]"] = {"mean": 0.0, "sd": math.exp(9.0 / 4.0), **xq}
    return ref


def _funnel_derived(draws):
    return {"v": np.asarray(draws["v"]), **_elementwise("x", np.asarray(draws["x"]))}


# --- eight schools, centred -------------------------------------------------------------------
SCHOOLS = "eight_schools-eight_schools_centered"


def _schools_log_joint(z, data):
    lp = dist.Normal(0.0, 5.0).log_prob(z["mu"]) + dist.HalfCauchy(5.0).log_prob(z["tau"])
    lp += dist.Normal(z["mu"], z["tau"]).log_prob(z["theta"]).sum()
    return lp + dist.Normal(z["theta"], data["sigma"]).log_prob(data["y"]).sum()


def _schools_numpyro(y, sigma):
    mu = numpyro.sample("mu", dist.Normal(0.0, 5.0))
    tau = numpyro.sample("tau", dist.HalfCauchy(5.0))
    theta = numpyro.sample("theta", dist.Normal(mu, tau).expand([8]).to_event(1))
    numpyro.sample("y", dist.Normal(theta, sigma).to_event(1), obs=y)


def _schools_derived(draws):
    return {**_elementwise("theta", np.asarray(draws["theta"])),
            "mu": np.asarray(draws["mu"]), "tau": np.asarray(draws["tau"])}


# --- one-compartment pharmacokinetics, Michaelis-Menten elimination -------------------------
ONE_COMP = "one_comp_mm_elim_abs-one_comp_mm_elim_abs"
ODE_SUBSTEPS = 8
"""RK4 steps per half-day measurement interval (step 1/16 day). Against 400 substeps in
float64 on the 10,000 posteriordb reference draws, the largest error in ``log C`` over all
draws and times is 9e-4 (4 substeps: 1.9e-3; 16: 3.9e-4), under 1% of the noise sd
(sigma ~ 0.13); ``bench_flows`` re-checks it on the draws of every fitted q.
``jax.experimental.ode.odeint`` (adaptive Dormand-Prince, rtol 1e-6) was accurate to 6e-6
but 1.6x slower per gradient (measured 820 against 490 µs for 4 draws), so it is not used."""


def concentrations(k_a, K_m, V_m, dose, volume, interval, num_times: int,
                   substeps: int = ODE_SUBSTEPS):
    """Solve ``dC/dt = (D k_a / V) exp(-k_a t) - (V_m / V) C / (K_m + C)``, ``C(0) = 0``.

    Classical RK4 with ``substeps`` equal steps per measurement ``interval``, a ``lax.scan``
    over the ``num_times`` intervals (an inner one over the substeps). The state is clamped at
    zero after every step: the exact solution stays positive, and the clamp is never active in
    the posterior's bulk; it keeps far-tail draws (``K_m -> 0`` with large ``V_m``, where the
    elimination term is stiff and explicit steps oscillate) finite instead of NaN. For the same
    reason the elimination term sees ``max(C, 0)`` (so the right-hand side is bounded) and the
    result is floored at the smallest normal float (so ``log C`` is finite): such draws get a
    vanishing but finite density, and a fit that meets one keeps finite gradients.

    Returns:
        ``(num_times,)`` concentrations at ``interval, 2 interval, ...``.
    """
    h = interval / substeps
    rate_in = dose * k_a / volume
    rate_out = V_m / volume

    def rhs(c, t):
        c = jnp.maximum(c, 0.0)  # stage values of a stiff step may undershoot zero
        return rate_in * jnp.exp(-k_a * t) - rate_out * c / (K_m + c)

    def step(carry, _):
        c, t = carry
        k1 = rhs(c, t)
        k2 = rhs(c + 0.5 * h * k1, t + 0.5 * h)
        k3 = rhs(c + 0.5 * h * k2, t + 0.5 * h)
        k4 = rhs(c + h * k3, t + h)
        c = jnp.maximum(c + h / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4), 0.0)
        return (c, t + h), None

    def one_interval(carry, _):
        carry, _ = jax.lax.scan(step, carry, None, length=substeps)
        return carry, carry[0]

    zero = jnp.zeros((), jnp.result_type(k_a))
    _, cs = jax.lax.scan(one_interval, (zero, zero), None, length=num_times)
    return jnp.maximum(cs, jnp.finfo(cs.dtype).tiny)  # log C stays finite


def _one_comp_solution(z, data, substeps: int = ODE_SUBSTEPS):
    n = data["C_hat"].shape[0]
    # measurement times are interval, 2 interval, ..., n interval (checked in _one_comp_data)
    return concentrations(z["k_a"], z["K_m"], z["V_m"], data["D"], data["V"], data["dt"], n,
                          substeps)


def _one_comp_log_joint(z, data):
    lp = sum(dist.HalfCauchy(1.0).log_prob(z[k]) for k in ("k_a", "K_m", "V_m", "sigma"))
    c = _one_comp_solution(z, data)
    return lp + dist.LogNormal(jnp.log(c), z["sigma"]).log_prob(data["C_hat"]).sum()


def _one_comp_numpyro(C_hat, D, V, dt):
    k_a = numpyro.sample("k_a", dist.HalfCauchy(1.0))
    K_m = numpyro.sample("K_m", dist.HalfCauchy(1.0))
    V_m = numpyro.sample("V_m", dist.HalfCauchy(1.0))
    sigma = numpyro.sample("sigma", dist.HalfCauchy(1.0))
    c = concentrations(k_a, K_m, V_m, D, V, dt, C_hat.shape[0])
    numpyro.sample("C_hat", dist.LogNormal(jnp.log(c), sigma).to_event(1), obs=C_hat)


def _one_comp_data(raw: dict) -> dict[str, np.ndarray]:
    times = np.asarray(raw["times"], np.float64)
    dt = times[0]
    if raw["t0"] != 0 or not np.allclose(times, dt * np.arange(1, len(times) + 1)):
        raise ValueError("one_comp: expected t0 = 0 and equally spaced times dt, 2 dt, ...")
    return {"C_hat": np.asarray(raw["C_hat"], np.float32), "D": np.float32(raw["D"]),
            "V": np.float32(raw["V"]), "dt": np.float32(dt)}


def _one_comp_derived(draws):
    return {k: np.asarray(draws[k]) for k in ("k_a", "K_m", "V_m", "sigma")}


# --- posteriordb loading ----------------------------------------------------------------------
def _posteriordb(name: str) -> tuple[dict, dict[str, dict[str, float]]]:
    folder = DATA_DIR / name
    raw = json.loads((folder / "data.json").read_text())
    ref = json.loads((folder / "reference.json").read_text())
    keep = ("mean", "sd", "q05", "q50", "q95")
    return raw, {p: {k: ref["parameters"][p][k] for k in keep} for p in ref["parameter_order"]}


def _make_targets() -> dict[str, FlowTarget]:
    schools_raw, schools_ref = _posteriordb(SCHOOLS)
    schools_data = {"y": np.asarray(schools_raw["y"], np.float32),
                    "sigma": np.asarray(schools_raw["sigma"], np.float32)}
    comp_raw, comp_ref = _posteriordb(ONE_COMP)
    pdb = "posteriordb reference (Stan NUTS, 10,000 draws), benchmarks/data/posteriordb/"
    positive = constraints.positive
    return {
        "banana": FlowTarget(
            "banana", "2-D banana, x0 ~ N(0, 2^2), x1 | x0 ~ N(x0^2/4, 0.5^2)",
            {"x0": vj.Latent(), "x1": vj.Latent()}, _banana_log_joint, _banana_numpyro, {},
            _banana_reference(), ("x0", "x1"), (), _banana_derived, 0.0,
            "exact marginals (x1 quantiles by quadrature)"),
        "funnel": FlowTarget(
            "funnel", "Neal's funnel d = 10, v ~ N(0, 3^2), x_1..9 ~ N(0, exp(v/2)^2)",
            {"v": vj.Latent(), "x": vj.Latent((FUNNEL_K,))}, _funnel_log_joint,
            _funnel_numpyro, {}, _funnel_reference(), ("v",),
            tuple(f"x[{i + 1}]" for i in range(FUNNEL_K)), _funnel_derived, 0.0,
            "exact marginals (x_i quantiles by quadrature)"),
        "eight_schools": FlowTarget(
            "eight_schools", f"posteriordb {SCHOOLS} (centred funnel, 10 parameters)",
            {"mu": vj.Latent(), "tau": vj.Latent(support=positive),
             "theta": vj.Latent((8,))},
            _schools_log_joint, _schools_numpyro, schools_data, schools_ref,
            tuple(schools_ref), (), _schools_derived, None, pdb + SCHOOLS),
        "one_comp": FlowTarget(
            "one_comp", f"posteriordb {ONE_COMP} (ODE, 4 parameters, heavy K_m tail)",
            {k: vj.Latent(support=positive) for k in ("k_a", "K_m", "V_m", "sigma")},
            _one_comp_log_joint, _one_comp_numpyro, _one_comp_data(comp_raw), comp_ref,
            ("k_a", "V_m", "sigma"), ("K_m",), _one_comp_derived, None, pdb + ONE_COMP),
    }


TARGETS = _make_targets()


def get_target(name: str) -> FlowTarget:
    return TARGETS[name]
