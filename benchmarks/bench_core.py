"""Core speed benchmark: vijax against NumPyro SVI and a hand-written JAX loop (the floor).

For every workload (logistic regression N=10k D=50, centred eight schools), guide (mean-field,
low-rank) and number of particles K (1, 8), the three implementations fit the same posterior
with the same guide family, the same optimizer (``optax.adam`` with a constant step size) and
the same K, and we report:

* **first fit** (s): the first ``steps``-step fit of a configuration, tracing and compiling
  included. By default each is run in a fresh Python process (imports and data set-up not
  timed), which is what a script user waits for; ``--first-fit inproc`` times it in this
  process instead, where compiled primitives from earlier configurations are already cached;
* **steady state** (µs/step): median over ``repeats`` calls of one compiled chunk of
  ``chunk`` steps, divided by ``chunk``, ``jax.block_until_ready`` on the result;
* **repeat fit** (s): median time of a new ``steps``-step fit on new data of the same shapes
  (vijax: ``vj.fit`` again; NumPyro: ``svi.run`` again, which re-initialises and re-traces;
  floor: the cached jitted init and scan called again);
* ratios vijax/floor per step, NumPyro/vijax repeat fit, NumPyro/vijax first fit.

Run: ``python -m benchmarks.bench_core [--quick] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import optax
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import (
    AutoDiagonalNormal,
    AutoLowRankMultivariateNormal,
    AutoNormal,
)

import vijax as vj
from benchmarks.floor import make_floor
from benchmarks.workloads import WORKLOADS, Workload, get_workload
from vijax.driver import _pipeline

# the chunk runner's stopping arguments: never stop early, never give up on non-finite steps
NO_STOP = jnp.asarray(0, jnp.int32)
NO_LIMIT = jnp.asarray(2**30, jnp.int32)

TOOLS = ("vijax", "numpyro", "floor")
GUIDES = ("meanfield", "lowrank")
PARTICLES = (1, 8)
LEARNING_RATE = 1e-2
REPO_ROOT = Path(__file__).resolve().parent.parent
NUMPYRO_MEANFIELD = {"diag": AutoDiagonalNormal, "normal": AutoNormal}


@dataclasses.dataclass(frozen=True)
class Config:
    workload: str
    guide: str
    particles: int

    @property
    def label(self) -> str:
        return f"{self.workload}/{self.guide}/K={self.particles}"


def _rank(dim: int) -> int:
    """Low-rank guide rank: NumPyro's default ``round(sqrt(dim))``, passed to all three."""
    return max(1, round(math.sqrt(dim)))


def _device_data(wl: Workload, seed: int) -> dict[str, jax.Array]:
    return jax.block_until_ready({k: jnp.asarray(v) for k, v in wl.make_data(seed).items()})


