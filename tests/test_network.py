"""Network: the reversed loop over layer records against jax.grad, over random chains."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import (
    assert_no_less_accurate,
    assert_normwise_close,
    assert_trees_close,
    forbid_autodiff,
    leaf_rel_errors,
    random_inputs,
)

import jaxbp
from jaxbp import layers as L
from jaxbp.check.suite import random_network
from jaxbp.network import Network

LOSSES = sorted(jaxbp.LOSSES)
N_CASES = 18  # every activation twice, every loss six times


def network_case(i: int, dtype: str):
    net, batch = random_network(i, dtype)
    x, y = random_inputs(np.random.default_rng(i), net.loss, batch, net.input_shape,
                         net.n_out, dtype, integer_labels=bool(i % 2))
    return net, net.init(jax.random.key(i)), x, y


def test_cases_cover_the_space():
    nets = [random_network(i, "float32") for i in range(N_CASES)]
    kinds = {type(layer).__name__ for net, _ in nets for layer in net.layers}
    assert kinds >= {"Conv2D", "MaxPool", "AvgPool", "Flatten", "LayerNorm", "Dense", "Residual"}
    convs = [layer for net, _ in nets for layer in net.layers if isinstance(layer, L.Conv2D)]
    assert {c.padding for c in convs} == {"SAME", "VALID"} and {1, 2} <= {c.stride[0]
                                                                          for c in convs}
    assert {k for c in convs for k in c.kernel} == {1, 2, 3, 4, 5}
    assert {c.bias for c in convs} == {True, False}                 # none: i = 3 mod 4
    inner = [inside for net, _ in nets for layer in net.layers
             if isinstance(layer, L.Residual) for inside in layer.layers]
    assert {d.bias for d in inner if isinstance(d, L.Dense | L.LayerNorm)} == {True, False}
    assert {net.loss for net, _ in nets} == set(LOSSES)
    assert min(b for _, b in nets) == 1 and (1, 1, 1) in {net.input_shape for net, _ in nets}


@pytest.mark.slow
@pytest.mark.parametrize("i", range(N_CASES))
def test_float64_matches_autodiff(i):
    with jax.enable_x64(True):
        net, params, x, y = network_case(i, "float64")
        loss_m, grads_m = jaxbp.value_and_backprop(net, params, x, y)
        loss_r, grads_r = jaxbp.value_and_autodiff(net, params, x, y)
        np.testing.assert_allclose(loss_m, loss_r, rtol=1e-13)
        errors = leaf_rel_errors(grads_m, grads_r)
        assert max(errors, default=0.0) <= 1e-10, errors


@pytest.mark.parametrize("i", range(0, N_CASES, 3))
def test_float32_is_as_accurate_as_autodiff(i):
    net, params, x, y = network_case(i, "float32")
    _, grads_m = jaxbp.value_and_backprop(net, params, x, y)
    _, grads_r = jaxbp.value_and_autodiff(net, params, x, y)
    with jax.enable_x64(True):
        as64 = lambda t: jax.tree.map(  # noqa: E731
            lambda a: jnp.asarray(np.asarray(a, np.float64)), t)
        net64 = Network(net.layers, net.input_shape, net.loss, "float64")
        _, truth = jaxbp.value_and_autodiff(net64, as64(params), as64(x),
                                            y if y.ndim == 1 else as64(y))
    assert_no_less_accurate(grads_m, grads_r, truth, "float32")


def test_maxpool_ties_go_to_the_first_input_as_in_jax():
    # relu before the pool: windows of zeros tie; the error must go where jax.grad sends it
    net = Network((L.Conv2D(2, (1, 1), activation="relu"), L.MaxPool(2), L.Flatten(),
                   L.Dense(3)), (4, 4, 1), "squared_error")
    params = net.init(jax.random.key(0))
    x = -jnp.abs(jax.random.normal(jax.random.key(1), (3, 4, 4, 1)))  # all relu outputs 0
    y = jnp.ones((3, 3))
    _, manual = jaxbp.value_and_backprop(net, params, x, y)
    _, reference = jaxbp.value_and_autodiff(net, params, x, y)
    assert_trees_close(manual, reference, "float32")


@pytest.mark.parametrize("window", [(2, 2), (3, 2), (1, 1)])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_pool_backward_is_xlas_select_and_scatter_bit_for_bit(window, dtype):
    """Each window's error, unchanged, to its first largest input (relu outputs: many
    windows tie at 0), zeros for the rows a VALID crop drops (7 x 9 inputs): the same
    numbers as jax.vjp of the forward (XLA's select-and-scatter), exactly."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(np.maximum(rng.normal(size=(3, 7, 9, 4)), 0), dtype)
    for pool in (L.MaxPool(window), L.AvgPool(window)):
        out, cache = pool.forward({}, x)
        delta = jnp.asarray(rng.normal(size=out.shape), dtype)
        manual = pool.backward({}, cache, delta)[0]
        reference = jax.vjp(lambda v, p=pool: p.forward({}, v)[0], x)[1](delta)[0]
        assert manual.dtype == reference.dtype
        if isinstance(pool, L.MaxPool):
            np.testing.assert_array_equal(np.asarray(manual, np.float32),
                                          np.asarray(reference, np.float32))
        else:  # delta / (ph pw): one rounding either way
            np.testing.assert_allclose(np.asarray(manual, np.float32),
                                       np.asarray(reference, np.float32), rtol=1e-2 if
                                       dtype == "bfloat16" else 1e-6)


def test_manual_vjp_and_the_dense_rule_against_the_mlp():
    mlp = jaxbp.MLP((6, 5, 3), "tanh", "identity", "squared_error")
    net = Network((L.Dense(5, "tanh"), L.Dense(3)), (6,), "squared_error")
    params = mlp.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (4, 6))
    y = jax.random.normal(jax.random.key(2), (4, 3))
    assert_trees_close(jaxbp.backprop(net, params, x, y), jaxbp.backprop(mlp, params, x, y),
                       "float32")
    through_vjp = jax.grad(lambda p: jnp.sum(jaxbp.apply_with_manual_vjp(net, p, x) ** 2))
    direct = jax.grad(lambda p: jnp.sum(net.apply(p, x) ** 2))
    assert_trees_close(through_vjp(params), direct(params), "float32")


