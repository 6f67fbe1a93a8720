"""The bf16 recipe as the ecosystem writes it, and convs in the form JAX's transpose rules emit.

``compute_dtype="bfloat16", activation_dtype="bfloat16"``: activations and errors stored
in bf16, bf16 matmul operands, float32 master weights, weight gradients and loss.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_leaves_close, jaxpr_equations, lowered_ops, to_f64

import jaxbp
from jaxbp import layers, models, network
from jaxbp.check.suite import random_network, random_tokens

BF16 = {"compute_dtype": "bfloat16", "activation_dtype": "bfloat16"}
MATMULS = ("dot_general", "conv_general_dilated")


def _flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(a) for a in jax.tree.leaves(to_f64(tree))])


def _data(net, rng, batch=8):
    x = rng.standard_normal((batch, *net.input_shape)).astype(np.float32)
    if net.loss == "softmax_cross_entropy":
        return x, rng.integers(0, net.n_out, batch)
    if net.loss == "sigmoid_cross_entropy":
        return x, (rng.random((batch, net.n_out)) < 0.5).astype(np.float32)
    return x, rng.standard_normal((batch, net.n_out)).astype(np.float32)


def _cnn(**recipe):
    return jaxbp.Network((layers.Conv2D(8, 3, activation="relu"), layers.MaxPool(2),
                          layers.Conv2D(8, 3, 2, "VALID", "gelu"), layers.Flatten(),
                          layers.LayerNorm(),
                          layers.Residual((layers.Dense(8, "relu"), layers.Dense(8))),
                          layers.Dense(10)), (8, 8, 3), **recipe)


# Random families: networks with every layer type (suite cases) and MLPs over activations
# and losses. Case 12 of the suite is ill-conditioned (a LayerNorm over 2 features):
# both gradients are ~60% off the truth there, so it is left to the float32 tests.
CASES = [("network", i) for i in (0, 8, 10, 13)] + [
    ("mlp", (act, loss)) for act, loss in (("relu", "softmax_cross_entropy"),
                                           ("tanh", "sigmoid_cross_entropy"))]


def _case(kind, spec):
    if kind == "network":
        return random_network(spec, "float32")[0]
    act, loss = spec
    return jaxbp.MLP((12, 32, 32, 5), act, "identity", loss)


@pytest.mark.parametrize("kind, spec", CASES)
def test_bf16_recipe_is_as_accurate_as_jax_grad_of_the_same_recipe(kind, spec):
    """Both gradients against the float64 truth at the same float32 params: measured over
    the suite's networks 0.2-5% (normwise), manual no further off than jax.grad in every
    case. Asserted: manual <= 1.1 x jax.grad's error + 2e-3 (bf16 rounding differs
    between two orders of the same sums), and manual vs jax.grad within 3e-2."""
    plain = _case(kind, spec)
    recipe = dataclasses.replace(plain, **BF16)
    params = recipe.init(jax.random.key(7))
    x, y = _data(recipe, np.random.default_rng(7))
    grads = jaxbp.backprop(recipe, params, x, y)
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype("float32")}
    manual, autodiff = _flat(grads), _flat(jaxbp.value_and_autodiff(recipe, params, x, y)[1])
    with jax.enable_x64(True):
        net64 = dataclasses.replace(plain, dtype="float64")
        params64 = jax.tree.map(lambda p: jnp.asarray(np.asarray(p, np.float64)), params)
        y64 = y if y.dtype.kind == "i" else y.astype(np.float64)
        truth = _flat(jaxbp.backprop(net64, params64, x.astype(np.float64), y64))

    def error(g):
        return np.linalg.norm(g - truth) / np.linalg.norm(truth)

    assert error(manual) <= 1.1 * error(autodiff) + 2e-3, (error(manual), error(autodiff))
    assert np.linalg.norm(manual - autodiff) / np.linalg.norm(autodiff) <= 3e-2


def test_bf16_recipe_stores_activations_in_bf16_and_keeps_params_in_float32():
    net = _cnn(**BF16)
    assert all(getattr(layer, "activation_dtype", "bfloat16") == "bfloat16"
               for layer in (*net.layers, *net.layers[5].layers))
    params = net.init(jax.random.key(0))
    x, y = _data(net, np.random.default_rng(0))
    out, caches = network.forward(net, params, jnp.asarray(x))
    assert out.dtype == jnp.float32  # the loss is computed in the params' dtype
    conv_cache, dense_cache = caches[0], caches[-1]
    assert {a.dtype for a in (*conv_cache, *dense_cache)} == {jnp.dtype("bfloat16")}
    state = jaxbp.TrainState.create(params, optax.adam(1e-3))
    state, metrics = jaxbp.make_train_step(net, optax.adam(1e-3))(state, x, y)
    assert {p.dtype for p in jax.tree.leaves((state.params, state.opt_state))
            if jnp.issubdtype(p.dtype, jnp.floating)} == {jnp.dtype("float32")}
    assert np.isfinite(float(metrics["loss"]))


def test_operands_recipe_keeps_float32_activations():
    """compute_dtype alone is today's recipe: bf16 operands, float32 everything else."""
    net = _cnn(compute_dtype="bfloat16")
    params = net.init(jax.random.key(0))
    _, caches = network.forward(net, params, jnp.ones((2, 8, 8, 3)))
    assert {a.dtype for a in caches[0]} == {jnp.dtype("float32")}


