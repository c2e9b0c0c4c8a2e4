"""``vj.fit``: check the arguments, then dispatch: several fits (Laplace, the guide ladder, a
family fitted in preconditioned coordinates: :mod:`vijax.stages`) or one family fitted by one
compiled loop (:mod:`vijax.driver`), which composes target -> guide -> objective -> loop ->
result."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import optax

from vijax.checks import DEFAULT_CHUNK, DEFAULT_STEPS, check_fit_options
from vijax.driver import family_defaults, fit_single
from vijax.driver_local import fit_local
from vijax.estimators import resolve_estimator
from vijax.guides.ladder import Ladder
from vijax.guides.laplace import Laplace
from vijax.guides.resolve import resolve_spec
from vijax.model import Model
from vijax.placement import resolve_placement
from vijax.precondition import preconditionable, resolve_precondition
from vijax.result import FitResult
from vijax.stages import fit_staged
from vijax.start import _check_source

__all__ = ["fit"]

LOCAL_AVERAGE = 0.1
"""The default tail-averaging window of a fit with local latents (see ``fit``'s ``average``)."""


def fit(model: Model, data: Any = None, *, guide: Any = None, steps: int = DEFAULT_STEPS,
        optimizer: optax.GradientTransformation | None = None, key: Any = None,
        num_particles: int | None = None, init: Mapping[str, Any] | None = None,
        average: float | None = None, chunk_size: int = DEFAULT_CHUNK, dtype: Any = None,
        init_from: FitResult | None = None, estimator: Any = None,
        convergence: Any = "auto", max_consecutive_nonfinite: int = 100,
        progress: bool | None = None, resume: FitResult | None = None,
        psis_draws: int | None = None, precondition: Any = "auto",
        batch_size: int | None = None, shuffle: str = "epoch", stream: bool = False,
        kl_weight: Any = None, mesh: Any = None) -> FitResult:
    """Fit a variational approximation q to the posterior of ``model`` given ``data``.

    Maximises the ELBO ``E_q[log p(x, z)] - E_q[log q(z)]`` (or the estimator's bound) over
    the guide's parameters in the unconstrained space of the latents, with Monte Carlo
    gradients and any Optax optimizer, ``chunk_size`` steps per compiled ``lax.scan`` call,
    until the stopping rule says the iterate average has stopped moving in units of the
    posterior's scale (:mod:`vijax.convergence`) or ``steps`` steps have run. By default
    (``precondition="auto"``) the family is fitted in coordinates whitened by the curvature
    of the log density at its Newton-polished mode (:mod:`vijax.precondition`). The returned
    parameters are an average of late iterates (Dhaka et al. 2020): over the last two blocks
    of the stopping rule when it stopped the fit, else over the last ``average`` fraction of
    steps. Every fit ends with a PSIS check of q against the model
    (``res.diagnostics.k_hat``, ``k_hat_reading``), and warns
    (:class:`vijax.ConvergenceWarning`) when it did not converge or PSIS reads q as
    unreliable.

    Args:
        model: a :class:`vijax.Model` (``vj.model`` decorator, ``vj.Model``, ``vj.from_numpyro``).
        data: data pytree passed to the model; ``None`` uses the data bound to the model.
        guide: ``"auto"`` (default), ``"delta"``, ``"meanfield"``, ``"lowrank"``,
            ``"fullrank"``,
            ``"iaf"``, ``"spline"``, ``"realnvp"``, ``"laplace"`` (MAP, then the Gaussian
            with the inverse Hessian at the mode: :mod:`vijax.guides.laplace`), ``"auto"``
            (the ladder delta -> laplace -> meanfield -> lowrank -> fullrank -> iaf, stopping
            at the first rung with PSIS k-hat < 0.7: :mod:`vijax.guides.ladder`), a
            configured object
            (``vj.guides.LowRank(rank=5)``), or a dict from latent name (or tuple of names)
            to either, for a structured guide of independent blocks.
        steps: the maximum number of optimisation steps (>= 1, default 10,000); exactly
            this many with ``convergence=None``.
        optimizer: an Optax ``GradientTransformation``; default :func:`default_optimizer` with
            the guide's ``default_learning_rate`` (0.05 Gaussian families, 0.01 IAF, 0.003
            coupling flows).
        key: a JAX PRNG key (or int seed); ``None`` means ``jax.random.key(0)``.
        num_particles: Monte Carlo draws per gradient estimate (>= 1), vectorised; ``None``:
            1, or 8 for models with discrete latents (so that their score-function gradient
            gets a leave-one-out baseline).
        init: optional dict of *constrained* initial values for some or all latents; the rest
            start uniform in (-2, 2) in unconstrained space, redrawn until the log joint is finite.
        average: fraction of final steps whose iterates are averaged when the fit runs to
            ``steps``, in [0, 1); 0 returns the last iterate. ``None``: 0.5, or 0.1 for a
            model with local latents (encoder and decoder networks still improve late in a
            fit, and a long window lags behind them: 1.3 nats of test log-likelihood on a
            VAE after 2,000 steps with 0.5).
        chunk_size: steps per compiled call (>= 1); the host looks at the loop (stopping,
            progress) once per chunk.
        dtype: float32 or float64 (needs ``jax_enable_x64``); default JAX's default float.
        init_from: a fitted result of the same model to warm-start from: the same guide
            continues from its parameters; a flow whose base is the fitted family starts as
            exactly that fit (its layers start as the identity); any other guide is centred on
            the fitted guide's mean.
        estimator: the gradient estimator and bound (:mod:`vijax.estimators`): ``"auto"``
            (default: reparameterised ELBO; score function with a baseline for discrete
            latents), ``"reparam"``, ``"stl"``, ``"iwae"``, ``"dreg"``, ``"renyi"``,
            ``"score"`` or a configured object (``vj.estimators.Renyi(alpha=0.5)``). The
            choice is recorded in ``res.diagnostics.estimator``, the bound in
            ``res.diagnostics.objective``.
        convergence: ``"auto"`` (``vj.Convergence()``), a configured ``vj.Convergence(...)``,
            or ``None`` to run exactly ``steps`` steps.
        max_consecutive_nonfinite: a step whose loss, gradient or updated parameters are not
            finite is skipped (parameters and optimizer state unchanged, counted); after this
            many consecutive skipped steps the fit raises :class:`NonFiniteError`, which names
            the step and the latents involved and carries the last finite result.
        progress: show a progress bar (step, loss, steps/s; updated once per chunk);
            ``None``: only when stderr is a terminal.
        resume: a result to continue: its guide, estimator, optimizer (and state), particles
            and PRNG stream are reused and ``steps`` more steps run; with ``convergence=None``,
            ``k`` then ``m`` resumed steps give bitwise the parameters and optimizer state of
            ``k + m`` uninterrupted steps (on CPU). ``guide``, ``estimator``, ``optimizer``,
            ``num_particles``, ``init``, ``init_from`` must be left unset.
        psis_draws: draws of q for the PSIS diagnostic at the end (0 turns it off);
            ``None``: ``200 * dim`` between 2,000 and 10,000.
        precondition: ``"auto"`` (default, ``vj.Precondition()``): fit the family in
            coordinates whitened by the curvature at the mode (the Laplace approximation, or
            a mean-field fit where the Laplace approximation does not describe the
            posterior), recorded in ``res.diagnostics.preconditioning``; ``None`` fits in
            the model's own coordinates. Not applied to structured dicts, discrete latents,
            more than ``max_dim`` dimensions, ``init_from`` or ``resume``.

        batch_size: minibatch SVI for a factorised model (``log_prior`` plus a per-observation
            ``log_likelihood``; the leading axis of every data leaf is the observation
            axis): each step sees ``batch_size`` of the N observations, drawn inside the
            compiled loop, and their log likelihood is scaled by exactly ``N / batch_size``
            (an unbiased estimate of the full ELBO). The stopping rule accounts for the
            extra gradient noise (:class:`vijax.Convergence` ``noise_ratio``); the PSIS
            check evaluates the full data in row blocks. ``None``: every step sees all the
            data (or, for a NumPyro model with a subsampling plate, the plate's
            ``subsample_size``).
        shuffle: ``"epoch"`` (default: every observation once per epoch, in an order
            reshuffled each epoch) or ``"randint"`` (uniform draws with replacement).
        stream: the data stays in host memory (numpy arrays, or ``np.load(path,
            mmap_mode="r")`` for data larger than memory): each chunk's batches are
            gathered on the host and shipped to the device while the previous chunk runs;
            the same rows as a device-resident fit, bitwise. Needs ``batch_size``.
        kl_weight: the weight on the prior-minus-entropy term of the ELBO (factorised
            models; single-sample ELBO estimators): a number, any ``step -> weight``
            schedule (``optax.linear_schedule(0.0, 1.0, 1000)`` for a warm-up), or
            ``"blundell"`` (Blundell et al. 2015's per-minibatch weights ``2^-i / (1 -
            2^-M)``, scaled so that an epoch averages to the ELBO). Recorded in
            ``res.diagnostics.data``.
        mesh: split the data's rows over the devices of a ``jax.sharding.Mesh`` (its axis
            ``"data"``, or its only axis) or a :class:`vijax.Placement` (a mesh and the axis
            to split over): each device holds ``N / devices`` rows and computes their
            likelihood, the sums are reduced across devices, and the guide's parameters and
            optimizer state are replicated (per-row tables of local latents are split with
            their rows). The same fit as on one device, up to the order of floating-point
            sums. Needs a factorised model; ``batch_size`` must be a multiple of the number
            of devices (the data are then padded), and a full-data fit needs N to be one.
            Across processes (``jax.distributed``, :mod:`vijax.launch`), every process calls
            ``fit`` with the same arguments and the full data (a memory map reads only the
            rows a process needs); the result is the same in every process. ``None``: one
            device.

    Models with learnable parameters (:class:`vijax.Param`) fit them jointly with the guide
    (``res.model_params``). Fits with parameters, minibatches, a stream, a KL weight or a mesh
    are single-family fits: ``guide="auto"`` means ``"fullrank"`` up to 100 latent dimensions
    and ``"meanfield"`` beyond, with no preconditioning.

    Returns:
        A :class:`vijax.FitResult`; ``res.losses`` has shape ``(n_steps,)`` (all steps run,
        including those of a resumed result): the value being minimised (negative ELBO, or
        the negative bound of the estimator).

    Raises:
        NonFiniteError: ``max_consecutive_nonfinite`` consecutive steps were not finite.

    Example:
        >>> import jax, numpyro.distributions as dist, vijax as vj
        >>> @vj.model(mu=vj.Latent())
        ... def m(z, y):
        ...     lp = dist.Normal(0, 10).log_prob(z["mu"])
        ...     return lp + dist.Normal(z["mu"], 1).log_prob(y).sum()
        >>> res = vj.fit(m, jax.numpy.ones(5), steps=300, convergence=None, progress=False)
        >>> res.losses.shape
        (300,)
    """
    psis_default = psis_draws is None
    placement = resolve_placement(mesh)
    if average is None:
        average = LOCAL_AVERAGE if isinstance(model, Model) and \
            model.target.locals is not None else 0.5
    steps, chunk_size, max_consecutive, psis_draws, rule = check_fit_options(
        model, steps, chunk_size, max_consecutive_nonfinite, psis_draws, average, progress,
        convergence)
    target = model.target
    if not target.has_locals and estimator is not None and getattr(
            resolve_estimator(estimator), "name", "") in ("rws", "wake_sleep"):
        raise ValueError(f"estimator {estimator!r} (wake-sleep) trains the guides of local "
                         "latents (vj.Latent(..., local=True)); this model has none: use "
                         "'reparam', 'iwae' or 'dreg'")
    if batch_size is None and resume is None:
        # a NumPyro model written for minibatch SVI carries its plate's subsample_size
        batch_size = getattr(model, "default_batch_size", None)
    if not isinstance(stream, bool):
        raise TypeError(f"stream must be True or False, got {stream!r}")
    fed = batch_size is not None or stream or kl_weight is not None or (
        resume is not None and resume.feed is not None)
    if fed and psis_default:
        psis_draws = None  # sized from N by the driver
    # one family, in the model's own coordinates
    single = fed or bool(target.params) or placement is not None
    feed_kw = dict(batch_size=batch_size, shuffle=shuffle, stream=stream, kl_weight=kl_weight,
                   placement=placement)
    if resume is not None:
        given = [name for name, v in (("guide", guide), ("estimator", estimator),
                                      ("optimizer", optimizer), ("num_particles", num_particles),
                                      ("init", init), ("init_from", init_from))
                 if v is not None]
        given += [name for name, v in (("batch_size", batch_size), ("kl_weight", kl_weight))
                  if v is not None]
        if given:
            raise ValueError(f"resume continues the result's own fit: leave {given} unset")
        if not isinstance(resume, FitResult):
            raise TypeError(f"resume must be a vj.FitResult from vj.fit or vj.load, got "
                            f"{type(resume)}")
        if resume.state is None:
            raise ValueError(f"this result ({resume.guide.name}) has no loop state to "
                             "continue (a Laplace fit is not an optimisation run); refit it")
        _check_source(target, resume, jax.tree_util.tree_leaves(resume.params)[0].dtype,
                      what="resume")
        spec, estimator, optimizer = resume.guide_spec, resume.estimator, resume.optimizer
        num_particles = resume.diagnostics.num_particles
        dtype = jax.tree_util.tree_leaves(resume.params)[0].dtype
    if target.locals is not None:  # local latents or Bayesian layers: vijax.driver_local
        if init_from is not None:
            raise ValueError("init_from is not available for a model with local latents; "
                             "use init= for the global latents, or resume= to continue")
        return fit_local(model, data, spec if resume is not None else guide,
                         lambda g: _single_spec(resolve_spec("auto" if g is None else g),
                                                target, True),
                         steps=steps, optimizer=optimizer, key=key,
                         num_particles=num_particles, init=init, average=average,
                         chunk_size=chunk_size, dtype=dtype, estimator=estimator, rule=rule,
                         max_consecutive=max_consecutive, progress=progress,
                         psis_draws=None if psis_default else psis_draws, resume=resume,
                         **feed_kw)
    if resume is None:
        spec = resolve_spec("auto" if guide is None else guide)
        precondition = resolve_precondition(precondition)
        if single:
            spec = _single_spec(spec, target, fed or placement is not None)
            precondition = None
        kw = dict(steps=steps, optimizer=optimizer, key=key, num_particles=num_particles,
                  init=init, average=average, chunk_size=chunk_size, dtype=dtype,
                  init_from=init_from, estimator=estimator, convergence=convergence,
                  max_consecutive_nonfinite=max_consecutive_nonfinite, progress=progress,
                  psis_draws=psis_draws, precondition=precondition)
        if isinstance(spec, Laplace | Ladder) or (
                precondition is not None and init_from is None and preconditionable(
                    spec, target, precondition)):  # several fits: see vijax.stages
            return fit_staged(spec, model, data, kw)
        estimator, num_particles, optimizer = family_defaults(spec, target, estimator,
                                                              num_particles, optimizer)
    return fit_single(model, data, spec, steps=steps, optimizer=optimizer, key=key,
                      num_particles=num_particles, init=init, average=average,
                      chunk_size=chunk_size, dtype=dtype, init_from=init_from,
                      estimator=estimator, rule=rule, max_consecutive=max_consecutive,
                      progress=progress, psis_draws=psis_draws, resume=resume, **feed_kw)


def _single_spec(spec, target, fed: bool):
    """The family of a fit with model parameters or a data feed: the ladder resolves to
    full-rank (<= 100 dimensions) or mean-field; Laplace is refused."""
    why = "minibatches, a stream, a KL weight or a mesh" if fed else \
        "model parameters (vj.Param)"
    if isinstance(spec, Ladder):
        return resolve_spec("fullrank" if target.dim <= 100 else "meanfield")
    if isinstance(spec, Laplace):
        raise ValueError(f"guide='laplace' is not available for a fit with {why}: the "
                         "Laplace approximation needs the full-data mode of fixed model; use "
                         "guide='fullrank'")
    return spec
