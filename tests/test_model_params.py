"""Learnable model parameters (vj.Param): declaration checks, and their gradient under every
estimator against the closed form.

The gradient check uses the Fisher identity: with q equal to the exact posterior p(z | x;
phi), every estimator's expected gradient with respect to phi is the gradient of the log
marginal likelihood, d/dphi log p(x; phi) = E_posterior[d/dphi log p(x, z; phi)], which for a
conjugate Gaussian model is exact (autodiff of the closed-form marginal). A leak of DReG's
squared weights into phi's gradient would divide it by K (the weights are uniform at the
posterior); a leak of the score-function surrogate would add a term with nonzero variance
and no pathwise part. Tolerance: 4 Monte Carlo standard errors of the mean over the draws.
"""

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import pytest
from numpyro.distributions import constraints

import vijax as vj
from vijax.guides import MeanField
from vijax.objective import make_objective

Y = jnp.array([0.3, 1.1, -0.4, 0.9, 1.6, 0.2])
N = Y.shape[0]


def _model(factorised: bool):
    par = {"tau": vj.Param(init=1.5, support=constraints.positive)}
    if factorised:
        return vj.Model(log_prior=lambda z: dist.Normal(0.0, z["tau"]).log_prob(z["mu"]),
                        log_likelihood=lambda z, y: dist.Normal(z["mu"], 1.0).log_prob(y),
                        latents={"mu": vj.Latent()}, params=par)
    return vj.Model(lambda z, y: dist.Normal(0.0, z["tau"]).log_prob(z["mu"])
                    + dist.Normal(z["mu"], 1.0).log_prob(y).sum(),
                    {"mu": vj.Latent()}, params=par)


def _log_marginal(u):
    """log p(y; tau = exp(u)): y ~ N(0, I + tau^2 11^T)."""
    tau2 = jnp.exp(2 * u)
    cov = jnp.eye(N) + tau2 * jnp.ones((N, N))
    return jax.scipy.stats.multivariate_normal.logpdf(Y, jnp.zeros(N), cov)


def _posterior(u):
    prec = N + jnp.exp(-2 * u)
    return jnp.sum(Y) / prec, 1.0 / jnp.sqrt(prec)


ESTIMATORS = [("reparam", 1), ("stl", 1), ("iwae", 4), ("dreg", 4),
              (vj.estimators.Renyi(alpha=0.5), 4), ("score", 4)]


@pytest.mark.parametrize("factorised", [False, True])
@pytest.mark.parametrize("estimator,k", ESTIMATORS,
                         ids=["reparam", "stl", "iwae", "dreg", "renyi", "score"])
def test_model_param_gradient_matches_marginal_likelihood(estimator, k, factorised):
    model = _model(factorised)
    target = model.target
    guide = MeanField().build(1, ("mu",))
    u = jnp.log(1.5)
    loc, scale = _posterior(u)
    gparams = {"loc": jnp.array([loc]), "raw_scale": jnp.array([jnp.log(jnp.expm1(scale))])}
    mparams = {"tau": u}
    objective = make_objective(target, guide, estimator, k, weighted=factorised)
    weights = (jnp.ones(()), jnp.ones(())) if factorised else None

    def grad_u(key):
        def loss(mp):
            args = (key, (gparams, mp), Y, objective.init_state(jnp.float32))
            return objective.loss(*args, weights)[0] if factorised else \
                objective.loss(*args)[0]
        return -jax.grad(loss)(mparams)["tau"]

    g = np.asarray(jax.jit(jax.vmap(grad_u))(jax.random.split(jax.random.key(0), 4000)))
    exact = float(jax.grad(_log_marginal)(u))
    se = g.std() / np.sqrt(g.size)
    assert abs(g.mean() - exact) < 4 * se + 1e-4, (g.mean(), exact, se)


def test_param_declaration_errors():
    with pytest.raises(ValueError, match="'s' is declared both as a latent and as a param"):
        vj.Model(lambda z, d: z["s"], {"s": vj.Latent()}, params={"s": vj.Param()})
    with pytest.raises(ValueError, match="parameter 's': init -1.0 lies outside its support"):
        vj.Model(lambda z, d: z["a"] * z["s"], {"a": vj.Latent()},
                 params={"s": vj.Param(init=-1.0, support=constraints.positive)})
    with pytest.raises(ValueError, match="parameter 's': init has shape \\(3,\\)"):
        vj.Model(lambda z, d: z["a"], {"a": vj.Latent()},
                 params={"s": vj.Param(shape=(2,), init=[1.0, 2.0, 3.0])})
    with pytest.raises(ValueError, match="parameter 'k' has a discrete support"):
        vj.Model(lambda z, d: z["a"], {"a": vj.Latent()},
                 params={"k": vj.Param(support=constraints.boolean)})
    with pytest.raises(TypeError, match="parameter 'w' must be declared with vj.Param"):
        vj.Model(lambda z, d: z["a"], {"a": vj.Latent()}, params={"w": vj.Latent()})
    with pytest.raises(ValueError, match="parameter 's': init nan is not finite"):
        vj.Model(lambda z, d: z["a"], {"a": vj.Latent()},
                 params={"s": vj.Param(init=float("nan"))})


def test_decorator_takes_params_beside_latents():
    @vj.model(mu=vj.Latent(), s=vj.Param(init=2.0, support=constraints.positive))
    def m(z, y):
        return dist.Normal(0, 1).log_prob(z["mu"]) + dist.Normal(z["mu"], z["s"]).log_prob(y).sum()

    assert list(m.latents) == ["mu"] and list(m.params) == ["s"]
    init = m.target.param_init(jnp.float32)
    np.testing.assert_allclose(m.target.constrain_params(init, jnp.float32)["s"], 2.0,
                               rtol=1e-6)
