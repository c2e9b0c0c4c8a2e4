"""Inverse autoregressive flow guide (Kingma et al. 2016), gated numerically stable form.

Each layer computes ``(m, s) = MADE(x)`` (output ``i`` depends on ``x_{<i}`` only) and

    sigma = sigmoid(s + b0),   y = (sigma * x + (1 - sigma) * m) / sigma0,
    log|det J| = sum_i log sigma_i - dim * log sigma0,

the LSTM-style update of the paper (eq. 14), divided by ``sigma0 = sigmoid(b0)`` (``b0 = 2``,
the paper's forget-gate bias) so that a fresh layer, whose MADE outputs zeros, is exactly the
identity; the scale per step stays in ``(0, 1/sigma0)``. The Jacobian is triangular, so
sampling with ``log q`` is one pass; ``log q`` of an arbitrary point needs ``dim`` sequential
passes per layer (the inverse), which only diagnostics use.
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
    unit_base,
)
from vijax.guides.networks import made

__all__ = ["IAF", "iaf_layer"]

GATE_BIAS = 2.0


def iaf_layer(dim: int, hidden) -> Layer:
    """One gated IAF bijection of ``(dim,)`` vectors with a MADE of ``hidden`` widths."""
    net_init, net_apply = made(dim, hidden)

    def gates(params, x):
        m, s = net_apply(params, x)
        log_sigma = jax.nn.log_sigmoid(s + GATE_BIAS)
        log_sigma0 = jax.nn.log_sigmoid(jnp.asarray(GATE_BIAS, x.dtype))
        return m, log_sigma, log_sigma0

    def forward(params, x):
        m, log_sigma, log_sigma0 = gates(params, x)
        sigma = jnp.exp(log_sigma)
        y = (sigma * x + (1.0 - sigma) * m) * jnp.exp(-log_sigma0)
        return y, jnp.sum(log_sigma) - dim * log_sigma0

    def inverse(params, y):
        # x_i depends on x_{<i} through (m_i, sigma_i): dim fixed-point passes recover x exactly
        def body(_, x):
            m, log_sigma, log_sigma0 = gates(params, x)
            sigma = jnp.exp(log_sigma)
            return (y * jnp.exp(log_sigma0) - (1.0 - sigma) * m) / sigma

        x = jax.lax.fori_loop(0, dim, body, y)
        _, log_sigma, log_sigma0 = gates(params, x)
        return x, jnp.sum(log_sigma) - dim * log_sigma0

    return Layer(net_init, forward, inverse)


@dataclasses.dataclass(frozen=True)
class IAF:
    """Inverse autoregressive flow over a Gaussian base guide.

    Args:
        num_layers: IAF layers; ``None``: ``clip(ceil(log2 dim) + 2, 3, 8)``.
        hidden: MADE hidden widths; ``None``: two layers of ``clip(4 dim, 32, 512)``.
        base: the base guide (a Gaussian family object); default ``MeanField(init_scale=1.0)``:
            a flow starts as a unit-scale Gaussian (its layers can widen a coordinate only
            slowly, so a narrow start holds it back).

    Params: ``{"base": base params, "layers": (n,) all MADE weights as one flat vector}``.

    Example:
        >>> import vijax as vj
        >>> vj.guides.IAF(num_layers=2, hidden=(16,)).name
        'iaf'
    """

    num_layers: int | None = None
    hidden: tuple[int, ...] | None = None
    base: object = dataclasses.field(default_factory=unit_base)
    name = "iaf"
    default_learning_rate = 0.01

    def __post_init__(self) -> None:
        check_flow_config("IAF", self.num_layers, self.hidden)
        if self.hidden is not None:
            object.__setattr__(self, "hidden", tuple(self.hidden))

    def build(self, dim: int, names: tuple[str, ...]) -> Guide:
        num_layers = self.num_layers or default_layers(dim)
        hidden = self.hidden or default_hidden(dim)
        layers = [iaf_layer(dim, hidden) for _ in range(num_layers)]
        return build_flow_guide("iaf", dim, names, self.base, layers)
