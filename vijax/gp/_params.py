"""Hyper-parameter declarations of kernels and likelihoods as :class:`vijax.model.Param`.

A kernel or likelihood declares each hyper-parameter as a ``Param`` (shape, init, support);
the fit optimises ``biject_to(support)^-1`` of it. These helpers check an init against its
support (naming the owner and the hyper-parameter), and map pytrees of values between the
constrained and the unconstrained space.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to

from vijax.model import Param

__all__ = ["as_param", "init_value", "constrain", "unconstrain", "is_param"]


def is_param(x: Any) -> bool:
    return isinstance(x, Param)


def as_param(owner: str, name: str, value: Any, support: constraints.Constraint) -> Param | None:
    """``value`` (a float, an array, a ``Param`` or ``None`` for a data-driven default) as a
    ``Param`` with ``support``; an init outside the support raises ``ValueError`` naming
    ``owner`` and ``name``."""
    if value is None:
        return None
    if isinstance(value, Param):
        param = value
    else:
        arr = np.asarray(value, dtype=float)
        param = Param(shape=arr.shape, init=arr, support=support)
    if param.init is not None:
        init = np.asarray(param.init, dtype=float)
        if not np.all(np.isfinite(init)):
            raise ValueError(f"{owner}: {name} init {_show(init)} is not finite")
        ok = np.asarray(param.support.check(jnp.asarray(init)))
        if not np.all(ok):
            raise ValueError(f"{owner}: {name} init {_show(init)} is outside its support "
                             f"{param.support} (a {name} must be "
                             f"{'> 0' if param.support is constraints.positive else 'valid'})")
    return param


def _show(x: np.ndarray) -> str:
    return repr(float(x)) if x.ndim == 0 else np.array2string(x, precision=4)


def init_value(param: Param, dtype: Any) -> jax.Array:
    """The constrained init of ``param`` broadcast to its shape, in ``dtype``."""
    if param.init is None:
        value = biject_to(param.support)(jnp.zeros(param.shape, dtype))
    else:
        value = jnp.broadcast_to(jnp.asarray(param.init, dtype), param.shape)
    return jnp.asarray(value, dtype)


def constrain(spec: Any, raw: Any) -> Any:
    """Map an unconstrained pytree onto the supports declared in ``spec`` (a pytree of
    ``Param`` with the same structure)."""
    return jax.tree.map(lambda p, u: biject_to(p.support)(u), spec, raw, is_leaf=is_param)


def unconstrain(spec: Any, values: Any) -> Any:
    """Inverse of :func:`constrain`."""
    return jax.tree.map(lambda p, v: biject_to(p.support).inv(v), spec, values,
                        is_leaf=is_param)


class Hyperparameters:
    """Shared by kernels and likelihoods: ``_hypers`` ``{name: (support, default)}`` and
    ``_spec`` ``{name: Param or None}`` (``None``: set from the data)."""

    _hypers: dict = {}
    _spec: dict = {}

    def __repr__(self) -> str:
        inits = ", ".join(f"{k}={None if p is None else p.init}" for k, p in self._spec.items())
        return f"{type(self).__name__}({inits})"

    def params_spec(self) -> Any:
        """Pytree of ``Param`` (supports and inits) matching ``init_params``."""
        return {k: p if p is not None else Param(support=self._hypers[k][0])
                for k, p in self._spec.items()}
