"""The gradient-source protocol: every source returns a SourceResult, the old names warn."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbp
from jaxbp import feedback, privacy, sources

NET = jaxbp.MLP((4, 6, 3), "tanh")
X = np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32)
Y = np.arange(8) % 3


def _every_source():
    key = jax.random.key(1)
    return {
        "backprop": sources.backprop(), "autodiff": sources.autodiff(),
        "clipped": sources.clipped(1.0), "dp_sgd": sources.dp_sgd(1.0, 0.5, key),
        "kfac": sources.kfac(), "alignment": sources.alignment(
            feedback.random_feedback(NET, key)),
        "sign_symmetry": sources.sign_symmetry(),
        "direct": sources.direct(feedback.random_feedback(NET, key, kind="direct")),
    }


@pytest.mark.parametrize("name", sorted(_every_source()))
def test_every_source_returns_a_source_result_and_trains(name):
    source = _every_source()[name]
    params = NET.init(jax.random.key(0))
    assert isinstance(source, sources.GradientSource)
    result = source(NET, params, jnp.asarray(X), jnp.asarray(Y), jnp.int32(0))
    assert isinstance(result, sources.SourceResult)
    assert jax.tree.structure(result.grads) == jax.tree.structure(params)
    assert result.output.shape == (8, 3) and result.loss.shape == ()
    assert set(result.extras) == ({"factors"} if name == "kfac" else set())
    optimizer = optax.sgd(0.1)
    if name == "kfac":
        optimizer = optax.chain(jaxbp.kfac_preconditioner(1e-2), optimizer)
    step = jaxbp.make_train_step(NET, optimizer, grad=source)
    _, metrics = step(jaxbp.TrainState.create(params, optimizer), X, Y)
    assert np.isfinite(float(metrics["loss"]))


def test_backprop_source_is_the_hand_written_gradient_and_named_by_the_step():
    params = NET.init(jax.random.key(0))
    result = sources.backprop()(NET, params, jnp.asarray(X), jnp.asarray(Y), 0)
    value, grads = jaxbp.value_and_backprop(NET, params, X, Y)
    np.testing.assert_allclose(result.loss, value, rtol=1e-6)   # eager vs compiled fusion
    for a, b in zip(jax.tree.leaves(result.grads), jax.tree.leaves(grads)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    assert jaxbp.train.GRADIENTS["backprop"] is sources.NAMED["backprop"]


def test_a_users_plain_tuple_source_is_read():
    def mine(net, params, x, y, step):
        value, grads = jaxbp.value_and_backprop(net, params, x, y)
        return value, grads, net.apply(params, x)

    params = NET.init(jax.random.key(0))
    step = jaxbp.make_train_step(NET, optax.sgd(0.1), grad=mine)
    _, metrics = step(jaxbp.TrainState.create(params, optax.sgd(0.1)), X, Y)
    assert np.isfinite(float(metrics["loss"]))
    with pytest.raises(TypeError, match="must return \\(loss, grads, output\\[, extras\\]\\), "
                                        "got list from"):
        sources.as_result([1, 2, 3], mine)
    with pytest.raises(TypeError, match="fourth element must be a dict"):
        sources.as_result((1, 2, 3, 4), mine)


def test_masked_dp_sgd_divides_by_the_expected_batch_and_ignores_padding():
    params = NET.init(jax.random.key(0))
    mask = jnp.arange(8) < 5
    source = sources.dp_sgd(1.0, 0.0, jax.random.key(2), expected_batch_size=10.0)
    got = source(NET, params, jnp.asarray(X), jnp.asarray(Y), 0, mask=mask).grads
    want = jaxbp.clipped_grad(NET, params, X[:5], Y[:5], 1.0)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(a, b * 5 / 10, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="expected_batch_size must be a finite number > 0"):
        sources.dp_sgd(1.0, 1.0, jax.random.key(0), expected_batch_size=0)
    with pytest.raises(TypeError, match="the backprop source takes no mask"):
        sources.backprop()(NET, params, jnp.asarray(X), jnp.asarray(Y), 0, mask=mask)
    # a short mask was a broadcasting error; an int or float one weighed the rows
    for masked in (sources.clipped(1.0), source,
                   sources.dp_sgd(1.0, 0.0, jax.random.key(2), microbatch=2)):
        for bad in (mask[:5], mask.astype(jnp.int32), mask * 0.5):
            with pytest.raises(ValueError, match=r"mask must be booleans of shape \(8,\) "
                                                 r"\(one per row of x\), got"):
                masked(NET, params, jnp.asarray(X), jnp.asarray(Y), 0, mask=bad)
    loop = jaxbp.make_train_loop(NET, optax.sgd(0.1), steps=2, grad=source, donate=False)
    state = jaxbp.TrainState.create(params, optax.sgd(0.1))
    xs, ys = np.stack([X, X]), np.stack([Y, Y])           # the loop's masks, the same check
    with pytest.raises(ValueError, match=r"masks must be booleans of shape \(2, 8\) \(one "
                                         r"per row of xs\), got int32 \(2, 8\)"):
        loop(state, xs, ys, np.ones((2, 8), np.int32))
    assert int(loop(state, xs, ys, np.stack([mask, mask]))[1]["batch_size"][0]) == 5


@pytest.mark.parametrize("old, call, new", [
    ("clipped_gradient", lambda: jaxbp.clipped_gradient(1.0), "sources.clipped"),
    ("dp_sgd_gradient", lambda: jaxbp.dp_sgd_gradient(1.0, 1.0, jax.random.key(0)),
     "sources.dp_sgd"),
    ("privacy.dp_gradient", lambda: privacy.dp_gradient(1.0, 1.0, 4.0, jax.random.key(0)),
     "sources.dp_sgd"),
])
def test_old_source_names_warn_and_give_the_same_source(old, call, new):
    with pytest.warns(DeprecationWarning, match=f"jaxbp.{old} is deprecated: use jaxbp.{new}"):
        source = call()
    assert source.__qualname__ == new
