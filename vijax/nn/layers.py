"""Bayesian dense layers: declarations that a model lists beside its latents.

A layer holds its own variational posterior ``q(W, b)`` (its parameters are optimised with
the guide) and its prior; the fit adds ``-KL(q || p)`` of every layer to the ELBO's global
term, in closed form where it exists, so minibatch scaling and KL weights apply to it like to
any latent's prior-minus-entropy. In the model, ``z[name]`` is a callable
:class:`vijax.nn.value.LayerValue`.

- :class:`Dense`: mean-field Gaussian ``q``, Gaussian or scale-mixture prior, trained by the
  local reparameterization trick (default), flipout, or weight sampling (Blundell et al.
  2015, "Bayes by backprop").
- :class:`DropoutDense`: Gaussian variational dropout with learned rates (Kingma, Salimans
  & Welling 2015): ``q(w) = N(theta, alpha theta^2)`` with ``alpha`` per output unit or per
  weight, ``alpha <= max_alpha``, the log-uniform prior and Kingma et al.'s cubic
  approximation of its KL.
- :class:`SparseDense`: sparse variational dropout (Molchanov, Ashukha & Vetrov 2017): per
  weight ``alpha`` unbounded through the additive parameterisation ``(theta, log sigma^2)``,
  Molchanov et al.'s approximation of the KL; weights with ``log alpha > threshold`` are
  pruned (:func:`vijax.nn.sparsity`).

The two dropout layers keep a point-estimated bias (no prior, no KL), as in both papers.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from vijax.nn.priors import Normal, ScaleMixture
from vijax.nn.value import ESTIMATORS, LayerValue

__all__ = ["Layer", "Dense", "Conv2D", "DropoutDense", "SparseDense", "kingma_neg_kl",
           "molchanov_neg_kl", "KINGMA_C", "MOLCHANOV_K"]

# Kingma, Salimans & Welling (2015), eq. (7): -KL ~ C + 0.5 log a + c1 a + c2 a^2 + c3 a^3
KINGMA_C = (1.16145124, -1.50204118, 0.58629921)
# Molchanov, Ashukha & Vetrov (2017), eq. (14): -KL ~ k1 sigmoid(k2 + k3 log a) - 0.5 log(1 +
# 1/a) - k1
MOLCHANOV_K = (0.63576, 1.87320, 1.48695)
# Kingma et al. leave the constant C unstated; this one makes the cubic meet the exact -KL at
# alpha = 1 (the exact value by quadrature, with the log-uniform prior's constant fixed so that
# KL -> 0 as alpha -> infinity, as in Molchanov et al.). The cubic then errs by up to 0.03 nats
# per weight at alpha = 0.01, Molchanov et al.'s form by under 0.009 for every alpha (tests).
_KINGMA_CONST = -0.672395
_LOG_ALPHA_CLIP = 8.0


def molchanov_neg_kl(log_alpha: jax.Array) -> jax.Array:
    """Molchanov et al.'s approximation of ``-KL(N(theta, alpha theta^2) || log-uniform)``
    per weight (0 as ``alpha -> infinity``), elementwise."""
    k1, k2, k3 = MOLCHANOV_K
    return k1 * jax.nn.sigmoid(k2 + k3 * log_alpha) - 0.5 * jax.nn.softplus(-log_alpha) - k1


def kingma_neg_kl(alpha: jax.Array) -> jax.Array:
    """Kingma et al.'s cubic approximation of the same ``-KL`` for ``alpha <= 1``,
    elementwise (with the constant of :data:`_KINGMA_CONST`)."""
    c1, c2, c3 = KINGMA_C
    return _KINGMA_CONST + 0.5 * jnp.log(alpha) + c1 * alpha + c2 * alpha**2 + c3 * alpha**3


def softplus(x: jax.Array) -> jax.Array:
    return jax.nn.softplus(x)


def softplus_inverse(y: jax.Array) -> jax.Array:
    """Stable inverse of softplus for ``y > 0`` (as :func:`vijax.guides.softplus_inverse`;
    the layers sit below the guides in the data flow)."""
    return y + jnp.log(-jnp.expm1(-y))


def _features(owner: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{owner}: {name} must be an int >= 1, got {value!r}")
    return int(value)


class Layer:
    """Base of Bayesian layers: a dict of variational parameter arrays (``size`` elements in
    all) that :meth:`init` creates, :meth:`value` turns into what the model receives, and
    :meth:`kl` scores against the prior. Layers compare by value (equal declarations share
    compiles). The parameters are one array per part, not one flat vector: slicing a flat
    vector cost 1.48x per step on a 784-400-10 network (benchmarks/results/bnn_cpu.md)."""

    in_features: int
    out_features: int
    bias: bool
    conv: tuple | None = None  # (strides, padding) of a convolution

    @property
    def w_shape(self) -> tuple[int, ...]:
        return (self.in_features, self.out_features)

    @property
    def fan_in(self) -> int:
        return math.prod(self.w_shape[:-1])

    def _parts(self) -> tuple[tuple[str, tuple[int, ...]], ...]:
        raise NotImplementedError

    @property
    def size(self) -> int:
        return sum(math.prod(s) for _, s in self._parts())

    def unpack(self, flat: jax.Array | dict) -> dict[str, jax.Array]:
        """The named parts of the parameters (a dict is returned as it is; a flat vector of
        ``size`` elements is split in the order of the parts)."""
        if isinstance(flat, dict):
            return flat
        out, i = {}, 0
        for name, shape in self._parts():
            n = math.prod(shape)
            out[name] = flat[i:i + n].reshape(shape)
            i += n
        return out

    def pack(self, parts: dict[str, jax.Array]) -> jax.Array:
        return jnp.concatenate([jnp.ravel(parts[name]) for name, _ in self._parts()])

    def _key(self):
        return (type(self).__name__,) + tuple(
            (k, v) for k, v in sorted(vars(self).items()))

    def __eq__(self, other) -> bool:
        return type(self) is type(other) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def _init_loc(self, key, dtype):
        # LeCun normal (flax's Dense default): sd 1/sqrt(in)
        return jax.random.normal(key, self.w_shape, dtype) / math.sqrt(self.fan_in)

    def posterior(self, flat: jax.Array) -> dict[str, jax.Array]:
        """Constrained posterior parameters: ``w_loc``, ``w_scale`` (and ``b_loc``,
        ``b_scale`` where there is a bias; ``log_alpha`` for the dropout layers)."""
        raise NotImplementedError

    def value(self, flat: jax.Array, key: jax.Array | None, mode: str, name: str
              ) -> LayerValue:
        """What the model receives: ``mode="train"`` (the layer's estimator, noise from
        ``key``), ``"sample"`` (one weight draw from q by ``key``, then fixed) or ``"mean"``
        (the posterior mean weights; pruned for :class:`SparseDense`)."""
        p = self.posterior(flat)
        b_loc, b_scale = p.get("b_loc"), p.get("b_scale")
        if mode == "train":
            return LayerValue(p["w_loc"], p["w_scale"], b_loc, b_scale, key, self.estimator,
                              name, self.conv)
        if mode == "sample":
            w, b = LayerValue(p["w_loc"], p["w_scale"], b_loc, b_scale, key, "sample",
                              name).weights()
            return LayerValue(w, None, b, None, None, "fixed", name, self.conv)
        if mode == "mean":
            return LayerValue(self.mean_weights(p), None, b_loc, None, None, "fixed", name,
                              self.conv)
        raise ValueError(f"unknown layer mode {mode!r}; expected 'train', 'sample' or 'mean'")

    def mean_weights(self, p: dict[str, jax.Array]) -> jax.Array:
        return p["w_loc"]

    def kl(self, flat: jax.Array, key: jax.Array | None) -> jax.Array:
        """``KL(q || p)`` summed over the layer's weights (and bias)."""
        raise NotImplementedError

    def describe(self) -> str:
        raise NotImplementedError


