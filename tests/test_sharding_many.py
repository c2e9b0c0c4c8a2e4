"""fit_many(mesh=): the lanes split over a mesh axis (tests/conftest.py gives 8 CPU devices).

A sharded fit_many runs the same vmapped programs with each device holding a share of the
lanes, so every lane computes what it computes unsharded; only the batched kernels' order of
float32 operations may differ (a lane runs in a batch of 1 or 2 on a device, of 6 on one).
"""

from __future__ import annotations

import jax
import numpy as np
import numpyro.distributions as dist
import pytest
from jax.sharding import PartitionSpec as P

import vijax as vj
from tests.conftest import count_compiles
from vijax import many


def _log_joint(z, d):
    return (dist.Normal(0.0, d["prior_sd"]).log_prob(z["mu"])
            + dist.Normal(z["mu"], 1.0).log_prob(d["y"]).sum())


# one latent: each of the module's five configurations compiles three programs (start, chunk,
# PSIS), about 3 s on 2 cores
MODEL = vj.Model(_log_joint, {"mu": vj.Latent()})
L = 6  # not a multiple of 4 or 8: the lanes are padded to 8
_RNG = np.random.default_rng(0)
# lane i: its own observations (batched), one prior scale for all (shared)
DATA = {"y": (_RNG.normal(0.0, 1.0, (L, 12)) + 0.5 * np.arange(L)[:, None]).astype(np.float32),
        "prior_sd": np.float32(10.0)}
# for the stopping rule, lanes further apart (a mean up to 6): they converge after 1,400 to
# 1,800 steps
DATA_FAR = {"y": (_RNG.normal(1.0, 2.0, (L, 12)) * np.arange(1, L + 1)[:, None]
                  ).astype(np.float32), "prior_sd": np.float32(10.0)}
AXES = {"y": 0, "prior_sd": None}
KEYS = jax.random.split(jax.random.key(3), L)
FIXED = dict(data_axes=AXES, keys=KEYS, steps=300, chunk_size=100, convergence=None,
             progress=False, psis_draws=64)
RULE = dict(data_axes=AXES, keys=KEYS, steps=2000, chunk_size=250, progress=False,
            psis_draws=0)


def _mesh(n: int, name: str = "lanes"):
    return jax.make_mesh((n,), (name,), devices=jax.devices()[:n])


_RESULTS: dict = {}


def _fit(mesh_devices: int | None, rule: bool = False):
    """fit_many of DATA with FIXED (or of DATA_FAR with RULE), once per configuration for
    the module."""
    key = (mesh_devices, rule)
    if key not in _RESULTS:
        mesh = None if mesh_devices is None else _mesh(mesh_devices)
        _RESULTS[key] = vj.fit_many(MODEL, DATA_FAR if rule else DATA, mesh=mesh,
                                    **(RULE if rule else FIXED))
    return _RESULTS[key]


# float32 tolerances: lanes run in batches of different sizes (6 on one device, 2 or 1 per
# device), so the batched kernels may sum in another order. Measured against the unsharded
# fit (300 steps of Adam, 1 draw a step): params differ by at most 1.1e-7 relative (2e-9
# absolute; on 4 devices they are equal bit for bit), losses by 2e-7 relative, k-hat (64
# draws: a Pareto fit to the largest weights, which magnifies differences of the log
# weights) by 2e-5. The tolerances keep a margin of about 50x over those.
PARAM_RTOL, PARAM_ATOL, LOSS_RTOL, KHAT_ATOL = 1e-5, 1e-6, 1e-5, 1e-3


def _assert_same_lanes(a, b):
    assert len(a) == len(b) == L and a.errors == b.errors
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params),
                    strict=True):
        assert x.shape == y.shape and y.shape[0] == L  # padding lanes dropped
        np.testing.assert_allclose(y, x, rtol=PARAM_RTOL, atol=PARAM_ATOL)
    assert a.losses.shape == b.losses.shape
    np.testing.assert_allclose(b.losses, a.losses, rtol=LOSS_RTOL)
    for da, db in zip(a.diagnostics, b.diagnostics, strict=True):
        assert (da.n_steps, da.stop_reason) == (db.n_steps, db.stop_reason)
        if np.isnan(da.k_hat):
            assert np.isnan(db.k_hat)
        else:
            assert abs(da.k_hat - db.k_hat) < KHAT_ATOL


