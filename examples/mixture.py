"""A Bayesian Gaussian mixture on the iris petals: CAVI, gradient VI and variational EM.

Data: scikit-learn's bundled iris measurements, petal length and width (N = 150, D = 2),
standardised (the ELBOs below are in standardised units; the means are printed in cm).
Model, K = 3 (the prior is scikit-learn's ``BayesianGaussianMixture`` default,
``vj.default_gmm_prior``)::

    pi ~ Dirichlet(1/K), Lambda_k ~ Wishart(W0, nu0), mu_k | Lambda_k ~ N(m0, (beta0 Lambda_k)^-1),
    z_n ~ Cat(pi), x_n | z_n = k ~ N(mu_k, Lambda_k^-1).

Three ways to fit it:

1. **CAVI** (``vj.cavi_gmm``): coordinate ascent over the conjugate mean-field family
   ``q(z) q(pi) prod_k q(mu_k, Lambda_k)`` (Bishop 2006, 10.2). Its ELBO is exact (closed
   form) and bounds ``log p(x)``.
2. **Gradient VI** (``vj.fit`` on ``vj.gmm_model``): ``z`` is summed out of the likelihood
   (``log p(x_n | theta) = logsumexp_k [log pi_k + log N(x_n | mu_k, Lambda_k^-1)]``) and a
   full-rank Gaussian over the unconstrained ``(pi, mu, Lambda)`` is fitted by stochastic
   gradients. Its ELBO also bounds ``log p(x)``, over a different family: there is no factor
   over ``z`` to approximate (the bound uses the exact ``p(z | x, theta)``), but ``q(theta)``
   is a Gaussian after the change of variables rather than CAVI's Dirichlet x Normal-Wishart.
   It is a Monte Carlo estimate, printed with its standard error.
3. **Variational EM as a pattern of fit** (``vj.gmm_model(..., weights="param")``): the
   mixture weights ``pi`` are a ``vj.Param`` (a point estimate: the M-step) while
   ``(mu, Lambda)`` keep a Gaussian ``q`` (the E-step). ``vj.fit`` takes gradient steps on
   the guide and the parameters jointly, one step of each per iteration: a generalised
   (incremental) variational EM that maximises the same bound over both. ``pi`` has no prior
   here (a Dirichlet(1/K) density is unbounded at the simplex's edges, so its MAP would run
   there): the ELBO bounds ``log p(x | pi_hat)``, not ``log p(x)``, and is comparable with
   the other two only loosely (it is maximum likelihood in ``pi``).

For CAVI the script also estimates the bound of its ``q(pi, mu, Lambda)`` with ``z`` summed
out (gradient VI's objective evaluated at CAVI's ``q(theta)``): it is >= CAVI's own ELBO,
because replacing ``q(z)`` by the exact ``p(z | x, theta)`` can only tighten the bound. That
number and gradient VI's are the like-for-like pair: the same objective, two families for
``q(theta)``.

The table gives each method's bound, wall time (compilation included) and component means in
cm; with matplotlib installed the data and each fit's 2-sd ellipses of ``E[Lambda_k^-1]`` are
saved as ``mixture.png`` in ``--plot-dir`` (default ``out/``).

Run: ``python examples/mixture.py [--seed 0] [--plot-dir out]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import time
from pathlib import Path

import jax
import numpy as np
import numpyro.distributions as dist
from scipy import stats
from scipy.optimize import linear_sum_assignment
from sklearn.datasets import load_iris

import vijax as vj

K = 3
DRAWS = 4000  # Monte Carlo draws for the ELBO estimates and the posterior means
STEPS = 20_000  # gradient fits: the stopping rule usually ends them earlier


def load_petals() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Iris petal length and width.

    Returns:
        ``(x, loc, scale, species)``: ``x`` ``(150, 2)`` standardised, ``loc`` and ``scale``
        ``(2,)`` in cm (``x_cm = loc + scale * x``), ``species`` ``(150,)`` in {0, 1, 2}.
    """
    iris = load_iris()
    raw = iris.data[:, 2:4].astype(np.float64)
    loc, scale = raw.mean(0), raw.std(0)
    return (raw - loc) / scale, loc, scale, iris.target


