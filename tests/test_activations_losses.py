"""Each activation and loss against an independent NumPy formula, and its derivative too."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbp
from jaxbp import activations, losses, record_checks
from jaxbp.losses import mean_loss, mean_loss_grad

Z = np.linspace(-6, 6, 241)
Z = Z[np.abs(Z) > 1e-9]  # away from the kink at 0; the kink has its own test


def _numpy_g(name: str, z: np.ndarray) -> np.ndarray:
    sig = 1 / (1 + np.exp(-z))
    return {
        "identity": z,
        "sigmoid": sig,
        "tanh": np.tanh(z),
        "relu": np.maximum(z, 0),
        "leaky_relu": np.where(z >= 0, z, 0.01 * z),
        "elu": np.where(z > 0, z, np.exp(z) - 1),
        "softplus": np.log1p(np.exp(z)),
        "gelu": 0.5 * z * (1 + np.tanh(np.sqrt(2 / np.pi) * (z + 0.044715 * z**3))),
        "silu": z * sig,
    }[name]


def test_registry_is_the_design_list():
    assert set(jaxbp.ACTIVATIONS) == {"identity", "sigmoid", "tanh", "relu", "leaky_relu",
                                      "elu", "softplus", "gelu", "silu"}
    assert set(jaxbp.LOSSES) == {"squared_error", "softmax_cross_entropy",
                                 "sigmoid_cross_entropy"}


@pytest.mark.parametrize("name", sorted(jaxbp.ACTIVATIONS))
def test_activation_matches_numpy(name):
    with jax.enable_x64(True):
        a = jaxbp.ACTIVATIONS[name].g(jnp.asarray(Z))
        # atol: gelu's 1 + tanh(u) cancels for z << 0 (1e-16 absolute in either formula)
        np.testing.assert_allclose(a, _numpy_g(name, Z), rtol=1e-13, atol=1e-14)


@pytest.mark.parametrize("name", sorted(jaxbp.ACTIVATIONS))
def test_derivative_matches_central_differences(name):
    """g'(z) vs (g(z + h) - g(z - h)) / 2h of the NumPy formula, in float64."""
    with jax.enable_x64(True):
        act = jaxbp.ACTIVATIONS[name]
        z = jnp.asarray(Z)
        dg = act.dg(z, act.g(z))
    h = 1e-6
    fd = (_numpy_g(name, Z + h) - _numpy_g(name, Z - h)) / (2 * h)
    np.testing.assert_allclose(dg, fd, rtol=1e-7, atol=1e-9)


