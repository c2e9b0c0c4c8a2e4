"""Where vijax's time per step goes against the floor, per speed-suite workload.

``python -m benchmarks.step_overhead [--workloads ...] [--guides ...] [--repeats N]`` compiles
four 500-step chunk programs of the same fit (``optax.adam(1e-2)``, K = 1) and times them
interleaved (round robin, median and minimum of ``repeats`` chunks, µs per step):

* **floor**: ``floor.py``'s hand-written loop (its own guide code);
* **objective**: vijax's objective (``vijax.objective.make_objective``: guide, target,
  estimator) in the floor's bare loop (``value_and_grad`` + update in a ``lax.scan``): what
  the model and guide code cost against the floor's hand-written density and guide;
* **loop**: vijax's chunk runner without a stopping rule (non-finite guard, tail averaging);
* **loop+rule**: the runner as ``vj.fit`` builds it by default, with the stopping rule
  (sized to the parameters; it computes its statistics but cannot stop the run).

objective/floor is the model and guide code's share, loop/objective the loop's. On a shared
machine, ratios within ~10% are noise; the same process times all four side by side.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

__all__ = ["main"]

CHUNK = 500


def _programs(workload: str, guide: str):
    import jax
    import jax.numpy as jnp
    import optax

    import vijax as vj
    from benchmarks.bench_core import _device_data, _rank
    from benchmarks.floor import make_floor
    from benchmarks.workloads import get_workload
    from vijax.driver import _pipeline
    from vijax.guides.resolve import build_guide
    from vijax.objective import make_objective
    from vijax.program import parameter_count

    wl = get_workload(workload)
    data = _device_data(wl, 0)
    target = wl.make_vijax_model().target
    spec = vj.guides.resolve_spec(vj.guides.LowRank(rank=_rank(wl.dim)) if guide == "lowrank"
                                  else guide)
    optimizer = optax.adam(1e-2)
    objective = make_objective(target, build_guide(spec, target), "auto", 1)
    rule = vj.Convergence().sized(*parameter_count(target, spec, "float32"))
    progs = {}

    init, run = make_floor(wl.log_density, wl.dim, guide, _rank(wl.dim), 1, optimizer)
    progs["floor"] = (jax.jit(lambda s, d, k: run(*s, d, k, CHUNK)[:2]), init(jax.random.key(0)),
                      ())

    for name, r in (("loop", None), ("loop+rule", rule)):
        _, _, runner, start, _ = _pipeline(target, spec, 1, optax.adam(1e-2), CHUNK, "auto", r)
        state = start(jax.random.key(0), data, jnp.zeros((target.full_dim,), jnp.float32),
                      jnp.zeros((target.full_dim,), bool))[3]
        # every step active, averaging on, the rule unable to stop the run
        extra = (jnp.int32(2**30), jnp.int32(0), jnp.int32(2**30), jnp.int32(100))
        progs[name] = (lambda s, d, k, runner=runner, extra=extra: runner(s, d, k, *extra)[0],
                       state, ())
    params = progs["loop"][1].params

    @jax.jit
    def bare(s, d, k):
        def step(carry, key):
            p, o = carry
            (_, _), g = jax.value_and_grad(objective.loss, argnums=1, has_aux=True)(
                key, p, d, ())
            u, o = optimizer.update(g, o, p)
            return (optax.apply_updates(p, u), o), None

        return jax.lax.scan(step, s, jax.random.split(k, CHUNK))[0]

    progs["objective"] = (bare, (params, optimizer.init(params)), ())
    return data, {k: progs[k] for k in ("floor", "objective", "loop", "loop+rule")}


def measure(workload: str, guide: str, repeats: int) -> dict[str, dict[str, float]]:
    import jax

    data, progs = _programs(workload, guide)
    states = {}
    for name, (fn, state, _) in progs.items():
        states[name] = jax.block_until_ready(fn(state, data, jax.random.key(1)))  # compile
    times: dict[str, list[float]] = {name: [] for name in progs}
    for i in range(repeats):
        for name, (fn, _, _) in progs.items():
            t0 = time.perf_counter()
            states[name] = jax.block_until_ready(fn(states[name], data, jax.random.key(i)))
            times[name].append((time.perf_counter() - t0) / CHUNK * 1e6)
    return {name: {"median": statistics.median(t), "min": min(t)} for name, t in times.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.step_overhead", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workloads", nargs="+", default=["logistic", "eight_schools",
                                                        "hier_linreg"])
    p.add_argument("--guides", nargs="+", default=["meanfield", "lowrank", "fullrank"],
                   choices=("meanfield", "lowrank", "fullrank"))
    p.add_argument("--repeats", type=int, default=15)
    args = p.parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    print(f"load average {os.getloadavg()[0]:.1f}; µs/step, median (min) of {args.repeats} "
          f"interleaved {CHUNK}-step chunks; ratios of medians", file=sys.stderr)
    print("| workload | guide | floor | objective | loop | loop+rule | objective/floor | "
          "loop/objective | loop+rule/floor |")
    print("|---|---|--:|--:|--:|--:|--:|--:|--:|")
    for w in args.workloads:
        for g in args.guides:
            r = measure(w, g, args.repeats)
            m = {k: v["median"] for k, v in r.items()}
            cells = " | ".join(f"{r[k]['median']:.1f} ({r[k]['min']:.1f})" for k in r)
            print(f"| {w} | {g} | {cells} | {m['objective'] / m['floor']:.2f} | "
                  f"{m['loop'] / m['objective']:.2f} | {m['loop+rule'] / m['floor']:.2f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
