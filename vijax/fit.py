"""``vj.fit``: validate everything, then compose target -> guide -> objective -> loop -> result."""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vijax.estimators import resolve_estimator
from vijax.guides.resolve import build_guide, resolve_spec
from vijax.loop import init_state, make_chunk_runner
from vijax.model import Model
from vijax.objective import make_objective
from vijax.optim import default_optimizer
from vijax.result import Diagnostics, FitResult

__all__ = ["fit", "prepare_data", "check_data"]

MAX_INIT_TRIES = 100
DEFAULT_CHUNK = 500


# ---------------------------------------------------------------------------------------------
# validation helpers
def _check_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_key(key: Any) -> jax.Array:
    if key is None:
        return jax.random.key(0)
    if isinstance(key, int | np.integer) and not isinstance(key, bool):
        return jax.random.key(int(key))
    if isinstance(key, jax.Array) and (jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
                                       or (key.shape == (2,) and key.dtype == jnp.uint32)):
        return key
    raise TypeError(f"key must be a JAX PRNG key (jax.random.key(seed)) or an int seed, "
                    f"got {key!r}")


def _resolve_dtype(dtype: Any) -> np.dtype:
    default = jnp.result_type(float)
    if dtype is None:
        return np.dtype(default)
    dtype = np.dtype(dtype)
    if dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise ValueError(f"dtype must be float32 or float64, got {dtype}")
    if dtype == np.float64 and np.dtype(default) != np.float64:
        raise ValueError("dtype=float64 needs 64-bit JAX: call "
                         "jax.config.update('jax_enable_x64', True) first")
    return dtype


def prepare_data(data: Any, dtype=None) -> Any:
    """Validate a data pytree and move it to the device (see :func:`check_data`).

    Example:
        >>> import numpy as np
        >>> prepare_data({"y": np.array([1.0, 2.0])})["y"].shape
        (2,)
    """
    return jax.tree_util.tree_map(jnp.asarray, check_data(data, dtype))


def check_data(data: Any, dtype=None) -> Any:
    """Validate a data pytree on the host, without compiling anything.

    Floating leaves are cast to ``dtype`` (the fit's float type) so that no weak or mixed types
    cause recompiles; integer and boolean leaves keep their type. Raises naming the data key
    when a leaf is not numeric or holds NaN/inf.

    Returns the pytree with numpy leaves (device arrays are kept as they are).
    """
    dtype = _resolve_dtype(dtype)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(data)
    out = []
    for path, leaf in leaves:
        where = "data" + jax.tree_util.keystr(path)
        if isinstance(leaf, jax.Array):
            arr = leaf
        else:
            try:
                arr = np.asarray(leaf)
            except Exception as e:
                raise TypeError(f"{where} is not an array: {e}") from None
        if arr.dtype.kind not in "biuf":
            raise TypeError(f"{where} must be numeric (float, int or bool), got dtype "
                            f"{arr.dtype}")
        if arr.dtype.kind == "f":
            finite = np.asarray(jnp.isfinite(arr)) if isinstance(arr, jax.Array) \
                else np.isfinite(arr)
            if not finite.all():
                bad = tuple(int(i) for i in np.argwhere(~finite)[0])
                value = np.asarray(arr)[bad] if bad else np.asarray(arr)
                raise ValueError(f"{where} contains a non-finite value ({value}) at index "
                                 f"{bad}; NaN and inf are not allowed in data")
            arr = arr.astype(dtype) if arr.dtype != dtype else arr
        out.append(arr)
    return jax.tree_util.tree_unflatten(treedef, out)


