"""Fitting an SVGP: natural gradients for ``q(v)`` and Adam for the rest, or Adam for all.

Each step takes one minibatch (per-epoch shuffles of the row indices on device; each batch
is a uniform random subset, so the ``N / B`` scaled ELBO is unbiased) and, with
``natural_gradients=True``, (1) takes a natural-gradient step of size ``gamma`` on ``q(v)``
(:func:`vijax.gp.natgrad.natgrad_step`), then (2) an optimizer step on the kernel and
likelihood hyper-parameters, the constant mean and Z (unconstrained through ``biject_to``).
With ``natural_gradients=False`` the optimizer also moves ``m`` and ``S`` (``S``'s diagonal
softplus-parameterised). Steps run in ``lax.scan`` chunks inside one ``jit`` whose data,
key and step size are arguments: refitting data of the same shapes compiles nothing. A
step with a non-finite ELBO or parameters is skipped and counted.

Example:
    >>> import jax, jax.numpy as jnp
    >>> from vijax.gp import SVGP, RBF, fit_svgp
    >>> X = jnp.linspace(0, 1, 30); y = jnp.sin(6 * X)
    >>> res = fit_svgp(SVGP(RBF(), "gaussian", inducing=8), X, y, steps=50,
    ...                key=jax.random.key(0))
    >>> res.elbo_trace.shape
    (50,)
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vijax.gp._params import constrain, unconstrain
from vijax.gp.likelihoods import Gaussian
from vijax.gp.natgrad import natgrad_value_and_step
from vijax.gp.svgp import SVGP, SVGPParams, check_data, elbo, init_params, predict_f
from vijax.model import Param

__all__ = ["fit_svgp", "SVGPResult", "FitInfo"]


class _Hyper(NamedTuple):
    kernel: Any
    likelihood: dict
    mean: jax.Array
    Z: jax.Array


class _State(NamedTuple):
    hyper: _Hyper  # unconstrained
    q: tuple  # (m, S) with natural gradients, else (m, S_raw)
    opt_state: Any
    perm: jax.Array
    n_skipped: jax.Array


class FitInfo(NamedTuple):
    """Per-step output: the minibatch ELBO estimate and whether the step was skipped."""

    elbo: jax.Array
    skipped: jax.Array


def _spec(svgp: SVGP) -> _Hyper:
    return _Hyper(svgp.kernel.params_spec(), svgp.likelihood.params_spec(),
                  Param(), Param())


def _constrained(svgp, hyper, q, natural) -> SVGPParams:
    h = constrain(_spec(svgp), hyper)
    m, S = q if natural else (q[0], _scale_from_raw(q[1]))
    mean = h.mean if svgp.learns_mean else jax.lax.stop_gradient(h.mean)
    Z = h.Z if svgp.train_inducing else jax.lax.stop_gradient(h.Z)
    return SVGPParams(h.kernel, h.likelihood, mean, Z, m, S)


def _scale_from_raw(raw):
    return jnp.tril(raw, -1) + jnp.diag(jax.nn.softplus(jnp.diagonal(raw)))


def _raw_from_scale(S):
    d = jnp.diagonal(S)
    return jnp.tril(S, -1) + jnp.diag(d + jnp.log(-jnp.expm1(-d)))


def _finite(tree) -> jax.Array:
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]))


@functools.partial(jax.jit, static_argnames=("svgp", "natural", "batch", "chunk",
                                             "optimizer", "schedule"))
def _run_chunk(state, X, y, key, t0, steps, gamma, *, svgp, natural, batch, chunk,
               optimizer, schedule):
    n = X.shape[0]
    per_epoch = n // batch

    def step(state, t):
        pos = t % per_epoch
        perm = jax.lax.cond(
            (pos == 0) & (batch < n),
            lambda: jax.random.permutation(jax.random.fold_in(key, t // per_epoch), n),
            lambda: state.perm)
        idx = jax.lax.dynamic_slice(perm, (pos * batch,), (batch,))
        Xb, yb = X[idx], y[idx]

        def neg_elbo(hyper, q):
            return -elbo(svgp, _constrained(svgp, hyper, q, natural), Xb, yb, n)

        q = state.q
        if natural:
            g = gamma if schedule is None else schedule(t)
            hyp = constrain(_spec(svgp), state.hyper)
            fixed = SVGPParams(hyp.kernel, hyp.likelihood, hyp.mean, hyp.Z, None, None)
            before, q = natgrad_value_and_step(
                lambda m, S: elbo(svgp, fixed._replace(q_mean=m, q_scale_tril=S), Xb, yb, n),
                *q, g)
            loss, grads = jax.value_and_grad(neg_elbo)(state.hyper, q)
            # report the ELBO before this step's updates (as Adam-only does): after the
            # natgrad step on this very batch it would be biased upwards
            loss = jnp.where(jnp.isfinite(loss), -before, loss)
            updates, opt_state = optimizer.update(grads, state.opt_state, state.hyper)
            hyper = optax.apply_updates(state.hyper, updates)
        else:
            loss, grads = jax.value_and_grad(lambda pq: neg_elbo(*pq))((state.hyper, q))
            updates, opt_state = optimizer.update(grads, state.opt_state, (state.hyper, q))
            hyper, q = optax.apply_updates((state.hyper, q), updates)
        new = _State(hyper, q, opt_state, perm, state.n_skipped)
        ok = jnp.isfinite(loss) & _finite((hyper, q))
        active = t < steps
        keep = active & ~ok
        chosen = jax.tree.map(lambda a, b: jnp.where(ok & active, a, b), new, state)
        chosen = chosen._replace(perm=jnp.where(active, perm, state.perm),
                                 n_skipped=state.n_skipped + keep.astype(jnp.int32))
        return chosen, FitInfo(-loss, ~ok)

    return jax.lax.scan(step, state, t0 + jnp.arange(chunk))


# one object, so that fits with the default reuse the compiled chunk program (a fresh
# optax.adam(...) per call is a new static argument and would recompile)
_DEFAULT_OPTIMIZER = optax.adam(1e-2)
_elbo_jit = jax.jit(elbo, static_argnums=0)
_predict_jit = jax.jit(predict_f, static_argnums=(0, 3))


@dataclasses.dataclass(frozen=True)
class SVGPResult:
    """A fitted SVGP.

    Attributes:
        svgp: the model configuration.
        params: constrained :class:`SVGPParams`.
        elbo_trace: ``(steps,)`` minibatch ELBO estimate per step, at the parameters the
            step starts from (an unbiased estimate of the full-data ELBO there).
        n_nonfinite_skipped: steps skipped because the ELBO or parameters were not finite.
    """

    svgp: SVGP
    params: SVGPParams
    elbo_trace: np.ndarray
    n_nonfinite_skipped: int

    @property
    def kernel_params(self) -> Any:
        return self.params.kernel

    @property
    def likelihood_params(self) -> dict:
        return self.params.likelihood

    @property
    def inducing(self) -> jax.Array:
        return self.params.Z

    def predict(self, Xnew: Any, full_cov: bool = False) -> tuple[jax.Array, jax.Array]:
        """Mean and variance ``(n*,)`` of ``q(f*)`` (covariance with ``full_cov``)."""
        return _predict_jit(self.svgp, self.params, jnp.asarray(Xnew, self.params.Z.dtype),
                            full_cov)

    def predict_y(self, Xnew: Any) -> tuple[jax.Array, jax.Array]:
        """Predictive mean and variance ``(n*,)`` of ``y*`` (``E[y*]``, ``Var[y*]``)."""
        mu, var = self.predict(Xnew)
        return self.svgp.likelihood.predict_y(self.params.likelihood, mu, var)

    def elbo(self, X: Any, y: Any) -> float:
        """Full-data ELBO at the fitted parameters."""
        X, y = check_data(self.svgp, X, y)
        dt = self.params.Z.dtype
        return float(_elbo_jit(self.svgp, self.params, jnp.asarray(X, dt), jnp.asarray(y, dt)))


def fit_svgp(svgp: SVGP, X: Any, y: Any, *, steps: int, key: jax.Array,
             batch_size: int | None = None, natural_gradients: bool = True,
             natgrad_step: float | Callable | None = None,
             optimizer: optax.GradientTransformation | None = None,
             init: SVGPParams | None = None, chunk_size: int = 500,
             progress: bool = False) -> SVGPResult:
    """Fit an SVGP by maximising its (minibatch) ELBO.

    Args:
        svgp: the :class:`SVGP` configuration.
        X: inputs ``(N,)`` or ``(N, D)``; y: targets ``(N,)``.
        steps: number of steps.
        key: PRNG key (minibatch shuffles; k-means initialisation of Z).
        batch_size: rows per step; ``None``: all N (full batch). Batches are consecutive
            slices of a per-epoch permutation; ``N % B`` rows sit out each epoch.
        natural_gradients: natural-gradient steps for ``q(v)`` (default) or the optimizer
            for everything.
        natgrad_step: ``gamma``, a float or a schedule ``step -> gamma``; ``None``: 1.0 for
            a full-batch Gaussian likelihood (exact in one step), 0.1 for other full-batch
            fits, ``min(0.1, B / N)`` with minibatches (on two moons, N = 5,000, B = 256, a
            constant 0.1 left the final ELBO 13 nats below 0.03's: q's minibatch noise).
        optimizer: optax transformation for the other parameters; ``None``: Adam(0.01).
        init: starting :class:`SVGPParams` (default :func:`vijax.gp.svgp.init_params`).
        chunk_size: steps per compiled ``lax.scan`` call (progress is printed per chunk).

    Returns:
        an :class:`SVGPResult`.
    """
    if not (isinstance(steps, int | np.integer) and steps >= 1):
        raise ValueError(f"steps must be a positive int, got {steps!r}")
    Xn, yn = check_data(svgp, X, y)
    n = Xn.shape[0]
    batch = n if batch_size is None else batch_size
    if not (isinstance(batch, int | np.integer) and 1 <= batch <= n):
        raise ValueError(f"batch_size must be an int in [1, N={n}], got {batch_size!r}")
    if natgrad_step is None:
        if batch == n:
            natgrad_step = 1.0 if isinstance(svgp.likelihood, Gaussian) else 0.1
        else:  # a step averages ~1/gamma batches of q's noisy updates: at least N/B of them
            natgrad_step = min(0.1, batch / n)
    schedule = natgrad_step if callable(natgrad_step) else None
    if schedule is None and not (0 < float(natgrad_step) <= 1):
        raise ValueError(f"natgrad_step must be in (0, 1] or a schedule, got {natgrad_step!r}")
    optimizer = _DEFAULT_OPTIMIZER if optimizer is None else optimizer
    key_init, key_fit = jax.random.split(key)
    p = init_params(svgp, Xn, yn, key_init) if init is None else init
    dt = p.Z.dtype
    Xd, yd = jnp.asarray(Xn, dt), jnp.asarray(yn, dt)
    hyper = unconstrain(_spec(svgp), _Hyper(p.kernel, p.likelihood, p.mean, p.Z))
    q = (p.q_mean, p.q_scale_tril) if natural_gradients else (
        p.q_mean, _raw_from_scale(p.q_scale_tril))
    opt_state = optimizer.init(hyper if natural_gradients else (hyper, q))
    state = _State(hyper, q, opt_state, jnp.arange(n), jnp.zeros((), jnp.int32))
    chunk = int(min(chunk_size, steps))
    gamma = jnp.asarray(0.0 if schedule else natgrad_step, dt)
    traces = []
    for c in range(-(-steps // chunk)):
        state, info = _run_chunk(state, Xd, yd, key_fit, jnp.asarray(c * chunk),
                                 jnp.asarray(steps), gamma, svgp=svgp,
                                 natural=natural_gradients, batch=int(batch), chunk=chunk,
                                 optimizer=optimizer, schedule=schedule)
        traces.append(info.elbo)
        if progress:
            done = min((c + 1) * chunk, steps)
            last = float(info.elbo[min(chunk, steps - c * chunk) - 1])
            print(f"step {done}/{steps}: ELBO {last:.6g}")
    trace = np.concatenate([np.asarray(t) for t in traces])[:steps]
    skipped = int(state.n_skipped)
    if skipped:
        warnings.warn(f"{skipped} of {steps} steps had a non-finite ELBO or parameters and "
                      "were skipped" + (" (try a smaller natgrad_step)" if natural_gradients
                                        else ""), RuntimeWarning, stacklevel=2)
    params = _constrained(svgp, state.hyper, state.q, natural_gradients)
    return SVGPResult(svgp, jax.tree.map(jnp.asarray, params), trace, skipped)
