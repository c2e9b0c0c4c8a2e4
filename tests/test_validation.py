"""Bad input gets a clear error naming the latent, data key, shape or value, before anything
is compiled."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest
from numpyro.distributions import constraints

import vijax as vj
from tests.conftest import count_compiles, raw_fit

Y = np.array([0.5, -0.3, 1.1])


def _normal_model(z, d):
    return dist.Normal(0, 1).log_prob(z["mu"]) + dist.Normal(z["mu"], 1).log_prob(d["y"]).sum()


MODEL = vj.Model(_normal_model, {"mu": vj.Latent()})
SCALE_MODEL = vj.Model(
    lambda z, d: dist.HalfNormal(1.0).log_prob(z["sigma"]) + dist.Normal(z["mu"], z["sigma"])
    .log_prob(d["y"]).sum(),
    {"mu": vj.Latent(), "sigma": vj.Latent(support=constraints.positive)})


@pytest.mark.parametrize("name", ["1x", "my-latent", "class", ""])
def test_invalid_latent_name(name):
    with pytest.raises(ValueError, match="invalid latent name"):
        vj.Model(_normal_model, {name: vj.Latent()})


def test_invalid_shapes_and_supports():
    with pytest.raises(ValueError, match="shape"):
        vj.Latent(shape=(-1,))
    with pytest.raises(TypeError, match="numpyro constraint"):
        vj.Latent(support="positive")
    with pytest.raises(TypeError, match="'w'.*vj.Latent"):
        vj.Model(_normal_model, {"w": (3,)})
    with pytest.raises(ValueError, match="'k' has a discrete support.*not finite"):
        vj.Model(_normal_model, {"k": vj.Latent(support=constraints.positive_integer)})
    with pytest.raises(ValueError, match="'p'.*needs at least 1"):
        vj.Model(_normal_model, {"p": vj.Latent(shape=(), support=constraints.simplex)})
    with pytest.raises(ValueError, match="'L'"):
        vj.Model(_normal_model, {"L": vj.Latent(shape=(3, 2), support=constraints.lower_cholesky)})
    with pytest.raises(ValueError, match="at least one latent"):
        vj.Model(_normal_model, {})
    with pytest.raises(ValueError, match="log_joint, or log_prior and log_likelihood"):
        vj.Model(latents={"mu": vj.Latent()})
    with pytest.raises(ValueError, match="log_likelihood is missing"):
        vj.Model(log_prior=lambda z: 0.0, latents={"mu": vj.Latent()})


def test_model_output_checks_happen_before_compiling():
    vector = vj.Model(lambda z, d: dist.Normal(z["mu"], 1).log_prob(d["y"]), {"mu": vj.Latent()})
    with count_compiles() as n, pytest.raises(ValueError, match=r"scalar, got shape \(3,\)"):
        raw_fit(vector, {"y": Y})
    assert n[0] == 0
    integer = vj.Model(lambda z, d: jnp.sum(d["y"] > 0), {"mu": vj.Latent()})
    with pytest.raises(TypeError, match="floating-point"):
        raw_fit(integer, {"y": Y})
    broken = vj.Model(lambda z, d: z["nope"], {"mu": vj.Latent()})
    with pytest.raises(KeyError, match="log_joint failed when traced"):
        raw_fit(broken, {"y": Y})
    fact = vj.Model(log_prior=lambda z: dist.Normal(0, 1).log_prob(z["mu"]),
                    log_likelihood=lambda z, d: dist.Normal(z["mu"], 1).log_prob(d["y"]).sum(),
                    latents={"mu": vj.Latent()})
    with pytest.raises(ValueError, match="one value per observation"):
        raw_fit(fact, {"y": Y})


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_data_names_the_key(bad):
    y = Y.copy()
    y[1] = bad
    with count_compiles() as n, pytest.raises(ValueError, match=r"data\['y'\].*index \(1,\)"):
        raw_fit(MODEL, {"y": y})
    assert n[0] == 0
    with pytest.raises(TypeError, match=r"data\['y'\] must be numeric"):
        raw_fit(MODEL, {"y": np.array(["a", "b"])})


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown guide 'meanfeild'.*'delta', 'fullrank'"):
        raw_fit(MODEL, {"y": Y}, guide="meanfeild")
    with pytest.raises(ValueError, match="steps must be an int >= 1, got 0"):
        raw_fit(MODEL, {"y": Y}, steps=0)
    with pytest.raises(ValueError, match="num_particles must be an int >= 1, got 0"):
        raw_fit(MODEL, {"y": Y}, num_particles=0)
    with pytest.raises(ValueError, match="steps"):
        raw_fit(MODEL, {"y": Y}, steps=2.5)
    with pytest.raises(TypeError, match="optax.GradientTransformation"):
        raw_fit(MODEL, {"y": Y}, optimizer=0.01)
    with pytest.raises(TypeError, match="vj.Model"):
        raw_fit(_normal_model, {"y": Y})
    with pytest.raises(TypeError, match="PRNG key"):
        raw_fit(MODEL, {"y": Y}, key="seed")
    with pytest.raises(ValueError, match="average"):
        raw_fit(MODEL, {"y": Y}, average=1.0)
    with pytest.raises(ValueError, match="rank=3 is larger than the dimension 2"):
        raw_fit(SCALE_MODEL, {"y": Y}, guide=vj.guides.LowRank(rank=3))
    with pytest.raises(ValueError, match="rank must be a positive int"):
        vj.guides.LowRank(rank=0)
    with pytest.raises(ValueError, match="init_scale"):
        vj.guides.MeanField(init_scale=-1.0)
    with pytest.raises(ValueError, match=r"does not cover latent\(s\) \['sigma'\]"):
        raw_fit(SCALE_MODEL, {"y": Y}, guide={"mu": "meanfield"})
    with pytest.raises(ValueError, match="unknown latent 'tau'"):
        raw_fit(SCALE_MODEL, {"y": Y}, guide={"mu": "meanfield", "sigma": "delta", "tau": "delta"})
    with pytest.raises(ValueError, match="unknown guide 'flow' for latent"):
        raw_fit(SCALE_MODEL, {"y": Y}, guide={"mu": "meanfield", "sigma": "flow"})
    with pytest.raises(ValueError, match="float64 needs 64-bit JAX"):
        raw_fit(MODEL, {"y": Y}, dtype=np.float64)


def test_bad_init_values():
    with pytest.raises(ValueError, match=r"unknown latent name\(s\) \['tau'\]"):
        raw_fit(SCALE_MODEL, {"y": Y}, init={"tau": 1.0})
    with pytest.raises(ValueError, match="'sigma'.*outside its support"):
        raw_fit(SCALE_MODEL, {"y": Y}, init={"sigma": -1.0})
    with pytest.raises(ValueError, match=r"'mu': value has shape \(2,\), declared shape is \(\)"):
        raw_fit(SCALE_MODEL, {"y": Y}, init={"mu": [1.0, 2.0]})
    with pytest.raises(ValueError, match="'mu': value is not finite"):
        raw_fit(SCALE_MODEL, {"y": Y}, init={"mu": np.nan})


def test_non_finite_log_joint_at_init_names_the_values():
    # finite only for mu > 3: a given init outside that region is reported with its values
    cliff = vj.Model(lambda z, d: jnp.where(z["mu"] > 3.0, -z["mu"] ** 2, -jnp.inf),
                     {"mu": vj.Latent()})
    with pytest.raises(ValueError, match=r"not finite at the given init: mu=1\."):
        raw_fit(cliff, init={"mu": 1.0})
    # random inits in (-2, 2) never reach mu > 3: the error lists the last values tried
    with pytest.raises(ValueError, match="no initial point.*100 tries.*mu="):
        raw_fit(cliff)
    # a user init where the model is finite works
    res = raw_fit(cliff, init={"mu": 4.0}, guide="delta", steps=50,
                 optimizer=optax.sgd(1e-3), key=jax.random.key(0))
    assert res.params["loc"][0] > 3.0


def test_valid_input_with_partial_init_and_integer_seed():
    res = raw_fit(SCALE_MODEL, {"y": Y}, init={"sigma": 2.0}, key=3, steps=20)
    assert res.init_point.shape == (2,)
    np.testing.assert_allclose(res.init_point[1], np.log(2.0), rtol=1e-6)
