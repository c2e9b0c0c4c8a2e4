"""Covariance functions for Gaussian processes, in pure JAX.

A kernel is a small immutable object that declares its hyper-parameters as
:class:`vijax.model.Param` (with numpyro supports) and evaluates as a pure function of a
parameter pytree: ``k(params, X1, X2) -> (n1, n2)``, ``k.diag(params, X) -> (n,)``.
``k1 + k2`` and ``k1 * k2`` build sums and products (their parameters are tuples of the
parts' parameters). Inputs are ``(N,)`` (one input dimension) or ``(N, D)``.

Definitions (``r^2 = sum_d (x_d - x'_d)^2 / l_d^2``, ``l`` scalar or ARD of shape ``(D,)``,
``s^2`` the variance; they match scikit-learn's ``sklearn.gaussian_process.kernels``):

- ``RBF``: ``s^2 exp(-r^2 / 2)``
- ``Matern12`` / ``Matern32`` / ``Matern52``: ``s^2 exp(-r)``,
  ``s^2 (1 + sqrt3 r) exp(-sqrt3 r)``, ``s^2 (1 + sqrt5 r + 5 r^2 / 3) exp(-sqrt5 r)``
- ``Periodic`` (exp-sine-squared): ``s^2 exp(-2 sin^2(pi d / p) / l^2)``, ``d = |x - x'|``
- ``RationalQuadratic``: ``s^2 (1 + r^2 / (2 alpha))^(-alpha)``
- ``White``: ``s^2 [x = x']`` on ``k(params, X)`` (no ``X2``), zero between two input sets
- ``Constant``: ``s^2``; ``Linear``: ``s^2 x . x'``

Why not GPJax: ``gpjax`` 1.0 pulls in equinox, jaxtyping, beartype, lineax, paramax, rich
and tqdm and pins ``jax<0.11``; the few kernels an SVGP needs are ~200 lines here, with
supports declared the vijax way (``Param``), so the core keeps its small dependency set.

Example:
    >>> import jax.numpy as jnp
    >>> k = RBF(lengthscale=2.0) + White(variance=0.1)
    >>> params = k.init_params(jnp.float32)
    >>> k(params, jnp.zeros((3, 1))).shape
    (3, 3)
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.distributions import constraints

from vijax.gp._params import Hyperparameters, as_param, init_value

__all__ = ["Kernel", "RBF", "Matern12", "Matern32", "Matern52", "Periodic",
           "RationalQuadratic", "White", "Constant", "Linear", "Sum", "Product", "as_2d"]

_POS = constraints.positive


def as_2d(X: Any) -> jax.Array:
    """Inputs as ``(N, D)``: a ``(N,)`` array is one input dimension."""
    X = jnp.asarray(X)
    return X[:, None] if X.ndim == 1 else X


def _sqdist(params: dict, X1: jax.Array, X2: jax.Array) -> jax.Array:
    """Scaled squared distances ``(n1, n2)``, by differences taken before scaling (not
    ``|x|^2 - 2 x.x' + |x'|^2``, which cancels catastrophically in float32 for inputs far
    from 0, e.g. calendar years; the difference of two close float32 numbers is exact)."""
    diff = (X1[:, None, :] - X2[None, :, :]) / params["lengthscale"]
    return jnp.sum(diff * diff, axis=-1)


def _safe_sqrt(d2: jax.Array) -> jax.Array:
    """``sqrt(d2)`` with a zero (not NaN) gradient at ``d2 = 0``."""
    pos = d2 > 0
    return jnp.where(pos, jnp.sqrt(jnp.where(pos, d2, 1.0)), 0.0)


class Kernel(Hyperparameters):
    """A covariance function. Leaves declare ``_hypers``: ``{name: (support, default)}``
    (default ``None``: set from the data at :meth:`init_params`)."""

    _hypers: dict[str, tuple[constraints.Constraint, Any]] = {}

    def __init__(self, **values: Any) -> None:
        name = type(self).__name__
        spec = {}
        for key, (support, default) in self._hypers.items():
            value = values.pop(key, default)
            spec[key] = as_param(name, key, value, support)
        if values:
            raise TypeError(f"{name}: unknown hyper-parameter(s) {sorted(values)}; "
                            f"it has {sorted(self._hypers)}")
        self._spec = spec


    def init_params(self, dtype: Any = jnp.float32, x_std: Any = 1.0, f_var: float = 1.0) -> Any:
        """Constrained initial hyper-parameters. Hyper-parameters left at ``None`` are set
        from the data: lengthscales to ``x_std`` (per input dimension or its mean), variances
        to ``f_var`` (the variance the kernel should explain)."""
        out = {}
        for key, param in self._spec.items():
            if param is not None:
                out[key] = init_value(param, dtype)
            elif key == "lengthscale":
                out[key] = jnp.asarray(np.mean(x_std), dtype)
            else:
                out[key] = jnp.asarray(f_var, dtype)
        return out

    def __call__(self, params: Any, X1: Any, X2: Any = None) -> jax.Array:
        """Covariance matrix ``(n1, n2)``; ``X2=None`` means ``X2 = X1`` (and adds white
        noise for :class:`White` parts)."""
        X1 = as_2d(X1)
        return self._eval(params, X1, X1 if X2 is None else as_2d(X2), X2 is None)

    def diag(self, params: Any, X: Any) -> jax.Array:
        """``k(x_i, x_i)`` for each row, ``(n,)``."""
        X = as_2d(X)
        return jnp.broadcast_to(params["variance"], X.shape[:1]).astype(X.dtype)

    def _eval(self, params: Any, X1: jax.Array, X2: jax.Array, same: bool) -> jax.Array:
        raise NotImplementedError

    def __add__(self, other: Kernel) -> Sum:
        return Sum(self, other)

    def __mul__(self, other: Kernel) -> Product:
        return Product(self, other)


def _stationary_hypers() -> dict:
    return {"lengthscale": (_POS, None), "variance": (_POS, None)}


class RBF(Kernel):
    """Squared exponential ``s^2 exp(-r^2 / 2)``. Args: ``lengthscale`` (scalar or ``(D,)``),
    ``variance``; ``None`` means set from the data."""

    _hypers = _stationary_hypers()

    def __init__(self, lengthscale: Any = None, variance: Any = None) -> None:
        super().__init__(lengthscale=lengthscale, variance=variance)

    def _eval(self, p, X1, X2, same):
        return p["variance"] * jnp.exp(-0.5 * _sqdist(p, X1, X2))


class Matern12(Kernel):
    """Matern 1/2 (exponential) ``s^2 exp(-r)``."""

    _hypers = _stationary_hypers()

    def __init__(self, lengthscale: Any = None, variance: Any = None) -> None:
        super().__init__(lengthscale=lengthscale, variance=variance)

    def _eval(self, p, X1, X2, same):
        return p["variance"] * jnp.exp(-_safe_sqrt(_sqdist(p, X1, X2)))


class Matern32(Kernel):
    """Matern 3/2 ``s^2 (1 + sqrt3 r) exp(-sqrt3 r)``."""

    _hypers = _stationary_hypers()

    def __init__(self, lengthscale: Any = None, variance: Any = None) -> None:
        super().__init__(lengthscale=lengthscale, variance=variance)

    def _eval(self, p, X1, X2, same):
        r = math.sqrt(3.0) * _safe_sqrt(_sqdist(p, X1, X2))
        return p["variance"] * (1.0 + r) * jnp.exp(-r)


class Matern52(Kernel):
    """Matern 5/2 ``s^2 (1 + sqrt5 r + 5 r^2 / 3) exp(-sqrt5 r)``."""

    _hypers = _stationary_hypers()

    def __init__(self, lengthscale: Any = None, variance: Any = None) -> None:
        super().__init__(lengthscale=lengthscale, variance=variance)

    def _eval(self, p, X1, X2, same):
        d2 = _sqdist(p, X1, X2)
        r = math.sqrt(5.0) * _safe_sqrt(d2)
        return p["variance"] * (1.0 + r + 5.0 / 3.0 * d2) * jnp.exp(-r)


class Periodic(Kernel):
    """Exp-sine-squared ``s^2 exp(-2 sin^2(pi d / period) / l^2)`` with ``d`` the Euclidean
    distance between inputs (as scikit-learn's ``ExpSineSquared``); scalar ``lengthscale``."""

    _hypers = {"lengthscale": (_POS, None), "period": (_POS, 1.0), "variance": (_POS, None)}

    def __init__(self, lengthscale: Any = None, period: Any = 1.0, variance: Any = None) -> None:
        super().__init__(lengthscale=lengthscale, period=period, variance=variance)

    def _eval(self, p, X1, X2, same):
        diff = X1[:, None, :] - X2[None, :, :]
        d = _safe_sqrt(jnp.sum(diff * diff, axis=-1))
        s = jnp.sin(math.pi * d / p["period"]) / p["lengthscale"]
        return p["variance"] * jnp.exp(-2.0 * s * s)


class RationalQuadratic(Kernel):
    """Rational quadratic ``s^2 (1 + r^2 / (2 alpha))^(-alpha)``."""

    _hypers = {"lengthscale": (_POS, None), "alpha": (_POS, 1.0), "variance": (_POS, None)}

    def __init__(self, lengthscale: Any = None, alpha: Any = 1.0, variance: Any = None) -> None:
        super().__init__(lengthscale=lengthscale, alpha=alpha, variance=variance)

    def _eval(self, p, X1, X2, same):
        d2 = _sqdist(p, X1, X2)
        return p["variance"] * jnp.exp(-p["alpha"] * jnp.log1p(d2 / (2.0 * p["alpha"])))


class White(Kernel):
    """White noise ``s^2 I`` on ``k(params, X)``; zero between two input sets."""

    _hypers = {"variance": (_POS, None)}

    def __init__(self, variance: Any = None) -> None:
        super().__init__(variance=variance)

    def _eval(self, p, X1, X2, same):
        eye = jnp.eye(X1.shape[0], dtype=X1.dtype) if same else 0.0
        return jnp.zeros((X1.shape[0], X2.shape[0]), X1.dtype) + p["variance"] * eye


class Constant(Kernel):
    """Constant ``s^2`` (a random offset)."""

    _hypers = {"variance": (_POS, None)}

    def __init__(self, variance: Any = None) -> None:
        super().__init__(variance=variance)

    def _eval(self, p, X1, X2, same):
        return jnp.full((X1.shape[0], X2.shape[0]), p["variance"], X1.dtype)


class Linear(Kernel):
    """Linear ``s^2 x . x'`` (Bayesian linear regression through the origin)."""

    _hypers = {"variance": (_POS, 1.0)}

    def __init__(self, variance: Any = 1.0) -> None:
        super().__init__(variance=variance)

    def _eval(self, p, X1, X2, same):
        return p["variance"] * X1 @ X2.T

    def diag(self, params, X):
        X = as_2d(X)
        return params["variance"] * jnp.sum(X * X, axis=-1)


class _Combination(Kernel):
    def __init__(self, *parts: Kernel) -> None:
        flat = []
        for part in parts:
            if not isinstance(part, Kernel):
                raise TypeError(f"{type(self).__name__}: expected kernels, got {part!r}")
            flat.extend(part.parts if type(part) is type(self) else (part,))
        self.parts = tuple(flat)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.parts))})"

    def params_spec(self):
        return tuple(k.params_spec() for k in self.parts)


