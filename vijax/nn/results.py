"""Reading a fit's Bayesian layers: their posteriors, sparsity, and point predictions."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vijax.nn.layers import SparseDense

__all__ = ["posterior", "sparsity", "mean_values"]


def _layers(res) -> tuple:
    from vijax.result import FitResult

    if not isinstance(res, FitResult):
        raise TypeError(f"res must be a vj.FitResult (from vj.fit or vj.load), got {type(res)}")
    layers = res.target.layers
    if not layers:
        raise ValueError("this fit's model has no Bayesian layers (vj.nn.Dense, ...)")
    return layers


def posterior(res) -> dict[str, dict[str, jax.Array]]:
    """The fitted posterior of every Bayesian layer: a dict from layer name to
    ``{"w_loc" (in, out), "w_scale" (in, out), "b_loc" (out,), "b_scale" (out,)}`` (no
    bias entries without a bias; the dropout layers' biases are point estimates, without
    ``b_scale``, and they add ``"log_alpha"`` (in, out))."""
    return {b.name: b.layer.posterior(res.mparams[b.name]) for b in _layers(res)}


def sparsity(res) -> dict[str, dict[str, float]]:
    """Per sparse variational dropout layer (:class:`vijax.nn.SparseDense`, pruned where
    ``log alpha`` exceeds its threshold): ``{"weights": total, "kept": nonzero after
    pruning, "pruned_fraction": ...}``, plus an ``"all"`` entry over every such layer.
    Raises ``ValueError`` when the model has none (:class:`vijax.nn.DropoutDense` bounds
    alpha by 1 and never prunes)."""
    out, total, kept = {}, 0, 0
    for b in _layers(res):
        if not isinstance(b.layer, SparseDense):
            continue
        la = np.asarray(b.layer.posterior(res.mparams[b.name])["log_alpha"])
        n, k = int(la.size), int(np.sum(la <= b.layer.threshold))
        out[b.name] = {"weights": n, "kept": k, "pruned_fraction": 1.0 - k / n}
        total, kept = total + n, kept + k
    if not out:
        raise ValueError("sparsity is defined for sparse variational dropout layers "
                         "(vj.nn.SparseDense); this model has none")
    out["all"] = {"weights": total, "kept": kept, "pruned_fraction": 1.0 - kept / total}
    return out


def mean_values(res) -> dict[str, Any]:
    """What the model receives at the posterior mean: the global latents at the guide's
    mean, the model parameters, and every Bayesian layer at its mean weights (pruned for
    :class:`vijax.nn.SparseDense`): a deterministic network, ``fn(vj.nn.mean_values(res))``."""
    _layers(res)
    target, guide = res.target, res.guide
    if guide.mean is None:
        raise ValueError(f"the {guide.name!r} guide has no closed-form mean; use "
                         "vj.predictive for posterior-averaged predictions")
    theta = guide.mean(res.params)
    return target.values(theta, res.mparams, None, "mean")


def apply_mean(res, fn: Callable) -> Any:
    """``fn(mean_values(res))`` under ``jax.jit``."""
    z = mean_values(res)
    return jax.jit(fn)(jax.tree_util.tree_map(jnp.asarray, z))
