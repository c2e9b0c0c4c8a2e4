"""A NumPyro model's arguments as vijax data: which leaves are traced, which are closed over.

NumPyro calls a model on concrete arrays, so models compute sizes, indices and masks from
their data with NumPy (``int(np.max(group)) + 1``, ``np.unique(group)``, ``np.isnan(y)``,
``np.nonzero(...)``) or branch on a float argument in Python. vijax compiles the log density
once with the data as traced arguments, and a traced leaf cannot be read as a Python or NumPy
value. So the leaves of ``(args, kwargs)`` fall into three kinds:

* *static*: everything that is not a numeric array or a float (``int``, ``bool``, NumPy
  integer scalars, ``None``, strings, callables, arrays of strings): baked into the log joint.
* *traced*: numeric arrays (NumPy or JAX, any rank) and floats (Python or NumPy) that the
  model uses only through JAX: they form ``Model.data`` and are arguments of the compiled
  program, so new values of the same shapes reuse it.
* *concrete*: numeric arrays and floats that the model reads as Python or NumPy values. They
  are closed over like static leaves (arrays as read-only NumPy copies), and their content
  (shape, dtype and a SHA-256 of the bytes) is part of the compile key: new values of a
  concrete leaf give a new, correct program, never a stale one.

Which leaves are concrete is found by tracing (:func:`find_concrete`): a trace with every
candidate leaf abstract either succeeds, or fails with one of JAX's tracer errors
(:data:`TRACER_ERRORS`); then each candidate is traced as the only abstract leaf, and those
whose trace fails are concrete. A model that fails even with every leaf concrete reads a
*latent* as a Python value, which no choice of data can fix.
"""

from __future__ import annotations

import hashlib
import inspect
from collections.abc import Callable, Hashable
from typing import Any, TypeVar

import jax
import numpy as np

__all__ = ["TRACER_ERRORS", "find_concrete", "split", "rebuild", "leaf_key", "leaf_names"]

TRACER_ERRORS = (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
                 jax.errors.TracerIntegerConversionError, jax.errors.NonConcreteBooleanIndexError)
"""What JAX raises when a traced value is used as a Python or NumPy value (a
``TracerBoolConversionError`` is a ``ConcretizationTypeError``)."""

T = TypeVar("T")


class _Traced:
    """Placeholder for a traced leaf inside the static-leaf tuple (a singleton)."""

    def __repr__(self) -> str:
        return "<traced>"


TRACED = _Traced()


def is_candidate(leaf: Any) -> bool:
    """Whether a leaf may be traced: a numeric array, a floating NumPy scalar or a float."""
    if isinstance(leaf, jax.Array):
        return True
    if isinstance(leaf, np.ndarray):
        return leaf.dtype.kind in "biufc"
    if isinstance(leaf, np.generic):
        return np.issubdtype(leaf.dtype, np.floating)
    return isinstance(leaf, float)


def _frozen(leaf: Any) -> Any:
    """A concrete leaf as it is closed over: a read-only NumPy copy of an array (so that the
    user changing their array in place cannot make the program disagree with its key, and so
    that ``np.max(x)`` reads it: on a JAX array it calls ``x.max()``, which is traced inside
    ``jit`` even on a concrete array); scalars as they are."""
    if isinstance(leaf, jax.Array | np.ndarray):
        leaf = np.array(leaf)
        leaf.flags.writeable = False
    return leaf


def split(leaves: list, concrete: frozenset[int]) -> tuple[tuple, tuple]:
    """Flat leaves -> (static leaves with ``TRACED`` holes, traced leaves).

    A leaf is traced when it is a candidate (:func:`is_candidate`) not in ``concrete``
    (indices into ``leaves``); concrete leaves are kept (frozen) among the static ones.
    """
    static, traced = [], []
    for i, leaf in enumerate(leaves):
        if is_candidate(leaf) and i not in concrete:
            static.append(TRACED)
            traced.append(leaf)
        else:
            static.append(_frozen(leaf) if i in concrete else leaf)
    return tuple(static), tuple(traced)


