"""Adapter: a NumPyro model function becomes a :class:`vijax.model.Model`.

Sites, their shapes and supports are found by tracing the model (:mod:`vijax.numpyro_sites`):
every sample site that is not observed becomes a :class:`~vijax.model.Latent`, in site order;
discrete latents need a finite elementwise support. Every ``numpyro.param`` site becomes a
learnable :class:`~vijax.model.Param` (its initial value's shape and value, its constraint).

The log joint is NumPyro's own,

    log p(z, x) = sum_sites scale_s * sum log p_s(value_s | ...),

over latent, observed and ``numpyro.factor`` sites, evaluated by
``numpyro.infer.util.log_density`` at *constrained* latent values (no Jacobian: vijax adds it
in :mod:`vijax.target`), discrete ones as the int32 arrays vijax passes, with the parameters'
constrained values substituted in the same dict.

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

**Subsampling plates** (:func:`subsampled_model`): a NumPyro model with a subsampling plate
becomes a factorised vijax model (minibatch SVI).

A model written for NumPyro's minibatch SVI,

    with numpyro.plate("data", x.shape[0], subsample_size=B):
        xb = numpyro.subsample(x, event_dim=1)        # or: ... as idx: xb = x[idx]
        numpyro.sample("obs", dist.Bernoulli(logits=xb @ w), obs=numpyro.subsample(y, 0))

becomes ``Model(log_prior=..., log_likelihood=..., data=...)`` with

    log_prior(z)            = sum_{sites s outside the plate} scale_s * log p_s(value_s)
    log_likelihood(z, d)[n] = sum_{sites s inside the plate}  scale_s * log p_s(value_s)[n],

where ``n`` runs over the plate's dimension and ``scale_s`` is only the user's own
``handlers.scale``: NumPyro's ``size / subsample_size`` is *not* applied, vijax's loop scales a
batch's summed log likelihood by ``N / B`` itself. So ``log_prior(z) +
sum(log_likelihood(z, data))`` is NumPyro's full-data log density (no subsampling).

The observation-axis data (``Model.data``) are the traced array leaves of ``(args, kwargs)``
whose leading axis has the plate's size ``N``: the rows the plate subsamples. The model is
run on a batch of ``B`` rows of them with the plate made to take all of its rows (its
subsample indices set to ``arange(size)``), so ``numpyro.subsample`` and ``x[idx]`` both give
the batch itself. Every other numeric leaf (hyperparameters, a feature count, a prior mean
vector) is closed over like a concrete leaf (keyed by value: new values recompile).
The result is a :class:`SubsampledModel`, whose ``default_batch_size`` is ``subsample_size``.

Checked when the model is built, each with an error naming the plate or site:

* one subsampling plate at most (several would need one index stream per plate);
* no latent site inside the plate (a local latent: per-row latents in the guide, amortised
  or indexed by the batch rows, are a later vijax feature);
* the plate's size follows the data (``numpyro.plate(name, x.shape[0], ...)``), so that the
  model run on a batch of ``B`` rows has a plate of size ``B``, and some leaf has ``N`` rows;
* no site outside the plate reads the observation data (``log_prior`` has no data);
* the factorised density equals NumPyro's own on a subsample (NumPyro's ``N / B``-scaled
  density at the plate's indices ``S`` against ``log_prior + N / B * sum(log_likelihood)``
  on the rows ``S``, at one point): this catches data read in full rather than through the
  plate (``x.mean()`` inside the plate, an ``N``-row leaf the plate does not subsample).
"""

from __future__ import annotations

import collections
import threading
import warnings
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer.util import log_density

from vijax.model import Latent, Model, ModelWarning, Param, user_stacklevel
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
from vijax.numpyro_sites import (
    _abstract_sites,
    _discover,
    _none_arguments,
    _support_leaves,
    _warn_masked,
    _warn_unobserved,
)
from vijax.numpyro_subsample import SubsampledModel, check_plate, subsampled_model

__all__ = ["from_numpyro", "SubsampledModel"]

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


def _signature(declared: dict[str, Latent | Param]) -> tuple:
    """Names, shapes, supports (by value) and, for parameters, initial values (by value)."""
    sig = []
    for site_name, decl in declared.items():
        leaves, treedef = _support_leaves(decl.support)
        params = tuple((x.shape, x.dtype.str, x.tobytes()) for x in leaves)
        init = leaf_key(decl.init) if isinstance(decl, Param) else None
        sig.append((site_name, decl.shape, treedef, params, init))
    return tuple(sig)


def _hashable(key: Hashable) -> Hashable | None:
    try:
        hash(key)
    except TypeError:
        return None
    return key


