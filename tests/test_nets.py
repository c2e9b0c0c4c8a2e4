"""vijax.nets: one small network (5 -> 7 -> 3, softplus) with the same weights as a hand
(init, apply) pair, a flax.linen module, a flax.nnx module and an equinox module; their
outputs and gradients agree, and each runs under jit, vmap and an optax step. Then the
automatic MLP and the errors."""

import pathlib
import subprocess
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from tests.conftest import precision
from vijax.nets import Network, as_network, auto_hidden, flatten_input, mlp, output_shape

IN, HIDDEN, OUT = 5, 7, 3
_rng = np.random.default_rng(0)
# the weights in the (in, out) convention: x @ W + b
W1, B1 = _rng.normal(size=(IN, HIDDEN)), _rng.normal(size=HIDDEN)
W2, B2 = _rng.normal(size=(HIDDEN, OUT)), _rng.normal(size=OUT)
TRUE = tuple(jnp.asarray(a, jnp.float32) for a in (W1, B1, W2, B2))
X = jnp.asarray(_rng.normal(size=(4, IN)), jnp.float32)


def _hand():
    def apply(p, x):
        return jax.nn.softplus(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]

    net = as_network((lambda key, x: dict(zip(("w1", "b1", "w2", "b2"), TRUE, strict=True)),
                      apply))
    return net, net.init(jax.random.key(0), X[0]), lambda p: (p["w1"], p["b1"], p["w2"], p["b2"])


def _linen():
    nn = pytest.importorskip("flax.linen")

    class Encoder(nn.Module):
        @nn.compact
        def __call__(self, x):
            hidden = jax.nn.softplus(nn.Dense(HIDDEN)(x))  # Dense_0, then Dense_1
            return nn.Dense(OUT)(hidden)

    net = as_network(Encoder())
    initial = net.init(jax.random.key(0), X[0])
    w1, b1, w2, b2 = TRUE
    params = {"params": {"Dense_0": {"kernel": w1, "bias": b1},
                         "Dense_1": {"kernel": w2, "bias": b2}}}
    assert jax.tree.structure(params) == jax.tree.structure(initial)
    d = lambda p, i: p["params"][f"Dense_{i}"]
    return net, params, lambda p: (d(p, 0)["kernel"], d(p, 0)["bias"],
                                   d(p, 1)["kernel"], d(p, 1)["bias"])


