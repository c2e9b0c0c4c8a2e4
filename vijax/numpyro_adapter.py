"""Adapter: a NumPyro model function becomes a :class:`vijax.model.Model`.

Sites are discovered by running the model under ``numpyro.handlers.seed`` + ``trace`` inside
``jax.eval_shape``, with the traced data abstract as in the compiled fit (the data leaves the
model reads with NumPy concrete, see below) and each latent set to a fixed point of its
support: nothing is compiled, and a model that cannot run so fails here rather than inside
the fit. Every sample site that is not observed becomes a
:class:`~vijax.model.Latent` of the site value's shape (plate dimensions included) and support
``site["fn"].support``, in site order. A support whose parameters are computed (from data or
from other latents) is read from two eager traces at two latent points; if it differs between
them it depends on a latent, which is an error.

Discrete latent sites with a finite support are latents too (fitted by vijax with a
categorical guide): ``Bernoulli`` (``constraints.boolean``), ``Categorical`` (``integer_interval(0,
K - 1)``), ``DiscreteUniform``, ``Binomial`` and ``BetaBinomial`` (``integer_interval``), also
under ``.to_event`` (the support is declared elementwise). ``integer_interval`` bounds are
reduced to scalar ints; bounds that differ between the site's elements (e.g. a ``Binomial``
with a different ``total_count`` per element) are an error. In the traces a discrete latent is
set to its lower bound (first trace) or upper bound (second), as int32. Discrete supports that
are infinite (``Poisson``, ``Geometric``: ``nonnegative_integer``) or not elementwise
(``Multinomial``) are rejected. A site marked ``infer={"enumerate": "parallel"}`` is an
ordinary discrete latent: vijax does not enumerate it.

The log joint is NumPyro's own,

    log p(z, x) = sum_sites scale_s * sum log p_s(value_s | ...),

over latent, observed and ``numpyro.factor`` sites, evaluated by
``numpyro.infer.util.log_density`` at *constrained* latent values (no Jacobian: vijax adds it
in :mod:`vijax.target`), discrete ones as the int32 arrays vijax passes.

Data (:mod:`vijax.numpyro_data`): ``(args, kwargs)`` is flattened with ``jax.tree_util``.
Numeric arrays (NumPy or JAX, any rank, 0-d included), NumPy floating scalars and Python
``float`` are *traced* where the model uses them only through JAX: they form ``Model.data``
(a tuple) and are arguments of the compiled program, so refitting on new values of the same
shapes reuses it. Those the model reads as Python or NumPy values (sizes, indices and masks
computed with ``np.*`` from the data, a float in an ``if``), found by tracing, are
*concrete*: closed over, with their content in the cache key, so that new values of them give
a new program (a recompile, never a stale one). Everything else (``int``, ``bool``, NumPy
integer scalars, ``None``, strings, callables, other objects) is *static*: baked into the log
joint and part of the cache key. A float is traced unless the model needs its value (a float
that is a compile-time constant recompiles on every new value).

Supports are fixed: a support whose parameters depend on the data (``Uniform(0, x.max())``,
or ``Uniform(0.0, upper)`` with a float argument ``upper``) is baked in for that data, and new
data that changes it gives a new target (a recompile, never a wrong support).
"""

from __future__ import annotations

import collections
import functools
import inspect
import math
import threading
import warnings
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to
from numpyro.infer.util import log_density

from vijax.model import Latent, Model, ModelWarning, output_dependence, user_stacklevel
from vijax.numpyro_data import (
    TRACED,
    TRACER_ERRORS,
    find_concrete,
    is_candidate,
    leaf_key,
    leaf_names,
    rebuild,
    split,
)

__all__ = ["from_numpyro"]

_CACHE_SIZE = 128
_cache: collections.OrderedDict[Hashable, Any] = collections.OrderedDict()
_cache_lock = threading.Lock()


def _model_name(model_fn: Callable) -> str:
    fn = getattr(model_fn, "func", model_fn)  # functools.partial
    return getattr(fn, "__name__", None) or type(fn).__name__


