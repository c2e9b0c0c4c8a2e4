"""The gradient-estimator benchmark's workloads, each written as a vijax model and as a NumPyro
model with a mean-field guide of the same family, plus the map between the two guides'
parameters (so that both can be evaluated, and differentiated, at the same q).

* ``logistic``: Bayesian logistic regression on scikit-learn's bundled breast-cancer data
  (N = 569, D = 30 features standardised), ``w ~ N(0, 1)^D``, intercept ``b ~ N(0, 1)``,
  ``y_n ~ Bernoulli(sigmoid(x_n . w + b))``; continuous latents only. NumPyro guide:
  ``AutoNormal``.
* ``gmm``: a 2-D Gaussian mixture, C = 3 components, N = 200 synthetic points (fixed seed),
  means ``mu_c ~ N(0, 5^2 I)``, assignments ``z_n ~ Categorical(1/3, 1/3, 1/3)`` (vijax:
  ``integer_interval(0, 2)``), ``y_n ~ N(mu_{z_n}, I)``. NumPyro guide: written by hand,
  ``Normal`` for the means, ``Categorical(logits=param)`` per point.
* ``sbn``: a Bayesian sigmoid belief network on scikit-learn's bundled digits (the first
  N = 200 images, 8 x 8 pixels binarised at >= 8), H = 8 hidden units per image:
  ``W (H, 64), b (64,) ~ N(0, 1)``, ``h_n ~ Bernoulli(0.5)^H`` (vijax: ``boolean``),
  ``x_n ~ Bernoulli(logits = h_n W + b)``. NumPyro guide: by hand, ``Normal`` for ``W`` and
  ``b``, ``Bernoulli(logits=param)`` for ``h``.

Parameters in vijax's layout (mean-field guide): ``{"loc": (dim,), "raw_scale": (dim,)}``,
``scale = softplus(raw_scale)``, the latents ravelled in declaration order; with discrete
latents ``{"continuous": that, "discrete": {name: logits (size, V)}}``. ``to_numpyro`` maps
them (differentiably) to the NumPyro guide's *constrained* parameters and ``from_numpyro``
back; the NumPyro scales use ``softplus_positive``, whose unconstrained value is vijax's
``raw_scale``, and a Bernoulli logit ``l`` is vijax's two-value logits ``(0, l)``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
from numpyro.distributions import constraints
from numpyro.infer.autoguide import AutoNormal

import vijax as vj
from vijax.guides.base import softplus_inverse

__all__ = ["EstWorkload", "WORKLOADS", "get_workload"]

GMM_N, GMM_C, GMM_PRIOR_SD = 200, 3, 5.0
GMM_CENTRES = np.array([[-2.0, 0.0], [2.0, 0.0], [0.0, 2.5]], np.float32)
SBN_N, SBN_H, SBN_P = 200, 8, 64


@dataclasses.dataclass(frozen=True)
class EstWorkload:
    """One problem in both forms.

    Attributes:
        name, title: short name and description.
        make_vijax_model: ``() -> vj.Model``.
        data: dict of numpy arrays, passed to both (NumPyro as keyword arguments).
        numpyro_model: NumPyro model ``(**data)``.
        make_numpyro_guide: ``() -> guide`` (a fresh object: autoguides keep state).
        to_numpyro: vijax params -> NumPyro guide params (constrained), differentiable.
        from_numpyro: NumPyro guide params (constrained) -> vijax params.
        methods: the methods benchmarked on it (names from ``bench_estimators.METHODS``).
        has_discrete: whether the model has discrete latents.
    """

    name: str
    title: str
    make_vijax_model: Callable[[], vj.Model]
    data: dict[str, np.ndarray]
    numpyro_model: Callable[..., None]
    make_numpyro_guide: Callable[[], Any]
    to_numpyro: Callable[[Any], dict[str, jax.Array]]
    from_numpyro: Callable[[dict[str, jax.Array]], Any]
    methods: tuple[str, ...]
    has_discrete: bool


def _softplus(x):
    return jax.nn.softplus(x)


# --- logistic regression on breast cancer ----------------------------------------------------
def _cancer_data() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_breast_cancer

    x, y = load_breast_cancer(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    return {"x": x.astype(np.float32), "y": y.astype(np.float32)}


def _logistic_log_joint(z, data):
    lp = dist.Normal(0.0, 1.0).log_prob(z["w"]).sum() + dist.Normal(0.0, 1.0).log_prob(z["b"])
    return lp + dist.Bernoulli(logits=data["x"] @ z["w"] + z["b"]).log_prob(data["y"]).sum()


def _logistic_vijax() -> vj.Model:
    return vj.Model(_logistic_log_joint, {"w": vj.Latent((30,)), "b": vj.Latent()})


def _logistic_numpyro(x, y):
    w = numpyro.sample("w", dist.Normal(0.0, 1.0).expand([x.shape[1]]).to_event(1))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Bernoulli(logits=x @ w + b), obs=y)


def _logistic_to_numpyro(p):
    loc, scale = p["loc"], _softplus(p["raw_scale"])
    return {"w_auto_loc": loc[:30], "w_auto_scale": scale[:30],
            "b_auto_loc": loc[30], "b_auto_scale": scale[30]}


def _logistic_from_numpyro(c):
    scale = jnp.concatenate([c["w_auto_scale"], c["b_auto_scale"][None]])
    return {"loc": jnp.concatenate([c["w_auto_loc"], c["b_auto_loc"][None]]),
            "raw_scale": softplus_inverse(scale)}


# --- Gaussian mixture -------------------------------------------------------------------------
def _gmm_data() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(20)
    z = rng.integers(0, GMM_C, GMM_N)
    y = GMM_CENTRES[z] + rng.normal(size=(GMM_N, 2))
    return {"y": y.astype(np.float32)}


def _gmm_log_joint(p, data):
    lp = dist.Normal(0.0, GMM_PRIOR_SD).log_prob(p["mu"]).sum()
    lp += dist.Categorical(logits=jnp.zeros(GMM_C)).log_prob(p["z"]).sum()
    return lp + dist.Normal(p["mu"][p["z"]], 1.0).log_prob(data["y"]).sum()


def _gmm_vijax() -> vj.Model:
    return vj.Model(_gmm_log_joint, {
        "mu": vj.Latent((GMM_C, 2)),
        "z": vj.Latent((GMM_N,), constraints.integer_interval(0, GMM_C - 1))})


def _gmm_numpyro(y):
    mu = numpyro.sample("mu", dist.Normal(0.0, GMM_PRIOR_SD).expand([GMM_C, 2]).to_event(2))
    with numpyro.plate("data", y.shape[0]):
        z = numpyro.sample("z", dist.Categorical(logits=jnp.zeros(GMM_C)))
        numpyro.sample("y", dist.Normal(mu[z], 1.0).to_event(1), obs=y)


def _gmm_guide(y):
    loc = numpyro.param("mu_loc", jnp.zeros((GMM_C, 2)))
    scale = numpyro.param("mu_scale", jnp.full((GMM_C, 2), 0.1),
                          constraint=constraints.softplus_positive)
    numpyro.sample("mu", dist.Normal(loc, scale).to_event(2))
    logits = numpyro.param("z_logits", jnp.zeros((y.shape[0], GMM_C)))
    with numpyro.plate("data", y.shape[0]):
        numpyro.sample("z", dist.Categorical(logits=logits))


def _gmm_to_numpyro(p):
    c = p["continuous"]
    return {"mu_loc": c["loc"].reshape(GMM_C, 2),
            "mu_scale": _softplus(c["raw_scale"]).reshape(GMM_C, 2),
            "z_logits": p["discrete"]["z"]}


def _gmm_from_numpyro(c):
    return {"continuous": {"loc": c["mu_loc"].ravel(),
                           "raw_scale": softplus_inverse(c["mu_scale"].ravel())},
            "discrete": {"z": c["z_logits"]}}


# --- sigmoid belief network on digits ---------------------------------------------------------
def _digits_data() -> dict[str, np.ndarray]:
    from sklearn.datasets import load_digits

    x = load_digits().data[:SBN_N] >= 8
    return {"x": x.astype(np.float32)}


def _sbn_log_joint(z, data):
    lp = dist.Normal(0.0, 1.0).log_prob(z["W"]).sum() + dist.Normal(0.0, 1.0).log_prob(
        z["b"]).sum()
    h = z["h"].astype(z["W"].dtype)
    lp += dist.Bernoulli(probs=0.5).log_prob(h).sum()
    return lp + dist.Bernoulli(logits=h @ z["W"] + z["b"]).log_prob(data["x"]).sum()


def _sbn_vijax() -> vj.Model:
    return vj.Model(_sbn_log_joint, {"W": vj.Latent((SBN_H, SBN_P)), "b": vj.Latent((SBN_P,)),
                                     "h": vj.Latent((SBN_N, SBN_H), constraints.boolean)})


def _sbn_numpyro(x):
    w = numpyro.sample("W", dist.Normal(0.0, 1.0).expand([SBN_H, SBN_P]).to_event(2))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0).expand([SBN_P]).to_event(1))
    with numpyro.plate("data", x.shape[0]):
        h = numpyro.sample("h", dist.Bernoulli(probs=0.5).expand([SBN_H]).to_event(1))
        numpyro.sample("x", dist.Bernoulli(logits=h.astype(w.dtype) @ w + b).to_event(1),
                       obs=x)


def _sbn_guide(x):
    for name, shape in (("W", (SBN_H, SBN_P)), ("b", (SBN_P,))):
        loc = numpyro.param(f"{name}_loc", jnp.zeros(shape))
        scale = numpyro.param(f"{name}_scale", jnp.full(shape, 0.1),
                              constraint=constraints.softplus_positive)
        numpyro.sample(name, dist.Normal(loc, scale).to_event(len(shape)))
    logits = numpyro.param("h_logits", jnp.zeros((x.shape[0], SBN_H)))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("h", dist.Bernoulli(logits=logits).to_event(1))


_SBN_W = SBN_H * SBN_P


def _sbn_to_numpyro(p):
    c = p["continuous"]
    loc, scale = c["loc"], _softplus(c["raw_scale"])
    two = p["discrete"]["h"]  # (N * H, 2): Bernoulli logit = l1 - l0
    return {"W_loc": loc[:_SBN_W].reshape(SBN_H, SBN_P),
            "W_scale": scale[:_SBN_W].reshape(SBN_H, SBN_P),
            "b_loc": loc[_SBN_W:], "b_scale": scale[_SBN_W:],
            "h_logits": (two[:, 1] - two[:, 0]).reshape(SBN_N, SBN_H)}


def _sbn_from_numpyro(c):
    scale = jnp.concatenate([c["W_scale"].ravel(), c["b_scale"]])
    logit = c["h_logits"].ravel()
    return {"continuous": {"loc": jnp.concatenate([c["W_loc"].ravel(), c["b_loc"]]),
                           "raw_scale": softplus_inverse(scale)},
            "discrete": {"h": jnp.stack([jnp.zeros_like(logit), logit], axis=-1)}}


WORKLOADS = {
    "logistic": EstWorkload(
        "logistic", "Bayesian logistic regression, breast cancer (N = 569, D = 30 + intercept)",
        _logistic_vijax, _cancer_data(), _logistic_numpyro,
        lambda: AutoNormal(_logistic_numpyro), _logistic_to_numpyro, _logistic_from_numpyro,
        ("reparam", "stl", "iwae", "dreg", "renyi", "score_rloo", "score_ema",
         "numpyro_trace", "numpyro_tracegraph"), False),
    "gmm": EstWorkload(
        "gmm", f"2-D Gaussian mixture, {GMM_C} components, N = {GMM_N}, categorical "
               "assignments", _gmm_vijax, _gmm_data(), _gmm_numpyro, lambda: _gmm_guide,
        _gmm_to_numpyro, _gmm_from_numpyro,
        ("auto", "score_rloo", "score_ema", "score_none", "iwae", "dreg",
         "numpyro_tracegraph", "numpyro_trace"), True),
    "sbn": EstWorkload(
        "sbn", f"Bayesian sigmoid belief network, digits (N = {SBN_N}, 64 pixels, "
               f"H = {SBN_H} boolean hidden units)", _sbn_vijax, _digits_data(), _sbn_numpyro,
        lambda: _sbn_guide, _sbn_to_numpyro, _sbn_from_numpyro,
        ("auto", "score_rloo", "score_ema", "iwae", "numpyro_tracegraph"), True),
}


def get_workload(name: str) -> EstWorkload:
    return WORKLOADS[name]
