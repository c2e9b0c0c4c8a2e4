"""The :class:`Posterior` record and the helpers every posterior constructor shares.

Each posterior's files live in ``benchmarks/data/posteriordb/<name>/`` (copied from the
project's development set; BSD 3-Clause, see ``LICENSE-posteriordb.md`` there).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

import vijax as vj

__all__ = ["Posterior", "DATA_DIR", "read_raw", "read_reference", "reference_draws", "as_data",
           "identity_maps", "elementwise", "stack"]

DATA_DIR = Path(__file__).resolve().parents[1] / "data" / "posteriordb"


@dataclasses.dataclass(frozen=True, eq=False)  # eq=False: hashable by identity
class Posterior:
    """One posteriordb posterior, written as a vijax model and a NumPyro model.

    Attributes:
        name: posteriordb posterior name (= folder name under ``DATA_DIR``).
        model: the vijax model; latents are constrained, with numpyro supports. The data are
            bound to it (``model.data is data``).
        data: dict of ``jnp`` arrays in JAX's default float type at construction time
            (float64 under ``jax_enable_x64``), the input of both ``model`` and
            ``numpyro_model``.
        numpyro_model: ``numpyro_model(data)``: one sample site per vijax latent, of the same
            name, shape and support (so NumPyro's autoguides see the same unconstrained space),
            whose log density differs from ``model``'s log joint by a constant.
        derived: constrained draws ``{latent: (n, *shape)}`` -> ``{reference name: (n,)}``,
            keyed exactly like ``reference`` (derived quantities computed as the posteriordb
            README says, e.g. ``theta = mu + tau * theta_trans``).
        reference: ``reference.json["parameters"]``: name -> ``{"mean", "sd", "q05", "q50",
            "q95", "n_draws", "ess_bulk", "ess_tail", "rhat", "mcse_mean"}``.
        heavy: reference names scored by quantile errors rather than mean and sd (their sd is a
            noisy summary of a heavy tail).
        to_latents: the inverse of ``derived`` on the sampled parameters: reference-keyed
            ``(n,)`` arrays -> constrained latents ``{latent: (n, *shape)}`` (numpy, float64),
            e.g. to map ``draws.npz`` or the reference means into the model's space.
    """

    name: str
    model: vj.Model
    data: dict[str, Any]
    numpyro_model: Callable[[dict], None]
    derived: Callable[[Mapping[str, Any]], dict[str, np.ndarray]]
    reference: dict[str, dict[str, float]]
    heavy: tuple[str, ...]
    to_latents: Callable[[Mapping[str, Any]], dict[str, np.ndarray]]

    @property
    def reference_names(self) -> tuple[str, ...]:
        """The reported parameters in posteriordb order."""
        return tuple(self.reference)

    def reference_draws(self) -> dict[str, np.ndarray]:
        """The 1,000 thinned reference draws (``draws.npz``), reference-keyed, float64."""
        return reference_draws(self.name)

    def reference_means(self) -> dict[str, np.ndarray]:
        """The reference means as reference-keyed ``(1,)`` arrays (input for ``to_latents``)."""
        return {k: np.array([v["mean"]]) for k, v in self.reference.items()}


def read_raw(name: str) -> dict[str, Any]:
    """The posteriordb dataset ``data.json`` of posterior ``name`` (lists and numbers)."""
    return json.loads((DATA_DIR / name / "data.json").read_text())


def read_reference(name: str) -> dict[str, dict[str, float]]:
    """``reference.json["parameters"]`` in posteriordb's parameter order."""
    ref = json.loads((DATA_DIR / name / "reference.json").read_text())
    return {p: ref["parameters"][p] for p in ref["parameter_order"]}


def reference_draws(name: str) -> dict[str, np.ndarray]:
    """``draws.npz``: 1,000 reference draws per reported parameter, as float64 ``(1000,)``."""
    with np.load(DATA_DIR / name / "draws.npz") as f:
        return {k: np.asarray(f[k], np.float64) for k in f.files}


def as_data(**arrays: Any) -> dict[str, Any]:
    """Numbers and lists -> ``jnp`` arrays of JAX's default float type (float64 under x64)."""
    return {k: jnp.asarray(np.asarray(v, np.float64), jnp.result_type(float))
            for k, v in arrays.items()}


def elementwise(name: str, draws: Any) -> dict[str, np.ndarray]:
    """``(n,)`` or ``(n, k)`` draws of one latent -> ``{"name": ...}`` or
    ``{"name[1]": (n,), ..., "name[k]": (n,)}`` (1-based, as Stan)."""
    draws = np.asarray(draws)
    if draws.ndim == 1:
        return {name: draws}
    return {f"{name}[{i + 1}]": draws[:, i] for i in range(draws.shape[1])}


def stack(ref: Mapping[str, Any], name: str, k: int) -> np.ndarray:
    """Inverse of :func:`elementwise` for a vector: ``"name[1..k]"`` -> ``(n, k)`` float64."""
    return np.stack([np.asarray(ref[f"{name}[{i + 1}]"], np.float64) for i in range(k)], -1)


def identity_maps(shapes: Mapping[str, tuple[int, ...]]):
    """``derived`` and ``to_latents`` for a posterior whose reported parameters are its latents,
    element by element (scalars keep their name, vectors are ``name[i]``).

    Args:
        shapes: latent name -> shape, ``()`` or ``(k,)``.

    Returns:
        ``(derived, to_latents)``.
    """

    def derived(draws):
        out = {}
        for name in shapes:
            out.update(elementwise(name, draws[name]))
        return out

    def to_latents(ref):
        return {name: (np.asarray(ref[name], np.float64) if shape == ()
                       else stack(ref, name, shape[0]))
                for name, shape in shapes.items()}

    return derived, to_latents
