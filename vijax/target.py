"""The flat unconstrained target: ravel latents, map them to their supports, add log|det J|.

For latents ``z_i = T_i(u_i)`` with ``T_i = biject_to(support_i)`` and all unconstrained blocks
ravelled into one vector ``theta`` of length ``dim``, the target density is

    log p~(theta) = log p(T(theta), x) + sum_i log|det J_{T_i}(u_i)|,

the density of ``theta`` whose push-forward is the posterior. Event-shaped transforms (simplex,
Cholesky factors, ...) change the number of elements: ``theta`` holds the unconstrained ones.

**Discrete latents** (finite supports: ``constraints.boolean``, ``integer_interval(a, b)``)
have no bijection. Their elements follow the continuous ones in the vector, as category
indices ``k = value - low`` in ``[0, num_values)`` stored as (exact, small) floats:
``theta = (theta_continuous (dim,), k (n_discrete,))`` of length ``full_dim``. The density
of ``k`` is the model's probability mass (no Jacobian). Models without discrete latents have
``full_dim == dim``.
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

from vijax.locals import LocalLayout, local_layout

__all__ = ["Target", "LatentBlock", "DiscreteBlock", "ParamBlock", "MAX_NUM_VALUES"]

# largest number of values of a discrete latent's element (its guide holds one logit per value)
MAX_NUM_VALUES = 4096


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


class DiscreteBlock:
    """Layout of one discrete latent: its elements are ``theta[offset:offset + size]``, each a
    category index ``k`` in ``[0, num_values)`` for the value ``low + k``."""

    __slots__ = ("name", "shape", "support", "low", "num_values", "offset", "size")

    def __init__(self, name, shape, support, low, num_values, offset):
        self.name = name
        self.shape = shape
        self.support = support
        self.low = low
        self.num_values = num_values
        self.offset = offset
        self.size = math.prod(shape)

    def __repr__(self) -> str:
        return (f"DiscreteBlock({self.name!r}, shape={self.shape}, values {self.low}.."
                f"{self.low + self.num_values - 1}, offset={self.offset})")


class ParamBlock:
    """Layout of one learnable model parameter: optimised unconstrained as ``u`` of
    ``unconstrained_shape``, passed to the model as ``transform(u)`` of ``shape``."""

    __slots__ = ("name", "shape", "unconstrained_shape", "transform", "support", "init")

    def __init__(self, name, shape, unconstrained_shape, transform, support, init):
        self.name = name
        self.shape = shape
        self.unconstrained_shape = unconstrained_shape
        self.transform = transform
        self.support = support
        self.init = init  # constrained init value (numpy, float64) or None

    @property
    def size(self) -> int:
        return math.prod(self.unconstrained_shape)

    def init_unconstrained(self, dtype) -> jax.Array:
        if self.init is None:
            return jnp.zeros(self.unconstrained_shape, dtype)
        x = jnp.asarray(np.broadcast_to(self.init, self.shape), dtype)
        return jnp.asarray(self.transform.inv(x), dtype).reshape(self.unconstrained_shape)

    def __repr__(self) -> str:
        return f"ParamBlock({self.name!r}, shape={self.shape}, support={self.support})"


class LayerBlock(ParamBlock):
    """A Bayesian layer (:mod:`vijax.nn`): its variational parameters are a dict of arrays in
    the model parameters ``mparams[name]`` (optimised with the guide); the model receives the
    layer's callable value, and ``-KL(q || p)`` of the layer joins the global term."""

    __slots__ = ("layer",)

    def __init__(self, name, layer):
        super().__init__(name, (layer.size,), (layer.size,), IdentityTransform(),
                         constraints.real, None)
        self.layer = layer

    def init_unconstrained(self, dtype, key=None) -> jax.Array:
        return self.layer.init(jax.random.key(0) if key is None else key, dtype)

    def __repr__(self) -> str:
        return f"LayerBlock({self.name!r}, {self.layer!r})"


def _finite_range(name: str, support: constraints.Constraint) -> tuple[int, int]:
    """``(low, num_values)`` of a finite discrete support; errors name the latent."""
    if isinstance(support, type(constraints.boolean)):
        return 0, 2
    if isinstance(support, type(constraints.integer_interval(0, 1))):
        lo, hi = support.lower_bound, support.upper_bound
        if np.ndim(lo) or np.ndim(hi) or isinstance(lo, jax.core.Tracer) or \
                isinstance(hi, jax.core.Tracer):
            raise ValueError(f"discrete latent {name!r}: integer_interval bounds must be "
                             f"scalars (the same range for every element), got {support}")
        lo, hi = int(lo), int(hi)
        if hi < lo:
            raise ValueError(f"discrete latent {name!r}: empty support {support}")
        if hi - lo + 1 > MAX_NUM_VALUES:
            raise ValueError(f"discrete latent {name!r} has {hi - lo + 1} values per element; "
                             f"the categorical guide supports at most {MAX_NUM_VALUES}: "
                             "marginalise it or model it as continuous")
        return lo, hi - lo + 1
    raise ValueError(f"latent {name!r} has a discrete support ({support}) that is not finite "
                     "or not elementwise; vijax fits discrete latents with constraints.boolean "
                     "or constraints.integer_interval(a, b) supports: marginalise this one "
                     "out of the log joint or bound it")


