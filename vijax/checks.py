"""Checks of what ``fit`` and ``fit_many`` are given, before anything compiles: the loop
options, the PRNG key, the float type, the data, and the model's density (traced once on
abstract values)."""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vijax.convergence import resolve_convergence
from vijax.model import Model, check_influence
from vijax.psis import MIN_DRAWS

__all__ = ["prepare_data", "check_data", "check_fit_options", "default_psis_draws"]

DEFAULT_CHUNK = 500
DEFAULT_STEPS = 10_000
"""The default step limit: a maximum; the stopping rule ends most fits far earlier."""


# ---------------------------------------------------------------------------------------------
# loop options
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


def default_psis_draws(dim: int) -> int:
    """Draws of q for the PSIS check: ``200 * dim`` between 2,000 and 10,000 (1,000 draws
    called a 5x-too-narrow funnel's q "good": the tail that k-hat reads needs more draws as
    the dimension grows)."""
    return int(min(10_000, max(2_000, 200 * int(dim))))


def check_fit_options(model, steps, chunk_size, max_consecutive_nonfinite, psis_draws, average,
                      progress, convergence) -> tuple[int, int, int, int, Any]:
    """``fit``'s loop options checked: ``(steps, chunk_size, max_consecutive, psis_draws,
    rule)``; ``psis_draws=None`` becomes :func:`default_psis_draws`, ``convergence`` the
    stopping rule (or ``None``)."""
    if psis_draws is None and isinstance(model, Model):
        psis_draws = default_psis_draws(model.target.dim)
    steps, chunk_size, max_consecutive, psis_draws = _check_loop_options(
        model, steps, chunk_size, max_consecutive_nonfinite, psis_draws, average, progress)
    return steps, chunk_size, max_consecutive, psis_draws, resolve_convergence(convergence)


# ---------------------------------------------------------------------------------------------
# key and float type
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


# ---------------------------------------------------------------------------------------------
# data
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


# ---------------------------------------------------------------------------------------------
# the model's density, traced on abstract values
def _check_log_joint(model: Model, target, data, dtype) -> None:
    """Trace the model's density once on abstract values: it must return a float scalar.

    Remembered per (model, data shapes and dtypes): a repeat fit does not re-trace it."""
    leaves, treedef = jax.tree_util.tree_flatten(data)
    # the model's functions, not the model: a model holds its bound data, which a cache
    # must not keep alive
    key = (model.log_joint, model.log_prior, model.log_likelihood, target, treedef,
           np.dtype(dtype).name,
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
            lambda t: model.log_prior(target.values(t)), theta), "log_prior", shapes)
        _check_float(prior, "log_prior")
        if prior.shape != ():
            raise ValueError(f"log_prior must return a scalar, got shape {prior.shape}")
        lik = _trace(lambda: jax.eval_shape(
            lambda t, d: model.log_likelihood(target.values(t), d), theta, data),
            "log_likelihood", shapes)
        _check_float(lik, "log_likelihood")
        if len(lik.shape) != 1:
            raise ValueError("log_likelihood must return one value per observation, shape "
                             f"(N,); got shape {lik.shape}")
        return
    out = _trace(lambda: jax.eval_shape(lambda t, d: model.log_joint(target.values(t), d),
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
