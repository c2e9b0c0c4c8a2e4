"""Loading a fit result: the container opened and checked (:mod:`.archive`), the model's
latents compared with the saved ones, and the result rebuilt: tree structures from the guide,
optimizer and estimator (traced, not run), the saved leaves required to match them exactly
(the format: :mod:`vijax.checkpoint`). A fit with local latents is rebuilt from the same
compiled program a fit would use (:func:`vijax.program.compile_problem`): its start traced
by ``jax.eval_shape`` gives the structures of the global and local guide parameters."""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from vijax.checkpoint.archive import _refuse, open_archive
from vijax.checkpoint.config import UserEncoder, decode
from vijax.checkpoint.write import _GROUPS, _latent_records
from vijax.convergence import Convergence
from vijax.data import Feed, KLWeight, Minibatch
from vijax.guides.amortized import Amortized
from vijax.guides.local import LocalSpec
from vijax.guides.resolve import build_guide
from vijax.loop import init_state
from vijax.model import Model
from vijax.objective import make_objective
from vijax.optim import default_optimizer, local_default_optimizer
from vijax.program import Problem, compile_problem
from vijax.result import Diagnostics, FitResult

__all__ = ["load"]

# the loop state's structure depends on whether a stopping rule ran (not on its settings)
_STATE_RULES = (None, Convergence())


def load(path: str | os.PathLike, model, *, optimizer=None, guide=None) -> FitResult:
    """Read a result written by :func:`save` (``res.save(path)``), never unpickling anything.

    Args:
        path: the checkpoint file.
        model: the :class:`vijax.Model` that was fitted (functions are not stored); its
            latents (names, order, shapes, supports) must match the saved ones.
        optimizer: the Optax optimizer the fit used. Needed when that was not the default
            (``vj.default_optimizer`` at the guide's default learning rate, which is restored
            by itself); the saved optimizer state must fit its state structure exactly.
        guide: for a fit with local latents whose ``vj.guides.Amortized`` encoder was your
            own network (code, which a checkpoint does not store): the ``guide=`` dict of the
            fit again, ``{name: vj.guides.Amortized(encoder=net, ...), ...}``. Its entries
            for those latents supply the encoders; their other settings must equal the saved
            ones, and the saved encoder parameters must fit the network's exactly. Other
            entries are ignored (the rest of the guide is stored).

    Returns:
        A :class:`vijax.FitResult` equal to the saved one: the same arrays bit for bit
        (dtypes included, typed PRNG keys as typed keys), guide spec, estimator, optimizer
        and diagnostics; the guide is rebuilt from its spec.

    Raises:
        ValueError: naming the problem, when the file is missing, truncated or not a vijax
            checkpoint; its SHA-256 does not match (corrupted or tampered); it was written in
            a newer format or by another major.minor vijax version; the model's latents
            differ; it holds members that would need pickle; a custom optimizer was used and
            ``optimizer`` is not given, or ``optimizer``'s state does not match the saved one;
            a local latent's encoder was a user network and ``guide`` does not supply it.

    Example:
        >>> import os, tempfile, jax, numpyro.distributions as dist, vijax as vj
        >>> @vj.model(mu=vj.Latent())
        ... def m(z, y):
        ...     return dist.Normal(z["mu"], 1.0).log_prob(y).sum()
        >>> res = vj.fit(m, jax.numpy.ones(3), guide="meanfield", steps=20)
        >>> with tempfile.TemporaryDirectory() as d:
        ...     res.save(os.path.join(d, "fit.vjx"))
        ...     back = vj.load(os.path.join(d, "fit.vjx"), m)
        >>> all(bool((a == b).all()) for a, b in zip(jax.tree_util.tree_leaves(back.params),
        ...                                           jax.tree_util.tree_leaves(res.params)))
        True
    """
    if not isinstance(model, Model):
        raise TypeError(f"model must be the fitted vj.Model, got {type(model)}")
    if optimizer is not None and not (hasattr(optimizer, "init") and hasattr(optimizer,
                                                                             "update")):
        raise TypeError(f"optimizer must be an optax.GradientTransformation, got {optimizer!r}")
    if guide is not None and not isinstance(guide, Mapping):
        raise TypeError("guide must be the fit's guide= dict ({name: vj.guides.Amortized("
                        f"encoder=...), ...}}), got {guide!r}")
    path = os.fspath(path)
    manifest, arrays = open_archive(path)
    _check_latents(path, manifest, model)
    return _rebuild(path, manifest, arrays, model, optimizer, guide)


