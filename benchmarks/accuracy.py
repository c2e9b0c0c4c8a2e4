"""Accuracy suite of ``python -m benchmarks run``: every posterior of the posteriordb registry
(``benchmarks.posteriors``) fitted with vijax's guides and with NumPyro's matching autoguides,
scored against the reference.

Methods, every one with the same step budget (``STEPS``; ``--quick``: ``QUICK_STEPS``, on the
posteriors ``QUICK_POSTERIORS``) and one particle per gradient estimate:

* vijax ``vj.fit(post.model, post.data, guide=G, steps=budget, key=key(0))`` with its
  defaults otherwise (per-guide Adam step size decayed as ``lr / sqrt(1 + t/1000)``, stopping
  rule on, tail iterate averaging, PSIS check): ``G`` = meanfield, lowrank, fullrank, iaf,
  laplace (MAP, then the inverse Hessian) and auto (the guide ladder; every rung gets the
  budget, so it may run several times as many steps).
* ``vijax_default`` (and ``vijax_default_psis``): ``vj.fit(post.model, post.data,
  key=key(0))`` with nothing else (the library's default guide and step limit).
* ``vijax_auto_psis``: the ``auto`` fit itself (not refitted; its time is the resampling
  only), its draws resampled by their Pareto-smoothed importance weights
  (``res.psis_resample(key, DRAWS, pool=4 * DRAWS)``), the correction vijax offers for every
  fit; the reading reports the counts with and without it.
* NumPyro ``SVI(post.numpyro_model, guide, numpyro.optim.Adam(lr), Trace_ELBO())`` run for
  the budget, ``lr`` constant (``NUMPYRO_LR``): AutoNormal, AutoLowRankMultivariateNormal,
  AutoMultivariateNormal, AutoIAFNormal (vijax IAF's depth and widths) and
  AutoLaplaceApproximation.

Each fitted q gives ``DRAWS`` = 10,000 draws (``FitResult.sample`` /
``guide.sample_posterior``), scored by ``benchmarks.posteriors.score``: per reported element
the standardised mean error, sd ratio and quantile errors, and a verdict accurate / usable /
fail. A fit that raises is recorded as "fail" with its message; the suite goes on.

Ranking within a library (the "best" guide per posterior): by verdict, then by the *worst
normalised error*, ``max(max SME, 1 - min R, max R - 1, max heavy q-err) / 0.1`` (<= 1 exactly
when accurate).

Run: ``python -m benchmarks run --suite accuracy [--quick] [--device cpu|gpu] [--out DIR]``.
"""

from __future__ import annotations

import concurrent.futures
import math
import multiprocessing
import sys
import time
import traceback
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import numpyro
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import (
    AutoIAFNormal,
    AutoLaplaceApproximation,
    AutoLowRankMultivariateNormal,
    AutoMultivariateNormal,
    AutoNormal,
)

import vijax as vj
from vijax.guides.flow import default_hidden, default_layers

__all__ = ["run", "to_markdown", "METHODS", "worst_error"]

STEPS, QUICK_STEPS = 5000, 1000
DRAWS = 10_000
SEED = 0
QUICK_POSTERIORS = ("eight_schools-eight_schools_centered", "sblri-blr", "arK-arK",
                    "low_dim_gauss_mix-low_dim_gauss_mix")
VIJAX = {"vijax_meanfield": "meanfield", "vijax_lowrank": "lowrank",
         "vijax_fullrank": "fullrank", "vijax_iaf": "iaf", "vijax_laplace": "laplace",
         "vijax_auto": "auto", "vijax_auto_psis": "auto", "vijax_default": "default",
         "vijax_default_psis": "default"}
PSIS_POOL = 4 * DRAWS


def _iaf(model, dim: int):
    return AutoIAFNormal(model, num_flows=default_layers(dim),
                         hidden_dims=list(default_hidden(dim)))


