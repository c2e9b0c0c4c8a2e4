"""Where each step's data comes from: the whole data, minibatches of device-resident data, or
batches streamed from host memory; and the weights (N/B scaling, KL weight) they carry.

A :class:`Feed` is the static (hashable, compile-key) description; its runtime arguments
(the shuffle seed, N, and for a stream the chunk's batches) are passed to the compiled chunk.

**Order.** Observation ``p = step * B + j`` (``j < B``) of the stream of draws is row
``perm_e(p mod N)`` of epoch ``e = p div N``: every row once per epoch (``shuffle="epoch"``),
or a uniform draw with replacement per element (``shuffle="randint"``). ``perm_e`` is a
keyed swap-or-not shuffle (Hoang, Morris & Rogaway 2012): a bijection of ``{0..N-1}``
computed per element from a 32-bit hash, with no per-epoch state, no sort and no control
flow on device, and the same integer arithmetic on the host (numpy) for streamed data, so a
streamed fit sees exactly the rows a device-resident one does, and a resumed fit continues
mid-epoch exactly.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["Feed", "Minibatch", "KLWeight", "host_indices", "device_indices", "shuffle",
           "MAX_ROWS", "data_seed", "advance", "kl_weight_at"]

ROUNDS = 16  # swap-or-not rounds: each round swaps half of the pairs {x, K_r - x}
MAX_ROWS = 2**30  # the position arithmetic is int32: offset + B < 2N
_SHUFFLES = ("epoch", "randint")
_C1, _C2, _C3 = 0x9E3779B9, 0x85EBCA6B, 0xC2B2AE35


class Minibatch(NamedTuple):
    """``batch_size`` rows per step, ``shuffle`` ``"epoch"`` or ``"randint"``; ``streamed``:
    the rows arrive from host memory as the chunk's batches."""

    batch_size: int
    shuffle: str = "epoch"
    streamed: bool = False


class KLWeight(NamedTuple):
    """The weight on the prior-minus-entropy term: ``kind`` ``"constant"`` (``value``),
    ``"schedule"`` (``value`` is ``step -> weight``, e.g. an optax schedule) or
    ``"blundell"`` (Blundell et al. 2015: ``M * 2^-i / (1 - 2^-M)`` for batch ``i`` of the
    ``M`` in an epoch, which sums to ``M``, so that an epoch's steps average to the ELBO)."""

    kind: str
    value: Any = 1.0

    def describe(self) -> str:
        if self.kind == "constant":
            return f"kl_weight={self.value:g}"
        if self.kind == "blundell":
            return "kl_weight='blundell' (Blundell et al. 2015, per batch of the epoch)"
        return f"kl_weight schedule {getattr(self.value, '__name__', repr(self.value))}"


class Feed(NamedTuple):
    """Static description of a fit's data per step: ``minibatch`` (``None``: the whole
    data every step) and ``kl`` (``None``: weight 1)."""

    minibatch: Minibatch | None = None
    kl: KLWeight | None = None


# ---------------------------------------------------------------------------------------------
# the shuffle: identical uint32 arithmetic for jax.numpy (device) and numpy (host)
def _mix(x, xp):
    """lowbias32 (Wellons): a 32-bit integer hash with good avalanche."""
    x = x ^ (x >> xp.uint32(16))
    x = x * xp.uint32(0x7FEB352D)
    x = x ^ (x >> xp.uint32(15))
    x = x * xp.uint32(0x846CA68B)
    return x ^ (x >> xp.uint32(16))


def shuffle(slot, epoch, seed, n, xp=jnp):
    """Row of position ``slot`` (in ``[0, n)``) in epoch ``epoch``'s permutation
    (elementwise; ``uint32`` arrays or numbers; ``xp`` is ``jax.numpy`` or ``numpy``)."""
    if xp is np:
        with np.errstate(over="ignore"):  # uint32 arithmetic wraps, as on device
            return _shuffle(slot, epoch, seed, n, np)
    return _shuffle(slot, epoch, seed, n, xp)


def _round_keys(epoch, seed, n, xp):
    """Per round ``r``: the reflection point ``K_r`` in ``[0, n)`` and the hash salt of
    epoch ``epoch`` (lists of ``ROUNDS`` values shaped like ``epoch``)."""
    u = xp.uint32
    key = _mix(xp.asarray(seed).astype(u) ^ _mix(xp.asarray(epoch).astype(u) * u(_C1) + u(1),
                                                 xp), xp)
    n = xp.asarray(n).astype(u)
    ks = [_mix(key + u(r) * u(_C2), xp) % n for r in range(ROUNDS)]
    salts = [_mix(key ^ (u(r + 1) * u(_C3)), xp) for r in range(ROUNDS)]
    return ks, salts


