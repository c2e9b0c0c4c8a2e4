"""Host side of a fit's data feed: check the data and the minibatch / stream / KL-weight
options against the model, and build the per-chunk arguments of the compiled loop."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from vijax.checks import _trace, check_data, default_psis_draws
from vijax.data import (
    Feed,
    data_seed,
    observation_count,
    resolve_kl_weight,
    resolve_minibatch,
)
from vijax.placement import Placement, padded_rows, place_rows, place_stream_chunk
from vijax.stream import host_data

__all__ = []

# the PSIS check of a minibatched fit evaluates the full-data density for every draw: its
# default number of draws keeps draws * N at most this many row evaluations (and >= 100)
PSIS_ROW_BUDGET = 200_000_000
PSIS_MIN_DRAWS_LARGE = 100

_FACTORISE = ("write the model in the factorised form, vj.Model(log_prior=lambda z: ..., "
              "log_likelihood=lambda z, data: ... one value per observation (shape (N,)), "
              "latents=...), so that vijax can scale a batch's likelihood by N/B and weight "
              "the prior")


def _data_feed(model, data, dtype, batch_size, shuffle, stream, kl_weight, resume):
    """``(data, host, feed, n_obs)``: the checked device data (or ``None`` for a stream),
    the host source of a stream, the :class:`~vijax.data.Feed` (``None``: the whole data
    each step, unweighted) and the number of observations (``None`` without a feed)."""
    if resume is not None and resume.feed is not None:
        mb, kl = resume.feed.minibatch, resume.feed.kl
        if mb is not None:
            batch_size, shuffle = mb.batch_size, mb.shuffle
        if kl is not None and kl.kind == "schedule" and kl.value is None:
            raise ValueError("this result was loaded from a checkpoint, which cannot store its "
                             "KL weight schedule (a function): refit with kl_weight= instead "
                             "of resuming")
        kl_weight = None if kl is None else (kl.value if kl.kind != "blundell"
                                             else "blundell")
    uses = batch_size is not None or kl_weight is not None or stream
    if uses and not model.factorised:
        what = ("batch_size=" if batch_size is not None else
                "stream=True" if stream else "kl_weight=")
        raise ValueError(f"{what} needs a factorised model: the model was given as one "
                         f"log_joint, which cannot be split into observations; {_FACTORISE}")
    raw = model.data if data is None else data
    if stream:
        host = host_data(raw, dtype)
        n = host.n
        checked = None
    else:
        host = None
        checked = check_data(raw, dtype)
        n = observation_count(checked) if uses else None
    if not uses:
        return checked, None, None, None
    mb = resolve_minibatch(batch_size, shuffle, n, stream)
    kl = resolve_kl_weight(kl_weight, batch_size)
    if mb is None and kl is None:
        return checked, host, None, None
    return checked, host, Feed(mb, kl), n


def _check_batch_axis(model, target, batch, dtype) -> None:
    """The per-observation log likelihood of a batch has one value per row of the batch."""
    theta = jax.ShapeDtypeStruct((target.full_dim,), dtype)
    leaves = jax.tree_util.tree_leaves(batch)
    rows = np.shape(leaves[0])[0]
    out = _trace(lambda: jax.eval_shape(
        lambda t, d: model.log_likelihood(target.values(t), d), theta, batch),
        "log_likelihood", {b.name: b.shape for b in target.blocks})
    if out.shape != (rows,):
        raise ValueError(f"log_likelihood must return one value per observation: for data "
                         f"with {rows} rows it returned shape {out.shape}; the leading axis "
                         "of every data leaf is the observation axis that batch_size "
                         "subsamples")


def _psis_default(dim: int, n_obs: int | None) -> int:
    """Default PSIS draws: :func:`~vijax.checks.default_psis_draws`, within a budget of
    full-data row evaluations for minibatched fits."""
    draws = default_psis_draws(dim)
    if n_obs is None:
        return draws
    return int(min(draws, max(PSIS_MIN_DRAWS_LARGE, PSIS_ROW_BUDGET // max(n_obs, 1))))


def _feed_args(feed: Feed | None, host, n_obs, k_loop) -> dict[str, Any]:
    """The loop's runtime feed arguments that stay the same for every chunk."""
    if feed is None:
        return {}
    seed = data_seed(k_loop)
    return {"n": jnp.asarray(n_obs if n_obs is not None else 0, jnp.int32), "seed": seed,
            "seed_host": int(seed), "streamed": host is not None}


def _chunk_args(args: dict[str, Any], pending) -> dict[str, Any]:
    """One chunk's feed arguments: ``n`` and the shuffle seed, or ``n`` and the batches."""
    if args["streamed"]:
        return {"n": args["n"], "xs": pending}
    return {"n": args["n"], "seed": args["seed"]}


def _epochs(feed: Feed | None, n_obs) -> float | None:
    """Steps per epoch of a minibatched fit (for a progress bar in epochs)."""
    if feed is None or feed.minibatch is None:
        return None
    return n_obs / feed.minibatch.batch_size


def _placed_data(model, data, host, feed: Feed | None, placement: Placement,
                 place: bool = True):
    """The device data of a fit on a mesh, split by rows over the placement's axis (``None``
    for a stream, whose batches are placed chunk by chunk: :func:`_next_chunk`).

    Minibatches need ``batch_size`` divisible by the number of shards (each device computes
    the likelihood of an equal share of every batch); their data are padded to a multiple of
    it (padding rows are never drawn). Full-data fits need N divisible by it: every row
    enters every step, so padding would change the density. ``place=False`` only checks."""
    axis, d = placement.axis, placement.size
    if not model.factorised:
        raise ValueError(f"mesh= splits the data's rows over mesh axis {axis!r}: the model was "
                         f"given as one log_joint, whose rows vijax cannot see; {_FACTORISE}")
    mb = feed.minibatch if feed is not None else None
    if mb is not None and mb.batch_size % d:
        raise ValueError(f"batch_size={mb.batch_size} cannot be split evenly over the {d} "
                         f"devices of mesh axis {axis!r}: choose a multiple of {d}")
    if host is not None:
        return None
    n = observation_count(data)
    if mb is None and n % d:
        raise ValueError(f"the data's N = {n} rows cannot be split evenly over the {d} "
                         f"devices of mesh axis {axis!r}, and a full-data fit uses every row "
                         f"at every step: give batch_size= (a multiple of {d}; the data are "
                         f"then padded to {padded_rows(n, placement)} rows that are never "
                         "drawn) or a mesh axis whose size divides N")
    if not place:
        return None
    return place_rows(data, placement, padded_rows(n, placement) if mb is not None else None)


def _next_chunk(host, feed: Feed, first_step: int, steps: int, seed: int,
                placement: Placement | None):
    """A stream's batches for ``steps`` steps from ``first_step``: on one device, or split
    over the mesh by batch columns, each process gathering only its own columns."""
    if placement is None:
        return host.chunk(feed.minibatch, first_step, steps, seed)
    rows = host.chunk_rows(feed.minibatch, first_step, steps, seed)
    return place_stream_chunk(host.gather, rows, placement)
