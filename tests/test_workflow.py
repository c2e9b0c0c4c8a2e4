"""A fit users can trust: stopping rule, non-finite guard, PSIS on every fit, progress, resume."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest

import vijax as vj
from tests.conftest import raw_fit
from vijax.driver import _pipeline

# --- stopping rule ----------------------------------------------------------------------------
Y = jnp.asarray(np.random.default_rng(0).normal(1.0, 2.0, 50))


@vj.model(mu=vj.Latent(), s=vj.Latent(support=dist.constraints.positive))
def NORMAL(z, y):
    return (dist.Normal(0, 10).log_prob(z["mu"]) + dist.HalfNormal(5).log_prob(z["s"])
            + dist.Normal(z["mu"], z["s"]).log_prob(y).sum())


def test_stops_early_on_an_easy_conjugate_problem():
    res = raw_fit(NORMAL, Y, steps=20_000, key=jax.random.key(0))
    d = res.diagnostics
    assert d.converged and d.stop_reason == "converged" and d.max_steps == 20_000
    assert 500 < d.n_steps <= 3000  # never in the first chunk (500 steps)
    assert res.losses.shape == (d.n_steps,) and np.all(np.isfinite(res.losses))
    # the averaged iterate at convergence is as good as a long fixed-length fit
    ref = raw_fit(NORMAL, Y, steps=6000, convergence=None, key=jax.random.key(1)).mean()
    got = res.mean()
    # posterior sd of mu ~ 2 / sqrt(50) = 0.28: agree within 0.15 sd
    assert abs(float(got["mu"] - ref["mu"])) < 0.04
    assert abs(float(got["s"] - ref["s"])) < 0.04


def test_keeps_going_on_a_slow_problem():
    # 20 badly scaled coordinates and a small step size: the loss still falls steadily
    scales = jnp.logspace(-2, 1, 20)
    slow = vj.Model(lambda z, d: dist.Normal(3.0, scales).log_prob(z["x"]).sum(),
                    {"x": vj.Latent((20,))})
    res = raw_fit(slow, steps=3000, optimizer=optax.adam(1e-3), key=jax.random.key(0))
    assert not res.diagnostics.converged and res.diagnostics.n_steps == 3000
    assert res.diagnostics.stop_reason == "max_steps"


def test_never_stops_in_the_first_chunk_and_none_runs_every_step():
    res = raw_fit(NORMAL, Y, steps=5000, chunk_size=2000, key=jax.random.key(0),
                 convergence=vj.Convergence(window=20, patience=1))
    assert res.diagnostics.converged and res.diagnostics.n_steps > 2000
    res = raw_fit(NORMAL, Y, steps=700, convergence=None, key=jax.random.key(0))
    assert res.diagnostics.n_steps == 700 and not res.diagnostics.converged


def test_convergence_validation():
    with pytest.raises(ValueError, match="window must be an int >= 10"):
        vj.Convergence(window=5)
    with pytest.raises(ValueError, match="z must be a finite number > 0"):
        vj.Convergence(z=0)
    with pytest.raises(TypeError, match="convergence must be 'auto', None"):
        raw_fit(NORMAL, Y, convergence="yes")


# --- non-finite guard -------------------------------------------------------------------------
@jax.custom_jvp
def _nan_grad(x, bad):
    """0 with derivative NaN where ``bad`` (else 0): a finite loss with a NaN gradient."""
    return jnp.zeros_like(x)


@_nan_grad.defjvp
def _nan_grad_jvp(primals, tangents):
    x, bad = primals
    return _nan_grad(x, bad), tangents[0] * jnp.where(bad, jnp.nan, 0.0)


def _injectable(z, d):
    """A standard normal whose log density (or gradient) is broken when ``d["mode"]`` says."""
    lp = -0.5 * jnp.sum(z["x"] ** 2)
    lp = jnp.where(d["mode"] == 1, jnp.nan, lp)
    lp = jnp.where(d["mode"] == 2, jnp.inf, lp)
    lp = jnp.where(d["mode"] == 3, -jnp.inf, lp)
    return lp + _nan_grad(z["x"][0], d["mode"] == 4)


INJECT = vj.Model(_injectable, {"x": vj.Latent((2,))})
OK = {"mode": jnp.int32(0)}


def _run(mode_per_step, chunk=1, total=None, limit=100):
    """Run the compiled loop step by step with the data's mode set per step; returns the
    state after each step."""
    spec = vj.guides.resolve_spec("meanfield")
    opt = vj.default_optimizer()
    _, _, runner, start, _ = _pipeline(INJECT.target, spec, 2, opt, chunk, "auto", None)
    state = start(jax.random.key(0), OK, np.zeros(2, np.float32), np.zeros(2, bool))[3]
    total = jnp.int32(len(mode_per_step) if total is None else total)
    states = [state]
    for mode in mode_per_step:
        state, _ = runner(state, {"mode": jnp.int32(mode)}, jax.random.key(1), total,
                          jnp.int32(0), jnp.int32(0), jnp.int32(limit))
        states.append(state)
    return states


def _same(a, b):
    return all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
               zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True))


@pytest.mark.parametrize("mode,label", [(1, "NaN loss"), (2, "+inf loss"), (3, "-inf loss"),
                                        (4, "NaN gradient")])
@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_skipped_step_leaves_state_bitwise_unchanged(mode, label, where):
    modes = [0, 0, 0, 0]
    at = {"first": 0, "middle": 2, "last": 3}[where]
    modes[at] = mode
    states = _run(modes)
    before, after = states[at], states[at + 1]
    assert _same(before.params, after.params), label
    assert _same(before.opt_state, after.opt_state), label
    assert int(after.n_nonfinite) == 1 and int(states[-1].n_nonfinite) == 1
    assert int(after.step) == at + 1  # the skipped step counts as taken
    # the steps around it did update
    assert not _same(states[-1].params, states[0].params)


def test_consecutive_skips_stop_the_loop_at_the_limit():
    states = _run([0, 1, 1, 1, 0, 0], limit=3)
    assert bool(states[4].failed) and int(states[4].n_nonfinite) == 3
    # once failed, nothing changes any more
    assert _same(states[4].params, states[6].params) and int(states[6].step) == 4
    # a run of skips shorter than the limit resets
    states = _run([1, 1, 0, 1, 1, 0], limit=3)
    assert not bool(states[-1].failed) and int(states[-1].n_nonfinite) == 4


def test_error_after_the_limit_names_step_and_latents_and_keeps_the_last_state():
    # finite for x0 < 1.5: the fit starts well and then walks into the bad region
    def broken(z, d):
        return jnp.where(z["x"][0] > 1.5, jnp.nan, -0.5 * jnp.sum((z["x"] - 3.0) ** 2))

    m = vj.Model(broken, {"x": vj.Latent((2,))})
    with pytest.raises(vj.NonFiniteError, match=r"5 consecutive steps were not finite \(last "
                       r"at step \d+\): the loss was nan; the log density was nan at x=.*"
                       r"latent\(s\) \['x'\] alone go back") as info:
        raw_fit(m, steps=3000, key=jax.random.key(0), init={"x": np.zeros(2)},
               max_consecutive_nonfinite=5, psis_draws=0)
    err = info.value
    assert err.latents == ["x"] and err.step >= 4
    res = err.result
    assert res.diagnostics.stop_reason == "failed" and res.diagnostics.n_steps == err.step + 1
    assert all(np.all(np.isfinite(np.asarray(v))) for v in
               jax.tree_util.tree_leaves(res.state.params))
    assert res.losses.shape == (err.step + 1,) and np.all(np.isnan(res.losses[-5:]))


def test_nan_at_every_step_raises_naming_the_latent():
    always = vj.Model(lambda z, d: jnp.nan * z["x"].sum(), {"x": vj.Latent((2,))})
    with pytest.raises(ValueError, match="no initial point"):
        raw_fit(always, steps=10)
    # finite at the initial point only: every draw of q is NaN
    pinned = vj.Model(lambda z, d: jnp.where(z["x"] == 0.5, 0.0, jnp.nan),
                      {"x": vj.Latent()})
    with pytest.raises(vj.NonFiniteError, match=r"every one of the 10 steps was not finite "
                       r".*latent\(s\) \['x'\] alone go back"):
        raw_fit(pinned, steps=10, init={"x": 0.5}, psis_draws=0)


def test_nan_learning_rate_is_caught_and_named():
    with pytest.raises(vj.NonFiniteError, match=r"optimizer produced non-finite parameters "
                       r"for latents \['x'\].*step size"):
        raw_fit(INJECT, OK, steps=10, optimizer=optax.adam(float("nan")), psis_draws=0)


# --- PSIS on every fit --------------------------------------------------------------------------
STD_NORMAL = vj.Model(lambda z, d: dist.Normal(0.0, 1.0).log_prob(z["x"]).sum(),
                      {"x": vj.Latent((5,))})


@pytest.mark.parametrize("scale,low,high", [(0.5, 0.7, 0.9), (0.95, 0.05, 0.2)])
def test_psis_k_hat_of_a_fixed_gaussian_guide(scale, low, high):
    # q = N(0, scale^2 I) on a 5-D standard normal target (the bounds of Pyro's tests, which
    # use 500,000 draws; k-hat of 20,000 draws spreads over 0.71-0.94 across seeds at 0.5)
    res = raw_fit(STD_NORMAL, guide=vj.guides.MeanField(init_scale=scale), steps=1,
                 optimizer=optax.sgd(0.0), init={"x": np.zeros(5)}, psis_draws=200_000,
                 key=jax.random.key(0))
    d = res.diagnostics
    assert low < d.k_hat < high, d.k_hat
    assert d.psis_draws == 200_000 and 1 <= d.ess <= 200_000
    assert d.k_hat_reading == ("unreliable" if scale == 0.5 else "good")


def test_psis_on_a_fit_and_corrected_expectations():
    # (1,000 draws: k-hat of this mean-field q is near 0.7 and its estimate grows with more)
    res = raw_fit(NORMAL, Y, key=jax.random.key(0), psis_draws=1000)
    assert np.isfinite(res.diagnostics.k_hat) and res.diagnostics.k_hat < 0.7
    assert res.diagnostics.k_hat_reading.startswith(("good", "usable"))
    draws, ps = res.psis(jax.random.key(1), 2000, data=Y)
    assert draws["mu"].shape == (2000,) and ps.log_weights.shape == (2000,)
    mean = res.psis_mean(jax.random.key(1), 2000, data=Y)
    plain = res.mean()
    assert abs(mean["mu"] - float(plain["mu"])) < 0.05
    resampled = res.psis_resample(jax.random.key(2), 500, data=Y)
    assert resampled["s"].shape == (500,) and np.all(resampled["s"] > 0)
    delta = raw_fit(NORMAL, Y, guide="delta", steps=200, key=jax.random.key(0))
    assert np.isnan(delta.diagnostics.k_hat)
    assert delta.diagnostics.k_hat_reading.startswith("not applicable")


# --- progress ---------------------------------------------------------------------------------
def test_progress_bar_only_when_asked(capsys):
    raw_fit(NORMAL, Y, steps=600, chunk_size=300, progress=True, convergence=None,
           psis_draws=0)
    err = capsys.readouterr().err
    assert "step" in err and "neg_elbo" in err
    raw_fit(NORMAL, Y, steps=600, chunk_size=300, progress=False, convergence=None,
           psis_draws=0)
    raw_fit(NORMAL, Y, steps=600, chunk_size=300, convergence=None, psis_draws=0)  # no tty
    assert capsys.readouterr().err == ""
    with pytest.raises(TypeError, match="progress must be True, False or None"):
        raw_fit(NORMAL, Y, progress="yes")


# --- resume -----------------------------------------------------------------------------------
def test_resume_equals_an_uninterrupted_fit_bitwise():
    kw = dict(convergence=None, key=jax.random.key(3), psis_draws=0, chunk_size=100)
    full = raw_fit(NORMAL, Y, steps=500, **kw)
    first = raw_fit(NORMAL, Y, steps=300, **kw)
    resumed = raw_fit(NORMAL, Y, steps=200, resume=first, convergence=None, psis_draws=0,
                     chunk_size=100)
    assert _same(resumed.last_params, full.last_params)
    assert _same(resumed.opt_state, full.opt_state)
    np.testing.assert_array_equal(resumed.losses, full.losses)
    assert resumed.diagnostics.n_steps == 500
    with pytest.raises(ValueError, match=r"leave \['guide'\] unset"):
        raw_fit(NORMAL, Y, resume=first, guide="fullrank")
    with pytest.raises(ValueError, match="resume: the fitted result's latents"):
        raw_fit(STD_NORMAL, resume=first)


def test_resume_after_a_non_finite_error():
    def broken(z, d):
        return jnp.where(z["x"][0] > 1.5, jnp.nan, -0.5 * jnp.sum((z["x"] - 3.0) ** 2))

    m = vj.Model(broken, {"x": vj.Latent((2,))})
    with pytest.raises(vj.NonFiniteError) as info:
        raw_fit(m, steps=3000, key=jax.random.key(0), init={"x": np.zeros(2)},
               max_consecutive_nonfinite=5, psis_draws=0)
    res = raw_fit(m, steps=50, resume=info.value.result, max_consecutive_nonfinite=1000,
                 psis_draws=0, convergence=None)
    assert res.diagnostics.n_steps == info.value.step + 1 + 50
