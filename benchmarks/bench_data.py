"""Minibatch SVI on a large logistic regression: vijax's ``batch_size=`` / ``stream=True``
against a hand-written ``lax.scan`` loop and NumPyro's subsampling plate.

Workload: Bayesian logistic regression, ``w ~ Normal(0, 1)^D``, ``y_n ~ Bernoulli(logits =
x_n . w)``, N = 1,000,000 (``--quick``: 100,000) x D = 50 float32, synthetic from a fixed
seed (``x ~ N(0, I / D)``, ``w_true ~ N(0, I)``; rows generated in blocks of 250,000, so
the first N rows are the same whatever the total). Minibatches of B = 1,024, mean-field
Gaussian guide, one draw per step, vijax's default optimizer ``vj.default_optimizer(0.05)``
(Adam, step size 0.05 / sqrt(1 + t / 1000)) for every method.

1. **µs/step** (steady state, compile excluded): one compiled chunk of one epoch's worth of
   steps (``N // B``; NumPyro, ten times slower per step, a quarter of that), the median (and
   the minimum) over ``repeats`` calls, all methods interleaved round robin:

   * *vijax*: its chunk runner (``vijax.driver._pipeline`` with a
     ``Feed(Minibatch(B, shuffle))``, the program ``vj.fit(batch_size=B)`` runs), tail
     averaging on, for ``shuffle="epoch"`` (swap-or-not permutation, computed per element)
     and ``"randint"``;
   * *hand*: a hand-written ``lax.scan`` loop under ``jit``: the same ``log_prior`` and
     ``log_likelihood`` functions, ``theta = loc + softplus(raw) * eps`` with the
     closed-form entropy, the likelihood scaled by N / B, the same optimizer and the same
     tail averaging; rows from ``jax.random.randint`` (with replacement) or a slice of a
     per-epoch ``jax.random.permutation(N)`` computed inside the loop (``lax.cond`` at the
     epoch boundary; the last N mod B rows of an epoch are dropped);
   * *NumPyro*: ``numpyro.plate("data", N, subsample_size=B)`` with ``AutoNormal`` and
     ``Trace_ELBO()``, ``svi.update`` in a jitted ``lax.scan`` (the fastest of NumPyro's
     ways: ``SVI.run`` re-traces and re-compiles on every call);
   * diagnostics: the hand loop with vijax's own index functions (``hand_swap``, N a
     compile-time constant), and each method's row indices alone (a scan computing only
     them; vijax's epoch shuffle also with N a constant).

2. **Time to 1 nat**: the full-data ELBO of the iterate average, every ``piece`` steps, for
   vijax (``vj.fit`` then ``vj.fit(resume=res)`` per piece, ``res.params``: the tail average
   as the resumed loop keeps it) and the hand loop (permutation indices, the same averaging
   rule per piece), up to ``max_steps``. The ELBO of a mean-field q is evaluated exactly up
   to quadrature: ``E_q[log p(y_n | x_n . w)]`` by 16-point Gauss-Hermite over
   ``x_n . w ~ N(x_n . loc, sum_j x_nj^2 scale_j^2)``, the prior and the entropy in closed
   form; row sums in float32 blocks of 1,000, added in float64 on the host. The reference
   optimum maximises this ELBO: mean-field from the Laplace approximation (Newton MAP,
   ``scale_j = 1 / sqrt(H_jj)``), then L-BFGS (``optax.lbfgs``) on the exact ELBO.
   Reported: the first checkpoint within 1 nat, the first after which every checkpoint
   stays within 1 nat, as steps, epochs and loop wall time (vijax: the sum of
   ``res.diagnostics.wall_time`` over the pieces after a compiling warm-up fit; hand: the
   blocked time of its jitted pieces).

3. **Streaming**: the same generator writes ``stream_rows`` rows (10,000,000: 2 GB for
   ``X``; ``--quick`` 1,000,000) to ``.npy`` files in a temporary directory in blocks,
   opened with ``np.load(mmap_mode="r")``, fitted with ``vj.fit(stream=True)``; steps/s
   (``steps / res.diagnostics.wall_time`` of warm calls, median of interleaved repeats)
   against ``vj.fit`` on the device-resident 1,000,000 rows, and against streaming the
   same 1,000,000 rows from an in-memory numpy array; the host side of one streamed chunk
   timed alone (``HostData.chunk``). Peak RSS of a fresh process running one such fit
   (device-resident / streamed): its own high-water mark ``VmHWM`` (a child's
   ``ru_maxrss`` also counts its parent's resident set at the fork, so it is reported
   beside it), with its RSS split into anonymous and file-backed pages at the end
   (``/proc/self/status``). On CPU, device memory is host memory.

Run: ``python -m benchmarks.bench_data [--quick] [--out DIR] [--parts 1 2 3]``.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from numpyro.infer import SVI, Trace_ELBO
from numpyro.infer.autoguide import AutoNormal

import vijax as vj
from benchmarks.bench_core import (
    REPO_ROOT,
    base_parser,
    machine_info,
    machine_line,
    write_report,
)
from vijax.checks import DEFAULT_CHUNK
from vijax.data import Feed, Minibatch, advance, device_indices
from vijax.driver import _pipeline
from vijax.estimators import resolve_estimator
from vijax.stream import host_data

D = 50
BATCH = 1024
LEARNING_RATE = 0.05
SEED = 0
BLOCK_ROWS = 250_000
GH_NODES = 16
SUM_BLOCK = 1_000
NAT = 1.0
_HALF_LOG_2PI_E = 0.5 * (1.0 + math.log(2.0 * math.pi))
_NO_STOP = jnp.asarray(0, jnp.int32)
_NO_LIMIT = jnp.asarray(2**30, jnp.int32)
_DATA_KEY = 0x7FFFFFFF  # fold_in constant of the hand loop's permutation stream


# ---------------------------------------------------------------------------------------------
# data
def _w_true(seed: int) -> np.ndarray:
    return np.random.default_rng([seed, 0]).standard_normal(D).astype(np.float32)


def _block(seed: int, i: int, rows: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows ``i * BLOCK_ROWS ...`` (the first ``rows`` of block ``i``)."""
    rng = np.random.default_rng([seed, 1, i])
    x = rng.standard_normal((BLOCK_ROWS, D), dtype=np.float32)[:rows] / np.float32(math.sqrt(D))
    p = 1.0 / (1.0 + np.exp(-(x @ _w_true(seed))))
    y = (rng.random(BLOCK_ROWS, dtype=np.float32)[:rows] < p).astype(np.float32)
    return x, y


