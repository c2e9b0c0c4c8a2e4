"""Validate every posterior's models against each other and against the reference draws.

Run ``python -m benchmarks.posteriors.check [NAME ...]`` (float64; 50 s for all 16 on
2 CPU cores). For each posterior, with the 1,000 reference draws of ``draws.npz`` mapped to
the model's latents (``Posterior.to_latents``) and on to the unconstrained ``theta`` of
``model.target`` (``target.unconstrain``):

(a) **vijax = NumPyro up to a constant.** At 20 draws, ``model.log_density(z)`` minus
    NumPyro's ``log_density(numpyro_model, (data,), {}, z)`` (both on constrained values, no
    Jacobians) must be the same number: spread ``max - min <= 1e-4 max(1, mean |log p|)``.
(b) **Stein identity in unconstrained space.** If ``theta ~ p~`` (the target density,
    Jacobians included) then ``E[grad log p~(theta)] = 0``. Per coordinate, the z-score
    ``mean / (sd / sqrt(n))`` of the gradient over the ``n = 1000`` draws must satisfy
    ``|z| < 4``. (The ``model.md`` files report z-scores of 26-66 for wrong variants with
    10,000 draws; with these 1,000, a third of that: see "Power".) Also reported, not a pass
    criterion: the second-order identity ``E[grad log p~ (theta - E theta)^T] = -I`` as the
    largest z-score of ``mean + I`` over its entries, and the round-trip error
    ``|constrain(unconstrain(z)) - z|``.

Derived reported quantities are inverted to the sampled parameters first: non-centred eight
schools ``theta_trans = (theta - mu) / tau``; ``gp_pois_regr`` ``f_tilde = L^-1 f`` (float64;
ill-conditioned, but the float32 rounding of the reference ``f`` moves ``f_tilde`` by at most
0.01, see :func:`benchmarks.posteriors.gp.gp_pois_regr`).

**Power.** With 1,000 draws the first-order identity detects, roughly, a model error that
shifts the posterior by more than 4 / sqrt(1000) = 0.13 sd along the gradient direction.
Deliberately wrong variants, as
measured: an extra ``1 / (1 - alpha1)`` factor in garch11 gives z = 7.5; a rho prior
``Gamma(25, 3)`` instead of ``Gamma(25, 4)`` gives 56 in gp_regr but only 3.9 in
gp_pois_regr, where the gradient in ``log rho`` is genuinely high-variance (its mean square,
4,800, matches ``E[-d^2 log p / d log rho^2]`` = 4,600: the conditional sd of ``log rho`` given
``f_tilde`` is ~0.015 against a marginal 0.12); HMM emission means scaled by 1.02: 49; mixture
sds scaled by 1.05: 58; Half-Cauchy(2.5) instead of (5) on eight-schools tau: 8.7.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from numpyro.infer.util import log_density

from benchmarks.posteriors.base import Posterior
from benchmarks.posteriors.registry import POSTERIORS, load

__all__ = ["latent_draws", "log_density_gap", "stein_z", "check_posterior", "main"]

N_CONST = 20
CONST_RTOL = 1e-4
STEIN_MAX_Z = 4.0


def latent_draws(post: Posterior, ref: dict[str, np.ndarray]
                 ) -> tuple[jax.Array, dict[str, jax.Array], float]:
    """Reference-keyed draws -> unconstrained ``theta`` ``(n, dim)``, the constrained latents
    ``constrain(theta)`` and the largest round-trip error ``|constrain(unconstrain(z)) - z|``."""
    t = post.model.target
    dtype = jnp.result_type(float)
    z = {k: jnp.asarray(v, dtype) for k, v in post.to_latents(ref).items()}
    thetas = jax.vmap(lambda zi: t.unconstrain(zi, dtype))(z)
    back = jax.vmap(t.constrain)(thetas)
    err = max(float(jnp.max(jnp.abs(back[k] - z[k]))) for k in z)
    return thetas, back, err


def log_density_gap(post: Posterior, z: dict[str, jax.Array]
                    ) -> tuple[np.ndarray, np.ndarray]:
    """At constrained draws ``z`` (``{latent: (n, *shape)}``): the vijax log joint minus
    NumPyro's log density, ``(n,)``, and the vijax log joint itself, ``(n,)``."""

    def gap(zi):
        mine = post.model.log_density(zi, post.data)
        theirs, _ = log_density(post.numpyro_model, (post.data,), {}, zi)
        return jnp.stack([mine, theirs])

    both = np.asarray(jax.jit(jax.vmap(gap))(z))
    return both[:, 0] - both[:, 1], both[:, 0]