def _make_log_joint(model_fn: Callable, name: str, treedef: Any, static: tuple,
                    concrete: list[str]) -> Callable[[dict, tuple], Any]:
    """``log_joint(z, data)``: NumPyro's log density with the traced leaves from ``data`` and
    the static and concrete ones (named in ``concrete``) closed over."""
    n_traced = sum(x is TRACED for x in static)
    closed = (f"; {concrete} are read by the model as NumPy values, so they are fixed in "
              "this model: for other values of them call from_numpyro again" if concrete
              else "")

    def log_joint(z: dict, data: tuple) -> jax.Array:
        if not isinstance(data, tuple | list) or len(data) != n_traced:
            raise ValueError(
                f"numpyro model {name!r}: data must be the tuple of {n_traced} traced "
                f"array/float leaves of (args, kwargs) made by from_numpyro (Model.data)"
                f"{closed}; got {data!r}")
        args, kwargs = rebuild(treedef, static, data)
        return log_density(model_fn, args, kwargs, z)[0]

    log_joint.__name__ = f"log_joint_{name}"
    log_joint.__qualname__ = log_joint.__name__
    return log_joint


def _latent_read_as_value(name: str, error: Exception) -> ValueError:
    return ValueError(
        f"numpyro model {name!r} reads a traced value as a Python or NumPy value (in an `if`, "
        "as a size or an index, in np.*) even with all its data concrete: either a latent (a "
        "sampled value: use jnp.* on it, and jnp.where or jax.lax.cond for branches) or a "
        "value computed with jnp.* from the data (traced under jax.jit like any jnp result: "
        f"compute sizes, indices and masks from the data with np.*). JAX said: {error}")


def _finite_base(support: Any) -> Any:
    """The elementwise finite support (boolean or integer_interval) of a discrete support,
    under any ``independent`` wrappers (``.to_event``); ``None`` if it is not one."""
    while isinstance(support, constraints.independent):
        support = support.base_constraint
    if isinstance(support, type(constraints.boolean) | constraints.integer_interval):
        return support
    return None


def _fill_discrete(support: Any, shape: tuple[int, ...], shift: float) -> Any:
    """int32 value of a finite discrete site: its lower bound at ``shift == 0``, else its
    upper bound (two different points, so a support depending on it is caught)."""
    base = _finite_base(support)
    if base is None:
        return None  # _latent_sites raises naming the site
    if isinstance(base, type(constraints.boolean)):
        bound = jnp.asarray(0 if shift == 0.0 else 1)
    elif shift == 0.0:
        bound = jnp.ceil(jnp.asarray(base.lower_bound))
    else:
        bound = jnp.floor(jnp.asarray(base.upper_bound))
    return jnp.broadcast_to(bound, shape).astype(jnp.int32)


def _fill_latent(msg: dict, shift: float) -> Any:
    """Value of a latent site at a fixed point: a continuous latent at the unconstrained grid
    ``shift + small grid``, a finite discrete one at a bound (see :func:`_fill_discrete`);
    ``None`` (sample from the site) for anything else."""
    if msg["type"] != "sample" or msg["is_observed"]:
        return None
    fn = msg["fn"]
    sample_shape = tuple(msg["kwargs"].get("sample_shape") or ())
    if fn.support.is_discrete:
        return _fill_discrete(fn.support, sample_shape + tuple(fn.shape()), shift)
    try:
        transform = biject_to(fn.support)
    except NotImplementedError:
        return None  # vijax.target raises naming the latent
    shape = sample_shape + tuple(transform.inverse_shape(fn.shape()))
    grid = shift + 0.5 * np.linspace(-1.0, 1.0, math.prod(shape)).reshape(shape)
    return transform(jnp.asarray(grid, jnp.result_type(float)))