def _blocks(n: int, seed: int):
    for i in range(math.ceil(n / BLOCK_ROWS)):
        rows = min(BLOCK_ROWS, n - i * BLOCK_ROWS)
        yield i * BLOCK_ROWS, _block(seed, i, rows)


def make_data(n: int, seed: int = SEED) -> dict[str, np.ndarray]:
    """``{"X": (n, D), "y": (n,)}`` float32 numpy arrays."""
    x = np.empty((n, D), np.float32)
    y = np.empty((n,), np.float32)
    for start, (xb, yb) in _blocks(n, seed):
        x[start:start + len(xb)] = xb
        y[start:start + len(yb)] = yb
    return {"X": x, "y": y}


def write_npy(directory: Path, n: int, seed: int = SEED) -> dict[str, Path]:
    """The same rows as :func:`make_data`, written block by block to ``X.npy``, ``y.npy``."""
    paths = {"X": directory / "X.npy", "y": directory / "y.npy"}
    x = np.lib.format.open_memmap(paths["X"], mode="w+", dtype=np.float32, shape=(n, D))
    y = np.lib.format.open_memmap(paths["y"], mode="w+", dtype=np.float32, shape=(n,))
    for start, (xb, yb) in _blocks(n, seed):
        x[start:start + len(xb)] = xb
        y[start:start + len(yb)] = yb
    x.flush()
    y.flush()
    del x, y
    return paths


def open_npy(paths: dict[str, Path]) -> dict[str, np.ndarray]:
    return {k: np.load(p, mmap_mode="r") for k, p in paths.items()}


# ---------------------------------------------------------------------------------------------
# the model, three ways
def log_prior(z):
    return dist.Normal(0.0, 1.0).log_prob(z["w"]).sum()


def log_likelihood(z, d):
    return dist.Bernoulli(logits=d["X"] @ z["w"]).log_prob(d["y"])


def vijax_model() -> vj.Model:
    return vj.Model(log_prior=log_prior, log_likelihood=log_likelihood,
                    latents={"w": vj.Latent((D,))})


def numpyro_model(X, y, batch_size: int = BATCH):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([X.shape[1]]).to_event(1))
    with numpyro.plate("data", X.shape[0], subsample_size=batch_size) as idx:
        numpyro.sample("y", dist.Bernoulli(logits=X[idx] @ w), obs=y[idx])


# ---------------------------------------------------------------------------------------------
# the hand-written loop
class HandState(NamedTuple):
    params: Any  # {"loc": (D,), "raw": (D,)}
    opt_state: Any
    avg: Any  # tail average of params (vijax's rule)
    step: jax.Array
    perm: jax.Array  # (N,) int32 this epoch's permutation ("perm"), else ()
    offset: jax.Array  # next row of perm
    epoch: jax.Array


def _permutation(key, epoch, n: int):
    """Epoch ``epoch``'s permutation of the rows (the hand loop's data stream)."""
    return jax.random.permutation(jax.random.fold_in(jax.random.fold_in(key, _DATA_KEY), epoch),
                                  n).astype(jnp.int32)


def hand_rows(indices: str, n: int, batch_size: int, key, k_rows, perm, offset, epoch):
    """One step's rows ``(B,)`` and the next ``(perm, offset, epoch)``: ``"randint"``, or
    ``"perm"``: the next B entries of this epoch's permutation, a new permutation (computed
    here, under ``lax.cond``) when fewer than B are left (the last N mod B rows of an epoch
    are dropped)."""
    if indices == "randint":
        return jax.random.randint(k_rows, (batch_size,), 0, n), perm, offset, epoch
    if indices == "swap":  # vijax's own index functions (a diagnostic variant)
        mb, n_arr = Minibatch(batch_size, "epoch"), jnp.int32(n)
        rows = device_indices(mb, (epoch, offset), jnp.uint32(12345), n_arr)
        epoch, offset = advance(mb, (epoch, offset), n_arr)
        return rows, perm, offset, epoch
    new = offset + batch_size > n
    epoch = epoch + new.astype(jnp.int32)
    perm = jax.lax.cond(new, lambda: _permutation(key, epoch, n), lambda: perm)
    start = jnp.where(new, 0, offset)
    return jax.lax.dynamic_slice(perm, (start,), (batch_size,)), perm, start + batch_size, epoch


def make_hand(n: int, batch_size: int, optimizer: optax.GradientTransformation,
              indices: str):
    """``(init, run)``: ``init(key) -> HandState`` (``loc`` uniform in (-2, 2), scale 0.1),
    ``run(state, data, key, avg_start, steps) -> (state, losses (steps,))`` jitted (``steps``
    static). ``indices``: ``"randint"`` or ``"perm"`` (:func:`hand_rows`)."""
    scale = n / batch_size

    def neg_elbo(params, key, batch):
        s = jax.nn.softplus(params["raw"])
        z = {"w": params["loc"] + s * jax.random.normal(key, (D,))}
        entropy = jnp.sum(jnp.log(s)) + D * _HALF_LOG_2PI_E
        return -(scale * jnp.sum(log_likelihood(z, batch)) + log_prior(z) + entropy)

    @jax.jit
    def init(key):
        loc = jax.random.uniform(key, (D,), minval=-2.0, maxval=2.0)
        params = {"loc": loc, "raw": jnp.full((D,), _softplus_inverse(0.1), jnp.float32)}
        zero = jnp.zeros((), jnp.int32)
        perm = _permutation(key, zero, n) if indices == "perm" else zero
        return HandState(params, optimizer.init(params), params, zero, perm, zero, zero)

    @functools.partial(jax.jit, static_argnames="steps")
    def run(state, data, key, avg_start, steps):
        def step(st: HandState, _):
            k_rows, k_eps = jax.random.split(jax.random.fold_in(key, st.step))
            rows, perm, offset, epoch = hand_rows(indices, n, batch_size, key, k_rows,
                                                  st.perm, st.offset, st.epoch)
            batch = jax.tree_util.tree_map(lambda a: jnp.take(a, rows, axis=0), data)
            loss, grads = jax.value_and_grad(neg_elbo)(st.params, k_eps, batch)
            updates, opt_state = optimizer.update(grads, st.opt_state, st.params)
            params = optax.apply_updates(st.params, updates)
            count = jnp.maximum(st.step - avg_start + 1, 1).astype(jnp.float32)
            avg = jax.tree_util.tree_map(
                lambda a, p: jnp.where(st.step >= avg_start, a + (p - a) / count, p),
                st.avg, params)
            return HandState(params, opt_state, avg, st.step + 1, perm, offset, epoch), loss

        return jax.lax.scan(step, state, None, length=steps)

    return init, run


