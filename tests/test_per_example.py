"""Per-example quantities from the deltas against jax.vmap(jax.grad(...)) of each sample's loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import assert_leaves_close, to_f64

import jaxbp

ACTS = sorted(jaxbp.ACTIVATIONS)
LOSSES = sorted(jaxbp.LOSSES)


def case(i: int, dtype: str):
    """Case i: hidden and output activations and the loss cycle; batch 1 and width 1 occur."""
    rng = np.random.default_rng(500 + i)
    depth = 1 + i % 4
    sizes = [int(s) for s in rng.integers(1, 12, size=depth + 1)]
    if i % 5 == 0:
        sizes[min(1, depth - 1)] = 1  # a width-1 layer
    loss = LOSSES[i % 3]
    if loss == "softmax_cross_entropy":
        sizes[-1] = max(sizes[-1], 2)
    net = jaxbp.MLP(tuple(sizes), ACTS[i % 9], ACTS[(i // 3) % 9], loss, dtype)
    batch = 1 if i % 7 == 0 else int(rng.integers(2, 9))
    x = jnp.asarray(rng.normal(size=(batch, sizes[0])), dtype)
    if loss == "squared_error":
        y = jnp.asarray(rng.normal(size=(batch, sizes[-1])), dtype)
    elif loss == "sigmoid_cross_entropy":
        y = jnp.asarray(rng.random((batch, sizes[-1])), dtype)
    else:  # integer labels on odd cases
        labels = rng.integers(0, sizes[-1], size=batch)
        y = jnp.asarray(labels, jnp.int32) if i % 2 else jnp.asarray(
            np.eye(sizes[-1])[labels], dtype)
    return net, net.init(jax.random.key(i)), x, y


def vmap_grads(net, params, x, y):
    """The reference: jax.grad of each sample's own loss, vmapped over the batch."""
    def sample_loss(params, x_i, y_i):
        out = net.apply(params, x_i[None])
        return net.loss_fn.sample_loss(out, y_i[None])[0]

    return jax.vmap(jax.grad(sample_loss), in_axes=(None, 0, 0))(params, x, y)


def flat_per_sample(grads) -> np.ndarray:
    """(B, P) float64 from a per-example grads pytree."""
    leaves = jax.tree.leaves(to_f64(grads))
    return np.concatenate([leaf.reshape(leaf.shape[0], -1) for leaf in leaves], axis=1)


