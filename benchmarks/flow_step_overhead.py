"""Where a vijax flow step spends its time: vijax's chunk runner against plain ``lax.scan`` loops
of the *same* objective and optimizer, and against NumPyro's ``svi.update`` scan.

For one target of ``flow_targets.py`` and one vijax flow guide, each timed as a compiled chunk of
``--chunk`` steps (median of ``--repeats``, calls interleaved round robin):

* ``vijax runner``: ``vijax.driver._pipeline``'s chunk runner (step mask, non-finite guard, skip
  branch, tail averaging), as in ``bench_flows``;
* ``vijax runner, flat params``: the same runner with the guide parameters ravelled into one
  vector (``jax.flatten_util.ravel_pytree``), so that optimizer, guard and averaging touch one
  leaf instead of one per network weight;
* ``plain scan``: ``value_and_grad`` of vijax's objective and the same optax update, nothing
  else (the floor of this guide and objective);
* ``gradient only``: ``value_and_grad`` of the objective alone (all gradients kept live);
* ``NumPyro``: ``bench_flows``'s NumPyro chunk (``--numpyro``) for reference.

Run: ``python -m benchmarks.flow_step_overhead [--target funnel] [--guide iaf]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
import types

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

import vijax as vj
from benchmarks.bench_flows import METHODS, make_session
from benchmarks.flow_targets import TARGETS, get_target
from vijax.driver import _pipeline
from vijax.loop import init_state, make_chunk_runner


def _calls(args) -> dict:
    target = get_target(args.target)
    model = target.make_vijax_model()
    data = vj.prepare_data(target.data)
    spec = vj.guides.resolve_spec(args.guide)
    opt = vj.default_optimizer(spec.default_learning_rate)
    n, k = args.chunk, args.particles
    _, objective, runner, start, *_ = _pipeline(model.target, spec, k, opt, n)
    dim = model.target.dim
    state = start(jax.random.key(0), data, jnp.zeros((dim,)), jnp.zeros((dim,), bool))[3]
    key, total, avg_start = jax.random.key(1), jnp.int32(2**30), jnp.int32(0)
    zero, never = jnp.int32(0), jnp.int32(2**30)  # no early stop, no non-finite limit
    grad = jax.value_and_grad(lambda k, p, d: objective.loss(k, p, d, state.est_state)[0],
                              argnums=1)

    flat, unravel = ravel_pytree(state.params)
    flat_objective = objective._replace(
        loss=lambda kk, p, d, st: objective.loss(kk, unravel(p), d, st))
    flat_runner = make_chunk_runner(flat_objective, opt, n)
    flat_state = init_state(flat, opt)

    @jax.jit
    def plain(params, opt_state):
        def body(carry, i):
            p, s = carry
            loss, g = grad(jax.random.fold_in(key, i), p, data)
            updates, s = opt.update(g, s, p)
            return (optax.apply_updates(p, updates), s), loss
        return jax.lax.scan(body, (params, opt_state), jnp.arange(n))

    @jax.jit
    def grad_only(params):
        def body(acc, i):
            loss, g = grad(jax.random.fold_in(key, i), params, data)
            return jax.tree_util.tree_map(jnp.add, acc, g), loss
        return jax.lax.scan(body, jax.tree_util.tree_map(jnp.zeros_like, params),
                            jnp.arange(n))

    bench_args = types.SimpleNamespace(steps=n, particles=k, numpyro_lr=None, chunk=n)
    return {
        "vijax runner": lambda: runner(state, data, key, total, avg_start, zero, never),
        "vijax runner, flat params": lambda: flat_runner(flat_state, data, key, total,
                                                         avg_start, zero, never),
        "plain scan": lambda: plain(state.params, state.opt_state),
        "gradient only": lambda: grad_only(state.params),
        METHODS[args.numpyro].label: make_session(target, args.numpyro, bench_args).chunk(n),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.flow_step_overhead",
                                description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--target", default="funnel", choices=list(TARGETS))
    p.add_argument("--guide", default="iaf", choices=("iaf", "spline", "realnvp"))
    p.add_argument("--numpyro", default="numpyro_iaf",
                   choices=[m for m in METHODS if METHODS[m].tool == "numpyro"])
    p.add_argument("--particles", type=int, default=4)
    p.add_argument("--chunk", type=int, default=500)
    p.add_argument("--repeats", type=int, default=9)
    args = p.parse_args(argv)
    calls = _calls(args)
    for call in calls.values():
        jax.block_until_ready(call())  # compile and warm up
    times: dict[str, list[float]] = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, call in calls.items():
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            times[name].append((time.perf_counter() - t0) / args.chunk * 1e6)
    print(f"{args.target}, vijax guide {args.guide!r}, K = {args.particles}: µs/step "
          f"(median of {args.repeats} chunks of {args.chunk})")
    for name, t in times.items():
        print(f"  {name:28s} {statistics.median(t):8.1f}   (min {min(t):.1f})")


if __name__ == "__main__":
    main()
