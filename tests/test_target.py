"""The unconstrained target: every supported support round-trips and its log|det J| matches
``jax.jacobian`` of the map onto the support's free coordinates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from numpyro.distributions import constraints

import vijax as vj
from tests.conftest import precision


def _free(support, x):
    """Free coordinates of a constrained value (the ones the density is defined over)."""
    if support is constraints.simplex:
        return x[..., :-1]
    if support in (constraints.lower_cholesky, constraints.positive_definite):
        i, j = np.tril_indices(x.shape[-1])
        return x[..., i, j]
    if support in (constraints.corr_cholesky, constraints.corr_matrix):
        i, j = np.tril_indices(x.shape[-1], -1)
        return x[..., i, j]
    return x


SUPPORTS = {
    "real": (constraints.real, (3,)),
    "positive": (constraints.positive, (2,)),
    "interval": (constraints.interval(-1.0, 2.5), (2,)),
    "unit_interval": (constraints.unit_interval, ()),
    "greater_than": (constraints.greater_than(1.5), (2,)),
    "simplex": (constraints.simplex, (4,)),
    "ordered_vector": (constraints.ordered_vector, (3,)),
    "positive_ordered_vector": (constraints.positive_ordered_vector, (3,)),
    "lower_cholesky": (constraints.lower_cholesky, (3, 3)),
    "corr_cholesky": (constraints.corr_cholesky, (3, 3)),
    "positive_definite": (constraints.positive_definite, (3, 3)),
    "corr_matrix": (constraints.corr_matrix, (3, 3)),
    "batched_simplex": (constraints.simplex, (2, 3)),
}


def _target(support, shape):
    return vj.Model(lambda z, d: jnp.zeros(()), {"x": vj.Latent(shape, support)}).target


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", sorted(SUPPORTS))
def test_round_trip_and_log_det(name, dtype):
    support, shape = SUPPORTS[name]
    with precision(dtype) as dt:
        target = _target(support, shape)

        @jax.jit  # one compile per case: eager numpyro transforms dispatch op by op
        def check(u):
            z, log_det = target.constrain_with_log_det(u)

            def fwd(v):  # batched events give a block-diagonal Jacobian: same formula
                return _free(support, target.constrain(v)["x"]).reshape(-1)

            return (z["x"], log_det["x"], target.unconstrain(z, dt), jax.jacobian(fwd)(u),
                    jnp.all(support.check(z["x"])))

        u = jax.random.normal(jax.random.key(3), (target.dim,), dt) * 0.7
        x, log_det, back, jac, inside = check(u)
        assert x.shape == shape and x.dtype == dt
        assert bool(inside)
        tol = 1e-4 if dt == np.float32 else 1e-10
        np.testing.assert_allclose(back, u, atol=tol * 10, rtol=tol * 10)
        assert jac.shape == (target.dim, target.dim), (name, jac.shape)
        expected = np.linalg.slogdet(np.asarray(jac, np.float64))[1]
        np.testing.assert_allclose(float(log_det), expected, rtol=tol * 20, atol=tol * 20)
        assert target.blocks[0].size == target.dim


def test_layout_ravels_in_declaration_order():
    m = vj.Model(lambda z, d: jnp.zeros(()), {
        "a": vj.Latent((2,)), "s": vj.Latent((3,), constraints.simplex),
        "L": vj.Latent((2, 2), constraints.lower_cholesky)})
    t = m.target
    assert [(b.name, b.offset, b.size) for b in t.blocks] == [("a", 0, 2), ("s", 2, 2),
                                                              ("L", 4, 3)]
    assert t.dim == 7
    parts = t.unravel(jnp.arange(7.0))
    np.testing.assert_array_equal(parts["s"], [2.0, 3.0])


def test_log_density_adds_jacobian_except_excluded():
    m = vj.Model(lambda z, d: -z["t"], {"t": vj.Latent((), constraints.positive)})
    theta = jnp.array([0.3])
    # t = exp(u): log p~ = -exp(u) + u
    np.testing.assert_allclose(m.target.log_density(theta, None), -np.exp(0.3) + 0.3, rtol=1e-6)
    np.testing.assert_allclose(m.target.log_density(theta, None, frozenset({"t"})),
                               -np.exp(0.3), rtol=1e-6)
