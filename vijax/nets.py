"""Neural networks as two pure functions: the adapter that amortized guides (encoders) and
model decoders code against, whatever library built the network.

A :class:`Network` is ``init(key, x_example) -> params`` and ``apply(params, x) -> output`` for
ONE observation (unbatched); callers ``vmap`` ``apply`` over a batch. ``params`` is a pytree of
arrays that ``jit``, ``grad`` and optax take as is. :func:`as_network` wraps an
``(init, apply)`` pair, a ``flax.linen`` module, a ``flax.nnx`` module or an ``equinox``
module; :func:`mlp` builds the automatic encoder from ``equinox.nn`` layers.

flax is optional: it is imported only when the object given is a flax module.
"""

import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp

__all__ = ["Network", "as_network", "auto_hidden", "flatten_input", "mlp", "output_shape"]


class Network(NamedTuple):
    """A network as pure functions of one observation.

    Attributes:
        init: ``(key, x_example) -> params``, a pytree of arrays; ``x_example`` is one
            observation (an unbatched array or pytree).
        apply: ``(params, x) -> output`` for one observation.
        name: what the network is, for messages: ``"mlp(784-352-352-40)"``,
            ``"flax.linen:Encoder"``, ``"flax.nnx:Encoder"``, ``"equinox:MLP"``, ``"function"``.
    """

    init: Callable
    apply: Callable
    name: str


_ACCEPTED = ("a vijax.nets.Network; an (init, apply) pair of functions, init(key, x_example) "
             "-> params and apply(params, x) -> output; a flax.linen.Module instance; a "
             "flax.nnx.Module instance; an equinox.Module instance")


def _from_package(obj: Any, package: str) -> bool:
    """Whether a class in ``type(obj)``'s MRO comes from ``package``: user subclasses of
    ``flax.linen.Module`` live in the user's module, so ``type(obj).__module__`` alone misses
    them; and nothing of ``package`` is imported when it answers no."""
    return any(c.__module__.split(".")[0] == package for c in type(obj).__mro__)


def as_network(obj: Any, *, where: str = "encoder") -> Network:
    """The :class:`Network` of a user's network object.

    Accepted:

    - a :class:`Network`, returned as is;
    - an ``(init, apply)`` pair: ``init(key, x_example) -> params``, ``apply(params, x)``. A
      parameter-free feature map ``f`` is ``(lambda key, x: (), lambda p, x: f(x))``;
    - a ``flax.linen.Module`` instance: params are the variables dict ``module.init(key, x)``
      (``{"params": ...}``); other collections (``batch_stats``) are refused at ``init``;
    - a ``flax.nnx.Module`` instance: it carries its own initialisation (its ``rngs`` were used
      when it was built), so ``init`` ignores ``key`` and ``x_example`` and returns the
      module's ``nnx.Param`` values as a plain nested dict (``nnx.to_pure_dict``); ``apply``
      rebuilds the module with ``nnx.merge`` inside the pure function. Modules holding other
      state (``BatchStat``, dropout ``Rngs``) are refused;
    - an ``equinox.Module`` instance: likewise already initialised, so ``init`` returns its
      inexact arrays (``eqx.partition(module, eqx.is_inexact_array)``) and ignores ``key``;
      ``apply`` is ``eqx.combine(params, static)(x)``. Stateful layers are refused.

    A bare function ``f(x)`` is refused (its parameters, if any, would be invisible to the
    optimiser); the error shows the recipe above.

    Args:
        obj: the network.
        where: the role of the network in the model (``"encoder"``, ``"decoder"``), named in
            errors.

    Returns:
        A :class:`Network`.

    Example:
        >>> import equinox as eqx, jax, jax.numpy as jnp
        >>> net = as_network(eqx.nn.Linear(3, 2, key=jax.random.key(0)))
        >>> params = net.init(jax.random.key(1), jnp.zeros(3))
        >>> net.name, net.apply(params, jnp.zeros(3)).shape
        ('equinox:Linear', (2,))
    """
    if isinstance(obj, Network):
        return obj
    if isinstance(obj, type):
        raise TypeError(f"{where}: got the class {obj.__qualname__}; pass an instance of it. "
                        f"Accepted: {_ACCEPTED}.")
    if (isinstance(obj, tuple) and len(obj) == 2 and all(callable(f) for f in obj)):
        return Network(obj[0], obj[1], "function")
    if _from_package(obj, "flax"):
        import flax.linen
        import flax.nnx
        if isinstance(obj, flax.linen.Module):
            return _linen(obj, where)
        if isinstance(obj, flax.nnx.Module):
            return _nnx(obj, where)
    if _from_package(obj, "equinox") and isinstance(obj, eqx.Module):
        return _equinox(obj, where)
    if callable(obj):
        raise TypeError(
            f"{where}: a bare function {getattr(obj, '__name__', type(obj).__name__)!r} is not "
            "a network: its parameters, if any, are invisible to the optimiser. Pass "
            "(init, apply) instead; for a parameter-free feature map f: "
            "(lambda key, x: (), lambda params, x: f(x)).")
    raise TypeError(f"{where}: cannot use a {type(obj).__module__}.{type(obj).__qualname__} "
                    f"as a network. Accepted: {_ACCEPTED}.")


