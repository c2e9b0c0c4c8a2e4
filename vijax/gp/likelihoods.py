"""Observation models ``p(y_i | f_i)`` for sparse variational GPs.

Each likelihood gives the expected log-likelihood under a Gaussian marginal
``q(f_i) = N(mu_i, var_i)``: in closed form for :class:`Gaussian`, otherwise by
Gauss-Hermite quadrature, ``E[g(f)] ~ pi^-1/2 sum_k w_k g(mu + sqrt(2 var) x_k)``
(``num_gh`` nodes, default 20). Hyper-parameters are ``vijax.model.Param`` as in
:mod:`vijax.gp.kernels`.

Example:
    >>> import jax.numpy as jnp
    >>> lik = get_likelihood("bernoulli")
    >>> float(lik.expected_log_prob({}, jnp.ones(1), jnp.zeros(1), jnp.ones(1))[0]) < 0
    True
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import gammaln, log_ndtr, ndtr
from numpyro.distributions import constraints

from vijax.gp._params import Hyperparameters, as_param, init_value

__all__ = ["Likelihood", "Gaussian", "Bernoulli", "Poisson", "StudentT", "get_likelihood",
           "gauss_hermite"]


def gauss_hermite(num: int, dtype: Any) -> tuple[jax.Array, jax.Array]:
    """Nodes ``x_k`` and weights ``w_k / sqrt(pi)`` (summing to 1) of ``num``-point
    Gauss-Hermite quadrature for ``E_{N(0,1/2)}``; computed in float64 on the host."""
    x, w = np.polynomial.hermite.hermgauss(num)
    return jnp.asarray(x, dtype), jnp.asarray(w / math.sqrt(math.pi), dtype)


class Likelihood(Hyperparameters):
    """``log p(y | f)`` per observation; ``_hypers``: ``{name: (support, default)}``."""

    _hypers: dict[str, tuple[constraints.Constraint, Any]] = {}
    num_gh: int = 20

    def __init__(self, num_gh: int = 20, **values: Any) -> None:
        name = type(self).__name__
        if not (isinstance(num_gh, int) and num_gh >= 1):
            raise ValueError(f"{name}: num_gh must be a positive int, got {num_gh!r}")
        self.num_gh = num_gh
        self._spec = {k: as_param(name, k, values.get(k, d), s)
                      for k, (s, d) in self._hypers.items()}


    def init_params(self, dtype: Any = jnp.float32, y_var: float = 1.0) -> dict:
        """Constrained initial hyper-parameters; ``None`` ones are set from ``y_var``."""
        return {k: init_value(p, dtype) if p is not None else jnp.asarray(0.1 * y_var, dtype)
                for k, p in self._spec.items()}

    def check_y(self, y: np.ndarray) -> None:
        """Raise ``ValueError`` naming ``y`` if a value is outside the likelihood's support."""

    def log_prob(self, params: dict, f: jax.Array, y: jax.Array) -> jax.Array:
        raise NotImplementedError

    def expected_log_prob(self, params: dict, y: jax.Array, mu: jax.Array,
                          var: jax.Array) -> jax.Array:
        """``E_{N(f; mu, var)}[log p(y | f)]`` per observation, shapes ``(B,)``."""
        x, w = gauss_hermite(self.num_gh, mu.dtype)
        f = mu[:, None] + jnp.sqrt(2.0 * jnp.maximum(var, 0.0))[:, None] * x
        return self.log_prob(params, f, y[:, None]) @ w

    def predict_y(self, params: dict, mu: jax.Array, var: jax.Array) -> tuple:
        """Predictive mean and variance of ``y`` given ``q(f) = N(mu, var)``, ``(n,)`` each."""
        x, w = gauss_hermite(self.num_gh, mu.dtype)
        f = mu[:, None] + jnp.sqrt(2.0 * jnp.maximum(var, 0.0))[:, None] * x
        m, v = self._moments(params, f)
        mean = m @ w
        return mean, (v + m * m) @ w - mean * mean

    def _moments(self, params, f):
        raise NotImplementedError


class Gaussian(Likelihood):
    """``y ~ N(f, noise)`` (``noise`` a variance; ``None``: 0.1 times the variance of y).
    The expected log-likelihood is closed-form:
    ``-log(2 pi noise) / 2 - ((y - mu)^2 + var) / (2 noise)``."""

    _hypers = {"noise": (constraints.positive, None)}

    def __init__(self, noise: Any = None) -> None:
        super().__init__(noise=noise)

    def log_prob(self, params, f, y):
        s2 = params["noise"]
        return -0.5 * (jnp.log(2 * math.pi * s2) + (y - f) ** 2 / s2)

    def expected_log_prob(self, params, y, mu, var):
        s2 = params["noise"]
        return -0.5 * (jnp.log(2 * math.pi * s2) + ((y - mu) ** 2 + var) / s2)

    def predict_y(self, params, mu, var):
        return mu, var + params["noise"]