def _rounds(x, ks, salts, n, xp):
    """Swap-or-not rounds on ``x`` (uint32 in ``[0, n)``); no division per element: with
    ``K, x < n``, ``(K + n - x) mod n`` is one compare and subtract."""
    u = xp.uint32
    n = xp.asarray(n).astype(u)
    for k_r, salt in zip(ks, salts, strict=True):
        d = k_r + n - x
        partner = xp.where(d >= n, d - n, d)
        flip = (_mix(xp.maximum(x, partner) ^ salt, xp) & u(1)) == u(1)
        x = xp.where(flip, partner, x)
    return x


def _shuffle(slot, epoch, seed, n, xp):
    ks, salts = _round_keys(epoch, seed, n, xp)
    return _rounds(xp.asarray(slot).astype(xp.uint32), ks, salts, n, xp)


def _draw(position, seed, n, xp):
    """``shuffle="randint"``: a uniform row per position (with replacement)."""
    u = xp.uint32
    h = _mix(_mix(xp.asarray(position).astype(u) ^ u(_C1), xp) ^ xp.asarray(seed).astype(u),
             xp)
    return h % xp.asarray(n).astype(u)


def data_seed(key: jax.Array) -> jax.Array:
    """The shuffle's uint32 seed, derived from the loop's key (one stream per fit)."""
    return jax.random.bits(jax.random.fold_in(key, 0x7FFFFFFF), (), jnp.uint32)


def device_indices(mb: Minibatch, pos, seed, n):
    """Rows ``(B,)`` int32 of the batch at position ``pos = (epoch, offset)``."""
    epoch, offset = pos
    o = offset + jnp.arange(mb.batch_size, dtype=jnp.int32)
    wrap = o >= n
    e = epoch + wrap.astype(jnp.int32)
    slot = jnp.where(wrap, o - n, o)
    if mb.shuffle == "randint":
        # the global position (epoch * N + slot) mod 2^32 names the draw
        rows = _draw(e.astype(jnp.uint32) * n.astype(jnp.uint32) + slot.astype(jnp.uint32),
                     seed, n, jnp)
    else:
        # the round keys of the batch's (at most two) epochs, as scalars: a division per
        # round, not per element (a division by a runtime n is slow)
        k0, s0 = _round_keys(epoch, seed, n, jnp)
        k1, s1 = _round_keys(epoch + 1, seed, n, jnp)
        ks = [jnp.where(wrap, b, a) for a, b in zip(k0, k1, strict=True)]
        salts = [jnp.where(wrap, b, a) for a, b in zip(s0, s1, strict=True)]
        rows = _rounds(slot.astype(jnp.uint32), ks, salts, n, jnp)
    return rows.astype(jnp.int32)


def advance(mb: Minibatch, pos, n):
    """Position after one batch (``B <= N``: at most one epoch boundary per step)."""
    epoch, offset = pos
    o = offset + mb.batch_size
    wrap = o >= n
    return (epoch + wrap.astype(jnp.int32), jnp.where(wrap, o - n, o))


def host_indices(mb: Minibatch, first_step: int, steps: int, seed: int, n: int) -> np.ndarray:
    """Rows ``(steps, B)`` (int64) of steps ``first_step .. first_step + steps - 1``: the
    same rows :func:`device_indices` gives on device."""
    b = mb.batch_size
    p = np.arange(first_step * b, (first_step + steps) * b, dtype=np.int64)
    epoch, slot = p // n, p % n
    with np.errstate(over="ignore"):
        if mb.shuffle == "randint":
            g = (epoch.astype(np.uint32) * np.uint32(n) + slot.astype(np.uint32))
            rows = _draw(g, np.uint32(seed), n, np)
        else:  # round keys once per epoch of the chunk, not per element
            epochs, inverse = np.unique(epoch, return_inverse=True)
            ks, salts = _round_keys(epochs.astype(np.uint32), np.uint32(seed), n, np)
            rows = _rounds(slot.astype(np.uint32), [k[inverse] for k in ks],
                           [t[inverse] for t in salts], n, np)
    return rows.astype(np.int64).reshape(steps, b)


def position_at(mb: Minibatch, step: int, n: int) -> tuple[int, int]:
    """``(epoch, offset)`` after ``step`` steps (host, exact integers)."""
    p = step * mb.batch_size
    return p // n, p % n


