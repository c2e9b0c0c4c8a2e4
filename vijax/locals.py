"""Local latents: one value per observation, never part of the global vector ``theta``.

A factorised model with local latents has the density

    log p(theta, z_1..N, x) = log_prior(theta) + sum_i l_i(theta, z_i, x_i),

where ``l_i`` (the model's ``log_likelihood``, one value per row) includes each local latent's
own prior. A continuous local latent ``z_i = T(u_i)`` is inferred in unconstrained
coordinates ``u_i`` with ``log|det J_T(u_i)|`` added per row, as for global latents. A discrete
local latent (finite support) takes the values ``low + k``, ``k`` in ``[0, num_values)``.

:class:`LocalLayout` describes the local latents of a model; it is built once from the
declarations (:meth:`vijax.target.Target.from_model`) and used by the local guides and the
local objective. Values carry the batch's leading axis ``(B,) + shape``.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["LocalBlock", "LocalLayout", "local_layout", "MAX_ENUMERATION"]

# the most joint values of a local discrete latent that enumeration sums over per row
MAX_ENUMERATION = 1024


class LocalBlock(NamedTuple):
    """One local latent: ``shape`` per observation; continuous ones have ``transform`` and
    ``unconstrained_shape``; discrete ones ``low`` and ``num_values`` (per element)."""

    name: str
    shape: tuple[int, ...]
    support: Any
    discrete: bool
    unconstrained_shape: tuple[int, ...] = ()
    transform: Any = None
    low: int = 0
    num_values: int = 0
    observed: str | None = None

    @property
    def size(self) -> int:
        """Unconstrained elements per row (continuous) or elements per row (discrete)."""
        return math.prod(self.unconstrained_shape if not self.discrete else self.shape)

    @property
    def combos(self) -> int:
        """Joint values per row of a discrete latent (``num_values ** size``)."""
        return self.num_values ** self.size if self.discrete else 0

    def constrain(self, u: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Unconstrained ``u (..., size)`` -> ``(value (...,) + shape, log|det J| (...))``."""
        lead = u.shape[:-1]
        u = u.reshape(lead + self.unconstrained_shape)
        x = self.transform(u)
        ndim = len(self.unconstrained_shape)
        if ndim == 0:
            ld = self.transform.log_abs_det_jacobian(u, x)
        else:
            ld = self.transform.log_abs_det_jacobian(u, x)
            # elementwise transforms return one term per element; event transforms fewer
            extra = ld.ndim - len(lead)
            ld = jnp.sum(ld, axis=tuple(range(len(lead), len(lead) + extra))) if extra \
                else ld
        return x, jnp.broadcast_to(ld, lead).astype(u.dtype)

    def values(self, k: jax.Array) -> jax.Array:
        """Category indices ``k (..., size)`` -> int32 values ``(...,) + shape``."""
        return (k.astype(jnp.int32) + self.low).reshape(k.shape[:-1] + self.shape)

    def index_grid(self) -> jax.Array:
        """All joint values' indices, ``(combos, size)`` int32 (the first element slowest)."""
        grid = jnp.indices((self.num_values,) * self.size).reshape(self.size, -1).T
        return grid.astype(jnp.int32)


class LocalLayout(NamedTuple):
    """The local latents of a model, in declaration order."""

    blocks: tuple[LocalBlock, ...]

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.blocks)

    @property
    def continuous(self) -> tuple[LocalBlock, ...]:
        return tuple(b for b in self.blocks if not b.discrete)

    @property
    def discrete(self) -> tuple[LocalBlock, ...]:
        return tuple(b for b in self.blocks if b.discrete)

    def block(self, name: str) -> LocalBlock:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(f"unknown local latent {name!r}; the model's local latents are "
                       f"{list(self.names)}")


def local_layout(latents, make_transform, finite_range) -> LocalLayout | None:
    """The :class:`LocalLayout` of the declared ``latents`` with ``local=True`` (``None``
    when there are none); ``make_transform`` and ``finite_range`` are the target's own
    (errors name the latent)."""
    blocks = []
    for name, lat in latents.items():
        if not lat.local:
            continue
        if lat.support.is_discrete:
            low, num_values = finite_range(name, lat.support)
            block = LocalBlock(name, lat.shape, lat.support, True, low=low,
                               num_values=num_values, observed=lat.observed)
        else:
            transform, unc_shape = make_transform(name, lat.shape, lat.support)
            block = LocalBlock(name, lat.shape, lat.support, False, unc_shape, transform)
        blocks.append(block)
    if not blocks:
        return None
    discrete = [b for b in blocks if b.discrete]
    if len(discrete) > 1:
        raise ValueError(f"local discrete latents {[b.name for b in discrete]}: at most one "
                         "local discrete latent per model is supported (give it a vector "
                         "shape to hold several elements)")
    return LocalLayout(tuple(blocks))