def _tail_mean(losses) -> float:
    losses = np.asarray(losses)
    return float(np.nanmean(losses[-max(1, len(losses) // 10):]))


# ---------------------------------------------------------------------------------------------
# One session per (tool, configuration): fresh model and optimizer objects, so the first fit
# compiles. ``fit(data, seed) -> losses`` blocks; ``chunk(data, n) -> () -> None`` builds a
# compiled chunk of n steps and returns a blocking call of it.
@dataclasses.dataclass
class Session:
    fit: Callable[[dict, int], np.ndarray]
    chunk: Callable[[dict, int], Callable[[], None]]


def _vijax_session(cfg: Config, steps: int, numpyro_meanfield: str) -> Session:
    del numpyro_meanfield
    wl = get_workload(cfg.workload)
    model = wl.make_vijax_model()
    optimizer = optax.adam(LEARNING_RATE)
    guide = "meanfield" if cfg.guide == "meanfield" else vj.guides.LowRank(rank=_rank(wl.dim))
    chunk_size = min(500, steps)

    def fit(data, seed):
        # fixed work for every method: no early stopping, no PSIS check, no progress bar
        res = vj.fit(model, data, guide=guide, steps=steps, optimizer=optimizer,
                     key=jax.random.key(seed), num_particles=cfg.particles,
                     chunk_size=chunk_size, convergence=None, psis_draws=0, progress=False)
        jax.block_until_ready(res.params)
        return res.losses

    def chunk(data, n):
        spec = vj.guides.resolve_spec(guide)
        _, _, runner, start, _ = _pipeline(model.target, spec, cfg.particles, optimizer, n)
        data = vj.prepare_data(data)
        key = jax.random.key(0)
        # vijax's own start-up program: random init in (-2, 2), guide and optimizer state
        no_init = jnp.zeros((wl.dim,), jnp.float32)
        _, _, _, state, _ = start(key, data, no_init, jnp.zeros((wl.dim,), bool))
        cell = [state]
        total = jnp.asarray(2**30, jnp.int32)  # every step of every chunk active
        avg_start = jnp.asarray(0, jnp.int32)  # averaging on, as in the tail of a fit

        def call():
            cell[0], losses = runner(cell[0], data, key, total, avg_start, NO_STOP, NO_LIMIT)
            jax.block_until_ready((cell[0], losses))

        return call

    return Session(fit, chunk)


def _numpyro_session(cfg: Config, steps: int, numpyro_meanfield: str) -> Session:
    wl = get_workload(cfg.workload)
    if cfg.guide == "meanfield":
        guide = NUMPYRO_MEANFIELD[numpyro_meanfield](wl.numpyro_model)
    else:
        guide = AutoLowRankMultivariateNormal(wl.numpyro_model, rank=_rank(wl.dim))
    svi = SVI(wl.numpyro_model, guide, optax.adam(LEARNING_RATE),
              Trace_ELBO(num_particles=cfg.particles))

    def fit(data, seed):
        res = svi.run(jax.random.PRNGKey(seed), steps, progress_bar=False, **data)
        jax.block_until_ready((res.params, res.losses))
        return np.asarray(res.losses)

    def chunk(data, n):
        @jax.jit
        def run(state, data):
            return jax.lax.scan(lambda s, _: svi.update(s, **data), state, None, length=n)

        cell = [svi.init(jax.random.PRNGKey(0), **data)]

        def call():
            cell[0], losses = run(cell[0], data)
            jax.block_until_ready((cell[0], losses))

        return call

    return Session(fit, chunk)


def _floor_session(cfg: Config, steps: int, numpyro_meanfield: str) -> Session:
    del numpyro_meanfield
    wl = get_workload(cfg.workload)
    init, run = make_floor(wl.log_density, wl.dim, cfg.guide, _rank(wl.dim), cfg.particles,
                           optax.adam(LEARNING_RATE))

    def fit(data, seed):
        k_init, k_run = jax.random.split(jax.random.key(seed))
        params, opt_state = init(k_init)
        out = run(params, opt_state, data, k_run, steps=steps)
        jax.block_until_ready(out)
        return np.asarray(out[2])

    def chunk(data, n):
        key = jax.random.key(0)
        cell = [init(key)]

        def call():
            params, opt_state, losses = run(*cell[0], data, key, steps=n)
            cell[0] = (params, opt_state)
            jax.block_until_ready((cell[0], losses))

        return call

    return Session(fit, chunk)


SESSIONS = {"vijax": _vijax_session, "numpyro": _numpyro_session, "floor": _floor_session}


def _time(fn: Callable[[], Any]) -> tuple[float, Any]:
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def first_fit(tool: str, cfg: Config, steps: int, numpyro_meanfield: str) -> dict:
    """Time a fresh session's first fit (session construction included) in this process."""
    data = _device_data(get_workload(cfg.workload), 0)

    def go():
        return SESSIONS[tool](cfg, steps, numpyro_meanfield).fit(data, 0)

    cpu0 = time.process_time()
    seconds, losses = _time(go)
    return {"first_fit_s": seconds, "first_fit_cpu_s": time.process_time() - cpu0,
            "final_loss": _tail_mean(losses)}


def first_fit_fresh_process(tool: str, cfg: Config, steps: int, numpyro_meanfield: str) -> dict:
    """:func:`first_fit` in a new Python process (imports and data set-up are not timed)."""
    cmd = [sys.executable, "-m", "benchmarks.bench_core", "--child", tool, cfg.workload,
           cfg.guide, str(cfg.particles), str(steps), "--numpyro-meanfield", numpyro_meanfield]
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"first-fit child {cmd} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_config(cfg: Config, args) -> dict:
    """All figures for one configuration, for the three tools.

    Steady-state chunks and repeat fits of the three tools are interleaved (round robin), so
    that load from other processes on the machine falls on all three alike.
    """
    wl = get_workload(cfg.workload)
    data0 = _device_data(wl, 0)
    new_data = [_device_data(wl, 1 + i) for i in range(args.fit_repeats)]
    res: dict[str, dict[str, Any]] = {tool: {} for tool in TOOLS}
    if args.first_fit == "process":
        for tool in TOOLS:
            res[tool].update(first_fit_fresh_process(tool, cfg, args.steps,
                                                     args.numpyro_meanfield))
    sessions = {tool: SESSIONS[tool](cfg, args.steps, args.numpyro_meanfield) for tool in TOOLS}
    for tool, session in sessions.items():
        seconds, losses = _time(lambda s=session: s.fit(data0, 0))
        res[tool]["first_fit_inproc_s"] = seconds
        if args.first_fit == "inproc":
            res[tool].update(first_fit_s=seconds, final_loss=_tail_mean(losses))

    per_step = interleaved_us_per_step(
        {tool: session.chunk(data0, args.chunk) for tool, session in sessions.items()},
        args.chunk, args.repeats)
    repeat: dict[str, list[float]] = {tool: [] for tool in TOOLS}
    for i, d in enumerate(new_data):
        for tool, session in sessions.items():
            repeat[tool].append(_time(lambda s=session, d=d, i=i: s.fit(d, 1 + i))[0])

    row: dict[str, Any] = {"config": dataclasses.asdict(cfg), "dim": wl.dim}
    for tool in TOOLS:
        r = res[tool]
        r.update(us_per_step=statistics.median(per_step[tool]),
                 us_per_step_min=min(per_step[tool]), us_per_step_all=per_step[tool],
                 repeat_fit_s=statistics.median(repeat[tool]), repeat_fit_all_s=repeat[tool])
        row[tool] = r
        print(f"  {cfg.label:32s} {tool:8s} first {r['first_fit_s']:7.3f} s  "
              f"{r['us_per_step']:9.1f} us/step  repeat {r['repeat_fit_s']:7.3f} s  "
              f"loss {r['final_loss']:.2f}", file=sys.stderr, flush=True)
    row["ratios"] = {
        "vijax_over_floor_step": row["vijax"]["us_per_step"] / row["floor"]["us_per_step"],
        "numpyro_over_floor_step": row["numpyro"]["us_per_step"] / row["floor"]["us_per_step"],
        "numpyro_over_vijax_repeat": row["numpyro"]["repeat_fit_s"] / row["vijax"]["repeat_fit_s"],
        "numpyro_over_vijax_first": row["numpyro"]["first_fit_s"] / row["vijax"]["first_fit_s"],
    }
    return row


# ---------------------------------------------------------------------------------------------
def machine_info() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT,
                                capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "vijax"], cwd=REPO_ROOT,
                               capture_output=True, text=True, check=True).stdout.strip()
        commit += " (vijax/ modified)" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "jax": jax.__version__,
        "numpyro": numpyro.__version__,
        "optax": optax.__version__,
        "vijax": vj.__version__,
        "vijax_commit": commit,
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "loadavg_end": list(os.getloadavg()),
    }


def write_report(out, name: str, quick: bool, report: dict, md: str, wall_s: float) -> None:
    """Print the markdown and write ``<name>_<backend>[_quick].{json,md}`` into ``out``."""
    print(md)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{name}_{jax.default_backend()}{'_quick' if quick else ''}"
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / f"{stem}.md").write_text(md)
    print(f"wrote {out / stem}.{{json,md}} ({wall_s:.0f} s)", file=sys.stderr)


