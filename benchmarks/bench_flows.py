"""Flow benchmark: vijax IAF and spline flows (and vijax full-rank, the Gaussian baseline) against
NumPyro's ``AutoIAFNormal`` and ``AutoBNAFNormal``, side by side, accuracy and speed.

Targets (``flow_targets.py``): a 2-D banana and Neal's funnel (d = 10), both with ``log Z = 0``
and exact marginals, and the posteriordb posteriors ``eight_schools-eight_schools_centered`` and
``one_comp_mm_elim_abs-one_comp_mm_elim_abs`` (reference: long Stan NUTS runs).

Every method runs the same number of steps with the same number of particles K per gradient
estimate. vijax runs with its defaults (``vj.fit(guide=...)``: per-guide Adam step size with
decay ``lr / sqrt(1 + t/1000)``, tail iterate averaging); NumPyro runs ``SVI`` with
``Trace_ELBO(num_particles=K)`` and ``numpyro.optim.Adam(lr)`` at a constant step size
(``--numpyro-lr``). Per (target, method):

* **neg-ELBO**: ``mean(log q - log p~)`` over S = 10,000 fresh draws of the fitted q, with its
  Monte Carlo standard error ``sd / sqrt(S)``; ``log p~`` is the same unconstrained density
  (vijax's target, log-Jacobian included) for every method. With ``log Z = 0`` it is
  ``KL(q || p)``; otherwise compare it across methods only.
* **k-hat**: PSIS Pareto k of the same 10,000 log weights (``vj.psis``).
* **accuracy** (posteriordb README): per reported parameter the standardised mean error
  ``|mean_q - mean_ref| / sd_ref``, the sd ratio ``sd_q / sd_ref`` and the quantile errors
  ``|q_p,q - q_p,ref| / sd_ref`` (p = 5, 50, 95%) from the same draws; maxima of SME and
  ``|log R|`` over the moment-scored parameters, of the quantile errors over the heavy-tailed
  ones (``K_m``; the funnel's ``x_i``). Verdict: *accurate* if SME <= 0.1, R in [0.9, 1.1]
  and quantile errors <= 0.1; *usable* if <= 0.3, [0.75, 1.33], <= 0.3; else *fail*.
* **first fit** (s): the first fit of a configuration, tracing and compilation included, in a
  fresh Python process (imports and data set-up not timed; ``--first-fit inproc`` times it in
  this process, where primitives compiled earlier are cached).
* **µs/step**: steady state, median over repeats of one compiled chunk of steps / chunk length:
  vijax its own chunk runner (``vijax.driver._pipeline``), NumPyro a jitted ``lax.scan`` over
  ``svi.update``; the methods' chunks are interleaved (round robin) so that machine load falls
  on all alike.

Run: ``python -m benchmarks.bench_flows [--quick] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoBNAFNormal, AutoIAFNormal
from numpyro.infer.util import log_density as numpyro_log_density

import vijax as vj
from benchmarks.bench_core import (
    base_parser,
    interleaved_us_per_step,
    machine_info,
    machine_line,
    write_report,
)
from benchmarks.flow_targets import TARGETS, FlowTarget, concentrations, get_target
from vijax.driver import _pipeline
from vijax.guides.flow import default_hidden, default_layers
from vijax.psis import MIN_DRAWS

# the chunk runner's stopping arguments: never stop early, never give up on non-finite steps
NO_STOP = jnp.asarray(0, jnp.int32)
NO_LIMIT = jnp.asarray(2**30, jnp.int32)

REPO_ROOT = Path(__file__).resolve().parent.parent
NUMPYRO_LR = {"numpyro_iaf": 1e-3, "numpyro_iaf_default": 1e-3, "numpyro_bnaf": 1e-2}
"""NumPyro's Adam step sizes: for each guide the best of 1e-3, 3e-3 and 1e-2 on the banana and
the funnel (2,000 steps, K = 4, neg-ELBO from 10,000 draws); vijax runs untuned defaults."""
N_DRAWS = 10_000
VERDICTS = ("accurate", "usable", "fail")
THRESHOLDS = {"accurate": (0.1, 0.1, math.log(1.1)), "usable": (0.3, 0.3, math.log(1.33))}


# ---------------------------------------------------------------------------------------------
# methods
@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    label: str
    tool: str  # "vijax" or "numpyro"
    describe: Callable[[int], str]  # dim -> architecture in words


def _vijax_guide(name: str):
    wide = vj.guides.MeanField(init_scale=1.0)  # diagnosis variants: a unit-scale base
    return {"vijax_fullrank": "fullrank", "vijax_iaf": "iaf", "vijax_spline": "spline",
            "vijax_iaf_base1": vj.guides.IAF(base=wide),
            "vijax_spline_base1": vj.guides.Spline(base=wide)}[name]


def _numpyro_guide(name: str, model, dim: int):
    if name == "numpyro_iaf":  # the same depth and widths as vijax's default IAF
        return AutoIAFNormal(model, num_flows=default_layers(dim),
                             hidden_dims=list(default_hidden(dim)))
    if name == "numpyro_iaf_default":
        return AutoIAFNormal(model)
    if name == "numpyro_bnaf":
        return AutoBNAFNormal(model)
    raise KeyError(name)


METHODS = {m.name: m for m in (
    Method("vijax_fullrank", "vijax fullrank", "vijax", lambda d: "Gaussian, dense Cholesky"),
    Method("vijax_iaf", "vijax IAF", "vijax",
           lambda d: f"{default_layers(d)} gated IAF layers, MADE {default_hidden(d)}, "
                     "over mean-field"),
    Method("vijax_spline", "vijax spline", "vijax",
           lambda d: f"{default_layers(d)} RQ-spline coupling layers (8 bins), MLP "
                     f"{default_hidden(d)}, over mean-field"),
    Method("vijax_iaf_base1", "vijax IAF, base init_scale=1", "vijax",
           lambda d: "vijax IAF with MeanField(init_scale=1.0) as base (default 0.1)"),
    Method("vijax_spline_base1", "vijax spline, base init_scale=1", "vijax",
           lambda d: "vijax spline with MeanField(init_scale=1.0) as base (default 0.1)"),
    Method("numpyro_iaf", "NumPyro AutoIAFNormal", "numpyro",
           lambda d: f"num_flows={default_layers(d)}, hidden_dims={list(default_hidden(d))} "
                     "(vijax IAF's sizes)"),
    Method("numpyro_iaf_default", "NumPyro AutoIAFNormal (defaults)", "numpyro",
           lambda d: f"num_flows=3, hidden_dims=[{d}, {d}]"),
    Method("numpyro_bnaf", "NumPyro AutoBNAFNormal", "numpyro",
           lambda d: "num_flows=1, hidden_factors=[8, 8] (defaults)"),
)}
QUICK_TARGETS = ("banana", "one_comp")  # compilation dominates a run: two targets, not four
DEFAULT_METHODS = ("vijax_fullrank", "vijax_iaf", "vijax_spline", "numpyro_iaf", "numpyro_bnaf")


class Fitted(NamedTuple):
    """A fitted q: training losses and ``draw(key, n) -> (theta (n, dim), log_q (n,))`` with
    ``theta`` unconstrained, laid out as the vijax target's flat vector."""

    losses: np.ndarray
    draw: Callable[[jax.Array, int], tuple[np.ndarray, np.ndarray]]


