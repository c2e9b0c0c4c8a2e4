"""Sparse variational GPs: natural gradients vs Adam, sparse vs exact, vijax vs GPJax.

Writes ``benchmarks/results/svgp_cpu.md`` and ``.json``.

1. **Natural gradients + Adam vs Adam only** on two moons (``make_moons``, N = 5,000,
   noise 0.2), Bernoulli-logit likelihood, RBF kernel, M = 50 k-means inducing inputs,
   minibatches of B = 256. Adam-only (lr 0.01 on everything) runs ``--steps`` steps; the
   natgrad fits (gamma = the default B/N, 0.1 and 0.03 on q; Adam 0.01 on the rest) as
   many. Each trace of minibatch ELBO estimates is smoothed by a moving average over 10
   epochs (190 steps; the estimates are unbiased, and with 2 epochs batch-noise spikes
   shared by all runs (same key, same batches) decided the first crossing);
   we report the first step at which each natgrad curve reaches Adam-only's final
   smoothed value, and every fit's full-data ELBO at the end.
2. **CO2: ELBO vs the exact log marginal likelihood** as M grows (see
   ``examples/co2_svgp.py``; scikit-learn's GaussianProcessRegressor gives the exact value).
3. **Time per step vs GPJax** on problem 1 with a probit link (GPJax's Bernoulli), float64,
   natgrad + Adam and Adam only. GPJax runs in its own virtual environment (``--gpjax-python``,
   default ``/tmp/svgp/gpvenv/bin/python``; never installed into vijax's) as a subprocess in
   the same run. Per-step time = (time(S2 steps) - time(S1 steps)) / (S2 - S1) for both
   libraries (vijax: after a warm-up fit, S1 and S2 multiples of its 100-step chunk, so
   neither timed fit compiles; GPJax compiles in both, which cancels); we report ratios,
   not absolute times. Minibatches: vijax slices per-epoch permutations, GPJax draws
   indices with replacement (``jr.choice``).

Run: ``python benchmarks/bench_svgp.py [--steps 3000] [--quick]``
"""

from __future__ import annotations

import os

# One BLAS thread: on a small, shared CPU the multithreaded OpenBLAS behind JAX's CPU
# Cholesky (scipy's) thrashes for matrices of 128 rows and more (measured: 250 ms instead of
# 0.1 ms per 128 x 128 factorisation with other jobs running). Set before numpy/jax load it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import vijax.gp as gp

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"


