"""The flat unconstrained target: ravel latents, map them to their supports, add log|det J|.

For latents ``z_i = T_i(u_i)`` with ``T_i = biject_to(support_i)`` and all unconstrained blocks
ravelled into one vector ``theta`` of length ``dim``, the target density is

    log p~(theta) = log p(T(theta), x) + sum_i log|det J_{T_i}(u_i)|,

the density of ``theta`` whose push-forward is the posterior. Event-shaped transforms (simplex,
Cholesky factors, ...) change the number of elements: ``theta`` holds the unconstrained ones.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import constraints
from numpyro.distributions.transforms import IdentityTransform, Transform, biject_to

__all__ = ["Target", "LatentBlock"]


class LatentBlock:
    """Layout of one latent inside ``theta``: a slice ``[offset, offset + size)``."""

    __slots__ = ("name", "shape", "unconstrained_shape", "transform", "offset", "size",
                 "is_identity", "support")

    def __init__(self, name, shape, unconstrained_shape, transform, offset, support):
        self.name = name
        self.shape = shape
        self.unconstrained_shape = unconstrained_shape
        self.transform = transform
        self.offset = offset
        self.size = math.prod(unconstrained_shape)
        self.is_identity = isinstance(transform, IdentityTransform)
        self.support = support

    def __repr__(self) -> str:
        return (f"LatentBlock({self.name!r}, shape={self.shape}, "
                f"unconstrained_shape={self.unconstrained_shape}, offset={self.offset})")


def _make_transform(name: str, shape: tuple[int, ...], support: constraints.Constraint
                    ) -> tuple[Transform, tuple[int, ...]]:
    if support.is_discrete:
        raise ValueError(
            f"latent {name!r} has a discrete support ({support}); discrete latents are not "
            "supported yet: marginalise them out of the log joint"
        )
    try:
        transform = biject_to(support)
    except NotImplementedError:
        raise ValueError(
            f"latent {name!r}: numpyro's biject_to has no bijection onto support {support}"
        ) from None
    event_dim = transform.codomain.event_dim
    if len(shape) < event_dim:
        raise ValueError(
            f"latent {name!r} has shape {shape} but support {support} needs at least "
            f"{event_dim} dimension(s), e.g. shape=(3,{' 3' if event_dim == 2 else ''})"
        )
    try:
        unc_shape = tuple(transform.inverse_shape(shape))
        back = tuple(transform.forward_shape(unc_shape))
    except Exception as e:  # numpyro raises ValueError/AssertionError for bad event shapes
        raise ValueError(f"latent {name!r}: shape {shape} is not valid for support {support}: "
                         f"{e}") from None
    if back != shape or any(d < 1 for d in unc_shape) and math.prod(shape) > 0:
        raise ValueError(f"latent {name!r}: shape {shape} is not valid for support {support} "
                         f"(event shape {shape[len(shape) - event_dim:]})")
    if event_dim == 2 and shape[-1] != shape[-2]:
        raise ValueError(f"latent {name!r}: support {support} needs square matrices, "
                         f"got shape {shape}")
    return transform, unc_shape


@dataclasses.dataclass(frozen=True, eq=False)
class Target:
    """Flat unconstrained parameterisation of a model (hashable by identity: a compile-cache key).

    Attributes:
        blocks: one :class:`LatentBlock` per latent, in declaration order.
        dim: length of the unconstrained vector ``theta``.
        log_joint: ``(z, data) -> scalar`` on constrained values.
    """

    blocks: tuple[LatentBlock, ...]
    dim: int
    log_joint: Callable[[dict, Any], Any]

    @classmethod
    def from_model(cls, model) -> Target:
        blocks, offset = [], 0
        for name, lat in model.latents.items():
            transform, unc_shape = _make_transform(name, lat.shape, lat.support)
            block = LatentBlock(name, lat.shape, unc_shape, transform, offset, lat.support)
            blocks.append(block)
            offset += block.size
        return cls(tuple(blocks), offset, model.log_density)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.blocks)

    def block(self, name: str) -> LatentBlock:
        for b in self.blocks:
            if b.name == name:
                return b
        raise KeyError(f"unknown latent {name!r}; the model's latents are {list(self.names)}")

    # --- single-draw maps (vmap at the boundary) -------------------------------------------
    def unravel(self, theta: jax.Array) -> dict[str, jax.Array]:
        """``theta`` (dim,) -> dict of unconstrained blocks of ``unconstrained_shape``."""
        return {b.name: theta[b.offset:b.offset + b.size].reshape(b.unconstrained_shape)
                for b in self.blocks}

    def constrain(self, theta: jax.Array) -> dict[str, jax.Array]:
        """``theta`` (dim,) -> dict of constrained latent values (declared shapes)."""
        return {b.name: b.transform(u) for b, u in zip(self.blocks, self.unravel(theta).values(),
                                                       strict=True)}

    def constrain_with_log_det(self, theta: jax.Array) -> tuple[dict, dict]:
        """Constrained values and, per latent, the scalar ``log|det J_T(u)|``."""
        z, log_det = {}, {}
        for b, u in zip(self.blocks, self.unravel(theta).values(), strict=True):
            x = b.transform(u)
            z[b.name] = x
            log_det[b.name] = (jnp.zeros((), theta.dtype) if b.is_identity
                               else jnp.sum(b.transform.log_abs_det_jacobian(u, x)))
        return z, log_det

    def log_density(self, theta: jax.Array, data: Any,
                    no_jacobian: frozenset[str] = frozenset()) -> jax.Array:
        """Scalar ``log p(T(theta), x) + sum log|det J|`` (latents in ``no_jacobian`` omit it).

        Omitting the Jacobian for a latent gives the density of its *constrained* value: point
        estimates (the delta guide) maximise that, so that MAP means the constrained mode.
        """
        z, log_det = self.constrain_with_log_det(theta)
        lp = jnp.asarray(self.log_joint(z, data))
        for name, ld in log_det.items():
            if name not in no_jacobian:
                lp = lp + ld
        return lp

    def unconstrain(self, z: Mapping[str, Any], dtype) -> jax.Array:
        """Inverse of :meth:`constrain` for a full dict of constrained values -> (dim,)."""
        parts = []
        for b in self.blocks:
            x = jnp.asarray(z[b.name], dtype)
            parts.append(jnp.ravel(b.transform.inv(x)))
        return jnp.concatenate(parts) if parts else jnp.zeros((0,), dtype)

    def check_values(self, z: Mapping[str, Any]) -> None:
        """Validate constrained values (names, shapes, support); errors name the latent."""
        if not isinstance(z, Mapping):
            raise TypeError(f"expected a dict from latent name to value, got {type(z)}")
        unknown = sorted(set(z) - set(self.names))
        if unknown:
            raise ValueError(f"unknown latent name(s) {unknown}; the model's latents are "
                             f"{list(self.names)}")
        for name, value in z.items():
            b = self.block(name)
            v = np.asarray(value)
            if v.shape != b.shape:
                raise ValueError(f"latent {name!r}: value has shape {v.shape}, "
                                 f"declared shape is {b.shape}")
            if not np.all(np.isfinite(v)):
                raise ValueError(f"latent {name!r}: value is not finite: {v}")
            ok = np.asarray(b.support.check(jnp.asarray(v)))
            if not np.all(ok):
                raise ValueError(f"latent {name!r}: value {v} lies outside its support "
                                 f"{b.support}")

    def describe(self, theta) -> str:
        """Human-readable per-latent constrained values of ``theta`` (for error messages)."""
        z = self.constrain(jnp.asarray(theta))
        return ", ".join(f"{k}={np.array2string(np.asarray(v), precision=4, threshold=12)}"
                         for k, v in z.items())
