"""Pickle-free checkpoints of fit results: ``res.save(path)`` / ``vj.load(path, model)``.

The public entry points; the format is described in :mod:`vijax.checkpoint`, the container in
:mod:`vijax.checkpoint.archive`, saving in :mod:`vijax.checkpoint.write` and loading in
:mod:`vijax.checkpoint.read`.
"""

from vijax.checkpoint.archive import FORMAT, FORMAT_VERSION
from vijax.checkpoint.read import load
from vijax.checkpoint.write import save

__all__ = ["save", "load", "FORMAT", "FORMAT_VERSION"]
