"""Transformer records (Embedding, SelfAttention, RMSNorm, token-wise Dense) and models.gpt:
the hand-written backward against jax.grad over random transformer chains."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    assert_no_less_accurate,
    assert_trees_close,
    forbid_autodiff,
    global_rel_error,
    leaf_rel_errors,
    transformer_case,
)

import jaxbp
from jaxbp import layers as L
from jaxbp import models
from jaxbp.check.suite import random_tokens, random_transformer
from jaxbp.layers.base import Shape
from jaxbp.network import Network

N_CASES = 8


def test_cases_cover_the_space():
    nets = [random_transformer(i, "float32")[0] for i in range(N_CASES)]
    attn = [layer.layers[1] for net in nets for layer in net.layers
            if isinstance(layer, L.Residual) and isinstance(layer.layers[1], L.SelfAttention)]
    assert {a.heads for a in attn} >= {1, 2, 3, 4} and {a.causal for a in attn} == {True, False}
    assert {a.block is None for a in attn} == {True, False}         # case 7: blockwise
    assert {a.rope for a in attn} == {True, False}                  # rotary: i = 1, 2 mod 4
    assert any(a.kv_heads == 1 and a.heads > 1 for a in attn)      # multi-query: case 5
    assert {a.bias for a in attn} == {True, False}                  # no biases: i = 2 mod 4
    assert {net.tie_embedding for net in nets} == {True, False}     # tied: i = 0 mod 3
    assert any(isinstance(layer, L.Dropout) for layer in nets[4].layers)   # i = 4 mod 5
    assert {net.input_shape[0] for net in nets} >= {1} and max(n.input_shape[0] for n in nets) > 8
    kinds = {type(layer).__name__ for net in nets for layer in net.layers}
    assert {"LayerNorm", "RMSNorm", "Embedding", "Dense", "Residual"} <= kinds
    inner = {type(inside).__name__ for net in nets for layer in net.layers
             if isinstance(layer, L.Residual) for inside in layer.layers}
    assert "GatedDense" in inner and "Dense" in inner               # SwiGLU: i = 2, 3 mod 4
    # depth 1, 2 and 3 (and a Dropout after the embedding in case 4)
    assert {len([l for l in net.layers if not isinstance(l, L.Dropout)])
            for net in nets} == {5, 7, 9}


# four of the eight: T = 1 (0), heads 4, 2, 3 and 1, causal and not, depth 1-3, both
# norms, batch 1 (5); the other four ran the same way when this was written (CI time)
@pytest.mark.parametrize("i", [0, 2, 5, 6])
def test_float64_matches_autodiff(i):
    with jax.enable_x64(True):
        net, params, x, y = transformer_case(i, "float64")
        loss_m, grads_m = jaxbp.value_and_backprop(net, params, x, y)
        loss_r, grads_r = jaxbp.value_and_autodiff(net, params, x, y)
        np.testing.assert_allclose(loss_m, loss_r, rtol=1e-13)
        # per leaf where the leaf is not rounding alone: the key bias's exact gradient is 0
        # (softmax ignores a per-row shift), and a leaf 1e-8 below the largest entry of the
        # gradient holds the rounding of its terms on both sides; those are checked against
        # the whole gradient (global_rel_error), every other leaf against its own scale
        scale = max(float(np.max(np.abs(r))) for r in jax.tree.leaves(grads_r))
        errors = [e for e, r in zip(leaf_rel_errors(grads_m, grads_r), jax.tree.leaves(grads_r))
                  if float(np.max(np.abs(r))) > 1e-8 * scale]
        assert max(errors) <= 1e-10, errors
        assert global_rel_error(grads_m, grads_r) <= 1e-12


@pytest.mark.parametrize("i", [5])   # RMSNorm, 3 rotary heads on 1 key/value head, not causal
def test_float32_is_as_accurate_as_autodiff(i):
    net, params, x, y = transformer_case(i, "float32")
    with jax.default_matmul_precision("highest"):
        _, grads_m = jaxbp.value_and_backprop(net, params, x, y)
        _, grads_r = jaxbp.value_and_autodiff(net, params, x, y)
    with jax.enable_x64(True):
        net64 = dataclasses.replace(net, dtype="float64")
        as64 = jax.tree.map(lambda a: jnp.asarray(np.asarray(a, np.float64)), params)
        _, truth = jaxbp.value_and_autodiff(net64, as64, x, y)
    assert_no_less_accurate(grads_m, grads_r, truth, "float32")


def test_bfloat16_is_as_accurate_as_autodiff():
    net, params, x, y = transformer_case(3, "float32")
    low = jax.tree.map(lambda a: a.astype(jnp.bfloat16), params)
    net16 = dataclasses.replace(net, dtype="bfloat16")
    _, manual = jaxbp.value_and_backprop(net16, low, x, y)
    _, autodiff = jaxbp.value_and_autodiff(net16, low, x, y)
    with jax.default_matmul_precision("highest"):   # the truth: the same bf16 params, float32
        _, truth = jaxbp.value_and_autodiff(net, jax.tree.map(lambda a: a.astype(jnp.float32),
                                                              low), x, y)
    assert_no_less_accurate(manual, autodiff, truth, "bfloat16")


def test_manual_path_calls_no_autodiff(monkeypatch, x64):
    net, params, x, y = transformer_case(1, "float64")
    _, reference = jaxbp.value_and_autodiff(net, params, x, y)
    forbid_autodiff(monkeypatch)
    _, manual = jaxbp.value_and_backprop(net, params, x, y)
    assert global_rel_error(manual, reference) <= 1e-12


def test_verify_grads_passes_on_a_gpt(x64):
    net = models.gpt(vocab=7, dim=8, depth=1, heads=2, seq_len=5, norm="rms", dtype="float64")
    x, y = random_tokens(np.random.default_rng(0), net, 2)
    params = net.init(jax.random.key(0))
    # the key bias's exact gradient is 0 (softmax ignores a per-row shift): both sides
    # hold rounding there, judged against the gradient's scale (verify's default atol)
    report = jaxbp.verify_grads(lambda p: jaxbp.backprop(net, p, x, y),
                                lambda p: net.cost(p, x, y), params)
    assert report.ok, report


def test_ignored_tokens_count_nowhere(x64):
    net = models.gpt(vocab=5, dim=4, depth=1, heads=1, seq_len=4, dtype="float64")
    params = net.init(jax.random.key(1))
    x = np.array([[1, 2, 3, 4], [0, 1, 2, 3]], np.int32)
    y = np.array([[2, 3, 4, -1], [-1, -1, -1, -1]], np.int32)
    # the mean over the three counted tokens, whatever the logits of the others
    logits = np.asarray(net.apply(params, x))[0, :3]
    lse = np.log(np.sum(np.exp(logits), axis=1))
    expected = np.mean(lse - logits[np.arange(3), [2, 3, 4]])
    cost, grads = jaxbp.value_and_backprop(net, params, x, y)
    np.testing.assert_allclose(cost, expected, rtol=1e-13)
    # the second sequence has no counted token: changing it changes nothing
    x2 = x.copy()
    x2[1] = [4, 4, 4, 4]
    cost2, grads2 = jaxbp.value_and_backprop(net, params, x2, y)
    np.testing.assert_allclose(cost2, cost, rtol=1e-15)
    assert max(leaf_rel_errors(grads2, grads)) <= 1e-13


def test_a_downstream_loss_through_apply_with_manual_vjp_of_a_gpt(x64):
    """jax.grad of any scalar of a GPT's logits runs the hand-written backward (tokens get
    no cotangent): equal to jax.grad through the plain forward in float64."""
    net = models.gpt(vocab=7, dim=6, depth=1, heads=2, seq_len=5, dtype="float64")
    params = net.init(jax.random.key(0))
    x = jnp.asarray(np.random.default_rng(0).integers(0, 7, (3, 5)))

    def downstream(apply):
        return jax.jit(jax.grad(lambda p: jnp.sum(jnp.tanh(apply(net, p, x)) ** 2)))

    manual = downstream(jaxbp.apply_with_manual_vjp)(params)
    reference = downstream(lambda n, p, x: n.apply(p, x))(params)
    assert global_rel_error(manual, reference) <= 1e-12


def test_embedding_scatter_adds_repeated_tokens(x64):
    layer = L.Embedding(4, 3, positions=5)
    params = layer.init(jax.random.key(0), (3,), jnp.float64)
    tokens = jnp.array([[2, 2, 0]])
    delta = jnp.arange(9.0).reshape(1, 3, 3)
    _, grads = layer.backward(params, tokens, delta)
    np.testing.assert_array_equal(grads["tokens"][2], delta[0, 0] + delta[0, 1])
    np.testing.assert_array_equal(grads["tokens"][jnp.array([1, 3])], 0)
    np.testing.assert_array_equal(grads["positions"][:3], delta[0])
    np.testing.assert_array_equal(grads["positions"][3:], 0)


def test_gpt_trains_in_the_step_and_evaluates():
    net = models.gpt(vocab=6, dim=8, depth=1, heads=2, seq_len=6)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, (16, 6)).astype(np.int32)
    y = (x + 1) % 6                                          # a next token to learn
    state = jaxbp.TrainState.create(net.init(jax.random.key(0)), optax.adam(3e-2))
    step = jaxbp.make_train_step(net, optax.adam(3e-2))
    before = jaxbp.evaluate(net, state.params, x, y)
    for _ in range(40):
        state, metrics = step(state, x, y)
    after = jaxbp.evaluate(net, state.params, x, y)
    assert after["loss"] < 0.5 * before["loss"] and after["accuracy"] > 0.9
    assert float(metrics["accuracy"]) > 0.9           # the step counts tokens too
    np.testing.assert_allclose(after["loss"], float(net.cost(state.params, x, y)), rtol=1e-5)
    # no counted token (every target padding): no mean, not a perfect loss of 0
    empty = jaxbp.evaluate(net, state.params, x, np.full_like(y, -1))
    assert np.isnan(empty["loss"]) and np.isnan(empty["accuracy"]), empty


class ToyScale:
    """A record defined by a user: ``a = s x`` per feature, only the required methods."""

    def output_shape(self, in_shape: Shape) -> Shape:
        return in_shape

    def init(self, key, in_shape, dtype):
        return {"s": jnp.full((in_shape[-1],), 1.5, dtype)}

    def forward(self, params, x):
        return x * params["s"], x

    def backward(self, params, x, delta, need_input=True):
        grads = {"s": jnp.sum(delta * x, axis=tuple(range(x.ndim - 1)))}
        return (delta * params["s"] if need_input else None), grads

    def per_sample_grads(self, params, x, delta):
        return {"s": jnp.sum((delta * x).reshape(x.shape[0], -1, x.shape[-1]), axis=1)}

    def per_sample_sq_norms(self, params, x, delta):
        return jnp.sum(self.per_sample_grads(params, x, delta)["s"] ** 2, axis=1)


def test_a_user_record_works_where_its_capabilities_allow(x64):
    toy = L.register(dataclasses.dataclass(frozen=True)(ToyScale))
    assert isinstance(toy(), L.LayerRecord)
    net = Network((L.Dense(4, "tanh"), toy(), L.Dense(3)), (5,), dtype="float64")
    params = net.init(jax.random.key(0))
    x = np.random.default_rng(0).standard_normal((6, 5))
    y = np.arange(6) % 3
    _, manual = jaxbp.value_and_backprop(net, params, x, y)
    _, reference = jaxbp.value_and_autodiff(net, params, x, y)
    assert_trees_close(manual, reference, "float64")
    per_example = jaxbp.per_example_grads(net, params, x, y)
    one = jax.vmap(lambda xi, yi: jaxbp.backprop(net, params, xi[None], yi[None]))(x, y)
    assert_trees_close(per_example, one, "float64")
    with pytest.raises(L.LayerError, match=r"layers\[1\] \(ToyScale\): has no `kfac_inputs` "
                                           r"capability, which K-FAC needs"):
        jaxbp.kfac_factors(net, params, x, y, kind="empirical")
    inside = Network((L.Dense(4, "tanh"), L.Residual((toy(),)), L.Dense(3)), (5,),
                     dtype="float64")
    with pytest.raises(L.LayerError, match=r"layers\[1\]\.layers\[0\] \(ToyScale\): has no "
                                           r"`kfac_inputs`"):
        jaxbp.kfac_gradient()(inside, inside.init(jax.random.key(0)), x, y, 0)
    with pytest.raises(L.LayerError, match=r"layers\[1\] \(ToyScale\): has no "
                                           r"`feedback_shape` capability, which the feedback"):
        jaxbp.feedback.feedback_shapes(net)


def test_a_user_record_is_checked_when_registered_and_asked_for_per_sample_methods():
    """register names what a record lacks of output_shape, init, forward, backward (it was
    taken, and failed when run); a record without the per-sample methods trains, and a
    per-example quantity names them (was an AttributeError), in a block too."""

    class Forward:
        def output_shape(self, in_shape):
            return in_shape

    with pytest.raises(TypeError, match=re.escape("layer record Forward must define ['init', "
                                                  "'forward', 'backward']")):
        L.register(Forward)

    class Plain(ToyScale):
        per_sample_grads = per_sample_sq_norms = None

    plain = L.register(dataclasses.dataclass(frozen=True)(Plain))
    net = Network((L.Dense(4, "tanh"), L.Residual((plain(),)), L.Dense(3)), (5,))
    params = net.init(jax.random.key(0))
    x, y = np.ones((3, 5), np.float32), np.arange(3) % 3
    assert np.isfinite(jaxbp.value_and_backprop(net, params, x, y)[0])
    for call, quantity in ((jaxbp.per_example_grad_norms, "the per-example norm"),
                           (jaxbp.per_example_grads, "the per-example gradient"),
                           (lambda *a: jaxbp.clipped_grad(*a, 1.0), "per-example clipping"),
                           (jaxbp.ggn_diag, "the GGN diagonal")):
        with pytest.raises(L.LayerError, match=re.escape(
                f"layers[1].layers[0] (Plain): has no `per_sample_grads` capability, which "
                f"{quantity} needs")):
            call(net, params, x, y)


@pytest.mark.parametrize("build, error, words", [
    (lambda: L.SelfAttention(0), ValueError, "SelfAttention heads must be an int >= 1"),
    (lambda: Network((L.Embedding(5, 6), L.SelfAttention(4), L.Dense(5)), (3,),
                     input_dtype="int32"), L.LayerError, "its 4 heads do not divide"),
    (lambda: Network((L.Dense(4), L.SelfAttention(2), L.Dense(2)), (3,)), L.LayerError,
     "layers[1] (SelfAttention): takes (batch, T, d) sequences"),
    (lambda: Network((L.Embedding(5, 4, positions=2), L.Dense(5)), (3,), input_dtype="int32"),
     L.LayerError, "longer than its position table (2 rows)"),
    (lambda: L.Embedding(0, 4), ValueError, "Embedding vocab must be an int >= 1"),
    (lambda: L.RMSNorm(eps=0), ValueError, "RMSNorm eps must be a number > 0"),
    (lambda: L.LayerNorm(eps=-1), ValueError, "LayerNorm eps must be a number > 0, got -1"),
    (lambda: L.LayerNorm(eps=float("nan")), ValueError, "LayerNorm eps must be a number > 0"),
    (lambda: Network((L.Embedding(5, 4), L.Dense(5)), (3,), input_dtype="float32"),
     ValueError, "input_dtype must be None"),
    (lambda: models.gpt(5, 4, 1, 1, 3, norm="batch"), ValueError, "gpt norm must be one of"),
    (lambda: Network((L.Embedding(5, 4), L.Dense(5)), (3,)), L.LayerError,
     "layers[0] (Embedding): takes integer tokens; a network of tokens starts with it"),
    (lambda: Network((L.Dense(4), L.Embedding(5, 4), L.Dense(5)), (3,)), L.LayerError,
     "layers[1] (Embedding): must be the first layer"),
    (lambda: Network((L.Dense(4), L.Dense(5)), (3,), input_dtype="int32"), L.LayerError,
     "layers[0] (Dense): input_dtype 'int32' gives integer tokens"),
    (lambda: models.gpt(5, "4", 1, 1, 3), ValueError, "gpt dim must be an int >= 1, got '4'"),
    (lambda: models.gpt(5, 4, 1, 1, 0), ValueError, "gpt seq_len must be an int >= 1, got 0"),
    (lambda: models.gpt(5, 6, 1, 4, 3), ValueError, "4 heads do not divide dim = 6"),
])
def test_bad_transformers_are_named(build, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[").replace("]", r"\]")):
        build()


def test_generate_continues_by_the_forward_and_names_bad_arguments():
    """Greedy: each new token is the argmax of the forward at the last position of its
    window (the last seq_len tokens, right-padded while shorter); drawn: the same key
    draws the same tokens."""
    net = models.gpt(vocab=7, dim=8, depth=1, heads=2, seq_len=4)
    params = net.init(jax.random.key(0))
    tokens = [1, 2, *models.generate(net, params, [1, 2], 6)]
    assert len(tokens) == 8
    for i in range(2, 8):
        window = tokens[max(0, i - 4):i]
        logits = net.apply(params, jnp.array([window + [0] * (4 - len(window))]))
        assert tokens[i] == int(jnp.argmax(logits[0, len(window) - 1]))
    drawn = [models.generate(net, params, [3], 5, key=jax.random.key(1), temperature=1.5)
             for _ in range(2)]
    assert drawn[0] == drawn[1] and all(0 <= t < 7 for t in drawn[0])
    # a NumPy prompt (TextDataset.encode returns one) was "truth value ... ambiguous"
    assert models.generate(net, params, np.array([1, 2], np.int32), 6) == tokens[2:]
    for prompt, error, words in (([1.5], TypeError, "prompt must hold integer token ids"),
                                 ([[1, 2]], ValueError, "prompt must be a 1-D sequence"),
                                 ("To be", TypeError, "prompt must be token ids, got the str "
                                                      "'To be'; encode it first")):
        with pytest.raises(error, match=re.escape(words)):
            models.generate(net, params, prompt, 2)
    other = models.gpt(vocab=7, dim=4, depth=1, heads=2, seq_len=4).init(jax.random.key(0))
    with pytest.raises(ValueError, match="params do not fit the network"):  # were used
        models.generate(net, other, [1], 2)
    for kwargs, words in (({"prompt": []}, "prompt must hold at least one token"),
                          ({"prompt": [7]}, "prompt must hold tokens in [0, 7), got [7]"),
                          ({"length": -1}, "length must be an int >= 0, got -1"),
                          ({"temperature": float("nan")}, "temperature must be a finite"),
                          ({"temperature": 1.0}, "a temperature > 0 samples: pass a PRNG key"),
                          ({"key": jax.random.key(0)}, "key is used only to sample "
                                                       "(temperature > 0); at temperature 0"),
                          ({"top_k": 2}, "top_k limits what is sampled (temperature > 0)"),
                          ({"top_k": 0, "temperature": 1.0, "key": jax.random.key(0)},
                           "top_k must be None or an int >= 1, got 0")):
        with pytest.raises(ValueError, match=re.escape(words)):
            models.generate(net, params, **{"prompt": [1], "length": 2, **kwargs})
    # top_k: top 1 at any temperature is greedy; top 2 draws only the two likeliest
    hot = functools.partial(models.generate, net, params, temperature=5.0)
    assert hot([1, 2], 6, key=jax.random.key(4), top_k=1) == tokens[2:]
    logits = net.apply(params, jnp.array([[3, 0, 0, 0]]))[0, 0]
    likeliest = set(np.argsort(np.asarray(logits))[-2:].tolist())
    draws = {hot([3], 1, key=jax.random.key(k), top_k=2)[0] for k in range(24)}
    assert draws == likeliest                 # at temperature 5 all 7 would come up
    assert len({hot([3], 1, key=jax.random.key(k), top_k=7)[0] for k in range(24)}) > 2


def test_bad_tokens_and_targets_are_named():
    net = models.gpt(vocab=5, dim=4, depth=1, heads=1, seq_len=3)
    params = net.init(jax.random.key(0))
    x = np.zeros((2, 3), np.int32)
    with pytest.raises(TypeError, match="x must hold integer tokens"):
        jaxbp.backprop(net, params, x.astype(np.float32), x)
    with pytest.raises(ValueError, match=r"y holds labels outside \[-1, 5\)"):
        jaxbp.backprop(net, params, x, np.full((2, 3), 5, np.int32))
    with pytest.raises(ValueError, match=r"expected \(2, 3\) token labels"):
        jaxbp.backprop(net, params, x, np.zeros((2, 4), np.int32))
    # a token outside [0, vocab) would index another token's row (clamped, or counted
    # from the end when negative): refused on the host and on the device alike
    for bad, first in (([[0, 1, 5], [2, 7, 0]], "x[0, 2] = 5 (2 out of range)"),
                       ([[0, -1, 1], [0, 0, 0]], "x[0, 1] = -1 (1 out of range)")):
        for tokens in (np.array(bad, np.int32), jnp.array(bad, jnp.int32)):
            with pytest.raises(ValueError, match=re.escape(
                    f"x holds tokens outside [0, 5): {first}; the Embedding's vocab is 5")):
                jaxbp.value_and_backprop(net, params, tokens, x)
    data = jaxbp.data.Dataset(np.array([[0, 1, 5]] * 4, np.int32), x[:1].repeat(4, 0),
                              x, x)
    with pytest.raises(ValueError, match=re.escape("data.x_train holds tokens outside [0, 5)")):
        jaxbp.fit(net, optax.sgd(0.1), data, epochs=1, batch_size=2, key=jax.random.key(0),
                  progress=False)



def test_other_sequence_lengths_name_the_network_that_takes_them(x64):
    net = models.gpt(vocab=7, dim=4, depth=1, heads=2, seq_len=6, dtype="float64")
    params = net.init(jax.random.key(0))
    x = np.asarray(jax.random.randint(jax.random.key(1), (2, 6), 0, 7), np.int32)
    with pytest.raises(ValueError, match=re.escape(
            "x has shape (2, 4) but expected (batch, 6): a batch of samples of input_shape "
            "(6,); the same params serve sequences of 4 tokens in "
            "dataclasses.replace(net, input_shape=(4,))")):
        net.apply(params, x[:, :4])
    with pytest.raises(ValueError, match=re.escape(
            "its Embedding has 6 positions, fewer than 9")):
        net.apply(params, np.zeros((2, 9), np.int32))
    # the named network: a causal GPT's logits on a prefix are the full sequence's first
    # rows (the positions table's first 4 rows), and it trains by hand like any other
    short = dataclasses.replace(net, input_shape=(4,))
    np.testing.assert_allclose(short.apply(params, x[:, :4]), net.apply(params, x)[:, :4],
                               rtol=1e-12, atol=1e-12)
    y = np.roll(x, -1, axis=1)[:, :4]
    # normwise: the key bias's gradient is 0 in exact arithmetic (a softmax row does not
    # change when one constant is added to all its scores), so per leaf it is noise/noise
    assert global_rel_error(jaxbp.backprop(short, params, x[:, :4], y),
                            jaxbp.value_and_autodiff(short, params, x[:, :4], y)[1]) < 1e-12

@pytest.mark.parametrize(("precision", "style", "tied"), [
    ("float32", "gpt2", False), ("bf16", "gpt2", True), ("float32", "llama", False)])
def test_gpt_model_flops_are_the_manual_steps_matmul_flops(precision, style, tied):
    """6N + 12LTd per token is exactly what the hand-written step multiplies, in every
    recipe and style, tied or not: the sum of 2 x (output size) x (contracted size) over
    its dot_generals (a tied table multiplies in the head, a lookup in the embedding)."""
    from helpers import jaxpr_equations

    from jaxbp.bench.gpt import GptCase

    case = GptCase(dim=8, depth=2, heads=2, seq_len=5, batch=3, vocab=11, precision=precision,
                   style=style, tie_embedding=tied)
    net = case.net()
    params = net.init(jax.random.key(0))
    x, y = random_tokens(np.random.default_rng(0), net, case.batch, ignored=0.0)
    flops = 0
    for eqn in jaxpr_equations(lambda p: jaxbp.value_and_backprop(net, p, x, y), params,
                               primitive="dot_general"):
        (contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval.shape
        flops += 2 * int(np.prod(eqn.outvars[0].aval.shape)) * int(
            np.prod([lhs[i] for i in contract]))
    assert flops == case.flops()["total"]
    weights = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
               if jax.tree_util.keystr(path).endswith(("'w']", "'wq']", "'wk']", "'wv']",
                                                       "'wo']", "'wg']", "'wu']"))]
    weights += [params[0]["tokens"]] * tied            # the head's weight: the table
    assert case.matmul_params == sum(w.size for w in weights)


def test_hvp_of_a_gpt_is_forward_mode_over_the_hand_written_gradient(x64):
    net = models.gpt(vocab=5, dim=4, depth=1, heads=2, seq_len=3, dtype="float64")
    params = net.init(jax.random.key(0))
    x, y = random_tokens(np.random.default_rng(0), net, 2)
    v = jax.tree.map(lambda a: jnp.asarray(
        np.random.default_rng(7).standard_normal(a.shape)), params)
    hv = jaxbp.hvp(net, params, x, y, v)
    reference = jax.jvp(jax.grad(lambda p: net.cost(p, x, y)), (params,), (v,))[1]
    assert global_rel_error(hv, reference) <= 1e-10


def test_layer_stats_of_a_gpt_report_every_blocks_mlp_and_the_head():
    """Were the head alone (the blocks' layers sit inside Residuals): now each block's two
    MLP layers, then the head, in order."""
    net = models.gpt(vocab=5, dim=4, depth=2, heads=1, seq_len=3)
    params = net.init(jax.random.key(0))
    x, y = random_tokens(np.random.default_rng(0), net, 2)
    stats = jaxbp.layer_stats(net, params, x, y)
    _, grads = jaxbp.value_and_autodiff(net, params, x, y)
    weights = [(2, 1), (2, 2), (4, 1), (4, 2), (-1,)]       # blocks' MLPs, then the head
    pick = [functools.reduce(lambda tree, i: tree[i], where, grads)["w"] for where in weights]
    np.testing.assert_allclose(stats["grad_norm"], [jnp.linalg.norm(g) for g in pick],
                               rtol=1e-5)
    assert bool(jnp.all(jnp.isfinite(stats["mean_abs_delta"])))
    assert bool(jnp.all(stats["mean_abs_delta"] > 0))
    assert jaxbp.diagnostics.layer_stats_places(net) == [   # the flow figure's labels
        "layers[2].layers[1]", "layers[2].layers[2]", "layers[4].layers[1]",
        "layers[4].layers[2]", "layers[6]"]


def test_token_wise_dense_per_sample_rules_match_vmap_grad(x64):
    """A Dense on (T, d) samples: g_i = sum_t a_it (x) delta_it, by the per-sample rules."""
    net = Network((L.Dense(4, "tanh"), L.LayerNorm(), L.Flatten(), L.Dense(3)), (5, 2),
                  dtype="float64")
    params = net.init(jax.random.key(0))
    x = np.random.default_rng(0).standard_normal((6, 5, 2))
    y = np.arange(6) % 3
    one = jax.vmap(lambda xi, yi: jaxbp.backprop(net, params, xi[None], yi[None]))(x, y)
    assert_trees_close(jaxbp.per_example_grads(net, params, x, y), one, "float64")
    norms = np.sqrt(sum(np.sum(np.asarray(g).reshape(6, -1) ** 2, axis=1)
                        for g in jax.tree.leaves(one)))
    np.testing.assert_allclose(jaxbp.per_example_grad_norms(net, params, x, y), norms,
                               rtol=1e-12)
    variance = jax.tree.map(lambda g: jnp.var(g, axis=0), one)
    assert_trees_close(jaxbp.per_example_grad_variance(net, params, x, y), variance,
                       "float64")
