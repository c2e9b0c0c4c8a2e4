"""Value, gradient and Hessian of a scalar function by the first method that works on it.

``jax.hessian`` is forward-over-reverse (``jacfwd(grad(f))``), which fails at trace time on a
function whose derivative runs through a ``jax.custom_vjp`` that forward mode cannot enter
(``jax.experimental.ode.odeint``, diffrax adjoints, external solvers behind callbacks). For
``f: R^d -> R`` (plus extra arguments that are not differentiated) the methods tried, in order:

1. ``"forward-over-reverse"``: ``H = jacfwd(grad f)``, d forward passes over the gradient.
2. ``"reverse-over-reverse"``: ``H = jacrev(grad f)``, d reverse passes over the gradient.
3. ``"finite differences"``: central differences of the gradient,
   ``H[:, i] = (g(x + h_i e_i) - g(x - h_i e_i)) / (2 h_i)`` with
   ``h_i = eps^(1/3) max(1, |x_i|)``, then ``H <- (H + H^T) / 2``. The step balances the
   truncation error ``h^2 |d^3 g| / 6`` against the rounding error ``eps |g| / h``, so each entry
   is good to about ``eps^(2/3)`` relative to the gradient's scale (2e-11 in float64,
   2e-5 in float32); the step actually taken, ``fl(x + h) - fl(x - h)``, is the denominator.

The method is chosen once per function and argument signature (shapes, dtypes, tree
structure) by tracing each candidate abstractly (``jax.eval_shape``; no compilation), and the
chosen computation is compiled with ``jax.jit`` and kept in an ``lru_cache``, so a second call
with new values of the same shapes compiles and traces nothing.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

__all__ = ["METHODS", "Curvature", "hessian_fn"]

METHODS = ("forward-over-reverse", "reverse-over-reverse", "finite differences")
"""The Hessian methods, in the order they are tried."""

_AD_FAILURES = (TypeError, ValueError, NotImplementedError)
"""What tracing a second derivative raises where a rule is missing (``custom_vjp`` under
forward mode: TypeError; a callback or a dynamic ``while_loop`` under AD: ValueError)."""


class Curvature(NamedTuple):
    """Second-order expansion of ``f`` at ``x``: ``f(x + s) ~ value + grad.s + s.hess.s / 2``."""

    value: jax.Array  # () f(x)
    grad: jax.Array  # (d,) gradient of f at x
    hess: jax.Array  # (d, d) Hessian of f at x, symmetric
    method: str  # one of METHODS: how ``hess`` was computed


def _ad_hessian(jac: Callable, f: Callable) -> Callable:
    """``(x, *args) -> (value, grad, hess)`` with ``hess = jac(grad f)``; value and gradient
    come out of the same pass as auxiliary outputs."""
    def grad_aux(x, *args):
        value, grad = jax.value_and_grad(f)(x, *args)
        return grad, (value, grad)

    def value_grad_hess(x, *args):
        hess, (value, grad) = jac(grad_aux, has_aux=True)(x, *args)
        return value, grad, hess

    return value_grad_hess


def _fd_hessian(f: Callable) -> Callable:
    """``(x, *args) -> (value, grad, hess)`` with ``hess`` by central differences of the
    gradient (module docstring). The 2d gradients run through ``lax.map``, not ``vmap``, so
    that functions without a batching rule (callbacks) work too."""
    grad_f = jax.grad(f)

    def value_grad_hess(x, *args):
        value, grad = jax.value_and_grad(f)(x, *args)
        step = jnp.finfo(x.dtype).eps ** (1 / 3) * jnp.maximum(1, jnp.abs(x))
        plus, minus = x + jnp.diag(step), x - jnp.diag(step)  # row i: x +- h_i e_i
        grads = jax.lax.map(lambda y: grad_f(y, *args), jnp.concatenate([plus, minus]))
        d = x.shape[0]
        cols = (grads[:d] - grads[d:]) / jnp.diag(plus - minus)[:, None]  # row i: H[:, i]
        return value, grad, (cols + cols.T) / 2

    return value_grad_hess


_BUILDERS = {
    "forward-over-reverse": functools.partial(_ad_hessian, jax.jacfwd),
    "reverse-over-reverse": functools.partial(_ad_hessian, jax.jacrev),
    "finite differences": _fd_hessian,
}


@functools.lru_cache(maxsize=64)
def _compiled(f: Callable, methods: tuple[str, ...], treedef, avals: tuple) -> tuple[Callable, str]:
    """The jitted ``(x, *args) -> (value, grad, hess)`` of the first method in ``methods`` that
    traces for arguments of this signature, and the method's name."""
    specs = jax.tree.unflatten(
        treedef, [jax.ShapeDtypeStruct(a.shape, a.dtype, weak_type=a.weak_type) for a in avals])
    try:
        jax.eval_shape(jax.value_and_grad(f), *specs)
    except Exception as err:
        raise TypeError(f"hessian_fn: cannot take the gradient of {f!r}, so it has no "
                        f"Hessian by any method: {type(err).__name__}: {err}") from err
    failures = []
    for method in methods:
        fn = _BUILDERS[method](f)
        try:
            jax.eval_shape(fn, *specs)
        except _AD_FAILURES as err:
            failures.append(f"{method}: {type(err).__name__}: {err}")
            continue
        return jax.jit(fn), method
    raise TypeError(f"hessian_fn: no method in {methods} works on {f!r}:\n" + "\n".join(failures))


