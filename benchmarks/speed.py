"""Speed suite of ``python -m benchmarks run``: vijax against NumPyro SVI, BlackJAX and the
hand-written floor, side by side in one run.

Workloads (``workloads.py``, each a vijax model, a NumPyro model and a hand-written log density
of the same posterior): Bayesian logistic regression (N = 10,000, D = 50; with ``--device gpu``
N = 1,000,000, D = 100), centred eight schools, hierarchical linear regression (100 groups x 50
points, dim 205). Guides: mean-field, low-rank (rank ``round(sqrt(dim))``) and full-rank (where
``dim <= FULLRANK_MAX_DIM``). Methods, all with ``optax.adam(1e-2)`` (constant) and K particles:

* **vijax**: ``vj.fit(guide=..., convergence=None, psis_draws=0, precondition=None,
  progress=False)`` (from a random start like the others, not the default Newton-polished,
  whitened start); its chunk program is its own runner (``vijax.driver._pipeline``) as
  ``vj.fit`` builds it by default: non-finite guard, tail averaging and the default stopping
  rule (``vj.Convergence()`` sized to the parameters) on; the rule's statistics and block
  ends run every chunk, but it may not stop the run (``first_chunk_end`` out of reach), so
  every step is a full step.
* **NumPyro**: ``SVI`` + ``Trace_ELBO(num_particles=K)`` with the matching autoguide
  (``AutoDiagonalNormal``, ``AutoLowRankMultivariateNormal``, ``AutoMultivariateNormal``);
  whole fit ``svi.run(progress_bar=False)``, chunk program a jitted ``lax.scan`` of
  ``svi.update``.
* **BlackJAX** (mean-field and full-rank only): ``blackjax.vi.meanfield_vi`` /
  ``fullrank_vi`` ``step`` in a jitted ``lax.scan`` (its STL gradient estimator, its own
  initial scales: mean-field ``exp(-2)``, full-rank identity; the mean starts where the others
  start). Its ``info.elbo`` is ``mean(log q - log p)``, a loss like the others'.
* **floor**: ``floor.py`` (mean-field, low-rank, full-rank): the
  reparameterised ELBO with the closed-form entropy, ``value_and_grad``, one optax update, in
  one jitted ``lax.scan``; nothing else.

Figures per (workload, guide, method):

* **compile s**: trace + lower + XLA compile of the ``chunk``-step program
  (``jax.jit(f).lower(...).compile()``), on fresh objects (nothing cached).
* **first fit s**: the first ``steps``-step fit, set-up, tracing and compilation included, in
  a fresh Python process (``--quick``: in this process, where primitives compiled earlier are
  cached, which NumPyro's op-by-op ``SVI.init`` benefits from most).
* **µs/step**: steady state, the median over ``repeats`` calls of the compiled chunk, divided
  by ``chunk``; the methods' calls interleaved round robin.
* **repeat fit s**: median of ``fit_repeats`` new whole fits on new data of the same shapes
  (vijax: ``vj.fit`` again; NumPyro: ``svi.run`` again, which re-traces and re-compiles;
  BlackJAX and floor: their cached jitted fit).
* **time to 1 nat**: the converged loss is the mean loss over the last 10% of a reference run
  of ``ref_steps`` steps of the same method (its compiled chunk, from its initial point); the
  running mean is the mean over a trailing window of ``WINDOW`` steps; *steps to 1 nat* is the
  first step at which the running mean is within 1 nat of the converged loss, and *time to 1
  nat* is that many steps at the method's steady-state µs/step (compilation not included).
* **peak memory**: of the compiled chunk program, from XLA's buffer assignment
  (``compiled.memory_analysis()``): argument bytes + temporary bytes (the JSON also has the
  output, alias and generated-code sizes). Per program, not the process's RSS.

Run: ``python -m benchmarks run --suite speed [--quick] [--device cpu|gpu] [--out DIR]``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
)
from numpyro.infer.util import log_density as numpyro_log_density

import vijax as vj
from benchmarks.bench_core import REPO_ROOT, _device_data, _rank, _tail_mean, _time
from benchmarks.floor import make_floor
from benchmarks.workloads import Workload, get_workload
from vijax.driver import _pipeline
from vijax.program import parameter_count

__all__ = ["run", "to_markdown", "time_to_converged"]

TOOLS = ("vijax", "numpyro", "blackjax", "floor")
GUIDES = ("meanfield", "lowrank", "fullrank")
WORKLOADS = {"cpu": ("logistic", "eight_schools", "hier_linreg"),
             "gpu": ("logistic_large", "eight_schools", "hier_linreg")}
LEARNING_RATE = 1e-2
FULLRANK_MAX_DIM = 256  # full-rank guides only up to this many unconstrained dimensions
WINDOW = 100  # steps in the running mean of "time to 1 nat"
NAT = 1.0
TARGET_STEP, TARGET_REPEAT, TARGET_FIRST = 1.1, 10.0, 3.0
VIJAX_MAX_NONFINITE = 100  # vj.fit's default max_consecutive_nonfinite
NUMPYRO_GUIDES = {"meanfield": AutoDiagonalNormal, "lowrank": AutoLowRankMultivariateNormal,
                  "fullrank": AutoMultivariateNormal}
LABELS = {"vijax": "vijax", "numpyro": "NumPyro", "blackjax": "BlackJAX", "floor": "floor"}


def settings_for(quick: bool) -> dict[str, Any]:
    """Steps, repeats, guides and where first fits are timed (full run / ``--quick``)."""
    if quick:  # compilation dominates: two guide families, in-process first fits
        return {"steps": 500, "chunk": 500, "repeats": 5, "fit_repeats": 1, "ref_steps": 2000,
                "first_fit": "inproc", "particles": 1, "guides": ("meanfield", "fullrank")}
    return {"steps": 2000, "chunk": 500, "repeats": 7, "fit_repeats": 3, "ref_steps": 10_000,
            "first_fit": "process", "particles": 1, "guides": GUIDES}


def blackjax_version() -> str | None:
    try:
        import blackjax
    except ImportError:
        return None
    return blackjax.__version__


def applies(tool: str, guide: str, dim: int) -> bool:
    """Whether ``tool`` has ``guide`` (BlackJAX: mean-field and full-rank; full-rank only up
    to ``FULLRANK_MAX_DIM``)."""
    if guide == "fullrank" and dim > FULLRANK_MAX_DIM:
        return False
    return not (tool == "blackjax" and (guide == "lowrank" or blackjax_version() is None))




# ---------------------------------------------------------------------------------------------
# one session per (tool, workload, guide, K): fresh objects, so its first fit compiles
class Program(NamedTuple):
    """A chunk of n steps: ``fn(state, data, key, *extra) -> (state, losses (n,))`` (jitted,
    not yet compiled) and its initial ``state``."""

    fn: Any
    state: Any
    extra: tuple = ()


@dataclasses.dataclass
class Session:
    """``fit(data, seed) -> losses`` runs a whole fit and blocks; ``program(data, n)`` builds
    a fresh chunk program."""

    fit: Callable[[dict, int], np.ndarray]
    program: Callable[[dict, int], Program]


def _vijax_guide(guide: str, dim: int):
    return vj.guides.LowRank(rank=_rank(dim)) if guide == "lowrank" else guide


def _vijax_session(wl: Workload, guide: str, k: int, steps: int) -> Session:
    model = wl.make_vijax_model()
    optimizer = optax.adam(LEARNING_RATE)
    spec = _vijax_guide(guide, wl.dim)

    def fit(data, seed):
        res = vj.fit(model, data, guide=spec, steps=steps, optimizer=optimizer,
                     key=jax.random.key(seed), num_particles=k, chunk_size=min(500, steps),
                     convergence=None, psis_draws=0, precondition=None, progress=False)
        jax.block_until_ready(res.params)
        return np.asarray(res.losses)

    def program(data, n):
        # a new optimizer object is a new entry in vijax's compile cache: nothing is reused;
        # the stopping rule as vj.fit's default convergence="auto" sizes it
        resolved = vj.guides.resolve_spec(spec)
        rule = vj.Convergence().sized(*parameter_count(model.target, resolved, "float32"))
        _, _, runner, start, _ = _pipeline(model.target, resolved, k, optax.adam(LEARNING_RATE),
                                           n, "auto", rule)
        dim = model.target.full_dim
        state = start(jax.random.key(0), vj.prepare_data(data), jnp.zeros((dim,), jnp.float32),
                      jnp.zeros((dim,), bool))[3]
        # (total steps, averaging start, end of the first chunk, non-finite limit) as vj.fit
        # passes them: every step active, averaging on as in the tail of a fit; the first
        # chunk never ends, so the rule computes everything but cannot stop the run
        extra = (jnp.asarray(2**30, jnp.int32), jnp.asarray(0, jnp.int32),
                 jnp.asarray(2**30, jnp.int32), jnp.asarray(VIJAX_MAX_NONFINITE, jnp.int32))
        return Program(runner, state, extra)

    return Session(fit, program)


def _numpyro_session(wl: Workload, guide: str, k: int, steps: int) -> Session:
    kwargs = {"rank": _rank(wl.dim)} if guide == "lowrank" else {}
    auto = NUMPYRO_GUIDES[guide](wl.numpyro_model, **kwargs)
    svi = SVI(wl.numpyro_model, auto, optax.adam(LEARNING_RATE), Trace_ELBO(num_particles=k))

    def fit(data, seed):
        res = svi.run(jax.random.PRNGKey(seed), steps, progress_bar=False, **data)
        jax.block_until_ready((res.params, res.losses))
        return np.asarray(res.losses)

    def program(data, n):
        @jax.jit
        def chunk(state, data, key):
            del key  # the SVI state carries its own
            return jax.lax.scan(lambda s, _: svi.update(s, **data), state, None, length=n)

        return Program(chunk, svi.init(jax.random.PRNGKey(0), **data))

    return Session(fit, program)


def _blackjax_session(wl: Workload, guide: str, k: int, steps: int) -> Session:
    from blackjax.vi import fullrank_vi, meanfield_vi

    algo = meanfield_vi if guide == "meanfield" else fullrank_vi
    optimizer = optax.adam(LEARNING_RATE)

    @jax.jit
    def init(key):
        k_loc, _ = jax.random.split(key)  # the mean starts where the floor's starts
        loc = jax.random.uniform(k_loc, (wl.dim,), minval=-2.0, maxval=2.0)
        return algo.init(jnp.zeros((wl.dim,)), optimizer)._replace(mu=loc)

    def run(state, data, key, n):
        def body(state, key):
            state, info = algo.step(key, state, lambda theta: wl.log_density(theta, data),
                                    optimizer, num_samples=k)
            return state, info.elbo  # mean(log q - log p): a loss, despite its name

        return jax.lax.scan(body, state, jax.random.split(key, n))

    fit_fn = jax.jit(run, static_argnames="n")

    def fit(data, seed):
        k_init, k_run = jax.random.split(jax.random.key(seed))
        out = jax.block_until_ready(fit_fn(init(k_init), data, k_run, n=steps))
        return np.asarray(out[1])

    def program(data, n):
        return Program(jax.jit(functools.partial(run, n=n)), init(jax.random.key(0)))

    return Session(fit, program)


def _floor_session(wl: Workload, guide: str, k: int, steps: int) -> Session:
    optimizer = optax.adam(LEARNING_RATE)
    init, run = make_floor(wl.log_density, wl.dim, guide, _rank(wl.dim), k, optimizer)

    def fit(data, seed):
        k_init, k_run = jax.random.split(jax.random.key(seed))
        out = jax.block_until_ready(run(*init(k_init), data, k_run, steps=steps))
        return np.asarray(out[2])

    def program(data, n):
        @jax.jit
        def chunk(state, data, key):
            params, opt_state, losses = run(*state, data, key, steps=n)
            return (params, opt_state), losses

        return Program(chunk, init(jax.random.key(0)))

    return Session(fit, program)


SESSIONS = {"vijax": _vijax_session, "numpyro": _numpyro_session,
            "blackjax": _blackjax_session, "floor": _floor_session}


# ---------------------------------------------------------------------------------------------
# figures
def _memory(compiled) -> dict[str, int | None]:
    """Sizes from XLA's buffer assignment of one compiled program (bytes)."""
    try:
        m = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError, AttributeError):
        m = None
    if m is None:
        return {}
    out = {f: int(getattr(m, f"{f}_size_in_bytes"))
           for f in ("argument", "output", "alias", "temp", "generated_code")}
    out["peak"] = getattr(m, "peak_memory_in_bytes", None)
    out["args_plus_temp"] = out["argument"] + out["temp"]
    return out


