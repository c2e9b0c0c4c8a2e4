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
import dataclasses
import threading
from collections.abc import Callable, Hashable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.infer.util import log_density
from numpyro.primitives import Messenger

from vijax.model import Latent, Model, Param, output_dependence
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
    SubsamplePlate,
    _abstract_sites,
    _discover,
    _none_arguments,
    _support_leaves,
    _trace,
    _warn_masked,
    _warn_unobserved,
)

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


# ---------------------------------------------------------------------------------------------
# subsampling plates (NumPyro's minibatch SVI) as a factorised model


@dataclasses.dataclass(frozen=True, eq=False)
class SubsampledModel(Model):
    """A factorised :class:`~vijax.model.Model` made from a NumPyro model with a subsampling
    plate; ``default_batch_size`` is the plate's ``subsample_size``, the batch size the
    model was written for: ``vj.fit(m, batch_size=m.default_batch_size)``."""

    default_batch_size: int | None = None


class _AllRows(Messenger):
    """Make the plate ``plate`` take all of its rows: its subsample indices are
    ``arange(size)``, so it neither subsamples nor scales."""

    def __init__(self, fn: Callable | None = None, plate: str = "",
                 seen: dict | None = None) -> None:
        self.plate = plate
        self.seen = {} if seen is None else seen  # the plate's size, as the model gives it
        super().__init__(fn)

    def process_message(self, msg: dict) -> None:
        if msg["type"] == "plate" and msg["name"] == self.plate:
            size = msg["args"][0]
            self.seen["plate"] = size
            msg["value"] = jnp.arange(size)
            msg["args"] = (size, size)


def _site_log_prob(site: dict) -> jax.Array:
    fn, value = site["fn"], site["value"]
    lp = fn.log_prob(value, site["intermediates"]) if site.get("intermediates") else \
        fn.log_prob(value)
    return lp if site["scale"] is None else site["scale"] * lp


def _plate_frame(site: dict, plate: str):
    return next((f for f in site["cond_indep_stack"] if f.name == plate), None)


def _rows(lp: jax.Array, frame) -> jax.Array:
    """Per-row sums ``(size,)`` of a site's log density along the plate's dimension."""
    lp = jnp.asarray(lp)
    dim = frame.dim
    if lp.ndim < -dim:
        lp = lp.reshape((1,) * (-dim - lp.ndim) + lp.shape)
    lp = jnp.moveaxis(lp, lp.ndim + dim, 0)
    return jnp.broadcast_to(lp.reshape(lp.shape[0], -1).sum(1), (frame.size,))


def _run(model_fn: Callable, treedef: Any, static: tuple, obs: tuple, z: dict, plate: str,
         seen: dict | None = None) -> dict:
    """Trace of the model on the rows ``obs`` with latents and parameters ``z``."""
    args, kwargs = rebuild(treedef, static, obs)
    with (handlers.trace() as tr, handlers.substitute(data=z),
          _AllRows(plate=plate, seen=seen),
          handlers.seed(rng_seed=0)):
        model_fn(*args, **kwargs)
    return tr


def _terms(tr: dict, plate: str) -> tuple[dict[str, jax.Array], dict[str, jax.Array]]:
    """``(prior, rows)``: per sample site outside the plate its summed log density, per site
    inside it its per-row log density."""
    prior, rows = {}, {}
    for site_name, site in tr.items():
        if site["type"] != "sample":
            continue
        frame = _plate_frame(site, plate)
        lp = _site_log_prob(site)
        if frame is None:
            prior[site_name] = jnp.sum(lp)
        else:
            rows[site_name] = _rows(lp, frame)
    return prior, rows


def _fail(name: str, plate: SubsamplePlate, what: str) -> ValueError:
    return ValueError(f"numpyro model {name!r}, subsampling plate {plate.name!r} "
                      f"(size {plate.size}, subsample_size {plate.subsample_size}): {what}")