@dataclasses.dataclass
class Session:
    """``fit(seed) -> Fitted`` (blocks); ``chunk(n) -> () -> None`` compiles a chunk of n steps
    and returns a blocking call of it."""

    fit: Callable[[int], Fitted]
    chunk: Callable[[int], Callable[[], None]]


def _vijax_session(target: FlowTarget, method: str, args) -> Session:
    model = target.make_vijax_model()
    guide = _vijax_guide(method)
    data = vj.prepare_data(target.data)

    def fit(seed):
        # equal steps for every method: no early stopping; PSIS is computed below
        res = vj.fit(model, data, guide=guide, steps=args.steps,
                     num_particles=args.particles, key=jax.random.key(seed),
                     convergence=None, psis_draws=0, progress=False)
        jax.block_until_ready(res.params)
        sample = jax.jit(jax.vmap(res.guide.sample, in_axes=(0, None)))

        def draw(key, n):
            theta, log_q = sample(jax.random.split(key, n), res.params)
            return np.asarray(theta), np.asarray(log_q)

        return Fitted(np.asarray(res.losses), draw)

    def chunk(n):
        spec = vj.guides.resolve_spec(guide)
        optimizer = vj.default_optimizer(spec.default_learning_rate)  # what fit uses
        pipeline = _pipeline(model.target, spec, args.particles, optimizer, n)
        runner, start = pipeline[2], pipeline[3]
        key = jax.random.key(0)
        dim = model.target.dim
        state = start(key, data, jnp.zeros((dim,), jnp.float32), jnp.zeros((dim,), bool))[3]
        cell = [state]
        total = jnp.asarray(2**30, jnp.int32)  # every step of every chunk active
        avg_start = jnp.asarray(0, jnp.int32)  # averaging on, as in the tail of a fit

        def call():
            cell[0], losses = runner(cell[0], data, key, total, avg_start, NO_STOP, NO_LIMIT)
            jax.block_until_ready((cell[0], losses))

        return call

    return Session(fit, chunk)