def make_index_chunk(kind: str, n: int, chunk: int):
    """A blocking call of a jitted scan of ``chunk`` steps that only computes each step's rows
    (and adds them up, so that nothing is optimised away): ``kind`` ``"vijax_epoch"``,
    ``"vijax_randint"`` (``vijax.data.device_indices`` / ``advance`` with N a runtime
    argument, as in vijax's loop), ``"vijax_epoch_static_n"`` (the same with N a
    compile-time constant), or ``"hand_perm"``, ``"hand_randint"``, ``"hand_swap"``
    (:func:`hand_rows`, N a constant)."""
    key = jax.random.key(0)
    zero = jnp.zeros((), jnp.int32)
    if kind.startswith("vijax"):
        mb = Minibatch(BATCH, kind.split("_")[1])
        seed = jnp.uint32(12345)
        static = kind.endswith("static_n")

        def body(carry, _, n_arr):
            n_arr = jnp.int32(n) if static else n_arr
            pos, acc = carry
            rows = device_indices(mb, pos, seed, n_arr)
            return (advance(mb, pos, n_arr), acc + jnp.sum(rows)), None

        carry0 = ((zero, zero), zero)
    else:
        indices = kind.split("_")[1]

        def body(carry, _, n_arr):
            del n_arr
            (perm, offset, epoch, step), acc = carry
            k_rows = jax.random.fold_in(key, step)
            rows, perm, offset, epoch = hand_rows(indices, n, BATCH, key, k_rows, perm, offset,
                                                  epoch)
            return ((perm, offset, epoch, step + 1), acc + jnp.sum(rows)), None

        perm0 = _permutation(key, zero, n) if indices == "perm" else zero
        carry0 = ((perm0, zero, zero, zero), zero)

    @jax.jit
    def run(carry, n_arr):
        return jax.lax.scan(functools.partial(body, n_arr=n_arr), carry, None, length=chunk)[0]

    cell = [carry0]
    n_arr = jnp.int32(n)

    def call():
        cell[0] = jax.block_until_ready(run(cell[0], n_arr))

    return call


def _softplus_inverse(y: float) -> float:
    return y + math.log(-math.expm1(-y))


# ---------------------------------------------------------------------------------------------
# exact ELBO of a mean-field q (Gauss-Hermite over each observation's logit)
def make_exact_elbo(data: dict[str, jax.Array], nodes: int = GH_NODES):
    """``(elbo, neg_elbo_mean, prepared)``: ``elbo(loc, scale) -> float`` (float64, host) and
    ``neg_elbo_mean(loc, scale, prepared) -> -ELBO / N`` (float32, differentiable) for the
    full data (``prepared``: its arrays), ``nodes``-point
    Gauss-Hermite for each observation's expected log likelihood. The data enter the jitted
    functions as arguments (closed over, they would be compile-time constants)."""
    n = data["y"].shape[0]
    t, wts = np.polynomial.hermite.hermgauss(nodes)
    abscissae = jnp.asarray(math.sqrt(2.0) * t, jnp.float32)
    weights = jnp.asarray(wts / math.sqrt(math.pi), jnp.float32)
    prepared = jax.block_until_ready(
        {"X": data["X"], "X2": data["X"] ** 2, "sign": 2.0 * data["y"] - 1.0,
         "abscissae": abscissae, "weights": weights})

    def row_terms(loc, scale, d):
        m = d["X"] @ loc
        sd = jnp.sqrt(d["X2"] @ (scale**2))
        a = d["sign"][:, None] * (m[:, None] + sd[:, None] * d["abscissae"][None, :])
        return jax.nn.log_sigmoid(a) @ d["weights"]  # (N,)

    def global_terms(loc, scale):
        prior = jnp.sum(-0.5 * math.log(2.0 * math.pi) - 0.5 * (loc**2 + scale**2))
        return prior + jnp.sum(jnp.log(scale)) + D * _HALF_LOG_2PI_E

    @jax.jit
    def blocks(loc, scale, d):
        rows = row_terms(loc, scale, d)
        pad = (-n) % SUM_BLOCK
        return jnp.pad(rows, (0, pad)).reshape(-1, SUM_BLOCK).sum(1), global_terms(loc, scale)

    def elbo(loc, scale) -> float:
        parts, glob = blocks(jnp.asarray(loc, jnp.float32), jnp.asarray(scale, jnp.float32),
                             prepared)
        return float(np.sum(np.asarray(parts, np.float64)) + float(glob))

    def neg_elbo_mean(loc, scale, d):
        return -(jnp.sum(row_terms(loc, scale, d)) + global_terms(loc, scale)) / n

    return elbo, neg_elbo_mean, prepared


