"""The registry: posteriordb name -> constructor of its :class:`Posterior` (built on demand)."""

from __future__ import annotations

from collections.abc import Callable

from benchmarks.posteriors import gp, hierarchical, mixtures, pk, regression, timeseries
from benchmarks.posteriors.base import Posterior

__all__ = ["POSTERIORS", "load"]

POSTERIORS: dict[str, Callable[[], Posterior]] = {
    "eight_schools-eight_schools_noncentered": hierarchical.eight_schools_noncentered,
    "eight_schools-eight_schools_centered": hierarchical.eight_schools_centered,
    "arK-arK": timeseries.ark,
    "garch-garch11": timeseries.garch11,
    "gp_pois_regr-gp_regr": gp.gp_regr,
    "gp_pois_regr-gp_pois_regr": gp.gp_pois_regr,
    "kidiq-kidscore_interaction": regression.kidscore_interaction,
    "earnings-earn_height": regression.earn_height,
    "earnings-logearn_interaction": regression.logearn_interaction,
    "mesquite-logmesquite_logvas": regression.logmesquite_logvas,
    "nes2000-nes": regression.nes,
    "sblri-blr": regression.blr,
    "low_dim_gauss_mix-low_dim_gauss_mix": mixtures.low_dim_gauss_mix,
    "hmm_example-hmm_example": mixtures.hmm_example,
    "kilpisjarvi_mod-kilpisjarvi": regression.kilpisjarvi,
    "one_comp_mm_elim_abs-one_comp_mm_elim_abs": pk.one_comp_mm_elim_abs,
}
"""All 16 posteriors of the development set, in the order of its ``index.md``."""


def load(name: str) -> Posterior:
    """Build posterior ``name`` (a fresh ``vj.Model``; data in JAX's current default float).

    Example:
        >>> post = load("sblri-blr")
        >>> sorted(post.model.latents), post.data["X"].shape
        (['beta', 'sigma'], (100, 5))
    """
    try:
        constructor = POSTERIORS[name]
    except KeyError:
        raise KeyError(f"unknown posterior {name!r}; known: {sorted(POSTERIORS)}") from None
    return constructor()
