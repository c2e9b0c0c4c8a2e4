"""NumPyro models as written for NumPyro: sizes, indices and masks computed from the data with
NumPy (vijax.numpyro_data). Each fits as its hand-written ``functools.partial`` version does,
refits on new traced data without compiling, and gives the new answer for new NumPy-read data.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import numpyro
import numpyro.distributions as dist
import pytest
from numpyro import handlers
from numpyro.infer.util import log_density

import vijax as vj
from tests.conftest import count_compiles
from vijax.numpyro_adapter import _clear_cache, from_numpyro

# --- models in the style of NumPyro's examples ---------------------------------------------


def hierarchical(group, y):
    """Group means around a shared mean; the number of groups from the data (annotation.py)."""
    n_groups = int(np.max(group)) + 1
    mu0 = numpyro.sample("mu0", dist.Normal(0.0, 1.0))
    with numpyro.plate("groups", n_groups):
        mu = numpyro.sample("mu", dist.Normal(mu0, 1.0))
    with numpyro.plate("obs", len(y)):
        numpyro.sample("y", dist.Normal(mu[group], 1.0), obs=y)


def admissions(dept, male, applications, admit=None):
    """NumPyro's ucbadmit.py model with varying intercepts only (its LKJ prior on varying
    slopes compiles for seconds): ``len(np.unique(dept))`` departments in a plate."""
    v_mu = numpyro.sample("v_mu", dist.Normal(0, jnp.array([4.0, 1.0])))
    sigma = numpyro.sample("sigma", dist.HalfNormal(1.0))
    with numpyro.plate("dept", len(np.unique(dept))):
        v = numpyro.sample("v", dist.Normal(0.0, sigma))
    logits = v_mu[0] + v[dept] + v_mu[1] * male
    numpyro.sample("admit", dist.Binomial(applications, logits=logits), obs=admit)


def masked_regression(x, y):
    """Missing responses masked out with ``np.isnan`` and ``handlers.mask``."""
    w = numpyro.sample("w", dist.Normal(0.0, 1.0))
    b = numpyro.sample("b", dist.Normal(0.0, 1.0))
    observed = ~np.isnan(y)
    with numpyro.plate("obs", len(y)), handlers.mask(mask=observed):
        numpyro.sample("y", dist.Normal(b + w * x, 1.0), obs=np.where(observed, y, 0.0))


def imputed_regression(x, y):
    """Missing covariates imputed (NumPyro's imputation tutorial): index arrays of the missing
    and present entries built with ``np.nonzero``."""
    missing = np.nonzero(np.isnan(x))[0]
    present = np.nonzero(~np.isnan(x))[0]
    x_mu = numpyro.sample("x_mu", dist.Normal(0.0, 1.0))
    x_impute = numpyro.sample("x_impute", dist.Normal(x_mu, 1.0).expand([len(missing)]))
    numpyro.sample("x_present", dist.Normal(x_mu, 1.0).expand([len(present)]), obs=x[present])
    x_full = jnp.zeros(len(x)).at[present].set(x[present]).at[missing].set(x_impute)
    w = numpyro.sample("w", dist.Normal(0.0, 1.0))
    with numpyro.plate("obs", len(y)):
        numpyro.sample("y", dist.Normal(w * x_full, 1.0), obs=y)


rng = np.random.default_rng(0)
GROUP = np.array([0, 0, 0, 1, 1, 2, 2, 2])
Y = rng.normal(np.array([-1.0, 0.0, 1.0])[GROUP], 1.0).astype(np.float32)
X = np.linspace(-1.0, 1.0, 8).astype(np.float32)
Y_NAN = np.where(np.arange(8) % 3 == 1, np.nan, 0.5 + 0.8 * X).astype(np.float32)
X_NAN = np.where(np.arange(8) % 4 == 2, np.nan, X).astype(np.float32)
UCB = {  # departments A-C of UC Berkeley admissions 1973 (NumPyro's UCBADMIT), male first
    "dept": np.array([0, 0, 1, 1, 2, 2]), "male": np.array([1, 0, 1, 0, 1, 0]),
    "applications": np.array([825, 108, 560, 25, 325, 593]),
    "admit": np.array([512, 89, 353, 17, 120, 202])}

# name: (model, arguments as keywords, those it reads with NumPy (concrete), new traced values)
CASES = {
    "max_groups": (hierarchical, {"group": GROUP, "y": Y}, ("group",), {"y": Y + 1.0}),
    "unique_depts": (admissions, UCB, ("dept",), {"admit": UCB["admit"] // 2}),
    "isnan_mask": (masked_regression, {"x": X, "y": Y_NAN}, ("y",), {"x": X[::-1].copy()}),
    "nonzero_index": (imputed_regression, {"x": X_NAN, "y": Y}, ("x",), {"y": Y[::-1].copy()}),
}
FIT = {"steps": 300, "guide": "meanfield", "precondition": None, "progress": False,
       "convergence": None, "psis_draws": 0, "key": jax.random.key(0)}  # compiles least


@pytest.fixture(autouse=True)
def _fresh_cache():
    _clear_cache()
    yield
    _clear_cache()


def _partial(model_fn, kwargs, concrete):
    """The hand-written way: bind the NumPy-read arguments, pass the rest."""
    bound = functools.partial(model_fn, **{k: kwargs[k] for k in concrete})
    return from_numpyro(bound, **{k: v for k, v in kwargs.items() if k not in concrete})


def _program(m):
    """The traced log density of ``m``: the jaxpr's text and its constants."""
    theta = jax.ShapeDtypeStruct((m.target.full_dim,), np.float32)
    closed = jax.make_jaxpr(m.target.log_density)(theta, m.data)
    return str(closed.jaxpr), [np.asarray(c) for c in closed.consts]


def _leaves(res):
    return [np.asarray(x) for x in jax.tree_util.tree_leaves(res.params)]


@pytest.mark.parametrize("case", list(CASES))
def test_model_runs_as_written_and_refits_on_new_traced_data_without_compiling(case):
    model_fn, kwargs, concrete, new = CASES[case]
    m = from_numpyro(model_fn, **kwargs)
    traced = sorted(k for k in kwargs if k not in concrete)  # kwargs flatten in key order
    assert len(m.data) == len(traced)
    assert all(leaf is kwargs[k] for leaf, k in zip(m.data, traced, strict=True))
    # the log density is NumPyro's, with the NumPy-read arguments as they were given
    z = {k: site["value"] for k, site in handlers.trace(handlers.seed(
        model_fn, 1)).get_trace(**kwargs).items()
         if site["type"] == "sample" and not site["is_observed"]}
    np.testing.assert_allclose(m.log_density(z, m.data),
                               log_density(model_fn, (), kwargs, z)[0], rtol=1e-6)
    # the same program as the hand-written functools.partial version: the same jaxpr with
    # the same constants, so the same compiled code and (same key) bitwise the same fit;
    # test_new_values_of_a_numpy_read_argument_give_the_new_answer fits both once
    ours, theirs = _program(m), _program(_partial(model_fn, kwargs, concrete))
    assert ours[0] == theirs[0]
    assert len(ours[1]) == len(theirs[1])
    for a, b in zip(ours[1], theirs[1], strict=True):
        np.testing.assert_array_equal(a, b)

    res = vj.fit(m, **FIT)
    with count_compiles() as n:
        m2 = from_numpyro(model_fn, **{**kwargs, **new})
        res2 = vj.fit(m2, **FIT)
    assert n[0] == 0, f"{n[0]} compilations on a refit with new traced values"
    assert m2.target is m.target
    assert not np.allclose(_leaves(res)[0], _leaves(res2)[0])  # it fitted the new data


def _hierarchical_posterior(group, y):
    """Exact posterior mean of (mu0, mu) in ``hierarchical``: Gaussian with precision P and
    mean P^-1 b from mu0 ~ N(0, 1), mu_g ~ N(mu0, 1), y_i ~ N(mu_{g_i}, 1)."""
    n_groups = int(np.max(group)) + 1
    P = np.zeros((n_groups + 1, n_groups + 1))
    P[0, 0] = 1.0 + n_groups
    P[0, 1:] = P[1:, 0] = -1.0
    P[1:, 1:] = np.diag(1.0 + np.bincount(group, minlength=n_groups))
    b = np.concatenate([[0.0], np.bincount(group, weights=y, minlength=n_groups)])
    return np.linalg.solve(P, b)


def test_new_values_of_a_numpy_read_argument_give_the_new_answer():
    m = from_numpyro(hierarchical, GROUP, Y)
    regrouped = np.array([0, 1, 1, 1, 0, 0, 1, 3])  # four groups, the third one empty
    m2 = from_numpyro(hierarchical, regrouped, Y)
    assert m2.target is not m.target and m2.latents["mu"].shape == (4,)
    fit = {**FIT, "steps": 1000}
    res = vj.fit(m2, **fit)
    # bitwise the fit of the hand-written version: the same program with the same key on CPU
    ref = vj.fit(_partial(hierarchical, {"group": regrouped, "y": Y}, ("group",)), **fit)
    for a, b in zip(_leaves(res), _leaves(ref), strict=True):
        np.testing.assert_array_equal(a, b)
    # a Gaussian posterior, so mean-field's optimal means are the exact ones. 0.15: over keys
    # 0-3 the averaged iterates of 1,000 single-draw steps land within 0.075 of them
    # (posterior sds 0.46-1.15), while the old grouping's means are more than 0.3 away
    mean = _hierarchical_posterior(regrouped, Y)
    np.testing.assert_allclose(res.params["loc"], mean, atol=0.15)
    assert np.abs(_hierarchical_posterior(GROUP, Y) - mean[:4]).max() > 0.3
    with count_compiles() as n:  # the same grouping again, in a new array: the same program
        same = from_numpyro(hierarchical, regrouped.copy(), Y - 1.0)
        vj.fit(same, **fit)
    assert same.target is m2.target and n[0] == 0


def test_numpy_read_arguments_are_named_kept_and_copied():
    group = GROUP.copy()
    m = from_numpyro(hierarchical, group, Y)
    group[:] = 0  # the caller changes their array: the model keeps the values it was given
    z = {"mu0": jnp.asarray(0.1), "mu": jnp.asarray([0.3, -0.2, 0.5])}
    expected = log_density(hierarchical, (GROUP, Y), {}, z)[0]
    np.testing.assert_allclose(m.log_density(z, m.data), expected, rtol=1e-6)
    with pytest.raises(ValueError, match=r"hierarchical.*1 traced.*\['group'\] are read by the "
                                         r"model as NumPy values.*call from_numpyro again"):
        m.log_density(z, (GROUP, Y))

    def nested(data):  # a dict argument, the groups as a JAX array: np.max(x) calls x.max()
        hierarchical(data["group"], data["y"])

    m = from_numpyro(nested, {"group": jnp.asarray(GROUP), "y": Y})
    np.testing.assert_allclose(m.log_density(z, m.data), expected, rtol=1e-6)
    with pytest.raises(ValueError, match=r"\[\"data\['group'\]\"\] are read"):
        m.log_density(z, ())


def test_a_refit_traces_the_model_once():
    calls = [0]

    def counted(group, y):
        calls[0] += 1
        hierarchical(group, y)

    from_numpyro(counted, GROUP, Y)
    calls[0] = 0
    from_numpyro(counted, GROUP, Y + 1.0)  # the NumPy-read set is remembered: one trace
    assert calls[0] == 1


def test_float_read_as_python_value_is_keyed_by_value():
    def branchy(y, scale):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        s = scale if scale > 0 else 1.0
        numpyro.sample("y", dist.Normal(mu, s), obs=y)

    pos, neg = from_numpyro(branchy, Y, 2.0), from_numpyro(branchy, Y, -1.0)
    assert len(pos.data) == 1 and pos.target is not neg.target
    assert from_numpyro(branchy, Y + 1.0, 2.0).target is pos.target
    z = {"mu": jnp.asarray(0.3)}
    for m, scale in ((pos, 2.0), (neg, -1.0)):
        np.testing.assert_allclose(m.log_density(z, m.data),
                                   log_density(branchy, (Y, scale), {}, z)[0], rtol=1e-6)


def test_latent_read_as_python_value_raises_naming_the_model():
    def uses_latent(y):
        mu = numpyro.sample("mu", dist.Normal(0.0, 1.0))
        numpyro.sample("y", dist.Normal(float(np.exp(mu)), 1.0), obs=y)

    with pytest.raises(ValueError, match="uses_latent.*reads a traced value.*a latent.*jnp"):
        from_numpyro(uses_latent, Y)
