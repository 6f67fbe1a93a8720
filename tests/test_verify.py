"""verify_grads on arbitrary functions and pytrees, right and wrong gradients."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxbp
from jaxbp.check.verify import GradientCheckError


def loss(params, scale):
    """L = sum sin(a) c^2 + scale * sum(log(1 + d^2)) over a nested pytree."""
    a, c = params["a"], params["nested"][0]
    d = params["nested"][1]["d"]
    return jnp.sum(jnp.sin(a) * c**2) + scale * jnp.sum(jnp.log1p(d**2))


def grad_by_hand(params, scale):
    a, c = params["a"], params["nested"][0]
    d = params["nested"][1]["d"]
    return {"a": jnp.cos(a) * c**2,
            "nested": [2 * jnp.sin(a) * c, {"d": scale * 2 * d / (1 + d**2)}]}


def make_params(dtype):
    rng = np.random.default_rng(0)
    return {"a": jnp.asarray(rng.normal(size=(3, 4)), dtype),
            "nested": [jnp.asarray(rng.normal(size=(3, 4)), dtype),
                       {"d": jnp.asarray(rng.normal(size=(5,)), dtype)}]}


class TestAnyPytree:
    def test_correct_gradient_passes_float64(self):
        with jax.enable_x64(True):
            report = jaxbp.verify_grads(grad_by_hand, loss, make_params(jnp.float64), 0.7)
        assert report.ok, str(report)
        assert report.max_rel_error < 1e-14
        assert [leaf.path for leaf in report.leaves] == [
            "['a']", "['nested'][0]", "['nested'][1]['d']"]
        assert all(d.fd_status == "ok" for d in report.directions)
        assert all(abs(d.taylor_order_manual - 2) < 0.1 for d in report.directions)
        assert all(d.fd_error_manual < 1e-7 for d in report.directions)

    def test_correct_gradient_passes_float32(self):
        report = jaxbp.verify_grads(grad_by_hand, loss, make_params(jnp.float32), 0.7)
        assert report.ok, str(report)
        assert report.max_rel_error < 1e-5
        assert all(d.fd_status == "ok" for d in report.directions)

    def test_wrong_element_is_found_with_its_index(self):
        def wrong(params, scale):
            grads = grad_by_hand(params, scale)
            grads["nested"][0] = grads["nested"][0].at[2, 1].add(0.5)
            return grads

        with jax.enable_x64(True):
            report = jaxbp.verify_grads(wrong, loss, make_params(jnp.float64), 0.7)
        assert not report.ok
        bad = [leaf for leaf in report.leaves if not leaf.ok]
        assert [leaf.path for leaf in bad] == ["['nested'][0]"]
        assert bad[0].index == (2, 1)
        assert bad[0].max_abs_error == pytest.approx(0.5)
        assert bad[0].manual_at_index - bad[0].reference_at_index == pytest.approx(0.5)

    def test_wrong_gradient_fails_fd_and_taylor_measures_order_one(self):
        def wrong(params, scale):  # drops the factor 2 of d/dd log(1 + d^2)
            grads = grad_by_hand(params, scale)
            grads["nested"][1]["d"] = grads["nested"][1]["d"] / 2
            return grads

        with jax.enable_x64(True):
            report = jaxbp.verify_grads(wrong, loss, make_params(jnp.float64), 0.7, n_fd=4)
        assert not report.ok
        assert all(d.fd_status == "FAIL" for d in report.directions)
        assert all(d.taylor_status == "FAIL" for d in report.directions)
        assert all(abs(d.taylor_order_manual - 1) < 0.2 for d in report.directions)
        assert all(abs(d.taylor_order_reference - 2) < 0.2 for d in report.directions)

    def test_raise_if_failed_labels_manual_and_reference(self):
        report = jaxbp.verify_grads(lambda p, s: jax.tree.map(jnp.zeros_like, p), loss,
                                    make_params(jnp.float32), 0.7)
        with pytest.raises(GradientCheckError) as info:
            report.raise_if_failed()
        text = str(info.value)
        assert "FAILED" in text and "manual" in text and "reference" in text
        assert text.count("FAIL") >= 3

    def test_passing_report_does_not_raise_and_prints_a_table(self):
        report = jaxbp.verify_grads(grad_by_hand, loss, make_params(jnp.float32), 0.7)
        report.raise_if_failed()
        text = str(report)
        assert text.startswith("verify_grads: OK")
        assert "max|manual-ref|" in text and "Taylor" in text
        assert report.summary() in text


class TestStepAndPrecision:
    @pytest.mark.parametrize("dtype", ["float32", "float64"])
    def test_fd_step_is_cbrt_eps_times_param_scale(self, dtype):
        with jax.enable_x64(True):
            params = make_params(jnp.dtype(dtype))
            report = jaxbp.verify_grads(grad_by_hand, loss, params, 0.7, n_fd=1)
        norm = np.sqrt(sum(np.sum(np.asarray(p, np.float64) ** 2)
                           for p in jax.tree.leaves(params)))
        eps = float(jnp.finfo(jnp.dtype(dtype)).eps)
        assert report.directions[0].h == pytest.approx(eps ** (1 / 3) * max(1.0, norm))

    def test_explicit_fd_eps_is_used(self):
        report = jaxbp.verify_grads(grad_by_hand, loss, make_params(jnp.float32), 0.7,
                                    fd_eps=1e-2, n_fd=1)
        assert report.directions[0].h == 1e-2

    def test_bfloat16_skips_fd_and_says_so(self):
        report = jaxbp.verify_grads(grad_by_hand, loss, make_params(jnp.bfloat16), 0.7)
        assert report.directions == ()
        assert any("skipped" in note for note in report.notes)
        assert report.ok, str(report)
        assert report.leaves[0].dtype == "bfloat16"

    def test_bfloat16_still_catches_a_wrong_gradient(self):
        def wrong(params, scale):
            grads = grad_by_hand(params, scale)
            grads["a"] = grads["a"] * 1.2
            return grads

        report = jaxbp.verify_grads(wrong, loss, make_params(jnp.bfloat16), 0.7)
        assert not report.ok

    def test_kink_is_inconclusive_not_passed(self):
        """At ReLU's kink FD sees |v|, jax.grad sees 0: neither can vouch for the other."""
        def relu_sum(p):
            return jnp.sum(jax.nn.relu(p["w"]))

        def by_hand(p):
            return {"w": (p["w"] > 0).astype(p["w"].dtype)}

        with jax.enable_x64(True):
            params = {"w": jnp.array([0.0, 0.0, 0.0, 1.0])}
            report = jaxbp.verify_grads(by_hand, relu_sum, params, n_fd=2)
        assert report.leaves[0].ok
        assert all(d.fd_status == "inconclusive" for d in report.directions)
        assert any("inconclusive" in note for note in report.notes)
        assert "inconclusive" in report.summary()