def _make_transform(name: str, shape: tuple[int, ...], support: constraints.Constraint
                    ) -> tuple[Transform, tuple[int, ...]]:
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
        blocks: one :class:`LatentBlock` per continuous latent, in declaration order.
        dim: length of the continuous (unconstrained) part of ``theta``.
        log_joint: ``(z, data) -> scalar`` on constrained values.
        discrete: one :class:`DiscreteBlock` per discrete latent (after the continuous part).
        params: one :class:`ParamBlock` per learnable model parameter (not part of
            ``theta``: a separate dict ``mparams`` of unconstrained values).
        log_prior, log_likelihood: the factorised form's two terms (``None`` for a model
            given as one log joint); minibatches and KL weights need them.
    """

    blocks: tuple[LatentBlock, ...]
    dim: int
    log_joint: Callable[[dict, Any], Any]
    discrete: tuple[DiscreteBlock, ...] = ()
    params: tuple[ParamBlock, ...] = ()
    log_prior: Callable[[dict], Any] | None = None
    log_likelihood: Callable[[dict, Any], Any] | None = None
    locals: Any = None  # vijax.locals.LocalLayout of the local latents, or None

    @classmethod
    def from_model(cls, model) -> Target:
        blocks, offset = [], 0
        finite = []
        for name, lat in model.latents.items():
            if lat.local:
                continue
            if lat.support.is_discrete:
                finite.append((name, lat, *_finite_range(name, lat.support)))
                continue
            transform, unc_shape = _make_transform(name, lat.shape, lat.support)
            block = LatentBlock(name, lat.shape, unc_shape, transform, offset, lat.support)
            blocks.append(block)
            offset += block.size
        dim, discrete = offset, []
        for name, lat, low, num_values in finite:
            discrete.append(DiscreteBlock(name, lat.shape, lat.support, low, num_values, offset))
            offset += discrete[-1].size
        params = []
        for name, par in getattr(model, "params", {}).items():
            transform, unc_shape = _make_transform(name, par.shape, par.support)
            init = None if par.init is None else np.asarray(par.init, np.float64)
            params.append(ParamBlock(name, par.shape, unc_shape, transform, par.support, init))
        for name, layer in getattr(model, "layers", {}).items():
            params.append(LayerBlock(name, layer))
        locals_ = local_layout(model.latents, _make_transform, _finite_range)
        if locals_ is None and getattr(model, "layers", None):
            locals_ = LocalLayout(())  # Bayesian layers: the structured (local) fit path
        return cls(tuple(blocks), dim, model.log_density, tuple(discrete), tuple(params),
                   model.log_prior, model.log_likelihood, locals_)

    @property
    def param_names(self) -> tuple[str, ...]:
        """Names of the learnable model parameters (and of the Bayesian layers, whose
        variational parameters are held beside them)."""
        return tuple(b.name for b in self.params)

    @property
    def has_locals(self) -> bool:
        """Whether the model has local latents (a model with Bayesian layers and none has an
        empty layout: it is fitted by the same driver)."""
        return self.locals is not None and bool(self.locals.blocks)

    @property
    def plain_params(self) -> tuple[ParamBlock, ...]:
        """The :class:`vijax.Param` blocks (without the Bayesian layers)."""
        return tuple(b for b in self.params if not isinstance(b, LayerBlock))

    @property
    def layers(self) -> tuple[LayerBlock, ...]:
        """The Bayesian layers (:mod:`vijax.nn`), in declaration order."""
        return tuple(b for b in self.params if isinstance(b, LayerBlock))

    @property
    def factorised(self) -> bool:
        """Whether the log density is ``log_prior + sum(log_likelihood)`` (minibatchable)."""
        return self.log_likelihood is not None

    def param_init(self, dtype, key: jax.Array | None = None) -> dict[str, jax.Array]:
        """Unconstrained initial model parameters (a dict; empty without parameters). The
        Bayesian layers' random initial weights come from ``key`` (``None``: a fixed key)."""
        out = {}
        for i, b in enumerate(self.params):
            if isinstance(b, LayerBlock):
                out[b.name] = b.init_unconstrained(
                    dtype, None if key is None else jax.random.fold_in(key, i))
            else:
                out[b.name] = b.init_unconstrained(dtype)
        return out

    def constrain_params(self, mparams: Mapping[str, jax.Array] | None, dtype
                         ) -> dict[str, jax.Array]:
        """Constrained model parameters from unconstrained ``mparams`` (``None``: the init);
        the :class:`vijax.Param` ones only (not the Bayesian layers)."""
        if mparams is None:
            mparams = self.param_init(dtype)
        return {b.name: b.transform(mparams[b.name]) for b in self.plain_params}

    def layer_values(self, mparams: Mapping[str, jax.Array] | None, dtype,
                     key: jax.Array | None = None, mode: str | None = None
                     ) -> tuple[dict[str, Any], dict[str, jax.Array]]:
        """The Bayesian layers' values (what the model receives) and ``-KL(q || p)`` per
        layer. ``mode``: ``"train"`` (the layers' estimators; needs ``key``), ``"sample"``
        (one weight draw each, by ``key``) or ``"mean"``; default ``"train"`` with a key and
        ``"mean"`` without. A Monte Carlo KL (scale-mixture prior) uses ``key`` (or a fixed
        one)."""
        if mparams is None:
            mparams = self.param_init(dtype)
        mode = mode or ("mean" if key is None else "train")
        values, neg_kl = {}, {}
        for i, b in enumerate(self.layers):
            k = None if key is None else jax.random.fold_in(key, i)
            k_val, k_kl = (None, None) if k is None else jax.random.split(k)
            flat = mparams[b.name]
            values[b.name] = b.layer.value(flat, k_val, mode, b.name)
            neg_kl[b.name] = -b.layer.kl(flat, k_kl)
        return values, neg_kl

    def split_params(self, params) -> tuple[Any, Any]:
        """``(guide params, model params)`` of the loop's parameters (``(params, None)``
        for a model without parameters)."""
        return params if self.params else (params, None)

    def values(self, theta: jax.Array, mparams: Any = None, key: jax.Array | None = None,
               mode: str | None = None) -> dict[str, jax.Array]:
        """Everything the model receives in ``z``: constrained latents, parameters and the
        Bayesian layers' values (see :meth:`layer_values` for ``key`` and ``mode``)."""
        return self._values(theta, mparams, key, mode)[0]

    def _values(self, theta, mparams, key=None, mode=None):
        """``(z, global terms)``: the global terms are ``log|det J|`` per continuous latent
        and ``-KL(q || p)`` per Bayesian layer (both join ``log_prior`` in the ELBO)."""
        z, log_det = self.constrain_with_log_det(theta)
        if self.params:
            z.update(self.constrain_params(mparams, theta.dtype))
        if self.layers:
            values, neg_kl = self.layer_values(mparams, theta.dtype, key, mode)
            z.update(values)
            log_det.update(neg_kl)
        return z, log_det

    @property
    def names(self) -> tuple[str, ...]:
        """Names of the continuous latents (those with a block in the continuous part)."""
        return tuple(b.name for b in self.blocks)

    @property
    def discrete_names(self) -> tuple[str, ...]:
        return tuple(b.name for b in self.discrete)

    @property
    def all_names(self) -> tuple[str, ...]:
        return self.names + self.discrete_names

    @property
    def n_discrete(self) -> int:
        """Number of discrete elements (the tail of ``theta``)."""
        return sum(b.size for b in self.discrete)

    @property
    def full_dim(self) -> int:
        """Length of ``theta``: ``dim + n_discrete``."""
        return self.dim + self.n_discrete

    def block(self, name: str) -> LatentBlock | DiscreteBlock:
        for b in self.blocks + self.discrete:
            if b.name == name:
                return b
        raise KeyError(f"unknown latent {name!r}; the model's latents are "
                       f"{list(self.all_names)}")

    # --- single-draw maps (vmap at the boundary) -------------------------------------------
    def unravel(self, theta: jax.Array) -> dict[str, jax.Array]:
        """``theta`` (full_dim,) -> dict of unconstrained blocks of ``unconstrained_shape``
        (continuous latents only)."""
        return {b.name: theta[b.offset:b.offset + b.size].reshape(b.unconstrained_shape)
                for b in self.blocks}

    def discrete_values(self, theta: jax.Array) -> dict[str, jax.Array]:
        """The discrete latents' values (int32, declared shapes) from ``theta``'s tail."""
        return {b.name: (jnp.round(theta[b.offset:b.offset + b.size]).astype(jnp.int32)
                         + b.low).reshape(b.shape)
                for b in self.discrete}

    def constrain(self, theta: jax.Array) -> dict[str, jax.Array]:
        """``theta`` (full_dim,) -> dict of constrained latent values (declared shapes)."""
        z = {b.name: b.transform(u) for b, u in zip(self.blocks, self.unravel(theta).values(),
                                                    strict=True)}
        return {**z, **self.discrete_values(theta)}

    def constrain_with_log_det(self, theta: jax.Array) -> tuple[dict, dict]:
        """Constrained values and, per continuous latent, the scalar ``log|det J_T(u)|``."""
        z, log_det = {}, {}
        for b, u in zip(self.blocks, self.unravel(theta).values(), strict=True):
            x = b.transform(u)
            z[b.name] = x
            log_det[b.name] = (jnp.zeros((), theta.dtype) if b.is_identity
                               else jnp.sum(b.transform.log_abs_det_jacobian(u, x)))
        z.update(self.discrete_values(theta))
        return z, log_det

    def log_density(self, theta: jax.Array, data: Any,
                    no_jacobian: frozenset[str] = frozenset(), mparams: Any = None
                    ) -> jax.Array:
        """Scalar ``log p(T(theta), x) + sum log|det J|`` (latents in ``no_jacobian`` omit it).

        Omitting the Jacobian for a latent gives the density of its *constrained* value: point
        estimates (the delta guide) maximise that, so that MAP means the constrained mode.
        ``mparams``: the unconstrained model parameters (``None``: their init values).
        """
        z, log_det = self._values(theta, mparams)
        lp = jnp.asarray(self.log_joint(z, data))
        for name, ld in log_det.items():
            if name not in no_jacobian:
                lp = lp + ld
        return lp

    def log_density_terms(self, theta: jax.Array, batch: Any,
                          no_jacobian: frozenset[str] = frozenset(), mparams: Any = None
                          ) -> tuple[jax.Array, jax.Array]:
        """The factorised density's two terms at ``theta``: ``(global, local)`` with
        ``global = log_prior + sum log|det J|`` and ``local = sum(log_likelihood(z, batch))``
        over the batch's observations (scalars). Minibatch scaling and KL weights combine
        them as ``scale * local + kl_weight * global``."""
        z, log_det = self._values(theta, mparams)
        glob = jnp.asarray(self.log_prior(z))
        for name, ld in log_det.items():
            if name not in no_jacobian:
                glob = glob + ld
        return glob, jnp.sum(self.log_likelihood(z, batch))

    def unconstrain(self, z: Mapping[str, Any], dtype) -> jax.Array:
        """Inverse of :meth:`constrain` for a full dict of constrained values -> (full_dim,)."""
        parts = []
        for b in self.blocks:
            x = jnp.asarray(z[b.name], dtype)
            parts.append(jnp.ravel(b.transform.inv(x)))
        for b in self.discrete:
            parts.append(jnp.ravel(jnp.asarray(z[b.name]) - b.low).astype(dtype))
        return jnp.concatenate(parts) if parts else jnp.zeros((0,), dtype)

    def check_values(self, z: Mapping[str, Any]) -> None:
        """Validate constrained values (names, shapes, support); errors name the latent."""
        if not isinstance(z, Mapping):
            raise TypeError(f"expected a dict from latent name to value, got {type(z)}")
        unknown = sorted(set(z) - set(self.all_names))
        if unknown:
            raise ValueError(f"unknown latent name(s) {unknown}; the model's latents are "
                             f"{list(self.all_names)}")
        for name, value in z.items():
            b = self.block(name)
            try:
                v = np.asarray(value)
            except ValueError:  # a ragged list
                v = np.asarray(None)
            if v.dtype.kind not in "biuf":
                raise TypeError(f"latent {name!r}: value must be a number or an array of "
                                f"numbers, got {type(value).__name__} {value!r}")
            if v.shape != b.shape:
                raise ValueError(f"latent {name!r}: value has shape {v.shape}, "
                                 f"declared shape is {b.shape}")
            if not np.all(np.isfinite(v)):
                raise ValueError(f"latent {name!r}: value is not finite: {v}")
            if isinstance(b, DiscreteBlock) and not np.all(v == np.round(v)):
                raise ValueError(f"discrete latent {name!r}: value {v} is not integer-valued")
            ok = np.asarray(b.support.check(jnp.asarray(v)))
            if not np.all(ok):
                raise ValueError(f"latent {name!r}: value {v} lies outside its support "
                                 f"{b.support}")

    def describe(self, theta) -> str:
        """Human-readable per-latent constrained values of ``theta`` (for error messages)."""
        z = self.constrain(jnp.asarray(theta))
        return ", ".join(f"{k}={np.array2string(np.asarray(v), precision=4, threshold=12)}"
                         for k, v in z.items())