def gradient_elbo(res: vj.FitResult, data: dict, key: jax.Array, n: int = DRAWS
                  ) -> tuple[float, float, dict]:
    """Monte Carlo ELBO of a ``vj.fit`` result: ``mean_s [log p(x, theta_s) + log|J| -
    log q(theta_s)]`` over ``n`` draws in the unconstrained space, with its standard error,
    and the constrained draws."""

    def one(k):
        theta, log_q = res.guide.sample(k, res.params)
        log_p = res.target.log_density(theta, data, frozenset(), res.mparams)
        return log_p - log_q, res.target.constrain(theta)

    lw, draws = jax.jit(jax.vmap(one))(jax.random.split(key, n))
    lw = np.asarray(lw, np.float64)
    return float(lw.mean()), float(lw.std(ddof=1) / np.sqrt(n)), draws


def cavi_marginal_elbo(res: vj.CAVIResult, x: np.ndarray, seed: int, n: int = DRAWS
                       ) -> tuple[float, float]:
    """``E_q[log p(x, theta) - log q(theta)]`` for CAVI's ``q(theta) = q(pi) prod_k
    q(mu_k, Lambda_k)``, ``z`` summed out (``vj.gmm_model``'s density), and its standard error:
    draws by numpy/scipy, densities by numpyro."""
    rng = np.random.default_rng(seed)
    pi = rng.dirichlet(res.alpha, n)
    lam = np.stack([stats.wishart(df=res.nu[j], scale=res.W[j]).rvs(n, random_state=rng)
                    for j in range(K)], 1)
    chol = np.linalg.cholesky(np.linalg.inv(res.beta[None, :, None, None] * lam))
    mu = res.m + np.einsum("skde,ske->skd", chol, rng.normal(size=(n, K, x.shape[1])))
    model = vj.gmm_model(res.prior, K)

    def one(pi, lam, mu):
        z = {"pi": pi, "mu": mu, "Lambda": lam}
        log_q = (dist.Dirichlet(res.alpha).log_prob(pi)
                 + dist.Wishart(res.nu, scale_matrix=res.W).log_prob(lam).sum()
                 + dist.MultivariateNormal(res.m, precision_matrix=res.beta[:, None, None] * lam
                                           ).log_prob(mu).sum())
        return model.log_density(z, {"x": x}) - log_q

    lw = np.asarray(jax.jit(jax.vmap(one))(pi, lam, mu), np.float64)
    return float(lw.mean()), float(lw.std(ddof=1) / np.sqrt(n))