def test_manual_path_calls_no_autodiff(monkeypatch):
    net, params, x, y = network_case(2, "float32")
    _, reference = jaxbp.value_and_autodiff(net, params, x, y)
    forbid_autodiff(monkeypatch)
    _, manual = jaxbp.value_and_backprop(net, params, x, y)
    assert_trees_close(manual, reference, "float32")


class TestErrors:
    @pytest.mark.parametrize("build, error, words", [
        (lambda: Network((L.Dense(3),), (4, 4, 1)), L.LayerError,
         "layers[0] (Dense): the network must end in a vector (n_out,) or a sequence "
         "(T, n_out) for the loss, got (4, 4, 3); add Flatten() and a Dense"),
        (lambda: Network((L.Conv2D(2, (5, 5), padding="VALID"), L.Flatten(), L.Dense(2)),
                         (3, 8, 1)), L.LayerError,
         "layers[0] (Conv2D): kernel (5, 5) is larger than its VALID input (3, 8)"),
        (lambda: Network((L.Flatten(), L.Residual((L.Dense(3),)), L.Dense(2)), (4,)),
         L.LayerError, "layers[1] (Residual): its inner chain changes the shape (4,) to (3,)"),
        (lambda: L.Conv2D(2, (3, 3), padding="FULL"), ValueError,
         "Unknown Conv2D padding 'FULL'"),
        (lambda: Network((L.Conv2D(2),), (4, 4, 1)), L.LayerError,
         "the network must end in a vector"),
        (lambda: Network((L.Dense(2), "relu"), (4,)), TypeError,
         "layers[1] is a str, which is no layer jaxbp knows"),
        (lambda: Network((L.Flatten, L.Dense(2)), (4,)), TypeError,
         "layers[0] is the class Flatten itself, not a layer: make one, Flatten(...)"),
        (lambda: Network((L.Dense(2),), (0,)), ValueError, "input_shape must be"),
        (lambda: Network((L.Flatten(), L.MaxPool(2), L.Dense(2)), (4, 4, 1)), L.LayerError,
         "layers[1] (MaxPool): takes (batch, height, width, channels)"),
        # no parameters: was an IndexError from the first use (params_dtype of no leaves)
        (lambda: Network((L.MaxPool(2), L.Flatten()), (4, 4, 1)).apply(({}, {}),
                                                                     np.ones((1, 4, 4, 1))),
         ValueError, "the network's layers (MaxPool, Flatten) have no parameters: there is "
                     "nothing to train"),
    ])
    def test_bad_network_is_named(self, build, error, words):
        with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")
                           .replace("[", r"\[").replace("]", r"\]")):
            build()

    def test_bad_inputs(self):
        net = Network((L.Conv2D(2), L.Flatten(), L.Dense(3)), (4, 4, 1))
        params = net.init(jax.random.key(0))
        with pytest.raises(ValueError, match=r"x has shape \(2, 4, 4\) but expected "
                                             r"\(batch, 4, 4, 1\)"):
            jaxbp.backprop(net, params, jnp.ones((2, 4, 4)), jnp.zeros(2, int))
        bad = (dict(params[0], w=jnp.ones((3, 3, 1, 5))), *params[1:])
        with pytest.raises(ValueError, match=r"params\[0\]\['w'\] has shape \(3, 3, 1, 5\) "
                                             r"but expected \(3, 3, 1, 2\)"):
            jaxbp.backprop(net, bad, jnp.ones((2, 4, 4, 1)), jnp.zeros(2, int))
        with pytest.raises(ValueError, match=r"y holds labels outside \[0, 3\)"):
            jaxbp.backprop(net, params, jnp.ones((2, 4, 4, 1)), jnp.array([0, 3]))