def _numpyro_session(target: FlowTarget, method: str, args) -> Session:
    vj_target = target.make_vijax_model().target
    guide = _numpyro_guide(method, target.numpyro_model, vj_target.dim)
    svi = SVI(target.numpyro_model, guide, numpyro.optim.Adam(_numpyro_lr(method, args)),
              Trace_ELBO(num_particles=args.particles))
    data = {k: jnp.asarray(v) for k, v in target.data.items()}

    def fit(seed):
        res = svi.run(jax.random.PRNGKey(seed), args.steps, progress_bar=False, **data)
        jax.block_until_ready((res.params, res.losses))
        params = res.params

        @functools.partial(jax.jit, static_argnums=1)
        def sample(key, n):
            posterior = guide.get_posterior(params)
            x, inter = posterior.sample_with_intermediates(key, (n,))
            log_q = posterior.log_prob(x, inter)
            sites = guide._unpack_latent(x)  # numpyro's own unravelling of its flat latent
            theta = jnp.concatenate([sites[b.name].reshape(n, -1) for b in vj_target.blocks],
                                    axis=1)
            return theta, log_q

        def draw(key, n):
            theta, log_q = sample(key, n)
            return np.asarray(theta), np.asarray(log_q)

        return Fitted(np.asarray(res.losses), draw)

    def chunk(n):
        @jax.jit
        def run(state, data):
            return jax.lax.scan(lambda s, _: svi.update(s, **data), state, None, length=n)

        cell = [svi.init(jax.random.PRNGKey(0), **data)]

        def call():
            cell[0], losses = run(cell[0], data)
            jax.block_until_ready((cell[0], losses))

        return call

    return Session(fit, chunk)


def _numpyro_lr(method: str, args) -> float:
    return NUMPYRO_LR[method] if args.numpyro_lr is None else args.numpyro_lr


def make_session(target: FlowTarget, method: str, args) -> Session:
    tool = METHODS[method].tool
    return (_vijax_session if tool == "vijax" else _numpyro_session)(target, method, args)


# ---------------------------------------------------------------------------------------------
# scoring
def _stats(x: np.ndarray) -> dict[str, float]:
    x = np.asarray(x, np.float64)
    q = np.quantile(x, (0.05, 0.5, 0.95))
    return {"mean": float(x.mean()), "sd": float(x.std(ddof=1)), "q05": float(q[0]),
            "q50": float(q[1]), "q95": float(q[2])}


