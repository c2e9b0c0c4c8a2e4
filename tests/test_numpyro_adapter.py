"""vijax.numpyro_adapter: sites, log density against NumPyro's own, errors, memoisation."""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints
from numpyro.infer.util import log_density, potential_energy

from tests.conftest import precision, raw_fit
from vijax.model import Latent, Model, Param
from vijax.numpyro_adapter import _clear_cache, from_numpyro

# --- models --------------------------------------------------------------------------------


def regression(x, y=None, prior_scale=1.0):
    """Positive, simplex, plate and interval latents; deterministic; factor."""
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    w = numpyro.sample("w", dist.Dirichlet(jnp.ones(3)))
    with numpyro.plate("groups", 2):
        mu = numpyro.sample("mu", dist.Normal(0.0, prior_scale))
    rho = numpyro.sample("rho", dist.Uniform(-1.0, 2.0))
    offset = numpyro.deterministic("offset", w @ jnp.arange(3.0))
    numpyro.factor("shrink", -0.5 * jnp.sum(mu**2))
    with numpyro.plate("data", x.shape[0]):
        numpyro.sample("y", dist.Normal(mu[0] + rho * x + offset, sigma), obs=y)


def hierarchical(x, y, n_groups):
    """Batched simplex and positive latents in a plate; a matrix latent; int arg (static)."""
    tau = numpyro.sample("tau", dist.LogNormal(0.0, 1.0))
    with numpyro.plate("g", n_groups):
        probs = numpyro.sample("probs", dist.Dirichlet(jnp.ones(2)))
        scale = numpyro.sample("scale", dist.Gamma(2.0, 2.0 / tau))
    numpyro.sample("y", dist.Normal(probs[:, 0] * x, scale).to_event(1), obs=y)
    chol = numpyro.sample("chol", dist.ImproperUniform(constraints.lower_cholesky, (), (2, 2)))
    numpyro.sample("pair", dist.MultivariateNormal(jnp.zeros(2), scale_tril=chol),
                   obs=jnp.array([0.5, -0.3]))


X = np.linspace(-1.0, 1.0, 5).astype(np.float32)
Y = (0.3 + 0.8 * X).astype(np.float32)
CASES = [
    (regression, (X,), {"y": Y, "prior_scale": 2.0}),
    (hierarchical, (X[:3], Y[:3], 3), {}),
]
IDS = ["regression", "hierarchical"]


def _thetas(target, n, dtype):
    return jax.random.normal(jax.random.key(0), (n, target.dim), dtype)


@pytest.fixture(autouse=True)
def _fresh_cache():
    _clear_cache()
    yield
    _clear_cache()


# --- discovery -----------------------------------------------------------------------------


def test_latents_follow_site_order_with_shapes_and_supports():
    m = from_numpyro(regression, X, y=Y, prior_scale=2.0)
    assert isinstance(m, Model)
    assert list(m.latents) == ["sigma", "w", "mu", "rho"]
    shapes = {k: v.shape for k, v in m.latents.items()}
    assert shapes == {"sigma": (), "w": (3,), "mu": (2,), "rho": ()}
    assert m.latents["sigma"].support is constraints.positive
    assert m.latents["w"].support is constraints.simplex
    assert isinstance(m.latents["rho"].support, type(constraints.interval(0.0, 1.0)))
    assert m.target.names == tuple(m.latents)
    # dynamic data: the arrays and the Python float, in tree_flatten order (kwargs sorted)
    assert len(m.data) == 3 and m.data[0] is X and m.data[1] == 2.0 and m.data[2] is Y
    h = from_numpyro(hierarchical, X[:3], Y[:3], 3)
    assert {k: v.shape for k, v in h.latents.items()} == {"tau": (), "probs": (3, 2),
                                                          "scale": (3,), "chol": (2, 2)}
    assert h.target.block("chol").unconstrained_shape == (3,)  # lower_cholesky, 2 x 2
    assert len(h.data) == 2


