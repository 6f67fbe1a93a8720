"""Curvature of sequence outputs (a GPT): the GGN diagonal against jax.jacfwd/jax.hessian,
K-FAC's blocks for every transformer record (the "expand" convention: positions are
samples of their own), the preconditioner on them, and K-FAC training a GPT."""

from __future__ import annotations

import dataclasses

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_normwise_close, kfac_blocks

import jaxbp
from jaxbp import models
from jaxbp.check.suite import random_tokens

LLAMA = {"positions": "rope", "mlp": "swiglu", "bias": False}  # rotary, SwiGLU, no biases


def _gpt(seq_len=3, norm="layer", causal=True, dtype="float64", **style):
    return models.gpt(vocab=5, dim=4, depth=1, heads=2, seq_len=seq_len, mlp_ratio=1,
                      norm=norm, causal=causal, dtype=dtype, **style)


def _moved(net, seed=0):
    """Params away from init (zero biases, unit scales), so that every term shows."""
    return jax.tree.map(lambda a: a + jnp.asarray(
        0.3 * np.random.default_rng(seed + 1).standard_normal(a.shape), a.dtype),
        net.init(jax.random.key(seed)))


@pytest.mark.parametrize("style", [{}, LLAMA], ids=["gpt2", "llama"])
def test_ggn_diag_of_a_gpt_is_the_token_sum_of_jacobian_hessian_products(style, x64):
    """diag((1/M) sum over counted tokens (n, t) of J_nt^T H_nt J_nt), J from jax.jacfwd of
    the logits and H from jax.hessian of one token's loss; padded tokens add nothing."""
    net = _gpt(norm="layer", causal=False, **style)  # RMSNorm and causal: the K-FAC tests
    params = _moved(net)
    x, y = random_tokens(np.random.default_rng(2), net, 2, ignored=0.3)
    assert (y < 0).any() and (y >= 0).any()
    flat, unflat = jax.flatten_util.ravel_pytree(params)
    out = net.apply(params, x)
    jac = jax.jacfwd(lambda t: net.apply(unflat(t), x))(flat)            # (B, T, V, P)

    def token_loss(a, label):
        return -jax.nn.log_softmax(a)[label]

    hess = jax.vmap(jax.vmap(jax.hessian(token_loss)))(out, jnp.maximum(y, 0))  # (B,T,V,V)
    hess = jnp.where((y >= 0)[:, :, None, None], hess, 0)
    want = jnp.einsum("btvp,btvw,btwp->p", jac, hess, jac) / jnp.sum(y >= 0)
    got = jax.flatten_util.ravel_pytree(jaxbp.ggn_diag(net, params, x, y))[0]
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-13 * float(jnp.max(want)))



@pytest.mark.parametrize("style", [{}, LLAMA], ids=["gpt2", "llama"])
def test_kfac_blocks_of_one_token_are_its_gradients_outer_product(style, x64):
    """T = 1, one sample, empirical: under "expand" every block of every record (the
    tables' diagonal A, attention's four projections, the norms' diagonals, the Dense
    layers inside the Residual blocks, a GatedDense's two branches and the head) is its
    gradient's outer product."""
    net = _gpt(seq_len=1, norm="rms", **style)
    params = _moved(net)
    x, y = np.array([[3]], np.int32), np.array([[1]], np.int32)
    factors = jaxbp.kfac_factors(net, params, x, y, kind="empirical")
    grads = jaxbp.backprop(net, params, x, y)
    kinds = []
    for block, matrix, (g,) in kfac_blocks(factors, grads):
        kinds.append(sorted(block))
        got = np.diag(matrix) if "diag" in block else matrix
        np.testing.assert_allclose(got, g * g if "diag" in block else np.outer(g, g),
                                   rtol=1e-10, atol=1e-14)
    tables = 1 if style else 2                              # rotary: no positions table
    assert kinds.count(["A_diag", "G"]) == tables and kinds.count(["diag"]) == 3
    assert kinds.count(["A", "G"]) == 4 + 2 + bool(style) + 1  # attention, the MLP, the head


