"""A tied embedding (GPT-2's): the head's weight is the token table, transposed, held once;
its gradient the sum of both uses, and a sample's norm their cross term too, against
jax.grad / vmap(grad) of the same forward in float64."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import global_rel_error

import jaxbp
from jaxbp import feedback, models
from jaxbp import layers as L
from jaxbp.check.suite import random_tokens


def tied_case(dtype="float64", **style):
    net = models.gpt(vocab=13, dim=8, depth=1, heads=2, seq_len=6, dtype=dtype,
                     tie_embedding=True, **style)
    params = net.init(jax.random.key(0))
    rng = np.random.default_rng(1)         # away from init: zero biases, unit scales
    params = jax.tree.map(lambda a: a + jnp.asarray(0.2 * rng.standard_normal(a.shape),
                                                    a.dtype), params)
    x, y = random_tokens(np.random.default_rng(2), net, 3)
    return net, params, jnp.asarray(x), jnp.asarray(y)


LLAMA = dict(norm="rms", positions="rope", mlp="swiglu", bias=False)


@pytest.mark.parametrize("style", [{}, LLAMA], ids=["gpt2", "llama"])
def test_the_table_is_held_once_and_its_gradient_sums_both_uses(style, x64):
    net, params, x, y = tied_case(**style)
    untied = models.gpt(vocab=13, dim=8, depth=1, heads=2, seq_len=6, **style)
    assert "w" not in params[-1] and set(params[-1]) == ({"b"} if not style else set())
    count = sum(a.size for a in jax.tree.leaves(params))
    assert count == sum(a.size for a in jax.tree.leaves(untied.param_shapes())) - 13 * 8
    # the head reads E^T: the logits are h E^T + b
    logits = net.apply(params, x)
    seen = jaxbp.tied_embedding.layer_params(net, params)
    np.testing.assert_array_equal(seen[-1]["w"], params[0]["tokens"].T)
    assert logits.shape == (3, 6, 13)
    loss_m, grads_m = jaxbp.value_and_backprop(net, params, x, y)
    loss_r, grads_r = jax.value_and_grad(net.cost)(params, x, y)
    np.testing.assert_allclose(loss_m, loss_r, rtol=1e-13)
    assert jax.tree.structure(grads_m) == jax.tree.structure(params)
    assert global_rel_error(grads_m, grads_r) <= 1e-12
    # the table's gradient is not the embedding's alone: the head's use is in it
    untied_grads = jaxbp.backprop(dataclasses_replace(net, tie_embedding=False), seen, x, y)
    both = untied_grads[0]["tokens"] + untied_grads[-1]["w"].T
    np.testing.assert_allclose(grads_m[0]["tokens"], both, rtol=1e-12, atol=1e-15)
    assert global_rel_error(untied_grads[0]["tokens"], both) > 1e-3
    # jax.grad through apply_with_manual_vjp runs the recursion and ties it the same way
    vjp = jax.grad(lambda p: jnp.sum(jaxbp.apply_with_manual_vjp(net, p, x) ** 2))(params)
    ref = jax.grad(lambda p: jnp.sum(net.apply(p, x) ** 2))(params)
    assert global_rel_error(vjp, ref) <= 1e-12


def dataclasses_replace(net, **changes):
    import dataclasses

    return dataclasses.replace(net, **changes)


def sample_loss(net, params, x_i, y_i):
    logits = net.apply(params, x_i[None])[0]
    counted = y_i >= 0
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(counted, y_i, 0))
    return jnp.sum(jnp.where(counted, ce, 0)) / y_i.shape[0]


def test_per_sample_quantities_carry_the_tables_cross_term(x64):
    """||g_i||^2 = ||g_i^E||^2 + ||g_i^W||^2 + 2 <g_i^E, (g_i^W)^T> + the rest: the norms,
    the clipped mean (one pass, global clip norm), the per-example gradients, their
    variance and the DP-SGD mean (no noise) against vmap(grad); H v by forward mode over
    the tied gradient against jax's."""
    net, params, x, y = tied_case()
    per_sample = jax.vmap(jax.grad(lambda p, xi, yi: sample_loss(net, p, xi, yi)),
                          in_axes=(None, 0, 0))(params, x, y)
    rows = np.concatenate([np.asarray(a).reshape(3, -1) for a in jax.tree.leaves(per_sample)],
                          axis=1)
    norms = np.linalg.norm(rows, axis=1)
    assert global_rel_error(jaxbp.per_example_grads(net, params, x, y), per_sample) <= 1e-12
    np.testing.assert_allclose(jaxbp.per_example_grad_norms(net, params, x, y), norms,
                               rtol=1e-12)
    clip = 0.6 * float(np.median(norms))
    factors = np.minimum(1, clip / norms)
    clipped = jax.tree.map(lambda g: jnp.tensordot(jnp.asarray(factors), g, 1) / 3, per_sample)
    assert global_rel_error(jaxbp.clipped_grad(net, params, x, y, clip), clipped) <= 1e-12
    dp = jaxbp.dp_sgd_grad(net, params, x, y, clip, 0.0, jax.random.key(0))
    assert global_rel_error(dp, clipped) <= 1e-12
    variance = jax.tree.map(lambda g: jnp.var(g, axis=0), per_sample)
    got = jaxbp.per_example_grad_variance(net, params, x, y)
    assert global_rel_error(got, variance) <= 1e-12
    v = jax.tree.map(lambda a: jnp.asarray(np.random.default_rng(3).standard_normal(a.shape)),
                     params)
    hv = jax.jvp(lambda p: jax.grad(net.cost)(p, x, y), (params,), (v,))[1]
    assert global_rel_error(jaxbp.hvp(net, params, x, y, v), hv) <= 1e-12


