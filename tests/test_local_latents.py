"""Local latents (``vj.Latent(..., local=True)``) against closed-form answers.

The linear-Gaussian model (probabilistic PCA, Tipping & Bishop 1999)

    z_i ~ N(0, I_d),   x_i | z_i ~ N(W z_i + b, sigma^2 I_D)

has everything in closed form: ``p(x_i) = N(b, W W^T + sigma^2 I)``, the posterior
``p(z_i | x_i) = N(M^-1 W^T (x_i - b), sigma^2 M^-1)`` with ``M = W^T W + sigma^2 I``, and the
ELBO of a linear Gaussian encoder. An encoder that IS the exact posterior makes every
importance weight equal ``p(x_i)``: bounds become exact and STL / DReG encoder gradients
vanish draw by draw. Most tests evaluate the objective at fixed parameters (through the
compiled :class:`vijax.program.Program`) instead of fitting, so that their answers are exact.
"""

import math

import jax
import jax.numpy as jnp
import numpy as np
import numpyro.distributions as dist
import optax
import pytest
from jax.flatten_util import ravel_pytree
from numpyro.distributions import constraints

import vijax as vj
from vijax.data import Feed
from vijax.driver_local import local_spec
from vijax.estimators import resolve_estimator
from vijax.fit import _single_spec
from vijax.guides.amortized import Amortized, LocalTable
from vijax.guides.resolve import resolve_spec
from vijax.program import Problem, compile_problem

INIT_SCALE = 0.1  # Amortized's default: a zero raw scale is sd 0.1
_C = math.log(math.expm1(INIT_SCALE))  # raw_scale offset: sd = softplus(raw + _C)


def _raw_scale(sd):
    """The raw encoder output giving standard deviation ``sd``."""
    return np.log(np.expm1(sd)) - _C


# --------------------------------------------------------------------------------------------
# the compiled objective at fixed parameters
def _objective(model, data, guide, estimator="reparam", k=1, init=None):
    """``(loss(key, params, batch, rows, scale, kl), params at start)``: the local
    objective compiled as ``vj.fit`` compiles it; ``params`` is the loop's initial
    ``(guide params, model params)`` (encoders at their ``init``, model parameters at their
    declared ``init``; global latents centred on ``init`` (unconstrained, full_dim))."""
    target = model.target
    spec = local_spec(guide, model, data, lambda g: _single_spec(
        resolve_spec("auto" if g is None else g), target, True))
    prog = compile_problem(Problem(target, spec, resolve_estimator(estimator), k,
                                   optax.adam(1e-3), 1, None, Feed(None, None)))
    fixed = jnp.zeros((target.full_dim,), jnp.float32) if init is None else \
        jnp.asarray(init, jnp.float32)
    mask = jnp.full((target.full_dim,), init is not None)
    _, _, _, state, _ = prog.start(jax.random.key(0), data, fixed, mask)

    @jax.jit
    def loss(key, params, batch, rows, scale=1.0, kl=1.0):
        w = (jnp.asarray(scale, jnp.float32), jnp.asarray(kl, jnp.float32))
        return prog.objective.loss(key, params, (batch, rows), (), w)[0]

    return loss, state.params


def _values(loss, params, data, keys):
    """``-loss`` (the bound) at ``params`` for each key, ``(len(keys),)`` float64."""
    rows = _rows(jax.tree_util.tree_leaves(data)[0].shape[0])
    return -np.asarray(jax.vmap(lambda k: loss(k, params, data, rows))(keys), float)


def _grads(loss, params, data, keys):
    """Gradients of the loss at ``params`` for each key (a batched pytree)."""
    rows = _rows(jax.tree_util.tree_leaves(data)[0].shape[0])
    return jax.vmap(jax.grad(lambda k, p: loss(k, p, data, rows), 1), (0, None))(keys, params)


def _rows(n):
    return jnp.arange(n, dtype=jnp.int32)


def _keys(n, seed=0):
    return jax.random.split(jax.random.key(seed), n)


# --------------------------------------------------------------------------------------------
# the linear-Gaussian model
def _ppca_model(D, d, W, b, sigma):
    def log_lik(z, data):
        mean = z["code"] @ z["W"].T + z["b"]
        return (dist.Normal(mean, z["sigma"]).log_prob(data["x"]).sum(-1)
                + dist.Normal(0.0, 1.0).log_prob(z["code"]).sum(-1))

    return vj.Model(log_prior=lambda z: jnp.zeros(()), log_likelihood=log_lik,
                    latents={"code": vj.Latent((d,), local=True)},
                    params={"W": vj.Param((D, d), init=np.asarray(W, np.float32)),
                            "b": vj.Param((D,), init=np.asarray(b, np.float32)),
                            "sigma": vj.Param((), init=float(sigma),
                                              support=constraints.positive)})


def _ppca_data(N, D, d, seed, orthogonal=False, sigma=0.5):
    rng = np.random.default_rng(seed)
    W = rng.normal(size=(D, d))
    if orthogonal:  # W^T W diagonal: the exact posterior covariance is diagonal
        W = np.linalg.qr(W)[0] * np.array([2.0, 1.0])[:d]
    b = rng.normal(size=D)
    x = rng.normal(size=(N, d)) @ W.T + b + sigma * rng.normal(size=(N, D))
    return W, b, sigma, {"x": x.astype(np.float32)}