def test_cnn_trains_in_the_step_and_fit():
    digits = jaxbp.data.load_digits()
    images = digits._replace(x_train=digits.x_train.reshape(-1, 8, 8, 1),
                             x_test=digits.x_test.reshape(-1, 8, 8, 1))
    net = Network((L.Conv2D(8, (3, 3), activation="relu"), L.MaxPool(2), L.Flatten(),
                   L.Dense(10)), (8, 8, 1))
    result = jaxbp.fit(net, optax.adam(3e-3), images, epochs=3, batch_size=64,
                       key=jax.random.key(0), progress=False)
    assert result.history["test_accuracy"][-1] > 0.85
    assert result.history["train_loss"][-1] < result.history["train_loss"][0]


def test_layer_stats_of_a_network_match_autodiff():
    net, params, x, y = network_case(3, "float32")
    stats = jaxbp.layer_stats(net, params, x, y)
    _, grads = jaxbp.value_and_autodiff(net, params, x, y)
    weighted = [l for l, p in enumerate(params) if isinstance(p, dict) and "w" in p]
    expected = [np.linalg.norm(np.asarray(grads[l]["w"])) for l in weighted]
    np.testing.assert_allclose(stats["grad_norm"], expected, rtol=1e-5)
    np.testing.assert_allclose(stats["weight_norm"],
                               [np.linalg.norm(np.asarray(params[l]["w"])) for l in weighted],
                               rtol=1e-6)


def test_layer_stats_reach_inside_residual_blocks(x64):
    """A Residual's Dense layers are entries too; the error at the last inner (identity)
    layer's z is dC/da at the block's output, checked by jax.grad of the chain after it."""
    net = jaxbp.Network((L.Dense(4, "tanh"), L.Residual((L.Dense(5, "relu"), L.Dense(4))),
                         L.Dense(3)), (6,), dtype="float64")
    params = net.init(jax.random.key(0))
    x = np.random.default_rng(0).standard_normal((7, 6))
    y = np.arange(7) % 3
    stats = jaxbp.layer_stats(net, params, x, y)
    _, grads = jaxbp.value_and_autodiff(net, params, x, y)
    want = [grads[0]["w"], grads[1][0]["w"], grads[1][1]["w"], grads[2]["w"]]
    np.testing.assert_allclose(stats["grad_norm"], [np.linalg.norm(g) for g in want],
                               rtol=1e-12)
    block_out = _prefix_output(net, params, x, 2)
    tail = jaxbp.Network(net.layers[2:], (4,), dtype="float64")
    d_block = jax.grad(lambda a: tail.cost(params[2:], a, y))(block_out)
    np.testing.assert_allclose(stats["mean_abs_delta"][2], np.mean(np.abs(d_block)) * 7,
                               rtol=1e-12)


def _prefix_output(net, params, x, n):
    """The output of the first ``n`` layers (their own Network, same params)."""
    head = jaxbp.Network(net.layers[:n], net.input_shape, dtype=net.dtype)
    return head.apply(params[:n], x)


