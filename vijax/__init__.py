"""vijax: variational inference for JAX.

Models are pure functions of a dict of latent values; guides are built automatically; the
ELBO is optimised by any Optax optimizer inside one compiled loop.
"""

from vijax import datasets, estimators, gp, guides, metrics, nets, nn
from vijax.cavi import CAVIResult, GMMPrior, cavi_gmm, default_gmm_prior, gmm_model
from vijax.checks import prepare_data
from vijax.convergence import Convergence, ConvergenceWarning
from vijax.fit import fit
from vijax.io import load
from vijax.local_result import importance_log_likelihood, local_posterior
from vijax.many import FitManyResult, fit_many
from vijax.memory import DeviceMemoryError
from vijax.model import Latent, Model, ModelWarning, Param, model
from vijax.net_params import NetParam, net_param
from vijax.numpyro_adapter import from_numpyro
from vijax.optim import default_optimizer
from vijax.placement import Placement
from vijax.precondition import Precondition
from vijax.predictive import predictive
from vijax.psis import PSISResult, psis
from vijax.result import Diagnostics, FitResult, Summary
from vijax.trust import NonFiniteError
from vijax.version import __version__

__all__ = [
    "Latent", "Param", "Model", "model", "from_numpyro", "fit", "FitResult", "Diagnostics",
    "Summary", "Placement", "DeviceMemoryError",
    "guides", "estimators", "datasets", "default_optimizer", "prepare_data", "psis", "PSISResult",
    "load", "predictive", "Convergence", "ConvergenceWarning", "Precondition", "NonFiniteError",
    "fit_many", "FitManyResult", "nets", "nn", "metrics", "gp", "importance_log_likelihood",
    "local_posterior",
    "net_param", "NetParam",
    "cavi_gmm", "CAVIResult", "GMMPrior", "default_gmm_prior", "gmm_model",
    "ModelWarning", "__version__",
]