class TestBadUse:
    def test_structure_mismatch(self):
        with pytest.raises(ValueError, match="grad_fn returned a pytree of structure"):
            jaxbp.verify_grads(lambda p, s: [p["a"]], loss, make_params(jnp.float32), 0.7)

    def test_value_and_grad_hint(self):
        with pytest.raises(ValueError, match=r"seems to return \(value, grads\)"):
            jaxbp.verify_grads(lambda p, s: (loss(p, s), grad_by_hand(p, s)), loss,
                               make_params(jnp.float32), 0.7)

    def test_leaf_shape_mismatch(self):
        def transposed(params, scale):
            grads = grad_by_hand(params, scale)
            grads["a"] = grads["a"].T
            return grads

        with pytest.raises(ValueError, match=r"manual\['a'\] has shape \(4, 3\) but expected"):
            jaxbp.verify_grads(transposed, loss, make_params(jnp.float32), 0.7)

    def test_integer_leaf(self):
        with pytest.raises(TypeError, match=r"params\['n'\] must be floating"):
            jaxbp.verify_grads(lambda p: p, lambda p: jnp.sum(p["x"]),
                               {"n": jnp.arange(3), "x": jnp.ones(2)})

    def test_non_scalar_loss(self):
        """Named before jax.grad (whose own error names no argument)."""
        for loss, got in ((lambda p: p * 2, "shape (3,) of float32"),
                          (lambda p: (jnp.sum(p), 1.0), "a tuple"),
                          (lambda p: jnp.sum(p).astype(jnp.int32), "shape () of int32")):
            with pytest.raises(ValueError, match=re.escape(
                    f"loss_fn must return a floating scalar (shape ()), got {got}")):
                jaxbp.verify_grads(lambda p: p, loss, jnp.ones(3))


