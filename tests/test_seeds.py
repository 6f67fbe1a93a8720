"""The three source texts (../shared/seeds/) reproduced, each computed independently of jaxbp."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_normwise_close

import jaxbp


def _sigmoid(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


class TestSeed000PerNodeChainRule:
    """Seed 000: C0 = sum_j (a_j^L - y_j)^2 per sample, averaged over N samples.

    The network is 3 -> 4 -> 2 (tanh hidden, sigmoid output); every number
    below is a Python float and every sum a Python loop over nodes, with
    seed 000's w_jk (node k of layer l-1 to node j of layer l) = W^l[k, j].
    """

    @pytest.fixture
    def setup(self):
        rng = np.random.default_rng(0)
        w1, b1 = rng.normal(size=(3, 4)), rng.normal(size=4)
        w2, b2 = rng.normal(size=(4, 2)), rng.normal(size=2)
        x, y = rng.normal(size=(2, 3)), rng.random((2, 2))
        return w1, b1, w2, b2, x, y

    @staticmethod
    def _forward(w1, b1, w2, b2, x_n):
        """Per node: z_j = sum_k w_jk a_k + b_j, a_j = g(z_j)."""
        z1 = [sum(w1[k][j] * x_n[k] for k in range(3)) + b1[j] for j in range(4)]
        a1 = [math.tanh(z) for z in z1]
        z2 = [sum(w2[k][j] * a1[k] for k in range(4)) + b2[j] for j in range(2)]
        a2 = [_sigmoid(z) for z in z2]
        return z1, a1, z2, a2

    def test_output_and_hidden_weight(self, setup):
        w1, b1, w2, b2, x, y = setup
        n_samples = len(x)
        out_grad = hidden_grad = 0.0
        for x_n, y_n in zip(x.tolist(), y.tolist()):
            z1, a1, z2, a2 = self._forward(w1.tolist(), b1.tolist(), w2.tolist(),
                                           b2.tolist(), x_n)
            dsig = [_sigmoid(z) * (1 - _sigmoid(z)) for z in z2]  # g^L'(z_j^L)
            # Output layer, j = 1, k = 2: dC0/dw_12^L = 2 (a_1^L - y_1) g^L'(z_1^L) a_2^{L-1}
            out_grad += 2 * (a2[1] - y_n[1]) * dsig[1] * a1[2]
            # Hidden layer l = L-1, j = 2, k = 2:
            # (sum_j 2 (a_j^L - y_j) g^L'(z_j^L) w_j2^L) g^{L-1}'(z_2^{L-1}) a_2^{L-2}
            back = sum(2 * (a2[j] - y_n[j]) * dsig[j] * w2[2][j] for j in range(2))
            hidden_grad += back * (1 - math.tanh(z1[2]) ** 2) * x_n[2]
        out_grad /= n_samples   # "the average sum" over the N samples
        hidden_grad /= n_samples

        with jax.enable_x64(True):
            net = jaxbp.MLP((3, 4, 2), "tanh", "sigmoid", "squared_error", "float64")
            params = ({"w": jnp.asarray(w1), "b": jnp.asarray(b1)},
                      {"w": jnp.asarray(w2), "b": jnp.asarray(b2)})
            grads = jaxbp.backprop(net, params, x, y)
            assert float(grads[1]["w"][2, 1]) == pytest.approx(out_grad, rel=1e-14)
            assert float(grads[0]["w"][2, 2]) == pytest.approx(hidden_grad, rel=1e-14)

    def test_update_rule(self, setup):
        """new weight = old weight - learning rate * gradient, for every weight."""
        w1, b1, w2, b2, x, y = setup
        with jax.enable_x64(True):
            net = jaxbp.MLP((3, 4, 2), "tanh", "sigmoid", "squared_error", "float64")
            params = ({"w": jnp.asarray(w1), "b": jnp.asarray(b1)},
                      {"w": jnp.asarray(w2), "b": jnp.asarray(b2)})
            lr = 0.5
            before = float(net.cost(params, x, y))
            grads = jaxbp.backprop(net, params, x, y)
            stepped = jax.tree.map(lambda p, g: p - lr * g, params, grads)
            assert float(net.cost(stepped, x, y)) < before


class TestSeed001PerNeuronLoop:
    """Seed 001's forward_pass/back_prop, written as its per-neuron NumPy loop.

    ReLU hidden layer, sigmoid output, bias as input 0 (``weights[0]``), the
    output error ``output - desired``: the delta of sigmoid cross-entropy on
    logits. One sample at a time (online updates).
    """

    class Neuron:
        def __init__(self, weights: np.ndarray, kind: str):
            self.weights, self.type = weights.copy(), kind

        def update_output(self, inputs: np.ndarray) -> None:
            self.output = float(np.dot(self.weights, inputs))

        def update_weights(self, grads: np.ndarray, lr: float) -> None:
            self.weights -= lr * grads

    def _network(self, w1, b1, w2, b2):
        layer_one = [self.Neuron(np.concatenate([[b1[j]], w1[:, j]]), "relu")
                     for j in range(w1.shape[1])]
        layer_two = [self.Neuron(np.concatenate([[b2[j]], w2[:, j]]), "sigmoid")
                     for j in range(w2.shape[1])]
        return layer_one, layer_two

    @staticmethod
    def _forward_pass(layer_one, layer_two, x_values):
        for neuron in layer_one:
            neuron.update_output(x_values)
            neuron.z = neuron.output
            neuron.output = max(neuron.z, 0.0)
        inputs = np.array([1.0] + [n.output for n in layer_one])
        for neuron in layer_two:
            neuron.update_output(inputs)
            neuron.z = neuron.output
            neuron.output = _sigmoid(neuron.z)

    @staticmethod
    def _back_prop(layer_one, layer_two, desired, x_values):
        inputs = np.array([1.0] + [n.output for n in layer_one])
        for i, neuron in enumerate(layer_two):
            neuron.partial_online_partial_output = neuron.output - desired[i]
            neuron.partial_online_partial_weights = neuron.partial_online_partial_output * inputs
        for i, neuron in enumerate(layer_one):
            total = sum(nxt.partial_online_partial_output * nxt.weights[i + 1]
                        for nxt in layer_two)
            total *= 1.0 if neuron.z > 0 else 0.0
            neuron.partial_online_partial_output = total
            neuron.partial_online_partial_weights = total * x_values

    def test_one_sample_grads_and_online_updates(self):
        rng = np.random.default_rng(1)
        n_in, n_hidden, n_out, lr = 5, 6, 3, 0.1
        w1, b1 = rng.normal(size=(n_in, n_hidden)), rng.normal(size=n_hidden) * 0.1
        w2, b2 = rng.normal(size=(n_hidden, n_out)), rng.normal(size=n_out) * 0.1
        xs, labels = rng.normal(size=(6, n_in)), rng.integers(0, n_out, size=6)
        layer_one, layer_two = self._network(w1, b1, w2, b2)

        with jax.enable_x64(True):
            net = jaxbp.MLP((n_in, n_hidden, n_out), "relu", "identity",
                            "sigmoid_cross_entropy", "float64")
            params = ({"w": jnp.asarray(w1), "b": jnp.asarray(b1)},
                      {"w": jnp.asarray(w2), "b": jnp.asarray(b2)})
            for x, label in zip(xs, labels):
                desired = np.eye(n_out)[label]
                x_values = np.concatenate([[1.0], x])
                self._forward_pass(layer_one, layer_two, x_values)
                self._back_prop(layer_one, layer_two, desired, x_values)

                grads = jaxbp.backprop(net, params, x[None], desired[None])
                for layer, neurons in zip(grads, (layer_one, layer_two)):
                    seed = np.stack([n.partial_online_partial_weights for n in neurons], 1)
                    assert_normwise_close(layer["b"], seed[0], rtol=1e-13, atol=1e-15)
                    assert_normwise_close(layer["w"], seed[1:], rtol=1e-13, atol=1e-15)

                for neuron in (*layer_one, *layer_two):
                    neuron.update_weights(neuron.partial_online_partial_weights, lr)
                params = jax.tree.map(lambda p, g: p - lr * g, params, grads)

            final = np.stack([n.weights for n in layer_two], 1)
            assert_normwise_close(params[1]["w"], final[1:], rtol=1e-12)


class TestSeed002MatrixForm:
    """Seed 002 (after the ml-cheatsheet): the batch-of-3 ReLU toy, with its shapes.

    X (3, 1), Wh (1, 2), Bh (1, 2), Zh = H (3, 2), Wo (2, 2), Bo (1, 2),
    Zo = O (3, 2); ReLU on both layers. Eo = (O - y) R'(Zo),
    Eh = Eo Wo^T R'(Zh), dC/dW = input activation^T times error. The seed's
    cost is 1/2 (O - y)^2 summed; jaxbp's squared_error is sum (a - y)^2
    averaged over the batch, so jaxbp's gradients are 2/3 of the seed's.
    """

    def test_toy(self):
        x = np.array([[1.0], [-2.0], [0.5]])
        wh, bh = np.array([[0.8, -0.6]]), np.array([[0.1, 0.2]])
        wo, bo = np.array([[0.5, -1.2], [0.9, 0.4]]), np.array([[0.05, 0.3]])
        y = np.array([[1.0, 0.0], [0.0, 1.0], [0.5, 0.5]])

        zh = x @ wh + bh
        h = np.maximum(zh, 0)
        zo = h @ wo + bo
        o = np.maximum(zo, 0)
        e_o = (o - y) * (zo > 0)          # Eo = (yhat - y) R'(Zo)
        e_h = (e_o @ wo.T) * (zh > 0)      # Eh = Eo Wo^T R'(Zh)
        d_wo, d_wh = h.T @ e_o, x.T @ e_h  # C'(w) = input activation x error
        assert not np.all(zh > 0) and np.any(zh > 0)  # ReLU both on and off
        assert not np.all(zo > 0) and np.any(zo > 0)

        with jax.enable_x64(True):
            net = jaxbp.MLP((1, 2, 2), "relu", "relu", "squared_error", "float64")
            params = ({"w": jnp.asarray(wh), "b": jnp.asarray(bh[0])},
                      {"w": jnp.asarray(wo), "b": jnp.asarray(bo[0])})
            out, caches, at_outputs = jaxbp.layer_deltas(net, params, x, y)
            assert [c[0].shape for c in caches] == [(3, 1), (3, 2)]        # a^0, a^1
            assert [c[1].shape for c in caches] == [(3, 2), (3, 2)]        # z^1, z^2
            assert_normwise_close(out, o, rtol=1e-15)
            deltas = [layer.pre_activation_error(c, d)                     # dC/dz^l
                      for layer, c, d in zip(net.network.layers, caches, at_outputs)]
            scale = 2 / 3  # d/da of mean_n sum_j (a - y)^2 is 2/N times the seed's (a - y)
            assert_normwise_close(deltas[1], scale * e_o, rtol=1e-14)
            assert_normwise_close(deltas[0], scale * e_h, rtol=1e-14)
            grads = jaxbp.backprop(net, params, x, y)
            assert_normwise_close(grads[1]["w"], scale * d_wo, rtol=1e-14)
            assert_normwise_close(grads[0]["w"], scale * d_wh, rtol=1e-14)
            assert_normwise_close(grads[1]["b"], scale * e_o.sum(0), rtol=1e-14)