@pytest.mark.parametrize("net", [_cnn(**BF16), jaxbp.MLP((16, 64, 64, 10), "relu", **BF16)],
                         ids=["cnn", "mlp"])
def test_no_float32_matmul_in_the_bf16_recipe_step(net):
    """Every dot_general and conv_general_dilated of the manual train step (forward, input
    errors, weight gradients) takes bf16 operands. Read from the step's jaxpr: the CPU
    backend itself upcasts bf16 products to float32 when it compiles them."""
    opt = optax.sgd(0.1)
    params = net.init(jax.random.key(0))
    x, y = _data(net, np.random.default_rng(0))
    step = jaxbp.make_train_step(net, opt, donate=False)
    eqns = [e for name in MATMULS
            for e in jaxpr_equations(step, jaxbp.TrainState.create(params, opt), x, y,
                                     primitive=name)]
    assert len(eqns) >= 3 * sum(isinstance(l, layers.Dense | layers.Conv2D)
                                for l in network.as_network(net).layers) - 1
    wide = [(e.primitive.name, [str(v.aval.dtype) for v in e.invars]) for e in eqns
            if any(v.aval.dtype != jnp.bfloat16 for v in e.invars)]
    assert not wide, wide


def _matmul_kinds(fn, *args):
    """fn's matmuls lowered for a GPU as a sorted list of (op, operand types in either
    order, result element type): what the kernel a GPU library picks depends on."""
    return sorted(str((name, sorted(operands), result.rsplit("x", 1)[-1].rstrip(">")))
                  for name, _, operands, result
                  in lowered_ops(fn, *args, platform="cuda", ops=("dot_general", "convolution")))


@pytest.mark.parametrize("net", [_cnn(**BF16), jaxbp.MLP((16, 64, 64, 10), "relu", **BF16)],
                         ids=["cnn", "mlp"])
def test_bf16_recipe_runs_the_matmuls_jax_grad_of_the_same_recipe_runs(net):
    """The manual gradient's dot_generals and convolutions are jax.grad's, operand for
    operand and dtype for dtype: weight gradients too give bf16 outputs (float32
    accumulation rounded once), then float32 gradients. (On an H200, bf16 convs with
    float32 outputs made the manual CNN step 1.2-1.3x jax.grad's.)"""
    params = net.init(jax.random.key(0))
    x, y = _data(net, np.random.default_rng(0))
    manual = _matmul_kinds(functools.partial(jaxbp.backprop, net), params, x, y)
    autodiff = _matmul_kinds(jax.grad(network.as_network(net).cost), params, x, y)
    assert manual == autodiff
    assert all(not kind.endswith("'f32')") for kind in manual), manual


