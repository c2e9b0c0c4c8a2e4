"""Turn what users pass as ``guide=`` (a name, a configured object, a dict) into a Guide."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from vijax.guides.base import Guide
from vijax.guides.coupling import RealNVP, Spline
from vijax.guides.delta import Delta
from vijax.guides.discrete import with_discrete
from vijax.guides.fullrank import FullRank
from vijax.guides.iaf import IAF
from vijax.guides.ladder import Ladder
from vijax.guides.laplace import Laplace
from vijax.guides.lowrank import LowRank
from vijax.guides.meanfield import MeanField
from vijax.guides.structured import Structured

__all__ = ["GUIDE_NAMES", "resolve_spec", "build_guide"]

GUIDE_NAMES = {"delta": Delta, "meanfield": MeanField, "lowrank": LowRank,
               "fullrank": FullRank, "iaf": IAF, "spline": Spline, "realnvp": RealNVP,
               "laplace": Laplace}


def _family(spec: Any, where: str):
    if isinstance(spec, type):
        raise TypeError(f"invalid guide {spec.__name__}{where}: that is the class, not a "
                        f"configured guide; pass vj.guides.{spec.__name__}() (with its "
                        "options as arguments) or a name such as 'meanfield'")
    if isinstance(spec, str):
        try:
            return GUIDE_NAMES[spec]()
        except KeyError:
            raise ValueError(f"unknown guide {spec!r}{where}; valid names are "
                             f"{sorted(GUIDE_NAMES)}, a configured object such as "
                             "vj.guides.LowRank(rank=5), or a dict from latent name to "
                             "guide") from None
    if hasattr(spec, "build") and not isinstance(spec, Structured):
        return spec
    raise TypeError(f"invalid guide {spec!r}{where}: expected one of {sorted(GUIDE_NAMES)}, a "
                    "configured guide object, or (at the top level) a dict")


def resolve_spec(guide: Any):
    """A hashable guide specification (compile-cache key) from a name, object or dict
    (``"auto"``: the :class:`Ladder`)."""
    if isinstance(guide, str) and guide == "auto":
        return Ladder()
    if isinstance(guide, Ladder):
        return guide
    if isinstance(guide, Structured):
        return guide
    if isinstance(guide, Mapping):
        if not guide:
            raise ValueError("a structured guide dict must not be empty")
        blocks = []
        for key, spec in guide.items():
            names = (key,) if isinstance(key, str) else tuple(key)
            if not names or not all(isinstance(n, str) for n in names):
                raise ValueError(f"structured guide keys must be latent names or tuples of "
                                 f"them, got {key!r}")
            family = _family(spec, f" for latent(s) {list(names)}")
            if isinstance(family, Laplace | Ladder):
                raise ValueError(f"guide {family.name!r} applies to the whole model, not to a "
                                 f"block (latent(s) {list(names)})")
            blocks.append((names, family))
        return Structured(*blocks)
    return _family(guide, "")


def build_guide(spec, target) -> Guide:
    """Build the Guide functions for ``target`` from a resolved spec (the spec covers the
    continuous latents; discrete ones get independent categoricals, see
    :mod:`vijax.guides.discrete`)."""
    if isinstance(spec, Structured):
        named = {n for names, _ in spec.blocks for n in names} & set(target.discrete_names)
        if named:
            raise ValueError(f"discrete latent(s) {sorted(named)} get a categorical guide "
                             "automatically; leave them out of the guide dict")
        guide = spec.build_for(target)
    else:
        guide = spec.build(target.dim, target.names)
    return with_discrete(guide, target) if target.discrete else guide