def stein_z(post: Posterior, thetas: jax.Array) -> tuple[np.ndarray, float, bool]:
    """First-order Stein z-scores ``mean(g) / se(g)`` per coordinate, with ``g`` the gradient
    of the unconstrained target's log density at each draw; the largest second-order z-score
    (``E[g (theta - mean theta)^T] = -I``); and whether every gradient was finite."""
    t = post.model.target
    grads = np.asarray(jax.jit(jax.vmap(jax.grad(lambda th: t.log_density(th, post.data))))(
        thetas))
    finite = bool(np.isfinite(grads).all())
    n = grads.shape[0]
    z1 = grads.mean(0) / (grads.std(0, ddof=1) / math.sqrt(n))
    centred = np.asarray(thetas) - np.asarray(thetas).mean(0)
    outer = grads[:, :, None] * centred[:, None, :] + np.eye(grads.shape[1])  # mean 0
    se = outer.std(0, ddof=1) / math.sqrt(n)
    z2 = float(np.max(np.abs(outer.mean(0)) / np.where(se > 0, se, np.inf)))
    return z1, z2, finite


def check_posterior(name: str) -> dict:
    """Run checks (a) and (b) for one posterior; returns the numbers and ``passed``.

    Meant for float64 (``main`` enables ``jax_enable_x64``); in float32 the 1e-4 tolerance of
    (a) and the gradients of (b) are at the edge of float32 resolution for some posteriors.
    """
    start = time.perf_counter()
    post = load(name)
    ref = post.reference_draws()
    thetas, z, round_trip = latent_draws(post, ref)
    idx = np.linspace(0, thetas.shape[0] - 1, N_CONST).astype(int)
    gap, mine = log_density_gap(post, {k: v[idx] for k, v in z.items()})
    spread = float(gap.max() - gap.min())
    tol = CONST_RTOL * max(1.0, float(np.mean(np.abs(mine))))
    z1, z2, finite = stein_z(post, thetas)
    mean_z = {k: jnp.asarray(v, jnp.result_type(float))[0]
              for k, v in post.to_latents(post.reference_means()).items()}
    at_mean = float(post.model.log_density(mean_z, post.data))
    worst = int(np.argmax(np.abs(z1)))
    passed = (spread <= tol and finite and float(np.max(np.abs(z1))) < STEIN_MAX_Z
              and math.isfinite(at_mean))
    return {"name": name, "dim": int(thetas.shape[1]), "n": int(thetas.shape[0]),
            "const_spread": spread, "const_tol": tol, "stein_max_z": float(np.max(np.abs(z1))),
            "stein_worst": worst, "stein2_max_z": z2, "grads_finite": finite,
            "round_trip": round_trip, "log_joint_at_mean": at_mean, "passed": passed,
            "seconds": time.perf_counter() - start}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("names", nargs="*", help="posteriors to check (default: all 16)")
    args = parser.parse_args(argv)
    jax.config.update("jax_enable_x64", True)  # before any posterior is built
    names = args.names or list(POSTERIORS)
    print("| posterior | dim | (a) spread of vijax - NumPyro (tol) | (b) max abs Stein z "
          "(coord) | 2nd-order max z | round trip | log p at ref. mean | pass | s |")
    print("|---|---|---|---|---|---|---|---|---|")
    rows = []
    for name in names:
        r = check_posterior(name)
        rows.append(r)
        print(f"| {name} | {r['dim']} | {r['const_spread']:.1e} ({r['const_tol']:.0e}) | "
              f"{r['stein_max_z']:.2f} ({r['stein_worst']}) | {r['stein2_max_z']:.1f} | "
              f"{r['round_trip']:.0e} | {r['log_joint_at_mean']:.2f} | "
              f"{'yes' if r['passed'] else 'NO'} | {r['seconds']:.1f} |", flush=True)
    failed = [r["name"] for r in rows if not r["passed"]]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} passed (a: spread <= 1e-4 relative at "
          f"{N_CONST} draws; b: |z| < {STEIN_MAX_Z:g} for every coordinate, n = 1000 draws)")
    if failed:
        print("FAILED:", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
