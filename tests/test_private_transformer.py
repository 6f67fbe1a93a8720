"""Per-sample quantities of transformers (per-example grads and norms, clipped sums, the
variance, DP-SGD) from one backward pass, against jax.vmap(jax.grad(...)) of each
sample's own loss.

A sample's loss is the mean over its T positions of the token losses, padded targets
(-1) adding 0: l_i = (1/T) sum_{t: y_it >= 0} CE(logits_it, y_it). It depends on sample
i alone (what DP's sensitivity needs); the reference below writes it out with optax.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    assert_no_less_accurate,
    assert_normwise_close,
    global_rel_error,
    to_f64,
    transformer_case,
)

import jaxbp
from jaxbp import models, sources
from jaxbp.check.suite import random_tokens


def sample_loss(net, params, x_i, y_i):
    """(1/T) sum over counted positions of the softmax cross-entropy, written by optax."""
    logits = net.apply(params, x_i[None])[0]
    counted = y_i >= 0
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.where(counted, y_i, 0))
    return jnp.sum(jnp.where(counted, ce, 0)) / y_i.shape[0]


def vmap_grads(net, params, x, y):
    return jax.vmap(jax.grad(lambda p, xi, yi: sample_loss(net, p, xi, yi)),
                    in_axes=(None, 0, 0))(params, x, y)


def per_sample_rows(grads, groups=None) -> np.ndarray:
    """(B, P) float64 rows of a per-example grads tuple (only layers ``groups`` if given)."""
    layers = [grads[l] for l in groups] if groups is not None else list(grads)
    leaves = jax.tree.leaves(to_f64(layers))
    return np.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], axis=1)


def clipped_reference(per_sample, clip, groups):
    """mean_i sum_l s_il g_il: s_il = min(1, C/||g_i||) (one C) or min(1, C_l/||g_il||)."""
    rows = [per_sample_rows(per_sample, [l]) for l in groups]
    if np.ndim(clip) == 0:
        norms = np.sqrt(sum(np.sum(r**2, axis=1) for r in rows))
        factors = [np.minimum(1, clip / np.where(norms > 0, norms, 1))] * len(rows)
    else:
        factors = [np.minimum(1, c / np.where(n > 0, n, 1)) for c, n in
                   zip(clip, (np.linalg.norm(r, axis=1) for r in rows))]
    return np.concatenate([(r * f[:, None]).mean(axis=0) for r, f in zip(rows, factors)])


def flat(grads) -> np.ndarray:
    return np.concatenate([leaf.ravel() for leaf in jax.tree.leaves(to_f64(grads))])


def normwise(a, b) -> float:
    err = np.max(np.abs(a - b), initial=0.0)
    return 0.0 if err == 0 else err / np.max(np.abs(b))


# T = 1 with one sample's only target padded (a zero gradient), and T = 8 with padding
# (the deeper chains of the suite were checked the same way by hand: worst 1.0e-13)
@pytest.mark.slow
@pytest.mark.parametrize("i", [0, 6])
def test_per_sample_quantities_match_vmap_grad_in_float64(i, x64):
    net, params, x, y = transformer_case(i, "float64")
    reference = vmap_grads(net, params, x, y)
    groups = [l for l, p in enumerate(params) if jax.tree.leaves(p)]

    assert global_rel_error(jaxbp.per_example_grads(net, params, x, y), reference) <= 1e-12
    rows = per_sample_rows(reference)
    norms = np.linalg.norm(rows, axis=1)
    manual_norms = np.asarray(jaxbp.per_example_grad_norms(net, params, x, y))
    np.testing.assert_allclose(manual_norms, norms, rtol=1e-12, atol=1e-14 * norms.max())

    clip = 0.5 * float(np.median(norms[norms > 0]))     # clips about half the samples
    got = flat(jaxbp.clipped_grad(net, params, x, y, clip))
    assert normwise(got, clipped_reference(reference, clip, groups)) <= 1e-12
    layer_clip = np.linspace(0.05, 0.5, len(groups))
    if net.tie_embedding:           # case 0, 6: the table serves two layers' groups
        with pytest.raises(ValueError, match="clip_norm must be one number for a network "
                                             "with tie_embedding=True"):
            jaxbp.clipped_grad(net, params, x, y, layer_clip)
    else:
        got = flat(jaxbp.clipped_grad(net, params, x, y, layer_clip))
        assert normwise(got, clipped_reference(reference, layer_clip, groups)) <= 1e-12

    if x.shape[0] > 1:
        got = flat(jaxbp.per_example_grad_variance(net, params, x, y))
        assert normwise(got, rows.var(axis=0)) <= 1e-12


def test_every_records_sq_norms_are_those_of_its_per_sample_grads(x64):
    """The protocol's ``per_sample_sq_norms`` of each record of a GPT (token embedding,
    the Residual blocks and, inside them, the norms, attention and token-wise Dense layers;
    the Dense head) against the squared norms of its ``per_sample_grads``: the norms route
    reads ``per_sample_sq_norms_and_sum``, so a record's own ``per_sample_sq_norms`` on
    tokens ran in no test before."""
    from jaxbp.layers.chain import chain_backward

    net, params, x, y = transformer_case(6, "float64")
    _, _, caches, deltas = jaxbp.network.per_sample_deltas(net, params, x, y)
    checked = []

    def check(layers, layer_params, layer_caches, layer_deltas):
        for layer, p, cache, delta in zip(layers, layer_params, layer_caches, layer_deltas):
            if not jax.tree.leaves(p):
                continue
            grads = layer.per_sample_grads(p, cache, delta)
            want = sum(np.sum(np.asarray(g).reshape(len(x), -1) ** 2, axis=1)
                       for g in jax.tree.leaves(grads))
            got = np.asarray(layer.per_sample_sq_norms(p, cache, delta))
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14 * want.max())
            checked.append(type(layer).__name__)
            if hasattr(layer, "layers"):              # a Residual: its inner records too
                inner = chain_backward(layer.layers, p, cache, delta, False)[2]
                check(layer.layers, p, cache, inner)

    check(net.layers, jaxbp.tied_embedding.layer_params(net, params), caches, deltas)
    assert {"Embedding", "Residual", "SelfAttention", "Dense"} <= set(checked), checked
    assert {"LayerNorm", "RMSNorm"} & set(checked), checked


@pytest.mark.slow
def test_per_sample_quantities_in_float32_are_as_accurate_as_vmap_grad():
    net, params, x, y = transformer_case(6, "float32")
    with jax.default_matmul_precision("highest"):
        manual = jaxbp.per_example_grads(net, params, x, y)
        manual_norms = jaxbp.per_example_grad_norms(net, params, x, y)
        autodiff = vmap_grads(net, params, x, y)
    with jax.enable_x64(True):
        net64 = dataclasses.replace(net, dtype="float64")
        truth = vmap_grads(net64, to_f64(params), x, y)
    assert_no_less_accurate(manual, autodiff, truth, "float32")
    true_norms = np.linalg.norm(per_sample_rows(truth), axis=1)
    autodiff_error = np.max(np.abs(np.linalg.norm(per_sample_rows(autodiff), axis=1)
                                   - true_norms) / true_norms)
    manual_error = np.max(np.abs(np.asarray(manual_norms, np.float64) - true_norms)
                          / true_norms)
    assert manual_error <= max(1e-5, 2 * autodiff_error), (manual_error, autodiff_error)


@pytest.mark.slow
def test_dp_sgd_of_a_gpt_ignores_padded_rows_and_padded_tokens(x64):
    """Poisson batches arrive padded: a masked row reaches nothing, a -1 token adds 0, the
    sum is divided by the expected batch size; with noise the grads move by N(0, (sC/b)^2)."""
    net = models.gpt(vocab=7, dim=8, depth=1, heads=2, seq_len=5, dtype="float64")
    params = net.init(jax.random.key(0))
    x, y = random_tokens(np.random.default_rng(0), net, 6)
    x, y = jnp.asarray(x), jnp.asarray(y)
    mask = jnp.arange(6) < 4
    clean = sources.dp_sgd(0.3, 0.0, jax.random.key(1), expected_batch_size=8.0)
    got = jax.jit(clean, static_argnums=0)(net, params, x, y, 0, mask=mask)  # as in a step
    want = jaxbp.clipped_grad(net, params, x[:4], y[:4], 0.3)
    assert global_rel_error(got.grads, jax.tree.map(lambda g: g * 4 / 8, want)) <= 1e-12
    losses = jax.vmap(lambda xi, yi: sample_loss(net, params, xi, yi))(x[:4], y[:4])
    np.testing.assert_allclose(got.loss, jnp.mean(losses), rtol=1e-12)

    noisy = sources.dp_sgd(0.3, 2.0, jax.random.key(1), expected_batch_size=8.0)
    noise = flat(jax.jit(noisy, static_argnums=0)(net, params, x, y, 0, mask=mask).grads) \
        - flat(got.grads)
    assert abs(np.std(noise) / (2.0 * 0.3 / 8) - 1) < 0.1 and abs(np.mean(noise)) < 0.01


@pytest.mark.slow
def test_private_gpt_trains_with_fit():
    """fit with Privacy trains a GPT: the loss falls, and the epsilon spent is reported."""
    net = models.gpt(vocab=6, dim=8, depth=1, heads=2, seq_len=4)
    rng = np.random.default_rng(0)
    x = ((np.arange(4)[None] + rng.integers(0, 6, (80, 1))) % 6).astype(np.int32)
    y = (x + 1) % 6                                      # the next token, counting up mod 6
    data = jaxbp.data.Dataset(x[:64], y[:64], x[64:], y[64:])
    result = jaxbp.fit(net, optax.adam(3e-2), data, epochs=6, batch_size=16,
                       key=jax.random.key(0), progress=False, privacy=jaxbp.privacy.Privacy(
                           clip_norm=1.0, noise_multiplier=0.5, delta=1e-3))
    losses = result.history["train_loss"]
    assert losses[-1] < 0.5 * losses[0], losses
    assert 0 < result.history["epsilon"][-1] < np.inf


@pytest.mark.parametrize("t, d_in, d_out", [(2, 16, 16), (3, 8, 24), (16, 4, 4), (8, 6, 10)])
def test_token_weight_routes_give_the_formed_norms_and_sums(x64, t, d_in, d_out):
    """Both routes of a weight used at T positions (T x T Grams, or the formed g_i), for
    the norms alone and for the norms with the clipped sum, against the formed gradients
    in float64 (shapes on either side of both rules)."""
    from jaxbp.layers import token_grads

    rng = np.random.default_rng(t * 100 + d_in)
    x, e = rng.standard_normal((5, t, d_in)), rng.standard_normal((5, t, d_out))
    weights = rng.random(5)
    formed = np.einsum("btc,bto->bco", x, e)
    norms = np.sum(formed ** 2, axis=(1, 2))
    np.testing.assert_allclose(token_grads.weight_sq_norms(x, e), norms, rtol=1e-12)
    got_norms, weighted = token_grads.weight_sq_norms_and_sum(x, e)
    np.testing.assert_allclose(got_norms, norms, rtol=1e-12)
    assert_normwise_close(weighted(weights), np.einsum("b,bco->co", weights, formed),
                          rtol=1e-12)
    assert token_grads.prefers_ghost(t, d_in, d_out) == (t * (d_in + d_out) < d_in * d_out)
    assert not token_grads.prefers_ghost_with_sum(t, d_in, d_out) or \
        token_grads.prefers_ghost(t, d_in, d_out)            # the sum's rule is stricter
