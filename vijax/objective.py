"""Objectives: Monte Carlo estimates of a variational bound and a surrogate whose gradient is
the chosen estimator's, written per draw and vmapped over ``K = num_particles`` draws.

For draws ``theta_k = g(eps_k; params)`` (continuous part reparameterised; discrete part
``k`` drawn by inverse CDF, no pathwise gradient), ``log w_k = log p~(theta_k) -
log q(theta_k)``:

    ELBO      = mean_k log w_k           (mean_k log p~ + H[q] with a closed-form entropy)
    IWAE      = log mean_k w_k
    Renyi_a   = 1/(1-a) log mean_k w_k^(1-a)

The loss is ``-(value + S - stop_gradient(S))``: its value is exactly the (negative) bound
estimate and its gradient is that of the estimator's surrogate ``S`` (:mod:`vijax.estimators`).
Discrete guide parameters get the score-function term ``sum_k stop(f_k - b_k) log q_d(k_k)``
with a baseline ``b_k`` (RLOO, moving average, or VIMCO's leave-one-out bounds).

``loss(key, params, data, state) -> (loss, state)``; ``state`` is the estimator's own loop
state (the moving-average baseline; ``()`` for the others).

**Weighted objectives** (``weighted=True``: minibatches, KL weights) take a fifth argument
``weights = (scale, kl_weight)`` and a factorised target, and estimate

    E_q[scale * sum_i log p(x_i | z) + kl_weight * (log p(z) + log|det J| - log q(z))],

with ``scale = N / B`` for a minibatch of B of N observations (unbiased for the full ELBO
when ``kl_weight = 1``). ``kl_weight != 1`` is defined for the single-sample ELBO
estimators only (reparam, STL, score): multi-sample bounds have no prior-minus-entropy term.

**Model parameters** (``target.params``): ``params = (guide_params, model_params)``; their
gradient is the bound's, ``sum_k wbar_k grad log p(x, z_k; phi)`` (``wbar`` uniform for the
ELBO, normalised importance weights for IWAE/Renyi): the score-function surrogate and DReG's
squared weights act on the guide's parameters only.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from vijax.estimators import DReG, Score, resolve_estimator
from vijax.guides.base import Guide, params_dtype

__all__ = ["Objective", "elbo", "make_objective"]

sg = jax.lax.stop_gradient


class Objective(NamedTuple):
    """A loss to minimise.

    Attributes:
        name: what the loss value is (``"neg_elbo"``, ``"neg_iwae_bound"``, ...).
        loss: ``(key, params, data, state) -> (scalar loss, new state)``.
        init_state: ``dtype -> state``, the estimator's initial loop state.
        estimator: what was chosen, in words (recorded in the result's diagnostics).
        needs_rows: the loss's data is ``(batch, rows)``, the batch's row indices beside it
            (local latents: per-row guide tables).
    """

    name: str
    loss: Callable[[jax.Array, Any, Any, Any], tuple[jax.Array, Any]]
    init_state: Callable[[Any], Any]
    estimator: str
    needs_rows: bool = False


def _rloo(f: jax.Array) -> jax.Array:
    """Leave-one-out mean of the other particles' signals, ``(K,)``."""
    k = f.shape[0]
    return (jnp.sum(f) - f) / (k - 1)


def _loo_bounds(log_w: jax.Array, alpha: float) -> jax.Array:
    """VIMCO: the bound with ``log w_k`` replaced by the mean of the others, per k ``(K,)``."""
    k = log_w.shape[0]
    others = (jnp.sum(log_w) - log_w) / (k - 1)
    swapped = jnp.where(jnp.eye(k, dtype=bool), others[:, None], log_w[None, :])
    return _bound(swapped, alpha, axis=-1)


def _bound(log_w: jax.Array, alpha: float, axis=None) -> jax.Array:
    k = log_w.shape[-1]
    scale = 1.0 - alpha
    return (logsumexp(scale * log_w, axis=axis) - jnp.log(k)) / scale


def _ema_state(dtype):
    return {"mean": jnp.zeros((), dtype), "count": jnp.zeros((), jnp.int32)}


def _ema_baseline(state, decay):
    c = state["count"].astype(state["mean"].dtype)
    # debiased moving average; 0 before the first step (no baseline yet)
    return jnp.where(state["count"] > 0, state["mean"] / (1.0 - decay**c), 0.0)


def _ema_update(state, signal_mean, decay):
    return {"mean": decay * state["mean"] + (1.0 - decay) * sg(signal_mean),
            "count": state["count"] + 1}


def _describe(est, continuous: bool, discrete: tuple[str, ...], discrete_baseline: str
              ) -> str:
    parts = {"reparam": "reparam", "auto": "reparam", "stl": "stl", "iwae": "iwae",
             "dreg": "dreg", "renyi": f"renyi(alpha={getattr(est, 'alpha', 0)})",
             "score": f"score({est.baseline if isinstance(est, Score) else ''})"}
    text = parts[est.name]
    if discrete and not isinstance(est, Score):
        tail = (f"score function with {discrete_baseline} baseline (discrete: "
                f"{', '.join(discrete)})")
        text = f"{text} (continuous) + {tail}" if continuous else tail
    return text


def make_objective(target, guide: Guide, estimator: Any = "auto",
                   num_particles: int = 1, weighted: bool = False,
                   kl_weighted: bool = False) -> Objective:
    """The objective of ``estimator`` for ``guide`` on ``target`` with K particles.

    ``weighted``: the loss takes ``weights = (scale, kl_weight)`` (a factorised target is
    needed); ``kl_weighted``: ``kl_weight`` may differ from 1 (single-sample ELBO
    estimators only).

    Raises ``ValueError`` for combinations that are undefined: a density-free point-mass
    guide (delta) with estimators that need ``log q``; ``rloo``/``vimco`` with ``K < 2``;
    a KL weight with a multi-sample bound.
    """
    est = resolve_estimator(estimator)
    if weighted and not target.factorised:
        raise ValueError("minibatches and KL weights need the factorised form of the model "
                         "(log_prior(z) plus log_likelihood(z, data) -> one value per "
                         "observation), not one log_joint")
    if kl_weighted and est.multi_sample:
        raise ValueError(f"kl_weight scales the ELBO's prior-minus-entropy term; the "
                         f"{est.name!r} estimator's multi-sample bound has no such term: use "
                         "estimator='reparam', 'stl' or 'score' with kl_weight")
    has_mp = bool(target.params)
    k = 1 if guide.point_mass else num_particles
    if guide.point_mass and est.name not in ("reparam", "auto", "stl"):
        raise ValueError(f"guide {guide.name!r} is a point mass (MAP) and has no density: "
                         f"estimator {est.name!r} needs one; use estimator='reparam'")
    if isinstance(est, Score) and est.baseline in ("rloo", "vimco") and k < 2:
        raise ValueError(f"the {est.baseline!r} baseline compares particles and needs "
                         f"num_particles >= 2, got {k}; use Score(baseline='ema') for one")
    discrete = tuple(target.discrete_names)
    has_d = guide.n_discrete > 0
    multi = est.multi_sample
    alpha = getattr(est, "alpha", 0.0)
    score_all = isinstance(est, Score)
    if isinstance(est, Score):
        baseline = est.baseline
        decay = est.decay
    else:
        baseline = ("vimco" if multi else "rloo") if k >= 2 else "ema"
        decay = 0.9
    need_stl = est.name in ("stl", "dreg")
    use_entropy = guide.entropy is not None and est.name in ("reparam", "auto", "score") \
        and not multi
    no_jacobian = guide.no_jacobian
    uses_ema = baseline == "ema" and (score_all or has_d)

    # DReG weights the pathwise term by squared weights: the model parameters' gradient
    # (plain weights) then needs its own evaluation with the draw held fixed
    split_mp = has_mp and isinstance(est, DReG)

    def density(theta, data, mparams, weights):
        if weights is None:
            return target.log_density(theta, data, no_jacobian, mparams)
        glob, local = target.log_density_terms(theta, data, no_jacobian, mparams)
        scale, kl = weights
        return scale * local + (kl * glob if kl_weighted else glob)

    def particle(eps, params, data, weights=None):
        params, mparams = params if has_mp else (params, None)
        theta, log_q = guide.transform(params, eps)
        if score_all:  # the score function: no path through the draw
            theta = sg(theta)
            log_q = guide.log_q(params, theta)
        if split_mp:
            out = {"log_p": density(theta, data, sg(mparams), weights),
                   "log_p_model": density(sg(theta), data, mparams, weights)}
        else:
            out = {"log_p": density(theta, data, mparams, weights)}
        out["log_q"] = log_q
        out["log_qd"] = (guide.discrete_log_q(params, theta) if has_d
                         else jnp.zeros((), theta.dtype))
        if need_stl:
            out["log_q_stl"] = guide.log_q(sg(params), theta)
        return out

    def signals_baseline(f, state):
        """Baselines ``(K,)`` for signals ``f`` and the new estimator state."""
        if baseline == "rloo":
            return _rloo(f), state
        if baseline == "ema":
            return jnp.broadcast_to(_ema_baseline(state, decay), f.shape), \
                _ema_update(state, jnp.mean(f), decay)
        return jnp.zeros_like(f), state

    def loss(key, params, data, state, weights=None):
        gparams = params[0] if has_mp else params
        eps = jax.random.normal(key, (k, guide.noise_dim), params_dtype(gparams))
        if k == 1:
            parts = jax.tree_util.tree_map(lambda x: x[None],
                                           particle(eps[0], params, data, weights))
        else:
            parts = jax.vmap(particle, in_axes=(0, None, None, None))(eps, params, data,
                                                                      weights)
        log_p, log_q, log_qd = parts["log_p"], parts["log_q"], parts["log_qd"]
        # with a KL weight: log q enters the bound as kl * log q; score factors stay log q
        kl = weights[1] if kl_weighted else None

        def w(x):
            return x if kl is None else kl * x

        params = gparams

        if multi:
            log_w = log_p - log_q
            value = _bound(sg(log_w), alpha)
            if isinstance(est, DReG):
                w2 = jax.nn.softmax(sg(log_w)) ** 2
                surrogate = jnp.sum(w2 * (log_p - parts["log_q_stl"]))
            elif score_all:  # Score(baseline="vimco"): everything by the score function
                surrogate = jnp.zeros((), log_p.dtype)
            else:
                surrogate = _bound(log_w, alpha)
            if has_mp and (split_mp or score_all):
                # the model parameters' gradient: sum_k wbar_k grad log p_k (draws fixed)
                lp_m = parts["log_p_model"] if split_mp else log_p
                wbar = jax.nn.softmax((1.0 - alpha) * sg(log_w))
                surrogate = surrogate + jnp.sum(wbar * (lp_m - sg(lp_m)))
            score_logq = log_q if score_all else log_qd
            if score_all or has_d:
                if k >= 2:
                    # VIMCO: per-sample signal L - L_{-k}, minus the weight term that the
                    # pathwise gradient of log w already carries (or, for the score function,
                    # that -d log q / d params stands for)
                    w = jax.nn.softmax((1.0 - alpha) * sg(log_w))
                    signal = value - _loo_bounds(sg(log_w), alpha)
                    coef = signal - w if (score_all or isinstance(est, DReG)) else signal
                    surrogate = surrogate + jnp.sum(sg(coef) * score_logq)
                else:  # K = 1: the bound is the ELBO; moving-average baseline
                    f = sg(log_p - log_q)
                    b, state = signals_baseline(f, state)
                    surrogate = surrogate + jnp.sum(sg(f - b) * score_logq)
                    if isinstance(est, DReG) or score_all:
                        surrogate = surrogate - jnp.sum(score_logq)
        else:
            if score_all:
                f = sg(log_p) if use_entropy else sg(log_p - w(log_q))
                b, state = signals_baseline(f, state)
                surrogate = jnp.mean(sg(f - b) * log_q)
                if has_mp:  # the draws are held fixed: log p's gradient is the model's
                    surrogate = surrogate + jnp.mean(log_p - sg(log_p))
                if use_entropy:
                    h = w(guide.entropy(params))
                    surrogate = surrogate + h
                    value = jnp.mean(sg(log_p)) + sg(h)
                else:
                    value = jnp.mean(sg(log_p - w(log_q)))
            else:
                log_qc = (w(parts["log_q_stl"]) - sg(w(log_qd))) if need_stl \
                    else w(log_q - log_qd)
                h_d = w(guide.discrete_entropy(params)) if has_d \
                    else jnp.zeros((), log_p.dtype)
                if use_entropy:
                    h_c = w(guide.entropy(params)) - h_d
                    cont = jnp.mean(log_p) + h_c
                else:
                    cont = jnp.mean(log_p - log_qc)
                surrogate = cont + h_d
                value = sg(surrogate)
                if has_d:
                    f = sg(log_p)
                    b, state = signals_baseline(f, state)
                    surrogate = surrogate + jnp.mean(sg(f - b) * log_qd)
        return -(value + surrogate - sg(surrogate)), state

    def init_state(dtype):
        return _ema_state(dtype) if uses_ema else ()

    if multi:
        name = "neg_iwae_bound" if alpha == 0.0 else "neg_renyi_bound"
    else:
        name = "neg_log_joint" if guide.point_mass else "neg_elbo"
    return Objective(name, loss, init_state,
                     _describe(est, target.dim > 0, discrete, baseline if has_d else ""))


def elbo(target, guide: Guide, num_particles: int = 1) -> Objective:
    """Reparameterised negative ELBO (``make_objective(..., "reparam", ...)``)."""
    return make_objective(target, guide, "reparam", num_particles)