def _aval(x):
    """The abstract value (shape, dtype, weak type; hashable) of an argument: ``jax.typeof``
    where this jax has it, else ``jax.core.get_aval`` (the lower bound, jax 0.5.3)."""
    typeof = getattr(jax, "typeof", None)
    return typeof(x) if typeof is not None else jax.core.get_aval(x)


def hessian_fn(f: Callable, methods: tuple[str, ...] = METHODS) -> Callable[..., Curvature]:
    """Value, gradient and Hessian of a scalar function, by the first method that works.

    Args:
        f: ``f(x, *args) -> ()`` scalar, ``x`` of shape ``(d,)`` and floating dtype. Must be
            hashable (a function is); it is a cache key, like ``jax.jit``'s.
        methods: the methods to try, in order; a subset of ``METHODS`` (e.g.
            ``("finite differences",)`` to force one).

    Returns:
        ``curvature(x, *args) -> Curvature(value (), grad (d,), hess (d, d), method)``. The
        method is chosen and the computation compiled on the first call per argument
        signature; later calls with new values of the same shapes reuse both.

    Raises:
        TypeError: (on the first call) ``f`` has no gradient, or no listed method traces.
        ValueError: ``x`` is not a 1-D floating array, or ``methods`` names an unknown method.

    Example:
        >>> import jax.numpy as jnp
        >>> curvature = hessian_fn(lambda x, a: a * jnp.sum(x ** 3))
        >>> value, grad, hess, method = curvature(jnp.array([1.0, 2.0]), 2.0)
        >>> print(value, grad, method)
        18.0 [ 6. 24.] forward-over-reverse
        >>> hess
        Array([[12.,  0.],
               [ 0., 24.]], dtype=float32)
    """
    unknown = [m for m in methods if m not in _BUILDERS]
    if unknown or not methods:
        raise ValueError(f"hessian_fn: methods must be a non-empty subset of {METHODS}, "
                         f"got {methods!r}")
    methods = tuple(methods)

    def curvature(x: jax.Array, *args: Any) -> Curvature:
        x = jnp.asarray(x)
        if x.ndim != 1 or not jnp.issubdtype(x.dtype, jnp.floating):
            raise ValueError(f"hessian_fn: x must be a 1-D floating array, got shape "
                             f"{x.shape} and dtype {x.dtype}")
        leaves, treedef = jax.tree.flatten((x, *args))
        fn, method = _compiled(f, methods, treedef, tuple(map(_aval, leaves)))
        return Curvature(*fn(x, *args), method)

    return curvature
