"""UCI regression benchmark for Bayesian neural networks: MC dropout, a deep ensemble, NumPyro's
mean-field BNN and the vijax BNN (``vj.nn``), on the same splits with the same preprocessing.

Protocol (Hernandez-Lobato & Adams 2015; Gal & Ghahramani 2016): random 90/10 train/test
splits (split ``k`` uses ``numpy.random.default_rng(k)``), inputs and target standardised
with the training split's mean and sd, one hidden layer of 50 ReLU units. Each method returns
``S`` per-draw Gaussian predictives ``(loc_s, scale_s)`` on the standardised scale; they are
mapped back to the original target units (``loc * sd_y + mean_y``, ``scale * sd_y``) and
scored with :func:`vijax.metrics.regression_from_draws`: test RMSE of the predictive mean and
the test log-likelihood of the exact Gaussian mixture ``log (1/S) sum_s N(y | loc_s,
scale_s)``, reported as mean +- standard error over splits (sd / sqrt(number of splits)).

Methods:

1. **MC dropout** (Gal & Ghahramani 2016): equinox MLP, dropout ``p = 0.05`` on the inputs and
   the hidden layer, loss ``mean 0.5 (y - f)^2 + lambda ||W||^2`` with the length-scale recipe
   ``lambda = l^2 (1 - p) / (2 N tau)``, ``l = 0.01``; ``tau`` is a **fixed** noise precision
   (the middle of Gal's per-dataset grid, in original units: Boston 0.15, Concrete 0.05; it is
   not tuned on a validation split); Adam, batch 32; predictive: T = 100 stochastic passes,
   each a Gaussian with sd ``1/sqrt(tau)``.
2. **Deep ensemble** (Lakshminarayanan et al. 2017): 5 equinox MLPs with a (mean, softplus
   variance) head trained by the Gaussian NLL from different inits and batch orders (no
   adversarial training); predictive: the equal mixture of the 5 Gaussians.
3. **NumPyro AutoNormal**: Normal(0, 1) priors on all weights and biases, Gamma(1, 0.1) on the
   noise precision, ``numpyro.infer.SVI`` with ``AutoNormal`` (means initialised uniformly in
   (-0.5, 0.5)) and Adam(3e-3), minibatches of 32 through a subsampled plate; predictive:
   S = 100 draws of the guide.
4. **vijax BNN**: the same model with ``vj.nn.Dense`` layers (their default prior, the same
   N(0, 1); local reparameterisation) and ``vj.Latent`` precision,
   ``vj.fit(..., batch_size=32)`` with
   Adam(3e-3) and otherwise vj.fit's defaults;
   predictive: :func:`vijax.predictive` with S = 100 draws (one weight sample per draw).

Run: ``python examples/bnn_regression.py`` (3 splits per dataset, shorter training: a few
minutes on 2 CPU cores) or ``--full`` (20 splits, longer training). ``--methods`` picks a
subset (``dropout,ensemble,numpyro,vijax``). The table is printed and written to
``examples/output/bnn_regression.md``.
"""

from __future__ import annotations

import argparse
import os
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import optax
from numpyro.distributions import constraints
from numpyro.infer import SVI, Trace_ELBO, init_to_uniform
from numpyro.infer.autoguide import AutoNormal

import vijax as vj
from vijax import metrics

HERE = Path(__file__).resolve().parent
HIDDEN = 50
BATCH = 32
DRAWS = 100  # predictive draws (T for MC dropout, S for the variational BNNs)
N_ENSEMBLE = 5
DROPOUT_P = 0.05
LENGTH_SCALE = 1e-2
# Gal's tau grids (DropoutUncertaintyExps, original target units): the middle value, fixed
TAU = {"boston": 0.15, "concrete": 0.05}
PREC_PRIOR = (1.0, 0.1)  # Gamma(concentration, rate) on the noise precision (standardised y)
SVI_LR = 3e-3  # Adam step size of both variational BNNs (NumPyro and vijax)


class Config(NamedTuple):
    splits: int
    steps_dropout: int
    steps_ensemble: int
    steps_svi: int