class TestOnMLPs:
    @pytest.mark.parametrize("act", sorted(jaxbp.ACTIVATIONS))
    def test_backprop_passes_verify(self, act):
        with jax.enable_x64(True):
            net = jaxbp.MLP((5, 6, 4), act, "identity", "softmax_cross_entropy", "float64")
            params = net.init(jax.random.key(1))
            x = jax.random.normal(jax.random.key(2), (7, 5), jnp.float64)
            y = jnp.arange(7) % 4
            report = jaxbp.verify_grads(lambda p, x, y: jaxbp.backprop(net, p, x, y),
                                        net.cost, params, x, y)
        assert report.ok, str(report)
        assert report.max_rel_error < 1e-12

    def test_detects_a_wrong_activation_derivative(self, monkeypatch):
        """Replace tanh' by 1 - a (a plausible slip): every check must notice."""
        from jaxbp import activations

        broken = activations.ACTIVATIONS["tanh"]._replace(dg=lambda z, a: 1 - a)
        monkeypatch.setitem(activations.ACTIVATIONS, "tanh", broken)
        # jit caches by net: compile afresh now, and drop the broken program afterwards
        jax.clear_caches()
        with jax.enable_x64(True):
            net = jaxbp.MLP((3, 5, 2), "tanh", "identity", "squared_error", "float64")
            params = net.init(jax.random.key(0))
            x = jax.random.normal(jax.random.key(1), (4, 3), jnp.float64)
            y = jnp.zeros((4, 2), jnp.float64)
            report = jaxbp.verify_grads(lambda p, x, y: jaxbp.backprop(net, p, x, y),
                                        net.cost, params, x, y)
        jax.clear_caches()
        assert not report.ok
        assert not report.leaves[0].ok or not report.leaves[1].ok  # layer 0's w or b
        assert any(d.fd_status == "FAIL" for d in report.directions)


def test_fd_and_taylor_evaluate_the_loss_at_highest_precision_and_say_so():
    """On a GPU JAX's default runs float32 matmuls as TF32: FD/Taylor of such a loss are
    noise. The loss is evaluated at "highest" unless the caller says otherwise."""
    seen = []

    def loss(p, x):
        seen.append(jax.config.jax_default_matmul_precision)
        return jnp.sum(jnp.tanh(x @ p["w"]) ** 2)

    params = {"w": jnp.asarray(np.random.default_rng(0).normal(size=(3, 2)), jnp.float32)}
    x = jnp.ones((4, 3))
    report = jaxbp.verify_grads(jax.grad(loss), loss, params, x, n_fd=1)
    assert report.matmul_precision == "highest" and "matmul precision highest" in str(report)
    assert seen and set(seen[-5:]) == {"highest"}
    seen.clear()
    report = jaxbp.verify_grads(jax.grad(loss), loss, params, x, n_fd=1, precision="high")
    assert report.matmul_precision == "high" and set(seen[-5:]) == {"high"}
    with pytest.raises(ValueError, match="Unknown precision 'fp33'"):
        jaxbp.verify_grads(jax.grad(loss), loss, params, x, precision="fp33")
