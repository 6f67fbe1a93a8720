"""Rotary attention (SelfAttention(rope=True)) and GatedDense (SwiGLU), and models.gpt's
LLaMA-style options: forwards against NumPy loops written from the papers' formulas,
the backward against jax.grad, the checks on their arguments."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import forbid_autodiff, global_rel_error

import jaxbp
from jaxbp import layers as L
from jaxbp import models
from jaxbp.check.suite import random_tokens
from jaxbp.layers import rotary


def _numpy_rope(x, base):
    """RoFormer's rotation in the rotate-half layout, one position and pair at a time:
    feature i turns with feature i + d_h/2 by the angle t base^(-2i/d_h)."""
    out = np.empty_like(x)
    half = x.shape[-1] // 2
    for t in range(x.shape[-2]):
        for i in range(half):
            angle = t * base ** (-2 * i / x.shape[-1])
            c, s = np.cos(angle), np.sin(angle)
            out[..., t, i] = x[..., t, i] * c - x[..., t, i + half] * s
            out[..., t, i + half] = x[..., t, i + half] * c + x[..., t, i] * s
    return out


def test_rotation_is_roformers_and_turns_back_exactly(x64):
    x = np.random.default_rng(0).standard_normal((2, 3, 7, 6))
    cos, sin = rotary.angles(7, 6, 500.0, jnp.float64)
    turned = rotary.rotate(jnp.asarray(x), cos, sin)
    np.testing.assert_allclose(turned, _numpy_rope(x, 500.0), rtol=1e-13, atol=1e-15)
    np.testing.assert_allclose(rotary.rotate_back(turned, cos, sin), x, rtol=1e-13,
                               atol=1e-15)


def test_rotated_scores_depend_on_the_distance_only(x64):
    """<R_t q, R_s k> = <R_{t+m} q, R_{s+m} k>: what rotary embeddings are for."""
    rng = np.random.default_rng(1)
    q, k = rng.standard_normal(8), rng.standard_normal(8)
    cos, sin = rotary.angles(12, 8, 1e4, jnp.float64)

    def score(t, s):
        tiled_q = jnp.broadcast_to(q, (12, 8))
        tiled_k = jnp.broadcast_to(k, (12, 8))
        return float(rotary.rotate(tiled_q, cos, sin)[t] @ rotary.rotate(tiled_k, cos, sin)[s])

    for t, s, m in ((3, 1, 5), (0, 4, 7), (2, 2, 9)):
        assert score(t, s) == pytest.approx(score(t + m, s + m), rel=1e-12)
    assert score(3, 1) != pytest.approx(score(3, 2), rel=1e-3)


def _numpy_attention(params, x, heads, causal, base, kv_heads):
    """softmax((R Q)(R K)^T / sqrt(d_h) + mask) V, then W_o: a NumPy loop over heads,
    query head h reading key/value head h // (heads / kv_heads)."""
    _, t, d = x.shape
    dh = d // heads
    proj = {p: x @ params[f"w{p}"] + params[f"b{p}"] for p in "qkv"}
    heads_out = []
    for h in range(heads):
        j = h // (heads // kv_heads)
        q = proj["q"][:, :, h * dh:(h + 1) * dh]
        k, v = (proj[p][:, :, j * dh:(j + 1) * dh] for p in "kv")
        q, k = _numpy_rope(q, base), _numpy_rope(k, base)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(dh)
        if causal:
            s = np.where(np.tril(np.ones((t, t), bool)), s, -np.inf)
        p = np.exp(s - s.max(-1, keepdims=True))
        heads_out.append((p / p.sum(-1, keepdims=True)) @ v)
    return np.concatenate(heads_out, -1) @ params["wo"] + params["bo"]


@pytest.mark.parametrize(("block", "kv_heads"), [(None, None), (3, None), (None, 1),
                                                (3, 2)])
