"""Pickle-free checkpoints of fit results: ``res.save(path)`` / ``vj.load(path, model)``.

File format (``FORMAT_VERSION`` 3; format 2 held the stopping rule's state without its
gradient statistics, format 1 stored full-rank Cholesky off-diagonals in absolute units; both
are refused). One uncompressed zip archive, a valid ``.npz`` file (so
``numpy.load(path, allow_pickle=False)`` can inspect it), with these members:

- ``manifest.json``: UTF-8 JSON, described below.
- ``a0.npy``, ``a1.npy``, ...: one ``.npy`` array (written with ``allow_pickle=False``) per
  distinct array leaf of the result (a leaf shared by two fields, e.g. ``params`` and
  ``state.avg_params``, is stored once). Typed PRNG keys are stored as their key data
  (``jax.random.key_data``, uint32) and non-NumPy dtypes (bfloat16, ...) as unsigned ints of
  the same width.

The manifest holds:

- ``format`` (``"vijax-checkpoint"``), ``format_version``, ``vijax_version``, ``jax_version``,
  ``numpy_version``;
- ``latents``: ``[{"name", "shape", "support"}, ...]`` in declaration order (``support`` is
  the constraint's ``repr``), checked against the model given to :func:`load`;
- ``guide_spec``, ``estimator``, ``diagnostics``: tagged JSON (``{"class": "IAF", "fields":
  {...}}`` for the configuration classes of :mod:`vijax.guides` and :mod:`vijax.estimators`,
  ``{"tuple": [...]}``, ``{"list": [...]}``, ``{"dict": {...}}``; scalars and strings as is);
- ``optimizer``: ``{"kind": "default", "learning_rate": lr}`` (``vj.default_optimizer(lr)``)
  or ``{"kind": "custom"}``;
- ``members``: ``[{"name", "dtype", "shape"}, ...]``, the stored arrays in order;
- ``trees``: for each of ``params``, ``last_params``, ``opt_state``, ``state``,
  ``init_point``, ``losses``, ``loop_key``: ``null`` or the list of its leaves in
  ``jax.tree_util`` order, each ``{"path": keystr, "shape", "dtype", "member",
  "numpy": bool}`` (plus ``"key_impl"`` for PRNG keys). Tree structures are not stored: the
  loader rebuilds them from the guide, optimizer and estimator (``guide.init``,
  ``optimizer.init``, :func:`vijax.loop.init_state` with and without a stopping rule, under
  ``jax.eval_shape``: traced, not run) and requires the saved leaves to match one of them
  exactly (paths, shapes, dtypes). ``numpy`` marks leaves that were NumPy arrays (``losses``);
  the others come back as JAX arrays;
- ``sha256``: hex SHA-256 of the canonical JSON of the manifest without this entry
  (``json.dumps(sort_keys=True, separators=(",", ":"))``) followed, for every member in
  order, by the line ``"{name} {dtype.str} {shape}\\n"`` and the array's C-order bytes.

Nothing is ever unpickled: arrays are read with ``allow_pickle=False`` and a file whose
members would need pickle (object arrays, anything other than ``.npy`` arrays and the
manifest) is refused.

Nothing is read unchecked either: the file must hold the zip archive alone (members back to
back from byte 0, then the central directory and end records; no bytes before, between or
after them, which the digest would not cover); every member must be stored uncompressed and
no larger (zip header ``file_size``) than the manifest's shape and dtype allow (plus a
``.npy`` header), and is read with a bounded read; the manifest itself is capped at 64 MiB.
Manifests that no fit can produce are refused even with a valid digest: negative or
inconsistent counts (``n_nonfinite_skipped > n_steps``, ``max_steps < n_steps``, a losses
length or loop-state step other than ``n_steps``), numbers that are not numbers, a learning
rate that is not positive and finite, member shapes that are not lists of non-negative ints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import secrets
import struct
import zipfile
from typing import Any

import jax
import numpy as np

from vijax import estimators as _estimators
from vijax import guides as _guides
from vijax.convergence import Convergence
from vijax.guides.resolve import build_guide
from vijax.loop import init_state
from vijax.objective import make_objective
from vijax.optim import DEFAULT_LEARNING_RATE, default_optimizer
from vijax.result import Diagnostics, FitResult

__all__ = ["save", "load", "FORMAT", "FORMAT_VERSION"]

FORMAT = "vijax-checkpoint"
FORMAT_VERSION = 3  # 3: the stopping rule's gradient statistics in the loop state
# 2: full-rank off-diagonals relative to their row's scale
_MANIFEST = "manifest.json"
_MAX_MANIFEST_BYTES = 64 << 20  # a manifest lists leaves and members: far below this
_MAX_NPY_HEADER_BYTES = 1 << 16  # a .npy header (magic, length, dict) of a vijax array
# zip records (APPNOTE 4.3): local file header, end of central directory, and the zip64 end
# record and its locator, which precede the end record in archives beyond the 32-bit limits
_LOCAL_HEADER = struct.Struct("<4s5H3L2H")
_END = struct.Struct("<4s4H2LH")
_END64_LOCATOR = struct.Struct("<4sLQL")
_END64 = struct.Struct("<4sQ2H2L4Q")
_GROUPS = ("params", "last_params", "opt_state", "state", "init_point", "losses", "loop_key")
_STORED_KINDS = "biufc"  # numeric dtypes only: anything else is refused on load
# the loop state's structure depends on whether a stopping rule ran (not on its settings)
_STATE_RULES = (None, Convergence())


# ---------------------------------------------------------------------------------------------
# configuration objects <-> tagged JSON
def _config_classes() -> dict[str, type]:
    classes = [*_guides.GUIDE_NAMES.values(), _guides.Structured, _guides.Whitened,
               *_estimators.ESTIMATOR_NAMES.values()]
    registry = {c.__name__: c for c in classes}
    assert len(registry) == len(classes), "configuration class names must be unique"
    return registry


def _encode(value: Any, what: str) -> Any:
    """JSON-able form of a configuration value (see the module docstring)."""
    if value is None or isinstance(value, bool | int | float | str):
        return value
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, tuple):
        return {"tuple": [_encode(v, what) for v in value]}
    if isinstance(value, list):
        return {"list": [_encode(v, what) for v in value]}
    if isinstance(value, dict) and all(isinstance(k, str) for k in value):
        return {"dict": {k: _encode(v, what) for k, v in value.items()}}
    registry = _config_classes()
    cls = type(value)
    if registry.get(cls.__name__) is cls:
        if cls is _guides.Structured:
            return {"class": "Structured", "args": _encode(value.blocks, what)}
        return {"class": cls.__name__, "fields": {f.name: _encode(getattr(value, f.name), what)
                                                  for f in dataclasses.fields(value)}}
    raise ValueError(f"cannot save {what}: {value!r} ({cls.__module__}.{cls.__qualname__}) is "
                     "not a JSON scalar, tuple, list, dict or one of the vijax configuration "
                     f"classes {sorted(registry)}")


def _decode(obj: Any, what: str) -> Any:
    if obj is None or isinstance(obj, bool | int | float | str):
        return obj
    if isinstance(obj, dict) and len(obj) == 1 and "tuple" in obj:
        return tuple(_decode(v, what) for v in _as_list(obj["tuple"], what))
    if isinstance(obj, dict) and len(obj) == 1 and "list" in obj:
        return [_decode(v, what) for v in _as_list(obj["list"], what)]
    if isinstance(obj, dict) and len(obj) == 1 and isinstance(obj.get("dict"), dict):
        return {k: _decode(v, what) for k, v in obj["dict"].items()}
    if isinstance(obj, dict) and "class" in obj:
        registry = _config_classes()
        cls = registry.get(obj["class"])
        if cls is None:
            raise ValueError(f"the checkpoint's {what} names an unknown class "
                             f"{obj['class']!r}; known: {sorted(registry)}")
        try:
            if cls is _guides.Structured:
                return cls(*_decode(obj["args"], what))
            fields = obj["fields"]
            if not isinstance(fields, dict):
                raise TypeError("fields must be an object")
            return cls(**{k: _decode(v, what) for k, v in fields.items()})
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"the checkpoint's {what} ({obj['class']}) is invalid: {e}") from None
    raise ValueError(f"the checkpoint's {what} holds an unreadable value {obj!r}")


def _as_list(obj: Any, what: str) -> list:
    if not isinstance(obj, list):
        raise ValueError(f"the checkpoint's {what} holds an unreadable value {obj!r}")
    return obj


# ---------------------------------------------------------------------------------------------
# arrays, leaves and the digest
def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _storable(arr: np.ndarray) -> np.ndarray:
    """A C-contiguous array of a NumPy numeric dtype holding the bits of ``arr``."""
    arr = np.require(arr, requirements="C")  # not ascontiguousarray: it makes 0-d arrays 1-d
    if arr.dtype.kind not in _STORED_KINDS or arr.dtype.type.__module__ != "numpy":
        arr = arr.view(np.dtype(f"u{arr.dtype.itemsize}"))  # e.g. bfloat16 -> uint16
    return arr


def _canonical(manifest: dict) -> bytes:
    return json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()


def _digest(manifest: dict, arrays: list[tuple[str, np.ndarray]]) -> str:
    h = hashlib.sha256(_canonical(manifest))
    for name, arr in arrays:
        h.update(f"{name} {arr.dtype.str} {list(arr.shape)}\n".encode())
        h.update(np.ascontiguousarray(arr).reshape(-1).view(np.uint8))
    return h.hexdigest()


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
    lrs = (getattr(res.guide_spec, "default_learning_rate", DEFAULT_LEARNING_RATE),
           DEFAULT_LEARNING_RATE)
    for lr in dict.fromkeys(lrs):
        if res.optimizer is default_optimizer(lr):
            return {"kind": "default", "learning_rate": lr}
    return {"kind": "custom"}


def _latent_records(model) -> list[dict]:
    return [{"name": name, "shape": list(lat.shape), "support": repr(lat.support)}
            for name, lat in model.latents.items()]


def _pack(res: FitResult) -> tuple[dict, list[tuple[str, np.ndarray]]]:
    import vijax

    if not isinstance(res, FitResult):
        raise TypeError(f"save expects a vj.FitResult, got {type(res)}")
    packer = _Packer()
    trees = {g: packer.tree(g, getattr(res, g)) for g in _GROUPS}
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vijax_version": vijax.__version__,
        "jax_version": jax.__version__,
        "numpy_version": np.__version__,
        "latents": _latent_records(res.model),
        "guide_spec": _encode(res.guide_spec, "guide spec"),
        "estimator": _encode(res.estimator, "estimator"),
        "optimizer": _optimizer_record(res),
        "diagnostics": {k: _encode(v, f"diagnostics.{k}")
                        for k, v in res.diagnostics._asdict().items()},
        "members": [{"name": n, "dtype": a.dtype.str, "shape": list(a.shape)}
                    for n, a in packer.arrays],
        "trees": trees,
    }
    manifest["sha256"] = _digest(manifest, packer.arrays)
    return manifest, packer.arrays


# ---------------------------------------------------------------------------------------------
def save(res: FitResult, path: str | os.PathLike) -> None:
    """Write ``res`` to the single file ``path``, atomically and without pickle.

    The file (format in the module docstring) holds every array of the result (``params``,
    ``last_params``, ``opt_state``, ``state``, ``init_point``, ``losses``, ``loop_key``)
    bit for bit, a JSON manifest (versions, latents, guide spec, estimator, optimizer,
    diagnostics, leaf paths, shapes and dtypes) and a SHA-256 over both. It is written to a
    temporary file in the same directory and renamed over ``path``, so ``path`` always holds
    either its old content or the complete new file. The model and a custom optimizer are
    functions and are not stored: :func:`load` takes them again.

    Raises:
        ValueError: the guide spec, estimator or diagnostics hold something other than JSON
            values and vijax configuration classes, or a pytree leaf is not an array.

    Example:
        >>> res.save("fit.vjx")  # doctest: +SKIP
    """
    manifest, arrays = _pack(res)  # everything is checked before the disk is touched
    path = os.fspath(path)
    directory, base = os.path.split(os.path.abspath(path))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    tmp = os.path.join(directory, f".{base}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, flags, 0o666)  # the umask applies, as for any new file
    try:
        with os.fdopen(fd, "wb") as fh:
            with zipfile.ZipFile(fh, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
                zf.writestr(_MANIFEST, json.dumps(manifest, indent=1, sort_keys=True))
                for name, arr in arrays:
                    with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                        np.lib.format.write_array(f, arr, allow_pickle=False)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


# ---------------------------------------------------------------------------------------------
# loading
def _refuse(path: str, problem: str) -> ValueError:
    return ValueError(f"cannot load {path!r}: {problem}")


def _read_bounded(path: str, zf: zipfile.ZipFile, name: str, limit: int) -> bytes:
    """A stored member's bytes, refused before reading when its size in the zip header is
    over ``limit``, and read with a bounded read (a header cannot make it inflate further)."""
    info = zf.getinfo(name)
    if info.compress_type != zipfile.ZIP_STORED:
        raise _refuse(path, f"member {name} is compressed; vijax checkpoints store their "
                            "members uncompressed (was the file re-packed?)")
    if info.file_size > limit:
        raise _refuse(path, f"member {name} is {info.file_size} bytes, more than the "
                            f"{limit} its manifest allows")
    try:
        with zf.open(name) as f:
            raw = f.read(limit + 1)  # checks the zip CRC at the end
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise _refuse(path, f"member {name} is corrupt ({e})") from None
    if len(raw) > limit:
        raise _refuse(path, f"member {name} holds more than the {limit} bytes its manifest "
                            "allows")
    return raw


def _check_layout(path: str, zf: zipfile.ZipFile) -> None:
    """The file must be exactly what :func:`save` writes: the members back to back from byte
    0, then the central directory and the end record(s), and nothing before, between or
    after them (the digest covers the members, so any other bytes would go unchecked)."""
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size

        def read(at: int, n: int) -> bytes:
            fh.seek(at)
            return fh.read(n)

        pos = 0
        for info in sorted(zf.infolist(), key=lambda i: i.header_offset):
            head = read(pos, _LOCAL_HEADER.size)
            if info.header_offset != pos or len(head) < _LOCAL_HEADER.size or \
                    head[:4] != b"PK\x03\x04":
                raise _refuse(path, "it holds bytes before or between its zip members that "
                                    "no vijax checkpoint has (the file was modified)")
            if info.flag_bits & 0x08:
                raise _refuse(path, f"member {info.filename} has a zip data descriptor, which "
                                    "vijax checkpoints never have (the file was re-packed)")
            *_, name_len, extra_len = _LOCAL_HEADER.unpack(head)
            pos += _LOCAL_HEADER.size + name_len + extra_len + info.compress_size
        end = read(size - _END.size, _END.size) if size >= _END.size else b""
        if len(end) < _END.size or end[:4] != b"PK\x05\x06" or _END.unpack(end)[-1]:
            raise _refuse(path, "it has data after the end of its zip archive (bytes were "
                                "appended to the file)")
        _, _, _, _, count, cd_size, cd_at, _ = _END.unpack(end)
        end_at = size - _END.size
        if count == 0xFFFF or cd_size == 0xFFFFFFFF or cd_at == 0xFFFFFFFF:  # zip64
            loc = read(end_at - _END64_LOCATOR.size, _END64_LOCATOR.size)
            sig, _, rec_at, _ = _END64_LOCATOR.unpack(loc) if len(loc) == 20 else (b"",) * 4
            rec = read(rec_at, _END64.size) if sig == b"PK\x06\x07" else b""
            if len(rec) < _END64.size or rec[:4] != b"PK\x06\x06" or \
                    rec_at + _END64.size != end_at - _END64_LOCATOR.size:
                raise _refuse(path, "its zip64 end records are not where a vijax checkpoint "
                                    "has them (the file was modified)")
            *_, cd_size, cd_at = _END64.unpack(rec)
            end_at = rec_at
        if cd_at != pos or zf.start_dir != pos or cd_at + cd_size != end_at:
            raise _refuse(path, "its zip central directory is not where a vijax checkpoint "
                                "has it (bytes were inserted or the file was modified)")


def _read_manifest(path: str, zf: zipfile.ZipFile) -> dict:
    names = zf.namelist()
    if _MANIFEST not in names:
        raise _refuse(path, f"not a vijax checkpoint (no {_MANIFEST} member)")
    raw = _read_bounded(path, zf, _MANIFEST, _MAX_MANIFEST_BYTES)
    try:
        manifest = json.loads(raw.decode("utf-8"))
    except ValueError as e:
        raise _refuse(path, f"its {_MANIFEST} is corrupt ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise _refuse(path, f"not a vijax checkpoint ({_MANIFEST} does not name the format "
                            f"{FORMAT!r})")
    return manifest


def _check_versions(path: str, manifest: dict) -> None:
    import vijax

    fmt = manifest.get("format_version")
    if isinstance(fmt, bool) or not isinstance(fmt, int):
        raise _refuse(path, f"invalid format_version {fmt!r}")
    if fmt > FORMAT_VERSION:
        raise _refuse(path, f"it is in checkpoint format {fmt}, newer than the format "
                            f"{FORMAT_VERSION} this vijax ({vijax.__version__}) reads; upgrade "
                            "vijax")
    if fmt == 2:
        raise _refuse(path, f"it is in checkpoint format 2, whose loop state lacks the "
                            f"stopping rule's gradient statistics of format {FORMAT_VERSION} "
                            "(it cannot be resumed under the current rule); refit and save "
                            "again")
    if fmt < FORMAT_VERSION:
        raise _refuse(path, f"it is in checkpoint format {fmt}, whose full-rank Gaussian "
                            f"parameters mean something else in format {FORMAT_VERSION} (the "
                            "Cholesky off-diagonals are now relative to their row's scale); "
                            "refit and save again")
    saved = str(manifest.get("vijax_version"))
    if saved.split(".")[:2] != vijax.__version__.split(".")[:2]:
        raise _refuse(path, f"it was written by vijax {saved}, this is vijax "
                            f"{vijax.__version__}; checkpoints load only into the same major."
                            "minor version (the layout of the fit state may differ)")


def _member_bytes(path: str, member: dict) -> int:
    """Bytes of a member's array data as its manifest record declares it (shape, dtype)."""
    shape, dtype = member.get("shape"), member.get("dtype")
    if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape):
        raise _refuse(path, f"its manifest gives member {member['name']} the invalid shape "
                            f"{shape!r} (a list of non-negative ints)")
    try:
        dt = np.dtype(dtype) if isinstance(dtype, str) else None
    except (TypeError, ValueError):
        dt = None
    if dt is None or dt.hasobject or dt.kind not in _STORED_KINDS:
        raise _refuse(path, f"its manifest gives member {member['name']} the invalid or "
                            f"unsupported dtype {dtype!r}")
    return math.prod(shape) * dt.itemsize


