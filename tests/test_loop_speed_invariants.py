"""The compiled loop's layout does not change what a fit computes: a chunk is a scan over groups
of at most 64 steps (padded with inactive steps), its keys are computed up front, and inside a
chunk the stopping rule's block ends move nothing (slots by block parity, sums restarted at
the next block's first step). Run step by step (a chunk of one step converts the rule's state
back at every step) or in chunks of any length, a fit takes the same decisions and reaches
the same state (up to float rounding: different chunk lengths are different programs)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest

import vijax as vj
from vijax.convergence import enter_chunk, leave_chunk
from vijax.driver import _pipeline

Y = jnp.asarray(np.random.default_rng(0).normal(1.0, 2.0, 50))


@vj.model(mu=vj.Latent(), s=vj.Latent(support=dist.constraints.positive))
def NORMAL(z, y):
    return (dist.Normal(0, 10).log_prob(z["mu"]) + dist.HalfNormal(5).log_prob(z["s"])
            + dist.Normal(z["mu"], z["s"]).log_prob(y).sum())


def _flaky(z, y):
    """NORMAL with a NaN log density on about 5% of the draws (steps skipped mid-block)."""
    lp = NORMAL.log_joint(z, y)
    return jnp.where(jnp.sin(1000.0 * z["mu"]) > 0.95, jnp.nan, lp)


FLAKY = vj.Model(_flaky, {"mu": vj.Latent(), "s": vj.Latent(support=dist.constraints.positive)})
RULE = vj.Convergence(window=10, patience=2)
STOPS = vj.Convergence(window=20, patience=2, tol=0.5)  # stops these fits within 600 steps


def _run(model, chunk, total, rule=RULE):
    """The loop state after ``total`` steps in chunks of ``chunk`` (the first-chunk guard off,
    so the rule may stop a fit in any chunk), and the losses."""
    spec = vj.guides.resolve_spec("meanfield")
    _, _, runner, start, _ = _pipeline(model.target, spec, 1, optax.adam(0.05), chunk, "auto",
                                       rule)
    state = start(jax.random.key(0), Y, np.zeros(2, np.float32), np.zeros(2, bool))[3]
    losses = []
    while int(state.step) < total and not bool(vj.loop.stopped(state)):
        state, chunk_losses = runner(state, Y, jax.random.key(1), jnp.int32(total),
                                     jnp.int32(total // 2), jnp.int32(0), jnp.int32(100))
        assert chunk_losses.shape == (chunk,)
        losses.append(np.asarray(chunk_losses))
    losses = np.concatenate(losses)
    return state, losses[~np.isnan(losses)]


def _close(a, b):
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b), strict=True):
        # float32 rounding of different programs (FMA contraction follows fusion), 300 steps
        np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model", [NORMAL, pytest.param(FLAKY, marks=pytest.mark.slow)],
                         ids=["normal", "nan-draws"])
# 1 group, 3 of 44 (+2 padding), 3 of 50; the default suite keeps the padded case (130), the
# others run under the slow marker (each case compiles two programs)
@pytest.mark.parametrize("chunk", [pytest.param(37, marks=pytest.mark.slow), 130,
                                   pytest.param(150, marks=pytest.mark.slow)])
@pytest.mark.parametrize("rule", [RULE, STOPS], ids=["runs", "stops"])
def test_chunk_length_changes_no_decision(model, chunk, rule):
    ref, ref_losses = _run(model, 1, 600, rule)
    got, losses = _run(model, chunk, 600, rule)
    assert bool(got.conv.converged) or rule is not STOPS  # the stop itself is compared
    for field in ("step", "n_nonfinite", "n_consecutive", "failed"):
        assert int(getattr(got, field)) == int(getattr(ref, field)), field
    for field in ("n_blocks", "streak", "converged", "in_block", "count", "has_prev",
                  "prev_count"):
        assert int(getattr(got.conv, field)) == int(getattr(ref.conv, field)), field
    assert losses.shape == ref_losses.shape
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-4)
    _close((got.params, got.opt_state, got.avg_params), (ref.params, ref.opt_state,
                                                          ref.avg_params))
    _close(got.conv, ref.conv)


def test_padding_steps_and_steps_past_the_budget_change_nothing():
    state, losses = _run(NORMAL, 130, 130, rule=None)  # 3 groups of 44: 2 padding steps
    assert int(state.step) == 130 and losses.shape == (130,) and np.all(np.isfinite(losses))
    state, losses = _run(NORMAL, 130, 100, rule=None)  # 30 steps past the budget
    assert int(state.step) == 100 and losses.shape == (100,)


def test_a_chunk_ending_on_a_block_end_leaves_the_canonical_state():
    state, _ = _run(NORMAL, 20, 20)  # two blocks of 10, the chunk ends on the second's end
    c = state.conv
    assert int(c.n_blocks) == 2 and int(c.in_block) == 0 and int(c.count) == 0
    assert float(c.total) == 0.0 and float(c.total_sq) == 0.0
    for x in jax.tree_util.tree_leaves((c.g_sum, c.g_sq)):
        assert not np.any(np.asarray(x))
    # the last complete block's average is the running one, which restarts at the next step
    for a, b in zip(jax.tree_util.tree_leaves(c.last_avg), jax.tree_util.tree_leaves(
            c.block_avg), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("steps", [25, 35])  # an even and an odd number of complete blocks
def test_entering_and_leaving_a_chunk_are_inverse(steps):
    state, _ = _run(NORMAL, steps, steps)
    c = state.conv
    assert int(c.in_block) == 5  # mid-block: nothing to restart
    back = leave_chunk(enter_chunk(c), RULE)
    for a, b in zip(jax.tree_util.tree_leaves(c), jax.tree_util.tree_leaves(back), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    # in the chunk layout the slots are the blocks' parities: the odd slot holds block 1, 3..
    inside = enter_chunk(c)
    odd_last = (int(c.n_blocks) - 1) % 2 == 1
    slot = inside.prev_avg if odd_last else inside.last_avg
    for a, b in zip(jax.tree_util.tree_leaves(slot), jax.tree_util.tree_leaves(c.last_avg),
                    strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
