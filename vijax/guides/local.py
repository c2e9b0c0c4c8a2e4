"""The guide of a model with local latents: a global family over ``theta`` and one factor per
local latent (:mod:`vijax.guides.amortized`).

Its parameters are ``{"global": global params, "local": {name: factor params}}``. The
:class:`~vijax.guides.base.Guide` built here is the global family's, lifted to read
``params["global"]``: everything that draws or summarises the global latents (results,
checkpoints, the stopping rule) works unchanged; the local objective
(:mod:`vijax.objective_local`) reads the factors.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vijax.guides.amortized import Amortized, LocalFactor, LocalTable, build_factor
from vijax.guides.base import Guide

__all__ = ["LocalSpec", "resolve_local_spec", "build_local", "lift_global", "row_signature",
           "example_row"]


@dataclasses.dataclass(frozen=True)
class LocalSpec:
    """A resolved guide for a model with local latents (hashable: a compile-cache key).

    Attributes:
        global_spec: the family of the global latents (resolved, e.g. ``MeanField()``).
        factors: ``((name, Amortized | LocalTable), ...)`` per local latent.
        row: one data row's structure (:func:`row_signature`; the encoders' input).
        n_rows: the observations (the tables' length).
    """

    global_spec: Any
    factors: tuple
    row: tuple = ()
    n_rows: int = 0
    name = "local"

    @property
    def default_learning_rate(self) -> float:
        return 1e-3 if any(isinstance(s, Amortized) for _, s in self.factors) else \
            getattr(self.global_spec, "default_learning_rate", 0.05)


def row_signature(data) -> tuple[Any, int]:
    """``(row, n)``: one data row's structure ``(treedef, ((shape, dtype), ...))`` (hashable)
    and the number of rows."""
    leaves, treedef = jax.tree_util.tree_flatten(data)
    row = tuple((tuple(np.shape(x)[1:]), np.dtype(x.dtype).name) for x in leaves)
    n = int(np.shape(leaves[0])[0]) if leaves else 0
    return (treedef, row), n


def example_row(row) -> Any:
    """Zeros of a :func:`row_signature` row (an encoder's example input)."""
    treedef, leaves = row
    return jax.tree_util.tree_unflatten(treedef, [jnp.zeros(s, d) for s, d in leaves])


def resolve_local_spec(guide: Any, target, resolve_global) -> tuple[Any, tuple]:
    """Split ``guide=`` into the global latents' spec and the local factors' specs.

    ``guide`` may be ``None`` / ``"auto"`` / a family (the global latents; local ones get
    :class:`Amortized`), or a dict whose entries for local latents are :class:`Amortized`,
    :class:`LocalTable` or a family name (an :class:`Amortized` of that family).
    ``resolve_global`` resolves what is left for the global latents (``None``: default)."""
    layout = target.locals
    local_names = set(layout.names)
    specs: dict[str, Any] = {}
    rest: Any = guide
    if isinstance(guide, Mapping):
        rest = {}
        for key, spec in guide.items():
            names = (key,) if isinstance(key, str) else tuple(key)
            hit = [n for n in names if n in local_names]
            if hit and len(names) > 1:
                raise ValueError(f"local latent {hit[0]!r} needs a guide of its own, not a "
                                 f"block shared with {[n for n in names if n != hit[0]]}")
            if hit:
                specs[hit[0]] = _local_entry(hit[0], spec)
            else:
                if isinstance(spec, Amortized | LocalTable):
                    raise ValueError(f"latent {key!r} is global (one value for the whole "
                                     "data): Amortized and LocalTable guides are for local "
                                     "latents (vj.Latent(..., local=True))")
                rest[key] = spec
        rest = rest or None
    elif isinstance(guide, Amortized | LocalTable):
        raise ValueError("an Amortized or LocalTable guide belongs to one local latent: give "
                         "guide={'name': vj.guides.Amortized(...)}")
    for b in layout.blocks:
        if b.name not in specs:
            specs[b.name] = Amortized(family="categorical" if b.discrete else "meanfield")
    global_spec = resolve_global(rest)
    return global_spec, tuple((b.name, specs[b.name]) for b in layout.blocks)


def _local_entry(name: str, spec: Any):
    if isinstance(spec, Amortized | LocalTable):
        return spec
    if isinstance(spec, str):
        return Amortized(family=spec)
    raise TypeError(f"the guide of local latent {name!r} must be vj.guides.Amortized(...), "
                    f"vj.guides.LocalTable(...) or a family name, got {spec!r}")


def build_local(spec: LocalSpec, target, example_row) -> tuple[LocalFactor, ...]:
    """The factors of ``spec`` (continuous ones after the discrete one they may condition
    on); ``example_row``: one data row (zeros of the row signature)."""
    layout = target.locals
    given_sizes = {b.name: b.size * b.num_values for b in layout.discrete}
    exclude = tuple(b.observed for b in layout.discrete if b.observed)
    factors = []
    for name, s in spec.factors:
        block = layout.block(name)
        if isinstance(s, LocalTable) and spec.n_rows < 1:
            raise ValueError(f"local latent {name!r}: LocalTable needs the data's rows")
        factors.append(build_factor(s, block, example_row, spec.n_rows, given_sizes,
                                    exclude))
    factors.sort(key=lambda f: not f.discrete)
    return tuple(factors)


def lift_global(guide: Guide) -> Guide:
    """The global family's functions reading ``params["global"]``."""

    def g(fn):
        return None if fn is None else (lambda params, *a: fn(params["global"], *a))

    return guide._replace(
        init=guide.init, transform=g(guide.transform), sample=lambda key, params:
        guide.sample(key, params["global"]), log_q=g(guide.log_q), entropy=g(guide.entropy),
        mean=g(guide.mean), discrete_log_q=g(guide.discrete_log_q),
        discrete_entropy=g(guide.discrete_entropy))