def rel(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    err = np.max(np.abs(a - b), initial=0.0)
    return 0.0 if err == 0 else err / np.max(np.abs(b))


CASES = range(27)
TOL = {"float64": 1e-12, "float32": 1e-5}


def _both(dtype):
    return jax.enable_x64(dtype == "float64")


# every hidden activation, every loss, batch 1 and width 1 in each dtype; every output
# activation in float64
SWEEP = [(i, "float64") for i in CASES[::2]] + [(i, "float32") for i in CASES[1:18:2]]


@pytest.mark.slow
@pytest.mark.parametrize("i,dtype", SWEEP)
def test_per_example_grads_and_norms(i, dtype):
    with _both(dtype):
        net, params, x, y = case(i, dtype)
        reference = flat_per_sample(vmap_grads(net, params, x, y))
        manual = flat_per_sample(jaxbp.per_example_grads(net, params, x, y))
        assert manual.shape == reference.shape
        assert rel(manual, reference) <= TOL[dtype]
        norms = jaxbp.per_example_grad_norms(net, params, x, y)
        assert norms.shape == (x.shape[0],) and norms.dtype == jnp.dtype(dtype)
        assert rel(norms, np.linalg.norm(reference, axis=1)) <= TOL[dtype]


@pytest.mark.slow
@pytest.mark.parametrize("i,dtype", SWEEP[::2])
def test_clipped_grad_global_and_per_layer(i, dtype):
    with _both(dtype):
        net, params, x, y = case(i, dtype)
        per_sample = vmap_grads(net, params, x, y)
        flat = flat_per_sample(per_sample)
        norms = np.linalg.norm(flat, axis=1)
        clip = float(np.median(norms)) or 1.0  # clips about half the samples
        factor = np.minimum(1, clip / np.where(norms > 0, norms, 1))
        expected = (flat * factor[:, None]).mean(axis=0)
        manual = jaxbp.clipped_grad(net, params, x, y, clip)
        assert rel(np.concatenate([g.ravel() for g in jax.tree.leaves(to_f64(manual))]),
                   expected) <= TOL[dtype]

        layer_clip = [0.5 * (l + 1) for l in range(net.n_layers)]
        expected_layers = []
        for l, layer in enumerate(to_f64(per_sample)):
            g = np.concatenate([layer["b"].reshape(len(x), -1),
                                layer["w"].reshape(len(x), -1)], axis=1)
            n = np.linalg.norm(g, axis=1)
            s = np.minimum(1, layer_clip[l] / np.where(n > 0, n, 1))
            expected_layers.append({k: (v * s.reshape(-1, *[1] * (v.ndim - 1))).mean(0)
                                    for k, v in layer.items()})
        manual_layers = jaxbp.clipped_grad(net, params, x, y, layer_clip)
        for m, e in zip(jax.tree.leaves(to_f64(manual_layers)),
                        jax.tree.leaves(expected_layers)):
            assert rel(m, e) <= TOL[dtype] or np.max(np.abs(e)) == 0


@pytest.mark.parametrize("i", CASES[::3])
def test_variance(i):
    with jax.enable_x64(True):
        net, params, x, y = case(i, "float64")
        reference = flat_per_sample(vmap_grads(net, params, x, y)).var(axis=0)
        manual = np.concatenate([v.ravel() for v in jax.tree.leaves(
            to_f64(jaxbp.per_example_grad_variance(net, params, x, y)))])
        if x.shape[0] == 1:  # one sample: no variance; E[g^2] - E[g]^2 leaves rounding only
            g = flat_per_sample(vmap_grads(net, params, x, y))
            assert np.max(manual) <= 1e-12 * np.max(g**2) and np.all(reference == 0)
        else:
            assert rel(manual, reference) <= 1e-12


def test_mean_of_per_example_grads_is_the_batch_gradient():
    net, params, x, y = case(4, "float32")
    per_sample = jaxbp.per_example_grads(net, params, x, y)
    mean = jax.tree.map(lambda g: g.mean(axis=0), per_sample)
    for a, b in zip(jax.tree.leaves(mean), jax.tree.leaves(jaxbp.backprop(net, params, x, y))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)


def test_huge_clip_norm_is_plain_backprop_and_tiny_clips_everything():
    net, params, x, y = case(8, "float32")
    plain = jaxbp.backprop(net, params, x, y)
    for a, b in zip(jax.tree.leaves(jaxbp.clipped_grad(net, params, x, y, 1e9)),
                    jax.tree.leaves(plain)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    tiny = jaxbp.clipped_grad(net, params, x, y, 1e-3)
    assert float(optax.tree.norm(tiny)) <= 1e-3 * (1 + 1e-5)


class TestDPSGD:
    def test_zero_noise_is_the_clipped_mean(self, x64):
        # two compiled programs (XLA may fuse and round them differently): float64, 1e-13
        net, params, x, y = case(10, "float64")
        dp = jaxbp.dp_sgd_grad(net, params, x, y, 0.5, 0.0, jax.random.key(0))
        clipped = jaxbp.clipped_grad(net, params, x, y, 0.5)
        assert_leaves_close(dp, clipped, rtol=1e-13)

    @pytest.mark.parametrize("clip", [0.7, (0.3, 0.4)])
    def test_noise_has_std_sigma_c_over_b(self, clip):
        net = jaxbp.MLP((30, 40, 2), "tanh", loss="squared_error")
        params = net.init(jax.random.key(0))
        rng = np.random.default_rng(0)
        x, y = rng.normal(size=(16, 30)).astype(np.float32), np.zeros((16, 2), np.float32)
        sigma = 1.3
        noisy = jaxbp.dp_sgd_grad(net, params, x, y, clip, sigma, jax.random.key(3))
        clipped = jaxbp.clipped_grad(net, params, x, y, clip)
        total_c = float(np.sqrt(np.sum(np.square(clip))))
        noise = np.concatenate([np.ravel(a - b) for a, b in
                                zip(jax.tree.leaves(noisy), jax.tree.leaves(clipped))])
        z = noise * 16 / (sigma * total_c)  # ~1300 standard normals
        assert abs(z.mean()) < 0.1 and abs(z.std() - 1) < 0.05

    def test_keys_matter_and_repeat(self):
        net, params, x, y = case(10, "float32")
        a = jaxbp.dp_sgd_grad(net, params, x, y, 1.0, 1.0, jax.random.key(1))
        b = jaxbp.dp_sgd_grad(net, params, x, y, 1.0, 1.0, jax.random.key(1))
        c = jaxbp.dp_sgd_grad(net, params, x, y, 1.0, 1.0, jax.random.key(2))
        np.testing.assert_array_equal(a[0]["w"], b[0]["w"])
        assert not np.array_equal(a[0]["w"], c[0]["w"])


class TestInTheTrainStep:
    def test_dp_sgd_step_trains_and_is_reproducible(self):
        digits = jaxbp.data.load_digits()
        net = jaxbp.MLP((64, 32, 10), "relu")
        optimizer = optax.sgd(0.5)
        grad = jaxbp.sources.dp_sgd(clip_norm=1.0, noise_multiplier=0.5, key=jax.random.key(9))
        results = []
        for _ in range(2):
            result = jaxbp.fit(net, optimizer, digits, epochs=3, batch_size=128,
                               key=jax.random.key(0), grad=grad, progress=False)
            results.append(result)
        assert results[0].history["test_accuracy"][-1] > 0.8
        np.testing.assert_array_equal(results[0].state.params[0]["w"],
                                      results[1].state.params[0]["w"])

    def test_clipped_gradient_with_huge_norm_is_the_plain_step(self):
        net, params, x, y = case(3, "float32")
        optimizer = optax.sgd(0.1)
        state = jaxbp.TrainState.create(params, optimizer)
        plain, _ = jaxbp.make_train_step(net, optimizer, donate=False)(state, x, y)
        clipped, _ = jaxbp.make_train_step(net, optimizer, grad=jaxbp.sources.clipped(1e9),
                                           donate=False)(state, x, y)
        for a, b in zip(jax.tree.leaves(plain.params), jax.tree.leaves(clipped.params)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_jittable_with_the_net_static():
    net, params, x, y = case(5, "float32")
    for fn in (jaxbp.per_example_grad_norms, jaxbp.per_example_grads,
               jaxbp.per_example_grad_variance):
        assert_leaves_close(jax.jit(fn, static_argnums=0)(net, params, x, y),
                            fn(net, params, x, y), rtol=1e-6)
    c = jax.jit(jaxbp.clipped_grad, static_argnums=0)(net, params, x, y, jnp.float32(0.5))
    assert_leaves_close(c, jaxbp.clipped_grad(net, params, x, y, 0.5), rtol=1e-6)


def test_norms_never_materialise_per_example_grads():
    """Compiled temporary memory of the norms: O(B * widths), far below B * P floats."""
    net = jaxbp.MLP((256, 256, 256, 10), "relu")
    params = net.init(jax.random.key(0))
    x, y = jnp.ones((256, 256)), jnp.zeros(256, jnp.int32)
    n_params = sum(p.size for p in jax.tree.leaves(params))
    compiled = jax.jit(jaxbp.per_example_grad_norms, static_argnums=0).lower(
        net, params, x, y).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 256 * n_params * 4 / 20, (temp, 256 * n_params * 4)


@pytest.mark.parametrize("call,message", [
    (lambda n, p, x, y: jaxbp.clipped_grad(n, p, x, y, -1.0), "clip_norm must be > 0"),
    (lambda n, p, x, y: jaxbp.clipped_grad(n, p, x, y, (1.0, 2.0, 3.0, 4.0, 5.0)),
     "clip_norm must be one number or 2 numbers (one per layer), got shape (5,)"),
    (lambda n, p, x, y: jaxbp.dp_sgd_grad(n, p, x, y, 1.0, -0.1, jax.random.key(0)),
     "noise_multiplier must be one finite number >= 0"),
    (lambda n, p, x, y: jaxbp.per_example_grad_norms(n, p, x[:, :2], y),
     "x has shape (4, 2) but expected (batch, 3)"),
])
def test_bad_input(call, message):
    net = jaxbp.MLP((3, 5, 2), "tanh", loss="squared_error")
    params = net.init(jax.random.key(0))
    x, y = np.ones((4, 3), np.float32), np.zeros((4, 2), np.float32)
    with pytest.raises(ValueError) as info:
        call(net, params, x, y)
    assert message in str(info.value)