def check_plate(name: str, plates: dict[str, SubsamplePlate]) -> SubsamplePlate:
    if len(plates) > 1:
        raise ValueError(
            f"numpyro model {name!r} has {len(plates)} subsampling plates ({list(plates)}); "
            "vijax minibatches one observation axis: subsample one plate and give the "
            "others their full size (drop their subsample_size)")
    plate = next(iter(plates.values()))
    if plate.local_latents:
        raise _fail(name, plate, (
            f"latent site(s) {list(plate.local_latents)} lie inside it. These are local "
            "latents (one per row); vijax's local latents (a per-row guide for minibatch "
            "fits) are a later feature. Marginalise them out, move them out of the plate, "
            "or fit the full data without subsample_size. If a site is an observation, pass "
            "its data (obs=None makes it a latent)"))
    return plate


def subsampled_model(model_fn: Callable, name: str, treedef: Any, leaves: list,
                     concrete: frozenset[int], names: list[str], plates: dict,
                     latents: dict, params: dict, template_key: Any,
                     cache_get: Callable, cache_put: Callable) -> SubsampledModel:
    """The factorised model of a NumPyro model with one subsampling plate (module docstring).

    ``leaves`` are the flat ``(args, kwargs)``, ``concrete`` the indices of the leaves the
    model reads as NumPy values, ``names`` their readable names, ``latents`` and ``params``
    the global latents and parameters found by the adapter; ``template_key(static)`` the
    memoisation key of a template with those static leaves.
    """
    plate = check_plate(name, plates)
    n = plate.size
    traced = [i for i, x in enumerate(leaves) if i not in concrete and is_candidate(x)]
    rows = [i for i in traced if np.ndim(leaves[i]) >= 1 and np.shape(leaves[i])[0] == n]
    if not rows:
        raise _fail(name, plate, (
            f"no data argument has {n} rows along its leading axis; vijax minibatches the "
            "leading axis of the data that the plate subsamples, so the plate's size must be "
            "that axis's length (numpyro.plate(name, x.shape[0], subsample_size=...))"))
    closed = frozenset(traced) - frozenset(rows)
    static, obs = split(leaves, frozenset(concrete) | closed)
    row_names = [names[i] for i in rows]

    key = template_key(static)
    key = None if key is None else ("subsample", plate.name, plate.subsample_size, key)
    template = cache_get(key) if key is not None else None
    if template is not None:
        return template.with_data(obs)

    placeholder = tuple(np.zeros((1,) + np.shape(x)[1:], np.result_type(x)) for x in obs)

    def log_prior(z: dict) -> jax.Array:
        prior, _ = _terms(_run(model_fn, treedef, static, placeholder, z, plate.name),
                          plate.name)
        return sum(prior.values(), start=jnp.zeros(()))

    def log_likelihood(z: dict, data: tuple) -> jax.Array:
        if not isinstance(data, tuple | list) or len(data) != len(obs):
            raise ValueError(
                f"numpyro model {name!r}: data must be the tuple of the {len(obs)} data "
                f"arguments that plate {plate.name!r} subsamples ({row_names}), rows along "
                f"the leading axis (Model.data); got {data!r}")
        _, per_site = _terms(_run(model_fn, treedef, static, tuple(data), z, plate.name),
                             plate.name)
        return sum(per_site.values(), start=jnp.zeros(()))

    log_prior.__name__ = f"log_prior_{name}"
    log_likelihood.__name__ = f"log_likelihood_{name}"
    decl = {**latents, **params}
    z_spec = {k: jax.ShapeDtypeStruct(v.shape, jnp.int32 if v.support.is_discrete and k in
                                      latents else jnp.result_type(float))
              for k, v in decl.items()}
    _check_structure(model_fn, name, treedef, static, obs, z_spec, plate, row_names)
    _check_against_numpyro(model_fn, name, treedef, leaves, concrete, rows, plate, row_names,
                           log_prior, log_likelihood, list(decl))
    template = SubsampledModel(log_prior=log_prior, log_likelihood=log_likelihood,
                               latents=latents, params=params,
                               default_batch_size=plate.subsample_size)
    if key is not None:
        cache_put(key, template)
    return template.with_data(obs)


def _fixed_size(name: str, plate: SubsamplePlate, b: int, size: Any,
                row_names: list[str]) -> ValueError:
    return _fail(name, plate, (
        f"run on a batch of {b} rows of {row_names} its size is {size}, not {b}: the size "
        f"must follow the data (numpyro.plate({plate.name!r}, x.shape[0], "
        "subsample_size=...)), not be a fixed number, so that vijax can feed it batches"))