def to_markdown(report: dict) -> str:
    m, s = report["machine"], report["settings"]
    lines = [
        "# vijax core benchmark",
        "",
        machine_line(m),
        "",
        f"Settings: {s['steps']} steps per fit, `optax.adam({LEARNING_RATE})` for all three, "
        f"steady state = median of {s['repeats']} chunks of {s['chunk']} steps, repeat fit = "
        f"median of {s['fit_repeats']} fits on new data, first fit measured "
        f"{'in a fresh process' if s['first_fit'] == 'process' else 'in-process'}; vijax "
        f"with its default tail averaging (`average=0.5`); NumPyro mean-field guide "
        f"`{NUMPYRO_MEANFIELD[s['numpyro_meanfield']].__name__}`."
        f"{' QUICK MODE: indicative only.' if s['quick'] else ''}",
        "",
        "| workload | guide | K | first fit s vijax | NumPyro | floor "
        "| µs/step vijax | NumPyro | floor | repeat fit s vijax | NumPyro | floor "
        "| vijax/floor step | NumPyro/vijax repeat | NumPyro/vijax first |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for row in report["rows"]:
        c, r = row["config"], row["ratios"]
        cells = [c["workload"], c["guide"], str(c["particles"])]
        cells += [f"{row[t]['first_fit_s']:.2f}" for t in TOOLS]
        cells += [f"{row[t]['us_per_step']:.1f}" for t in TOOLS]
        cells += [f"{row[t]['repeat_fit_s']:.3f}" for t in TOOLS]
        cells += [f"{r['vijax_over_floor_step']:.2f}", f"{r['numpyro_over_vijax_repeat']:.1f}",
                  f"{r['numpyro_over_vijax_first']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Sanity check: negative ELBO, mean over the last 10% of steps of the first fit "
        "(same posterior, same guide family; should agree up to Monte Carlo noise).",
        "",
        "| workload | guide | K | vijax | NumPyro | floor |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for row in report["rows"]:
        c = row["config"]
        lines.append(f"| {c['workload']} | {c['guide']} | {c['particles']} | "
                     + " | ".join(f"{row[t]['final_loss']:.2f}" for t in TOOLS) + " |")
    return "\n".join(lines) + "\n"


def machine_line(m: dict, total_wall_s: float | None = None) -> str:
    """The report's one-line header: date, machine, backend, versions, commit, load (and the
    run's total wall time)."""
    line = (f"{m['date']} · {m['platform']} · {m['processor']} · {m['cpu_count']} CPUs · "
            f"backend {m['backend']} · jax {m['jax']} · numpyro {m['numpyro']} · "
            f"optax {m['optax']} · vijax {m['vijax']} ({m['vijax_commit']}) · load average "
            f"{m['loadavg_start'][0]:.1f} at start, {m['loadavg_end'][0]:.1f} at end")
    return line if total_wall_s is None else f"{line} · total {total_wall_s:.0f} s"


def interleaved_us_per_step(calls: dict[str, Callable[[], Any]], chunk: int,
                            repeats: int) -> dict[str, list[float]]:
    """µs/step of each ``calls[name]()`` (one compiled chunk of ``chunk`` steps that blocks
    until done): one warm-up call each, then ``repeats`` rounds, round robin, so that load
    drift hits every method alike."""
    for call in calls.values():
        call()  # compile and warm up
    per_step: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            per_step[name].append(_time(call)[0] / chunk * 1e6)
    return per_step


def base_parser(module: str, doc: str | None, quick_help: str) -> argparse.ArgumentParser:
    """The options every focused benchmark script shares: ``--quick`` (with what it means for
    that script) and ``--out`` (default ``benchmarks/results/``)."""
    p = argparse.ArgumentParser(prog=f"python -m benchmarks.{module}", description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help=quick_help)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results",
                   help="directory for the JSON and markdown results")
    return p


def _parse(argv) -> argparse.Namespace:
    p = base_parser("bench_core", __doc__, "500-step fits, 5 chunk repeats, 1 repeat fit, "
                    "in-process first fits (about 2-3 minutes)")
    p.add_argument("--workloads", nargs="+", default=list(WORKLOADS), choices=list(WORKLOADS))
    p.add_argument("--guides", nargs="+", default=list(GUIDES), choices=list(GUIDES))
    p.add_argument("--particles", nargs="+", type=int, default=list(PARTICLES))
    p.add_argument("--first-fit", choices=("process", "inproc"), default=None,
                   help="where first fits are timed (default: process; inproc with --quick)")
    p.add_argument("--numpyro-meanfield", choices=tuple(NUMPYRO_MEANFIELD), default="diag",
                   help="NumPyro mean-field guide: AutoDiagonalNormal (one flat vector, like "
                        "vijax) or AutoNormal (per-site parameters)")
    p.add_argument("--child", nargs=5, metavar=("TOOL", "WORKLOAD", "GUIDE", "K", "STEPS"),
                   help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = 500 if args.quick else 2000
    args.chunk = min(500, args.steps)
    args.repeats = 5 if args.quick else 7
    args.fit_repeats = 1 if args.quick else 3
    if args.first_fit is None:
        args.first_fit = "inproc" if args.quick else "process"
    return args


def _warm_up() -> None:
    """Initialise the backend and the eager paths every tool shares, on a throwaway problem."""
    @vj.model(a=vj.Latent())
    def toy(z, data):
        return -0.5 * (z["a"] - data) ** 2

    vj.fit(toy, jnp.float32(1.0), steps=10, key=jax.random.key(0))

    def toy_numpyro():
        numpyro.sample("a", numpyro.distributions.Normal(0.0, 1.0))

    svi = SVI(toy_numpyro, AutoDiagonalNormal(toy_numpyro), optax.adam(LEARNING_RATE),
              Trace_ELBO())
    svi.run(jax.random.PRNGKey(0), 10, progress_bar=False)


def main(argv=None) -> dict | None:
    args = _parse(argv)
    if args.child:
        tool, workload, guide, k, steps = args.child
        jnp.zeros(1).block_until_ready()  # backend start-up is not part of the fit
        res = first_fit(tool, Config(workload, guide, int(k)), int(steps),
                        args.numpyro_meanfield)
        print(json.dumps(res))
        return None

    load_start = list(os.getloadavg())
    _warm_up()
    configs = [Config(w, g, k) for w in args.workloads for g in args.guides
               for k in args.particles]
    t0 = time.perf_counter()
    rows = []
    for cfg in configs:
        rows.append(bench_config(cfg, args))
    settings = {k: getattr(args, k) for k in ("quick", "steps", "chunk", "repeats",
                                               "fit_repeats", "first_fit", "numpyro_meanfield")}
    settings["learning_rate"] = LEARNING_RATE
    settings["vijax_average"] = 0.5
    settings["total_wall_s"] = time.perf_counter() - t0
    report = {"machine": {**machine_info(), "loadavg_start": load_start}, "settings": settings,
              "rows": rows}
    write_report(args.out, "core", args.quick, report, to_markdown(report),
                 settings["total_wall_s"])
    return report


if __name__ == "__main__":
    main()
