"""``vj.fit``: validate everything, then compose target -> guide -> objective -> loop -> result."""

from __future__ import annotations

import dataclasses
import functools
import math
import sys
import time
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vijax.convergence import (
    Convergence,
    ConvergenceWarning,
    ConvState,
    block_params,
    describe_stop,
    resolve_convergence,
)
from vijax.estimators import resolve_estimator
from vijax.guides.ladder import Ladder
from vijax.guides.laplace import Laplace
from vijax.guides.lowrank import LowRank
from vijax.guides.resolve import build_guide, resolve_spec
from vijax.guides.whitened import Whitened, guide_moments, whitening
from vijax.loop import FitState, init_state, make_chunk_runner, stopped
from vijax.model import Model, check_influence
from vijax.objective import make_objective
from vijax.optim import default_optimizer
from vijax.precondition import preconditionable, resolve_precondition
from vijax.psis import MIN_DRAWS, psis
from vijax.result import Diagnostics, FitResult, _weighted_sampler

__all__ = ["fit", "prepare_data", "check_data", "NonFiniteError"]

MAX_INIT_TRIES = 100
DEFAULT_CHUNK = 500
DEFAULT_STEPS = 10_000
"""The default step limit: a maximum; the stopping rule ends most fits far earlier."""


# ---------------------------------------------------------------------------------------------
# validation helpers
INT32_MAX = 2**31 - 1
"""Largest count ``fit`` takes: step counters and limits are int32 inside the compiled loop."""


def _check_int(name: str, value: Any, minimum: int = 1, maximum: int = INT32_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    if value > maximum:
        raise ValueError(f"{name} must be an int <= {maximum} (counts are int32 in the "
                         f"compiled loop), got {value!r}")
    return int(value)


def _check_loop_options(model, steps, chunk_size, max_consecutive, psis_draws, average,
                        progress) -> tuple[int, int, int, int]:
    """The options ``fit`` and ``fit_many`` share: checked, as ints where they are counts."""
    if not isinstance(model, Model):
        raise TypeError(f"model must be a vj.Model (use @vj.model, vj.Model or vj.from_numpyro), "
                        f"got {type(model)}")
    steps = _check_int("steps", steps)
    chunk_size = _check_int("chunk_size", chunk_size)
    max_consecutive = _check_int("max_consecutive_nonfinite", max_consecutive)
    psis_draws = _check_int("psis_draws", psis_draws, minimum=0)
    if 0 < psis_draws < MIN_DRAWS:
        raise ValueError(f"psis_draws must be 0 (off) or >= {MIN_DRAWS}, got {psis_draws}")
    if not isinstance(average, int | float) or not 0.0 <= average < 1.0:
        raise ValueError(f"average must be a fraction in [0, 1), got {average!r}")
    if progress is not None and not isinstance(progress, bool):
        raise TypeError(f"progress must be True, False or None, got {progress!r}")
    return steps, chunk_size, max_consecutive, psis_draws


def _seed_key(seed: int) -> jax.Array:
    """``jax.random.key(seed)`` for ``0 <= seed < 2**64``, the 64 bits kept even when 64-bit
    JAX is off (which would cut the seed to 32 bits: 2**32 and 0 would give the same key)."""
    if not 0 <= seed < 2**64:
        raise ValueError(f"an int seed must be in [0, 2**64), got {seed}; pass a smaller "
                         "non-negative int, or a key from jax.random.key")
    if seed < 2**32:
        return jax.random.key(seed)
    impl = jax.random.key_impl(jax.random.key(0))
    if str(impl) == "threefry2x32":  # its key data is [high 32 bits, low 32 bits]
        return jax.random.wrap_key_data(np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32),
                                        impl=impl)
    if jax.config.jax_enable_x64 and seed < 2**63:
        return jax.random.key(seed)
    raise ValueError(f"seed {seed} needs more than 32 bits, which the PRNG {impl} takes only "
                     "below 2**63 with 64-bit JAX; pass a seed below 2**32")


def _check_key(key: Any) -> jax.Array:
    if key is None:
        return jax.random.key(0)
    if isinstance(key, int | np.integer) and not isinstance(key, bool):
        return _seed_key(int(key))
    if isinstance(key, jax.Array):
        typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
        shape = key.shape if typed else key.shape[:-1]  # raw uint32 keys: (..., 2)
        if typed or (key.dtype == jnp.uint32 and key.ndim >= 1 and key.shape[-1] == 2):
            if shape == ():
                return key
            raise ValueError(f"key must be one PRNG key, got an array of {math.prod(shape)} "
                             f"keys (shape {shape}), e.g. from jax.random.split(key, n): pass "
                             "one of them (keys[0]), or use vj.fit_many for one fit per key")
    raise TypeError(f"key must be a JAX PRNG key (jax.random.key(seed)) or an int seed, "
                    f"got {key!r}")


def _resolve_dtype(dtype: Any) -> np.dtype:
    default = jnp.result_type(float)
    if dtype is None:
        return np.dtype(default)
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    if dtype == np.float64 and np.dtype(default) != np.float64:
        raise ValueError("dtype=float64 needs 64-bit JAX: call "
                         "jax.config.update('jax_enable_x64', True) first")
    return dtype


