"""Sparse variational Gaussian processes (Titsias 2009; Hensman et al. 2013, 2015) with
natural gradients (Salimbeni et al. 2018).

Example (a fit: :mod:`vijax.gp.fit`):
    >>> import vijax.gp as gp
    >>> model = gp.SVGP(gp.RBF() + gp.White(0.01), "bernoulli", inducing=50)
    >>> model.likelihood
    Bernoulli(link='logit')
"""

from vijax.gp.exact import collapsed_bound, exact_log_marginal, exact_posterior
from vijax.gp.fit import FitInfo, SVGPResult, fit_svgp
from vijax.gp.kernels import (
    RBF,
    Constant,
    Kernel,
    Linear,
    Matern12,
    Matern32,
    Matern52,
    Periodic,
    Product,
    RationalQuadratic,
    Sum,
    White,
)
from vijax.gp.likelihoods import (
    Bernoulli,
    Gaussian,
    Likelihood,
    Poisson,
    StudentT,
    get_likelihood,
)
from vijax.gp.natgrad import natgrad_step
from vijax.gp.svgp import SVGP, SVGPParams, elbo, init_params, kl_divergence, marginals, predict_f

__all__ = [
    "SVGP", "SVGPParams", "SVGPResult", "FitInfo", "fit_svgp", "init_params", "elbo",
    "marginals", "predict_f", "kl_divergence", "natgrad_step",
    "collapsed_bound", "exact_log_marginal", "exact_posterior",
    "Kernel", "RBF", "Matern12", "Matern32", "Matern52", "Periodic", "RationalQuadratic",
    "White", "Constant", "Linear", "Sum", "Product",
    "Likelihood", "Gaussian", "Bernoulli", "Poisson", "StudentT", "get_likelihood",
]