def kl_weight_at(kl: KLWeight | None, step, pos, mb: Minibatch | None, n, dtype):
    """The KL weight of a step (a scalar of ``dtype``)."""
    if kl is None:
        return jnp.ones((), dtype)
    if kl.kind == "constant":
        return jnp.asarray(kl.value, dtype)
    if kl.kind == "schedule":
        return jnp.asarray(kl.value(step), dtype)
    b = mb.batch_size
    m = (n + b - 1) // b  # batches per epoch
    i = (pos[1] // b + 1).astype(dtype)  # 1-based batch index within the epoch
    m = m.astype(dtype)
    return m * jnp.exp2(-i) / (1.0 - jnp.exp2(-m))


# ---------------------------------------------------------------------------------------------
# host-side validation of the options
def resolve_kl_weight(kl_weight: Any, batch_size: int | None) -> KLWeight | None:
    """``kl_weight=`` -> :class:`KLWeight` (``None`` for the default 1)."""
    if kl_weight is None:
        return None
    if isinstance(kl_weight, str):
        if kl_weight != "blundell":
            raise ValueError(f"kl_weight={kl_weight!r} is not known; give a number >= 0, a "
                             "schedule (step -> weight, e.g. optax.linear_schedule(0., 1., "
                             "1000)) or 'blundell'")
        if batch_size is None:
            raise ValueError("kl_weight='blundell' weights each minibatch of an epoch; it "
                             "needs batch_size=")
        return KLWeight("blundell")
    if callable(kl_weight):
        try:
            out = jax.eval_shape(kl_weight, jax.ShapeDtypeStruct((), jnp.int32))
        except Exception as e:
            raise TypeError(f"kl_weight schedule {kl_weight!r} must map the step (an int32 "
                            f"array) to a weight; calling it failed: {e}") from e
        if getattr(out, "shape", None) != ():
            raise ValueError(f"kl_weight schedule {kl_weight!r} must return a scalar, got "
                             f"{out}")
        return KLWeight("schedule", kl_weight)
    if isinstance(kl_weight, bool) or not isinstance(kl_weight, int | float | np.number):
        raise TypeError(f"kl_weight must be a number, a schedule or 'blundell', got "
                        f"{kl_weight!r}")
    value = float(kl_weight)
    if not (np.isfinite(value) and value >= 0):
        raise ValueError(f"kl_weight must be finite and >= 0, got {kl_weight!r}")
    return None if value == 1.0 else KLWeight("constant", value)


def resolve_minibatch(batch_size: Any, shuffle_: Any, n: int, streamed: bool
                      ) -> Minibatch | None:
    """Validate ``batch_size`` against the ``n`` observations."""
    if batch_size is None:
        if streamed:
            raise ValueError("stream=True feeds minibatches from host memory: give "
                             "batch_size=")
        return None
    if isinstance(batch_size, bool) or not isinstance(batch_size, int | np.integer):
        raise TypeError(f"batch_size must be an int, got {batch_size!r}")
    if not 1 <= int(batch_size) <= n:
        raise ValueError(f"batch_size must be between 1 and the number of observations "
                         f"N = {n}, got {batch_size}")
    if shuffle_ not in _SHUFFLES:
        raise ValueError(f"shuffle must be one of {_SHUFFLES}, got {shuffle_!r}")
    if n >= MAX_ROWS:
        raise ValueError(f"the data has N = {n} observations; minibatching supports fewer "
                         f"than {MAX_ROWS}")
    return Minibatch(int(batch_size), shuffle_, streamed)


def observation_count(data: Any) -> int:
    """N, the common leading size of every data leaf; errors name the leaves that differ."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(data)
    if not leaves:
        raise ValueError("batch_size= needs data: the leading axis of every data leaf is the "
                         "observation axis, and there is no data")
    sizes = {}
    for path, leaf in leaves:
        shape = np.shape(leaf)
        where = jax.tree_util.keystr(path) or "data"
        if not shape:
            raise ValueError(f"batch_size=: data leaf {where} is a scalar; every leaf needs "
                             "a leading observation axis (put constants in the model, or "
                             "broadcast them)")
        sizes.setdefault(shape[0], []).append(where)
    if len(sizes) > 1:
        detail = "; ".join(f"{n} rows: {', '.join(w)}" for n, w in sorted(sizes.items()))
        raise ValueError(f"batch_size=: the data leaves have different leading sizes "
                         f"({detail}); every leaf's leading axis must be the observation "
                         "axis")
    return int(next(iter(sizes)))


def take(data: Any, rows) -> Any:
    """The batch: rows ``rows`` of every leaf (device)."""
    return jax.tree_util.tree_map(lambda a: jnp.take(a, rows, axis=0), data)


Schedule = Callable[[jax.Array], jax.Array]
