"""Saving a fit result: every array leaf packed into numbered ``.npy`` members, the rest into
the JSON manifest, with a SHA-256 over both (the format: :mod:`vijax.checkpoint`).

Duck-typed on the result (it reads the fields :class:`vijax.FitResult` has), so that
``FitResult.save`` can call it without an import cycle."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

from vijax.checkpoint.archive import FORMAT, FORMAT_VERSION, _digest, _storable, write_archive
from vijax.checkpoint.config import encode
from vijax.optim import DEFAULT_LEARNING_RATE, default_optimizer, local_default_optimizer
from vijax.version import __version__

if TYPE_CHECKING:  # annotations only: vijax.result imports this module
    from vijax.result import FitResult

__all__ = ["save"]

_GROUPS = ("params", "last_params", "opt_state", "state", "init_point", "losses", "loop_key",
           "mparams")
_FIELDS = ("model", "guide_spec", "estimator", "optimizer", "diagnostics", *_GROUPS)
"""What ``save`` reads from a result: the array groups and the configuration."""


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


class _Packer:
    """Collects array leaves into members, storing each distinct leaf object once."""

    def __init__(self):
        self.arrays: list[tuple[str, np.ndarray]] = []
        self._seen: dict[int, str] = {}
        self._keep: list[Any] = []  # keeps ids valid while packing

    def tree(self, group: str, tree: Any) -> list[dict] | None:
        if tree is None:
            return None
        leaves = []
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            where = group + jax.tree_util.keystr(path)
            record = {"path": jax.tree_util.keystr(path)}
            if _is_key(leaf):
                record.update(shape=list(leaf.shape), dtype=str(leaf.dtype), numpy=False,
                              key_impl=str(jax.random.key_impl(leaf)))
                data = jax.random.key_data(leaf)
            elif isinstance(leaf, jax.Array | np.ndarray):
                record.update(shape=list(leaf.shape), dtype=str(leaf.dtype),
                              numpy=isinstance(leaf, np.ndarray))
                data = leaf
            else:
                raise ValueError(f"cannot save {where}: a checkpoint stores arrays only, got "
                                 f"{type(leaf).__name__} {leaf!r}")
            record["member"] = self._member(leaf, data, where)
            leaves.append(record)
        return leaves

    def _member(self, leaf: Any, data: Any, where: str) -> str:
        if id(leaf) in self._seen:
            return self._seen[id(leaf)]
        arr = np.asarray(data)
        if arr.dtype.hasobject:
            raise ValueError(f"cannot save {where}: object arrays are not allowed")
        name = f"a{len(self.arrays)}"
        self.arrays.append((name, _storable(arr)))
        self._seen[id(leaf)] = name
        self._keep.append(leaf)
        return name


def _optimizer_record(res: FitResult) -> dict:
    """``{"kind": "default", "learning_rate"}``, ``{"kind": "local_default",
    "global_learning_rate", "has_params"}`` (:func:`vijax.optim.local_default_optimizer`, the
    default of a fit with local latents) or ``{"kind": "custom"}``: the defaults are
    recognised by identity with the shared object of the spec's learning rate."""
    spec = res.guide_spec
    lrs = (getattr(spec, "default_learning_rate", DEFAULT_LEARNING_RATE),
           DEFAULT_LEARNING_RATE)
    for lr in dict.fromkeys(lrs):
        if res.optimizer is default_optimizer(lr):
            return {"kind": "default", "learning_rate": lr}
    if hasattr(spec, "global_spec"):  # a LocalSpec
        lrs = (getattr(spec.global_spec, "default_learning_rate", DEFAULT_LEARNING_RATE),
               DEFAULT_LEARNING_RATE)
        for lr in dict.fromkeys(lrs):
            for has_params in (False, True):
                if res.optimizer is local_default_optimizer(lr, has_params):
                    return {"kind": "local_default", "global_learning_rate": lr,
                            "has_params": has_params}
    return {"kind": "custom"}


def _latent_records(model) -> list[dict]:
    return [{"name": name, "shape": list(lat.shape), "support": repr(lat.support)}
            for name, lat in model.latents.items()]


