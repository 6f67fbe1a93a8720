"""Run with 8 host devices (XLA_FLAGS=--xla_force_host_platform_device_count=8): the
sharded step against the single-device step. Prints one line per check; exits 1 on failure."""

from __future__ import annotations

import dataclasses
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import PartitionSpec

import jaxbp
from jaxbp import layers as L
from jaxbp import parallel


def rel_diff(a, b) -> float:
    a = np.concatenate([np.ravel(np.asarray(t, np.float64)) for t in jax.tree.leaves(a)])
    b = np.concatenate([np.ravel(np.asarray(t, np.float64)) for t in jax.tree.leaves(b)])
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


# Params after 5 steps: 1e-6 relative for sgd and momentum. Adam divides by sqrt(nu): a
# gradient entry near zero, whose last bits differ between one device's reduction order
# and eight's, can move its update by up to lr, so adam's params are held to 1e-4 while
# its first step's loss and gradient norm (same params on both sides) are held to 1e-6 like
# the others. Later steps start from params that differ by up to that bound, so their
# loss and gradient norm are held to it too (under load the CPU all-reduce's order varies,
# and a (4, 2) adam run has shown 3.5e-6 at step 5).
PARAM_TOL = {"sgd": 1e-6, "momentum": 1e-6, "adam": 1e-4}


def check(mesh_shape, sizes, name, optimizer, steps=5, batch=32):
    net = jaxbp.MLP(sizes, "tanh")
    mesh = parallel.make_mesh(*mesh_shape)
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(steps, batch, sizes[0])).astype(np.float32)
    ys = rng.integers(0, sizes[-1], size=(steps, batch)).astype(np.int32)
    params = net.init(jax.random.key(0))
    single = jaxbp.make_train_step(net, optimizer, donate=False)
    sharded = parallel.make_sharded_train_step(net, optimizer, mesh)
    state_1 = jaxbp.TrainState.create(params, optimizer)
    state_n = jaxbp.TrainState.create(jax.tree.map(np.asarray, params), optimizer)
    metric_diff, later_diff = 0.0, 0.0
    for step, (x, y) in enumerate(zip(xs, ys)):
        state_1, m1 = single(state_1, x, y)
        state_n, mn = sharded(state_n, x, y)
        for key in ("loss", "grad_norm"):
            rel = abs(float(mn[key]) - float(m1[key])) / abs(float(m1[key]))
            if step == 0:
                metric_diff = max(metric_diff, rel)
            else:
                later_diff = max(later_diff, rel)
    diff = rel_diff(state_n.params, state_1.params)
    expected = parallel.state_shardings(state_n, mesh, net=net)
    placed = all(a.sharding.is_equivalent_to(s, a.ndim) for a, s in
                 zip(jax.tree.leaves(state_n), jax.tree.leaves(expected)))
    spec_w0 = state_n.params[0]["w"].sharding.spec
    ok = (diff <= PARAM_TOL[name] and metric_diff <= 1e-6
          and later_diff <= max(1e-6, PARAM_TOL[name]) and placed)
    print(f"{'ok' if ok else 'FAIL'} mesh {mesh_shape} sizes {sizes} {name}"
          f": max rel param diff {diff:.2e}, loss/grad-norm diff step 1 {metric_diff:.2e}, "
          f"later {later_diff:.2e}, shardings kept "
          f"{placed}, W1 spec {spec_w0}")
    return ok, spec_w0


def check_network(name, net, xs, ys, mesh_shape) -> bool:
    """A Network on the mesh, by the sharded step and by the sharded loop: the
    single-device step's result."""
    mesh = parallel.make_mesh(*mesh_shape)
    params = net.init(jax.random.key(0))
    optimizer = optax.sgd(0.1)
    single = jaxbp.make_train_step(net, optimizer, donate=False)
    sharded = parallel.make_sharded_train_step(net, optimizer, mesh)
    state_1 = jaxbp.TrainState.create(params, optimizer)
    state_n = jaxbp.TrainState.create(jax.tree.map(np.asarray, params), optimizer)
    for x, y in zip(xs, ys):
        state_1, m1 = single(state_1, x, y)
        state_n, mn = sharded(state_n, x, y)
    loop = parallel.make_sharded_train_loop(net, optimizer, mesh, steps=len(xs))
    state_k, _ = loop(jaxbp.TrainState.create(jax.tree.map(np.asarray, params), optimizer),
                      xs, ys)
    diff = max(rel_diff(state_n.params, state_1.params), rel_diff(state_k.params, state_1.params))
    loss_diff = abs(float(mn["loss"]) - float(m1["loss"])) / abs(float(m1["loss"]))
    ok = diff <= 1e-6 and loss_diff <= 1e-6
    print(f"{'ok' if ok else 'FAIL'} {name} mesh {mesh_shape}: max rel param diff (step, "
          f"loop) {diff:.2e}, loss diff {loss_diff:.2e}")
    return ok


