"""Model specification: latent declarations and the log joint density.

A model is a pure function of a dict of *constrained* latent values and a data pytree that
returns the scalar log joint density ``log p(z, x)``. Latents are declared once, with their
shape and support; :mod:`vijax.target` turns the declaration into a flat unconstrained vector.
"""

from __future__ import annotations

import dataclasses
import keyword
from collections.abc import Callable, Mapping
from typing import Any

import jax.numpy as jnp
from numpyro.distributions import constraints

__all__ = ["Latent", "Model", "model"]


def _as_shape(shape: Any) -> tuple[int, ...]:
    if isinstance(shape, int) and not isinstance(shape, bool):
        shape = (shape,)
    try:
        dims = tuple(shape)
    except TypeError:
        raise TypeError(f"shape must be a tuple of non-negative ints, got {shape!r}") from None
    for d in dims:
        if isinstance(d, bool) or not isinstance(d, int | jnp.integer) or int(d) < 0:
            raise ValueError(f"shape must be a tuple of non-negative ints, got {shape!r}")
    return tuple(int(d) for d in dims)


@dataclasses.dataclass(frozen=True, eq=False)
class Latent:
    """Declaration of one latent variable.

    Args:
        shape: shape of the latent's constrained value, e.g. ``()`` or ``(8,)`` or ``(3, 3)``
            for a matrix-valued latent (an ``int`` n means ``(n,)``).
        support: a numpyro constraint (``constraints.real``, ``positive``, ``interval(a, b)``,
            ``simplex``, ``lower_cholesky``, ...). vijax maps the real line onto it with
            ``numpyro.distributions.transforms.biject_to`` and adds the log-Jacobian.

    Example:
        >>> from numpyro.distributions import constraints
        >>> Latent(shape=(3,), support=constraints.simplex).shape
        (3,)
    """

    shape: tuple[int, ...] = ()
    support: constraints.Constraint = dataclasses.field(default_factory=lambda: constraints.real)

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", _as_shape(self.shape))
        if not isinstance(self.support, constraints.Constraint):
            raise TypeError(
                "support must be a numpyro constraint (numpyro.distributions.constraints), "
                f"got {self.support!r}"
            )


def _validate_latents(latents: Any) -> dict[str, Latent]:
    if not isinstance(latents, Mapping):
        raise TypeError(f"latents must be a dict from name to vj.Latent, got {type(latents)}")
    if not latents:
        raise ValueError("a model needs at least one latent; got an empty latents dict")
    out = {}
    for name, lat in latents.items():
        if not isinstance(name, str) or not name.isidentifier() or keyword.iskeyword(name):
            raise ValueError(f"invalid latent name {name!r}: names must be Python identifiers")
        if not isinstance(lat, Latent):
            raise TypeError(f"latent {name!r} must be declared with vj.Latent(...), got {lat!r}")
        out[name] = lat
    return out


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """A probabilistic model: declared latents plus a log joint density.

    Give either ``log_joint(z, data) -> scalar``, or the factorised form
    ``log_prior(z) -> scalar`` plus ``log_likelihood(z, data) -> (N,)`` (one value per
    observation; the leading axis of every data leaf is the observation axis). In both, ``z``
    is a dict of constrained latent values of the declared shapes.

    Args:
        log_joint: ``(z: dict, data: pytree) -> scalar`` log density up to a constant.
        latents: dict from latent name to :class:`Latent`.
        log_prior: factorised form, ``(z) -> scalar``.
        log_likelihood: factorised form, ``(z, data) -> (N,)``.
        data: optional data pytree bound to the model, used by ``fit`` when none is given.

    Example:
        >>> import numpyro.distributions as dist
        >>> m = Model(lambda z, d: dist.Normal(z["mu"], 1.0).log_prob(d).sum(),
        ...           {"mu": Latent()})
        >>> sorted(m.latents)
        ['mu']
    """

    log_joint: Callable[[dict, Any], Any] | None = None
    latents: Mapping[str, Latent] = dataclasses.field(default_factory=dict)
    log_prior: Callable[[dict], Any] | None = None
    log_likelihood: Callable[[dict, Any], Any] | None = None
    data: Any = None
    target: Any = dataclasses.field(default=None, repr=False)

    def __post_init__(self) -> None:
        from vijax.target import Target  # the target stage is built from the spec, once

        object.__setattr__(self, "latents", _validate_latents(self.latents))
        factorised = self.log_prior is not None or self.log_likelihood is not None
        if self.log_joint is not None and factorised:
            raise ValueError("give either log_joint, or log_prior and log_likelihood, not both")
        if self.log_joint is None and not factorised:
            raise ValueError("a model needs log_joint, or log_prior and log_likelihood")
        if factorised and (self.log_prior is None or self.log_likelihood is None):
            missing = "log_prior" if self.log_prior is None else "log_likelihood"
            raise ValueError(f"the factorised form needs both log_prior and log_likelihood; "
                             f"{missing} is missing")
        for fname in ("log_joint", "log_prior", "log_likelihood"):
            fn = getattr(self, fname)
            if fn is not None and not callable(fn):
                raise TypeError(f"{fname} must be callable, got {fn!r}")
        if self.target is None:
            object.__setattr__(self, "target", Target.from_model(self))

    @property
    def factorised(self) -> bool:
        """Whether the model was given as ``log_prior`` plus per-observation ``log_likelihood``."""
        return self.log_joint is None

    def log_density(self, z: dict, data: Any) -> Any:
        """Log joint density at constrained values ``z`` (scalar); sums the factorised form."""
        if self.log_joint is not None:
            return self.log_joint(z, data)
        return self.log_prior(z) + jnp.sum(self.log_likelihood(z, data))

    def with_data(self, data: Any) -> Model:
        """The same model (same compiled code) with other data bound to it."""
        return dataclasses.replace(self, data=data)


def model(**latents: Latent) -> Callable[[Callable], Model]:
    """Decorator: ``@vj.model(mu=vj.Latent(), ...)`` turns ``log_joint(z, data)`` into a Model.

    Example:
        >>> import numpyro.distributions as dist
        >>> @model(mu=Latent())
        ... def m(z, data):
        ...     return dist.Normal(0, 1).log_prob(z["mu"])
        >>> isinstance(m, Model)
        True
    """

    def wrap(fn: Callable) -> Model:
        if not callable(fn):
            raise TypeError(f"@vj.model must decorate a function, got {fn!r}")
        return Model(log_joint=fn, latents=latents)

    return wrap
