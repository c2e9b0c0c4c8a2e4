"""Model specification: latent declarations and the log joint density.

A model is a pure function of a dict of *constrained* latent values and a data pytree that
returns the scalar log joint density ``log p(z, x)``. Latents are declared once, with their
shape and support; :mod:`vijax.target` turns the declaration into a flat unconstrained vector.
"""

from __future__ import annotations

import dataclasses
import functools
import keyword
import math
import operator
import os
import sys
import warnings
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.core import ClosedJaxpr, Jaxpr, Literal
from numpyro.distributions import constraints

__all__ = ["Latent", "Param", "Model", "model", "ModelWarning", "check_influence"]


class ModelWarning(UserWarning):
    """The model is probably not what was meant: a latent that does not influence the log
    density (its posterior is flat, improper on an unbounded support), an observed NumPyro
    site whose data was not passed, masked latent elements."""


def _as_shape(shape: Any) -> tuple[int, ...]:
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"shape must be a tuple of non-negative ints, got {shape!r}") from None
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int | jnp.integer) or int(d) < 0:
            raise ValueError(f"shape must be a tuple of non-negative ints, got {shape!r}")
    return tuple(int(d) for d in dims)


def _normalise_declaration(decl: Any) -> None:
    """A latent's or parameter's shape as a tuple of ints, and its support checked."""
    object.__setattr__(decl, "shape", _as_shape(decl.shape))
    if not isinstance(decl.support, constraints.Constraint):
        raise TypeError(
            "support must be a numpyro constraint (numpyro.distributions.constraints), "
            f"got {decl.support!r}"
        )


@dataclasses.dataclass(frozen=True, eq=False)
class Latent:
    """Declaration of one latent variable.

    Args:
        shape: shape of the latent's constrained value, e.g. ``()`` or ``(8,)`` or ``(3, 3)``
            for a matrix-valued latent (an ``int`` n means ``(n,)``).
        support: a numpyro constraint (``constraints.real``, ``positive``, ``interval(a, b)``,
            ``simplex``, ``lower_cholesky``, ...). vijax maps the real line onto it with
            ``numpyro.distributions.transforms.biject_to`` and adds the log-Jacobian.
        local: one value per observation (a *local* latent, e.g. a VAE's code or a label):
            ``shape`` is one observation's; the model's ``log_likelihood(z, data)``
            receives ``z[name]`` of shape ``(B,) + shape`` for a batch of B rows, and must
            include the latent's own prior in its per-row values. Local latents are never
            part of the global vector; their guide is per observation
            (:class:`vijax.guides.Amortized`, the default, or
            :class:`vijax.guides.LocalTable`). Factorised models only.
        observed: (local discrete latents) the data key holding the latent's value where
            it is observed: rows whose value lies in the support are observed (e.g. the
            labelled rows of semi-supervised learning), rows with any other value (e.g.
            -1) are inferred.

    Example:
        >>> from numpyro.distributions import constraints
        >>> Latent(shape=(3,), support=constraints.simplex).shape
        (3,)
    """

    shape: tuple[int, ...] = ()
    support: constraints.Constraint = dataclasses.field(default_factory=lambda: constraints.real)
    local: bool = False
    observed: str | None = None

    def __repr__(self) -> str:
        extra = (", local=True" if self.local else "") + (
            f", observed={self.observed!r}" if self.observed is not None else "")
        return f"Latent(shape={self.shape}, support={self.support}{extra})"

    def __post_init__(self) -> None:
        _normalise_declaration(self)
        if not isinstance(self.local, bool):
            raise TypeError(f"local must be True or False, got {self.local!r}")
        if self.observed is not None:
            if not isinstance(self.observed, str):
                raise TypeError(f"observed must be the name of a data key (a str), got "
                                f"{self.observed!r}")
            if not (self.local and self.support.is_discrete):
                raise ValueError(f"observed={self.observed!r} marks a partly observed local "
                                 "discrete latent (e.g. labels in semi-supervised learning); "
                                 "declare it with local=True and a discrete support")


