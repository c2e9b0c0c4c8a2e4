"""Checkpoints (``vijax.io``, ``vijax.checkpoint``): bitwise round trips, refusals, no pickle,
atomic writes."""

import dataclasses
import json
import math
import os
import pickle
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest
from numpyro.distributions import constraints

import vijax as vj
from tests.conftest import precision, raw_fit
from vijax.checkpoint import archive, config

Y = np.array([0.3, -0.5, 1.2, 0.8])


@vj.model(mu=vj.Latent())
def normal(z, y):
    return dist.Normal(0.0, 10.0).log_prob(z["mu"]) + dist.Normal(z["mu"], 1.0).log_prob(y).sum()


@vj.model(a=vj.Latent(), b=vj.Latent((2,), constraints.positive))
def two(z, y):
    return (dist.Normal(0.0, 1.0).log_prob(z["a"]) + dist.Gamma(2.0, 2.0).log_prob(z["b"]).sum()
            + dist.Normal(z["a"] + z["b"].sum(), 1.0).log_prob(y).sum())


@vj.model(a=vj.Latent(), b=vj.Latent((2,), constraints.positive),
          s=vj.Latent((3,), constraints.boolean))
def mixed(z, y):
    return two.log_joint(z, y) + dist.Bernoulli(probs=0.3).log_prob(z["s"]).sum() + dist.Normal(
        z["s"].sum(), 1.0).log_prob(y).sum()


def _fit(model, **kwargs):
    return raw_fit(model, Y, steps=30, key=jax.random.key(1), **kwargs)


def _fit_fast(model, **kwargs):
    """A fit without the stopping rule and PSIS: fewer compiles (the shared fixture covers
    the default fit)."""
    return _fit(model, convergence=None, psis_draws=0, **kwargs)


@pytest.fixture(scope="module")
def res():
    return _fit(normal, guide="meanfield")


@pytest.fixture(scope="module")
def saved(res, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "fit.vjx"
    res.save(path)
    return path


# ---------------------------------------------------------------------------------------------
def _assert_trees_bitwise(a, b, what):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b), what
    for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0],
                            jax.tree_util.tree_leaves(b), strict=True):
        where = what + jax.tree_util.keystr(path)
        assert type(x) is type(y) and x.dtype == y.dtype and x.shape == y.shape, where
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        assert x.tobytes() == y.tobytes(), where


def _same_value(x, y):
    return x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x)
                      and math.isnan(y))


def assert_same_result(res, back):
    for field in ("params", "last_params", "opt_state", "state", "init_point", "losses",
                  "loop_key"):
        _assert_trees_bitwise(getattr(res, field), getattr(back, field), field)
    assert back.guide_spec == res.guide_spec and back.estimator == res.estimator
    assert hash(back.guide_spec) == hash(res.guide_spec)  # a compile-cache key again
    assert type(back.diagnostics) is type(res.diagnostics)
    assert all(_same_value(x, y) for x, y in zip(res.diagnostics, back.diagnostics, strict=True))
    key = jax.random.key(7)  # the same key and n in every test: one compile per guide
    for name, draws in res.sample(key, 16).items():
        np.testing.assert_array_equal(back.sample(key, 16)[name], draws)