@pytest.mark.parametrize("kind", ["exact", "empirical"])
def test_kfac_head_factors_follow_the_expand_convention_with_padding(kind, x64):
    """The head reads the final norm's output a_{n,t}: A = (1/(B T)) sum over all B T
    positions of [a, 1][a, 1]^T; G = (1/M) sum over the M counted tokens of H_{n,t}
    (exact: diag(p) - p p^T) or of (p - e_y)(p - e_y)^T (empirical); padding adds no G."""
    net = _gpt(seq_len=4)
    params = _moved(net)
    x, y = random_tokens(np.random.default_rng(3), net, 3, ignored=0.3)
    assert (y < 0).any()
    out, caches = jaxbp.network.forward(net, params, jnp.asarray(x))
    a = np.asarray(caches[-1][0]).reshape(-1, 4)
    a_bar = np.concatenate([a, np.ones((len(a), 1))], axis=1)
    p = np.asarray(jax.nn.softmax(out, axis=-1)).reshape(-1, 5)
    counted = y.reshape(-1) >= 0
    if kind == "exact":
        per_token = [np.diag(q) - np.outer(q, q) for q in p]
    else:
        errors = p - np.eye(5)[np.maximum(y.reshape(-1), 0)]
        per_token = [np.outer(e, e) for e in errors]
    want_g = sum(h for h, c in zip(per_token, counted) if c) / counted.sum()
    head = jaxbp.kfac_factors(net, params, x, y, kind=kind)[-1]
    assert_normwise_close(head["A"], a_bar.T @ a_bar / len(a), rtol=1e-12)
    assert_normwise_close(head["G"], want_g, rtol=1e-12)


@pytest.mark.parametrize("style", [{}, LLAMA], ids=["gpt2", "llama"])
def test_kfac_preconditioner_solves_every_gpt_block(style, x64):
    """Each block's update is the explicit damped Kronecker (or diagonal) solve: A and G
    damped by pi sqrt(l) and sqrt(l)/pi (A_diag's mean in tr A / dim A), diag by l."""
    net = _gpt(seq_len=3, **style)
    params = _moved(net)
    x, y = random_tokens(np.random.default_rng(4), net, 2)
    damping = 0.3
    _, grads, _, extra = jaxbp.kfac_gradient("sampled", jax.random.key(5))(net, params, x, y,
                                                                            2)
    pre, _ = jaxbp.kfac_preconditioner(damping).update(grads, None, **extra)
    assert jax.tree.structure(pre) == jax.tree.structure(grads)
    for block, _, (g, got) in kfac_blocks(extra["factors"], grads, pre):
        if "diag" in block:
            want = g / (np.concatenate([np.ravel(d) for d in jax.tree.leaves(block["diag"])])
                        + damping)
        else:
            a = np.diag(block["A_diag"]) if "A_diag" in block else np.asarray(block["A"])
            gg = np.asarray(block["G"])
            pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(gg) / len(gg)))
            want = np.linalg.solve(np.kron(a + pi * np.sqrt(damping) * np.eye(len(a)),
                                           gg + np.sqrt(damping) / pi * np.eye(len(gg))), g)
        np.testing.assert_allclose(got, want, rtol=1e-8, atol=1e-12)


@pytest.mark.slow
def test_kfac_trains_a_small_gpt():
    net = models.gpt(vocab=8, dim=8, depth=1, heads=2, seq_len=6)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 8, (32, 6)).astype(np.int32)
    y = (x + 1) % 8                                 # each token's target: the next symbol
    optimizer = optax.chain(jaxbp.kfac_preconditioner(0.1), optax.sgd(0.1, momentum=0.9))
    step = jaxbp.make_train_step(net, optimizer, grad=jaxbp.kfac_gradient())
    state = jaxbp.TrainState.create(net.init(jax.random.key(0)), optimizer)
    first = net.cost(state.params, x, y)
    for _ in range(40):
        state, _ = step(state, x, y)
    assert net.cost(state.params, x, y) < 0.25 * first


def test_kfac_reads_a_residuals_inner_errors_from_the_gradient_pass():
    """The empirical K-FAC source traces each inner layer's backward once: the Residual's
    and SelfAttention's kept errors come from the gradient's own pass (before, K-FAC ran
    the Residual's inner loop a second time)."""
    calls = []

    @jaxbp.layers.register
    @dataclasses.dataclass(frozen=True)
    class CountedDense(jaxbp.layers.Dense):
        def backward(self, params, cache, delta_a, need_input=True):
            calls.append(self.units)
            return super().backward(params, cache, delta_a, need_input)

    net = jaxbp.Network((jaxbp.layers.Dense(6, "tanh"),
                         jaxbp.layers.Residual((jaxbp.layers.LayerNorm(),
                                                CountedDense(6, "tanh"))),
                         jaxbp.layers.Dense(3)), (4,))
    params = net.init(jax.random.key(0))
    x, y = jnp.ones((5, 4)), jnp.arange(5) % 3
    source = jaxbp.kfac_gradient("empirical")
    result = jax.eval_shape(lambda p: source(net, p, x, y, 0), params)
    assert calls == [6]
    assert set(result.extras["factors"][1][1]) == {"A", "G"}