def check_gpt(mesh_shape, steps=3, batch=8, vocab=11, tie_embedding=False,
              dropout=0.0) -> bool:
    """A GPT (token inputs, per-token loss, padding targets); tied: its head (vocab 12,
    split over the model axis) holds only its bias, the table's; with dropout, each
    step's masks drawn over the sharded batch as on one device."""
    net = jaxbp.models.gpt(vocab=vocab, dim=16, depth=1, heads=2, seq_len=6,
                           tie_embedding=tie_embedding, dropout=dropout)
    rng = np.random.default_rng(1)
    xs = rng.integers(0, vocab, size=(steps, batch, 6)).astype(np.int32)
    ys = np.where(rng.random((steps, batch, 6)) < 0.2, -1, (xs + 1) % vocab).astype(np.int32)
    name = "tied gpt" if tie_embedding else f"gpt, dropout {dropout}" if dropout else "gpt"
    return check_network(name, net, xs, ys, mesh_shape)


def check_gated(mesh_shape, steps=3, batch=16) -> bool:
    """A GatedDense (SwiGLU) column-split over the model axis, both branches alike, and the
    Dense after it row-split: Megatron's pair, both without biases (LLaMA's)."""
    net = jaxbp.Network((L.GatedDense(16, bias=False), L.Dense(12, bias=False), L.Dense(5)),
                        (12,))
    rng = np.random.default_rng(3)
    xs = rng.normal(size=(steps, batch, 12)).astype(np.float32)
    ys = rng.integers(0, 5, size=(steps, batch)).astype(np.int32)
    state = jaxbp.TrainState.create(net.init(jax.random.key(0)), optax.sgd(0.1))
    specs = parallel.state_shardings(state, parallel.make_mesh(*mesh_shape), net=net).params
    split = (specs[0]["wg"].spec == specs[0]["wu"].spec == PartitionSpec(None, "model")
             and specs[1]["w"].spec == PartitionSpec("model", None)
             and set(specs[0]) == {"wg", "wu"} and set(specs[1]) == {"w"})
    print(f"{'ok' if split else 'FAIL'} GatedDense column-split, the next Dense row-split")
    return check_network("gated", net, xs, ys, mesh_shape) and split


def check_cnn(mesh_shape, steps=3, batch=16) -> bool:
    """A CNN (strided conv, max pool): its backward convolutions take the CPU's form."""
    net = jaxbp.Network((L.Conv2D(8, 3, activation="relu"), L.MaxPool(2),
                         L.Conv2D(8, 3, 2, activation="tanh"), L.Flatten(), L.Dense(5)),
                        (8, 8, 3))
    rng = np.random.default_rng(2)
    xs = rng.normal(size=(steps, batch, 8, 8, 3)).astype(np.float32)
    ys = rng.integers(0, 5, size=(steps, batch)).astype(np.int32)
    return check_network("cnn", net, xs, ys, mesh_shape)


def main() -> int:
    assert jax.device_count() == 8, jax.devices()
    results = []
    for name, optimizer in (("sgd", optax.sgd(0.1)), ("momentum", optax.sgd(0.1, 0.9)),
                            ("adam", optax.adam(1e-2))):
        results.append(check((8, 1), (12, 16, 16, 10), name, optimizer)[0])
        ok, spec = check((4, 2), (12, 16, 16, 10), name, optimizer)
        results.append(ok and spec == PartitionSpec(None, "model"))
        results.append(check((2, 4), (12, 32, 20, 10), name, optimizer)[0])
    try:
        step = parallel.make_sharded_train_step(jaxbp.MLP((4, 3)), optax.sgd(0.1),
                                                parallel.make_mesh(8, 1))
        params = jaxbp.MLP((4, 3)).init(jax.random.key(0))
        step(jaxbp.TrainState.create(params, optax.sgd(0.1)), np.ones((12, 4), np.float32),
             np.zeros(12, np.int32))
        print("FAIL uneven batch accepted")
        results.append(False)
    except ValueError as err:
        good = "does not split evenly over the 8 devices" in str(err)
        print(f"{'ok' if good else 'FAIL'} uneven batch: {err}")
        results.append(good)
    results.append(check_collectives())
    results.append(check_gpt((4, 2)))
    results.append(check_gpt((4, 2), vocab=12, tie_embedding=True))
    results.append(check_gpt((8, 1), dropout=0.2))
    results.append(check_cnn((8, 1)))
    results.append(check_gated((4, 2)))
    results.append(check_user_record())
    return 0 if all(results) else 1


