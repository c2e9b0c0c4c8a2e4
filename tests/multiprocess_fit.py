"""The fits of ``tests/test_multiprocess.py``, run in every process of
``python -m vijax.launch --processes 2 --devices-per-process 2 tests/multiprocess_fit.py
OUT``, and in the test's own process on a 4-device mesh for the reference.

Each process fits, on a mesh of all the processes' devices, a logistic regression with
device-resident minibatches and the same with a stream (numpy data), with the stopping rule
on; writes what it read back (parameters, losses, steps, the stopping decision) to
``OUT/fits_{process}.npz``; saves the minibatch fit to ``OUT/minibatch.vjx`` in every
process (only process 0 may write it: the calls of the archive writer are counted), loads
it back after ``save`` returns and resumes the fit from it (:func:`resumed`); then saves it
where process 0 cannot write (every process must raise).

``... tests/multiprocess_fit.py OUT bench STEPS`` instead times a minibatch fit chunk by
chunk (:func:`bench`) and writes ``OUT/bench_{process}.json``.

Importing this module runs nothing (pytest imports it for its doctests).
"""

import json
import os
import sys
import time

import numpy as np

N, D = 1000, 5
BATCH = 32  # a multiple of the 4 devices
CHUNK = 100


def problem(n: int = N, d: int = D, seed: int = 0):
    """``(model, data)``: Bayesian logistic regression, ``w ~ N(0, I)``, ``y ~
    Bernoulli(sigmoid(X w))``, on ``n`` simulated rows (float32 numpy, the same in every
    process)."""
    import numpyro.distributions as dist

    import vijax as vj

    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = rng.normal(size=d)
    y = (rng.uniform(size=n) < 1 / (1 + np.exp(-x @ w))).astype(np.float32)
    model = vj.Model(
        log_prior=lambda z: dist.Normal(0, 1).log_prob(z["w"]).sum(),
        log_likelihood=lambda z, dd: dist.Bernoulli(logits=dd["X"] @ z["w"]).log_prob(dd["y"]),
        latents={"w": vj.Latent(shape=(d,))})
    return model, {"X": x, "y": y}


def fits(mesh) -> dict:
    """The two fits on ``mesh``: ``{"minibatch": res, "stream": res}``. The stopping rule
    is on (a short window, so that it stops the fit well before ``steps``)."""
    import jax

    import vijax as vj

    model, data = problem()
    kw = dict(guide="meanfield", steps=3000, chunk_size=CHUNK, batch_size=BATCH,
              precondition=None, progress=False, psis_draws=200, mesh=mesh,
              convergence=vj.Convergence(window=100, patience=2))
    return {"minibatch": vj.fit(model, data, key=jax.random.key(1), **kw),
            "stream": vj.fit(model, data, key=jax.random.key(2), stream=True, **kw)}


def resumed(res, mesh):
    """``res`` (a minibatch fit of :func:`fits`, or its checkpoint) continued for 200 steps
    on ``mesh``, without the stopping rule."""
    import vijax as vj

    model, data = problem()
    return vj.fit(model, data, resume=res, steps=200, chunk_size=CHUNK, progress=False,
                  psis_draws=0, convergence=None, mesh=mesh)


def summary(res) -> dict:
    """What a test compares: flat parameters, losses, steps, the stopping decision."""
    import jax

    out = {f"param{i}": np.asarray(x)
           for i, x in enumerate(jax.tree_util.tree_leaves(res.params))}
    out.update(losses=np.asarray(res.losses), n_steps=res.diagnostics.n_steps,
               converged=res.diagnostics.converged, stop_reason=res.diagnostics.stop_reason,
               k_hat=res.diagnostics.k_hat)
    return out


def _run(out: str) -> None:
    from vijax.launch import initialize

    info = initialize()
    import jax

    import vijax as vj
    from vijax.checkpoint import write

    writes = [0]
    archive = write.write_archive

    def counted(*args, **kwargs):
        writes[0] += 1
        return archive(*args, **kwargs)

    write.write_archive = counted
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    results = fits(mesh)
    path = os.path.join(out, "minibatch.vjx")
    results["minibatch"].save(path)
    wrote = writes[0]
    loaded = vj.load(path, problem()[0])  # after save returned, in every process
    same = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(
        jax.tree_util.tree_leaves(loaded.params),
        jax.tree_util.tree_leaves(results["minibatch"].params), strict=True))
    results["resumed"] = resumed(loaded, mesh)  # every process continues from the file
    try:  # process 0 cannot write here: every process raises
        results["minibatch"].save(os.path.join(out, "no-such-directory", "fit.vjx"))
        failed = "no error"
    except OSError as e:
        failed = f"{type(e).__name__}: {e}"
    record = {f"{name}_{k}": v for name, res in results.items()
              for k, v in summary(res).items()}
    record.update(process=info.process_id, processes=info.num_processes,
                  global_devices=jax.device_count(), local_devices=jax.local_device_count(),
                  archive_writes=wrote, loaded_equal=same, failed_save=failed)
    np.savez(os.path.join(out, f"fits_{info.process_id}.npz"), **record)
    print(f"process {info.process_id} of {info.num_processes}: "
          f"{jax.local_device_count()} of {jax.device_count()} devices; minibatch fit "
          f"{results['minibatch'].diagnostics.n_steps} steps "
          f"({results['minibatch'].diagnostics.stop_reason}), stream fit "
          f"{results['stream'].diagnostics.n_steps} steps; archive writes {wrote}")


def bench(mesh, steps: int, n: int = 10_000, d: int = 20, batch: int = 256,
          chunk: int = 500) -> list[float]:
    """Seconds per chunk of ``chunk`` steps of a minibatched logistic regression (``n`` rows,
    ``d`` features, batches of ``batch``) on ``mesh`` (``None``: one device), after a
    warm-up fit of the same configuration (compiled once: the timed chunks run the cached
    program). Timed by the driver's chunk loop: a chunk's time runs from the return of the
    previous chunk's stopping flag to the return of its own."""
    import jax

    import vijax as vj
    from vijax import driver

    model, data = problem(n, d)
    kw = dict(guide="meanfield", steps=steps, chunk_size=chunk, batch_size=batch,
              precondition=None, progress=False, psis_draws=0, convergence=None, mesh=mesh)
    vj.fit(model, data, key=jax.random.key(0), **kw)  # compile
    times: list[float] = []
    runner = driver.run_chunks

    def timed(run_chunk, *args, **kwargs):
        def one(*a, **k):
            t = time.perf_counter()
            out = run_chunk(*a, **k)
            int(out[0].step)  # the chunk's result is ready
            times.append(time.perf_counter() - t)
            return out
        return runner(one, *args, **kwargs)

    driver.run_chunks = timed
    try:
        vj.fit(model, data, key=jax.random.key(1), **kw)
    finally:
        driver.run_chunks = runner
    return times


def _bench(out: str, steps: int) -> None:
    from vijax.launch import initialize

    info = initialize()
    import jax

    mesh = None if jax.device_count() == 1 else jax.make_mesh((jax.device_count(),),
                                                              ("data",))
    times = bench(mesh, steps)
    with open(os.path.join(out, f"bench_{info.process_id}.json"), "w") as f:
        json.dump({"processes": info.num_processes, "devices": jax.device_count(),
                   "chunk_seconds": times}, f)


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[2] == "bench":
        _bench(sys.argv[1], int(sys.argv[3]))
    else:
        _run(sys.argv[1])