def _check_log_joint(model: Model, target, data, dtype) -> None:
    """Trace the model's density once on abstract values: it must return a float scalar."""
    theta = jax.ShapeDtypeStruct((target.full_dim,), dtype)
    shapes = {b.name: b.shape for b in target.blocks + target.discrete}
    if model.factorised:
        prior = _trace(lambda: jax.eval_shape(
            lambda t: model.log_prior(target.constrain(t)), theta), "log_prior", shapes)
        _check_float(prior, "log_prior")
        if prior.shape != ():
            raise ValueError(f"log_prior must return a scalar, got shape {prior.shape}")
        lik = _trace(lambda: jax.eval_shape(
            lambda t, d: model.log_likelihood(target.constrain(t), d), theta, data),
            "log_likelihood", shapes)
        _check_float(lik, "log_likelihood")
        if len(lik.shape) != 1:
            raise ValueError("log_likelihood must return one value per observation, shape "
                             f"(N,); got shape {lik.shape}")
        return
    out = _trace(lambda: jax.eval_shape(lambda t, d: model.log_joint(target.constrain(t), d),
                                        theta, data), "log_joint", shapes)
    if not hasattr(out, "shape"):
        raise TypeError(f"log_joint must return a scalar array, got {type(out)}")
    _check_float(out, "log_joint")
    if out.shape != ():
        raise ValueError(f"log_joint must return a scalar, got shape {out.shape} (sum the "
                         "per-observation terms, or use the factorised form)")


def _trace(fn, fname: str, shapes: dict):
    try:
        return fn()
    except Exception as e:
        raise type(e)(f"the model's {fname} failed when traced with latents of shapes "
                      f"{shapes}: {e}") from e


def _check_float(out, fname: str) -> None:
    if not hasattr(out, "dtype") or not jnp.issubdtype(out.dtype, jnp.floating):
        raise TypeError(f"{fname} must return a floating-point value, got "
                        f"{getattr(out, 'dtype', type(out))}")


# ---------------------------------------------------------------------------------------------
# compiled pieces, cached on hashable configuration (one program per configuration)
@functools.lru_cache(maxsize=128)
def _pipeline(target, spec, num_particles: int, optimizer, chunk_len: int,
              estimator="auto"):
    guide = build_guide(spec, target)
    objective = make_objective(target, guide, estimator, num_particles)
    runner = make_chunk_runner(objective, optimizer, chunk_len)
    find = _init_finder(target, guide.no_jacobian)

    @jax.jit  # everything before the first step is one compiled program
    def start(key, data, fixed, mask):
        k_init, k_guide, k_loop = jax.random.split(key, 3)
        tries, theta, ok = find(k_init, data, fixed, mask)
        state = init_state(guide.init(k_guide, theta), optimizer,
                           objective.init_state(theta.dtype))
        return tries, theta, ok, state, k_loop

    restart = jax.jit(lambda params: init_state(  # warm starts
        params, optimizer, objective.init_state(jax.tree_util.tree_leaves(params)[0].dtype)))
    return guide, objective, runner, start, restart


def _source_loc(source: FitResult) -> np.ndarray:
    """Unconstrained centre of a fitted guide: its mean, or the mean of 1,000 draws."""
    if source.guide.mean is not None:
        return np.asarray(source.guide.mean(source.params))
    keys = jax.random.split(jax.random.key(0), 1000)
    draws = jax.jit(jax.vmap(source.guide.sample, in_axes=(0, None)))(keys, source.params)[0]
    return np.asarray(jnp.mean(draws, axis=0))


def _check_source(target, source: Any, dtype) -> None:
    if not isinstance(source, FitResult):
        raise TypeError(f"init_from must be a vj.FitResult, got {type(source)}")
    mine = [(b.name, b.unconstrained_shape) for b in target.blocks] + [
        (b.name, b.shape, b.low, b.num_values) for b in target.discrete]
    theirs = [(b.name, b.unconstrained_shape) for b in source.target.blocks] + [
        (b.name, b.shape, b.low, b.num_values) for b in source.target.discrete]
    if mine != theirs:
        raise ValueError(f"init_from: the fitted result's latents {theirs} do not match the "
                         f"model's latents {mine}")
    got = jax.tree_util.tree_leaves(source.params)[0].dtype
    if got != dtype:
        raise ValueError(f"init_from: the fitted result is {got}, this fit is {dtype}")


def _same_family(a, b) -> bool:
    """Same guide class and configuration apart from ``init_scale`` (which only sets the
    starting point, so a flow's unit-scale base can take over a fitted Gaussian)."""
    if a is None or type(a) is not type(b) or not dataclasses.is_dataclass(a):
        return False
    return all(getattr(a, f.name) == getattr(b, f.name)
               for f in dataclasses.fields(a) if f.name != "init_scale")


