"""The device-memory estimate of a fit (:mod:`vijax.memory`): exact state shapes, data split
over a mesh, streamed chunks, the printout and the error, and the activations against XLA's
own accounting of the compiled chunk.

Everything but the XLA comparison runs on abstract values (``jax.eval_shape`` and traces):
nothing compiles, which one test checks."""

import io

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest

import vijax as vj
from tests.conftest import count_compiles
from vijax.convergence import resolve_convergence
from vijax.data import Feed, Minibatch
from vijax.estimators import resolve_estimator
from vijax.guides.resolve import resolve_spec
from vijax.memory import (
    DeviceMemoryError,
    MemoryEstimate,
    check_fit_memory,
    estimate_fit_memory,
    peak_live_bytes,
)
from vijax.placement import Placement, resolve_placement
from vijax.program import Problem, compile_problem, parameter_count
from vijax.start import _fixed_init
from vijax.stream import host_data

N, D = 1002, 8  # 1002 rows: not a multiple of 4, so a minibatched mesh fit pads them
_rng = np.random.default_rng(0)
DATA = {"X": _rng.normal(size=(N, D)).astype(np.float32),
        "y": (_rng.uniform(size=N) < 0.5).astype(np.float32)}
ROW = (D + 1) * 4  # bytes of one row of DATA
LOGREG = vj.Model(
    log_prior=lambda z: dist.Normal(0, 1).log_prob(z["w"]).sum(),
    log_likelihood=lambda z, d: dist.Bernoulli(logits=d["X"] @ z["w"]).log_prob(d["y"]),
    latents={"w": vj.Latent(shape=(D,))})
F32 = np.dtype("float32")
CHUNK = 50


def _program(guide="meanfield", feed=None, placement=None, rule=None, particles=1):
    spec = resolve_spec(guide)
    if rule is not None:
        rule = resolve_convergence(rule).sized(*parameter_count(LOGREG.target, spec, "float32"))
    return compile_problem(Problem(LOGREG.target, spec, resolve_estimator("auto"), particles,
                                   optax.adam(0.05), CHUNK, rule, feed, placement))


def _estimate(program, data=DATA, **kw):
    fixed, mask = _fixed_init(LOGREG.target, None, F32)
    kw.setdefault("limit", None)
    return estimate_fit_memory(program, data, key=jax.random.key(0), fixed=fixed, mask=mask,
                               **kw)


def _bytes(tree) -> int:
    """Bytes of the leaves of a tree of arrays or ``jax.ShapeDtypeStruct``."""
    return sum(int(np.prod(x.shape)) * np.dtype(x.dtype).itemsize
               for x in jax.tree_util.tree_leaves(tree))


def _mesh4():
    return resolve_placement(Placement(jax.make_mesh((4,), ("data",),
                                                     devices=jax.devices()[:4]), "data"))


def test_state_estimate_is_the_state_start_returns():
    # full-rank parameters, Adam's moments, the average, the data position, the rule's state
    program = _program("fullrank", Feed(Minibatch(64)), rule="auto")
    est = _estimate(program)
    fixed, mask = _fixed_init(LOGREG.target, None, F32)
    state = program.start(jax.random.key(0), DATA, fixed, mask)[3]
    assert est.state == _bytes(state)
    # a resumed fit sizes the state it has
    again = estimate_fit_memory(program, DATA, key=jax.random.key(1), state=state, limit=None)
    assert again.state == est.state


def test_the_estimate_compiles_nothing():
    program = _program("lowrank", Feed(Minibatch(32)), particles=4)
    with count_compiles() as n:
        _estimate(program)
        _estimate(_program("meanfield", Feed(Minibatch(32)), _mesh4()))
    assert n[0] == 0


def test_parts_of_a_one_device_fit():
    full = _estimate(_program())
    assert (full.data, full.batch, full.streamed) == (N * ROW, 0, 0)
    mini = _estimate(_program(feed=Feed(Minibatch(64))))
    assert (mini.data, mini.batch, mini.streamed) == (N * ROW, 64 * ROW, 0)
    assert mini.total == mini.state + mini.data + mini.batch + mini.activations
    assert mini.activations < full.activations  # 64 rows per step, not 1002