class Dense(Layer):
    """A Bayesian dense layer ``h -> h W + b`` with a mean-field Gaussian posterior.

    Args:
        in_features, out_features: the weight matrix is ``(in_features, out_features)``.
        bias: learn a bias (with the same prior as the weights).
        prior: :class:`vijax.nn.Normal` (exact KL) or :class:`vijax.nn.ScaleMixture` (KL
            from one weight draw per step). Default ``Normal(1.0)`` (TFP's, Pyro's and the
            UCI literature's). ``Normal(1 / sqrt(fan_in))`` keeps the prior's pre-activations
            at unit scale whatever the width and raised the ELBO (its model's evidence) by
            ~120 nats on Boston and Concrete, but predicted worse on held-out Concrete rows
            (RMSE 5.84 vs 5.48, test LL -3.205 vs -3.152, 10 splits): a prior is a
            modelling choice, and the default follows the held-out accuracy.
        estimator: ``"lrt"`` (local reparameterization, default), ``"flipout"`` or
            ``"sample"`` (one weight draw shared by the batch); see :mod:`vijax.nn.value`.
        init_scale: initial posterior sd of every weight, relative to the LeCun init sd
            ``1/sqrt(in_features)`` of the means (default 0.1); biases start at mean 0.

    The model receives a callable: ``z["l1"](h)`` maps ``(..., in_features)`` to
    ``(..., out_features)``. The layer's prior is part of the declaration: ``log_prior``
    must not add it.

    Example:
        >>> Dense(3, 2).size  # means and raw scales of 3x2 weights and 2 biases
        16
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 prior: Normal | ScaleMixture | None = None, estimator: str = "lrt",
                 init_scale: float = 0.1):
        self.in_features = _features("vj.nn.Dense", "in_features", in_features)
        self.out_features = _features("vj.nn.Dense", "out_features", out_features)
        if not isinstance(bias, bool):
            raise TypeError(f"vj.nn.Dense: bias must be True or False, got {bias!r}")
        self.bias = bias
        self._default_prior = prior is None
        if not (prior is None or isinstance(prior, Normal | ScaleMixture)):
            raise TypeError(f"vj.nn.Dense: prior must be vj.nn.Normal(...) or "
                            f"vj.nn.ScaleMixture(...), got {prior!r}")
        self.prior = Normal(1.0) if prior is None else prior
        if estimator not in ESTIMATORS:
            raise ValueError(f"vj.nn.Dense: estimator must be one of {ESTIMATORS}, got "
                             f"{estimator!r}")
        self.estimator = estimator
        if not (isinstance(init_scale, int | float) and 0 < init_scale < float("inf")):
            raise ValueError(f"vj.nn.Dense: init_scale must be a positive number, got "
                             f"{init_scale!r}")
        self.init_scale = float(init_scale)

    def __repr__(self) -> str:
        return (f"Dense({self.in_features}, {self.out_features}, prior={self.prior}, "
                f"estimator={self.estimator!r})")

    def _key(self):  # the resolved prior is what matters, not how it was given
        return tuple(kv for kv in super()._key() if kv[0] != "_default_prior")

    def describe(self) -> str:
        return (f"Bayesian dense {self.in_features} -> {self.out_features}, "
                f"{type(self.prior).__name__} prior, {self.estimator}")

    def _parts(self):
        w = self.w_shape
        parts = (("w_loc", w), ("w_raw", w))
        if self.bias:
            parts += (("b_loc", (self.out_features,)), ("b_raw", (self.out_features,)))
        return parts

    def init(self, key: jax.Array, dtype) -> jax.Array:
        sd = self.init_scale / math.sqrt(self.fan_in)
        raw = softplus_inverse(jnp.asarray(sd, dtype))
        parts = {"w_loc": self._init_loc(key, dtype),
                 "w_raw": jnp.full(self.w_shape, raw, dtype)}
        if self.bias:
            parts["b_loc"] = jnp.zeros((self.out_features,), dtype)
            parts["b_raw"] = jnp.full((self.out_features,), raw, dtype)
        return parts

    def posterior(self, flat):
        p = self.unpack(flat)
        out = {"w_loc": p["w_loc"], "w_scale": softplus(p["w_raw"])}
        if self.bias:
            out["b_loc"], out["b_scale"] = p["b_loc"], softplus(p["b_raw"])
        return out

    def kl(self, flat, key):
        p = self.posterior(flat)
        if self.bias:
            loc = jnp.concatenate([p["w_loc"].ravel(), p["b_loc"]])
            scale = jnp.concatenate([p["w_scale"].ravel(), p["b_scale"]])
        else:
            loc, scale = p["w_loc"].ravel(), p["w_scale"].ravel()
        return self.prior.kl(loc, scale, key)


class Conv2D(Dense):
    """A Bayesian 2-D convolution (NHWC images, HWIO kernels) with the posterior, priors and
    estimators of :class:`Dense`.

    ``estimator="flipout"`` (default) perturbs the kernel once per evaluation with random
    signs per image and channel (Wen et al. 2018): unbiased for the whole objective.
    ``"lrt"`` draws every output position independently from its Gaussian marginal: cheaper,
    but positions that share kernel weights lose their covariance (Kingma et al. 2015 note
    this for convolutions), so its objective is an approximation. ``"sample"``: one kernel
    draw per evaluation.

    Args:
        in_channels, out_channels: channels of the input and output images.
        kernel_size: ``k`` or ``(kh, kw)``.
        stride: ``s`` or ``(sh, sw)``.
        padding: ``"SAME"`` or ``"VALID"``.

    Example:
        >>> Conv2D(1, 4, 3).w_shape
        (3, 3, 1, 4)
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, *, stride=1,
                 padding: str = "SAME", bias: bool = True,
                 prior: Normal | ScaleMixture | None = None, estimator: str = "flipout",
                 init_scale: float = 0.1):
        self.kernel = self._pair("kernel_size", kernel_size)
        super().__init__(in_channels, out_channels, bias=bias, prior=prior,
                         estimator=estimator, init_scale=init_scale)
        self.strides = self._pair("stride", stride)
        if padding not in ("SAME", "VALID"):
            raise ValueError(f"vj.nn.Conv2D: padding must be 'SAME' or 'VALID', got "
                             f"{padding!r}")
        self.conv = (self.strides, padding)

    @staticmethod
    def _pair(name, v):
        pair = (v, v) if isinstance(v, int) else tuple(v) if isinstance(v, tuple | list) \
            else None
        if pair is None or len(pair) != 2 or any(
                isinstance(x, bool) or not isinstance(x, int) or x < 1 for x in pair):
            raise ValueError(f"vj.nn.Conv2D: {name} must be an int >= 1 or a pair of them, "
                             f"got {v!r}")
        return pair

    @property
    def w_shape(self) -> tuple[int, ...]:
        return self.kernel + (self.in_features, self.out_features)

    def __repr__(self) -> str:
        return (f"Conv2D({self.in_features}, {self.out_features}, {self.kernel}, stride="
                f"{self.strides}, padding={self.conv[1]!r}, prior={self.prior}, "
                f"estimator={self.estimator!r})")

    def describe(self) -> str:
        k = "x".join(map(str, self.kernel))
        return (f"Bayesian conv {k} {self.in_features} -> {self.out_features} channels, "
                f"{type(self.prior).__name__} prior, {self.estimator}")


