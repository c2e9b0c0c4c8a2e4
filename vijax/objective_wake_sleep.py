"""Wake-sleep objectives for models with local latents and model parameters (Helmholtz
machines): classic wake-sleep (Hinton et al. 1995) and reweighted wake-sleep (RWS,
Bornschein & Bengio 2015).

For a batch of B of N rows, model parameters ``theta`` (:class:`vijax.Param`) and per row
``K = num_particles`` draws ``z_ik ~ q(z | x_i)`` with no gradient through the draw (a
discrete latent is sampled from its logits, a continuous one drawn and stopped),

    log w_ik = l_i(theta, z_ik) + log|J(u_ik)| - log q(u_ik | x_i),

``l_i`` the model's per-row ``log_likelihood`` (local priors included). The loss is
``-(value + S - stop_gradient(S))``: its value is the negative bound, its gradient the
surrogate ``S``'s:

    RWS         value = log p(theta) + (N / B) sum_i log mean_k w_ik      (IWAE bound)
                S     = log p(theta) + (N / B) sum_i sum_k wbar_ik (l_i(theta, z_ik)
                                                                 + log q(z_ik | x_i))
    wake-sleep  value = log p(theta) + (N / B) sum_i mean_k log w_ik      (ELBO)
                S     = log p(theta) + (N / B) sum_i mean_k l_i(theta, z_ik)          (wake)
                        + (N / B) sum_j log q(z'_j | x'_j),  (z', x') ~ p(z, x; theta)  (sleep)

with ``wbar_i = softmax_k(stop_gradient(log w_ik))``. Because the draws are stopped, the
model's parameters see only ``l_i`` (RWS: the IWAE bound's own gradient for them) and the
guide's only ``log q`` (RWS's wake-phi update; wake-sleep's sleep update on B dreams drawn by
the user's ``sample``). ``log p(theta)`` is the model's ``log_prior`` at the parameters
(models with global latents are refused). Continuous local latents use the same draws as the
IWAE objective of :mod:`vijax.objective_local` for the same key.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from vijax.estimators import RWS, WakeSleep, resolve_estimator
from vijax.guides.amortized import LocalTable
from vijax.objective import Objective

__all__ = ["make_wake_sleep_objective", "is_wake_sleep"]

sg = jax.lax.stop_gradient


def is_wake_sleep(estimator) -> bool:
    """Whether ``estimator`` (resolved) is built here rather than by the local objective."""
    return isinstance(estimator, RWS | WakeSleep)


def _refuse(target, factors, specs, est, num_particles, kl_weighted) -> None:
    what = "reweighted wake-sleep (RWS)" if isinstance(est, RWS) else "wake-sleep"
    if isinstance(est, RWS) and num_particles < 2:
        raise ValueError(f"{what} weights K = num_particles draws per row by their normalised "
                         f"importance weights; K = {num_particles} gives every draw weight 1 "
                         "(no reweighting): use num_particles >= 2 (e.g. 5)")
    if target.dim or target.discrete:
        names = list(target.names) + list(target.discrete_names)
        raise ValueError(f"{what} is implemented for local latents and model parameters "
                         f"(vj.Param) only; this model has global latents {names}: declare "
                         "them vj.Param (point estimates) or use estimator='iwae'/'reparam'")
    if kl_weighted:
        raise ValueError(f"kl_weight weights the ELBO's prior-minus-entropy term; {what} "
                         "optimises no such term: drop kl_weight")
    point = [f.name for f in factors if f.point_mass]
    if point:
        raise ValueError(f"local latent(s) {point} have a point-mass (delta) guide, which has "
                         f"no density: {what} trains log q; use family 'meanfield'")
    observed = [b.name for b in target.locals.discrete if b.observed is not None]
    if observed:
        raise ValueError(f"local latent(s) {observed} are partly observed; {what} does not "
                         "support observed local latents: use estimator='iwae' or 'reparam'")
    tables = [name for name, s in specs if isinstance(s, LocalTable)]
    if tables and isinstance(est, WakeSleep):
        raise ValueError(f"local latent(s) {tables} have a LocalTable guide (one row of "
                         "parameters per observation); wake-sleep trains the guide on "
                         "dreamed rows, which have no table entry: use vj.guides.Amortized "
                         "or estimator='rws'")


def _check_dreams(z, x, n, layout, row) -> None:
    """Errors naming what ``sample`` returned wrong: ``z`` a dict of ``(n,) + shape`` per
    local latent, ``x`` the real batch's pytree with ``n`` rows (``row``: its signature)."""
    where = "WakeSleep sample(key, params, batch_size)"
    if not isinstance(z, dict):
        raise ValueError(f"{where} must return (local latents, data batch) with the latents a "
                         f"dict {{name: (batch_size,) + shape}}, got {type(z).__name__}")
    missing = [b.name for b in layout.blocks if b.name not in z]
    extra = [k for k in z if k not in layout.names]
    if missing or extra:
        raise ValueError(f"{where} returned latents {sorted(z)}; the model's local latents "
                         f"are {list(layout.names)} (missing {missing}, unknown {extra})")
    for b in layout.blocks:
        shape = tuple(np.shape(z[b.name]))
        if shape != (n,) + b.shape:
            raise ValueError(f"{where} returned local latent {b.name!r} of shape {shape} for "
                             f"batch_size={n}; expected {(n,) + b.shape} (batch_size, then "
                             f"its declared shape {b.shape})")
        floating = jnp.issubdtype(jnp.result_type(z[b.name]), jnp.floating)
        if b.discrete and floating:
            raise ValueError(f"{where} returned discrete local latent {b.name!r} as floats; "
                             "return integer (or bool) values")
    treedef, leaves = row
    got, got_def = jax.tree_util.tree_flatten(x)
    if got_def != treedef:
        raise ValueError(f"{where} returned a data batch of structure {got_def}; the real "
                         f"data's is {treedef}")
    paths = [jax.tree_util.keystr(p) or "data" for p, _ in
             jax.tree_util.tree_flatten_with_path(x)[0]]
    for path, leaf, (shape, _) in zip(paths, got, leaves, strict=True):
        if tuple(np.shape(leaf)) != (n,) + tuple(shape):
            raise ValueError(f"{where} returned data {path} of shape {tuple(np.shape(leaf))} "
                             f"for batch_size={n}; the real data's rows give "
                             f"{(n,) + tuple(shape)}")


