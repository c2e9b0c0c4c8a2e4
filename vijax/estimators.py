"""Gradient estimators: what ``fit(..., estimator=...)`` accepts.

Each is a small frozen configuration (hashable: part of the compile-cache key); the objective
built from it lives in :mod:`vijax.objective`. Names and objects:

- ``"reparam"`` / ``Reparam()``: reparameterised ELBO gradient (Kingma & Welling 2014);
  loss ``neg_elbo``.
- ``"stl"`` / ``STL()``: path derivative of the ELBO, sticking the landing (Roeder et al.
  2017); ``neg_elbo``.
- ``"iwae"`` / ``IWAE()``: reparameterised gradient of the importance-weighted bound (Burda et
  al. 2016); ``neg_iwae_bound``.
- ``"dreg"`` / ``DReG()``: doubly reparameterised IWAE gradient (Tucker et al. 2018);
  ``neg_iwae_bound``.
- ``"renyi"`` / ``Renyi(alpha=0.5)``: Renyi variational bound (Li & Turner 2016);
  ``neg_renyi_bound``.
- ``"score"`` / ``Score(baseline="rloo")``: score-function (REINFORCE) ELBO gradient;
  ``neg_elbo`` (``neg_iwae_bound`` with ``baseline="vimco"``).
- ``"auto"`` / ``Auto()`` (the default): ``reparam`` for continuous latents, the score
  function for discrete ones; ``neg_elbo``.
- ``"rws"`` / ``RWS()``: reweighted wake-sleep (Bornschein & Bengio 2015), models with local
  latents and model parameters (Helmholtz machines); ``neg_iwae_bound``
  (:mod:`vijax.objective_wake_sleep`).
- ``WakeSleep(sample)``: classic wake-sleep (Hinton et al. 1995): the guide is trained on
  ``(z, x)`` dreamed by the user's ``sample`` from the model; ``neg_elbo``.

Discrete latents never get a pathwise gradient: with every estimator their (categorical)
guide is trained by the score function, with a leave-one-out baseline across particles
(RLOO, ``K >= 2``) or a moving-average baseline (``K = 1``) under ELBO estimators, and with
VIMCO's per-sample baselines (Mnih & Rezende 2016) under multi-sample bounds. ``Score``
applies the score function to the continuous latents too; its ``baseline`` is ``"rloo"``
(leave-one-out mean of the other particles' learning signals, Kool et al. 2019), ``"ema"``
(an exponential moving average of past signals carried in the loop state), ``"vimco"`` (the
IWAE bound with VIMCO baselines) or ``None``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

__all__ = ["Reparam", "STL", "IWAE", "DReG", "Renyi", "Score", "Auto", "RWS", "WakeSleep",
           "ESTIMATOR_NAMES", "resolve_estimator", "BASELINES"]

BASELINES = ("rloo", "ema", "vimco", None)


@dataclasses.dataclass(frozen=True)
class Reparam:
    """Reparameterised ELBO gradient (closed-form entropy where the guide has one)."""

    name = "reparam"
    multi_sample = False


@dataclasses.dataclass(frozen=True)
class STL:
    """Sticking the landing (Roeder et al. 2017): the reparameterised ELBO gradient without
    the score term of ``log q``, i.e. ``log q`` evaluated at stopped parameters. Its variance
    vanishes when q equals the posterior. Needs ``log q`` at a point: for IAF guides that is
    ``dim`` sequential passes per layer (slower steps)."""

    name = "stl"
    multi_sample = False


@dataclasses.dataclass(frozen=True)
class IWAE:
    """Importance-weighted bound ``log mean_k w_k`` (Burda et al. 2016), ``w = p~ / q``;
    tighter than the ELBO for ``K >= 2`` (equal at ``K = 1``)."""

    name = "iwae"
    multi_sample = True
    alpha = 0.0


@dataclasses.dataclass(frozen=True)
class DReG:
    """Doubly reparameterised gradient of the IWAE bound (Tucker et al. 2018):
    ``sum_k w~_k^2 d log w_k / d theta_k * d theta_k / d params`` with ``log q`` at stopped
    parameters; lower variance than :class:`IWAE`, the same expectation."""

    name = "dreg"
    multi_sample = True
    alpha = 0.0


@dataclasses.dataclass(frozen=True)
class Renyi:
    """Renyi variational bound ``1/(1-alpha) log mean_k w_k^(1-alpha)`` (Li & Turner 2016):
    ``alpha = 0`` is the IWAE bound, ``alpha -> 1`` the ELBO. ``alpha >= 0``, ``alpha != 1``."""

    alpha: float = 0.5
    name = "renyi"
    multi_sample = True

    def __post_init__(self) -> None:
        a = self.alpha
        if isinstance(a, bool) or not isinstance(a, int | float) or not 0 <= a < float("inf"):
            raise ValueError(f"Renyi alpha must be a finite number >= 0, got {a!r}")
        if a == 1:
            raise ValueError("Renyi alpha = 1 is the ELBO: use estimator='reparam' (or 'stl')")
        object.__setattr__(self, "alpha", float(a))


@dataclasses.dataclass(frozen=True)
class Score:
    """Score-function (REINFORCE) gradient for every latent, with a control variate.

    Args:
        baseline: ``"rloo"`` (needs ``num_particles >= 2``), ``"ema"``, ``"vimco"`` (IWAE
            bound; needs ``num_particles >= 2``) or ``None``.
        decay: the moving average's decay for ``"ema"``, in (0, 1).
    """

    baseline: str | None = "rloo"
    decay: float = 0.9
    name = "score"

    def __post_init__(self) -> None:
        if self.baseline not in BASELINES:
            raise ValueError(f"Score baseline must be one of {list(BASELINES)}, got "
                             f"{self.baseline!r}")
        d = self.decay
        if isinstance(d, bool) or not isinstance(d, int | float) or not 0 < d < 1:
            raise ValueError(f"Score decay must be in (0, 1), got {d!r}")
        object.__setattr__(self, "decay", float(d))

    @property
    def multi_sample(self) -> bool:
        return self.baseline == "vimco"

    @property
    def alpha(self) -> float:
        return 0.0


@dataclasses.dataclass(frozen=True)
class Auto:
    """``reparam`` for continuous latents; score function with RLOO (``K >= 2``) or a moving
    average baseline (``K = 1``) for discrete ones. The result records the choice."""

    name = "auto"
    multi_sample = False


@dataclasses.dataclass(frozen=True)
class RWS:
    """Reweighted wake-sleep (Bornschein & Bengio 2015) for models with local latents.

    Per row, ``K = num_particles >= 2`` draws ``z_k ~ q(z | x)`` (no gradient through the
    draw: discrete latents are sampled, continuous ones drawn and stopped), ``log w_k =
    log p(x, z_k) - log q(z_k | x)``, ``wbar = softmax(log w)`` (stopped). The model's
    parameters follow the wake-theta gradient ``sum_k wbar_k grad log p(x, z_k)`` (the IWAE
    bound's), the guide the wake-phi gradient ``sum_k wbar_k grad log q(z_k | x)``; the loss
    value is the negative IWAE bound ``-log mean_k w_k``. Unlike IWAE it needs no pathwise
    or score-function gradient of the guide: discrete latents of any size are trained
    without a baseline.

    Example:
        >>> import vijax as vj
        >>> vj.estimators.resolve_estimator("rws")
        RWS()
    """

    name = "rws"
    multi_sample = True
    alpha = 0.0


@dataclasses.dataclass(frozen=True)
class WakeSleep:
    """Classic wake-sleep (Hinton et al. 1995) for models with local latents.

    Wake phase: the model's parameters follow ``grad log p(x, z)``, ``z ~ q(z | x)`` stopped
    (``num_particles`` draws averaged). Sleep phase: the guide follows ``grad log q(z' | x')``
    on ``(z', x')`` dreamed from the model by ``sample``. The loss value is the negative ELBO
    estimate on the real batch.

    Args:
        sample: ``(key, params, batch_size) -> (local latents, data batch)``: ``params`` the
            model's constrained parameters (the dict the model receives), the latents a dict
            of ``(batch_size,) + shape`` per local latent, the batch shaped like the real
            data's (the same pytree, ``batch_size`` rows). Checked by tracing at build time.

    Example:
        >>> import jax, vijax as vj
        >>> ws = vj.estimators.WakeSleep(lambda key, p, n: ({"h": jax.random.bernoulli(
        ...     key, 0.5, (n, 3))}, jax.random.bernoulli(key, 0.5, (n, 8))))
        >>> ws.name
        'wake_sleep'
    """

    sample: Callable
    name = "wake_sleep"
    multi_sample = False

    def __post_init__(self) -> None:
        if not callable(self.sample):
            raise TypeError(f"WakeSleep sample must be a function (key, params, batch_size) "
                            f"-> (local latents, data batch), got {self.sample!r}")


ESTIMATOR_NAMES = {"reparam": Reparam, "stl": STL, "iwae": IWAE, "dreg": DReG,
                   "renyi": Renyi, "score": Score, "auto": Auto, "rws": RWS}


def resolve_estimator(estimator: Any):
    """A configured estimator object from a name or an object (errors list the names)."""
    if isinstance(estimator, str):
        if estimator in ("wake_sleep", "wakesleep", "ws"):
            raise ValueError("wake-sleep needs the model's sampler for its sleep phase: pass "
                             "estimator=vj.estimators.WakeSleep(sample), sample(key, params, "
                             "batch_size) -> (local latents, data batch); or use "
                             "estimator='rws' (reweighted wake-sleep, no sampler needed)")
        try:
            return ESTIMATOR_NAMES[estimator]()
        except KeyError:
            raise ValueError(f"unknown estimator {estimator!r}; valid names are "
                             f"{sorted(ESTIMATOR_NAMES)} or a configured object such as "
                             "vj.estimators.Renyi(alpha=0.5)") from None
    if isinstance(estimator, (*ESTIMATOR_NAMES.values(), WakeSleep)):
        return estimator
    raise TypeError(f"estimator must be one of {sorted(ESTIMATOR_NAMES)} or a vj.estimators "
                    f"object, got {estimator!r}")
