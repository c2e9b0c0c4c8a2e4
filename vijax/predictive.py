"""Posterior predictive: map posterior draws through a user function, in bounded chunks."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vijax.placement import padded_rows, place_replicated, place_tree, resolve_placement, to_host
from vijax.result import FitResult

__all__ = ["predictive"]

# Draws per compiled call when ``batch_size`` is not given; lowered so that one chunk's output
# stays under _CHUNK_BYTES (the intermediates of ``fn`` scale with the same chunk size).
DEFAULT_BATCH_SIZE = 1000
_CHUNK_BYTES = 1 << 28  # 256 MiB
# ``fn``'s keys (``with_key=True``) come from ``fold_in(key, _FN_STREAM)``: a counter that
# ``split(key, n)`` (the draws' keys) never reaches for n < 2**32 - 1.
_FN_STREAM = 0xFFFFFFFF


def _describe(fn: Callable) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return repr(name) if name else repr(fn)


def _check_key(key: Any) -> None:
    if not (isinstance(key, jax.Array) and (
            (jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key) and key.shape == ())
            or (key.dtype == jnp.uint32 and key.shape == (2,)))):
        raise TypeError(f"key must be one JAX PRNG key (jax.random.key(seed)), got {key!r}")


def _check_count(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return int(value)


def _is_array_leaf(leaf: Any) -> bool:
    return isinstance(leaf, jax.Array | np.ndarray | np.generic | int | float | complex)


class _BadOutput(Exception):
    """``fn`` returned something other than a non-empty pytree of arrays."""


# the Bayesian layers' weight draw of a posterior draw comes from fold_in(its key, _LAYERS)
_LAYERS = 0xFFFFFFFE


def draw_values(target, guide, key, params, mparams):
    """One posterior draw of everything the model receives: the latents ``T(theta)``,
    ``theta ~ q``, the fitted model parameters, and one weight draw of every Bayesian
    layer (a fixed layer: ``z[name](h)`` is deterministic)."""
    theta, _ = guide.sample(key, params)
    if not target.params:
        return target.constrain(theta)
    return target.values(theta, mparams, jax.random.fold_in(key, _LAYERS), "sample")


def _one_draw(target, guide, fn: Callable, with_key: bool) -> Callable:
    """``(key, fn_key, params, mparams) -> fn(z)`` for one draw (:func:`draw_values`)."""

    def one(key, fn_key, params, mparams):
        z = draw_values(target, guide, key, params, mparams)
        return fn(fn_key, z) if with_key else fn(z)

    return one


def _build_chunk(target, guide, fn: Callable, with_key: bool) -> Callable:
    one = _one_draw(target, guide, fn, with_key)
    return jax.jit(jax.vmap(one, in_axes=(0, 0, None, None)))


# one jitted function per (model, guide, fn): jit then compiles once per chunk size
_cached_chunk = functools.lru_cache(maxsize=32)(_build_chunk)


def _chunk_fn(target, guide, fn: Callable, with_key: bool) -> Callable:
    try:
        hash(fn)
    except TypeError:  # e.g. an equinox module holding arrays: compiled anew on every call
        return _build_chunk(target, guide, fn, with_key)
    return _cached_chunk(target, guide, fn, with_key)


def _output_shapes(res: FitResult, fn: Callable, key: jax.Array, with_key: bool) -> Any:
    """Trace ``fn`` on one abstract draw; errors name ``fn`` and the latents it was given."""
    target, guide = res.target, res.guide
    z = jax.eval_shape(lambda k: draw_values(target, guide, k, res.params, res.mparams), key)
    given = ", ".join(f"{k}: {v.dtype}{list(v.shape)}" if hasattr(v, "shape") else
                      f"{k}: {v!r}" for k, v in z.items())
    call = "fn(key, z)" if with_key else "fn(z)"

    def checked(k, z):
        out = fn(k, z) if with_key else fn(z)
        leaves = jax.tree_util.tree_leaves(out)
        bad = sorted({type(x).__name__ for x in leaves if not _is_array_leaf(x)})
        if not leaves or bad:
            raise _BadOutput(f"returned {type(out).__name__}" + (
                f" with leaves of type {', '.join(bad)}" if bad else " with no array leaves"))
        return out

    try:
        return jax.eval_shape(checked, key, z)
    except _BadOutput as err:
        raise TypeError(f"predictive: {call} with fn={_describe(fn)} must return a pytree of "
                        f"arrays, but it {err} (z had {{{given}}})") from None
    except Exception as err:
        raise ValueError(f"predictive: {call} with fn={_describe(fn)} failed on one posterior "
                         f"draw z = {{{given}}} (one draw: no leading sample axis): "
                         f"{type(err).__name__}: {err}") from err


def predictive(res: FitResult, fn: Callable, key: jax.Array, n: int, *,
               batch_size: int | None = None, with_key: bool = False,
               mesh: Any = None) -> Any:
    """Map ``n`` posterior draws ``z_s ~ q`` through ``fn``, ``batch_size`` draws at a time.

    Computes ``[fn(z_1), ..., fn(z_n)]`` stacked along a new leading axis: derived quantities
    (``theta = mu + tau * theta_tilde``), predictions at new inputs, or, with ``with_key=True``,
    replicated data ``y_rep ~ p(y | z_s)`` (the posterior predictive distribution
    ``p(y_rep | y) ~= (1/n) sum_s p(y_rep | z_s)`` under q). ``fn`` is written for one draw and
    vectorised with ``jax.vmap``; data it needs can be closed over.

    The draws are exactly those of ``res.sample(key, n)`` (the same keys, ``split(key, n)``),
    whatever ``batch_size``: ``predictive(res, lambda z: z, key, n)`` equals
    ``res.sample(key, n)``. The draws are processed in chunks of ``batch_size`` so that the
    intermediates of ``fn`` take memory for one chunk only; the last chunk is padded to the
    chunk size, so one compilation serves every chunk, and it is cached per ``(res.model,
    res.guide, fn)``: calling again with the same ``fn`` object (not a fresh ``lambda``) and
    chunk size compiles nothing. An unhashable ``fn`` (e.g. a module holding arrays) is
    compiled anew on every call.

    Args:
        res: a fitted :class:`vijax.FitResult`.
        fn: ``z -> pytree of arrays`` for one draw, where ``z`` is the dict of constrained
            latent values of the declared shapes (discrete latents int32), the fitted model
            parameters (:class:`vijax.Param`) and, for each Bayesian layer
            (:mod:`vijax.nn`), a layer with one weight draw from its posterior (the same
            weights for every input row: ``z["l1"](x_new)``). With
            ``with_key=True``: ``(key, z) -> pytree``, with an independent key per draw.
        key: a JAX PRNG key.
        n: number of draws (>= 1).
        batch_size: draws per compiled call (>= 1); default ``min(n, 1000)``, lowered so that
            one chunk's output stays under 256 MiB.
        with_key: call ``fn(key, z)`` with a fresh key per draw (for simulating data). These
            keys come from a stream separate from the draws' keys.
        mesh: split each chunk's draws over the devices of a ``jax.sharding.Mesh`` (its
            ``"data"`` axis or its only axis) or a :class:`vijax.Placement`: every device maps
            ``batch_size / devices`` draws (the chunk is rounded up to a multiple of the
            devices); the same draws and outputs as on one device, gathered at the end.

    Returns:
        ``fn``'s output pytree with every leaf of shape ``(n, *leaf_shape)``.

    Raises:
        ValueError: invalid ``n`` or ``batch_size``, or ``fn`` failed on a draw (the message
            names ``fn`` and the shapes of the latents it was given).
        TypeError: invalid ``res``, ``fn`` or ``key``, or ``fn`` returned non-arrays.

    Example:
        >>> import jax, numpyro.distributions as dist, vijax as vj
        >>> @vj.model(mu=vj.Latent())
        ... def m(z, y):
        ...     lp = dist.Normal(0, 10).log_prob(z["mu"])
        ...     return lp + dist.Normal(z["mu"], 1).log_prob(y).sum()
        >>> res = vj.fit(m, jax.numpy.ones(5), guide="meanfield", steps=100,
        ...              convergence=None, progress=False, psis_draws=0)
        >>> x_new = jax.numpy.arange(3.0)
        >>> out = vj.predictive(res, lambda z: {"mean": z["mu"] + x_new}, jax.random.key(1), 10)
        >>> out["mean"].shape
        (10, 3)
        >>> y_rep = vj.predictive(res, lambda k, z: z["mu"] + jax.random.normal(k, (5,)),
        ...                       jax.random.key(2), 10, batch_size=4, with_key=True)
        >>> y_rep.shape
        (10, 5)
    """
    if not isinstance(res, FitResult):
        raise TypeError(f"res must be a vj.FitResult (from vj.fit or vj.load), got {type(res)}")
    if not callable(fn):
        raise TypeError(f"fn must be a function of one draw's latents, got {fn!r}")
    _check_key(key)
    n = _check_count("n", n)
    if batch_size is not None:
        batch_size = _check_count("batch_size", batch_size)
    if not isinstance(with_key, bool):
        raise TypeError(f"with_key must be True or False, got {with_key!r}")
    placement = resolve_placement(mesh)

    out_shapes = _output_shapes(res, fn, key, with_key)
    if batch_size is None:
        per_draw = sum(math.prod(s.shape) * s.dtype.itemsize
                       for s in jax.tree_util.tree_leaves(out_shapes))
        batch_size = max(1, min(DEFAULT_BATCH_SIZE, _CHUNK_BYTES // max(per_draw, 1)))
    chunk = padded_rows(min(batch_size, n), placement)

    keys = jax.random.split(key, n)  # as in FitResult.sample
    fn_keys = jax.random.split(jax.random.fold_in(key, _FN_STREAM), n) if with_key else keys
    run = _chunk_fn(res.target, res.guide, fn, with_key)
    params, mparams = res.params, res.mparams
    if placement is not None:
        params, mparams = place_replicated((params, mparams), placement)

    def call(k, fk):
        if placement is None:
            return run(k, fk, params, mparams)
        k, fk = place_tree((k, fk), (placement.rows, placement.rows))
        return to_host(run(k, fk, params, mparams))  # each device mapped its share

    outs = []
    for start in range(0, n, chunk):
        stop = min(chunk, n - start)
        if stop == chunk:
            out = call(keys[start:start + chunk], fn_keys[start:start + chunk])
        else:  # the last chunk repeats the final key up to the chunk size: one compiled shape
            idx = np.minimum(np.arange(start, start + chunk), n - 1)
            out = call(keys[idx], fn_keys[idx])
            out = jax.tree_util.tree_map(lambda x, stop=stop: x[:stop], out)
        outs.append(out)
    if len(outs) == 1:
        return outs[0]
    return jax.tree_util.tree_map(lambda *xs: jnp.concatenate(xs, axis=0), *outs)
