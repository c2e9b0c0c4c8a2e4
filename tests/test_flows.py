"""Flow bijections and flow guides: log|det J| against ``jax.jacobian``, invertibility, the
change-of-variables density, identity initialisation, validation."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest

import vijax as vj
from tests.conftest import precision, raw_fit
from vijax.guides import build_guide, resolve_spec
from vijax.guides.coupling import affine_coupling_layer, spline_coupling_layer
from vijax.guides.iaf import iaf_layer
from vijax.guides.rq_spline import num_params, rq_spline

LAYERS = {
    "iaf": lambda d: iaf_layer(d, (16,)),
    "spline_coupling": lambda d: spline_coupling_layer(d, (16,), 6, 2.0),
    "affine_coupling": lambda d: affine_coupling_layer(d, (16,)),
}
CASES = [(name, d) for name in sorted(LAYERS) for d in (2, 5)] + [("iaf", 1)]


def _perturb(params, key, scale=0.5):
    """Move every parameter away from the identity initialisation."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(key, len(leaves))
    return jax.tree_util.tree_unflatten(tree, [
        x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys,
                                                                            strict=True)])


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("name", "dim"), CASES, ids=[f"{n}-{d}" for n, d in CASES])
def test_layer_log_det_and_inverse(name, dim, dtype):
    with precision(dtype) as dt:
        layer = LAYERS[name](dim)
        params = _perturb(layer.init(jax.random.key(0), dt), jax.random.key(1))
        # points spread over the spline's interval and its linear tails
        x = 1.5 * jax.random.normal(jax.random.key(2), (dim,), dt)

        @jax.jit
        def check(params, x):
            y, log_det = layer.forward(params, x)
            back, log_det_inv = layer.inverse(params, y)
            jac = jax.jacobian(lambda v: layer.forward(params, v)[0])(x)
            return y, log_det, back, log_det_inv, jac

        y, log_det, back, log_det_inv, jac = check(params, x)
    tol = 2e-4 if dtype == "float32" else 1e-9
    assert y.dtype == dt and not np.allclose(y, x)  # a real, non-identity map
    np.testing.assert_allclose(log_det, np.linalg.slogdet(np.asarray(jac, np.float64))[1],
                               rtol=tol, atol=tol)
    # the Jacobians are triangular: the inverse's error is the forward's rounding error
    # divided by the local derivative (a nearly flat spline bin amplifies it)
    slope = np.abs(np.diagonal(np.asarray(jac, np.float64)))
    np.testing.assert_array_less(np.abs(np.asarray(back, np.float64) - np.asarray(x)),
                                 tol * (1 + np.abs(np.asarray(x))) / np.minimum(slope, 1.0))
    # evaluated at the recovered point: same amplification of rounding error
    np.testing.assert_allclose(log_det_inv, log_det, rtol=5 * tol, atol=5 * tol)


def test_rq_spline_derivative_inverse_and_tails():
    raw = jax.random.normal(jax.random.key(0), (num_params(5),))
    xs = jnp.linspace(-4.0, 4.0, 41)  # bound 3: both tails and every bin

    def f(x):
        return rq_spline(x, raw, 3.0)[0]

    y, log_det = jax.vmap(lambda x: rq_spline(x, raw, 3.0))(xs)
    np.testing.assert_allclose(log_det, jnp.log(jax.vmap(jax.grad(f))(xs)), atol=1e-5)
    back, _ = jax.vmap(lambda v: rq_spline(v, raw, 3.0, True))(y)
    np.testing.assert_allclose(back, xs, atol=1e-5)
    assert np.all(np.diff(np.asarray(y)) > 0)  # monotone
    outside = np.abs(np.asarray(xs)) >= 3.0
    np.testing.assert_array_equal(np.asarray(y)[outside], np.asarray(xs)[outside])
    zero = jax.vmap(lambda x: rq_spline(x, jnp.zeros_like(raw), 3.0))(xs)
    np.testing.assert_allclose(zero[0], xs, atol=1e-5)  # zero raw parameters: identity
    np.testing.assert_allclose(zero[1], 0.0, atol=1e-5)


def _target(dim):
    return vj.Model(lambda z, d: jnp.zeros(()), {"x": vj.Latent((dim,))}).target