def _fresh(state):
    """A copy of a program's initial state (vijax's runner donates its state on accelerators)."""
    return jax.tree_util.tree_map(lambda x: x.copy() if hasattr(x, "copy") else x, state)


def time_to_converged(losses: np.ndarray, us_per_step: float, window: int = WINDOW,
                      tol: float = NAT) -> dict[str, Any]:
    """Steps (and steady-state seconds) until the trailing ``window``-step mean of the loss is
    within ``tol`` of the converged loss (mean of the last 10% of ``losses``).

    Example:
        >>> r = time_to_converged(np.r_[np.full(500, 10.0), np.zeros(500)], 100.0, window=10)
        >>> r["steps_to_1nat"], r["converged_loss"]
        (509, 0.0)
    """
    losses = np.asarray(losses, np.float64)
    converged = _tail_mean(losses)
    tenth = max(1, losses.size // 10)
    # still going down: the previous tenth of the run is more than tol above the last
    drift = float(np.nanmean(losses[-2 * tenth:-tenth]) - converged) if losses.size >= 2 * tenth \
        else float("nan")
    clean = np.where(np.isfinite(losses), losses, np.inf)
    out: dict[str, Any] = {"converged_loss": converged, "window": window, "tol_nats": tol,
                           "reference_steps": int(losses.size), "steps_to_1nat": None,
                           "time_to_1nat_s": None, "drift_last_tenth": drift,
                           "still_decreasing": bool(drift > tol)}
    if losses.size < window or not math.isfinite(converged):
        return out
    csum = np.concatenate([[0.0], np.cumsum(clean)])
    running = (csum[window:] - csum[:-window]) / window  # running[i]: steps i .. i+window-1
    hit = np.flatnonzero(running <= converged + tol)
    if hit.size:
        steps = int(hit[0]) + window
        out.update(steps_to_1nat=steps, time_to_1nat_s=steps * us_per_step * 1e-6)
    return out


def first_fit(tool: str, workload: str, guide: str, k: int, steps: int) -> dict[str, Any]:
    """The first fit of a fresh session (session construction included), in this process."""
    wl = get_workload(workload)
    data = _device_data(wl, 0)
    cpu0 = time.process_time()
    seconds, losses = _time(lambda: SESSIONS[tool](wl, guide, k, steps).fit(data, 0))
    return {"first_fit_s": seconds, "first_fit_cpu_s": time.process_time() - cpu0,
            "final_loss": _tail_mean(losses)}


def first_fit_fresh_process(tool: str, workload: str, guide: str, k: int,
                            steps: int) -> dict[str, Any]:
    """:func:`first_fit` in a new Python process (imports and data set-up not timed)."""
    cmd = [sys.executable, "-m", "benchmarks.speed", tool, workload, guide, str(k), str(steps)]
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"first-fit child {cmd} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_config(workload: str, guide: str, k: int, tools: list[str], s: dict) -> dict:
    """Every figure for one (workload, guide, K), for the tools that have the guide."""
    wl = get_workload(workload)
    tools = [t for t in tools if applies(t, guide, wl.dim)]
    data0 = _device_data(wl, 0)
    new_data = [_device_data(wl, 1 + i) for i in range(s["fit_repeats"])]
    res: dict[str, dict[str, Any]] = {t: {} for t in tools}
    if s["first_fit"] == "process":
        for t in tools:
            res[t].update(first_fit_fresh_process(t, workload, guide, k, s["steps"]))
    sessions = {t: SESSIONS[t](wl, guide, k, s["steps"]) for t in tools}
    for t, session in sessions.items():
        seconds, losses = _time(lambda session=session: session.fit(data0, 0))
        res[t]["first_fit_inproc_s"] = seconds
        if s["first_fit"] == "inproc":
            res[t].update(first_fit_s=seconds, final_loss=_tail_mean(losses))

    n = s["chunk"]
    key = jax.random.key(0)
    programs, executables = {}, {}
    for t, session in sessions.items():
        prog = programs[t] = session.program(data0, n)
        t0 = time.perf_counter()
        executables[t] = prog.fn.lower(prog.state, data0, key, *prog.extra).compile()
        res[t]["compile_s"] = time.perf_counter() - t0
        res[t]["memory"] = _memory(executables[t])

    n_ref = math.ceil(s["ref_steps"] / n)
    keys = [jax.random.fold_in(key, i) for i in range(max(n_ref, s["repeats"] + 1))]
    states = {t: _fresh(p.state) for t, p in programs.items()}

    def call(t, i):
        states[t], losses = executables[t](states[t], data0, keys[i], *programs[t].extra)
        jax.block_until_ready((states[t], losses))
        return losses

    for t in tools:
        call(t, 0)  # warm up
    per_step: dict[str, list[float]] = {t: [] for t in tools}
    for i in range(s["repeats"]):
        for t in tools:
            per_step[t].append(_time(lambda t=t, i=i: call(t, 1 + i))[0] / n * 1e6)
    repeat: dict[str, list[float]] = {t: [] for t in tools}
    for i, d in enumerate(new_data):
        for t, session in sessions.items():
            repeat[t].append(_time(lambda session=session, d=d, i=i: session.fit(d, 1 + i))[0])

    row: dict[str, Any] = {"workload": workload, "guide": guide, "particles": k, "dim": wl.dim,
                           "rank": _rank(wl.dim) if guide == "lowrank" else None, "tools": res}
    for t in tools:
        r = res[t]
        r.update(us_per_step=statistics.median(per_step[t]), us_per_step_min=min(per_step[t]),
                 us_per_step_all=per_step[t], repeat_fit_s=statistics.median(repeat[t]),
                 repeat_fit_all_s=repeat[t])
        states[t] = _fresh(programs[t].state)  # the reference run, from the initial point
        ref = np.concatenate([np.asarray(call(t, i)) for i in range(n_ref)])[:s["ref_steps"]]
        r["convergence"] = time_to_converged(ref, r["us_per_step"])
        c = r["convergence"]
        print(f"  {workload:14s} {guide:9s} {t:8s} compile {r['compile_s']:6.2f} s  first "
              f"{r['first_fit_s']:6.2f} s  {r['us_per_step']:9.1f} us/step  repeat "
              f"{r['repeat_fit_s']:6.3f} s  1 nat after {c['steps_to_1nat']} steps  "
              f"loss {c['converged_loss']:.2f}", file=sys.stderr, flush=True)
    row["ratios"] = _ratios(res)
    return row


def _ratios(res: dict[str, dict]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if "floor" in res:
        out["step_over_floor"] = {t: r["us_per_step"] / res["floor"]["us_per_step"]
                                  for t, r in res.items() if t != "floor"}
    if "numpyro" in res:
        npy = res["numpyro"]
        out["numpyro_repeat_over"] = {t: npy["repeat_fit_s"] / r["repeat_fit_s"]
                                      for t, r in res.items() if t != "numpyro"}
        out["numpyro_first_over"] = {t: npy["first_fit_s"] / r["first_fit_s"]
                                     for t, r in res.items() if t != "numpyro"}
    return out


def check_workloads(names: list[str]) -> dict[str, dict[str, float]]:
    """Max relative differences between the three forms of each workload at 4 random points:
    vijax's unconstrained log density against the floor's, and the vijax log joint against
    NumPyro's log density (both on constrained values)."""
    out = {}
    for name in names:
        wl = get_workload(name)
        data = _device_data(wl, 0)
        model = wl.make_vijax_model()
        floor_gap = numpyro_gap = 0.0
        for i in range(4):
            theta = jax.random.normal(jax.random.key(100 + i), (wl.dim,))
            a = float(model.target.log_density(theta, data))
            floor_gap = max(floor_gap, abs(a - float(wl.log_density(theta, data)))
                            / max(1.0, abs(a)))
            z = model.target.constrain(theta)
            b = float(model.log_joint(z, data))
            c = float(numpyro_log_density(wl.numpyro_model, (), data, z)[0])
            numpyro_gap = max(numpyro_gap, abs(b - c) / max(1.0, abs(b)))
        out[name] = {"vijax_vs_floor": floor_gap, "vijax_vs_numpyro": numpyro_gap}
    return out


# ---------------------------------------------------------------------------------------------
def run(quick: bool, device: str, workloads: list[str] | None = None,
        guides: list[str] | None = None, tools: list[str] | None = None,
        steps: int | None = None) -> dict[str, Any]:
    """Run the suite; returns the report (``settings``, ``rows``, ``checks``, ``notes``)."""
    s = settings_for(quick)
    if steps is not None:
        s["steps"], s["chunk"] = steps, min(s["chunk"], steps)
    workloads = list(workloads or WORKLOADS[device])
    guides = list(guides or s["guides"])
    tools = list(tools or TOOLS)
    notes = []
    if "blackjax" in tools and blackjax_version() is None:
        notes.append("BlackJAX is not installed (`pip install blackjax`): its rows are skipped.")
    t0 = time.perf_counter()
    _warm_up()
    rows = []
    for w in workloads:
        for g in guides:
            if g == "fullrank" and get_workload(w).dim > FULLRANK_MAX_DIM:
                notes.append(f"{w}: no full-rank rows (dim {get_workload(w).dim} > "
                             f"{FULLRANK_MAX_DIM}).")
                continue
            rows.append(bench_config(w, g, s["particles"], tools, s))
    s.update(learning_rate=LEARNING_RATE, window=WINDOW, fullrank_max_dim=FULLRANK_MAX_DIM,
             workloads=workloads, guides=guides, tools=tools, quick=quick,
             blackjax=blackjax_version(), total_wall_s=time.perf_counter() - t0)
    return {"settings": s, "rows": rows, "checks": check_workloads(workloads), "notes": notes}


def _warm_up() -> None:
    """Initialise the backend and the eager paths every tool shares, on a throwaway problem
    (as ``bench_core``), so that the first measured fit does not pay for it."""
    from benchmarks.bench_core import _warm_up as core_warm_up

    core_warm_up()


# ---------------------------------------------------------------------------------------------
# report
def _f(x: float | None, spec: str) -> str:
    return "–" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def reading(report: dict) -> list[str]:
    """The figures against the issue's targets, one line each."""
    rows = report["rows"]
    step = [(r, r["ratios"]["step_over_floor"]["vijax"]) for r in rows
            if "vijax" in r["tools"] and "floor" in r["tools"]]
    rep = [(r, r["ratios"]["numpyro_repeat_over"]["vijax"]) for r in rows
           if "vijax" in r["tools"] and "numpyro" in r["tools"]]
    first = [(r, r["ratios"]["numpyro_first_over"]["vijax"]) for r in rows
             if "vijax" in r["tools"] and "numpyro" in r["tools"]]

    def line(what, pairs, ok, fmt):
        if not pairs:
            return f"- {what}: not measured."
        bad = [f"{r['workload']}/{r['guide']} {fmt(v)}" for r, v in pairs if not ok(v)]
        vals = [v for _, v in pairs]
        head = (f"- {what}: **{'met' if not bad else 'not met'}** ({len(pairs) - len(bad)} of "
                f"{len(pairs)} configurations meet it; range {fmt(min(vals))}-{fmt(max(vals))})")
        return head + (f"; not met: {', '.join(bad)}." if bad else ".")

    return [
        line(f"vijax per step within {TARGET_STEP:g}x of the floor", step,
             lambda v: v <= TARGET_STEP, lambda v: f"{v:.3f}x"),
        line(f"repeat fit >= {TARGET_REPEAT:g}x faster than NumPyro `svi.run`", rep,
             lambda v: v >= TARGET_REPEAT, lambda v: f"{v:.1f}x"),
        line(f"first fit >= {TARGET_FIRST:g}x faster than NumPyro", first,
             lambda v: v >= TARGET_FIRST, lambda v: f"{v:.1f}x"),
    ]


def to_markdown(report: dict, header: list[str]) -> str:
    s = report["settings"]
    lines = header + [
        "",
        f"Settings: K = {s['particles']} particle(s), `optax.adam({LEARNING_RATE})` (constant) "
        f"for every method; whole fits of {s['steps']} steps (vijax `convergence=None, "
        f"psis_draws=0, precondition=None, progress=False`, its default tail averaging); "
        f"compile and memory of "
        f"the {s['chunk']}-step chunk program (vijax's as `vj.fit` builds it by default: "
        f"non-finite guard, tail averaging and the default stopping rule, which computes "
        f"its statistics but may not stop the run); µs/step = median of {s['repeats']} chunks "
        f"(interleaved); repeat fit = median of {s['fit_repeats']} fit(s) on new data; first "
        f"fit {'in a fresh process' if s['first_fit'] == 'process' else 'in-process'}; "
        f"reference run {s['ref_steps']:,} steps. Guides: {', '.join(s['guides'])}; "
        f"low-rank rank = round(sqrt(dim)); "
        f"full-rank up to dim {s['fullrank_max_dim']}. NumPyro guides: AutoDiagonalNormal, "
        f"AutoLowRankMultivariateNormal, AutoMultivariateNormal. BlackJAX "
        f"{s['blackjax'] or 'not installed'}: `vi.meanfield_vi` / `vi.fullrank_vi` (STL "
        f"estimator, own initial scales) in a jitted `lax.scan`."
        f"{' QUICK MODE: indicative only.' if s['quick'] else ''}",
        "",
        f"*time to 1 nat*: converged loss = mean of the last 10% of the method's "
        f"{s['ref_steps']:,}-step reference run; first step whose trailing {s['window']}-step "
        "mean is within 1 nat of it, at the method's steady-state µs/step (no compilation); "
        "† marks a reference run still going down (the mean of its second-to-last tenth is "
        "more than 1 nat above that of its last), whose 'converged' loss is not converged. "
        "*peak MB*: argument + temporary bytes of the compiled chunk program from "
        "`compiled.memory_analysis()` (per program, not process RSS; arguments include the "
        "data). Ratios are to the floor and to NumPyro in the same run "
        "(NumPyro/method > 1: the method is faster).",
        "",
        "| workload | guide | method | compile s | first fit s | µs/step | ×floor | "
        "repeat fit s | NumPyro/this repeat | NumPyro/this first | steps to 1 nat | "
        "time to 1 nat s | converged loss | peak MB |",
        "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in report["rows"]:
        ratios = row["ratios"]
        for t, r in row["tools"].items():
            c, mem = r["convergence"], r["memory"]
            floor = ratios.get("step_over_floor", {}).get(t)
            nrep = ratios.get("numpyro_repeat_over", {}).get(t)
            nfirst = ratios.get("numpyro_first_over", {}).get(t)
            peak = mem["args_plus_temp"] / 2**20 if mem else None
            lines.append(
                f"| {row['workload']} | {row['guide']} | {LABELS[t]} | {r['compile_s']:.2f} | "
                f"{r['first_fit_s']:.2f} | {r['us_per_step']:.1f} | {_f(floor, '.2f')} | "
                f"{r['repeat_fit_s']:.3f} | {_f(nrep, '.1f')} | {_f(nfirst, '.1f')} | "
                f"{_f(c['steps_to_1nat'], 'd')} | {_f(c['time_to_1nat_s'], '.3f')} | "
                f"{c['converged_loss']:.2f}{' †' if c['still_decreasing'] else ''} | "
                f"{_f(peak, '.3g')} |")
    lines += ["", "Checks: the three forms of each workload agree (max relative log-density "
              "difference, vijax vs floor / vijax vs NumPyro): "
              + ", ".join(f"{k} {v['vijax_vs_floor']:.1e} / {v['vijax_vs_numpyro']:.1e}"
                          for k, v in report["checks"].items()) + ".",
              "", "## Reading", "", *reading(report)]
    lines += ["", "Notes: on a shared machine differences under ~15% in µs/step are within "
              "run-to-run noise (the JSON keeps every sample); the converged losses of "
              "different methods agree only up to Monte Carlo noise and each method's own "
              "bias (BlackJAX's STL estimator, vijax's averaging does not enter the losses)."]
    lines += [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"


def _child(argv: list[str]) -> None:
    """``python -m benchmarks.speed TOOL WORKLOAD GUIDE K STEPS``: one first fit, JSON out."""
    tool, workload, guide, k, steps = argv
    jnp.zeros(1).block_until_ready()  # backend start-up is not part of the fit
    print(json.dumps(first_fit(tool, workload, guide, int(k), int(steps))))


if __name__ == "__main__":
    _child(sys.argv[1:])