def _read_members(path: str, zf: zipfile.ZipFile, manifest: dict) -> dict[str, np.ndarray]:
    members = manifest.get("members")
    if not isinstance(members, list) or not all(
            isinstance(m, dict) and isinstance(m.get("name"), str) for m in members):
        raise _refuse(path, "its manifest has no valid member list")
    if len({m["name"] for m in members}) != len(members):
        raise _refuse(path, "its manifest lists a member twice")
    declared = {m["name"] + ".npy": m for m in members}
    names = zf.namelist()
    if len(set(names)) != len(names):
        raise _refuse(path, "the archive has duplicate member names")
    extra = sorted(set(names) - set(declared) - {_MANIFEST})
    if extra:
        raise _refuse(path, f"unexpected member(s) {extra}: a vijax checkpoint holds only "
                            f"{_MANIFEST} and the .npy arrays its manifest lists")
    missing = sorted(set(declared) - set(names))
    if missing:
        raise _refuse(path, f"member(s) {missing} listed in the manifest are missing "
                            "(truncated file?)")
    arrays = {}
    for m in members:
        arrays[m["name"]] = _read_array(path, zf, m)
    return arrays


def _read_array(path: str, zf: zipfile.ZipFile, member: dict) -> np.ndarray:
    name = member["name"] + ".npy"
    size = _member_bytes(path, member)
    stored = zf.getinfo(name).file_size
    if stored < size:
        raise _refuse(path, f"member {name} is {stored} bytes, too small for the "
                            f"{member['dtype']} {member['shape']} array its manifest declares "
                            "(truncated file?)")
    raw = _read_bounded(path, zf, name, size + _MAX_NPY_HEADER_BYTES)
    f = io.BytesIO(raw)
    try:  # inspect the header first: an object dtype would need pickle to read
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            _, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            _, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise ValueError(f"unsupported .npy version {version}")
    except Exception as e:  # a malformed header (read by numpy's literal parser, never eval)
        raise _refuse(path, f"member {name} is not a valid .npy array ({e})") from None
    if dtype.hasobject:
        raise _refuse(path, f"member {name} holds a Python object array, which only pickle "
                            "can read; vijax never unpickles (the file is not a genuine "
                            "vijax checkpoint and may be malicious)")
    if dtype.kind not in _STORED_KINDS:
        raise _refuse(path, f"member {name} has the unsupported dtype {dtype}")
    f.seek(0)
    try:
        arr = np.lib.format.read_array(f, allow_pickle=False)
    except Exception as e:
        raise _refuse(path, f"member {name} is not a valid .npy array ({e})") from None
    if arr.dtype.str != member.get("dtype") or list(arr.shape) != member.get("shape"):
        raise _refuse(path, f"member {name} is {arr.dtype.str} {list(arr.shape)} but the "
                            f"manifest says {member.get('dtype')} {member.get('shape')}")
    return arr


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
    out = Diagnostics(**{k: _decode(saved[k], f"diagnostics.{k}") if k in saved
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


def load(path: str | os.PathLike, model, *, optimizer=None) -> FitResult:
    """Read a result written by :func:`save` (``res.save(path)``), never unpickling anything.

    Args:
        path: the checkpoint file.
        model: the :class:`vijax.Model` that was fitted (functions are not stored); its
            latents (names, order, shapes, supports) must match the saved ones.
        optimizer: the Optax optimizer the fit used. Needed when that was not the default
            (``vj.default_optimizer`` at the guide's default learning rate, which is restored
            by itself); the saved optimizer state must fit its state structure exactly.

    Returns:
        A :class:`vijax.FitResult` equal to the saved one: the same arrays bit for bit
        (dtypes included, typed PRNG keys as typed keys), guide spec, estimator, optimizer
        and diagnostics; the guide is rebuilt from its spec.

    Raises:
        ValueError: naming the problem, when the file is missing, truncated or not a vijax
            checkpoint; its SHA-256 does not match (corrupted or tampered); it was written in
            a newer format or by another major.minor vijax version; the model's latents
            differ; it holds members that would need pickle; a custom optimizer was used and
            ``optimizer`` is not given, or ``optimizer``'s state does not match the saved one.

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
    from vijax.model import Model

    if not isinstance(model, Model):
        raise TypeError(f"model must be the fitted vj.Model, got {type(model)}")
    if optimizer is not None and not (hasattr(optimizer, "init") and hasattr(optimizer,
                                                                             "update")):
        raise TypeError(f"optimizer must be an optax.GradientTransformation, got {optimizer!r}")
    path = os.fspath(path)
    manifest, arrays = _open(path)
    _check_latents(path, manifest, model)
    return _rebuild(path, manifest, arrays, model, optimizer)


def _open(path: str) -> tuple[dict, dict[str, np.ndarray]]:
    """The manifest (without its digest) and the arrays, after every integrity check."""
    if not os.path.exists(path):
        raise _refuse(path, "no such file")
    if not os.path.isfile(path):
        raise _refuse(path, "not a regular file")
    try:
        zf = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise _refuse(path, f"not a vijax checkpoint, or a truncated one: not a readable zip "
                            f"archive ({e})") from None
    with zf:
        manifest = _read_manifest(path, zf)
        _check_layout(path, zf)
        _check_versions(path, manifest)
        arrays = _read_members(path, zf, manifest)
    stored = manifest.pop("sha256", None)
    if stored != _digest(manifest, [(m["name"], arrays[m["name"]])
                                    for m in manifest["members"]]):
        raise _refuse(path, "its SHA-256 does not match its content: the file is corrupted "
                            "or was modified after it was saved")
    return manifest, arrays


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


def _rebuild(path: str, manifest: dict, arrays: dict[str, np.ndarray], model,
             optimizer) -> FitResult:
    dtype = _fit_dtype(path, manifest)
    spec = _decode(manifest.get("guide_spec"), "guide spec")
    estimator = _decode(manifest.get("estimator"), "estimator")
    diagnostics = _diagnostics(path, manifest)
    given = optimizer is not None
    optimizer = _resolve_optimizer(path, manifest, optimizer)
    target = model.target
    try:
        guide = build_guide(spec, target)
    except (TypeError, ValueError) as e:
        raise _refuse(path, f"its guide spec {spec!r} does not build for this model ({e})") \
            from None
    theta = jax.ShapeDtypeStruct((target.full_dim,), dtype)

    def reference(key, theta):  # the structures a fresh fit would have (traced, not run)
        params = guide.init(key, theta)
        objective = make_objective(target, guide, "auto" if estimator is None else estimator,
                                   diagnostics.num_particles or 1)
        est_state = objective.init_state(dtype)
        return params, optimizer.init(params), [init_state(params, optimizer, est_state, rule)
                                                for rule in _STATE_RULES]

    try:
        ref_params, ref_opt, ref_states = jax.eval_shape(reference, jax.random.key(0), theta)
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
                tuple(key[0]["shape"]), _key_dtype(path, key[0])), "invalid loop_key")}
    cache: dict = {}  # one object per member: leaves shared when saved stay shared
    out = {}
    for group, (ref, mismatch) in refs.items():
        leaves = _leaves(path, manifest, group)
        out[group] = None if leaves is None else _restore(path, group, leaves, ref, arrays,
                                                          cache, mismatch)
    _check_state_counts(path, out["state"], diagnostics)
    return FitResult(model=model, guide=guide, guide_spec=spec, diagnostics=diagnostics,
                     optimizer=optimizer, estimator=estimator, **out)


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
