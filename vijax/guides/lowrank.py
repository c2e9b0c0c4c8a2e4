"""Low-rank-plus-diagonal Gaussian guide: q(theta) = N(loc, S (I + W W^T) S), S = diag(s)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist

from vijax.guides.base import Guide, make_guide, softplus, softplus_inverse
from vijax.guides.meanfield import _check_init_scale

__all__ = ["LowRank"]


@dataclasses.dataclass(frozen=True)
class LowRank:
    """Gaussian with covariance ``S (I + W W^T) S``: a diagonal scale ``S = diag(s)`` and a
    rank-``r`` correlation factor ``W`` of shape ``(dim, rank)`` in scale-free units.

    Params: ``{"loc": (dim,), "raw_scale": (dim,), "cov_factor": (dim, rank)}`` with
    ``s = softplus(raw_scale)``. ``W`` is lower-trapezoidal with a positive (softplus)
    diagonal, the canonical form of a rank-r factor: it removes the rotation symmetry
    ``W -> W R`` (which would make averaged iterates meaningless) and, being measured in units
    of ``s``, learns correlations at the same pace whatever the posterior scales.

    Draw ``theta = loc + s * (e2 + W e1)`` with ``eps = (e1, e2) ~ N(0, I_{r + dim})``.
    ``log q`` and the closed-form entropy come from numpyro's ``LowRankMultivariateNormal``
    (cov_factor ``S W``, cov_diag ``s^2``; Woodbury and the matrix determinant lemma,
    O(dim rank^2)).

    Args:
        rank: columns of ``W``; ``None`` means ``max(1, round(sqrt(dim)))`` (NumPyro's
            default). Must not exceed the dimension of the latents it covers.
        init_scale: initial marginal scale per coordinate (unconstrained space).

    Example:
        >>> import vijax as vj
        >>> vj.guides.LowRank(rank=2).rank
        2
    """

    rank: int | None = None
    init_scale: float = 0.1
    name = "lowrank"
    default_learning_rate = 0.05

    def __post_init__(self) -> None:
        if self.rank is not None and (isinstance(self.rank, bool)
                                      or not isinstance(self.rank, int) or self.rank < 1):
            raise ValueError(f"LowRank rank must be a positive int or None, got {self.rank!r}")
        _check_init_scale(self.init_scale)

    def resolved_rank(self, dim: int) -> int:
        rank = self.rank if self.rank is not None else max(1, round(math.sqrt(dim)))
        if rank > dim:
            raise ValueError(f"LowRank rank={rank} is larger than the dimension {dim} of the "
                             "unconstrained latents it covers; use rank <= dim or 'fullrank'")
        return rank

    @staticmethod
    def params_from(loc: np.ndarray, cov: np.ndarray, rank: int) -> dict[str, np.ndarray]:
        """Parameters (numpy, float64) of a low-rank Gaussian ``N(loc, S (I + W W^T) S)``
        close to ``N(loc, cov)``: ``S = s I`` with ``s^2`` half the smallest eigenvalue of
        ``cov``, and ``W`` the canonical (lower-trapezoidal, positive diagonal) factor of the
        top ``rank`` eigenpairs of ``cov / s^2 - I``: exact when ``rank == dim``.

        Example:
            >>> import numpy as np
            >>> p = LowRank.params_from(np.zeros(2), np.array([[2.0, 1.0], [1.0, 2.0]]), 2)
            >>> sorted(p)
            ['cov_factor', 'loc', 'raw_scale']
        """
        cov = 0.5 * (np.asarray(cov, np.float64) + np.asarray(cov, np.float64).T)
        dim = cov.shape[0]
        eig = np.linalg.eigvalsh(cov)
        s2 = 0.5 * max(float(eig[0]), 1e-12)
        m = cov / s2 - np.eye(dim)
        lam, vec = np.linalg.eigh(0.5 * (m + m.T))
        w0 = vec[:, ::-1][:, :rank] * np.sqrt(np.maximum(lam[::-1][:rank], 0.0))
        q, r = np.linalg.qr(w0.T)  # w0 = r^T q^T: w0 q = r^T is lower-trapezoidal
        w = r.T * np.where(np.diag(r) < 0, -1.0, 1.0)[None, :]
        dg = np.maximum(np.diag(w)[:rank], 1e-6)
        raw = np.where(np.eye(dim, rank, dtype=bool), 0.0, w)
        raw[np.arange(rank), np.arange(rank)] = np.asarray(softplus_inverse(dg))
        return {"loc": np.asarray(loc, np.float64),
                "raw_scale": np.full(dim, float(softplus_inverse(np.sqrt(s2)))),
                "cov_factor": raw}

    def build(self, dim: int, names: tuple[str, ...]) -> Guide:
        rank = self.resolved_rank(dim)
        init_scale = self.init_scale
        strict = jnp.asarray(np.tril(np.ones((dim, rank)), -1), bool)
        diag = jnp.asarray(np.eye(dim, rank), bool)
        w0 = 0.5 / math.sqrt(rank)  # initial factor entries: away from the W = 0 saddle

        def _factor(params):
            raw = params["cov_factor"]
            return jnp.where(strict, raw, 0.0) + jnp.where(diag, softplus(raw), 0.0)

        def init(key, loc):
            w = w0 * jax.random.normal(key, (dim, rank), loc.dtype)
            w = jnp.where(diag, softplus_inverse(jnp.asarray(w0, loc.dtype)), w)
            s = init_scale / math.sqrt(1.0 + rank * w0**2)
            return {"loc": loc, "raw_scale": jnp.full_like(loc, softplus_inverse(s)),
                    "cov_factor": w}

        def _dist(params):
            s = softplus(params["raw_scale"])
            return dist.LowRankMultivariateNormal(params["loc"], s[:, None] * _factor(params),
                                                  s**2)

        def transform(params, eps):
            loc = params["loc"]
            s = softplus(params["raw_scale"])
            e1, e2 = eps[:rank], eps[rank:]
            theta = loc + s * (e2 + _factor(params) @ e1)
            return theta, _dist(params).log_prob(theta)

        def log_q(params, theta):
            return _dist(params).log_prob(theta)

        def entropy(params):
            return _dist(params).entropy()

        return make_guide("lowrank", dim, rank + dim, init, transform, log_q, entropy,
                          lambda p: p["loc"])