@dataclasses.dataclass(frozen=True, eq=False)
class Param:
    """Declaration of one learnable model parameter (a point value, not a latent).

    Model parameters are optimised jointly with the guide: maximising the ELBO over them is
    type-II maximum likelihood / variational EM (the ELBO is a lower bound on the marginal
    likelihood ``log p(x; param)``). The model receives the constrained value in the same
    dict as the latents; the fit returns it as ``res.model_params``.

    Args:
        shape: shape of the constrained value (an ``int`` n means ``(n,)``).
        init: initial constrained value (broadcast to ``shape``); ``None``: the image of 0
            under ``biject_to(support)`` (0 on the real line, 1 for positive, the midpoint
            of an interval, the uniform simplex, the identity Cholesky factor).
        support: a numpyro constraint; the optimiser works on ``biject_to(support)^-1``.

    Example:
        >>> from numpyro.distributions import constraints
        >>> Param(init=2.0, support=constraints.positive).shape
        ()
    """

    shape: tuple[int, ...] = ()
    init: Any = None
    support: constraints.Constraint = dataclasses.field(default_factory=lambda: constraints.real)

    def __post_init__(self) -> None:
        _normalise_declaration(self)


def _bounds(support: constraints.Constraint) -> tuple[Any, Any] | None:
    """Concrete ``(lower, upper)`` bounds of an interval support (under ``independent``
    wrappers); ``None`` for other supports or traced bounds."""
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    if not (hasattr(support, "lower_bound") and hasattr(support, "upper_bound")):
        return None
    bounds = (support.lower_bound, support.upper_bound)
    if any(isinstance(b, jax.core.Tracer) for b in bounds):
        return None
    return np.asarray(bounds[0], float), np.asarray(bounds[1], float)


def _check_latent(name: str, lat: Latent) -> None:
    """Refuse a latent without elements or with an empty or unbounded interval support."""
    if math.prod(lat.shape) == 0:
        raise ValueError(f"latent {name!r} has shape {lat.shape}, which has no elements; a "
                         "latent needs at least one element: fix the shape or remove the "
                         "latent")
    bounds = _bounds(lat.support)
    if bounds is None:
        return
    lo, hi = bounds
    try:
        lo, hi = np.broadcast_arrays(lo, hi)
    except ValueError:
        raise ValueError(f"latent {name!r}: the bounds of its support {lat.support} have "
                         f"shapes {lo.shape} and {hi.shape}, which do not broadcast") from None
    if lat.support.is_discrete:
        empty = ~(np.ceil(lo) <= np.floor(hi))
    else:
        empty = ~(lo < hi)  # NaN bounds are empty too
    if np.any(empty):
        i = tuple(int(j) for j in np.argwhere(empty)[0])
        raise ValueError(f"latent {name!r}: its support {lat.support} is empty (lower bound "
                         f"{lo[i]} is not below upper bound {hi[i]}"
                         f"{' at index ' + str(i) if i else ''}); give the bounds as "
                         "(low, high) with low < high")
    if not lat.support.is_discrete and not (np.all(np.isfinite(lo)) and np.all(np.isfinite(hi))):
        raise ValueError(f"latent {name!r}: the interval support {lat.support} needs finite "
                         "bounds; for a half-line use constraints.greater_than(low) or "
                         "constraints.less_than(high), for the real line constraints.real")


def _check_param(name: str, par: Param) -> None:
    """Refuse a parameter with a discrete support, an init of the wrong shape, or an init
    that is not finite or lies outside its support."""
    if not isinstance(par, Param):
        raise TypeError(f"parameter {name!r} must be declared with vj.Param(...), got {par!r}")
    if par.support.is_discrete:
        raise ValueError(f"parameter {name!r} has a discrete support ({par.support}); model "
                         "parameters are optimised by gradients and must be continuous: "
                         "declare it as a vj.Latent to infer it")
    if par.init is None:
        return
    try:
        v = np.asarray(par.init, dtype=float)
    except (TypeError, ValueError):
        raise TypeError(f"parameter {name!r}: init must be a number or an array of numbers, "
                        f"got {par.init!r}") from None
    try:
        v = np.broadcast_to(v, par.shape)
    except ValueError:
        raise ValueError(f"parameter {name!r}: init has shape {v.shape}, which does not "
                         f"broadcast to the declared shape {par.shape}") from None
    if not np.all(np.isfinite(v)):
        raise ValueError(f"parameter {name!r}: init {v} is not finite")
    ok = np.asarray(par.support.check(jnp.asarray(v)))
    if not np.all(ok):
        raise ValueError(f"parameter {name!r}: init {v} lies outside its support "
                         f"{par.support}; give an init inside it")


