"""vijax.numpyro_adapter on NumPyro models with a subsampling plate (NumPyro's minibatch SVI):
the factorised model's density against NumPyro's full-data one, minibatch fits against the
full-batch fit, and the models it refuses."""

import time

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.infer.util import log_density

import vijax as vj
from vijax.numpyro_adapter import SubsampledModel, from_numpyro

N, D, B = 200, 3, 50
_rng = np.random.default_rng(0)
X = _rng.normal(size=(N, D)).astype(np.float32)
W_TRUE = np.array([1.0, -0.5, 0.25], np.float32)
Y = (_rng.random(N) < 1.0 / (1.0 + np.exp(-X @ W_TRUE))).astype(np.float32)


def logistic_subsample(x, y=None):
    w = numpyro.sample("w", dist.Normal(0, 1).expand([x.shape[1]]).to_event(1))
    with numpyro.plate("data", x.shape[0], subsample_size=B):
        xb = numpyro.subsample(x, event_dim=1)
        yb = numpyro.subsample(y, event_dim=0) if y is not None else None
        numpyro.sample("obs", dist.Bernoulli(logits=xb @ w), obs=yb)


def logistic_idx(x, y, prior_scale=1.0):
    """The `as idx` form, a float hyperparameter (closed over) and a second site per row."""
    w = numpyro.sample("w", dist.Normal(0, prior_scale).expand([x.shape[1]]).to_event(1))
    b = numpyro.sample("b", dist.Normal(0, 1))
    with numpyro.plate("data", x.shape[0], subsample_size=B) as idx:
        numpyro.sample("obs", dist.Bernoulli(logits=x[idx] @ w + b), obs=y[idx])
        numpyro.factor("row_term", -0.1 * (x[idx, 0] * b) ** 2)


def logistic_full(x, y, prior_scale=1.0, with_b=False):
    """The same models without subsampling: NumPyro's full-data log density."""
    w = numpyro.sample("w", dist.Normal(0, prior_scale).expand([x.shape[1]]).to_event(1))
    b = numpyro.sample("b", dist.Normal(0, 1)) if with_b else 0.0
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("obs", dist.Bernoulli(logits=x @ w + b), obs=y)
        if with_b:
            numpyro.factor("row_term", -0.1 * (x[:, 0] * b) ** 2)


def test_factorised_form_and_default_batch_size():
    m = from_numpyro(logistic_subsample, X, y=Y)
    assert isinstance(m, SubsampledModel) and m.factorised
    assert m.default_batch_size == B
    assert [np.shape(a) for a in m.data] == [(N, D), (N,)]
    assert set(m.latents) == {"w"}
    z = {"w": jnp.array([0.3, -0.2, 0.5])}
    assert m.log_likelihood(z, m.data).shape == (N,)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_summed_density_equals_numpyro_full_data(seed):
    # sum over all rows of the unscaled per-row log likelihood + log prior is NumPyro's
    # full-data density: NumPyro's N/B subsample scale is not applied on top
    rng = np.random.default_rng(seed)
    w = jnp.asarray(rng.normal(size=D), jnp.float32)
    b = jnp.asarray(rng.normal(), jnp.float32)
    m = from_numpyro(logistic_subsample, X, y=Y)
    ref = log_density(logistic_full, (X, Y), {}, {"w": w})[0]
    np.testing.assert_allclose(m.log_density({"w": w}, m.data), ref, rtol=1e-5)

    m2 = from_numpyro(logistic_idx, X, Y, prior_scale=2.0)
    assert len(m2.data) == 2  # prior_scale is closed over, not a row leaf
    ref2 = log_density(logistic_full, (X, Y), {"prior_scale": 2.0, "with_b": True},
                       {"w": w, "b": b})[0]
    np.testing.assert_allclose(m2.log_density({"w": w, "b": b}, m2.data), ref2, rtol=1e-5)
    rows = m2.log_likelihood({"w": w, "b": b}, m2.data)
    assert rows.shape == (N,)


def test_ordinary_plate_unchanged():
    m = from_numpyro(logistic_full, X, Y)
    assert not m.factorised and not isinstance(m, SubsampledModel)


def test_minibatch_fit_matches_full_batch_fit():
    m = from_numpyro(logistic_subsample, X, y=Y)
    kw = dict(guide="fullrank", key=0, progress=False, psis_draws=0, convergence=None)
    t0 = time.perf_counter()
    full = vj.fit(m, steps=800, **kw)
    t1 = time.perf_counter()
    mini = vj.fit(m, batch_size=m.default_batch_size, steps=2000, **kw)
    t2 = time.perf_counter()
    print(f"full-batch fit {t1 - t0:.2f}s, minibatch fit {t2 - t1:.2f}s")
    key = jax.random.key(1)
    draws_full = np.asarray(full.sample(key, 4000)["w"])
    draws_mini = np.asarray(mini.sample(key, 4000)["w"])
    sd, mean_full = draws_full.std(0), draws_full.mean(0)
    # 0.3 posterior sd; the Monte Carlo error of 4000 draws is ~0.016 sd
    assert np.all(np.abs(draws_mini.mean(0) - mean_full) < 0.3 * sd), (
        draws_mini.mean(0), mean_full, sd)


# --- refused models ------------------------------------------------------------------------