def _check_latents(path: str, manifest: dict, model) -> None:
    saved = manifest.get("latents")
    if not isinstance(saved, list) or not all(isinstance(s, dict) for s in saved):
        raise _refuse(path, "its manifest has no valid latent list")
    mine = _latent_records(model)
    if saved == mine:
        return
    by_name = {s.get("name"): s for s in saved}
    problems = []
    for m in mine:
        s = by_name.get(m["name"])
        if s is None:
            problems.append(f"the model's latent {m['name']!r} is not in the checkpoint")
            continue
        for key in ("shape", "support"):
            if s.get(key) != m[key]:
                ours = tuple(m[key]) if key == "shape" else m[key]
                theirs = tuple(s[key]) if key == "shape" and isinstance(s[key], list) \
                    else s.get(key)
                problems.append(f"latent {m['name']!r} has {key} {theirs} in the checkpoint "
                                f"but {ours} in the model")
    names = {m["name"] for m in mine}
    problems += [f"the checkpoint's latent {s.get('name')!r} is not in the model"
                 for s in saved if s.get("name") not in names]
    if not problems:
        problems.append(f"the latents are declared in a different order: "
                        f"{[s.get('name') for s in saved]} in the checkpoint, "
                        f"{[m['name'] for m in mine]} in the model")
    raise _refuse(path, "the model does not match the fitted one: " + "; ".join(problems))


def _leaves(path: str, manifest: dict, group: str) -> list[dict] | None:
    trees = manifest.get("trees")
    if not isinstance(trees, dict) or group not in trees:
        raise _refuse(path, f"its manifest has no tree {group!r}")
    leaves = trees[group]
    if leaves is not None and not (isinstance(leaves, list) and all(
            isinstance(x, dict) and {"path", "shape", "dtype", "member"} <= set(x)
            for x in leaves)):
        raise _refuse(path, f"its manifest's tree {group!r} is invalid")
    return leaves


def _signature(leaves) -> list[tuple[str, tuple, str]]:
    return [(x["path"], tuple(x["shape"]), x["dtype"]) for x in leaves]


def _expected(reference: Any) -> list[tuple[str, tuple, str]]:
    return [(jax.tree_util.keystr(p), tuple(x.shape), str(x.dtype))
            for p, x in jax.tree_util.tree_flatten_with_path(reference)[0]]


