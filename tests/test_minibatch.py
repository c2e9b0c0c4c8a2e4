"""Minibatch SVI, host streaming, KL weights and type-II maximum likelihood (vj.Param) in fits.

Tolerances: unbiasedness within 4 Monte Carlo standard errors of the difference of two
independent means; type-II ML and tempered posteriors within 0.1 (relative) of the closed form,
which the converged fits' noise (the stopping rule certifies 0.1 posterior sd) stays well
inside; the bitwise checks are exact.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints

import vijax as vj
from tests.conftest import count_compiles
from vijax.data import KLWeight, Minibatch, device_indices, host_indices, kl_weight_at
from vijax.guides import MeanField
from vijax.objective import make_objective

RNG = np.random.default_rng(7)
N_OBS, D = 97, 3
X = RNG.normal(size=(N_OBS, D)).astype(np.float32)
W_TRUE = np.array([1.0, -2.0, 0.5], np.float32)
Y = (RNG.uniform(size=N_OBS) < 1 / (1 + np.exp(-X @ W_TRUE))).astype(np.float32)
DATA = {"X": X, "y": Y}

LOGISTIC = vj.Model(
    log_prior=lambda z: dist.Normal(0, 1).log_prob(z["w"]).sum(),
    log_likelihood=lambda z, d: dist.Bernoulli(logits=d["X"] @ z["w"]).log_prob(d["y"]),
    latents={"w": vj.Latent((D,))})


def _fit(data=DATA, **kw):
    base = dict(guide="meanfield", batch_size=10, steps=300, chunk_size=50, convergence=None,
                psis_draws=0, progress=False, key=jax.random.key(1))
    return vj.fit(LOGISTIC, data, **{**base, **kw})


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a),
                                                    jax.tree_util.tree_leaves(b), strict=True))


# ---------------------------------------------------------------------------------------------
# the order of the rows
@pytest.mark.parametrize("n,b", [(97, 10), (64, 64), (5, 1), (1000, 333)])
def test_every_row_once_per_epoch(n, b):
    mb = Minibatch(b)
    steps = 3 * n // b + 2
    rows = host_indices(mb, 0, steps, 12345, n).ravel()
    for e in range(len(rows) // n):
        assert sorted(rows[e * n:(e + 1) * n]) == list(range(n)), f"epoch {e}"
    # consecutive epochs are different orders
    assert not np.array_equal(rows[:n], rows[n:2 * n]) or n < 3
    # the device computes the same rows, step by step, from its (epoch, offset) position
    pos, got = (jnp.int32(0), jnp.int32(0)), []
    for _ in range(steps):
        got.append(np.asarray(device_indices(mb, pos, jnp.uint32(12345), jnp.int32(n))))
        o = pos[1] + b
        pos = (pos[0] + (o >= n), jnp.where(o >= n, o - n, o))
    np.testing.assert_array_equal(np.concatenate(got), rows)


def test_minibatch_objective_is_unbiased_for_the_full_elbo():
    target = LOGISTIC.target
    guide = MeanField().build(D, ("w",))
    params = {"loc": jnp.array([0.5, -1.0, 0.2]), "raw_scale": jnp.full((D,), -1.0)}
    full = make_objective(target, guide, "reparam", 1)
    mini = make_objective(target, guide, "reparam", 1, weighted=True)
    b, m = 10, 4000
    data = jax.tree_util.tree_map(jnp.asarray, DATA)
    weights = (jnp.float32(N_OBS / b), jnp.float32(1.0))

    def full_one(key):
        return jax.value_and_grad(lambda p: full.loss(key, p, data, ())[0])(params)

    def mini_one(key):
        rows = jax.random.choice(jax.random.fold_in(key, 1), N_OBS, (b,), replace=False)
        batch = jax.tree_util.tree_map(lambda a: a[rows], data)
        return jax.value_and_grad(lambda p: mini.loss(key, p, batch, (), weights)[0])(params)

    keys = jax.random.split(jax.random.key(0), m)
    lf, gf = jax.jit(jax.vmap(full_one))(keys)
    lm, gm = jax.jit(jax.vmap(mini_one))(jax.random.split(jax.random.key(1), m))
    for a, c in [(lf, lm), (gf["loc"], gm["loc"]), (gf["raw_scale"], gm["raw_scale"])]:
        a, c = np.asarray(a, np.float64), np.asarray(c, np.float64)
        se = np.sqrt(a.var(0) / m + c.var(0) / m)
        assert np.all(np.abs(a.mean(0) - c.mean(0)) < 4 * se), (a.mean(0), c.mean(0), se)
    # the minibatch noise is real: the minibatch loss varies more than the full one
    assert np.var(np.asarray(lm)) > 2 * np.var(np.asarray(lf))


# ---------------------------------------------------------------------------------------------
# streaming, resume, compiles
def test_streamed_equals_device_resident_and_resume_mid_epoch_is_bitwise(tmp_path):
    device = _fit()
    np.save(tmp_path / "X.npy", X)
    np.save(tmp_path / "y.npy", Y)
    mm = {"X": np.load(tmp_path / "X.npy", mmap_mode="r"),
          "y": np.load(tmp_path / "y.npy", mmap_mode="r")}
    streamed = _fit(mm, stream=True)
    assert _same(device.params, streamed.params) and _same(device.state, streamed.state)
    np.testing.assert_array_equal(device.losses, streamed.losses)
    # 130 steps (an epoch is 9.7 steps: mid-epoch and mid-chunk), then 170 more
    first = _fit(steps=130)
    assert int(first.state.data_pos[1]) != 0
    resumed = vj.fit(LOGISTIC, DATA, resume=first, steps=170, convergence=None, psis_draws=0,
                     progress=False, chunk_size=50)
    assert _same(resumed.state.params, device.state.params)
    np.testing.assert_array_equal(resumed.losses, device.losses)
    # a streamed resume continues the same rows
    resumed_s = vj.fit(LOGISTIC, mm, resume=first, steps=170, convergence=None, psis_draws=0,
                       progress=False, chunk_size=50, stream=True)
    assert _same(resumed_s.state.params, device.state.params)
    assert "minibatches of 10" in device.diagnostics.data


def test_no_recompile_on_second_chunk_second_fit_or_new_data():
    _fit(steps=100)
    other = {"X": X[::-1].copy(), "y": Y[::-1].copy()}
    with count_compiles() as n:
        a = _fit(steps=200, key=jax.random.key(5))  # 4 chunks
        b = _fit(other, steps=200, key=jax.random.key(5))
    assert n[0] == 0, f"{n[0]} compilations"
    assert not _same(a.params, b.params)
    # streamed, a dataset of another N has the same batch shapes: nothing compiles either
    more = {"X": np.concatenate([X, X[:40]]), "y": np.concatenate([Y, Y[:40]])}
    _fit(steps=100, stream=True)
    with count_compiles() as n:
        c = _fit(more, steps=100, stream=True, key=jax.random.key(5))
    assert n[0] == 0, f"{n[0]} compilations for a stream of another length"
    assert np.all(np.isfinite(c.losses))


@pytest.mark.slow
def test_minibatch_fit_matches_full_batch_posterior():
    full = vj.fit(LOGISTIC, DATA, guide="meanfield", progress=False, precondition=None,
                  key=jax.random.key(2))
    mini = vj.fit(LOGISTIC, DATA, guide="meanfield", batch_size=20, steps=20_000,
                  progress=False, key=jax.random.key(2))
    sd = np.asarray(full.sd()["w"]) if hasattr(full, "sd") else \
        np.asarray(jax.nn.softplus(full.params["raw_scale"]))
    err = np.abs(np.asarray(mini.mean()["w"]) - np.asarray(full.mean()["w"])) / sd
    assert np.all(err < 0.3), err
    assert mini.diagnostics.k_hat_reading.startswith(("good", "usable"))


# ---------------------------------------------------------------------------------------------
# KL weights
def _normal_model():
    return vj.Model(log_prior=lambda z: dist.Normal(0.0, 2.0).log_prob(z["mu"]),
                    log_likelihood=lambda z, y: dist.Normal(z["mu"], 1.0).log_prob(y),
                    latents={"mu": vj.Latent()})


def test_constant_kl_weight_gives_the_tempered_posterior():
    # maximiser of E_q[log lik] + c (E_q[log prior] + H[q]) is q ∝ lik^(1/c) prior
    y = np.array([0.3, 1.1, -0.4, 0.9, 1.6, 0.2], np.float32)
    c = 2.0
    res = vj.fit(_normal_model(), y, guide="meanfield", kl_weight=c, progress=False,
                 key=jax.random.key(0))
    prec = y.size / c + 1 / 4.0
    mean, sd = (y.sum() / c) / prec, 1 / np.sqrt(prec)
    assert res.diagnostics.converged
    assert abs(float(res.mean()["mu"]) - mean) < 0.1 * sd
    got_sd = float(jax.nn.softplus(res.params["raw_scale"])[0])
    assert abs(got_sd / sd - 1) < 0.1
    assert "kl_weight=2" in res.diagnostics.data


def test_blundell_weights_sum_to_batches_per_epoch_and_schedules_run():
    mb, n = Minibatch(10), jnp.int32(97)
    w = [float(kl_weight_at(KLWeight("blundell"), 0, (jnp.int32(0), jnp.int32(o)), mb, n,
                            jnp.float32)) for o in range(0, 97, 10)]
    np.testing.assert_allclose(sum(w), 10.0, rtol=1e-5)
    assert w[0] > w[1] > w[-1] > 0
    import optax

    res = _fit(kl_weight=optax.linear_schedule(0.0, 1.0, 100))
    assert np.all(np.isfinite(res.losses))
    res = _fit(kl_weight="blundell")
    assert "blundell" in res.diagnostics.data


# ---------------------------------------------------------------------------------------------
# type-II maximum likelihood
def test_type_ii_ml_equals_the_closed_form_maximiser():
    # y_i ~ N(mu, 1), mu ~ N(0, tau^2): log p(y; tau) is maximised at tau^2 = ybar^2 - 1/n
    y = np.array([2.3, 3.1, 1.6, 2.9, 3.6, 2.2, 2.8, 1.9], np.float32)
    model = vj.Model(lambda z, y: dist.Normal(0.0, z["tau"]).log_prob(z["mu"])
                     + dist.Normal(z["mu"], 1.0).log_prob(y).sum(),
                     {"mu": vj.Latent()},
                     params={"tau": vj.Param(init=1.0, support=constraints.positive)})
    res = vj.fit(model, y, progress=False, steps=20_000, key=jax.random.key(3))
    exact = np.sqrt(y.mean() ** 2 - 1 / y.size)
    assert res.diagnostics.converged
    assert abs(float(res.model_params["tau"]) / exact - 1) < 0.1, res.model_params
    assert res.diagnostics.k_hat_reading.startswith("good")


@pytest.mark.slow
def test_type_ii_ml_matches_sklearn_bayesian_ridge():
    sklearn = pytest.importorskip("sklearn")
    from sklearn.datasets import load_diabetes
    from sklearn.linear_model import BayesianRidge

    x, y = load_diabetes(return_X_y=True)
    x = (x - x.mean(0)) / x.std(0)
    y = (y - y.mean()) / y.std()
    ref = BayesianRidge(fit_intercept=False, tol=1e-10, max_iter=10_000).fit(x, y)
    p = x.shape[1]
    model = vj.Model(
        lambda z, d: dist.Normal(0.0, 1.0 / jnp.sqrt(z["lam"])).log_prob(z["w"]).sum()
        + dist.Normal(d["x"] @ z["w"], 1.0 / jnp.sqrt(z["alpha"])).log_prob(d["y"]).sum(),
        {"w": vj.Latent((p,))},
        params={"alpha": vj.Param(init=1.0, support=constraints.positive),
                "lam": vj.Param(init=1.0, support=constraints.positive)})
    res = vj.fit(model, {"x": x.astype(np.float32), "y": y.astype(np.float32)},
                 progress=False, steps=20_000, key=jax.random.key(0))
    assert abs(float(res.model_params["alpha"]) / ref.alpha_ - 1) < 0.1
    assert abs(float(res.model_params["lam"]) / ref.lambda_ - 1) < 0.2
    del sklearn


# ---------------------------------------------------------------------------------------------
# bad input
def test_bad_minibatch_input_is_named():
    with pytest.raises(ValueError, match="batch_size must be between 1 and .* N = 97, got 0"):
        _fit(batch_size=0)
    with pytest.raises(ValueError, match="N = 97, got 98"):
        _fit(batch_size=98)
    with pytest.raises(ValueError, match=r"different leading sizes \(3 rows: \['y'\]"):
        _fit({"X": X, "y": Y[:3]})
    joint = vj.Model(lambda z, d: dist.Normal(0, 1).log_prob(z["w"]).sum(),
                     {"w": vj.Latent((D,))})
    with pytest.raises(ValueError, match="batch_size= needs a factorised model.*log_prior"):
        vj.fit(joint, DATA, batch_size=10, progress=False)
    with pytest.raises(TypeError, match="stream=True: data leaf \\['X'\\] is already a device"):
        _fit({"X": jnp.asarray(X), "y": Y}, stream=True)
    with pytest.raises(ValueError, match="stream=True feeds minibatches.*batch_size="):
        _fit(stream=True, batch_size=None)
    with pytest.raises(ValueError, match="kl_weight must be finite and >= 0, got -1"):
        _fit(kl_weight=-1.0)
    with pytest.raises(ValueError, match="kl_weight='blundell' .* needs batch_size="):
        _fit(kl_weight="blundell", batch_size=None)
    with pytest.raises(ValueError, match="'iwae' estimator's multi-sample bound"):
        _fit(kl_weight=0.5, estimator="iwae", num_particles=2)
    with pytest.raises(ValueError, match="shuffle must be one of"):
        _fit(shuffle="sorted")
    bad = vj.Model(log_prior=lambda z: dist.Normal(0, 1).log_prob(z["w"]).sum(),
                   log_likelihood=lambda z, d: jnp.sum(dist.Bernoulli(
                       logits=d["X"] @ z["w"]).log_prob(d["y"]))[None],
                   latents={"w": vj.Latent((D,))})
    with pytest.raises(ValueError, match="one value per observation: for data with 97 rows"):
        vj.fit(bad, DATA, batch_size=10, progress=False)


def test_param_and_minibatch_fit_saves_loads_and_resumes_bitwise(tmp_path):
    model = vj.Model(
        log_prior=lambda z: dist.Normal(0, z["s"]).log_prob(z["w"]).sum(),
        log_likelihood=lambda z, d: dist.Bernoulli(logits=d["X"] @ z["w"]).log_prob(d["y"]),
        latents={"w": vj.Latent((D,))},
        params={"s": vj.Param(init=1.0, support=constraints.positive)})
    kw = dict(guide="meanfield", convergence=None, psis_draws=0, progress=False,
              chunk_size=50)
    straight = vj.fit(model, DATA, batch_size=10, steps=200, key=jax.random.key(4), **kw)
    first = vj.fit(model, DATA, batch_size=10, steps=120, key=jax.random.key(4), **kw)
    first.save(tmp_path / "fit.vj")
    loaded = vj.load(tmp_path / "fit.vj", model)
    assert loaded.feed == first.feed and _same(loaded.mparams, first.mparams)
    np.testing.assert_array_equal(loaded.model_params["s"], first.model_params["s"])
    resumed = vj.fit(model, DATA, resume=loaded, steps=80, **{
        k: v for k, v in kw.items() if k != "guide"})
    assert _same(resumed.state.params, straight.state.params)
    assert float(straight.model_params["s"]) != 1.0  # the parameter moved


def test_fit_many_fits_model_params_per_lane():
    base = np.array([2.3, 3.1, 1.6, 2.9, 3.6, 2.2, 2.8, 1.9], np.float32)
    y = np.stack([base * s for s in (1.0, 2.0, 3.0)])
    model = vj.Model(lambda z, y: dist.Normal(0.0, z["tau"]).log_prob(z["mu"])
                     + dist.Normal(z["mu"], 1.0).log_prob(y).sum(),
                     {"mu": vj.Latent()},
                     params={"tau": vj.Param(init=1.0, support=constraints.positive)})
    res = vj.fit_many(model, y, data_axes=0, progress=False, steps=20_000)
    for i in range(3):
        exact = np.sqrt(y[i].mean() ** 2 - 1 / y.shape[1])
        assert res[i].diagnostics.converged
        assert abs(float(res[i].model_params["tau"]) / exact - 1) < 0.1