class Bernoulli(Likelihood):
    """``y in {0, 1}``, ``p(y = 1 | f) = sigmoid(f)`` (``link="logit"``) or ``Phi(f)``
    (``link="probit"``)."""

    def __init__(self, link: str = "logit", num_gh: int = 20) -> None:
        if link not in ("logit", "probit"):
            raise ValueError(f"Bernoulli: link must be 'logit' or 'probit', got {link!r}")
        self.link = link
        super().__init__(num_gh=num_gh)

    def __repr__(self) -> str:
        return f"Bernoulli(link={self.link!r})"

    def check_y(self, y):
        if not np.all((y == 0) | (y == 1)):
            bad = y[~((y == 0) | (y == 1))][:3]
            raise ValueError(f"y: a Bernoulli likelihood needs labels 0 or 1, got {bad}")

    def log_prob(self, params, f, y):
        # log p(y | f) = log F(s f) with s = 2y - 1 (F symmetric): one evaluation, not two
        sf = jnp.where(y > 0.5, f, -f)
        return log_ndtr(sf) if self.link == "probit" else jax.nn.log_sigmoid(sf)

    def predict_y(self, params, mu, var):
        if self.link == "probit":  # exact: P(y=1) = Phi(mu / sqrt(1 + var))
            p = ndtr(mu / jnp.sqrt(1.0 + var))
            return p, p * (1 - p)
        p, _ = super().predict_y(params, mu, var)
        return p, p * (1 - p)

    def _moments(self, params, f):
        p = jax.nn.sigmoid(f)
        return p, p * (1 - p)


class Poisson(Likelihood):
    """Counts ``y ~ Poisson(exp(f))``."""

    def check_y(self, y):
        ok = (y >= 0) & (y == np.round(y))
        if not np.all(ok):
            raise ValueError(f"y: a Poisson likelihood needs non-negative integer counts, "
                             f"got {y[~ok][:3]}")

    def log_prob(self, params, f, y):
        return y * f - jnp.exp(f) - gammaln(y + 1.0)

    def expected_log_prob(self, params, y, mu, var):
        # closed form: E[f] = mu, E[exp f] = exp(mu + var / 2)
        return y * mu - jnp.exp(mu + 0.5 * var) - gammaln(y + 1.0)

    def predict_y(self, params, mu, var):
        mean = jnp.exp(mu + 0.5 * var)
        return mean, mean + jnp.expm1(var) * mean * mean


class StudentT(Likelihood):
    """``y ~ StudentT(df, loc=f, scale)`` for outlier-robust regression."""

    _hypers = {"df": (constraints.positive, 3.0), "scale": (constraints.positive, None)}

    def __init__(self, df: Any = 3.0, scale: Any = None, num_gh: int = 20) -> None:
        super().__init__(num_gh=num_gh, df=df, scale=scale)

    def log_prob(self, params, f, y):
        nu, s = params["df"], params["scale"]
        z = (y - f) / s
        return (gammaln((nu + 1) / 2) - gammaln(nu / 2) - 0.5 * jnp.log(nu * math.pi)
                - jnp.log(s) - (nu + 1) / 2 * jnp.log1p(z * z / nu))

    def init_params(self, dtype=jnp.float32, y_var=1.0):
        out = super().init_params(dtype, y_var)
        if self._spec["scale"] is None:
            out["scale"] = jnp.asarray(math.sqrt(0.1 * y_var), dtype)
        return out

    def predict_y(self, params, mu, var):
        nu, s = params["df"], params["scale"]
        return mu, var + jnp.where(nu > 2, s * s * nu / jnp.maximum(nu - 2, 1e-6), jnp.inf)


_NAMES = {"gaussian": Gaussian, "normal": Gaussian, "bernoulli": Bernoulli,
          "bernoulli-logit": Bernoulli, "poisson": Poisson, "studentt": StudentT,
          "student-t": StudentT}


def get_likelihood(likelihood: Any) -> Likelihood:
    """A :class:`Likelihood` from itself or a name: ``"gaussian"``, ``"bernoulli"``
    (logit), ``"bernoulli-probit"``, ``"poisson"``, ``"studentt"``."""
    if isinstance(likelihood, Likelihood):
        return likelihood
    if isinstance(likelihood, str):
        key = likelihood.lower()
        if key == "bernoulli-probit":
            return Bernoulli(link="probit")
        if key in _NAMES:
            return _NAMES[key]()
    raise ValueError(f"likelihood={likelihood!r} is not a Likelihood or one of "
                     f"{sorted(set(_NAMES) | {'bernoulli-probit'})}")
