"""No silent wrong result, no lost or mixed-up work, one clear line per bad input.

Grouped by the public function or command each case concerns; every case asserts the
error type and the words that name the problem, or the files left on disk.
"""

from __future__ import annotations

import functools
import json
import math
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbp
from jaxbp import cli, value_checks
from jaxbp import layers as L
from jaxbp.data import Dataset
from jaxbp.train import checkpoint

NET = jaxbp.MLP((4, 8, 3), "tanh")


def _small_data(n: int = 24, seed: int = 0, classes: int = 3) -> Dataset:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, 4)).astype(np.float32)
    y = (np.arange(n) % classes).astype(np.int32)
    return Dataset(x, y, x[:6].copy(), y[:6].copy())


def _fit(data=None, **kwargs):
    options = {"epochs": 1, "batch_size": 8, "key": jax.random.key(0), "progress": False}
    return jaxbp.fit(kwargs.pop("net", NET), kwargs.pop("optimizer", optax.sgd(0.1)),
                     data or _small_data(), **(options | kwargs))


class TestLabels:
    """Labels outside [0, n_out) never train silently."""

    def test_fit_checks_the_whole_data_set_first(self):
        data = _small_data()
        data.y_train[5] = 3
        with pytest.raises(ValueError, match=r"data.y_train holds labels outside \[0, 3\): "
                                             r"data.y_train\[5\] = 3 \(1 out of range\)"):
            _fit(data)
        data = _small_data()
        data.y_test[0] = -1
        with pytest.raises(ValueError, match=r"data.y_test\[0\] = -1"):
            _fit(data)

    def test_public_entry_checks_device_arrays(self):
        params = NET.init(jax.random.key(0))
        x = jnp.ones((4, 4))
        for bad in (jnp.array([0, 1, 2, 7]), jnp.array([0, -2, 1, 1])):
            with pytest.raises(ValueError, match=r"y holds labels outside \[0, 3\)"):
                jaxbp.value_and_backprop(NET, params, x, bad)

    def test_compiled_step_and_loop_report_them(self):
        state = jaxbp.TrainState.create(NET.init(jax.random.key(0)), optax.sgd(0.1))
        x = jnp.ones((4, 4))
        y = jnp.array([0, 1, 5, -1])
        step = jax.jit(lambda s, x, y: jaxbp.make_train_step(NET, optax.sgd(0.1),
                                                             donate=False)(s, x, y))
        _, metrics = step(state, x, y)  # traced: values unknown, so counted
        assert int(metrics["invalid_labels"]) == 2
        loop = jaxbp.make_train_loop(NET, optax.sgd(0.1), steps=2, donate=False)
        _, metrics = jax.jit(lambda s, x, y: loop(s, x, y))(state, jnp.stack([x, x]),
                                                             jnp.stack([y, y * 0]))
        assert metrics["invalid_labels"].tolist() == [2, 0]

    def test_a_compiled_gpt_step_reports_bad_tokens_and_sequence_labels(self):
        """A sequence's labels in [-1, n_out) (-1: ignored), its tokens in [0, vocab):
        counted per step over the samples (a padded batch's masked rows count nowhere)."""
        from jaxbp import models, sources
        from jaxbp.train.feeds import check_chunk

        net = models.gpt(vocab=5, dim=4, depth=1, heads=1, seq_len=3)
        state = jaxbp.TrainState.create(net.init(jax.random.key(0)), optax.sgd(0.1))
        x = jnp.array([[0, 5, 1], [-2, 0, 0], [9, 9, 9]])
        y = jnp.array([[-1, 5, 0], [-2, 1, 4], [7, 7, 7]])
        loop = jaxbp.make_train_loop(net, optax.sgd(0.1), steps=1, donate=False,
                                     grad=sources.dp_sgd(1.0, 0.0, jax.random.key(0),
                                                         expected_batch_size=2))
        masks = jnp.array([[True, True, False]])
        _, metrics = jax.jit(loop)(state, x[None], y[None], masks)
        assert metrics["invalid_tokens"].tolist() == [2]
        assert metrics["invalid_labels"].tolist() == [2]
        metrics = jax.device_get(metrics)
        with pytest.raises(ValueError, match=r"step 1: its batch holds 2 labels outside "
                                             r"\[0, n_out\) \(-1 allowed"):
            check_chunk(metrics, first_step=0)
        with pytest.raises(ValueError, match=r"step 1: its batch holds 2 tokens outside "
                                             r"\[0, vocab\)"):
            check_chunk({**metrics, "invalid_labels": np.zeros(1, int)}, first_step=0)

    def test_fit_turns_the_metric_into_an_error_naming_the_step(self):
        from jaxbp.train.feeds import check_chunk

        metrics = {"loss": np.array([1.0, 1.0, 1.0]), "nonfinite_layer": np.array([-1, -1, -1]),
                   "invalid_labels": np.array([0, 0, 4])}
        with pytest.raises(ValueError, match=r"training stopped at step 13: its batch holds 4 "
                                             r"labels outside \[0, n_out\)"):
            check_chunk(metrics, first_step=10)

    def test_targets_that_make_a_cross_entropy_negative(self):
        softmax = jaxbp.MLP((4, 3), "relu", "identity", "softmax_cross_entropy")
        sigmoid = jaxbp.MLP((4, 3), "relu", "identity", "sigmoid_cross_entropy")
        x = np.ones((2, 4), np.float32)
        regression = np.array([[2.0, -1.0, 0.5], [0.0, 0.0, 1.0]], np.float32)
        for net in (softmax, sigmoid):
            with pytest.raises(ValueError, match=r"y must hold probabilities in \[0, 1\] .* "
                                                 r"y\[0, 0\] = 2.0 \(2 outside\)"):
                jaxbp.backprop(net, net.init(jax.random.key(0)), x, regression)
        with pytest.raises(ValueError, match=r"y rows must sum to 1 .*: row 0 sums to 0.5"):
            jaxbp.backprop(softmax, softmax.init(jax.random.key(0)), x,
                           np.array([[0.5, 0, 0], [0, 0, 1]], np.float32))

    @pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
    def test_soft_labels_rounded_to_their_own_dtype_are_accepted(self, dtype):
        """Rows of probabilities rounded to bf16/f16 sum to 1 only within ~eps / 2 and a
        softmax computed in the dtype can exceed 1 by an ulp: never refused."""
        softmax = jaxbp.MLP((4, 7), "relu", "identity", "softmax_cross_entropy", dtype=dtype)
        sigmoid = jaxbp.MLP((4, 7), "relu", "identity", "sigmoid_cross_entropy", dtype=dtype)
        logits = 3 * jax.random.normal(jax.random.key(1), (256, 7))
        rows = jax.nn.softmax(logits).astype(dtype)                   # rounded after
        in_dtype = jax.nn.softmax(logits.astype(dtype))               # computed in the dtype
        sums = np.asarray(jnp.sum(rows.astype(jnp.float32), axis=-1))
        if dtype == "bfloat16":
            assert np.abs(sums - 1).max() > 1e-3  # the case that was refused
        x = jnp.ones((256, 4), dtype)
        one_hot = jax.nn.one_hot(logits.argmax(-1), 7, dtype=dtype)
        for y in (rows, in_dtype, np.asarray(rows), one_hot):
            for net in (softmax, sigmoid):
                value_checks.check_target_values(net, y)  # no error
        jaxbp.backprop(softmax, softmax.init(jax.random.key(0)), x, rows)

    @pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
    def test_targets_off_by_more_than_the_dtype_rounds_are_refused(self, dtype):
        softmax = jaxbp.MLP((4, 3), "relu", "identity", "softmax_cross_entropy", dtype=dtype)
        tol = value_checks.target_tolerance(dtype)
        short = jnp.asarray([[0.5, 0.2, 0.3 - 3 * max(tol, 1e-3)]], dtype)
        with pytest.raises(ValueError, match=rf"y rows must sum to 1 .*within .* {dtype}\): "
                                             r"row 0 sums to 0\.9"):
            value_checks.check_target_values(softmax, short)
        over = jnp.asarray([[0.0, 0.0, 1 + 4 * tol]], dtype)
        with pytest.raises(ValueError, match=r"y must hold probabilities in \[0, 1\]"):
            value_checks.check_target_values(softmax, over)


