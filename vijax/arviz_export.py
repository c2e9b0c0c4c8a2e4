"""Export a fit result to ArviZ (optional dependency).

Duck-typed on the result (it reads ``sample``, ``guide``, ``diagnostics`` and ``losses``), so
that ``FitResult.to_arviz`` can call it without an import cycle."""

from __future__ import annotations

import importlib.metadata
import inspect
import warnings
from typing import TYPE_CHECKING, Any

import jax
import numpy as np

if TYPE_CHECKING:
    from vijax.result import FitResult  # annotations only: vijax.result imports this module

__all__ = ["to_arviz"]

LOSS_GROUP = "loss_trace"
_NOT_IN_SCHEME = ".*not defined in the InferenceData scheme"


def _import_arviz():
    """``arviz`` and ``xarray``, or an ImportError that says how to install them."""
    try:
        with warnings.catch_warnings():
            # arviz 0.2x announces its 1.0 refactor on import (a FutureWarning, once a day);
            # vijax handles both APIs, so the notice is noise here
            warnings.filterwarnings("ignore", message=r"\s*ArviZ is undergoing",
                                    category=FutureWarning)
            import arviz
            import xarray
    except ImportError as err:
        raise ImportError('FitResult.to_arviz needs ArviZ: pip install "vijax[arviz]"') from err
    return arviz, xarray


def _attr_value(value: Any) -> Any:
    """A netCDF-friendly attribute: str, int or float (bools as 0/1); ``None`` is dropped."""
    if value is None:
        return None
    if isinstance(value, bool | np.bool_):
        return int(value)
    if isinstance(value, str | int | float | np.integer | np.floating):
        return value
    return str(value)


def _fit_attrs(res: FitResult) -> dict[str, Any]:
    """What the fit was: guide name, objective, estimator, final loss and the other diagnostics.

    Returns:
        dict from attribute name to a str, int or float.
    """
    attrs = {"inference_library": "vijax", "inference_library_version": _version(),
             "guide": res.guide.name}
    for name, value in res.diagnostics._asdict().items():
        value = _attr_value(value)
        if value is not None:
            attrs[name] = value
    return attrs


def _version() -> str:
    try:
        return importlib.metadata.version("vijax")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - source checkout
        return "unknown"


def _posterior_arrays(draws: dict[str, Any]
                      ) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    """Draws ``(n, *shape)`` as ArviZ posterior arrays ``(1, n, *shape)`` (one chain) and dims.

    Returns:
        ``(posterior, dims)``: ``posterior[name]`` has shape ``(1, n, *shape)``;
        ``dims[name]`` is ``[f"{name}_dim_0", ...]``, one per axis of the latent's shape.
    """
    posterior = {k: np.asarray(v)[None] for k, v in draws.items()}
    dims = {k: [f"{k}_dim_{i}" for i in range(v.ndim - 2)] for k, v in posterior.items()}
    return posterior, dims


def _is_legacy(from_dict: Any) -> bool:
    """ArviZ 0.x ``from_dict(posterior=..., ...)``; 1.x takes ``from_dict({group: {...}})``."""
    return "posterior" in inspect.signature(from_dict).parameters


def _build(from_dict: Any, xr: Any, posterior: dict[str, np.ndarray], dims: dict[str, list[str]],
          attrs: dict[str, Any], losses: np.ndarray) -> Any:
    """Assemble the ArviZ object with either API of ``from_dict`` (0.x or 1.x).

    Groups: ``posterior`` (``attrs`` attached, also to the root) and ``loss_trace`` (variable
    ``loss`` over dim ``step``).
    """
    loss = xr.Dataset({"loss": (("step",), np.asarray(losses))},
                      coords={"step": np.arange(len(losses))},
                      attrs={"objective": attrs.get("objective", "loss")})
    if _is_legacy(from_dict):  # InferenceData
        data = from_dict(posterior=posterior, dims=dims, attrs=dict(attrs),
                         posterior_attrs=dict(attrs))
        with warnings.catch_warnings():  # a group of its own: the trace is not per draw
            warnings.filterwarnings("ignore", message=_NOT_IN_SCHEME, category=UserWarning)
            data.add_groups({LOSS_GROUP: loss})
        return data
    data = from_dict({"posterior": posterior}, dims=dims,  # DataTree
                     attrs={"/": dict(attrs), "posterior": dict(attrs)})
    data[LOSS_GROUP] = xr.DataTree(loss)
    return data


def to_arviz(res: FitResult, key: jax.Array | None = None, n: int = 1000) -> Any:
    """Draws of q as ArviZ data: one chain of ``n`` independent draws.

    Groups:
        ``posterior``: every latent (continuous and discrete) as ``(chain=1, draw=n,
        *shape)``, its axes named ``<latent>_dim_0``, ... The group's (and the root's)
        attributes record the fit: ``guide``, ``objective``, ``estimator``, ``final_loss``,
        ``n_steps``, ``num_particles`` and the other fields of ``res.diagnostics``.
        ``loss_trace``: the variable ``loss`` ``(step,)``, ``res.losses`` (the objective
        named in its ``objective`` attribute); not per draw, so not in ``sample_stats``.

    The draws are independent, so MCMC diagnostics (R-hat, ESS) say nothing about the fit:
    use e.g. ``az.summary(data, kind="stats")``; ``res.diagnostics.k_hat`` is the PSIS check.

    Args:
        res: a fitted :class:`vijax.FitResult`.
        key: PRNG key for the draws; default ``jax.random.key(0)`` (deterministic), the
            draws being ``res.sample(key, n)``.
        n: number of draws (>= 1).

    Returns:
        ``arviz.InferenceData`` with ArviZ 0.x, an ``xarray.DataTree`` with ArviZ 1.x.

    Raises:
        ImportError: ArviZ is not installed (``pip install "vijax[arviz]"``).

    Example:
        >>> data = res.to_arviz(n=500)  # doctest: +SKIP
        >>> data.posterior["theta"].dims  # doctest: +SKIP
        ('chain', 'draw', 'theta_dim_0')
    """
    if not all(hasattr(res, a) for a in ("sample", "guide", "diagnostics", "losses")):
        raise TypeError(f"res must be a vj.FitResult, got {type(res)}")
    az, xr = _import_arviz()
    draws = res.sample(jax.random.key(0) if key is None else key, n)
    posterior, dims = _posterior_arrays(draws)
    return _build(az.from_dict, xr, posterior, dims, _fit_attrs(res), res.losses)