def _linen(module, where: str) -> Network:
    def init(key, x_example):
        variables = module.init(key, x_example)
        extra = sorted(set(variables) - {"params"})
        if extra:
            raise ValueError(
                f"{where}: the flax.linen module {type(module).__name__} has mutable "
                f"collections {extra} besides 'params' (batch norm statistics?); they are not "
                "supported: an encoder sees one observation at a time. Use layer norm instead.")
        return variables

    return Network(init, module.apply, f"flax.linen:{type(module).__name__}")


def _nnx(module, where: str) -> Network:
    from flax import nnx

    graphdef, state, rest = nnx.split(module, nnx.Param, ...)
    if jax.tree.leaves(rest):
        kinds = sorted({type(v).__name__ for v in
                        jax.tree.leaves(rest, is_leaf=lambda v: isinstance(v, nnx.Variable))})
        raise ValueError(
            f"{where}: the flax.nnx module {type(module).__name__} holds state other than "
            f"nnx.Param ({', '.join(kinds)}): not supported, since apply is a pure function of "
            "the parameters and one observation (no batch statistics, no dropout keys).")
    params = nnx.to_pure_dict(state)
    # the structure to rebuild the Param state from a plain dict, values as shapes only
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), state)

    def init(key, x_example):
        del key, x_example  # the module was initialised with its own rngs
        return params

    def apply(params, x):
        state = jax.tree.map(lambda a: a, abstract)  # fresh Variables: nothing shared mutates
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(graphdef, state)(x)

    return Network(init, apply, f"flax.nnx:{type(module).__name__}")


def _equinox(module, where: str) -> Network:
    # eqx.nn.Sequential is a StatefulLayer that says whether any of its layers is stateful
    is_stateful = lambda n: isinstance(n, eqx.nn.StatefulLayer) and n.is_stateful()
    if any(is_stateful(n) for n in jax.tree.leaves(module, is_leaf=is_stateful)):
        raise ValueError(f"{where}: the equinox module {type(module).__name__} has stateful "
                         "layers (eqx.nn.BatchNorm?): not supported, since apply is a pure "
                         "function of the parameters and one observation.")
    params, static = eqx.partition(module, eqx.is_inexact_array)

    def init(key, x_example):
        del key, x_example  # the module was initialised with its own key
        return params

    def apply(params, x):
        return eqx.combine(params, static)(x)

    return Network(init, apply, f"equinox:{type(module).__name__}")


_ACTIVATIONS = {"softplus": jax.nn.softplus, "relu": jax.nn.relu, "tanh": jnp.tanh,
                "elu": jax.nn.elu}