@pytest.mark.parametrize("devices", [4, 8])
def test_sharded_lanes_equal_the_unsharded_fit(devices):
    ref, got = _fit(None), _fit(devices)
    _assert_same_lanes(ref, got)
    # the result is on one device, as without a mesh: lanes, best(), PSIS diagnostics
    leaf = jax.tree_util.tree_leaves(got.params)[0]
    assert len(leaf.devices()) == 1
    assert all(np.isfinite(d.k_hat) for d in got.diagnostics)
    lane = got[5]
    np.testing.assert_array_equal(lane.model.data["y"], DATA["y"][5])
    assert lane.sample(jax.random.key(0), 3)["mu"].shape == (3,)
    assert got.best().diagnostics.final_loss == np.nanmin(got.final_losses())


def test_lanes_per_batch_pads_each_batch_to_the_devices():
    # batches of 4 lanes on 8 devices: [0..3] + 4 copies of lane 0, [4, 5] + 6 copies of lane
    # 4 (8 lanes a program, as the 8-device fit of all 6 lanes: the same compiled programs)
    ref = _fit(None)
    got = vj.fit_many(MODEL, DATA, mesh=_mesh(8), lanes_per_batch=4, **FIXED)
    _assert_same_lanes(ref, got)


@pytest.mark.slow
def test_lanes_stop_on_their_own_as_unsharded():
    ref, got = _fit(None, rule=True), _fit(4, rule=True)
    _assert_same_lanes(ref, got)
    steps = [d.n_steps for d in got.diagnostics]
    # every lane converged; the first ones stopped more than a chunk before the last one and
    # kept their state while it went on
    assert all(d.converged for d in got.diagnostics)
    assert min(steps) + RULE["chunk_size"] <= max(steps) < RULE["steps"]
    for i, n in enumerate(steps):  # NaN after a lane stopped
        assert np.all(np.isfinite(got.losses[i, :n])) and np.all(np.isnan(got.losses[i, n:]))


def test_state_keeps_its_lane_split_and_nothing_recompiles(monkeypatch):
    """The chunk program is called with the state split over the lanes and returns it with
    the same shardings; every chunk, and a refit of the same shapes, runs one compiled
    program, and the refit compiles nothing at all."""
    calls = []

    def spy(*args):  # many._batched(pipeline_fn, axes_key, kind, ...), lru-cached as called
        fn = original(*args)
        if args[2] != "run":
            return fn

        def run(state, *args):
            before = [x.sharding for x in jax.tree_util.tree_leaves(state)]
            out = fn(state, *args)
            after = [x.sharding for x in jax.tree_util.tree_leaves(out[0])]
            calls.append((before, after, out[1].sharding, fn._cache_size()))
            return out

        return run

    original = many._batched
    monkeypatch.setattr(many, "_batched", spy)
    first = _fit(4)  # compiled already (or now), outside the count below
    calls.clear()
    with count_compiles() as n:
        again = vj.fit_many(MODEL, DATA, mesh=_mesh(4), **FIXED)
    assert n[0] == 0
    for x, y in zip(jax.tree_util.tree_leaves(first.params),
                    jax.tree_util.tree_leaves(again.params), strict=True):
        np.testing.assert_array_equal(x, y)  # the same program on the same devices
    assert len(calls) == 3  # 300 steps in chunks of 100
    for before, after, losses, cache_size in calls:
        assert before == after  # no resharding between chunks
        assert cache_size == 1  # one compiled program for every chunk
        assert losses.spec == P("lanes")
        assert all(s.spec == P("lanes") and s.mesh.shape == {"lanes": 4} for s in after)


def test_mesh_errors():
    with pytest.raises(ValueError, match="mesh axis 'rows' does not exist.*\\('lanes',\\)"):
        vj.fit_many(MODEL, DATA, mesh=vj.Placement(_mesh(4), "rows"), **FIXED)
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh or a vj.Placement, "
                                        "got list"):
        vj.fit_many(MODEL, DATA, mesh=jax.devices()[:4], **FIXED)
    with pytest.raises(TypeError, match="vj.Placement\\(mesh, axis\\): mesh must be"):
        vj.fit_many(MODEL, DATA, mesh=vj.Placement("lanes"), **FIXED)
