"""Structured guides: independent blocks, each latent (or group of latents) with its own family.

q(theta) = prod_b q_b(theta[idx_b]); log q and the entropy are sums over blocks.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from vijax.guides.base import Guide, make_guide

__all__ = ["Structured"]


@dataclasses.dataclass(frozen=True)
class Structured:
    """Independent guide blocks. Build it from a dict passed as ``guide=`` to ``fit``:
    ``{"tau": "delta", ("mu", "theta"): vj.guides.FullRank()}``.

    Keys are latent names, or tuples of names sharing one block; every latent must be covered
    exactly once. Params: a tuple with one params pytree per block, in the order given.

    Example:
        >>> import vijax as vj
        >>> g = vj.guides.Structured((("mu",), vj.guides.Delta()),)
        >>> len(g.blocks)
        1
    """

    blocks: tuple  # ((names tuple, family spec), ...)
    name = "structured"

    def __init__(self, *blocks):
        object.__setattr__(self, "blocks", tuple((tuple(n), s) for n, s in blocks))

    @property
    def default_learning_rate(self) -> float:
        return min(getattr(spec, "default_learning_rate", 0.05) for _, spec in self.blocks)

    def build_for(self, target) -> Guide:
        covered: dict[str, int] = {}
        for i, (names, _) in enumerate(self.blocks):
            for n in names:
                if n not in target.names:
                    raise ValueError(f"structured guide names unknown latent {n!r}; the "
                                     f"model's latents are {list(target.names)}")
                if n in covered:
                    raise ValueError(f"latent {n!r} appears in more than one guide block")
                covered[n] = i
        missing = [n for n in target.names if n not in covered]
        if missing:
            raise ValueError(f"structured guide does not cover latent(s) {missing}; give every "
                             "latent a guide (e.g. 'meanfield')")
        subs, idxs = [], []
        for names, spec in self.blocks:
            idx = np.concatenate([np.arange(target.block(n).offset,
                                            target.block(n).offset + target.block(n).size)
                                  for n in names])
            try:
                subs.append(spec.build(int(idx.size), names))
            except ValueError as e:
                raise ValueError(f"guide block {list(names)}: {e}") from None
            idxs.append(idx)
        dim = target.dim
        has_entropy = all(g.entropy is not None for g in subs)

        def _split(theta):
            return [theta[i] for i in idxs]

        def _join(parts, dtype):
            theta = jnp.zeros((dim,), dtype)
            for i, p in zip(idxs, parts, strict=True):
                theta = theta.at[i].set(p)
            return theta

        def init(key, loc):
            keys = jax.random.split(key, len(subs))
            return tuple(g.init(k, part) for g, k, part in zip(subs, keys, _split(loc),
                                                                 strict=True))

        noise_at = np.cumsum([0] + [g.noise_dim for g in subs])

        def transform(params, eps):
            draws = [g.transform(p, eps[a:b]) for g, p, a, b in zip(
                subs, params, noise_at[:-1], noise_at[1:], strict=True)]
            return _join([d[0] for d in draws], eps.dtype), sum(d[1] for d in draws)

        def log_q(params, theta):
            return sum(g.log_q(p, part) for g, p, part in zip(subs, params, _split(theta),
                                                               strict=True))

        def entropy(params):
            return sum(g.entropy(p) for g, p in zip(subs, params, strict=True))

        def mean(params):
            parts = [g.mean(p) for g, p in zip(subs, params, strict=True)]
            return _join(parts, parts[0].dtype)

        has_mean = all(g.mean is not None for g in subs)
        no_jac = frozenset().union(*(g.no_jacobian for g in subs))
        label = "structured(" + ", ".join(f"{'+'.join(n)}:{g.name}"
                                          for (n, _), g in zip(self.blocks, subs,
                                                               strict=True)) + ")"
        return make_guide(label, dim, int(noise_at[-1]), init, transform, log_q,
                          entropy if has_entropy else None, mean if has_mean else None, no_jac,
                          point_mass=all(g.point_mass for g in subs))
