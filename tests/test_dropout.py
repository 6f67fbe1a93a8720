"""Dropout: inverted dropout in training steps (masks from the step's key), the identity
when evaluating; its backward the mask, against jax.vjp / jax.grad with the same masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_no_less_accurate, global_rel_error, to_f64

import jaxbp
from jaxbp import cli, models, network, sources
from jaxbp import layers as L
from jaxbp.check.suite import random_tokens


def test_the_record_keeps_1_minus_p_scaled_and_its_backward_is_the_mask(x64):
    layer = L.Dropout(0.3)
    x = jnp.asarray(np.random.default_rng(0).standard_normal((200, 50)))
    same, cache = layer.forward({}, x)                  # no key: evaluation, the identity
    assert same is x and cache is None
    out, mask = layer.forward({}, x, key=jax.random.key(1))
    kept = np.asarray(mask)
    assert mask.dtype == jnp.bool_                          # a byte per activation
    assert abs(1 - kept.mean() - 0.3) < 0.02                # 10,000 draws: sd 0.005
    np.testing.assert_allclose(np.asarray(out)[kept], np.asarray(x)[kept] / 0.7, rtol=1e-15)
    assert np.all(np.asarray(out)[~kept] == 0)
    delta = jnp.asarray(np.random.default_rng(2).standard_normal(x.shape))
    _, vjp = jax.vjp(lambda v: layer.forward({}, v, key=jax.random.key(1))[0], x)
    back, grads = layer.backward({}, mask, delta)
    np.testing.assert_allclose(back, vjp(delta)[0], rtol=1e-15)
    assert grads == {} and layer.backward({}, mask, delta, need_input=False)[0] is None
    assert L.Dropout(0).forward({}, x, key=jax.random.key(1))[0] is x
    with jax.enable_x64(False):           # the same masks in 32-bit mode (a float32 draw)
        assert np.array_equal(layer.forward({}, x.astype(jnp.float32),
                                            key=jax.random.key(1))[1], mask)
    for bad in (1.0, -0.1, True, "0.1", float("nan")):
        with pytest.raises(ValueError, match=r"Dropout rate must be a number in \[0, 1\)"):
            L.Dropout(bad)
    with pytest.raises(ValueError, match=r"gpt dropout must be a number in \[0, 1\), got 1.5"):
        models.gpt(5, 4, 1, 2, 3, dropout=1.5)


def dropout_gpt(dtype="float64", **style):
    net = models.gpt(vocab=11, dim=8, depth=2, heads=2, seq_len=6, dtype=dtype, dropout=0.25,
                     **style)
    params = net.init(jax.random.key(0))
    x, y = random_tokens(np.random.default_rng(1), net, 3, ignored=0.0)
    return net, params, jnp.asarray(x), jnp.asarray(y)


@pytest.mark.parametrize("style", [{}, {"tie_embedding": True, "norm": "rms"}],
                         ids=["gpt2", "tied-rms"])
def test_a_steps_masks_are_the_same_for_backprop_and_jax_grad(style, x64):
    """Dropout after the embedding and in each block's two branches; step t's masks from
    fold_in(key(0), t): the hand-written gradient equals jax.grad's with the same masks
    (1e-12), they change the gradient, and three train steps (and the 3-step loop) give
    the same params by either gradient. Evaluation draws nothing."""
    net, params, x, y = dropout_gpt(**style)
    assert [type(l).__name__ for l in net.layers[:2]] == ["Embedding", "Dropout"]
    assert all(type(b.layers[-1]).__name__ == "Dropout" for b in net.layers[2:-2])
    key = network.step_key(net, jnp.int32(5))
    manual = sources.backprop()(net, params, x, y, jnp.int32(5))
    reference = sources.autodiff()(net, params, x, y, jnp.int32(5))
    np.testing.assert_allclose(manual.loss, reference.loss, rtol=1e-13)
    assert global_rel_error(manual.grads, reference.grads) <= 1e-12
    assert global_rel_error(manual.grads, jaxbp.backprop(net, params, x, y)) > 1e-2
    plain = models.gpt(vocab=11, dim=8, depth=2, heads=2, seq_len=6)
    assert network.step_key(plain, jnp.int32(5)) is None     # no dropout: no random op
    # the clipped source (no clipping) reads the same masks: the same gradient
    clipped = sources.clipped(float("inf"))(net, params, x, y, jnp.int32(5))
    assert global_rel_error(clipped.grads, manual.grads) <= 1e-12
    ends = {}
    for grad in ("backprop", "autodiff"):
        step = jaxbp.make_train_step(net, optax.sgd(0.1), grad=grad, donate=False)
        state = jaxbp.TrainState.create(params, optax.sgd(0.1))
        for _ in range(3):
            state, _ = step(state, x, y)
        ends[grad] = state.params
    assert global_rel_error(ends["backprop"], ends["autodiff"]) <= 1e-12
    loop = jaxbp.make_train_loop(net, optax.sgd(0.1), steps=3, donate=False)
    looped, _ = loop(jaxbp.TrainState.create(params, optax.sgd(0.1)), jnp.stack([x] * 3),
                     jnp.stack([y] * 3))
    assert global_rel_error(looped.params, ends["backprop"]) <= 1e-12
    assert float(net.cost(params, x, y)) == float(net.cost(params, x, y))
    # verify_grads with a step's masks: backprop vs jax.grad, FD and Taylor on the masked cost
    report = jaxbp.verify_mlp(net, params, x, y, key=key)
    assert not report.failed and "verify_grads: OK" in report.summary(), report


def test_a_private_run_and_the_cli_take_dropout(x64, capsys):
    """DP-SGD's per-sample errors come from the step's masked forward (each sample its
    own rows of the masks); --dropout is a GPT's option, its rate checked."""
    net, params, x, y = dropout_gpt()
    source = sources.dp_sgd(1.0, 0.0, jax.random.key(3))
    private = source(net, params, x, y, jnp.int32(2))
    clipped = sources.clipped(1.0)(net, params, x, y, jnp.int32(2))
    assert global_rel_error(private.grads, clipped.grads) <= 1e-12
    assert cli.main(["train", "--dropout", "0.1"]) == 2
    assert "--dropout shapes a GPT (--model gpt), but --model is mlp" in \
        capsys.readouterr().err
    assert cli.main(["train", "--model", "gpt", "--dropout", "1"]) == 2
    assert "--dropout must be a rate in [0, 1), got 1" in capsys.readouterr().err


def test_the_bf16_recipe_with_dropout_is_as_accurate_as_jax_grads():
    """bf16 activations, errors and operands with the step's masks: the manual gradient
    no further from the float64 truth (the same masks: a float32 draw in either mode) than
    jax.grad of the same recipe, by the bf16 tests' criterion."""
    net = models.gpt(vocab=11, dim=16, depth=1, heads=2, seq_len=8, dropout=0.2,
                     compute_dtype="bfloat16", activation_dtype="bfloat16")
    params = net.init(jax.random.key(0))
    x, y = map(jnp.asarray, random_tokens(np.random.default_rng(4), net, 4))
    step = jnp.int32(7)
    manual = sources.backprop()(net, params, x, y, step).grads
    autodiff = sources.autodiff()(net, params, x, y, step).grads
    exact = models.gpt(vocab=11, dim=16, depth=1, heads=2, seq_len=8, dropout=0.2,
                       dtype="float64")
    with jax.enable_x64(True):
        truth = sources.autodiff()(exact, to_f64(params), x, y, step).grads
    assert_no_less_accurate(manual, autodiff, truth, "bfloat16")
    assert global_rel_error(manual, truth) < 0.05
