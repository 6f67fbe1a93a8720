"""Feedback alignment, direct feedback alignment and sign symmetry: the one recursion with
its transport term replaced, checked against NumPy recursions written here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_leaves_close, forbid_autodiff

import jaxbp
from jaxbp import feedback
from jaxbp import layers as L

ACTS = {"tanh": (np.tanh, lambda z: 1 - np.tanh(z) ** 2),
        "relu": (lambda z: np.maximum(z, 0), lambda z: (z > 0).astype(z.dtype)),
        "sigmoid": (lambda z: 1 / (1 + np.exp(-z)),
                    lambda z: np.exp(-z) / (1 + np.exp(-z)) ** 2),
        "identity": (lambda z: z, np.ones_like)}


def _mlp_case(seed=0, sizes=(5, 7, 6, 4, 3), acts=("tanh", "relu", "sigmoid")):
    net = jaxbp.MLP(sizes, acts, loss="squared_error", dtype="float64")
    params = net.init(jax.random.key(seed))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(6, sizes[0]))
    y = rng.normal(size=(6, sizes[-1]))
    return net, params, x, y


def _numpy_forward(net, params, x):
    acts, zs = [x], []
    for p, name in zip(params, (*net.hidden_activations, net.output_activation)):
        z = acts[-1] @ np.asarray(p["w"]) + np.asarray(p["b"])
        zs.append(z)
        acts.append(ACTS[name][0](z))
    return acts, zs


def _numpy_rule(net, params, x, y, transport=None, direct=None):
    """The recursion in NumPy: delta^{l-1} = (delta^l B^l) g'(z^{l-1}) with B^l from
    ``transport(l)``, or DFA's delta^l = (e B^l) g'(z^l) with ``direct[l]``."""
    acts, zs = _numpy_forward(net, params, x)
    names = (*net.hidden_activations, net.output_activation)
    n = x.shape[0]
    # squared error: C = mean_n sum_j (a - y)^2, dC/da = 2 (a - y) / N
    e = 2 * (acts[-1] - y) / n * ACTS[names[-1]][1](zs[-1])
    deltas = [e]
    for l in range(net.n_layers - 2, -1, -1):   # hidden layers, 0-based
        back = e @ direct[l] if direct is not None else deltas[0] @ transport(l + 1)
        deltas.insert(0, back * ACTS[names[l]][1](zs[l]))
    return [{"b": d.sum(0), "w": a.T @ d} for a, d in zip(acts, deltas)]


def _close(tree, reference, tol=1e-12):
    assert_leaves_close(tree, reference, rtol=tol)


def test_alignment_with_the_transposed_weights_is_backprop(x64):
    net, params, x, y = _mlp_case()
    source = feedback.alignment(tuple(p["w"].T for p in params[1:]))
    value, grads, _, _ = source(net, params, jnp.asarray(x), jnp.asarray(y), 0)
    ref_value, ref = jaxbp.value_and_backprop(net, params, x, y)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-14)
    _close(grads, ref, 1e-13)
    assert np.all(feedback.angles(net, params, x, y, source) < 1e-4)


def test_random_feedback_matches_a_numpy_recursion(x64):
    net, params, x, y = _mlp_case(1)
    fixed = feedback.random_feedback(net, jax.random.key(7))
    assert [b.shape for b in fixed] == [(6, 7), (4, 6), (3, 4)]
    _, grads, _, _ = feedback.alignment(fixed)(net, params, jnp.asarray(x), jnp.asarray(y), 0)
    _close(grads, _numpy_rule(net, params, x, y, transport=lambda l: np.asarray(fixed[l - 1])))
    # fixed: a pure function of the key, not of the params or of a previous draw
    again = feedback.random_feedback(net, jax.random.key(7))
    assert all(np.array_equal(a, b) for a, b in zip(fixed, again))


def test_sign_symmetry_matches_a_numpy_recursion(x64):
    net, params, x, y = _mlp_case(2)
    _, grads, _, _ = feedback.sign_symmetry()(net, params, jnp.asarray(x), jnp.asarray(y), 0)
    signs = lambda l: np.sign(np.asarray(params[l]["w"])).T  # noqa: E731
    _close(grads, _numpy_rule(net, params, x, y, transport=signs))


def test_direct_feedback_matches_a_numpy_recursion(x64):
    net, params, x, y = _mlp_case(3)
    fixed = feedback.random_feedback(net, jax.random.key(8), kind="direct")
    assert [b.shape for b in fixed] == [(3, 7), (3, 6), (3, 4)]
    _, grads, _, _ = feedback.direct(fixed)(net, params, jnp.asarray(x), jnp.asarray(y), 0)
    _close(grads, _numpy_rule(net, params, x, y, direct=[np.asarray(b) for b in fixed]))


def _cnn():
    return jaxbp.Network((L.Conv2D(3, (3, 3), activation="relu"), L.MaxPool((2, 2)),
                          L.Conv2D(4, (2, 2), activation="tanh"), L.Flatten(), L.LayerNorm(),
                          L.Dense(5, "gelu"), L.Dense(3)), (6, 6, 1), dtype="float64")


def test_rules_on_a_conv_net_use_the_feedback_only_for_transport(x64):
    net = _cnn()
    params = net.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 6, 6, 1), jnp.float64)
    y = jnp.array([0, 2, 1, 2])
    assert feedback.feedback_shapes(net) == (None, (2, 2, 3, 4), None, None, (5, 36), (3, 5))
    # alignment with every layer's own weights is backprop, conv included
    own = tuple(None if shape is None else (p["w"].T if p["w"].ndim == 2 else p["w"])
                for shape, p in zip(feedback.feedback_shapes(net), params[1:]))
    _, grads, _, _ = jax.jit(feedback.alignment(own), static_argnums=0)(net, params, x, y, 0)
    _close(grads, jaxbp.backprop(net, params, x, y), 1e-12)
    # the output layer always gets the true error; every rule changes the hidden ones
    for source in (feedback.alignment(feedback.random_feedback(net, jax.random.key(2))),
                   feedback.direct(feedback.random_feedback(net, jax.random.key(2), "direct")),
                   feedback.sign_symmetry()):
        angles = feedback.angles(net, params, x, y, source)
        assert angles.shape == (5,) and angles[-1] < 1e-4 and np.all(angles[:-1] > 1)


def test_dfa_on_a_network_reaches_every_parametrised_layer_directly(x64):
    """DFA's conv gradient is the conv rule applied to e B reshaped to its output."""
    net = _cnn()
    params = net.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 6, 6, 1), jnp.float64)
    y = jnp.array([0, 2, 1, 2])
    fixed = feedback.random_feedback(net, jax.random.key(3), "direct")
    _, grads, out, _ = jax.jit(feedback.direct(fixed), static_argnums=0)(net, params, x, y, 0)
    e = (jax.nn.softmax(out) - jax.nn.one_hot(y, 3)) / 4
    first_out, cache = net.layers[0].forward(params[0], x)
    want = net.layers[0].backward(params[0], cache, (e @ fixed[0]).reshape(first_out.shape),
                                  need_input=False)[1]
    _close(grads[0], want, 1e-13)
    assert all(not np.any(np.asarray(leaf)) for leaf in jax.tree.leaves(grads[1]))  # pool