def accuracy(target: FlowTarget, draws: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per-parameter errors against the reference and the verdict (posteriordb README)."""
    derived = target.derived(draws)
    per = {}
    for name, ref in target.reference.items():
        s = _stats(derived[name])
        sd = ref["sd"]
        per[name] = {**s, "sme": abs(s["mean"] - ref["mean"]) / sd,
                     "sd_ratio": s["sd"] / sd,
                     "q_err": max(abs(s[k] - ref[k]) / sd for k in ("q05", "q50", "q95"))}
    mom, qnt = target.moment_params, target.quantile_params
    out = {
        "max_sme": max(per[p]["sme"] for p in mom),
        "max_abs_log_sd_ratio": max(abs(math.log(per[p]["sd_ratio"])) for p in mom),
        "mean_sme": float(np.mean([per[p]["sme"] for p in mom])),
        "max_q_err": max(per[p]["q_err"] for p in qnt) if qnt else None,
        "max_q_err_all": max(v["q_err"] for v in per.values()),
        "parameters": per,
    }
    out["verdict"] = "fail"
    for verdict in ("usable", "accurate"):
        sme, qe, log_r = THRESHOLDS[verdict]
        if (out["max_sme"] <= sme and out["max_abs_log_sd_ratio"] <= log_r
                and (out["max_q_err"] is None or out["max_q_err"] <= qe)):
            out["verdict"] = verdict
    return out


@functools.cache
def _solver(target_name: str, substeps: int):
    d = get_target(target_name).data
    return jax.jit(jax.vmap(lambda a, b, c: concentrations(
        a, b, c, d["D"], d["V"], d["dt"], d["C_hat"].shape[0], substeps)))


def _one_comp_solver_check(target: FlowTarget, z: dict[str, np.ndarray]) -> dict[str, float]:
    """Largest ``|log C|`` error of the benchmark's RK4 (8 substeps) against 128 substeps,
    over up to 2,000 draws of the fitted q (float32), and how many draws hit the clamp."""
    n = min(2000, z["k_a"].shape[0])
    params = [jnp.asarray(z[k][:n]) for k in ("k_a", "K_m", "V_m")]
    coarse, fine = (np.asarray(_solver(target.name, sub)(*params)) for sub in (8, 128))
    tiny = np.finfo(coarse.dtype).tiny  # the floor: the positivity clamp was active
    ok = np.all((coarse > tiny) & (fine > tiny), axis=1)
    err = np.abs(np.log(coarse[ok]) - np.log(fine[ok])).max(axis=1)
    return {"n_checked": int(n), "n_clamped": int((~ok).sum()),
            "max_abs_log_c_err": float(err.max()) if err.size else float("nan"),
            "q999_abs_log_c_err": float(np.quantile(err, 0.999)) if err.size else float("nan")}


@functools.cache
def _target_fns(target_name: str):
    """Jitted ``(thetas (n, dim), data) -> log p~ (n,)`` and ``thetas -> constrained draws``,
    compiled once per target and shared by every method scored in this process."""
    t = get_target(target_name).make_vijax_model().target
    return (jax.jit(jax.vmap(t.log_density, in_axes=(0, None))),
            jax.jit(jax.vmap(t.constrain)))


def evaluate(target: FlowTarget, fitted: Fitted, n: int, seed: int) -> dict[str, Any]:
    """neg-ELBO with its MC standard error, PSIS k-hat and accuracy from ``n`` draws of q."""
    theta, log_q = fitted.draw(jax.random.key(seed), n)
    log_density, constrain = _target_fns(target.name)
    log_p = np.asarray(log_density(jnp.asarray(theta), vj.prepare_data(target.data)),
                       np.float64)
    log_w = log_p - np.asarray(log_q, np.float64)
    finite = np.isfinite(log_w)
    out: dict[str, Any] = {"n_draws": n, "n_nonfinite": int((~finite).sum()),
                           "diverged": bool(finite.sum() < MIN_DRAWS)}
    if out["diverged"]:  # (almost) every draw is NaN: the fit's parameters are not finite
        nan = float("nan")
        out.update(neg_elbo=float("inf"), neg_elbo_finite_draws=nan, neg_elbo_se=nan,
                   k_hat=float("inf"), psis_ess=nan, k_hat_reading="diverged",
                   accuracy={"max_sme": nan, "max_abs_log_sd_ratio": nan, "mean_sme": nan,
                             "max_q_err": nan if target.quantile_params else None,
                             "max_q_err_all": nan, "parameters": {}, "verdict": "fail"})
        return out
    neg = -log_w[finite]
    out.update(neg_elbo=float(neg.mean()) if finite.all() else float("inf"),
               neg_elbo_finite_draws=float(neg.mean()),
               neg_elbo_se=float(neg.std(ddof=1) / math.sqrt(neg.size)))
    ps = vj.psis(np.where(np.isnan(log_w), -np.inf, log_w))
    out.update(k_hat=float(ps.k_hat), psis_ess=float(ps.ess), k_hat_reading=ps.reading)
    top = log_w[finite].max()  # importance-sampling estimate of log Z (a check where it is known)
    out["log_z_is"] = float(np.log(np.mean(np.where(finite, np.exp(log_w - top), 0.0))) + top)
    theta = theta[np.all(np.isfinite(theta), axis=1)]
    z = {k: np.asarray(v) for k, v in constrain(jnp.asarray(theta)).items()}
    out["accuracy"] = accuracy(target, z)
    if target.name == "one_comp":
        out["ode_check"] = _one_comp_solver_check(target, z)
    return out


def model_check(target: FlowTarget, n: int = 32) -> float:
    """Largest |vijax log joint - NumPyro log joint| at ``n`` random points (constrained space):
    the two models must be the same normalised density."""
    model = target.make_vijax_model()
    t = model.target
    data = vj.prepare_data(target.data)
    z = jax.vmap(t.constrain)(jax.random.normal(jax.random.key(7), (n, t.dim)))
    a = jax.jit(jax.vmap(model.log_joint, in_axes=(0, None)))(z, data)
    b = jax.jit(jax.vmap(lambda z, d: numpyro_log_density(target.numpyro_model, (), d, z)[0],
                         in_axes=(0, None)))(z, dict(data))
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b) / np.maximum(1.0, np.abs(a))))


# ---------------------------------------------------------------------------------------------
# one (target, method): first fit and scores; in a child process by default
def fit_and_score(target_name: str, method: str, args,
                  sessions: dict[str, Session] | None = None) -> dict[str, Any]:
    """First fit (session construction included) and scores; the session is left in
    ``sessions`` (in-process mode), so that the steady-state chunks reuse what it compiled."""
    target = get_target(target_name)
    jax.block_until_ready(vj.prepare_data(target.data))  # backend start-up is not timed
    cpu0, t0 = time.process_time(), time.perf_counter()
    session = make_session(target, method, args)
    fitted = session.fit(args.seed)
    first = time.perf_counter() - t0
    cpu = time.process_time() - cpu0
    losses = fitted.losses
    tail = losses[-max(1, losses.size // 10):]
    res = {"first_fit_s": first, "first_fit_cpu_s": cpu,
           "train_loss_tail": float(np.mean(tail)),
           "train_nonfinite": int((~np.isfinite(losses)).sum())}
    t0 = time.perf_counter()
    res.update(evaluate(target, fitted, args.draws, args.seed + 1))
    res["eval_s"] = time.perf_counter() - t0
    if sessions is not None:
        sessions[method] = session
    return res


def _child_args(args) -> list[str]:
    out = ["--steps", str(args.steps), "--particles", str(args.particles),
           "--draws", str(args.draws), "--seed", str(args.seed)]
    return out + (["--numpyro-lr", repr(args.numpyro_lr)] if args.numpyro_lr else [])


def fit_and_score_fresh_process(target_name: str, method: str, args) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.bench_flows", "--child", target_name, method,
           *_child_args(args)]
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child {cmd} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def steady_state(target: FlowTarget, methods: list[str], args,
                 sessions: dict[str, Session]) -> dict[str, list[float]]:
    """µs/step of every method, chunks interleaved round robin. Sessions missing from
    ``sessions`` are made fresh. (vijax's chunk of ``min(500, steps)`` steps is the program its
    fit ran, so an in-process session compiles nothing more.)"""
    calls = {m: (sessions.get(m) or make_session(target, m, args)).chunk(args.chunk)
             for m in methods}
    return interleaved_us_per_step(calls, args.chunk, args.repeats)


def bench_target(name: str, args) -> dict[str, Any]:
    target = get_target(name)
    dim = target.make_vijax_model().target.dim
    row: dict[str, Any] = {"target": name, "title": target.title, "dim": dim,
                           "log_z": target.log_z, "reference_source": target.source,
                           "model_check_max_rel_diff": model_check(target), "methods": {}}
    sessions: dict[str, Session] = {}
    for m in args.methods:
        t0 = time.perf_counter()
        r = (fit_and_score_fresh_process(name, m, args) if args.first_fit == "process"
             else fit_and_score(name, m, args, sessions))
        r["architecture"] = METHODS[m].describe(dim)
        row["methods"][m] = r
        a = r["accuracy"]
        print(f"  {name:14s} {m:20s} neg-ELBO {r['neg_elbo']:9.4f} ± {r['neg_elbo_se']:.4f}  "
              f"k {r['k_hat']:5.2f}  SME {a['max_sme']:.3f}  |logR| "
              f"{a['max_abs_log_sd_ratio']:.3f}  {a['verdict']:8s} first {r['first_fit_s']:.1f} s"
              f"  ({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    per_step = steady_state(target, args.methods, args, sessions)
    for m in args.methods:
        r = row["methods"][m]
        r.update(us_per_step=statistics.median(per_step[m]), us_per_step_min=min(per_step[m]),
                 us_per_step_all=per_step[m])
        print(f"  {name:14s} {m:20s} {r['us_per_step']:9.1f} µs/step", file=sys.stderr,
              flush=True)
    return row


# ---------------------------------------------------------------------------------------------
# report
def _vs_numpyro(row: dict) -> list[dict[str, Any]]:
    """Each vijax flow against the most accurate NumPyro flow of the target (lowest neg-ELBO):
    the target is at least its accuracy (neg-ELBO not worse beyond 2 standard errors of the
    difference, verdict not worse) at no more than its µs/step."""
    ms = row["methods"]
    theirs = [m for m in ms if METHODS[m].tool == "numpyro"]
    ours = [m for m in ms if METHODS[m].tool == "vijax" and m != "vijax_fullrank"]
    if not theirs:
        return []
    best = min(theirs, key=lambda m: (ms[m]["neg_elbo"], ms[m]["neg_elbo_finite_draws"]))
    b = ms[best]
    out = []
    for m in ours:
        r = ms[m]
        diff = r["neg_elbo"] - b["neg_elbo"]
        se = math.hypot(r["neg_elbo_se"], b["neg_elbo_se"])
        accurate_enough = (diff <= 2 * se or not math.isfinite(b["neg_elbo"])) and (
            VERDICTS.index(r["accuracy"]["verdict"]) <= VERDICTS.index(b["accuracy"]["verdict"]))
        ratio = r["us_per_step"] / b["us_per_step"]
        out.append({"vijax": m, "numpyro": best, "d_neg_elbo": diff, "d_se": se,
                    "step_ratio": ratio, "accuracy_met": bool(accurate_enough),
                    "speed_met": bool(ratio <= 1.0), "met": bool(accurate_enough and ratio <= 1.0)})
    return out


def _fmt(x: float | None, spec: str) -> str:
    if x is None:
        return "–"
    if not math.isfinite(x):
        return "inf" if x > 0 else "-inf"
    return format(x, spec)


def to_markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    lrs = ", ".join(f"{lr:g} {METHODS[k].label.removeprefix('NumPyro ')}"
                    for k, lr in s["numpyro_lrs"].items())
    if s["numpyro_lr"] is None:
        lrs += " (each the best of 1e-3, 3e-3, 1e-2 on the banana and the funnel)"
    lines = [
        "# vijax flow benchmark",
        "",
        machine_line(m, s["total_wall_s"]),
        "",
        f"Settings: {s['steps']} steps and K = {s['particles']} particles per gradient for every "
        f"method; vijax with its defaults (Adam, step size 0.05 fullrank / 0.01 IAF / 0.003 "
        f"spline, decayed as lr/sqrt(1 + t/1000), tail averaging of the last half); NumPyro "
        f"`SVI` + `Trace_ELBO(num_particles={s['particles']})` + `numpyro.optim.Adam(lr)`, "
        f"constant lr = {lrs}. Scores from {s['draws']:,} draws of each fitted q. "
        f"µs/step: median of {s['repeats']} chunks of {s['chunk']} steps. First fit: "
        f"{'fresh process' if s['first_fit'] == 'process' else 'in-process (cached primitives)'}."
        f"{' QUICK MODE: indicative only.' if s['quick'] else ''}",
        "",
        "neg-ELBO = mean(log q - log p~) ± MC standard error (equals KL(q||p) where log Z = 0); "
        "k̂: PSIS; SME, |log R|: max standardised mean error and max |log sd ratio| over the "
        "moment-scored parameters; q-err: max quantile error / sd_ref over the heavy-tailed "
        "ones (one_comp: K_m; funnel: x_1..9); verdict: accurate (0.1, [0.9, 1.1]) / usable "
        "(0.3, [0.75, 1.33]) / fail.",
        "",
        "| target | method | neg-ELBO | k̂ | SME | abs log R | q-err | verdict | first fit s "
        "| µs/step |",
        "|---|---|--:|--:|--:|--:|--:|---|--:|--:|",
    ]
    for row in report["rows"]:
        for name, r in row["methods"].items():
            a = r["accuracy"]
            elbo = (f"{_fmt(r['neg_elbo'], '.3f')} ± {r['neg_elbo_se']:.3f}"
                    if math.isfinite(r["neg_elbo"]) else
                    f"inf ({r['n_nonfinite']} non-finite; rest "
                    f"{r['neg_elbo_finite_draws']:.3f})")
            lines.append(
                f"| {row['target']} | {METHODS[name].label} | {elbo} | {_fmt(r['k_hat'], '.2f')} "
                f"| {a['max_sme']:.3f} | {a['max_abs_log_sd_ratio']:.3f} "
                f"| {_fmt(a['max_q_err'], '.3f')} | {a['verdict']} | {r['first_fit_s']:.1f} "
                f"| {r['us_per_step']:.0f} |")
    lines += ["", "Against the target (at least NumPyro's accuracy at no more than its time per "
              "step): each vijax flow against the NumPyro flow with the lowest neg-ELBO on that "
              "target.", "",
              "| target | vijax | NumPyro | Δ neg-ELBO (vijax − NumPyro) | verdicts | µs/step "
              "ratio | accuracy | speed |",
              "|---|---|---|--:|---|--:|---|---|"]
    for row in report["rows"]:
        for c in row["vs_numpyro"]:
            ms = row["methods"]
            lines.append(
                f"| {row['target']} | {METHODS[c['vijax']].label} | {METHODS[c['numpyro']].label}"
                f" | {_fmt(c['d_neg_elbo'], '+.3f')} ± {c['d_se']:.3f} | "
                f"{ms[c['vijax']]['accuracy']['verdict']} / "
                f"{ms[c['numpyro']]['accuracy']['verdict']} | {c['step_ratio']:.2f} | "
                f"{'met' if c['accuracy_met'] else 'NOT met'} | "
                f"{'met' if c['speed_met'] else 'NOT met'} |")
    lines += ["", "Architectures:", ""]
    seen = set()
    for row in report["rows"]:
        for name, r in row["methods"].items():
            key = (name, row["dim"])
            if key not in seen:
                seen.add(key)
                lines.append(f"- {METHODS[name].label}, d = {row['dim']}: {r['architecture']}")
    lines += ["", "Checks: vijax and NumPyro models agree (max relative log-joint difference "
              + ", ".join(f"{r['target']} {r['model_check_max_rel_diff']:.1e}"
                          for r in report["rows"]) + ")."]
    for row in report["rows"]:
        checks = [(n, r["ode_check"]) for n, r in row["methods"].items() if "ode_check" in r]
        if checks:
            worst = max(c["max_abs_log_c_err"] for _, c in checks)
            clamped = sum(c["n_clamped"] for _, c in checks)
            lines.append(f"one_comp ODE (RK4, 8 substeps per half day) against 128 substeps on "
                         f"up to 2,000 draws of each fitted q: max |Δ log C| = {worst:.1e} "
                         f"(noise sd ~0.13); draws with the positivity clamp active: {clamped}.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
def _parse(argv) -> argparse.Namespace:
    p = base_parser("bench_flows", __doc__,
                    "banana and one_comp only, 500-step fits, 3 chunk repeats, in-process "
                         "first fits (about 3 minutes; compilation dominates)")
    p.add_argument("--targets", nargs="+", default=None, choices=list(TARGETS),
                   help=f"default: all ({', '.join(TARGETS)}); with --quick: "
                        f"{', '.join(QUICK_TARGETS)}")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS),
                   choices=list(METHODS))
    p.add_argument("--steps", type=int, default=None, help="steps per fit (default 2000; "
                   "quick 500)")
    p.add_argument("--particles", type=int, default=4, help="K draws per gradient estimate")
    p.add_argument("--numpyro-lr", type=float, default=None,
                   help="NumPyro Adam step size (constant) for every NumPyro guide; default "
                        "per guide: 1e-3 AutoIAFNormal, 1e-2 AutoBNAFNormal")
    p.add_argument("--draws", type=int, default=N_DRAWS, help="draws of q for the scores")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--first-fit", choices=("process", "inproc"), default=None,
                   help="where first fits are timed (default: process; inproc with --quick)")
    p.add_argument("--child", nargs=2, metavar=("TARGET", "METHOD"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.targets is None:
        args.targets = list(QUICK_TARGETS if args.quick else TARGETS)
    if args.steps is None:
        args.steps = 500 if args.quick else 2000
    args.chunk = min(500, args.steps)  # vijax's default chunk: the program its fit runs
    args.repeats = 3 if args.quick else 7
    if args.first_fit is None:
        args.first_fit = "inproc" if args.quick else "process"
    return args


def main(argv=None) -> dict | None:
    args = _parse(argv)
    if args.child:
        print(json.dumps(fit_and_score(*args.child, args)))
        return None
    load_start = list(os.getloadavg())
    t0 = time.perf_counter()
    rows = []
    for name in args.targets:
        row = bench_target(name, args)
        row["vs_numpyro"] = _vs_numpyro(row)
        rows.append(row)
    settings = {k: getattr(args, k) for k in ("quick", "steps", "particles", "numpyro_lr",
                                               "draws", "seed", "chunk", "repeats",
                                               "first_fit", "methods")}
    settings["numpyro_lrs"] = {m: _numpyro_lr(m, args) for m in args.methods
                               if METHODS[m].tool == "numpyro"}
    settings["total_wall_s"] = time.perf_counter() - t0
    report = {"machine": {**machine_info(), "loadavg_start": load_start}, "settings": settings,
              "rows": rows}
    write_report(args.out, "flows", args.quick, report, to_markdown(report),
                 settings["total_wall_s"])
    return report


if __name__ == "__main__":
    main()