def _size(value, what: str, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{where}: {what} must be a positive int, got {value!r}")
    return value


def auto_hidden(in_size: int, out_size: int) -> tuple[int, ...]:
    """The hidden widths of the automatic encoder: two layers of width ``w``,

        w = clip(32 * round(2 * sqrt(in_size * out_size) / 32), 32, 512),

    twice the geometric mean of the input and output sizes (a funnel from one to the other),
    in multiples of 32, at least 32 and at most 512.

    Examples: sklearn digits (64 pixels) to a Gaussian over 8 latents (loc and scale, 16
    outputs): ``2 * sqrt(64 * 16) = 64``, hidden ``(64, 64)``. MNIST (784 pixels) to 20
    latents (40 outputs): ``2 * sqrt(784 * 40) = 354``, hidden ``(352, 352)`` (NumPyro's VAE
    example uses one layer of 400).

    Args:
        in_size: the size of one flattened observation.
        out_size: the number of outputs (the local family's parameters).

    Returns:
        The widths, a tuple of two ints.

    Example:
        >>> auto_hidden(64, 16), auto_hidden(784, 40), auto_hidden(2, 4)
        ((64, 64), (352, 352), (32, 32))
    """
    _size(in_size, "in_size", "auto_hidden")
    _size(out_size, "out_size", "auto_hidden")
    width = 32 * round(2 * math.sqrt(in_size * out_size) / 32)
    return (min(max(width, 32), 512),) * 2


def mlp(in_size: int, out_size: int, hidden: Sequence[int] | None = None, *,
        activation: str | Callable = "softplus", final_zero: bool = False,
        where: str = "encoder") -> Network:
    """A multi-layer perceptron ``(in_size,) -> (out_size,)`` of ``equinox.nn.Linear`` layers
    (``eqx.nn.MLP`` needs equal widths; this takes any): ``activation`` after each hidden
    layer, none after the last.

    Parameters take the floating dtype of the ``x_example`` given to ``init`` (float32 for
    integer or boolean data, float64 under x64 with float64 data). ``final_zero=True`` zeros
    the last layer's weight and bias, so that a fresh network outputs zeros for every input
    (an encoder then starts from one fixed local distribution).

    Args:
        in_size: the size of one observation, already flattened (:func:`flatten_input`).
        out_size: the size of the output.
        hidden: the hidden widths; ``None`` for :func:`auto_hidden`, ``()`` for a linear map.
        activation: ``"softplus"``, ``"relu"``, ``"tanh"``, ``"elu"`` or a function.
        final_zero: zero the last layer.
        where: the network's role, named in errors.

    Returns:
        A :class:`Network` named ``"mlp(in-hidden...-out)"``; params a pytree of arrays.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> net = mlp(5, 3, (7,))
        >>> params = net.init(jax.random.key(0), jnp.zeros(5))
        >>> net.name, net.apply(params, jnp.ones(5)).shape
        ('mlp(5-7-3)', (3,))
    """
    _size(in_size, "in_size", where)
    _size(out_size, "out_size", where)
    hidden = auto_hidden(in_size, out_size) if hidden is None else tuple(hidden)
    for width in hidden:
        _size(width, "each hidden width", where)
    if isinstance(activation, str):
        if activation not in _ACTIVATIONS:
            raise ValueError(f"{where}: unknown activation {activation!r}; known: "
                             f"{sorted(_ACTIVATIONS)} (or pass a function)")
        activation = _ACTIVATIONS[activation]
    elif not callable(activation):
        raise TypeError(f"{where}: activation must be a name or a function, got "
                        f"{type(activation).__name__}")
    sizes = (in_size, *hidden, out_size)

    def build(key, dtype):
        keys = jax.random.split(key, len(sizes) - 1)
        layers = []
        for i, k in enumerate(keys):
            if i:
                layers.append(eqx.nn.Lambda(activation))
            layers.append(eqx.nn.Linear(sizes[i], sizes[i + 1], dtype=dtype, key=k))
        net = eqx.nn.Sequential(layers)
        if final_zero:
            last = net.layers[-1]
            net = eqx.tree_at(lambda n: (n.layers[-1].weight, n.layers[-1].bias), net,
                              (jnp.zeros_like(last.weight), jnp.zeros_like(last.bias)))
        return net

    # the static half (layer sizes, activations), without computing any weights
    template = eqx.filter_eval_shape(build, jax.random.key(0), jnp.float32)
    _, static = eqx.partition(template, lambda v: isinstance(v, jax.ShapeDtypeStruct))

    def init(key, x_example):
        x_example = jnp.asarray(x_example)
        if x_example.shape != (in_size,):
            raise ValueError(f"{where}: {name} takes one flattened observation of shape "
                             f"({in_size},), got shape {x_example.shape}")
        dtype = (x_example.dtype if jnp.issubdtype(x_example.dtype, jnp.inexact)
                 else jax.dtypes.canonicalize_dtype(float))
        return eqx.partition(build(key, dtype), eqx.is_inexact_array)[0]

    def apply(params, x):
        return eqx.combine(params, static)(x)

    name = f"mlp({'-'.join(map(str, sizes))})"
    return Network(init, apply, name)


def output_shape(net: Network, params: Any, x_example: Any) -> tuple[int, ...]:
    """The shape of ``net.apply(params, x_example)``, traced with ``jax.eval_shape`` (nothing
    computed).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> net = mlp(4, 6, (8,))
        >>> output_shape(net, net.init(jax.random.key(0), jnp.zeros(4)), jnp.zeros(4))
        (6,)
    """
    out = jax.eval_shape(net.apply, params, x_example)
    if not isinstance(out, jax.ShapeDtypeStruct):
        raise TypeError(f"{net.name} returns a {type(out).__name__}, not one array")
    return tuple(out.shape)


def flatten_input(x: Any) -> jax.Array:
    """One observation, an array or a pytree of them, as a 1-D float vector: every leaf
    ravelled and concatenated in tree order (dict keys sorted). Integer and boolean leaves are
    cast to the floating dtype of the others (the default float if there are none).

    Example:
        >>> import jax.numpy as jnp
        >>> flatten_input({"counts": jnp.array([1, 2]), "pixels": jnp.ones((2, 2))})
        Array([1., 2., 1., 1., 1., 1.], dtype=float32)
    """
    leaves = [jnp.asarray(leaf) for leaf in jax.tree.leaves(x)]
    if not leaves:
        raise ValueError("flatten_input: the observation has no array leaves")
    floats = [leaf.dtype for leaf in leaves if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    dtype = jnp.result_type(*floats) if floats else jax.dtypes.canonicalize_dtype(float)
    return jnp.concatenate([jnp.ravel(leaf).astype(dtype) for leaf in leaves])