def _validate_params(params: Any, latents: Mapping[str, Latent]) -> dict[str, Param]:
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a dict from name to vj.Param, got {type(params)}")
    out = {}
    for name, par in params.items():
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise ValueError(f"invalid parameter name {name!r}: names must be Python "
                             "identifiers")
        if name in latents:
            raise ValueError(f"{name!r} is declared both as a latent and as a parameter; a "
                             "name is either inferred (vj.Latent) or optimised (vj.Param)")
        _check_param(name, par)
        out[name] = par
    return out


def _split_layers(latents: Any, layers: Any) -> tuple[Any, dict]:
    """Bayesian layers (:mod:`vijax.nn`) given among the latents move to their own dict."""
    from vijax.nn.layers import Layer

    if layers is None:
        layers = {}
    if not isinstance(layers, Mapping):
        raise TypeError(f"layers must be a dict from name to a vj.nn layer, got {type(layers)}")
    layers = dict(layers)
    for name, lay in layers.items():
        if not isinstance(lay, Layer):
            raise TypeError(f"layer {name!r} must be a vj.nn layer (vj.nn.Dense, ...), got "
                            f"{lay!r}")
    if isinstance(latents, Mapping):
        for name, v in latents.items():
            if isinstance(v, Layer):
                if name in layers:
                    raise ValueError(f"{name!r} is declared twice (in latents and layers)")
                layers[name] = v
        latents = {k: v for k, v in latents.items() if not isinstance(v, Layer)}
    for name in layers:
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise ValueError(f"invalid layer name {name!r}: names must be Python identifiers")
    return latents, layers


