"""Guides for local latents: amortized (an encoder network per observation) and per-row tables.

A local latent has one value per observation. Its guide is a *factor* ``q(z_i | x_i)`` whose
parameters come from the observation: ``raw = encoder(params, input_i)`` (amortized,
Kingma & Welling 2014) or ``raw = table[i]`` (a per-datapoint table, classic SVI with local
parameters, Hoffman et al. 2013). ``raw`` is a flat vector; the family reads it as

- ``"meanfield"``: ``(loc (d,), raw_scale (d,))``, ``scale = softplus(raw_scale + c)`` with
  ``c = softplus^-1(init_scale)``, so a zero output is ``N(0, init_scale^2)``;
- ``"fullrank"``: ``loc (d,)``, the diagonal as above and the ``d (d-1) / 2`` strictly lower
  entries of ``L = diag(s) (I + N)`` (row-major);
- ``"iaf"``: the meanfield base followed by IAF layers (Kingma et al. 2016) whose weights are
  shared by all rows;
- ``"delta"``: ``loc (d,)`` only: a point estimate (amortized MAP, e.g. predictive sparse
  decomposition with a Laplace prior); the objective omits its log-Jacobian;
- ``"categorical"`` (discrete local latents): ``size * num_values`` logits.

The encoder's input is one observation: the data row (every leaf, or the leaves named by
``inputs``), followed, for ``given`` latents (the local discrete latent, as in M2's
``q(z | x, y)``), by their one-hot values: ``apply(params, x)`` without ``given``,
``apply(params, (x, y_onehot))`` with it. An automatic encoder (``encoder=None``) is an MLP
(:func:`vijax.nets.mlp`) on the flattened input, sized by :func:`vijax.nets.auto_hidden`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from vijax.guides.iaf import iaf_layer
from vijax.guides.local_gaussian import gaussian_family
from vijax.nets import as_network, auto_hidden, flatten_input, mlp

__all__ = ["Amortized", "LocalTable", "LocalFactor", "build_factor", "LOCAL_FAMILIES"]

LOCAL_FAMILIES = ("meanfield", "fullrank", "iaf", "delta", "categorical")


def _check_scale(init_scale, where):
    if isinstance(init_scale, bool) or not isinstance(init_scale, int | float) or not (
            0 < init_scale < float("inf")):
        raise ValueError(f"{where}: init_scale must be a positive finite number, got "
                         f"{init_scale!r}")


def _check_family(family, where):
    if family not in LOCAL_FAMILIES:
        raise ValueError(f"{where}: unknown family {family!r}; local guides are "
                         f"{list(LOCAL_FAMILIES)}")


@dataclasses.dataclass(frozen=True, eq=False)
class Amortized:
    """Amortized guide for a local latent: ``q(z_i | x_i)`` from an encoder network.

    Args:
        encoder: ``None`` (an automatic MLP sized from the input and the family), an
            ``(init, apply)`` pair, a flax (linen or nnx) module, an equinox module or a
            :class:`vijax.nets.Network`; it maps ONE observation to a flat vector of the
            family's raw parameters (vijax vmaps it over the batch).
        family: ``"meanfield"`` (default for continuous latents), ``"fullrank"``, ``"iaf"``,
            ``"delta"`` or ``"categorical"`` (discrete latents).
        inputs: the data key (or tuple of keys) the encoder reads; ``None``: every leaf.
        given: local latents the factor is conditioned on (the local discrete latent).
        hidden: the automatic MLP's hidden widths (``None``: :func:`vijax.nets.auto_hidden`).
        init_scale: the scale of a zero encoder output (Gaussian families).
        enumerate: (discrete) sum exactly over the latent's values per row (``None``: when
            it has at most :data:`vijax.locals.MAX_ENUMERATION` joint values).
        classifier_weight: (discrete, partly observed) weight ``alpha`` of the auxiliary
            term ``alpha * sum_{observed rows} log q(y_i | x_i)`` (Kingma et al. 2014's
            classifier loss for M2), scaled like the likelihood.
        flow_layers, flow_hidden: (``"iaf"``) the shared IAF layers.

    Example:
        >>> import vijax as vj
        >>> vj.guides.Amortized(family="fullrank").family
        'fullrank'
    """

    encoder: Any = None
    family: str = "meanfield"
    inputs: Any = None
    given: tuple[str, ...] = ()
    hidden: tuple[int, ...] | None = None
    init_scale: float = 0.1
    enumerate: bool | None = None
    classifier_weight: float = 0.0
    flow_layers: int = 2
    flow_hidden: tuple[int, ...] | None = None
    name = "amortized"

    def __post_init__(self) -> None:
        _check_family(self.family, "Amortized")
        _check_scale(self.init_scale, "Amortized")
        given = (self.given,) if isinstance(self.given, str) else tuple(self.given)
        object.__setattr__(self, "given", given)
        if self.inputs is not None and not isinstance(self.inputs, str):
            object.__setattr__(self, "inputs", tuple(self.inputs))
        if self.hidden is not None:
            object.__setattr__(self, "hidden", tuple(int(h) for h in self.hidden))
        w = self.classifier_weight
        if isinstance(w, bool) or not isinstance(w, int | float) or not 0 <= w < float("inf"):
            raise ValueError(f"Amortized: classifier_weight must be a finite number >= 0, got "
                             f"{w!r}")
        if self.enumerate not in (None, True, False):
            raise TypeError(f"Amortized: enumerate must be None, True or False, got "
                            f"{self.enumerate!r}")

    def _key(self) -> tuple:
        # the encoder by identity (networks do not compare by value: equinox modules hold
        # arrays); every other field by value, so equal specs share their compiled programs
        return (id(self.encoder),) + tuple(getattr(self, f.name) for f in
                                           dataclasses.fields(self) if f.name != "encoder")

    def __eq__(self, other) -> bool:
        return (type(other) is type(self) and self.encoder is other.encoder
                and self._key() == other._key())

    def __hash__(self) -> int:
        return hash(self._key())


@dataclasses.dataclass(frozen=True)
class LocalTable:
    """Per-observation guide parameters (a table with one row per observation, indexed by
    the row's position in the data): classic SVI with local parameters. Rows not in a step's
    batch get a zero gradient (Adam's moments still decay for them).

    Args:
        family: as :class:`Amortized` (no ``"iaf"``).
        init_scale: the initial scale (Gaussian families).

    Example:
        >>> import vijax as vj
        >>> vj.guides.LocalTable().family
        'meanfield'
    """

    family: str = "meanfield"
    init_scale: float = 0.1
    enumerate: bool | None = None
    classifier_weight: float = 0.0
    given: tuple[str, ...] = ()
    name = "table"

    def __post_init__(self) -> None:
        _check_family(self.family, "LocalTable")
        if self.family == "iaf":
            raise ValueError("LocalTable: family 'iaf' needs a network; use Amortized")
        _check_scale(self.init_scale, "LocalTable")
        if self.given:
            raise ValueError("LocalTable: a table cannot condition on other latents (given=); "
                             "use Amortized")


class LocalFactor(NamedTuple):
    """The functions of one local latent's guide factor (batched over rows).

    Attributes:
        name: the latent.
        discrete: a categorical factor (else continuous, over unconstrained values).
        size: elements per row (unconstrained for continuous latents).
        num_values: values per element (discrete).
        noise_dim: standard normal noise per row (0: a point mass or discrete).
        point_mass: the delta family.
        init: ``(key, x_example, n_rows, dtype) -> params``.
        raw: ``(params, x_batch, rows (B,), given_onehot (B, g) or None) -> (B, out)``.
        draw: ``(params, raw (B, out), eps (B, noise_dim)) -> (u (B, size), log_q (B,))``.
        log_prob: ``(params, raw (B, out), u (B, size)) -> (B,)``.
        mean: ``(params, raw) -> (B, size)`` (continuous) or the logits ``(B, size, C)``.
        given: latents the factor conditions on; ``enumerate``, ``classifier_weight``.
    """

    name: str
    discrete: bool
    size: int
    num_values: int
    noise_dim: int
    point_mass: bool
    init: Callable
    raw: Callable
    draw: Callable
    log_prob: Callable
    mean: Callable
    given: tuple[str, ...] = ()
    enumerate: bool = False
    classifier_weight: float = 0.0
    description: str = ""


def _select(inputs, row, exclude=()):
    if inputs is None:
        if exclude and isinstance(row, dict):  # a partly observed latent's values
            return {k: v for k, v in row.items() if k not in exclude}
        return row
    if not isinstance(row, dict):
        raise ValueError(f"inputs={inputs!r} names data keys, but the data is a "
                         f"{type(row).__name__}, not a dict")
    keys = (inputs,) if isinstance(inputs, str) else inputs
    missing = [k for k in keys if k not in row]
    if missing:
        raise ValueError(f"inputs names data key(s) {missing} that the data does not have; "
                         f"its keys are {sorted(row)}")
    return row[keys[0]] if isinstance(inputs, str) else tuple(row[k] for k in keys)


def build_factor(spec, block, example_row, n_rows: int, given_sizes: dict[str, int],
                 exclude: tuple[str, ...] = ()) -> LocalFactor:
    """The :class:`LocalFactor` of ``spec`` (:class:`Amortized` or :class:`LocalTable`) for
    the local latent ``block`` (:class:`vijax.locals.LocalBlock`). ``example_row``: one
    observation (a pytree of arrays, for the encoder's input size); ``given_sizes``: the
    one-hot width of each latent the factor may condition on; ``exclude``: data keys an
    encoder reading every leaf skips (the observed values of a partly observed latent: an
    encoder that read them would copy the labels). Errors name the latent."""
    name = block.name
    where = f"local latent {name!r}"
    family = spec.family
    if block.discrete and family != "categorical":
        if spec.family == "meanfield" and (spec.enumerate or isinstance(spec, Amortized)):
            family = "categorical"  # the default family of a discrete latent
        else:
            raise ValueError(f"{where} is discrete ({block.support}): its guide family must "
                             f"be 'categorical', got {spec.family!r}")
    if not block.discrete and family == "categorical":
        raise ValueError(f"{where} is continuous ({block.support}): family 'categorical' is "
                         "for discrete latents; use 'meanfield', 'fullrank', 'iaf' or "
                         "'delta'")
    if spec.enumerate and not block.discrete:
        raise ValueError(f"{where} is continuous ({block.support}): only discrete latents "
                         "with finitely many values can be enumerated")
    if spec.classifier_weight and not (block.discrete and block.observed):
        raise ValueError(f"{where}: classifier_weight needs a partly observed discrete "
                         "latent (vj.Latent(..., local=True, observed='key'))")
    for g in spec.given:
        if g not in given_sizes:
            raise ValueError(f"{where}: given={spec.given!r} names {g!r}, which is not the "
                             f"model's local discrete latent ({sorted(given_sizes) or 'none'}); "
                             "a factor can condition on the local discrete latent only")
    size = block.size
    num_values = block.num_values
    enumerate_ = False
    if block.discrete:
        combos = block.combos
        from vijax.locals import MAX_ENUMERATION
        enumerate_ = spec.enumerate if spec.enumerate is not None else \
            combos <= MAX_ENUMERATION
        if enumerate_ and combos > MAX_ENUMERATION:
            raise ValueError(f"{where} has {combos} joint values per row; enumeration sums "
                             f"over at most {MAX_ENUMERATION}")
        out = size * num_values
        noise_dim, point_mass = 0, False

        def draw(params, raw, eps):
            raise NotImplementedError  # enumerated, never drawn

        def log_prob(params, raw, k):
            logp = jax.nn.log_softmax(raw.reshape(raw.shape[:-1] + (size, num_values)), -1)
            return jnp.sum(jnp.take_along_axis(logp, k[..., None], -1)[..., 0], -1)

        def mean(params, raw):
            return raw.reshape(raw.shape[:-1] + (size, num_values))
    elif family == "delta":
        out, noise_dim, point_mass = size, 0, True

        def draw(params, raw, eps):
            return raw, jnp.zeros(raw.shape[:-1], raw.dtype)

        def log_prob(params, raw, u):
            return jnp.zeros(raw.shape[:-1], raw.dtype)

        def mean(params, raw):
            return raw
    else:
        base = "meanfield" if family == "iaf" else family
        out, g_draw, g_log_prob, mean = gaussian_family(size, spec.init_scale, base)
        noise_dim, point_mass = size, False
        if family == "iaf":
            hidden = spec.flow_hidden or (max(32, 4 * size),)
            layers = [iaf_layer(size, hidden) for _ in range(spec.flow_layers)]

            def flow(params, u):
                ld = jnp.zeros(u.shape[:-1], u.dtype)
                for layer, p in zip(layers, params["flow"], strict=True):
                    u, d = jax.vmap(layer.forward, in_axes=(None, 0))(p, u)
                    ld = ld + d
                return u, ld

            def draw(params, raw, eps):
                u, log_q = g_draw(params, raw, eps)
                u, ld = flow(params, u)
                return u, log_q - ld

            def log_prob(params, raw, u):
                ld = jnp.zeros(u.shape[:-1], u.dtype)
                for layer, p in reversed(list(zip(layers, params["flow"], strict=True))):
                    u, d = jax.vmap(layer.inverse, in_axes=(None, 0))(p, u)
                    ld = ld + d
                return g_log_prob(params, raw, u) - ld
        else:
            draw, log_prob = g_draw, g_log_prob

    given = tuple(spec.given)
    g_width = sum(given_sizes[g] for g in given)

    if isinstance(spec, LocalTable):
        def init(key, x_example, n, dtype):
            return {"table": jnp.zeros((n, out), dtype)}

        def raw(params, x_batch, rows, given_onehot):
            return params["table"][rows]

        desc = f"table({family})"
    else:
        inputs = spec.inputs

        def net_input(x_row, onehot):
            x = _select(inputs, x_row, exclude)
            return x if onehot is None else (x, onehot)

        if spec.encoder is None:
            x_ex = jax.tree_util.tree_map(jnp.asarray, _select(inputs, example_row, exclude))
            in_size = int(flatten_input(x_ex).shape[0]) + g_width
            hidden = spec.hidden if spec.hidden is not None else auto_hidden(in_size, out)
            net = mlp(in_size, out, hidden, final_zero=True, where=f"encoder of {where}")

            def features(x_row, onehot):
                x = flatten_input(_select(inputs, x_row, exclude))
                return x if onehot is None else jnp.concatenate([x, onehot.astype(x.dtype)])

            def apply(p, x_row, onehot):
                return net.apply(p, features(x_row, onehot))

            def net_init(key, x_row, dtype):
                ex = jnp.zeros((in_size,), dtype)
                return net.init(key, ex)
        else:
            net = as_network(spec.encoder, where=f"encoder of {where}")

            def apply(p, x_row, onehot):
                return net.apply(p, net_input(x_row, onehot))

            def net_init(key, x_row, dtype):
                onehot = None if not given else jnp.zeros((g_width,), dtype)
                x = jax.tree_util.tree_map(
                    lambda a: jnp.asarray(a, dtype) if jnp.issubdtype(
                        jnp.asarray(a).dtype, jnp.floating) else jnp.asarray(a),
                    net_input(x_row, onehot))
                return net.init(key, x)

        def init(key, x_example, n, dtype):
            k_net, k_flow = jax.random.split(key)
            params = {"net": net_init(k_net, x_example, dtype)}
            onehot = None if not given else jnp.zeros((g_width,), dtype)
            shape = jax.eval_shape(apply, params["net"], x_example, onehot)
            if shape.shape != (out,):
                raise ValueError(f"the encoder of {where} returns shape {shape.shape} for one "
                                 f"observation; family {family!r} of a latent with {size} "
                                 f"unconstrained element(s) needs a flat vector of {out} raw "
                                 "parameters")
            return params

        def raw(params, x_batch, rows, given_onehot):
            if given_onehot is None:
                return jax.vmap(lambda x: apply(params["net"], x, None))(x_batch)
            return jax.vmap(lambda x, o: apply(params["net"], x, o))(x_batch, given_onehot)

        desc = f"amortized({family}, {net.name})"

    if family == "iaf":
        inner_init = init

        def init(key, x_example, n, dtype):
            k1, k2 = jax.random.split(key)
            params = inner_init(k1, x_example, n, dtype)
            keys = jax.random.split(k2, len(layers))
            params["flow"] = [layer.init(k, dtype) for layer, k in zip(layers, keys,
                                                                        strict=True)]
            return params

    return LocalFactor(name, block.discrete, size, num_values, noise_dim, point_mass, init,
                       raw, draw, log_prob, mean, given,
                       bool(block.discrete and enumerate_), float(spec.classifier_weight), desc)