QUICK = Config(splits=3, steps_dropout=3000, steps_ensemble=2000, steps_svi=4000)
FULL = Config(splits=20, steps_dropout=20000, steps_ensemble=10000, steps_svi=30000)


# ------------------------------------------------------------------------------------ data


def load(name: str) -> tuple[np.ndarray, np.ndarray]:
    """``(X (N, D), y (N,))`` as float64 arrays."""
    if name == "boston":
        from mlxtend.data import boston_housing_data

        x, y = boston_housing_data()
    elif name == "concrete":
        raw = np.genfromtxt(HERE / "data" / "concrete.csv", delimiter=",", names=True)
        cols = [c for c in raw.dtype.names if c != "compressive_strength"]
        x = np.stack([raw[c] for c in cols], axis=1)
        y = raw["compressive_strength"]
    else:
        raise ValueError(f"unknown dataset {name!r}")
    return np.asarray(x, np.float64), np.asarray(y, np.float64)


class Split(NamedTuple):
    x_train: np.ndarray  # standardised, float32
    y_train: np.ndarray  # standardised
    x_test: np.ndarray
    y_test: np.ndarray  # original units
    y_mean: float
    y_sd: float


def make_split(x: np.ndarray, y: np.ndarray, k: int) -> Split:
    """Split ``k``: a 90/10 permutation from ``default_rng(k)``, standardised on train."""
    perm = np.random.default_rng(k).permutation(len(y))
    n_train = int(round(0.9 * len(y)))
    tr, te = perm[:n_train], perm[n_train:]
    mu, sd = x[tr].mean(0), x[tr].std(0)
    sd = np.where(sd > 0, sd, 1.0)
    y_mean, y_sd = float(y[tr].mean()), float(y[tr].std())
    f32 = np.float32
    return Split(((x[tr] - mu) / sd).astype(f32), ((y[tr] - y_mean) / y_sd).astype(f32),
                 ((x[te] - mu) / sd).astype(f32), y[te], y_mean, y_sd)


# ---------------------------------------------------------------------- shared training