def test_data_and_batch_split_over_a_mesh():
    placement = _mesh4()
    one = _estimate(_program(feed=Feed(Minibatch(64))))
    four = _estimate(_program(feed=Feed(Minibatch(64)), placement=placement))
    # padded to 1004 rows, 251 on each device; each device picks its own rows of the batch
    # into a whole batch, reduce-scattered into its 16 rows (vijax.memory)
    assert four.data == 251 * ROW and one.data == N * ROW
    assert four.batch == (64 + 16) * ROW and one.batch == 64 * ROW
    assert four.state == one.state  # replicated
    assert four.devices == 4 and four.device == "cpu:0"
    # the full data over 4 devices: 1000 rows (a full-data mesh fit needs N divisible)
    data = jax.tree_util.tree_map(lambda a: a[:1000], DATA)
    full4 = _estimate(_program(placement=placement), data)
    full1 = _estimate(_program(), data)
    assert full4.data == 250 * ROW and full1.data == 1000 * ROW
    # each device traces its share of the rows: fewer row-sized intermediates
    assert full4.activations < full1.activations


def test_a_stream_counts_two_chunks_of_batches_and_no_resident_data():
    host = host_data(DATA, F32)
    est = _estimate(_program(feed=Feed(Minibatch(40, streamed=True))), None, host=host)
    assert est.data == 0
    assert est.batch == 40 * ROW
    assert est.streamed == 2 * CHUNK * 40 * ROW
    # over a mesh each device holds its columns of the batches
    split = _estimate(_program(feed=Feed(Minibatch(40, streamed=True)), placement=_mesh4()),
                      None, host=host)
    assert (split.data, split.batch, split.streamed) == (0, 10 * ROW, 2 * CHUNK * 10 * ROW)


def test_fit_many_lanes():
    lanes_data = {"X": np.stack([DATA["X"]] * 6), "y": np.stack([DATA["y"]] * 6)}
    program = _program()
    one = _estimate(program)
    est = _estimate(program, lanes_data, lanes=3, lanes_total=6, data_axes=0)
    assert est.state == 6 * one.state  # every lane's final state stays on device
    assert est.data == 6 * N * ROW and est.batch == 3 * N * ROW
    assert est.activations == 3 * one.activations and est.lanes == 3
    shared = _estimate(program, DATA, lanes=4, data_axes=None)
    assert shared.data == N * ROW and shared.batch == 0
    # lanes split over 4 devices: 1 of the 3 lanes at once and 2 of the 6 kept on each
    split = _estimate(program, lanes_data, lanes=3, lanes_total=6, data_axes=0,
                      placement=_mesh4())
    assert split.state == 2 * one.state and split.activations == one.activations
    assert split.data == 6 * N * ROW // 4 and split.batch == N * ROW and split.lanes == 1


def test_too_large_a_fit_raises_naming_its_parts():
    est = _estimate(_program(feed=Feed(Minibatch(64))), limit=20_000)
    assert est.total > 20_000
    with pytest.raises(DeviceMemoryError, match=r"largest parts are data \(") as e:
        check_fit_memory(est, what="vj.fit")
    msg = str(e.value)
    assert isinstance(e.value, MemoryError)
    assert "mesh=" in msg and "stream=True" in msg and "VIJAX_MEMORY_CHECK=0" in msg
    assert "activations" in msg and "batch_size=" in msg


def test_the_check_can_be_turned_off(monkeypatch, capsys):
    est = _estimate(_program(), limit=1000)
    monkeypatch.setenv("VIJAX_MEMORY_CHECK", "0")
    check_fit_memory(est)
    assert capsys.readouterr().err == ""
    monkeypatch.setenv("VIJAX_MEMORY_CHECK", "warn")
    check_fit_memory(est)
    assert "total" in capsys.readouterr().err


def test_a_large_fit_is_printed_and_a_small_one_is_not(capsys):
    est = _estimate(_program())
    check_fit_memory(est._replace(limit=100 * est.total))  # 1%: small
    assert capsys.readouterr().err == ""
    check_fit_memory(est._replace(limit=2 * est.total))  # 50%: large, fits
    err = capsys.readouterr().err
    assert "device memory of vj.fit per device" in err and "(50%;" in err
    assert "data" in err and "activations" in err
    huge = MemoryEstimate(3 << 30, 0, 0, 0, 0, 3 << 30, None)  # over 1 GiB, limit unknown
    out = io.StringIO()
    check_fit_memory(huge, what="vj.fit_many", file=out)
    assert "3.00 GiB" in out.getvalue() and "unknown limit" in out.getvalue()