FLOWS = {"iaf": vj.guides.IAF(num_layers=2, hidden=(16,)),
         "spline": vj.guides.Spline(num_layers=2, num_bins=5, hidden=(16,), bound=2.0),
         "realnvp": vj.guides.RealNVP(num_layers=3, hidden=(16,))}


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_flow_density_is_change_of_variables(name):
    dim = 3
    guide = build_guide(resolve_spec(FLOWS[name]), _target(dim))
    base = build_guide(resolve_spec("meanfield"), _target(dim))
    params = _perturb(guide.init(jax.random.key(0), jnp.zeros(dim)), jax.random.key(1), 0.3)
    eps = jax.random.normal(jax.random.key(2), (dim,))

    @jax.jit
    def check(params, eps):
        theta, log_q = guide.transform(params, eps)
        # independently: push the base draw through the flow and take the full Jacobian
        x0, log_q0 = base.transform(params["base"], eps)
        jac = jax.jacobian(lambda v: guide.transform({**params, "base": {
            "loc": v, "raw_scale": params["base"]["raw_scale"]}}, jnp.zeros(dim))[0])(x0)
        return theta, log_q, log_q0, jac, guide.log_q(params, theta)

    theta, log_q, log_q0, jac, log_q_again = check(params, eps)
    expected = log_q0 - np.linalg.slogdet(np.asarray(jac, np.float64))[1]
    np.testing.assert_allclose(log_q, expected, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(log_q_again, log_q, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(FLOWS))
def test_fresh_flow_is_exactly_its_base(name):
    dim = 4
    guide = build_guide(resolve_spec(FLOWS[name]), _target(dim))
    base = build_guide(resolve_spec("meanfield"), _target(dim))
    base_params = _perturb(base.init(jax.random.key(0), jnp.arange(dim, dtype=jnp.float32)),
                           jax.random.key(1))
    params = {**guide.init(jax.random.key(3), jnp.zeros(dim)), "base": base_params}
    eps = jax.random.normal(jax.random.key(4), (dim,))
    theta, log_q = jax.jit(guide.transform)(params, eps)
    theta0, log_q0 = base.transform(base_params, eps)
    np.testing.assert_allclose(theta, theta0, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(log_q, log_q0, rtol=1e-6, atol=1e-6)


def test_flow_config_validation():
    with pytest.raises(ValueError, match="num_bins must be an int >= 2"):
        vj.guides.Spline(num_bins=1)
    with pytest.raises(ValueError, match="hidden must be a non-empty tuple"):
        vj.guides.IAF(hidden=())
    with pytest.raises(ValueError, match="num_layers must be a positive int"):
        vj.guides.RealNVP(num_layers=0)
    with pytest.raises(ValueError, match="hidden widths must be positive ints"):
        vj.guides.Spline(hidden=(8, 0))
    one = vj.Model(lambda z, d: -z["mu"] ** 2, {"mu": vj.Latent()})
    for name in ("spline", "realnvp"):
        with pytest.raises(ValueError, match=r"\['mu'\] have 1.*guide='iaf'"):
            raw_fit(one, guide=name)
    two = vj.Model(lambda z, d: -jnp.sum(z["a"] ** 2) - z["b"] ** 2,
                   {"a": vj.Latent((2,)), "b": vj.Latent()})
    with pytest.raises(ValueError, match=r"guide block \['b'\].*\['b'\] have 1"):
        raw_fit(two, guide={"a": "spline", "b": "spline"})


def _banana_plus(z, d):
    x = z["x"]
    return (dist.Normal(0, 2.0).log_prob(x[0]) + dist.Normal(0.25 * x[0] ** 2, 0.5).log_prob(x[1])
            + dist.Normal(1.0, 0.5).log_prob(z["w"]))


BANANA_PLUS = vj.Model(_banana_plus, {"x": vj.Latent((2,)), "w": vj.Latent()})


@pytest.mark.slow  # 20 s on 2 cores
def test_flow_block_in_structured_guide_and_warm_start():
    small = vj.guides.Spline(num_layers=2, num_bins=4, hidden=(8,))
    mf = raw_fit(BANANA_PLUS, guide="meanfield", steps=500, key=jax.random.key(0),
                psis_draws=0)
    res = raw_fit(BANANA_PLUS, guide={"x": small, "w": "meanfield"}, steps=500,
                 num_particles=2, key=jax.random.key(1), init_from=mf, psis_draws=0)
    assert res.guide.name == "structured(x:spline, w:meanfield)"
    assert res.guide.entropy is None and res.guide.mean is None
    # w is an independent N(1, 0.5^2): Monte Carlo mean of 4,000 draws, se 0.008; 6 se
    assert abs(float(res.mean()["w"]) - 1.0) < 0.05
    assert np.isfinite(res.diagnostics.final_loss)
    # a flow whose base is the fitted family starts exactly as that fit
    warm = raw_fit(BANANA_PLUS, guide=vj.guides.IAF(num_layers=2, hidden=(8,)), steps=1,
                  optimizer=optax.sgd(0.0), key=jax.random.key(2), init_from=mf,
                  psis_draws=0)
    for name in ("loc", "raw_scale"):
        np.testing.assert_array_equal(warm.params["base"][name], mf.params[name])
    with pytest.raises(ValueError, match="init or init_from"):
        raw_fit(BANANA_PLUS, init={"w": 1.0}, init_from=mf)
    other = vj.Model(lambda z, d: -jnp.sum(z["x"] ** 2) - z["v"] ** 2,
                     {"x": vj.Latent((2,)), "v": vj.Latent()})
    with pytest.raises(ValueError, match="do not match"):
        raw_fit(other, init_from=mf)


@pytest.mark.slow  # 7-9 s on 2 cores; kept out of the default suite's time
def test_flow_fit_in_float64():
    with precision("float64"):
        res = raw_fit(BANANA_PLUS, guide=vj.guides.RealNVP(num_layers=2, hidden=(8,)),
                     steps=300, key=jax.random.key(0))
        draws = res.sample(jax.random.key(1), 5)
    assert res.losses.dtype == np.float64 and draws["x"].dtype == np.float64
    assert np.all(np.isfinite(res.losses))