def _nnx():
    nnx = pytest.importorskip("flax.nnx")

    class Encoder(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(IN, HIDDEN, rngs=rngs)
            self.l2 = nnx.Linear(HIDDEN, OUT, rngs=rngs)

        def __call__(self, x):
            return self.l2(jax.nn.softplus(self.l1(x)))

    module = Encoder(nnx.Rngs(0))
    w1, b1, w2, b2 = TRUE
    module.l1.kernel[...], module.l1.bias[...] = w1, b1
    module.l2.kernel[...], module.l2.bias[...] = w2, b2
    net = as_network(module)
    return net, net.init(jax.random.key(0), X[0]), lambda p: (
        p["l1"]["kernel"], p["l1"]["bias"], p["l2"]["kernel"], p["l2"]["bias"])


def _equinox():
    w1, b1, w2, b2 = TRUE
    module = eqx.nn.Sequential([eqx.nn.Linear(IN, HIDDEN, key=jax.random.key(1)),
                                eqx.nn.Lambda(jax.nn.softplus),
                                eqx.nn.Linear(HIDDEN, OUT, key=jax.random.key(2))])
    module = eqx.tree_at(lambda m: (m.layers[0].weight, m.layers[0].bias, m.layers[2].weight,
                                    m.layers[2].bias), module, (w1.T, b1, w2.T, b2))
    net = as_network(module)
    return net, net.init(jax.random.key(0), X[0]), lambda p: (
        p.layers[0].weight.T, p.layers[0].bias, p.layers[2].weight.T, p.layers[2].bias)


KINDS = {"hand": _hand, "linen": _linen, "nnx": _nnx, "equinox": _equinox}


def _loss(net, params):
    return jnp.sum(jnp.sin(jax.vmap(net.apply, (None, 0))(params, X)))


def _reference():
    net, params, _ = _hand()
    return net.apply(params, X[0]), jax.grad(lambda p: _loss(net, p))(params)


@pytest.mark.parametrize("kind", KINDS)
def test_same_weights_same_outputs_and_gradients(kind):
    out_ref, grad_ref = _reference()
    net, params, canonical = KINDS[kind]()
    assert isinstance(net, Network)
    np.testing.assert_allclose(net.apply(params, X[0]), out_ref, atol=1e-6)
    grad = jax.grad(lambda p: _loss(net, p))(params)
    assert jax.tree.structure(grad) == jax.tree.structure(params)
    for g, r in zip(canonical(grad), (grad_ref["w1"], grad_ref["b1"], grad_ref["w2"],
                                      grad_ref["b2"]), strict=True):
        np.testing.assert_allclose(g, r, atol=1e-5)


@pytest.mark.parametrize("kind", KINDS)
def test_jit_vmap_and_an_optax_step(kind):
    net, params, _ = KINDS[kind]()
    assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(params))
    batched = jax.jit(jax.vmap(net.apply, (None, 0)))(params, X)
    rows = jnp.stack([net.apply(params, x) for x in X])
    np.testing.assert_allclose(batched, rows, atol=1e-6)
    assert output_shape(net, params, X[0]) == (OUT,)

    opt = optax.adam(1e-2)

    @jax.jit
    def step(params, opt_state):
        loss, grad = jax.value_and_grad(lambda p: _loss(net, p))(params)
        updates, opt_state = opt.update(grad, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    new, opt_state, loss0 = step(params, opt.init(params))
    _, _, loss1 = step(new, opt_state)
    assert jax.tree.structure(new) == jax.tree.structure(params)
    assert loss1 < loss0
    # apply is pure: the original parameters still give the original output
    np.testing.assert_allclose(net.apply(params, X[0]), _reference()[0], atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_mlp_shape_and_dtype(dtype):
    with precision(dtype) as np_dtype:
        net = mlp(IN, OUT, (HIDDEN, 4), activation="tanh")
        params = net.init(jax.random.key(0), jnp.zeros(IN, np_dtype))
        assert net.name == "mlp(5-7-4-3)"
        assert {leaf.dtype for leaf in jax.tree.leaves(params)} == {np.dtype(np_dtype)}
        assert all(isinstance(leaf, jax.Array) for leaf in jax.tree.leaves(params))
        out = jax.jit(jax.vmap(net.apply, (None, 0)))(params, X.astype(np_dtype))
        assert out.shape == (len(X), OUT) and out.dtype == np_dtype
        # integer data: parameters in the default float
        ints = net.init(jax.random.key(0), jnp.zeros(IN, jnp.int32))
        assert {leaf.dtype for leaf in jax.tree.leaves(ints)} == {np.dtype(np_dtype)}


def test_mlp_final_zero_and_auto_hidden():
    net = mlp(IN, OUT, final_zero=True, activation=jax.nn.gelu)
    params = net.init(jax.random.key(0), X[0])
    np.testing.assert_array_equal(jax.vmap(net.apply, (None, 0))(params, X), 0.0)
    assert net.name == f"mlp({IN}-32-32-{OUT})"
    assert auto_hidden(64, 16) == (64, 64) and auto_hidden(784, 40) == (352, 352)
    assert auto_hidden(10_000, 400) == (512, 512)
    assert mlp(IN, OUT, ()).name == "mlp(5-3)"
    # two inits with different keys differ (the template's key is not reused)
    net = mlp(IN, OUT, (HIDDEN,))
    a, b = (net.init(jax.random.key(k), X[0]) for k in (0, 1))
    assert not np.allclose(a.layers[0].weight, b.layers[0].weight)


@pytest.mark.parametrize("args, kwargs, match", [
    ((0, 3), {}, "decoder: in_size must be a positive int"),
    ((5, 2.0), {}, "out_size must be a positive int"),
    ((5, 3, (7, 0)), {}, "each hidden width"),
    ((5, 3), {"activation": "swish"}, "unknown activation 'swish'.*softplus"),
])
def test_mlp_validation(args, kwargs, match):
    with pytest.raises(ValueError, match=match):
        mlp(*args, where="decoder", **kwargs)


def test_mlp_init_checks_the_observation_shape():
    with pytest.raises(ValueError, match=r"encoder: mlp\(5-7-3\).*shape \(5,\)"):
        mlp(IN, OUT, (HIDDEN,)).init(jax.random.key(0), jnp.zeros((2, IN)))


def test_errors():
    with pytest.raises(TypeError, match=r"encoder: a bare function 'sin'.*lambda key, x: \(\)"):
        as_network(jnp.sin)
    with pytest.raises(TypeError, match=r"decoder: cannot use a builtins.str.*flax.linen"):
        as_network("mlp", where="decoder")
    with pytest.raises(TypeError, match="got the class Linear; pass an instance"):
        as_network(eqx.nn.Linear)
    with pytest.raises(ValueError, match="stateful layers"):
        as_network(eqx.nn.Sequential([eqx.nn.Linear(2, 2, key=jax.random.key(0)),
                                      eqx.nn.BatchNorm(2, "batch", mode="batch")]))
    # a parameter-free feature map, wrapped as the message says
    net = as_network((lambda key, x: (), lambda p, x: jnp.sin(x)))
    assert net.name == "function" and net.init(jax.random.key(0), X[0]) == ()
    assert as_network(net) is net


def test_flax_modules_with_batch_statistics_are_refused():
    nn = pytest.importorskip("flax.linen")
    nnx = pytest.importorskip("flax.nnx")

    class Normed(nn.Module):
        @nn.compact
        def __call__(self, x):
            return nn.BatchNorm(use_running_average=False)(nn.Dense(3)(x))

    net = as_network(Normed())
    with pytest.raises(ValueError, match=r"encoder: .*Normed has mutable collections "
                                         r"\['batch_stats'\]"):
        net.init(jax.random.key(0), X[0])
    with pytest.raises(ValueError, match="holds state other than nnx.Param.*BatchStat"):
        as_network(nnx.BatchNorm(3, rngs=nnx.Rngs(0)))


def test_flatten_input():
    x = {"b": jnp.array([True, False]), "a": jnp.arange(3), "c": jnp.ones((2, 2))}
    flat = flatten_input(x)
    np.testing.assert_array_equal(flat, [0, 1, 2, 1, 0, 1, 1, 1, 1])
    assert flat.dtype == jnp.float32
    assert flatten_input(jnp.arange(4)).dtype == jnp.float32
    with pytest.raises(ValueError, match="no array leaves"):
        flatten_input({})


def test_works_without_flax():
    # flax is optional: with it unimportable, vijax.nets still imports and wraps equinox
    code = ("import sys; sys.modules['flax'] = None\n"
            "import equinox as eqx, jax, jax.numpy as jnp\n"
            "from vijax.nets import as_network, mlp\n"
            "net = as_network(eqx.nn.Linear(2, 3, key=jax.random.key(0)))\n"
            "assert net.apply(net.init(None, jnp.zeros(2)), jnp.zeros(2)).shape == (3,)\n"
            "assert 'flax' not in {m.split('.')[0] for m in sys.modules if sys.modules[m]}\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=pathlib.Path(__file__).parents[1])