def _restore(path: str, group: str, leaves: list[dict], reference: Any,
             arrays: dict[str, np.ndarray], cache: dict, mismatch: str) -> Any:
    """The saved leaves of ``group`` in the structure of ``reference`` (a pytree of
    ``ShapeDtypeStruct``), after checking paths, shapes and dtypes agree exactly."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(reference)
    expected = _expected(reference)
    got = _signature(leaves)
    if got != expected:
        diff = next(((g, e) for g, e in zip(got, expected, strict=False) if g != e), None)
        if diff is not None:
            detail = (f"saved leaf {group}{diff[0][0]} {diff[0][1]} {diff[0][2]}, expected "
                      f"{group}{diff[1][0]} {diff[1][1]} {diff[1][2]}")
        else:
            detail = f"{len(got)} leaves saved, {len(expected)} expected"
        raise _refuse(path, f"{mismatch} ({detail})")
    out = []
    for leaf, (_, ref) in zip(leaves, flat, strict=True):
        out.append(_leaf_value(path, leaf, ref, arrays, cache))
    return jax.tree_util.tree_unflatten(treedef, out)


def _leaf_value(path: str, leaf: dict, ref: Any, arrays: dict[str, np.ndarray],
                cache: dict) -> Any:
    member, numpy = leaf["member"], bool(leaf.get("numpy", False))
    if (member, numpy) in cache:
        return cache[member, numpy]
    if member not in arrays:
        raise _refuse(path, f"leaf {leaf['path']} names the unknown member {member!r}")
    data = arrays[member]
    if "key_impl" in leaf:
        try:
            value = jax.random.wrap_key_data(data, impl=str(leaf["key_impl"]))
        except Exception as e:
            raise _refuse(path, f"invalid PRNG key data in member {member} ({e})") from None
    else:
        dtype = np.dtype(ref.dtype)
        if data.dtype != dtype:
            if data.dtype.itemsize != dtype.itemsize or data.dtype.kind != "u":
                raise _refuse(path, f"member {member} is {data.dtype}, expected {dtype}")
            data = data.view(dtype)  # stored as unsigned ints of the same width
        value = data if numpy else jax.device_put(data)
    if value.shape != tuple(ref.shape) or str(value.dtype) != str(ref.dtype):
        raise _refuse(path, f"member {member} holds {value.dtype}{list(value.shape)}, expected "
                            f"{ref.dtype}{list(ref.shape)}")
    cache[member, numpy] = value
    return value


def _check_x64(path: str, manifest: dict) -> None:
    if jax.config.jax_enable_x64:
        return
    wide = sorted({x["dtype"] for g in _GROUPS for x in (_leaves(path, manifest, g) or [])
                   if x["dtype"] in ("float64", "int64", "uint64", "complex128")})
    if wide:
        raise _refuse(path, f"it holds {', '.join(wide)} arrays (a 64-bit fit) but 64-bit "
                            "JAX is off: call jax.config.update('jax_enable_x64', True) first")


def _resolve_optimizer(path: str, manifest: dict, optimizer: Any):
    record = manifest.get("optimizer")
    if optimizer is not None:
        return optimizer
    if isinstance(record, dict) and record.get("kind") == "default":
        lr = record.get("learning_rate")
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr < math.inf:
            raise _refuse(path, f"invalid default optimizer learning rate {lr!r} (a positive "
                                "finite number)")
        return default_optimizer(lr)
    if isinstance(record, dict) and record.get("kind") == "local_default":
        lr, has_params = record.get("global_learning_rate"), record.get("has_params")
        if isinstance(lr, bool) or not isinstance(lr, int | float) or not 0 < lr < math.inf \
                or not isinstance(has_params, bool):
            raise _refuse(path, f"invalid local default optimizer record {record!r} (a "
                                "positive finite global_learning_rate, a boolean has_params)")
        return local_default_optimizer(lr, has_params)
    if isinstance(record, dict) and record.get("kind") == "custom":
        raise _refuse(path, "the fit used a custom optimizer, which a checkpoint cannot store; "
                            "pass the same one again: vj.load(path, model, optimizer=...) (its "
                            "saved state is restored only into the same optimizer)")
    raise _refuse(path, f"its manifest has an invalid optimizer record {record!r}")


def _diagnostics(path: str, manifest: dict) -> Diagnostics:
    saved = manifest.get("diagnostics")
    if not isinstance(saved, dict):
        raise _refuse(path, "its manifest has no diagnostics")
    defaults = Diagnostics._field_defaults
    out = Diagnostics(**{k: decode(saved[k], f"diagnostics.{k}") if k in saved
                         else defaults.get(k) for k in Diagnostics._fields})
    _check_diagnostics(path, out, saved)
    return out


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _is_number(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool)


def _check_diagnostics(path: str, d: Diagnostics, saved: dict) -> None:
    """Refuse diagnostics no fit can produce (a hand-edited or forged manifest)."""
    problems = [f"{k} is {getattr(d, k)!r}, not a count" for k in (
        "n_steps", "n_nonfinite_skipped", "max_steps", "psis_draws")
        if not _is_count(getattr(d, k))]
    problems += [f"{k} is {getattr(d, k)!r}, not a number" for k in (
        "wall_time", "final_loss", "k_hat", "ess") if not _is_number(getattr(d, k))]
    if not problems:
        if d.n_nonfinite_skipped > d.n_steps:
            problems.append(f"n_nonfinite_skipped ({d.n_nonfinite_skipped}) is more than "
                            f"n_steps ({d.n_steps})")
        if "max_steps" in saved and d.max_steps < d.n_steps:
            problems.append(f"max_steps ({d.max_steps}) is less than n_steps ({d.n_steps})")
        if not 0 <= d.wall_time < math.inf:
            problems.append(f"wall_time is {d.wall_time}")
        if d.ess < 0:
            problems.append(f"ess is {d.ess}")
    if isinstance(d.num_particles, bool) or not isinstance(d.num_particles, int) or \
            d.num_particles < 1:
        problems.append(f"num_particles is {d.num_particles!r}, not an int >= 1")
    if not isinstance(d.converged, bool):
        problems.append(f"converged is {d.converged!r}, not true or false")
    problems += [f"{k} is {getattr(d, k)!r}, not a string" for k in (
        "objective", "estimator", "stop_reason", "k_hat_reading")
        if not isinstance(getattr(d, k), str)]
    if problems:
        raise _refuse(path, "its diagnostics are impossible: " + "; ".join(problems))


def _fit_dtype(path: str, manifest: dict) -> np.dtype:
    """The fit's float type: that of ``init_point``."""
    _check_x64(path, manifest)
    point = _leaves(path, manifest, "init_point")
    if not point or len(point) != 1:
        raise _refuse(path, "it has no init_point")
    try:
        dtype = np.dtype(jax.numpy.dtype(point[0]["dtype"]))
    except TypeError:
        dtype = None
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise _refuse(path, f"its init_point has the unsupported dtype {point[0]['dtype']}")
    return dtype