def _validate_latents(latents: Any, allow_empty: bool = False) -> dict[str, Latent]:
    if not isinstance(latents, Mapping):
        raise TypeError(f"latents must be a dict from name to vj.Latent, got {type(latents)}")
    if not latents and not allow_empty:
        raise ValueError("a model needs at least one latent; got an empty latents dict")
    out = {}
    for name, lat in latents.items():
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise ValueError(f"invalid latent name {name!r}: names must be Python identifiers")
        if not isinstance(lat, Latent):
            raise TypeError(f"latent {name!r} must be declared with vj.Latent(...), got {lat!r}")
        _check_latent(name, lat)
        out[name] = lat
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A probabilistic model: declared latents plus a log joint density.

    Give either ``log_joint(z, data) -> scalar``, or the factorised form
    ``log_prior(z) -> scalar`` plus ``log_likelihood(z, data) -> (N,)`` (one value per
    observation; the leading axis of every data leaf is the observation axis). In both, ``z``
    is a dict of constrained latent values of the declared shapes.

    Args:
        log_joint: ``(z: dict, data: pytree) -> scalar`` log density up to a constant.
        latents: dict from latent name to :class:`Latent`.
        log_prior: factorised form, ``(z) -> scalar``.
        log_likelihood: factorised form, ``(z, data) -> (N,)``.
        data: optional data pytree bound to the model, used by ``fit`` when none is given.
        params: dict from name to :class:`Param`: learnable model parameters, passed to the
            model in the same dict ``z`` as the latents (constrained values) and optimised
            jointly with the guide (type-II maximum likelihood); ``res.model_params``.
        layers: dict from name to a Bayesian layer (:mod:`vijax.nn`: ``Dense``,
            ``DropoutDense``, ``SparseDense``), which may also be given among ``latents``.
            The model receives a callable ``z[name](h)``; each layer carries its own prior
            and mean-field posterior, whose KL enters the ELBO's global term. Factorised
            form only; a model may have layers and no latents.

    Example:
        >>> import numpyro.distributions as dist
        >>> m = Model(lambda z, d: dist.Normal(z["mu"], 1.0).log_prob(d).sum(),
        ...           {"mu": Latent()})
        >>> sorted(m.latents)
        ['mu']
    """

    log_joint: Callable[[dict, Any], Any] | None = None
    latents: Mapping[str, Latent] = dataclasses.field(default_factory=dict)
    log_prior: Callable[[dict], Any] | None = None
    log_likelihood: Callable[[dict, Any], Any] | None = None
    data: Any = None
    target: Any = dataclasses.field(default=None, repr=False)
    params: Mapping[str, Param] = dataclasses.field(default_factory=dict)
    layers: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        from vijax.target import Target  # the target stage is built from the spec, once

        latents, layers = _split_layers(self.latents, self.layers)
        object.__setattr__(self, "layers", layers)
        object.__setattr__(self, "latents", _validate_latents(latents, bool(layers)))
        object.__setattr__(self, "params", _validate_params(self.params, self.latents))
        for name in layers:
            if name in self.params or name in self.latents:
                raise ValueError(f"{name!r} is declared both as a Bayesian layer and as a "
                                 "latent or parameter")
        factorised = self.log_prior is not None or self.log_likelihood is not None
        if layers and not factorised:
            raise ValueError(f"Bayesian layer {next(iter(layers))!r} needs the factorised "
                             "form of the model: give log_prior(z) (the other latents' "
                             "priors; the layers carry their own) and log_likelihood(z, "
                             "data) -> one value per observation, instead of one log_joint")
        if self.log_joint is not None and factorised:
            raise ValueError("give either log_joint, or log_prior and log_likelihood, not both")
        if self.log_joint is None and not factorised:
            raise ValueError("a model needs log_joint, or log_prior and log_likelihood")
        if factorised and (self.log_prior is None or self.log_likelihood is None):
            missing = "log_prior" if self.log_prior is None else "log_likelihood"
            raise ValueError(f"the factorised form needs both log_prior and log_likelihood; "
                             f"{missing} is missing")
        for fname in ("log_joint", "log_prior", "log_likelihood"):
            fn = getattr(self, fname)
            if fn is not None and not callable(fn):
                raise TypeError(f"{fname} must be callable, got {fn!r}")
        local = [n for n, lat in self.latents.items() if lat.local]
        if local and not factorised:
            raise ValueError(f"latent {local[0]!r} is local (one value per observation), which "
                             "needs the factorised form: give log_prior(z) (global latents) "
                             "and log_likelihood(z, data) -> one value per observation, "
                             "including each local latent's prior, instead of one log_joint")
        if self.target is None:
            object.__setattr__(self, "target", Target.from_model(self))

    @property
    def factorised(self) -> bool:
        """Whether the model was given as ``log_prior`` plus per-observation ``log_likelihood``."""
        return self.log_joint is None

    def log_density(self, z: dict, data: Any) -> Any:
        """Log joint density at constrained values ``z`` (scalar); sums the factorised form."""
        if self.log_joint is not None:
            return self.log_joint(z, data)
        return self.log_prior(z) + jnp.sum(self.log_likelihood(z, data))

    def with_data(self, data: Any) -> Model:
        """The same model (same compiled code) with other data bound to it."""
        return dataclasses.replace(self, data=data)


def model(**declared: Latent | Param) -> Callable[[Callable], Model]:
    """Decorator: ``@vj.model(mu=vj.Latent(), ...)`` turns ``log_joint(z, data)`` into a Model.

    Keyword arguments declare latents (:class:`Latent`) and learnable model parameters
    (:class:`Param`); the model receives both in ``z``.

    Example:
        >>> import numpyro.distributions as dist
        >>> @model(mu=Latent())
        ... def m(z, data):
        ...     return dist.Normal(0, 1).log_prob(z["mu"])
        >>> isinstance(m, Model)
        True
    """

    def wrap(fn: Callable) -> Model:
        if not callable(fn):
            raise TypeError(f"@vj.model must decorate a function, got {fn!r}")
        latents = {k: v for k, v in declared.items() if not isinstance(v, Param)}
        params = {k: v for k, v in declared.items() if isinstance(v, Param)}
        return Model(log_joint=fn, latents=latents, params=params)

    return wrap


# ---------------------------------------------------------------------------------------------
# which latents the log density depends on: a structural check on the traced program (jaxpr),
# with no values and nothing compiled
def _sub_jaxpr(eqn) -> Jaxpr | None:
    """The inner program of a call-like equation (``jit``, ``custom_jvp_call``, ...) whose
    inputs and outputs are the equation's own; ``None`` for anything else."""
    for key in ("jaxpr", "call_jaxpr"):
        sub = eqn.params.get(key)
        if isinstance(sub, ClosedJaxpr):
            sub = sub.jaxpr
        if isinstance(sub, Jaxpr) and len(sub.invars) == len(eqn.invars) and \
                len(sub.outvars) == len(eqn.outvars):
            return sub
    return None