def moons(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import make_moons

    return make_moons(n, noise=0.2, random_state=seed)


def _smooth(trace: np.ndarray, window: int) -> np.ndarray:
    c = np.cumsum(np.insert(trace, 0, 0.0))
    out = (c[window:] - c[:-window]) / window
    return np.concatenate([np.full(window - 1, -np.inf), out])


def natgrad_vs_adam(steps: int) -> dict:
    X, y = moons(5000)
    n, batch, m = len(y), 256, 50
    model = gp.SVGP(gp.RBF(), "bernoulli", inducing=m)
    window = 10 * (n // batch)
    out = {"N": n, "B": batch, "M": m, "steps": steps, "window": window}
    fits = {}
    for name, natural, gamma in (("adam", False, None), ("natgrad", True, None),
                                 ("natgrad_0.1", True, 0.1), ("natgrad_0.03", True, 0.03)):
        start = time.perf_counter()
        res = gp.fit_svgp(model, X, y, steps=steps, batch_size=batch, key=jax.random.key(0),
                          natural_gradients=natural, natgrad_step=gamma)
        out[f"{name}_seconds"] = time.perf_counter() - start
        out[f"{name}_final_full_elbo"] = res.elbo(X, y)
        out[f"{name}_skipped"] = res.n_nonfinite_skipped
        p1, _ = res.predict_y(X)
        out[f"{name}_train_accuracy"] = float(np.mean((np.asarray(p1) > 0.5) == y))
        fits[name] = _smooth(res.elbo_trace, window)
        out[f"{name}_smoothed_every_100"] = fits[name][window - 1::100].tolist()
    target = fits["adam"][-1]
    out["adam_final_smoothed_elbo"] = float(target)
    for name in ("natgrad", "natgrad_0.1", "natgrad_0.03"):
        hit = np.flatnonzero(fits[name] >= target)
        out[f"{name}_steps_to_adam_final"] = int(hit[0]) + 1 if hit.size else None
        out[f"{name}_final_smoothed_elbo"] = float(fits[name][-1])
    out["adam_final_smoothed_elbo_check"] = float(fits["adam"][-1])
    reached = np.flatnonzero(fits["natgrad"] >= target)
    out["adam_steps"] = steps
    # Adam-only's own first crossing of its final value (its smoothed curve is noisy at the end)
    out["adam_steps_to_own_final"] = int(np.flatnonzero(fits["adam"] >= target)[0]) + 1
    if reached.size:
        out["step_ratio"] = out["natgrad_steps_to_adam_final"] / out["adam_steps_to_own_final"]
    return out


def co2(steps: int, ms: tuple) -> dict:
    spec = importlib.util.spec_from_file_location("co2_svgp", ROOT / "examples" / "co2_svgp.py")
    ex = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(ex)  # enables float64 (the example's setting)
    t, y, _, _ = ex.load_co2(1991.0)
    yc = y - y.mean()
    n = len(t)
    lml, sk_params, sk_noise, sk_seconds = ex.sklearn_exact(t, yc)
    rows = []
    for m in ms:
        model = gp.SVGP(ex.mauna_loa_kernel(), gp.Gaussian(0.01), inducing=m)
        res = gp.fit_svgp(model, t, yc, steps=steps, key=jax.random.key(0))
        titsias = float(gp.collapsed_bound(model.kernel, sk_params, res.inducing, t, yc,
                                           sk_noise))
        rows.append({"M": m, "elbo_per_point": res.elbo(t, yc) / n,
                     "titsias_at_sklearn_per_point": titsias / n})
    jax.config.update("jax_enable_x64", False)
    return {"N": n, "steps": steps, "exact_lml_per_point": lml / n,
            "sklearn_seconds": sk_seconds, "rows": rows}


_GPJAX_SCRIPT = r"""
import json, sys, time
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, jax.random as jr, numpy as np, optax as ox
import gpjax as gpx
d = np.load(sys.argv[1]); X, y, Z = d["X"], d["y"], d["Z"]
s1, s2, batch = int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
D = gpx.Dataset(X=jnp.asarray(X), y=jnp.asarray(y)[:, None])
def model():
    prior = gpx.gps.Prior(mean_function=gpx.mean_functions.Zero(), kernel=gpx.kernels.RBF())
    post = prior * gpx.likelihoods.Bernoulli()
    return gpx.variational_families.WhitenedVariationalGaussian(
        model=post, inducing_inputs=jnp.asarray(Z))
loss = lambda q, d: -gpx.objectives.elbo(q, d)
out = {"gpjax": gpx.__version__}
for name in ("natgrad", "adam"):
    times = []
    for steps in (s1, s2):
        start = time.perf_counter()
        if name == "natgrad":
            q, h = gpx.fit_natgrads(model=model(), objective=loss, train_data=D,
                                    optim=ox.adam(0.01), natgrad_lr=0.1, num_iters=steps,
                                    batch_size=batch, key=jr.key(0), verbose=False)
        else:
            q, h = gpx.fit(model=model(), objective=loss, train_data=D, optim=ox.adam(0.01),
                           num_iters=steps, batch_size=batch, key=jr.key(0), verbose=False)
        jax.block_until_ready(h)
        times.append(time.perf_counter() - start)
    out[name] = (times[1] - times[0]) / (s2 - s1)
    out[name + "_final_loss"] = float(np.mean(np.asarray(h)[-50:]))
print("RESULT" + json.dumps(out))
"""


def vs_gpjax(gpjax_python: str, s1: int, s2: int) -> dict:
    X, y = moons(5000)
    batch, m = 256, 50
    Z = gp.svgp.kmeans_inducing(X, m, seed=0)
    out = {"N": len(y), "B": batch, "M": m, "S1": s1, "S2": s2}
    with jax.enable_x64(True):
        model = gp.SVGP(gp.RBF(), "bernoulli-probit", inducing=Z)
        for name, natural in (("natgrad", True), ("adam", False)):
            kw = dict(batch_size=batch, natural_gradients=natural, natgrad_step=0.1,
                      chunk_size=100)
            gp.fit_svgp(model, X, y, steps=100, key=jax.random.key(0), **kw)  # compile
            times = []
            for steps in (s1, s2):
                start = time.perf_counter()
                gp.fit_svgp(model, X, y, steps=steps, key=jax.random.key(0), **kw)
                times.append(time.perf_counter() - start)
            out[f"vijax_{name}"] = (times[1] - times[0]) / (s2 - s1)
    if not Path(gpjax_python).exists():
        out["gpjax_error"] = (f"{gpjax_python} not found: create it with `python3 -m venv "
                              "/tmp/svgp/gpvenv && /tmp/svgp/gpvenv/bin/pip install gpjax`")
        return out
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "moons.npz"
        np.savez(path, X=X, y=y.astype(float), Z=Z)
        proc = subprocess.run([gpjax_python, "-c", _GPJAX_SCRIPT, str(path), str(s1), str(s2),
                               str(batch)], capture_output=True, text=True, timeout=1800)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")]
    if proc.returncode or not lines:
        out["gpjax_error"] = (proc.stderr or proc.stdout)[-2000:]
        return out
    res = json.loads(lines[-1][len("RESULT"):])
    out["gpjax_version"] = res["gpjax"]
    for name in ("natgrad", "adam"):
        out[f"gpjax_{name}"] = res[name]
        out[f"gpjax_{name}_final_loss_per_point"] = res[name + "_final_loss"] / len(y)
        out[f"ratio_{name}_gpjax_over_vijax"] = res[name] / out[f"vijax_{name}"]
    return out


def write(results: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "svgp_cpu.json").write_text(json.dumps(results, indent=2, default=float))
    a, c, g = results["natgrad_vs_adam"], results["co2"], results["gpjax"]
    lines = [
        "# Sparse variational GPs (CPU)", "",
        f"Machine: {results['machine']}; `python benchmarks/bench_svgp.py "
        f"{results['args']}`, {results['seconds']:.0f} s.", "",
        "## 1. Natural gradients + Adam vs Adam only (two moons, Bernoulli-logit)", "",
        f"N = {a['N']}, M = {a['M']}, B = {a['B']}, {a['steps']} steps each; ELBO traces "
        f"smoothed over {a['window']} steps (10 epochs).", "",
        "Traces are the minibatch ELBO at the parameters each step starts from (unbiased "
        "for the full-data ELBO there). Adam lr 0.01 on the hyper-parameters and Z in every "
        "fit.", "",
        "| | Adam only | natgrad default gamma = B/N | natgrad gamma 0.1 | natgrad gamma 0.03 |",
        "|---|---|---|---|---|",
        f"| steps to reach Adam-only's final smoothed ELBO ({a['adam_final_smoothed_elbo']:.1f};"
        " Adam: its first crossing)"
        f" | {a['adam_steps_to_own_final']} | {a['natgrad_steps_to_adam_final']} | "
        f"{a['natgrad_0.1_steps_to_adam_final']} | {a['natgrad_0.03_steps_to_adam_final']} |",
        f"| smoothed ELBO at the end | {a['adam_final_smoothed_elbo']:.1f} | "
        f"{a['natgrad_final_smoothed_elbo']:.1f} | {a['natgrad_0.1_final_smoothed_elbo']:.1f} | "
        f"{a['natgrad_0.03_final_smoothed_elbo']:.1f} |",
        f"| full-data ELBO after {a['steps']} steps | {a['adam_final_full_elbo']:.1f} | "
        f"{a['natgrad_final_full_elbo']:.1f} | {a['natgrad_0.1_final_full_elbo']:.1f} | "
        f"{a['natgrad_0.03_final_full_elbo']:.1f} |",
        f"| training accuracy | {a['adam_train_accuracy']:.3f} | "
        f"{a['natgrad_train_accuracy']:.3f} | {a['natgrad_0.1_train_accuracy']:.3f} | "
        f"{a['natgrad_0.03_train_accuracy']:.3f} |",
        f"| wall time incl. compile (s) | {a['adam_seconds']:.1f} | {a['natgrad_seconds']:.1f} "
        f"| {a['natgrad_0.1_seconds']:.1f} | {a['natgrad_0.03_seconds']:.1f} |",
        f"| skipped non-finite steps | {a['adam_skipped']} | {a['natgrad_skipped']} | "
        f"{a['natgrad_0.1_skipped']} | {a['natgrad_0.03_skipped']} |", "",
        f"Step ratio natgrad (default gamma) / Adam-only: "
        f"**{a.get('step_ratio', float('nan')):.3f}** (target <= 0.25; "
        f"{a['natgrad_steps_to_adam_final']} / {a['steps']} = "
        f"{(a['natgrad_steps_to_adam_final'] or float('nan')) / a['steps']:.3f} against "
        "Adam's whole run). A natgrad step costs about two ELBO gradients (one for q, one for "
        "the hyper-parameters), an Adam-only step one.", "",
        "## 2. CO2 (Mauna Loa kernel): ELBO vs exact log marginal likelihood", "",
        f"N = {c['N']} monthly means up to 1991; exact GP by scikit-learn "
        f"(type-II ML, {c['sklearn_seconds']:.0f} s): **{c['exact_lml_per_point']:.4f}** "
        f"nats/point. SVGP: full batch, natgrad (gamma 1) + Adam, {c['steps']} steps, float64.",
        "", "| M | SVGP ELBO / N | gap / N | Titsias bound at sklearn's hypers / N | gap / N |",
        "|---|---|---|---|---|",
    ]
    for r in c["rows"]:
        lines.append(f"| {r['M']} | {r['elbo_per_point']:.4f} | "
                     f"{c['exact_lml_per_point'] - r['elbo_per_point']:.4f} | "
                     f"{r['titsias_at_sklearn_per_point']:.4f} | "
                     f"{c['exact_lml_per_point'] - r['titsias_at_sklearn_per_point']:.4f} |")
    lines += ["", "## 3. Time per step vs GPJax (two moons, probit, M = 50, B = 256, float64)",
              ""]
    if "gpjax_error" in g:
        lines += ["GPJax could not be run:", "", "```", g["gpjax_error"], "```"]
    else:
        lines += [f"GPJax {g['gpjax_version']} in a separate venv, run as a subprocess in the "
                  f"same run; per-step time from the difference of {g['S2']}- and "
                  f"{g['S1']}-step fits (compilation cancels).", "",
                  "| mode | GPJax time / vijax time per step |", "|---|---|",
                  f"| natgrad (0.1) + Adam | {g['ratio_natgrad_gpjax_over_vijax']:.2f} |",
                  f"| Adam only | {g['ratio_adam_gpjax_over_vijax']:.2f} |"]
    lines += ["", "Shared 2-core machine with other jobs running: ratios within one run are "
              "comparable, absolute times are not reported.", ""]
    (RESULTS / "svgp_cpu.md").write_text("\n".join(lines))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=3000)
    ap.add_argument("--quick", action="store_true", help="small step counts (smoke test)")
    ap.add_argument("--gpjax-python", default="/tmp/svgp/gpvenv/bin/python")
    args = ap.parse_args()
    steps = 300 if args.quick else args.steps
    start = time.perf_counter()
    results = {"machine": "CPU, 2 shared cores", "args": " ".join(sys.argv[1:])}
    results["natgrad_vs_adam"] = natgrad_vs_adam(steps)
    print(json.dumps(results["natgrad_vs_adam"], indent=1, default=float), flush=True)
    results["gpjax"] = vs_gpjax(args.gpjax_python, *((100, 200) if args.quick else (200, 3200)))
    print(json.dumps(results["gpjax"], indent=1, default=float), flush=True)
    results["co2"] = co2(100 if args.quick else 600, (16, 32) if args.quick else (16, 32, 64, 128))
    print(json.dumps(results["co2"], indent=1, default=float), flush=True)
    results["seconds"] = time.perf_counter() - start
    write(results)
    print(f"wrote {RESULTS / 'svgp_cpu.md'}")


if __name__ == "__main__":
    main()