def test_every_public_entry_that_takes_a_key_names_a_bad_one():
    """init, the DP-SGD gradient and source, K-FAC's sampled factors and source, random
    feedback, generation and the data helpers: one TypeError naming ``key``, before JAX
    (whose own message names no argument); a legacy uint32 key, NumPy too, is a key."""
    from jaxbp import feedback, models, sources

    net = jaxbp.MLP((3, 4, 2))
    gpt = models.gpt(5, 4, 1, 1, 3)
    params = net.init(jax.random.PRNGKey(0))
    assert jax.tree.structure(net.init(np.array([0, 1], np.uint32))) == \
        jax.tree.structure(params)
    x, y = np.ones((2, 3), np.float32), np.zeros(2, np.int32)
    for call in (lambda k: net.init(k), lambda k: gpt.init(k),
                 lambda k: jaxbp.dp_sgd_grad(net, params, x, y, 1.0, 1.0, k),
                 lambda k: sources.dp_sgd(1.0, 1.0, k),
                 lambda k: jaxbp.kfac_factors(net, params, x, y, key=k),
                 lambda k: jaxbp.kfac_gradient("sampled", key=k),
                 lambda k: feedback.random_feedback(net, k),
                 lambda k: models.generate(gpt, gpt.init(jax.random.key(0)), [1], 2, key=k),
                 lambda k: jaxbp.data.teacher_regression(k),
                 lambda k: list(jaxbp.data.batches(x, y, 1, key=k))):
        for bad, words in ((0, "got int 0"), ("a", "got str 'a'"),
                           (np.zeros(3, np.uint32), "got an array of uint32 and shape (3,)")):
            with pytest.raises(TypeError, match=re.escape(
                    f"key must be a PRNG key such as jax.random.key(0), {words}")):
                call(bad)
        with pytest.raises(ValueError, match=re.escape(   # was JAX's "truncated_normal
                "key must be one PRNG key, got an array of 2 keys (shape (2,))")):  # accepts")
            call(jax.random.split(jax.random.key(0)))


def test_every_public_switch_takes_true_or_false_only(tmp_path):
    """A string is truthy: ``drop_last="no"`` meant True, silently. Every public flag is
    a TypeError naming it for anything but a bool (NumPy's too), before any work."""
    from jaxbp import models, parallel, testing
    from jaxbp.check.suite import verify_mlp

    params = NET.init(jax.random.key(0))
    x, y = np.ones((2, 4), np.float32), np.zeros(2, np.int32)
    sgd = optax.sgd(0.1)
    mesh = parallel.make_mesh(1, devices=jax.devices()[:1])
    calls = {
        "drop_last": [lambda v: _fit(drop_last=v), lambda v: jaxbp.data.num_batches(5, 2, v),
                      lambda v: list(jaxbp.data.batches(x, y, 1, drop_last=v))],
        "progress": [lambda v: _fit(progress=v)],
        "diagnostics": [lambda v: _fit(diagnostics=v)],
        "allow_run_change": [lambda v: _fit(allow_run_change=v)],
        "donate": [lambda v: jaxbp.make_train_step(NET, sgd, donate=v),
                   lambda v: jaxbp.make_train_loop(NET, sgd, 2, donate=v),
                   lambda v: parallel.make_sharded_train_step(NET, sgd, mesh, donate=v),
                   lambda v: parallel.make_sharded_train_loop(NET, sgd, mesh, 2, donate=v)],
        "per_sample": [lambda v: jaxbp.layer_deltas(NET, params, x, y, per_sample=v)],
        "allow_nonfinite": [lambda v: checkpoint.save(tmp_path, 0, params, allow_nonfinite=v)],
        "allow_inconclusive": [
            lambda v: testing.assert_grads_correct(None, None, params, allow_inconclusive=v)],
        "float64": [lambda v: verify_mlp(NET, params, x, y, float64=v)],
        "causal": [lambda v: models.gpt(5, 4, 1, 1, 3, causal=v),
                   lambda v: jaxbp.layers.SelfAttention(1, causal=v)],
    }
    for name, makers in calls.items():
        for call in makers:
            for bad in ("no", 1, None):
                with pytest.raises(TypeError, match=rf"{name} must be True or False, "
                                                    rf"got {re.escape(repr(bad))}"):
                    call(bad)
    assert not list(tmp_path.iterdir())
    assert jaxbp.data.num_batches(5, 2, np.bool_(True)) == 2


def test_every_public_seed_is_named_when_bad():
    """NumPy's own error ("expected non-negative integer", "SeedSequence expects int")
    named no argument; random_cases is a generator and was not checked until drawn."""
    from jaxbp.check.suite import random_cases

    params = NET.init(jax.random.key(0))
    x, y = np.ones((2, 4), np.float32), np.zeros(2, np.int32)
    calls = (lambda s: jaxbp.data.load_digits(seed=s), lambda s: random_cases(s),
             lambda s: jaxbp.verify_grads(lambda *a: None, NET.cost, params, x, y, seed=s),
             lambda s: jaxbp.verify_vjp(jnp.sin, jnp.ones(3), seed=s),
             lambda s: jaxbp.verify_jvp(jnp.sin, jnp.ones(3), seed=s))
    for call in calls:
        for bad in (-1, 1.5, "0", True):
            with pytest.raises(ValueError, match=re.escape(f"seed must be an int >= 0, got "
                                                           f"{bad!r}")):
                call(bad)
    with pytest.raises(ValueError, match="max_depth must be an int >= 1, got 0"):
        random_cases(0, max_depth=0)


def test_every_public_signature_says_what_it_takes():
    """A type checker (pyright in an editor reads them without a py.typed) takes the
    annotations at their word: every public entry that takes a ``net`` says it takes a
    Network (a GPT, a CNN), not only an MLP; the layer records that take one int for a pair
    (``MaxPool(2)``, ``Conv2D(8, 3)``) say so; and the README's calls check (mypy flagged
    a loop given masks, fit given a text, generate given an encoded prompt)."""
    import inspect
    import typing

    from jaxbp import feedback, models, parallel, sources
    from jaxbp.network import Network

    checked = []
    for module in (jaxbp, parallel, sources, feedback, models):
        for name in getattr(module, "__all__", None) or dir(module):
            entry = getattr(module, name, None)
            if name.startswith("_") or not callable(entry) or isinstance(entry, type):
                continue
            try:
                parameter = inspect.signature(entry, eval_str=True).parameters.get("net")
            except (TypeError, ValueError):   # a type alias, not a function
                continue
            if parameter is not None:
                checked.append(f"{module.__name__}.{name}")
                hint = parameter.annotation
                assert hint in (Network, typing.Any) or Network in typing.get_args(hint), \
                    (checked[-1], hint)
    assert len(checked) >= 25 and "jaxbp.make_train_step" in checked
    for record, field in ((L.MaxPool, "window"), (L.AvgPool, "window"), (L.Conv2D, "kernel"),
                          (L.Conv2D, "stride")):
        assert int in typing.get_args(typing.get_type_hints(record)[field]), (record, field)
    # lists for sequences, NumPy/JAX dtypes for the dtype names, as the checks accept them
    from collections.abc import Sequence

    for cls in (jaxbp.MLP, jaxbp.Network, L.Dense, L.Conv2D, L.SelfAttention, L.LayerNorm,
                L.RMSNorm, L.Embedding, L.Residual):
        for field, hint in typing.get_type_hints(cls).items():
            if field.endswith("dtype"):
                assert np.dtype in typing.get_args(hint) or np.dtype in typing.get_args(
                    typing.get_args(hint)[0]), (cls, field, hint)
            if field in ("sizes", "layers", "input_shape"):
                assert typing.get_origin(hint) is Sequence, (cls, field, hint)
    # what the README's own examples pass: a loop's masks, a text to fit, an encoded prompt
    for make in (jaxbp.make_train_loop, parallel.make_sharded_train_loop):
        loop = inspect.signature(make, eval_str=True).return_annotation
        assert "masks" in inspect.signature(loop.__call__).parameters, make
    assert jaxbp.data.TextDataset in typing.get_args(
        inspect.signature(jaxbp.fit, eval_str=True).parameters["data"].annotation)
    assert np.ndarray in typing.get_args(
        inspect.signature(models.generate, eval_str=True).parameters["prompt"].annotation)


