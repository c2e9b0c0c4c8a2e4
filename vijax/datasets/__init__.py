"""Small datasets bundled with vijax, for examples, tests and documentation.

The data live as JSON files next to this module and are read with :mod:`importlib.resources`,
so they work from an installed wheel as well as from a source checkout. No pickle anywhere.
"""

from __future__ import annotations

import json
from importlib import resources

import numpy as np

__all__ = ["load_eight_schools"]


def _read_json(filename: str) -> dict:
    return json.loads(resources.files(__name__).joinpath(filename).read_text(encoding="utf-8"))


def load_eight_schools() -> dict[str, np.ndarray]:
    """The eight schools data (Rubin 1981; Gelman et al., *Bayesian Data Analysis*, 5.5).

    Estimated effects of SAT coaching programmes in eight schools, with their known standard
    errors. The classic hierarchical model is ``y[j] ~ Normal(theta[j], sigma[j])``,
    ``theta[j] ~ Normal(mu, tau)``.

    Returns:
        dict with
          - ``"y"``: ``(8,)`` float64, estimated treatment effect per school;
          - ``"sigma"``: ``(8,)`` float64, standard error of each estimate (all > 0).

    Example:
        >>> from vijax.datasets import load_eight_schools
        >>> data = load_eight_schools()
        >>> data["y"].shape, data["sigma"].shape
        ((8,), (8,))
        >>> data["y"].tolist()
        [28.0, 8.0, -3.0, 7.0, -1.0, 1.0, 18.0, 12.0]
    """
    raw = _read_json("eight_schools.json")
    return {
        "y": np.asarray(raw["y"], dtype=np.float64),
        "sigma": np.asarray(raw["sigma"], dtype=np.float64),
    }
