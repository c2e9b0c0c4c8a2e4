"""Mauna Loa CO2: a sparse variational GP against the exact GP, and a 20-year forecast.

statsmodels bundles the weekly Mauna Loa CO2 record (March 1958 - December 2001, with gaps).
As in scikit-learn's "Forecasting of CO2 level on Mona Loa" example, the weekly values are
averaged by month (empty months dropped), the mean is subtracted, time is in decimal years,
and the kernel has scikit-learn's Mauna Loa structure

    k = s1^2 RBF(l1)                        long-term rise
      + s2^2 RBF(l2) * Periodic(l3, p)      seasonal cycle, slowly changing shape
      + s3^2 RQ(l4, alpha)                  medium-term irregularities
      + s4^2 RBF(l5)                        correlated noise
    y = f + eps, eps ~ N(0, noise)          (scikit-learn's WhiteKernel)

The GP is fitted on the months up to ``--train-until`` (default 1991) and forecasts 20 years
ahead; the months 1991-2001 are held out and shown. scikit-learn's GaussianProcessRegressor
gives the exact log marginal likelihood (type-II maximum likelihood of the same kernel). For
M = 16, 32, 64, 128 inducing points the script fits an SVGP (full batch, natural gradients
for q(u), Adam for the kernel, noise and Z, float64) and prints, in nats per data point,

- its ELBO (a lower bound on the log marginal likelihood at its own hyper-parameters),
- Titsias' collapsed bound at scikit-learn's fitted hyper-parameters and the SVGP's Z,

against the exact log marginal likelihood: both approach it as M grows. The forecast band of
the largest M is saved to ``examples/output/co2_svgp.png``.

Run: ``python examples/co2_svgp.py [--full] [--steps 600] [--train-until 1991]``
(default < 3 min on 2 CPU cores; ``--full`` adds M = 256 and runs 4000-step fits).
"""

from __future__ import annotations

import os

# One BLAS thread: on a small, shared CPU the multithreaded OpenBLAS behind JAX's CPU
# Cholesky (scipy's) thrashes for matrices of 128 rows and more (measured: 250 ms instead of
# 0.1 ms per 128 x 128 factorisation with other jobs running). Set before numpy/jax load it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import time
from pathlib import Path

import jax

jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import vijax.gp as gp  # noqa: E402


def load_co2(train_until: float) -> tuple:
    """Monthly means of the weekly record: (t_train, y_train, t_test, y_test), t in years."""
    import statsmodels.api as sm

    weekly = sm.datasets.co2.load_pandas().data["co2"]
    monthly = weekly.resample("MS").mean().dropna()
    t = (monthly.index.year + (monthly.index.month - 1) / 12.0).to_numpy(float)
    y = monthly.to_numpy(float)
    train = t < train_until
    return t[train], y[train], t[~train], y[~train]


def mauna_loa_kernel() -> gp.Kernel:
    """scikit-learn's initial Mauna Loa kernel, in vijax.gp (noise goes to the likelihood)."""
    return (gp.RBF(50.0, 50.0**2)
            + gp.RBF(100.0, 2.0**2) * gp.Periodic(1.0, period=1.0, variance=1.0)
            + gp.RationalQuadratic(1.0, alpha=1.0, variance=0.5**2)
            + gp.RBF(0.1, 0.1**2))