def test_results_and_figures_are_written_whole_or_not_at_all(tmp_path):
    """What jaxbp writes besides checkpoints (bench tables, benchmark results, figures)
    goes through jaxbp.files: a writer stopped half-way (an error, Ctrl-C, `timeout`)
    leaves the old file whole and no temporary beside it."""
    import pathlib

    from jaxbp import files

    target = tmp_path / "results" / "table.md"
    assert files.write_text(target, "old table\n") == target

    def stopped(tmp):
        pathlib.Path(tmp).write_text("half a tab")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        files.write_atomically(target, stopped)
    assert target.read_text() == "old table\n"
    assert [p.name for p in target.parent.iterdir()] == ["table.md"]
    files.write_text(target, "new table\n")
    assert target.read_text() == "new table\n" and len(list(target.parent.iterdir())) == 1


def test_generate_and_num_batches_name_bad_input():
    """Were an AttributeError ('MLP' object has no attribute 'layers') and a
    ZeroDivisionError."""
    cnn = jaxbp.models.cnn(8, 3)
    for net, got in ((NET, "got a MLP"), (cnn, "got a Network whose first layer is a Conv2D")):
        with pytest.raises(TypeError, match=f"net must be a Network that takes tokens .*{got}"):
            jaxbp.models.generate(net, net.init(jax.random.key(0)), [1], 2)
    seeing = jaxbp.models.gpt(5, 8, 1, 2, 4, causal=False)  # read the padding after a token
    with pytest.raises(ValueError, match=r"generate needs causal attention, but "
                                         r"layers\[1\]\.layers\[1\] \(SelfAttention\) has "
                                         r"causal=False"):
        jaxbp.models.generate(seeing, seeing.init(jax.random.key(0)), [1], 2)
    for n, size, words in ((5, 0, "batch_size must be an int >= 1, got 0"),
                           (-1, 2, "n must be an int >= 0, got -1"),
                           (5, 2.0, "batch_size must be an int >= 1, got 2.0")):
        with pytest.raises(ValueError, match=words):
            jaxbp.data.num_batches(n, size, False)
    assert jaxbp.data.num_batches(5, 2, False) == 3 and jaxbp.data.num_batches(5, 2, True) == 2


def test_gradient_sources_check_their_arguments_when_made():
    """A source's clip norm, feedback and a sharded step's mesh are named where the
    source or step is made, not when a step first traces (or, for the mesh, as an
    AttributeError)."""
    from jaxbp import feedback, parallel, sources

    for make in (sources.clipped, lambda c: sources.dp_sgd(c, 1.0, jax.random.key(0))):
        for clip, error, words in ((-1.0, ValueError, "clip_norm must be > 0, got -1.0"),
                                   (float("nan"), ValueError, "clip_norm must be > 0"),
                                   ("1", TypeError, "clip_norm must be a number or numbers, "
                                                    "got str: '1'"),
                                   (True, TypeError, "got bool: True")):
            with pytest.raises(error, match=re.escape(words)):
                make(clip)
    for rule in (feedback.alignment, feedback.direct):
        with pytest.raises(TypeError, match="feedback must be a sequence of the net's arrays"):
            rule("B")
    for make in (parallel.make_sharded_train_step,
                 lambda *a: parallel.make_sharded_train_loop(*a, steps=2)):
        with pytest.raises(TypeError, match=r"mesh must be a jax\.sharding\.Mesh"):
            make(NET, optax.sgd(0.1), None)


def test_a_softmax_over_one_output_is_refused_when_the_net_is_made():
    """Trained, with a loss of exactly 0 and every gradient 0 (the one class has
    probability 1): the common slip of a yes/no target given one output."""
    from jaxbp import layers, models

    words = r"loss 'softmax_cross_entropy' normalises over the outputs, and {} is 1: .*" \
            r"nothing trains\. For a yes/no target use loss='sigmoid_cross_entropy'"
    for make, where in ((lambda: jaxbp.MLP((4, 1)), r"sizes\[-1\]"),
                        (lambda: jaxbp.Network((layers.Dense(1),), (4,)),
                         "the last layer's width"),
                        (lambda: models.gpt(1, 8, 1, 2, 4), "the last layer's width")):
        with pytest.raises(ValueError, match=words.format(where)):
            make()
    for loss in ("sigmoid_cross_entropy", "squared_error"):   # one output is theirs
        assert jaxbp.MLP((4, 1), loss=loss).n_out == 1


def test_gradient_sources_called_directly_check_their_inputs():
    """A source called outside a train step (to read its gradient) was given no checks:
    XLA's dot_general error for an x of another width, and labels outside [0, n_out)
    gave a gradient silently."""
    from jaxbp import feedback, sources

    key, params = jax.random.key(0), NET.init(jax.random.key(0))
    x, y = np.ones((4, 4), np.float32), np.zeros(4, np.int32)
    for source in (sources.backprop(), sources.autodiff(), sources.clipped(1.0),
                   sources.dp_sgd(1.0, 1.0, key),
                   sources.dp_sgd(1.0, 1.0, key, expected_batch_size=4, microbatch=2),
                   jaxbp.kfac_gradient(), feedback.sign_symmetry(),
                   feedback.alignment(feedback.random_feedback(NET, key)),
                   feedback.direct(feedback.random_feedback(NET, key, "direct"))):
        for bad_x, bad_y, words in ((x[:, :3], y, r"x has shape \(4, 3\) but expected "
                                                  r"\(batch, 4\)"),
                                    (x, y + 7, r"y holds labels outside \[0, 3\): y\[0\] = 7")):
            with pytest.raises(ValueError, match=words):
                source(NET, params, bad_x, bad_y, 0)
        assert np.isfinite(sources.as_result(source(NET, params, x, y, 0)).loss)


