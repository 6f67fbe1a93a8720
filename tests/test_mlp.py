"""MLP: a frozen, hashable description; init schemes; forward and cost against NumPy."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbp


class TestDescription:
    def test_frozen_and_hashable(self):
        net = jaxbp.MLP((4, 8, 3), ["relu"], loss="squared_error")
        same = jaxbp.MLP([4, 8, 3], ("relu",), loss="squared_error")
        assert net == same and hash(net) == hash(same)
        with pytest.raises(AttributeError):
            net.sizes = (1, 2)

    def test_usable_as_static_argument(self):
        traces = []

        @jax.jit
        def run(x):
            return jax.jit(lambda n, x: (traces.append(n), x.sum())[1],
                           static_argnums=0)(jaxbp.MLP((2, 2)), x)

        run(jnp.ones(3))
        assert len(traces) == 1

    def test_fields_normalised(self):
        net = jaxbp.MLP((3, 5, 5, 2), ["tanh", "relu"], dtype=jnp.bfloat16)
        assert net.sizes == (3, 5, 5, 2) and net.activation == ("tanh", "relu")
        assert net.dtype == "bfloat16" and net.loss == "softmax_cross_entropy"
        assert net.hidden_activations == ("tanh", "relu")
        assert [a.name for a in net.activations] == ["tanh", "relu", "identity"]
        assert net.n_layers == 3

    def test_one_name_for_all_hidden_layers(self):
        net = jaxbp.MLP((3, 5, 5, 5, 2), "gelu")
        assert net.hidden_activations == ("gelu",) * 3

    def test_no_hidden_layer(self):
        net = jaxbp.MLP((3, 2), "relu", "sigmoid", "sigmoid_cross_entropy")
        assert net.hidden_activations == () and net.n_layers == 1


class TestInit:
    def test_shapes_dtypes_and_zero_biases(self):
        net = jaxbp.MLP((7, 5, 1, 3), "relu", dtype="bfloat16")
        params = net.init(jax.random.key(0))
        assert isinstance(params, tuple) and len(params) == 3
        for layer, (fan_in, fan_out) in zip(params, [(7, 5), (5, 1), (1, 3)]):
            assert set(layer) == {"w", "b"}
            assert layer["w"].shape == (fan_in, fan_out) and layer["b"].shape == (fan_out,)
            assert layer["w"].dtype == jnp.bfloat16
            np.testing.assert_array_equal(layer["b"], 0)

    @pytest.mark.parametrize("act,he", [("relu", True), ("leaky_relu", True), ("elu", True),
                                        ("gelu", True), ("silu", True), ("softplus", True),
                                        ("tanh", False), ("sigmoid", False),
                                        ("identity", False)])
    def test_he_or_glorot_variance(self, act, he):
        fan_in, fan_out = 400, 300
        net = jaxbp.MLP((fan_in, fan_out, 10), act)
        w = np.asarray(net.init(jax.random.key(1))[0]["w"])
        expected = 2 / fan_in if he else 2 / (fan_in + fan_out)
        assert w.var() == pytest.approx(expected, rel=0.02)  # 120k samples: ~0.5% noise
        assert np.abs(w).max() <= 2 * np.sqrt(expected) / 0.8796 + 1e-6  # truncated at 2 sd

    def test_keys_give_different_and_reproducible_params(self):
        net = jaxbp.MLP((4, 6, 2))
        a, b = net.init(jax.random.key(0)), net.init(jax.random.key(0))
        c = net.init(jax.random.PRNGKey(1))
        np.testing.assert_array_equal(a[0]["w"], b[0]["w"])
        assert not np.allclose(a[0]["w"], c[0]["w"])


def _numpy_forward(params, x, acts):
    funcs = {"relu": lambda z: np.maximum(z, 0), "tanh": np.tanh, "identity": lambda z: z,
             "sigmoid": lambda z: 1 / (1 + np.exp(-z))}
    a = x
    for layer, name in zip(params, acts):
        a = funcs[name](a @ np.asarray(layer["w"], np.float64) + np.asarray(layer["b"]))
    return a


class TestForward:
    def test_apply_matches_numpy(self):
        with jax.enable_x64(True):
            net = jaxbp.MLP((3, 6, 4, 2), ("relu", "tanh"), "sigmoid", "squared_error",
                            "float64")
            params = net.init(jax.random.key(2))
            x = np.random.default_rng(0).normal(size=(5, 3))
            np.testing.assert_allclose(net.apply(params, x),
                                       _numpy_forward(params, x, ["relu", "tanh", "sigmoid"]),
                                       rtol=1e-14)

    def test_cost_matches_numpy(self):
        with jax.enable_x64(True):
            net = jaxbp.MLP((3, 6, 4), "tanh", loss="softmax_cross_entropy", dtype="float64")
            params = net.init(jax.random.key(3))
            rng = np.random.default_rng(1)
            x, labels = rng.normal(size=(8, 3)), rng.integers(0, 4, size=8)
            logits = _numpy_forward(params, x, ["tanh", "identity"])
            log_p = logits - np.log(np.exp(logits).sum(1, keepdims=True))
            expected = -np.mean(log_p[np.arange(8), labels])
            assert float(net.cost(params, x, labels)) == pytest.approx(expected, rel=1e-14)

    def test_x_is_cast_to_params_dtype(self):
        net = jaxbp.MLP((3, 2), dtype="bfloat16")
        params = net.init(jax.random.key(0))
        assert net.apply(params, np.ones((2, 3), np.float32)).dtype == jnp.bfloat16

    def test_forward_cache_holds_every_layer(self):
        net = jaxbp.MLP((3, 5, 4, 2), "relu")
        params = net.init(jax.random.key(0))
        out, caches, _ = jaxbp.layer_deltas(net, params, jnp.ones((6, 3)), jnp.zeros(6, int))
        assert [a_in.shape for a_in, _, _ in caches] == [(6, 3), (6, 5), (6, 4)]
        assert [z.shape for _, z, _ in caches] == [(6, 5), (6, 4), (6, 2)]
        np.testing.assert_array_equal(caches[0][2], jax.nn.relu(caches[0][1]))
        np.testing.assert_array_equal(caches[1][0], caches[0][2])
        np.testing.assert_array_equal(out, caches[-1][2])
