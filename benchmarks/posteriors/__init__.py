"""The 16 posteriordb reference posteriors of the development set, each as a vijax model and a
NumPyro model of the same density, with its reference summaries and the accuracy score.

>>> from benchmarks.posteriors import POSTERIORS, load, score
>>> post = load("nes2000-nes")                       # a Posterior
>>> len(POSTERIORS), post.model.target.dim
(16, 10)

Fit with ``vj.fit(post.model, post.data, ...)`` and judge with
``score(post, result.sample(key, 10_000))``; NumPyro autoguides take ``post.numpyro_model``
and ``post.data``. ``python -m benchmarks.posteriors.check`` validates every model against
its reference draws. Data: ``benchmarks/data/posteriordb/`` (posteriordb, BSD 3-Clause).
"""

from benchmarks.posteriors.base import DATA_DIR, Posterior
from benchmarks.posteriors.registry import POSTERIORS, load
from benchmarks.posteriors.score import THRESHOLDS, VERDICTS, score

__all__ = ["Posterior", "POSTERIORS", "load", "score", "THRESHOLDS", "VERDICTS", "DATA_DIR"]