def make_wake_sleep_objective(target, guide, factors, estimator, num_particles: int, *,
                              specs=(), row=None, batch_size: int = 2,
                              kl_weighted: bool = False) -> Objective:
    """The loss ``(key, params, (batch, rows), state, (scale, kl_weight)) -> (loss, state)``
    of :class:`vijax.estimators.RWS` or :class:`vijax.estimators.WakeSleep` (the module
    docstring has the maths); arguments as :func:`vijax.objective_local.make_local_objective`,
    plus ``specs`` (the local factors' specs), ``row`` (the data's row signature,
    :func:`vijax.guides.local.row_signature`) and ``batch_size`` (rows per step) against
    which a wake-sleep ``sample`` is checked by tracing. Errors name what is not supported.

    Example:
        >>> import vijax as vj
        >>> from vijax.objective_wake_sleep import is_wake_sleep
        >>> is_wake_sleep(vj.estimators.RWS()), is_wake_sleep(vj.estimators.IWAE())
        (True, False)
    """
    est = resolve_estimator(estimator)
    if not is_wake_sleep(est):
        raise ValueError(f"make_wake_sleep_objective builds RWS and WakeSleep, got {est!r}")
    k = int(num_particles)
    _refuse(target, factors, specs, est, k, kl_weighted)
    rws = isinstance(est, RWS)
    has_mp = bool(target.params)
    layout = target.locals
    disc = next((f for f in factors if f.discrete), None)
    cont = tuple(f for f in factors if not f.discrete)
    dblock = layout.block(disc.name) if disc is not None else None
    cblocks = {f.name: layout.block(f.name) for f in cont}
    del guide  # no global latents: the lifted global family holds nothing to train

    if not rws:
        if row is None:
            raise ValueError("WakeSleep needs the data's row signature to check its sampler")
        _validate_sampler(est.sample, target, layout, row, int(batch_size))

    def model_values(mparams, dtype):
        """The model's constrained parameters (and ``log p(theta)``)."""
        z, _ = target._values(jnp.zeros((0,), dtype), mparams)
        return z, jnp.asarray(target.log_prior(z), dtype)

    def onehot_of(kidx, dtype):
        return jax.nn.one_hot(kidx, dblock.num_values, dtype=dtype).reshape(
            kidx.shape[:-1] + (dblock.size * dblock.num_values,))

    def discrete_logits(lp, batch, rows):
        b = rows.shape[0]
        raw = disc.raw(lp[disc.name], batch, rows, None)
        return jax.nn.log_softmax(raw.reshape(b, dblock.size, dblock.num_values), -1)

    def draws(key, lp, batch, rows, dtype):
        """``K`` draws per row from q: ``(values {name: (K, B) + shape}, log|J| (K, B),
        log_q (K, B) as drawn, log_q (K, B) at the stopped draws)``; only the last carries
        a gradient (for the guide)."""
        b = rows.shape[0]
        values, log_det = {}, jnp.zeros((k, b), dtype)
        log_q = jnp.zeros((k, b), dtype)
        log_q_at = jnp.zeros((k, b), dtype)
        onehot = None
        k_disc = jax.random.fold_in(key, 1)  # the continuous draws use ``key`` as IWAE does
        if disc is not None:
            logits = discrete_logits(lp, batch, rows)  # (B, s, C)
            kidx = jax.random.categorical(k_disc, sg(logits), -1, (k,) + logits.shape[:-1])
            lq = jnp.sum(jnp.take_along_axis(logits[None], kidx[..., None], -1)[..., 0], -1)
            log_q, log_q_at = log_q + sg(lq), log_q_at + lq
            values[disc.name] = dblock.values(kidx)
            onehot = onehot_of(kidx, dtype)  # (K, B, s C)
        keys = jax.random.split(key, max(len(cont), 1))
        for f, kf in zip(cont, keys, strict=False):
            p = lp[f.name]
            if f.given and onehot is not None:
                raw = jax.vmap(lambda o, p=p, f=f: f.raw(p, batch, rows, o))(onehot)
            else:
                raw = f.raw(p, batch, rows, None)[None]
                raw = jnp.broadcast_to(raw, (k,) + raw.shape[1:])
            # (K, 1, B, d): the local objective's noise layout, so that the draws coincide
            eps = jax.random.normal(kf, (k, 1, b, f.noise_dim), dtype)[:, 0]
            u, lq = jax.vmap(f.draw, (None, 0, 0))(p, raw, eps)
            u = sg(u)
            x, ld = cblocks[f.name].constrain(u)
            values[f.name] = x
            log_det = log_det + ld
            log_q = log_q + sg(lq)
            log_q_at = log_q_at + jax.vmap(f.log_prob, (None, 0, 0))(p, raw, u)
        return values, log_det, log_q, log_q_at

    def log_lik(z_model, values, batch):
        """``(K, B)`` per-row log likelihood at each draw's local values."""
        return jax.vmap(lambda v: jnp.asarray(target.log_likelihood({**z_model, **v},
                                                                      batch)))(values)

    def sleep_log_q(key, z_model, lp, batch, rows, dtype):
        """``(B,)``: ``log q(z' | x')`` of ``B`` rows dreamed by the model's ``sample``."""
        b = rows.shape[0]
        z_dream, x_dream = est.sample(key, sg(z_model), b)
        _check_dreams(z_dream, x_dream, b, layout, row)
        x_dream = jax.tree_util.tree_map(lambda d, r: sg(jnp.asarray(d).astype(r.dtype)),
                                         x_dream, batch)
        total = jnp.zeros((b,), dtype)
        onehot = None
        if disc is not None:
            kidx = (jnp.asarray(z_dream[disc.name]).astype(jnp.int32) - dblock.low).reshape(
                b, dblock.size)
            logits = discrete_logits(lp, x_dream, rows)
            total = total + jnp.sum(jnp.take_along_axis(logits, kidx[..., None], -1)[..., 0],
                                    -1)
            onehot = onehot_of(kidx, dtype)
        for f in cont:
            p = lp[f.name]
            blk = cblocks[f.name]
            u = blk.transform.inv(sg(jnp.asarray(z_dream[f.name], dtype)))
            u = u.reshape(b, blk.size)
            raw = f.raw(p, x_dream, rows, onehot if f.given else None)
            total = total + f.log_prob(p, raw, u)
        return total

    def loss(key, params, data, state, weights):
        guide_p, mparams = params if has_mp else (params, None)
        lp = guide_p["local"]
        batch, rows = data
        scale, _ = weights
        dtype = scale.dtype
        # the IWAE objective's key path for the local draws (one global particle)
        k_l = jax.random.split(key)[1]
        k_draw = jax.random.split(k_l, 1)[0]
        z_model, log_prior = model_values(mparams, dtype)
        values, log_det, log_q, log_q_at = draws(k_draw, lp, batch, rows, dtype)
        lik = log_lik(z_model, values, batch)  # (K, B), gradient for the model only
        log_w = sg(lik) + log_det - log_q
        if rws:
            value = logsumexp(log_w, 0) - jnp.log(k)
            wbar = jax.nn.softmax(log_w, 0)
            surr = jnp.sum(wbar * (lik + log_q_at), 0)
        else:
            value = jnp.mean(log_w, 0)
            surr = jnp.mean(lik, 0)
        surr = log_prior + scale * jnp.sum(surr)
        if not rws:
            k_sleep = jax.random.fold_in(key, 2)
            surr = surr + scale * jnp.sum(sleep_log_q(k_sleep, z_model, lp, batch, rows,
                                                      dtype))
        total = sg(log_prior) + scale * jnp.sum(value)
        return -(total + surr - sg(surr)), state

    parts = ", ".join(f"{f.name}: {f.description} sampled" for f in factors)
    desc = (f"rws (K={k}" if rws else f"wake_sleep (K={k}, sleep on dreams") + \
        f"; local latents: {parts})"
    name = "neg_iwae_bound" if rws else "neg_elbo"
    return Objective(name, loss, lambda dtype: (), desc, needs_rows=True)


def _validate_sampler(sample, target, layout, row, n: int) -> None:
    """Trace ``sample(key, params, n)`` on abstract values (nothing runs); errors say what
    it returned wrong or how it failed."""
    dtype = np.dtype(next((d for _, d in row[1] if np.issubdtype(np.dtype(d), np.floating)),
                          "float32"))
    params = jax.eval_shape(lambda: target.constrain_params(None, dtype))
    try:
        out = jax.eval_shape(lambda key, p: sample(key, p, n), jax.random.key(0), params)
    except Exception as e:  # the user's function: say where it failed, keep the cause
        raise ValueError(f"WakeSleep sample(key, params, batch_size={n}) failed when traced "
                         f"with params {jax.tree_util.tree_map(lambda a: a.shape, params)}: "
                         f"{type(e).__name__}: {e}") from e
    if not (isinstance(out, tuple | list) and len(out) == 2):
        raise ValueError("WakeSleep sample(key, params, batch_size) must return a pair "
                         f"(local latents dict, data batch), got {out!r}")
    _check_dreams(out[0], out[1], n, layout, row)