def prepare_data(data: Any, dtype=None) -> Any:
    """Validate a data pytree and move it to the device (see :func:`check_data`).

    Example:
        >>> import numpy as np
        >>> prepare_data({"y": np.array([1.0, 2.0])})["y"].shape
        (2,)
    """
    return jax.tree_util.tree_map(jnp.asarray, check_data(data, dtype))


def check_data(data: Any, dtype=None) -> Any:
    """Validate a data pytree on the host, without compiling anything.

    Floating leaves are cast to ``dtype`` (the fit's float type) so that no weak or mixed types
    cause recompiles; integer and boolean leaves keep their type. Raises naming the data key
    when a leaf is not numeric, holds NaN/inf, is a Python list of numbers (JAX would pass it
    on as a list of scalars, not an array) or holds values its type on the device cannot:
    floats beyond the range of ``dtype`` (they would become inf), 64-bit integers beyond 32
    bits when 64-bit JAX is off (they would wrap around).

    Returns the pytree with numpy leaves (device arrays are kept as they are).

    Example:
        >>> check_data({"y": np.array([1.0, 2.0])})["y"].dtype
        dtype('float32')
        >>> check_data({"y": [1.0, 2.0]})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        TypeError: data['y'] is a Python list; ...
    """
    dtype = _resolve_dtype(dtype)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(data, is_leaf=_is_number_list)
    out = []
    for path, leaf in leaves:
        where = "data" + jax.tree_util.keystr(path)
        if isinstance(leaf, list):
            _refuse_list(where, leaf)
        if isinstance(leaf, jax.Array):
            arr = leaf
        else:
            try:
                arr = np.asarray(leaf)
            except Exception as e:
                raise TypeError(f"{where} is not an array: {e}") from None
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"{where} must be numeric (float, int or bool), got dtype "
                            f"{arr.dtype}")
        if arr.dtype.kind in "iu":
            _check_int_range(where, arr)
        if arr.dtype.kind == "f":
            _check_where(where, ~np.asarray(jnp.isfinite(arr) if isinstance(arr, jax.Array)
                                            else np.isfinite(arr)), arr,
                         "contains a non-finite value", "NaN and inf are not allowed in data")
            if arr.dtype.itemsize > np.dtype(dtype).itemsize:
                big = np.finfo(dtype).max
                _check_where(where, np.asarray(jnp.abs(arr) > big if isinstance(arr, jax.Array)
                                               else np.abs(arr) > big), arr,
                             f"holds a value beyond the {dtype} range (|x| > {big:.4g})",
                             f"it would become inf in {dtype}: rescale the data, or fit in "
                             "float64 (jax_enable_x64 and dtype=np.float64)")
            arr = arr.astype(dtype) if arr.dtype != dtype else arr
        out.append(arr)
    return jax.tree_util.tree_unflatten(treedef, out)


def _check_where(where: str, bad: np.ndarray, arr, what: str, advice: str) -> None:
    """Raise naming the first index where ``bad`` holds (and the value there)."""
    if bad.any():
        idx = tuple(int(i) for i in np.argwhere(bad)[0])
        value = np.asarray(arr)[idx]
        raise ValueError(f"{where} {what} ({value}) at index {idx}; {advice}")


def _check_int_range(where: str, arr) -> None:
    """64-bit integers become 32-bit ones on the device when 64-bit JAX is off, and those
    that do not fit wrap around silently: refuse them."""
    if arr.dtype.itemsize <= 4 or jax.config.jax_enable_x64 or isinstance(arr, jax.Array):
        return
    info = np.iinfo(np.int32 if arr.dtype.kind == "i" else np.uint32)
    _check_where(where, (arr < info.min) | (arr > info.max), arr,
                 f"holds {arr.dtype} values beyond the {info.dtype} range", "64-bit JAX is off, "
                 "so they would wrap around: enable jax_enable_x64, or pass them as floats")


def _is_number_list(x: Any) -> bool:
    """A Python list (nested or ragged) of numbers: meant as an array, not a container."""
    return isinstance(x, list) and all(
        isinstance(v, bool | int | float | complex | np.generic) or _is_number_list(v)
        for v in x)


def _refuse_list(where: str, leaf: list) -> None:
    try:
        np.asarray(leaf)
    except ValueError:
        raise TypeError(f"{where} is a ragged Python list (rows of different lengths), which "
                        "is not an array: pad it to a rectangular array, or split it into "
                        "arrays") from None
    raise TypeError(f"{where} is a Python list; JAX would pass it to the model as a list of "
                    "separate scalars, not as an array: pass an array (np.asarray(...))")


def _check_log_joint(model: Model, target, data, dtype) -> None:
    """Trace the model's density once on abstract values: it must return a float scalar.

    Remembered per (model, data shapes and dtypes): a repeat fit does not re-trace it."""
    leaves, treedef = jax.tree_util.tree_flatten(data)
    key = (model, target, treedef, np.dtype(dtype).name,
           tuple((tuple(np.shape(x)), str(x.dtype if hasattr(x, "dtype") else
                                          np.asarray(x).dtype)) for x in leaves))
    if key in _CHECKED:
        return
    _trace_log_joint(model, target, data, dtype)
    check_influence(model, data, dtype)  # warns once per model and data shapes
    if len(_CHECKED) > 1024:
        _CHECKED.clear()
    _CHECKED.add(key)