def _propagate(jaxpr: Jaxpr, in_deps: list[int]) -> list[int]:
    env = dict(zip(jaxpr.invars, in_deps, strict=True))

    def read(v) -> int:
        return 0 if isinstance(v, Literal) else env.get(v, 0)

    for eqn in jaxpr.eqns:
        ins = [read(v) for v in eqn.invars]
        sub = _sub_jaxpr(eqn)
        if sub is not None:
            outs = _propagate(sub, ins)
        else:  # control flow and every other primitive: each output may use every input
            outs = [functools.reduce(operator.or_, ins, 0)] * len(eqn.outvars)
        env.update(zip(eqn.outvars, outs, strict=True))
    return [read(v) for v in jaxpr.outvars]


def output_dependence(fn: Callable, *args: Any) -> list[int]:
    """For each output leaf of ``fn(*args)``, the bitmask of the input leaves (``args``
    flattened, bit ``i`` for leaf ``i``) it may depend on.

    Found on the traced program (``jax.make_jaxpr``: nothing is compiled or run): an output
    depends on an input when a chain of operations joins them. This over-approximates (``0 *
    x`` and a branch never taken count as dependence), so "no bit set" is certain: the output
    is the same for every value of that input.

    Example:
        >>> import jax.numpy as jnp
        >>> output_dependence(lambda a, b, c: (a * c, jnp.sin(b)), 1.0, 2.0, 3.0)
        [5, 2]
    """
    closed = jax.make_jaxpr(fn)(*args)
    return _propagate(closed.jaxpr, [1 << i for i in range(len(closed.jaxpr.invars))])


def check_influence(model: Model, data: Any, dtype: Any) -> None:
    """Warn (:class:`ModelWarning`) when the log density does not depend on a declared latent.

    Such a latent's posterior is flat: improper on an unbounded support, and a fit of it
    drifts without end. The check traces ``model.log_density`` once on abstract latents of
    the declared shapes (``dtype``; discrete ones int32) and ``data`` (see
    :func:`output_dependence`); nothing is compiled.

    Example:
        >>> import warnings
        >>> m = Model(lambda z, d: -z["a"] ** 2, {"a": Latent(), "typo": Latent()})
        >>> with warnings.catch_warnings(record=True) as w:
        ...     warnings.simplefilter("always")
        ...     check_influence(m, None, jnp.float32)
        >>> "'typo' does not influence" in str(w[0].message)
        True
    """
    target = model.target
    names = target.names + target.discrete_names
    z = ([jax.ShapeDtypeStruct(b.shape, dtype) for b in target.blocks]
         + [jax.ShapeDtypeStruct(b.shape, jnp.int32) for b in target.discrete]
         + [jax.ShapeDtypeStruct(b.shape, dtype) for b in target.plain_params])
    keys = names + tuple(b.name for b in target.plain_params)  # parameters' bits follow

    def density(zs, data):
        return model.log_density(dict(zip(keys, zs, strict=True)), data)

    deps = output_dependence(density, z, data)[0]
    unused = [name for i, name in enumerate(names) if not deps >> i & 1]
    if not unused:
        return
    if len(unused) == len(names):
        message = (f"the log density does not depend on any latent ({list(names)}): it is "
                   "constant, so the posterior is flat (improper unless every support is "
                   "bounded) and there is nothing to fit; check that the model uses z[...]")
    else:
        what = (f"latent {unused[0]!r} does not" if len(unused) == 1 else
                f"latents {unused} do not")
        message = (f"{what} influence the log density: the model never uses "
                   + ", ".join(f"z[{n!r}]" for n in unused) + " in a way that reaches its "
                   "value, so its posterior is flat (improper unless its support is "
                   "bounded); give it a prior and use it, or remove it from the declared "
                   "latents")
    warnings.warn(message, ModelWarning, stacklevel=user_stacklevel())


def user_stacklevel() -> int:
    """The ``stacklevel`` for ``warnings.warn`` called in the caller of this function that
    points at the first frame outside vijax (the user's call)."""
    package = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_code.co_filename.startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level