def rebuild(treedef: Any, static: tuple, data: tuple | list) -> tuple[tuple, dict]:
    """Inverse of :func:`split`: ``(args, kwargs)`` from static leaves and traced ones."""
    it = iter(data)
    leaves = [next(it) if x is TRACED else x for x in static]
    return jax.tree_util.tree_unflatten(treedef, leaves)


def leaf_key(leaf: Any) -> Hashable:
    """A hashable stand-in for a static leaf that compares by value: numeric and string
    arrays and floats by type, shape, dtype and a SHA-256 of their bytes (so NaN equals NaN,
    and ``1`` differs from ``True`` and ``1.0``); other leaves by ``(type, leaf)``; ``TRACED``
    as itself. Object arrays (whose bytes are pointers) give an unhashable key (no
    memoisation)."""
    if leaf is TRACED:
        return leaf
    if isinstance(leaf, jax.Array | np.ndarray | np.generic | float):
        a = np.asarray(leaf)
        if a.dtype.kind == "O":
            return (type(leaf), [])  # unhashable: the caller skips memoisation
        digest = hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()
        return (type(leaf), a.shape, a.dtype.str, digest)
    return (type(leaf), leaf)


def leaf_names(model_fn: Callable, args: tuple, kwargs: dict) -> list[str]:
    """A readable name per leaf of ``(args, kwargs)``, in flattening order: the parameter of
    ``model_fn`` it is passed as, then the path inside it (``y``, ``data['x']``, ``args[3]``)."""
    try:
        params = list(inspect.signature(model_fn).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = [p.name for p in params
                  if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    names = []
    for path, _ in jax.tree_util.tree_flatten_with_path((args, kwargs))[0]:
        head, rest = path[1], jax.tree_util.keystr(path[2:])
        if path[0].idx == 1:  # kwargs: sorted by key, a DictKey
            names.append(f"{head.key}{rest}")
        elif head.idx < len(positional):
            names.append(f"{positional[head.idx]}{rest}")
        else:
            names.append(f"args[{head.idx}]{rest}")
    return names


def find_concrete(attempt: Callable[[frozenset[int]], T], candidates: tuple[int, ...],
                  hint: frozenset[int] | None = None) -> tuple[frozenset[int], T]:
    """The candidate leaves that must be concrete, and ``attempt``'s result with them.

    ``attempt(concrete)`` traces the model with the leaves in ``concrete`` concrete and the
    other candidates abstract, raising one of :data:`TRACER_ERRORS` where the model reads an
    abstract value as a Python or NumPy value. Tried first with ``hint`` (a set found before
    for the same model and argument structure) or with none concrete: one trace when it
    succeeds. Otherwise each candidate ``i`` is tried as the only abstract leaf; those that
    fail are concrete. If that set still fails (a model whose use of one leaf depends on
    another being abstract) every candidate is made concrete. ``len(candidates) + 2`` traces
    at most.

    Raises:
        One of TRACER_ERRORS: the trace fails even with every candidate concrete (the model
            reads a latent as a Python value); the error is that of this last trace.

    Example:
        >>> leaves = [np.array([0, 2, 1]), np.ones(4)]
        >>> def attempt(concrete):  # reads leaf 0 with NumPy, leaf 1 with JAX
        ...     static, data = split(leaves, concrete)
        ...     def density(data):
        ...         group, y = rebuild(jax.tree_util.tree_structure([0, 0]), static, data)
        ...         return y[:int(np.max(group)) + 1].sum()
        ...     return jax.eval_shape(density, data)
        >>> concrete, out = find_concrete(attempt, (0, 1))
        >>> sorted(concrete), out.shape
        ([0], ())
    """
    everything = frozenset(candidates)
    first = frozenset() if hint is None else hint
    try:
        return first, attempt(first)
    except TRACER_ERRORS as e:
        error = e
    if first == everything:
        raise error

    def fails(concrete: frozenset[int]) -> bool:
        try:
            attempt(concrete)
        except TRACER_ERRORS:
            return True
        return False

    needed = frozenset(i for i in candidates if fails(everything - {i}))
    for concrete in dict.fromkeys((needed, everything)):  # needed first; once if equal
        try:
            return concrete, attempt(concrete)
        except TRACER_ERRORS as e:
            error = e
    raise error  # with every data leaf concrete: a latent is read as a Python value
