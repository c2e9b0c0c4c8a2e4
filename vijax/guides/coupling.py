"""Coupling-flow guides: rational-quadratic spline coupling (Durkan et al. 2019) and affine
coupling (RealNVP, Dinh et al. 2017).

A coupling layer splits ``x = (x_a, x_b)`` with ``x_a`` the first ``dim // 2`` coordinates,
keeps ``x_a`` and transforms ``x_b`` elementwise with parameters ``NN(x_a)``:

    spline:  y_b = RQS(x_b; NN(x_a))  (linear tails outside [-B, B]),
    affine:  y_b = x_b * exp(s) + t,  (s, t) = NN(x_a),  s soft-clipped to (-3, 3);

``log|det J|`` is the sum of the elementwise log-derivatives; the inverse is as cheap as the
forward. Layers alternate which half is kept (see :mod:`vijax.guides.flow`).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from vijax.guides.base import Guide
from vijax.guides.flow import (
    Layer,
    build_flow_guide,
    check_flow_config,
    default_hidden,
    default_layers,
)
from vijax.guides.meanfield import MeanField
from vijax.guides.networks import mlp
from vijax.guides.rq_spline import num_params, rq_spline

__all__ = ["Spline", "RealNVP", "spline_coupling_layer", "affine_coupling_layer"]

LOG_SCALE_BOUND = 3.0


def _check_dim(kind: str, dim: int, names) -> None:
    if dim < 2:
        raise ValueError(f"{kind} is a coupling flow and needs at least 2 unconstrained "
                         f"dimensions; latent(s) {list(names)} have {dim}. Use guide='iaf' "
                         "or a Gaussian guide for a single dimension")


def spline_coupling_layer(dim: int, hidden, num_bins: int, bound: float) -> Layer:
    """One RQ-spline coupling bijection of ``(dim,)`` vectors."""
    d_a = dim // 2
    d_b = dim - d_a
    per = num_params(num_bins)
    net_init, net_apply = mlp(d_a, hidden, d_b * per)
    elementwise = jax.vmap(rq_spline, in_axes=(0, 0, None, None))

    def forward(params, x):
        raw = net_apply(params, x[:d_a]).reshape(d_b, per)
        y_b, log_det = elementwise(x[d_a:], raw, bound, False)
        return jnp.concatenate([x[:d_a], y_b]), jnp.sum(log_det)

    def inverse(params, y):
        raw = net_apply(params, y[:d_a]).reshape(d_b, per)
        x_b, log_det = elementwise(y[d_a:], raw, bound, True)
        return jnp.concatenate([y[:d_a], x_b]), jnp.sum(log_det)

    return Layer(net_init, forward, inverse)


def affine_coupling_layer(dim: int, hidden) -> Layer:
    """One affine (RealNVP) coupling bijection of ``(dim,)`` vectors."""
    d_a = dim // 2
    d_b = dim - d_a
    net_init, net_apply = mlp(d_a, hidden, 2 * d_b)

    def scale_shift(params, x_a):
        out = net_apply(params, x_a)
        log_scale = LOG_SCALE_BOUND * jnp.tanh(out[:d_b] / LOG_SCALE_BOUND)
        return log_scale, out[d_b:]

    def forward(params, x):
        log_scale, shift = scale_shift(params, x[:d_a])
        return (jnp.concatenate([x[:d_a], x[d_a:] * jnp.exp(log_scale) + shift]),
                jnp.sum(log_scale))

    def inverse(params, y):
        log_scale, shift = scale_shift(params, y[:d_a])
        return (jnp.concatenate([y[:d_a], (y[d_a:] - shift) * jnp.exp(-log_scale)]),
                jnp.sum(log_scale))

    return Layer(net_init, forward, inverse)


@dataclasses.dataclass(frozen=True)
class Spline:
    """Rational-quadratic spline coupling flow over a Gaussian base guide.

    Args:
        num_layers: coupling layers; ``None``: ``clip(ceil(log2 dim) + 2, 3, 8)``, so every
            coordinate is transformed at least once in each role.
        num_bins: spline bins K (>= 2).
        hidden: conditioner widths; ``None``: two layers of ``clip(4 dim, 32, 512)``.
        bound: the spline acts on ``[-bound, bound]`` (identity outside).
        base: the base guide (a Gaussian family object); default ``MeanField()`` (scale
            0.1: from a unit-scale base the spline leaked far-tail draws on eight schools
            and one_comp, neg-ELBO 110 and 80 instead of 34 and 41; see
            ``benchmarks/README.md``).

    Example:
        >>> import vijax as vj
        >>> vj.guides.Spline(num_bins=8).name
        'spline'
    """

    num_layers: int | None = None
    num_bins: int = 8
    hidden: tuple[int, ...] | None = None
    bound: float = 5.0
    base: object = dataclasses.field(default_factory=MeanField)
    name = "spline"
    default_learning_rate = 0.003

    def __post_init__(self) -> None:
        check_flow_config("Spline", self.num_layers, self.hidden)
        if isinstance(self.num_bins, bool) or not isinstance(self.num_bins, int) \
                or self.num_bins < 2:
            raise ValueError(f"Spline num_bins must be an int >= 2, got {self.num_bins!r}")
        if not isinstance(self.bound, int | float) or not 0 < self.bound < float("inf"):
            raise ValueError(f"Spline bound must be a positive number, got {self.bound!r}")
        if self.hidden is not None:
            object.__setattr__(self, "hidden", tuple(self.hidden))

    def build(self, dim: int, names: tuple[str, ...]) -> Guide:
        _check_dim("guide 'spline'", dim, names)
        num_layers = self.num_layers or default_layers(dim)
        hidden = self.hidden or default_hidden(dim)
        layers = [spline_coupling_layer(dim, hidden, self.num_bins, float(self.bound))
                  for _ in range(num_layers)]
        return build_flow_guide("spline", dim, names, self.base, layers)


@dataclasses.dataclass(frozen=True)
class RealNVP:
    """Affine coupling flow (RealNVP) over a Gaussian base guide.

    Args:
        num_layers: coupling layers; ``None``: ``clip(ceil(log2 dim) + 2, 3, 8)``.
        hidden: conditioner widths; ``None``: two layers of ``clip(4 dim, 32, 512)``.
        base: the base guide (a Gaussian family object); default ``MeanField()`` (scale
            0.1: from a unit-scale base the spline leaked far-tail draws on eight schools
            and one_comp, neg-ELBO 110 and 80 instead of 34 and 41; see
            ``benchmarks/README.md``).

    Example:
        >>> import vijax as vj
        >>> vj.guides.RealNVP(num_layers=4).name
        'realnvp'
    """

    num_layers: int | None = None
    hidden: tuple[int, ...] | None = None
    base: object = dataclasses.field(default_factory=MeanField)
    name = "realnvp"
    default_learning_rate = 0.003

    def __post_init__(self) -> None:
        check_flow_config("RealNVP", self.num_layers, self.hidden)
        if self.hidden is not None:
            object.__setattr__(self, "hidden", tuple(self.hidden))

    def build(self, dim: int, names: tuple[str, ...]) -> Guide:
        _check_dim("guide 'realnvp'", dim, names)
        num_layers = self.num_layers or default_layers(dim)
        hidden = self.hidden or default_hidden(dim)
        layers = [affine_coupling_layer(dim, hidden) for _ in range(num_layers)]
        return build_flow_guide("realnvp", dim, names, self.base, layers)
