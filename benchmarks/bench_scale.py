"""Scale-out overhead (issue 16): ``vj.fit(mesh=)`` and ``vj.fit_many(mesh=)`` over 1, 2, 4
and 8 host CPU devices, and two ``jax.distributed`` processes against one.

On a 2-core machine, more host devices cannot run faster: this measures what splitting costs
(the collectives, the partitioned programs, the host's per-chunk work), not speed-up. Each
figure is the steady-state time per step of a warm fit (a first fit of the same shapes
compiles; the second is timed: ``res.diagnostics.wall_time / steps``, no PSIS check,
``convergence=None``), reported against the same fit without a mesh.

Workloads:

* **logistic, strong**: Bayesian logistic regression, mean-field, N = 100,000 rows, D = 20,
  minibatches of B = 1,024 (device-resident data, rows drawn uniformly with replacement,
  ``shuffle="randint"``, as the hand-written loop draws them), 2,000 steps.
* **logistic, weak**: the same with N = 25,000 x devices and B = 256 x devices.
* **fit_many, strong**: 64 lanes of logistic regression (N = 1,000, D = 20, a dataset per
  lane), 500 steps; **weak**: 16 x devices lanes.
* **two processes**: the strong logistic fit on a 4-device mesh, in one process with 4 host
  devices and in two ``jax.distributed`` processes with 2 each (``python -m vijax.launch``),
  a quarter of the steps.
* **floor**: the hand-written JAX loop of the logistic fits (:func:`_floor`), on the same
  meshes.

Every device count runs in its own process (the host device count is fixed when JAX starts),
in ``--rounds`` rounds of all counts (so that a change of machine load falls on all alike);
the median over rounds is reported.

Run: ``python -m benchmarks.bench_scale [--quick] [--rounds R] [--out DIR]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

COUNTS = (1, 2, 4, 8)


# ---------------------------------------------------------------------------------------------
# worker: one process, one device count
def _worker(args) -> dict:
    import jax

    if not args.distributed:
        jax.config.update("jax_num_cpu_devices", args.devices)
    else:
        from vijax.launch import initialize
        initialize()
    import numpy as np
    import numpyro.distributions as dist
    import optax

    import vijax as vj

    def logreg():
        return vj.Model(
            log_prior=lambda z: dist.Normal(0, 1).log_prob(z["w"]).sum(),
            log_likelihood=lambda z, d: dist.Bernoulli(logits=d["X"] @ z["w"]).log_prob(
                d["y"]),
            latents={"w": vj.Latent(shape=(20,))})

    def data(n, seed=0, lanes=None):
        rng = np.random.default_rng(seed)
        shape = (n, 20) if lanes is None else (lanes, n, 20)
        x = rng.normal(size=shape).astype(np.float32)
        w = rng.normal(size=20)
        y = (rng.uniform(size=shape[:-1]) < 1 / (1 + np.exp(-x @ w))).astype(np.float32)
        return {"X": x, "y": y}

    model = logreg()
    devices = jax.devices()
    mesh = jax.make_mesh((len(devices),), ("data",), devices=devices)
    out = {"devices": len(devices), "processes": jax.process_count()}
    # uniform rows with replacement, as the hand-written loop draws them (the default epoch
    # shuffle costs ~0.1 ms a step at B = 1,024 on this CPU, with or without a mesh)
    common = dict(guide="meanfield", convergence=None, progress=False, psis_draws=0,
                  optimizer=optax.adam(1e-2), chunk_size=500)
    fit_common = dict(common, shuffle="randint")

    def per_step(fn, steps):
        fn(0)  # compiles
        return min(fn(1 + r).diagnostics.wall_time for r in range(args.repeats)) / steps * 1e6

    steps = args.steps
    if args.part in ("fit", "all"):
        for mode in ("strong", "weak"):
            n, b = (100_000, 1024) if mode == "strong" else (25_000 * len(devices),
                                                             256 * len(devices))
            if args.quick:
                n //= 10
            d = data(n)
            out[f"fit_{mode}_mesh"] = per_step(lambda s, d=d, b=b: vj.fit(
                model, d, batch_size=b, steps=steps, mesh=mesh, key=jax.random.key(s),
                **fit_common), steps)
            if len(devices) == 1 or args.distributed:
                out[f"fit_{mode}_nomesh"] = per_step(lambda s, d=d, b=b: vj.fit(
                    model, d, batch_size=b, steps=steps, key=jax.random.key(s),
                    **fit_common), steps)
            if not args.distributed:
                out[f"floor_{mode}_mesh"] = _floor(d, b, steps, mesh, args.repeats)
                if len(devices) == 1:
                    out[f"floor_{mode}_nomesh"] = _floor(d, b, steps, None, args.repeats)
    if args.part in ("many", "all") and not args.distributed:
        many_steps = max(steps // 4, 100)
        for mode in ("strong", "weak"):
            lanes = 64 if mode == "strong" else 16 * len(devices)
            d = data(1000, lanes=lanes)
            out[f"many_{mode}_mesh"] = per_step(lambda s, d=d, lanes=lanes: vj.fit_many(
                model, d, data_axes=0, keys=[s * 1000 + i for i in range(lanes)],
                steps=many_steps, mesh=mesh, **common)[0], many_steps)
            if len(devices) == 1:
                out[f"many_{mode}_nomesh"] = per_step(lambda s, d=d, lanes=lanes: vj.fit_many(
                    model, d, data_axes=0, keys=[s * 1000 + i for i in range(lanes)],
                    steps=many_steps, **common)[0], many_steps)
    return out


def _floor(data, b: int, steps: int, mesh, repeats: int) -> float:
    """µs per step of the hand-written JAX loop of the same fit: mean-field ELBO (one draw,
    analytic entropy), Adam 1e-2, uniform minibatch rows, ``lax.scan`` of ``steps`` steps
    under one ``jit``; on a mesh the data are split by rows (``NamedSharding``) and XLA's
    partitioner does the rest (what a user writing the loop gets)."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import AxisType, Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    x, y = data["X"], data["y"]
    n, dim = x.shape
    if mesh is None:
        x, y = jnp.asarray(x), jnp.asarray(y)
    else:
        auto = Mesh(mesh.devices, mesh.axis_names, axis_types=(AxisType.Auto,))
        x, y = (jax.device_put(a, NamedSharding(auto, P("data"))) for a in (x, y))
    opt = optax.adam(1e-2)

    def loss(p, key, xb, yb):
        scale = jax.nn.softplus(p["raw"])
        w = p["loc"] + scale * jax.random.normal(key, (dim,))
        logits = xb @ w
        ll = jnp.sum(yb * jax.nn.log_sigmoid(logits) + (1 - yb) * jax.nn.log_sigmoid(-logits))
        return -(n / b * ll - 0.5 * jnp.sum(w ** 2) + jnp.sum(jnp.log(scale)))

    @jax.jit
    def run(p, s, key, x, y):
        def body(carry, k):
            p, s = carry
            k1, k2 = jax.random.split(k)
            rows = jax.random.randint(k1, (b,), 0, n)
            g = jax.grad(loss)(p, k2, jnp.take(x, rows, 0), jnp.take(y, rows, 0))
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None
        return jax.lax.scan(body, (p, s), jax.random.split(key, steps))[0]

    p = {"loc": jnp.zeros(dim), "raw": jnp.full(dim, -1.0)}
    s = opt.init(p)
    jax.block_until_ready(run(p, s, jax.random.key(0), x, y))
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(run(p, s, jax.random.key(r + 1), x, y))
        times.append(time.perf_counter() - t0)
    return min(times) / steps * 1e6