class _Dropout(Layer):
    """Shared parts of the two variational dropout layers (log-uniform prior, LRT)."""

    estimator = "lrt"

    def _common(self, owner, in_features, out_features, bias):
        self.in_features = _features(owner, "in_features", in_features)
        self.out_features = _features(owner, "out_features", out_features)
        if not isinstance(bias, bool):
            raise TypeError(f"{owner}: bias must be True or False, got {bias!r}")
        self.bias = bias

    def posterior(self, flat):
        p = self.unpack(flat)
        theta = p["theta"]
        log_alpha, w_scale = self._alpha_scale(p, theta)
        out = {"w_loc": theta, "w_scale": w_scale, "log_alpha": log_alpha}
        if self.bias:
            out["b_loc"] = p["b"]
        return out

    def kl(self, flat, key):
        del key
        return -jnp.sum(self._neg_kl(self.posterior(flat)["log_alpha"]))


class DropoutDense(_Dropout):
    """Gaussian variational dropout with learned rates (Kingma, Salimans & Welling 2015).

    ``q(w_ij) = N(theta_ij, alpha theta_ij^2)`` (multiplicative Gaussian noise of variance
    ``alpha``, Gaussian dropout with rate ``p = alpha / (1 + alpha)``), the log-uniform prior
    ``p(|w|) ∝ 1/|w|`` and the cubic approximation of its KL, valid for ``alpha <= 1``
    (``max_alpha``, the paper's limit). Trained by local reparameterization.

    Args:
        alpha: ``"unit"`` (one rate per output unit, the paper's variant A) or ``"weight"``
            (one per weight, variant B).
        init_alpha: initial rate (default 0.1, dropout rate 0.09).
        max_alpha: upper bound on alpha (<= 1).
        kl: ``"molchanov"`` (default: Molchanov et al.'s approximation, within 0.009 nats
            per weight of the exact KL) or ``"kingma"`` (the paper's cubic, within 0.03 for
            ``0.01 <= alpha <= 1``).

    Example:
        >>> DropoutDense(3, 2).size  # 3x2 theta, 2 unit log-alphas, 2 biases
        10
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 alpha: str = "unit", init_alpha: float = 0.1, max_alpha: float = 1.0,
                 kl: str = "molchanov"):
        self._common("vj.nn.DropoutDense", in_features, out_features, bias)
        if kl not in ("molchanov", "kingma"):
            raise ValueError(f"vj.nn.DropoutDense: kl must be 'molchanov' or 'kingma', got "
                             f"{kl!r}")
        self.kl_form = kl
        if alpha not in ("unit", "weight"):
            raise ValueError(f"vj.nn.DropoutDense: alpha must be 'unit' or 'weight', got "
                             f"{alpha!r}")
        self.alpha = alpha
        if not (isinstance(max_alpha, int | float) and 0 < max_alpha <= 1):
            raise ValueError(f"vj.nn.DropoutDense: max_alpha must lie in (0, 1] (the KL "
                             f"approximation's range), got {max_alpha!r}")
        if not (isinstance(init_alpha, int | float) and 0 < init_alpha < max_alpha):
            raise ValueError(f"vj.nn.DropoutDense: init_alpha must lie in (0, max_alpha="
                             f"{max_alpha}), got {init_alpha!r}")
        self.max_alpha, self.init_alpha = float(max_alpha), float(init_alpha)

    def __repr__(self) -> str:
        return f"DropoutDense({self.in_features}, {self.out_features}, alpha={self.alpha!r})"

    def describe(self) -> str:
        return (f"Gaussian variational dropout {self.in_features} -> {self.out_features}, "
                f"alpha per {self.alpha}")

    def _parts(self):
        w = (self.in_features, self.out_features)
        a = w if self.alpha == "weight" else (self.out_features,)
        return (("theta", w), ("raw_alpha", a)) + (
            (("b", (self.out_features,)),) if self.bias else ())

    def init(self, key, dtype):
        # alpha = max_alpha * sigmoid(raw): bounded by construction
        r = self.init_alpha / self.max_alpha
        raw = jnp.log(r) - jnp.log1p(-r)
        parts = {"theta": self._init_loc(key, dtype),
                 "raw_alpha": jnp.full(self._parts()[1][1], raw, dtype)}
        if self.bias:
            parts["b"] = jnp.zeros((self.out_features,), dtype)
        return parts

    def _alpha_scale(self, p, theta):
        log_alpha = math.log(self.max_alpha) + jax.nn.log_sigmoid(p["raw_alpha"])
        log_alpha = jnp.broadcast_to(log_alpha, theta.shape)
        return log_alpha, jnp.exp(0.5 * log_alpha) * jnp.abs(theta)

    def _neg_kl(self, log_alpha):
        if self.kl_form == "kingma":
            return kingma_neg_kl(jnp.exp(log_alpha))
        return molchanov_neg_kl(log_alpha)


class SparseDense(_Dropout):
    """Sparse variational dropout (Molchanov, Ashukha & Vetrov 2017).

    Per weight ``q(w) = N(theta, sigma^2)`` with ``alpha = sigma^2 / theta^2`` unbounded
    (the additive parameterisation ``(theta, log sigma^2)`` keeps the gradient's variance low
    as ``alpha`` grows), the log-uniform prior and Molchanov et al.'s approximation of the
    KL. Weights whose ``log alpha`` exceeds ``threshold`` (default 3: dropout rate > 0.95)
    carry no signal and are pruned: they are 0 in the posterior-mean network and counted by
    :func:`vijax.nn.sparsity`.

    Args:
        threshold: the pruning threshold on ``log alpha``.
        init_log_sigma2: initial ``log sigma^2`` of every weight (default -10).

    Example:
        >>> SparseDense(3, 2).size  # 3x2 theta and log sigma^2, 2 biases
        14
    """

    def __init__(self, in_features: int, out_features: int, *, bias: bool = True,
                 threshold: float = 3.0, init_log_sigma2: float = -10.0):
        self._common("vj.nn.SparseDense", in_features, out_features, bias)
        for name, v in (("threshold", threshold), ("init_log_sigma2", init_log_sigma2)):
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ValueError(f"vj.nn.SparseDense: {name} must be a finite number, got "
                                 f"{v!r}")
        self.threshold, self.init_log_sigma2 = float(threshold), float(init_log_sigma2)

    def __repr__(self) -> str:
        return f"SparseDense({self.in_features}, {self.out_features})"

    def describe(self) -> str:
        return (f"sparse variational dropout {self.in_features} -> {self.out_features}, "
                f"pruned at log alpha > {self.threshold:g}")

    def _parts(self):
        w = (self.in_features, self.out_features)
        return (("theta", w), ("log_sigma2", w)) + (
            (("b", (self.out_features,)),) if self.bias else ())

    def init(self, key, dtype):
        parts = {"theta": self._init_loc(key, dtype),
                 "log_sigma2": jnp.full((self.in_features, self.out_features),
                                        self.init_log_sigma2, dtype)}
        if self.bias:
            parts["b"] = jnp.zeros((self.out_features,), dtype)
        return parts

    def _alpha_scale(self, p, theta):
        tiny = jnp.finfo(theta.dtype).tiny
        log_alpha = p["log_sigma2"] - jnp.log(jnp.maximum(theta * theta, tiny))
        log_alpha = jnp.clip(log_alpha, -_LOG_ALPHA_CLIP, _LOG_ALPHA_CLIP)
        return log_alpha, jnp.exp(0.5 * p["log_sigma2"])

    def _neg_kl(self, log_alpha):
        return molchanov_neg_kl(log_alpha)

    def mean_weights(self, p):
        return jnp.where(p["log_alpha"] > self.threshold, 0.0, p["w_loc"])