def _cache_key(model_fn: Callable, treedef: Any, static: tuple, latents: dict[str, Latent],
               params: dict[str, Param]) -> Hashable | None:
    """Hashable key of a model template, or ``None`` where something in it is unhashable
    (memoisation skipped). Static and concrete leaves enter by value (:func:`leaf_key`)."""
    return _hashable(("model", model_fn, treedef, tuple(leaf_key(x) for x in static),
                      _signature(latents), _signature(params)))


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
    Observed sites, ``numpyro.deterministic``, ``numpyro.factor`` and plates are supported.
    A model with one subsampling plate (``numpyro.plate(..., subsample_size=B)``, written for
    NumPyro's minibatch SVI) gives a factorised :class:`SubsampledModel` (``log_prior`` and a
    per-row, unscaled ``log_likelihood``; ``data`` the arguments the plate subsamples;
    ``default_batch_size=B``) for ``vj.fit(m, batch_size=m.default_batch_size)``: see the
    module docstring for what it refuses. Otherwise the log joint at constrained values is
    ``numpyro.infer.util.log_density(model_fn, args, kwargs, z)[0]``, with no Jacobian.

    Discrete latent sites need a finite elementwise support: ``constraints.boolean``
    (``Bernoulli``) or ``integer_interval(a, b)`` (``Categorical``, ``DiscreteUniform``,
    ``Binomial``, ``BetaBinomial``, ...), with the same bounds for every element (array
    bounds are reduced to scalar ints). Their values reach the model as int32 arrays and are
    fitted with a categorical guide and score-function gradients. A site marked
    ``infer={"enumerate": "parallel"}`` is treated as an ordinary discrete latent (vijax does
    not enumerate it; to sum it out, marginalise it in the model).

    Each ``numpyro.param(name, init_value, constraint=...)`` site becomes a model parameter
    ``Param(shape=init_value.shape, init=init_value, support=constraint)`` (default
    ``constraints.real``), optimised jointly with the guide by ``vj.fit``
    (``res.model_params``). Its initial value is read from one eager run of the model (a
    callable ``init_value`` is called with the key of ``numpyro.handlers.seed(rng_seed=0)``)
    and enters the memoisation key by value: an initial value computed from the data (e.g.
    ``jnp.mean(y)``) gives a new target for new data.

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
        ``params`` ``{site: Param(shape, init, support)}``, ``log_joint(z, data) -> scalar``
        and ``data`` the tuple of traced leaves.

    Warns:
        vijax.ModelWarning: a latent site has masked-out elements (``obs_mask``,
            ``handlers.mask``), which add no density (a flat, improper posterior); or an
            argument of ``model_fn`` is ``None`` and a latent site is used by no other site
            (most likely an observation whose data was not passed, ``obs=None``).

    Raises:
        TypeError: ``model_fn`` is not callable.
        ValueError: the model has no latent site, a discrete latent site's support is
            infinite (``Poisson``) or not elementwise (``Multinomial``) or its bounds differ
            between elements, a site name is not a Python identifier, a subsampling plate cannot
            be factorised (see the module docstring; the plate is named), a
            ``numpyro.param`` has a discrete constraint or an initial value outside it, a
            latent's support depends on other latents (the site or plate is named), or the
            model reads a latent as a Python or NumPy value (``if mu > 0``, ``np.exp(mu)``).

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
        concrete, (static, data, (found, masked, param_sites, plates)) = find_concrete(
            attempt, candidates, hint)
    except TRACER_ERRORS as e:
        raise _latent_read_as_value(name, e) from None
    if plates:
        check_plate(name, plates)
    if concrete_key is not None:
        _cache_put(concrete_key, concrete)
    values, supports, params = _discover(model_fn, name, treedef, static, data, found,
                                         param_sites)
    latents = {k: Latent(shape=v.shape, support=supports[k]) for k, v in values.items()}
    if plates:  # NumPyro's minibatch SVI: a factorised model (vijax.numpyro_subsample)
        if masked:
            _warn_masked(model_fn, name, treedef, static, data, masked)
        local = [k for p in plates.values() for k in p.local_latents]
        nones = _none_arguments(model_fn, args, kwargs)
        if local and nones:
            warnings.warn(
                f"numpyro model {name!r}: latent site(s) {local} inside the subsampling plate "
                f"become local latents, and argument(s) {nones} are None: if a site is an "
                "observed one, its data was not passed (obs=None makes it a latent, and "
                "vijax would infer it per row instead of conditioning on it)",
                ModelWarning, stacklevel=user_stacklevel())
        return subsampled_model(
            model_fn, name, treedef, leaves, concrete, leaf_names(model_fn, args, kwargs),
            plates, latents, params,
            lambda static: _cache_key(model_fn, treedef, static, latents, params),
            _cache_get, _cache_put)

    key = _cache_key(model_fn, treedef, static, latents, params)
    template = _cache_get(key) if key is not None else None
    if template is not None:
        return template.with_data(data)

    names = leaf_names(model_fn, args, kwargs)
    log_joint = _make_log_joint(model_fn, name, treedef, static,
                                [names[i] for i in sorted(concrete)])
    z = {**values, **{k: jax.ShapeDtypeStruct(p.shape, jnp.result_type(float))
                      for k, p in params.items()}}
    try:  # one abstract evaluation: fail here, not in the fit
        jax.eval_shape(log_joint, z, data)
    except TRACER_ERRORS as e:
        raise _latent_read_as_value(name, e) from None
    if masked:
        _warn_masked(model_fn, name, treedef, static, data, masked)
    nones = _none_arguments(model_fn, args, kwargs)
    if nones:
        _warn_unobserved(model_fn, name, treedef, static, data, values, nones)
    template = Model(log_joint=log_joint, latents=latents, params=params)  # no traced data
    if key is not None:
        _cache_put(key, template)
    return template.with_data(data)