def test_no_autodiff_on_the_feedback_paths(x64, monkeypatch):
    net, params, x, y = _mlp_case(4)
    sources = (feedback.alignment(feedback.random_feedback(net, jax.random.key(0))),
               feedback.direct(feedback.random_feedback(net, jax.random.key(0), "direct")),
               feedback.sign_symmetry())
    forbid_autodiff(monkeypatch)
    for source in sources:
        grads = jax.jit(source, static_argnums=0)(net, params, x, y, 0)[1]
        assert np.all(np.isfinite(np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)])))
        assert feedback.angles(net, params, x, y, source).shape == (4,)


@pytest.mark.parametrize("rule", ["alignment", "direct", "sign"])
def test_each_rule_trains_through_make_train_step(rule):
    digits = jaxbp.data.load_digits()
    net = jaxbp.MLP((64, 64, 32, 10), "tanh")
    params = net.init(jax.random.key(0))
    key = jax.random.key(1)
    source = {"alignment": lambda: feedback.alignment(feedback.random_feedback(net, key)),
              "direct": lambda: feedback.direct(feedback.random_feedback(net, key, "direct")),
              "sign": feedback.sign_symmetry}[rule]()
    optimizer = optax.adam(3e-3)
    step = jaxbp.make_train_step(net, optimizer, grad=source)
    state = jaxbp.TrainState.create(params, optimizer)
    x, y = digits.x_train[:512], digits.y_train[:512]
    before = float(net.cost(params, x, y))
    for i in range(60):
        rows = slice((i % 4) * 128, (i % 4 + 1) * 128)
        state, _ = step(state, x[rows], y[rows])
    after = float(net.cost(state.params, x, y))
    assert after < 0.5 * before, (rule, before, after)