def _warm_continuous(spec, params, source_params, source_spec, source_name):
    if source_spec == spec:
        taken = source_params
    elif _same_family(getattr(spec, "base", None), source_spec):
        taken = {**params, "base": source_params}
    else:
        return None
    shapes = jax.tree_util.tree_map(jnp.shape, (taken, params))
    if jax.tree_util.tree_structure(taken) != jax.tree_util.tree_structure(params) or \
            shapes[0] != shapes[1]:
        raise ValueError("init_from: the fitted guide's parameters do not fit this guide "
                         f"({source_name} -> {spec.name})")
    return taken


def _warm_params(spec, params, source: FitResult):
    """Guide parameters taken over from ``source``: all of them when the guide is the same,
    the base when the new guide is a flow over the source's family (discrete latents' logits
    always); else ``None``."""
    if not source.target.discrete:
        return _warm_continuous(spec, params, source.params, source.guide_spec,
                                source.guide.name)
    cont = _warm_continuous(spec, params["continuous"], source.params["continuous"],
                            source.guide_spec, source.guide.name)
    return {"continuous": params["continuous"] if cont is None else cont,
            "discrete": source.params["discrete"]}


def _init_finder(target, no_jacobian: frozenset):
    """``(key, data, fixed (full_dim,), mask (full_dim,)) -> (tries, theta, ok)``.

    Draws ``theta ~ Uniform(-2, 2)`` in unconstrained space (discrete latents: uniform
    category indices) for unmasked entries (masked ones come from ``init=``) until the log
    density and its gradient are finite.
    """
    dim = target.dim
    num_values = np.concatenate([np.full(b.size, b.num_values) for b in target.discrete]
                                or [np.zeros(0)])

    def finite_at(theta, data):
        lp, g = jax.value_and_grad(target.log_density)(theta, data, no_jacobian)
        return jnp.isfinite(lp) & jnp.all(jnp.isfinite(g))

    def find(key, data, fixed, mask):
        def candidate(i):
            k_c, k_d = jax.random.split(jax.random.fold_in(key, i))
            u = jax.random.uniform(k_c, (dim,), fixed.dtype, -2.0, 2.0)
            if num_values.size:
                idx = jnp.floor(jax.random.uniform(k_d, num_values.shape, fixed.dtype)
                                * num_values)
                u = jnp.concatenate([u, jnp.minimum(idx, num_values - 1).astype(fixed.dtype)])
            return jnp.where(mask, fixed, u)

        def cond(c):
            i, _, ok = c
            return (~ok) & (i < MAX_INIT_TRIES)

        def body(c):
            i, _, _ = c
            theta = candidate(i)
            return i + 1, theta, finite_at(theta, data)

        theta0 = candidate(0)
        return jax.lax.while_loop(cond, body, (jnp.int32(1), theta0, finite_at(theta0, data)))

    return find


def _fixed_init(target, init, dtype) -> tuple[np.ndarray, np.ndarray]:
    """Unconstrained values and mask ``(full_dim,)`` of the latents given in ``init``."""
    fixed = np.zeros((target.full_dim,), dtype)
    mask = np.zeros((target.full_dim,), bool)
    if init is not None:
        if not isinstance(init, Mapping):
            raise TypeError(f"init must be a dict from latent name to constrained value, got "
                            f"{type(init)}")
        target.check_values(init)
        for name, value in init.items():
            b = target.block(name)
            if name in target.discrete_names:
                u = (np.asarray(value) - b.low).astype(dtype).ravel()
            else:
                u = np.asarray(b.transform.inv(jnp.asarray(value, dtype))).ravel()
            if not np.all(np.isfinite(u)):
                raise ValueError(f"init value of latent {name!r} ({value}) maps to a non-finite "
                                 "unconstrained value; it lies on the boundary of its support")
            fixed[b.offset:b.offset + b.size] = u
            mask[b.offset:b.offset + b.size] = True
    return fixed, mask


def _check_init_found(target, tries, theta, ok, mask) -> None:
    if not bool(ok):
        if mask.all():
            raise ValueError("the log joint or its gradient is not finite at the given init: "
                             f"{target.describe(theta)}")
        raise ValueError(f"no initial point with a finite log joint and gradient found in "
                         f"{int(tries)} tries (uniform in (-2, 2) in unconstrained space); last "
                         f"values tried: {target.describe(theta)}. Pass init= with constrained "
                         "values where the model is finite")


