"""Gradient-estimator benchmark: signal-to-noise ratio and time per step of vijax's estimators
against NumPyro's ``Trace_ELBO`` and ``TraceGraph_ELBO``, side by side on three workloads
(``estimator_workloads.py``): Bayesian logistic regression (continuous latents only), a
Gaussian mixture with categorical assignments and a sigmoid belief network with boolean hidden
units (both mixed discrete/continuous). Every method uses a mean-field guide and K = 8
particles per gradient estimate. Per (workload, method):

* **SNR**: at two parameter points per workload, the same for every method: the last iterate
  of the workload's reference estimator (``reparam``, or ``auto`` with discrete latents) after
  ``warmup`` steps from vijax's initial point, and at the end of its ``steps``-step fit
  (NumPyro's guide is set to the same distribution through the parameter map). M independent
  gradient estimates of the loss w.r.t. the guide parameters, in vijax's layout (``loc``,
  ``raw_scale``, discrete ``logits``); per component ``|mean| / sd``; the median over the
  components of each group. (With M draws the ratio cannot fall below about 0.8 / sqrt(M);
  the JSON also has it with that sampling error taken out.) For ``Score(baseline="ema")``
  the moving average is first run for 50 evaluations at the point and then held fixed (its
  steady state there).
* **bias** (at the warm-up point): for estimators of the ELBO's gradient, ``||mean - ref|| /
  ||ref||`` per group, where ``ref`` is the mean of 10 M draws of the reference estimator (a
  separate set of keys), beside the value Monte Carlo noise alone gives, ``sqrt(sum var / M +
  sum var_ref / M_ref) / ||ref||``; ``iwae`` against ``dreg`` (the IWAE bound's gradient).
* **µs/step**: steady state, median over repeats of one compiled chunk of steps / chunk
  length: vijax its chunk runner (``vijax.driver._pipeline``, no stopping rule), NumPyro a
  jitted ``lax.scan`` over ``svi.update``; chunks interleaved round robin so that machine
  load falls on all alike.
* **neg-ELBO**: ``mean(log q - log p~)`` over fresh draws (the same keys for every method) of
  the last iterate of a ``steps``-step fit from the same initial q (vijax's initial point;
  NumPyro gets it through ``init_params``), with its standard error; every method uses the
  same optimizer (vijax's default, Adam 0.05 / sqrt(1 + t/1000)); vijax runs ``vj.fit`` with
  ``convergence=None``.

Run: ``python -m benchmarks.bench_estimators [--quick] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree
from numpyro.infer import SVI, Trace_ELBO, TraceGraph_ELBO

import vijax as vj
from benchmarks.bench_core import (
    base_parser,
    interleaved_us_per_step,
    machine_info,
    machine_line,
    write_report,
)
from benchmarks.estimator_workloads import WORKLOADS, EstWorkload, get_workload
from vijax.driver import _pipeline
from vijax.guides.resolve import build_guide, resolve_spec
from vijax.objective import make_objective

K = 8  # particles per gradient estimate, every method
LEARNING_RATE = 0.05  # vijax's default for the mean-field guide
OPTIMIZER = vj.default_optimizer(LEARNING_RATE)  # one object: vijax's compile cache keys on it
GUIDE = "meanfield"
EMA_BURN = 50  # evaluations at the SNR point before the moving-average baseline is frozen
BATCH = 100  # gradient draws per compiled call
GROUPS = ("loc", "scale", "logits")


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    label: str
    tool: str  # "vijax" or "numpyro"
    estimator: Any  # vijax estimator, or the NumPyro ELBO class
    bound: str | None  # what its gradient estimates: "elbo", "iwae" or None (another bound)


METHODS = {m.name: m for m in (
    Method("reparam", "vijax reparam", "vijax", "reparam", "elbo"),
    Method("auto", "vijax auto (reparam + RLOO)", "vijax", "auto", "elbo"),
    Method("stl", "vijax stl", "vijax", "stl", "elbo"),
    Method("iwae", "vijax iwae", "vijax", "iwae", "iwae"),
    Method("dreg", "vijax dreg", "vijax", "dreg", "iwae"),
    Method("renyi", "vijax renyi(0.5)", "vijax", vj.estimators.Renyi(0.5), None),
    Method("score_rloo", "vijax score(rloo)", "vijax", vj.estimators.Score("rloo"), "elbo"),
    Method("score_ema", "vijax score(ema)", "vijax", vj.estimators.Score("ema"), "elbo"),
    Method("score_none", "vijax score(None)", "vijax", vj.estimators.Score(None), "elbo"),
    Method("numpyro_trace", "NumPyro Trace_ELBO", "numpyro", Trace_ELBO, "elbo"),
    Method("numpyro_tracegraph", "NumPyro TraceGraph_ELBO", "numpyro", TraceGraph_ELBO,
           "elbo"),
)}
REFERENCE = {"elbo": ("reparam", "auto"), "iwae": ("dreg",)}  # first one the workload runs


def _reference(wl: EstWorkload, bound: str | None) -> str | None:
    for name in REFERENCE.get(bound, ()):
        if name in wl.methods:
            return name
    return None


# ---------------------------------------------------------------------------------------------
# one session per (workload, method)
@dataclasses.dataclass
class Session:
    """``grads(point, keys) -> (len(keys), n_params)`` gradient draws at vijax params ``point``
    (in vijax's layout); ``fit(init_params, seed) -> (params, losses)`` runs ``steps`` steps
    from ``init_params`` (vijax's layout) and returns the last iterate; ``chunk(n) -> () ->
    None`` compiles a chunk of n steps and returns a blocking call of it."""

    grads: Callable[[Any, jax.Array], np.ndarray]
    fit: Callable[[Any, int], tuple[Any, np.ndarray]]
    chunk: Callable[[int], Callable[[], None]]


def _batched(fn, keys) -> np.ndarray:
    return np.concatenate([np.asarray(fn(keys[i:i + BATCH]), np.float64)
                           for i in range(0, keys.shape[0], BATCH)])


def _vijax_fit(model, data, estimator, steps: int, seed: int):
    """``vj.fit`` running exactly ``steps`` steps (no stopping rule) and returning the last
    iterate as ``res.last_params``; no progress bar, no PSIS check."""
    return vj.fit(model, data, guide=GUIDE, estimator=estimator, num_particles=K, steps=steps,
                  optimizer=OPTIMIZER, key=jax.random.key(seed), average=0.0,
                  convergence=None, progress=False, psis_draws=0)


def _vijax_session(wl: EstWorkload, method: Method, ctx: dict, args) -> Session:
    model, data = ctx["model"], ctx["data"]
    target = model.target
    guide = build_guide(resolve_spec(GUIDE), target)
    objective = make_objective(target, guide, method.estimator, K)
    state0 = objective.init_state(jnp.float32)

    @jax.jit
    def grads(params, data, state, keys):
        def one(key):
            g = jax.grad(lambda p: objective.loss(key, p, data, state)[0])(params)
            return ravel_pytree(g)[0]

        return jax.vmap(one)(keys)

    @jax.jit
    def burn(params, data, key):  # the moving-average baseline's steady state at params
        def body(state, k):
            return objective.loss(k, params, data, state)[1], None

        return jax.lax.scan(body, state0, jax.random.split(key, EMA_BURN))[0]

    def grad_draws(point, keys):
        state = burn(point, data, jax.random.key(99)) if jax.tree_util.tree_leaves(state0) \
            else state0
        return _batched(lambda ks: grads(point, data, state, ks), keys)

    def fit(init_params, seed):
        del init_params  # vj.fit starts from the same point (same key)
        res = _vijax_fit(model, data, method.estimator, args.steps, seed)
        return res.last_params, np.asarray(res.losses)

    def chunk(n):
        runner, start = ctx["pipeline"](method.estimator, n)[2:4]
        state = start(jax.random.key(0), data, *ctx["no_init"])[3]
        cell = [state]
        key = jax.random.key(0)
        total = jnp.asarray(2**30, jnp.int32)  # every step of every chunk active
        avg_start = jnp.asarray(0, jnp.int32)  # averaging on, as in the tail of a fit
        first_chunk_end = jnp.asarray(0, jnp.int32)  # (for a stopping rule: none here)
        limit = jnp.asarray(2**30, jnp.int32)  # consecutive non-finite steps before failing

        def call():
            cell[0], losses = runner(cell[0], data, key, total, avg_start, first_chunk_end,
                                     limit)
            jax.block_until_ready((cell[0], losses))

        return call

    return Session(grad_draws, fit, chunk)


def _numpyro_session(wl: EstWorkload, method: Method, ctx: dict, args) -> Session:
    data = ctx["data"]
    elbo = method.estimator(num_particles=K)
    guide = wl.make_numpyro_guide()
    svi = SVI(wl.numpyro_model, guide, OPTIMIZER, elbo)
    # set up (autoguides trace the model here) at vijax's initial q
    svi.init(jax.random.PRNGKey(0), init_params=wl.to_numpyro(ctx["init_params"]), **data)

    @jax.jit
    def grads(params, data, keys):
        def one(key):
            g = jax.grad(lambda p: elbo.loss(key, wl.to_numpyro(p), wl.numpyro_model, guide,
                                             **data))(params)
            return ravel_pytree(g)[0]

        return jax.vmap(one)(keys)

    def grad_draws(point, keys):
        raw = jax.random.key_data(keys)  # NumPyro's raw uint32 keys
        return _batched(lambda ks: grads(point, data, ks), raw)

    runs: dict[int, Callable] = {}

    def compiled(n):
        if n not in runs:
            @jax.jit
            def run(state, data):
                return jax.lax.scan(lambda s, _: svi.update(s, **data), state, None, length=n)

            runs[n] = run
        return runs[n]

    def fit(init_params, seed):
        state = svi.init(jax.random.PRNGKey(seed), init_params=wl.to_numpyro(init_params),
                         **data)
        n = min(args.chunk, args.steps)
        losses = []
        for _ in range(math.ceil(args.steps / n)):
            state, chunk_losses = compiled(n)(state, data)
            losses.append(np.asarray(chunk_losses))
        return wl.from_numpyro(svi.get_params(state)), np.concatenate(losses)[:args.steps]

    def chunk(n):
        run = compiled(n)
        cell = [svi.init(jax.random.PRNGKey(0), init_params=wl.to_numpyro(ctx["init_params"]),
                         **data)]

        def call():
            cell[0], losses = run(cell[0], data)
            jax.block_until_ready((cell[0], losses))

        return call

    return Session(grad_draws, fit, chunk)


def make_session(wl: EstWorkload, name: str, ctx: dict, args) -> Session:
    method = METHODS[name]
    make = _vijax_session if method.tool == "vijax" else _numpyro_session
    return make(wl, method, ctx, args)


# ---------------------------------------------------------------------------------------------
# statistics
def _labels(params) -> np.ndarray:
    """Group index (0 loc, 1 scale, 2 logits) of every component of ``ravel_pytree(params)``."""
    def label(path, x):
        keys = {getattr(k, "key", None) for k in path}
        code = 2 if "discrete" in keys else 0 if "loc" in keys else 1
        return jnp.full(jnp.shape(x), code, jnp.int32)

    return np.asarray(ravel_pytree(jax.tree_util.tree_map_with_path(label, params))[0])


def snr(draws: np.ndarray, labels: np.ndarray, debias: bool = False
        ) -> dict[str, float | None]:
    """Median over each group's components of ``|mean| / sd`` over the M draws.

    The plain ratio does not fall below about ``0.8 / sqrt(M)`` however noisy the estimator
    (the sampling error of the mean); ``debias=True`` takes that out,
    ``sqrt(max(mean^2 - sd^2 / M, 0)) / sd`` (0 for components the M draws cannot resolve).
    """
    mean, sd = draws.mean(0), draws.std(0, ddof=1)
    signal = np.sqrt(np.maximum(mean**2 - sd**2 / draws.shape[0], 0.0)) if debias \
        else np.abs(mean)
    ratio = np.where(sd > 0, signal / np.where(sd > 0, sd, 1.0), np.nan)
    out: dict[str, float | None] = {}
    for i, group in enumerate(GROUPS):
        sel = ratio[labels == i]
        out[group] = float(np.nanmedian(sel)) if sel.size else None
    return out


def bias(draws: np.ndarray, ref_mean: np.ndarray, ref_var: np.ndarray, ref_n: int,
         labels: np.ndarray) -> dict[str, dict[str, float] | None]:
    """Relative error of the mean gradient against the reference mean, and the value that
    Monte Carlo noise alone would give, per group (continuous: loc and scale together)."""
    mean, var = draws.mean(0), draws.var(0, ddof=1)
    out: dict[str, dict[str, float] | None] = {}
    for group, sel in (("continuous", labels < 2), ("logits", labels == 2)):
        if not sel.any():
            out[group] = None
            continue
        norm = float(np.linalg.norm(ref_mean[sel]))
        noise = math.sqrt(float(var[sel].sum() / draws.shape[0] + ref_var[sel].sum() / ref_n))
        out[group] = {"rel_err": float(np.linalg.norm(mean[sel] - ref_mean[sel])) / norm,
                      "noise": noise / norm}
    return out


def _moments(session: Session, point, keys) -> tuple[np.ndarray, np.ndarray]:
    """Mean and variance of many gradient draws, accumulated batch by batch (float64)."""
    total, total_sq = 0.0, 0.0
    for i in range(0, keys.shape[0], 10 * BATCH):
        d = session.grads(point, keys[i:i + 10 * BATCH])
        total = total + d.sum(0)
        total_sq = total_sq + (d**2).sum(0)
    n = keys.shape[0]
    mean = total / n
    return mean, (total_sq - n * mean**2) / (n - 1)


def _neg_elbo_fn(model, data):
    """``(params, keys) -> (len(keys),)`` draws of ``log q - log p~`` under the mean-field
    guide (with categoricals for discrete latents): the same evaluation for every method."""
    target = model.target
    guide = build_guide(resolve_spec(GUIDE), target)

    @jax.jit
    def draws(params, data, keys):
        def one(key):
            theta, log_q = guide.sample(key, params)
            return log_q - target.log_density(theta, data)

        return jax.vmap(one)(keys)

    def evaluate(params, keys):
        x = np.concatenate([np.asarray(draws(params, data, keys[i:i + 500]), np.float64)
                            for i in range(0, keys.shape[0], 500)])
        finite = np.isfinite(x)
        return {"neg_elbo": float(x[finite].mean()),
                "neg_elbo_se": float(x[finite].std(ddof=1) / math.sqrt(finite.sum())),
                "n_nonfinite": int((~finite).sum())}

    return evaluate


# ---------------------------------------------------------------------------------------------
def bench_workload(name: str, args) -> dict[str, Any]:
    wl = get_workload(name)
    methods = [m for m in wl.methods if m in args.methods]
    model = wl.make_vijax_model()
    target = model.target
    data = vj.prepare_data(wl.data)
    spec = resolve_spec(GUIDE)
    no_init = (jnp.zeros((target.full_dim,), jnp.float32), jnp.zeros((target.full_dim,), bool))

    def pipeline(estimator, n):  # what vj.fit(convergence=None) compiles for a chunk of n
        return _pipeline(target, spec, K, OPTIMIZER, n,
                         vj.estimators.resolve_estimator(estimator), None)

    # the common starting q: what vj.fit starts from with this key (its start-up program)
    ref_elbo = _reference(wl, "elbo")
    chunk = min(args.chunk, args.steps)
    start = pipeline(METHODS[ref_elbo].estimator, chunk)[3]
    init_params = start(jax.random.key(args.seed), data, *no_init)[3].params
    ctx = {"model": model, "data": data, "init_params": init_params, "no_init": no_init,
           "pipeline": pipeline}
    # the SNR points: the reference estimator's fit after `warmup` steps and at its end
    point = _vijax_fit(model, data, METHODS[ref_elbo].estimator, args.warmup,
                       args.seed).last_params
    sessions = {ref_elbo: make_session(wl, ref_elbo, ctx, args)}
    t0 = time.perf_counter()
    fitted = {ref_elbo: (*sessions[ref_elbo].fit(init_params, args.seed),
                         time.perf_counter() - t0)}
    late = fitted[ref_elbo][0]
    labels = _labels(point)

    row: dict[str, Any] = {
        "workload": name, "title": wl.title, "dim": target.dim, "n_discrete": target.n_discrete,
        "n_params": {g: int((labels == i).sum()) for i, g in enumerate(GROUPS)},
        "warmup_steps": args.warmup, "warmup_estimator": ref_elbo, "methods": {}}
    grad_keys = jax.random.split(jax.random.key(args.seed + 1), args.draws)
    ref_keys = jax.random.split(jax.random.key(args.seed + 2), args.ref_draws)
    eval_keys = jax.random.split(jax.random.key(args.seed + 3), args.eval_draws)
    evaluate = _neg_elbo_fn(model, data)
    row["init_neg_elbo"] = evaluate(init_params, eval_keys)
    row["point_neg_elbo"] = evaluate(point, eval_keys)
    row["late_neg_elbo"] = evaluate(late, eval_keys)

    references: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for bound in ("elbo", "iwae"):
        ref = _reference(wl, bound)
        if ref is not None and ref in methods:
            sessions[ref] = make_session(wl, ref, ctx, args)
            t0 = time.perf_counter()
            references[bound] = _moments(sessions[ref], point, ref_keys)
            row[f"reference_{bound}"] = {"method": ref, "draws": args.ref_draws,
                                         "seconds": time.perf_counter() - t0}

    for m in methods:
        method = METHODS[m]
        t0 = time.perf_counter()
        session = sessions.get(m) or make_session(wl, m, ctx, args)
        sessions[m] = session
        draws = session.grads(point, grad_keys)
        late_draws = session.grads(late, grad_keys)
        late_snr = snr(late_draws, labels)
        t_grads = time.perf_counter() - t0
        if m not in fitted:
            t1 = time.perf_counter()
            fitted[m] = (*session.fit(init_params, args.seed), time.perf_counter() - t1)
        params, losses, t_fit = fitted[m]
        r: dict[str, Any] = {"label": method.label, "tool": method.tool, "bound": method.bound,
                             "snr": snr(draws, labels), "snr_late": late_snr,
                             "snr_debiased": snr(draws, labels, debias=True),
                             "snr_late_debiased": snr(late_draws, labels, debias=True),
                             "grad_seconds": t_grads,
                             "fit_seconds": t_fit,
                             "train_loss_tail": float(np.nanmean(losses[-max(1, len(losses)
                                                                             // 10):])),
                             "train_nonfinite": int((~np.isfinite(losses)).sum())}
        if method.bound in references:
            ref_mean, ref_var = references[method.bound]
            r["bias"] = bias(draws, ref_mean, ref_var, args.ref_draws, labels)
            r["bias_reference"] = row[f"reference_{method.bound}"]["method"]
        r.update(evaluate(params, eval_keys))
        row["methods"][m] = r
        s = r["snr"]
        print(f"  {name:9s} {m:19s} SNR loc {_fmt(s['loc'])} scale {_fmt(s['scale'])} logits "
              f"{_fmt(s['logits'])}  late {_fmt(late_snr['loc'])} {_fmt(late_snr['scale'])} "
              f"{_fmt(late_snr['logits'])}  neg-ELBO {r['neg_elbo']:.2f}  "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)

    per_step = interleaved_us_per_step({m: sessions[m].chunk(chunk) for m in methods}, chunk,
                                       args.repeats)
    for m in methods:
        r = row["methods"][m]
        r.update(us_per_step=statistics.median(per_step[m]), us_per_step_min=min(per_step[m]),
                 us_per_step_all=per_step[m])
        print(f"  {name:9s} {m:19s} {r['us_per_step']:9.1f} µs/step", file=sys.stderr,
              flush=True)
    return row


# ---------------------------------------------------------------------------------------------
# report
def _fmt(x: float | None, spec: str = ".3g") -> str:
    if x is None:
        return "–"
    if not math.isfinite(x):
        return "nan" if math.isnan(x) else ("inf" if x > 0 else "-inf")
    return format(x, spec)


def _fmt_bias(b: dict | None) -> str:
    if b is None:
        return "–"
    return f"{b['rel_err']:.2f} ({b['noise']:.2f})"


def _ratio(row: dict, a: str, b: str, key: Callable[[dict], float | None]) -> float | None:
    ms = row["methods"]
    if a not in ms or b not in ms:
        return None
    x, y = key(ms[a]), key(ms[b])
    if x is None or y is None or not y:
        return None
    return x / y


def headline(report: dict) -> dict[str, float | None]:
    """The ratios quoted in the reading paragraph."""
    rows = {row["workload"]: row for row in report["rows"]}
    out: dict[str, float | None] = {}

    def put(key, workload, a, b, fn):
        out[key] = _ratio(rows[workload], a, b, fn) if workload in rows else None

    def snr_of(group, where="snr"):
        return lambda r: r[where][group]

    def step(r):
        return r["us_per_step"]

    put("gmm_rloo_over_none_snr_logits", "gmm", "score_rloo", "score_none", snr_of("logits"))
    put("gmm_rloo_over_none_snr_loc", "gmm", "score_rloo", "score_none", snr_of("loc"))
    put("gmm_ema_over_rloo_snr_logits", "gmm", "score_ema", "score_rloo", snr_of("logits"))
    put("gmm_auto_over_score_rloo_snr_loc", "gmm", "auto", "score_rloo", snr_of("loc"))
    put("logistic_dreg_over_iwae_snr_loc", "logistic", "dreg", "iwae", snr_of("loc"))
    put("logistic_dreg_over_iwae_snr_scale", "logistic", "dreg", "iwae", snr_of("scale"))
    put("gmm_dreg_over_iwae_snr_loc", "gmm", "dreg", "iwae", snr_of("loc"))
    put("logistic_stl_over_reparam_snr_scale", "logistic", "stl", "reparam", snr_of("scale"))
    put("logistic_stl_over_reparam_snr_scale_late", "logistic", "stl", "reparam",
        snr_of("scale", "snr_late"))
    put("logistic_stl_over_reparam_snr_loc_late", "logistic", "stl", "reparam",
        snr_of("loc", "snr_late"))
    put("logistic_dreg_over_iwae_snr_loc_late", "logistic", "dreg", "iwae",
        snr_of("loc", "snr_late"))
    put("logistic_dreg_over_iwae_snr_scale_late", "logistic", "dreg", "iwae",
        snr_of("scale", "snr_late"))
    put("logistic_reparam_over_score_rloo_snr_loc", "logistic", "reparam", "score_rloo",
        snr_of("loc"))
    put("gmm_tracegraph_over_auto_snr_logits", "gmm", "numpyro_tracegraph", "auto",
        snr_of("logits"))
    put("gmm_tracegraph_over_auto_snr_logits_late", "gmm", "numpyro_tracegraph", "auto",
        snr_of("logits", "snr_late"))
    put("sbn_auto_over_score_rloo_snr_loc", "sbn", "auto", "score_rloo", snr_of("loc"))
    put("sbn_tracegraph_over_auto_snr_logits", "sbn", "numpyro_tracegraph", "auto",
        snr_of("logits"))
    put("logistic_reparam_vs_trace_step", "logistic", "reparam", "numpyro_trace", step)
    put("logistic_reparam_vs_tracegraph_step", "logistic", "reparam", "numpyro_tracegraph",
        step)
    put("gmm_auto_vs_tracegraph_step", "gmm", "auto", "numpyro_tracegraph", step)
    put("sbn_auto_vs_tracegraph_step", "sbn", "auto", "numpyro_tracegraph", step)
    if "gmm" in rows and "numpyro_trace" in rows["gmm"]["methods"]:
        b = rows["gmm"]["methods"]["numpyro_trace"].get("bias", {}).get("logits")
        out["gmm_trace_bias_logits"] = None if b is None else b["rel_err"]
    return out


def to_markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    lines = [
        "# vijax gradient-estimator benchmark",
        "",
        machine_line(m, s["total_wall_s"]),
        "",
        f"Settings: mean-field guide and K = {s['particles']} particles per gradient estimate "
        f"for every method. SNR: {s['draws']:,} independent gradient estimates at two points "
        f"per workload, the same for all methods (NumPyro's guide set to the same q): the "
        f"reference estimator's fit (reparam, or auto with discrete latents) from vijax's "
        f"initial point after {s['warmup']} steps, and at its end; per component |mean| / sd, "
        f"median over the components of each group (loc, scale = softplus-raw scale, discrete "
        f"logits); with {s['draws']:,} draws no SNR reads below about "
        f"{0.8 / math.sqrt(s['draws']):.2f}. Bias (at the warm-up point): relative error "
        f"||mean - ref|| / ||ref|| of the continuous and of the logits gradient against "
        f"{s['ref_draws']:,} draws of the reference estimator (ELBO: reparam or auto; IWAE "
        f"bound: dreg), in parentheses what Monte Carlo noise alone gives. µs/step: median of "
        f"{s['repeats']} compiled chunks of {s['chunk']} steps, interleaved. neg-ELBO: of the "
        f"last iterate after {s['steps']} steps of Adam {LEARNING_RATE} / sqrt(1 + t/1000) "
        f"(the same optimizer and initial q for all), from {s['eval_draws']:,} draws (the "
        f"same keys for all) ± its standard error."
        f"{' QUICK MODE: indicative only.' if s['quick'] else ''}",
        "",
    ]
    for row in report["rows"]:
        n = row["n_params"]
        lines += [
            f"## {row['workload']}: {row['title']}",
            "",
            f"{n['loc']} loc + {n['scale']} scale + {n['logits']} logit parameters. SNR at "
            f"the warm-up point (after {row['warmup_steps']} `{row['warmup_estimator']}` "
            f"steps; neg-ELBO {row['init_neg_elbo']['neg_elbo']:.1f} at the start, "
            f"{row['point_neg_elbo']['neg_elbo']:.1f} there) and at the end of that fit "
            f"(after {s['steps']} steps, neg-ELBO {row['late_neg_elbo']['neg_elbo']:.1f}).",
            "",
            "| method | SNR loc | scale | logits | SNR at end: loc | scale | logits "
            "| bias cont. (noise) | bias logits (noise) | µs/step | neg-ELBO after fit |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        for r in row["methods"].values():
            sn, late = r["snr"], r["snr_late"]
            b = r.get("bias") or {}
            elbo = f"{r['neg_elbo']:.2f} ± {r['neg_elbo_se']:.2f}"
            if r["n_nonfinite"]:
                elbo += f" ({r['n_nonfinite']} non-finite draws)"
            lines.append(
                f"| {r['label']} | " + " | ".join(_fmt(x[g]) for x in (sn, late) for g in GROUPS)
                + f" | {_fmt_bias(b.get('continuous'))} | {_fmt_bias(b.get('logits'))} "
                f"| {r['us_per_step']:.0f} | {elbo} |")
        lines.append("")
    lines += ["## Reading", "", reading(report), ""]
    return "\n".join(lines)


def reading(report: dict) -> str:
    h = report["headline"]
    rows = {row["workload"]: row for row in report["rows"]}

    def x(key, spec=".2f"):
        return _fmt(h.get(key), spec)

    def elbo(workload, method):
        r = rows.get(workload, {}).get("methods", {}).get(method)
        return "–" if r is None else f"{r['neg_elbo']:.1f}"

    return "\n".join([
        f"- Baselines (mixture, score function): RLOO gives {x('gmm_rloo_over_none_snr_logits')}x "
        f"the logits SNR of no baseline and {x('gmm_rloo_over_none_snr_loc')}x on loc, and its "
        f"fit ends at neg-ELBO {elbo('gmm', 'score_rloo')} against "
        f"{elbo('gmm', 'score_none')}. The moving average, held at its steady state, matches "
        f"RLOO at a fixed point ({x('gmm_ema_over_rloo_snr_logits')}x on the logits); neg-ELBO "
        f"after the fit: {elbo('logistic', 'score_ema')} against {elbo('logistic', 'score_rloo')} "
        f"(logistic), {elbo('gmm', 'score_ema')} against {elbo('gmm', 'score_rloo')} "
        f"(mixture), {elbo('sbn', 'score_ema')} against {elbo('sbn', 'score_rloo')} (SBN); "
        "see benchmarks/README.md.",
        f"- Reparameterising the continuous part: auto has "
        f"{x('gmm_auto_over_score_rloo_snr_loc')}x score(rloo)'s SNR on the mixture means and "
        f"{x('sbn_auto_over_score_rloo_snr_loc')}x on the SBN weights (fit: "
        f"{elbo('sbn', 'auto')} against {elbo('sbn', 'score_rloo')}), reparam "
        f"{x('logistic_reparam_over_score_rloo_snr_loc')}x on the logistic regression.",
        f"- Path derivatives (logistic): STL / reparam SNR on scale "
        f"{x('logistic_stl_over_reparam_snr_scale')} at the warm-up point, "
        f"{x('logistic_stl_over_reparam_snr_scale_late')} at the end of the fit (loc "
        f"{x('logistic_stl_over_reparam_snr_loc_late')}); DReG / IWAE "
        f"{x('logistic_dreg_over_iwae_snr_loc')} on loc and "
        f"{x('logistic_dreg_over_iwae_snr_scale')} on scale at the warm-up point, "
        f"{x('logistic_dreg_over_iwae_snr_loc_late')} and "
        f"{x('logistic_dreg_over_iwae_snr_scale_late')} at the end (mixture loc, warm-up "
        f"point: {x('gmm_dreg_over_iwae_snr_loc')}).",
        f"- Discrete latents, vijax against NumPyro's TraceGraph_ELBO, which has no baseline but "
        f"is Rao-Blackwellised per plate element (each point's logits see only that point's "
        f"terms, where vijax's score term uses the whole log joint as every element's "
        f"signal): TraceGraph has {x('gmm_tracegraph_over_auto_snr_logits')}x vijax auto's "
        f"logits SNR on the mixture at the warm-up point "
        f"({x('gmm_tracegraph_over_auto_snr_logits_late')}x at the end) and "
        f"{x('sbn_tracegraph_over_auto_snr_logits')}x on the SBN; neg-ELBO after the fit "
        f"{elbo('gmm', 'numpyro_tracegraph')} against {elbo('gmm', 'auto')} (mixture), "
        f"{elbo('sbn', 'numpyro_tracegraph')} against {elbo('sbn', 'auto')} (SBN).",
        f"- NumPyro's Trace_ELBO differentiates only log q at the drawn assignments: its logits "
        f"gradient averages zero (relative error {x('gmm_trace_bias_logits')} against the ELBO "
        f"gradient), and its fit ends at neg-ELBO {elbo('gmm', 'numpyro_trace')}.",
        f"- Time per step, vijax / NumPyro: logistic reparam / Trace_ELBO "
        f"{x('logistic_reparam_vs_trace_step')}, / TraceGraph_ELBO "
        f"{x('logistic_reparam_vs_tracegraph_step')}; auto / TraceGraph_ELBO "
        f"{x('gmm_auto_vs_tracegraph_step')} (mixture), {x('sbn_auto_vs_tracegraph_step')} "
        "(SBN).",
    ])


# ---------------------------------------------------------------------------------------------
def _parse(argv) -> argparse.Namespace:
    p = base_parser("bench_estimators", __doc__,
                    "200 gradient draws (2,000 for the references), 300-step fits, 3 chunk "
                         "repeats, 500 evaluation draws")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS),
                   help="restrict to these methods (each workload runs its own subset)")
    p.add_argument("--draws", type=int, default=None, help="gradient draws for the SNR "
                   "(default 1000; quick 200); a multiple of 100")
    p.add_argument("--steps", type=int, default=None, help="steps per fit (default 2000; "
                   "quick 300)")
    p.add_argument("--warmup", type=int, default=200, help="warm-up steps to the SNR point")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.draws is None:
        args.draws = 200 if args.quick else 1000
    if args.draws % BATCH:
        p.error(f"--draws must be a multiple of {BATCH}")
    if args.steps is None:
        args.steps = 300 if args.quick else 2000
    args.ref_draws = 10 * args.draws
    args.chunk = min(500, args.steps)  # vijax's default chunk: the program its fit runs
    args.repeats = 3 if args.quick else 7
    args.eval_draws = 500 if args.quick else 2000
    args.particles = K
    return args


def main(argv=None) -> dict:
    args = _parse(argv)
    # NumPyro warns that Trace_ELBO does not support discrete latents: that is what we show
    warnings.filterwarnings("ignore", message="Currently, SVI with Trace_ELBO loss does not")
    load_start = list(os.getloadavg())
    t0 = time.perf_counter()
    rows = [bench_workload(name, args) for name in args.workloads]
    settings = {k: getattr(args, k) for k in ("quick", "draws", "ref_draws", "steps", "warmup",
                                               "seed", "chunk", "repeats", "eval_draws",
                                               "particles", "methods")}
    settings["learning_rate"] = LEARNING_RATE
    settings["ema_burn"] = EMA_BURN
    settings["total_wall_s"] = time.perf_counter() - t0
    report = {"machine": {**machine_info(), "loadavg_start": load_start}, "settings": settings,
              "rows": rows}
    report["headline"] = headline(report)
    write_report(args.out, "estimators", args.quick, report, to_markdown(report),
                 settings["total_wall_s"])
    return report


if __name__ == "__main__":
    main()
