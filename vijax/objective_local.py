"""The objective of a model with local latents (VAEs, M2, mixtures with per-row assignments).

For global latents ``theta ~ q(theta)`` and, per row i of a batch of B of N rows, local
latents ``z_i ~ q(z_i | x_i)`` (:mod:`vijax.guides.amortized`), the bound estimated is

    kl_w * (log p(theta) + log|J| - log q(theta)) + (N / B) * sum_i row_i,

    row_i = sum_y q(y | x_i) * b_i(y) + H[q(y | x_i)]   (a local discrete latent y, summed
                                                          exactly: enumeration)
    b_i(y) = mean_l log w_il                  (ELBO estimators: reparam, stl)
           = log mean_l w_il                  (IWAE, DReG: L = num_particles local draws)
           = 1/(1-a) log mean_l w_il^(1-a)    (Renyi)
    log w_il = l_i(theta, y, z_il) + log|J(u_il)| - log q(u_il | x_i, y),

``l_i`` the model's per-row ``log_likelihood`` (which includes the local latents' priors). A
row whose ``y`` is observed uses it (no sum, no entropy), plus, with a classifier weight
``alpha``, ``alpha * log q(y_i | x_i)`` (Kingma et al. 2014's auxiliary classifier term).

ELBO estimators average over ``num_particles`` global draws (each with its own local draws);
multi-sample bounds draw ``theta`` once and ``num_particles`` local draws per row: the bound
is then an ELBO over ``theta`` of per-row IWAE bounds, a lower bound on ``log p(x)``.
Gradients: pathwise throughout (``stl``: ``log q`` at stopped guide parameters; ``dreg``:
Tucker et al.'s squared weights for the local guides, and the plain normalised weights for
``theta`` and the model parameters, whose gradient is ``sum_l wbar_l grad log p_l``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from vijax.estimators import DReG, Score, resolve_estimator
from vijax.objective import Objective

__all__ = ["make_local_objective"]

sg = jax.lax.stop_gradient


def _describe(est, factors) -> str:
    names = {"reparam": "reparam", "auto": "reparam", "stl": "stl", "iwae": "iwae",
             "dreg": "dreg", "renyi": f"renyi(alpha={getattr(est, 'alpha', 0)})"}
    parts = ", ".join(f"{f.name}: {f.description}" + (
        (" enumerated" if f.enumerate else " sampled, score function with rloo baseline")
        if f.discrete else "") for f in factors)
    return f"{names[est.name]} (local latents: {parts})"


def make_local_objective(target, guide, factors, estimator="auto", num_particles: int = 1,
                         kl_weighted: bool = False) -> Objective:
    """The loss ``(key, params, (batch, rows), state, (scale, kl_weight))`` of a model with
    local latents; ``guide`` is the global family (unlifted), ``factors`` the local ones
    (:func:`vijax.guides.local.build_local`). Errors name what is not supported."""
    est = resolve_estimator(estimator)
    if isinstance(est, Score):
        raise ValueError("the score-function estimator is not available for local latents: "
                         "continuous ones are reparameterised and discrete ones summed "
                         "exactly; use estimator='reparam', 'stl', 'iwae', 'dreg' or 'renyi'")
    if target.discrete:
        raise ValueError(f"global discrete latents ({list(target.discrete_names)}) together "
                         "with local latents are not supported: marginalise them in the "
                         "model")
    multi = est.multi_sample
    alpha = getattr(est, "alpha", 0.0)
    if kl_weighted and multi:
        raise ValueError(f"kl_weight scales the ELBO's prior-minus-entropy term; the "
                         f"{est.name!r} estimator's multi-sample bound has no such term")
    if target.layers and multi:
        raise ValueError(f"the Bayesian layers ({[b.name for b in target.layers]}) enter the "
                         f"bound through their KL in closed form, which the {est.name!r} "
                         "estimator's multi-sample bound has no place for: use "
                         "estimator='reparam' or 'stl'")
    if kl_weighted and target.dim == 0 and not target.layers:
        raise ValueError("kl_weight weights the global latents' prior-minus-entropy term, and "
                         "this model has no global latents; a local latent's KL lives in the "
                         "per-row log_likelihood (scale its prior there, e.g. a beta-VAE)")
    point = [f.name for f in factors if f.point_mass]
    if point and est.name not in ("reparam", "auto", "stl"):
        raise ValueError(f"local latent(s) {point} have a point-mass (delta) guide, which has "
                         f"no density: estimator {est.name!r} needs one; use 'reparam'")
    sampled = next((f for f in factors if f.discrete and not f.enumerate), None)
    k = max(1, int(num_particles))
    if sampled is not None and multi:
        raise ValueError(f"local discrete latent {sampled.name!r} is sampled (not "
                         f"enumerated): its score-function gradient is defined for the ELBO "
                         f"estimators ('reparam', 'stl'); for a multi-sample bound enumerate "
                         "it or use estimator='rws'")
    if sampled is not None and k < 2:
        raise ValueError(f"local discrete latent {sampled.name!r} is sampled (not "
                         "enumerated) and trained by the score function with a leave-one-out "
                         "baseline over its num_particles draws per row: give "
                         f"num_particles >= 2, got {k}")
    has_mp = bool(target.params)
    # a sampled local discrete latent holds the K draws per row on its own axis
    n_global = 1 if (multi or guide.point_mass or sampled is not None) else k
    n_local = k if multi else 1
    need_stl = est.name in ("stl", "dreg")
    dreg = isinstance(est, DReG)
    disc = next((f for f in factors if f.discrete), None)
    cont = tuple(f for f in factors if not f.discrete)
    layout = target.locals
    dblock = layout.block(disc.name) if disc is not None else None
    cblocks = {f.name: layout.block(f.name) for f in cont}
    no_jac = set(guide.no_jacobian)
    aux_weight = disc.classifier_weight if disc is not None else 0.0
    layers = bool(target.layers)

    def discrete_part(lp, batch, rows, dtype, key):
        """``(weights (E, B), entropy (B,), aux (B,), values (E, B)+shape or None, onehot
        (E, B, width) or None, score)``: ``score`` is ``None`` (enumerated: E values, exact
        weights) or ``(log q (E, B), seen (B,))`` of E = K sampled values per row."""
        b = rows.shape[0]
        if disc is None:
            zero = jnp.zeros((b,), dtype)
            return jnp.ones((1, b), dtype), zero, zero, None, None, None
        s, c = dblock.size, dblock.num_values
        raw = disc.raw(lp[disc.name], batch, rows, None)
        logits = jax.nn.log_softmax(raw.reshape(b, s, c), -1)
        if sampled is not None:
            return sampled_part(logits, batch, b, s, c, dtype, key)
        grid = dblock.index_grid()  # (E, s)
        onehot = jax.nn.one_hot(grid, c, dtype=dtype)  # (E, s, C)
        log_qe = jnp.einsum("bsc,esc->eb", logits, onehot)
        q = jnp.exp(log_qe)
        ent = -jnp.sum(q * log_qe, 0)
        aux = jnp.zeros((b,), dtype)
        weights = q
        if dblock.observed is not None:
            obs = jnp.asarray(batch[dblock.observed]).reshape(b, s).astype(jnp.int32) - \
                dblock.low
            seen = jnp.all((obs >= 0) & (obs < c), -1)
            match = jnp.all(grid[:, None, :] == obs[None], -1).astype(dtype)
            weights = jnp.where(seen[None], match, q)
            ent = jnp.where(seen, 0.0, ent)
            aux = jnp.where(seen, jnp.sum(match * log_qe, 0), 0.0)
        values = jnp.broadcast_to(dblock.values(grid)[:, None], (grid.shape[0], b)
                                  + dblock.shape)
        flat = jnp.broadcast_to(onehot.reshape(grid.shape[0], 1, s * c),
                                (grid.shape[0], b, s * c))
        return weights, ent, aux, values, flat, None

    def sampled_part(logits, batch, b, s, c, dtype, key):
        """K draws ``k_e ~ q(y | x)`` per row (an observed row keeps its value), equal
        weights 1/K; the entropy enters through the draws' ``-log q`` (in ``score``)."""
        ks = jax.random.categorical(key, logits, axis=-1, shape=(k, b, s))  # (E, B, s)
        seen = jnp.zeros((b,), bool)
        aux = jnp.zeros((b,), dtype)
        if dblock.observed is not None:
            obs = jnp.asarray(batch[dblock.observed]).reshape(b, s).astype(jnp.int32) - \
                dblock.low
            seen = jnp.all((obs >= 0) & (obs < c), -1)
            ks = jnp.where(seen[None, :, None], jnp.clip(obs, 0, c - 1)[None], ks)
            log_obs = jnp.sum(jnp.take_along_axis(logits, jnp.clip(obs, 0, c - 1)[..., None],
                                                  -1)[..., 0], -1)
            aux = jnp.where(seen, log_obs, 0.0)
        onehot = jax.nn.one_hot(ks, c, dtype=dtype)  # (E, B, s, C)
        log_qe = jnp.einsum("bsc,ebsc->eb", logits, onehot)
        weights = jnp.full((k, b), 1.0 / k, dtype)
        values = dblock.values(ks.reshape(k, b, s))
        return weights, jnp.zeros((b,), dtype), aux, values, onehot.reshape(k, b, s * c), \
            (log_qe, seen)

    def local_draws(lp, batch, rows, onehot, key, n_e, dtype):
        """Per continuous factor: ``(u (L, E, B, size), log_q, log_q_stl (L, E, B))``."""
        out = {}
        b = rows.shape[0]
        keys = jax.random.split(key, max(len(cont), 1))
        for f, kf in zip(cont, keys, strict=False):
            p = lp[f.name]
            if f.given and onehot is not None:
                raw = jax.vmap(lambda o, p=p, f=f: f.raw(p, batch, rows, o))(onehot)
            else:
                raw = f.raw(p, batch, rows, None)[None]
            raw = jnp.broadcast_to(raw, (n_e,) + raw.shape[1:])
            eps = jax.random.normal(kf, (n_local, n_e, b, f.noise_dim), dtype)
            u, log_q = jax.vmap(jax.vmap(f.draw, (None, 0, 0)), (None, None, 0))(p, raw, eps)
            if need_stl and not f.point_mass:
                lq_stl = jax.vmap(jax.vmap(f.log_prob, (None, 0, 0)), (None, None, 0))(
                    sg(p), sg(raw), u)
            else:
                lq_stl = log_q
            out[f.name] = (u, log_q, lq_stl)
        return out

    def log_lik(z_glob, draws, values, batch):
        """``(L, E, B)`` per-row log likelihood plus local log-Jacobians."""
        names = list(draws)

        def one(us, vals):
            z = dict(z_glob)
            ld = 0.0
            for name, u in zip(names, us, strict=True):
                x, d = cblocks[name].constrain(u)
                z[name] = x
                if not next(f for f in cont if f.name == name).point_mass:
                    ld = ld + d
            if vals is not None:
                z[dblock.name] = vals
            return jnp.asarray(target.log_likelihood(z, batch)) + ld

        us = [draws[n] for n in names]
        if not us and values is None:  # no local latents (Bayesian layers only)
            return jnp.asarray(target.log_likelihood(dict(z_glob), batch))[None, None]
        if not us:  # only a discrete local latent: nothing drawn, one "draw" per value
            return jax.vmap(lambda vals: one((), vals))(values)[None]
        if values is None:
            return jax.vmap(lambda *u: jax.vmap(lambda *v: one(v, None))(*u))(*us)
        return jax.vmap(lambda *u: jax.vmap(lambda vals, *v: one(v, vals))(values, *u))(*us)

    def bound(log_w):
        """Reduce ``(L, E, B)`` over the local draws -> ``(E, B)``."""
        if not multi:
            return jnp.mean(log_w, 0)
        s = 1.0 - alpha
        return (logsumexp(s * log_w, 0) - jnp.log(log_w.shape[0])) / s

    def global_draw(gp, mparams, eps, dtype, k_layers=None):
        theta, log_q = guide.transform(gp, eps)
        if need_stl and not guide.point_mass:
            log_q = guide.log_q(sg(gp), theta)
        # with Bayesian layers: their values (noise from k_layers) and -KL per layer
        z, log_det = target._values(theta, mparams, k_layers)
        glob = jnp.asarray(target.log_prior(z))
        for name, ld in log_det.items():
            if name not in no_jac:
                glob = glob + ld
        return z, glob - log_q

    def particle(eps_g, key, gp, lp, mparams, batch, rows, scale, kl):
        dtype = scale.dtype
        k_disc = k_layers = None
        if sampled is not None:  # (other fits keep the key path of their continuous draws)
            key, k_disc = jax.random.split(key)
        if layers:
            key, k_layers = jax.random.split(key)
        weights, ent, aux, values, onehot, score = discrete_part(lp, batch, rows, dtype,
                                                                 k_disc)
        n_e = weights.shape[0]
        draws = local_draws(lp, batch, rows, onehot, key, n_e, dtype)
        log_q = sum((d[1] for d in draws.values()), jnp.zeros(weights.shape, dtype))
        log_q_stl = sum((d[2] for d in draws.values()), jnp.zeros(weights.shape, dtype))
        us = {n: d[0] for n, d in draws.items()}
        z_glob, glob = global_draw(gp, mparams, eps_g, dtype, k_layers)
        if dreg:
            mp_stop = sg(mparams) if mparams is not None else None
            z_enc, _ = global_draw(sg(gp), mp_stop, eps_g, dtype, k_layers)
            lp_enc = log_lik(sg(z_enc), us, values, batch)
            lp_mod = log_lik(z_glob, {n: sg(u) for n, u in us.items()}, values, batch)
            log_w = sg(lp_mod) - sg(log_q)
            value_e = bound(log_w)
            w = jax.nn.softmax(log_w, 0)
            surr_e = jnp.sum(w**2 * (lp_enc - log_q_stl), 0) + jnp.sum(w * lp_mod, 0)
            per_e = weights * sg(value_e) + sg(weights) * (surr_e - sg(surr_e))
        else:
            lp = log_lik(z_glob, us, values, batch)
            per_e = weights * bound(lp - (log_q_stl if need_stl else log_q))
        row = jnp.sum(per_e, 0) + ent + aux_weight * aux
        if score is not None:  # REINFORCE for the sampled values, leave-one-out baseline
            log_qe, seen = score
            f = sg(per_e * k - log_qe)  # each draw's signal: its bound minus its log q
            base = (jnp.sum(f, 0, keepdims=True) - f) / (k - 1)
            term = jnp.where(seen[None], 0.0,
                             sg(f - base) * (log_qe - sg(log_qe)) - sg(log_qe))
            row = row + jnp.sum(term, 0) / k  # value: the draws' mean of -log q
        g = kl * glob if kl_weighted else glob
        return g + scale * jnp.sum(row)

    def loss(key, params, data, state, weights):
        guide_p, mparams = params if has_mp else (params, None)
        gp, lp = guide_p["global"], guide_p["local"]
        batch, rows = data
        scale, kl = weights
        k_g, k_l = jax.random.split(key)
        eps = jax.random.normal(k_g, (n_global, guide.noise_dim), scale.dtype)
        keys = jax.random.split(k_l, n_global)
        if n_global == 1:
            total = particle(eps[0], keys[0], gp, lp, mparams, batch, rows, scale, kl)
        else:
            total = jnp.mean(jax.vmap(particle, (0, 0) + (None,) * 7)(
                eps, keys, gp, lp, mparams, batch, rows, scale, kl))
        return -total, state

    if multi:
        name = "neg_iwae_bound" if alpha == 0.0 else "neg_renyi_bound"
    else:
        name = "neg_elbo"
    if aux_weight:
        name += "_plus_classifier"
    return Objective(name, loss, lambda dtype: (), _describe(est, factors), needs_rows=True)