def _rewrite(src, dst, edit):
    """Copy the zip ``src`` to ``dst`` (valid CRCs), passing each member through
    ``edit(name, data) -> data`` (``None`` drops it)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = edit(name, zin.read(name))
            if data is not None:
                zout.writestr(name, data)
    return dst


def _edit_manifest(change):
    def edit(name, data):
        if name != "manifest.json":
            return data
        manifest = json.loads(data)
        change(manifest)
        return json.dumps(manifest)

    return edit


# ---------------------------------------------------------------------------------------------
def test_round_trip_meanfield(res, saved):
    back = vj.load(saved, normal)
    assert_same_result(res, back)
    assert back.optimizer is res.optimizer  # the shared default: its compiled loop is reused
    assert jax.dtypes.issubdtype(back.loop_key.dtype, jax.dtypes.prng_key)
    assert isinstance(back.losses, np.ndarray)
    np.testing.assert_array_equal(back.mean()["mu"], res.mean()["mu"])
    key = jax.random.key(7)  # the draws of assert_same_result: no new compile
    assert back.summary(key, n=16).rows() == res.summary(key, n=16).rows()
    # a valid .npz: inspectable with numpy without pickle
    with np.load(saved, allow_pickle=False) as npz:
        assert "manifest.json" in npz.files


@pytest.mark.parametrize("model, guide", [
    (mixed, {"a": "delta", "b": "fullrank"}),  # structured, and a discrete latent
    (two, vj.guides.IAF(num_layers=2, hidden=(8,))),
], ids=["structured-discrete", "iaf"])
def test_round_trip_guides(model, guide, tmp_path):
    res = _fit_fast(model, guide=guide)
    res.save(tmp_path / "fit.vjx")
    back = vj.load(tmp_path / "fit.vjx", model)
    assert_same_result(res, back)
    if model is mixed:
        assert set(back.params) == {"continuous", "discrete"}
        assert isinstance(back.guide_spec, vj.guides.Structured)


def test_custom_optimizer(tmp_path):
    res = _fit_fast(normal, guide="meanfield", optimizer=optax.sgd(0.1))
    path = tmp_path / "fit.vjx"
    res.save(path)
    with pytest.raises(ValueError, match="custom optimizer.*optimizer="):
        vj.load(path, normal)
    with pytest.raises(ValueError, match="optimizer given does not match"):
        vj.load(path, normal, optimizer=optax.adam(0.1))
    back = vj.load(path, normal, optimizer=res.optimizer)
    assert back.optimizer is res.optimizer
    assert_same_result(res, back)


def test_float64_round_trip(tmp_path):
    path = tmp_path / "fit64.vjx"
    with precision("float64"):
        res = _fit_fast(normal, guide="meanfield", dtype=np.float64)
        res.save(path)
        back = vj.load(path, normal)
        assert back.init_point.dtype == jnp.float64
        assert_same_result(res, back)
    with pytest.raises(ValueError, match="float64.*jax_enable_x64"):
        vj.load(path, normal)


def test_without_state_and_key(res, tmp_path):
    bare = dataclasses.replace(res, state=None, loop_key=None)
    bare.save(tmp_path / "bare.vjx")
    back = vj.load(tmp_path / "bare.vjx", normal)
    assert back.state is None and back.loop_key is None
    _assert_trees_bitwise(res.params, back.params, "params")


@pytest.mark.parametrize("spec", [
    vj.guides.Delta(), vj.guides.MeanField(0.3), vj.guides.LowRank(rank=2, init_scale=1),
    vj.guides.FullRank(), vj.guides.IAF(num_layers=2, hidden=(8, 4)),
    vj.guides.Spline(num_bins=4, bound=3.0, base=vj.guides.LowRank(rank=1)),
    vj.guides.RealNVP(hidden=(5,)), vj.guides.resolve_spec({"a": "delta", ("b", "c"): "iaf"}),
    *(cls() for cls in vj.estimators.ESTIMATOR_NAMES.values()),
    vj.estimators.Renyi(alpha=0.25), vj.estimators.Score(baseline=None, decay=0.5),
], ids=repr)
def test_config_json_round_trip(spec):
    text = json.dumps(config.encode(spec, "config"))  # plain JSON, no Python objects
    back = config.decode(json.loads(text), "config")
    assert back == spec and type(back) is type(spec) and hash(back) == hash(spec)


def test_unknown_spec_refused_on_save(res, tmp_path):
    @dataclasses.dataclass(frozen=True)
    class MyGuide:
        width: int = 3

    with pytest.raises(ValueError, match="cannot save guide spec.*MyGuide"):
        dataclasses.replace(res, guide_spec=MyGuide()).save(tmp_path / "x.vjx")
    assert not os.listdir(tmp_path)


# ---------------------------------------------------------------------------------------------
# refusals
def test_missing_truncated_and_foreign_files(saved, tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        vj.load(tmp_path / "absent.vjx", normal)
    data = saved.read_bytes()
    for cut in (len(data) // 2, len(data) - 10, 40):
        (tmp_path / "cut.vjx").write_bytes(data[:cut])
        with pytest.raises(ValueError, match="truncated"):
            vj.load(tmp_path / "cut.vjx", normal)
    (tmp_path / "noise.vjx").write_bytes(np.random.default_rng(0).bytes(4096))
    with pytest.raises(ValueError, match="not a vijax checkpoint"):
        vj.load(tmp_path / "noise.vjx", normal)
    np.savez(tmp_path / "plain.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match=r"not a vijax checkpoint \(no manifest.json"):
        vj.load(tmp_path / "plain.npz", normal)


def test_tampered_array(saved, tmp_path):
    def flip_last_byte(name, data):
        return data[:-1] + bytes([data[-1] ^ 1]) if name == "a0.npy" else data

    path = _rewrite(saved, tmp_path / "tampered.vjx", flip_last_byte)
    with pytest.raises(ValueError, match="SHA-256 does not match"):
        vj.load(path, normal)
    # the same change in place, without re-zipping: the zip CRC catches it
    data = bytearray(saved.read_bytes())
    with zipfile.ZipFile(saved) as zf:
        info = zf.getinfo("a0.npy")
    end = info.header_offset + 30 + len(info.filename) + len(info.extra) + info.compress_size
    data[end - 1] ^= 1  # the last byte of the member's stored data
    (tmp_path / "crc.vjx").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt"):
        vj.load(tmp_path / "crc.vjx", normal)


def test_tampered_manifest(saved, tmp_path):
    def shrink_scale(manifest):
        manifest["guide_spec"]["fields"]["init_scale"] = 0.5

    path = _rewrite(saved, tmp_path / "m.vjx", _edit_manifest(shrink_scale))
    with pytest.raises(ValueError, match="SHA-256 does not match"):
        vj.load(path, normal)


@pytest.mark.parametrize("change, match", [
    (lambda m: m.update(vijax_version="9.9.0"), r"written by vijax 9\.9\.0, this is vijax"),
    (lambda m: m.update(format_version=archive.FORMAT_VERSION + 1), "newer than the format"),
    (lambda m: m.update(format_version=1), "format 1, whose full-rank Gaussian parameters"),
    (lambda m: m.update(format_version=2), "format 2, whose loop state lacks"),
    (lambda m: m.update(format="something-else"), "not a vijax checkpoint"),
], ids=["vijax-version", "format-version", "old-format", "format-2", "format"])
def test_version_mismatch(saved, tmp_path, change, match):
    path = _rewrite(saved, tmp_path / "v.vjx", _edit_manifest(change))
    with pytest.raises(ValueError, match=match):
        vj.load(path, normal)


def _lj(z, y):
    return jnp.sum(dist.Normal(0.0, 1.0).log_prob(z[next(iter(z))]))


@pytest.mark.parametrize("latents, match", [
    ({"nu": vj.Latent()}, "latent 'nu' is not in the checkpoint.*latent 'mu' is not in"),
    ({"mu": vj.Latent((2,))}, r"latent 'mu' has shape \(\) in the checkpoint but \(2,\)"),
    ({"mu": vj.Latent(support=constraints.positive)}, "latent 'mu' has support Real()"),
    ({"mu": vj.Latent(), "tau": vj.Latent()}, "latent 'tau' is not in the checkpoint"),
], ids=["name", "shape", "support", "extra"])
def test_wrong_model(saved, latents, match):
    with pytest.raises(ValueError, match=match):
        vj.load(saved, vj.Model(_lj, latents))


def test_unexpected_member(saved, tmp_path):
    def add(name, data):
        return data

    path = _rewrite(saved, tmp_path / "extra.vjx", add)
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("notes.txt", b"hello")
    with pytest.raises(ValueError, match=r"unexpected member\(s\) \['notes.txt'\]"):
        vj.load(path, normal)


# ---------------------------------------------------------------------------------------------
class _Payload:
    """Unpickling this creates the directory ``path``: the proof that pickle ran."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _object_npy(path) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.array([_Payload(path), 1], dtype=object),
                              allow_pickle=True)
    return buf.getvalue()


