"""Configuration objects (guide specs, estimators, diagnostics) as tagged JSON in a checkpoint's
manifest: ``{"class": "IAF", "fields": {...}}`` for the configuration classes of
:mod:`vijax.guides` and :mod:`vijax.estimators`, ``{"tuple": [...]}``, ``{"list": [...]}``,
``{"dict": {...}}``; scalars and strings as they are.

The guide of a model with local latents (:class:`vijax.guides.local.LocalSpec`) is stored like
the other classes, its factors (:class:`~vijax.guides.Amortized`, :class:`~vijax.guides.LocalTable`)
too, except for two fields: ``row``, one data row's structure (a ``PyTreeDef`` and the leaves'
``(shape, dtype)``), is stored as ``{"row": tree}``, the row's pytree (nested ``dict`` /
``tuple`` / ``list`` / ``None``) with a string ``"dtype:d0,d1,..."`` per leaf; an
``Amortized`` ``encoder`` (a user network: code, not data) is stored as ``{"user_encoder":
description}`` only, and the network must be given again on loading
(``vj.load(path, model, guide={name: vj.guides.Amortized(encoder=...), ...})``)."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

from vijax import estimators as _estimators
from vijax import guides as _guides
from vijax.guides.local import LocalSpec

__all__ = ["encode", "decode", "USER_ENCODER"]

USER_ENCODER = "user_encoder"
"""The tag of an :class:`~vijax.guides.Amortized` encoder that is a user network (not stored)."""


def _config_classes() -> dict[str, type]:
    classes = [*_guides.GUIDE_NAMES.values(), _guides.Structured, _guides.Whitened,
               *_estimators.ESTIMATOR_NAMES.values(), LocalSpec, _guides.Amortized,
               _guides.LocalTable]
    registry = {c.__name__: c for c in classes}
    assert len(registry) == len(classes), "configuration class names must be unique"
    return registry


def encode(value: Any, what: str) -> Any:
    """JSON-able form of a configuration value (see the module docstring)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {"tuple": [encode(v, what) for v in value]}
    if isinstance(value, list):
        return {"list": [encode(v, what) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: encode(v, what) for k, v in value.items()}}
    registry = _config_classes()
    cls = type(value)
    if registry.get(cls.__name__) is cls:
        if cls is _guides.Structured:
            return {"class": "Structured", "args": encode(value.blocks, what)}
        return {"class": cls.__name__, "fields": {f.name: _encode_field(value, f.name, what)
                                                  for f in dataclasses.fields(value)}}
    raise ValueError(f"cannot save {what}: {value!r} ({cls.__module__}.{cls.__qualname__}) is "
                     "not a JSON scalar, tuple, list, dict or one of the vijax configuration "
                     f"classes {sorted(registry)}")


def decode(obj: Any, what: str) -> Any:
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, dict) and len(obj) == 1 and "tuple" in obj:
        return tuple(decode(v, what) for v in _as_list(obj["tuple"], what))
    if isinstance(obj, dict) and len(obj) == 1 and "list" in obj:
        return [decode(v, what) for v in _as_list(obj["list"], what)]
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(obj.get("dict"), dict):
        return {k: decode(v, what) for k, v in obj["dict"].items()}
    if isinstance(obj, dict) and "class" in obj:
        registry = _config_classes()
        cls = registry.get(obj["class"])
        if cls is None:
            raise ValueError(f"the checkpoint's {what} names an unknown class "
                             f"{obj['class']!r}; known: {sorted(registry)}")
        try:
            if cls is _guides.Structured:
                return cls(*decode(obj["args"], what))
            fields = obj["fields"]
            if not isinstance(fields, dict):
                raise TypeError("fields must be an object")
            return cls(**{k: _decode_field(cls, k, v, what) for k, v in fields.items()})
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"the checkpoint's {what} ({obj['class']}) is invalid: {e}") from None
    raise ValueError(f"the checkpoint's {what} holds an unreadable value {obj!r}")


def _as_list(obj: Any, what: str) -> list:
    if not isinstance(obj, list):
        raise ValueError(f"the checkpoint's {what} holds an unreadable value {obj!r}")
    return obj


def _encode_field(value: Any, name: str, what: str) -> Any:
    field = getattr(value, name)
    if isinstance(value, LocalSpec) and name == "row":
        return {"row": _encode_row(field, what)}
    if isinstance(value, _guides.Amortized) and name == "encoder" and field is not None:
        return {USER_ENCODER: _describe(field)}
    return encode(field, what)


def _decode_field(cls: type, name: str, obj: Any, what: str) -> Any:
    if cls is LocalSpec and name == "row":
        if not (isinstance(obj, dict) and set(obj) == {"row"}):
            raise ValueError(f"row must be {{'row': tree}}, got {obj!r}")
        return _decode_row(obj["row"], what)
    if cls is _guides.Amortized and name == "encoder" and obj is not None:
        if not (isinstance(obj, dict) and set(obj) == {USER_ENCODER}
                and isinstance(obj[USER_ENCODER], str)):
            raise ValueError(f"encoder must be null or {{{USER_ENCODER!r}: description}}, got "
                             f"{obj!r}")
        return UserEncoder(obj[USER_ENCODER])
    return decode(obj, what)


@dataclasses.dataclass(frozen=True)
class UserEncoder:
    """Stands in, in a loaded spec, for a user's encoder network that was not stored."""

    description: str

    def __repr__(self) -> str:
        return f"<user encoder {self.description}, not stored>"


def _describe(encoder: Any) -> str:
    cls = type(encoder)
    if callable(encoder) and hasattr(encoder, "__qualname__"):
        return f"{getattr(encoder, '__module__', '?')}.{encoder.__qualname__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def _encode_row(row: Any, what: str) -> Any:
    """One data row's structure as JSON: the row's pytree with ``"dtype:d0,d1"`` leaves,
    checked to rebuild the same ``PyTreeDef`` (NamedTuples and custom pytree nodes do not)."""
    treedef, leaves = row
    strings = [f"{np.dtype(dtype).name}:{','.join(str(int(d)) for d in shape)}"
               for shape, dtype in leaves]
    tree = jax.tree_util.tree_unflatten(treedef, strings)
    problem = None
    try:
        stored = encode(tree, what)
        if _decode_row(stored, what) != row:
            problem = "it does not rebuild the same structure"
    except ValueError as e:
        problem = str(e)
    if problem is not None:
        raise ValueError(f"cannot save {what}: the encoders' input, one data row {treedef}, is "
                         "not made of dicts (with string keys), tuples, lists and arrays only "
                         f"({problem}); a checkpoint stores the row's structure as JSON: pass "
                         "the data as a dict of arrays")
    return stored


def _decode_row(obj: Any, what: str) -> tuple:
    tree = decode(obj, what)
    strings, treedef = jax.tree_util.tree_flatten(tree)
    leaves = []
    for s in strings:
        if not isinstance(s, str) or s.count(":") != 1:
            raise ValueError(f"a row leaf must be 'dtype:d0,d1,...', got {s!r}")
        dtype, dims = s.split(":")
        try:
            name = np.dtype(dtype).name
            shape = tuple(int(d) for d in dims.split(",")) if dims else ()
        except TypeError:
            raise ValueError(f"a row leaf has an unknown dtype {dtype!r}") from None
        if name != dtype or any(d < 0 for d in shape):
            raise ValueError(f"invalid row leaf {s!r}")
        leaves.append((shape, name))
    return treedef, tuple(leaves)
