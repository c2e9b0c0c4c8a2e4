"""What a fit with local latents says about each observation: its local posterior (the
encoder's or table's q for every row) and its importance-sampled log-likelihood."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vijax.checks import check_data
from vijax.guides.local import LocalSpec, build_local, example_row
from vijax.local_weights import row_log_likelihood, row_log_weights

__all__ = ["importance_log_likelihood", "local_posterior"]

_ROW_BUDGET = 2**25  # elements of per-row work (draws x row elements) per compiled batch


def _check(res, data, what: str):
    from vijax.result import FitResult

    if not isinstance(res, FitResult):
        raise TypeError(f"{what} needs a vj.FitResult, got {type(res).__name__}")
    if not isinstance(res.guide_spec, LocalSpec):
        raise ValueError(f"{what} is for models with local latents (vj.Latent(..., "
                         "local=True)); this model has none")
    dtype = jax.tree_util.tree_leaves(res.params)[0].dtype
    data = check_data(res.model.data if data is None else data, dtype)
    leaves = jax.tree_util.tree_leaves(data)
    if not leaves:
        raise ValueError(f"{what} needs data: the rows to evaluate")
    n = int(np.shape(leaves[0])[0])
    treedef, row = res.guide_spec.row
    got = jax.tree_util.tree_structure(data)
    shapes = tuple(tuple(np.shape(x)[1:]) for x in leaves)
    if got != treedef or shapes != tuple(s for s, _ in row):
        raise ValueError(f"{what}: the data's rows have structure {got} with shapes {shapes}; "
                         f"the fit's rows had {treedef} with shapes "
                         f"{tuple(s for s, _ in row)}")
    return data, n


def _batches(n: int, batch_size: int):
    for start in range(0, n, batch_size):
        idx = np.arange(start, min(n, start + batch_size))
        pad = batch_size - idx.size
        yield idx, (np.concatenate([idx, np.full(pad, idx[-1])]) if pad else idx)


def importance_log_likelihood(res, data: Any = None, *, num_samples: int = 5000,
                              key: Any = None, batch_size: int | None = None) -> np.ndarray:
    """Importance-sampled ``log p(x_i)`` per row, ``(N,)`` float64.

    ``log (1/K) sum_k p(x_i, z_k) / q(z_k | x_i)`` with ``K = num_samples`` draws of the
    fitted local guide (the local discrete latent summed exactly; global latents at their
    guide's mean, model parameters at their fitted values): a stochastic lower bound on
    ``log p(x_i)`` whose bias shrinks as K grows (exact when q is the exact posterior). The
    standard test log-likelihood of VAEs is ``mean(importance_log_likelihood(res, test))``
    with K = 5,000.

    Args:
        res: a fit of a model with local latents.
        data: rows to evaluate (the same structure as the fit's data); ``None``: the
            model's bound data.
        num_samples: K >= 1.
        key: PRNG key or int seed (default 0).
        batch_size: rows per compiled call (default: from a budget of K x row size).
    """
    data, n = _check(res, data, "importance_log_likelihood")
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be an int >= 1, got {num_samples!r}")
    key = jax.random.key(0) if key is None else (
        jax.random.key(key) if isinstance(key, int) else key)
    row_size = max(1, sum(int(np.prod(np.shape(x)[1:])) for x in
                          jax.tree_util.tree_leaves(data)))
    if batch_size is None:
        batch_size = int(max(1, min(n, _ROW_BUDGET // (num_samples * row_size))))
    out = np.empty(n, np.float64)
    for i, (idx, padded) in enumerate(_batches(n, batch_size)):
        batch = jax.tree_util.tree_map(lambda a, p=padded: jnp.asarray(np.asarray(a)[p]),
                                       data)
        lw, mask = row_log_weights(res, batch, padded, jax.random.fold_in(key, i),
                                   num_samples)
        out[idx] = np.asarray(row_log_likelihood(lw, mask), np.float64)[:idx.size]
    return out


def local_posterior(res, data: Any = None) -> dict[str, dict[str, np.ndarray]]:
    """Each row's local posterior under the fitted guide.

    Returns ``{name: {...}}``: for a continuous local latent, ``"loc"`` (the constrained
    image of q's location, ``(N,) + shape``: the median of a Gaussian family's marginals)
    and, for Gaussian families, ``"scale"`` (unconstrained sds, ``(N, size)``); for a
    discrete one, ``"probs"`` ``(N, size, num_values)`` and ``"mode"`` ``(N,) + shape``.
    A factor that conditions on the local discrete latent is given its most probable value.
    """
    data, n = _check(res, data, "local_posterior")
    spec = res.guide_spec
    target = res.model.target
    factors = build_local(spec, target, example_row(spec.row))
    lp = res.params["local"]
    rows = jnp.arange(n, dtype=jnp.int32)
    data = jax.tree_util.tree_map(jnp.asarray, data)
    out: dict[str, dict[str, np.ndarray]] = {}
    onehot = None
    for f in factors:
        block = target.locals.block(f.name)
        raw = f.raw(lp[f.name], data, rows, onehot if f.given else None)
        if f.discrete:
            logits = f.mean(lp[f.name], raw)
            probs = jax.nn.softmax(logits, -1)
            mode = jnp.argmax(logits, -1)
            out[f.name] = {"probs": np.asarray(probs),
                           "mode": np.asarray(block.values(mode))}
            onehot = jax.nn.one_hot(mode, f.num_values, dtype=raw.dtype).reshape(n, -1)
            continue
        loc = f.mean(lp[f.name], raw)
        entry = {"loc": np.asarray(block.constrain(loc)[0])}
        if f.noise_dim and raw.shape[-1] >= 2 * f.size:
            c = jnp.log(jnp.expm1(jnp.asarray(spec_scale(spec, f.name), raw.dtype)))
            entry["scale"] = np.asarray(jax.nn.softplus(raw[:, f.size:2 * f.size] + c))
        out[f.name] = entry
    return out


def spec_scale(spec: LocalSpec, name: str) -> float:
    return dict(spec.factors)[name].init_scale