_CHECKED: set = set()  # (model, target, data structure, shapes, dtypes) already traced


def _trace_log_joint(model: Model, target, data, dtype) -> None:
    theta = jax.ShapeDtypeStruct((target.full_dim,), dtype)
    shapes = {b.name: b.shape for b in target.blocks + target.discrete}
    if model.factorised:
        prior = _trace(lambda: jax.eval_shape(
            lambda t: model.log_prior(target.constrain(t)), theta), "log_prior", shapes)
        _check_float(prior, "log_prior")
        if prior.shape != ():
            raise ValueError(f"log_prior must return a scalar, got shape {prior.shape}")
        lik = _trace(lambda: jax.eval_shape(
            lambda t, d: model.log_likelihood(target.constrain(t), d), theta, data),
            "log_likelihood", shapes)
        _check_float(lik, "log_likelihood")
        if len(lik.shape) != 1:
            raise ValueError("log_likelihood must return one value per observation, shape "
                             f"(N,); got shape {lik.shape}")
        return
    out = _trace(lambda: jax.eval_shape(lambda t, d: model.log_joint(target.constrain(t), d),
                                        theta, data), "log_joint", shapes)
    if not hasattr(out, "shape"):
        raise TypeError(f"log_joint must return a scalar array, got {type(out)}")
    _check_float(out, "log_joint")
    if out.shape != ():
        raise ValueError(f"log_joint must return a scalar, got shape {out.shape} (sum the "
                         "per-observation terms, or use the factorised form)")


_TRACER_ERRORS = (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
                  jax.errors.TracerIntegerConversionError, jax.errors.UnexpectedTracerError,
                  jax.errors.NonConcreteBooleanIndexError)


def _trace(fn, fname: str, shapes: dict):
    """Run ``fn`` (which traces the model); an error is re-raised as it is (its type and
    arguments are JAX's or the model's: not every exception can be rebuilt from a message),
    with a note naming the function and the latent shapes."""
    try:
        return fn()
    except Exception as e:
        note = f"vijax: the model's {fname} failed when traced with latents of shapes {shapes}"
        if isinstance(e, _TRACER_ERRORS):
            note += (". The model must be traceable by JAX: latent values are abstract "
                     "tracers, so no Python control flow (if/while/and/or), float()/int()/"
                     "bool() or NumPy (np.*) calls on them; use jnp.* functions, and "
                     "jnp.where or jax.lax.cond for branches")
        e.add_note(note)
        raise


def _check_float(out, fname: str) -> None:
    if not hasattr(out, "dtype") or not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"{fname} must return a floating-point value, got "
                        f"{getattr(out, 'dtype', type(out))}")


# ---------------------------------------------------------------------------------------------
# compiled pieces, cached on hashable configuration (one program per configuration)
@functools.lru_cache(maxsize=128)
def _pipeline(target, spec, num_particles: int, optimizer, chunk_len: int,
              estimator="auto", rule: Convergence | None = None):
    guide = build_guide(spec, target)
    objective = make_objective(target, guide, estimator, num_particles)
    runner = make_chunk_runner(objective, optimizer, chunk_len, rule)
    find = _init_finder(target, guide.no_jacobian)

    @jax.jit  # everything before the first step is one compiled program
    def start(key, data, fixed, mask):
        k_init, k_guide, k_loop = jax.random.split(key, 3)
        tries, theta, ok = find(k_init, data, fixed, mask)
        state = init_state(guide.init(k_guide, theta), optimizer,
                           objective.init_state(theta.dtype), rule)
        return tries, theta, ok, state, k_loop

    restart = jax.jit(lambda params: init_state(  # warm starts
        params, optimizer, objective.init_state(jax.tree_util.tree_leaves(params)[0].dtype),
        rule))
    return guide, objective, runner, start, restart


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


def default_psis_draws(dim: int) -> int:
    """Draws of q for the PSIS check: ``200 * dim`` between 2,000 and 10,000 (1,000 draws
    called a 5x-too-narrow funnel's q "good": the tail that k-hat reads needs more draws as
    the dimension grows)."""
    return int(min(10_000, max(2_000, 200 * int(dim))))


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


def _check_finite_params(target, guide, state, steps: int) -> None:
    """Fail loudly, naming the latents, if the fitted parameters are not finite."""
    for label, params in (("last iterate", state.params), ("averaged iterate",
                                                           state.avg_params)):
        if all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(params)):
            continue
        bad = ["(see params)"]
        if guide.mean is not None:
            loc = np.asarray(guide.mean(params))
            bad = [b.name for b in target.blocks
                   if not np.all(np.isfinite(loc[b.offset:b.offset + b.size]))] or ["(scales)"]
        raise FloatingPointError(
            f"the {label} of the guide parameters is not finite after {steps} steps (latents "
            f"{bad}) although the gradients were finite: the optimizer produced non-finite "
            "updates (check its step size)")