def test_two_subsampling_plates_raise_naming_them():
    def two(x, y):
        w = numpyro.sample("w", dist.Normal(0, 1))
        with numpyro.plate("rows", x.shape[0], subsample_size=10):
            numpyro.sample("a", dist.Normal(w, 1), obs=numpyro.subsample(y, 0))
        with numpyro.plate("cols", x.shape[1], subsample_size=2):
            numpyro.sample("b", dist.Normal(w, 1), obs=numpyro.subsample(x[0], 0))

    with pytest.raises(ValueError, match=r"'two'.*2 subsampling plates.*'rows'.*'cols'"):
        from_numpyro(two, X, Y)


def _local(y):
    mu = numpyro.sample("mu", dist.Normal(0, 1))
    with numpyro.plate("data", y.shape[0], subsample_size=10):
        u = numpyro.sample("u", dist.Normal(mu, 1))
        numpyro.sample("y", dist.Normal(u, 1), obs=numpyro.subsample(y, 0))


def test_latent_in_the_plate_is_a_local_latent():
    # construction checks the factorised density (local u's log density in its row) against
    # NumPyro's own on a random subsample
    m = from_numpyro(_local, Y)
    assert m.latents["u"].local and m.latents["u"].shape == ()
    assert not m.latents["mu"].local
    res = vj.fit(m, steps=50, convergence=None, progress=False, psis_draws=0)
    assert res.diagnostics.n_steps == 50
    assert "u: amortized(meanfield" in res.diagnostics.estimator


@pytest.mark.slow
def test_local_latent_model_recovers_the_global_mean():
    y = (1.5 + np.random.default_rng(1).normal(size=200) * np.sqrt(2)).astype(np.float32)
    res = vj.fit(from_numpyro(_local, y), steps=6000, progress=False)
    prec = 1 + y.size / 2  # mu | y: y_i ~ N(mu, 2) after integrating u_i out
    mean, sd = y.sum() / 2 / prec, prec ** -0.5
    # q(mu) q(u_i | y_i) is mean-field between mu and u: the mean is right, the sd too small
    assert abs(float(res.mean()["mu"]) - mean) < 0.2 * sd


def test_local_latent_needs_the_plate_as_leading_axis():
    def inner(y):
        with numpyro.plate("data", y.shape[0], subsample_size=10):
            with numpyro.plate("k", 3, dim=-2):
                numpyro.sample("u", dist.Normal(0, 1))
            numpyro.sample("y", dist.Normal(0, 1), obs=numpyro.subsample(y, 0))

    with pytest.raises(ValueError, match=r"'u'.*axis 1.*leading axis"):
        from_numpyro(inner, Y)


def test_unobserved_site_in_plate_becomes_a_local_latent_with_a_warning():
    with pytest.warns(vj.ModelWarning, match=r"\['obs'\].*local latents.*None"):
        from_numpyro(logistic_subsample, X)


def test_fixed_plate_size_raises():
    def fixed(x, y):
        w = numpyro.sample("w", dist.Normal(0, 1).expand([D]).to_event(1))
        with numpyro.plate("data", N, subsample_size=B):
            numpyro.sample("obs", dist.Bernoulli(logits=numpyro.subsample(x, 1) @ w),
                           obs=numpyro.subsample(y, 0))

    with pytest.raises(ValueError, match=r"plate 'data'.*size must follow the data"):
        from_numpyro(fixed, X, Y)


def test_data_read_in_full_inside_the_plate_raises():
    def centred(x, y):
        w = numpyro.sample("w", dist.Normal(0, 1).expand([D]).to_event(1))
        with numpyro.plate("data", x.shape[0], subsample_size=B) as idx:
            logits = (x[idx] - x.mean(0)) @ w  # the full-data mean: not a per-row term
            numpyro.sample("obs", dist.Bernoulli(logits=logits), obs=y[idx])

    with pytest.raises(ValueError, match=r"plate 'data'.*other than through the plate"):
        from_numpyro(centred, X, Y)


def test_data_not_subsampled_raises():
    def unsubsampled(x, y):
        w = numpyro.sample("w", dist.Normal(0, 1).expand([D]).to_event(1))
        with numpyro.plate("data", x.shape[0], subsample_size=B):
            numpyro.sample("obs", dist.Bernoulli(logits=numpyro.subsample(x, 1) @ w), obs=y)

    with pytest.raises(ValueError, match=r"plate 'data'"):
        from_numpyro(unsubsampled, X, Y)


def test_prior_reading_the_rows_raises_naming_the_site():
    def empirical(x, y):
        w = numpyro.sample("w", dist.Normal(jnp.mean(y), 1).expand([D]).to_event(1))
        with numpyro.plate("data", x.shape[0], subsample_size=B):
            numpyro.sample("obs", dist.Bernoulli(logits=numpyro.subsample(x, 1) @ w),
                           obs=numpyro.subsample(y, 0))

    with pytest.raises(ValueError, match=r"site 'w' lies outside the plate but reads \['y'\]"):
        from_numpyro(empirical, X, Y)


def test_fit_without_batch_size_uses_the_plates_subsample_size():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(120, 2)).astype(np.float32)
    y = (rng.uniform(size=120) < 0.5).astype(np.float32)

    def model(x, y=None):
        w = numpyro.sample("w", dist.Normal(0, 1).expand([x.shape[1]]).to_event(1))
        with numpyro.plate("data", x.shape[0], subsample_size=30):
            xb = numpyro.subsample(x, event_dim=1)
            yb = numpyro.subsample(y, event_dim=0)
            numpyro.sample("obs", dist.Bernoulli(logits=xb @ w), obs=yb)

    res = vj.fit(vj.from_numpyro(model, x, y=y), guide="meanfield", steps=200,
                  convergence=None, psis_draws=0, progress=False)
    assert "minibatches of 30" in res.diagnostics.data