CHANNELS_LAST = "dim_numbers = [b, 0, 1, f]x[0, 1, i, o]->[b, 0, 1, f]"


def _conv_calls(fn, *args, platform):
    """The convolutions of fn lowered for ``platform``: operand and result types and every
    attribute cuDNN's choice depends on (dimension numbers, window, group counts)."""
    return sorted(map(str, lowered_ops(fn, *args, platform=platform, ops=("convolution",))))


def _strided_conv_net(kernel, stride, padding):
    return jaxbp.Network((layers.Conv2D(3, kernel, stride, padding, "relu"),
                          layers.Conv2D(4, kernel, stride, padding, "tanh"),
                          layers.Flatten(), layers.Dense(3)), (13, 14, 2))


@pytest.mark.parametrize("stride, padding", list(itertools.product((1, 2), ("SAME", "VALID"))))
def test_conv_backward_is_the_formulation_jax_grad_emits(stride, padding):
    """Lowered for a GPU, the manual step's convolutions (forward, input error, weight
    gradient) are the calls jax.grad of the same net makes: same shapes, dimension
    numbers, paddings, dilations and group counts, for kernels 1-5 (square and not, even
    and odd). Lowered for a CPU, every one is NHWC x HWIO -> NHWC (transposed operands:
    XLA:CPU runs the transpose rule's layouts with a naive emitter inside a loop)."""
    for kernel in ((1, 1), (2, 2), (3, 3), (5, 5), (2, 5)):
        net = _strided_conv_net(kernel, stride, padding)
        args = net.init(jax.random.key(0)), jnp.ones((2, 13, 14, 2)), jnp.zeros((2,), jnp.int32)
        manual = functools.partial(jaxbp.backprop, net)
        on_gpu = _conv_calls(manual, *args, platform="cuda")
        assert len(on_gpu) == 5, on_gpu  # 2 forward, 2 weight gradients, 1 input error
        assert on_gpu == _conv_calls(jax.grad(net.cost), *args, platform="cuda"), kernel
        on_cpu = _conv_calls(manual, *args, platform="cpu")
        assert len(on_cpu) == 5 and all(CHANNELS_LAST in call for call in on_cpu), on_cpu


def test_either_conv_backward_form_gives_jax_grad_s_gradient(monkeypatch):
    """The CPU's form (run by every gradient test here) and the accelerators' (the
    transpose rule's layouts, forced on the CPU) both give jax.grad's gradient in
    float64: kernels 1-5, square and not, strides 1 and 2 with SAME and VALID."""
    forced = []

    def accelerator_form(*args, default, **_):
        forced.append(default)
        return default(*args)

    convs = [[((5, 2), 2, "SAME"), ((3, 3), 1, "VALID"), ((1, 1), 2, "VALID")],
             [((4, 4), 1, "SAME"), ((2, 5), 2, "VALID"), ((2, 2), 2, "SAME")]]
    with jax.enable_x64(True):
        for i, chain in enumerate(convs):
            net = jaxbp.Network((*(layers.Conv2D(3, *conv, "tanh") for conv in chain),
                                 layers.Flatten(), layers.Dense(3)), (13, 14, 2), dtype="float64")
            rng = np.random.default_rng(i)
            params = to_f64(net.init(jax.random.key(i)))
            x, y = rng.standard_normal((3, 13, 14, 2)), rng.integers(0, 3, 3)
            truth = jax.grad(net.cost)(params, x, y)
            for form in ("cpu", "accelerator"):
                with monkeypatch.context() as patch:
                    if form == "accelerator":
                        patch.setattr(jax.lax, "platform_dependent", accelerator_form)
                    jax.clear_caches()
                    manual = jaxbp.backprop(net, params, x, y)
                # 3 weight gradients and 2 input errors, each in the accelerators' form
                assert len(forced) == (5 if form == "accelerator" else 0), (form, forced)
                forced.clear()
                assert_leaves_close(manual, truth, 1e-12, err_msg=f"{form} {chain}")
    jax.clear_caches()


