"""What a model receives for a Bayesian layer: a callable ``LayerValue`` that maps inputs
``(..., in) -> (..., out)`` with the layer's gradient estimator.

- ``"lrt"`` (local reparameterization, Kingma, Salimans & Welling 2015): the pre-activations
  ``a = h W + b`` of each input row are Gaussian under a mean-field Gaussian q(W, b), with mean
  ``h mu_W + mu_b`` and variance ``h^2 sigma_W^2 + sigma_b^2``; one independent draw per row
  and output unit. Same expected gradient as sampling the weights, with no covariance between
  the rows of a minibatch (lower variance), and no (in, out) noise tensor.
- ``"flipout"`` (Wen et al. 2018): one shared perturbation ``dW = sigma_W * eps`` per
  evaluation, decorrelated across rows by random signs: ``a = h mu_W + ((h * s) dW) * r`` with
  ``s`` (row, in) and ``r`` (row, out) independent Rademacher signs (the bias by its own
  per-row Gaussian draw).
- ``"sample"``: one weight draw ``W = mu_W + sigma_W * eps`` shared by every row (Blundell et
  al. 2015's estimator; the baseline the other two are measured against).
- ``"fixed"``: given weights (a posterior draw, the posterior mean, or pruned weights).

The value is a pytree (weights and the key are its leaves), so it can cross ``jax.vmap``,
``jax.eval_shape`` and ``jax.jit`` boundaries like an array.

A layer called more than once in one evaluation (weight tying, a recurrence) draws from the
same key each time. Under ``"sample"`` and ``"flipout"`` that is exact weight tying (row i sees
the same weights in every call); under ``"lrt"`` it gives different inputs the same
standardised noise, which is not the noise of shared weights: declare a reused layer with
``estimator="flipout"`` or ``"sample"``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

__all__ = ["LayerValue", "ESTIMATORS"]

ESTIMATORS = ("lrt", "flipout", "sample")


@jax.tree_util.register_pytree_node_class
class LayerValue:
    """One evaluation of a Bayesian dense layer; call it on inputs ``h`` of shape
    ``(..., in_features)`` to get ``(..., out_features)``.

    Attributes:
        w_loc: (in, out) weight means (the weights themselves when ``estimator="fixed"``).
        w_scale: (in, out) weight standard deviations (``None`` when fixed).
        b_loc: (out,) bias means or values (``None``: no bias).
        b_scale: (out,) bias standard deviations (``None``: a point-estimated or fixed bias).
        key: the PRNG key of this evaluation's noise (``None`` when fixed).
        estimator: ``"lrt"``, ``"flipout"``, ``"sample"`` or ``"fixed"``.
        name: the layer's name in the model (for error messages).
    """

    def __init__(self, w_loc, w_scale, b_loc, b_scale, key, estimator: str, name: str = "layer",
                 conv: tuple | None = None):
        self.w_loc, self.w_scale, self.b_loc, self.b_scale, self.key = \
            w_loc, w_scale, b_loc, b_scale, key
        self.estimator = estimator
        self.name = name
        self.conv = conv  # None (dense) or (strides, padding) of a 2-D convolution

    def tree_flatten(self):
        return (self.w_loc, self.w_scale, self.b_loc, self.b_scale, self.key), \
            (self.estimator, self.name, self.conv)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)

    @property
    def in_features(self) -> int:
        return int(self.w_loc.shape[-2])

    @property
    def out_features(self) -> int:
        return int(self.w_loc.shape[-1])

    def _apply(self, h, w):
        if self.conv is None:
            return h @ w
        strides, padding = self.conv
        return jax.lax.conv_general_dilated(h, w, strides, padding,
                                            dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def __repr__(self) -> str:
        return (f"LayerValue({self.name!r}, {self.in_features} -> {self.out_features}, "
                f"estimator={self.estimator!r})")

    def weights(self) -> tuple[jax.Array, jax.Array | None]:
        """``(W (in, out), b (out,) or None)``: the weights of a fixed value, or a draw."""
        if self.estimator == "fixed":
            return self.w_loc, self.b_loc
        kw, kb = jax.random.split(self.key)
        w = self.w_loc + self.w_scale * jax.random.normal(kw, self.w_loc.shape,
                                                          self.w_loc.dtype)
        b = self.b_loc
        if b is not None and self.b_scale is not None:
            b = b + self.b_scale * jax.random.normal(kb, b.shape, b.dtype)
        return w, b

    def __call__(self, h: jax.Array) -> jax.Array:
        h = jnp.asarray(h)
        if self.conv is not None:
            if h.ndim not in (3, 4) or h.shape[-1] != self.in_features:
                raise ValueError(f"Bayesian convolution {self.name!r} ({self.in_features} -> "
                                 f"{self.out_features} channels) takes images (B, H, W, "
                                 f"{self.in_features}) or (H, W, {self.in_features}), got an "
                                 f"input of shape {tuple(h.shape)}")
            if h.ndim == 3:
                return self(h[None])[0]
        elif h.ndim == 0 or h.shape[-1] != self.in_features:
            raise ValueError(f"Bayesian layer {self.name!r} ({self.in_features} -> "
                             f"{self.out_features}) takes inputs whose last axis has "
                             f"{self.in_features} features, got an input of shape "
                             f"{tuple(h.shape)}")
        dtype = self.w_loc.dtype
        h = h.astype(dtype)
        if self.estimator in ("fixed", "sample"):
            w, b = self.weights()
            out = self._apply(h, w)
            return out if b is None else out + b
        k_w, k_b = jax.random.split(self.key)
        mean = self._apply(h, self.w_loc)
        out_shape = mean.shape
        if self.b_loc is not None:
            mean = mean + self.b_loc
        b_var = None if self.b_scale is None else self.b_scale**2
        if self.estimator == "lrt":
            var = self._apply(h * h, self.w_scale**2)
            if b_var is not None:
                var = var + b_var
            tiny = jnp.finfo(dtype).tiny
            noise = jax.random.normal(k_w, out_shape, dtype)
            return mean + jnp.sqrt(jnp.maximum(var, tiny)) * noise
        # flipout: one shared perturbation, per-row sign flips
        k_dw, k_s, k_r = jax.random.split(k_w, 3)
        dw = self.w_scale * jax.random.normal(k_dw, self.w_loc.shape, dtype)
        if self.conv is None:  # per row and unit
            s_shape, r_shape = h.shape, out_shape
        else:  # per image and channel (Wen et al.'s convolutional flipout)
            s_shape = h.shape[:-3] + (1, 1, h.shape[-1])
            r_shape = out_shape[:-3] + (1, 1, out_shape[-1])
        s = jax.random.rademacher(k_s, s_shape, dtype)
        r = jax.random.rademacher(k_r, r_shape, dtype)
        out = mean + self._apply(h * s, dw) * r
        if b_var is not None:
            out = out + self.b_scale * jax.random.normal(k_b, out_shape, dtype)
        return out
