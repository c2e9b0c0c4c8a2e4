"""NumPyro models written for NumPyro's minibatch SVI: one ``numpyro.plate(name, N,
subsample_size=B)`` becomes vijax's factorised form (``log_prior`` over the sites outside the
plate, ``log_likelihood`` one unscaled value per row inside it), fitted with vijax's own
minibatches (``vj.fit(model, batch_size=B)``; ``model.default_batch_size`` is the plate's B).

The model runs on a batch with the plate told to take all its rows, so that
``numpyro.subsample(x, ...)`` and ``x[idx]`` return the batch and NumPyro's own N/B scaling
is not applied on top of vijax's. Latent sites inside the plate become vijax's local
latents (one value per row, ``vj.Latent(..., local=True)``; their per-row log density is
part of the row's term), fitted with an amortized guide by default. Refused, with errors
naming the plate or site: several subsampling plates, a local latent whose value does not
have the plate as its leading axis, a plate size fixed in the model, a site outside the
plate reading the subsampled data, and data read other than through the plate (checked
against NumPyro's own density on a random subsample).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from numpyro import handlers
from numpyro.infer.util import log_density
from numpyro.primitives import Messenger

from vijax.model import Latent, Model, output_dependence
from vijax.numpyro_data import is_candidate, rebuild, split
from vijax.numpyro_sites import SubsamplePlate, _trace

__all__ = ["SubsampledModel", "subsampled_model", "check_plate"]


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
    for site_name, axis in zip(plate.local_latents, plate.local_axes, strict=True):
        if axis != 0:
            raise _fail(name, plate, (
                f"latent site {site_name!r} lies inside it with the plate along axis {axis} "
                "of its value; a local latent (one value per row) needs the plate as the "
                "leading axis of its batch shape (numpyro.plate(..., dim=-k) with k the "
                "number of batch dimensions, or .to_event() for the per-row dimensions)"))
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
        # the local latents (drawn here for the placeholder row) belong to the rows' terms
        z = {k: v for k, v in z.items() if k not in plate.local_latents}
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
    latents = {k: (Latent(shape=v.shape[1:], support=v.support, local=True)
                   if k in plate.local_latents else v) for k, v in latents.items()}
    decl = {**latents, **params}
    z_spec = {k: jax.ShapeDtypeStruct(
        ((plate.subsample_size,) if k in plate.local_latents else ()) + v.shape,
        jnp.int32 if v.support.is_discrete and k in latents else jnp.result_type(float))
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