def _trace(model_fn: Callable, args: tuple, kwargs: dict, shift: float) -> dict:
    """Trace with each continuous latent set to ``biject_to(support)(shift + small grid)``
    and each finite discrete one to its lower (``shift == 0``) or upper bound.

    A fixed grid instead of prior draws: prior samplers (Gamma's rejection loop, LKJ, ...)
    compile op by op when run eagerly and take seconds, and the values need only lie in the
    support and differ between two traces (for :func:`_check_fixed_supports`).
    """
    with (handlers.trace() as tr,
          handlers.substitute(substitute_fn=functools.partial(_fill_latent, shift=shift)),
          handlers.seed(rng_seed=0)):
        model_fn(*args, **kwargs)
    return tr


def _latent_sites(tr: dict, name: str) -> dict[str, dict]:
    """Latent sample sites in site order; raises on what vijax cannot handle yet."""
    latents = {}
    for site_name, site in tr.items():
        kind = site["type"]
        if kind == "param":
            raise ValueError(
                f"numpyro model {name!r}: site {site_name!r} is a numpyro.param; learnable "
                "parameters are not supported yet: give it a prior with numpyro.sample (a "
                "point estimate of it is the delta guide) or pass it as data")
        if kind == "plate":
            size, subsample_size = site["args"]
            if subsample_size is not None and subsample_size < size:
                raise ValueError(
                    f"numpyro model {name!r}: plate {site_name!r} subsamples "
                    f"{subsample_size} of {size}; subsampling plates are not supported: "
                    "drop subsample_size (vijax evaluates the full data set)")
        if kind != "sample" or site["is_observed"]:
            continue
        support = site["fn"].support
        if support.is_discrete and _finite_base(support) is None:
            raise ValueError(
                f"numpyro model {name!r}: latent site {site_name!r} has a discrete support "
                f"({support}) that is not finite or not elementwise; only finite supports "
                "(constraints.boolean, constraints.integer_interval(a, b)) are supported: "
                "marginalise it out (e.g. with a mixture distribution), bound it (e.g. a "
                "Binomial or DiscreteUniform prior) or observe it")
        if not site_name.isidentifier():
            raise ValueError(
                f"numpyro model {name!r}: latent site name {site_name!r} is not a Python "
                "identifier, which vijax latent names must be; rename the site")
        latents[site_name] = site
    if not latents:
        raise ValueError(
            f"numpyro model {name!r} has no latent sample sites (every sample site is "
            "observed); there is nothing to infer")
    return latents


def _abstract_sites(model_fn: Callable, name: str, treedef: Any, static: tuple, data: tuple
                    ) -> tuple[dict[str, tuple], list[str]]:
    """One abstract trace (nothing is compiled), with the traced data abstract as in the
    compiled fit: per latent site its ``ShapeDtypeStruct`` and its support (``None`` where
    the support's parameters are traced), and the masked latent sites (``obs_mask``,
    ``handlers.mask``, ``.mask()``). Raises JAX's tracer errors where the model reads an
    abstract value as a Python or NumPy value."""
    found: dict[str, tuple] = {}
    masked: list[str] = []

    def run(data: tuple) -> None:
        args, kwargs = rebuild(treedef, static, data)
        for site_name, site in _latent_sites(_trace(model_fn, args, kwargs, 0.0), name).items():
            value, support = site["value"], site["fn"].support
            traced = any(isinstance(x, jax.core.Tracer)
                         for x in jax.tree_util.tree_leaves(support))
            found[site_name] = (jax.ShapeDtypeStruct(jnp.shape(value), jnp.result_type(value)),
                                None if traced else support)
            if _site_mask(site) is not None:
                masked.append(site_name)

    jax.eval_shape(run, data)
    return found, masked


def _discover(model_fn: Callable, name: str, treedef: Any, static: tuple, data: tuple,
              found: dict[str, tuple]
              ) -> tuple[dict[str, jax.ShapeDtypeStruct], dict[str, Any]]:
    """Latent shapes/dtypes and concrete supports from the sites of :func:`_abstract_sites`.

    A support whose parameters are traced depends on data or on other latents: those models
    are traced eagerly twice (at two latent points) to get concrete supports and to reject
    supports that depend on latents.
    """
    values = {k: v for k, (v, _) in found.items()}
    supports = {k: sup for k, (_, sup) in found.items()}
    if any(sup is None for sup in supports.values()):
        args, kwargs = rebuild(treedef, static, data)
        first = _latent_sites(_trace(model_fn, args, kwargs, 0.0), name)
        second = _latent_sites(_trace(model_fn, args, kwargs, 0.7), name)
        _check_fixed_supports(first, second, name)
        supports = {k: site["fn"].support for k, site in first.items()}
    supports = {k: _finite_support(sup, k, name) if sup.is_discrete else sup
                for k, sup in supports.items()}
    return values, supports