NUMPYRO: dict[str, Callable[[Any, int], Any]] = {
    "numpyro_normal": lambda model, dim: AutoNormal(model),
    "numpyro_lowrank": lambda model, dim: AutoLowRankMultivariateNormal(model),
    "numpyro_mvn": lambda model, dim: AutoMultivariateNormal(model),
    "numpyro_iaf": _iaf,
    "numpyro_laplace": lambda model, dim: AutoLaplaceApproximation(model),
}
NUMPYRO_LR = {"numpyro_normal": 1e-2, "numpyro_lowrank": 1e-2, "numpyro_mvn": 1e-2,
              "numpyro_iaf": 1e-3, "numpyro_laplace": 1e-2}
"""Constant Adam step sizes: 1e-2 as in ``bench_core``; AutoIAFNormal 1e-3, the best of 1e-3,
3e-3, 1e-2 in ``bench_flows``."""
METHODS = (*VIJAX, *NUMPYRO)
LABELS = {"vijax_meanfield": "vj meanfield", "vijax_lowrank": "vj lowrank",
          "vijax_fullrank": "vj fullrank", "vijax_iaf": "vj iaf", "vijax_laplace": "vj laplace",
          "vijax_auto": "vj auto", "vijax_auto_psis": "vj auto+PSIS",
          "vijax_default": "vj default", "vijax_default_psis": "vj default+PSIS",
          "numpyro_normal": "NP Normal",
          "numpyro_lowrank": "NP LowRankMVN", "numpyro_mvn": "NP MVN", "numpyro_iaf": "NP IAF",
          "numpyro_laplace": "NP Laplace"}
TARGET_ACCURATE = 13  # of the 16 posteriors: best vijax guide accurate


def _registry():
    try:
        from benchmarks import posteriors
    except ImportError as e:
        sys.exit(f"the accuracy suite needs the posterior registry benchmarks/posteriors/ "
                 f"(`from benchmarks.posteriors import POSTERIORS, load, score`), which could "
                 f"not be imported: {e}")
    return posteriors


# ---------------------------------------------------------------------------------------------
# one fit
_LAST_FIT: dict[tuple, Any] = {}  # the latest vijax fit, reused by its "+ PSIS" method


def _fit_vijax(post, guide: str, steps: int, name: str, corrected: bool) -> tuple[dict, dict]:
    key = (name, guide, steps)
    res = _LAST_FIT.get(key) if corrected else None
    if res is None:
        if guide == "default":  # what a new user gets: no guide, no step count
            res = vj.fit(post.model, post.data, key=jax.random.key(SEED), progress=False)
        else:
            res = vj.fit(post.model, post.data, guide=guide, steps=steps,
                         key=jax.random.key(SEED), progress=False)
        _LAST_FIT.clear()
        _LAST_FIT[key] = res
    d = res.diagnostics
    if corrected:  # resampled by the Pareto-smoothed importance weights of 4x as many draws
        draws = res.psis_resample(jax.random.key(SEED + 1), DRAWS, pool=PSIS_POOL)
    else:
        draws = res.sample(jax.random.key(SEED + 1), DRAWS)
    info = {"steps_run": int(d.n_steps), "stop_reason": d.stop_reason,
            "k_hat": float(d.k_hat), "final_loss": float(d.final_loss),
            "nonfinite_skipped": int(d.n_nonfinite_skipped)}
    if getattr(d, "rung", None) is not None:
        info["rung"] = d.rung
        info["ladder"] = [{"rung": r, "final_loss": float(loss), "k_hat": float(k),
                           "seconds": float(t), "error": err}
                          for r, loss, k, t, err in d.ladder]
    return draws, info