# --- log density against NumPyro's own ----------------------------------------------------


def _tolerance(dtype):
    # same computation on the same values in another order: only float rounding differs
    return {"rtol": 1e-5, "atol": 1e-4} if dtype == np.float32 else {"rtol": 1e-12,
                                                                     "atol": 1e-10}


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize(("model_fn", "args", "kwargs"), CASES, ids=IDS)
def test_log_density_matches_numpyro(model_fn, args, kwargs, dtype):
    with precision("float64" if dtype == np.float64 else "float32"):
        m = from_numpyro(model_fn, *args, **kwargs)
        target = m.target

        @jax.jit  # one program for all comparisons: keeps the test fast
        def compare(theta, data):
            z = target.constrain(theta)
            return {
                # constrained values, no Jacobian: numpyro's log_density
                "log_joint": (m.log_density(z, data), log_density(model_fn, args, kwargs, z)[0]),
                "no_jacobian": (target.log_density(theta, data, frozenset(target.names)),
                                log_density(model_fn, args, kwargs, z)[0]),
                # unconstrained, with Jacobian: minus numpyro's potential energy; theta blocks
                # follow site order, so unravel gives numpyro's unconstrained dict
                "jacobian": (target.log_density(theta, data),
                             -potential_energy(model_fn, args, kwargs, target.unravel(theta))),
                "unconstrain": (target.unconstrain(z, dtype), theta),
            }

        for theta in _thetas(target, 3, dtype):
            out = compare(theta, m.data)
            assert out["log_joint"][0].dtype == dtype
            for what in ("log_joint", "no_jacobian", "jacobian"):
                np.testing.assert_allclose(*out[what], **_tolerance(dtype), err_msg=what)
            # unconstrain inverts constrain (simplex round trips lose a few digits)
            tol = 1e-3 if dtype == np.float32 else 1e-9
            np.testing.assert_allclose(*out["unconstrain"], rtol=tol, atol=tol)


# --- discrete latents ----------------------------------------------------------------------


def bernoulli_mixture(y):
    """A continuous latent, a positive one and a Bernoulli vector (enumerate is ignored)."""
    loc = numpyro.sample("loc", dist.Normal(0.0, 2.0))
    scale = numpyro.sample("scale", dist.HalfNormal(1.0))
    with numpyro.plate("data", y.shape[0]):
        z = numpyro.sample("z", dist.Bernoulli(0.3), infer={"enumerate": "parallel"})
        numpyro.sample("y", dist.Normal(loc * (2 * z - 1), scale), obs=y)


def test_bernoulli_latent_is_declared_and_scored_as_numpyro_does():
    m = from_numpyro(bernoulli_mixture, Y)
    assert list(m.latents) == ["loc", "scale", "z"]
    assert m.latents["z"].shape == (5,) and m.latents["z"].support is constraints.boolean
    target = m.target
    assert target.names == ("loc", "scale") and target.discrete_names == ("z",)
    assert (target.dim, target.full_dim) == (2, 7)

    @jax.jit  # one program for all points
    def compare(theta, data):
        z = target.constrain(theta)  # discrete values: int32, as vijax passes them
        return z["z"], m.log_density(z, data), log_density(bernoulli_mixture, (Y,), {}, z)[0]

    key_c, key_d = jax.random.split(jax.random.key(0))
    cont = jax.random.normal(key_c, (4, 2))
    disc = jax.random.bernoulli(key_d, 0.5, (4, 5)).astype(jnp.float32)
    for theta in jnp.concatenate([cont, disc], axis=1):
        z, ours, theirs = compare(theta, m.data)
        assert z.dtype == jnp.int32 and z.shape == (5,)
        # same computation on the same values: only float rounding differs
        np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-4)
    assert from_numpyro(bernoulli_mixture, Y + 1.0).target is target  # memoised