def _supply_encoders(path: str, spec: Any, guide: Mapping | None) -> Any:
    """``spec`` with the user encoders that were not stored taken from ``guide``."""
    user = [name for name, s in getattr(spec, "factors", ())
            if isinstance(s, Amortized) and isinstance(s.encoder, UserEncoder)]
    if guide is None:
        if user:
            described = ", ".join(f"{n!r} ({dict(spec.factors)[n].encoder.description})"
                                  for n in user)
            raise _refuse(path, f"the encoders of local latent(s) {described} were your own "
                                "networks, which a checkpoint does not store (code, not data): "
                                "pass the fit's guide again: vj.load(path, model, guide={"
                                f"{user[0]!r}: vj.guides.Amortized(encoder=..., ...)}})")
        return spec
    if not isinstance(spec, LocalSpec):
        raise _refuse(path, "guide= supplies the encoders of local latents, but this fit has "
                            "no local latents (its guide is stored: leave guide= out)")
    factors = []
    for name, saved in spec.factors:
        given = guide.get(name)
        if name not in user:
            if isinstance(given, Amortized) and given.encoder is not None:
                raise _refuse(path, f"guide= gives local latent {name!r} an encoder network, "
                                    f"but the saved fit used {saved!r}")
            factors.append((name, saved))
            continue
        if not (isinstance(given, Amortized) and given.encoder is not None):
            raise _refuse(path, f"local latent {name!r} was fitted with your own encoder "
                                f"({saved.encoder.description}): guide[{name!r}] must be "
                                f"vj.guides.Amortized(encoder=...), got {given!r}")
        diff = [f"{f.name}={getattr(given, f.name)!r} (saved: {getattr(saved, f.name)!r})"
                for f in dataclasses.fields(Amortized) if f.name != "encoder"
                and getattr(given, f.name) != getattr(saved, f.name)]
        if diff:
            raise _refuse(path, f"guide[{name!r}] differs from the saved guide of local latent "
                                f"{name!r}: {', '.join(diff)}")
        factors.append((name, given))
    return dataclasses.replace(spec, factors=tuple(factors))