def test_the_limit_is_the_devices_memory():
    # fixed and mask left out: their shapes from the target and dtype
    est = estimate_fit_memory(_program(), DATA, key=jax.random.key(0), dtype=F32)
    assert est.state == _estimate(_program()).state
    if jax.devices()[0].platform == "cpu":
        assert est.limit is not None and est.limit_source.startswith("host MemAvailable")


def test_peak_live_bytes_counts_a_loop_body_once():
    def f(x):
        def body(c, _):
            return jnp.sin(c) * 2.0, None

        return jax.lax.scan(body, x, None, length=100)[0]

    # the carry (4 kB, the loop's output: the argument x is not taken over) and the body's
    # sin(c) and 2 sin(c) (4 kB each) alive together, once; not 100 times
    assert peak_live_bytes(jax.make_jaxpr(f)(jnp.ones(1000))) == 12_000


def _local_problem(rows: int, placement=None):
    """A model with one local latent per row, guided by a table (one row of parameters per
    observation): its loop state grows with the rows."""
    from vijax.driver_local import local_spec
    from vijax.guides.amortized import LocalTable

    model = vj.Model(
        log_prior=lambda z: dist.Normal(0, 3).log_prob(z["m"]),
        log_likelihood=lambda z, d: dist.Normal(0, 1).log_prob(z["u"])
        + dist.Normal(z["m"] + z["u"], 0.5).log_prob(d["y"]),
        latents={"m": vj.Latent(), "u": vj.Latent(local=True)})
    data = {"y": np.zeros(rows, np.float32)}
    spec = local_spec({"m": "meanfield", "u": LocalTable()}, model, data, resolve_spec)
    program = compile_problem(Problem(model.target, spec, resolve_estimator("auto"), 1,
                                      optax.adam(0.05), CHUNK, None,
                                      Feed(Minibatch(rows // 4)), placement))
    return model, data, program


@pytest.mark.parametrize("case", ["full data, 8 particles", "minibatch, 4 particles",
                                  "local table"])
def test_activations_are_of_the_order_of_xlas_own_count(case):
    """XLA's bytes of the compiled chunk beyond its arguments (temp + outputs) against the
    estimate's intermediates (activations plus the batch gathered inside the step).
    Measured on CPU (jax 0.10.2): 3.1x (full data, 8 particles: XLA fuses the particles'
    elementwise chains), 1.9x (minibatches) and 1.3x (a table of 1,024 rows: the loop
    state's updates dominate)."""
    if case == "local table":
        model, data, program = _local_problem(1024)
        rows = 1024
    else:
        feed, particles = (None, 8) if case.startswith("full") else (Feed(Minibatch(256)), 4)
        model, data, program = LOGREG, DATA, _program(feed=feed, particles=particles)
        rows = N
    est = estimate_fit_memory(program, data, key=jax.random.key(0), limit=None)
    _, _, _, state, k_loop = jax.eval_shape(program.start, jax.random.key(0), data,
                                            *_fixed_init(model.target, None, F32))
    i = jax.ShapeDtypeStruct((), jnp.int32)
    feed = program.problem.feed
    args = None if feed is None else {"n": i, "seed": jax.ShapeDtypeStruct((), jnp.uint32)}
    stats = program.run_chunk.lower(state, data, k_loop, i, i, i, i, args).compile() \
        .memory_analysis()
    xla = stats.temp_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes
    ratio = (est.activations + est.batch) / xla
    print(f"{case} ({rows} rows): estimate / XLA = {ratio:.2f}")
    assert 0.7 < ratio < 5, ratio


def test_local_tables_are_split_with_the_rows():
    def estimate(placement):
        model, data, program = _local_problem(64, placement)
        est = estimate_fit_memory(program, data, key=jax.random.key(0), limit=None)
        return est, jax.eval_shape(program.start, jax.random.key(0), data,
                                   *_fixed_init(model.target, None, F32))[3]

    one, state = estimate(None)
    four, _ = estimate(_mesh4())
    tables = sum(_bytes(leaf) for path, leaf in
                 jax.tree_util.tree_flatten_with_path(state)[0]
                 if getattr(path[-1], "key", None) == "table")
    assert tables > 0  # the table, Adam's two moments and the average: (64, 2) each
    assert four.state == one.state - tables + tables // 4
    assert four.activations < one.activations  # the tables' updates split too
