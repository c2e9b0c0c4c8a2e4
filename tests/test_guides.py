"""Every guide family behind the one interface: log q of its own draws agrees with log_q, the
closed-form entropy agrees with a Monte Carlo estimate, the mean is the mean, and the softplus
inverse is stable."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import vijax as vj
from tests.conftest import precision
from vijax.guides import build_guide, resolve_spec, softplus, softplus_inverse

DIM = 4
N_DRAWS = 4000


def _target():
    return vj.Model(lambda z, d: jnp.zeros(()), {"a": vj.Latent((1,)), "b": vj.Latent((3,))}
                    ).target


SPECS = {
    "meanfield": "meanfield",
    "lowrank": vj.guides.LowRank(rank=2),
    "fullrank": "fullrank",
    "structured": {"a": "meanfield", "b": vj.guides.FullRank()},
}


def _perturbed_params(guide, key):
    params = guide.init(key, jnp.linspace(-1.0, 1.0, DIM))
    # move away from the initial point so every parameter matters
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    leaves = [x + 0.3 * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys,
                                                                                  strict=True)]
    return jax.tree_util.tree_unflatten(tree, leaves)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_sample_log_q_entropy_and_mean(name):
    guide = build_guide(resolve_spec(SPECS[name]), _target())
    params = _perturbed_params(guide, jax.random.key(0))

    @jax.jit
    def stats(key):
        keys = jax.random.split(key, N_DRAWS)
        theta, log_q = jax.vmap(guide.sample, in_axes=(0, None))(keys, params)
        again = jax.vmap(guide.log_q, in_axes=(None, 0))(params, theta)
        return theta, log_q, again, guide.entropy(params), guide.mean(params)

    theta, log_q, again, entropy, mean = stats(jax.random.key(1))
    assert theta.shape == (N_DRAWS, DIM)
    np.testing.assert_allclose(log_q, again, rtol=1e-4, atol=1e-4)
    # entropy = -E[log q]; Monte Carlo standard error sd(log q) / sqrt(n); 5 standard errors
    se = np.std(log_q) / np.sqrt(N_DRAWS)
    assert abs(entropy + np.mean(log_q)) < 5 * se
    # mean: standard error sd / sqrt(n) per coordinate; 5 standard errors
    se_mean = np.std(theta, axis=0) / np.sqrt(N_DRAWS)
    np.testing.assert_array_less(np.abs(np.mean(theta, axis=0) - mean), 5 * se_mean)


def test_structured_guide_keeps_each_block_independent():
    guide = build_guide(resolve_spec(SPECS["structured"]), _target())
    params = _perturbed_params(guide, jax.random.key(2))
    keys = jax.random.split(jax.random.key(3), N_DRAWS)
    theta, _ = jax.jit(jax.vmap(guide.sample, in_axes=(0, None)))(keys, params)
    corr = np.corrcoef(np.asarray(theta).T)
    # correlation estimates have standard error ~1/sqrt(n) = 0.016; 5 standard errors
    assert np.all(np.abs(corr[0, 1:]) < 5 / np.sqrt(N_DRAWS))


def test_delta_guide():
    guide = build_guide(resolve_spec("delta"), _target())
    params = guide.init(jax.random.key(0), jnp.arange(DIM, dtype=jnp.float32))
    theta, log_q = guide.sample(jax.random.key(1), params)
    np.testing.assert_array_equal(theta, np.arange(DIM))
    assert float(log_q) == 0.0 and guide.point_mass
    assert guide.no_jacobian == frozenset({"a", "b"})


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_softplus_inverse_is_stable(dtype):
    with precision(dtype):
        y = jnp.asarray([1e-30, 1e-8, 1e-3, 0.1, 1.0, 10.0, 50.0, 1e4], dtype)
        x = softplus_inverse(y)
        assert bool(jnp.all(jnp.isfinite(x)))
        np.testing.assert_allclose(softplus(x), y, rtol=1e-5 if dtype == "float32" else 1e-12)
