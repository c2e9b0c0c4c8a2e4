"""Kernels of vijax.gp against scikit-learn's and hand formulas; PSD; sums and products;
hyper-parameter validation."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from sklearn.gaussian_process import kernels as skk

import vijax.gp as gp
from tests.conftest import precision

RNG = np.random.default_rng(0)
X1 = RNG.normal(size=(7, 2))
X2 = RNG.normal(size=(5, 2))


def _pairs():
    """(vijax kernel, the same kernel in scikit-learn)."""
    c = skk.ConstantKernel
    return {
        "rbf": (gp.RBF(0.7, 1.3), c(1.3) * skk.RBF(0.7)),
        "rbf_ard": (gp.RBF(np.array([0.5, 2.0]), 1.0), skk.RBF(np.array([0.5, 2.0]))),
        "matern12": (gp.Matern12(0.8, 2.0), c(2.0) * skk.Matern(0.8, nu=0.5)),
        "matern32": (gp.Matern32(0.8, 2.0), c(2.0) * skk.Matern(0.8, nu=1.5)),
        "matern52": (gp.Matern52(np.array([0.3, 1.1]), 0.5),
                     c(0.5) * skk.Matern(np.array([0.3, 1.1]), nu=2.5)),
        "periodic": (gp.Periodic(1.2, period=1.7, variance=0.9),
                     c(0.9) * skk.ExpSineSquared(1.2, 1.7)),
        "rq": (gp.RationalQuadratic(0.9, alpha=2.5, variance=1.5),
               c(1.5) * skk.RationalQuadratic(0.9, 2.5)),
        "constant": (gp.Constant(0.4), c(0.4)),
        "linear": (gp.Linear(1.0), skk.DotProduct(sigma_0=0.0)),
        "sum": (gp.RBF(0.7, 1.3) + gp.Periodic(1.0, 2.0, 0.5) + gp.White(0.1),
                c(1.3) * skk.RBF(0.7) + c(0.5) * skk.ExpSineSquared(1.0, 2.0)
                + skk.WhiteKernel(0.1)),
        "product": (gp.RBF(3.0, 2.0) * gp.Periodic(1.0, 1.0, 1.0),
                    c(2.0) * skk.RBF(3.0) * skk.ExpSineSquared(1.0, 1.0)),
        "mauna_loa": (gp.RBF(50.0, 2500.0) + gp.RBF(100.0, 4.0) * gp.Periodic(1.0, 1.0, 1.0)
                      + gp.RationalQuadratic(1.0, 1.0, 0.25) + gp.RBF(0.1, 0.01),
                      c(2500.0) * skk.RBF(50.0) + c(4.0) * skk.RBF(100.0)
                      * skk.ExpSineSquared(1.0, 1.0) + c(0.25) * skk.RationalQuadratic(1.0, 1.0)
                      + c(0.01) * skk.RBF(0.1)),
    }


@pytest.mark.parametrize("name", list(_pairs()))
def test_kernel_matches_sklearn(name):
    """Same hyper-parameters, same matrices (cross, symmetric and diagonal), float64."""
    ours, ref = _pairs()[name]
    with precision("float64"):
        p = ours.init_params(jnp.float64)
        np.testing.assert_allclose(ours(p, X1, X2), ref(X1, X2), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(ours(p, X1), ref(X1), rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(ours.diag(p, X1), ref.diag(X1), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("name", list(_pairs()))
def test_kernel_psd(name):
    """K(X, X) is symmetric positive semi-definite (eigenvalues >= -1e-10 max eigenvalue).
    1-D inputs except for the ARD kernels: exp-sine-squared of the Euclidean distance (as
    scikit-learn's) is PSD on 1-D inputs only."""
    ours, _ = _pairs()[name]
    with precision("float64"):
        X = RNG.normal(size=(30, 2 if name in ("rbf_ard", "matern52") else 1))
        K = np.asarray(ours(ours.init_params(jnp.float64), X))
        np.testing.assert_allclose(K, K.T, atol=1e-12)
        eig = np.linalg.eigvalsh(K)
        assert eig.min() >= -1e-10 * max(eig.max(), 1e-300)


def test_hand_formulas_1d():
    """1-D inputs of shape (N,) against the written formulas."""
    x = np.array([0.0, 0.5, 2.0])
    r = np.abs(x[:, None] - x[None]) / 0.7
    formulas = {
        gp.RBF(0.7, 2.0): 2.0 * np.exp(-0.5 * r**2),
        gp.Matern12(0.7, 2.0): 2.0 * np.exp(-r),
        gp.Matern32(0.7, 2.0): 2.0 * (1 + np.sqrt(3) * r) * np.exp(-np.sqrt(3) * r),
        gp.Matern52(0.7, 2.0): 2.0 * (1 + np.sqrt(5) * r + 5 * r**2 / 3) * np.exp(-np.sqrt(5) * r),
        gp.RationalQuadratic(0.7, 3.0, 2.0): 2.0 * (1 + r**2 / 6.0) ** -3.0,
        gp.Periodic(0.7, 1.5, 2.0): 2.0 * np.exp(
            -2 * np.sin(np.pi * np.abs(x[:, None] - x[None]) / 1.5) ** 2 / 0.49),
        gp.White(0.3): 0.3 * np.eye(3),
    }
    with precision("float64"):
        for k, expected in formulas.items():
            np.testing.assert_allclose(k(k.init_params(jnp.float64), x), expected, rtol=1e-12,
                                       err_msg=repr(k))


def test_sums_and_products_compose():
    """``+`` and ``*`` flatten into one Sum / Product whose value is the sum / product of the
    parts, with a tuple of the parts' parameters; White adds noise only to k(X)."""
    a, b, c = gp.RBF(1.0, 1.0), gp.Matern32(0.5, 2.0), gp.White(0.1)
    s = a + b + c
    assert isinstance(s, gp.Sum) and len(s.parts) == 3
    prod = a * b * gp.Periodic(1.0, 1.0, 1.0)
    assert isinstance(prod, gp.Product) and len(prod.parts) == 3
    ps = s.init_params()
    np.testing.assert_allclose(s(ps, X1), a(ps[0], X1) + b(ps[1], X1) + 0.1 * np.eye(7),
                               rtol=1e-6)
    np.testing.assert_allclose(s(ps, X1, X2), a(ps[0], X1, X2) + b(ps[1], X1, X2), rtol=1e-6)
    pp = prod.init_params()
    np.testing.assert_allclose(prod(pp, X1, X2), a(pp[0], X1, X2) * b(pp[1], X1, X2)
                               * prod.parts[2](pp[2], X1, X2), rtol=1e-6)


def test_params_are_declared_params_with_supports():
    """Hyper-parameters are vijax Params with positive supports; ``None`` is set from data."""
    from numpyro.distributions import constraints

    from vijax.model import Param

    k = gp.RBF(variance=2.0) * gp.Periodic(lengthscale=1.0)
    spec = k.params_spec()
    assert all(isinstance(p, Param) and p.support is constraints.positive
               for p in jax.tree.leaves(spec, is_leaf=lambda x: isinstance(x, Param)))
    p = k.init_params(jnp.float32, x_std=np.array([3.0]), f_var=5.0)
    assert float(p[0]["lengthscale"]) == 3.0 and float(p[0]["variance"]) == 2.0
    assert float(p[1]["variance"]) == 1.0  # a product's later parts get variance 1


@pytest.mark.parametrize("make, kernel, hyper", [
    (lambda: gp.RBF(lengthscale=-1.0), "RBF", "lengthscale"),
    (lambda: gp.Matern32(variance=0.0), "Matern32", "variance"),
    (lambda: gp.Periodic(1.0, period=-2.0), "Periodic", "period"),
    (lambda: gp.RationalQuadratic(1.0, alpha=float("nan")), "RationalQuadratic", "alpha"),
    (lambda: gp.RBF(np.array([1.0, -0.5])), "RBF", "lengthscale"),
])
def test_bad_init_names_kernel_and_hyper(make, kernel, hyper):
    with pytest.raises(ValueError, match=f"{kernel}: {hyper} init"):
        make()


def test_unknown_hyper_named():
    with pytest.raises(TypeError, match="RBF: unknown hyper-parameter"):
        gp.kernels.RBF.__base__.__init__(gp.RBF(), lenghtscale=1.0)


def test_float32_far_from_origin():
    """Inputs near 2000 (calendar years): float32 distances by differences stay accurate
    (|x|^2 - 2 x.x' + |x'|^2 would cancel to errors of ~0.5). The reference is float64 on
    the same float32-rounded inputs; 1e-5 is a few float32 roundings of exp."""
    x = np.asarray(1990.0 + np.linspace(0, 1, 13), np.float32).astype(float)
    k = gp.RBF(0.1, 1.0)
    with precision("float64"):
        ref = np.asarray(k(k.init_params(jnp.float64), x))
    got = np.asarray(k(k.init_params(jnp.float32), jnp.asarray(x, jnp.float32)))
    np.testing.assert_allclose(got, ref, atol=1e-5)


@pytest.mark.parametrize("k", [gp.Matern12(1.0, 1.0), gp.Periodic(1.0, 1.0, 1.0)])
def test_gradient_finite_at_zero_distance(k):
    """No NaN gradient through sqrt(r^2) at r = 0 (Matern 1/2, periodic)."""
    X = jnp.zeros((2, 1))
    g = jax.grad(lambda p: jnp.sum(k(p, X)))(k.init_params())
    assert all(np.isfinite(v) for v in jax.tree.leaves(g))