def _check_finite_params(target, guide, state, steps: int) -> None:
    """Fail loudly, naming the latents, if the fitted parameters are not finite."""
    for label, params in (("last iterate", state.params), ("averaged iterate",
                                                           state.avg_params)):
        if all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree_util.tree_leaves(params)):
            continue
        bad = ["(see params)"]
        if guide.mean is not None:
            loc = np.asarray(guide.mean(params))
            bad = [b.name for b in target.blocks
                   if not np.all(np.isfinite(loc[b.offset:b.offset + b.size]))] or ["(scales)"]
        raise FloatingPointError(
            f"the {label} of the guide parameters is not finite after {steps} steps (latents "
            f"{bad}) although the gradients were finite: the optimizer produced non-finite "
            "updates (check its step size)")


def _final_loss(losses: np.ndarray) -> float:
    """Mean of the finite losses among the last 10% of steps (NaN if there are none)."""
    tail = losses[-max(1, losses.size // 10):]
    tail = tail[np.isfinite(tail)]
    return float(tail.mean()) if tail.size else float("nan")


# ---------------------------------------------------------------------------------------------
def fit(model: Model, data: Any = None, *, guide: Any = "meanfield", steps: int = 2000,
        optimizer: optax.GradientTransformation | None = None, key: Any = None,
        num_particles: int | None = None, init: Mapping[str, Any] | None = None,
        average: float = 0.5, chunk_size: int = DEFAULT_CHUNK, dtype: Any = None,
        init_from: FitResult | None = None, estimator: Any = "auto") -> FitResult:
    """Fit a variational approximation q to the posterior of ``model`` given ``data``.

    Maximises the ELBO ``E_q[log p(x, z)] - E_q[log q(z)]`` over the guide's parameters in
    the unconstrained space of the latents, with reparameterised Monte Carlo gradients and any
    Optax optimizer, ``chunk_size`` steps per compiled ``lax.scan`` call. The returned
    parameters are the average of the iterates over the last ``average`` fraction of steps
    (Dhaka et al. 2020), which removes most of the noise of the last iterate.

    Args:
        model: a :class:`vijax.Model` (``vj.model`` decorator, ``vj.Model``, ``vj.from_numpyro``).
        data: data pytree passed to the model; ``None`` uses the data bound to the model.
        guide: ``"delta"``, ``"meanfield"``, ``"lowrank"``, ``"fullrank"``, a configured object
            (``vj.guides.LowRank(rank=5)``), or a dict from latent name (or tuple of names) to
            either, for a structured guide of independent blocks.
        steps: number of optimisation steps (>= 1).
        optimizer: an Optax ``GradientTransformation``; default :func:`default_optimizer` with
            the guide's ``default_learning_rate`` (0.05 Gaussian families, 0.01 IAF, 0.003
            coupling flows).
        key: a JAX PRNG key (or int seed); ``None`` means ``jax.random.key(0)``.
        num_particles: Monte Carlo draws per gradient estimate (>= 1), vectorised; ``None``:
            1, or 8 for models with discrete latents (so that their score-function gradient
            gets a leave-one-out baseline).
        init: optional dict of *constrained* initial values for some or all latents; the rest
            start uniform in (-2, 2) in unconstrained space, redrawn until the log joint is finite.
        average: fraction of final steps whose iterates are averaged, in [0, 1); 0 returns the
            last iterate.
        chunk_size: steps per compiled call (>= 1).
        dtype: float32 or float64 (needs ``jax_enable_x64``); default JAX's default float.
        init_from: a fitted result of the same model to warm-start from: the same guide
            continues from its parameters; a flow whose base is the fitted family starts as
            exactly that fit (its layers start as the identity); any other guide is centred on
            the fitted guide's mean.
        estimator: the gradient estimator and bound (:mod:`vijax.estimators`): ``"auto"``
            (reparameterised ELBO; score function with a baseline for discrete latents),
            ``"reparam"``, ``"stl"``, ``"iwae"``, ``"dreg"``, ``"renyi"``, ``"score"`` or a
            configured object (``vj.estimators.Renyi(alpha=0.5)``). The choice is recorded
            in ``res.diagnostics.estimator`` and the bound in ``res.diagnostics.objective``.

    Returns:
        A :class:`vijax.FitResult`; ``res.losses`` has shape ``(steps,)``: the value being
        minimised (negative ELBO, or the negative bound of the estimator).

    Example:
        >>> import jax, numpyro.distributions as dist, vijax as vj
        >>> @vj.model(mu=vj.Latent())
        ... def m(z, y):
        ...     lp = dist.Normal(0, 10).log_prob(z["mu"])
        ...     return lp + dist.Normal(z["mu"], 1).log_prob(y).sum()
        >>> res = vj.fit(m, jax.numpy.ones(5), steps=300, key=jax.random.key(0))
        >>> res.losses.shape
        (300,)
    """
    if not isinstance(model, Model):
        raise TypeError(f"model must be a vj.Model (use @vj.model, vj.Model or vj.from_numpyro), "
                        f"got {type(model)}")
    steps = _check_int("steps", steps)
    estimator = resolve_estimator(estimator)
    if num_particles is None:
        num_particles = 8 if model.target.discrete else 1
    num_particles = _check_int("num_particles", num_particles)
    chunk_size = _check_int("chunk_size", chunk_size)
    if not isinstance(average, int | float) or not 0.0 <= average < 1.0:
        raise ValueError(f"average must be a fraction in [0, 1), got {average!r}")
    spec = resolve_spec(guide)
    if optimizer is None:
        optimizer = default_optimizer(getattr(spec, "default_learning_rate", 0.05))
    if not (hasattr(optimizer, "init") and hasattr(optimizer, "update")):
        raise TypeError(f"optimizer must be an optax.GradientTransformation, got {optimizer!r}")
    dtype = _resolve_dtype(dtype)
    target = model.target
    data = check_data(model.data if data is None else data, dtype)
    chunk_len = min(chunk_size, steps)
    _check_log_joint(model, target, data, dtype)
    guide_fns, objective, runner, start, restart = _pipeline(target, spec, num_particles,
                                                             optimizer, chunk_len, estimator)
    key = _check_key(key)
    if init_from is not None:
        if init is not None:
            raise ValueError("give init or init_from, not both")
        _check_source(target, init_from, dtype)
        fixed, mask = _source_loc(init_from).astype(dtype), np.ones((target.full_dim,), bool)
        fixed[target.dim:] = np.round(fixed[target.dim:])  # discrete: nearest index
    else:
        fixed, mask = _fixed_init(target, init, dtype)
    data = jax.tree_util.tree_map(jnp.asarray, data)

    t0 = time.perf_counter()
    tries, theta0, ok, state, k_loop = start(key, data, fixed, mask)
    _check_init_found(target, tries, theta0, ok, mask)
    if init_from is not None:
        warm = _warm_params(spec, state.params, init_from)
        if warm is not None:
            state = restart(warm)
    total = jnp.asarray(steps, jnp.int32)
    avg_start = jnp.asarray(steps - math.floor(average * steps), jnp.int32)
    chunks = []
    for _ in range(math.ceil(steps / chunk_len)):
        state, losses = runner(state, data, k_loop, total, avg_start)
        chunks.append(losses)
    losses = np.concatenate([np.asarray(c) for c in chunks])[:steps]
    wall = time.perf_counter() - t0

    n_skipped = int(state.n_nonfinite)
    if n_skipped == steps:
        raise FloatingPointError(f"every one of the {steps} steps had a non-finite loss or "
                                 "gradient; nothing was fitted. Check the model's log joint "
                                 f"near the initial point {target.describe(theta0)}")
    _check_finite_params(target, guide_fns, state, steps)
    diagnostics = Diagnostics(n_steps=steps, n_nonfinite_skipped=n_skipped, wall_time=wall,
                              objective=objective.name, num_particles=num_particles,
                              estimator=objective.estimator,
                              final_loss=_final_loss(losses))
    return FitResult(model=model, guide=guide_fns, guide_spec=spec, params=state.avg_params,
                     last_params=state.params, opt_state=state.opt_state, losses=losses,
                     diagnostics=diagnostics, optimizer=optimizer, init_point=theta0)