def sklearn_exact(t: np.ndarray, y: np.ndarray) -> tuple:
    """Exact GP of scikit-learn (type-II ML) with the same kernel (the period learned, as in
    the SVGP, where scikit-learn's example fixes it at 1 year): (log marginal likelihood,
    our parameter pytree for its fitted hyper-parameters, its noise, seconds)."""
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process import kernels as skk

    c = skk.ConstantKernel
    kernel = (c(50.0**2) * skk.RBF(50.0)
              + c(2.0**2) * skk.RBF(100.0) * skk.ExpSineSquared(1.0, 1.0)
              + c(0.5**2) * skk.RationalQuadratic(1.0, 1.0)
              + c(0.1**2) * skk.RBF(0.1) + skk.WhiteKernel(0.1**2))
    start = time.perf_counter()
    gpr = GaussianProcessRegressor(kernel, normalize_y=False).fit(t[:, None], y)
    seconds = time.perf_counter() - start
    k = gpr.kernel_
    terms = []  # the five summands, left to right
    while isinstance(k, skk.Sum):
        terms.insert(0, k.k2)
        k = k.k1
    terms.insert(0, k)
    long, seas, rq, short, white = terms

    def rbf(ck, rk):
        return {"lengthscale": jnp.asarray(rk.length_scale), "variance": jnp.asarray(
            ck.constant_value)}

    seas_c, seas_rbf, seas_ess = seas.k1.k1, seas.k1.k2, seas.k2
    params = (rbf(long.k1, long.k2),
              (rbf(seas_c, seas_rbf), {"lengthscale": jnp.asarray(seas_ess.length_scale),
                                       "period": jnp.asarray(seas_ess.periodicity),
                                       "variance": jnp.asarray(1.0)}),
              {"lengthscale": jnp.asarray(rq.k2.length_scale),
               "alpha": jnp.asarray(rq.k2.alpha), "variance": jnp.asarray(rq.k1.constant_value)},
              rbf(short.k1, short.k2))
    return float(gpr.log_marginal_likelihood_value_), params, float(white.noise_level), seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="M up to 256, 4000-step fits")
    ap.add_argument("--steps", type=int, default=None,
                    help="SVGP steps (default 600; 4000 with --full)")
    ap.add_argument("--train-until", type=float, default=1991.0)
    ap.add_argument("--out", default=str(Path(__file__).parent / "output" / "co2_svgp.png"))
    args = ap.parse_args()
    steps = args.steps or (4000 if args.full else 600)
    ms = (16, 32, 64, 128, 256) if args.full else (16, 32, 64, 128)

    t, y, t_test, y_test = load_co2(args.train_until)
    y_mean = y.mean()
    yc = y - y_mean
    n = len(t)
    lml, sk_params, sk_noise, sk_seconds = sklearn_exact(t, yc)
    kernel = mauna_loa_kernel()
    own = float(gp.exact_log_marginal(kernel, sk_params, t, yc, sk_noise))
    print(f"N = {n} months ({t[0]:.1f}-{t[-1]:.1f}); exact GP (scikit-learn, {sk_seconds:.1f} s): "
          f"log marginal likelihood {lml:.2f} = {lml / n:.4f} nats/point "
          f"(vijax.gp.exact_log_marginal at its hyper-parameters: {own:.2f})")
    print(f"{'M':>5} {'ELBO/N':>9} {'gap/N':>8} {'Titsias@sk/N':>13} {'gap/N':>8} "
          f"{'fit s':>6} {'test RMSE':>9}")
    rows, last = [], None
    for m in ms:
        model = gp.SVGP(kernel, gp.Gaussian(0.1**2), inducing=m)
        start = time.perf_counter()
        res = gp.fit_svgp(model, t, yc, steps=steps, key=jax.random.key(0))
        seconds = time.perf_counter() - start
        elbo = res.elbo(t, yc)
        titsias = float(gp.collapsed_bound(kernel, sk_params, res.inducing, t, yc, sk_noise))
        mean, _ = res.predict(t_test)
        rmse = float(np.sqrt(np.mean((np.asarray(mean) + y_mean - y_test) ** 2)))
        rows.append((m, elbo / n, titsias / n, seconds, rmse))
        print(f"{m:>5} {elbo / n:>9.4f} {(lml - elbo) / n:>8.4f} {titsias / n:>13.4f} "
              f"{(lml - titsias) / n:>8.4f} {seconds:>6.1f} {rmse:>9.3f}")
        last = res
    plot(last, t, y, t_test, y_test, y_mean, args.out)
    print(f"saved {args.out}")


def plot(res, t, y, t_test, y_test, y_mean, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = np.linspace(t[0], t[-1] + 20.0, 1200)
    mean, var = res.predict_y(grid)
    mean, sd = np.asarray(mean) + y_mean, np.sqrt(np.asarray(var))
    fig, ax = plt.subplots(figsize=(9, 4.5))
    ax.fill_between(grid, mean - 2 * sd, mean + 2 * sd, color="C0", alpha=0.3,
                    label="SVGP mean ± 2 sd (y)")
    ax.plot(grid, mean, color="C0", lw=1)
    ax.plot(t, y, "k.", ms=2, label="training months")
    ax.plot(t_test, y_test, ".", color="C3", ms=2, label="held-out months")
    z = np.asarray(res.inducing)[:, 0]
    ax.plot(z, np.full_like(z, y.min() - 3), "|", color="C2", label="inducing inputs")
    ax.set(xlabel="year", ylabel="CO2 (ppm)",
           title=f"Mauna Loa CO2: SVGP with M = {len(z)} inducing points, 20-year forecast")
    ax.legend(loc="upper left", fontsize=8)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)


if __name__ == "__main__":
    main()
