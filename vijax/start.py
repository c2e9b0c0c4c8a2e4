"""Where a fit starts: the initial point (``init`` values, the rest drawn until the log density
is finite) and warm starts from a fitted result (``init_from``, ``resume``)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vijax.checks import _check_key
from vijax.guides.lowrank import LowRank
from vijax.guides.whitened import Whitened, guide_moments, whitening
from vijax.model import Model
from vijax.result import FitResult

__all__ = ["initial_point"]

MAX_INIT_TRIES = 100


# ---------------------------------------------------------------------------------------------
# the initial point
def _init_finder(target, no_jacobian: frozenset):
    """``(key, data, fixed (full_dim,), mask (full_dim,)) -> (tries, theta, ok)``.

    Draws ``theta ~ Uniform(-2, 2)`` in unconstrained space (discrete latents: uniform
    category indices) for unmasked entries (masked ones come from ``init=``) until the log
    density and its gradient are finite.
    """
    dim = target.dim
    num_values = np.concatenate([np.full(b.size, b.num_values) for b in target.discrete]
                                or [np.zeros(0)])

    def finite_at(theta, data):
        lp, g = jax.value_and_grad(target.log_density)(theta, data, no_jacobian)
        return jnp.isfinite(lp) & jnp.all(jnp.isfinite(g))

    def find(key, data, fixed, mask):
        def candidate(i):
            k_c, k_d = jax.random.split(jax.random.fold_in(key, i))
            u = jax.random.uniform(k_c, (dim,), fixed.dtype, -2.0, 2.0)
            if num_values.size:
                idx = jnp.floor(jax.random.uniform(k_d, num_values.shape, fixed.dtype)
                                * num_values)
                u = jnp.concatenate([u, jnp.minimum(idx, num_values - 1).astype(fixed.dtype)])
            return jnp.where(mask, fixed, u)

        def cond(c):
            i, _, ok = c
            return (~ok) & (i < MAX_INIT_TRIES)

        def body(c):
            i, _, _ = c
            theta = candidate(i)
            return i + 1, theta, finite_at(theta, data)

        theta0 = candidate(0)
        return jax.lax.while_loop(cond, body, (jnp.int32(1), theta0, finite_at(theta0, data)))

    return find


@functools.lru_cache(maxsize=64)
def _compiled_finder(target):
    return jax.jit(_init_finder(target, frozenset()))


def initial_point(model: Model, data, key, init, dtype) -> jax.Array:
    """The fit's initial point ``(full_dim,)`` (``init`` values, the rest uniform in (-2, 2)
    in unconstrained space, redrawn until the log density and gradient are finite): the same
    point a fit with this key starts from. ``data`` must be checked already."""
    target = model.target
    fixed, mask = _fixed_init(target, init, dtype)
    k_init = jax.random.split(_check_key(key), 3)[0]
    tries, theta, ok = _compiled_finder(target)(k_init, data, fixed, mask)
    _check_init_found(target, tries, theta, ok, mask)
    return theta


def _fixed_init(target, init, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Unconstrained values and mask ``(full_dim,)`` of the latents given in ``init``."""
    fixed = np.zeros((target.full_dim,), dtype)
    mask = np.zeros((target.full_dim,), bool)
    if init is not None:
        if not isinstance(init, Mapping):
            raise TypeError(f"init must be a dict from latent name to constrained value, got "
                            f"{type(init)}")
        target.check_values(init)
        for name, value in init.items():
            b = target.block(name)
            if name in target.discrete_names:
                u = (np.asarray(value) - b.low).astype(dtype).ravel()
            else:
                u = np.asarray(b.transform.inv(jnp.asarray(value, dtype))).ravel()
            if not np.all(np.isfinite(u)):
                raise ValueError(f"init value of latent {name!r} ({value}) maps to a non-finite "
                                 "unconstrained value; it lies on the boundary of its support")
            fixed[b.offset:b.offset + b.size] = u
            mask[b.offset:b.offset + b.size] = True
    return fixed, mask


def _check_init_found(target, tries, theta, ok, mask) -> None:
    if not bool(ok):
        if mask.all():
            raise ValueError("the log joint or its gradient is not finite at the given init: "
                             f"{target.describe(theta)}")
        raise ValueError(f"no initial point with a finite log joint and gradient found in "
                         f"{int(tries)} tries (uniform in (-2, 2) in unconstrained space); last "
                         f"values tried: {target.describe(theta)}. Pass init= with constrained "
                         "values where the model is finite")


