"""The posteriordb registry (``benchmarks.posteriors``): all 16 posteriors load, their vijax and
NumPyro models agree up to a constant, draws map to the reference names and back, and a fit of
an easy posterior scores "accurate" against the reference.

The full validation of the models (Stein identity on all 1,000 reference draws) is
``python -m benchmarks.posteriors.check``; here only cheap checks run, no fits but one.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.infer.util import log_density

import vijax as vj
from benchmarks.posteriors import POSTERIORS, load, score  # benchmarks/: pytest pythonpath
from tests.conftest import precision, raw_fit

NAMES = list(POSTERIORS)
PICK = [0, 500, 999]  # three of the 1,000 reference draws


def _pick(ref: dict, idx) -> dict:
    return {k: v[idx] for k, v in ref.items()}


@pytest.mark.parametrize("name", NAMES)
def test_vijax_and_numpyro_agree_up_to_a_constant(name):
    with precision("float64"):
        post = load(name)
        assert post.data is post.model.data
        assert set(post.heavy) <= set(post.reference)
        ref = _pick(post.reference_draws(), PICK)
        z = {k: jnp.asarray(v) for k, v in post.to_latents(ref).items()}
        assert set(z) == set(post.model.latents)

        # derived inverts to_latents, keyed exactly like reference.json
        back = post.derived({k: np.asarray(v) for k, v in z.items()})
        assert list(back) == list(post.reference)
        for k in post.reference:
            np.testing.assert_allclose(back[k], ref[k], rtol=1e-6, atol=1e-7, err_msg=k)

        # at the three draws and at the reference mean: the vijax log joint is finite, and
        # vijax - NumPyro is one constant (measured spread <= 1e-12 relative in float64 for all
        # 16; the tolerance leaves room for other BLAS orders)
        mean = post.to_latents(post.reference_means())
        points = {k: jnp.concatenate([v, jnp.asarray(mean[k])]) for k, v in z.items()}

        def both(zi):
            theirs, _ = log_density(post.numpyro_model, (post.data,), {}, zi)
            return jnp.stack([post.model.log_density(zi, post.data), theirs])

        mine, theirs = np.asarray(jax.jit(jax.vmap(both))(points)).T
        assert np.all(np.isfinite(mine)), mine
        gaps = mine - theirs
        assert np.ptp(gaps) <= 1e-8 * max(1.0, np.mean(np.abs(mine))), gaps


# one_comp is left out: its RK4 ODE's gradient takes ~5 s to compile, and its model is
# benchmarks.flow_targets', whose float32 fits bench_flows checks draw by draw
@pytest.mark.parametrize("name", [n for n in NAMES if not n.startswith("one_comp")])
def test_float32_target_is_finite_with_finite_gradient(name):
    # float32 is what fits use by default; gp_pois_regr needs its raised float32 jitter here
    post = load(name)
    t = post.model.target
    z = post.to_latents(_pick(post.reference_draws(), PICK))
    thetas = jax.vmap(lambda zi: t.unconstrain(zi, jnp.float32))(z)
    lp, grad = jax.jit(jax.vmap(jax.value_and_grad(t.log_density), (0, None)))(thetas, post.data)
    assert lp.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(lp))) and np.all(np.isfinite(np.asarray(grad))), (
        lp, grad)


def test_reference_draws_score_accurate():
    # draws.npz (1,000 of the 10,000 reference draws) against reference.json: only Monte Carlo
    # error, so every posterior must read "accurate" (measured: max SME 0.077 (sblri), max
    # |log R| 0.059 (mesquite), one_comp quantile error 0.032)
    for name in NAMES:
        post = load(name)
        s = score(post, post.reference_draws())
        assert s["verdict"] == "accurate", (name, s["max_sme"], s["max_abs_log_sd_ratio"])
        assert s["n_draws"] == 1000
        assert s["heavy"] == (("K_m", "V_m") if name.startswith("one_comp") else ())
        assert s["max_q_err"] is None if not s["heavy"] else s["max_q_err"] <= 0.1


def test_score_rejects_wrong_keys_and_flags_a_bad_fit():
    post = load("sblri-blr")
    with pytest.raises(ValueError, match="reference names"):
        score(post, {"beta[1]": np.zeros(10)})
    ref = post.reference_draws()
    shifted = {**ref, "beta[2]": ref["beta[2]"] + 0.5 * post.reference["beta[2]"]["sd"]}
    s = score(post, shifted)
    assert s["verdict"] == "fail"  # SME 0.5 > 0.3
    assert s["parameters"]["beta[2]"]["sme"] == pytest.approx(0.5, abs=0.05)


def test_fullrank_fit_of_nes_is_accurate():
    # nes2000-nes (10-d, near-Gaussian, |corr| up to 0.78, cond(Hessian) ~4e3 unconstrained).
    # Measured (float32, CPU): 30,000 steps, 8 particles, step size 0.01: max SME 0.019-0.027,
    # max |log R| 0.011-0.017 over seeds 0-3 ("accurate"); ~1.3 s after an ~7 s compile.
    # With 20,000 steps seeds 0 and 3 only reach SME 0.26-0.28 ("usable").
    post = load("nes2000-nes")
    res = raw_fit(post.model, post.data, guide="fullrank", steps=30_000, num_particles=8,
                 optimizer=vj.default_optimizer(0.01), convergence=None, psis_draws=0,
                 progress=False, key=jax.random.key(0))
    s = score(post, res.sample(jax.random.key(1), 10_000))
    assert s["max_sme"] <= 0.1 and s["max_abs_log_sd_ratio"] <= 0.1, s
    assert s["verdict"] == "accurate"


# Measured with exactly this call (float32, CPU, seeds 0-2): sblri-blr max SME 19-30, max
# |log R| 3.9-4.3; nes2000-nes max SME 2.9-14, max |log R| 0.8-1.9: all "fail", far from the
# loose bounds below. Both posteriors are near-Gaussian and models are right (a Laplace
# approximation at the exact float64 mode gets every beta within SME 0.03), but Adam at the
# default step size cannot resolve them in 1,500 steps: sblri's posterior sds are ~0.001 in
# unconstrained space (the step is 0.05 / sqrt(1 + t / 1000)), and nes's Hessian has
# condition number ~4e3. 10,000 steps at step size 0.01 or 0.002 still fail (sblri SME 16-150,
# nes 0.56-4); NumPyro's AutoMultivariateNormal (Adam 0.01 or 0.05, 1,500 or 10,000 steps) also
# fails (SME 4-140 on sblri, 0.15-1.1 on nes, |log R| >= 0.13). Kept as a marker of the gap.
@pytest.mark.slow
@pytest.mark.xfail(reason="vj.fit fullrank, 1,500 default steps, does not converge on these "
                          "badly scaled posteriors (measured numbers in the comment)",
                   strict=False)
@pytest.mark.parametrize("name", ["sblri-blr", "nes2000-nes"])
def test_fullrank_default_fit_of_easy_posteriors(name):
    post = load(name)
    res = raw_fit(post.model, post.data, guide="fullrank", steps=1500, progress=False,
                 key=jax.random.key(0))
    s = score(post, res.sample(jax.random.key(1), 10_000))
    assert s["verdict"] == "accurate" or (
        s["max_sme"] <= 0.15 and s["max_abs_log_sd_ratio"] <= 0.15), s