class TestFitArguments:
    @pytest.mark.parametrize("kwargs, error, words", [
        ({"batch_size": 0}, ValueError, "batch_size must be an int >= 1, got 0"),
        ({"batch_size": 2.5}, ValueError, "batch_size must be an int >= 1, got 2.5"),
        ({"epochs": 0}, ValueError, "epochs must be an int >= 1"),
        ({"key": None}, TypeError, "key must be a PRNG key such as jax.random.key(0), got "
                                   "NoneType"),
        ({"key": 3}, TypeError, "key must be a PRNG key"),
        ({"optimizer": "adam"}, TypeError, "optimizer must be an optax.GradientTransformation"),
        ({"keep": 0}, ValueError, "keep must be an int >= 1"),
        ({"chunk_steps": 0}, ValueError, "chunk_steps must be an int >= 1"),
        ({"run_config": 3}, TypeError, "run_config must be None or a dict with str keys"),
        # were read by nothing: they shape checkpoints, and none are written
        ({"keep": 5}, ValueError, "keep is used only for checkpoints, and checkpoint_dir is "
                                  "None: give a checkpoint_dir, or leave keep out"),
        ({"run_config": {"lr": 0.1}, "allow_run_change": True}, ValueError,
         "run_config and allow_run_change are used only for checkpoints"),
    ])
    def test_bad_argument_is_named(self, kwargs, error, words):
        with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
            _fit(**kwargs)

    def test_samples_without_their_targets_are_refused(self):
        """A target short would pair the samples after it with the wrong ones (the
        gather clamps the last index): refused before anything is compiled."""
        data = _small_data()
        for bad, words in ((data._replace(y_train=data.y_train[:-1]), "data.x_train has"),
                           (data._replace(x_test=data.x_test[:0], y_test=data.y_test[:0]),
                            "data.x_test has 0 rows and data.y_test 0")):
            with pytest.raises(ValueError, match=words):
                _fit(bad)

    def test_float16_params_with_an_optimizer_that_divides_zero_by_zero_are_refused(self):
        """Were a FloatingPointError at step 2 blaming the gradient and the learning rate:
        adam's eps is 0 in float16, so a zero gradient entry updated by 0/0."""
        net = jaxbp.MLP((4, 8, 3), "tanh", dtype="float16")
        with pytest.raises(ValueError, match=r"the optimizer's update of a zero gradient is "
                                             r"not finite for float16 params"):
            _fit(net=net, optimizer=optax.adam(1e-3))
        for optimizer in (optax.adam(1e-3, eps=1e-4), optax.sgd(0.1)):   # these hold
            assert np.isfinite(_fit(net=net, optimizer=optimizer).history["train_loss"][-1])

    def test_the_data_sets_shapes_are_named_as_the_data(self):
        data = _small_data()   # were "x has shape (2, 4, 1, 1)" (a chunk) and "NoneType has no len"
        for bad, error, words in (
                (data._replace(x_train=data.x_train[:, :, None]), ValueError,
                 r"data.x_train has shape \(24, 4, 1\) but expected \(batch, 4\)"),
                (data._replace(y_test=np.eye(3)[data.y_test][:, :2]), ValueError,
                 r"data.y_test has shape \(\d+, 2\) but expected"),
                (data._replace(x_test=None), TypeError,
                 "data.x_test must be a numeric array, got NoneType")):
            with pytest.raises(error, match=words):
                _fit(bad)

    def test_data_that_are_not_finite_are_named_before_training(self):
        """Were a FloatingPointError steps later blaming the gradient and the learning
        rate (a NaN input), or a NaN test loss every epoch (an inf test input). (Files
        are checked as they load: load_npz.)"""
        data = _small_data()
        x_train = np.array(data.x_train)
        x_train[5, 3] = np.nan
        y_test = np.eye(3, dtype=np.float32)[data.y_test]
        y_test[1, 2] = np.inf
        for bad, words in ((data._replace(x_train=x_train),
                            r"data.x_train holds values that are not finite: "
                            r"data.x_train\[5, 3\] = nan \(1 not finite\)"),
                           (data._replace(x_test=jnp.asarray(data.x_test).at[2].set(-np.inf)),
                            r"data.x_test\[2, 0\] = -inf \(4 not finite\)")):
            with pytest.raises(ValueError, match=words):
                _fit(bad)
        with pytest.raises(ValueError, match=r"data.y_test\[1, 2\] = inf"):   # soft targets
            _fit(data._replace(y_train=np.eye(3, dtype=np.float32)[data.y_train],
                               y_test=y_test), net=jaxbp.MLP((4, 3), loss="squared_error"))

    def test_where_the_results_go_is_checked_before_the_first_epoch(self, tmp_path,
                                                                    monkeypatch):
        """A figure path that is a folder, or a checkpoint folder that is a file, failed
        only when the run ended or saved (the trained state lost with it)."""
        a_file = tmp_path / "notes.txt"
        a_file.write_text("kept")
        started = []
        monkeypatch.setattr(sys.modules["jaxbp.train.fit"], "_fit",
                            lambda *a, **k: started.append(1))
        for kwargs, words in (({"plot": tmp_path}, r"plot: '.*' is a folder, expected a file"),
                              ({"checkpoint_dir": a_file}, r"checkpoint_dir: '.*' is a file, "
                                                           r"expected a folder"),
                              ({"plot": 3}, r"plot must be a path \(str or os.PathLike\), "
                                            r"got int")):
            with pytest.raises((ValueError, TypeError), match=words):
                _fit(**kwargs)
        assert not started
        assert a_file.read_text() == "kept"

    def test_a_state_that_is_not_a_train_state_is_named(self):
        with pytest.raises(TypeError, match=r"optimizer must be an optax.GradientTransformation"
                                            r" \(with init and update\), got str"):
            jaxbp.TrainState.create(NET.init(jax.random.key(0)), "adam")
        params = NET.init(jax.random.key(0))
        for bad, got in ((None, "NoneType with no arrays"),      # were states of no params
                         (jax.tree.map(lambda a: a.astype(jnp.int32), params),
                          "tuple of 4 leaves of dtype int32")):
            with pytest.raises(TypeError, match=re.escape(
                    f"params must be a pytree of floating arrays (net.init(key)), got {got}")):
                jaxbp.TrainState.create(bad, optax.adam(1e-3))
        x, y = np.ones((4, NET.sizes[0]), np.float32), np.zeros(4, np.int32)
        for make in (jaxbp.make_train_step, functools.partial(jaxbp.make_train_loop, steps=2)):
            with pytest.raises(TypeError, match=r"state must be a jaxbp.TrainState "
                                                r"\(TrainState.create\(params, optimizer\)\), "
                                                r"got tuple"):
                make(NET, optax.sgd(0.1))(params, x, y)

    def test_a_state_made_for_another_optimizer_is_named(self):
        # was an AttributeError from inside optax ('EmptyState' object has no attribute 'mu')
        params = NET.init(jax.random.key(0))
        x, y = np.ones((4, NET.sizes[0]), np.float32), np.zeros(4, np.int32)
        sgd_state = jaxbp.TrainState.create(params, optax.sgd(0.1))
        for make in (jaxbp.make_train_step, functools.partial(jaxbp.make_train_loop, steps=2)):
            with pytest.raises(ValueError, match=re.escape(
                    "state.opt_state does not fit the optimizer: the state holds (EmptyState, "
                    "EmptyState) of 0 arrays, the optimizer's init makes (ScaleByAdamState, "
                    "EmptyState) of 9 arrays")):
                make(NET, optax.adam(1e-3), donate=False)(sgd_state, x, y)
        wider = jaxbp.MLP((NET.sizes[0], 7, NET.sizes[-1]), "relu").init(jax.random.key(0))
        swapped = jaxbp.TrainState.create(wider, optax.adam(1e-3))._replace(params=params)
        with pytest.raises(ValueError, match=re.escape(
                "state.opt_state[0].mu[0]['b'] has shape (7,) but the optimizer's state for "
                "state.params has (8,): the params were replaced after the state was created")):
            jaxbp.make_train_step(NET, optax.adam(1e-3), donate=False)(swapped, x, y)

    def test_data_of_the_wrong_type(self):
        with pytest.raises(TypeError, match=r"data must be a jaxbp.data.Dataset .* got dict"):
            jaxbp.fit(NET, optax.sgd(0.1), {"x": 1}, epochs=1, batch_size=8,
                      key=jax.random.key(0))