@pytest.mark.parametrize("name", sorted(jaxbp.ACTIVATIONS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_derivative_keeps_dtype(name, dtype):
    act = jaxbp.ACTIVATIONS[name]
    z = jnp.linspace(-3, 3, 7, dtype=dtype)
    assert act.dg(z, act.g(z)).dtype == jnp.dtype(dtype)


@pytest.mark.parametrize("name", sorted(jaxbp.ACTIVATIONS))
def test_derivative_at_zero_follows_jax_grad(name):
    """At the kink the hand-written g'(0) is jax's convention (relu'(0) = 0, ...)."""
    act = jaxbp.ACTIVATIONS[name]
    z = jnp.zeros(1)
    assert float(act.dg(z, act.g(z))[0]) == float(jax.grad(lambda t: act.g(t).sum())(z)[0])


def _numpy_losses(name, a, y):
    if name == "squared_error":
        return np.mean([sum((a[n, j] - y[n, j]) ** 2 for j in range(a.shape[1]))
                        for n in range(a.shape[0])])
    if name == "sigmoid_cross_entropy":
        p = 1 / (1 + np.exp(-a))
        return np.mean(np.sum(-y * np.log(p) - (1 - y) * np.log(1 - p), axis=1))
    p = np.exp(a) / np.exp(a).sum(axis=1, keepdims=True)
    return np.mean(np.sum(-y * np.log(p), axis=1))


@pytest.mark.parametrize("name", sorted(jaxbp.LOSSES))
def test_loss_matches_numpy_and_grad_matches_jax(name):
    rng = np.random.default_rng(0)
    a = rng.normal(size=(5, 4))
    y = rng.random((5, 4))
    if name == "softmax_cross_entropy":
        y /= y.sum(axis=1, keepdims=True)
    loss = jaxbp.LOSSES[name]
    with jax.enable_x64(True):
        value = mean_loss(loss, jnp.asarray(a), jnp.asarray(y))
        grad = mean_loss_grad(loss, jnp.asarray(a), jnp.asarray(y))
        reference = jax.grad(lambda t: mean_loss(loss, t, jnp.asarray(y)))(jnp.asarray(a))
    np.testing.assert_allclose(value, _numpy_losses(name, a, y), rtol=1e-13)
    np.testing.assert_allclose(grad, reference, rtol=1e-13, atol=1e-16)


def test_softmax_grad_with_unnormalised_targets():
    """dl/da_k = p_k sum_j y_j - y_k holds for any y, not only rows summing to 1."""
    with jax.enable_x64(True):
        a, y = jnp.array([[0.3, -1.0, 2.0]]), jnp.array([[0.5, 2.0, 0.0]])
        loss = jaxbp.LOSSES["softmax_cross_entropy"]
        reference = jax.grad(lambda t: loss.sample_loss(t, y).sum())(a)
        np.testing.assert_allclose(loss.sample_grad(a, y), reference, rtol=1e-14)


@pytest.mark.parametrize("name", ["softmax_cross_entropy", "sigmoid_cross_entropy"])
def test_cross_entropies_are_stable(name):
    loss = jaxbp.LOSSES[name]
    a = jnp.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 3.0]])
    y = jnp.array([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0]])
    values, grads = loss.sample_loss(a, y), loss.sample_grad(a, y)
    assert np.all(np.isfinite(values)) and np.all(np.isfinite(grads))
    if name == "softmax_cross_entropy":  # logsumexp(a) - a_1 = 1e4 - (-1e4)
        expected = (2e4, 1e4 - 1e4)
    else:  # sum_j softplus(a_j) - a_j y_j: 1e4 + 1e4 + log 2, then 0 + 0 + softplus(3)
        expected = (2e4 + np.log(2), np.log1p(np.exp(3.0)))
    np.testing.assert_allclose(values, expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", sorted(jaxbp.LOSSES))
def test_fused_loss_and_grad_equal_the_separate_ones(name):
    from jaxbp.losses import sample_loss_and_grad

    rng = np.random.default_rng(3)
    a = jnp.asarray(rng.normal(size=(6, 5)) * 3)
    y = jnp.asarray(rng.integers(0, 5, size=6)) if name == "softmax_cross_entropy" \
        else jnp.asarray(rng.random((6, 5)))
    loss = jaxbp.LOSSES[name]
    losses, grads = sample_loss_and_grad(loss, a, y)
    np.testing.assert_allclose(losses, loss.sample_loss(a, y), rtol=1e-6)
    np.testing.assert_allclose(grads, loss.sample_grad(a, y), rtol=1e-6, atol=1e-7)


@pytest.fixture
def registries():
    """The registries as they were, after the test (a registration lasts for the process:
    the other tests in this worker see only the built-ins)."""
    saved = [(registry, dict(registry)) for registry in (activations.ACTIVATIONS,
                                                          losses.LOSSES)]
    yield
    for registry, before in saved:
        registry.clear()
        registry.update(before)


def _squared_relu(dg=None, d2g=None, name="squared_relu"):
    return activations.Activation(
        name, lambda z: jnp.maximum(z, 0) ** 2,
        dg or (lambda z, a: 2 * jnp.maximum(z, 0)), True,
        d2g or (lambda z, a: jnp.where(z > 0, 2.0, 0.0)))


def test_a_registered_activation_runs_everywhere_a_built_in_does(registries, x64):
    """register: the user's g, g' and g'' by hand, checked against jax.grad when added;
    then every network and quantity takes the name."""
    activations.register(_squared_relu())
    net = jaxbp.MLP((4, 6, 3), activation="squared_relu", loss="squared_error",
                    dtype="float64")
    params = net.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (5, 4), jnp.float64)
    y = jax.random.normal(jax.random.key(2), (5, 3), jnp.float64)
    _, manual = jaxbp.value_and_backprop(net, params, x, y)
    _, reference = jaxbp.value_and_autodiff(net, params, x, y)
    for m, r in zip(jax.tree.leaves(manual), jax.tree.leaves(reference)):
        np.testing.assert_allclose(m, r, rtol=1e-12, atol=1e-14)
    # the curvature path reads g'': hvp is forward mode over the hand-written gradient
    v = jax.tree.map(jnp.ones_like, params)
    hv = jaxbp.hvp(net, params, x, y, v)
    _, expected = jax.jvp(lambda p: jaxbp.value_and_autodiff(net, p, x, y)[1], (params,), (v,))
    for m, r in zip(jax.tree.leaves(hv), jax.tree.leaves(expected)):
        np.testing.assert_allclose(m, r, rtol=1e-10, atol=1e-12)
    layer = jaxbp.Network((jaxbp.layers.Dense(6, "squared_relu"), jaxbp.layers.Dense(3)),
                          (4,), loss="squared_error", dtype="float64")
    assert jaxbp.backprop(layer, layer.init(jax.random.key(0)), x, y)[0]["w"].shape == (4, 6)


