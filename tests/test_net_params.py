"""Networks held in one model parameter (vj.net_param): decoders from any network library."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest

import vijax as vj


def test_flat_weights_reproduce_the_network_equinox_mlp():
    net = vj.nets.mlp(3, 2, (5,))
    x = jnp.arange(3.0)
    params = net.init(jax.random.key(4), x)
    dec = vj.net_param(net, x, key=jax.random.key(4))
    assert dec.param.shape == (3 * 5 + 5 + 5 * 2 + 2,)
    np.testing.assert_allclose(dec(jnp.asarray(dec.param.init, jnp.float32), x),
                               net.apply(params, x), rtol=1e-6)
    xs = jnp.ones((7, 3))
    assert dec.batched(jnp.asarray(dec.param.init, jnp.float32), xs).shape == (7, 2)


def test_flat_weights_reproduce_the_network_flax_linen():
    nn = pytest.importorskip("flax.linen")

    class Dec(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.Dense(4)(nn.tanh(nn.Dense(6)(x)))

    x = jnp.ones(2)
    dec = vj.net_param(Dec(), x, key=1)
    ref = Dec().apply(Dec().init(jax.random.key(1), x), x)
    np.testing.assert_allclose(dec(jnp.asarray(dec.param.init, jnp.float32), x), ref,
                               rtol=1e-6)


def test_a_decoder_in_a_param_is_trained():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 4)).astype(np.float32)
    dec = vj.net_param(vj.nets.mlp(2, 4, (8,)), jnp.zeros(2), key=0)

    def lik(z, d):
        mean = dec.batched(z["dec"], z["code"])
        return (dist.Normal(mean, 1.0).log_prob(d["x"]).sum(-1)
                + dist.Normal(0, 1).log_prob(z["code"]).sum(-1))

    model = vj.Model(log_prior=lambda z: jnp.zeros(()), log_likelihood=lik,
                     latents={"code": vj.Latent((2,), local=True)},
                     params={"dec": dec.param})
    res = vj.fit(model, {"x": x}, steps=300, optimizer=optax.adam(1e-2), convergence=None,
                 progress=False, psis_draws=0)
    moved = np.abs(np.asarray(res.model_params["dec"]) - dec.param.init).max()
    assert moved > 1e-2
    assert np.mean(res.losses[-30:]) < np.mean(res.losses[:30])


def test_wrong_weight_vector_is_named():
    dec = vj.net_param(vj.nets.mlp(2, 1, (3,)), jnp.zeros(2))
    with pytest.raises(ValueError, match=r"vector of 13, got shape \(12,\)"):
        dec(jnp.zeros(12), jnp.zeros(2))
