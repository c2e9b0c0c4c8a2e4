"""Whether a fit can be trusted, judged at its end: non-finite steps and parameters (a loud
:class:`NonFiniteError` naming the step and the latents), the PSIS check of q against the
model, and the warning when a fit did not converge or PSIS reads q as unreliable."""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vijax.convergence import ConvergenceWarning
from vijax.loop import FitState
from vijax.placement import place_replicated
from vijax.psis import psis
from vijax.result import FitResult, _weighted_sampler

__all__ = ["NonFiniteError", "warn_if_untrusted"]


# ---------------------------------------------------------------------------------------------
# non-finite steps and parameters
class NonFiniteError(FloatingPointError):
    """Too many consecutive steps had a non-finite loss, gradient or update.

    Attributes:
        step: the last (skipped) step, 0-based.
        latents: names of the latents whose draws, constrained values or log-density
            gradients were not finite at that step (may be empty: see the message).
        result: a :class:`vijax.FitResult` holding the last finite state (parameters,
            optimizer state, losses so far): nothing is lost, it can be inspected or resumed.
    """

    def __init__(self, message: str, step: int, latents: list[str], result: FitResult):
        super().__init__(message)
        self.step = step
        self.latents = latents
        self.result = result


def _nonfinite_error(target, guide, objective, optimizer, state: FitState, data, k_loop,
                     limit: int, last: FitResult, num_particles: int) -> NonFiniteError:
    """Re-run the last skipped step from the last finite state and say what went wrong."""
    step = int(state.step) - 1
    key = jax.random.fold_in(k_loop, step)

    @jax.jit
    def probe(params, est_state):
        (loss, _), grads = jax.value_and_grad(objective.loss, argnums=1, has_aux=True)(
            key, params, data, est_state)
        updates, _ = optimizer.update(grads, state.opt_state, params)
        new = optax.apply_updates(params, updates)
        # the step's own draws (the objective draws (K, noise_dim) normals from this key)
        eps = jax.random.normal(key, (num_particles, guide.noise_dim),
                                jax.tree_util.tree_leaves(params)[0].dtype)

        gparams, mparams = target.split_params(params)

        def one(e):
            theta, _ = guide.transform(gparams, e)
            lp, g = jax.value_and_grad(target.log_density)(theta, data, guide.no_jacobian,
                                                           mparams)
            return theta, target.constrain(theta), lp, g

        return (loss, grads, new, *jax.vmap(one)(eps))

    loss, grads, new, theta, z, lp, g = probe(state.params, state.est_state)
    theta, g, lp = np.asarray(theta), np.asarray(g), np.asarray(lp)

    def finite(tree) -> bool:
        return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(tree))

    bad = [b.name for b in target.blocks
           if not (np.all(np.isfinite(theta[:, b.offset:b.offset + b.size]))
                   and np.all(np.isfinite(np.asarray(z[b.name])))
                   and np.all(np.isfinite(g[:, b.offset:b.offset + b.size])))]
    if not np.isfinite(float(loss)) or not finite(grads):
        what = (f"the loss was {float(loss)}" if not np.isfinite(float(loss)) else
                "the gradient was not finite")
        if bad:
            where = f"; non-finite values or log-density gradients at latent(s) {bad}"
        elif not np.all(np.isfinite(lp)):
            i = int(np.argmin(np.isfinite(lp)))
            bad = _implicated(target, guide, target.split_params(state.params)[0], theta[i],
                              data, last.init_point, target.split_params(state.params)[1])
            where = (f"; the log density was {lp[i]} at {target.describe(theta[i])}" + (
                f", finite again when latent(s) {bad} alone go back to the guide's centre or "
                "the initial point"
                if bad else ""))
        else:
            where = "; the draws and the log density were finite: check the guide's parameters"
    elif not finite(new):
        if guide.mean is not None:
            loc = np.asarray(guide.mean(target.split_params(new)[0]))
            bad = [b.name for b in target.blocks
                   if not np.all(np.isfinite(loc[b.offset:b.offset + b.size]))]
        what = "the optimizer produced non-finite parameters" + (
            f" for latents {bad}" if bad else "")
        where = " from finite gradients (check its step size)"
    else:
        what, where = "the step was not finite", ""
    head = (f"{limit} consecutive steps were not finite" if limit else
            f"every one of the {step + 1} steps was not finite and nothing was fitted")
    msg = (f"{head} (last at step {step}): {what}{where}. "
           "The error's .result holds the last finite state (vj.fit(..., resume=err.result) "
           "continues from it)")
    return NonFiniteError(msg, step, bad, last)


