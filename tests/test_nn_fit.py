"""Fits with Bayesian layers (vj.nn) in float32: validation, minibatches and KL weights,
predictive draws, variational dropout pruning, save / load / resume."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest
from numpyro.distributions import constraints

import vijax as vj


def _data(n=200, d=6, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, d)).astype(np.float32)
    w = np.zeros(d, np.float32)
    w[:2] = [1.5, -1.0]  # the other inputs are irrelevant
    e = rng.normal(size=n)
    e -= x @ np.linalg.lstsq(x, e, rcond=None)[0]  # noise orthogonal to x: OLS gives w
    y = (x @ w + 0.3 * e / e.std()).astype(np.float32)
    return {"x": x, "y": y}


def _lik(z, d):
    return dist.Normal(z["w"](d["x"])[:, 0], z["s"]).log_prob(d["y"])


def _model(layer):
    return vj.Model(log_prior=lambda z: dist.HalfNormal(1.0).log_prob(z["s"]),
                    log_likelihood=_lik,
                    latents={"w": layer, "s": vj.Latent((), constraints.positive)})


@pytest.fixture(scope="module")
def sparse_fit():
    data = _data()
    model = _model(vj.nn.SparseDense(6, 1))
    res = vj.fit(model, data, batch_size=50, steps=4000, key=jax.random.key(0),
                 convergence=None, progress=False)
    return model, data, res


def test_sparse_variational_dropout_prunes_the_irrelevant_inputs(sparse_fit):
    _, data, res = sparse_fit
    la = np.asarray(vj.nn.posterior(res)["w"]["log_alpha"][:, 0])
    # the data's least-squares fit puts exactly 0 on the four irrelevant inputs: the KL
    # alone drives their alpha up (pruned), while the two relevant weights stay sharp
    assert np.all(la[:2] < -5), la
    assert np.all(la[2:] > 3), la
    sp = vj.nn.sparsity(res)
    assert sp["w"]["weights"] == 6 and sp["w"]["kept"] == 2
    assert sp["all"]["pruned_fraction"] == pytest.approx(4 / 6)
    mean = vj.nn.apply_mean(res, lambda z: z["w"](data["x"])[:, 0])
    assert np.sqrt(np.mean((np.asarray(mean) - data["y"]) ** 2)) < 0.4  # noise sd 0.3
    assert "sparse variational dropout 6 -> 1" in str(res.summary())


def test_predictive_gives_one_weight_draw_per_posterior_draw(sparse_fit):
    _, data, res = sparse_fit
    x = np.repeat(data["x"][:1], 3, 0)  # one input three times: one weight draw, one output
    out = vj.predictive(res, lambda z: z["w"](x)[:, 0], jax.random.key(1), 50)
    assert out.shape == (50, 3)
    np.testing.assert_array_equal(out[:, 0], out[:, 1])
    assert float(jnp.std(out[:, 0])) > 0  # and the draws differ


def test_save_load_resume_is_bitwise(sparse_fit, tmp_path):
    model, data, res = sparse_fit
    path = os.path.join(tmp_path, "bnn.vj")
    res.save(path)
    back = vj.load(path, model)
    for a, b in zip(jax.tree_util.tree_leaves(back.mparams),
                    jax.tree_util.tree_leaves(res.mparams), strict=True):
        np.testing.assert_array_equal(a, b)
    f = lambda z: z["w"](data["x"][:5])  # noqa: E731
    np.testing.assert_array_equal(vj.predictive(back, f, jax.random.key(2), 4),
                                  vj.predictive(res, f, jax.random.key(2), 4))


@pytest.mark.parametrize("estimators", [("flipout",), pytest.param(
    ("lrt", "sample"), marks=pytest.mark.slow)])
def test_layers_train_under_every_estimator_and_a_kl_weight(estimators):
    data = _data(n=120, d=3)
    for est in estimators:
        res = vj.fit(_model(vj.nn.Dense(3, 1, estimator=est)), data, batch_size=40,
                     steps=1000, optimizer=optax.adam(1e-2), convergence=None, progress=False,
                     kl_weight=optax.linear_schedule(0.0, 1.0, 300))
        loc = np.asarray(vj.nn.posterior(res)["w"]["w_loc"][:, 0])
        np.testing.assert_allclose(loc[:2], [1.5, -1.0], atol=0.1)
        assert np.isfinite(res.losses).all()


def test_a_model_with_layers_only_and_a_classifier():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(300, 2)).astype(np.float32)
    y = (x[:, 0] * x[:, 1] > 0).astype(np.int32)  # XOR: needs the hidden layer

    def lik(z, d):
        return dist.Categorical(logits=z["l2"](jnp.tanh(z["l1"](d["x"])))).log_prob(d["y"])

    model = vj.Model(log_prior=lambda z: 0.0, log_likelihood=lik,
                     latents={"l1": vj.nn.Dense(2, 8), "l2": vj.nn.Dense(8, 2)})
    res = vj.fit(model, {"x": x, "y": y}, batch_size=100, steps=1500,
                 optimizer=optax.adam(1e-2), convergence=None, progress=False)
    probs = vj.predictive(res, lambda z: jax.nn.softmax(z["l2"](jnp.tanh(z["l1"](x)))),
                          jax.random.key(0), 50).mean(0)
    assert float(jnp.mean(jnp.argmax(probs, -1) == y)) > 0.9
    assert res.target.dim == 0 and "layers=['l1', 'l2']" in repr(res)


def test_errors_name_the_layer_and_the_problem():
    data = _data(n=50, d=6)
    wrong = _model(vj.nn.Dense(5, 1))  # the data has 6 inputs
    with pytest.raises(ValueError, match=r"layer 'w' \(5 -> 1\).*5 features.*\(50, 6\)"):
        vj.fit(wrong, data, steps=10, progress=False)
    with pytest.raises(ValueError, match="Dense: out_features must be an int >= 1, got 0"):
        vj.nn.Dense(3, 0)
    with pytest.raises(ValueError, match="estimator must be one of"):
        vj.nn.Dense(3, 1, estimator="reparam")
    with pytest.raises(TypeError, match="prior must be vj.nn.Normal"):
        vj.nn.Dense(3, 1, prior=dist.Normal(0, 1))
    with pytest.raises(ValueError, match="scale must be positive"):
        vj.nn.Normal(-1.0)
    with pytest.raises(ValueError, match="pi must lie in"):
        vj.nn.ScaleMixture(pi=1.5)
    with pytest.raises(ValueError, match="sparse variational dropout layers"):
        vj.nn.sparsity(vj.fit(_model(vj.nn.DropoutDense(6, 1)), data, steps=20, progress=False,
                              convergence=None))
    with pytest.raises(ValueError, match="max_alpha must lie in"):
        vj.nn.DropoutDense(3, 1, max_alpha=2.0)
    with pytest.raises(ValueError, match="layer 'w' needs the factorised form"):
        vj.Model(lambda z, d: 0.0, {"w": vj.nn.Dense(3, 1)})
    with pytest.raises(ValueError, match="declared both as a Bayesian layer"):
        vj.Model(log_prior=lambda z: 0.0, log_likelihood=_lik, latents={"s": vj.Latent()},
                 layers={"s": vj.nn.Dense(3, 1)})
    with pytest.raises(ValueError, match=r"Bayesian layers \(\['w'\]\).*'iwae'"):
        vj.fit(_model(vj.nn.Dense(6, 1)), data, estimator="iwae", num_particles=4,
               steps=10, progress=False)
    with pytest.raises(ValueError, match="fit_many does not fit models with Bayesian layers"):
        vj.fit_many(_model(vj.nn.Dense(6, 1)), [data, data], steps=10, progress=False)