@pytest.mark.parametrize("causal", [True, False])
def test_rotary_attention_is_the_numpy_loop_and_its_backward_jax_grads(block, kv_heads,
                                                                       causal, x64):
    """Plain and blockwise, one key/value head per query head, shared by all 4 (multi-
    query) or by pairs (grouped-query)."""
    layer = L.SelfAttention(4, causal=causal, block=block, rope=True, rope_base=100.0,
                            kv_heads=kv_heads)
    rng = np.random.default_rng(2)
    params, x = _moved_params(layer, (3, 5, 16), rng), rng.standard_normal((3, 5, 16))
    assert params["wk"].shape == (16, 4 * (kv_heads or 4))
    out = _assert_backward_is_the_vjp(layer, params, x, rng)
    np.testing.assert_allclose(out, _numpy_attention({k: np.asarray(v) for k, v in
                                                      params.items()}, x, 4, causal, 100.0,
                                                     kv_heads or 4),
                               rtol=1e-12, atol=1e-13)


def _moved_params(layer, shape, rng):
    """The layer's params for inputs of ``shape`` (batch first), moved off their init."""
    return {k: jnp.asarray(v + 0.2 * rng.standard_normal(v.shape))
            for k, v in layer.init(jax.random.key(0), shape[1:], jnp.float64).items()}


def _assert_backward_is_the_vjp(layer, params, x, rng):
    """The hand-written input error and gradient are jax.vjp's of the forward (float64,
    normwise 1e-13) for a random output error; returns the forward's output."""
    out, cache = layer.forward(params, jnp.asarray(x))
    delta = jnp.asarray(rng.standard_normal(out.shape))
    error, grads = layer.backward(params, cache, delta)
    grads_ref, error_ref = jax.vjp(lambda p, v: layer.forward(p, v)[0], params,
                                   jnp.asarray(x))[1](delta)
    assert global_rel_error(error, error_ref) <= 1e-13
    assert global_rel_error(grads, grads_ref) <= 1e-13
    return out


@pytest.mark.parametrize("shape", [(4, 3), (2, 5, 3)])
def test_gated_dense_is_swiglu_and_its_backward_jax_grads(shape, x64):
    layer = L.GatedDense(6)
    rng = np.random.default_rng(3)
    params, x = _moved_params(layer, shape, rng), rng.standard_normal(shape)
    out = _assert_backward_is_the_vjp(layer, params, x, rng)
    p = {k: np.asarray(v) for k, v in params.items()}
    z = x @ p["wg"] + p["bg"]
    np.testing.assert_allclose(out, z / (1 + np.exp(-z)) * (x @ p["wu"] + p["bu"]),
                               rtol=1e-13)                     # silu(x W_g + b_g) (x W_u + b_u)


def test_gated_dense_in_an_mlp_has_per_example_rules(x64):
    """On (batch, d) vectors: per-sample gradients and norms against vmap(grad)."""
    net = jaxbp.Network((L.GatedDense(5, "gelu"), L.Dense(3)), (4,), dtype="float64")
    params = net.init(jax.random.key(1))
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((6, 4)), rng.integers(0, 3, 6)
    want = jax.vmap(lambda xi, yi: jax.grad(net.cost)(params, xi[None], yi[None]))(x, y)
    assert global_rel_error(jaxbp.per_example_grads(net, params, x, y), want) <= 1e-13
    norms = np.sqrt(sum(np.sum(np.reshape(g, (6, -1)) ** 2, 1) for g in jax.tree.leaves(want)))
    np.testing.assert_allclose(jaxbp.per_example_grad_norms(net, params, x, y), norms,
                               rtol=1e-12)


def test_a_grouped_query_gpt_has_every_rule(x64):
    """kv_heads = 1 of 2 heads in a rotary GPT: the gradient is jax.grad's, per-example
    gradients vmap(grad)'s, and K-FAC and the feedback rules take k and v at their
    narrower width."""
    net = models.gpt(vocab=7, dim=8, depth=1, heads=2, seq_len=5, norm="rms",
                     positions="rope", mlp="swiglu", kv_heads=1, dtype="float64")
    params = jax.tree.map(lambda a: a + 0.2, net.init(jax.random.key(3)))
    x, y = random_tokens(np.random.default_rng(6), net, 3, ignored=0.0)  # l_i: a mean over T
    attention = params[1][1]
    assert attention["wk"].shape == attention["wv"].shape == (8, 4)
    _, manual = jaxbp.value_and_backprop(net, params, x, y)
    assert global_rel_error(manual, jaxbp.value_and_autodiff(net, params, x, y)[1]) <= 1e-12
    want = jax.vmap(lambda xi, yi: jax.grad(net.cost)(params, xi[None], yi[None]))(x, y)
    assert global_rel_error(jaxbp.per_example_grads(net, params, x, y), want) <= 1e-12
    factors = jaxbp.kfac_factors(net, params, x, y, kind="empirical")[1][1]
    assert factors["k"]["G"].shape == factors["v"]["G"].shape == (4, 4)
    assert jaxbp.feedback.feedback_shapes(net)[0][1] == {"q": (8, 8), "k": (4, 8),
                                                         "v": (4, 8), "o": (8, 8)}


