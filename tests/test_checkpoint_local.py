"""Checkpoints of fits with local latents (``res.save`` / ``vj.load`` of a
:class:`vijax.guides.local.LocalSpec` fit): bitwise round trips of the global and local guide
parameters (automatic MLP encoders, tables), model parameters and loop state; the same
importance log-likelihood and the same resumed fit; user encoders supplied again on loading."""

import json
import math
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints

import vijax as vj
from vijax.checkpoint import config
from vijax.guides import Amortized, LocalTable
from vijax.guides.local import row_signature

N = 16
_RNG = np.random.default_rng(0)
DATA = {"x": _RNG.normal(size=(N, 2)).astype(np.float32)}
LOG_PI = np.log(np.array([0.2, 0.3, 0.5], np.float32))


def _log_lik(z, data):
    """y_i ~ Cat(pi), z_i | y_i ~ N(mu_y + g, 1), w_i ~ N(0, 1), x_i ~ N(z_i + w_i, 0.5)."""
    y, zz, w = z["y"], z["z"], z["w"]
    return (jnp.asarray(LOG_PI)[y] + dist.Normal(z["mu"][y] + z["g"], 1.0).log_prob(zz)
            + dist.Normal(0.0, 1.0).log_prob(w)
            + dist.Normal((zz + w)[:, None], 0.5).log_prob(data["x"]).sum(-1))


MODEL = vj.Model(
    log_prior=lambda z: dist.Normal(0.0, 1.0).log_prob(z["g"]), log_likelihood=_log_lik,
    latents={"g": vj.Latent(()),
             "y": vj.Latent((), support=constraints.integer_interval(0, 2), local=True),
             "z": vj.Latent((), local=True), "w": vj.Latent((), local=True)},
    params={"mu": vj.Param((3,), init=np.array([-1.0, 0.0, 1.0], np.float32))})
GUIDE = {"g": "meanfield", "z": Amortized(given=("y",)), "w": LocalTable()}


def _bitwise(a, b, where):
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb, where
    for x, y in zip(la, lb, strict=True):
        if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x, y = jax.random.key_data(x), jax.random.key_data(y)
        x, y = np.asarray(x), np.asarray(y)
        assert x.dtype == y.dtype and x.shape == y.shape and x.tobytes() == y.tobytes(), where


def _same(x, y):
    return x == y or (isinstance(x, float) and isinstance(y, float) and math.isnan(x)
                      and math.isnan(y))


@pytest.fixture(scope="module")
def res():
    return vj.fit(MODEL, DATA, guide=GUIDE, steps=30, key=jax.random.key(1), progress=False,
                  psis_draws=50)


@pytest.fixture(scope="module")
def saved(res, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "local.vjx"
    res.save(path)
    return path


def test_local_round_trip_bitwise(res, saved):
    back = vj.load(saved, MODEL)
    for field in ("params", "last_params", "mparams", "opt_state", "state", "init_point",
                  "losses", "loop_key"):
        _bitwise(getattr(res, field), getattr(back, field), field)
    assert type(back.diagnostics) is type(res.diagnostics)
    assert all(_same(x, y) for x, y in zip(res.diagnostics, back.diagnostics, strict=True))
    assert back.optimizer is res.optimizer  # the shared local default: its loop is reused
    assert back.estimator == res.estimator
    spec, mine = back.guide_spec, res.guide_spec
    assert (spec.global_spec, spec.row, spec.n_rows) == (mine.global_spec, mine.row,
                                                          mine.n_rows)
    assert [(n, type(s)) for n, s in spec.factors] == [(n, type(s)) for n, s in mine.factors]
    assert spec.factors[1][1].given == ("y",) and spec.factors[2][1] == LocalTable()
    manifest = json.loads(zipfile.ZipFile(saved).read("manifest.json"))
    assert manifest["optimizer"] == {"kind": "local_default", "global_learning_rate": 0.05,
                                     "has_params": True}
    # the same draws of the global guide and the same per-row importance log-likelihood
    key = jax.random.key(7)
    for name, draws in res.sample(key, 8).items():
        np.testing.assert_array_equal(back.sample(key, 8)[name], draws)
    np.testing.assert_array_equal(
        vj.importance_log_likelihood(back, DATA, num_samples=50, key=0),
        vj.importance_log_likelihood(res, DATA, num_samples=50, key=0))


@pytest.mark.slow  # 30 s; the round trip stays in the default suite
def test_local_resume_from_loaded_equals_resume_from_original(res, saved):
    back = vj.load(saved, MODEL)
    kw = dict(steps=30, progress=False, psis_draws=0)  # the fit's chunk: a reuses its program
    a = vj.fit(MODEL, DATA, resume=res, **kw)
    b = vj.fit(MODEL, DATA, resume=back, **kw)
    assert a.diagnostics.n_steps == b.diagnostics.n_steps == 60
    for field in ("params", "mparams", "opt_state", "state", "losses"):
        _bitwise(getattr(a, field), getattr(b, field), field)


def test_row_structure_round_trips_and_odd_rows_are_refused():
    for data in ({"x": np.zeros((3, 2)), "n": {"k": np.zeros(3, np.int32)}},
                 (np.zeros((3,)), [np.zeros((3, 1, 2), np.float32)]), np.zeros((3, 4))):
        row, _ = row_signature(data)
        encoded = config._encode_row(row, "guide spec")
        assert json.loads(json.dumps(encoded)) == encoded
        assert config._decode_row(encoded, "guide spec") == row
    from typing import NamedTuple

    class Pair(NamedTuple):
        a: np.ndarray
        b: np.ndarray

    row, _ = row_signature(Pair(np.zeros(3), np.zeros(3)))
    with pytest.raises(ValueError, match="dict of arrays"):
        config._encode_row(row, "guide spec")


def _user_encoder(key, x):
    return {"w": jnp.zeros((2, 2), x.dtype)}


def _user_apply(p, x):
    return p["w"] @ x


def test_user_encoder_must_be_given_again(tmp_path):
    model = vj.Model(log_prior=lambda z: jnp.zeros(()),
                     log_likelihood=lambda z, d: dist.Normal(z["u"], 1.0).log_prob(d["x"][:, 0]),
                     latents={"u": vj.Latent((), local=True)})
    guide = {"u": Amortized((_user_encoder, _user_apply), inputs="x")}
    res = vj.fit(model, DATA, guide=guide, steps=3, progress=False, convergence=None,
                 psis_draws=0)
    path = tmp_path / "user.vjx"
    res.save(path)
    with pytest.raises(ValueError, match=r"own networks.*guide=\{'u': vj.guides.Amortized"):
        vj.load(path, model)
    with pytest.raises(ValueError, match="inputs='y'"):
        vj.load(path, model, guide={"u": Amortized((_user_encoder, _user_apply), inputs="y")})
    with pytest.raises(ValueError, match="does not fit|do not match"):
        vj.load(path, model, guide={"u": Amortized(
            (lambda k, x: {"w": jnp.zeros((3, 2), x.dtype)}, lambda p, x: (p["w"] @ x)[:2]),
            inputs="x")})
    back = vj.load(path, model, guide=guide)
    assert back.guide_spec.factors[0][1] is guide["u"]
    _bitwise(res.params, back.params, "params")
    _bitwise(res.opt_state, back.opt_state, "opt_state")