def _final_loss(losses: np.ndarray) -> float:
    """Mean of the finite losses among the last 10% of steps (NaN if there are none)."""
    tail = losses[-max(1, losses.size // 10):]
    tail = tail[np.isfinite(tail)]
    return float(tail.mean()) if tail.size else float("nan")


class NonFiniteError(FloatingPointError):
    """Too many consecutive steps had a non-finite loss, gradient or update.

    Attributes:
        step: the last (skipped) step, 0-based.
        latents: names of the latents whose draws, constrained values or log-density
            gradients were not finite at that step (may be empty: see the message).
        result: a :class:`vijax.FitResult` holding the last finite state (parameters,
            optimizer state, losses so far): nothing is lost, it can be inspected or resumed.
    """

    def __init__(self, message: str, step: int, latents: list[str], result: FitResult):
        super().__init__(message)
        self.step = step
        self.latents = latents
        self.result = result


def _nonfinite_error(target, guide, objective, optimizer, state: FitState, data, k_loop,
                     limit: int, last: FitResult, num_particles: int) -> NonFiniteError:
    """Re-run the last skipped step from the last finite state and say what went wrong."""
    step = int(state.step) - 1
    key = jax.random.fold_in(k_loop, step)

    @jax.jit
    def probe(params, est_state):
        (loss, _), grads = jax.value_and_grad(objective.loss, argnums=1, has_aux=True)(
            key, params, data, est_state)
        updates, _ = optimizer.update(grads, state.opt_state, params)
        new = optax.apply_updates(params, updates)
        # the step's own draws (the objective draws (K, noise_dim) normals from this key)
        eps = jax.random.normal(key, (num_particles, guide.noise_dim),
                                jax.tree_util.tree_leaves(params)[0].dtype)

        def one(e):
            theta, _ = guide.transform(params, e)
            lp, g = jax.value_and_grad(target.log_density)(theta, data, guide.no_jacobian)
            return theta, target.constrain(theta), lp, g

        return (loss, grads, new, *jax.vmap(one)(eps))

    loss, grads, new, theta, z, lp, g = probe(state.params, state.est_state)
    theta, g, lp = np.asarray(theta), np.asarray(g), np.asarray(lp)

    def finite(tree) -> bool:
        return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(tree))

    bad = [b.name for b in target.blocks
           if not (np.all(np.isfinite(theta[:, b.offset:b.offset + b.size]))
                   and np.all(np.isfinite(np.asarray(z[b.name])))
                   and np.all(np.isfinite(g[:, b.offset:b.offset + b.size])))]
    if not np.isfinite(float(loss)) or not finite(grads):
        what = (f"the loss was {float(loss)}" if not np.isfinite(float(loss)) else
                "the gradient was not finite")
        if bad:
            where = f"; non-finite values or log-density gradients at latent(s) {bad}"
        elif not np.all(np.isfinite(lp)):
            i = int(np.argmin(np.isfinite(lp)))
            bad = _implicated(target, guide, state.params, theta[i], data, last.init_point)
            where = (f"; the log density was {lp[i]} at {target.describe(theta[i])}" + (
                f", finite again when latent(s) {bad} alone go back to the guide's centre or "
                "the initial point"
                if bad else ""))
        else:
            where = "; the draws and the log density were finite: check the guide's parameters"
    elif not finite(new):
        if guide.mean is not None:
            loc = np.asarray(guide.mean(new))
            bad = [b.name for b in target.blocks
                   if not np.all(np.isfinite(loc[b.offset:b.offset + b.size]))]
        what = "the optimizer produced non-finite parameters" + (
            f" for latents {bad}" if bad else "")
        where = " from finite gradients (check its step size)"
    else:
        what, where = "the step was not finite", ""
    head = (f"{limit} consecutive steps were not finite" if limit else
            f"every one of the {step + 1} steps was not finite and nothing was fitted")
    msg = (f"{head} (last at step {step}): {what}{where}. "
           "The error's .result holds the last finite state (vj.fit(..., resume=err.result) "
           "continues from it)")
    return NonFiniteError(msg, step, bad, last)


def _implicated(target, guide, params, theta, data, init_point) -> list[str]:
    """Latents whose block alone, moved back to the guide's centre or else to the initial
    point, makes the log density finite again at ``theta`` (the culprits of a non-finite log
    density)."""
    refs = [np.asarray(init_point)]
    if guide.mean is not None:
        refs.insert(0, np.asarray(guide.mean(params)))
    log_density = jax.jit(target.log_density)
    out = []
    for b in target.blocks:
        for ref in refs:
            moved = np.array(theta)
            moved[b.offset:b.offset + b.size] = ref[b.offset:b.offset + b.size]
            if np.isfinite(float(log_density(jnp.asarray(moved), data))):
                out.append(b.name)
                break
    return out


def _skipped_before(res: FitResult | None) -> int:
    return 0 if res is None else int(res.state.n_nonfinite)


def _resumable_state(res: FitResult, rule) -> FitState:
    """The result's loop state with its stop flags cleared (and the rule's state fitted)."""
    state = res.state
    if rule is None:
        conv = ()
    elif isinstance(state.conv, ConvState):
        conv = state.conv._replace(converged=jnp.array(False), streak=jnp.int32(0))
    else:
        conv = init_state(state.params, optax.identity(), (), rule).conv
    return state._replace(failed=jnp.array(False), n_consecutive=jnp.int32(0), conv=conv)


class _NoBar:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, done, losses):
        pass