# ---------------------------------------------------------------------------------------------
# driver
def _run(cmd: list[str], env_extra: dict | None = None) -> dict:
    env = dict(os.environ, **(env_extra or {}))
    env.pop("XLA_FLAGS", None)
    got = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if got.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{got.stdout[-3000:]}\n"
                           f"{got.stderr[-3000:]}")
    for line in reversed(got.stdout.splitlines()):
        line = line.split("] ", 1)[-1] if line.startswith("[") else line
        if line.startswith("RESULT "):
            return json.loads(line[len("RESULT "):])
    raise RuntimeError(f"no result from {' '.join(cmd)}:\n{got.stdout[-3000:]}")


def _worker_cmd(devices: int, quick: bool, steps: int, part: str, repeats: int) -> list[str]:
    cmd = [sys.executable, "-m", "benchmarks.bench_scale", "--worker", "--devices",
           str(devices), "--steps", str(steps), "--part", part, "--repeats", str(repeats)]
    return cmd + (["--quick"] if quick else [])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--distributed", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--devices", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--part", default="all", help=argparse.SUPPRESS)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--repeats", type=int, default=3, help="timed fits per figure (minimum)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    if args.worker:
        print("RESULT " + json.dumps(_worker(args)), flush=True)
        return

    steps = 500 if args.quick else args.steps
    load0 = os.getloadavg()
    rounds: list[dict] = []
    two: list[dict] = []
    for r in range(args.rounds):
        got = {}
        for d in COUNTS:
            got[d] = _run(_worker_cmd(d, args.quick, steps, "all", args.repeats))
            print(f"round {r} devices {d}: {got[d]}", flush=True)
        rounds.append(got)
        few = max(steps // 4, 200)  # a cross-process step costs milliseconds on CPU
        one = _run(_worker_cmd(4, args.quick, few, "fit", args.repeats))
        dist = _run([sys.executable, "-m", "vijax.launch", "--processes", "2",
                     "--devices-per-process", "2", "--timeout", "1500",
                     os.path.abspath(__file__), "--worker", "--distributed", "--devices", "2",
                     "--steps", str(few), "--part", "fit", "--repeats", str(args.repeats)]
                    + (["--quick"] if args.quick else []))
        two.append({"one": one, "two": dist})
        print(f"round {r} two processes: {two[-1]}", flush=True)
    load1 = os.getloadavg()
    _report(rounds, two, args, steps, load0, load1)


def _median(values):
    return statistics.median(values)


def _report(rounds, two, args, steps, load0, load1) -> None:
    import jax

    def med(d, key):
        return _median([r[d][key] for r in rounds])

    base = {k: med(1, f"{k}_nomesh") for k in ("fit_strong", "fit_weak", "many_strong",
                                               "many_weak")}
    lines = [
        "# Scale-out overhead on host CPU devices (`benchmarks/bench_scale.py`)", "",
        f"Machine: {platform.machine()}, {os.cpu_count()} cores; jax {jax.__version__}; "
        f"{time.strftime('%Y-%m-%d')}; load average {load0[0]:.2f} at start, "
        f"{load1[0]:.2f} at end; {args.rounds} rounds, medians; {steps} steps per fit "
        f"(fit_many {max(steps // 4, 100)}){'; quick sizes' if args.quick else ''}.", "",
        "Host devices share the machine's 2 cores: the ratios are the cost of splitting, not "
        "a speed-up.", "",
        "| workload | no mesh (µs/step) | " + " | ".join(f"{d} dev" for d in COUNTS) + " |",
        "|---|--:|" + "--:|" * len(COUNTS)]
    for key, label in (("fit_strong", "logistic, strong (N 1e5, B 1,024)"),
                       ("fit_weak", "logistic, weak (N 2.5e4 x d, B 256 x d)"),
                       ("many_strong", "fit_many, strong (64 lanes)"),
                       ("many_weak", "fit_many, weak (16 x d lanes)")):
        cells = [f"{med(d, key + '_mesh'):.0f} ({med(d, key + '_mesh') / base[key]:.2f}x)"
                 for d in COUNTS]
        lines.append(f"| {label} | {base[key]:.0f} | " + " | ".join(cells) + " |")
    lines += ["", "The hand-written JAX loop of the same logistic fit (`_floor`: data split by "
              "`NamedSharding`, `jnp.take` of uniform rows, XLA's partitioner), µs per step "
              "(vijax / floor on the same mesh):", "",
              "| workload | no mesh | " + " | ".join(f"{d} dev" for d in COUNTS) + " |",
              "|---|--:|" + "--:|" * len(COUNTS)]
    for key, label in (("strong", "logistic, strong"), ("weak", "logistic, weak")):
        cells = [f"{med(d, 'floor_' + key + '_mesh'):.0f} "
                 f"({med(d, 'fit_' + key + '_mesh') / med(d, 'floor_' + key + '_mesh'):.2f}x)"
                 for d in COUNTS]
        nomesh = med(1, f"floor_{key}_nomesh")
        lines.append(f"| {label} | {nomesh:.0f} ({base['fit_' + key] / nomesh:.2f}x) | "
                     + " | ".join(cells) + " |")
    one = _median([t["one"]["fit_strong_mesh"] for t in two])
    dist = _median([t["two"]["fit_strong_mesh"] for t in two])
    lines += ["", "Cells: µs per step on a mesh of d devices (ratio to the same fit without a "
              "mesh). The 1-device column is the mesh machinery alone.", "",
              "| two processes (strong logistic on 4 devices) | µs/step |", "|---|--:|",
              f"| 1 process x 4 devices | {one:.0f} |",
              f"| 2 processes x 2 devices (jax.distributed, gloo) | {dist:.0f} "
              f"({dist / one:.2f}x) |"]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(args.out, exist_ok=True)
    name = "scale_cpu_quick" if args.quick else "scale_cpu"
    with open(os.path.join(args.out, name + ".md"), "w") as f:
        f.write(text)
    with open(os.path.join(args.out, name + ".json"), "w") as f:
        json.dump({"rounds": rounds, "two_processes": two, "steps": steps,
                   "load": [load0, load1]}, f, indent=1)


if __name__ == "__main__":
    main()