def _ellipse(ax, mean, cov, **kw):
    vals, vecs = np.linalg.eigh(cov)
    t = np.linspace(0, 2 * np.pi, 100)
    pts = mean[:, None] + 2 * vecs @ (np.sqrt(vals)[:, None] * np.stack([np.cos(t), np.sin(t)]))
    ax.plot(pts[0], pts[1], **kw)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot-dir", default="out", help="where to save mixture.png; '' none")
    args = parser.parse_args(argv)
    plot_dir = Path(args.plot_dir) if args.plot_dir else None
    if plot_dir is not None and importlib.util.find_spec("matplotlib") is None:
        print('(no plot: matplotlib is not installed; pip install "vijax[plot]")')
        plot_dir = None
    jax.config.update("jax_enable_x64", True)  # float64 for every method alike

    x, loc, scale, species = load_petals()
    data = {"x": x}
    prior = vj.default_gmm_prior(x, K)
    print(f"iris petals: N = {len(x)}, D = 2 (standardised), K = {K}")
    rows, fits = [], {}
    key = jax.random.key(args.seed)

    t0 = time.perf_counter()
    cavi = max((vj.cavi_gmm(x, K, prior=prior, key=args.seed + i) for i in range(5)),
               key=lambda r: r.elbo[-1])  # 5 k-means++ restarts, the best final ELBO
    wall = time.perf_counter() - t0
    marg, marg_se = cavi_marginal_elbo(cavi, x, args.seed)
    rows.append(("CAVI (5 restarts)", f"{cavi.elbo[-1]:.3f} (exact)", wall, cavi.m))
    rows.append(("  its q(theta), z summed out", f"{marg:.3f} +/- {marg_se:.3f}", np.nan,
                 cavi.m))
    fits["CAVI"] = (cavi.m, np.linalg.inv(cavi.W) / (cavi.nu - 3)[:, None, None])
    # an ordered start for the gradient fits (data quantiles, not CAVI's answer): one labelling
    init_mu = np.quantile(x, [1 / 6, 1 / 2, 5 / 6], axis=0)

    for name, weights in (("gradient VI (full-rank)", "latent"),
                          ("variational EM (pi: Param)", "param")):
        model = vj.gmm_model(prior, K, weights=weights)
        t0 = time.perf_counter()
        res = vj.fit(model, data, guide="fullrank", key=key, init={"mu": init_mu}, steps=STEPS,
                     progress=False, dtype=np.float64)
        wall = time.perf_counter() - t0
        elbo, se, draws = gradient_elbo(res, data, jax.random.fold_in(key, 1))
        means = np.asarray(draws["mu"]).mean(0)
        cov = np.linalg.inv(np.asarray(draws["Lambda"])).mean(0)
        label = f"{elbo:.3f} +/- {se:.3f}"
        if weights == "param":
            label += " (bounds log p(x | pi))"
            name += f", pi = {np.round(np.asarray(res.model_params['pi']), 3).tolist()}"
        rows.append((name, label, wall, means))
        fits[name.split(" (")[0]] = (means, cov)

    ref = cavi.m
    print("\nELBO: a lower bound on log p(x) (standardised units; larger is better)\n")
    print(f"{'method':<58} {'ELBO':>38} {'wall s':>7}   component means (cm), by length")
    for name, label, wall, means in rows:
        order = linear_sum_assignment(((ref[:, None] - means[None]) ** 2).sum(-1))[1]
        m_cm = loc + scale * means[order][np.argsort(ref[:, 0])]
        txt = "  ".join(f"({a:.2f}, {b:.2f})" for a, b in m_cm)
        wall_txt = "" if np.isnan(wall) else f"{wall:.2f}"
        print(f"{name:<58} {label:>38} {wall_txt:>7}   {txt}")
    print("\nCAVI's exact ELBO and gradient VI's estimate bound the same log p(x) over "
          "different families;\nthe like-for-like pair is CAVI's q(theta) with z summed out "
          "against gradient VI (same objective).\nVariational EM's bound is on "
          "log p(x | pi_hat), a different quantity.")
    means_by_species = [loc + scale * x[species == s].mean(0) for s in range(3)]
    print("species means (cm): " + "  ".join(f"({a:.2f}, {b:.2f})"
                                             for a, b in means_by_species))

    if plot_dir is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        plot_dir.mkdir(parents=True, exist_ok=True)
        fig, axes = plt.subplots(1, len(fits), figsize=(5 * len(fits), 4.5), sharey=True)
        raw = loc + scale * x
        for ax, (name, (means, cov)) in zip(axes, fits.items(), strict=True):
            ax.scatter(raw[:, 0], raw[:, 1], c=species, s=10, cmap="viridis", alpha=0.6)
            for m, c in zip(means, cov, strict=True):
                _ellipse(ax, loc + scale * m, c * np.outer(scale, scale), color="C3")
                ax.plot(*(loc + scale * m), "x", color="C3")
            ax.set(title=name, xlabel="petal length (cm)")
        axes[0].set_ylabel("petal width (cm)")
        fig.tight_layout()
        path = plot_dir / "mixture.png"
        fig.savefig(path, dpi=100)
        print(f"plot: {path}")


if __name__ == "__main__":
    main()
