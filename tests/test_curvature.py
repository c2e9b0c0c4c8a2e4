"""hessian_fn: each method against closed-form Hessians, the fallbacks on custom_vjp models
(odeint among them), and one compile per function and signature."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import count_compiles, precision
from vijax.curvature import METHODS, hessian_fn

DTYPES = ["float32", "float64"]

# --- 1. a Gaussian: f(x) = (x - m)^T P (x - m) / 2, so grad = P (x - m), hess = P -------------

P = np.array([[2.0, 0.5, 0.0], [0.5, 1.0, -0.3], [0.0, -0.3, 3.0]])
M = np.array([0.5, -1.0, 2.0])


def _gauss_neg_log_density(x, loc, prec):
    r = x - loc
    return 0.5 * r @ prec @ r


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("method", METHODS)
def test_gaussian_hessian_is_the_precision(dtype, method):
    with precision(dtype) as dt:
        x, loc, prec = (jnp.asarray(a, dt) for a in (np.array([1.5, 0.2, -0.7]), M, P))
        value, grad, hess, used = hessian_fn(_gauss_neg_log_density, (method,))(x, loc, prec)
        assert used == method and hess.dtype == dt and hess.shape == (3, 3)
        d, eps, scale = 3, np.finfo(dt).eps, np.abs(P).max()
        big = max(1.0, np.abs(x).max(), np.abs(M).max())
        if method == "finite differences":
            # f''' = 0, so the error is rounding only: each gradient entry (a d-term dot
            # product) is off by ~d eps |P| |x|, divided by the step eps^(1/3) max(1, |x_i|)
            tol = 4 * d * eps ** (2 / 3) * scale * big
        else:
            tol = 4 * d * eps * scale * big  # AD: the Hessian entries are sums of d products
        np.testing.assert_allclose(hess, P, rtol=0, atol=tol)
        np.testing.assert_allclose(grad, P @ (np.asarray(x, np.float64) - M), rtol=0,
                                   atol=4 * d * eps * scale * big)
        r = np.asarray(x, np.float64) - M
        np.testing.assert_allclose(value, 0.5 * r @ P @ r, rtol=8 * d * eps)


def test_plain_function_uses_forward_over_reverse():
    curvature = hessian_fn(_gauss_neg_log_density)
    assert curvature(jnp.zeros(3), jnp.asarray(M), jnp.asarray(P)).method == METHODS[0]


# --- 2. custom_vjp: softplus whose backward pass calls a custom_vjp sigmoid ------------------
# Forward mode cannot enter the sigmoid inside softplus's bwd, so forward-over-reverse fails;
# reverse mode differentiates bwd through sigmoid's own rule.


@jax.custom_vjp
def _sigmoid(x):
    return jax.nn.sigmoid(x)


_sigmoid.defvjp(lambda x: (jax.nn.sigmoid(x), jax.nn.sigmoid(x)),
                lambda s, g: (g * s * (1 - s),))


@jax.custom_vjp
def _softplus(x):
    return jnp.logaddexp(x, 0.0)


_softplus.defvjp(lambda x: (jnp.logaddexp(x, 0.0), x), lambda x, g: (g * _sigmoid(x),))

A = np.array([[1.0, -0.5, 0.2], [0.3, 0.8, -1.0], [-0.7, 0.1, 0.4], [0.5, 0.5, 0.5]])
X0 = np.array([0.4, -1.2, 0.9])


def _softplus_sum(x, a):
    return jnp.sum(_softplus(a @ x))


def _softplus_sum_exact(x, a):
    return jnp.sum(jnp.logaddexp(a @ x, 0.0))


@pytest.mark.parametrize("dtype", DTYPES)
def test_custom_vjp_falls_back_to_reverse_over_reverse(dtype):
    with precision(dtype) as dt:
        x, a = jnp.asarray(X0, dt), jnp.asarray(A, dt)
        with pytest.raises(TypeError, match="custom_vjp"):
            jax.hessian(_softplus_sum)(x, a)
        value, grad, hess, method = hessian_fn(_softplus_sum)(x, a)
        assert method == "reverse-over-reverse"
        exact = jax.hessian(_softplus_sum_exact)(x, a)
        # AD in both: A^T diag(s (1 - s)) A, 4-term sums of entries <= 1/4 |A|^2 ~ 0.5
        np.testing.assert_allclose(hess, exact, rtol=0, atol=32 * np.finfo(dt).eps)
        np.testing.assert_allclose(grad, jax.grad(_softplus_sum_exact)(x, a), rtol=0,
                                   atol=32 * np.finfo(dt).eps)


# --- 2b. an external function behind pure_callback: no AD over its gradient at all ----------


def _np_softplus_sum(y):
    return np.sum(np.logaddexp(y, 0.0)).astype(y.dtype)


def _np_sigmoid(y):
    return (1 / (1 + np.exp(-y))).astype(y.dtype)


@jax.custom_vjp
def _external(y):
    return jax.pure_callback(_np_softplus_sum, jax.ShapeDtypeStruct((), y.dtype), y)


_external.defvjp(
    lambda y: (_external(y), y),
    lambda y, g: (g * jax.pure_callback(_np_sigmoid, jax.ShapeDtypeStruct(y.shape, y.dtype), y),))


def _external_sum(x, a):
    return _external(a @ x)


@pytest.mark.parametrize("dtype", DTYPES)
def test_callback_falls_back_to_finite_differences(dtype):
    with precision(dtype) as dt:
        x, a = jnp.asarray(X0, dt), jnp.asarray(A, dt)
        value, grad, hess, method = hessian_fn(_external_sum)(x, a)
        assert method == "finite differences"
        exact = jax.hessian(_softplus_sum_exact)(x, a)
        # truncation h^2/6 |f''''| |A|^4 (softplus'''' <= 1/8, 4 rows, |A_ij| <= 1) plus
        # rounding eps |g| / h, with h = eps^(1/3) max(1, |x_i|): both ~ eps^(2/3) times O(1)
        big = max(1.0, np.abs(X0).max())
        tol = 10 * np.finfo(dt).eps ** (2 / 3) * big**2
        np.testing.assert_allclose(hess, exact, rtol=0, atol=tol)
        np.testing.assert_allclose(value, _softplus_sum_exact(x, a), rtol=4 * np.finfo(dt).eps)


# --- 3. an ODE model: y' = -k y, y(0) = y0, observed with Gaussian noise ---------------------
# x = (log k, y0); closed form y(t) = y0 exp(-k t) gives the exact Hessian.

T_OBS = np.array([0.5, 1.0, 2.0, 3.0])
Y_OBS = np.array([1.25, 0.74, 0.30, 0.09])
SIGMA = 0.1


def _ode_neg_log_lik(x, t_obs, y_obs):
    from jax.experimental.ode import odeint

    tol = 1e-8 if x.dtype == jnp.float64 else 1e-6  # float32 cannot reach 1e-8 (eps 1.2e-7)
    k, y0 = jnp.exp(x[0]), x[1]
    ts = jnp.concatenate([jnp.zeros(1, x.dtype), t_obs])
    y = odeint(lambda y, t, k: -k * y, y0, ts, k, rtol=tol, atol=tol)[1:]
    return 0.5 * jnp.sum((y - y_obs) ** 2) / SIGMA**2


def _closed_form_neg_log_lik(x, t_obs, y_obs):
    y = x[1] * jnp.exp(-jnp.exp(x[0]) * t_obs)
    return 0.5 * jnp.sum((y - y_obs) ** 2) / SIGMA**2


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # jax.experimental.ode may be retired
@pytest.mark.parametrize("method", ["reverse-over-reverse", "finite differences"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_odeint_model(dtype, method):
    with precision(dtype) as dt:
        x = jnp.asarray([np.log(1.1), 1.9], dt)
        args = (jnp.asarray(T_OBS, dt), jnp.asarray(Y_OBS, dt))
        tol = 1e-8 if dt == np.float64 else 1e-6  # the solver's rtol and atol in f
        f = _ode_neg_log_lik
        with pytest.raises(TypeError, match="custom_vjp"):
            jax.hessian(f)(x, *args)
        if method == "reverse-over-reverse":  # what the default order picks
            value, grad, hess, used = hessian_fn(f)(x, *args)
        else:
            value, grad, hess, used = hessian_fn(f, (method,))(x, *args)
        assert used == method
        exact = jax.hessian(_closed_form_neg_log_lik)(x, *args)
        scale = np.abs(exact).max()  # ~ 600: |dy/dx|^2 / sigma^2
        # the solver holds each y(t) and the adjoint to ~ tol relative, i.e. ~ 1e2 tol
        # relative to the Hessian's scale after the 1/sigma^2; float32 adds rounding ~ 1e3 eps
        # of the sums of squares, and finite differences their eps^(2/3)
        rel = 100 * tol + (1e3 * np.finfo(dt).eps if dt == np.float32 else 0.0)
        if method == "finite differences":
            # the solver's error is smooth in x while x +- h take the same accepted steps (so
            # it does not become tol / h); measured 3e-8 (float64) and 1.4e-4 (float32)
            rel += 10 * np.finfo(dt).eps ** (2 / 3)
        np.testing.assert_allclose(hess, exact, rtol=0, atol=rel * scale)
        np.testing.assert_allclose(grad, jax.grad(_closed_form_neg_log_lik)(x, *args),
                                   rtol=0, atol=rel * scale)


# --- 4. one trace and one compile per function and signature ---------------------------------


@pytest.mark.parametrize("method", METHODS)
def test_second_call_compiles_nothing(method):
    traces = [0]

    def f(x, a):
        traces[0] += 1  # runs only while JAX traces f
        return jnp.sum(a * jnp.cos(x))

    x, a = jnp.array([0.1, 0.2, 0.3]), jnp.array([1.0, 2.0, 3.0])
    first = hessian_fn(f, (method,))(x, a)
    assert traces[0] > 0
    before = traces[0]
    x, a = jax.block_until_ready((x + 1.0, a * 2.0))  # (these eager ops compile)
    with count_compiles() as n:
        # a new closure over the same f, new values of the same shapes
        second = hessian_fn(f, (method,))(x, a)
        jax.block_until_ready(second.hess)
    assert n[0] == 0 and traces[0] == before
    assert first.method == second.method == method
    exact = jnp.diag(-a * jnp.cos(x))
    tol = 1e-5 if method != "finite differences" else 1e-3  # float32: eps, eps^(2/3)
    np.testing.assert_allclose(second.hess, exact, rtol=0, atol=tol)


# --- errors ----------------------------------------------------------------------------------


def test_no_gradient_is_a_clear_error():
    with pytest.raises(TypeError, match="cannot take the gradient"):
        hessian_fn(lambda x: x**2)(jnp.ones(2))  # not a scalar


def test_rejects_bad_inputs():
    with pytest.raises(ValueError, match="1-D floating"):
        hessian_fn(jnp.sum)(jnp.ones((2, 2)))
    with pytest.raises(ValueError, match="1-D floating"):
        hessian_fn(jnp.sum)(jnp.arange(3))
    with pytest.raises(ValueError, match="subset"):
        hessian_fn(jnp.sum, ("newton",))