class _Bar(_NoBar):
    """tqdm bar updated once per chunk: steps, mean loss of the chunk, steps/s."""

    def __init__(self, steps: int, name: str):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=steps, unit="step", leave=False, dynamic_ncols=True)
        self._name = name
        self._done = 0

    def __exit__(self, *exc):
        self._bar.close()
        return False

    def update(self, done, losses):
        x = np.asarray(losses)
        x = x[np.isfinite(x)]
        if x.size:
            self._bar.set_postfix({self._name: f"{x.mean():.4g}"}, refresh=False)
        self._bar.update(done - self._done)
        self._done = done


def _progress_bar(progress: bool | None, steps: int, name: str):
    if progress is None:
        progress = sys.stderr.isatty()
    return _Bar(steps, name) if progress else _NoBar()


def _psis_check(target, guide, params, key, n: int, data):
    """``(k_hat, ess, reading, n)`` of PSIS on ``n`` draws of q, or ``None`` when off.

    Where k-hat reads "good" or "usable", the PSIS-corrected means and sds of every
    unconstrained coordinate are compared with q's own (:func:`_psis_shift`): k-hat alone
    called a q with 0.2-0.7 of a funnel's or banana's true sd "usable" (its tail estimate
    misses mass that q never visits), while the correction it implies is large there and
    within Monte Carlo noise of zero for a q that fits. A correction beyond 0.3 sd in a mean
    or 33% in an sd makes the reading "unreliable", beyond 0.1 sd or 10% "usable" (the
    accuracy bands of the benchmarks; both past three standard errors of the correction)."""
    if n == 0:
        return None
    if guide.point_mass:
        return float("nan"), float("nan"), "not applicable (point mass)", 0
    theta, lw = _weighted_sampler(target, guide, n, False)(jax.random.fold_in(key, 0x5151),
                                                            params, data)
    lw = np.asarray(lw, np.float64)
    if not np.any(np.isfinite(lw)):
        return float("inf"), 1.0, "unreliable (no draw has a finite log density)", n
    finite = lw[np.isfinite(lw)]
    if finite.size == lw.size and np.ptp(finite) < 1e-2:
        # weights equal to within 1% (float32 rounding of a large log density makes them
        # unequal in the last digits, and the tail fit then reads k = inf): q is exact
        return float("-inf"), float(n), "good (the importance weights are constant: q is " \
            "exact up to 1%)", n
    res = psis(np.where(np.isfinite(lw), lw, -np.inf))
    reading = res.reading
    if np.isfinite(res.k_hat) and res.k_hat < 0.7 or res.k_hat == -np.inf:
        mean_shift, sd_ratio, se = _psis_shift(np.asarray(theta, np.float64),
                                               res.log_weights)
        log_ratio = abs(np.log(sd_ratio))
        figures = (f"k-hat {res.k_hat:.2f}, but the PSIS-corrected moments differ from q's "
                   f"by {mean_shift:.2f} sd in a mean and a factor {sd_ratio:.2f} in an sd")
        if mean_shift > max(0.3, 3 * se) or log_ratio > max(np.log(1.33), 3 * se):
            reading = f"unreliable ({figures})"
        elif mean_shift > max(0.1, 3 * se) or log_ratio > max(np.log(1.1), 3 * se):
            reading = f"usable ({figures})"
    return float(res.k_hat), float(res.ess), reading, n


def _psis_shift(theta: np.ndarray, log_w: np.ndarray) -> tuple[float, float, float]:
    """Largest PSIS correction of q's moments over the coordinates of ``theta (n, dim)``:
    ``(max |mean_w - mean_q| / sd_q, sd_w / sd_q farthest from 1, standard error)``; the
    standard error of both is about ``1 / sqrt(ess)`` (in sd units / on the log scale)."""
    w = np.exp(log_w - np.max(log_w))
    w = w / w.sum()
    mean_q, sd_q = theta.mean(0), theta.std(0)
    keep = sd_q > 0
    if not np.any(keep):
        return 0.0, 1.0, 0.0
    theta, mean_q, sd_q = theta[:, keep], mean_q[keep], sd_q[keep]
    mean_w = w @ theta
    sd_w = np.sqrt(np.maximum(w @ (theta - mean_w) ** 2, 0.0))
    shift = np.abs(mean_w - mean_q) / sd_q
    log_ratio = np.log(np.maximum(sd_w, 1e-300) / sd_q)
    worst = int(np.argmax(np.abs(log_ratio)))
    ess = 1.0 / float(np.sum(w**2))
    return float(shift.max()), float(np.exp(log_ratio[worst])), 1.0 / np.sqrt(ess)