# ---------------------------------------------------------------------------------------------
# warm starts from a fitted result
def _source_loc(source: FitResult) -> np.ndarray:
    """Unconstrained centre of a fitted guide: its mean, or the mean of 1,000 draws."""
    if source.guide.mean is not None:
        return np.asarray(source.guide.mean(source.params))
    keys = jax.random.split(jax.random.key(0), 1000)
    draws = jax.jit(jax.vmap(source.guide.sample, in_axes=(0, None)))(keys, source.params)[0]
    return np.asarray(jnp.mean(draws, axis=0))


def _check_source(target, source: Any, dtype, what: str = "init_from") -> None:
    if not isinstance(source, FitResult):
        raise TypeError(f"{what} must be a vj.FitResult, got {type(source)}")
    mine = [(b.name, b.unconstrained_shape) for b in target.blocks] + [
        (b.name, b.shape, b.low, b.num_values) for b in target.discrete]
    theirs = [(b.name, b.unconstrained_shape) for b in source.target.blocks] + [
        (b.name, b.shape, b.low, b.num_values) for b in source.target.discrete]
    if mine != theirs:
        raise ValueError(f"{what}: the fitted result's latents {theirs} do not match the "
                         f"model's latents {mine}")
    got = jax.tree_util.tree_leaves(source.params)[0].dtype
    if got != dtype:
        raise ValueError(f"{what}: the fitted result is {got}, this fit is {dtype}")


def _same_family(a, b) -> bool:
    """Same guide class and configuration apart from ``init_scale`` (which only sets the
    starting point, so a flow's unit-scale base can take over a fitted Gaussian)."""
    if a is None or type(a) is not type(b) or not dataclasses.is_dataclass(a):
        return False
    return all(getattr(a, f.name) == getattr(b, f.name)
               for f in dataclasses.fields(a) if f.name != "init_scale")


MAX_WHITENING_DIM = 4096
"""Largest dimension whose dense covariance a warm start into :class:`Whitened` computes."""


def _whitened_params(spec, params, source: FitResult):
    """A :class:`Whitened` guide's parameters from ``source``: ``shift`` and ``T`` from its
    mean and covariance, the base as initialised (``None`` if ``source`` is a point mass or
    its covariance is not positive definite: the fit then starts from its centre only)."""
    dim = source.target.dim
    if dim > MAX_WHITENING_DIM:
        raise ValueError(f"init_from into a Whitened guide needs the dense covariance of the "
                         f"fitted result; {dim} unconstrained dimensions is more than "
                         f"{MAX_WHITENING_DIM} (use the base family directly)")
    moments = guide_moments(source.guide, source.params, dim, jax.random.key(0))
    if moments is None:
        return None
    try:
        fixed = whitening(*moments, full=spec.full)
    except ValueError:
        return None
    dtype = params["shift"].dtype
    out = {**params, **{k: jnp.asarray(v, dtype) for k, v in fixed.items()}}
    if isinstance(spec.base, LowRank) and not spec.full:
        # the low-rank factor starts at the source's correlations in whitened coordinates
        # (diagonal whitening leaves them; Adam would take thousands of steps to learn 0.9)
        t = fixed["scale"]
        cov_u = moments[1] / np.outer(t, t)
        base = LowRank.params_from(np.zeros(dim), cov_u, spec.base.resolved_rank(dim))
        out["base"] = {k: jnp.asarray(v, dtype) for k, v in base.items()}
    return out


def _warm_continuous(spec, params, source: FitResult, source_params, source_spec,
                     source_name):
    if source_spec == spec:
        taken = source_params
    elif isinstance(spec, Whitened):
        taken = _whitened_params(spec, params, source)
        if taken is None:
            return None
    elif _same_family(getattr(spec, "base", None), source_spec):
        taken = {**params, "base": source_params}
    else:
        return None
    shapes = jax.tree_util.tree_map(jnp.shape, (taken, params))
    if jax.tree_util.tree_structure(taken) != jax.tree_util.tree_structure(params) or \
            shapes[0] != shapes[1]:
        raise ValueError("init_from: the fitted guide's parameters do not fit this guide "
                         f"({source_name} -> {spec.name})")
    return taken


def _warm_params(spec, params, source: FitResult):
    """Guide parameters taken over from ``source``: all of them when the guide is the same,
    the base when the new guide is a flow over the source's family (discrete latents' logits
    always); else ``None``."""
    if not source.target.discrete:
        return _warm_continuous(spec, params, source, source.params, source.guide_spec,
                                source.guide.name)
    cont = _warm_continuous(spec, params["continuous"], source, source.params["continuous"],
                            source.guide_spec, source.guide.name)
    return {"continuous": params["continuous"] if cont is None else cont,
            "discrete": source.params["discrete"]}