def test_recipe_fields_are_checked_and_named():
    with pytest.raises(ValueError, match=r"Dense activation_dtype must be None or one of "
                                         r"\['float16', 'bfloat16', 'float32', 'float64'\], "
                                         r"got 'int8'"):
        layers.Dense(3, activation_dtype="int8")
    with pytest.raises(ValueError, match="Conv2D compute_dtype must be None"):
        layers.Conv2D(3, compute_dtype="bf17")
    with pytest.raises(ValueError, match="Network activation_dtype must be None"):
        jaxbp.Network((layers.Dense(3),), (4,), activation_dtype=3)
    with pytest.raises(ValueError, match="activation_dtype must be one of"):
        jaxbp.MLP((4, 3), activation_dtype="int8")
    # a layer's own setting wins over the network-wide default
    net = jaxbp.Network((layers.Dense(3, activation_dtype="float32"), layers.Dense(2)), (4,),
                        activation_dtype="bfloat16")
    assert [l.activation_dtype for l in net.layers] == ["float32", "bfloat16"]


@pytest.mark.parametrize(("norm", "style"), [("layer", {}),
                                              ("rms", {"positions": "rope", "mlp": "swiglu",
                                                       "kv_heads": 1})])
def test_bf16_gpt_recipe_is_as_accurate_as_jax_grad_of_the_same_recipe(norm, style):
    """A GPT in the bf16 recipe (Embedding, both norms, SelfAttention with its softmax in
    float32, rotary and multi-query or not, token-wise Dense and GatedDense): caches in
    bf16, params and grads float32, and the manual gradient no further from the float64
    truth than jax.grad of the same recipe (the criterion of the networks above), every
    matmul of its step with bf16 operands."""
    shape = dict(vocab=11, dim=16, depth=1, heads=2, seq_len=8, norm=norm, **style)
    recipe = models.gpt(**shape, **BF16)
    params = recipe.init(jax.random.key(3))
    x, y = random_tokens(np.random.default_rng(3), recipe, 4)
    _, caches = network.forward(recipe, params, jnp.asarray(x))
    attention = caches[1][1]                                   # (x, q, k, v, P, O)
    assert [a.dtype for a in attention] == [jnp.bfloat16] * 4 + [jnp.float32, jnp.bfloat16]
    assert caches[0].dtype == jnp.int32 and caches[1][0][0].dtype == jnp.float32  # x_hat
    grads = jaxbp.backprop(recipe, params, x, y)
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype("float32")}
    manual, autodiff = _flat(grads), _flat(jaxbp.value_and_autodiff(recipe, params, x, y)[1])
    with jax.enable_x64(True):
        net64 = models.gpt(**shape, dtype="float64")
        params64 = jax.tree.map(lambda p: jnp.asarray(np.asarray(p, np.float64)), params)
        truth = _flat(jaxbp.backprop(net64, params64, x, y))

    def error(g):
        return np.linalg.norm(g - truth) / np.linalg.norm(truth)

    assert error(manual) <= 1.1 * error(autodiff) + 2e-3, (error(manual), error(autodiff))
    assert np.linalg.norm(manual - autodiff) / np.linalg.norm(autodiff) <= 3e-2
    opt = optax.sgd(0.1)
    step = jaxbp.make_train_step(recipe, opt, donate=False)
    eqns = jaxpr_equations(step, jaxbp.TrainState.create(params, opt), x, y,
                           primitive="dot_general")
    wide = [[str(v.aval.dtype) for v in e.invars] for e in eqns
            if any(v.aval.dtype != jnp.bfloat16 for v in e.invars)]
    assert len(eqns) >= 20 and not wide, wide
    # float32 outputs only where the softmax runs in float32: the scores S and dP = dO V^T
    scores_shape = (4, 2, 8, 8)
    f32_out = [tuple(e.outvars[0].aval.shape) for e in eqns
               if e.outvars[0].aval.dtype == jnp.float32]
    assert f32_out == [scores_shape] * 2, f32_out