# ---------------------------------------------------------------------------------------------
def fit(model: Model, data: Any = None, *, guide: Any = None, steps: int = DEFAULT_STEPS,
        optimizer: optax.GradientTransformation | None = None, key: Any = None,
        num_particles: int | None = None, init: Mapping[str, Any] | None = None,
        average: float = 0.5, chunk_size: int = DEFAULT_CHUNK, dtype: Any = None,
        init_from: FitResult | None = None, estimator: Any = None,
        convergence: Any = "auto", max_consecutive_nonfinite: int = 100,
        progress: bool | None = None, resume: FitResult | None = None,
        psis_draws: int | None = None, precondition: Any = "auto") -> FitResult:
    """Fit a variational approximation q to the posterior of ``model`` given ``data``.

    Maximises the ELBO ``E_q[log p(x, z)] - E_q[log q(z)]`` (or the estimator's bound) over
    the guide's parameters in the unconstrained space of the latents, with Monte Carlo
    gradients and any Optax optimizer, ``chunk_size`` steps per compiled ``lax.scan`` call,
    until the stopping rule says the iterate average has stopped moving in units of the
    posterior's scale (:mod:`vijax.convergence`) or ``steps`` steps have run. By default
    (``precondition="auto"``) the family is fitted in coordinates whitened by the curvature
    of the log density at its Newton-polished mode (:mod:`vijax.precondition`). The returned
    parameters are an average of late iterates (Dhaka et al. 2020): over the last two blocks
    of the stopping rule when it stopped the fit, else over the last ``average`` fraction of
    steps. Every fit ends with a PSIS check of q against the model
    (``res.diagnostics.k_hat``, ``k_hat_reading``), and warns
    (:class:`vijax.ConvergenceWarning`) when it did not converge or PSIS reads q as
    unreliable.

    Args:
        model: a :class:`vijax.Model` (``vj.model`` decorator, ``vj.Model``, ``vj.from_numpyro``).
        data: data pytree passed to the model; ``None`` uses the data bound to the model.
        guide: ``"auto"`` (default), ``"delta"``, ``"meanfield"``, ``"lowrank"``,
            ``"fullrank"``,
            ``"iaf"``, ``"spline"``, ``"realnvp"``, ``"laplace"`` (MAP, then the Gaussian
            with the inverse Hessian at the mode: :mod:`vijax.guides.laplace`), ``"auto"``
            (the ladder delta -> laplace -> meanfield -> lowrank -> fullrank -> iaf, stopping
            at the first rung with PSIS k-hat < 0.7: :mod:`vijax.guides.ladder`), a
            configured object
            (``vj.guides.LowRank(rank=5)``), or a dict from latent name (or tuple of names)
            to either, for a structured guide of independent blocks.
        steps: the maximum number of optimisation steps (>= 1, default 10,000); exactly
            this many with ``convergence=None``.
        optimizer: an Optax ``GradientTransformation``; default :func:`default_optimizer` with
            the guide's ``default_learning_rate`` (0.05 Gaussian families, 0.01 IAF, 0.003
            coupling flows).
        key: a JAX PRNG key (or int seed); ``None`` means ``jax.random.key(0)``.
        num_particles: Monte Carlo draws per gradient estimate (>= 1), vectorised; ``None``:
            1, or 8 for models with discrete latents (so that their score-function gradient
            gets a leave-one-out baseline).
        init: optional dict of *constrained* initial values for some or all latents; the rest
            start uniform in (-2, 2) in unconstrained space, redrawn until the log joint is finite.
        average: fraction of final steps whose iterates are averaged when the fit runs to
            ``steps``, in [0, 1); 0 returns the last iterate.
        chunk_size: steps per compiled call (>= 1); the host looks at the loop (stopping,
            progress) once per chunk.
        dtype: float32 or float64 (needs ``jax_enable_x64``); default JAX's default float.
        init_from: a fitted result of the same model to warm-start from: the same guide
            continues from its parameters; a flow whose base is the fitted family starts as
            exactly that fit (its layers start as the identity); any other guide is centred on
            the fitted guide's mean.
        estimator: the gradient estimator and bound (:mod:`vijax.estimators`): ``"auto"``
            (default: reparameterised ELBO; score function with a baseline for discrete
            latents), ``"reparam"``, ``"stl"``, ``"iwae"``, ``"dreg"``, ``"renyi"``,
            ``"score"`` or a configured object (``vj.estimators.Renyi(alpha=0.5)``). The
            choice is recorded in ``res.diagnostics.estimator``, the bound in
            ``res.diagnostics.objective``.
        convergence: ``"auto"`` (``vj.Convergence()``), a configured ``vj.Convergence(...)``,
            or ``None`` to run exactly ``steps`` steps.
        max_consecutive_nonfinite: a step whose loss, gradient or updated parameters are not
            finite is skipped (parameters and optimizer state unchanged, counted); after this
            many consecutive skipped steps the fit raises :class:`NonFiniteError`, which names
            the step and the latents involved and carries the last finite result.
        progress: show a progress bar (step, loss, steps/s; updated once per chunk);
            ``None``: only when stderr is a terminal.
        resume: a result to continue: its guide, estimator, optimizer (and state), particles
            and PRNG stream are reused and ``steps`` more steps run; with ``convergence=None``,
            ``k`` then ``m`` resumed steps give bitwise the parameters and optimizer state of
            ``k + m`` uninterrupted steps (on CPU). ``guide``, ``estimator``, ``optimizer``,
            ``num_particles``, ``init``, ``init_from`` must be left unset.
        psis_draws: draws of q for the PSIS diagnostic at the end (0 turns it off);
            ``None``: ``200 * dim`` between 2,000 and 10,000.
        precondition: ``"auto"`` (default, ``vj.Precondition()``): fit the family in
            coordinates whitened by the curvature at the mode (the Laplace approximation, or
            a mean-field fit where the Laplace approximation does not describe the
            posterior), recorded in ``res.diagnostics.preconditioning``; ``None`` fits in
            the model's own coordinates. Not applied to structured dicts, discrete latents,
            more than ``max_dim`` dimensions, ``init_from`` or ``resume``.

    Returns:
        A :class:`vijax.FitResult`; ``res.losses`` has shape ``(n_steps,)`` (all steps run,
        including those of a resumed result): the value being minimised (negative ELBO, or
        the negative bound of the estimator).

    Raises:
        NonFiniteError: ``max_consecutive_nonfinite`` consecutive steps were not finite.

    Example:
        >>> import jax, numpyro.distributions as dist, vijax as vj
        >>> @vj.model(mu=vj.Latent())
        ... def m(z, y):
        ...     lp = dist.Normal(0, 10).log_prob(z["mu"])
        ...     return lp + dist.Normal(z["mu"], 1).log_prob(y).sum()
        >>> res = vj.fit(m, jax.numpy.ones(5), steps=300, convergence=None, progress=False)
        >>> res.losses.shape
        (300,)
    """
    if psis_draws is None and isinstance(model, Model):
        psis_draws = default_psis_draws(model.target.dim)
    steps, chunk_size, max_consecutive, psis_draws = _check_loop_options(
        model, steps, chunk_size, max_consecutive_nonfinite, psis_draws, average, progress)
    rule = resolve_convergence(convergence)
    target = model.target
    if resume is not None:
        given = [name for name, v in (("guide", guide), ("estimator", estimator),
                                      ("optimizer", optimizer), ("num_particles", num_particles),
                                      ("init", init), ("init_from", init_from))
                 if v is not None]
        if given:
            raise ValueError(f"resume continues the result's own fit: leave {given} unset")
        if not isinstance(resume, FitResult):
            raise TypeError(f"resume must be a vj.FitResult from vj.fit or vj.load, got "
                            f"{type(resume)}")
        if resume.state is None:
            raise ValueError(f"this result ({resume.guide.name}) has no loop state to "
                             "continue (a Laplace fit is not an optimisation run); refit it")
        _check_source(target, resume, jax.tree_util.tree_leaves(resume.params)[0].dtype,
                      what="resume")
        spec, estimator, optimizer = resume.guide_spec, resume.estimator, resume.optimizer
        num_particles = resume.diagnostics.num_particles
        dtype = jax.tree_util.tree_leaves(resume.params)[0].dtype
    else:
        spec = resolve_spec("auto" if guide is None else guide)
        precondition = resolve_precondition(precondition)
        kw = dict(steps=steps, optimizer=optimizer, key=key, num_particles=num_particles,
                  init=init, average=average, chunk_size=chunk_size, dtype=dtype,
                  init_from=init_from, estimator=estimator, convergence=convergence,
                  max_consecutive_nonfinite=max_consecutive_nonfinite, progress=progress,
                  psis_draws=psis_draws, precondition=precondition)
        if isinstance(spec, Laplace | Ladder) or (
                precondition is not None and init_from is None and preconditionable(
                    spec, target, precondition)):  # several fits: see vijax.stages
            from vijax.stages import fit_staged

            return fit_staged(spec, model, data, kw)
        estimator = resolve_estimator("auto" if estimator is None else estimator)
        if num_particles is None:
            num_particles = 8 if target.discrete else 1
        if optimizer is None:
            optimizer = default_optimizer(getattr(spec, "default_learning_rate", 0.05))
    num_particles = _check_int("num_particles", num_particles)
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(f"optimizer must be an optax.GradientTransformation, got {optimizer!r}")
    dtype = _resolve_dtype(dtype)
    data = check_data(model.data if data is None else data, dtype)
    chunk_len = min(chunk_size, steps)
    _check_log_joint(model, target, data, dtype)
    if rule is not None:
        rule = rule.sized(*_n_params(target, spec, dtype.name))
    guide_fns, objective, runner, start, restart = _pipeline(
        target, spec, num_particles, optimizer, chunk_len, estimator, rule)
    key = _check_key(key)
    data = jax.tree_util.tree_map(jnp.asarray, data)

    t0 = time.perf_counter()
    if resume is not None:
        state, k_loop, theta0 = _resumable_state(resume, rule), resume.loop_key, \
            resume.init_point
        previous = np.asarray(resume.losses)
    else:
        if init_from is not None:
            if init is not None:
                raise ValueError("give init or init_from, not both")
            _check_source(target, init_from, dtype)
            fixed = _source_loc(init_from).astype(dtype)
            fixed[target.dim:] = np.round(fixed[target.dim:])  # discrete: nearest index
            mask = np.ones((target.full_dim,), bool)
        else:
            fixed, mask = _fixed_init(target, init, dtype)
        tries, theta0, ok, state, k_loop = start(key, data, fixed, mask)
        _check_init_found(target, tries, theta0, ok, mask)
        if init_from is not None:
            warm = _warm_params(spec, state.params, init_from)
            if warm is not None:
                state = restart(warm)
        previous = np.zeros((0,), dtype)

    begin = int(state.step)
    total = jnp.asarray(begin + steps, jnp.int32)
    # the averaging window is a fraction of all steps (a resumed fit's included)
    avg_start = jnp.asarray(begin + steps - math.floor(average * (begin + steps)), jnp.int32)
    first_chunk_end = jnp.asarray(begin + chunk_len, jnp.int32)
    limit = jnp.asarray(max_consecutive, jnp.int32)
    chunks = []
    with _progress_bar(progress, steps, objective.name) as bar:
        for _ in range(math.ceil(steps / chunk_len)):
            state, losses = runner(state, data, k_loop, total, avg_start, first_chunk_end,
                                   limit)
            chunks.append(losses)
            done = int(state.step) - begin
            bar.update(done, losses)
            if bool(stopped(state)):
                break
    n_run = int(state.step) - begin
    losses = np.concatenate([previous] + [np.asarray(c) for c in chunks])[:begin + n_run]
    wall = time.perf_counter() - t0

    conv = state.conv if isinstance(state.conv, ConvState) else None
    converged = conv is not None and bool(conv.converged)
    # converged: the average of the last two blocks (at the optimum up to noise); else the
    # tail average over the last ``average`` fraction of all steps
    params = block_params(conv) if converged else state.avg_params
    if bool(state.failed) or int(state.n_nonfinite) - _skipped_before(resume) == n_run:
        last = _assemble(model, guide_fns, spec, params, state, losses, objective, optimizer,
                         theta0, k_loop, estimator, num_particles, wall, begin + steps,
                         "failed", None)
        raise _nonfinite_error(target, guide_fns, objective, optimizer, state, data, k_loop,
                               max_consecutive if bool(state.failed) else 0, last,
                               1 if guide_fns.point_mass else num_particles)
    _check_finite_params(target, guide_fns, state, n_run)
    check = _psis_check(target, guide_fns, params, key, psis_draws, data)
    res = _assemble(model, guide_fns, spec, params, state, losses, objective, optimizer,
                    theta0, k_loop, estimator, num_particles, wall, begin + steps,
                    "converged" if converged else "max_steps", check)
    warn_if_untrusted(res)
    return res