def reference_optimum(data: dict[str, jax.Array], elbo, neg_elbo_mean, prepared,
                      lbfgs_iters: int) -> dict[str, Any]:
    """The mean-field ELBO optimum: Laplace (Newton MAP), then L-BFGS on the exact ELBO."""

    @jax.jit
    def newton(w, x, y):
        p = jax.nn.sigmoid(x @ w)
        g = x.T @ (y - p) - w
        h = (x * (p * (1 - p))[:, None]).T @ x + jnp.eye(D)
        return w + jnp.linalg.solve(h, g), h

    t0 = time.perf_counter()
    w = jnp.zeros((D,), jnp.float32)
    for _ in range(12):
        w, h = newton(w, data["X"], data["y"])
    laplace_loc, laplace_scale = w, 1.0 / jnp.sqrt(jnp.diagonal(h))
    laplace_elbo = elbo(laplace_loc, laplace_scale)

    def f(p, d):
        return neg_elbo_mean(p["loc"], jnp.exp(p["log_scale"]), d)

    opt = optax.lbfgs()

    @jax.jit
    def lbfgs_step(p, state, d):
        fd = functools.partial(f, d=d)
        value, grad = optax.value_and_grad_from_state(fd)(p, state=state)
        updates, state = opt.update(grad, state, p, value=value, grad=grad, value_fn=fd)
        return optax.apply_updates(p, updates), state, value, optax.tree.norm(grad)

    p = {"loc": laplace_loc, "log_scale": jnp.log(laplace_scale)}
    state = opt.init(p)
    trace = []
    for _ in range(lbfgs_iters):
        p, state, value, gnorm = lbfgs_step(p, state, prepared)
        trace.append((float(value) * data["y"].shape[0], float(gnorm)))
    best = elbo(p["loc"], jnp.exp(p["log_scale"]))
    return {"elbo": max(best, laplace_elbo), "laplace_mf_elbo": laplace_elbo,
            "lbfgs_elbo": best, "lbfgs_iters": lbfgs_iters,
            "lbfgs_last_grad_norm": trace[-1][1] if trace else float("nan"),
            "loc": np.asarray(p["loc"]), "scale": np.asarray(jnp.exp(p["log_scale"])),
            "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------
# part 1: µs/step
def _vijax_chunk(model, data, shuffle: str, chunk: int, n: int):
    optimizer = vj.default_optimizer(LEARNING_RATE)
    spec = vj.guides.resolve_spec("meanfield")
    feed = Feed(Minibatch(BATCH, shuffle, streamed=False), None)
    _, _, runner, start, _ = _pipeline(model.target, spec, 1, optimizer, chunk,
                                       resolve_estimator("auto"), None, feed)
    key = jax.random.key(0)
    _, _, _, state, k_loop = start(key, data, jnp.zeros((D,), jnp.float32),
                                   jnp.zeros((D,), bool))
    feed_args = {"n": jnp.int32(n), "seed": jnp.uint32(12345)}
    cell = [state]
    total = jnp.asarray(2**30, jnp.int32)  # every step active
    avg_start = jnp.asarray(0, jnp.int32)  # averaging on, as in the tail of a fit

    def call():
        cell[0], losses = runner(cell[0], data, k_loop, total, avg_start, _NO_STOP,
                                 _NO_LIMIT, feed_args)
        jax.block_until_ready((cell[0], losses))
        return losses

    return call


def _hand_chunk(data, indices: str, chunk: int, n: int):
    init, run = make_hand(n, BATCH, vj.default_optimizer(LEARNING_RATE), indices)
    key = jax.random.key(0)
    cell = [init(key)]
    avg_start = jnp.asarray(0, jnp.int32)

    def call():
        cell[0], losses = run(cell[0], data, key, avg_start, steps=chunk)
        jax.block_until_ready((cell[0], losses))
        return losses

    return call


def _numpyro_chunk(data, chunk: int):
    svi = SVI(numpyro_model, AutoNormal(numpyro_model), vj.default_optimizer(LEARNING_RATE),
              Trace_ELBO())

    @jax.jit
    def run(state, data):
        return jax.lax.scan(lambda s, _: svi.update(s, **data), state, None, length=chunk)

    cell = [svi.init(jax.random.PRNGKey(0), **data)]

    def call():
        cell[0], losses = run(cell[0], data)
        jax.block_until_ready((cell[0], losses))
        return losses

    return call


def part_speed(data, n: int, repeats: int) -> dict[str, Any]:
    chunk = n // BATCH
    np_chunk = max(1, chunk // 4)  # NumPyro: a quarter epoch per call (10x slower per step)
    model = vijax_model()
    makers = {
        "vijax_epoch": (lambda: _vijax_chunk(model, data, "epoch", chunk, n), chunk),
        "hand_perm": (lambda: _hand_chunk(data, "perm", chunk, n), chunk),
        "vijax_randint": (lambda: _vijax_chunk(model, data, "randint", chunk, n), chunk),
        "hand_randint": (lambda: _hand_chunk(data, "randint", chunk, n), chunk),
        "numpyro": (lambda: _numpyro_chunk(data, np_chunk), np_chunk),
        "hand_swap": (lambda: _hand_chunk(data, "swap", chunk, n), chunk),
    }
    calls, compile_s, last = {}, {}, {}
    for name, (make, steps) in makers.items():  # first call: compile (+ one chunk of steps)
        t0 = time.perf_counter()
        fn = make()
        fn()
        compile_s[name] = time.perf_counter() - t0
        calls[name] = (functools.partial(_keep_last, fn, last, name), steps)
        print(f"  compiled {name} ({compile_s[name]:.1f} s)", file=sys.stderr, flush=True)
    per_step = _interleaved(calls, repeats)
    med = {k: statistics.median(v) for k, v in per_step.items()}
    low = {k: min(v) for k, v in per_step.items()}
    index_calls = {k: (make_index_chunk(k, n, chunk), chunk)
                   for k in (*(k for k in makers if k != "numpyro"), "vijax_epoch_static_n")}
    for call, _ in index_calls.values():
        call()  # compile
    index_us = _interleaved(index_calls, repeats)
    index_med = {k: statistics.median(v) for k, v in index_us.items()}

    def ratios(t):
        return {"vijax_over_hand_epoch_perm": t["vijax_epoch"] / t["hand_perm"],
                "vijax_over_hand_randint": t["vijax_randint"] / t["hand_randint"],
                "vijax_epoch_over_numpyro": t["vijax_epoch"] / t["numpyro"],
                "vijax_randint_over_numpyro": t["vijax_randint"] / t["numpyro"]}

    out = {"chunk_steps": chunk, "numpyro_chunk_steps": np_chunk, "repeats": repeats,
           "us_per_step": med, "us_per_step_min": low, "us_per_step_all": per_step,
           "first_call_s": compile_s, "index_us_per_step": index_med,
           "index_us_per_step_all": index_us,
           "last_chunk_mean_loss": {k: float(np.mean(v)) for k, v in last.items()},
           "ratios": ratios(med), "ratios_of_minima": ratios(low)}
    for k, v in med.items():
        print(f"  {k:14s} {v:8.1f} us/step (min {low[k]:.1f}; indices alone "
              f"{index_med.get(k, float('nan')):.1f})", file=sys.stderr, flush=True)
    return out


def _interleaved(calls: dict, repeats: int) -> dict[str, list[float]]:
    """µs/step of each ``(blocking chunk call, its steps)``, ``repeats`` rounds round robin
    (the calls are compiled and warm already), so that load drift falls on every method
    alike."""
    per_step: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (call, steps) in calls.items():
            t0 = time.perf_counter()
            call()
            per_step[name].append((time.perf_counter() - t0) / steps * 1e6)
    return per_step


def _keep_last(fn, last: dict, name: str) -> None:
    last[name] = np.asarray(fn())


# ---------------------------------------------------------------------------------------------
# part 2: time to 1 nat
def _trace_summary(trace: list[dict], ref: float, n: int) -> dict[str, Any]:
    gaps = [ref - r["elbo"] for r in trace]
    first = next((i for i, g in enumerate(gaps) if g <= NAT), None)
    stay = None
    for i in range(len(gaps) - 1, -1, -1):
        if gaps[i] > NAT:
            break
        stay = i

    def at(i):
        if i is None:
            return None
        r = trace[i]
        return {"step": r["step"], "epochs": r["step"] * BATCH / n, "loop_s": r["loop_s"],
                "gap": gaps[i]}

    return {"first_within": at(first), "stays_within": at(stay),
            "final_gap": gaps[-1] if gaps else None, "min_gap": min(gaps) if gaps else None}


def part_converge(data_np, data, n: int, piece: int, max_steps: int,
                  lbfgs_iters: int) -> dict[str, Any]:
    elbo, neg_elbo_mean, prepared = make_exact_elbo(data)
    ref = reference_optimum(data, elbo, neg_elbo_mean, prepared, lbfgs_iters)
    print(f"  reference ELBO {ref['elbo']:.3f} (Laplace mean-field {ref['laplace_mf_elbo']:.3f},"
          f" L-BFGS {ref['lbfgs_elbo']:.3f}; {ref['seconds']:.1f} s)", file=sys.stderr,
          flush=True)
    model = vijax_model()
    kw = dict(convergence=None, progress=False, psis_draws=0, chunk_size=piece)

    # vijax: compile with a throwaway fit, then fit in pieces
    vj.fit(model, data, guide="meanfield", steps=piece, key=jax.random.key(1),
           batch_size=BATCH, **kw)
    trace_v, res, loop_s, call_s = [], None, 0.0, 0.0
    t_start = time.perf_counter()
    for _ in range(max_steps // piece):
        t0 = time.perf_counter()
        if res is None:
            res = vj.fit(model, data, guide="meanfield", steps=piece, key=jax.random.key(0),
                         batch_size=BATCH, **kw)
        else:
            res = vj.fit(model, data, steps=piece, resume=res, **kw)
        call_s += time.perf_counter() - t0
        loop_s += res.diagnostics.wall_time
        loc = np.asarray(res.params["loc"])
        scale = np.asarray(jax.nn.softplus(res.params["raw_scale"]))
        trace_v.append({"step": res.diagnostics.n_steps, "loop_s": loop_s, "call_s": call_s,
                        "elbo": elbo(loc, scale)})
    v_total = time.perf_counter() - t_start

    # hand loop (permutation indices), the same pieces and averaging rule
    init, run = make_hand(n, BATCH, vj.default_optimizer(LEARNING_RATE), "perm")
    st = init(jax.random.key(1))
    jax.block_until_ready(run(st, data, jax.random.key(1), jnp.int32(0), steps=piece))
    key = jax.random.key(0)
    st = init(key)
    trace_h, loop_h = [], 0.0
    for i in range(max_steps // piece):
        end = (i + 1) * piece
        avg_start = jnp.int32(end - math.floor(0.5 * end))
        t0 = time.perf_counter()
        st, losses = run(st, data, key, avg_start, steps=piece)
        jax.block_until_ready((st, losses))
        loop_h += time.perf_counter() - t0
        scale = jax.nn.softplus(st.avg["raw"])
        trace_h.append({"step": end, "loop_s": loop_h, "elbo": elbo(st.avg["loc"], scale)})

    best_seen = max(r["elbo"] for r in trace_v + trace_h)
    out = {"reference": {k: v for k, v in ref.items() if k not in ("loc", "scale")},
           "piece_steps": piece, "max_steps": max_steps, "max_epochs": max_steps * BATCH / n,
           "best_checkpoint_elbo": best_seen,
           "reference_exceeded_by": max(0.0, best_seen - ref["elbo"]),
           "gh_check": abs(elbo(ref["loc"], ref["scale"]) - make_exact_elbo(
               data, 2 * GH_NODES)[0](ref["loc"], ref["scale"])),
           "vijax": {"trace": trace_v, "total_s": v_total,
                     **_trace_summary(trace_v, ref["elbo"], n)},
           "hand": {"trace": trace_h, **_trace_summary(trace_h, ref["elbo"], n)}}
    for name in ("vijax", "hand"):
        s = out[name]
        print(f"  {name}: first within 1 nat {s['first_within']}, stays {s['stays_within']}, "
              f"final gap {s['final_gap']:.2f}", file=sys.stderr, flush=True)
    return out


# ---------------------------------------------------------------------------------------------
# part 3: streaming
def _fit_rate(model, data, steps: int, stream: bool) -> float:
    res = vj.fit(model, data, guide="meanfield", steps=steps, batch_size=BATCH, stream=stream,
                 convergence=None, progress=False, psis_draws=0)
    return steps / res.diagnostics.wall_time


def part_stream(data_np, data, stream_rows: int, steps: int, repeats: int,
                tmp_root: str | None) -> dict[str, Any]:
    model = vijax_model()
    tmp = Path(tempfile.mkdtemp(prefix="vijax_bench_data_", dir=tmp_root))
    try:
        free = shutil.disk_usage(tmp).free
        need = stream_rows * (D + 1) * 4
        if need > 0.8 * free:
            raise RuntimeError(f"{stream_rows} rows need {need / 1e9:.1f} GB; {free / 1e9:.1f} "
                               "GB free")
        t0 = time.perf_counter()
        paths = write_npy(tmp, stream_rows)
        write_s = time.perf_counter() - t0
        print(f"  wrote {stream_rows} rows ({need / 1e9:.2f} GB) in {write_s:.1f} s",
              file=sys.stderr, flush=True)
        mm = open_npy(paths)
        runs = {"device_resident": (data, False), "stream_mmap": (mm, True),
                "stream_numpy": (data_np, True)}
        # the first call compiles: its wall_time includes compilation (start and runner)
        first = {name: _fit_rate(model, d, steps, s) for name, (d, s) in runs.items()}
        rates: dict[str, list[float]] = {k: [] for k in runs}
        host: dict[str, list[float]] = {"stream_mmap": [], "stream_numpy": []}
        for _ in range(repeats):
            for name, (d, s) in runs.items():
                rates[name].append(_fit_rate(model, d, steps, s))
                if s:
                    host[name].append(_host_chunk_us(d))
        med = {k: statistics.median(v) for k, v in rates.items()}
        host_med = {k: statistics.median(v) for k, v in host.items()}
        for k, v in med.items():
            print(f"  {k:16s} {v:8.1f} steps/s (host gather "
                  f"{host_med.get(k, float('nan')):.0f} us/step)", file=sys.stderr, flush=True)
        rss = {kind: _child_rss(kind, paths, steps, data_np["y"].shape[0])
               for kind in ("device", "stream")}
        return {"stream_rows": stream_rows, "file_bytes": need, "write_s": write_s,
                "steps": steps, "repeats": repeats, "steps_per_s": med,
                "steps_per_s_all": rates, "first_call_steps_per_s": first,
                "host_chunk_us_per_step": host_med, "host_chunk_us_per_step_all": host,
                "ratio_stream_mmap_over_device": med["stream_mmap"] / med["device_resident"],
                "ratio_stream_numpy_over_device": med["stream_numpy"] / med["device_resident"],
                "rss": rss, "main_process_ru_maxrss_mb":
                    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "tmp_dir": str(tmp)}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _host_chunk_us(data, chunk: int = DEFAULT_CHUNK) -> float:
    """Host side of one streamed chunk alone (what ``vj.fit(stream=True)`` does between
    chunks: the rows of ``chunk`` steps, gathered, checked, cast and put on the device), in
    µs per step."""
    source = host_data(data, np.float32)
    t0 = time.perf_counter()
    jax.block_until_ready(source.chunk(Minibatch(BATCH, "epoch", streamed=True), 0, chunk,
                                       12345))
    return (time.perf_counter() - t0) / chunk * 1e6


def _child_rss(kind: str, paths: dict[str, Path], steps: int, n_device: int) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.bench_data", "--child-rss", kind, str(paths["X"]),
           str(paths["y"]), str(steps), str(n_device)]
    out = subprocess.run(cmd, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"child {cmd} failed:\n{out.stderr[-4000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _status_kb() -> dict[str, int]:
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0])
    return out


def child_rss(kind: str, x_path: str, y_path: str, steps: int, n_device: int) -> dict:
    """One compiling fit and one timed fit in this fresh process; memory in MB."""
    model = vijax_model()
    before = _status_kb()
    if kind == "device":
        data = jax.block_until_ready(jax.tree_util.tree_map(jnp.asarray, make_data(n_device)))
        stream = False
    else:
        data = open_npy({"X": Path(x_path), "y": Path(y_path)})
        stream = True
    rates = [_fit_rate(model, data, steps, stream) for _ in range(2)]
    after = _status_kb()
    return {"kind": kind, "rows": n_device if kind == "device" else int(data["y"].shape[0]),
            "steps_per_s": rates[-1],
            "rss_before_mb": before["VmRSS"] / 1024,
            # VmHWM: this process's own peak. ru_maxrss of a child of a large process also
            # counts the parent's resident set at the fork (Linux keeps it across exec)
            "peak_rss_mb": after["VmHWM"] / 1024,
            "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rss_end_mb": after["VmRSS"] / 1024, "rss_anon_end_mb": after["RssAnon"] / 1024,
            "rss_file_end_mb": after["RssFile"] / 1024}


# ---------------------------------------------------------------------------------------------
# report
def _f(x, fmt=".1f", none="–"):
    return none if x is None else format(x, fmt)


def to_markdown(report: dict) -> str:
    s, m = report["settings"], report["machine"]
    lines = ["# vijax minibatch SVI benchmark", "",
             machine_line(m, s["total_wall_s"]), "",
             f"Logistic regression N = {s['n']:,} x D = {D} float32 (synthetic, seed {SEED}), "
             f"B = {BATCH}, mean-field, K = 1, `vj.default_optimizer({LEARNING_RATE})` "
             "(Adam, 0.05 / sqrt(1 + t/1000)) for every method."
             + (" **Quick run.**" if s["quick"] else ""), ""]
    if "speed" in report:
        p = report["speed"]
        u, r, ix = p["us_per_step"], p["ratios"], p["index_us_per_step"]
        lo, rl = p["us_per_step_min"], p["ratios_of_minima"]
        lines += [
            f"## 1. µs/step (median of {p['repeats']} interleaved compiled chunks of "
            f"{p['chunk_steps']} steps = 1 epoch, NumPyro {p['numpyro_chunk_steps']}; compile "
            "excluded; in brackets the fastest chunk and the ratio of the fastest)", "",
            "| indices | vijax | hand `lax.scan` | NumPyro (plate subsample, AutoNormal) "
            "| vijax / hand | vijax / NumPyro | indices alone: vijax | hand |",
            "|---|--:|--:|--:|--:|--:|--:|--:|",
            f"| per-epoch permutation | {u['vijax_epoch']:.0f} ({lo['vijax_epoch']:.0f}) | "
            f"{u['hand_perm']:.0f} ({lo['hand_perm']:.0f}) | {u['numpyro']:.0f} "
            f"({lo['numpyro']:.0f}) | {r['vijax_over_hand_epoch_perm']:.2f} "
            f"({rl['vijax_over_hand_epoch_perm']:.2f}) | {r['vijax_epoch_over_numpyro']:.3f} "
            f"({rl['vijax_epoch_over_numpyro']:.3f}) | {ix['vijax_epoch']:.0f} | "
            f"{ix['hand_perm']:.0f} |",
            f"| with replacement (randint) | {u['vijax_randint']:.0f} "
            f"({lo['vijax_randint']:.0f}) | {u['hand_randint']:.0f} ({lo['hand_randint']:.0f}) "
            f"| (same) | {r['vijax_over_hand_randint']:.2f} "
            f"({rl['vijax_over_hand_randint']:.2f}) | {r['vijax_randint_over_numpyro']:.3f} "
            f"({rl['vijax_randint_over_numpyro']:.3f}) | {ix['vijax_randint']:.1f} | "
            f"{ix['hand_randint']:.1f} |", "",
            "vijax: `shuffle=\"epoch\"` (keyed swap-or-not permutation, 16 rounds, computed per "
            "element) / `\"randint\"`; hand: `jax.random.permutation(N)` once per epoch inside "
            "the loop / `jax.random.randint`; NumPyro draws its B rows without replacement "
            "each step (on CPU a partial Fisher-Yates `lax.scan` of B swaps over `arange(N)`). "
            "*Indices alone*: a jitted scan that only computes each step's rows (the same "
            "functions), timed the same way. First call (compile + 1 epoch) s: "
            + ", ".join(f"{k} {v:.1f}" for k, v in p["first_call_s"].items())
            + ". Mean loss over the last timed chunk (the same objective, -ELBO estimates): "
            + ", ".join(f"{k} {v:,.0f}" for k, v in p["last_chunk_mean_loss"].items())
            + ".", "",
            "*Diagnosis of the epoch shuffle.* The swap-or-not indices alone cost "
            f"{ix['vijax_epoch']:.1f} µs/step with N a runtime argument (as vijax's loop "
            f"passes it) and {ix['vijax_epoch_static_n']:.1f} µs/step with N a compile-time "
            "constant: each of its 16 rounds takes `% n` per element, a hardware integer "
            "division when n is not known at compile time. The hand loop with vijax's own "
            f"index functions and a constant N (`hand_swap`): {u['hand_swap']:.1f} µs/step "
            f"(hand randint {u['hand_randint']:.1f}; fastest chunks {lo['hand_swap']:.0f} and "
            f"{lo['hand_randint']:.0f}).", ""]
    if "converge" in report:
        c = report["converge"]
        ref = c["reference"]
        lines += [
            f"## 2. Time to within {NAT:g} nat of the full-batch ELBO optimum", "",
            f"Reference: mean-field ELBO optimum {ref['elbo']:.2f} (exact ELBO by "
            f"{GH_NODES}-point Gauss-Hermite; Laplace mean-field start "
            f"{ref['laplace_mf_elbo']:.2f}, "
            f"then {ref['lbfgs_iters']} L-BFGS iterations: {ref['lbfgs_elbo']:.2f}; "
            f"{ref['seconds']:.0f} s). Quadrature check ({2 * GH_NODES} nodes): "
            f"{c['gh_check']:.2e} nat. Best checkpoint of either loop: "
            f"{c['best_checkpoint_elbo']:.2f} (exceeds the reference by "
            f"{c['reference_exceeded_by']:.3f}). Checkpoints every {c['piece_steps']} steps, "
            f"up to {c['max_steps']} steps ({c['max_epochs']:.1f} epochs).", "",
            "| method | first within 1 nat: steps | epochs | loop s | stays within from: steps "
            "| epochs | loop s | final gap (nat) | min gap |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for name, label in (("vijax", "vijax (`resume=` pieces)"),
                            ("hand", "hand loop (permutation)")):
            t = c[name]
            a, b = t["first_within"] or {}, t["stays_within"] or {}
            lines.append(f"| {label} | {_f(a.get('step'), 'd')} | {_f(a.get('epochs'), '.2f')} "
                         f"| {_f(a.get('loop_s'), '.2f')} | {_f(b.get('step'), 'd')} | "
                         f"{_f(b.get('epochs'), '.2f')} | {_f(b.get('loop_s'), '.2f')} | "
                         f"{t['final_gap']:.2f} | {t['min_gap']:.2f} |")
        last = c["vijax"]["trace"][-1]
        lines += ["", f"vijax's {len(c['vijax']['trace'])} `vj.fit` calls took "
                  f"{last['call_s']:.1f} s in all for {last['loop_s']:.1f} s of loop "
                  "(`wall_time`); the ELBO "
                  "evaluations are not counted. One seed; the gap at a checkpoint moves by a few "
                  "tenths of a nat from one checkpoint to the next.", "",
                  "Gap (nat) at the checkpoints, vijax / hand:", "",
                  "| step | epochs | vijax | hand |", "|--:|--:|--:|--:|"]
        tv, th = c["vijax"]["trace"], c["hand"]["trace"]
        stride = max(1, len(tv) // 12)
        for i in list(range(0, len(tv), stride)) + ([len(tv) - 1] if (len(tv) - 1) % stride
                                                     else []):
            lines.append(f"| {tv[i]['step']} | {tv[i]['step'] * BATCH / s['n']:.2f} | "
                         f"{ref['elbo'] - tv[i]['elbo']:.2f} | {ref['elbo'] - th[i]['elbo']:.2f} |")
        lines.append("")
    if "stream" in report:
        st = report["stream"]
        sp = st["steps_per_s"]
        lines += [
            f"## 3. Streaming from a memory-mapped `.npy` ({st['stream_rows']:,} rows, "
            f"{st['file_bytes'] / 1e9:.2f} GB; written in {st['write_s']:.0f} s)", "",
            f"`vj.fit(..., steps={st['steps']})` warm calls, steps / "
            f"`res.diagnostics.wall_time`, median of {st['repeats']} interleaved.", "",
            "| data | steps/s | vs device-resident | first call in this process, steps/s "
            "| host side of a chunk alone, µs/step |", "|---|--:|--:|--:|--:|",
            f"| device-resident, {s['n']:,} rows | {sp['device_resident']:.0f} | 1.00 | "
            f"{st['first_call_steps_per_s']['device_resident']:.0f} | – |",
            f"| `stream=True`, memory-mapped `.npy`, {st['stream_rows']:,} rows | "
            f"{sp['stream_mmap']:.0f} | {st['ratio_stream_mmap_over_device']:.2f} | "
            f"{st['first_call_steps_per_s']['stream_mmap']:.0f} | "
            f"{st['host_chunk_us_per_step']['stream_mmap']:.0f} |",
            f"| `stream=True`, in-memory numpy, {s['n']:,} rows | {sp['stream_numpy']:.0f} | "
            f"{st['ratio_stream_numpy_over_device']:.2f} | "
            f"{st['first_call_steps_per_s']['stream_numpy']:.0f} | "
            f"{st['host_chunk_us_per_step']['stream_numpy']:.0f} |", "",
            f"Device-resident: {1e6 / sp['device_resident']:.0f} µs/step; streamed "
            f"(memory map): {1e6 / sp['stream_mmap']:.0f} µs/step. *Host side alone*: "
            f"`HostData.chunk` for {DEFAULT_CHUNK} steps (the rows by the host swap-or-not "
            "shuffle, sorted, gathered, checked finite, cast, `jax.device_put`), timed by "
            "itself. *First call*: the call that compiles; its `wall_time` includes the "
            "compilation of the start-up program and of the chunk runner (the in-memory stream "
            "reuses the streamed program the memory-mapped one compiled).", "",
            "Memory of a fresh process running one compiling and one timed fit (MB; on CPU "
            "device memory is host memory, so a device-resident data set is in the RSS). "
            "*Peak* is the process's own high-water mark (`VmHWM`); `ru_maxrss` of such a "
            "child also counts the parent's resident set at the fork (Linux keeps it across "
            "`exec`), so it reads the benchmark process's size "
            f"({st['main_process_ru_maxrss_mb']:.0f} MB here).", "",
            "| process | rows | RSS after imports | peak RSS | ru_maxrss | RSS at end: "
            "anonymous | file-backed (mapped `.npy` pages) |", "|---|--:|--:|--:|--:|--:|--:|"]
        for kind, r in st["rss"].items():
            lines.append(f"| {kind} | {r['rows']:,} | {r['rss_before_mb']:.0f} | "
                         f"{r['peak_rss_mb']:.0f} | {r['ru_maxrss_mb']:.0f} | "
                         f"{r['rss_anon_end_mb']:.0f} | {r['rss_file_end_mb']:.0f} |")
        lines.append("")
    return "\n".join(lines) + "\n"


def _parse(argv):
    p = base_parser("bench_data", __doc__, "N = 100,000, 1,000,000 streamed rows, fewer "
                    "repeats and steps (about 2 minutes)")
    p.add_argument("--parts", nargs="+", type=int, default=[1, 2, 3], choices=[1, 2, 3])
    p.add_argument("--n", type=int, default=None, help="rows (1,000,000; quick 100,000)")
    p.add_argument("--stream-rows", type=int, default=None,
                   help="rows of the memory-mapped file (10,000,000; quick 1,000,000)")
    p.add_argument("--max-steps", type=int, default=None,
                   help="part 2: steps per method (30,000; quick 1,000)")
    p.add_argument("--piece", type=int, default=None,
                   help="part 2: steps between ELBO checkpoints (500; quick 50)")
    p.add_argument("--tmp", default=None, help="directory for the temporary .npy files")
    p.add_argument("--child-rss", nargs=5, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    q = args.quick
    args.n = args.n or (100_000 if q else 1_000_000)
    args.stream_rows = args.stream_rows or (1_000_000 if q else 10_000_000)
    args.repeats = 3 if q else 9
    args.piece = args.piece or (50 if q else 500)
    args.max_steps = args.max_steps or (1_000 if q else 30_000)
    args.lbfgs_iters = 10
    args.stream_steps = 1_000 if q else 2_000
    args.stream_repeats = 2 if q else 5
    return args


def main(argv=None) -> dict | None:
    args = _parse(argv)
    if args.child_rss:
        kind, x_path, y_path, steps, n = args.child_rss
        print(json.dumps(child_rss(kind, x_path, y_path, int(steps), int(n))))
        return None
    load_start = list(os.getloadavg())
    t0 = time.perf_counter()
    data_np = make_data(args.n)
    data = jax.block_until_ready(jax.tree_util.tree_map(jnp.asarray, data_np))
    report: dict[str, Any] = {}
    if 1 in args.parts:
        print("part 1: µs/step", file=sys.stderr, flush=True)
        report["speed"] = part_speed(data, args.n, args.repeats)
    if 2 in args.parts:
        print("part 2: time to 1 nat", file=sys.stderr, flush=True)
        report["converge"] = part_converge(data_np, data, args.n, args.piece, args.max_steps,
                                           args.lbfgs_iters)
    if 3 in args.parts:
        print("part 3: streaming", file=sys.stderr, flush=True)
        report["stream"] = part_stream(data_np, data, args.stream_rows, args.stream_steps,
                                       args.stream_repeats, args.tmp)
    settings = {k: getattr(args, k) for k in ("quick", "n", "stream_rows", "repeats", "piece",
                                               "max_steps", "lbfgs_iters", "stream_steps",
                                               "stream_repeats", "parts")}
    settings.update(d=D, batch_size=BATCH, learning_rate=LEARNING_RATE, seed=SEED,
                    gh_nodes=GH_NODES, total_wall_s=time.perf_counter() - t0)
    report = {"machine": {**machine_info(), "loadavg_start": load_start},
              "settings": settings, **report}
    write_report(args.out, "data", args.quick, report, to_markdown(report),
                 settings["total_wall_s"])
    return report


if __name__ == "__main__":
    main()