MEANS = jnp.array([-1.0, 0.5, 2.0])
PRIOR = jnp.array([0.5, 0.3, 0.2])
Y_GROUPS = jnp.array([[0.2, 1.1, -0.4], [1.9, 1.2, 2.6]])


def categorical_means(y):
    """Per group g, k_g ~ Categorical(PRIOR) and y_gi ~ N(MEANS[k_g], 1): q(k) can be exact."""
    with numpyro.plate("groups", y.shape[0]):
        k = numpyro.sample("k", dist.Categorical(PRIOR))
        numpyro.sample("y", dist.Normal(MEANS[k][:, None], 1.0).to_event(1), obs=y)


def test_categorical_latent_is_fitted_to_the_exact_posterior():
    m = from_numpyro(categorical_means, Y_GROUPS)
    assert m.latents["k"].shape == (2,)
    support = m.latents["k"].support
    assert (support.lower_bound, support.upper_bound) == (0, 2)
    res = raw_fit(m, steps=1000, key=jax.random.key(0))
    # exact posterior by enumeration: p(k_g | y) ~ PRIOR_k prod_i N(y_gi | MEANS_k, 1)
    log_post = jnp.log(PRIOR) + dist.Normal(MEANS[:, None, None], 1.0).log_prob(
        Y_GROUPS).sum(-1).T
    exact = np.asarray(jax.nn.softmax(log_post, axis=-1))
    fitted = np.asarray(jax.nn.softmax(res.params["discrete"]["k"], axis=-1))
    assert fitted.shape == (2, 3)
    # 0.05: over keys 0-3 the averaged score-function iterates land within 0.025 of it
    np.testing.assert_allclose(fitted, exact, atol=0.05)


@pytest.mark.parametrize("prior", [dist.Poisson(3.0), dist.Geometric(0.4)],
                         ids=["poisson", "geometric"])
def test_infinite_discrete_latent_raises_naming_the_site(prior):
    def counts(y):
        n = numpyro.sample("n_events", prior)
        numpyro.sample("y", dist.Normal(n, 1.0), obs=y)

    with pytest.raises(ValueError, match="'n_events'.*only finite supports.*boolean.*"
                                         "integer_interval.*marginalise.*bound it"):
        from_numpyro(counts, Y)


def test_discrete_bounds_are_scalars_or_the_site_is_rejected():
    def batched(y, total, high):
        c = numpyro.sample("c", dist.Categorical(jnp.ones((2, 3)) / 3.0))  # batched probs
        b = numpyro.sample("b", dist.Binomial(total, 0.5))  # array total_count
        u = numpyro.sample("uneven", dist.DiscreteUniform(0, high))
        numpyro.sample("y", dist.Normal(c.sum() + b.sum() + u.sum(), 1.0), obs=y)

    m = from_numpyro(batched, Y, jnp.array([4, 4]), jnp.array([2, 2, 2]))
    bounds = {k: (lat.shape, lat.support.lower_bound, lat.support.upper_bound)
              for k, lat in m.latents.items()}
    assert bounds == {"c": ((2,), 0, 2), "b": ((2,), 0, 4), "uneven": ((3,), 0, 2)}
    assert all(isinstance(b, int) for _, *lh in bounds.values() for b in lh)
    with pytest.raises(ValueError, match="'uneven'.*different range of values per element"):
        from_numpyro(batched, Y, jnp.array([4, 4]), jnp.array([1, 2, 3]))
    with pytest.raises(ValueError, match="'b'.*different range of values per element"):
        from_numpyro(batched, Y, jnp.array([4, 5]), jnp.array([2, 2, 2]))


def test_support_depending_on_a_discrete_latent_raises_naming_the_site():
    def nested(y):
        n = numpyro.sample("n", dist.DiscreteUniform(1, 3))
        k = numpyro.sample("k_below_n", dist.DiscreteUniform(0, n))
        numpyro.sample("y", dist.Normal(k, 1.0), obs=y)

    with pytest.raises(ValueError, match="'k_below_n'.*depends on other latents"):
        from_numpyro(nested, Y)