@eqx.filter_jit
def _train(key, model, loss, x, y, extra, steps_like, lr):
    """Adam on ``loss(model, xb, yb, key, extra)`` over minibatches of ``BATCH`` rows drawn
    with replacement; one ``lax.scan`` over ``steps_like.shape[0]`` steps."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    opt = optax.adam(lr)

    def step(carry, k):
        params, state = carry
        k_idx, k_loss = jax.random.split(k)
        idx = jax.random.randint(k_idx, (BATCH,), 0, x.shape[0])
        grads = jax.grad(lambda p: loss(eqx.combine(p, static), x[idx], y[idx], k_loss,
                                        extra))(params)
        updates, state = opt.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    keys = jax.random.split(key, steps_like.shape[0])
    (params, _), _ = jax.lax.scan(step, (params, opt.init(params)), keys)
    return eqx.combine(params, static)


# ------------------------------------------------------------------------ 1. MC dropout


class DropoutMLP(eqx.Module):
    hidden: eqx.nn.Linear
    out: eqx.nn.Linear
    dropout: eqx.nn.Dropout

    def __init__(self, d_in: int, key: jax.Array, p: float = DROPOUT_P):
        k1, k2 = jax.random.split(key)
        self.hidden = eqx.nn.Linear(d_in, HIDDEN, key=k1)
        self.out = eqx.nn.Linear(HIDDEN, 1, key=k2)
        self.dropout = eqx.nn.Dropout(p)

    def __call__(self, x: jax.Array, key: jax.Array) -> jax.Array:
        """One input row ``(D,)`` -> scalar, with fresh dropout masks from ``key``."""
        k1, k2 = jax.random.split(key)
        h = jax.nn.relu(self.hidden(self.dropout(x, key=k1)))
        return self.out(self.dropout(h, key=k2))[0]


def _batched(model, x, key):
    return jax.vmap(model)(x, jax.random.split(key, x.shape[0]))


def _dropout_loss(model, xb, yb, key, weight_decay):
    sq = 0.5 * jnp.mean((_batched(model, xb, key) - yb) ** 2)
    return sq + weight_decay * (jnp.sum(model.hidden.weight ** 2)
                                + jnp.sum(model.out.weight ** 2))


@eqx.filter_jit
def _dropout_predict(model, x, keys):
    return jax.vmap(lambda k: _batched(model, x, k))(keys)


def mc_dropout(key, split: Split, steps: int, tau: float):
    """``(loc (T, N_test), scale (T, N_test))`` on the standardised scale."""
    k_init, k_fit, k_pred = jax.random.split(key, 3)
    tau_std = tau * split.y_sd**2  # the precision in standardised units
    n = len(split.y_train)
    weight_decay = LENGTH_SCALE**2 * (1 - DROPOUT_P) / (2 * n * tau_std)
    model = DropoutMLP(split.x_train.shape[1], k_init)
    model = _train(k_fit, model, _dropout_loss, split.x_train, split.y_train,
                   jnp.float32(weight_decay), jnp.zeros(steps), 1e-3)
    loc = _dropout_predict(model, split.x_test, jax.random.split(k_pred, DRAWS))
    return loc, jnp.full(loc.shape, 1 / np.sqrt(tau_std), loc.dtype)


# --------------------------------------------------------------------- 2. deep ensemble


class GaussianMLP(eqx.Module):
    hidden: eqx.nn.Linear
    out: eqx.nn.Linear

    def __init__(self, d_in: int, key: jax.Array):
        k1, k2 = jax.random.split(key)
        self.hidden = eqx.nn.Linear(d_in, HIDDEN, key=k1)
        self.out = eqx.nn.Linear(HIDDEN, 2, key=k2)

    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
        """One row -> (mean, variance), variance = softplus(.) + 1e-6."""
        o = self.out(jax.nn.relu(self.hidden(x)))
        return o[0], jax.nn.softplus(o[1]) + 1e-6


def _gaussian_nll(model, xb, yb, key, extra):
    mean, var = jax.vmap(model)(xb)
    return jnp.mean(0.5 * jnp.log(var) + 0.5 * (yb - mean) ** 2 / var)


@eqx.filter_jit
def _train_ensemble(keys, models, x, y, steps_like):
    return eqx.filter_vmap(
        lambda k, m: _train(k, m, _gaussian_nll, x, y, jnp.float32(0), steps_like, 1e-3)
    )(keys, models)


def deep_ensemble(key, split: Split, steps: int):
    k_init, k_fit = jax.random.split(key)
    d = split.x_train.shape[1]
    models = eqx.filter_vmap(lambda k: GaussianMLP(d, k))(jax.random.split(k_init, N_ENSEMBLE))
    models = _train_ensemble(jax.random.split(k_fit, N_ENSEMBLE), models, split.x_train,
                             split.y_train, jnp.zeros(steps))
    mean, var = eqx.filter_vmap(lambda m: jax.vmap(m)(split.x_test))(models)
    return mean, jnp.sqrt(var)


# ---------------------------------------------------------------- 3. NumPyro AutoNormal


def _mlp(w1, b1, w2, b2, x):
    return (jax.nn.relu(x @ w1 + b1) @ w2 + b2)[..., 0]


def numpyro_bnn(x, y=None, n=None):
    d = x.shape[1]
    s1 = s2 = 1.0  # vj.nn's default prior, N(0, 1)
    w1 = numpyro.sample("w1", dist.Normal(0, s1).expand([d, HIDDEN]).to_event(2))
    b1 = numpyro.sample("b1", dist.Normal(0, s1).expand([HIDDEN]).to_event(1))
    w2 = numpyro.sample("w2", dist.Normal(0, s2).expand([HIDDEN, 1]).to_event(2))
    b2 = numpyro.sample("b2", dist.Normal(0, s2).expand([1]).to_event(1))
    prec = numpyro.sample("prec", dist.Gamma(*PREC_PRIOR))
    with numpyro.plate("data", x.shape[0], subsample_size=BATCH if y is not None else None):
        xb = numpyro.subsample(x, event_dim=1)
        yb = numpyro.subsample(y, event_dim=0) if y is not None else None
        numpyro.sample("y", dist.Normal(_mlp(w1, b1, w2, b2, xb), 1 / jnp.sqrt(prec)), obs=yb)


def numpyro_autonormal(key, split: Split, steps: int):
    k_fit, k_pred = jax.random.split(key)
    # the default init_to_uniform(radius=2) starts the 13x50 input weights so large that 6000
    # steps did not recover (test RMSE 13.6 on Boston); radius 0.5 is a LeCun-like scale
    guide = AutoNormal(numpyro_bnn, init_loc_fn=init_to_uniform(radius=0.5))
    svi = SVI(numpyro_bnn, guide, numpyro.optim.Adam(SVI_LR), Trace_ELBO())
    out = svi.run(k_fit, steps, split.x_train, split.y_train, progress_bar=False)
    z = guide.sample_posterior(k_pred, out.params, sample_shape=(DRAWS,))
    loc = jax.vmap(lambda w1, b1, w2, b2: _mlp(w1, b1, w2, b2, split.x_test))(
        z["w1"], z["b1"], z["w2"], z["b2"])
    return loc, jnp.broadcast_to((1 / jnp.sqrt(z["prec"]))[:, None], loc.shape)


# ---------------------------------------------------------------------------- 4. vijax


def vijax_model(d_in: int) -> vj.Model:
    """The NumPyro model above with ``vj.nn`` layers (their default prior, N(0, 1), is the
    NumPyro model's)."""

    def log_likelihood(z, data):
        f = z["l2"](jax.nn.relu(z["l1"](data["x"])))[:, 0]
        return dist.Normal(f, 1 / jnp.sqrt(z["prec"])).log_prob(data["y"])

    return vj.Model(
        log_prior=lambda z: dist.Gamma(*PREC_PRIOR).log_prob(z["prec"]),
        log_likelihood=log_likelihood,
        latents={"l1": vj.nn.Dense(d_in, HIDDEN), "l2": vj.nn.Dense(HIDDEN, 1),
                 "prec": vj.Latent((), constraints.positive)})


def vijax_predict_fn(x_test) -> Callable:
    def fn(z):
        loc = z["l2"](jax.nn.relu(z["l1"](x_test)))[:, 0]
        return loc, 1 / jnp.sqrt(z["prec"]) * jnp.ones(x_test.shape[0])

    return fn


def vijax_bnn(key, split: Split, steps: int, return_fit: bool = False):
    k_fit, k_pred = jax.random.split(key)
    res = vj.fit(vijax_model(split.x_train.shape[1]),
                 {"x": split.x_train, "y": split.y_train}, batch_size=BATCH, steps=steps,
                 key=k_fit, optimizer=optax.adam(SVI_LR), progress=False)
    loc, scale = vj.predictive(res, vijax_predict_fn(split.x_test), k_pred, DRAWS)
    return (loc, scale, res) if return_fit else (loc, scale)


# ----------------------------------------------------------------------------- harness

METHODS = {
    "dropout": ("MC dropout", lambda k, s, c, name: mc_dropout(k, s, c.steps_dropout,
                                                              TAU[name])),
    "ensemble": ("Deep ensemble (5)", lambda k, s, c, name: deep_ensemble(k, s,
                                                                         c.steps_ensemble)),
    "numpyro": ("NumPyro AutoNormal", lambda k, s, c, name: numpyro_autonormal(k, s,
                                                                              c.steps_svi)),
    "vijax": ("vijax BNN (vj.nn)", lambda k, s, c, name: vijax_bnn(k, s, c.steps_svi)),
}


def score(split: Split, loc, scale) -> metrics.RegressionMetrics:
    """Metrics in the original target units."""
    loc = np.asarray(loc, np.float64) * split.y_sd + split.y_mean
    scale = np.asarray(scale, np.float64) * split.y_sd
    return metrics.regression_from_draws(loc.astype(np.float32), scale.astype(np.float32),
                                         split.y_test.astype(np.float32))


def _mean_se(values) -> str:
    v = np.asarray(values, np.float64)
    se = v.std(ddof=1) / np.sqrt(len(v)) if len(v) > 1 else float("nan")
    return f"{v.mean():.2f} ± {se:.2f}"


def run(config: Config, datasets: list[str], methods: list[str]) -> list[dict]:
    rows = []
    for name in datasets:
        x, y = load(name)
        splits = [make_split(x, y, k) for k in range(config.splits)]
        for method in methods:
            label, fit = METHODS[method]
            rmse, ll, cov, t0 = [], [], [], time.perf_counter()
            not_converged = 0
            for k, split in enumerate(splits):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always", vj.ConvergenceWarning)
                    loc, scale = fit(jax.random.key(1000 + k), split, config, name)
                not_converged += any(issubclass(w.category, vj.ConvergenceWarning)
                                     for w in caught)
                m = score(split, loc, scale)
                rmse.append(float(m.rmse))
                ll.append(float(m.test_ll))
                cov.append(float(m.coverage[-1]))
            seconds = time.perf_counter() - t0
            row = dict(dataset=name, n=len(y), method=label, rmse=_mean_se(rmse),
                       ll=_mean_se(ll), cov95=f"{np.mean(cov):.2f}",
                       seconds=f"{seconds / len(splits):.1f}")
            print(f"{name:9s} {label:20s} RMSE {row['rmse']:14s} test LL {row['ll']:14s} "
                  f"95% cover {row['cov95']}  ({row['seconds']} s/split)", flush=True)
            if not_converged:
                print(f"    vj.fit's stopping rule was not met in {not_converged} of "
                      f"{len(splits)} splits (ran the maximum steps)")
            rows.append(row)
    return rows


def markdown(rows: list[dict], config: Config, full: bool) -> str:
    head = ("| dataset | method | test RMSE | test log-lik | 95% coverage | s / split |\n"
            "|---|---|---|---|---|---|\n")
    body = "".join(f"| {r['dataset']} (N={r['n']}) | {r['method']} | {r['rmse']} | {r['ll']} "
                   f"| {r['cov95']} | {r['seconds']} |\n" for r in rows)
    return (
        f"# UCI regression, one hidden layer of {HIDDEN} ReLU units\n\n"
        f"`python examples/bnn_regression.py{' --full' if full else ''}`: {config.splits} "
        f"random 90/10 splits per dataset (split k: `default_rng(k)`), inputs and target "
        "standardised on the training split; RMSE and test log-likelihood (exact Gaussian "
        "mixture over the predictive draws) in the original target units, mean ± standard "
        "error over splits; 95% coverage: the mixture's central 95% interval, mean over "
        "splits. Time per split includes compilation.\n\n" + head + body + "\n"
        f"Settings: minibatches of {BATCH}; Adam lr 1e-3 for MC dropout and the ensemble. "
        f"MC dropout: p={DROPOUT_P} on inputs "
        f"and hidden units, length scale {LENGTH_SCALE}, fixed tau {TAU} (original units, "
        f"not tuned), {config.steps_dropout} steps, T={DRAWS}. Deep ensemble: "
        f"{N_ENSEMBLE} Gaussian-NLL nets, {config.steps_ensemble} steps each, no adversarial "
        f"training. NumPyro AutoNormal and vijax BNN: Adam lr {SVI_LR}, N(0, 1) weight "
        "priors, "
        "Gamma"
        f"{PREC_PRIOR} noise precision, {config.steps_svi} steps, S={DRAWS} draws (vijax: "
        "`vj.fit` defaults otherwise, LRT, default stopping rule).\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="20 splits, longer training")
    parser.add_argument("--datasets", default="boston,concrete")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--splits", type=int, default=None, help="override the split count")
    parser.add_argument("--out", default=str(HERE / "output" / "bnn_regression.md"))
    args = parser.parse_args()
    config = FULL if args.full else QUICK
    if args.splits is not None:
        config = config._replace(splits=args.splits)
    methods = args.methods.split(",")
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {sorted(METHODS)}")
    t0 = time.perf_counter()
    rows = run(config, args.datasets.split(","), methods)
    text = markdown(rows, config, args.full)
    text += (f"\nTotal wall time {time.perf_counter() - t0:.0f} s ({jax.devices()[0].platform}, "
             f"{os.cpu_count()} CPU cores visible, shared with other jobs when this was run).\n")
    print(f"\n{text}")
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
