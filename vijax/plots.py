"""Plots of a fit result: the loss trace and posterior marginals (matplotlib, optional).

Duck-typed on the result (it reads ``losses``, ``diagnostics``, ``target`` and ``sample``), so
that ``FitResult.plot`` can call it without an import cycle."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import jax
import numpy as np

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from vijax.result import FitResult  # annotations only: vijax.result imports this module

__all__ = ["plot"]

MAX_PANELS = 12
_COLUMNS = 4


def _import_matplotlib():
    """``matplotlib.figure.Figure`` (no pyplot: no global state, no GUI backend needed)."""
    try:
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError('FitResult.plot needs matplotlib: pip install "vijax[plot]"') from err
    return Figure


def _smooth(losses: np.ndarray, window: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Trailing moving average of the finite losses.

    Args:
        losses: ``(steps,)`` loss per step; non-finite (skipped) steps are left out.
        window: steps averaged; default ``max(1, steps // 20)``.

    Returns:
        ``(step, mean)``, both ``(m,)``: ``mean[i]`` is the average of the ``window`` finite
        losses up to and including step ``step[i]`` (0-based), for ``m = finite - window + 1``.
    """
    losses = np.asarray(losses, np.float64)
    step = np.flatnonzero(np.isfinite(losses))
    finite = losses[step]
    if finite.size == 0:
        return step, finite
    window = max(1, finite.size // 20) if window is None else max(1, min(window, finite.size))
    csum = np.concatenate([[0.0], np.cumsum(finite)])
    mean = (csum[window:] - csum[:-window]) / window
    return step[window - 1:], mean


_Panel = tuple[str, str, np.ndarray]  # (label, latent name, values (n,))


def _panels(draws: dict[str, np.ndarray], max_panels: int) -> tuple[list[_Panel], int]:
    """One panel per latent element, in order, up to ``max_panels``.

    Args:
        draws: dict from latent name to ``(n, *shape)`` draws.
        max_panels: the most panels returned.

    Returns:
        ``(panels, total)``: ``panels`` a list of ``(label, name, values (n,))`` with labels
        ``"mu"``, ``"theta[3]"``, ``"L[1,0]"``; ``total`` the number of elements in all.
    """
    panels, total = [], 0
    for name, d in draws.items():
        d = np.asarray(d)
        shape = d.shape[1:]
        total += math.prod(shape)
        for idx in np.ndindex(*shape):
            if len(panels) == max_panels:
                break
            label = name + ("[" + ",".join(map(str, idx)) + "]" if shape else "")
            panels.append((label, name, d[(slice(None), *idx)]))
    return panels, total


def _select(res: FitResult, latents: str | Sequence[str] | None) -> list[str]:
    names = list(res.target.names) + list(res.target.discrete_names)
    if latents is None:
        return names
    chosen = [latents] if isinstance(latents, str) else list(latents)
    unknown = [k for k in chosen if k not in names]
    if unknown or not chosen:
        raise ValueError(f"latents must name latents of the model {names}, got {latents!r}")
    return chosen


def _loss_panel(ax, res: FitResult) -> None:
    losses = np.asarray(res.losses, np.float64)
    objective = res.diagnostics.objective
    steps = np.arange(1, losses.size + 1)
    ax.plot(steps, losses, lw=0.5, alpha=0.35, color="C0", label="per step")
    step, mean = _smooth(losses)
    if mean.size:
        ax.plot(step + 1, mean, lw=1.5, color="C0", label="moving average")
        # the first steps are often orders of magnitude above the rest: the y range follows the
        # moving average after its first 10%, so that the approach to convergence is visible
        tail = mean[mean.size // 10:]
        lo, hi = float(np.min(mean)), float(np.max(tail))
        pad = 0.05 * (hi - lo) if hi > lo else max(abs(lo), 1.0) * 0.05
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("step")
    ax.set_ylabel(objective)
    ax.set_title(f"loss: {objective} (guide {res.guide.name}, final "
                 f"{res.diagnostics.final_loss:.4g})")
    ax.legend(loc="upper right", fontsize="small")


def _marginal_panel(ax, label: str, values: np.ndarray, discrete: bool, bins: int) -> None:
    values = np.asarray(values)
    if discrete:
        support, counts = np.unique(values, return_counts=True)
        ax.bar(support, counts / values.size, width=0.8, color="C1")
        ax.set_xticks(support if support.size <= 10 else support[:: math.ceil(support.size / 10)])
    elif np.ptp(values) == 0:  # a point mass (delta guide)
        ax.axvline(float(values[0]), color="C1", lw=2)
        label += " (point mass)"
    else:
        values = values.astype(np.float64)
        ax.hist(values, bins=bins, density=True, color="C1", alpha=0.6)
        ax.axvline(float(values.mean()), color="k", lw=1)
    ax.set_title(label, fontsize="medium")
    ax.set_yticks([])


def plot(res: FitResult, *, latents: str | Sequence[str] | None = None,
         key: jax.Array | None = None, n: int = 2000, max_panels: int = MAX_PANELS,
         bins: int = 40, path: str | os.PathLike | None = None,
         figsize: tuple[float, float] | None = None, dpi: int = 100) -> Figure:
    """A figure of the loss trace and the marginals of q.

    Top: the loss being minimised (``res.diagnostics.objective``, e.g. ``neg_elbo``) per step
    and its moving average (the y range leaves out the first, often much larger, losses).
    Below: one panel per latent element, up to ``max_panels``: a histogram of ``n`` draws of q
    with its mean (a line for a point mass, a bar chart of value frequencies for a discrete
    latent).

    The figure is a plain ``matplotlib.figure.Figure`` (no pyplot), so it needs no display
    and leaves pyplot's state alone; it renders in Jupyter, and ``path`` saves it (PNG, with
    the Agg renderer).

    Args:
        res: a fitted :class:`vijax.FitResult`.
        latents: a latent name or names to show (default all, in declaration order).
        key: PRNG key for the draws; default ``jax.random.key(0)`` (deterministic).
        n: number of draws (>= 1).
        max_panels: the most marginal panels (>= 1); elements beyond it are left out, with a
            note in the figure.
        bins: histogram bins.
        path: if given, save the figure there (the format from the suffix, e.g. ``.png``).
        figsize: ``(width, height)`` in inches; default from the number of panels.
        dpi: resolution of the saved figure.

    Returns:
        the ``matplotlib.figure.Figure``: ``1 + min(elements, max_panels)`` axes, the loss
        trace first.

    Raises:
        ImportError: matplotlib is not installed (``pip install "vijax[plot]"``).

    Example:
        >>> fig = res.plot(latents=["mu", "tau"], path="fit.png")  # doctest: +SKIP
    """
    if not all(hasattr(res, a) for a in ("losses", "diagnostics", "target", "sample")):
        raise TypeError(f"res must be a vj.FitResult, got {type(res)}")
    if isinstance(max_panels, bool) or not isinstance(max_panels, int) or max_panels < 1:
        raise ValueError(f"max_panels must be an int >= 1, got {max_panels!r}")
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be an int >= 1, got {bins!r}")
    names = _select(res, latents)
    figure_cls = _import_matplotlib()

    draws = res.sample(jax.random.key(0) if key is None else key, n)
    draws = {k: np.asarray(draws[k]) for k in names}
    panels, total = _panels(draws, max_panels)
    discrete = set(res.target.discrete_names)

    rows = 1 + math.ceil(len(panels) / _COLUMNS)
    cols = min(_COLUMNS, len(panels))
    if figsize is None:
        figsize = (max(6.0, 3.0 * cols), 3.0 * rows)
    fig = figure_cls(figsize=figsize, dpi=dpi, layout="constrained")
    grid = fig.add_gridspec(rows, cols)
    _loss_panel(fig.add_subplot(grid[0, :]), res)
    for i, (label, name, values) in enumerate(panels):
        ax = fig.add_subplot(grid[1 + i // cols, i % cols])
        _marginal_panel(ax, label, values, name in discrete, bins)
    if total > len(panels):
        fig.suptitle(f"marginals of q: {len(panels)} of {total} elements shown "
                     f"(choose with latents= or max_panels=)", fontsize="medium")
    if path is not None:
        fig.savefig(os.fspath(path), dpi=dpi)
    return fig
