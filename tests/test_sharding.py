"""``vj.fit(..., mesh=)``: the data rows split over host CPU devices (the suite runs with 8:
tests/conftest.py) give the single-device fit, with the loop state kept where it is.

Equality: the sharded program draws the same keys and the same minibatch rows (rows are
gathered from the split data: each device contributes the rows it holds), so the only
difference is the order of the float32 sums over rows (the likelihood of a batch is summed
per device, then across devices). One reordered float32 sum of B terms differs by about
B * 2^-24 relative; over a few hundred Adam steps these differences stay of that order
(measured: at most 2.4e-7 in the parameters, 2e-4 in a loss of ~700, i.e. 3e-7 relative).
The tolerances below are 20-100x those measured.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest

import vijax as vj
from tests.conftest import count_compiles
from vijax.data import Feed, Minibatch
from vijax.estimators import resolve_estimator
from vijax.guides.amortized import LocalTable
from vijax.guides.resolve import resolve_spec
from vijax.placement import Placement, resolve_placement
from vijax.program import Problem, compile_problem

N, D = 1000, 5
_rng = np.random.default_rng(0)
X = _rng.normal(size=(N, D)).astype(np.float32)
_w = _rng.normal(size=D)
Y = (_rng.uniform(size=N) < 1 / (1 + np.exp(-X @ _w))).astype(np.float32)
DATA = {"X": X, "y": Y}

LOGREG = vj.Model(
    log_prior=lambda z: dist.Normal(0, 1).log_prob(z["w"]).sum(),
    log_likelihood=lambda z, d: dist.Bernoulli(logits=d["X"] @ z["w"]).log_prob(d["y"]),
    latents={"w": vj.Latent(shape=(D,))})

KW = dict(guide="meanfield", steps=300, chunk_size=100, convergence=None, progress=False,
          precondition=None, key=jax.random.key(1))
PARAM_TOL = 5e-6  # absolute, on O(1) parameters
LOSS_TOL = 1e-5  # relative


def _mesh(devices: int, name: str = "data"):
    return jax.make_mesh((devices,), (name,), devices=jax.devices()[:devices])


def _close(a, b, losses=True):
    for x, y in zip(jax.tree_util.tree_leaves(a.params), jax.tree_util.tree_leaves(b.params),
                    strict=True):
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=PARAM_TOL, rtol=0)
    assert a.diagnostics.n_steps == b.diagnostics.n_steps
    if losses:
        np.testing.assert_allclose(a.losses, b.losses, rtol=LOSS_TOL)


@pytest.fixture(scope="module")
def single_minibatch():
    return vj.fit(LOGREG, DATA, batch_size=64, **KW)


@pytest.mark.parametrize("devices", [4, pytest.param(8, marks=pytest.mark.slow)])
def test_minibatch_fit_split_over_devices_equals_one_device(single_minibatch, devices):
    res = vj.fit(LOGREG, DATA, batch_size=64, mesh=_mesh(devices), **KW)
    _close(res, single_minibatch)
    # the PSIS check ran on the split rows (1000 rows do not split over 8: padded, masked)
    assert abs(res.diagnostics.k_hat - single_minibatch.diagnostics.k_hat) < 0.05
    # the result lives on one device, as without a mesh
    assert all(len(x.devices()) == 1 for x in jax.tree_util.tree_leaves(res.params))
    assert res.sample(jax.random.key(0), 5)["w"].shape == (5, D)


def test_full_data_fit_split_over_devices_equals_one_device():
    one = vj.fit(LOGREG, DATA, **KW)
    four = vj.fit(LOGREG, DATA, mesh=vj.Placement(_mesh(4), "data"), **KW)
    _close(four, one)
    assert abs(four.diagnostics.k_hat - one.diagnostics.k_hat) < 0.05


@pytest.mark.slow
def test_a_stopping_rule_takes_the_same_decision():
    kw = dict(KW, convergence="auto", steps=3000)
    one = vj.fit(LOGREG, DATA, batch_size=200, **kw)
    four = vj.fit(LOGREG, DATA, batch_size=200, mesh=_mesh(4), **kw)
    assert one.diagnostics.n_steps == four.diagnostics.n_steps
    assert one.diagnostics.stop_reason == four.diagnostics.stop_reason
    _close(four, one)


def test_streamed_fit_split_over_devices_equals_one_device(single_minibatch):
    res = vj.fit(LOGREG, DATA, batch_size=64, stream=True, mesh=_mesh(4), **KW)
    _close(res, single_minibatch)


@pytest.mark.slow
def test_resume_on_a_mesh_continues_exactly(single_minibatch):
    kw = dict(KW, steps=150)
    first = vj.fit(LOGREG, DATA, batch_size=64, mesh=_mesh(4), **kw)
    second = vj.fit(LOGREG, DATA, resume=first, steps=150, mesh=_mesh(4), progress=False)
    _close(second, single_minibatch, losses=False)
    np.testing.assert_allclose(second.losses, single_minibatch.losses, rtol=LOSS_TOL)


# ---------------------------------------------------------------------------------------------
# the loop state stays where it is: no resharding, no recompiling
def _program(placement, feed):
    return compile_problem(Problem(LOGREG.target, resolve_spec("meanfield"),
                                   resolve_estimator("auto"), 1, optax.adam(0.01), 50, None,
                                   feed, placement))


def test_loop_state_keeps_its_shardings_and_program_across_chunks():
    placement = resolve_placement(_mesh(4))
    feed = Feed(Minibatch(64), None)
    program = _program(placement, feed)
    data = vj.placement.place_rows(DATA, placement, 1000)
    key, fixed, mask = vj.placement.place_replicated(
        (jax.random.key(0), np.zeros(D, np.float32), np.zeros(D, bool)), placement)
    _, _, _, state, k_loop = program.start(key, data, fixed, mask)
    shardings = [x.sharding for x in jax.tree_util.tree_leaves(state)]
    assert all(s == placement.replicated for s in shardings)
    assert data["X"].sharding == placement.rows
    args = (jnp.int32(150), jnp.int32(100), jnp.int32(50), jnp.int32(100),
            {"n": jnp.int32(N), "seed": jnp.uint32(7)})
    state, _ = program.run_chunk(state, data, k_loop, *args)
    jitted = program.run_chunk.jitted(state)
    with count_compiles() as n:
        for _ in range(2):
            state, losses = program.run_chunk(state, data, k_loop, *args)
            assert [x.sharding for x in jax.tree_util.tree_leaves(state)] == shardings
    assert n[0] == 0 and jitted._cache_size() == 1
    assert losses.sharding == placement.replicated


def test_a_refit_on_the_mesh_compiles_nothing(single_minibatch):
    mesh = _mesh(4)
    vj.fit(LOGREG, DATA, batch_size=64, mesh=mesh, **KW)
    other = {"X": X[::-1].copy(), "y": Y[::-1].copy()}
    with count_compiles() as n:
        res = vj.fit(LOGREG, other, batch_size=64, mesh=mesh, **dict(KW, key=jax.random.key(9)))
    assert n[0] == 0, f"{n[0]} compilations on a refit with the same shapes"
    assert np.all(np.isfinite(res.losses))


# ---------------------------------------------------------------------------------------------
# local latents: their per-row tables are split with their rows
_NL = 64


def _local_model():
    def log_lik(z, d):
        return (dist.Normal(0, 1).log_prob(z["u"])
                + dist.Normal(z["m"] + z["u"], 0.5).log_prob(d["y"]))

    return vj.Model(log_prior=lambda z: dist.Normal(0, 3).log_prob(z["m"]),
                    log_likelihood=log_lik,
                    latents={"m": vj.Latent(), "u": vj.Latent(local=True)})


def test_local_table_is_split_with_its_rows_and_equals_one_device():
    model = _local_model()
    y = np.random.default_rng(1).normal(1.0, 1.2, size=_NL).astype(np.float32)
    guide = {"m": "meanfield", "u": LocalTable()}
    kw = dict(guide=guide, steps=200, chunk_size=100, convergence=None, progress=False,
              key=jax.random.key(2))
    one = vj.fit(model, {"y": y}, batch_size=16, **kw)
    mesh = _mesh(4)
    four = vj.fit(model, {"y": y}, batch_size=16, mesh=mesh, **kw)
    _close(four, one)
    # inside the loop the table lives split by rows
    placement = resolve_placement(mesh)
    table = {"local": {"u": {"table": jnp.zeros((_NL, 2))}}, "global": {"loc": jnp.zeros(1)}}
    sh = vj.placement.state_shardings(table, placement)
    assert sh["local"]["u"]["table"] == placement.rows
    assert sh["global"]["loc"] == placement.replicated
    with pytest.raises(ValueError, match="LocalTable.*do not split evenly"):
        vj.fit(model, {"y": y[:62]}, batch_size=16, mesh=mesh, **kw)


# ---------------------------------------------------------------------------------------------
# placement of predictive draws
def test_predictive_draws_split_over_the_mesh_equal_one_device(single_minibatch):
    def fn(z):
        return jax.nn.sigmoid(X[:7] @ z["w"])

    one = vj.predictive(single_minibatch, fn, jax.random.key(3), 50, batch_size=20)
    four = vj.predictive(single_minibatch, fn, jax.random.key(3), 50, batch_size=20,
                         mesh=_mesh(4))
    np.testing.assert_allclose(np.asarray(four), np.asarray(one), rtol=1e-5, atol=1e-6)
    assert four.shape == (50, 7)


# ---------------------------------------------------------------------------------------------
# errors
def test_errors_name_the_axis_the_batch_and_the_rows():
    mesh = _mesh(4)
    with pytest.raises(ValueError, match="mesh axis 'rows' does not exist.*'data'"):
        vj.fit(LOGREG, DATA, batch_size=64, mesh=vj.Placement(mesh, "rows"), **KW)
    with pytest.raises(ValueError, match="batch_size=66 cannot be split evenly over the 4"):
        vj.fit(LOGREG, DATA, batch_size=66, mesh=mesh, **KW)
    with pytest.raises(ValueError, match="N = 998 rows cannot be split evenly over the 4"):
        vj.fit(LOGREG, {"X": X[:998], "y": Y[:998]}, mesh=mesh, **KW)
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh or a vj.Placement"):
        vj.fit(LOGREG, DATA, batch_size=64, mesh="data", **KW)
    two = jax.make_mesh((2, 2), ("a", "b"), devices=jax.devices()[:4])
    with pytest.raises(ValueError, match=r"mesh has axes \('a', 'b'\).*vj.Placement"):
        vj.fit(LOGREG, DATA, batch_size=64, mesh=two, **KW)
    joint = vj.Model(lambda z, d: dist.Normal(z["w"], 1.0).log_prob(d["y"]).sum(),
                     {"w": vj.Latent()})
    with pytest.raises(ValueError, match="mesh= splits the data's rows.*log_joint"):
        vj.fit(joint, {"y": Y}, mesh=mesh, **KW)


def test_a_two_axis_mesh_splits_over_the_named_axis():
    mesh = jax.make_mesh((2, 2), ("data", "model"), devices=jax.devices()[:4])
    placement = resolve_placement(mesh)
    assert placement.axis == "data" and placement.size == 2
    assert isinstance(placement, Placement)
    # jax.make_mesh's axes are Explicit; the fit's programs let XLA place intermediates
    assert all(t == jax.sharding.AxisType.Auto for t in placement.mesh.axis_types)
    assert placement.rows.spec == jax.sharding.PartitionSpec("data")


@pytest.mark.slow
def test_a_fit_on_a_two_axis_mesh_replicates_over_the_other_axis():
    mesh = jax.make_mesh((2, 2), ("data", "model"), devices=jax.devices()[:4])
    res = vj.fit(LOGREG, DATA, batch_size=64, mesh=mesh, **dict(KW, steps=100))
    assert np.all(np.isfinite(res.losses))
