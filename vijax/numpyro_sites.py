"""A NumPyro model's sites, found by tracing it: latents with their shapes and supports,
parameters (``numpyro.param``) with their initial values and constraints, and warnings about
sites that are probably not what was meant.

Sites are discovered by running the model under ``numpyro.handlers.seed`` + ``trace`` inside
``jax.eval_shape``, with the traced data abstract as in the compiled fit (the data leaves the
model reads with NumPy concrete: :mod:`vijax.numpyro_data`) and each latent set to a fixed
point of its support: nothing is compiled, and a model that cannot run so fails here rather
than inside the fit. Every sample site that is not observed becomes a
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
"""

from __future__ import annotations

import functools
import inspect
import keyword
import math
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.distributions import constraints
from numpyro.distributions.transforms import biject_to

from vijax.model import ModelWarning, Param, output_dependence, user_stacklevel
from vijax.numpyro_data import rebuild


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


def _check_site_name(site_name: str, what: str, name: str) -> None:
    if not site_name.isidentifier() or keyword.iskeyword(site_name):
        raise ValueError(
            f"numpyro model {name!r}: {what} site name {site_name!r} is not a Python "
            f"identifier, which vijax {what} names must be; rename the site")


def _param_sites(tr: dict, name: str) -> dict[str, dict]:
    """``numpyro.param`` sites in site order."""
    params = {k: site for k, site in tr.items() if site["type"] == "param"}
    for site_name in params:
        _check_site_name(site_name, "parameter", name)
    return params


def _latent_sites(tr: dict, name: str) -> dict[str, dict]:
    """Latent sample sites in site order; raises on what vijax cannot handle yet."""
    latents = {}
    for site_name, site in tr.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        support = site["fn"].support
        if support.is_discrete and _finite_base(support) is None:
            raise ValueError(
                f"numpyro model {name!r}: latent site {site_name!r} has a discrete support "
                f"({support}) that is not finite or not elementwise; only finite supports "
                "(constraints.boolean, constraints.integer_interval(a, b)) are supported: "
                "marginalise it out (e.g. with a mixture distribution), bound it (e.g. a "
                "Binomial or DiscreteUniform prior) or observe it")
        _check_site_name(site_name, "latent", name)
        latents[site_name] = site
    if not latents:
        raise ValueError(
            f"numpyro model {name!r} has no latent sample sites (every sample site is "
            "observed); there is nothing to infer")
    return latents


def subsample_plates(tr: dict) -> dict[str, SubsamplePlate]:
    """The plates of a trace that subsample (``subsample_size < size``), in site order, each
    with the latent sample sites inside it."""
    plates = {k: SubsamplePlate(k, int(site["args"][0]), int(site["args"][1]), ())
              for k, site in tr.items() if site["type"] == "plate"
              and site["args"][1] is not None and site["args"][1] < site["args"][0]}
    for site_name, site in tr.items():
        if site["type"] != "sample" or site["is_observed"]:
            continue
        for frame in site["cond_indep_stack"]:
            if frame.name in plates:
                p = plates[frame.name]
                # the plate's axis in the site's value: counted from the batch shape's right
                axis = jnp.ndim(site["value"]) - site["fn"].event_dim + frame.dim
                plates[frame.name] = p._replace(
                    local_latents=(*p.local_latents, site_name),
                    local_axes=(*p.local_axes, int(axis)))
    return plates


class SubsamplePlate(NamedTuple):
    """A plate that subsamples: ``numpyro.plate(name, size, subsample_size)``, and the latent
    sample sites inside it (``local_latents``: vijax's local latents, one value per row)."""

    name: str
    size: int
    subsample_size: int
    local_latents: tuple[str, ...]
    local_axes: tuple[int, ...] = ()  # the plate's axis in each local latent's value


def _abstract_sites(model_fn: Callable, name: str, treedef: Any, static: tuple, data: tuple
                    ) -> tuple[dict[str, tuple], list[str], list[str],
                               dict[str, SubsamplePlate]]:
    """One abstract trace (nothing is compiled), with the traced data abstract as in the
    compiled fit: per latent site its ``ShapeDtypeStruct`` and its support (``None`` where
    the support's parameters are traced), the masked latent sites (``obs_mask``,
    ``handlers.mask``, ``.mask()``), the ``numpyro.param`` sites and the subsampling plates
    (:func:`subsample_plates`). Raises JAX's tracer errors where the model reads an abstract
    value as a Python or NumPy value."""
    found: dict[str, tuple] = {}
    masked: list[str] = []
    params: list[str] = []
    plates: dict[str, SubsamplePlate] = {}

    def run(data: tuple) -> None:
        args, kwargs = rebuild(treedef, static, data)
        tr = _trace(model_fn, args, kwargs, 0.0)
        params.extend(_param_sites(tr, name))
        plates.update(subsample_plates(tr))
        for site_name, site in _latent_sites(tr, name).items():
            value, support = site["value"], site["fn"].support
            traced = any(isinstance(x, jax.core.Tracer)
                         for x in jax.tree_util.tree_leaves(support))
            found[site_name] = (jax.ShapeDtypeStruct(jnp.shape(value), jnp.result_type(value)),
                                None if traced else support)
            if _site_mask(site) is not None:
                masked.append(site_name)

    jax.eval_shape(run, data)
    return found, masked, params, plates


def _discover(model_fn: Callable, name: str, treedef: Any, static: tuple, data: tuple,
              found: dict[str, tuple], params: list[str]
              ) -> tuple[dict[str, jax.ShapeDtypeStruct], dict[str, Any], dict[str, Param]]:
    """Latent shapes/dtypes and concrete supports from the sites of :func:`_abstract_sites`,
    and a :class:`~vijax.model.Param` per ``numpyro.param`` site.

    A support whose parameters are traced depends on data or on other latents: those models
    are traced eagerly twice (at two latent points) to get concrete supports and to reject
    supports that depend on latents. A model with ``numpyro.param`` sites is traced eagerly
    once, for their concrete initial values (computed with ``jnp`` they are traced in the
    abstract trace) and constraints.
    """
    values = {k: v for k, (v, _) in found.items()}
    supports = {k: sup for k, (_, sup) in found.items()}
    traced = any(sup is None for sup in supports.values())
    declared: dict[str, Param] = {}
    if traced or params:
        args, kwargs = rebuild(treedef, static, data)
        tr = _trace(model_fn, args, kwargs, 0.0)
        first = _latent_sites(tr, name)
        declared = {k: _declare_param(site, k, name) for k, site in _param_sites(tr, name).items()}
    if traced:
        second = _latent_sites(_trace(model_fn, args, kwargs, 0.7), name)
        _check_fixed_supports(first, second, name)
        supports = {k: site["fn"].support for k, site in first.items()}
    supports = {k: _finite_support(sup, k, name) if sup.is_discrete else sup
                for k, sup in supports.items()}
    return values, supports, declared


def _declare_param(site: dict, site_name: str, name: str) -> Param:
    """``numpyro.param(site_name, init_value, constraint=...)`` as a vijax Param: the shape
    and the init of its (constrained) initial value, the support its constraint (default
    ``constraints.real``)."""
    init = np.asarray(site["value"])
    if init.dtype.kind not in "biuf":
        raise ValueError(f"numpyro model {name!r}: parameter site {site_name!r} has initial "
                         f"value {site['value']!r}, which is not a number or numeric array")
    support = site["kwargs"].get("constraint", constraints.real)
    return Param(shape=init.shape, init=init, support=support)


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