def test_training_ties_the_same_way_by_every_gradient_source(x64):
    """Three sgd steps by backprop and by autodiff give the same params; sign symmetry
    (a feedback rule: the head's error passes back through sign(E)) trains the tied params
    too."""
    net, params, x, y = tied_case()
    results = {}
    for name, grad in (("backprop", "backprop"), ("autodiff", "autodiff"),
                       ("sign", feedback.sign_symmetry())):
        step = jaxbp.make_train_step(net, optax.sgd(0.1), grad=grad, donate=False)
        state = jaxbp.TrainState.create(params, optax.sgd(0.1))
        for _ in range(3):
            state, _ = step(state, x, y)
        assert jax.tree.structure(state.params) == jax.tree.structure(params)
        results[name] = state.params
    assert global_rel_error(results["backprop"], results["autodiff"]) <= 1e-12
    assert global_rel_error(results["sign"], results["backprop"]) > 1e-6   # another rule


def test_what_a_tie_needs_and_what_does_not_take_one(x64):
    net, params, x, y = tied_case()
    for quantity, call in (
            ("the GGN diagonal", lambda: jaxbp.ggn_diag(net, params, x, y)),
            ("K-FAC", lambda: jaxbp.kfac_factors(net, params, x, y, kind="empirical"))):
        with pytest.raises(ValueError, match=f"{quantity} does not take a network with "
                                             f"tie_embedding=True"):
            call()
    with pytest.raises(ValueError, match="clip_norm must be one number for a network with "
                                         "tie_embedding=True"):
        jaxbp.clipped_grad(net, params, x, y, [1.0] * 4)
    with pytest.raises(L.LayerError, match=r"token table of an Embedding first, but "
                                           r"layers\[0\] is a Dense"):
        jaxbp.Network((L.Dense(4), L.Dense(3)), (4,), tie_embedding=True)
    with pytest.raises(L.LayerError, match=r"layers\[2\] \(GatedDense\) has params "
                                           r"\['bg', 'bu', 'wg', 'wu'\]: end with a Dense"):
        jaxbp.Network((L.Embedding(5, 4), L.LayerNorm(), L.GatedDense(5)), (3,),
                      input_dtype="int32", tie_embedding=True)
    with pytest.raises(L.LayerError, match=r"the head layers\[2\] \(Dense\) has a weight of "
                                           r"shape \(6, 5\), but the token table transposed "
                                           r"is \(dim, vocab\) = \(4, 5\)"):
        jaxbp.Network((L.Embedding(5, 4), L.Dense(6), L.Dense(5)), (3,),
                      input_dtype="int32", tie_embedding=True)
    with pytest.raises(TypeError, match="gpt tie_embedding must be True or False, got 'yes'"):
        models.gpt(5, 4, 1, 2, 3, tie_embedding="yes")
    # a net built as before prints as before (saved runs compare reprs)
    assert "tie_embedding" not in repr(models.gpt(5, 4, 1, 2, 3))
    assert repr(models.gpt(5, 4, 1, 2, 3, tie_embedding=True)).endswith("tie_embedding=True)")
