"""Accuracy of a posterior approximation against the posteriordb reference.

Follows "How accuracy is judged" in ``benchmarks/data/posteriordb/README.md`` (the project's
``posteriordb/README.md``). For every reported parameter ``i``, with the approximation's draws
mapped to the reported quantities (``Posterior.derived``):

* standardised mean error ``SME_i = |mean_q - mean_ref| / sd_ref``,
* sd ratio ``R_i = sd_q / sd_ref`` (sd with ddof = 1) and ``|log R_i|``,
* quantile errors ``max_p |q_p,q - q_p,ref| / sd_ref`` over p in {0.05, 0.5, 0.95}
  (numpy's linear interpolation, R type 7, as the reference).

Parameters in ``Posterior.heavy`` are judged by the quantile error only (their sd is a noisy
summary of a heavy tail); all others by SME and R. Verdict: **accurate** if every SME <= 0.1,
every R in [0.9, 1.1] and every heavy quantile error <= 0.1; **usable** with 0.3,
[0.75, 1.33] and 0.3; otherwise **fail**. Differences below ~0.03 in SME or ~2% in R are within
the reference's own Monte Carlo error; use S >= 10,000 draws so that q's is small too.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from benchmarks.posteriors.base import Posterior

__all__ = ["score", "THRESHOLDS", "VERDICTS"]

VERDICTS = ("accurate", "usable", "fail")
THRESHOLDS = {  # verdict: (max SME, (min R, max R), max quantile error of heavy parameters)
    "accurate": (0.1, (0.9, 1.1), 0.1),
    "usable": (0.3, (0.75, 1.33), 0.3),
}
QUANTILES = {"q05": 0.05, "q50": 0.5, "q95": 0.95}


def _reported(post: Posterior, draws: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Accept constrained latent draws (``derived`` is applied) or reference-keyed draws."""
    keys, latents, reported = set(draws), set(post.model.latents), set(post.reference)
    if keys == latents:
        draws = post.derived({k: np.asarray(v) for k, v in draws.items()})
    elif not reported <= keys:
        raise ValueError(f"{post.name}: draws must be keyed by the model's latents "
                         f"{sorted(latents)} or by the reference names {sorted(reported)}; "
                         f"got {sorted(keys)}")
    return {k: np.asarray(draws[k], np.float64) for k in post.reference}


def score(post: Posterior, draws: Mapping[str, Any]) -> dict[str, Any]:
    """Per-parameter errors against the reference, their max/mean and the verdict.

    Args:
        post: the posterior.
        draws: either constrained latent draws ``{latent: (S, *shape)}`` (what
            ``FitResult.sample(key, S)`` returns; ``post.derived`` is applied), or draws keyed
            by the reference names ``{name: (S,)}``.

    Returns:
        ``{"parameters": {name: {"mean", "sd", "q05", "q50", "q95", "sme", "sd_ratio",
        "abs_log_sd_ratio", "q_err"}}, "moment_params": (...), "heavy": (...),
        "max_sme", "mean_sme", "max_abs_log_sd_ratio", "mean_abs_log_sd_ratio",
        "min_sd_ratio", "max_sd_ratio"`` (over the moment-scored parameters),
        ``"max_q_err"`` (over the heavy ones, ``None`` if there are none),
        ``"max_q_err_all"`` (over all), ``"verdict"`` (one of ``VERDICTS``),
        ``"n_draws"``}. A non-finite draw makes its parameter's errors NaN and the verdict
        "fail".

    Example:
        >>> from benchmarks.posteriors import load
        >>> post = load("sblri-blr")
        >>> score(post, post.reference_draws())["verdict"]  # the reference scores itself
        'accurate'
    """
    x = _reported(post, draws)
    per = {}
    for name, ref in post.reference.items():
        v = x[name]
        q = np.quantile(v, list(QUANTILES.values()))
        sd = float(v.std(ddof=1))
        stats = {"mean": float(v.mean()), "sd": sd,
                 **{k: float(qk) for k, qk in zip(QUANTILES, q, strict=True)}}
        ratio = sd / ref["sd"]
        per[name] = {**stats, "sme": abs(stats["mean"] - ref["mean"]) / ref["sd"],
                     "sd_ratio": ratio,
                     "abs_log_sd_ratio": abs(math.log(ratio)) if ratio > 0 else math.inf,
                     "q_err": max(abs(stats[k] - ref[k]) / ref["sd"] for k in QUANTILES)}
    moment = tuple(p for p in post.reference if p not in post.heavy)
    out: dict[str, Any] = {
        "parameters": per, "moment_params": moment, "heavy": tuple(post.heavy),
        "max_sme": max(per[p]["sme"] for p in moment),
        "mean_sme": float(np.mean([per[p]["sme"] for p in moment])),
        "max_abs_log_sd_ratio": max(per[p]["abs_log_sd_ratio"] for p in moment),
        "mean_abs_log_sd_ratio": float(np.mean([per[p]["abs_log_sd_ratio"] for p in moment])),
        "min_sd_ratio": min(per[p]["sd_ratio"] for p in moment),
        "max_sd_ratio": max(per[p]["sd_ratio"] for p in moment),
        "max_q_err": max(per[p]["q_err"] for p in post.heavy) if post.heavy else None,
        "max_q_err_all": max(v["q_err"] for v in per.values()),
        "n_draws": int(next(iter(x.values())).shape[0]),
    }
    out["verdict"] = "fail"
    for verdict in ("usable", "accurate"):
        sme, (r_lo, r_hi), q_err = THRESHOLDS[verdict]
        if (out["max_sme"] <= sme and r_lo <= out["min_sd_ratio"]
                and out["max_sd_ratio"] <= r_hi
                and (out["max_q_err"] is None or out["max_q_err"] <= q_err)):
            out["verdict"] = verdict
    return out