def test_register_refuses_what_would_train_wrongly(registries):
    for bad, what in ((_squared_relu(dg=lambda z, a: jnp.maximum(z, 0)), "dg"),
                      (_squared_relu(d2g=lambda z, a: jnp.where(z > 0, 1.0, 0.0)), "d2g")):
        with pytest.raises(ValueError, match=rf"'squared_relu': {what} differs from jax\.grad's "
                                             rf"at z = 0\.10: 0\.1 by hand, 0\.2 by jax\.grad"
                                             if what == "dg" else rf"{what} differs"):
            activations.register(bad)
    assert "squared_relu" not in activations.ACTIVATIONS          # nothing half-registered
    with pytest.raises(ValueError, match="'relu' is a built-in"):
        activations.register(_squared_relu(name="relu"))
    activations.register(_squared_relu())
    with pytest.raises(ValueError, match="'squared_relu' is already registered"):
        activations.register(_squared_relu())
    with pytest.raises(TypeError, match=r"must be a jaxbp\.activations\.Activation"):
        activations.register(("cube", lambda z: z ** 3))
    with pytest.raises(TypeError, match="he_init must be True or False, got 'yes'"):
        activations.register(_squared_relu(name="x")._replace(he_init="yes"))
    numpy_g = _squared_relu(name="numpy_g")._replace(g=lambda z: np.maximum(np.asarray(z), 0))
    with pytest.raises(ValueError, match=r"'numpy_g': jax\.grad of its function failed "
                                         r".* registered with check=False"):
        activations.register(numpy_g)


def _huber(a, y):
    r = jnp.abs(a - y)
    return jnp.sum(jnp.where(r < 1, 0.5 * r ** 2, r - 0.5), axis=-1)


def _huber_loss(grad=None, **parts):
    return losses.Loss("huber", _huber, grad or (lambda a, y: jnp.clip(a - y, -1, 1)),
                       integer_labels=False, **parts)


def test_a_registered_loss_trains_and_names_what_it_lacks(registries, x64):
    """losses.register: the user's sample_grad by hand, checked against jax.grad when
    added; then networks, steps and per-example quantities take it by name, and what needs
    a part it lacks (the Hessian factor, sampled targets) says so."""
    losses.register(_huber_loss())
    net = jaxbp.MLP((4, 8, 2), "tanh", loss="huber", dtype="float64")
    params = net.init(jax.random.key(0))
    x = jax.random.normal(jax.random.key(1), (6, 4), jnp.float64)
    y = 3 * jax.random.normal(jax.random.key(2), (6, 2), jnp.float64)   # both branches
    _, manual = jaxbp.value_and_backprop(net, params, x, y)
    _, reference = jaxbp.value_and_autodiff(net, params, x, y)
    for m, r in zip(jax.tree.leaves(manual), jax.tree.leaves(reference)):
        np.testing.assert_allclose(m, r, rtol=1e-12, atol=1e-14)
    norms = jaxbp.per_example_grad_norms(net, params, x, y)
    each = jax.vmap(lambda xi, yi: jaxbp.value_and_autodiff(net, params, xi[None],
                                                             yi[None])[1])(x, y)
    np.testing.assert_allclose(norms, np.sqrt(sum(np.sum(g ** 2, axis=tuple(range(1, g.ndim)))
                                                  for g in jax.tree.leaves(each))), rtol=1e-12)
    jaxbp.kfac_factors(net, params, x, y, kind="empirical")      # needs only the gradient
    with pytest.raises(ValueError, match="loss 'huber' has no sample_hessian_factor, which "
                                         "ggn_diag and kfac_factors"):
        jaxbp.ggn_diag(net, params, x, y)
    with pytest.raises(ValueError, match="has no sample_targets, which K-FAC of kind "
                                         "'sampled'"):
        jaxbp.kfac_factors(net, params, x, y, key=jax.random.key(0))


def test_register_refuses_a_loss_that_would_train_wrongly(registries):
    with pytest.raises(ValueError, match=r"loss 'huber': sample_grad differs from "
                                         r"jax\.grad's at row \d+, output \d+"):
        losses.register(_huber_loss(grad=lambda a, y: a - y))          # not clipped
    wrong_factor = _huber_loss(sample_hessian_factor=lambda a, y: jnp.ones((*a.shape, 1)))
    with pytest.raises(ValueError, match="sample_hessian_factor S"):
        losses.register(wrong_factor)
    assert "huber" not in losses.LOSSES
    with pytest.raises(ValueError, match="'squared_error' is a built-in"):
        losses.register(_huber_loss()._replace(name="squared_error"))
    with pytest.raises(TypeError, match=r"hits must be a function or None, got int"):
        losses.register(_huber_loss(hits=3))
    with pytest.raises(TypeError, match=r"must be a jaxbp\.losses\.Loss"):
        losses.register("huber")
    for built_in in losses.LOSSES.values():      # the checker holds the built-ins' own
        record_checks.check_loss(built_in)       # derivatives (labels too) to jax's
