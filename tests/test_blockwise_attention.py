"""SelfAttention(block=...): keys a block at a time, P never formed, the same gradient."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import (
    forbid_autodiff,
    global_rel_error,
    jaxpr_equations,
    leaf_rel_errors,
    to_f64,
    transformer_case,
)

import jaxbp
from jaxbp import layers as L
from jaxbp import network
from jaxbp.check.suite import random_tokens
from jaxbp.layers import precision


def with_block(net, block):
    """The same net with every SelfAttention (inner chains included) taking ``block``."""
    def one(layer):
        if isinstance(layer, L.SelfAttention):
            return dataclasses.replace(layer, block=block)
        if hasattr(layer, "layers"):
            return dataclasses.replace(layer, layers=tuple(one(inner) for inner in layer.layers))
        return layer

    return dataclasses.replace(net, layers=tuple(one(layer) for layer in net.layers))


def _attention_caches(net, params, x):
    """The caches of every SelfAttention of the forward pass."""
    _, caches = network.forward(net, params, x)
    return [cache[1] for layer, cache in zip(net.layers, caches)
            if isinstance(layer, L.Residual) and isinstance(layer.layers[1], L.SelfAttention)]


# cases the float64 transformer tests leave out: T 13, 9 and 3; causal and not; blocks
# that divide T, that do not (padded keys), of 1 and longer than T
@pytest.mark.parametrize("i, block", [(1, 4), (3, 1), (7, 5), (1, 32)])
def test_blockwise_gradient_is_the_plain_forms_autodiff_gradient(i, block, x64):
    net, params, x, y = transformer_case(i, "float64")
    blockwise = with_block(net, block)
    loss_m, grads_m = jaxbp.value_and_backprop(blockwise, params, x, y)
    loss_r, grads_r = jaxbp.value_and_autodiff(net, params, x, y)   # of the plain form
    np.testing.assert_allclose(loss_m, loss_r, rtol=1e-13)
    assert global_rel_error(grads_m, grads_r) <= 1e-12
    t = net.input_shape[0]
    for cache in _attention_caches(blockwise, params, x):   # (x, q, k, v, lse, O): no T x T
        assert cache[4].shape == (x.shape[0], cache[1].shape[1], t)


def test_blockwise_float32_and_bf16_are_as_accurate_as_jax_grad():
    """float32: manual blockwise no further from the float64 truth than 2x jax.grad of the
    plain form in float32. bf16 recipe: no further (1.1x) than jax.grad of the same
    blockwise forward in the same recipe (like with like: the blockwise form rounds its
    online softmax in its own order, and jax.grad of it as much; width 4 here, both about
    20% off in the tied case 3, where the plain form's jax.grad is 4% closer)."""
    net, params, x, y = transformer_case(3, "float32")
    with jax.enable_x64(True):
        net64 = dataclasses.replace(net, dtype="float64")
        truth = jaxbp.value_and_autodiff(net64, to_f64(params), x, y)[1]
    with jax.default_matmul_precision("highest"):
        manual = jaxbp.backprop(with_block(net, 4), params, x, y)
        autodiff = jaxbp.value_and_autodiff(net, params, x, y)[1]
    # per leaf, except leaves whose exact gradient is 0 (the key biases: softmax ignores
    # a per-row shift), which both hold rounding alone; the whole gradient normwise
    scale = max(float(np.max(np.abs(t))) for t in jax.tree.leaves(truth))
    worst = [(m, a) for m, a, t in zip(leaf_rel_errors(manual, truth),
                                       leaf_rel_errors(autodiff, truth), jax.tree.leaves(truth))
             if float(np.max(np.abs(t))) > 1e-8 * scale and m > max(1e-5, 2 * a)]
    assert not worst, worst
    assert global_rel_error(manual, truth) <= max(1e-6, 2 * global_rel_error(autodiff, truth))
    def bf16(n):
        return dataclasses.replace(n, layers=precision.with_recipe(
            n.layers, compute_dtype="bfloat16", activation_dtype="bfloat16"))

    recipe = bf16(with_block(net, 4))
    grads = jaxbp.backprop(recipe, params, x, y)
    same = jaxbp.value_and_autodiff(recipe, params, x, y)[1]
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype("float32")}
    assert global_rel_error(grads, truth) <= 1.1 * global_rel_error(same, truth) + 2e-3
    dots = jaxpr_equations(functools.partial(jaxbp.backprop, recipe), params, x, y,
                           primitive="dot_general")         # inside the scans included
    assert len(dots) >= 20 and all(v.aval.dtype == jnp.bfloat16
                                   for e in dots for v in e.invars)


def test_blockwise_runs_without_autodiff_and_its_quantities_match(monkeypatch, x64):
    """The no-autodiff guard runs the blockwise backward; per-example norms and the
    clipped sum (the attention's projection errors from the blockwise backward) equal the
    plain form's."""
    net, params, x, y = transformer_case(1, "float64")
    blockwise = with_block(net, 3)
    plain_norms = jaxbp.per_example_grad_norms(net, params, x, y)
    plain_clipped = jaxbp.clipped_grad(net, params, x, y, 0.5)
    forbid_autodiff(monkeypatch)
    grads = jaxbp.backprop(blockwise, params, x, y)
    assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
    np.testing.assert_allclose(jaxbp.per_example_grad_norms(blockwise, params, x, y),
                               plain_norms, rtol=1e-12)
    assert global_rel_error(jaxbp.clipped_grad(blockwise, params, x, y, 0.5),
                            plain_clipped) <= 1e-12


def test_gpt_takes_the_block_and_bad_blocks_are_named():
    gpt = jaxbp.models.gpt(11, 8, 2, 2, 16, attention_block=8)
    assert {layer.layers[1].block for layer in gpt.layers[1:-2:2]} == {8}
    for bad in (0, -1, 2.5, "8", True):
        with pytest.raises(ValueError, match=r"SelfAttention block must be None or an int "
                                             r">= 1, got"):
            L.SelfAttention(2, block=bad)


def test_blockwise_curvature_and_kfac_equal_the_plain_forms(x64):
    """ggn_diag (token errors through the blockwise backward, batched), hvp (forward mode
    over the blockwise gradient) and K-FAC's factors (attention's projection errors kept
    from the gradient's pass) equal the plain form's."""
    net = jaxbp.models.gpt(vocab=5, dim=4, depth=1, heads=2, seq_len=5, dtype="float64")
    blockwise = with_block(net, 2)
    params = net.init(jax.random.key(0))
    x, y = random_tokens(np.random.default_rng(0), net, 2)
    v = jax.tree.map(lambda a: jnp.asarray(np.random.default_rng(7).standard_normal(a.shape)),
                     params)
    for quantity in (lambda n: jaxbp.ggn_diag(n, params, x, y),
                     lambda n: jaxbp.hvp(n, params, x, y, v),
                     lambda n: jaxbp.kfac_factors(n, params, x, y, "empirical")):
        assert global_rel_error(quantity(blockwise), quantity(net)) <= 1e-12
