"""One entry point for the benchmark suites.

``python -m benchmarks run --suite speed|accuracy|all [--quick] [--device cpu|gpu] [--out DIR]``
prints each suite's table and writes ``<suite>_<device>[_quick].json`` (every measurement, the
machine, the settings) and ``.md`` (the report) to ``--out`` (default ``benchmarks/results/``).

* ``--device cpu`` (default) pins JAX to the CPU (``JAX_PLATFORMS=cpu``, set before JAX is
  imported); ``--device gpu`` runs on JAX's default backend and exits with a message when that
  is not a GPU.
* ``--quick`` runs small settings meant to finish in a few minutes on 2 CPU cores: the speed
  suite with 500-step fits and fewer repeats, the accuracy suite on 4 posteriors with 1,000
  steps.

Suites: :mod:`benchmarks.speed` and :mod:`benchmarks.accuracy`. JAX is imported only after the
device is chosen, so this module imports nothing heavy at the top.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["main", "machine", "header", "write_report"]

RESULTS = Path(__file__).resolve().parent / "results"
SUITES = ("speed", "accuracy")


def _select_device(device: str) -> None:
    """Pin JAX to ``device`` (before its backends start); exit if a GPU is asked for and
    there is none."""
    if device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    if device == "cpu":
        jax.config.update("jax_platforms", "cpu")  # in case JAX was imported already
        return
    backend = jax.default_backend()
    if backend != "gpu":
        sys.exit(f"--device gpu: no GPU here: JAX's default backend is {backend!r} (devices: "
                 f"{', '.join(str(d) for d in jax.devices())}). Install a CUDA build of JAX "
                 "(`pip install -U 'jax[cuda12]'`) on a machine with a GPU, or run with "
                 "--device cpu.")


def machine(loadavg_start: list[float]) -> dict[str, Any]:
    """``bench_core.machine_info()`` plus the accelerator's name, BlackJAX's version and the
    load average at the start."""
    import jax

    from benchmarks.bench_core import machine_info
    from benchmarks.speed import blackjax_version

    info = machine_info()
    dev = jax.devices()[0]
    info.update(device_kind=getattr(dev, "device_kind", str(dev)),
                device_count=len(jax.devices()), blackjax=blackjax_version(),
                loadavg_start=loadavg_start)
    return info


def header(title: str, m: dict[str, Any], wall_s: float) -> list[str]:
    """The report's title and machine line."""
    return [
        f"# {title}",
        "",
        f"{m['date']} · {m['platform']} · {m['processor']} · {m['cpu_count']} CPUs · "
        f"device: {m['backend']} ({m['device_kind']}, {m['device_count']}) · jax {m['jax']} "
        f"· numpyro {m['numpyro']} · optax {m['optax']} · blackjax {m['blackjax'] or '–'} · "
        f"vijax {m['vijax']} ({m['vijax_commit']}) · load average "
        f"{m['loadavg_start'][0]:.1f} at start, {m['loadavg_end'][0]:.1f} at end · total "
        f"{wall_s:.0f} s",
    ]


def write_report(report: dict[str, Any], md: str, out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.json").write_text(json.dumps(report, indent=2, default=_jsonable) + "\n")
    (out / f"{stem}.md").write_text(md)
    print(f"wrote {out / stem}.{{json,md}}", file=sys.stderr)


def _jsonable(x: Any) -> Any:
    if hasattr(x, "tolist"):
        return x.tolist()
    if isinstance(x, tuple | set):
        return list(x)
    return str(x)


def _run_suite(suite: str, args: argparse.Namespace) -> dict[str, Any]:
    load_start = list(os.getloadavg())
    t0 = time.perf_counter()
    if suite == "speed":
        from benchmarks import speed as mod

        report = mod.run(args.quick, args.device, workloads=args.workloads, guides=args.guides,
                         tools=args.tools, steps=args.steps)
        title = f"vijax speed benchmark ({args.device})"
    else:
        from benchmarks import accuracy as mod

        report = mod.run(args.quick, posteriors=args.posteriors, methods=args.methods,
                         steps=args.steps)
        title = f"vijax accuracy benchmark ({args.device})"
    wall = time.perf_counter() - t0
    report["settings"]["total_wall_s"] = wall
    report["machine"] = machine(load_start)
    md = mod.to_markdown(report, header(title, report["machine"], wall))
    print(md)
    stem = f"{suite}_{args.device}{'_quick' if args.quick else ''}"
    write_report(report, md, args.out, stem)
    return report


def _parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run benchmark suites, print and write their reports")
    r.add_argument("--suite", choices=(*SUITES, "all"), default="all")
    r.add_argument("--quick", action="store_true",
                   help="small settings: a few minutes per suite on 2 CPU cores")
    r.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="cpu (default): pin JAX to the CPU; gpu: JAX's default backend, which "
                        "must be a GPU")
    r.add_argument("--out", type=Path, default=RESULTS,
                   help="directory for the JSON and markdown reports (default "
                        "benchmarks/results/)")
    g = r.add_argument_group("narrowing a run (development)")
    g.add_argument("--workloads", nargs="+", default=None,
                   help="speed: workloads (default: logistic eight_schools hier_linreg; gpu: "
                        "logistic_large instead of logistic)")
    g.add_argument("--guides", nargs="+", default=None,
                   choices=("meanfield", "lowrank", "fullrank"), help="speed: guide families")
    g.add_argument("--tools", nargs="+", default=None,
                   choices=("vijax", "numpyro", "blackjax", "floor"), help="speed: methods")
    g.add_argument("--posteriors", nargs="+", default=None,
                   help="accuracy: posteriordb names (default: all 16; quick: 4)")
    g.add_argument("--methods", nargs="+", default=None, help="accuracy: methods")
    g.add_argument("--steps", type=int, default=None,
                   help="steps per fit (speed default 2000, quick 500; accuracy default 5000, "
                        "quick 1000)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    _select_device(args.device)
    suites = SUITES if args.suite == "all" else (args.suite,)
    for suite in suites:
        _run_suite(suite, args)
    return 0