def _local_reference(path: str, spec: LocalSpec, target, estimator, num_particles: int,
                     optimizer, feed, dtype):
    """The lifted global guide and the structures of a fresh local fit: the program's start
    (:func:`vijax.program.compile_problem`) traced with and without a stopping rule."""
    try:
        programs = [compile_problem(Problem(target, spec, estimator, num_particles, optimizer,
                                            1, rule, feed)) for rule in _STATE_RULES]
    except (TypeError, ValueError) as e:
        raise _refuse(path, f"its guide spec {spec!r} does not build for this model ({e})") \
            from None

    def reference(key, theta):
        mask = jax.numpy.zeros(theta.shape, bool)
        states = [p.start(key, None, theta, mask)[3] for p in programs]
        gparams, mparams = target.split_params(states[0].params)
        return gparams, states[0].opt_state, states, mparams

    return programs[0].guide, reference


def _global_reference(guide, target, estimator, diagnostics: Diagnostics, optimizer, feed,
                      dtype):
    def reference(key, theta):  # the structures a fresh fit would have (traced, not run)
        gparams = guide.init(key, theta)
        mparams = target.param_init(dtype) if target.params else None
        params = (gparams, mparams) if target.params else gparams
        objective = make_objective(target, guide, "auto" if estimator is None else estimator,
                                   diagnostics.num_particles or 1)
        est_state = objective.init_state(dtype)
        return gparams, optimizer.init(params), [
            init_state(params, optimizer, est_state, rule, feed) for rule in _STATE_RULES], \
            mparams

    return reference


def _rebuild(path: str, manifest: dict, arrays: dict[str, np.ndarray], model,
             optimizer, guide_arg: Mapping | None = None) -> FitResult:
    dtype = _fit_dtype(path, manifest)
    spec = _supply_encoders(path, decode(manifest.get("guide_spec"), "guide spec"), guide_arg)
    estimator = decode(manifest.get("estimator"), "estimator")
    diagnostics = _diagnostics(path, manifest)
    given = optimizer is not None
    optimizer = _resolve_optimizer(path, manifest, optimizer)
    target = model.target
    theta = jax.ShapeDtypeStruct((target.full_dim,), dtype)
    feed = _feed(path, manifest)
    if isinstance(spec, LocalSpec):
        if not target.locals:
            raise _refuse(path, "it is a fit with local latents but the model has none")
        guide, reference = _local_reference(path, spec, target, estimator,
                                            diagnostics.num_particles or 1, optimizer, feed,
                                            dtype)
    else:
        try:
            guide = build_guide(spec, target)
        except (TypeError, ValueError) as e:
            raise _refuse(path, f"its guide spec {spec!r} does not build for this model "
                                f"({e})") from None
        reference = _global_reference(guide, target, estimator, diagnostics, optimizer, feed,
                                      dtype)
    try:
        ref_params, ref_opt, ref_states, ref_mparams = jax.eval_shape(
            reference, jax.random.key(0), theta)
    except Exception as e:
        if given:
            raise _refuse(path, f"the optimizer given cannot initialise a state for the "
                                f"guide's parameters ({type(e).__name__}: {e})") from None
        raise
    opt_mismatch = ("the optimizer given does not match the saved optimizer state" if given
                    else "the saved optimizer state does not match the default optimizer")
    param_mismatch = f"the saved guide parameters do not match the guide {spec!r}"
    saved_state = _leaves(path, manifest, "state")
    ref_state = next((r for r in ref_states if saved_state is not None
                      and _signature(saved_state) == _expected(r)), ref_states[0])
    losses = _leaves(path, manifest, "losses")
    if not losses or len(losses) != 1 or len(losses[0]["shape"]) != 1:
        raise _refuse(path, "it has no (steps,) losses array")
    if losses[0]["shape"][0] != diagnostics.n_steps:
        raise _refuse(path, f"its losses hold {losses[0]['shape'][0]} steps but its "
                            f"diagnostics say n_steps={diagnostics.n_steps}")
    key = _leaves(path, manifest, "loop_key")
    if key is not None and len(key) != 1:
        raise _refuse(path, "its loop_key is not a single PRNG key")
    refs = {"params": (ref_params, param_mismatch),
            "last_params": (ref_params, param_mismatch),
            "opt_state": (ref_opt, opt_mismatch),
            "state": (ref_state, "the saved fit state does not match the guide, optimizer and "
                                 f"estimator ({opt_mismatch}?)"),
            "init_point": (theta, "the saved init_point does not match the model"),
            "losses": (jax.ShapeDtypeStruct(tuple(losses[0]["shape"]), dtype),
                       "invalid losses"),
            "loop_key": (None if key is None else jax.ShapeDtypeStruct(
                tuple(key[0]["shape"]), _key_dtype(path, key[0])), "invalid loop_key"),
            "mparams": (ref_mparams, "the saved model parameters do not match the model's "
                                     f"{list(target.param_names)}")}
    if target.params and _leaves(path, manifest, "mparams") is None:
        raise _refuse(path, f"the model has parameters {list(target.param_names)} but the "
                            "checkpoint holds none (it was saved from a model without them)")
    cache: dict = {}  # one object per member: leaves shared when saved stay shared
    out = {}
    for group, (ref, mismatch) in refs.items():
        leaves = _leaves(path, manifest, group)
        out[group] = None if leaves is None else _restore(path, group, leaves, ref, arrays,
                                                          cache, mismatch)
    _check_state_counts(path, out["state"], diagnostics)
    return FitResult(model=model, guide=guide, guide_spec=spec, diagnostics=diagnostics,
                     optimizer=optimizer, estimator=estimator, feed=feed, **out)