class Sum(_Combination):
    """``k1 + k2 + ...``; parameters are a tuple of the parts'. Data-driven variances are
    split equally among the parts."""

    def init_params(self, dtype=jnp.float32, x_std=1.0, f_var=1.0):
        return tuple(k.init_params(dtype, x_std, f_var / len(self.parts)) for k in self.parts)

    def _eval(self, params, X1, X2, same):
        return sum(k._eval(p, X1, X2, same) for k, p in zip(self.parts, params, strict=True))

    def diag(self, params, X):
        return sum(k.diag(p, X) for k, p in zip(self.parts, params, strict=True))


class Product(_Combination):
    """``k1 * k2 * ...``; parameters are a tuple of the parts'. A data-driven variance goes
    to the first part, the others' to 1."""

    def init_params(self, dtype=jnp.float32, x_std=1.0, f_var=1.0):
        return tuple(k.init_params(dtype, x_std, f_var if i == 0 else 1.0)
                     for i, k in enumerate(self.parts))

    def _eval(self, params, X1, X2, same):
        out = 1.0
        for k, p in zip(self.parts, params, strict=True):
            out = out * k._eval(p, X1, X2, same)
        return out

    def diag(self, params, X):
        out = 1.0
        for k, p in zip(self.parts, params, strict=True):
            out = out * k.diag(p, X)
        return out