def _site_mask(site: dict) -> Any:
    """The mask of a sample site (``handlers.mask``, ``obs_mask``, ``fn.mask(...)``), the
    two combined; ``None`` when it has none."""
    masks = [m for m in (site.get("mask"), getattr(site["fn"], "_mask", None))
             if m is not None and m is not True]
    if not masks:
        return None
    return masks[0] if len(masks) == 1 else jnp.logical_and(*masks)


def _warn_masked(model_fn: Callable, name: str, treedef: Any, static: tuple, data: tuple,
                 masked: list[str]) -> None:
    """Warn naming each latent site some of whose elements are masked out: they add nothing
    to the density, so their posterior is flat. One eager trace (the masks come from data)."""
    args, kwargs = rebuild(treedef, static, data)
    sites = _latent_sites(_trace(model_fn, args, kwargs, 0.0), name)
    for site_name in masked:
        site = sites[site_name]
        shape = jnp.shape(site["value"])
        batch = shape[:len(shape) - site["fn"].event_dim]
        keep = np.broadcast_to(np.asarray(_site_mask(site), bool), batch)
        n_out = int(keep.size - np.count_nonzero(keep))
        if not n_out:
            continue
        base = site_name[:-len("_unobserved")] if site_name.endswith("_unobserved") else None
        how = (f"numpyro's obs_mask made it a latent of the full shape of {base!r}, with the "
               f"observed entries masked out; vijax would fit those. Observe the present "
               f"values and impute only the missing ones: numpyro.sample({base!r}, ..., "
               f"obs={base}[mask]) and a latent site for {base}[~mask]" if base else
               "give every element of the latent a density, or declare only the elements "
               "that have one")
        warnings.warn(f"numpyro model {name!r}: latent site {site_name!r} has {n_out} of "
                      f"{keep.size} elements masked out: they add nothing to the log density, "
                      f"so their posterior is flat (improper on an unbounded support). {how}",
                      ModelWarning, stacklevel=user_stacklevel())


def _none_arguments(model_fn: Callable, args: tuple, kwargs: dict) -> list[str]:
    """Names of the model's parameters that are ``None`` in this call (given or default)."""
    try:
        bound = inspect.signature(model_fn).bind(*args, **kwargs)
    except (TypeError, ValueError):
        return []
    bound.apply_defaults()
    return [k for k, v in bound.arguments.items() if v is None]


def _warn_unobserved(model_fn: Callable, name: str, treedef: Any, static: tuple, data: tuple,
                     values: dict[str, jax.ShapeDtypeStruct], nones: list[str]) -> None:
    """Warn naming each latent site that no other site depends on, when some argument is
    ``None``: most likely an observed site whose data was not passed (``obs=None`` makes a
    latent of it, and vijax would fit its prior). Structural: one trace, nothing compiled."""
    names, order = list(values), []

    def site_terms(zs, data):
        args, kwargs = rebuild(treedef, static, data)
        with (handlers.trace() as tr,
              handlers.substitute(data=dict(zip(names, zs, strict=True))),
              handlers.seed(rng_seed=0)):
            model_fn(*args, **kwargs)
        order[:] = [k for k, site in tr.items() if site["type"] == "sample"]
        return [jnp.sum(tr[k]["fn"].log_prob(tr[k]["value"])) for k in order]

    deps = output_dependence(site_terms, [values[k] for k in names], data)
    for i, site_name in enumerate(names):
        if any(d >> i & 1 for other, d in zip(order, deps, strict=True) if other != site_name):
            continue
        warnings.warn(
            f"numpyro model {name!r}: latent site {site_name!r} is used by no other site, and "
            f"argument(s) {nones} are None: if {site_name!r} is an observed site, its data "
            "was not passed (obs=None makes it a latent, so vijax would fit its prior instead "
            f"of conditioning on it). Pass the data: from_numpyro({name}, ..., "
            f"{nones[0]}=...)", ModelWarning, stacklevel=user_stacklevel())


