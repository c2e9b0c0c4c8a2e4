"""Per-row importance weights of a fitted model with local latents.

For row i, with the global latents at ``theta`` (the guide's mean) and the model parameters
at their fitted values, draws ``z_ik ~ q(z | x_i, y)`` of the continuous local latents give

    log w_ik(y) = l_i(theta, y, z_ik) + log|J(u_ik)| - log q(u_ik | x_i, y),

``log p(x_i | theta) ~= log sum_y (1/K) sum_k w_ik(y)`` (the local discrete latent ``y``
summed exactly; an observed ``y`` alone), the importance-sampled log-likelihood used to
evaluate VAEs (Burda et al. 2016, Appendix; K = 5,000 in the literature), a stochastic lower
bound whose bias vanishes as K grows. PSIS on the ``K`` weights of a row (Yao et al. 2018)
says how well ``q(z | x_i)`` covers the row's posterior.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import logsumexp

from vijax.guides.local import build_local, example_row
from vijax.guides.resolve import build_guide
from vijax.locals import MAX_ENUMERATION
from vijax.psis import psis

__all__ = ["row_log_weights", "row_check"]


@functools.lru_cache(maxsize=32)
def _compiled(target, spec, num_samples: int):
    """Jitted ``(key, params, mparams, batch, rows) -> (log_w (E, K, B), mask (E, B))``
    (cached per model, guide and K: every block of rows reuses it)."""
    guide = build_guide(spec.global_spec, target)
    factors = build_local(spec, target, example_row(spec.row))
    layout = target.locals
    disc = next((f for f in factors if f.discrete), None)
    cont = [f for f in factors if not f.discrete]
    dblock = layout.block(disc.name) if disc is not None else None

    def run(key, params, mparams, batch, rows):
        gp, lp = params["global"], params["local"]
        dtype = jax.tree_util.tree_leaves(batch)[0].dtype if jnp.issubdtype(
            jax.tree_util.tree_leaves(batch)[0].dtype, jnp.floating) else \
            jax.tree_util.tree_leaves(gp)[0].dtype
        b = rows.shape[0]
        if guide.mean is not None:
            theta = guide.mean(gp)
        else:
            theta = guide.sample(jax.random.fold_in(key, 1), gp)[0]
        z_glob = target.values(theta, mparams)
        if disc is not None:
            s, c = dblock.size, dblock.num_values
            grid = dblock.index_grid()
            onehot = jax.nn.one_hot(grid, c, dtype=dtype)
            values = jnp.broadcast_to(dblock.values(grid)[:, None], (grid.shape[0], b)
                                      + dblock.shape)
            flat = jnp.broadcast_to(onehot.reshape(grid.shape[0], 1, s * c),
                                    (grid.shape[0], b, s * c))
            mask = jnp.ones((grid.shape[0], b), bool)
            if dblock.observed is not None:
                obs = jnp.asarray(batch[dblock.observed]).reshape(b, s).astype(jnp.int32) \
                    - dblock.low
                seen = jnp.all((obs >= 0) & (obs < c), -1)
                match = jnp.all(grid[:, None, :] == obs[None], -1)
                mask = jnp.where(seen[None], match, True)
        else:
            values, flat, mask = None, None, jnp.ones((1, b), bool)
        n_e = mask.shape[0]
        keys = jax.random.split(key, max(len(cont), 1))
        us, log_q = {}, jnp.zeros((num_samples, n_e, b), dtype)
        for f, kf in zip(cont, keys, strict=False):
            p = lp[f.name]
            if f.given and flat is not None:
                raw = jax.vmap(lambda o, p=p, f=f: f.raw(p, batch, rows, o))(flat)
            else:
                raw = jnp.broadcast_to(f.raw(p, batch, rows, None)[None],
                                       (n_e, b) + (f.raw(p, batch, rows, None).shape[-1],))
            eps = jax.random.normal(kf, (num_samples, n_e, b, f.noise_dim), dtype)
            u, lq = jax.vmap(jax.vmap(f.draw, (None, 0, 0)), (None, None, 0))(p, raw, eps)
            us[f.name] = u
            log_q = log_q + lq

        def one(u_draw, vals):
            z = dict(z_glob)
            ld = jnp.zeros((b,), dtype)
            for f in cont:
                x, d = layout.block(f.name).constrain(u_draw[f.name])
                z[f.name] = x
                if not f.point_mass:
                    ld = ld + d
            if vals is not None:
                z[dblock.name] = vals
            return jnp.asarray(target.log_likelihood(z, batch)) + ld

        if not us:  # only a discrete local latent: exact, the same for every "draw"
            lp_ = jnp.broadcast_to(jax.vmap(lambda v: one({}, v))(values)[None],
                                   (num_samples, n_e, b))
        elif values is None:
            lp_ = jax.vmap(lambda u: jax.vmap(lambda v: one(v, None))(u))(us)
        else:
            lp_ = jax.vmap(lambda u: jax.vmap(one)(u, values))(us)
        return jnp.swapaxes(lp_ - log_q, 0, 1), mask

    return jax.jit(run)


def row_log_weights(res, batch, rows, key, num_samples: int):
    """``(log_w (E, K, B), mask (E, B))`` for the rows ``rows`` (their data ``batch``)."""
    target = res.model.target
    fn = _compiled(target, res.guide_spec, int(num_samples))
    mparams = res.mparams if target.params else None
    return fn(key, res.params, mparams, batch, jnp.asarray(rows, jnp.int32))


def row_log_likelihood(log_w, mask) -> jax.Array:
    """``log (1/K) sum_k w`` summed exactly over the enumerated values: ``(B,)``."""
    k = log_w.shape[1]
    per_e = logsumexp(log_w, axis=1) - jnp.log(k)
    return logsumexp(jnp.where(mask, per_e, -jnp.inf), axis=0)


def row_check(res, data, key, rows: int = 200, num_samples: int = 1000
              ) -> tuple[float, float, str, int]:
    """PSIS on ``num_samples`` draws of q for up to ``rows`` rows (evenly spaced): ``(median
    k-hat, fraction of rows with k-hat >= 0.7, reading, draws)``. Rows with a local discrete
    latent use its most probable value's draws (observed: the observed one)."""
    layout = res.model.target.locals
    big = [b.name for b in layout.discrete if b.combos > MAX_ENUMERATION]
    if big:
        return (float("nan"), float("nan"), f"not computed (local discrete latent {big[0]!r} "
                f"has more than {MAX_ENUMERATION} joint values per row)", 0)
    n = int(np.shape(jax.tree_util.tree_leaves(data)[0])[0])
    idx = np.unique(np.linspace(0, n - 1, min(rows, n)).astype(np.int64))
    batch = jax.tree_util.tree_map(lambda a: jnp.asarray(np.asarray(a)[idx]), data)
    log_w, mask = row_log_weights(res, batch, idx, key, num_samples)
    per_e = logsumexp(log_w, axis=1)
    best = jnp.argmax(jnp.where(mask, per_e, -jnp.inf), axis=0)
    lw = np.asarray(jnp.take_along_axis(log_w, best[None, None, :], 0)[0], np.float64)
    ks = []
    for j in range(lw.shape[1]):
        col = lw[:, j]
        ks.append(psis(col).k_hat if np.all(np.isfinite(col)) else np.inf)
    ks = np.asarray(ks)
    med, frac = float(np.median(ks)), float(np.mean(ks >= 0.7))
    word = "good" if med < 0.5 else "usable" if med < 0.7 else "unreliable"
    reading = (f"{word} (per-row PSIS of the local guide on {ks.size} rows, "
               f"{num_samples} draws each: median k-hat {med:.2f}, {100 * frac:.0f}% of "
               "rows >= 0.7)")
    return med, frac, reading, num_samples