def test_a_llama_style_gpt_trains_by_hand(monkeypatch):
    """RMSNorm, rotary attention, SwiGLU: no positions table, and the step calls no
    autodiff."""
    net = models.gpt(vocab=8, dim=8, depth=1, heads=2, seq_len=6, norm="rms",
                     positions="rope", mlp="swiglu")
    assert net.layers[0].positions is None
    x, _ = random_tokens(np.random.default_rng(5), net, 16)
    y = (x + 1) % 8                                   # each token's target: the next symbol
    optimizer = optax.adam(3e-2)
    forbid_autodiff(monkeypatch)
    step = jaxbp.make_train_step(net, optimizer)
    state = jaxbp.TrainState.create(net.init(jax.random.key(0)), optimizer)
    first = float(net.cost(state.params, x, y))
    for _ in range(40):
        state, _ = step(state, x, y)
    assert float(net.cost(state.params, x, y)) < 0.2 * first


@pytest.mark.parametrize(("build", "error", "words"), [
    (lambda: L.SelfAttention(2, rope="yes"), TypeError, "SelfAttention rope must be"),
    (lambda: L.SelfAttention(2, rope=True, rope_base=0), ValueError,
     r"rope_base must be a finite number > 0, got 0"),
    (lambda: L.SelfAttention(2, rope=True, rope_base="1e4"), ValueError,
     r"rope_base must be a finite number > 0, got '1e4'"),
    (lambda: jaxbp.Network((L.Embedding(5, 6), L.SelfAttention(2, rope=True), L.Dense(5)),
                           (3,), input_dtype="int32"), L.LayerError,
     r"layers\[1\] \(SelfAttention\): rope turns pairs of a head's features, but the "
     r"head width d / heads = 3 is odd"),
    (lambda: models.gpt(5, 6, 1, 2, 3, positions="rope"), ValueError,
     r"head width dim / heads = 3 must be even"),
    (lambda: models.gpt(5, 4, 1, 2, 3, positions="alibi"), ValueError,
     r"gpt positions must be one of \['learned', 'rope'\], got 'alibi'"),
    (lambda: models.gpt(5, 4, 1, 2, 3, mlp="relu"), ValueError,
     r"gpt mlp must be one of \['gelu', 'swiglu'\], got 'relu'"),
    (lambda: L.SelfAttention(4, kv_heads=3), ValueError,
     r"SelfAttention kv_heads = 3 must divide heads = 4"),
    (lambda: L.SelfAttention(4, kv_heads=0), ValueError,
     r"SelfAttention kv_heads must be None or an int >= 1, got 0"),
    (lambda: models.gpt(5, 8, 1, 4, 3, kv_heads=3), ValueError,
     r"gpt kv_heads must divide heads: 3 key/value heads cannot serve 4"),
    (lambda: L.GatedDense(0), ValueError, "GatedDense units must be an int >= 1"),
    (lambda: L.GatedDense(4, "swish"), ValueError, "swish"),
    (lambda: L.Dense(4, bias="no"), TypeError, "Dense bias must be True or False, got 'no'"),
    (lambda: L.GatedDense(4, bias=0), TypeError, "GatedDense bias must be True or False"),
    (lambda: L.SelfAttention(2, bias=None), TypeError, "SelfAttention bias must be True"),
    (lambda: models.gpt(5, 4, 1, 2, 3, bias="false"), TypeError, "gpt bias must be True"),
    (lambda: L.LayerNorm(bias=1), TypeError, "LayerNorm bias must be True or False, got 1"),
    (lambda: L.Conv2D(3, bias="off"), TypeError, "Conv2D bias must be True or False"),
    (lambda: models.gpt(5, 4, 1, 2, 3, mlp_hidden=0), ValueError,
     "gpt mlp_hidden must be None or an int >= 1, got 0"),
])
def test_bad_llama_options_are_named(build, error, words):
    with pytest.raises(error, match=words):
        build()


