"""Model specification: decorator, factorised form, bound data."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest

import vijax as vj
from tests.conftest import LinearRegression, raw_fit


def test_factorised_form_fits_like_the_joint(blr, blr_model):
    lr = LinearRegression
    fact = vj.Model(
        log_prior=lambda z: dist.Normal(0.0, lr.s).log_prob(z["w"]).sum(),
        log_likelihood=lambda z, d: dist.Normal(d["X"] @ z["w"], lr.sigma).log_prob(d["y"]),
        latents={"w": vj.Latent(shape=(lr.D,))})
    assert fact.factorised and not blr_model.factorised
    a = raw_fit(fact, blr.data, guide="meanfield", steps=600, chunk_size=250,
               key=jax.random.key(0))
    b = raw_fit(blr_model, blr.data, guide="meanfield", steps=600, chunk_size=250,
               key=jax.random.key(0))
    np.testing.assert_allclose(a.losses, b.losses, rtol=1e-4)


def test_decorator_and_bound_data():
    @vj.model(mu=vj.Latent())
    def m(z, y):
        return dist.Normal(0, 10).log_prob(z["mu"]) + dist.Normal(z["mu"], 1).log_prob(y).sum()

    assert isinstance(m, vj.Model) and list(m.latents) == ["mu"]
    y = np.array([1.0, 2.0, 3.0])
    bound = m.with_data(y)
    assert bound.target is m.target  # same compiled programs
    res = raw_fit(bound, guide="delta", steps=500, key=jax.random.key(0))
    # MAP of N(0, 10^2) prior and 3 unit-variance observations: sum(y) / (3 + 1/100)
    np.testing.assert_allclose(res.params["loc"][0], 6.0 / 3.01, rtol=1e-3)
    assert res.diagnostics.objective == "neg_log_joint"


def test_non_finite_steps_are_skipped_and_counted():
    # log joint is NaN for mu > 1: SGD steps from mu = 0.9 with a big step size overshoot
    # into it; those steps leave the parameters unchanged, and the fit still ends finite.
    m = vj.Model(lambda z, d: jnp.where(z["mu"] > 1.0, jnp.nan, -0.5 * (z["mu"] - 3.0) ** 2),
                 {"mu": vj.Latent()})
    res = raw_fit(m, guide="delta", steps=50, init={"mu": 0.9}, optimizer=optax.sgd(0.5),
                 key=jax.random.key(0))
    assert res.diagnostics.n_nonfinite_skipped > 0
    assert np.isnan(res.losses).sum() == res.diagnostics.n_nonfinite_skipped
    assert np.all(np.isfinite(np.asarray(res.params["loc"])))
    # every step was non-finite: the fit fails loudly instead of returning the init
    always = vj.Model(lambda z, d: jnp.where(z["mu"] > -10.0, jnp.nan, 0.0) + 0 * z["mu"],
                      {"mu": vj.Latent()})
    with pytest.raises(ValueError, match="mu="):
        raw_fit(always, guide="delta", steps=5)


def test_optimizer_producing_nan_fails_loudly():
    m = vj.Model(lambda z, d: -0.5 * z["mu"] ** 2, {"mu": vj.Latent()})
    with pytest.raises(FloatingPointError, match=r"non-finite parameters for latents \['mu'\]"
                       r".*step size"):
        raw_fit(m, guide="delta", steps=10, optimizer=optax.sgd(float("nan")))