def test_bad_feedback_and_layers_are_named(x64):
    net, params, _, _ = _mlp_case()
    with pytest.raises(ValueError, match=r"feedback\[1\] \(for layers\[2\]\) must have shape "
                                         r"\(4, 6\), got \(6, 4\)"):
        feedback.alignment((jnp.zeros((6, 7)), jnp.zeros((6, 4)), jnp.zeros((3, 4))))(
            net, params, jnp.zeros((2, 5)), jnp.zeros((2, 3)), 0)
    with pytest.raises(ValueError, match="must hold 3 entries"):
        feedback.direct((jnp.zeros((3, 7)),))(net, params, jnp.zeros((2, 5)),
                                              jnp.zeros((2, 3)), 0)
    residual = jaxbp.Network((L.Dense(4), L.Residual((L.Dense(4, "relu"),)), L.Dense(2)), (3,))
    assert feedback.feedback_shapes(residual) == (((4, 4),), (2, 4))
    with pytest.raises(TypeError, match=r"feedback\[0\] \(for layers\[1\]\) must be a "
                                        r"sequence of 1 entries"):
        feedback.alignment((jnp.zeros((4, 4)), jnp.zeros((2, 4))))(
            residual, residual.init(jax.random.key(0)), jnp.zeros((2, 3)), jnp.zeros(2, int), 0)
    attention = jaxbp.models.gpt(vocab=5, dim=4, depth=1, heads=2, seq_len=3)
    entries = list(feedback.random_feedback(attention, jax.random.key(0)))
    entries[0] = (None, {"q": jnp.zeros((4, 4))})
    with pytest.raises(TypeError, match=r"feedback\[0\] \(for layers\[1\]\)\[1\] must be "
                                        r"a dict with keys \['k', 'o', 'q', 'v'\]"):
        feedback.alignment(entries)(attention, attention.init(jax.random.key(0)),
                                    np.zeros((2, 3), np.int32), np.zeros((2, 3), np.int32), 0)
    with pytest.raises(ValueError, match=r"direct feedback alignment .* takes networks with a "
                                         r"vector output"):
        feedback.feedback_shapes(attention, "direct")
    with pytest.raises(ValueError, match="kind must be"):
        feedback.feedback_shapes(net, "sideways")
    with pytest.raises(TypeError, match="source must be a gradient source"):
        feedback.angles(net, params, np.zeros((2, 5)), np.zeros((2, 3)), "fa")


@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
def test_rules_on_a_gpt_replace_each_projections_transport_only(mlp, x64):
    """Through attention, the token-wise Dense layers and the Residual blocks: with every
    entry the layer's own W^T the rule is backprop; a random B is used only to carry
    errors (B_o to the heads, B_q, B_k, B_v to the input; the softmax backward exact;
    a GatedDense's B_g and B_u, its gate's product exact), so the head's gradient stays
    exact and every earlier block's moves off; sign symmetry alike. Angles are
    reported per top-level layer with parameters."""
    net = jaxbp.models.gpt(vocab=6, dim=4, depth=2, heads=2, seq_len=5, dtype="float64",
                           mlp=mlp, positions="rope" if mlp == "swiglu" else "learned")
    params = net.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 6, (3, 5)).astype(np.int32)
    y = rng.integers(0, 6, (3, 5)).astype(np.int32)
    shapes = feedback.feedback_shapes(net)
    assert shapes[0] == (None, {p: (4, 4) for p in "qkvo"})        # LayerNorm, attention
    hidden = {"g": (16, 4), "u": (16, 4)} if mlp == "swiglu" else (16, 4)
    assert shapes[1] == (None, hidden, (4, 16))                     # LayerNorm, the MLP
    own = tuple(jaxbp.layers.base.feedback_of(layer, p, shape) for layer, p, shape
                in zip(net.layers[1:], params[1:], net.shapes[1:]))
    _, grads, _, _ = jax.jit(feedback.alignment(own), static_argnums=0)(net, params, x, y, 0)
    _close(grads, jaxbp.backprop(net, params, x, y), 1e-12)
    for source in (feedback.alignment(feedback.random_feedback(net, jax.random.key(2))),
                   feedback.sign_symmetry()):
        angles = feedback.angles(net, params, x, y, source)
        assert angles.shape == (7,) and angles[-1] < 1e-4             # the head: exact
        assert np.all(angles[:-2] > 1)       # the blocks below the final norm move off


@pytest.mark.slow
def test_feedback_alignment_trains_a_small_gpt():
    net = jaxbp.models.gpt(vocab=8, dim=8, depth=1, heads=2, seq_len=6)
    rng = np.random.default_rng(0)
    x = rng.integers(0, 8, (32, 6)).astype(np.int32)
    y = (x + 1) % 8
    optimizer = optax.adam(3e-2)
    source = feedback.alignment(feedback.random_feedback(net, jax.random.key(1)))
    step = jaxbp.make_train_step(net, optimizer, grad=source)
    state = jaxbp.TrainState.create(net.init(jax.random.key(0)), optimizer)
    first = float(net.cost(state.params, x, y))
    for _ in range(120):             # 2.79 -> 0.12 when written (backprop: 0.001)
        state, _ = step(state, x, y)
    assert float(net.cost(state.params, x, y)) < 0.1 * first