def test_a_saved_gpts_recorded_net_reads_as_before():
    """Runs saved before rotary attention recorded SelfAttention without its two fields;
    they print only when set, so such a run resumes as the same net."""
    assert repr(L.SelfAttention(2)) == ("SelfAttention(heads=2, causal=True, compute_dtype="
                                        "None, activation_dtype=None, block=None)")
    assert repr(L.SelfAttention(2, rope=True, rope_base=5e5, kv_heads=1)).endswith(
        "block=None, rope=True, rope_base=500000.0, kv_heads=1)")
    assert repr(L.Dense(3)) == ("Dense(units=3, activation='identity', compute_dtype=None, "
                                "activation_dtype=None)")          # bias: shown when False
    assert repr(L.GatedDense(3, bias=False)).endswith("activation_dtype=None, bias=False)")
    assert repr(L.SelfAttention(2, bias=False)).endswith("block=None, bias=False)")


BIAS_FREE = [(L.Dense(5, "tanh"), (3, 4)), (L.Dense(5, "gelu"), (2, 3, 4)),
             (L.GatedDense(3), (2, 4, 5)), (L.GatedDense(3, "gelu"), (3, 4)),
             (L.SelfAttention(2, rope=True, kv_heads=1), (2, 5, 4)),
             (L.SelfAttention(2, causal=False, block=2), (2, 5, 4)),
             (L.LayerNorm(), (2, 3, 4)),
             (L.Conv2D(3, 2, stride=2, padding="VALID", activation="tanh"), (2, 7, 7, 2)),
             (L.Conv2D(16, 3), (2, 2, 2, 8))]                 # formed and ghost norms


@pytest.mark.parametrize(("layer", "shape"), BIAS_FREE, ids=repr)
def test_a_bias_free_record_is_the_biased_one_at_zero_bias_less_its_biases(layer, shape,
                                                                          x64):
    """``bias=False`` drops the biases and nothing else: with the biased record's biases at
    0 and the same weights, the same output, input error and weight gradients, and the
    per-sample gradients, norms and clipped sum of the weights alone (the biased record's
    per-sample gradients less the bias leaves); no bias in the params or the K-FAC
    rows (A is (d_in, d_in))."""
    import dataclasses

    free = dataclasses.replace(layer, bias=False)
    rng = np.random.default_rng(11)
    x = jnp.asarray(rng.standard_normal(shape))
    kept = set(free.init(jax.random.key(0), shape[1:], jnp.float64))  # all but the biases
    params = {k: v + 0.3 * rng.standard_normal(v.shape) if k in kept else v
              for k, v in layer.init(jax.random.key(0), shape[1:], jnp.float64).items()}
    weights = {k: v for k, v in params.items() if k in kept}
    assert len(params) == 2 * len(weights)                  # a bias for every weight
    out, cache = layer.forward(params, x)
    out_free, cache_free = free.forward(weights, x)
    np.testing.assert_allclose(out_free, out, rtol=1e-13, atol=1e-14)
    delta = jnp.asarray(rng.standard_normal(out.shape))
    (d_in, grads), (d_in_free, grads_free) = (layer.backward(params, cache, delta),
                                              free.backward(weights, cache_free, delta))
    assert set(grads_free) == set(weights)
    np.testing.assert_allclose(d_in_free, d_in, rtol=1e-12, atol=1e-14)
    per_sample = {k: v for k, v in layer.per_sample_grads(params, cache, delta).items()
                  if k in kept}
    for k in weights:
        np.testing.assert_allclose(grads_free[k], grads[k], rtol=1e-12, atol=1e-14)
        np.testing.assert_allclose(free.per_sample_grads(weights, cache_free, delta)[k],
                                   per_sample[k], rtol=1e-12, atol=1e-14)
    want_sq = sum(jnp.sum(g.reshape(len(x), -1) ** 2, axis=1) for g in per_sample.values())
    np.testing.assert_allclose(free.per_sample_sq_norms(weights, cache_free, delta),
                               want_sq, rtol=1e-12)
    if hasattr(free, "per_sample_sq_norms_and_sum"):
        sq, weighted = free.per_sample_sq_norms_and_sum(weights, cache_free, delta)
        np.testing.assert_allclose(sq, want_sq, rtol=1e-12)
        w = jnp.asarray(rng.random(len(x)))
        for k, v in weighted(w).items():
            np.testing.assert_allclose(v, jnp.einsum("b,b...->...", w, per_sample[k]),
                                       rtol=1e-12, atol=1e-14)
    if hasattr(free, "backward_kept"):
        errors = free.backward_kept(weights, cache_free, delta)[2]
        scale = L.kfac.KfacScale(len(x), len(x), expand=True)
        for name, block in free.kfac_factors(weights, cache_free, jax.tree.map(
                lambda e: e[None], errors), scale, "layers[0]").items():
            assert block["A"].shape == (weights[f"w{name}"].shape[0],) * 2, name