def _implicated(target, guide, params, theta, data, init_point, mparams=None) -> list[str]:
    """Latents whose block alone, moved back to the guide's centre or else to the initial
    point, makes the log density finite again at ``theta`` (the culprits of a non-finite log
    density)."""
    refs = [np.asarray(init_point)]
    if guide.mean is not None:
        refs.insert(0, np.asarray(guide.mean(params)))
    log_density = jax.jit(lambda t, d, mp: target.log_density(t, d, frozenset(), mp))
    out = []
    for b in target.blocks:
        for ref in refs:
            moved = np.array(theta)
            moved[b.offset:b.offset + b.size] = ref[b.offset:b.offset + b.size]
            if np.isfinite(float(log_density(jnp.asarray(moved), data, mparams))):
                out.append(b.name)
                break
    return out


def _check_finite_params(target, guide, state, steps: int) -> None:
    """Fail loudly, naming the latents, if the fitted parameters are not finite."""
    for label, params in (("last iterate", state.params), ("averaged iterate",
                                                           state.avg_params)):
        if all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(params)):
            continue
        bad = ["(see params)"]
        if guide.mean is not None:
            loc = np.asarray(guide.mean(target.split_params(params)[0]))
            bad = [b.name for b in target.blocks
                   if not np.all(np.isfinite(loc[b.offset:b.offset + b.size]))] or ["(scales)"]
        raise FloatingPointError(
            f"the {label} of the guide parameters is not finite after {steps} steps (latents "
            f"{bad}) although the gradients were finite: the optimizer produced non-finite "
            "updates (check its step size)")


# ---------------------------------------------------------------------------------------------
# the PSIS check and the warning
PSIS_BLOCK_ROWS = 4096  # rows per block of a minibatched fit's full-data PSIS density


@functools.lru_cache(maxsize=32)
def _blocked_sampler(target, guide, n: int):
    """Jitted pieces of a full-data PSIS check done in row blocks: ``draw(key, params,
    mparams) -> (theta (n, full_dim), global (n,) = log prior + log|J| - log q)`` and
    ``local(theta, block, mparams) -> (n,)`` summed log likelihood of one block."""

    def one(key, params, mparams):
        theta, log_q = guide.sample(key, params)
        z, log_det = target._values(theta, mparams)
        glob = jnp.asarray(target.log_prior(z)) + sum(log_det.values(), jnp.zeros((),
                                                                                  theta.dtype))
        return theta, glob - log_q

    def block(theta, rows, mparams):
        def lik(t):
            return jnp.sum(target.log_likelihood(target._values(t, mparams)[0], rows))
        return jax.vmap(lik)(theta)

    draw = jax.jit(lambda key, params, mparams: jax.vmap(one, in_axes=(0, None, None))(
        jax.random.split(key, n), params, mparams))
    return draw, jax.jit(block)


def _blocked_log_weights(target, guide, params, key, n, data, mparams):
    """``(theta (n, dim), log w (n,))`` on the full data, summed over row blocks (device
    arrays sliced, or a host stream's rows gathered and shipped block by block)."""
    draw, block = _blocked_sampler(target, guide, n)
    theta, lw = draw(key, params, mparams)
    host = data if hasattr(data, "gather") else None
    total = host.n if host is not None else int(np.shape(jax.tree_util.tree_leaves(data)[0])[0])
    for lo in range(0, total, PSIS_BLOCK_ROWS):
        hi = min(total, lo + PSIS_BLOCK_ROWS)
        if host is not None:
            rows = host.gather(np.arange(lo, hi))
        else:
            rows = jax.tree_util.tree_map(lambda a, lo=lo, hi=hi: a[lo:hi], data)
        lw = lw + block(theta, rows, mparams)
    return theta[:, :target.dim], lw


PLACED_BUDGET = 1 << 24  # row evaluations per device per call of a sharded PSIS check