class TestCheckpointsAreNeverLostOrMixed:
    def test_a_file_as_the_checkpoint_folder_is_named_and_kept(self, tmp_path):
        a_file = tmp_path / "notes.txt"
        a_file.write_text("kept")
        state = jaxbp.TrainState.create(NET.init(jax.random.key(0)), optax.sgd(0.1))
        for write in (lambda: checkpoint.save(a_file, 1, state), lambda: checkpoint.lock(a_file)):
            with pytest.raises(ValueError, match=r"directory: '.*notes.txt' is a file, expected "
                                                 r"a folder"):
                write()
        assert a_file.read_text() == "kept"

    def test_a_nonfinite_state_is_never_written(self, tmp_path):
        with pytest.raises(FloatingPointError, match=r"leaf \['w'\] holds NaN/inf"):
            checkpoint.save(tmp_path, 1, {"w": np.array([1.0, np.nan])})
        assert checkpoint.list_checkpoints(tmp_path) == [] and not list(tmp_path.glob(".*tmp"))
        # in fit: an infinite learning rate makes the params inf with finite gradients
        data = _small_data()
        with pytest.raises(FloatingPointError, match=r"training stopped after epoch 1 \(step "
                                                     r"1\): the updated state holds NaN/inf"):
            _fit(data, batch_size=24, optimizer=optax.sgd(np.inf), checkpoint_dir=tmp_path)
        assert checkpoint.list_checkpoints(tmp_path) == []

    def test_corrupt_checkpoints_do_not_push_out_new_ones(self, tmp_path):
        for step in (5, 6, 7):
            checkpoint.path_for(tmp_path, step).write_bytes(b"garbage")
        with pytest.warns(RuntimeWarning, match="kept as"):
            _fit(epochs=2, checkpoint_dir=tmp_path)
        assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
            "ckpt_000000001.npz", "ckpt_000000002.npz"]
        assert sorted(p.name for p in tmp_path.glob("*.corrupt")) == [
            f"ckpt_00000000{s}.npz.corrupt" for s in (5, 6, 7)]  # kept, never deleted

    def test_keep_last_k_only_removes_older_steps(self, tmp_path):
        later = checkpoint.save(tmp_path, 50, {"w": np.ones(2)})
        for step in (1, 2, 3, 4):
            checkpoint.save(tmp_path, step, {"w": np.ones(2)}, keep=2)
        assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
            "ckpt_000000003.npz", "ckpt_000000004.npz", later.name]

    @pytest.mark.parametrize("change, words", [
        ({"optimizer": optax.sgd(0.2)}, "optimizer: checkpoint"),
        ({"batch_size": 6}, "batch_size: checkpoint 8, now 6"),
        ({"key": jax.random.key(1)}, "seed_key: checkpoint"),
        ({"data": _small_data(seed=1)}, "data_sha256: checkpoint"),
        ({"net": jaxbp.MLP((4, 8, 3), "relu")}, "net: checkpoint"),
    ])
    def test_resuming_another_run_is_refused_naming_what_differs(self, tmp_path, change, words):
        _fit(checkpoint_dir=tmp_path)
        net = change.pop("net", NET)
        with pytest.raises(checkpoint.CheckpointMismatchError,
                           match=rf"was written by another run: {words}.*allow_run_change"):
            jaxbp.fit(net, change.pop("optimizer", optax.sgd(0.1)),
                      change.pop("data", _small_data()), epochs=2, progress=False,
                      checkpoint_dir=tmp_path,
                      **({"batch_size": 8, "key": jax.random.key(0)} | change))
        assert len(checkpoint.list_checkpoints(tmp_path)) == 1  # nothing written

    def test_a_run_whose_arrays_changed_is_named_by_its_record(self, tmp_path):
        """Was only the template's leaves (``params[0]['w'] is float32[4, 8], template
        float32[4, 9]``), and the record's line cut the repr of a long net (a GPT's) before
        the difference: both now say what changed, and that no allow_run_change helps."""
        from jaxbp import models
        from jaxbp.train.run_config import run_differences

        _fit(checkpoint_dir=tmp_path)
        for allow in (False, True):
            with pytest.raises(checkpoint.CheckpointMismatchError, match=(
                    r"was written by another run: net: checkpoint .*\(4, 8, 3\).*, now "
                    r".*\(4, 9, 3\).*Its arrays do not fit this run's either \(.*leaf "
                    r".*float32\[4, 8\], template float32\[4, 9\].*\), so it cannot be "
                    r"resumed, even with allow_run_change")):
                _fit(net=jaxbp.MLP((4, 9, 3), "tanh"), epochs=2, checkpoint_dir=tmp_path,
                     allow_run_change=allow)
        (line,) = run_differences({"net": repr(models.gpt(5, 16, 1, 2, 16))},
                                  {"net": repr(models.gpt(5, 16, 1, 2, 32))})
        assert "positions=16" in line and "positions=32" in line and len(line) < 320

    def test_a_schedule_deep_in_a_chain_is_part_of_the_record(self):
        from jaxbp.train.run_config import describe

        def clipped_adamw(decay_steps):   # the schedule's numbers sit 13 closures down
            schedule = optax.warmup_cosine_decay_schedule(0.0, 1e-3, 5, decay_steps, 1e-4)
            return optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule))

        # were described alike (cut at depth 10): a resume with another length went on
        assert describe(clipped_adamw(33)) != describe(clipped_adamw(44))
        assert describe(clipped_adamw(33)) == describe(clipped_adamw(33))

    def test_a_run_change_can_be_allowed(self, tmp_path, capsys):
        _fit(checkpoint_dir=tmp_path)
        result = _fit(epochs=2, optimizer=optax.sgd(0.05), checkpoint_dir=tmp_path,
                      allow_run_change=True, progress=True)
        assert result.history["epoch"] == [1, 2]
        assert "although the run changed: optimizer" in capsys.readouterr().out

    def test_a_quiet_run_change_is_warned_at_the_callers_line(self, tmp_path):
        """The warning names the user's file, not a line inside jaxbp (its depth there
        is counted, not fixed)."""
        _fit(checkpoint_dir=tmp_path)
        with pytest.warns(RuntimeWarning, match="although the run changed") as seen:
            _fit(epochs=2, optimizer=optax.sgd(0.05), checkpoint_dir=tmp_path,
                 allow_run_change=True, progress=False)
        assert [w.filename for w in seen] == [__file__]

    def test_a_second_run_on_the_folder_is_refused(self, tmp_path):
        held = checkpoint.lock(tmp_path)
        try:
            with pytest.raises(checkpoint.CheckpointLockedError,
                               match=r"is in use by another run .*\.jaxbp\.lock"):
                _fit(checkpoint_dir=tmp_path)
        finally:
            held.release()
        _fit(checkpoint_dir=tmp_path)  # free again, and fit released it at the end
        checkpoint.lock(tmp_path).release()

    def test_temporaries_of_a_killed_save_are_removed(self, tmp_path):
        stale = tmp_path / ".ckpt_000000001.npz.abc123.tmp"
        stale.write_bytes(b"half")
        _fit(checkpoint_dir=tmp_path)
        assert not stale.exists()
        assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == ["ckpt_000000001.npz"]


class TestVerifyGrads:
    def test_manual_subgradient_that_fd_confirms_is_not_failed(self):
        def loss(p):
            return jnp.sum(jnp.abs(p["x"]))

        def manual(p):  # sign(0) = 0: matches the central difference at 0 exactly
            return {"x": jnp.sign(p["x"])}

        report = jaxbp.verify_grads(manual, loss, {"x": jnp.zeros(3)}, n_fd=2)
        assert report.verdict == "INCONCLUSIVE" and not report.failed and not report.ok
        assert all(d.fd_status == "reference disagrees" for d in report.directions)
        assert "reference disagrees" in report.summary()
        report.raise_if_failed()  # nothing refutes the manual gradient
        wrong = jaxbp.verify_grads(lambda p: {"x": p["x"] + 0.5}, loss, {"x": jnp.zeros(3)})
        assert wrong.failed  # a gradient FD refutes still fails

    def test_python_floats_as_params(self):
        report = jaxbp.verify_grads(lambda p: {"a": 2 * p["a"], "b": [3 * p["b"][0]]},
                                    lambda p: p["a"] ** 2 + 1.5 * p["b"][0] ** 2,
                                    {"a": 1.5, "b": [2.0]})
        assert report.ok, str(report)
        with pytest.raises(TypeError, match=r"params\['a'\] must be an array or a number, "
                                            r"got str"):
            jaxbp.verify_grads(lambda p: p, lambda p: 0.0, {"a": "x"})


class TestDpArguments:
    def test_a_delta_that_permits_publishing_an_example_is_warned_by_fit(self):
        """Only the command line said it; fit(privacy=Privacy(delta=0.5)) trained silently
        with a guarantee that allows publishing one training example outright."""
        from jaxbp.privacy import Privacy

        with pytest.warns(RuntimeWarning, match=r"delta 0.5 is not below 1/N = 1/24: "
                                                r"publishing one random training example") \
                as seen:
            _fit(privacy=Privacy(noise_multiplier=1.0, delta=0.5))
        assert [w.filename for w in seen if "delta" in str(w.message)] == [__file__]

    @pytest.mark.parametrize("noise, words", [
        (math.inf, "noise_multiplier must be one finite number >= 0, got inf"),
        (-1.0, "noise_multiplier must be one finite number >= 0, got -1.0"),
        (math.nan, "noise_multiplier must be one finite number >= 0, got nan"),
    ])
    def test_noise_multiplier(self, noise, words):
        params = NET.init(jax.random.key(0))
        with pytest.raises(ValueError, match=words):
            jaxbp.dp_sgd_grad(NET, params, np.ones((2, 4)), np.zeros(2, int), 1.0, noise,
                              jax.random.key(0))
        with pytest.raises(ValueError, match=words):
            jaxbp.sources.dp_sgd(1.0, noise, jax.random.key(0))

    def test_infinite_clip_norm_with_noise(self):
        params = NET.init(jax.random.key(0))
        with pytest.raises(ValueError, match="clip_norm must be finite when noise_multiplier "
                                             "> 0"):
            jaxbp.dp_sgd_grad(NET, params, np.ones((2, 4)), np.zeros(2, int), np.inf, 1.0,
                              jax.random.key(0))
        # no noise: an infinite clip norm is just "no clipping"
        jaxbp.dp_sgd_grad(NET, params, np.ones((2, 4)), np.zeros(2, int), np.inf, 0.0,
                          jax.random.key(0))


