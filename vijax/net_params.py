"""A network held in the model's parameters: a decoder (or any network in the likelihood)
whose weights are one :class:`vijax.Param` vector.

``dec = vj.net_param(network, x_example, key=0)`` initialises the network (any of
:func:`vijax.nets.as_network`'s kinds: ``(init, apply)``, flax linen or nnx, equinox), ravels
its weights into one flat vector and gives ``dec.param`` (a ``vj.Param((n,), init=...)`` to
declare in the model) and ``dec(flat, x)``: the network applied to one observation with the
weights unravelled from ``flat`` (``dec.batched(flat, xs)`` vmaps it over a leading axis).
Adam and the other elementwise optimisers treat the flat vector exactly as the pytree.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from vijax.model import Param
from vijax.nets import as_network

__all__ = ["NetParam", "net_param"]


class NetParam:
    """A network whose weights are the model parameter ``param`` (see :func:`net_param`).

    Attributes:
        param: ``vj.Param((n,), init=the initial weights)``.
        size: ``n``, the number of weights.
        name: the network's name.
    """

    def __init__(self, net, flat0: np.ndarray, unravel):
        self.net = net
        self.param = Param((flat0.size,), init=flat0)
        self.size = int(flat0.size)
        self.name = net.name
        self._unravel = unravel

    def weights(self, flat: jax.Array) -> Any:
        """The network's parameter pytree from the flat vector ``(n,)``."""
        if jnp.shape(flat) != (self.size,):
            raise ValueError(f"network {self.name}: its weights are a vector of {self.size}, "
                             f"got shape {jnp.shape(flat)}")
        return self._unravel(flat)

    def __call__(self, flat: jax.Array, x: Any) -> Any:
        """The network on ONE observation ``x`` with weights ``flat``."""
        return self.net.apply(self.weights(flat), x)

    def batched(self, flat: jax.Array, xs: Any) -> Any:
        """The network on each row of ``xs`` (a leading batch axis), weights shared."""
        params = self.weights(flat)
        return jax.vmap(lambda x: self.net.apply(params, x))(xs)

    def __repr__(self) -> str:
        return f"NetParam({self.name}, {self.size} weights)"


def net_param(network: Any, x_example: Any, *, key: Any = 0, dtype: Any = None) -> NetParam:
    """Hold ``network``'s weights in one model parameter.

    Args:
        network: an ``(init, apply)`` pair, a flax (linen or nnx) module, an equinox module or
            a :class:`vijax.nets.Network`.
        x_example: one input observation (unbatched), for the initialisation.
        key: PRNG key or int seed of the initial weights.
        dtype: the weights' float type (default: ``x_example``'s, else float32).

    Returns:
        A :class:`NetParam`: declare ``params={"dec": dec.param}`` and call
        ``dec(z["dec"], code)`` (one row) or ``dec.batched(z["dec"], codes)`` in the model.

    Example:
        >>> import jax, jax.numpy as jnp, vijax as vj
        >>> net = vj.nets.mlp(2, 3, (4,))
        >>> dec = vj.net_param(net, jnp.zeros(2))
        >>> dec.param.shape, dec.batched(dec.param.init, jnp.ones((5, 2))).shape
        ((27,), (5, 3))
    """
    net = as_network(network, where="decoder")
    key = jax.random.key(key) if isinstance(key, int) else key
    x = jax.tree_util.tree_map(jnp.asarray, x_example)
    params = net.init(key, x)
    leaves = jax.tree_util.tree_leaves(params)
    if not leaves:
        raise ValueError(f"network {net.name} has no weights: nothing to hold in a parameter")
    if dtype is None:
        floats = [a.dtype for a in jax.tree_util.tree_leaves(x)
                  if jnp.issubdtype(a.dtype, jnp.floating)]
        dtype = floats[0] if floats else jnp.float32
    bad = [a.dtype for a in leaves if not jnp.issubdtype(a.dtype, jnp.floating)]
    if bad:
        raise TypeError(f"network {net.name} has non-float weights ({bad[0]}); a model "
                        "parameter holds floats only")
    params = jax.tree_util.tree_map(lambda a: a.astype(dtype), params)
    flat, unravel = ravel_pytree(params)
    return NetParam(net, np.asarray(flat), unravel)