def _feed(path: str, manifest: dict) -> Feed | None:
    """The data feed of the manifest (``None`` when the fit had none, or for format 3)."""
    record = manifest.get("feed")
    if record is None:
        return None
    try:
        mb, kl = record["minibatch"], record["kl"]
        minibatch = None if mb is None else Minibatch(int(mb["batch_size"]),
                                                      str(mb["shuffle"]), bool(mb["streamed"]))
        weight = None if kl is None else KLWeight(str(kl["kind"]), kl["value"])
    except (KeyError, TypeError, ValueError):
        raise _refuse(path, f"its manifest has an invalid feed record {record!r}") from None
    if minibatch is not None and (minibatch.batch_size < 1 or
                                  minibatch.shuffle not in ("epoch", "randint")):
        raise _refuse(path, f"its manifest has an invalid minibatch record {mb!r}")
    if weight is not None and weight.kind not in ("constant", "schedule", "blundell"):
        raise _refuse(path, f"its manifest has an invalid KL weight record {kl!r}")
    return Feed(minibatch, weight)


def _key_dtype(path: str, leaf: dict):
    if "key_impl" in leaf:
        try:
            return jax.random.key(0, impl=str(leaf["key_impl"])).dtype
        except Exception as e:
            raise _refuse(path, f"unknown PRNG implementation {leaf['key_impl']!r} ({e})") \
                from None
    if leaf["dtype"] != "uint32":
        raise _refuse(path, f"its loop_key has dtype {leaf['dtype']}, expected a PRNG key")
    return np.dtype(np.uint32)


def _check_state_counts(path: str, state: Any, diagnostics: Diagnostics) -> None:
    """The loop state's step and skip counters must be the diagnostics' own."""
    if state is None:
        return
    for field, saved in (("step", diagnostics.n_steps),
                         ("n_nonfinite", diagnostics.n_nonfinite_skipped)):
        value = getattr(state, field, None)
        if value is not None and int(np.asarray(value)) != saved:
            raise _refuse(path, f"its fit state has {field}={int(np.asarray(value))} but its "
                                f"diagnostics say {saved}")