def _exact_ll(W, b, sigma, x):
    """``sum_i log N(x_i | b, W W^T + sigma^2 I)`` (float64)."""
    C = np.asarray(W, float) @ np.asarray(W, float).T + float(sigma)**2 * np.eye(len(b))
    r = np.asarray(x, float) - np.asarray(b, float)
    _, logdet = np.linalg.slogdet(C)
    quad = np.einsum("ni,ij,nj->n", r, np.linalg.inv(C), r)
    return float(np.sum(-0.5 * (quad + logdet + len(b) * np.log(2 * np.pi))))


def _exact_encoder(W, b, sigma, family, scale_factor=1.0):
    """A linear ``(init, apply)`` encoder whose ``init`` is the exact posterior map
    (``scale_factor`` != 1 inflates its scales: then q is not the posterior)."""
    W, b = np.asarray(W, float), np.asarray(b, float)
    d = W.shape[1]
    M = W.T @ W + sigma**2 * np.eye(d)
    A = np.linalg.solve(M, W.T)  # posterior mean = A (x - b)
    L = np.linalg.cholesky(sigma**2 * np.linalg.inv(M)) * scale_factor
    sd = np.diag(L)
    if family == "meanfield":
        assert np.allclose(L, np.diag(sd), atol=1e-10), "meanfield needs W^T W diagonal"
        low = np.zeros(0)
    else:  # L = diag(s) (I + N), N strictly lower, read row-major
        low = (L / sd[:, None] - np.eye(d))[np.tril_indices(d, -1)]
    A_all = np.concatenate([A, np.zeros((d + low.size, W.shape[0]))])
    c_all = np.concatenate([-A @ b, _raw_scale(sd), low])

    def init(key, x):
        return {"A": jnp.asarray(A_all, x.dtype), "c": jnp.asarray(c_all, x.dtype)}

    return init, lambda p, x: p["A"] @ x + p["c"]


def _linear_encoder(D, out):
    """A zero-initialised linear encoder ``raw = A x + c``."""
    return (lambda key, x: {"A": jnp.zeros((out, D), x.dtype), "c": jnp.zeros((out,), x.dtype)},
            lambda p, x: p["A"] @ x + p["c"])


def _closed_form_elbo(params, x, d, family):
    """The exact ELBO of the PPCA model under a linear Gaussian encoder
    ``raw_i = A x_i + c``, at the loop's ``(guide params, unconstrained model params)``:

        E_q log p(x|z) = sum_i -D/2 log(2 pi s^2) - (|x_i - W m_i - b|^2 + tr(W S_i W^T))/(2 s^2)
        E_q log p(z)   = sum_i -d/2 log(2 pi) - (|m_i|^2 + tr S_i) / 2
        H[q]           = sum_i d/2 log(2 pi e) + log|det L_i|,   S_i = L_i L_i^T.
    """
    gp, mp = params
    p = gp["local"]["code"]["net"]
    W, b, s = mp["W"], mp["b"], jnp.exp(mp["sigma"])  # positive: exp of the unconstrained
    n, D = x.shape
    raw = x @ p["A"].T + p["c"]
    loc = raw[:, :d]
    sd = jax.nn.softplus(raw[:, d:2 * d] + _C)
    L = jax.vmap(jnp.diag)(sd)
    if family == "fullrank":
        i, j = np.tril_indices(d, -1)
        L = L @ (jnp.eye(d) + jnp.zeros((n, d, d)).at[:, i, j].set(raw[:, 2 * d:]))
    S = L @ jnp.swapaxes(L, 1, 2)
    r = x - loc @ W.T - b
    e_lik = (-0.5 * n * D * jnp.log(2 * jnp.pi * s**2)
             - 0.5 / s**2 * (jnp.sum(r**2) + jnp.einsum("ij,njk,ik->", W, S, W)))
    e_pri = -0.5 * n * d * jnp.log(2 * jnp.pi) - 0.5 * (jnp.sum(loc**2)
                                                        + jnp.trace(S, axis1=1, axis2=2).sum())
    ent = 0.5 * n * d * jnp.log(2 * jnp.pi * jnp.e) + jnp.sum(jnp.log(sd))
    return e_lik + e_pri + ent


def _ppca_mle_ll(x, d):
    """PPCA's maximum log-likelihood (Tipping & Bishop 1999): b = mean, sigma^2 = mean of
    the discarded eigenvalues of the sample covariance, W W^T = U_d (L_d - sigma^2) U_d^T."""
    x = np.asarray(x, float)
    xm = x.mean(0)
    ev, U = np.linalg.eigh((x - xm).T @ (x - xm) / len(x))
    ev, U = ev[::-1], U[:, ::-1]
    s2 = ev[d:].mean()
    W = U[:, :d] * np.sqrt(ev[:d] - s2)
    return _exact_ll(W, xm, np.sqrt(s2), x)