def warn_if_untrusted(res: FitResult, stacklevel: int = 3) -> None:
    """Warn (:class:`ConvergenceWarning`) when a fit with a stopping rule did not converge or
    its PSIS k-hat says q is unreliable: a result is never wrong without a word."""
    d = res.diagnostics
    problems = []
    if d.stop_reason == "max_steps" and d.criterion and not d.criterion.startswith("no "):
        problems.append(f"the fit ran its {d.n_steps} steps without converging "
                        f"({d.criterion}); pass more steps= or resume=res")
    if d.k_hat_reading.startswith("unreliable"):
        richer = ("no rung of the ladder did better" if d.rung else
                  "guide='auto' tries richer families")
        problems.append(f"PSIS says q is an unreliable approximation of this posterior "
                        f"({d.k_hat_reading}; res.psis_mean() / res.psis_resample() correct "
                        f"expectations and draws; {richer})")
    if d.n_nonfinite_skipped:
        problems.append(f"{d.n_nonfinite_skipped} steps were skipped for a non-finite loss "
                        "or gradient")
    if problems:
        warnings.warn(ConvergenceWarning(f"vj.fit ({d.rung or res.guide.name}): "
                                         + "; ".join(problems)), stacklevel=stacklevel)


@functools.lru_cache(maxsize=128)
def _n_params(target, spec, dtype_name: str) -> tuple[int, bool]:
    """Number of parameter elements of ``spec``'s guide for ``target`` and whether it is a
    point mass (they size the stopping rule)."""
    guide = build_guide(spec, target)
    shapes = jax.eval_shape(guide.init, jax.random.key(0),
                            jax.ShapeDtypeStruct((target.full_dim,), np.dtype(dtype_name)))
    n = int(sum(np.prod(x.shape) for x in jax.tree_util.tree_leaves(shapes)))
    return n, bool(guide.point_mass and not target.discrete)


