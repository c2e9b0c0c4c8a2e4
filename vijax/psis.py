"""Pareto-smoothed importance sampling (PSIS) and its k-hat diagnostic.

Given draws ``theta_s ~ q`` and log importance ratios
``log r_s = log p~(theta_s) - log q(theta_s)``, PSIS (Vehtari, Simpson, Gelman, Yao & Gabry
2024) stabilises the importance weights by replacing the ``M`` largest ratios with expected
order statistics of a generalized Pareto distribution (GPD) fitted to them. With ``S`` draws:

1. Tail length ``M = ceil(min(0.2 S, 3 sqrt(S)))`` (draws from ``q`` are independent, so the
   relative efficiency ``r_eff`` of the paper is 1).
2. Threshold ``u``: the ``(M+1)``-th largest ratio. Fit a GPD with CDF
   ``F(x) = 1 - (1 + k x / sigma)^(-1/k)`` to the exceedances ``x_z = r_(S-M+z) - u``,
   ``z = 1..M``, by the empirical Bayes estimator of Zhang & Stephens (2009), then shrink the
   shape towards 0.5 with the weakly informative prior of Vehtari et al.:
   ``k_hat = (M k + 10 * 0.5) / (M + 10)``.
3. Replace the ``z``-th smallest tail ratio by ``u + F^{-1}((z - 1/2) / M)``, truncate every
   ratio at the largest raw ratio, and normalise.

``k_hat`` estimates the number of finite fractional moments of the ratio distribution
(``E[r^a] < inf`` for ``a < 1/k``). Reading (Yao, Vehtari, Simpson & Gelman 2018, "Yes, but did
it work?"): ``k_hat < 0.5`` good, ``< 0.7`` usable, otherwise importance sampling (and the
variational approximation that produced the proposal) is unreliable. Newer versions of the
paper use the sample-size dependent threshold ``min(1 - 1/log10(S), 0.7)``; for
``S >= 2155`` it equals 0.7, so the fixed reading matches it for the usual draw counts.

Everything runs once per fit on the host, in numpy float64, in log space relative to the
largest ratio so that no weight overflows.

References:
    Vehtari, Simpson, Gelman, Yao, Gabry (2024). Pareto smoothed importance sampling. JMLR 25.
    arXiv:1507.02646.
    Zhang, Stephens (2009). A new and efficient estimation method for the generalized Pareto
    distribution. Technometrics 51(3).
    Yao, Vehtari, Simpson, Gelman (2018). Yes, but did it work?: Evaluating variational
    inference. ICML.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np

__all__ = ["PSISResult", "psis", "k_hat_reading"]

MIN_DRAWS = 10
"""Fewer log weights than this raise ``ValueError``."""

MIN_TAIL = 5
"""Tails shorter than this are not fitted: ``k_hat = inf``, no smoothing (as loo does)."""

FLAT_SPREAD = 1e-4
"""Log weights whose range is below this are equal up to rounding (every weight within 0.01%
of the others, e.g. float32 ratios of a guide that equals the target): ``k_hat = -inf``."""

_PRIOR_SHAPE = 0.5  # centre of the weakly informative prior on k
_PRIOR_WEIGHT = 10.0  # its weight, in pseudo-observations
_ZS_PRIOR = 3.0  # Zhang & Stephens' constant in the grid of theta
_ZS_MIN_GRID = 30  # grid size m = 30 + floor(sqrt(M))
_MAX_EXP = 700.0  # exp(700) ~ 1e304 is finite in float64
_MIN_QUARTILE = 1e-300  # smallest first quartile / max exceedance with a finite ZS grid


class PSISResult(NamedTuple):
    """Output of :func:`psis`.

    Attributes:
        log_weights: ``(S,)`` smoothed, truncated log weights, normalised so that
            ``logsumexp(log_weights) == 0``; in the order of the input.
        k_hat: estimated GPD shape of the upper tail of the weights (``-inf`` when the tail is
            flat, ``inf`` when it is too short to fit, see :func:`psis`).
        ess: importance-sampling effective sample size ``1 / sum_s w_s^2`` of the normalised
            smoothed weights ``w``, in ``[1, S]``.
        reading: :func:`k_hat_reading` of ``k_hat``.
    """

    log_weights: np.ndarray
    k_hat: float
    ess: float
    reading: str


def k_hat_reading(k: float) -> str:
    """Reading of a Pareto ``k_hat`` (Yao et al. 2018).

    Args:
        k: the estimated shape.

    Returns:
        ``"good"`` for ``k < 0.5``, ``"usable"`` for ``0.5 <= k < 0.7``, otherwise (including
        NaN) ``"unreliable"``.

    Example:
        >>> k_hat_reading(0.3), k_hat_reading(0.6), k_hat_reading(0.9)
        ('good', 'usable', 'unreliable')
    """
    k = float(k)
    if k < 0.5:
        return "good"
    if k < 0.7:
        return "usable"
    return "unreliable"


def psis(log_weights: Any) -> PSISResult:
    """Pareto-smooth importance weights and estimate the tail shape ``k_hat``.

    Args:
        log_weights: ``(S,)`` log importance ratios ``log p~(theta_s) - log q(theta_s)`` of
            independent draws ``theta_s ~ q``, up to an additive constant; numpy or jax array.
            ``-inf`` is allowed (a weight of zero, e.g. a draw outside the target's support).

    Returns:
        :class:`PSISResult` with the smoothed normalised log weights ``(S,)``, ``k_hat``, the
        effective sample size and the reading of ``k_hat``.

    Raises:
        ValueError: if ``log_weights`` is not 1-D, has fewer than :data:`MIN_DRAWS` entries,
            contains NaN or ``+inf`` (the count is named), or is ``-inf`` everywhere.

    The tail length is ``M = ceil(min(0.2 S, 3 sqrt(S)))``, capped at ``P - 1`` where ``P`` is
    the number of non-zero weights, so that zero weights are never smoothed into positive ones.
    Edge cases:

    * ``M < MIN_TAIL`` (``S <= 20``, or fewer than 6 non-zero weights): the tail is too short
      for the fit; ``k_hat = inf`` (reading "unreliable") and the weights are only normalised.
    * The ``M + 1`` largest weights are equal, or all weights are equal up to rounding (their
      log range is below :data:`FLAT_SPREAD`, e.g. float32 ratios of a guide equal to the
      target): there is nothing to smooth; ``k_hat = -inf`` (reading "good").
    * Over a quarter of the tail tied with the threshold (discrete weights, e.g. one weight far
      above many equal ones): the Zhang-Stephens fit is undefined; ``k_hat = inf`` (reading
      "unreliable", as in loo) and the weights are only normalised. This is
      conservative: a few slightly larger weights among many equal ones are flagged too.

    Example:
        Standard normal target in 2-D, proposals ``N(0, s^2 I)``. The ratio ``r = p / q`` has a
        Pareto tail with ``k = 1 - s^2`` exactly: 0.75 for the too narrow ``s = 0.5``, 0.0975
        for ``s = 0.95``:

        >>> import numpy as np
        >>> def log_ratios(s, rng):
        ...     theta = s * rng.normal(size=(10_000, 2))
        ...     return np.sum(-0.5 * theta**2 + 0.5 * (theta / s) ** 2, axis=1)  # up to a const
        >>> rng = np.random.default_rng(1)
        >>> narrow, close = psis(log_ratios(0.5, rng)), psis(log_ratios(0.95, rng))
        >>> round(narrow.k_hat, 2), narrow.reading, round(narrow.ess)
        (0.74, 'unreliable', 573)
        >>> round(close.k_hat, 2), close.reading
        (0.19, 'good')
        >>> round(float(np.exp(close.log_weights).sum()), 12)
        1.0

        With ``S = 10,000`` draws the tail has ``M = 300`` points and ``k_hat`` has a sampling
        standard deviation of about ``(1 + k) / sqrt(M) ~ 0.1``.
    """
    lw = np.asarray(log_weights, dtype=np.float64)
    if lw.ndim != 1:
        raise ValueError(f"psis expects 1-D log weights of shape (S,), got shape {lw.shape}")
    n_draws = lw.shape[0]
    if n_draws < MIN_DRAWS:
        raise ValueError(f"psis needs at least {MIN_DRAWS} log weights, got {n_draws}")
    n_nan = int(np.isnan(lw).sum())
    n_posinf = int(np.isposinf(lw).sum())
    if n_nan or n_posinf:
        raise ValueError(
            f"log weights must be finite or -inf: {n_nan} of {n_draws} are NaN and "
            f"{n_posinf} are +inf"
        )
    n_pos = int(np.isfinite(lw).sum())
    if n_pos == 0:
        raise ValueError(f"all {n_draws} log weights are -inf (every weight is zero)")

    lw = lw - lw.max()  # largest weight 1: nothing overflows below
    tail_len = min(math.ceil(min(0.2 * n_draws, 3.0 * math.sqrt(n_draws))), n_pos - 1)
    finite = lw[np.isfinite(lw)]
    if n_pos == n_draws and float(finite.max() - finite.min()) < FLAT_SPREAD:
        k_hat = -math.inf  # equal weights up to rounding (q is the target): nothing to smooth
    elif tail_len < MIN_TAIL:
        k_hat = math.inf
    else:
        lw, k_hat = _smooth_tail(lw, tail_len)
    lw = lw - _logsumexp(lw)
    ess = 1.0 / float(np.exp(2.0 * lw).sum())
    return PSISResult(log_weights=lw, k_hat=k_hat, ess=ess, reading=k_hat_reading(k_hat))


def _smooth_tail(lw: np.ndarray, tail_len: int) -> tuple[np.ndarray, float]:
    """Replace the ``tail_len`` largest of ``lw`` (max 0) by GPD quantiles; return ``k_hat``.

    The exceedances are computed in units of the threshold weight, ``exp(lw - log u) - 1``,
    exact however far below the largest weight the threshold lies; only when the tail spans
    more than 700 nats (``exp`` would overflow) are they taken in units of the largest weight.
    """
    order = np.argsort(lw, kind="stable")
    tail_ids = order[-tail_len:]  # ascending
    log_cutoff = lw[order[-tail_len - 1]]  # finite: tail_len < number of finite entries
    log_unit = log_cutoff if log_cutoff > -_MAX_EXP else 0.0
    if log_unit == log_cutoff:
        exceed = np.expm1(lw[tail_ids] - log_cutoff)
    else:
        exceed = np.exp(lw[tail_ids]) - math.exp(log_cutoff)
    if exceed[-1] <= 0.0:  # the tail is flat: nothing to smooth
        return lw, -math.inf
    fit = _gpd_fit(exceed)
    if fit is None:
        return lw, math.inf
    k, sigma = fit
    k = (tail_len * k + _PRIOR_WEIGHT * _PRIOR_SHAPE) / (tail_len + _PRIOR_WEIGHT)
    p = (np.arange(1, tail_len + 1) - 0.5) / tail_len
    log_q = _gpd_log_quantile(p, k, sigma)
    smoothed = log_unit + np.logaddexp(log_cutoff - log_unit, log_q)
    out = lw.copy()
    out[tail_ids] = np.minimum(smoothed, 0.0)  # truncate at the largest raw weight
    return out, float(k)


def _gpd_fit(x: np.ndarray) -> tuple[float, float] | None:
    """Zhang & Stephens (2009) empirical Bayes estimate of the GPD ``(k, sigma)``.

    ``x``: ``(M,)`` ascending exceedances, ``x >= 0``, ``x[-1] > 0``; the fit runs on
    ``x / x_(M)`` and rescales ``sigma``. In the parameterisation
    ``theta = -k / sigma`` the profile log-likelihood is
    ``l(theta) = M (log(-theta / k(theta)) - k(theta) - 1)`` with
    ``k(theta) = mean(log1p(-theta x))``. The estimate is the posterior mean of ``theta`` over
    the grid ``theta_j = 1 / x_(M) + (1 - sqrt(m / (j - 1/2))) / (3 x*)``, ``j = 1..m``,
    ``m = 30 + floor(sqrt(M))``, ``x*`` the first quartile of ``x``; every ``theta_j < 1/x_(M)``
    so ``1 - theta x > 0``. The unadjusted ``k = k(theta_hat)`` and ``sigma = -k / theta_hat``
    are returned.

    ``None`` where the grid is undefined: ``x* = 0`` (over a quarter of the tail tied at the
    threshold, i.e. discrete weights) or ``x* / x_(M)`` so small that the grid overflows. loo
    gets NaN there and reports ``k = inf``; so does :func:`psis`.
    """
    n = x.shape[0]
    m = _ZS_MIN_GRID + int(math.sqrt(n))
    x_max = float(x[-1])
    y = x / x_max  # the fit is scale-equivariant: work with y in [0, 1]
    y_star = float(y[int(n / 4 + 0.5) - 1])  # first quartile (1-based index floor(n/4 + 1/2))
    if not y_star > _MIN_QUARTILE:
        return None
    j = np.arange(1, m + 1)
    theta = 1.0 + (1.0 - np.sqrt(m / (j - 0.5))) / (_ZS_PRIOR * y_star)
    k = np.log1p(-theta[:, None] * y[None, :]).mean(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):  # theta == 0 exactly: weight 0
        log_lik = n * (np.log(-theta / k) - k - 1.0)
    log_lik = np.where(np.isnan(log_lik), -np.inf, log_lik)
    post = np.exp(log_lik - _logsumexp(log_lik))
    theta_hat = float(np.sum(theta * post))
    if theta_hat == 0.0:  # exponential tail: sigma = mean exceedance
        return 0.0, float(np.mean(x))
    k_hat = float(np.mean(np.log1p(-theta_hat * y)))
    return k_hat, -k_hat / theta_hat * x_max


def _gpd_log_quantile(p: np.ndarray, k: float, sigma: float) -> np.ndarray:
    """Log of the GPD quantile ``sigma ((1 - p)^(-k) - 1) / k`` (``-sigma log(1 - p)`` at
    ``k = 0``), in log space so that a large ``k`` does not overflow.

    With ``a = -k log(1 - p)`` (same sign as ``k``), ``log |e^a - 1| = max(a, 0) +
    log(1 - e^(-|a|))``.
    """
    if abs(k) < 1e-12:
        return math.log(sigma) + np.log(-np.log1p(-p))
    a = -k * np.log1p(-p)
    log_abs_expm1 = np.maximum(a, 0.0) + np.log(-np.expm1(-np.abs(a)))
    return math.log(sigma) + log_abs_expm1 - math.log(abs(k))


def _logsumexp(a: np.ndarray) -> float:
    top = float(np.max(a))
    if not math.isfinite(top):
        return top
    return top + math.log(float(np.sum(np.exp(a - top))))