# --------------------------------------------------------------------------------------------
# 1. a linear VAE reaches PPCA's maximum likelihood
@pytest.mark.parametrize("check_objective", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_linear_vae_reaches_ppca_mle(check_objective):
    N, D, d = 300, 5, 2
    rng = np.random.default_rng(1)
    # well-conditioned truth (singular values 3, 2 against noise 0.5): Adam converges in
    # 2,000 steps on every seed tried
    Wt = np.linalg.qr(rng.normal(size=(D, d)))[0] * np.array([3.0, 2.0])
    z = rng.normal(size=(N, d))
    x = (z @ Wt.T + rng.normal(size=D) + 0.5 * rng.normal(size=(N, D))).astype(np.float32)
    data = {"x": x}
    model = _ppca_model(D, d, rng.normal(size=(D, d)), np.zeros(D), 1.0)
    # a linear encoder represents the exact posterior, so the ELBO's maximum over encoder and
    # decoder is PPCA's maximum log-likelihood (Lucas et al. 2019). Full-rank: the ELBO is
    # then invariant to rotations of W (mean-field must also rotate W's columns orthogonal,
    # a direction of small curvature that Adam needs many more steps for)
    guide = {"code": Amortized(_linear_encoder(D, 2 * d + 1), family="fullrank",
                               inputs="x")}
    res = vj.fit(model, data, guide=guide, steps=2000, optimizer=optax.adam(1e-2),
                 convergence=None, progress=False, key=jax.random.key(0))
    params = (res.params, res.mparams)
    mp = res.model_params
    ll_fit = _exact_ll(mp["W"], mp["b"], mp["sigma"], x)
    ll_mle = _ppca_mle_ll(x, d)
    elbo_fn = lambda p: _closed_form_elbo(p, jnp.asarray(x), d, "fullrank")
    elbo = float(elbo_fn(params))

    if check_objective:
        _check_objective_against_closed_form(model, data, guide, params, elbo_fn)
    # the bound: ELBO <= log p(x | fitted) <= log p(x | MLE) (float32 sums of ~2000 nats:
    # rounding below 1e-2)
    assert elbo <= ll_fit + 1e-2 and ll_fit <= ll_mle + 1e-2
    # the optimiser's residual ll_mle - elbo (>= the model's gap ll_mle - ll_fit, since the
    # ELBO's maximum is ll_mle) must be small against the data's own resolution: a
    # likelihood-ratio statistic 2 (ll_mle - ll(theta)) ~ chi^2_p at the true theta, so
    # parameter errors at the sampling scale cost ~p/2 nats; we require 5% of that
    # (p = D d + D + 1 - d (d - 1) / 2 free parameters: W up to rotation, b, sigma). An
    # objective with a wrong term (an entropy or Jacobian off by a factor, a prior dropped)
    # moves the fit by O(N) nats.
    p = D * d + D + 1 - d * (d - 1) // 2
    assert ll_mle - elbo < 0.05 * p / 2, (ll_mle - elbo, ll_mle - ll_fit)


def _check_objective_against_closed_form(model, data, guide, params, elbo_fn):
    N = data["x"].shape[0]
    elbo = float(elbo_fn(params))
    # vijax's objective at the fitted parameters: its mean over draws is the closed-form
    # ELBO, its mean gradient the closed-form gradient (tolerances: 4.5 standard errors of
    # the mean over M draws; for the gradient 5, per coordinate: Bonferroni over its ~45)
    loss, _ = _objective(model, data, guide, "reparam")
    M = 200
    flat, unravel = ravel_pytree(params)
    vals, g = jax.vmap(jax.value_and_grad(lambda k, f: loss(k, unravel(f), data, _rows(N)),
                                          1), (0, None))(_keys(M), flat)
    vals, g = np.asarray(vals, float), np.asarray(g, float)
    assert abs(-vals.mean() - elbo) < 4.5 * vals.std(ddof=1) / np.sqrt(M)
    g_exact = -np.asarray(ravel_pytree(jax.grad(elbo_fn)(params))[0], float)
    se = g.std(0, ddof=1) / np.sqrt(M)
    z = (g.mean(0) - g_exact) / np.maximum(se, 1e-3 * (1 + np.abs(g_exact)))
    assert np.max(np.abs(z)) < 5.0, np.max(np.abs(z))


# --------------------------------------------------------------------------------------------
# 2. importance sampling with the exact posterior is exact
@pytest.mark.parametrize("family", [pytest.param("fullrank", marks=pytest.mark.slow),
                                    "meanfield"])
def test_bounds_exact_at_exact_posterior(family):
    N, D, d = 40, 4, 2
    W, b, sigma, data = _ppca_data(N, D, d, seed=2, orthogonal=family == "meanfield")
    model = _ppca_model(D, d, W, b, sigma)
    guide = {"code": Amortized(_exact_encoder(W, b, sigma, family), family=family,
                               inputs="x")}
    ll = _exact_ll(W, b, sigma, data["x"])
    # every log w_il = log p(x_i, z_il) - log q(z_il | x_i) = log p(x_i): the ELBO and the
    # IWAE bound are log p(x) for any K and any draw. Tolerance: float32 rounding of sums of
    # N rows of ~10 nats, 1e-5 relative
    cases = (("iwae", 50),) if family == "fullrank" else (("reparam", 1), ("iwae", 5))
    for est, k in cases:
        if True:
            loss, params = _objective(model, data, guide, est, k)
            vals = _values(loss, params, data, _keys(8))
            np.testing.assert_allclose(vals, ll, rtol=1e-5, err_msg=f"{est} K={k}")

    if family == "fullrank":  # vj.importance_log_likelihood of a fit at those parameters
        res = vj.fit(model, data, guide=guide, steps=1, optimizer=optax.sgd(0.0),
                     convergence=None, progress=False)
        per_row = vj.importance_log_likelihood(res, data, num_samples=16)
        exact_rows = [_exact_ll(W, b, sigma, data["x"][i:i + 1]) for i in range(N)]
        np.testing.assert_allclose(per_row, exact_rows, rtol=1e-5, atol=1e-5)


# --------------------------------------------------------------------------------------------
# 3. enumeration of a local discrete latent is the exact sum over its values
def _mixture_of_latents_model(log_pi, observed):
    """y_i ~ Cat(pi), z_i | y_i ~ N(mu_y, 1), x_i | z_i ~ N(z_i, 0.5); mu a Param."""
    def log_lik(z, data):
        y, zz = z["y"], z["z"]
        mu = z["mu"][y]
        return (jnp.asarray(log_pi)[y] + dist.Normal(mu, 1.0).log_prob(zz)
                + dist.Normal(zz, 0.5).log_prob(data["x"]))

    return vj.Model(
        log_prior=lambda z: jnp.zeros(()), log_likelihood=log_lik,
        latents={"y": vj.Latent((), support=constraints.integer_interval(0, 2), local=True,
                                observed="yobs" if observed else None),
                 "z": vj.Latent((), local=True)},
        params={"mu": vj.Param((3,), init=np.array([-2.0, 0.0, 2.0], np.float32))})


@pytest.mark.parametrize("observed", [False, True])
def test_enumeration_equals_brute_force_sum(observed):
    N, C = 12, 3
    rng = np.random.default_rng(3)
    log_pi = np.log(np.array([0.2, 0.3, 0.5]))
    mu = np.array([-2.0, 0.0, 2.0])
    x = rng.normal(size=N).astype(np.float32) * 2
    yobs = np.where(rng.random(N) < 0.5, rng.integers(0, C, N), -1).astype(np.int32)
    data = {"x": x, "yobs": yobs} if observed else {"x": x}
    model = _mixture_of_latents_model(log_pi, observed)
    # q(y | x): arbitrary (not the posterior) linear logits
    a, c = np.array([0.3, -0.5, 1.0]), np.array([0.1, 0.4, -0.2])
    y_enc = (lambda key, x: {"a": jnp.asarray(a, x.dtype), "c": jnp.asarray(c, x.dtype)},
             lambda p, x: p["a"] * x + p["c"])
    # q(z | x, y) = p(z | x, y) = N((mu_y + 4 x) / 5, 1 / 5): then log p(x, y, z) -
    # log q(z | x, y) = log p(x, y) for every draw, and the enumerated bound is
    # deterministic: sum_y q(y|x) log p(x, y) + H[q(y|x)]
    z_enc = (lambda key, xo: {"mu": jnp.asarray(mu, jnp.float32)},
             lambda p, xo: jnp.stack([(p["mu"] @ xo[1] + 4 * xo[0]) / 5,
                                      jnp.asarray(_raw_scale(np.sqrt(0.2)), jnp.float32)]))
    alpha = 0.7 if observed else 0.0
    guide = {"y": Amortized(y_enc, family="categorical", inputs="x",
                            classifier_weight=alpha),
             "z": Amortized(z_enc, given=("y",), inputs="x")}
    loss, params = _objective(model, data, guide, "reparam")
    vals = np.asarray(jax.vmap(lambda k: loss(k, params, data, _rows(N)))(_keys(4)), float)

    xf = x.astype(float)[:, None]
    log_pxy = log_pi + dist.Normal(mu, np.sqrt(1.25)).log_prob(xf)  # (N, C)
    log_q = np.asarray(jax.nn.log_softmax(a * xf + c, -1), float)
    q = np.exp(log_q)
    rows = np.sum(q * log_pxy, -1) - np.sum(q * log_q, -1)
    if observed:
        seen = yobs >= 0
        yi = np.where(seen, yobs, 0)
        lab = log_pxy[np.arange(N), yi] + alpha * log_q[np.arange(N), yi]
        rows = np.where(seen, lab, rows)
    # float32 rounding of a sum of N rows of ~5 nats: 1e-5 relative
    np.testing.assert_allclose(-vals, rows.sum(), rtol=1e-5)


def test_enumerated_elbo_exact_for_discrete_only_mixture():
    N, C, s = 30, 3, 0.7
    rng = np.random.default_rng(4)
    log_pi = np.log(np.array([0.5, 0.3, 0.2]))
    mu = np.array([-1.5, 0.5, 2.0])
    x = (mu[rng.choice(C, N, p=np.exp(log_pi))] + s * rng.normal(size=N)).astype(np.float32)
    data = {"x": x}

    def log_lik(z, data):
        return jnp.asarray(log_pi)[z["y"]] + dist.Normal(z["mu"][z["y"]], s).log_prob(
            data["x"])

    model = vj.Model(
        log_prior=lambda z: dist.Normal(0.0, 3.0).log_prob(z["mu"]).sum(),
        log_likelihood=log_lik,
        latents={"mu": vj.Latent((C,)),
                 "y": vj.Latent((), support=constraints.integer_interval(0, C - 1),
                                local=True)})
    # q(y | x) = p(y | x, mu): logits log pi_y - (x - mu_y)^2 / (2 s^2) up to a constant
    # in y, linear in x; mu's guide a point mass at mu (no entropy)
    post = (lambda key, x: {"a": jnp.asarray(mu / s**2, x.dtype),
                            "c": jnp.asarray(log_pi - mu**2 / (2 * s**2), x.dtype)},
            lambda p, x: p["a"] * x + p["c"])
    uniform = (lambda key, x: (), lambda p, x: jnp.zeros(3, x.dtype))
    xf = x.astype(float)[:, None]
    log_pxy = log_pi + dist.Normal(mu, s).log_prob(xf)
    log_prior = float(dist.Normal(0.0, 3.0).log_prob(mu).sum())
    exact = log_prior + float(np.sum(np.logaddexp.reduce(log_pxy, -1)))
    q = np.full(C, 1 / C)
    uniform_bound = log_prior + float(np.sum(log_pxy @ q) + N * np.log(C))
    for enc, want in ((post, exact), (uniform, uniform_bound)):
        guide = {"mu": "delta", "y": Amortized(enc, family="categorical", inputs="x")}
        loss, params = _objective(model, data, guide, "reparam", init=mu)
        got = -float(loss(jax.random.key(0), params, data, _rows(N)))
        # float32 rounding of a sum of N rows of a few nats: 1e-5 relative
        np.testing.assert_allclose(got, want, rtol=1e-5)
    assert uniform_bound < exact


# --------------------------------------------------------------------------------------------
# 4. IWAE bounds: k = 1 is the ELBO, and the bound tightens with k
def test_iwae_bound_tightens_with_k():
    N, D, d = 30, 4, 2
    W, b, sigma, data = _ppca_data(N, D, d, seed=5)
    model = _ppca_model(D, d, W, b, sigma)
    # fixed parameters where q is NOT the posterior (the exact Cholesky factor inflated
    # 1.5 x): the bounds differ
    guide = {"code": Amortized(_exact_encoder(W, b, sigma, "fullrank", 1.5),
                               family="fullrank", inputs="x")}
    ll = _exact_ll(W, b, sigma, data["x"])
    M = 200
    means, ses = {}, {}
    for k in (1, 5, 50):
        loss, params = _objective(model, data, guide, "iwae", k)
        v = _values(loss, params, data, _keys(M, k))
        means[k], ses[k] = v.mean(), v.std(ddof=1) / np.sqrt(M)
        if k == 1:  # IWAE with one draw is the reparameterised ELBO, draw for draw
            rl, _ = _objective(model, data, guide, "reparam", 1)
            r = _values(rl, params, data, _keys(M, k))
            np.testing.assert_allclose(v, r, rtol=1e-6)
            elbo = float(_closed_form_elbo(params, jnp.asarray(data["x"]), d, "fullrank"))
            assert abs(means[1] - elbo) < 4 * ses[1]  # 4 standard errors of the mean
    # nondecreasing within Monte Carlo error (4 standard errors of the difference), and a
    # lower bound on log p(x) in expectation
    for lo, hi in ((1, 5), (5, 50)):
        assert means[hi] - means[lo] > -4 * np.hypot(ses[lo], ses[hi]), (means, ses)
    assert means[50] < ll + 4 * ses[50]
    # here the gaps are large: the bound strictly tightens
    assert means[50] - means[1] > 4 * np.hypot(ses[1], ses[50])


# --------------------------------------------------------------------------------------------
# 5. flax / equinox encoders fit exactly like the same (init, apply) pair
def _mlp_weights(D, out, width=16):
    import equinox as eqx

    net = eqx.nn.MLP(D, out, width, depth=1, activation=jnp.tanh, key=jax.random.key(7))
    return net, [(np.asarray(layer.weight), np.asarray(layer.bias)) for layer in net.layers]


def _encoder(kind, D, out):
    net, ((W1, b1), (W2, b2)) = _mlp_weights(D, out)
    if kind == "pair":
        return (lambda key, x: {"W1": jnp.asarray(W1), "b1": jnp.asarray(b1),
                                "W2": jnp.asarray(W2), "b2": jnp.asarray(b2)},
                lambda p, x: p["W2"] @ jnp.tanh(p["W1"] @ x + p["b1"]) + p["b2"])
    if kind == "equinox":
        return net
    const = lambda v: (lambda key, shape, dtype=jnp.float32: jnp.asarray(v, dtype))
    if kind == "linen":
        import flax.linen as nn

        class Encoder(nn.Module):
            @nn.compact
            def __call__(self, x):
                h = jnp.tanh(nn.Dense(W1.shape[0], kernel_init=const(W1.T),
                                      bias_init=const(b1))(x))
                return nn.Dense(out, kernel_init=const(W2.T), bias_init=const(b2))(h)

        return Encoder()
    from flax import nnx

    class Encoder(nnx.Module):
        def __init__(self):
            self.l1 = nnx.Linear(D, W1.shape[0], rngs=nnx.Rngs(0))
            self.l2 = nnx.Linear(W1.shape[0], out, rngs=nnx.Rngs(1))
            self.l1.kernel[...], self.l1.bias[...] = jnp.asarray(W1.T), jnp.asarray(b1)
            self.l2.kernel[...], self.l2.bias[...] = jnp.asarray(W2.T), jnp.asarray(b2)

        def __call__(self, x):
            return self.l2(jnp.tanh(self.l1(x)))

    return Encoder()


_FITS = {}


def _fit_with(kind):
    if kind not in _FITS:
        N, D, d = 100, 5, 2
        W, b, sigma, data = _ppca_data(N, D, d, seed=6)
        model = _ppca_model(D, d, 0.5 * W, 0 * b, 1.0)
        guide = {"code": Amortized(_encoder(kind, D, 2 * d), inputs="x")}
        _FITS[kind] = vj.fit(model, data, guide=guide, steps=200, optimizer=optax.adam(1e-2),
                             convergence=None, progress=False, key=jax.random.key(3))
    return _FITS[kind]


@pytest.mark.parametrize("kind", [pytest.param("equinox", marks=pytest.mark.slow), "nnx",
                                  pytest.param("linen", marks=pytest.mark.slow)])
def test_library_encoders_match_function_pair(kind):
    if kind != "equinox":
        pytest.importorskip("flax")
    ref, res = _fit_with("pair"), _fit_with(kind)
    # the same weights, the same key: the same arithmetic up to the order of float32
    # operations (flax's Dense computes x @ kernel, equinox and the pair W @ x); 200 Adam
    # steps carry such 1e-7 rounding differences to ~1e-5 relative at most
    rtol = 0.0 if kind == "equinox" else 1e-4
    np.testing.assert_allclose(res.losses, ref.losses, rtol=rtol, atol=rtol)
    for name in ("W", "b", "sigma"):
        np.testing.assert_allclose(res.model_params[name], ref.model_params[name],
                                   rtol=rtol, atol=rtol)


# --------------------------------------------------------------------------------------------
# 6. minibatches scale the rows by N / B
def test_minibatch_scales_rows_by_n_over_b():
    N, D, d, B = 24, 3, 2, 6
    W, b, sigma, data = _ppca_data(N, D, d, seed=8)
    rng = np.random.default_rng(8)
    data["t"] = rng.normal(size=N).astype(np.float32)

    def log_lik(z, data):  # PPCA rows plus t_i ~ N(g, 1), g global
        mean = z["code"] @ z["W"].T + z["b"]
        return (dist.Normal(mean, z["sigma"]).log_prob(data["x"]).sum(-1)
                + dist.Normal(0.0, 1.0).log_prob(z["code"]).sum(-1)
                + dist.Normal(z["g"], 1.0).log_prob(data["t"]))

    model = vj.Model(log_prior=lambda z: dist.Normal(0.0, 1.0).log_prob(z["g"]),
                     log_likelihood=log_lik,
                     latents={"g": vj.Latent(()), "code": vj.Latent((d,), local=True)},
                     params={"W": vj.Param((D, d), init=W.astype(np.float32)),
                             "b": vj.Param((D,), init=b.astype(np.float32)),
                             "sigma": vj.Param((), init=sigma, support=constraints.positive)})
    # the exact posterior encoder makes each row's term deterministic given the global draw
    # g (which one key fixes whatever the batch): row_i = log p(x_i) + log N(t_i | g, 1)
    guide = {"code": Amortized(_exact_encoder(W, b, sigma, "fullrank"), family="fullrank",
                               inputs="x")}
    loss, params = _objective(model, data, guide, "reparam")
    key = jax.random.key(11)
    take = lambda idx: jax.tree.map(lambda a: jnp.asarray(a)[idx], data)
    glob = -float(loss(key, params, take(np.arange(1)), _rows(1), 0.0))  # scale 0: global
    row = np.array([-float(loss(key, params, take(np.array([i])), jnp.array([i]), 1.0))
                    - glob for i in range(N)])
    idx = np.array([3, 17, 0, 9, 22, 5])
    got = -float(loss(key, params, take(idx), jnp.asarray(idx, jnp.int32), N / B))
    full = -float(loss(key, params, data, _rows(N), 1.0))
    # float32 sums of ~N rows of ~10 nats: 1e-5 relative
    np.testing.assert_allclose(got, glob + N / B * row[idx].sum(), rtol=1e-5)
    np.testing.assert_allclose(full, glob + row.sum(), rtol=1e-5)
    # and the rows are the closed form given g (t-part), so nothing else enters
    px = np.array([_exact_ll(W, b, sigma, data["x"][i:i + 1]) for i in range(N)])
    g = (row - px) - np.asarray(dist.Normal(0, 1).log_prob(data["t"] - 0.0))  # t-part shift
    # log N(t_i | g, 1) - log N(t_i | 0, 1) = g t_i - g^2 / 2: linear in t_i, one g
    gt = np.polyfit(data["t"], g, 1)
    np.testing.assert_allclose(g, np.polyval(gt, data["t"]), atol=1e-3)
    np.testing.assert_allclose(gt[1], -gt[0]**2 / 2, atol=1e-3)


# --------------------------------------------------------------------------------------------
# 7. bad input gets errors naming it
def _small():
    N, D, d = 8, 3, 2
    W, b, sigma, data = _ppca_data(N, D, d, seed=9)
    return _ppca_model(D, d, W, b, sigma), data, D, d


def _fit1(model, data, **kw):
    return vj.fit(model, data, steps=1, convergence=None, progress=False, **kw)


def test_errors_name_the_problem():
    model, data, D, d = _small()
    bad = (lambda key, x: {"A": jnp.zeros((3, D))}, lambda p, x: p["A"] @ x)
    with pytest.raises(ValueError, match=r"'code'.*\(3,\).*4 raw"):
        _fit1(model, data, guide={"code": Amortized(bad, inputs="x")})
    with pytest.raises(ValueError, match="'code'.*continuous.*enumerated"):
        _fit1(model, data, guide={"code": Amortized(enumerate=True)})
    with pytest.raises(ValueError, match="'code'.*continuous.*categorical"):
        _fit1(model, data, guide={"code": Amortized(family="categorical")})
    with pytest.raises(ValueError, match="score-function.*local"):
        _fit1(model, data, estimator="score")
    with pytest.raises(ValueError, match="LocalTable.*stream"):
        _fit1(model, data, guide={"code": LocalTable()}, stream=True, batch_size=4)
    with pytest.raises(ValueError, match="'code'.*local.*log_likelihood"):
        vj.Model(log_joint=lambda z, data: jnp.zeros(()),
                 latents={"code": vj.Latent((2,), local=True)})
    with pytest.raises(ValueError, match="observed"):
        vj.Latent((), local=True, observed="y")
    with pytest.raises(ValueError, match="observed"):
        vj.Latent((), observed="y", support=constraints.boolean)  # not local

    def log_lik(z, data):
        return dist.Normal(0, 1).log_prob(z["code"]).sum() + z["mu"]  # a scalar, not (B,)

    m2 = vj.Model(log_prior=lambda z: -z["mu"]**2, log_likelihood=log_lik,
                  latents={"mu": vj.Latent(), "code": vj.Latent((2,), local=True)})
    with pytest.raises(ValueError, match=r"log_likelihood.*one value per observation.*8"):
        _fit1(m2, data)
    m3 = vj.Model(log_prior=lambda z: -z["mu"]**2,
                  log_likelihood=lambda z, data: -jnp.sum(z["code"]**2, -1) + z["mu"],
                  latents={"mu": vj.Latent(), "code": vj.Latent((2,), local=True)})
    with pytest.raises(ValueError, match="'mu'.*global.*Amortized"):
        _fit1(m3, data, guide={"mu": Amortized(), "code": "meanfield"})


# --------------------------------------------------------------------------------------------
# 8. LocalTable: per-row parameters reach each row's exact posterior
@pytest.mark.parametrize("batch_size", [None, 5])
def test_local_table_matches_conjugate_posterior(batch_size):
    N, mu, steps = 20, 1.5, 4000
    x = np.random.default_rng(10).normal(mu, np.sqrt(2.0), size=N).astype(np.float32)

    def log_lik(z, data):  # z_i ~ N(mu, 1), x_i | z_i ~ N(z_i, 1)
        return dist.Normal(mu, 1.0).log_prob(z["z"]) + dist.Normal(z["z"], 1.0).log_prob(
            data["x"])

    model = vj.Model(log_prior=lambda z: jnp.zeros(()), log_likelihood=log_lik,
                     latents={"z": vj.Latent((), local=True)})
    res = vj.fit(model, {"x": x}, guide={"z": LocalTable()}, steps=steps,
                 batch_size=batch_size, optimizer=optax.adam(0.02), convergence=None,
                 progress=False, key=jax.random.key(1), average=0.5)  # T = steps / 2 below
    post = vj.local_posterior(res, {"x": x})["z"]
    table = np.asarray(res.params["local"]["z"]["table"], float)
    np.testing.assert_allclose(post["loc"], table[:, 0], rtol=1e-6)
    # exact: z_i | x_i ~ N((x_i + mu) / 2, 1 / 2). Tolerance from the Polyak-Ruppert
    # variance of the averaged iterates, Var = H^-1 Sigma H^-1 / T over T = steps / 2:
    # per row, the loc's curvature H = 2 and reparam gradient variance Sigma = 4 s^2 = 2
    # (x N/B: a row is in a batch with probability B/N, its gradient scaled by N/B), so
    # sd(loc) = sqrt(Sigma / (4 T)); the scale's H = 4 and Sigma = 4 s^2 Var(eps^2) = 4:
    # sd(scale) = sqrt(1 / (4 T)). 5 sd: a two-sided 6e-7 tail, over 2 N values
    ratio = N / batch_size if batch_size else 1.0
    T = steps // 2
    sd_loc = np.sqrt(2 * ratio / (4 * T))
    sd_scale = np.sqrt(ratio / (4 * T))
    np.testing.assert_allclose(post["loc"], (x + mu) / 2, atol=5 * sd_loc)
    np.testing.assert_allclose(post["scale"][:, 0], np.sqrt(0.5), atol=5 * sd_scale)


# --------------------------------------------------------------------------------------------
# 9. STL and DReG gradients at the exact posterior
@pytest.mark.parametrize("with_references", [False,
                                             pytest.param(True, marks=pytest.mark.slow)])
def test_stl_dreg_gradients_at_exact_posterior(with_references):
    N, D, d = 30, 4, 2
    W, b, sigma, data = _ppca_data(N, D, d, seed=12)
    model = _ppca_model(D, d, W, b, sigma)
    guide = {"code": Amortized(_exact_encoder(W, b, sigma, "fullrank"), family="fullrank",
                               inputs="x")}
    M, K = 100, 5
    grads = {}
    cases = (("reparam", 1), ("stl", 1), ("iwae", K), ("dreg", K)) if with_references else \
        (("stl", 1), ("dreg", K))
    for est, k in cases:
        loss, params = _objective(model, data, guide, est, k)
        grads[est] = _grads(loss, params, data, _keys(M, 1))
    enc = {e: np.asarray(ravel_pytree(jax.tree.map(lambda a: a.reshape(M, -1),
                                                   g[0]["local"]))[0]).reshape(M, -1)
           for e, g in grads.items()}
    mod = {e: np.concatenate([np.asarray(g[1][n]).reshape(M, -1) for n in ("W", "b", "sigma")],
                             1).astype(float) for e, g in grads.items()}
    # at q = p, d/du [log p(x, u) - log q(u | x)] = 0: the STL and DReG encoder gradients
    # vanish for every draw (float32 rounding: 1e-4 of the model-parameter gradients' size)
    for est in ("stl", "dreg"):
        scale = np.abs(mod[est]).max()
        assert scale > 1.0
        assert np.abs(enc[est]).max() < 1e-4 * scale, (est, np.abs(enc[est]).max())

    def neg_ll(mp):
        Wm, bm, s = mp["W"], mp["b"], jnp.exp(mp["sigma"])
        return -dist.MultivariateNormal(bm, Wm @ Wm.T + s**2 * jnp.eye(D)).log_prob(
            jnp.asarray(data["x"])).sum()

    # in expectation the model-parameter gradient is -grad log p(x) (Fisher's identity);
    # 4.5 standard errors per coordinate (Bonferroni over 13 coordinates)
    g_exact = jax.grad(neg_ll)(params[1])
    g_exact = np.concatenate([np.asarray(g_exact[n]).reshape(-1) for n in ("W", "b",
                                                                           "sigma")])
    for est in grads:
        se = mod[est].std(0, ddof=1) / np.sqrt(M)
        assert np.all(np.abs(mod[est].mean(0) - g_exact) < 4.5 * se + 1e-4), est
    if not with_references:
        return
    # the reparam and IWAE encoder gradients are zero only in expectation (4.5 standard
    # errors); the model parameters' gradients do not involve log q: STL's equal reparam's
    # and DReG's equal IWAE's draw by draw
    for est, ref in (("stl", "reparam"), ("dreg", "iwae")):
        assert np.abs(enc[ref]).max() > 1.0
        se = enc[ref].std(0, ddof=1) / np.sqrt(M)
        assert np.all(np.abs(enc[ref].mean(0)) < 4.5 * se + 1e-6), ref
        np.testing.assert_allclose(mod[est], mod[ref], rtol=1e-5, atol=1e-5 * np.abs(
            mod[ref]).max())


# --- a sampled local discrete latent: the score function -------------------------------------
def test_sampled_discrete_score_gradient_is_unbiased():
    # a mixture with per-row assignment y (no continuous local latents), global means under a
    # delta guide: the enumerated bound is exact, so its gradient is the reference; the
    # sampled one (K = 4 draws per row, leave-one-out baseline) must equal it in expectation
    # and its value (the draws' mean of log p - log q) must be unbiased for the bound
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.normal(-1.5, 1, 12), rng.normal(1.5, 1, 12)]).astype(np.float32)
    lab = -np.ones(24, np.int32)
    lab[:3] = 0  # three observed rows: their y is fixed, no score term

    def lik(z, d):
        return dist.Normal(z["mu"][z["y"]], 1.0).log_prob(d["x"]) + jnp.log(0.5)

    model = vj.Model(log_prior=lambda z: dist.Normal(0, 3).log_prob(z["mu"]).sum(),
                     log_likelihood=lik,
                     latents={"mu": vj.Latent((2,)),
                              "y": vj.Latent((), constraints.integer_interval(0, 1),
                                             local=True, observed="label")})
    data = {"x": jnp.asarray(x), "label": jnp.asarray(lab)}
    guides = [{"mu": "delta", "y": vj.guides.Amortized(family="categorical", enumerate=e,
                                                       inputs="x", init_scale=1.0)}
              for e in (True, False)]
    exact, p0 = _objective(model, data, guides[0], init=[-1.0, 1.0])
    sampled, p1 = _objective(model, data, guides[1], k=4, init=[-1.0, 1.0])
    # move the classifier off its symmetric zero start so that the gradient is not trivial
    bump = jax.tree_util.tree_map(
        lambda a: a + 0.3 * jax.random.normal(jax.random.key(9), a.shape, a.dtype), p0)
    keys = _keys(2000)
    g_ref = jax.tree_util.tree_leaves(_grads(exact, bump, data, keys[:1]))
    g = jax.tree_util.tree_leaves(_grads(sampled, bump, data, keys))
    for ref, draws in zip(g_ref, g, strict=True):
        ref, draws = np.asarray(ref[0], float).ravel(), np.asarray(draws, float)
        draws = draws.reshape(draws.shape[0], -1)
        se = draws.std(0, ddof=1) / np.sqrt(draws.shape[0])
        # 4.5 standard errors: a Bonferroni bound over the ~1,400 classifier coordinates
        assert np.all(np.abs(draws.mean(0) - ref) <= 4.5 * se + 1e-4 * np.abs(ref).max())
    values = _values(sampled, bump, data, keys[:500])
    ref_value = _values(exact, bump, data, keys[:1])[0]
    assert abs(values.mean() - ref_value) < 4 * values.std(ddof=1) / np.sqrt(values.size)