class TestPerExample:
    """Per-example gradients, norms and clipping of a Network vs vmap(grad) of each sample."""

    @staticmethod
    def _reference(net, params, x, y):
        def sample_loss(p, xi, yi):  # sample i's own loss, not divided by B
            return net.cost(p, xi[None], yi[None])

        return jax.vmap(jax.grad(sample_loss), in_axes=(None, 0, 0))(params, x, y)

    @pytest.mark.parametrize("i", [0, 4, 7, 11])
    def test_grads_norms_and_clipping_match_vmap_grad(self, i):
        with jax.enable_x64(True):
            net, params, x, y = network_case(i, "float64")
            reference = self._reference(net, params, x, y)
            assert_trees_close(jaxbp.per_example_grads(net, params, x, y), reference, "float64")
            flat = np.concatenate([np.asarray(leaf).reshape(x.shape[0], -1)
                                   for leaf in jax.tree.leaves(reference)], axis=1)
            norms = np.linalg.norm(flat, axis=1)
            assert_normwise_close(jaxbp.per_example_grad_norms(net, params, x, y), norms,
                                       rtol=1e-12)
            clip = float(np.median(norms))  # half the samples are clipped
            scale = np.minimum(1, clip / norms)
            expected = jax.tree.map(
                lambda g: np.tensordot(scale, np.asarray(g), axes=1) / x.shape[0], reference)
            assert_trees_close(jaxbp.clipped_grad(net, params, x, y, clip), expected, "float64")
            variance = jax.tree.map(lambda g: np.var(np.asarray(g), axis=0), reference)
            got = jaxbp.per_example_grad_variance(net, params, x, y)
            # E[g^2] - E[g]^2 leaves rounding of the size of E[g^2] (all of it at batch 1)
            second = max(float(np.max(np.mean(np.asarray(g) ** 2, axis=0)))
                         for g in jax.tree.leaves(reference))
            for v, want in zip(jax.tree.leaves(got), jax.tree.leaves(variance)):
                np.testing.assert_allclose(np.asarray(v), want, rtol=0, atol=1e-12 * second)

    def test_per_layer_clip_norms_one_per_layer_with_params(self):
        with jax.enable_x64(True):
            net, params, x, y = network_case(2, "float64")
            groups = [l for l, p in enumerate(params) if jax.tree.leaves(p)]
            reference = self._reference(net, params, x, y)
            clips = np.full(len(groups), 0.05)
            expected = []
            for l, p in enumerate(reference):
                if l not in groups:
                    expected.append(jax.tree.map(lambda a: np.zeros(a.shape[1:]), p))
                    continue
                flat = np.concatenate([np.asarray(a).reshape(x.shape[0], -1)
                                       for a in jax.tree.leaves(p)], axis=1)
                scale = np.minimum(1, 0.05 / np.linalg.norm(flat, axis=1))
                expected.append(jax.tree.map(
                    lambda a, scale=scale: np.tensordot(scale, np.asarray(a), axes=1)
                    / x.shape[0], p))
            got = jaxbp.clipped_grad(net, params, x, y, clips)
            assert_trees_close(got, tuple(expected), "float64")
            with pytest.raises(ValueError, match=f"{len(groups)} numbers \\(one per layer with "
                                                 f"parameters\\)"):
                jaxbp.clipped_grad(net, params, x, y, np.ones(len(groups) + 1))


@pytest.mark.parametrize("kernel, filters, side, ghost", [((3, 3), 16, 4, True),
                                                          ((3, 2), 12, 5, True),
                                                          ((1, 1), 2, 6, False)])
def test_conv_norms_by_either_route_match_the_formed_gradients(kernel, filters, side, ghost):
    """Mixed ghost clipping: the Gram route when T (d_in + d_out) < d_in d_out, else the
    formed P^T E; both give the norms of the per-sample gradients, and the clipped sum
    either way."""
    with jax.enable_x64(True):
        conv = L.Conv2D(filters, kernel, stride=2, activation="tanh")
        x = jax.random.normal(jax.random.key(0), (5, side, side, 8), jnp.float64)
        params = conv.init(jax.random.key(1), x.shape[1:], jnp.float64)
        out, cache = conv.forward(params, x)
        delta = jax.random.normal(jax.random.key(2), out.shape, jnp.float64)
        assert conv.uses_ghost_norm(x.shape[1:]) is ghost
        grads = conv.per_sample_grads(params, cache, delta)
        want = sum(np.sum(np.asarray(g).reshape(5, -1) ** 2, axis=1) for g in grads.values())
        assert_normwise_close(conv.per_sample_sq_norms(params, cache, delta), want,
                                   rtol=1e-12)
        _, weighted_sum = conv.per_sample_sq_norms_and_sum(params, cache, delta)
        weights = jnp.arange(1.0, 6.0)
        for name, g in grads.items():
            assert_normwise_close(weighted_sum(weights)[name],
                                       np.tensordot(np.asarray(weights), g, axes=1),
                                       rtol=1e-12)


def test_conv_padding_is_taken_in_any_case_as_lax_takes_it():
    """`padding="same"` (Keras' spelling; lax upper-cases it too) was refused; one
    spelling is kept, so equal records share their compiled programs."""
    assert L.Conv2D(2, 3, padding="valid") == L.Conv2D(2, 3, padding="VALID")
    assert L.Conv2D(2, 3, padding="Same").padding == "SAME"
    with pytest.raises(ValueError, match=r"Unknown Conv2D padding 1\. It needs to be one of"):
        L.Conv2D(2, 3, padding=1)