def test_rotary_angles_of_a_bf16_layer_are_turned_in_float32():
    """Angles t f at t in the hundreds carry a bf16 rounding of a tenth of their cosine;
    a bf16 layer turns Q and K by float32 angles, so at T = 512 its turned Q stays within
    bf16 rounding (2^-8) of the float32 layer's with the same params."""
    layer = L.SelfAttention(2, rope=True)
    rng = np.random.default_rng(7)
    params = {k: (v + 0.3 * rng.standard_normal(v.shape)).astype(jnp.bfloat16)
              for k, v in layer.init(jax.random.key(0), (512, 8), jnp.float32).items()}
    x = rng.standard_normal((1, 512, 8)).astype(np.float32)
    low = layer.forward(params, jnp.asarray(x, jnp.bfloat16))[1][1].astype(np.float32)
    wide = layer.forward({k: v.astype(jnp.float32) for k, v in params.items()},
                         jnp.asarray(x))[1][1]                      # the turned Q
    assert global_rel_error(low, wide) < 2 ** -7


def test_mlp_hidden_sets_the_feed_forward_width():
    """``mlp_hidden`` in place of ``mlp_ratio dim``: a SwiGLU of hidden 8 d / 3 holds the
    parameters of GPT-2's ratio-4 MLP (three weights of d x 8d/3, two of d x 4d)."""
    llama = models.gpt(7, 12, 1, 2, 4, mlp="swiglu", mlp_hidden=32, bias=False)
    gpt2 = models.gpt(7, 12, 1, 2, 4, bias=False)
    (_, gated, out), (_, dense, _) = llama.layers[2].layers, gpt2.layers[2].layers
    assert gated == L.GatedDense(32, bias=False) and out == L.Dense(12, bias=False)
    assert dense == L.Dense(48, "gelu", bias=False)

    def count(net):
        return sum(a.size for a in jax.tree.leaves(net.init(jax.random.key(0))[2]))

    assert count(llama) == count(gpt2) == 3 * 12 * 32 + 12


def test_params_of_another_bias_setting_are_refused_by_path():
    """A biased net's params given to the bias-free one (and back): a TypeError naming the
    first leaves that are extra or missing by path, before XLA sees them; a list where
    the tuple belongs still shows both structures."""
    free, biased = models.gpt(20, 16, 1, 2, 8, bias=False), models.gpt(20, 16, 1, 2, 8)
    x = np.ones((2, 8), np.int32)
    with pytest.raises(TypeError, match=r"it has params\[1\]\[0\]\['bias'\], params\[1\]"
                                        r"\[1\]\['bk'\], params\[1\]\[1\]\['bo'\], \.\.\. "
                                        r"\(10 in all\), which net.init does not give"):
        free.apply(biased.init(jax.random.key(0)), x)
    with pytest.raises(TypeError, match=r"it lacks params\[1\]\[0\]\['bias'\]"):
        jaxbp.value_and_backprop(biased, free.init(jax.random.key(0)), x, x)
    with pytest.raises(TypeError, match=r"expected PyTreeDef\(\(.*got PyTreeDef\(\["):
        free.apply(list(free.init(jax.random.key(0))), x)