def _fit_numpyro(post, method: str, steps: int) -> tuple[dict, dict]:
    dim = post.model.target.dim
    guide = NUMPYRO[method](post.numpyro_model, dim)
    svi = SVI(post.numpyro_model, guide, numpyro.optim.Adam(NUMPYRO_LR[method]), Trace_ELBO())
    res = svi.run(jax.random.PRNGKey(SEED), steps, post.data, progress_bar=False)
    losses = np.asarray(res.losses)
    draws = guide.sample_posterior(jax.random.PRNGKey(SEED + 1), res.params,
                                   sample_shape=(DRAWS,))
    tail = losses[-max(1, losses.size // 10):]
    info = {"steps_run": int(losses.size), "final_loss": float(np.mean(tail)),
            "nonfinite_losses": int((~np.isfinite(losses)).sum())}
    return {k: v for k, v in draws.items() if k in post.model.latents}, info


def worst_error(sc: dict[str, Any]) -> float:
    """``max(max SME, 1 - min R, max R - 1, max heavy q-err) / 0.1``: <= 1 iff accurate."""
    vals = [sc["max_sme"], 1.0 - sc["min_sd_ratio"], sc["max_sd_ratio"] - 1.0]
    if sc.get("max_q_err") is not None:
        vals.append(sc["max_q_err"])
    if not all(math.isfinite(v) for v in vals):
        return math.inf
    return max(vals) / 0.1


def fit_and_score(reg, name: str, method: str, steps: int) -> dict[str, Any]:
    """One fit and its score; an exception anywhere gives verdict "fail" with its message."""
    t0 = time.perf_counter()
    out: dict[str, Any] = {"posterior": name, "method": method, "error": None}
    try:
        post = reg.load(name)
        out["dim"] = int(post.model.target.dim)
        if method in VIJAX:
            draws, info = _fit_vijax(post, VIJAX[method], steps, name,
                                     corrected=method.endswith("_psis"))
        else:
            draws, info = _fit_numpyro(post, method, steps)
        out.update(info)
        out["fit_s"] = time.perf_counter() - t0
        draws = {k: np.asarray(v) for k, v in draws.items()}
        n_bad = sum(int((~np.isfinite(v)).sum()) for v in draws.values())
        out["nonfinite_draws"] = n_bad
        sc = reg.score(post, draws)
        out.update(verdict=sc["verdict"], worst_error=worst_error(sc), score=sc)
    except Exception as e:  # one bad fit must not stop the suite: record it as a failure
        out.update(verdict="fail", worst_error=math.inf, fit_s=time.perf_counter() - t0,
                   error=f"{type(e).__name__}: {e}"[:800],
                   traceback=traceback.format_exc(limit=6)[-3000:])
    return out


# ---------------------------------------------------------------------------------------------
def _rank_key(r: dict, verdicts) -> tuple[int, float]:
    return verdicts.index(r["verdict"]), r["worst_error"]


def compare(fits: dict[str, dict], verdicts, psis: bool = True) -> dict[str, Any]:
    """Best vijax guide against best NumPyro autoguide on one posterior (``psis=False``:
    leaving out the PSIS-resampled method, i.e. q's own draws only)."""
    ours = [m for m in fits if m in VIJAX and (psis or not m.endswith("_psis"))]
    theirs = [m for m in fits if m in NUMPYRO]
    if not ours or not theirs:
        return {}
    best_v = min(ours, key=lambda m: _rank_key(fits[m], verdicts))
    best_n = min(theirs, key=lambda m: _rank_key(fits[m], verdicts))
    kv, kn = _rank_key(fits[best_v], verdicts), _rank_key(fits[best_n], verdicts)
    how = ("better verdict" if kv[0] < kn[0] else "worse verdict" if kv[0] > kn[0]
           else "same verdict, lower error" if kv[1] < kn[1]
           else "same verdict, equal error" if kv[1] == kn[1] else "same verdict, higher error")
    return {"best_vijax": best_v, "best_numpyro": best_n, "vijax_better": kv < kn, "how": how,
            "best_vijax_verdict": fits[best_v]["verdict"],
            "best_numpyro_verdict": fits[best_n]["verdict"]}


def _fit_posterior(name: str, methods: list[str], steps: int) -> dict[str, dict]:
    """Every method on one posterior (run in a child process by :func:`run`)."""
    reg = _registry()
    fits = {}
    for m in methods:
        r = fits[m] = fit_and_score(reg, name, m, steps)
        msg = (f"  {name:42s} {m:16s} {r['verdict']:8s} err {r['worst_error']:8.2f} "
               f"{r['fit_s']:6.1f} s")
        if r["error"]:
            msg += f"  ERROR {r['error'][:120]}"
        print(msg, file=sys.stderr, flush=True)
    return fits


def run(quick: bool, posteriors: list[str] | None = None, methods: list[str] | None = None,
        steps: int | None = None) -> dict[str, Any]:
    """Run the suite; returns the report (``settings``, ``rows``, ``counts``, ``notes``)."""
    reg = _registry()
    names = list(posteriors or (QUICK_POSTERIORS if quick else reg.POSTERIORS))
    unknown = [n for n in names if n not in reg.POSTERIORS]
    if unknown:
        sys.exit(f"unknown posteriors {unknown}; known: {sorted(reg.POSTERIORS)}")
    methods = list(methods or METHODS)
    bad = [m for m in methods if m not in METHODS]
    if bad:
        sys.exit(f"unknown methods {bad}; known: {list(METHODS)}")
    steps = steps or (QUICK_STEPS if quick else STEPS)
    rows = []
    # one fresh process per posterior: a long run compiles hundreds of programs, and one
    # process holding them all ran out of memory mappings for LLVM's JIT ("Cannot allocate
    # memory") after ~90 fits; the child inherits JAX_PLATFORMS from the CLI
    ctx = multiprocessing.get_context("spawn")
    for name in names:
        with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
            fits = pool.submit(_fit_posterior, name, methods, steps).result()
        rows.append({"posterior": name, "fits": fits, "compare": compare(fits, reg.VERDICTS),
                     "compare_q": compare(fits, reg.VERDICTS, psis=False)})
    counts = {m: {v: sum(r["fits"][m]["verdict"] == v for r in rows) for v in reg.VERDICTS}
              for m in methods}
    settings = {"quick": quick, "steps": steps, "draws": DRAWS, "seed": SEED,
                "posteriors": names, "methods": methods, "numpyro_lr": NUMPYRO_LR,
                "thresholds": reg.THRESHOLDS, "n_registry": len(reg.POSTERIORS)}
    return {"settings": settings, "rows": rows, "counts": counts, "notes": []}


# ---------------------------------------------------------------------------------------------
# report
def _cell(r: dict) -> str:
    if r["error"]:
        return "error"
    e = r["worst_error"]
    return f"{r['verdict'][0].upper()} {e:.2g}" if math.isfinite(e) else r["verdict"][0].upper()


def reading(report: dict) -> list[str]:
    rows = [r for r in report["rows"] if r["compare"]]
    n = len(rows)
    n_all = report["settings"]["n_registry"]
    acc = sum(r["compare"]["best_vijax_verdict"] == "accurate" for r in rows)
    better = [r for r in rows if r["compare"]["vijax_better"]]
    not_better = [f"{r['posterior']} ({r['compare']['how']}: {LABELS[r['compare']['best_vijax']]}"
                  f" vs {LABELS[r['compare']['best_numpyro']]})"
                  for r in rows if not r["compare"]["vijax_better"]]
    if n == n_all:
        first = (f"{acc} of {n}: **{'met' if acc >= TARGET_ACCURATE else 'not met'}**")
    else:  # a subset (--quick): the target is about all of them; say what this run shows
        need = math.ceil(TARGET_ACCURATE / n_all * n)
        first = (f"{acc} of the {n} posteriors run (the target is about all {n_all}; pro rata "
                 f"{need} of {n}: {'reached' if acc >= need else 'not reached'})")
    lines = [
        f"- Best vijax guide accurate on >= {TARGET_ACCURATE}/{n_all}: {first}.",
        f"- Best vijax guide better than the best NumPyro autoguide on each posterior: better "
        f"on {len(better)} of {n}: **{'met' if len(better) == n and n else 'not met'}**"
        + (f"; not better on {', '.join(not_better)}." if not_better else "."),
    ]
    q_rows = [r for r in rows if r.get("compare_q")]
    if any(m.endswith("_psis") for m in report["settings"]["methods"]) and q_rows:
        acc_q = sum(r["compare_q"]["best_vijax_verdict"] == "accurate" for r in q_rows)
        better_q = sum(r["compare_q"]["vijax_better"] for r in q_rows)
        lines.append(f"- Without the PSIS-resampled draws (q's own draws only): best vijax "
                     f"guide accurate on {acc_q} of {len(q_rows)}, better than the best "
                     f"NumPyro autoguide on {better_q} of {len(q_rows)}.")
    return lines


def to_markdown(report: dict, header: list[str]) -> str:
    s, rows = report["settings"], report["rows"]
    methods = s["methods"]
    verdicts = ("accurate", "usable", "fail")
    lr = ", ".join(f"{LABELS[m].removeprefix('NP ')} {v:g}" for m, v in s["numpyro_lr"].items()
                   if m in methods)
    lines = header + [
        "",
        f"Settings: step budget {s['steps']:,} for every method (vijax: the maximum, its "
        f"stopping rule on; NumPyro: exactly), 1 particle, seed {s['seed']}; "
        f"{s['draws']:,} draws of each fitted q scored against the posteriordb reference "
        f"(`benchmarks.posteriors.score`). vijax: `vj.fit` defaults (Adam 0.05 Gaussian / "
        f"0.01 IAF, decayed as lr/sqrt(1 + t/1000), tail averaging; `auto` climbs the guide "
        f"ladder with the budget per rung; `auto+PSIS`: that fit's draws resampled by their "
        f"PSIS weights, time = resampling only). NumPyro: `SVI` + `Trace_ELBO()` + constant "
        f"`numpyro.optim.Adam` ({lr}); AutoIAFNormal with vijax IAF's depth and widths. "
        f"{len(s['posteriors'])} posterior(s)."
        f"{' QUICK MODE: indicative only.' if s['quick'] else ''}",
        "",
        "Cells: verdict (A accurate, U usable, F fail) and the worst normalised error "
        "max(max SME, 1 - min R, max R - 1, max heavy q-err) / 0.1 (<= 1: accurate); "
        "\"error\": the fit raised (message below). Best = best verdict, then lowest error.",
        "",
        "| posterior | dim | " + " | ".join(LABELS[m] for m in methods)
        + " | best vijax | best NumPyro | vijax better |",
        "|---|--:|" + "---|" * len(methods) + "---|---|---|",
    ]
    for r in rows:
        fits, c = r["fits"], r["compare"]
        dim = next((f["dim"] for f in fits.values() if "dim" in f), "?")
        cells = [_cell(fits[m]) for m in methods]
        tail = ([LABELS[c["best_vijax"]], LABELS[c["best_numpyro"]],
                 f"{'yes' if c['vijax_better'] else 'no'} ({c['how']})"] if c else ["–"] * 3)
        lines.append(f"| {r['posterior']} | {dim} | " + " | ".join(cells + tail) + " |")
    lines += ["", "Counts per method, and fit time (fit + draws, compilation included; median "
              "and total over the posteriors):", "",
              "| method | accurate | usable | fail | median fit s | total fit s |",
              "|---|--:|--:|--:|--:|--:|"]
    for m in methods:
        times = [r["fits"][m]["fit_s"] for r in rows]
        cnt = report["counts"][m]
        lines.append(f"| {LABELS[m]} | " + " | ".join(str(cnt[v]) for v in verdicts)
                     + f" | {np.median(times):.1f} | {np.sum(times):.0f} |")
    auto = [(r["posterior"], r["fits"]["vijax_auto"].get("rung")) for r in rows
            if "vijax_auto" in r["fits"] and r["fits"]["vijax_auto"].get("rung")]
    if auto:
        lines += ["", "`guide=\"auto\"` chose: " + ", ".join(f"{p} {g}" for p, g in auto) + "."]
    errors = [(r["posterior"], m, f["error"]) for r in rows for m, f in r["fits"].items()
              if f["error"]]
    if errors:
        lines += ["", "Fits that raised:", ""]
        lines += [f"- {p} / {LABELS[m]}: `{e.splitlines()[0][:300]}`" for p, m, e in errors]
    lines += ["", "## Reading", "", *reading(report)]
    lines += [f"- {n}" for n in report["notes"]]
    return "\n".join(lines) + "\n"
