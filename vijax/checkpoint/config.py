"""Configuration objects (guide specs, estimators, diagnostics) as tagged JSON in a checkpoint's
manifest: ``{"class": "IAF", "fields": {...}}`` for the configuration classes of
:mod:`vijax.guides` and :mod:`vijax.estimators`, ``{"tuple": [...]}``, ``{"list": [...]}``,
``{"dict": {...}}``; scalars and strings as they are."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

from vijax import estimators as _estimators
from vijax import guides as _guides

__all__ = ["encode", "decode"]


def _config_classes() -> dict[str, type]:
    classes = [*_guides.GUIDE_NAMES.values(), _guides.Structured, _guides.Whitened,
               *_estimators.ESTIMATOR_NAMES.values()]
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
        return {"class": cls.__name__, "fields": {f.name: encode(getattr(value, f.name), what)
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
            return cls(**{k: decode(v, what) for k, v in fields.items()})
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"the checkpoint's {what} ({obj['class']}) is invalid: {e}") from None
    raise ValueError(f"the checkpoint's {what} holds an unreadable value {obj!r}")


def _as_list(obj: Any, what: str) -> list:
    if not isinstance(obj, list):
        raise ValueError(f"the checkpoint's {what} holds an unreadable value {obj!r}")
    return obj
