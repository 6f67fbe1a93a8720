"""GGN diagonal, Hessian-vector products and K-FAC factors of any Network, against
jax.hessian / the exact J^T H J (float64) over random conv / layernorm / residual chains."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_normwise_close, kfac_blocks, random_inputs

import jaxbp
from jaxbp import layers as L
from jaxbp.check.suite import random_network

CASES = [0, 3, 4]   # batch 1 and 1x1 images (0), max and average pools, layernorms, residuals


def _case(i):
    net, batch = random_network(i, "float64")
    x, y = random_inputs(np.random.default_rng(i), net.loss, batch, net.input_shape,
                         net.n_out, "float64", integer_labels=bool(i % 2))
    return net, net.init(jax.random.key(i)), jnp.asarray(x), jnp.asarray(y)


def _flat(tree):
    return jnp.concatenate([jnp.ravel(leaf) for leaf in jax.tree.leaves(tree)])


def _exact_ggn(net, params, x, y):
    """(1/N) sum_n J_n^T H_n J_n from jax.jacfwd of the output and jax.hessian of the loss."""
    leaves, treedef = jax.tree.flatten(params)
    sizes = [leaf.size for leaf in leaves]

    def unflat(theta):
        parts = jnp.split(theta, np.cumsum(sizes)[:-1])
        return treedef.unflatten([p.reshape(leaf.shape) for p, leaf in zip(parts, leaves)])

    theta = _flat(params)
    out = net.apply(params, x)
    jac = jax.jit(jax.jacfwd(lambda t: net.apply(unflat(t), x)))(theta)   # (B, n_out, P)

    def sample_loss(a, target):
        return net.loss_fn.sample_loss(a[None], target[None])[0]

    hessians = jax.vmap(jax.hessian(sample_loss))(out, y)                 # (B, n_out, n_out)
    total = jnp.einsum("bop,boq,bqr->pr", jac, hessians, jac)
    return total / x.shape[0], unflat


def test_cases_cover_the_layer_types():
    nets = [random_network(i, "float32") for i in CASES]
    kinds = {type(layer).__name__ for net, _ in nets for layer in net.layers}
    assert kinds >= {"Conv2D", "MaxPool", "AvgPool", "LayerNorm", "Residual", "Dense"}
    assert min(b for _, b in nets) == 1 and (1, 1, 1) in {net.input_shape for net, _ in nets}


@pytest.mark.parametrize("i", CASES)
def test_ggn_diag_and_hvp_match_autodiff(i, x64):
    net, params, x, y = _case(i)
    # the references on the CPU backend: XLA:GPU has no exact second derivative of a max
    # pool (JAX packs value and index into one word there: float32 precision in float64)
    with jax.default_device(jax.devices("cpu")[0]):
        ggn, unflat = _exact_ggn(net, params, x, y)
        v = unflat(jax.random.normal(jax.random.key(i), (ggn.shape[0],), jnp.float64))
        want = jax.jit(lambda p, t: jax.jvp(jax.grad(lambda q: net.cost(q, x, y)), (p,), (t,))[1])(
            params, v)
    diag = jaxbp.ggn_diag(net, params, x, y)
    np.testing.assert_allclose(_flat(diag), jnp.diag(ggn), rtol=1e-10,
                               atol=1e-12 * float(jnp.max(jnp.abs(ggn))))
    got = jaxbp.hvp(net, params, x, y, v)
    scale = float(jnp.max(jnp.abs(_flat(want))))
    np.testing.assert_allclose(_flat(got), _flat(want), rtol=1e-10, atol=1e-12 * scale)


def _conv_dense_net(loss="softmax_cross_entropy"):
    return jaxbp.Network((L.Conv2D(3, (2, 2), stride=2, activation="tanh", padding="VALID"),
                          L.MaxPool((1, 1)), L.Flatten(), L.Dense(4, "relu"), L.Dense(3)),
                         (4, 4, 2), loss, dtype="float64")


def test_kfac_of_one_sample_is_its_gradients_outer_product(x64):
    """Empirical, batch of one, a conv with one output position per sample row of the
    patches: A kron G equals g g^T with the documented row order ([W (c, i, j); b])."""
    net = jaxbp.Network((L.Conv2D(3, (4, 4), activation="tanh", padding="VALID"),
                         L.Flatten(), L.Dense(3)), (4, 4, 2), dtype="float64")
    params = net.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (1, 4, 4, 2), jnp.float64)
    y = jnp.array([2])
    factors = jaxbp.kfac_factors(net, params, x, y, kind="empirical")
    grads = jaxbp.backprop(net, params, x, y)
    conv_g = np.concatenate([np.asarray(grads[0]["w"]).transpose(2, 0, 1, 3).reshape(-1, 3),
                             np.asarray(grads[0]["b"])[None]], axis=0).ravel()
    np.testing.assert_allclose(np.kron(factors[0]["A"], factors[0]["G"]),
                               np.outer(conv_g, conv_g), rtol=1e-10, atol=1e-14)
    dense_g = np.concatenate([np.asarray(grads[2]["w"]), np.asarray(grads[2]["b"])[None]],
                             axis=0).ravel()
    np.testing.assert_allclose(np.kron(factors[2]["A"], factors[2]["G"]),
                               np.outer(dense_g, dense_g), rtol=1e-10, atol=1e-14)
    assert factors[1] == {}


def test_kfac_of_a_dense_network_equals_the_mlps(x64):
    mlp = jaxbp.MLP((5, 4, 3), "tanh", dtype="float64")
    params = mlp.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (6, 5), jnp.float64)
    y = jnp.array([0, 1, 2, 0, 1, 2])
    for kind, key in (("exact", None), ("empirical", None), ("sampled", jax.random.key(2))):
        want = jaxbp.kfac_factors(mlp, params, x, y, kind=kind, key=key)
        got = jaxbp.kfac_factors(mlp.network, params, x, y, kind=kind, key=key)
        for w, g in zip(want, got):
            for name in ("A", "G"):
                assert_normwise_close(g[name], w[name], rtol=1e-12, atol=1e-15)


def test_conv_kfac_convention_positions_summed_for_a_averaged_for_g(x64):
    net = _conv_dense_net()
    params = net.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (3, 4, 4, 2), jnp.float64)
    y = jnp.array([0, 1, 2])
    factors = jaxbp.kfac_factors(net, params, x, y, kind="empirical")
    patches = net.layers[0]._patches(x)                                  # (3, T=4, 8)
    p_bar = np.concatenate([np.asarray(patches), np.ones((3, 4, 1))], axis=2).reshape(-1, 9)
    assert_normwise_close(factors[0]["A"], p_bar.T @ p_bar / 3, rtol=1e-12)
    _, caches, deltas = jaxbp.network.layer_deltas(net, params, x, y, per_sample=True)
    dz = np.asarray(net.layers[0].pre_activation_error(caches[0], deltas[0])).reshape(-1, 3)
    assert_normwise_close(factors[0]["G"], dz.T @ dz / (3 * 4), rtol=1e-12)


def test_kfac_of_one_sample_covers_layernorm_and_residual_blocks(x64):
    """Empirical, one sample: every block is its own gradient's outer product, the
    LayerNorms' diagonal blocks g (.) g, a Residual's inner layers block by block."""
    net = jaxbp.Network((L.Dense(4, "tanh"), L.LayerNorm(),
                         L.Residual((L.Dense(4, "tanh"), L.LayerNorm(), L.Dense(4))),
                         L.Dense(2)), (3,), dtype="float64")
    params = net.init(jax.random.key(0))
    x, y = np.random.default_rng(0).standard_normal((1, 3)), np.array([1])
    factors = jaxbp.kfac_factors(net, params, x, y, kind="empirical")
    grads = jaxbp.backprop(net, params, x, y)
    kinds = []
    for block, matrix, (g,) in kfac_blocks(factors, grads):
        kinds.append("diag" if "diag" in block else "A")
        np.testing.assert_allclose(matrix if "A" in block else np.diag(matrix),
                                   np.outer(g, g) if "A" in block else g * g,
                                   rtol=1e-10, atol=1e-14)
    assert kinds == ["A", "diag", "A", "diag", "A", "A"]


def test_kfac_step_on_a_conv_network_preconditions_by_the_damped_kfc_block(x64):
    """kfac_gradient on a conv Network: the hand-written gradient, kfac_factors' factors
    (sampled draws folded with the step; empirical ones read off the gradient's own
    errors), and the preconditioner solves (A_d kron G_d)
    for the conv kernel in the documented row order and puts it back as HWIO."""
    net = _conv_dense_net()
    params = net.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (3, 4, 4, 2), jnp.float64)
    y = jnp.array([0, 1, 2])
    key = jax.random.key(4)
    loss, grads, _, extra = jaxbp.kfac_gradient("sampled", key=key)(net, params, x, y, 7)
    np.testing.assert_allclose(loss, net.cost(params, x, y), rtol=1e-13)
    assert_close = functools.partial(assert_normwise_close, rtol=1e-12, atol=1e-15)
    jax.tree.map(assert_close, grads, jaxbp.backprop(net, params, x, y))
    jax.tree.map(assert_close, extra["factors"],
                 jaxbp.kfac_factors(net, params, x, y, key=jax.random.fold_in(key, 7)))
    _, grads_e, _, extra_e = jaxbp.kfac_gradient()(net, params, x, y, 7)  # empirical
    jax.tree.map(assert_close, grads_e, grads)
    jax.tree.map(assert_close, extra_e["factors"],
                 jaxbp.kfac_factors(net, params, x, y, kind="empirical"))
    damping = 0.2
    pre, _ = jaxbp.kfac_preconditioner(damping).update(grads, None, **extra)
    assert pre[1] == {} and pre[2] == {}
    for layer, g, p, f in ((0, grads[0], pre[0], extra["factors"][0]),
                           (3, grads[3], pre[3], extra["factors"][3])):
        a, gg = np.asarray(f["A"]), np.asarray(f["G"])
        pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(gg) / len(gg)))
        block = np.kron(a + pi * np.sqrt(damping) * np.eye(len(a)),
                        gg + np.sqrt(damping) / pi * np.eye(len(gg)))

        def rows(w):
            w = np.asarray(w)
            return w if w.ndim == 2 else w.transpose(2, 0, 1, 3).reshape(-1, w.shape[-1])

        stacked = np.concatenate([rows(g["w"]), np.asarray(g["b"])[None]], 0).ravel()
        got = np.concatenate([rows(p["w"]), np.asarray(p["b"])[None]], 0).ravel()
        np.testing.assert_allclose(got, np.linalg.solve(block, stacked), rtol=1e-9,
                                   err_msg=f"layer {layer}")
        assert p["w"].shape == g["w"].shape


def test_kfac_trains_a_conv_network():
    import optax

    net = jaxbp.Network((L.Conv2D(4, (3, 3), activation="relu"), L.MaxPool(2), L.Flatten(),
                         L.Dense(3)), (6, 6, 1))
    params = net.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (48, 6, 6, 1))
    y = jnp.argmax(x.reshape(48, -1)[:, :3], axis=1)
    optimizer = optax.chain(jaxbp.kfac_preconditioner(0.1), optax.sgd(0.1, momentum=0.9))
    step = jaxbp.make_train_step(net, optimizer, grad=jaxbp.kfac_gradient("sampled",
                                                                          jax.random.key(2)))
    state = jaxbp.TrainState.create(params, optimizer)
    first = net.cost(params, x, y)
    for _ in range(30):
        state, _ = step(state, x, y)
    assert net.cost(state.params, x, y) < 0.5 * first
