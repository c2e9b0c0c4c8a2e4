"""Bayesian neural-network layers (``vj.nn``): declared in a model beside its latents, each
with its own prior and mean-field posterior, trained inside ``vj.fit`` by the local
reparameterization trick, flipout or weight sampling; variational dropout (Gaussian with
learned rates, and sparse with log-alpha pruning).

Example:
    >>> import jax, jax.numpy as jnp, numpyro.distributions as dist, vijax as vj
    >>> model = vj.Model(
    ...     log_prior=lambda z: 0.0,
    ...     log_likelihood=lambda z, d: dist.Normal(z["l1"](d["x"])[:, 0], 0.1).log_prob(
    ...         d["y"]),
    ...     latents={"l1": vj.nn.Dense(2, 1)})
    >>> sorted(model.layers)
    ['l1']
"""

from vijax.nn.layers import (
           Conv2D,
           Dense,
           DropoutDense,
           Layer,
           SparseDense,
           kingma_neg_kl,
           molchanov_neg_kl,
)
from vijax.nn.priors import Normal, ScaleMixture, gaussian_kl
from vijax.nn.results import apply_mean, mean_values, posterior, sparsity
from vijax.nn.value import LayerValue

__all__ = ["Dense", "Conv2D", "DropoutDense", "SparseDense", "Layer", "Normal", "ScaleMixture",
           "LayerValue", "posterior", "sparsity", "mean_values", "apply_mean", "gaussian_kl",
           "kingma_neg_kl", "molchanov_neg_kl"]