@dataclasses.dataclass(frozen=True)
class Mix:
    """A user's record with params {"w": (d, d), "b": (d,)} and no model-axis capability:
    ``a = x + x W + b`` (shaped like a Dense, but not one the records say can be split)."""

    def output_shape(self, in_shape):
        return in_shape

    def init(self, key, in_shape, dtype):
        d = in_shape[-1]
        return {"w": 0.1 * jax.random.normal(key, (d, d), dtype), "b": jnp.zeros((d,), dtype)}

    def forward(self, params, x):
        return x + x @ params["w"] + params["b"], x

    def backward(self, params, x, delta, need_input=True):
        grads = {"w": x.T @ delta, "b": jnp.sum(delta, axis=0)}
        return (delta + delta @ params["w"].T if need_input else None), grads

    def per_sample_grads(self, params, x, delta):
        return {"w": x[:, :, None] * delta[:, None, :], "b": delta}

    def per_sample_sq_norms(self, params, x, delta):
        return jnp.sum(x * x, 1) * jnp.sum(delta * delta, 1) + jnp.sum(delta * delta, 1)


def check_user_record() -> bool:
    """The model axis splits the layers whose records say how (Dense), and leaves a user's
    record without the capability replicated, though its params look like a Dense's."""
    net = jaxbp.Network((jaxbp.layers.Dense(16, "tanh"), jaxbp.layers.register(Mix)(),
                         jaxbp.layers.Dense(16, "tanh"), jaxbp.layers.Dense(10)), (12,))
    state = jaxbp.TrainState.create(net.init(jax.random.key(0)), optax.sgd(0.1))
    specs = [[leaf.spec for leaf in jax.tree.leaves(layer)] for layer in
             parallel.state_shardings(state, parallel.make_mesh(4, 2), net=net).params]
    expected = [[PartitionSpec("model"), PartitionSpec(None, "model")],   # column
                [PartitionSpec(), PartitionSpec()],                       # Mix: replicated
                [PartitionSpec("model"), PartitionSpec(None, "model")],   # column again
                [PartitionSpec(), PartitionSpec("model", None)]]          # row
    ok = specs == expected
    print(f"{'ok' if ok else 'FAIL'} user record replicated, Dense pairs split: {specs}")
    return ok


def check_collectives() -> bool:
    """Megatron splits on a (1, 2) mesh: columns then rows, so no activation is
    all-gathered; forward: one all-reduce per layer pair, backward: one between pairs
    (the input layer's error is not passed on), and one for the metrics."""
    net = jaxbp.MLP((64, 512, 512, 512, 10), "relu")
    mesh = parallel.make_mesh(data=1, model=2, devices=jax.devices()[:2])
    optimizer = optax.sgd(1e-3)
    state = jaxbp.TrainState.create(net.init(jax.random.key(0)), optimizer)
    step = parallel.make_sharded_train_step(net, optimizer, mesh)
    x, y = np.ones((16, 64), np.float32), np.zeros(16, np.int32)
    text = step.lower(state, x, y).compile().as_text()
    counts = {op: len(re.findall(rf"= [^=]*? {op}(-start)?\(", text))
              for op in ("all-gather", "all-reduce", "reduce-scatter", "all-to-all")}
    specs = [state_leaf.sharding.spec for state_leaf in
             jax.tree.leaves(step(state, x, y)[0].params)]
    expected = [PartitionSpec("model"), PartitionSpec(None, "model"),  # layer 1: columns
                PartitionSpec(), PartitionSpec("model", None)] * 2      # layer 2: rows
    ok = (counts["all-gather"] == 0 and counts["all-to-all"] == 0
          and counts["all-reduce"] <= 4 and specs == expected)
    print(f"{'ok' if ok else 'FAIL'} collectives {counts}, param specs {specs}")
    return ok


if __name__ == "__main__":
    sys.exit(main())