def _finite_support(support: Any, site_name: str, name: str) -> Any:
    """A finite discrete support as vijax declares it: ``boolean`` or ``integer_interval``
    with scalar int bounds (array bounds must be equal for all elements)."""
    base = _finite_base(support)
    if isinstance(base, type(constraints.boolean)):
        return constraints.boolean
    lo, hi = np.ceil(np.asarray(base.lower_bound)), np.floor(np.asarray(base.upper_bound))
    if np.unique(lo).size > 1 or np.unique(hi).size > 1:
        raise ValueError(
            f"numpyro model {name!r}: discrete latent site {site_name!r} has a different "
            f"range of values per element ({support}); vijax needs the same integer_interval "
            "bounds for every element: split the site into sites with equal ranges")
    lo, hi = (int(x.flat[0]) if x.size else 0 for x in (lo, hi))  # size 0: an empty latent
    return constraints.integer_interval(lo, hi)


def _support_leaves(support: Any) -> tuple[list[np.ndarray], Any]:
    leaves, treedef = jax.tree_util.tree_flatten(support)
    return [np.asarray(x) for x in leaves], treedef


def _check_fixed_supports(first: dict[str, dict], second: dict[str, dict], name: str) -> None:
    """Supports must not depend on other latents: compare traces at two latent points."""
    if list(first) != list(second):
        raise ValueError(
            f"numpyro model {name!r}: its latent sites change from run to run ({list(first)} "
            f"vs {list(second)}); the set of sites must not depend on sampled values")
    for site_name, site in first.items():
        a, ta = _support_leaves(site["fn"].support)
        b, tb = _support_leaves(second[site_name]["fn"].support)
        same = ta == tb and all(x.shape == y.shape and np.array_equal(x, y, equal_nan=True)
                                for x, y in zip(a, b, strict=True))
        if not same:
            raise ValueError(
                f"numpyro model {name!r}: the support of latent site {site_name!r} depends on "
                f"other latents ({site['fn'].support} vs {second[site_name]['fn'].support} at "
                "two points); vijax needs fixed supports: reparameterise, e.g. "
                "Uniform(0, a) as a * Uniform(0, 1) with numpyro.deterministic")


def _signature(latents: dict[str, Latent]) -> tuple:
    sig = []
    for site_name, lat in latents.items():
        leaves, treedef = _support_leaves(lat.support)
        params = tuple((x.shape, x.dtype.str, x.tobytes()) for x in leaves)
        sig.append((site_name, lat.shape, treedef, params))
    return tuple(sig)


def _hashable(key: Hashable) -> Hashable | None:
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _cache_key(model_fn: Callable, treedef: Any, static: tuple,
               latents: dict[str, Latent]) -> Hashable | None:
    """Hashable key of a model template, or ``None`` where something in it is unhashable
    (memoisation skipped). Static and concrete leaves enter by value (:func:`leaf_key`)."""
    return _hashable(("model", model_fn, treedef, tuple(leaf_key(x) for x in static),
                      _signature(latents)))


def _concrete_key(model_fn: Callable, treedef: Any, leaves: list) -> Hashable | None:
    """Key of the concrete-leaf set found for a model and argument structure: static leaves
    by value, candidate leaves by type, shape and dtype."""
    def spec(x: Any) -> Hashable:
        if not is_candidate(x):
            return leaf_key(x)
        return type(x), np.shape(x), str(x.dtype if hasattr(x, "dtype") else np.result_type(x))

    return _hashable(("concrete", model_fn, treedef, tuple(spec(x) for x in leaves)))


