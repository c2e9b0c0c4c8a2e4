"""Predictive uncertainty and calibration metrics from posterior-predictive draws.

Two levels. The array functions take ``S`` per-draw predictions and the targets:

* :func:`regression_from_draws`: per-draw Gaussian ``loc``/``scale`` ``(S, N)`` and ``y (N,)``;
  the predictive is the equal-weight mixture ``p(y | x) = (1/S) sum_s N(y | loc_s, scale_s)``.
* :func:`classification_from_draws`: per-draw class probabilities (or logits) ``(S, N, C)`` and
  integer labels ``(N,)``; the predictive is ``pbar = (1/S) sum_s p_s``.
* :func:`mixture_log_lik`: the test log-likelihood of any other likelihood (Student-t, ...)
  from per-draw log densities ``(S, N)``.

The result functions :func:`regression_metrics` and :func:`classification_metrics` draw the
per-draw predictions from a fitted :class:`vijax.FitResult` with :func:`vijax.predictive` and
call the array functions.

Inputs are checked on the host (shapes, dtypes, finite values, ranges) and errors name the
argument; the arithmetic runs in one jitted function per shape and dtype, in the floating dtype
of the inputs (float32, or float64 with ``jax_enable_x64``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import entr, logsumexp, ndtr, ndtri
from jax.scipy.stats import norm

from vijax.predictive import predictive

__all__ = [
    "RegressionMetrics", "ClassificationMetrics", "regression_from_draws",
    "classification_from_draws", "regression_metrics", "classification_metrics",
    "mixture_log_lik",
    "DEFAULT_LEVELS", "DEFAULT_BINS",
]

DEFAULT_LEVELS = (0.5, 0.9, 0.95)
DEFAULT_BINS = 15  # Guo et al. (2017)
# Bisection steps for the mixture quantiles: the bracket shrinks by 2**-60 of its initial width
# (the spread of the component quantiles), below float64 resolution for any sane spread.
_BISECTION_STEPS = 60


class RegressionMetrics(NamedTuple):
    """Metrics of a Gaussian-mixture predictive ``(1/S) sum_s N(loc_s, scale_s^2)``.

    Per-point arrays have shape ``(N,)``; interval arrays ``(L, N)`` for ``L`` levels.

    Attributes:
        mean: predictive mean ``(1/S) sum_s loc_s``, ``(N,)``.
        epistemic_var: variance of ``loc`` over the draws (divisor ``S``), ``(N,)``.
        aleatoric_var: mean of ``scale^2`` over the draws, ``(N,)``.
        total_var: the mixture's variance, ``epistemic_var + aleatoric_var`` (law of total
            variance), ``(N,)``.
        log_lik: ``log (1/S) sum_s N(y | loc_s, scale_s)`` per point, ``(N,)``.
        test_ll: mean of ``log_lik``, scalar.
        rmse: ``sqrt(mean((mean - y)^2))``, scalar.
        levels: central interval levels, ``(L,)``.
        lower, upper: the mixture's ``(1 -+ level)/2`` quantiles, ``(L, N)``.
        coverage: fraction of points with ``lower <= y <= upper``, ``(L,)``.
        width: mean of ``upper - lower`` over points, ``(L,)``.
    """

    mean: jax.Array
    epistemic_var: jax.Array
    aleatoric_var: jax.Array
    total_var: jax.Array
    log_lik: jax.Array
    test_ll: jax.Array
    rmse: jax.Array
    levels: jax.Array
    lower: jax.Array
    upper: jax.Array
    coverage: jax.Array
    width: jax.Array

    def summary(self) -> str:
        """One line: RMSE, test log-likelihood, coverage and width per level, mean sds."""
        cov = ", ".join(f"{float(a):.0%}: {float(c):.3f} (width {float(w):.3g})"
                        for a, c, w in zip(self.levels, self.coverage, self.width, strict=True))
        return (f"RegressionMetrics(N={self.mean.shape[0]}): RMSE {float(self.rmse):.4g}, "
                f"test LL {float(self.test_ll):.4g}, coverage {cov}; mean sd epistemic "
                f"{float(jnp.sqrt(self.epistemic_var).mean()):.3g}, aleatoric "
                f"{float(jnp.sqrt(self.aleatoric_var).mean()):.3g}")

    def __str__(self) -> str:
        return self.summary()


class ClassificationMetrics(NamedTuple):
    """Metrics of a classification predictive ``pbar = (1/S) sum_s p_s``.

    Attributes:
        probs: predictive class probabilities ``pbar``, ``(N, C)``.
        log_lik: ``log pbar[n, y_n]`` per point, ``(N,)``.
        test_ll: mean of ``log_lik``, scalar.
        error: fraction of points with ``argmax_c pbar[n, c] != y_n``, scalar.
        ece: expected calibration error (Guo et al. 2017): with ``B_m`` the points whose
            confidence ``max_c pbar[n, c]`` lies in ``((m-1)/M, m/M]``,
            ``sum_m |B_m|/N |acc(B_m) - conf(B_m)|``, scalar.
        brier: ``mean_n sum_c (pbar[n, c] - 1[c = y_n])^2`` (Brier 1950, multi-class;
            between 0 and 2), scalar.
        total_entropy: ``H[pbar_n]`` in nats, ``(N,)``.
        aleatoric_entropy: expected entropy ``(1/S) sum_s H[p_s,n]``, ``(N,)``.
        epistemic: mutual information ``total_entropy - aleatoric_entropy`` (>= 0 up to
            rounding), ``(N,)``.
        bin_count: points per confidence bin, ``(M,)``.
        bin_confidence, bin_accuracy: mean confidence and accuracy per bin (0 for an empty
            bin; see ``bin_count``), ``(M,)``: a reliability diagram.
    """

    probs: jax.Array
    log_lik: jax.Array
    test_ll: jax.Array
    error: jax.Array
    ece: jax.Array
    brier: jax.Array
    total_entropy: jax.Array
    aleatoric_entropy: jax.Array
    epistemic: jax.Array
    bin_count: jax.Array
    bin_confidence: jax.Array
    bin_accuracy: jax.Array

    def summary(self) -> str:
        """One line: test log-likelihood, error, ECE, Brier and the mean entropies."""
        n, c = self.probs.shape
        return (f"ClassificationMetrics(N={n}, C={c}): test LL {float(self.test_ll):.4g}, "
                f"error {float(self.error):.4f}, ECE {float(self.ece):.4f} "
                f"({self.bin_count.shape[0]} bins), Brier {float(self.brier):.4g}; mean "
                f"entropy total {float(self.total_entropy.mean()):.3g} = aleatoric "
                f"{float(self.aleatoric_entropy.mean()):.3g} + epistemic "
                f"{float(self.epistemic.mean()):.3g} nats")

    def __str__(self) -> str:
        return self.summary()


# ---------------------------------------------------------------------------------- checks


def _as_array(name: str, x: Any) -> np.ndarray | jax.Array:
    if isinstance(x, jax.Array | np.ndarray):
        return x
    if isinstance(x, np.generic | int | float | list | tuple):
        return np.asarray(x)
    raise TypeError(f"{name} must be an array, got {type(x).__name__}")


def _check_float(name: str, x: Any, ndim: int, what: str) -> Any:
    x = _as_array(name, x)
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(f"{name} must be a floating array {what}, got dtype {x.dtype}")
    if x.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions {what}, got shape {x.shape}")
    return x


def _check_finite(name: str, x: Any) -> None:
    bad = ~np.isfinite(np.asarray(x))
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"{name} has {int(bad.sum())} non-finite value(s) of {bad.size} "
                         f"(first at index {first})")


def _check_draws(name: str, x: Any) -> None:
    if x.shape[0] == 0:
        raise ValueError(f"{name} has no draws (S = 0, shape {x.shape}); need S >= 1")
    if x.shape[1] == 0:
        raise ValueError(f"{name} has no points (N = 0, shape {x.shape}); need N >= 1")


def _check_levels(levels: Any) -> np.ndarray:
    arr = np.asarray(levels, dtype=float)
    if arr.ndim != 1 or arr.size == 0:
        raise ValueError(f"levels must be a non-empty sequence of numbers, got {levels!r}")
    if not np.all((arr > 0) & (arr < 1)):
        raise ValueError(f"levels must lie strictly between 0 and 1, got {levels!r}")
    return arr


def _check_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


# ------------------------------------------------------------------------------ regression


def _mixture_quantiles(loc: jax.Array, scale: jax.Array, p: jax.Array) -> jax.Array:
    """Quantiles ``q[k, n]`` with ``(1/S) sum_s Phi((q - loc[s, n]) / scale[s, n]) = p[k]``.

    Bisection on the mixture CDF, bracketed by the smallest and largest component quantile
    (every component's CDF is ``<= p`` at the smallest, ``>= p`` at the largest).
    """
    comp = loc[None] + scale[None] * ndtri(p)[:, None, None]  # (K, S, N)
    lo, hi = comp.min(axis=1), comp.max(axis=1)  # (K, N)

    def step(_, bracket):
        lo, hi = bracket
        mid = 0.5 * (lo + hi)
        below = ndtr((mid[:, None] - loc[None]) / scale[None]).mean(axis=1) < p[:, None]
        return jnp.where(below, mid, lo), jnp.where(below, hi, mid)

    lo, hi = jax.lax.fori_loop(0, _BISECTION_STEPS, step, (lo, hi))
    return 0.5 * (lo + hi)


@jax.jit
def _regression(loc, scale, y, levels):
    s = loc.shape[0]
    mean = loc.mean(axis=0)
    epistemic = jnp.mean((loc - mean) ** 2, axis=0)
    aleatoric = jnp.mean(scale**2, axis=0)
    log_lik = logsumexp(norm.logpdf(y, loc, scale), axis=0) - math.log(s)
    rmse = jnp.sqrt(jnp.mean((mean - y) ** 2))
    p = jnp.concatenate([(1 - levels) / 2, (1 + levels) / 2])
    q = _mixture_quantiles(loc, scale, p)
    lower, upper = q[: levels.shape[0]], q[levels.shape[0]:]
    inside = (lower <= y) & (y <= upper)
    return RegressionMetrics(
        mean=mean, epistemic_var=epistemic, aleatoric_var=aleatoric,
        total_var=epistemic + aleatoric, log_lik=log_lik, test_ll=log_lik.mean(), rmse=rmse,
        levels=levels, lower=lower, upper=upper, coverage=inside.mean(axis=1, dtype=loc.dtype),
        width=(upper - lower).mean(axis=1))


def regression_from_draws(loc: Any, scale: Any, y: Any, *,
                          levels: Sequence[float] = DEFAULT_LEVELS) -> RegressionMetrics:
    """Predictive metrics of a Gaussian likelihood from ``S`` posterior draws.

    The predictive density at each test point is the exact equal-weight mixture
    ``p(y_n) = (1/S) sum_s N(y_n | loc[s, n], scale[s, n]^2)``, where ``scale`` is the
    likelihood's (aleatoric) noise sd of each draw. Its variance splits as
    ``Var = Var_s[loc] + E_s[scale^2]`` (epistemic + aleatoric, divisor ``S``). The test
    log-likelihood ``log p(y_n)`` is a logsumexp over draws. The central intervals are the
    mixture's ``(1 - level)/2`` and ``(1 + level)/2`` quantiles, found by bisection on the
    mixture CDF (not a moment-matched Gaussian), so coverage is exact for a non-Gaussian
    predictive. (Hernandez-Lobato & Adams 2015 and Gal & Ghahramani 2016 report RMSE of the
    mean and this test log-likelihood.)

    Args:
        loc: per-draw predictive means, ``(S, N)``, floating.
        scale: per-draw noise sds, ``(S, N)``, floating, finite and > 0.
        y: targets, ``(N,)``.
        levels: central interval levels, each in ``(0, 1)``.

    Returns:
        A :class:`RegressionMetrics`; arrays in the floating dtype of ``loc`` and ``scale``.

    Raises:
        TypeError: a non-floating ``loc`` or ``scale``, or a non-numeric ``y``.
        ValueError: shapes that disagree (the message gives both), ``S = 0`` or ``N = 0``,
            non-finite values, a ``scale <= 0``, or a level outside ``(0, 1)``.

    Example:
        >>> import numpy as np
        >>> loc = np.array([[0.0, 1.0], [0.2, 1.4]], np.float32)  # S = 2 draws, N = 2 points
        >>> m = regression_from_draws(loc, np.ones_like(loc), np.array([0.1, 1.0]))
        >>> [round(float(v), 4) for v in m.mean], round(float(m.epistemic_var[1]), 4)
        ([0.1, 1.2], 0.04)
        >>> print(m)  # doctest: +ELLIPSIS
        RegressionMetrics(N=2): RMSE 0.1414, test LL -0.941, coverage 50%: 1.000 (width 1.37), ...
    """
    loc = _check_float("loc", loc, 2, "of shape (S, N)")
    scale = _check_float("scale", scale, 2, "of shape (S, N)")
    if scale.shape != loc.shape:
        raise ValueError(f"scale has shape {scale.shape} but loc has shape {loc.shape} "
                         "(S draws, N points); they must match")
    _check_draws("loc", loc)
    y = _as_array("y", y)
    if not (jnp.issubdtype(y.dtype, jnp.floating) or jnp.issubdtype(y.dtype, jnp.integer)):
        raise TypeError(f"y must be a numeric array of shape (N,), got dtype {y.dtype}")
    if y.shape != loc.shape[1:]:
        raise ValueError(f"y has shape {y.shape} but loc has shape {loc.shape}: y must have "
                         f"shape (N,) = ({loc.shape[1]},)")
    for name, x in (("loc", loc), ("scale", scale), ("y", y)):
        _check_finite(name, x)
    smallest = float(np.min(np.asarray(scale)))
    if smallest <= 0:
        raise ValueError(f"scale must be > 0 (a noise standard deviation), got minimum "
                         f"{smallest} at index {np.unravel_index(np.argmin(scale), scale.shape)}")
    lv = _check_levels(levels)
    loc, scale = jnp.asarray(loc), jnp.asarray(scale)
    dtype = jnp.result_type(loc, scale)
    return _regression(loc.astype(dtype), scale.astype(dtype), jnp.asarray(y, dtype),
                       jnp.asarray(lv, dtype))


def mixture_log_lik(log_prob: Any) -> jax.Array:
    """Test log-likelihood of any likelihood from per-draw log densities.

    ``log p(y_n) = log (1/S) sum_s exp(log_prob[s, n])`` (a logsumexp over draws), for
    likelihoods other than the Gaussian of :func:`regression_from_draws`: e.g. a Student-t,
    ``numpyro.distributions.StudentT(df, loc_s, scale_s).log_prob(y)`` per draw.

    Args:
        log_prob: ``log p(y_n | z_s)``, ``(S, N)``, floating; ``-inf`` is allowed (zero
            density), ``NaN`` and ``+inf`` are not.

    Returns:
        ``(N,)`` per-point log predictive densities (take ``.mean()`` for the test LL).

    Example:
        >>> import numpy as np
        >>> lp = np.log(np.array([[0.2, 0.5], [0.4, 0.5]], np.float32))
        >>> [round(float(v), 4) for v in mixture_log_lik(lp)]
        [-1.204, -0.6931]
    """
    lp = _check_float("log_prob", log_prob, 2, "of shape (S, N)")
    _check_draws("log_prob", lp)
    arr = np.asarray(lp)
    bad = np.isnan(arr) | (arr == np.inf)
    if bad.any():
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ValueError(f"log_prob has {int(bad.sum())} NaN or +inf value(s) (first at index "
                         f"{first})")
    return _mixture_log_lik(jnp.asarray(lp))


@jax.jit
def _mixture_log_lik(lp):
    return logsumexp(lp, axis=0) - math.log(lp.shape[0])


# -------------------------------------------------------------------------- classification


@functools.partial(jax.jit, static_argnames=("n_bins", "from_logits"))
def _classification(x, y, n_bins, from_logits):
    s = x.shape[0]
    if from_logits:
        logp = jax.nn.log_softmax(x, axis=-1)
        p = jnp.exp(logp)
        probs = p.mean(axis=0)
        picked = jnp.take_along_axis(logp, jnp.broadcast_to(y[None, :, None], (s, y.size, 1)),
                                     axis=-1)[..., 0]
        log_lik = logsumexp(picked, axis=0) - math.log(s)
    else:
        p = x
        probs = p.mean(axis=0)
        log_lik = jnp.log(jnp.take_along_axis(probs, y[:, None], axis=-1)[:, 0])
    total = entr(probs).sum(axis=-1)
    aleatoric = entr(p).sum(axis=-1).mean(axis=0)
    conf = probs.max(axis=-1)
    correct = (jnp.argmax(probs, axis=-1) == y).astype(x.dtype)
    # bin m (0-based) holds confidences in (m/M, (m+1)/M]
    bins = jnp.clip(jnp.ceil(conf * n_bins).astype(jnp.int32) - 1, 0, n_bins - 1)
    count = jax.ops.segment_sum(jnp.ones_like(conf), bins, n_bins)
    sum_conf = jax.ops.segment_sum(conf, bins, n_bins)
    sum_acc = jax.ops.segment_sum(correct, bins, n_bins)
    safe = jnp.maximum(count, 1)
    onehot = jax.nn.one_hot(y, x.shape[-1], dtype=x.dtype)
    return ClassificationMetrics(
        probs=probs, log_lik=log_lik, test_ll=log_lik.mean(), error=1 - correct.mean(),
        ece=jnp.abs(sum_acc - sum_conf).sum() / y.size,
        brier=((probs - onehot) ** 2).sum(axis=-1).mean(), total_entropy=total,
        aleatoric_entropy=aleatoric, epistemic=total - aleatoric,
        bin_count=count.astype(jnp.int32), bin_confidence=sum_conf / safe,
        bin_accuracy=sum_acc / safe)


def classification_from_draws(probs: Any, y: Any, *, from_logits: bool = False,
                              n_bins: int = DEFAULT_BINS) -> ClassificationMetrics:
    """Predictive and calibration metrics of a classifier from ``S`` posterior draws.

    The predictive is ``pbar[n] = (1/S) sum_s p[s, n]``. Test log-likelihood:
    ``log pbar[n, y_n]`` (with ``from_logits``, a logsumexp of the draws' log-softmax).
    Error: ``argmax pbar != y``. ECE (Guo et al. 2017): confidences ``max_c pbar[n, c]`` in
    ``n_bins`` equal-width bins ``((m-1)/M, m/M]``, ``sum_m |B_m|/N |acc(B_m) - conf(B_m)|``.
    Brier: ``mean_n sum_c (pbar[n, c] - 1[c = y_n])^2``. Entropy decomposition (Depeweg et
    al. 2018): ``H[pbar] = (1/S) sum_s H[p_s] + I`` (aleatoric + epistemic, the mutual
    information between the label and the draw), in nats.

    Args:
        probs: per-draw class probabilities ``(S, N, C)`` (each row on the simplex), or logits
            with ``from_logits=True``; floating, finite.
        y: integer labels in ``[0, C)``, ``(N,)``.
        from_logits: ``probs`` holds unnormalised log-probabilities.
        n_bins: number of confidence bins for the ECE (default 15).

    Returns:
        A :class:`ClassificationMetrics` in the floating dtype of ``probs``.

    Raises:
        TypeError: non-floating ``probs``, non-integer ``y``.
        ValueError: shapes that disagree (the message gives both), ``S = 0``, ``N = 0`` or
            ``C = 0``, non-finite values, probabilities outside ``[0, 1]`` or not summing to 1,
            labels out of range, a bad ``n_bins``.

    Example:
        >>> import numpy as np
        >>> p = np.array([[[0.9, 0.1], [0.4, 0.6]],
        ...               [[0.7, 0.3], [0.2, 0.8]]], np.float32)  # S = 2, N = 2, C = 2
        >>> m = classification_from_draws(p, np.array([0, 0]))
        >>> [round(float(v), 3) for v in m.probs[1]], float(m.error)
        ([0.3, 0.7], 0.5)
        >>> print(m)  # doctest: +ELLIPSIS
        ClassificationMetrics(N=2, C=2): test LL -0.7136, error 0.5000, ECE 0.4500 ...
    """
    what = "of shape (S, N, C)" + (" (logits)" if from_logits else "")
    if not isinstance(from_logits, bool):
        raise TypeError(f"from_logits must be True or False, got {from_logits!r}")
    n_bins = _check_int("n_bins", n_bins)
    x = _check_float("probs", probs, 3, what)
    _check_draws("probs", x)
    if x.shape[2] == 0:
        raise ValueError(f"probs has no classes (C = 0, shape {x.shape})")
    y = _as_array("y", y)
    if not jnp.issubdtype(y.dtype, jnp.integer):
        raise TypeError(f"y must be integer class labels of shape (N,), got dtype {y.dtype}")
    if y.shape != x.shape[1:2]:
        raise ValueError(f"y has shape {y.shape} but probs has shape {x.shape}: y must have "
                         f"shape (N,) = ({x.shape[1]},)")
    _check_finite("probs", x)
    yh = np.asarray(y)
    bad = (yh < 0) | (yh >= x.shape[2])
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"y has {int(bad.sum())} label(s) outside [0, C) = [0, {x.shape[2]}) "
                         f"(first y[{i}] = {int(yh[i])})")
    if not from_logits:
        xh = np.asarray(x)
        tol = 1e-3 if xh.dtype.itemsize <= 4 else 1e-6
        if xh.min() < 0 or xh.max() > 1:
            raise ValueError(f"probs must lie in [0, 1], got values in [{xh.min()}, "
                             f"{xh.max()}]; pass logits with from_logits=True")
        err = np.abs(xh.sum(axis=-1) - 1)
        if err.max() > tol:
            idx = tuple(int(i) for i in np.unravel_index(np.argmax(err), err.shape))
            raise ValueError(f"probs must sum to 1 over classes (tolerance {tol}); "
                             f"probs[{idx[0]}, {idx[1]}] sums to {xh[idx].sum()}; pass logits "
                             "with from_logits=True")
    return _classification(jnp.asarray(x), jnp.asarray(y, jnp.int32), n_bins, from_logits)


# ----------------------------------------------------------------------------- result level


def _broadcast_scale(scale: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    if scale.shape == shape[:1] or scale.shape == shape[:1] + (1,):
        return jnp.broadcast_to(scale.reshape(shape[0], 1), shape)
    return scale


def regression_metrics(res: Any, fn: Callable, y: Any, key: jax.Array, n: int = 100, *,
                       levels: Sequence[float] = DEFAULT_LEVELS,
                       batch_size: int | None = None) -> RegressionMetrics:
    """:func:`regression_from_draws` on ``n`` posterior draws of a fitted model.

    Computes ``(loc_s, scale_s) = fn(z_s)`` for ``z_s ~ q`` with :func:`vijax.predictive`
    (the same draws as ``res.sample(key, n)``) and scores the mixture against ``y``.

    Args:
        res: a fitted :class:`vijax.FitResult`.
        fn: ``z -> (loc, scale)`` for one draw ``z`` (the dict the model receives): the
            Gaussian likelihood's mean ``(N,)`` and noise sd (``(N,)`` or a scalar) at the test
            inputs, in the units of ``y``.
        y: test targets, ``(N,)``.
        key: a JAX PRNG key.
        n: number of posterior draws ``S``.
        levels: central interval levels.
        batch_size: draws per compiled call of :func:`vijax.predictive`.

    Returns:
        A :class:`RegressionMetrics`.

    Example:
        >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, vijax as vj
        >>> @vj.model(mu=vj.Latent())
        ... def m(z, y):
        ...     return dist.Normal(0, 10).log_prob(z["mu"]) + dist.Normal(z["mu"], 1).log_prob(
        ...         y).sum()
        >>> res = vj.fit(m, jnp.zeros(5), guide="meanfield", steps=100, convergence=None,
        ...              progress=False, psis_draws=0)  # doctest: +SKIP
        >>> met = regression_metrics(res, lambda z: (z["mu"] * jnp.ones(3), 1.0),
        ...                          jnp.zeros(3), jax.random.key(0), 50)  # doctest: +SKIP
        >>> met.mean.shape, met.coverage.shape  # doctest: +SKIP
        ((3,), (3,))
    """
    out = predictive(res, fn, key, n, batch_size=batch_size)
    if not (isinstance(out, tuple | list) and len(out) == 2):
        raise TypeError("regression_metrics: fn(z) must return a pair (loc, scale), got "
                        f"{type(out).__name__}")
    loc, scale = jnp.asarray(out[0]), jnp.asarray(out[1])
    if loc.ndim != 2:
        raise ValueError(f"regression_metrics: fn(z)'s loc must have shape (N,), got "
                         f"{loc.shape[1:]}")
    scale = _broadcast_scale(scale, loc.shape)
    if scale.shape != loc.shape:
        raise ValueError(f"regression_metrics: fn(z)'s scale must be a scalar or of shape "
                         f"(N,) = {loc.shape[1:]}, got {scale.shape[1:]}")
    return regression_from_draws(loc, scale, y, levels=levels)


def classification_metrics(res: Any, fn: Callable, y: Any, key: jax.Array, n: int = 100, *,
                           n_bins: int = DEFAULT_BINS,
                           batch_size: int | None = None) -> ClassificationMetrics:
    """:func:`classification_from_draws` on ``n`` posterior draws of a fitted model.

    Computes ``logits_s = fn(z_s)`` for ``z_s ~ q`` with :func:`vijax.predictive` and scores
    the predictive ``pbar = (1/S) sum_s softmax(logits_s)`` against the labels ``y``.

    Args:
        res: a fitted :class:`vijax.FitResult`.
        fn: ``z -> logits`` of shape ``(N, C)`` for one draw ``z`` at the test inputs.
        y: integer test labels in ``[0, C)``, ``(N,)``.
        key: a JAX PRNG key.
        n: number of posterior draws ``S``.
        n_bins: number of ECE bins.
        batch_size: draws per compiled call of :func:`vijax.predictive`.

    Returns:
        A :class:`ClassificationMetrics`.

    Example:
        >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, vijax as vj
        >>> @vj.model(b=vj.Latent())
        ... def m(z, y):
        ...     return dist.Normal(0, 1).log_prob(z["b"]) + dist.Bernoulli(
        ...         logits=z["b"]).log_prob(y).sum()
        >>> res = vj.fit(m, jnp.array([1.0, 1.0, 0.0]), guide="meanfield", steps=100,
        ...              convergence=None, progress=False, psis_draws=0)
        >>> met = classification_metrics(
        ...     res, lambda z: jnp.stack([jnp.zeros(4), z["b"] * jnp.ones(4)], axis=-1),
        ...     jnp.array([1, 1, 0, 1]), jax.random.key(0), 50)
        >>> met.probs.shape
        (4, 2)
    """
    logits = predictive(res, fn, key, n, batch_size=batch_size)
    if not isinstance(logits, jax.Array) or logits.ndim != 3:
        shape = getattr(logits, "shape", None)
        raise ValueError("classification_metrics: fn(z) must return logits of shape (N, C), "
                         f"got {type(logits).__name__}"
                         + (f" of shape {shape[1:]}" if shape is not None else ""))
    return classification_from_draws(logits, y, from_logits=True, n_bins=n_bins)
