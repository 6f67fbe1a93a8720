"""TrainState, the jitted step, the scan loop and evaluation."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import to_f64

import jaxbp
from jaxbp.train.step import TrainState, evaluate, make_train_loop, make_train_step

OPTIMIZERS = {
    "sgd": optax.sgd(0.1),
    "momentum": optax.sgd(0.05, momentum=0.9),
    "adam": optax.adam(1e-2),
    "adamw": optax.adamw(1e-2, weight_decay=1e-3),
    "clipped adam with schedule": optax.chain(
        optax.clip_by_global_norm(1.0),
        optax.adam(optax.warmup_cosine_decay_schedule(0.0, 1e-2, 10, 100))),
    # read the batch loss, handed as value= (optax's extra-arguments protocol)
    "polyak sgd": optax.polyak_sgd(max_learning_rate=0.5),
    "adam on plateau": optax.chain(optax.adam(1e-2), optax.contrib.reduce_on_plateau()),
    # its init gives its two memories the same arrays (a donated state held them twice)
    "lbfgs, no line search": optax.lbfgs(learning_rate=0.1, linesearch=None),
}


def _problem(dtype="float32", loss="softmax_cross_entropy", steps=None, batch=16, seed=0):
    net = jaxbp.MLP((6, 12, 8, 4), "tanh", "identity", loss, dtype)
    rng = np.random.default_rng(seed)
    shape = (batch,) if steps is None else (steps, batch)
    x = rng.normal(size=(*shape, 6)).astype(dtype)
    if loss == "softmax_cross_entropy":  # a learnable rule: the argmax of a linear map
        y = np.argmax(x @ rng.normal(size=(6, 4)), axis=-1).astype(np.int32)
    else:
        y = rng.normal(size=(*shape, 4)).astype(dtype)
    return net, net.init(jax.random.key(seed)), x, y


class TestTrainState:
    @pytest.mark.parametrize("name", sorted(OPTIMIZERS))
    def test_any_optax_optimizer_trains(self, name):
        net, params, x, y = _problem()
        state = TrainState.create(params, OPTIMIZERS[name])
        step = make_train_step(net, OPTIMIZERS[name])
        first = None
        for _ in range(30):
            state, metrics = step(state, x, y)
            first = float(metrics["loss"]) if first is None else first
        assert int(state.step) == 30
        assert float(metrics["loss"]) < first

    def test_an_optimizer_that_reads_the_loss_gets_the_batch_loss(self):
        """``value=`` is the loss the step reports (an optimizer of extra arguments that
        keeps it in its state), and a plain GradientTransformation gets no extra argument."""
        def init(params):
            return jnp.zeros(())

        def update(updates, state, params=None, *, value, **extra):
            return updates, value

        reader = optax.GradientTransformationExtraArgs(init, update)
        net, params, x, y = _problem()
        for optimizer in (reader, optax.chain(optax.sgd(0.1), reader)):
            step = make_train_step(net, optimizer, donate=False)
            state, metrics = step(TrainState.create(params, optimizer), x, y)
            assert float(jax.tree.leaves(state.opt_state)[-1]) == float(metrics["loss"])
        plain = optax.GradientTransformation(init, lambda u, s, p=None: (u, s))
        assert int(make_train_step(net, plain)(TrainState.create(params, plain), x, y)[0].step)

    def test_a_private_source_keeps_the_loss_from_the_optimizer(self):
        """DP-SGD privatises the gradient, not the batch loss: an optimizer that may read
        ``value`` gets none, one that needs it is refused by name."""
        from jaxbp import sources

        def init(params):
            return jnp.zeros(())

        def reads_if_given(updates, state, params=None, *, value=-1.0, **extra):
            return updates, jnp.asarray(value, jnp.float32)

        def needs(updates, state, params=None, *, value, **extra):
            return updates, value

        net, params, x, y = _problem()
        private = sources.dp_sgd(1.0, 1.0, jax.random.key(1))
        optimizer = optax.GradientTransformationExtraArgs(init, reads_if_given)
        state, _ = make_train_step(net, optimizer, private, donate=False)(
            TrainState.create(params, optimizer), x, y)
        assert float(state.opt_state) == -1.0
        optimizer = optax.GradientTransformationExtraArgs(init, needs)
        with pytest.raises(ValueError, match=r"reads the batch loss .* which DP-SGD does not "
                                             r"make private"):
            make_train_step(net, optimizer, private)(TrainState.create(params, optimizer), x, y)

    def test_a_line_search_is_named(self):
        net, params, x, y = _problem()
        with pytest.raises(TypeError, match=r"update needs arguments a train step does not "
                                            r"hand it .*'value_fn'.* linesearch=None"):
            make_train_step(net, optax.lbfgs())(TrainState.create(params, optax.lbfgs()), x, y)

    def test_state_is_a_pytree(self):
        _net, params, _, _ = _problem()
        state = TrainState.create(params, optax.adam(1e-3))
        leaves = jax.tree.leaves(state)
        assert state.step.dtype == jnp.int32 and int(state.step) == 0
        assert len(leaves) == 1 + 6 + 2 * 6 + 1  # step, params, adam mu/nu, count
        assert jax.tree.structure(jax.tree.map(lambda a: a, state)) == jax.tree.structure(state)


class TestStep:
    def test_metrics_are_the_pre_update_values(self):
        net, params, x, y = _problem()
        step = make_train_step(net, optax.sgd(0.1), donate=False)
        state = TrainState.create(params, optax.sgd(0.1))
        _, metrics = step(state, x, y)
        loss, grads = jaxbp.value_and_autodiff(net, params, x, y)
        np.testing.assert_allclose(metrics["loss"], loss, rtol=1e-6)
        np.testing.assert_allclose(metrics["grad_norm"], optax.tree.norm(grads), rtol=1e-5)
        logits = np.asarray(net.apply(params, x))
        assert float(metrics["accuracy"]) == pytest.approx(np.mean(logits.argmax(1) == y))
        assert int(metrics["nonfinite_layer"]) == -1

    def test_sgd_update_is_params_minus_lr_grad(self):
        net, params, x, y = _problem()
        state, _ = make_train_step(net, optax.sgd(0.1), donate=False)(
            TrainState.create(params, optax.sgd(0.1)), x, y)
        grads = jaxbp.backprop(net, params, x, y)
        expected = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
        for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(expected)):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)

    def test_squared_error_has_no_accuracy(self):
        net, params, x, y = _problem(loss="squared_error")
        _, metrics = make_train_step(net, optax.sgd(0.1))(
            TrainState.create(params, optax.sgd(0.1)), x, y)
        assert "accuracy" not in metrics and "loss" in metrics

    def test_second_call_does_not_recompile(self):
        net, params, x, y = _problem()
        # The gradient source is traced once per compilation: a retrace would raise.
        source = chex.assert_max_traces(jaxbp.train.GRADIENTS["backprop"], n=1)
        step = make_train_step(net, optax.adam(1e-3), grad=source)
        state = TrainState.create(params, optax.adam(1e-3))
        state, _ = step(state, x, y)
        state, _ = step(state, x + 1, y)
        state, _ = step(state, x * 2, y[::-1])

    def test_donation_and_keeping(self):
        net, params, x, y = _problem()
        state = TrainState.create(params, optax.sgd(0.1))
        kept, _ = make_train_step(net, optax.sgd(0.1), donate=False)(state, x, y)
        assert np.all(np.isfinite(np.asarray(state.params[0]["w"])))  # still usable
        donated, _ = make_train_step(net, optax.sgd(0.1), donate=True)(state, x, y)
        np.testing.assert_array_equal(kept.params[0]["w"], donated.params[0]["w"])

    def test_nonfinite_layer_is_reported(self):
        net, params, x, y = _problem()
        params = (params[0], params[1], {"w": params[2]["w"].at[0, 0].set(jnp.inf),
                                         "b": params[2]["b"]})
        _, metrics = make_train_step(net, optax.sgd(0.1))(
            TrainState.create(params, optax.sgd(0.1)), x, y)
        assert int(metrics["nonfinite_layer"]) >= 0

    def test_bad_arguments(self):
        net = jaxbp.MLP((2, 2))
        with pytest.raises(ValueError, match=r"Unknown grad 'manual'. .* or a gradient "
                                             r"source: jaxbp.sources.clipped\(C\)"):
            make_train_step(net, optax.sgd(0.1), grad="manual")
        for grad in (3, ["backprop"]):  # the list was "unhashable type: 'list'"
            with pytest.raises(TypeError, match=r"grad must be one of \['autodiff', 'backprop'\] "
                                                r"or a gradient source .* got (int|list)"):
                make_train_step(net, optax.sgd(0.1), grad=grad)
        with pytest.raises(TypeError, match=r"optimizer must be an optax\.GradientTransformation"):
            make_train_step(net, "adam")
        with pytest.raises(ValueError, match="steps must be an int >= 1"):
            make_train_loop(net, optax.sgd(0.1), steps=0)
        for unroll in (0, 2.0, "all"):
            with pytest.raises(ValueError, match=f"unroll must be True, False or an int >= 1, "
                                                 f"got {unroll!r}"):
                make_train_loop(net, optax.sgd(0.1), steps=2, unroll=unroll)

    def test_bad_batch_is_named_at_trace_time(self):
        net, params, x, y = _problem()
        step = make_train_step(net, optax.sgd(0.1))
        with pytest.raises(ValueError, match=r"x has shape \(16, 5\) but expected \(batch, 6\)"):
            step(TrainState.create(params, optax.sgd(0.1)), x[:, :5], y)


class TestLoop:
    @pytest.mark.parametrize("unroll", [1, 3, True])
    def test_scan_equals_repeated_steps(self, unroll):
        net, params, xs, ys = _problem(steps=7)
        optimizer = optax.adam(1e-2)
        loop = make_train_loop(net, optimizer, steps=7, donate=False, unroll=unroll)
        state_loop, metrics = loop(TrainState.create(params, optimizer), xs, ys)
        step = make_train_step(net, optimizer)
        state = TrainState.create(params, optimizer)
        losses = []
        for x, y in zip(xs, ys):
            state, m = step(state, x, y)
            losses.append(float(m["loss"]))
        assert metrics["loss"].shape == (7,)
        np.testing.assert_allclose(metrics["loss"], losses, rtol=1e-5)
        for a, b in zip(jax.tree.leaves(state_loop.params), jax.tree.leaves(state.params)):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        assert int(state_loop.step) == 7

    def test_one_batch_for_every_step(self):
        net, params, x, y = _problem()
        loop = make_train_loop(net, optax.sgd(0.1), steps=5)
        state, metrics = loop(TrainState.create(params, optax.sgd(0.1)), x, y)
        assert metrics["loss"].shape == (5,) and int(state.step) == 5
        assert float(metrics["loss"][-1]) < float(metrics["loss"][0])

    def test_a_precision_scope_around_the_call_compiles_a_program_of_its_own(self):
        """What ``fit`` under ``jax.default_matmul_precision`` relies on: a loop made without
        ``precision=`` is traced at the precision where it is called, once per precision."""
        net, params, x, y = _problem()
        loop = make_train_loop(net, optax.sgd(0.1), steps=2, donate=False)
        state = TrainState.create(params, optax.sgd(0.1))
        with jax.default_matmul_precision("highest"):
            assert "HIGHEST" in loop.lower(state, x, y).as_text()
        with jax.default_matmul_precision("default"):
            assert "HIGHEST" not in loop.lower(state, x, y).as_text()

    def test_wrong_number_of_batches(self):
        net, params, xs, ys = _problem(steps=3)
        loop = make_train_loop(net, optax.sgd(0.1), steps=4)
        with pytest.raises(ValueError, match="leading axis of steps = 4"):
            loop(TrainState.create(params, optax.sgd(0.1)), xs, ys)


def _train(grad, optimizer, dtype, steps=100):
    net, params, xs, ys = _problem(dtype, "softmax_cross_entropy", steps=steps, batch=32)
    loop = make_train_loop(net, optimizer, steps=steps, grad=grad)
    state, metrics = loop(TrainState.create(params, optimizer), xs, ys)
    return state.params, metrics


class TestManualEqualsAutodiffTraining:
    """100 steps from the same key and data with grad="backprop" and grad="autodiff"."""

    @pytest.mark.parametrize("name", ["sgd", "adam"])
    def test_float64_params_agree_to_1e10(self, name):
        optimizer = {"sgd": optax.sgd(0.1), "adam": optax.adam(1e-2)}[name]
        with jax.enable_x64(True):
            manual, m_metrics = _train("backprop", optimizer, "float64")
            auto, _ = _train("autodiff", optimizer, "float64")
        assert float(m_metrics["loss"][-1]) < 0.8 * float(m_metrics["loss"][0])  # it trained
        diff = max(np.max(np.abs(a - b)) for a, b in
                   zip(jax.tree.leaves(to_f64(manual)), jax.tree.leaves(to_f64(auto))))
        scale = max(np.max(np.abs(a)) for a in jax.tree.leaves(to_f64(auto)))
        assert diff / scale < 1e-10, diff / scale

    @pytest.mark.parametrize("name", ["sgd", "adam"])
    def test_float32_params_agree(self, name):
        """float32: measured max |difference| / max |param| after 100 steps: 1.4e-7 (sgd),
        1.2e-7 (adam), about one float32 ulp; asserted at 1e-5 (float64: 1e-16 and 3e-16)."""
        optimizer = {"sgd": optax.sgd(0.1), "adam": optax.adam(1e-2)}[name]
        manual, _ = _train("backprop", optimizer, "float32")
        auto, _ = _train("autodiff", optimizer, "float32")
        diff = max(np.max(np.abs(a - b)) for a, b in
                   zip(jax.tree.leaves(to_f64(manual)), jax.tree.leaves(to_f64(auto))))
        scale = max(np.max(np.abs(a)) for a in jax.tree.leaves(to_f64(auto)))
        assert diff / scale < 1e-5, diff / scale


class TestEvaluate:
    def test_batched_with_partial_last_batch_equals_whole(self):
        net, params, x, y = _problem(batch=10)
        whole = evaluate(net, params, x, y, batch_size=10)
        batched = evaluate(net, params, x, y, batch_size=4)
        assert batched["loss"] == pytest.approx(whole["loss"], rel=1e-6)
        assert batched["accuracy"] == pytest.approx(whole["accuracy"])
        assert whole["loss"] == pytest.approx(float(net.cost(params, x, y)), rel=1e-6)
        logits = np.asarray(net.apply(params, x))
        assert whole["accuracy"] == pytest.approx(np.mean(logits.argmax(1) == y))

    def test_regression_has_loss_only(self):
        net, params, x, y = _problem(loss="squared_error", batch=9)
        result = evaluate(net, params, x, y, batch_size=4)
        assert set(result) == {"loss"}
        assert result["loss"] == pytest.approx(float(net.cost(params, x, y)), rel=1e-6)

    def test_bad_batch_size(self):
        net, params, x, y = _problem()
        with pytest.raises(ValueError, match="batch_size must be an int >= 1, got 0"):
            evaluate(net, params, x, y, batch_size=0)