# --- errors --------------------------------------------------------------------------------


def test_not_callable_raises_type_error():
    with pytest.raises(TypeError, match="model function"):
        from_numpyro("regression", X)


def test_no_latent_sites_raises_naming_the_model():
    def all_observed(y):
        numpyro.sample("y", dist.Normal(0.0, 1.0), obs=y)

    with pytest.raises(ValueError, match="all_observed.*no latent"):
        from_numpyro(all_observed, Y)


def test_subsampling_plate_gives_a_factorised_model():
    # details in tests/test_numpyro_subsample.py
    def subsampled(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        with numpyro.plate("minibatch", y.shape[0], subsample_size=2) as idx:
            numpyro.sample("y", dist.Normal(mu, 1.0), obs=y[idx])

    m = from_numpyro(subsampled, Y)
    assert m.factorised and m.default_batch_size == 2


def test_support_depending_on_a_latent_raises_naming_the_site():
    def dependent(y):
        a = numpyro.sample("a", dist.Exponential(1.0))
        b = numpyro.sample("b_within_a", dist.Uniform(0.0, a))
        numpyro.sample("y", dist.Normal(b, 1.0), obs=y)

    with pytest.raises(ValueError, match="'b_within_a'.*depends on other latents"):
        from_numpyro(dependent, Y)


def test_support_depending_on_data_is_fixed_per_data_set():
    def bounded(y, upper):
        b = numpyro.sample("b", dist.Uniform(0.0, upper))
        numpyro.sample("y", dist.Normal(b, 1.0), obs=y)

    m1 = from_numpyro(bounded, Y, 2.0)
    m2 = from_numpyro(bounded, Y, 3.0)
    assert m1.target is not m2.target  # a different support is a different target
    assert float(m2.latents["b"].support.upper_bound) == 3.0


def test_wrong_data_raises_naming_the_model():
    m = from_numpyro(regression, X, y=Y, prior_scale=2.0)
    with pytest.raises(ValueError, match="regression.*3 traced array/float"):
        m.log_density({}, (X, Y))


# --- model parameters (numpyro.param) -------------------------------------------------------


def shrinkage(y):
    """mu ~ N(0, tau^2), y_i ~ N(mu, 1), the prior scale tau a learnable parameter."""
    tau = numpyro.param("tau", 1.5, constraint=constraints.positive)
    mu = numpyro.sample("mu", dist.Normal(0.0, tau))
    with numpyro.plate("n", len(y)):
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)


SHRINKAGE = Model(lambda z, y: dist.Normal(0.0, z["tau"]).log_prob(z["mu"])
                  + dist.Normal(z["mu"], 1.0).log_prob(y).sum(),
                  {"mu": Latent()}, params={"tau": Param(init=1.5, support=constraints.positive)})


def test_param_site_is_a_model_parameter_fitted_as_vj_param_is():
    m = from_numpyro(shrinkage, Y)
    assert list(m.latents) == ["mu"] and list(m.params) == ["tau"]
    par = m.params["tau"]
    assert par.shape == () and float(par.init) == 1.5 and par.support is constraints.positive
    for theta, u in [(0.3, 0.0), (-1.2, 0.7), (2.0, -1.5)]:  # tau = exp(u)
        theta, mparams = jnp.array([theta]), {"tau": jnp.asarray(u)}
        np.testing.assert_allclose(  # same density, its terms summed in another order
            m.target.log_density(theta, m.data, mparams=mparams),
            SHRINKAGE.target.log_density(theta, Y, mparams=mparams), rtol=1e-6)
    fit = {"steps": 300, "key": jax.random.key(0), "convergence": None, "psis_draws": 0}
    ours, theirs = raw_fit(m, **fit), raw_fit(SHRINKAGE, Y, **fit)
    # same density, same key, same draws: the fits differ by float rounding of the density's
    # sums at most (bitwise equal on CPU today), which 300 contracting Adam steps do not grow
    # past 1e-5 relative. tau falls from its init 1.5 toward its marginal-likelihood
    # optimum, sqrt(max(0, mean(y)^2 - 1/N)) = 0 here
    np.testing.assert_allclose(ours.model_params["tau"], theirs.model_params["tau"], rtol=1e-5)
    np.testing.assert_allclose(ours.params["loc"], theirs.params["loc"], rtol=1e-5, atol=1e-6)
    assert float(ours.model_params["tau"]) < 1.0


