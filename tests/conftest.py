"""Shared small problems. Everything here is tiny so that compiles stay cheap."""

import contextlib

import jax
import numpy as np
import numpyro.distributions as dist
import pytest

import vijax as vj

# eight CPU devices for the sharded fits (tests/test_sharding*.py); set before JAX starts its
# backend (importing vijax does not start it). A program that is not sharded runs on the
# first device, as with one.
jax.config.update("jax_num_cpu_devices", 8)


@contextlib.contextmanager
def precision(dtype: str):
    """Run a block in float32 (JAX default) or float64 (``jax_enable_x64``)."""
    if dtype == "float64":
        # jax >= 0.6 has jax.enable_x64; older releases have it in jax.experimental
        enable = getattr(jax, "enable_x64", None)
        if enable is None:
            from jax.experimental import enable_x64 as enable
        with enable(True):
            yield np.float64
    else:
        yield np.float32


class LinearRegression:
    """Bayesian linear regression with known noise: w ~ N(0, s^2 I), y ~ N(X w, sigma^2 I).

    Exact posterior: precision Lam = X^T X / sigma^2 + I / s^2, mean = Lam^-1 X^T y / sigma^2.
    """

    N, D, sigma, s = 20, 3, 0.5, 1.0

    def __init__(self, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.X = rng.normal(size=(self.N, self.D))
        self.y = self.X @ rng.normal(size=self.D) + self.sigma * rng.normal(size=self.N)
        self.precision = self.X.T @ self.X / self.sigma**2 + np.eye(self.D) / self.s**2
        self.cov = np.linalg.inv(self.precision)
        self.mean = self.cov @ self.X.T @ self.y / self.sigma**2
        self.data = {"X": self.X, "y": self.y}


def _blr_log_joint(z, d):
    lr = LinearRegression
    return (dist.Normal(0.0, lr.s).log_prob(z["w"]).sum()
            + dist.Normal(d["X"] @ z["w"], lr.sigma).log_prob(d["y"]).sum())


BLR_MODEL = vj.Model(_blr_log_joint, {"w": vj.Latent(shape=(LinearRegression.D,))})


@pytest.fixture(scope="session")
def blr():
    return LinearRegression(0)


@pytest.fixture(scope="session")
def blr_model():
    return BLR_MODEL


_COMPILES = [0]


def _on_event(event, duration, **kwargs):
    if event == "/jax/core/compile/backend_compile_duration":
        _COMPILES[0] += 1


# registered once for the session (older jax has no public way to unregister a listener)
jax.monitoring.register_event_duration_secs_listener(_on_event)


@contextlib.contextmanager
def count_compiles():
    """Count XLA backend compilations inside the block: ``with count_compiles() as n: ...``;
    ``n[0]`` is the count afterwards."""
    start = _COMPILES[0]
    count = [0]
    try:
        yield count
    finally:
        count[0] = _COMPILES[0] - start


def raw_fit(model, data=None, **kw):
    """``vj.fit`` with the pre-preconditioning defaults (a mean-field guide fitted in the
    model's own coordinates), for tests of the loop's mechanics (stopping, resume, guards,
    checkpoints, lanes) that must not depend on the default's extra stages. Tests of the
    defaults themselves call ``vj.fit`` (tests/test_defaults.py)."""
    if kw.get("resume") is None:
        kw.setdefault("guide", "meanfield")
        kw.setdefault("precondition", None)
    return vj.fit(model, data, **kw)


@pytest.fixture(autouse=True, scope="module")
def _release_compiled_programs():
    """Drop compiled programs after each test module. XLA's CPU JIT maps memory for every
    executable; one process that keeps every program of the suite alive runs out of memory
    mappings (vm.max_map_count, 65,530) and aborts inside LLVM. Compile-cache tests run
    inside one module, so nothing they check spans modules."""
    yield
    from vijax.caches import clear_caches

    clear_caches()