@functools.lru_cache(maxsize=32)
def _placed_block(target, placement):
    """Jitted ``(theta (c, full_dim), data split by rows, n_rows, mparams) -> (c,)``: the
    summed log likelihood of each draw over the first ``n_rows`` rows (the rest pad the
    shards), computed where the rows are and reduced across devices."""

    def block(theta, data, n_rows, mparams):
        mask = jnp.arange(jax.tree_util.tree_leaves(data)[0].shape[0]) < n_rows

        def lik(t):
            ll = target.log_likelihood(target._values(t, mparams)[0], data)
            return jnp.sum(jnp.where(mask, ll, 0.0))
        return jax.vmap(lik)(theta)

    return jax.jit(block, out_shardings=placement.replicated)


def _placed_psis_check(target, guide, params, key, n: int, data, n_rows: int, mparams,
                       placement):
    """:func:`_psis_check` of a fit whose data rows are split over a mesh: the draws are
    made once, then their log likelihood is evaluated in chunks of draws (each device
    holding at most ``PLACED_BUDGET`` row evaluations) against the rows where they live."""
    if n == 0 or guide.point_mass:
        return _psis_check(target, guide, params, key, n, data, mparams)
    draw, _ = _blocked_sampler(target, guide, n)
    theta, lw = draw(jax.random.fold_in(key, 0x5151), params, mparams)
    rows_per_device = -(-jax.tree_util.tree_leaves(data)[0].shape[0] // placement.size)
    chunk = int(max(1, min(n, PLACED_BUDGET // max(rows_per_device, 1))))
    block = _placed_block(target, placement)
    theta_np = np.asarray(theta)
    m = place_replicated(mparams, placement)
    count = place_replicated(np.int32(n_rows), placement)
    parts = []
    for lo in range(0, n, chunk):
        piece = theta_np[lo:lo + chunk]
        if piece.shape[0] < chunk:  # one compiled shape for every chunk
            piece = np.concatenate([piece, np.repeat(piece[:1], chunk - piece.shape[0], 0)])
        parts.append(np.asarray(block(place_replicated(piece, placement), data, count,
                                      m))[:min(chunk, n - lo)])
    return _psis_from(target, theta[:, :target.dim], np.asarray(lw) + np.concatenate(parts), n)


def _psis_check(target, guide, params, key, n: int, data, mparams=None,
                blocked: bool = False):
    """``(k_hat, ess, reading, n)`` of PSIS on ``n`` draws of q, or ``None`` when off.

    Where k-hat reads "good" or "usable", the PSIS-corrected means and sds of every
    unconstrained coordinate are compared with q's own (:func:`_psis_shift`): k-hat alone
    called a q with 0.2-0.7 of a funnel's or banana's true sd "usable" (its tail estimate
    misses mass that q never visits), while the correction it implies is large there and
    within Monte Carlo noise of zero for a q that fits. A correction beyond 0.3 sd in a mean
    or 33% in an sd makes the reading "unreliable", beyond 0.1 sd or 10% "usable" (the
    accuracy bands of the benchmarks; both past three standard errors of the correction)."""
    if n == 0:
        return None
    if guide.point_mass:
        return float("nan"), float("nan"), "not applicable (point mass)", 0
    if blocked:  # a minibatched fit: the full data's density, row block by row block
        theta, lw = _blocked_log_weights(target, guide, params, jax.random.fold_in(key, 0x5151),
                                         n, data, mparams)
    else:
        theta, lw = _weighted_sampler(target, guide, n, False)(
            jax.random.fold_in(key, 0x5151), params, data, mparams)
    return _psis_from(target, theta, lw, n)


def _psis_from(target, theta, lw, n: int):
    """The reading of PSIS on draws ``theta (n, dim)`` with log weights ``lw (n,)``."""
    lw = np.asarray(lw, np.float64)
    if not np.any(np.isfinite(lw)):
        return float("inf"), 1.0, "unreliable (no draw has a finite log density)", n
    finite = lw[np.isfinite(lw)]
    if finite.size == lw.size and np.ptp(finite) < 1e-2:
        # weights equal to within 1% (float32 rounding of a large log density makes them
        # unequal in the last digits, and the tail fit then reads k = inf): q is exact
        return float("-inf"), float(n), "good (the importance weights are constant: q is " \
            "exact up to 1%)", n
    res = psis(np.where(np.isfinite(lw), lw, -np.inf))
    reading = res.reading
    if np.isfinite(res.k_hat) and res.k_hat < 0.7 or res.k_hat == -np.inf:
        mean_shift, sd_ratio, se = _psis_shift(np.asarray(theta, np.float64),
                                               res.log_weights)
        log_ratio = abs(np.log(sd_ratio))
        figures = (f"k-hat {res.k_hat:.2f}, but the PSIS-corrected moments differ from q's "
                   f"by {mean_shift:.2f} sd in a mean and a factor {sd_ratio:.2f} in an sd")
        if mean_shift > max(0.3, 3 * se) or log_ratio > max(np.log(1.33), 3 * se):
            reading = f"unreliable ({figures})"
        elif mean_shift > max(0.1, 3 * se) or log_ratio > max(np.log(1.1), 3 * se):
            reading = f"usable ({figures})"
    return float(res.k_hat), float(res.ess), reading, n


def _psis_shift(theta: np.ndarray, log_w: np.ndarray) -> tuple[float, float, float]:
    """Largest PSIS correction of q's moments over the coordinates of ``theta (n, dim)``:
    ``(max |mean_w - mean_q| / sd_q, sd_w / sd_q farthest from 1, standard error)``; the
    standard error of both is about ``1 / sqrt(ess)`` (in sd units / on the log scale)."""
    w = np.exp(log_w - np.max(log_w))
    w = w / w.sum()
    mean_q, sd_q = theta.mean(0), theta.std(0)
    keep = sd_q > 0
    if not np.any(keep):
        return 0.0, 1.0, 0.0
    theta, mean_q, sd_q = theta[:, keep], mean_q[keep], sd_q[keep]
    mean_w = w @ theta
    sd_w = np.sqrt(np.maximum(w @ (theta - mean_w) ** 2, 0.0))
    shift = np.abs(mean_w - mean_q) / sd_q
    log_ratio = np.log(np.maximum(sd_w, 1e-300) / sd_q)
    worst = int(np.argmax(np.abs(log_ratio)))
    ess = 1.0 / float(np.sum(w**2))
    return float(shift.max()), float(np.exp(log_ratio[worst])), 1.0 / np.sqrt(ess)


def warn_if_untrusted(res: FitResult, stacklevel: int = 3) -> None:
    """Warn (:class:`ConvergenceWarning`) when a fit with a stopping rule did not converge or
    its PSIS k-hat says q is unreliable: a result is never wrong without a word."""
    d = res.diagnostics
    problems = []
    if d.stop_reason == "max_steps" and d.criterion and not d.criterion.startswith("no "):
        hint = "pass more steps= or resume=res"
        mb = getattr(res, "feed", None) and res.feed.minibatch
        if mb:
            hint = ("minibatch gradients are noisier than full-batch ones (variance about "
                    "N/B times larger), so certifying the estimate within the rule's "
                    "tolerance takes about 1 + N/B times the steps of a full-batch fit; "
                    "pass more steps=, resume=res, or a looser vj.Convergence(tol=...)")
        problems.append(f"the fit ran its {d.n_steps} steps without converging "
                        f"({d.criterion}); {hint}")
    local = res.target.has_locals
    if d.k_hat_reading.startswith("unreliable") and local:
        problems.append(f"PSIS says the local guide is an unreliable approximation of the "
                        f"rows' posteriors ({d.k_hat_reading}): importance-sampled "
                        "quantities (vj.importance_log_likelihood) need many draws; a "
                        "richer local family (vj.guides.Amortized(family='fullrank' or "
                        "'iaf')), a larger encoder or a multi-sample bound (estimator='iwae' "
                        "or 'dreg') narrows the gap")
    elif d.k_hat_reading.startswith("unreliable"):
        richer = ("no rung of the ladder did better" if d.rung else
                  "guide='auto' tries richer families")
        problems.append(f"PSIS says q is an unreliable approximation of this posterior "
                        f"({d.k_hat_reading}; res.psis_mean() / res.psis_resample() correct "
                        f"expectations and draws; {richer})")
    if d.n_nonfinite_skipped:
        problems.append(f"{d.n_nonfinite_skipped} steps were skipped for a non-finite loss "
                        "or gradient")
    if problems:
        what = d.rung or res.guide.name
        if local:
            what = ", ".join(f"{n}: {s.family}" if hasattr(s, "family") else n
                             for n, s in res.guide_spec.factors)
            if res.target.dim:
                what = f"{res.guide.name}; {what}"
        warnings.warn(ConvergenceWarning(f"vj.fit ({what}): "
                                         + "; ".join(problems)), stacklevel=stacklevel)