def test_param_init_computed_from_the_data_is_read_and_keyed_by_value():
    def centred(y):
        loc = numpyro.param("loc", jnp.mean(y))  # traced in the abstract trace
        s = numpyro.sample("s", dist.HalfNormal(1.0))
        numpyro.sample("y", dist.Normal(loc, s), obs=y)

    m = from_numpyro(centred, Y)
    np.testing.assert_allclose(m.params["loc"].init, Y.mean(), rtol=1e-6)
    assert m.params["loc"].support is constraints.real
    assert from_numpyro(centred, Y.copy()).target is m.target
    assert from_numpyro(centred, Y + 1.0).target is not m.target  # another init

    def outside(y):
        s = numpyro.param("s", -1.0, constraint=constraints.positive)
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(mu * s, 1.0), obs=y)

    with pytest.raises(ValueError, match="parameter 's': init -1.0 lies outside its support"):
        from_numpyro(outside, Y)


# --- memoisation ---------------------------------------------------------------------------


def test_new_data_of_the_same_structure_shares_the_target_and_compiled_code():
    m1 = from_numpyro(regression, X, y=Y, prior_scale=2.0)
    x2, y2 = X + 1.0, Y * 2.0
    m2 = from_numpyro(regression, x2, y=y2, prior_scale=0.5)
    assert m2.target is m1.target
    assert m2.data[0] is x2 and m2.data[1] == 0.5 and m2.data[2] is y2
    # log density follows the new data, and the second data set compiles nothing
    theta = _thetas(m1.target, 1, np.float32)[0]
    lp = jax.jit(lambda th, d: m1.target.log_density(th, d))
    expected = jax.jit(lambda th: -potential_energy(
        regression, (x2,), {"y": y2, "prior_scale": 0.5}, m1.target.unravel(th)))
    np.testing.assert_allclose(lp(theta, m2.data), expected(theta), rtol=1e-5, atol=1e-4)
    lp(theta, m1.data)
    assert lp._cache_size() == 1

    # another static value or latent shape is another target
    assert from_numpyro(hierarchical, X[:3], Y[:3], 3).target is not \
        from_numpyro(hierarchical, X[:2], Y[:2], 2).target
    assert from_numpyro(regression, X, y=Y).target is \
        from_numpyro(regression, X[:2], y=Y[:2]).target  # data shape does not enter target

    def powered(y, power):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(mu**power, 1.0), obs=y)

    squared = from_numpyro(powered, Y, 2)
    assert from_numpyro(powered, Y, 1).target is not squared.target
    assert from_numpyro(powered, Y, True).target is not squared.target  # True == 1, not the same
    assert from_numpyro(powered, Y + 1.0, 2).target is squared.target


def test_unhashable_static_leaf_skips_memoisation():
    def with_options(y, options):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(mu, 1.0), obs=y)

    class Options:  # a leaf (not a pytree node) without __hash__
        __hash__ = None

    m1 = from_numpyro(with_options, Y, Options())
    m2 = from_numpyro(with_options, Y, Options())
    assert m1.target is not m2.target
    z = {"mu": jnp.asarray(0.3)}
    np.testing.assert_allclose(m2.log_density(z, m2.data),
                               log_density(with_options, (Y, Options()), {}, z)[0], rtol=1e-6)