class TestDataFiles:
    def test_a_npy_named_npz(self, tmp_path):
        path = tmp_path / "d.npz"
        with open(path, "wb") as file:
            np.save(file, np.ones(3))
        with pytest.raises(ValueError, match=r"d\.npz' is a single \.npy array, not an \.npz "
                                             r"archive; save x and y together"):
            jaxbp.data.load_npz(path)

    def test_a_text_file_is_never_told_to_allow_pickle(self, tmp_path):
        path = tmp_path / "t.npz"
        path.write_text("x,y\n1,2\n")
        with pytest.raises(ValueError) as info:
            jaxbp.data.load_npz(path)
        assert "not an .npz archive" in str(info.value) and "pickle" not in str(info.value)

    def test_object_arrays_are_refused_without_suggesting_pickle(self, tmp_path):
        path = tmp_path / "o.npz"
        np.savez(path, x=np.array([{"a": 1}], dtype=object), y=np.zeros(1))
        with pytest.raises(ValueError, match="holds object arrays") as info:
            jaxbp.data.load_npz(path)
        assert "allow_pickle" not in str(info.value)

    def test_a_huge_label(self, tmp_path):
        path = tmp_path / "h.npz"
        np.savez(path, x=np.ones((4, 2)), y=np.array([0, 1, 2, 2**31 - 1], np.int32))
        with pytest.raises(ValueError, match=r"holds the label 2147483647, which would mean "
                                             r"2147483648 classes \(at most 65536\)"):
            jaxbp.data.load_npz(path)