def test_malicious_pickle_is_never_loaded(saved, tmp_path):
    # control: the payload is live (numpy with allow_pickle=True would run it)
    control = tmp_path / "control"
    (tmp_path / "evil.npy").write_bytes(_object_npy(control))
    np.load(tmp_path / "evil.npy", allow_pickle=True)
    assert control.exists()

    sentinel = tmp_path / "sentinel"
    attacks = {
        "object-array": lambda name, data: _object_npy(sentinel) if name == "a0.npy" else data,
        "raw-pickle": lambda name, data: pickle.dumps(_Payload(sentinel)) if name == "a0.npy"
        else data,
    }
    matches = {"object-array": "object array.*pickle", "raw-pickle": "not a valid .npy"}
    for kind, edit in attacks.items():
        path = _rewrite(saved, tmp_path / f"{kind}.vjx", edit)
        with pytest.raises(ValueError, match=matches[kind]):
            vj.load(path, normal)
        assert not sentinel.exists(), kind
    # an extra pickle member next to a genuine checkpoint is refused, not read
    path = _rewrite(saved, tmp_path / "extra.vjx", lambda name, data: data)
    with zipfile.ZipFile(path, "a") as zf:
        zf.writestr("state.pkl", pickle.dumps(_Payload(sentinel)))
    with pytest.raises(ValueError, match="unexpected member"):
        vj.load(path, normal)
    # a plain .npz of an object array (no manifest)
    np.savez(tmp_path / "obj.npz", x=np.array([_Payload(sentinel)], dtype=object))
    with pytest.raises(ValueError, match="not a vijax checkpoint"):
        vj.load(tmp_path / "obj.npz", normal)
    assert not sentinel.exists()


# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("where", ["replace", "write"])
def test_atomic_write(res, tmp_path, monkeypatch, where):
    path = tmp_path / "fit.vjx"
    path.write_bytes(b"old complete file")

    def fail(*args, **kwargs):
        raise OSError("disk full")

    if where == "replace":
        monkeypatch.setattr(archive.os, "replace", fail)
    else:
        monkeypatch.setattr(np.lib.format, "write_array", fail)
    with pytest.raises(OSError, match="disk full"):
        res.save(path)
    assert path.read_bytes() == b"old complete file"
    assert os.listdir(tmp_path) == ["fit.vjx"]  # no temporary file left behind
    monkeypatch.undo()
    res.save(path)  # over the existing file
    assert os.listdir(tmp_path) == ["fit.vjx"]
    _assert_trees_bitwise(res.state, vj.load(path, normal).state, "state")