def _check_structure(model_fn: Callable, name: str, treedef: Any, static: tuple, obs: tuple,
                     z_spec: dict, plate: SubsamplePlate, row_names: list[str]) -> None:
    """Abstractly (nothing compiled): the model runs on a batch of ``B`` rows with a plate
    of size ``B``, has a site inside the plate, and no site outside it reads the rows."""
    b = plate.subsample_size
    batch = tuple(jax.ShapeDtypeStruct((b,) + np.shape(x)[1:], np.result_type(x)) for x in obs)
    sizes, order = {}, []

    def terms(zs: list, data: tuple) -> list:
        tr = _run(model_fn, treedef, static, data, dict(zip(z_spec, zs, strict=True)),
                  plate.name, sizes)
        prior, rows = _terms(tr, plate.name)
        order[:] = [list(prior), list(rows)]
        return list(prior.values())

    try:
        deps = output_dependence(terms, list(z_spec.values()), batch)
    except Exception as e:  # noqa: BLE001 (any failure means it cannot be fed batches)
        if sizes.get("plate", b) != b:
            raise _fixed_size(name, plate, b, sizes["plate"], row_names) from None
        raise _fail(name, plate, (
            f"the model fails when run on a batch of {b} rows of {row_names} (the data with "
            f"{plate.size} rows along the leading axis, which vijax minibatches): is some "
            "data subsampled along another axis, or an argument with that many rows not "
            f"subsampled by the plate? {type(e).__name__}: {e}")) from None
    if sizes.get("plate") != b:
        raise _fixed_size(name, plate, b, sizes.get("plate"), row_names)
    prior_sites, row_sites = order
    if not row_sites:
        raise _fail(name, plate, "no sample site lies inside it; nothing to minibatch")
    n_z = len(z_spec)
    for site_name, d in zip(prior_sites, deps, strict=True):
        read = [row_names[j] for j in range(len(row_names)) if d >> (n_z + j) & 1]
        if read:
            raise _fail(name, plate, (
                f"site {site_name!r} lies outside the plate but reads {read}, the data the "
                "plate subsamples; vijax's log prior sees no data: compute what it needs "
                "from the data before calling the model and pass it as an argument"))


def _check_against_numpyro(model_fn: Callable, name: str, treedef: Any, leaves: list,
                           concrete: frozenset[int], rows: list[int], plate: SubsamplePlate,
                           row_names: list[str], log_prior: Callable,
                           log_likelihood: Callable, z_names: list[str]) -> None:
    """NumPyro's density on a subsample equals the factorised one on the same rows."""
    static, data = split(leaves, frozenset(concrete))
    args, kwargs = rebuild(treedef, static, data)
    tr = _trace(model_fn, args, kwargs, 0.0)
    z = {k: tr[k]["value"] for k in z_names}
    n, b = plate.size, plate.subsample_size
    idx = np.random.default_rng(0).permutation(n)[:b]
    try:
        ref = log_density(handlers.substitute(model_fn, data={plate.name: jnp.asarray(idx)}),
                          args, kwargs, z)[0]
    except Exception as e:  # noqa: BLE001
        raise _fail(name, plate, f"NumPyro cannot evaluate the model on the subsample "
                                 f"{idx[:5].tolist()}...: {type(e).__name__}: {e}") from None
    batch = tuple(np.take(np.asarray(leaves[i]), idx, axis=0) for i in rows)
    prior, per_row = log_prior(z), log_likelihood(z, batch)
    ours = prior + n / b * jnp.sum(per_row)
    tol = 1e-3 * (1.0 + jnp.abs(prior) + n / b * jnp.sum(jnp.abs(per_row)))
    if not bool(jnp.abs(ours - ref) <= tol):
        raise _fail(name, plate, (
            f"its factorised log density (log prior + N/B * the batch's log likelihood, "
            f"rows {row_names} taken along the leading axis) is {float(ours):.6g} on a "
            f"subsample, NumPyro's is {float(ref):.6g}: the model reads data with {n} rows "
            "other than through the plate (in full, e.g. x.mean() inside the plate, or an "
            "argument of that length the plate does not subsample); subsample every such "
            "argument with numpyro.subsample or x[idx]"))