def _feed_record(feed) -> dict | None:
    """The data feed as JSON: minibatch settings and the KL weight (a schedule, a function,
    is recorded by kind only: a resumed fit of a loaded result must be refitted)."""
    if feed is None:
        return None
    mb, kl = feed.minibatch, feed.kl
    return {"minibatch": None if mb is None else {"batch_size": mb.batch_size,
                                                  "shuffle": mb.shuffle,
                                                  "streamed": mb.streamed},
            "kl": None if kl is None else {
                "kind": kl.kind, "value": kl.value if kl.kind == "constant" else None}}


def _pack(res: FitResult) -> tuple[dict, list[tuple[str, np.ndarray]]]:
    if not all(hasattr(res, f) for f in _FIELDS):
        raise TypeError(f"save expects a vj.FitResult, got {type(res)}")
    packer = _Packer()
    trees = {g: packer.tree(g, getattr(res, g)) for g in _GROUPS}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vijax_version": __version__,
        "jax_version": jax.__version__,
        "numpy_version": np.__version__,
        "latents": _latent_records(res.model),
        "guide_spec": encode(res.guide_spec, "guide spec"),
        "estimator": encode(res.estimator, "estimator"),
        "optimizer": _optimizer_record(res),
        "diagnostics": {k: encode(v, f"diagnostics.{k}")
                        for k, v in res.diagnostics._asdict().items()},
        "feed": _feed_record(getattr(res, "feed", None)),
        "members": [{"name": n, "dtype": a.dtype.str, "shape": list(a.shape)}
                    for n, a in packer.arrays],
        "trees": trees,
    }
    manifest["sha256"] = _digest(manifest, packer.arrays)
    return manifest, packer.arrays


def save(res: FitResult, path: str | os.PathLike) -> None:
    """Write ``res`` to the single file ``path``, atomically and without pickle.

    The file (format in the module docstring) holds every array of the result (``params``,
    ``last_params``, ``opt_state``, ``state``, ``init_point``, ``losses``, ``loop_key``)
    bit for bit, a JSON manifest (versions, latents, guide spec, estimator, optimizer,
    diagnostics, leaf paths, shapes and dtypes) and a SHA-256 over both. It is written to a
    temporary file in the same directory and renamed over ``path``, so ``path`` always holds
    either its old content or the complete new file. The model, a custom optimizer and the
    encoder networks you gave local latents (``vj.guides.Amortized(encoder=net)``; their
    parameters are stored) are code and are not stored: :func:`load` takes them again
    (``model``, ``optimizer=``, ``guide=``). A fit with local latents stores its guide spec
    with one data row's structure (dicts with string keys, tuples, lists and arrays).

    Across processes (``jax.distributed``, :mod:`vijax.launch`), every process calls
    ``save`` with the same result and path (a result holds the same values in every
    process); process 0 alone writes the file, and ``save`` returns in every process once
    the file is complete (a barrier: any process may read it next). If process 0 fails to
    write, it raises its error and the other processes raise ``OSError``.

    Raises:
        ValueError: the guide spec, estimator or diagnostics hold something other than JSON
            values and vijax configuration classes (e.g. a wake-sleep estimator's sampler, or
            a data row that is a NamedTuple or custom pytree), or a pytree leaf is not an
            array.
        OSError: in a process other than 0, when process 0 could not write the file.

    Example:
        >>> res.save("fit.vjx")  # doctest: +SKIP
    """
    manifest, arrays = _pack(res)  # everything is checked before the disk is touched
    if jax.process_count() == 1:
        write_archive(path, manifest, arrays)
        return
    _write_in_process_zero(path, manifest, arrays)


def _write_in_process_zero(path, manifest: dict, arrays: list) -> None:
    """Process 0 writes; then every process learns whether it did (``process_allgather``
    of a flag: a collective, so also the barrier after which the file is complete)."""
    from jax.experimental import multihost_utils

    error = None
    if jax.process_index() == 0:
        try:
            write_archive(path, manifest, arrays)
        except Exception as e:  # reported to the others, then raised here
            error = e
    flags = np.asarray(multihost_utils.process_allgather(np.int32(error is None)))
    if error is not None:
        raise error
    if not bool(flags.reshape(-1)[0]):
        raise OSError(f"process 0 could not write the checkpoint {os.fspath(path)!r} (its "
                      "own error says why)")
