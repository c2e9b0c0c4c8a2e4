"""The checkpoint container: one uncompressed zip archive holding ``manifest.json`` and one
``.npy`` array per member, written atomically, and read back only after every check of its
layout, sizes, versions and digest (the format: :mod:`vijax.checkpoint`)."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import math
import os
import secrets
import struct
import zipfile

import numpy as np

from vijax.version import __version__

__all__ = ["FORMAT", "FORMAT_VERSION", "write_archive", "open_archive"]

FORMAT = "vijax-checkpoint"
FORMAT_VERSION = 4  # 3: the stopping rule's gradient statistics in the loop state; 4: model
# parameters (vj.Param) and the data feed (minibatches, KL weight); format 3 files still load
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
_STORED_KINDS = "biufc"  # numeric dtypes only: anything else is refused on load


# ---------------------------------------------------------------------------------------------
# arrays and the digest
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


# ---------------------------------------------------------------------------------------------
# writing
def write_archive(path: str | os.PathLike, manifest: dict,
                  arrays: list[tuple[str, np.ndarray]]) -> None:
    """Write ``manifest`` (digest included) and ``arrays`` to the single file ``path``: to a
    temporary file in the same directory, then renamed over ``path``, so ``path`` always
    holds either its old content or the complete new file."""
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
# reading
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
    fmt = manifest.get("format_version")
    if isinstance(fmt, bool) or not isinstance(fmt, int):
        raise _refuse(path, f"invalid format_version {fmt!r}")
    if fmt > FORMAT_VERSION:
        raise _refuse(path, f"it is in checkpoint format {fmt}, newer than the format "
                            f"{FORMAT_VERSION} this vijax ({__version__}) reads; upgrade "
                            "vijax")
    if fmt == 2:
        raise _refuse(path, f"it is in checkpoint format 2, whose loop state lacks the "
                            f"stopping rule's gradient statistics of format {FORMAT_VERSION} "
                            "(it cannot be resumed under the current rule); refit and save "
                            "again")
    if fmt < 3:
        raise _refuse(path, f"it is in checkpoint format {fmt}, whose full-rank Gaussian "
                            f"parameters mean something else in format {FORMAT_VERSION} (the "
                            "Cholesky off-diagonals are now relative to their row's scale); "
                            "refit and save again")
    saved = str(manifest.get("vijax_version"))
    if saved.split(".")[:2] != __version__.split(".")[:2]:
        raise _refuse(path, f"it was written by vijax {saved}, this is vijax "
                            f"{__version__}; checkpoints load only into the same major."
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


def open_archive(path: str) -> tuple[dict, dict[str, np.ndarray]]:
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