def _assemble(model, guide_fns, spec, params, state, losses, objective, optimizer, theta0,
              k_loop, estimator, num_particles, wall, max_steps, reason, check) -> FitResult:
    k_hat, ess, reading, draws = (float("nan"), float("nan"), "not computed", 0) \
        if check is None else check
    diagnostics = Diagnostics(
        n_steps=int(state.step), n_nonfinite_skipped=int(state.n_nonfinite), wall_time=wall,
        objective=objective.name, num_particles=num_particles, final_loss=_final_loss(losses),
        estimator=objective.estimator, converged=reason == "converged", stop_reason=reason,
        max_steps=int(max_steps), k_hat=k_hat, ess=ess, k_hat_reading=reading,
        psis_draws=draws,
        criterion=describe_stop(state.conv, reason == "converged",
                                () if guide_fns.noise_dim else ("gradient",))
        if isinstance(state.conv, ConvState) else
        "no stopping rule (convergence=None): ran exactly the steps asked for")
    return FitResult(model=model, guide=guide_fns, guide_spec=spec, params=params,
                     last_params=state.params, opt_state=state.opt_state, losses=losses,
                     diagnostics=diagnostics, optimizer=optimizer, init_point=theta0,
                     state=state, loop_key=k_loop, estimator=estimator)
