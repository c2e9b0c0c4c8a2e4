"""The default optimizer: Adam with a decaying step size (used with tail iterate averaging)."""

from __future__ import annotations

import jax.numpy as jnp
import optax

__all__ = ["default_optimizer", "DEFAULT_LEARNING_RATE"]

DEFAULT_LEARNING_RATE = 0.05


def _decay(count):
    # lr_t = lr0 / sqrt(1 + t / 1000): fast travel early, small steps once near the optimum,
    # without depending on the step budget (so one compiled program serves every budget).
    return -DEFAULT_LEARNING_RATE / jnp.sqrt(1.0 + count / 1000.0)


_DEFAULT = optax.chain(optax.scale_by_adam(), optax.scale_by_schedule(_decay))


def default_optimizer() -> optax.GradientTransformation:
    """Adam (b1=0.9, b2=0.999) with step size ``0.05 / sqrt(1 + t/1000)``.

    Chosen on measurements: against ``t/100`` it reaches the ELBO optimum of slow, ridge-shaped
    posteriors (centred eight schools) much sooner, and with the tail averaging of ``fit`` its
    error on a Bayesian linear regression stays at 0.02 posterior sd (one particle, 2,000 steps).

    Returned as one shared object, so fits that use the default share their compiled loop.

    Example:
        >>> import vijax as vj
        >>> vj.default_optimizer() is vj.default_optimizer()
        True
    """
    return _DEFAULT