def _cli(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


class TestCommandLine:
    """One line on stderr naming the option, file or value; 2 for usage, 1 for a failed run."""

    def test_a_default_cache_folder_that_cannot_be_made_is_a_warning(self, capsys, tmp_path,
                                                                       monkeypatch):
        """A read-only or odd home (containers, CI) must not stop a run that named no cache;
        a folder the user named is a usage error (above)."""
        home = tmp_path / "home"
        home.write_text("a file, so no ~/.cache can be made under it")
        monkeypatch.setenv("HOME", str(home))
        monkeypatch.delenv("JAXBP_COMPILATION_CACHE")
        code, out, err = _cli(capsys, "train", "--epochs", "1", "--sizes", "64,8,10", "--quiet")
        assert code == 0 and "final test accuracy" in out, err
        assert err.startswith("jaxbp train: warning: no compilation cache, so a rerun compiles "
                              "again: --compilation-cache: cannot write in "), err
        assert jax.config.jax_compilation_cache_dir is None or "home" not in str(
            jax.config.jax_compilation_cache_dir)

    def test_ctrl_c_is_one_line_with_exit_130_saying_the_run_resumes(self, capsys, tmp_path,
                                                                      monkeypatch):
        def interrupted(*args, **kwargs):
            raise KeyboardInterrupt

        monkeypatch.setattr(jaxbp.train.fit, "fit", interrupted)
        code, _, err = _cli(capsys, "train", "--sizes", "64,8,10", "--checkpoint-dir",
                            str(tmp_path))
        assert code == 130 and err == (f"jaxbp train: error: interrupted; the checkpoints in "
                                       f"{tmp_path} are whole: the same command resumes from "
                                       f"the last\n")

    @pytest.mark.parametrize("argv, words", [
        (["train", "--lr", "nan"], "--lr must be a finite number > 0, got nan"),
        (["train", "--lr", "-0.1"], "--lr must be a finite number > 0, got -0.1"),
        (["train", "--epochs", "0"], "--epochs must be an integer > 0, got 0"),
        (["train", "--batch-size", "0"], "--batch-size must be an integer > 0, got 0"),
        (["train", "--batch-size", "5000"], "--batch-size 5000 is larger than the 1438"),
        (["train", "--sizes", "64,a,10"], "--sizes must be comma-separated integers"),
        (["train", "--sizes", "63,32,10"], "--sizes 63,32,10: the first size must be the "
                                           "data's 64 inputs"),
        (["train", "--activation", "reluu"], "--activation: Unknown activation 'reluu'"),
        (["train", "--loss", "squared_error"], "--loss squared_error: the data hold integer "
                                               "class labels"),
        (["train", "--data", "missing.npz"], "--data: 'missing.npz' is neither 'digits'"),
        (["verify", "--dtypes", "float8"], "--dtypes: unknown ['float8']"),
        (["verify", "--cases", "0"], "--cases must be an integer > 0"),
        (["bench", "--max-gflop", "0"], "--max-gflop must be a finite number > 0, got 0.0"),
        (["bench", "--budget", "-1"], "--budget must be a finite number > 0"),
        (["bench", "--name", "../x"], "--name must be a file stem (no folder: the files go "
                                      "in --out), got '../x'"),
        (["train", "--model", "gpt", "--data", "."], "--data: text file '.' is a folder, "
                                                     "expected a file"),
        (["train", "--model", "gpt", "--grad", "dfa"], "--grad dfa: direct feedback "
                                                       "alignment (one error per sample"),
        (["train", "--mesh", "data=two"], "--mesh must look like data=4,model=2"),
        (["train", "--devices", "99"], "--devices 99: only 1 device(s) are visible"),
        (["train", "--mesh", "data=1", "--devices", "1"], "--mesh and --devices: give one"),
        (["train", "--dim", "8"], "--dim shapes a GPT (--model gpt), but --model is mlp: its "
                                  "layers are --sizes"),                  # was silently unused
        (["train", "--model", "cnn", "--seq-len", "8"], "--seq-len shapes a GPT"),
        (["train", "--sample-temperature", "1"], "--sample-temperature samples from a GPT "
                                                 "(--model gpt), but --model is mlp"),
        (["train", "--model", "gpt", "--loss", "squared_error"],       # was silently unused
         "--loss squared_error: a GPT is trained by softmax_cross_entropy on its next tokens"),
        (["train", "--model", "gpt", "--activation", "tanh"],
         "--activation sets an MLP's or a CNN's activation; a GPT's are its own"),
        (["train", "--model", "gpt", "--output-activation", "sigmoid"],
         "--output-activation sets an MLP's or a CNN's activation"),
        (["train", "--clip-norm", "2"], "--clip-norm needs --dp"),     # were silently unused
        (["train", "--delta", "1e-6"], "--delta needs --dp"),
        (["train", "--accountant", "pld"], "--accountant needs --dp"),
        (["train", "--allow-run-change"], "--allow-run-change resumes a checkpoint of another "
                                          "run: it needs --checkpoint-dir"),
        (["train", "--model", "gpt", "--sample-length", "0", "--sample-temperature", "0.5"],
         "--sample-temperature 0.5 draws the final sample, but --sample-length 0 makes none"),
        (["train", "--model", "gpt", "--sample-length", "-1"],
         "--sample-length must be an integer >= 0, got -1"),
        (["verify", "--seed", "-1"], "--seed must be an integer >= 0, got -1"),
        (["train", "--dp-microbatch", "8"], "--dp-microbatch needs --dp"),
        (["train", "--warmup-steps", "-1"], "--warmup-steps must be an integer >= 0, got -1"),
        (["train", "--clip-grad-norm", "0"], "--clip-grad-norm must be a finite number > 0"),
        (["train", "--weight-decay", "0.1"], "--weight-decay is adamw's (decoupled weight "
                                             "decay), but --optimizer is adam"),
        (["train", "--schedule", "cosine", "--warmup-steps", "22", "--epochs", "2"],
         "--warmup-steps 22 leaves no step of the cosine decay: the run has 22 steps"),
        (["train", "--grad-accum", "0"], "--grad-accum must be an integer > 0, got 0"),
        (["train", "--dp", "--target-epsilon", "8", "--grad-accum", "4"],
         "--grad-accum 4 with --dp would average 4 separately noised DP-SGD gradients"),
        (["train", "--dp", "--target-epsilon", "8", "--dp-microbatch", "-1"],
         "--dp-microbatch must be an integer >= 0, got -1"),
        (["train", "--dp", "--noise-multiplier", "1", "--devices", "1", "--dp-microbatch",
          "16"], "--dp-microbatch 16 runs a batch's sampled rows together, which a mesh "
                 "keeps on different devices"),
        # trained nothing, then an IndexError in the report:
        (["train", "--dp", "--noise-multiplier", "1", "--target-epsilon", "3"],
         "--noise-multiplier 1.0 spends epsilon 3.2466 in one epoch (11 steps at sample rate "
         "0.08901), more than --target-epsilon 3.0: nothing could be trained"),
    ])
    def test_usage_errors(self, capsys, argv, words):
        code, out, err = _cli(capsys, *argv)
        assert code == 2, out + err
        assert err.count("\n") == 1 and err.startswith(f"jaxbp {argv[0]}: error: ")
        assert words in err and "Traceback" not in err
        assert "wrote" not in out and "epoch" not in out  # checked before any work

    def test_unwritable_paths_are_found_before_the_first_epoch(self, capsys, tmp_path):
        blocker = tmp_path / "file"
        blocker.write_text("")
        for option in ("--checkpoint-dir", "--plot", "--diagnostics", "--compilation-cache"):
            target = blocker / "sub" / ("x.png" if option in ("--plot", "--diagnostics") else "d")
            code, out, err = _cli(capsys, "train", option, str(target))
            assert code == 2 and f"{option}: cannot write in" in err and "epoch" not in out

    def test_bad_data_files_are_one_line(self, capsys, tmp_path):
        text = tmp_path / "text.npz"
        text.write_text("hello")
        npy = tmp_path / "one.npz"
        with open(npy, "wb") as file:
            np.save(file, np.ones(3))
        for path, words in ((text, "is not an .npz archive (it starts with b'hello'); save "
                                   "the arrays with np.savez(path, x=x, y=y); a text trains "
                                   "a GPT: --model gpt"),
                            (npy, "is a single .npy array"),
                            ("shakespeare", "'shakespeare' is neither 'digits', 'teacher' nor "
                                            "an existing .npz file; it is the GPT's text")):
            code, _, err = _cli(capsys, "train", "--data", str(path))
            assert code == 2 and words in err and err.count("\n") == 1, err
            assert "pickle" not in err and (path != npy or "--model gpt" not in err)

    @pytest.mark.parametrize("argv, line", [   # argparse printed its usage block first
        (["train", "--bogus"], "jaxbp train: error: unrecognized arguments: --bogus"),
        (["train", "--epochs", "x"], "jaxbp train: error: argument --epochs: invalid int "
                                     "value: 'x'"),
        (["bench", "--precision", "fp8"], "jaxbp bench: error: argument --precision: invalid "
                                          "choice: 'fp8'"),
        (["nope"], "jaxbp: error: argument command: invalid choice: 'nope'"),
    ])
    def test_argparse_errors_are_one_line_too(self, capsys, argv, line):
        from jaxbp import cli

        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1 and err.startswith(line), err
        assert err.rstrip().endswith("(--help lists the options)")

    def test_debug_keeps_a_usage_errors_exit_2_and_shows_its_traceback(self, capsys):
        from jaxbp import cli

        for debug in (False, True):
            code = cli.main(["train", "--epochs", "0", *(["--debug"] if debug else [])])
            err = capsys.readouterr().err
            assert code == 2, err
            assert ("Traceback" in err) == debug and "--epochs must be an integer > 0" in err

    def test_a_failed_run_is_one_line_with_exit_1_and_debug_shows_the_traceback(self):
        code = ("import sys, optax\n"
                "from jaxbp import cli\n"
                "cli.OPTIMIZERS['sgd'] = lambda lr: optax.sgd(float('inf'))\n"
                "sys.exit(cli.main(sys.argv[1:]))\n")
        argv = ["train", "--optimizer", "sgd", "--epochs", "1", "--quiet", "--sizes",
                "64,16,10"]
        for debug in (False, True):
            result = subprocess.run([sys.executable, "-c", code, *argv,
                                     *(["--debug"] if debug else [])],
                                    capture_output=True, text=True, timeout=300)
            assert result.returncode == 1, result.stderr
            if debug:
                assert "Traceback" in result.stderr
            else:
                lines = result.stderr.strip().splitlines()
                assert lines[-1].startswith("jaxbp train: error: FloatingPointError: training "
                                            "stopped at step ") and "Traceback" not in \
                    result.stderr

    def test_bench_that_runs_nothing_says_so(self, capsys, tmp_path):
        from jaxbp.bench import suite as bench_suite

        result = bench_suite.run_suite(bench_suite.QUICK[:1], tmp_path, "none", max_gflop=1e-9,
                                       log=print)
        out = capsys.readouterr().out
        assert result["rows"] == [] and "no case was run (1 left out)" in out
        assert ".png" not in out and not (tmp_path / "none.png").exists()
        assert json.loads((tmp_path / "none.json").read_text())["left_out"]


def test_params_donated_to_a_train_step_are_named(tmp_path):
    """The step donates its state, and a state made by TrainState.create(params) holds the
    very arrays of params: using them afterwards was JAX's "Array has been deleted with
    shape=float32[8]" (no name, no cause) from every entry."""
    params = NET.init(jax.random.key(0))
    x, y = _small_data().x_train[:8], _small_data().y_train[:8]
    state = jaxbp.TrainState.create(params, optax.sgd(0.1))
    new_state, _ = jaxbp.make_train_step(NET, optax.sgd(0.1))(state, x, y)
    named = re.escape("params[0]['b'] has been deleted: it was donated to a train step")
    for use in (lambda: jaxbp.backprop(NET, params, x, y),
                lambda: NET.apply(params, x),
                lambda: jaxbp.evaluate(NET, params, x, y),
                lambda: jaxbp.TrainState.create(params, optax.sgd(0.1)),
                lambda: _fit(params=params),
                lambda: jaxbp.verify_grads(functools.partial(jaxbp.backprop, NET),
                                           NET.cost, params, x, y)):
        with pytest.raises(ValueError, match=named):
            use()
    with pytest.raises(ValueError, match=re.escape("v[0]['b'] has been deleted")):
        jaxbp.hvp(NET, new_state.params, x, y, params)
    with pytest.raises(ValueError, match=re.escape("args[0][0]['b'] has been deleted")):
        jaxbp.verify_vjp(lambda p: NET.apply(p, x), params)
    with pytest.raises(ValueError, match=re.escape("tree.step has been deleted")):
        checkpoint.save(tmp_path, 1, state)
    assert list(tmp_path.iterdir()) == []
    jaxbp.backprop(NET, new_state.params, x, y)   # the state the step returned is whole
    # the donated state itself, given to a step or loop again (was XLA's log line and
    # "INVALID_ARGUMENT: ... Buffer has been deleted or donated")
    for again in (jaxbp.make_train_step(NET, optax.sgd(0.1)),
                  jaxbp.parallel.make_sharded_train_step(NET, optax.sgd(0.1),
                                                         jaxbp.parallel.make_mesh(data=1)),
                  jaxbp.make_train_loop(NET, optax.sgd(0.1), steps=2)):
        with pytest.raises(ValueError, match=re.escape("state.step has been deleted: it was "
                                                       "donated to a train step")):
            again(state, x, y)
    assert again.lower(new_state, x, y).compile() is not None   # still the jitted program's


class TestProbedKnobs:
    """The hostile probe's unvalidated knobs: each a named error before any work."""

    @pytest.mark.parametrize("knob, value, words", [
        ("rtol", -1.0, "rtol must be a finite number >= 0, got -1.0"),
        ("atol", float("nan"), "atol must be a finite number >= 0"),
        ("fd_eps", 0.0, "fd_eps must be a finite number > 0"),
        ("fd_rtol", float("inf"), "fd_rtol must be a finite number >= 0"),
        ("n_fd", -2, "n_fd must be an int >= 0, got -2"),
    ])
    def test_verify_tolerances(self, knob, value, words):
        params = {"w": jnp.ones(3)}
        with pytest.raises(ValueError, match=re.escape(words)):
            jaxbp.verify_grads(lambda p: {"w": 2 * p["w"]}, lambda p: jnp.sum(p["w"] ** 2),
                               params, **{knob: value})
        with pytest.raises(ValueError, match=re.escape(words)):
            jaxbp.verify_vjp(jnp.sin, jnp.ones(3), **{knob: value})

    @pytest.mark.parametrize("argv, words", [
        (["--checkpoint-dir", ""], "--checkpoint-dir must name a folder"),
        (["--seed", str(2**70)], "--seed must be an integer in [-2**63, 2**63)"),
        (["--diagnostics", "flow.txt"], "--diagnostics: 'flow.txt' ends in .txt, which is no "
                                        "figure format matplotlib writes"),
    ])
    def test_command_line(self, argv, words, capsys, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        assert cli.main(["train", "--epochs", "1", "--quiet", *argv]) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1
        assert list(tmp_path.iterdir()) == []  # nothing written into the current folder

    def test_feedback_angle_of_a_zero_update(self):
        from jaxbp.feedback import _angles_deg

        zero, g = ({"w": jnp.zeros(3)},), ({"w": jnp.array([1.0, 2.0, 0.0])},)
        assert float(_angles_deg(zero, g)[0]) == 90.0 == float(_angles_deg(g, zero)[0])
        assert float(_angles_deg(zero, zero)[0]) == 0.0
        assert float(_angles_deg(g, g)[0]) == pytest.approx(0.0, abs=1e-3)

    def test_numpy_scalars_are_numbers(self):
        """Sizes and privacy settings read from NumPy arrays (np.int64, np.float32) are the
        numbers they hold; booleans are still refused."""
        from jaxbp import layers, privacy

        conv = layers.Conv2D(np.int64(3), np.int32(2), stride=(np.int64(1), 1))
        assert conv == layers.Conv2D(3, 2) and type(conv.filters) is int
        assert layers.Dense(np.int64(4)) == layers.Dense(4)
        assert layers.MaxPool(np.int16(2)).window == (2, 2)
        mlp = jaxbp.MLP((np.int64(3), np.int32(2)))
        assert mlp.sizes == (3, 2) and all(type(s) is int for s in mlp.sizes)
        net = jaxbp.Network((layers.Dense(2),), (np.int64(3),))
        assert net.input_shape == (3,)
        x, y = jnp.ones((4, 3)), jnp.eye(2)[jnp.array([0, 1, 0, 1])]
        assert jaxbp.evaluate(mlp, mlp.init(jax.random.key(0)), x, y,
                              batch_size=np.int64(2))["loss"] >= 0
        assert privacy.epsilon(noise_multiplier=np.int64(2), sample_rate=np.float32(0.01),
                               steps=np.int64(100), delta=1e-5) == privacy.epsilon(
                                   2.0, float(np.float32(0.01)), 100, 1e-5)
        with pytest.raises(ValueError, match="Dense units must be an int >= 1, got True"):
            layers.Dense(True)
        with pytest.raises(ValueError, match="steps must be an int >= 1"):
            privacy.epsilon(2.0, 0.01, np.bool_(True), 1e-5)

    def test_the_same_data_under_another_path_resumes(self, tmp_path, capsys, monkeypatch):
        """The run record compares the data by its SHA-256, not by how its path is typed:
        ./d.npz, its absolute path and a renamed copy resume; other contents do not."""
        rng = np.random.default_rng(0)
        arrays = {"x": rng.normal(size=(40, 4)).astype(np.float32), "y": rng.integers(0, 3, 40)}
        np.savez(tmp_path / "d.npz", **arrays)
        (tmp_path / "copy.npz").write_bytes((tmp_path / "d.npz").read_bytes())
        monkeypatch.chdir(tmp_path)
        run = ["train", "--sizes", "4,3", "--batch-size", "8", "--quiet", "--checkpoint-dir",
               str(tmp_path / "c")]
        for epochs, path in enumerate(("./d.npz", str(tmp_path / "d.npz"), "copy.npz"), 1):
            assert cli.main([*run, "--data", path, "--epochs", str(epochs)]) == 0, \
                capsys.readouterr().err
        assert f"after {epochs} epochs" in capsys.readouterr().out
        arrays["x"][0, 0] += 1
        np.savez(tmp_path / "other.npz", **arrays)
        assert cli.main([*run, "--data", "other.npz", "--epochs", "4"]) == 1
        err = capsys.readouterr().err
        assert "another run: data_sha256: checkpoint" in err and "data:" not in err

    def test_a_quiet_resume_of_a_changed_run_says_so_in_one_line(self, tmp_path, capsys):
        """--quiet hides progress, not a resume that changes the run: the notice is a
        warning, which the command line prints as one line without a source location."""
        run = ["train", "--sizes", "64,8,10", "--quiet", "--checkpoint-dir", str(tmp_path)]
        assert cli.main([*run, "--epochs", "1", "--lr", "0.01"]) == 0
        capsys.readouterr()
        assert cli.main([*run, "--epochs", "2", "--lr", "0.02", "--allow-run-change"]) == 0
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if "although the run changed" in line]
        assert len(lines) == 1 and lines[0].startswith("jaxbp train: warning: resuming "), err
        assert "lr: checkpoint 0.01, now 0.02" in lines[0]
        assert "RuntimeWarning" not in err and "warnings.warn" not in err

    def test_private_run_lines_and_an_epoch_count_already_passed(self, tmp_path, capsys,
                                                                 restore_x64):
        """The DP header names the gradient, a delta >= 1/N is warned about, the final
        line carries epsilon with --quiet, and --epochs below the checkpoint's says that
        nothing was trained."""
        rng = np.random.default_rng(0)
        data = tmp_path / "d.npz"
        np.savez(data, x=rng.normal(size=(40, 4)).astype(np.float32),
                 y=rng.integers(0, 3, 40))
        run = ["train", "--data", str(data), "--sizes", "4,3", "--batch-size", "8",
               "--checkpoint-dir", str(tmp_path / "c"), "--quiet"]
        dp = ["--dp", "--noise-multiplier", "1.0", "--delta", "0.1"]
        assert cli.main([*run, *dp, "--epochs", "2"]) == 0
        out, err = capsys.readouterr()
        assert "grad dp-sgd" in out and "grad backprop" not in out
        assert "jaxbp train: warning: delta 0.1 is not below 1/N = 1/32" in err   # fit's
        assert re.search(r"epsilon \d+\.\d{4} at delta 0.1 after 2 epochs", out), out
        assert cli.main([*run, *dp, "--epochs", "1", "--allow-run-change"]) == 0
        out = capsys.readouterr().out
        assert "already at epoch 2, past --epochs 1: nothing was trained" in out

    def test_a_step_and_a_loop_take_python_lists(self):
        """A nested list reaches a jitted step as a list of tracers: it is stacked (it was
        NumPy's TracerArrayConversionError inside a TypeError), and trains as the array; a
        ragged one is a TypeError naming the argument."""
        x = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)
        y = np.arange(6) % 3
        state = jaxbp.TrainState.create(NET.init(jax.random.key(0)), optax.sgd(0.1))
        step = jaxbp.make_train_step(NET, optax.sgd(0.1), donate=False)
        assert float(step(state, x.tolist(), y.tolist())[1]["loss"]) == \
            float(step(state, x, y)[1]["loss"])
        loop = jaxbp.make_train_loop(NET, optax.sgd(0.1), steps=2, donate=False)
        xs, ys = np.stack([x, x]), np.stack([y, y])
        np.testing.assert_array_equal(loop(state, xs.tolist(), ys.tolist())[1]["loss"],
                                      loop(state, xs, ys)[1]["loss"])
        with pytest.raises(TypeError, match=r"^x must be an array, got list: "):
            step(state, [[1.0, 2.0, 3.0, 4.0], [1.0]], y[:2])
