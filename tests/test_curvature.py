"""Hessian-vector products and the GGN diagonal against jax's autodiff, in float64."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import assert_normwise_close, forbid_autodiff, to_f64

import jaxbp

ACTS = sorted(jaxbp.ACTIVATIONS)
LOSSES = sorted(jaxbp.LOSSES)


def case(i: int):
    rng = np.random.default_rng(900 + i)
    depth = 1 + i % 3
    sizes = [int(s) for s in rng.integers(2, 7, size=depth + 1)]
    loss = LOSSES[i % 3]
    net = jaxbp.MLP(tuple(sizes), ACTS[i % 9], ACTS[(i * 2) % 9] if loss == "squared_error"
                    else ("identity" if i % 2 else ACTS[(i * 4) % 9]), loss, "float64")
    batch = 1 + i % 5
    x = jnp.asarray(rng.normal(size=(batch, sizes[0])))
    if loss == "softmax_cross_entropy":
        y = jnp.asarray(rng.integers(0, sizes[-1], size=batch))
    elif loss == "sigmoid_cross_entropy":
        y = jnp.asarray(rng.random((batch, sizes[-1])))
    else:
        y = jnp.asarray(rng.normal(size=(batch, sizes[-1])))
    params = net.init(jax.random.key(i))
    params = jax.tree.map(lambda p: p + 0.1 * jnp.asarray(rng.normal(size=p.shape)), params)
    v = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)), params)
    return net, params, x, y, v


def flat(tree) -> np.ndarray:
    return np.concatenate([np.ravel(a) for a in jax.tree.leaves(to_f64(tree))])


def rel(a, b) -> float:
    err = np.max(np.abs(a - b), initial=0.0)
    return 0.0 if err == 0 else err / np.max(np.abs(b))


@pytest.mark.parametrize("name", ACTS)
def test_second_derivative_matches_central_differences(name):
    with jax.enable_x64(True):
        act = jaxbp.ACTIVATIONS[name]
        z = jnp.linspace(-4, 4, 161)
        z = z[jnp.abs(z) > 1e-6]
        h = 1e-5
        fd = (act.dg(z + h, act.g(z + h)) - act.dg(z - h, act.g(z - h))) / (2 * h)
        np.testing.assert_allclose(act.d2g(z, act.g(z)), fd, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("i", range(0, 27, 4))  # 7: every loss and depth
def test_hvp_equals_jvp_of_grad(i):
    with jax.enable_x64(True):
        net, params, x, y, v = case(i)
        manual = jaxbp.hvp(net, params, x, y, v)
        grad = jax.grad(lambda p: net.cost(p, x, y))
        reference = jax.jvp(grad, (params,), (v,))[1]
        assert rel(flat(manual), flat(reference)) <= 1e-10


@pytest.mark.parametrize("i", range(2, 27, 4))  # 7 more: the 9 activations in all
def test_ggn_diag_equals_jacobian_hessian_product(i):
    with jax.enable_x64(True):
        net, params, x, y, _ = case(i)
        flat_params, unravel = jax.flatten_util.ravel_pytree(params)
        loss = net.loss_fn
        diag = np.zeros(flat_params.size)
        for n in range(x.shape[0]):
            out = lambda p, n=n: net.apply(unravel(p), x[n:n + 1])[0]  # noqa: E731
            jac = jax.jacfwd(out)(flat_params)  # (n_out, P)
            hess = jax.hessian(lambda a, n=n: loss.sample_loss(a[None], y[n:n + 1])[0])(
                out(flat_params))
            diag += np.einsum("cp,cd,dp->p", jac, hess, jac)
        diag /= x.shape[0]
        manual = flat(jaxbp.ggn_diag(net, params, x, y))
        assert rel(manual, diag) <= 1e-10


def test_hessian_factors_reproduce_the_loss_hessians():
    with jax.enable_x64(True):
        rng = np.random.default_rng(0)
        a = jnp.asarray(rng.normal(size=(3, 4)))
        for name, y in (("squared_error", jnp.asarray(rng.normal(size=(3, 4)))),
                        ("sigmoid_cross_entropy", jnp.asarray(rng.random((3, 4)))),
                        ("softmax_cross_entropy", jnp.asarray([0, 3, 1]))):
            loss = jaxbp.LOSSES[name]
            s = loss.sample_hessian_factor(a, y)
            r = jnp.asarray(rng.normal(size=(3, 4)))
            for n in range(3):
                hess = jax.hessian(lambda t, n=n, loss=loss, y=y:
                                   loss.sample_loss(t[None], y[n:n + 1])[0])(a[n])
                np.testing.assert_allclose(s[n] @ s[n].T, hess, atol=1e-12)
                np.testing.assert_allclose(loss.sample_hvp(a, y, r)[n], hess @ r[n],
                                           atol=1e-12)


def test_manual_curvature_calls_no_autodiff(monkeypatch):
    """ggn_diag and K-FAC run on the records alone; hvp is forward mode (jax.jvp) over the
    hand-written gradient, and calls no reverse-mode autodiff."""
    net = jaxbp.MLP((3, 4, 2), "tanh", loss="softmax_cross_entropy")
    params = net.init(jax.random.key(0))
    x, y = jnp.ones((2, 3)), jnp.array([0, 1])
    jvp = jax.jvp
    forbid_autodiff(monkeypatch)  # the same list as the first-order path, linear_transpose too
    jaxbp.ggn_diag(net, params, x, y)
    jaxbp.kfac_factors(net, params, x, y, kind="exact")
    monkeypatch.setattr(jax, "jvp", jvp)
    jaxbp.hvp(net, params, x, y, params)


def test_bad_direction():
    net = jaxbp.MLP((3, 4, 2), "tanh")
    params = net.init(jax.random.key(0))
    with pytest.raises(ValueError, match=r"v\[0\]\['w'\] has shape \(4, 3\) but expected"):
        jaxbp.hvp(net, params, np.ones((2, 3), np.float32), np.array([0, 1]),
                  ({"w": jnp.ones((4, 3)), "b": jnp.ones(4)}, params[1]))


class TestKFAC:
    def test_batch_of_one_gives_the_exact_fisher_block(self):
        with jax.enable_x64(True):
            for i in range(3):  # the three losses
                net, params, x, y, _ = case(i)
                x1, y1 = x[:1], y[:1]
                factors = jaxbp.kfac_factors(net, params, x1, y1, kind="empirical")
                per_sample = jaxbp.per_example_grads(net, params, x1, y1)
                for layer, f in zip(per_sample, factors):
                    g = np.concatenate([np.asarray(layer["w"][0]), np.asarray(layer["b"])],
                                       axis=0).ravel()  # [W; b] row by row
                    assert_normwise_close(np.kron(f["A"], f["G"]), np.outer(g, g),
                                               rtol=1e-12, atol=1e-14)

    def test_factors_are_batch_means(self):
        with jax.enable_x64(True):
            net, params, x, y, _ = case(7)
            factors = jaxbp.kfac_factors(net, params, x, y, kind="exact")
            a_bar = np.concatenate([np.asarray(x), np.ones((x.shape[0], 1))], 1)
            assert_normwise_close(factors[0]["A"], a_bar.T @ a_bar / x.shape[0], rtol=1e-13)

    @pytest.mark.parametrize("i", range(3))
    def test_sampled_is_the_default_and_needs_a_key(self, i):
        with jax.enable_x64(True):
            net, params, x, y, _ = case(i)
            with pytest.raises(ValueError, match="pass a PRNG key"):
                jaxbp.kfac_factors(net, params, x, y)
            with pytest.raises(ValueError, match="Unknown kind 'fisher'"):
                jaxbp.kfac_factors(net, params, x, y, kind="fisher")
            a = jaxbp.kfac_factors(net, params, x, y, key=jax.random.key(0))
            b = jaxbp.kfac_factors(net, params, x, y, kind="mc", key=jax.random.key(0))
            np.testing.assert_array_equal(a[-1]["G"], b[-1]["G"])
            assert np.all(np.linalg.eigvalsh(np.asarray(a[-1]["G"])) > -1e-12)

    def test_exact_is_the_expectation_over_the_models_targets(self):
        """Softmax cross-entropy: G_exact = mean_n sum_c p_nc G_empirical(x_n, e_c); the
        sampled G converges to it; the empirical G at the given labels is another matrix."""
        with jax.enable_x64(True):
            net, params, x, y, _ = case(7)
            assert net.loss == "softmax_cross_entropy" and x.shape[0] > 1
            exact = jaxbp.kfac_factors(net, params, x, y, kind="exact")
            probs = np.asarray(jax.nn.softmax(net.apply(params, x)))
            expected = [np.zeros_like(f["G"]) for f in exact]
            for n in range(x.shape[0]):
                for c in range(net.n_out):
                    onehot = np.eye(net.n_out)[c][None]
                    emp = jaxbp.kfac_factors(net, params, x[n:n + 1], onehot, kind="empirical")
                    for acc, f in zip(expected, emp):
                        acc += probs[n, c] * np.asarray(f["G"]) / x.shape[0]
            for f, want in zip(exact, expected):
                np.testing.assert_allclose(f["G"], want, rtol=1e-10, atol=1e-14)
            draws = [jaxbp.kfac_factors(net, params, x, y, key=jax.random.key(k))[-1]["G"]
                     for k in range(400)]
            scale = np.abs(np.asarray(exact[-1]["G"])).max()
            assert np.abs(np.mean(draws, axis=0) - exact[-1]["G"]).max() < 0.1 * scale


def test_kfac_gradient_kinds_hand_the_optimizer_those_factors():
    with jax.enable_x64(True):
        net, params, x, y, _ = case(7)
        key = jax.random.key(3)
        for kind, kwargs in (("exact", {}), ("sampled", {"key": jax.random.fold_in(key, 5)})):
            source = jaxbp.kfac_gradient(kind, key=key if kind == "sampled" else None)
            _, grads, _, extra = source(net, params, x, y, 5)
            want = jaxbp.kfac_factors(net, params, x, y, kind=kind, **kwargs)
            for got, w in zip(extra["factors"], want):
                assert_normwise_close(got["G"], w["G"], rtol=1e-12, atol=1e-15)
            for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(jaxbp.backprop(net, params,
                                                                                  x, y))):
                assert_normwise_close(g, r, rtol=1e-12, atol=1e-15)
        with pytest.raises(ValueError, match="pass a PRNG key"):
            jaxbp.kfac_gradient("sampled")
        for kind in ("exact", "empirical"):   # a key there was read by nothing
            for call in (jaxbp.kfac_gradient,
                         functools.partial(jaxbp.kfac_factors, net, params, x, y)):
                with pytest.raises(ValueError, match=f"key is used only by kind='sampled' "
                                                     f".*; kind='{kind}' draws nothing"):
                    call(kind=kind, key=key)


class TestKFACPreconditioner:
    def test_is_the_inverse_of_the_damped_kronecker_block(self):
        with jax.enable_x64(True):
            net, params, x, y, _ = case(6)
            loss, grads, _, extra = jaxbp.kfac_gradient()(net, params, x, y, 0)
            np.testing.assert_allclose(loss, net.cost(params, x, y), rtol=1e-13)
            for g, r in zip(jax.tree.leaves(grads),
                            jax.tree.leaves(jaxbp.backprop(net, params, x, y))):
                assert_normwise_close(g, r, rtol=1e-12, atol=1e-15)
            damping = 0.3
            pre, _ = jaxbp.kfac_preconditioner(damping).update(grads, None, **extra)
            for layer, p, f in zip(grads, pre, extra["factors"]):
                a, gg = np.asarray(f["A"]), np.asarray(f["G"])
                pi = np.sqrt((np.trace(a) / len(a)) / (np.trace(gg) / len(gg)))
                a_d = a + pi * np.sqrt(damping) * np.eye(len(a))
                g_d = gg + np.sqrt(damping) / pi * np.eye(len(gg))
                stacked = np.concatenate([layer["w"], layer["b"][None]], 0)
                expected = np.linalg.solve(np.kron(a_d, g_d), stacked.ravel())
                got = np.concatenate([p["w"], p["b"][None]], 0).ravel()
                # normwise: a solve's entries that cancel move with the platform's algorithm
                assert_normwise_close(got, expected, rtol=1e-9)

    def test_trains_digits_fast(self):
        import optax

        digits = jaxbp.data.load_digits()
        net = jaxbp.MLP((64, 64, 10), "relu")
        optimizer = optax.chain(jaxbp.kfac_preconditioner(0.1), optax.sgd(0.3, momentum=0.9))
        result = jaxbp.fit(net, optimizer, digits, epochs=2, batch_size=128,
                           key=jax.random.key(0), grad=jaxbp.kfac_gradient(), progress=False)
        assert result.history["test_accuracy"][-1] > 0.9

    def test_without_factors_is_a_clear_error(self):
        import optax

        net = jaxbp.MLP((3, 4, 2), "tanh")
        params = net.init(jax.random.key(0))
        step = jaxbp.make_train_step(net, optax.chain(jaxbp.kfac_preconditioner(),
                                                      optax.sgd(0.1)))
        with pytest.raises(ValueError, match="needs the K-FAC factors"):
            step(jaxbp.TrainState.create(params, optax.chain(jaxbp.kfac_preconditioner(),
                                                             optax.sgd(0.1))),
                 np.ones((2, 3), np.float32), np.array([0, 1]))
        for damping in (0.0, "1e-3", float("inf")):
            with pytest.raises(ValueError, match="damping must be a finite number > 0"):
                jaxbp.kfac_preconditioner(damping)

    def test_factors_an_optimizer_would_drop_are_a_clear_error(self):
        """optax drops extra arguments no transformation takes: K-FAC's gradient with a
        plain optimizer trained as that optimizer, silently, having paid for the factors."""
        import optax

        net = jaxbp.MLP((3, 4, 2), "tanh")
        params = net.init(jax.random.key(0))
        x, y = np.ones((2, 3), np.float32), np.array([0, 1])
        for optimizer in (optax.adam(1e-3), optax.chain(optax.clip(1.0), optax.sgd(0.1))):
            for make in (jaxbp.make_train_step,
                         lambda *a, **k: jaxbp.make_train_loop(*a, steps=1, **k)):
                step = make(net, optimizer, grad=jaxbp.kfac_gradient(), donate=False)
                with pytest.raises(ValueError, match=r"hands the optimizer factors .* runs "
                                                     r"without them, so they would be dropped"):
                    step(jaxbp.TrainState.create(params, optimizer), x, y)
