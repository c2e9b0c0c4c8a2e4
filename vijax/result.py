"""The fit result: immutable; draws, means and summaries in the constrained space."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from vijax.arviz_export import to_arviz
from vijax.checkpoint.write import save
from vijax.guides.base import Guide
from vijax.plots import plot
from vijax.psis import psis

__all__ = ["FitResult", "Diagnostics", "Summary"]


class Diagnostics(NamedTuple):
    """What the fit did. ``n_steps`` steps ran out of at most ``max_steps``;
    ``converged``/``stop_reason`` (``"converged"``, ``"max_steps"``) say why it stopped;
    ``k_hat``, ``ess`` and ``k_hat_reading`` are PSIS on ``psis_draws`` draws of q (Yao et
    al. 2018: k-hat < 0.5 good, < 0.7 usable, else unreliable; NaN when not computed);
    ``final_loss`` is the mean loss over the last 10% of steps; with ``guide="auto"``,
    ``ladder`` holds one ``(rung, final_loss, k_hat, wall_time, error)`` per rung tried
    (``error`` is ``""``, or the message of a rung that could not be fitted and was skipped)
    and
    ``rung`` the one chosen; ``criterion`` states which stopping criterion fired (or
    failed) with its measured figures; ``preconditioning`` how the fit's coordinates were
    whitened (or why not);
    ``data`` how each step saw the data (minibatches, KL weight; ``""``: all of it);
    ``objective`` names the loss (``"neg_elbo"``, ``"neg_iwae_bound"``, ...) and
    ``estimator`` the gradient estimator chosen (e.g. ``"reparam (continuous) + score
    function with rloo baseline (discrete: z)"``)."""

    n_steps: int
    n_nonfinite_skipped: int
    wall_time: float
    objective: str
    num_particles: int
    final_loss: float
    estimator: str = "reparam"
    converged: bool = False
    stop_reason: str = "max_steps"
    max_steps: int = 0
    k_hat: float = float("nan")
    ess: float = float("nan")
    k_hat_reading: str = "not computed"
    psis_draws: int = 0
    ladder: tuple = ()
    rung: str = ""
    criterion: str = ""
    preconditioning: str = ""
    data: str = ""


@functools.lru_cache(maxsize=128)
def _sampler(target, guide: Guide):
    """Jitted ``(keys (n,), params) -> dict of constrained draws (n, *shape)``."""

    def draw(key, params):
        theta, _ = guide.sample(key, params)
        return target.constrain(theta)

    return jax.jit(jax.vmap(draw, in_axes=(0, None)))


@functools.lru_cache(maxsize=64)
def _weighted_sampler(target, guide: Guide, n: int, constrained: bool = True):
    """Jitted ``(key, params, data, mparams=None) -> (draws, log weights (n,))`` with
    ``log w = log p~(theta) - log q(theta)`` for PSIS; the draws are constrained (a dict of
    ``(n, ...)``) or, with ``constrained=False``, the continuous unconstrained ``(n, dim)``;
    ``mparams``: the model's unconstrained parameters (``None``: their init)."""

    def one(key, params, data, mparams):
        theta, log_q = guide.sample(key, params)
        draw = target.constrain(theta) if constrained else theta[:target.dim]
        return draw, target.log_density(theta, data, frozenset(), mparams) - log_q

    return jax.jit(lambda key, params, data, mparams=None: jax.vmap(
        one, in_axes=(0, None, None, None))(jax.random.split(key, n), params, data, mparams))


_QUANTILES = (0.05, 0.5, 0.95)


class Summary(Mapping):
    """Per-latent posterior summary: ``summary["mu"]["mean"]`` etc.; prints as a table.

    Each latent maps to a dict with keys ``mean``, ``sd``, ``q05``, ``q50``, ``q95``, arrays of
    the latent's shape.
    """

    def __init__(self, stats: dict[str, dict[str, np.ndarray]], n_draws: int,
                 notes: tuple[str, ...] = ()):
        self._stats = stats
        self.n_draws = n_draws
        self.notes = tuple(notes)

    def __getitem__(self, name):
        return self._stats[name]

    def __iter__(self):
        return iter(self._stats)

    def __len__(self):
        return len(self._stats)

    def rows(self) -> list[tuple[str, float, float, float, float, float]]:
        """One row per latent element: ``(label, mean, sd, q05, q50, q95)``."""
        rows = []
        for name, s in self._stats.items():
            shape = s["mean"].shape
            for idx in np.ndindex(*shape):
                label = name + (("[" + ",".join(map(str, idx)) + "]") if shape else "")
                rows.append((label, *(float(s[k][idx]) for k in ("mean", "sd", "q05", "q50",
                                                                   "q95"))))
        return rows

    def __str__(self) -> str:
        rows = self.rows()
        width = max([8, *(len(r[0]) for r in rows)])
        head = f"{'':<{width}} {'mean':>10} {'sd':>10} {'5%':>10} {'50%':>10} {'95%':>10}"
        lines = [head, "-" * len(head)]
        for r in rows:
            lines.append(f"{r[0]:<{width}} " + " ".join(f"{v:>10.4g}" for v in r[1:]))
        lines.append(f"({self.n_draws} draws from the fitted guide)" if self._stats else
                     "(no global latents)")
        lines.extend(self.notes)
        return "\n".join(lines)

    __repr__ = __str__


def _check_n(n: Any, low: int) -> int:
    if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < low:
        raise ValueError(f"n must be an int >= {low}, got {n!r}")
    return int(n)


@dataclasses.dataclass(frozen=True, eq=False)
class FitResult:
    """The outcome of :func:`vijax.fit`.

    Attributes:
        model: the fitted :class:`vijax.Model`.
        guide: the guide functions (:class:`vijax.guides.Guide`); ``guide_spec`` its config.
        params: fitted guide parameters (the tail average of the iterates).
        last_params: parameters at the last step.
        opt_state: optimizer state at the last step.
        losses: ``(steps,)`` numpy array, the loss (negative ELBO) at every step.
        diagnostics: :class:`Diagnostics`.
        optimizer: the Optax transformation used.
        init_point: ``(full_dim,)`` unconstrained point the guide was centred on at the start.
        state: the loop's final :class:`vijax.loop.FitState` (parameters, optimizer and
            estimator state, step count): what ``resume`` continues from.
        loop_key: the PRNG key the per-step keys are folded from (``fold_in(loop_key, step)``).
        estimator: the estimator configuration object used (:mod:`vijax.estimators`).
        mparams: the model's parameters (:class:`vijax.Param`), unconstrained, as fitted
            (the same average as ``params``); ``None`` for a model without parameters.
        feed: the data feed (:class:`vijax.data.Feed`: minibatches, KL weight) or ``None``.
    """

    model: Any
    guide: Guide
    guide_spec: Any
    params: Any
    last_params: Any
    opt_state: Any
    losses: np.ndarray
    diagnostics: Diagnostics
    optimizer: Any
    init_point: Any
    state: Any = None
    loop_key: Any = None
    estimator: Any = None
    mparams: Any = None
    feed: Any = None

    @property
    def target(self):
        return self.model.target

    def __repr__(self) -> str:
        d = self.diagnostics
        return (f"FitResult(guide={self.guide.name!r}, objective={d.objective!r}, "
                f"steps={d.n_steps}, stop={d.stop_reason!r}, final_loss={d.final_loss:.6g}, "
                f"k_hat={d.k_hat:.3g}, latents={list(self.target.all_names)}"
                + (f", local={list(self.target.locals.names)}" if self.target.has_locals
                   else "")
                + (f", params={[b.name for b in self.target.plain_params]}"
                   if self.target.plain_params else "")
                + (f", layers={[b.name for b in self.target.layers]}" if self.target.layers
                   else "")
                + ")")

    @property
    def model_params(self) -> dict[str, jax.Array]:
        """The fitted model parameters (:class:`vijax.Param`), constrained: a dict from
        name to an array of the declared shape (empty for a model without parameters)."""
        if not self.target.plain_params:
            return {}
        dtype = jax.tree_util.tree_leaves(self.params)[0].dtype
        return self.target.constrain_params(self.mparams, dtype)

    def sample(self, key: jax.Array, n: int) -> dict[str, jax.Array]:
        """Draw ``n`` samples from q, mapped to the constrained space.

        Returns:
            dict from latent name to an array of shape ``(n, *latent_shape)``.

        Example:
            >>> draws = res.sample(jax.random.key(1), 1000)  # doctest: +SKIP
        """
        if isinstance(n, bool) or not isinstance(n, int | np.integer) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        if not isinstance(key, jax.Array):
            raise TypeError(f"key must be a JAX PRNG key, got {key!r}")
        keys = jax.random.split(key, int(n))
        return _sampler(self.target, self.guide)(keys, self.params)

    def mean(self, key: jax.Array | None = None, n: int = 4000) -> dict[str, jax.Array]:
        """Posterior mean of every latent (constrained space).

        Exact for latents with real support under guides with a closed-form mean (the
        Gaussian families and delta); otherwise a Monte Carlo estimate from ``n`` draws
        (key default ``jax.random.key(0)``: deterministic).

        Returns:
            dict from latent name to an array of the latent's shape.
        """
        if self.guide.mean is None:  # flows: no closed-form mean
            draws = self.sample(jax.random.key(0) if key is None else key, n)
            return {k: jnp.mean(v, axis=0) for k, v in draws.items()}
        loc = self.guide.mean(self.params)
        exact = self.target.unravel(loc)
        need_mc = [b for b in self.target.blocks if not b.is_identity]
        draws = self.sample(jax.random.key(0) if key is None else key, n) if need_mc else {}
        out = {}
        for b in self.target.blocks:
            out[b.name] = (exact[b.name].reshape(b.shape) if b.is_identity
                           else jnp.mean(draws[b.name], axis=0))
        for b in self.target.discrete:  # E[low + k] from the categorical probabilities
            out[b.name] = (b.low + loc[b.offset:b.offset + b.size]).reshape(b.shape)
        return out

    def summary(self, key: jax.Array | None = None, n: int = 4000,
                draws: dict[str, Any] | None = None) -> Summary:
        """Mean, sd and 5/50/95% quantiles per latent element from ``n`` draws of q.

        Args:
            key: PRNG key for the draws (default ``jax.random.key(0)``: deterministic).
            n: number of draws.
            draws: summarise these draws (dict of ``(n, *shape)`` arrays, e.g. from
                :meth:`sample`, possibly with derived quantities added) instead.

        Returns a :class:`Summary` (a mapping; ``print`` it for a table).
        """
        if draws is None:
            draws = self.sample(jax.random.key(0) if key is None else key, n)
        else:
            if not isinstance(draws, dict) or not draws:
                raise TypeError("draws must be a non-empty dict from name to (n, ...) arrays")
            sizes = {k: np.shape(v)[0] if np.ndim(v) else None for k, v in draws.items()}
            if len(set(sizes.values())) != 1 or None in sizes.values():
                raise ValueError(f"every entry of draws needs the same leading (draw) axis; got "
                                 f"{sizes}")
            n = next(iter(sizes.values()))
            if n < 1:
                raise ValueError("draws holds no draws (a leading axis of size 0)")
        stats = {}
        for name, d in draws.items():
            d = np.asarray(d, np.float64)
            q = np.quantile(d, _QUANTILES, axis=0)
            stats[name] = {"mean": d.mean(0), "sd": d.std(0, ddof=1) if n > 1 else
                           np.zeros(d.shape[1:]), "q05": q[0], "q50": q[1], "q95": q[2]}
        return Summary(stats, int(n), self._summary_notes())

    def _summary_notes(self) -> tuple[str, ...]:
        notes = []
        target = self.model.target
        if target.plain_params:
            mp = self.model_params
            notes.append("model parameters (point estimates, res.model_params): " + ", ".join(
                f"{k} {tuple(np.shape(v))}" if np.size(v) > 4 else
                f"{k}={np.array2string(np.asarray(v), precision=4)}" for k, v in mp.items()))
        for b in target.layers:
            notes.append(f"layer {b.name}: {b.layer.describe()} (vj.nn.posterior(res))")
        if target.has_locals:
            notes.append("local latents (one per observation; vj.local_posterior(res, data)): "
                         + ", ".join(f"{b.name} {b.shape}" for b in target.locals.blocks))
        return tuple(notes)

    # --- PSIS ----------------------------------------------------------------------------------
    def psis(self, key: jax.Array | None = None, n: int = 4000, data: Any = None):
        """Draws of q with their Pareto-smoothed importance weights.

        Returns ``(draws, result)``: a dict of ``(n, *shape)`` constrained draws and a
        :class:`vijax.PSISResult` (``log_weights (n,)`` normalised, ``k_hat``, ``ess``,
        ``reading``). ``data`` defaults to the model's bound data.
        """
        n = _check_n(n, 10)
        if self.guide.point_mass:
            raise ValueError("PSIS needs a guide with a density; this guide is a point mass")
        data = self.model.data if data is None else data
        data = jax.tree_util.tree_map(jnp.asarray, data)
        draws, lw = _weighted_sampler(self.target, self.guide, n)(
            jax.random.key(0) if key is None else key, self.params, data, self.mparams)
        lw = np.asarray(lw, np.float64)
        return draws, psis(np.where(np.isfinite(lw), lw, -np.inf))

    def psis_mean(self, key: jax.Array | None = None, n: int = 4000, data: Any = None
                  ) -> dict[str, np.ndarray]:
        """PSIS-corrected posterior mean of every latent: ``sum_s w_s z_s`` over n draws of q
        (trust it when ``k_hat < 0.7``)."""
        draws, res = self.psis(key, n, data)
        w = np.exp(res.log_weights)
        return {k: np.tensordot(w, np.asarray(v, np.float64), axes=1) for k, v in draws.items()}

    def psis_resample(self, key: jax.Array | None = None, n: int = 1000, pool: int = 4000,
                      data: Any = None) -> dict[str, np.ndarray]:
        """``n`` draws resampled (with replacement) from ``pool`` draws of q with their PSIS
        weights: approximate posterior draws that correct q where ``k_hat < 0.7``."""
        n = _check_n(n, 1)
        key = jax.random.key(0) if key is None else key
        k_draw, k_pick = jax.random.split(key)
        draws, res = self.psis(k_draw, pool, data)
        idx = np.asarray(jax.random.choice(k_pick, pool, (n,), p=jnp.exp(jnp.asarray(
            res.log_weights))))
        return {k: np.asarray(v)[idx] for k, v in draws.items()}

    # --- workflow: checkpoints, ArviZ, plots (implemented in their own modules) -------------
    def save(self, path) -> None:
        """Write this result to ``path`` without pickle (see :func:`vijax.io.save`)."""
        save(self, path)

    def to_arviz(self, key: jax.Array | None = None, n: int = 1000):
        """Draws of q as ArviZ data (see :func:`vijax.arviz_export.to_arviz`)."""
        return to_arviz(self, key=key, n=n)

    def plot(self, **kwargs):
        """The loss trace and posterior marginals (see :func:`vijax.plots.plot`)."""
        return plot(self, **kwargs)
