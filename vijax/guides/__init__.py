"""Guide families: each a small module behind the :class:`Guide` interface."""

from vijax.guides.amortized import Amortized, LocalTable
from vijax.guides.base import Guide, softplus, softplus_inverse
from vijax.guides.coupling import RealNVP, Spline
from vijax.guides.delta import Delta
from vijax.guides.fullrank import FullRank
from vijax.guides.iaf import IAF
from vijax.guides.ladder import Ladder
from vijax.guides.laplace import Laplace
from vijax.guides.lowrank import LowRank
from vijax.guides.meanfield import MeanField
from vijax.guides.resolve import GUIDE_NAMES, build_guide, resolve_spec
from vijax.guides.structured import Structured
from vijax.guides.whitened import Whitened, whitening

__all__ = ["Guide", "Amortized", "LocalTable", "Delta", "MeanField", "LowRank", "FullRank",
           "IAF", "Spline", "RealNVP",
           "Laplace", "Ladder", "Whitened", "whitening",
           "Structured", "GUIDE_NAMES",
           "build_guide", "resolve_spec", "softplus", "softplus_inverse"]