def _cache_get(key: Hashable) -> Any:
    with _cache_lock:
        try:
            template = _cache.get(key)
        except (TypeError, ValueError):  # an __eq__ that cannot answer
            return None
        if template is not None:
            _cache.move_to_end(key)
        return template


def _cache_put(key: Hashable, template: Any) -> None:
    with _cache_lock:
        _cache[key] = template
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)


def _clear_cache() -> None:
    """Forget every memoised model (for tests)."""
    with _cache_lock:
        _cache.clear()


def from_numpyro(model_fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Model:
    """A vijax :class:`~vijax.model.Model` from a NumPyro model function and its arguments.

    The model is traced (``numpyro.handlers.seed`` + ``trace`` under ``jax.eval_shape``, each
    latent set to a fixed point of its support) at ``args`` and ``kwargs``; each unobserved
    sample site becomes a latent named after the site, with the site value's shape (plate
    dimensions included) and the distribution's support, in site order (the continuous
    latents' blocks of the unconstrained vector ``theta`` follow it, then the discrete ones).
    Observed sites, ``numpyro.deterministic``, ``numpyro.factor`` and (non-subsampling)
    plates are supported. The log joint at constrained values is
    ``numpyro.infer.util.log_density(model_fn, args, kwargs, z)[0]``, with no Jacobian.

    Discrete latent sites need a finite elementwise support: ``constraints.boolean``
    (``Bernoulli``) or ``integer_interval(a, b)`` (``Categorical``, ``DiscreteUniform``,
    ``Binomial``, ``BetaBinomial``, ...), with the same bounds for every element (array
    bounds are reduced to scalar ints). Their values reach the model as int32 arrays and are
    fitted with a categorical guide and score-function gradients. A site marked
    ``infer={"enumerate": "parallel"}`` is treated as an ordinary discrete latent (vijax does
    not enumerate it; to sum it out, marginalise it in the model).

    The model runs as written for NumPyro: it may compute sizes, indices and masks from its
    data with NumPy (``int(np.max(group)) + 1``, ``len(np.unique(group))``,
    ``np.isnan(y)``, ``np.nonzero(x > 0)``) or branch on a float argument. The numeric array
    and float leaves of ``(args, kwargs)`` that it uses only through JAX are the model's
    ``data``: a tuple of those leaves in ``jax.tree_util`` flattening order, traced in the
    compiled fit. Those it reads as NumPy or Python values are *concrete*: found by tracing
    (:func:`vijax.numpyro_data.find_concrete`), closed over as read-only copies and keyed by
    content; every other leaf (ints, ``None``, strings, callables) is static (see the module
    docstring). Calls with the same ``model_fn``, the same static and concrete leaves and the
    same latent shapes and supports return models sharing one ``target`` (the compile-cache
    key), so refitting on new values of the traced leaves (same shapes) does not recompile,
    and new values of a concrete leaf give a new target (a recompile). ``Model.with_data``
    replaces only the traced leaves: for new values of a concrete one call ``from_numpyro``
    again. Memoisation (the last 128 structures; concrete leaves are kept, traced data are
    not) is skipped when a static leaf is unhashable.

    Args:
        model_fn: a NumPyro model, ``model_fn(*args, **kwargs)``.
        *args: positional arguments of ``model_fn`` (data, sizes, ...).
        **kwargs: keyword arguments of ``model_fn`` (e.g. ``y=y_obs``).

    Returns:
        A :class:`~vijax.model.Model` with ``latents`` ``{site: Latent(shape, support)}``,
        ``log_joint(z, data) -> scalar`` and ``data`` the tuple of traced leaves.

    Warns:
        vijax.ModelWarning: a latent site has masked-out elements (``obs_mask``,
            ``handlers.mask``), which add no density (a flat, improper posterior); or an
            argument of ``model_fn`` is ``None`` and a latent site is used by no other site
            (most likely an observation whose data was not passed, ``obs=None``).

    Raises:
        TypeError: ``model_fn`` is not callable.
        ValueError: the model has no latent site, a discrete latent site's support is
            infinite (``Poisson``) or not elementwise (``Multinomial``) or its bounds differ
            between elements, a site is a ``numpyro.param``, a plate subsamples, a latent's
            support depends on other latents (the site or plate is named), or the model reads
            a latent as a Python or NumPy value (e.g. ``if mu > 0``, ``np.exp(mu)``).

    Example:
        >>> import jax.numpy as jnp
        >>> import numpyro
        >>> import numpyro.distributions as dist
        >>> def regression(x, y=None):
        ...     w = numpyro.sample("w", dist.Normal(0.0, 1.0))
        ...     sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
        ...     with numpyro.plate("obs", x.shape[0]):
        ...         numpyro.sample("y", dist.Normal(w * x, sigma), obs=y)
        >>> x = jnp.arange(4.0)
        >>> m = from_numpyro(regression, x, y=2.0 * x)
        >>> {k: (v.shape, str(v.support)) for k, v in m.latents.items()}
        {'w': ((), 'Real()'), 'sigma': ((), 'Positive(lower_bound=0.0)')}
        >>> len(m.data)  # x and y
        2
        >>> from_numpyro(regression, x + 1.0, y=x).target is m.target  # no recompile
        True
        >>> def mixture(y):
        ...     with numpyro.plate("obs", y.shape[0]):
        ...         z = numpyro.sample("z", dist.Bernoulli(0.5))
        ...         numpyro.sample("y", dist.Normal(2.0 * z - 1.0, 1.0), obs=y)
        >>> from_numpyro(mixture, jnp.array([-1.2, 0.9])).latents["z"]
        Latent(shape=(2,), support=Boolean())
        >>> import numpy as np
        >>> def groups(group, y):  # as for NumPyro: the number of groups from the data
        ...     with numpyro.plate("groups", int(np.max(group)) + 1):
        ...         mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        ...     numpyro.sample("y", dist.Normal(mu[group], 1.0), obs=y)
        >>> g = from_numpyro(groups, np.array([0, 1, 1]), np.array([0.3, -0.2, 0.1]))
        >>> g.latents["mu"].shape, len(g.data)  # group is concrete, y is traced
        ((2,), 1)
    """
    if not callable(model_fn):
        raise TypeError(f"from_numpyro needs a NumPyro model function, got {model_fn!r}")
    name = _model_name(model_fn)
    leaves, treedef = jax.tree_util.tree_flatten((args, kwargs))

    def attempt(concrete: frozenset[int]) -> tuple:
        static, data = split(leaves, concrete)
        return static, data, _abstract_sites(model_fn, name, treedef, static, data)

    concrete_key = _concrete_key(model_fn, treedef, leaves)
    hint = _cache_get(concrete_key) if concrete_key is not None else None
    candidates = tuple(i for i, x in enumerate(leaves) if is_candidate(x))
    try:
        concrete, (static, data, (found, masked)) = find_concrete(attempt, candidates, hint)
    except TRACER_ERRORS as e:
        raise _latent_read_as_value(name, e) from None
    if concrete_key is not None:
        _cache_put(concrete_key, concrete)
    values, supports = _discover(model_fn, name, treedef, static, data, found)
    latents = {k: Latent(shape=v.shape, support=supports[k]) for k, v in values.items()}

    key = _cache_key(model_fn, treedef, static, latents)
    template = _cache_get(key) if key is not None else None
    if template is not None:
        return template.with_data(data)

    names = leaf_names(model_fn, args, kwargs)
    log_joint = _make_log_joint(model_fn, name, treedef, static,
                                [names[i] for i in sorted(concrete)])
    try:  # one abstract evaluation: fail here, not in the fit
        jax.eval_shape(log_joint, values, data)
    except TRACER_ERRORS as e:
        raise _latent_read_as_value(name, e) from None
    if masked:
        _warn_masked(model_fn, name, treedef, static, data, masked)
    nones = _none_arguments(model_fn, args, kwargs)
    if nones:
        _warn_unobserved(model_fn, name, treedef, static, data, values, nones)
    template = Model(log_joint=log_joint, latents=latents)  # the cache keeps no data
    if key is not None:
        _cache_put(key, template)
    return template.with_data(data)
