"""fit: training on digits, NaN stops, bit-identical resume, corrupt checkpoints, plots."""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import numpy as np
import optax
import pytest

import jaxbp
from jaxbp import models
from jaxbp.data import Dataset, load_digits
from jaxbp.train import checkpoint, resume
from jaxbp.train.epoch import epoch_line
from jaxbp.train.fit import fit

NET = jaxbp.MLP((64, 64, 10), "relu")


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_trains_digits_and_records_history(digits):
    result = fit(NET, optax.adam(3e-3), digits, epochs=4, batch_size=64,
                 key=jax.random.key(0), progress=False)
    history = result.history
    assert history["epoch"] == [1, 2, 3, 4]
    assert history["test_accuracy"][-1] > 0.9
    assert history["train_loss"][-1] < history["train_loss"][0]
    assert int(result.state.step) == 4 * (1438 // 64)


def test_prints_one_line_per_epoch(digits, capsys):
    fit(NET, optax.adam(3e-3), digits, epochs=2, batch_size=256, key=jax.random.key(0))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("epoch")]
    assert len(lines) == 2 and "test loss" in lines[0] and "acc" in lines[0]
    row = {"epoch": 2, "train_loss": 0.5, "train_accuracy": 0.9, "test_loss": 0.6,
           "test_accuracy": 0.8}
    for seconds, shown in ((0.0042, "(4.2 ms)"), (0.25, "(0.25 s)")):  # was "(0.00 s)"
        assert epoch_line(NET, {**row, "seconds": seconds}, 2).endswith(shown)


def test_nan_stops_with_the_step_and_layer(digits):
    x = digits.x_train.copy()
    x[70] = 3e38  # one finite sample whose products overflow (a NaN one fit refuses up
    #               front): the step that draws it must stop the run
    bad = Dataset(x, digits.y_train, digits.x_test, digits.y_test)
    with pytest.raises(FloatingPointError,
                       match=r"training stopped at step \d+: loss nan; the gradient of "
                             r"layer 0 \(params\[0\]\) is the first that is not finite"):
        fit(NET, optax.sgd(0.1), bad, epochs=1, batch_size=64, key=jax.random.key(0),
            progress=False)


def test_the_trained_params_load_for_inference_without_the_optimizer(digits, tmp_path):
    result = fit(NET, optax.adam(1e-3), digits, epochs=2, batch_size=256,
                 key=jax.random.key(0), checkpoint_dir=tmp_path, progress=False)
    params, metadata = jaxbp.load_params(tmp_path, NET)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(result.state.params)):
        np.testing.assert_array_equal(a, b)
    assert metadata["epoch"] == 2 and metadata["history"]["test_loss"] == \
        result.history["test_loss"]
    # the same net in another numerical recipe takes the same params (evaluation in bf16)
    bf16 = dataclasses.replace(NET, compute_dtype="bfloat16", activation_dtype="bfloat16")
    for a, b in zip(jax.tree.leaves(jaxbp.load_params(tmp_path, bf16)[0]),
                    jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
    gpt = functools.partial(models.gpt, 7, 8, 2, 2, 4)   # a Network: its layers' fields too
    assert resume._architecture(repr(gpt(compute_dtype="bfloat16"))) == \
        resume._architecture(repr(gpt())) != resume._architecture(repr(gpt(norm="rms")))
    for other, then, now in ((jaxbp.MLP(NET.sizes, "tanh"), "'relu'", "'tanh'"),
                             (jaxbp.MLP((64, 8, 10), "relu"), r"\(64, \d+, 10\)",
                              r"\(64, 8, 10\)")):
        with pytest.raises(checkpoint.CheckpointMismatchError,  # shown where they differ
                           match=rf"was written by a run of another net: the run's "
                                 rf"MLP.*{then}.*, this MLP.*{now}"):
            jaxbp.load_params(tmp_path, other)          # a relu net's params, not a tanh's
    with pytest.raises(FileNotFoundError, match="no checkpoint in"):
        jaxbp.load_params(tmp_path / "none", NET)
    checkpoint.save(tmp_path / "other", 1, {"w": np.ones(2)})   # no run record, no state
    with pytest.raises(checkpoint.CheckpointMismatchError, match="holds no params of this net"):
        jaxbp.load_params(tmp_path / "other", NET)


@pytest.mark.slow
def test_resume_after_epoch_3_is_bit_identical(digits, tmp_path):
    optimizer = optax.adam(1e-3)
    whole = fit(NET, optimizer, digits, epochs=5, batch_size=128, key=jax.random.key(7),
                progress=False)
    fit(NET, optimizer, digits, epochs=3, batch_size=128, key=jax.random.key(7),
        checkpoint_dir=tmp_path, progress=False)
    assert len(checkpoint.list_checkpoints(tmp_path)) == 3
    resumed = fit(NET, optimizer, digits, epochs=5, batch_size=128, key=jax.random.key(7),
                  checkpoint_dir=tmp_path, progress=False)
    for a, b in zip(jax.tree.leaves(whole.state), jax.tree.leaves(resumed.state)):
        np.testing.assert_array_equal(a, b)  # bit for bit: params, adam moments, step
    assert resumed.history == whole.history | {"seconds": resumed.history["seconds"]}
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "ckpt_000000003.npz", "ckpt_000000004.npz", "ckpt_000000005.npz"]


def test_resume_skips_a_corrupt_newest_checkpoint(digits, tmp_path):
    optimizer = optax.sgd(0.05)
    fit(NET, optimizer, digits, epochs=2, batch_size=256, key=jax.random.key(1),
        checkpoint_dir=tmp_path, progress=False)
    newest = checkpoint.list_checkpoints(tmp_path)[-1]
    newest.write_bytes(b"garbage")
    with pytest.warns(RuntimeWarning, match="ckpt_000000002.npz") as seen:
        result = fit(NET, optimizer, digits, epochs=2, batch_size=256, key=jax.random.key(1),
                     checkpoint_dir=tmp_path, progress=False)
    assert result.history["epoch"] == [1, 2]  # epoch 2 trained again from epoch 1's state
    assert {w.filename for w in seen} == {__file__}  # the caller's line, not jaxbp's
    checkpoint.restore(checkpoint.list_checkpoints(tmp_path)[-1],
                       {"state": result.state, "key": jax.random.split(jax.random.key(1))[1]})


def test_plot_is_written_in_the_format_its_suffix_names(digits, tmp_path):
    """PNG, SVG or PDF by the suffix (every figure was a PNG, whatever its name said); a
    suffix matplotlib cannot write is refused before training."""
    def run(plot):
        return fit(NET, optax.adam(3e-3), digits, epochs=1, batch_size=256,
                   key=jax.random.key(0), progress=False, plot=plot)

    for name, head in (("curves.png", b"\x89PNG\r\n\x1a\n"), ("curves.svg", b"<?xml"),
                       ("curves.pdf", b"%PDF"), ("curves", b"\x89PNG\r\n\x1a\n")):
        run(tmp_path / name)
        assert (tmp_path / name).read_bytes().startswith(head), name
    with pytest.raises(ValueError, match=r"plot: '.*curves.txt' ends in .txt, which is no "
                                         r"figure format matplotlib writes; use one of .*\.png"):
        run(tmp_path / "curves.txt")
    assert not (tmp_path / "curves.txt").exists()


def test_bad_arguments(digits):
    with pytest.raises(ValueError, match="epochs must be an int >= 1"):
        fit(NET, optax.sgd(0.1), digits, epochs=0, batch_size=8, key=jax.random.key(0))
    with pytest.raises(ValueError, match="larger than the 1438 training samples"):
        fit(NET, optax.sgd(0.1), digits, epochs=1, batch_size=5000, key=jax.random.key(0))


def _compilations(caplog, run):
    """The XLA compilations ``run()`` starts, from ``jax.log_compiles``'s log lines."""
    caplog.clear()
    with caplog.at_level("WARNING", logger="jax"), jax.log_compiles(True):
        run()
    return [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]


def test_a_second_fit_of_the_same_setting_compiles_nothing(digits, caplog):
    net, optimizer = jaxbp.MLP((64, 24, 10), "tanh"), optax.adam(1e-3)

    def run(seed):
        return lambda: fit(net, optimizer, digits, epochs=1, batch_size=100,
                           key=jax.random.key(seed), progress=False)

    first = _compilations(caplog, run(0))
    assert first, "log_compiles reported nothing: the count below would prove nothing"
    assert _compilations(caplog, run(1)) == []


def test_an_epoch_waits_for_the_device_once_per_chunk(digits, monkeypatch):
    """The host reads a chunk's metrics while the next one runs, and the last chunk's
    together with the epoch's test evaluation: 3 chunks an epoch, 3 waits (plus the one
    for the step count at the start). The recorded test scores are the end state's."""
    waits = []
    real = jax.device_get
    monkeypatch.setattr(jax, "device_get", lambda tree: waits.append(1) or real(tree))
    result = fit(NET, optax.adam(1e-3), digits, epochs=2, batch_size=100, chunk_steps=5,
                 key=jax.random.key(0), progress=False)       # 14 steps: chunks 5, 5, 4
    assert int(result.state.step) == 28 and len(waits) == 1 + 2 * 3
    monkeypatch.setattr(jax, "device_get", real)
    final = jaxbp.evaluate(NET, result.state.params, digits.x_test, digits.y_test)
    assert result.history["test_loss"][-1] == pytest.approx(final["loss"], rel=1e-6)
    assert result.history["test_accuracy"][-1] == final["accuracy"]


def _record_dispatches(monkeypatch):
    """The events of fit's epoch loop, in order: "data" (a chunk's data dispatched),
    "step" (a chunk's loop dispatched), "wait" (the host waits for the device)."""
    import importlib

    from jaxbp.train import feeds

    fit_module, events = importlib.import_module("jaxbp.train.fit"), []
    real_get, real_gather, real_loops_of = jax.device_get, feeds.gather, fit_module.loops_of

    def loops_of(*args):
        loop_of = real_loops_of(*args)
        return lambda k: (lambda *a: events.append("step") or loop_of(k)(*a))

    monkeypatch.setattr(jax, "device_get", lambda t: events.append("wait") or real_get(t))
    monkeypatch.setattr(feeds, "gather", lambda *a: events.append("data") or real_gather(*a))
    monkeypatch.setattr(fit_module, "loops_of", loops_of)
    return events


def test_the_next_epoch_runs_while_the_host_writes_the_last(digits, monkeypatch, tmp_path):
    """One chunk an epoch (14 steps). With nothing for the host to do between epochs but
    read and write the epoch's line, epoch e + 1's data and loop are dispatched before
    the host waits for epoch e. With a checkpoint to save, the host waits for epoch e
    before epoch e + 1's loop (its data are still on their way first). The two runs'
    histories and states are the same, bit for bit."""
    events = _record_dispatches(monkeypatch)
    overlapped = fit(NET, optax.adam(1e-3), digits, epochs=3, batch_size=100,
                     key=jax.random.key(0), progress=False)
    assert events == ["wait", "data", "step", "data", "step", "wait", "data", "step", "wait",
                      "wait"]
    events.clear()
    saved = fit(NET, optax.adam(1e-3), digits, epochs=3, batch_size=100,
                key=jax.random.key(0), progress=False, checkpoint_dir=tmp_path)
    steps = [i for i, event in enumerate(events) if event == "step"]
    assert len(steps) == 3 and all("wait" in events[a:b] for a, b in itertools.pairwise(steps))
    assert events[steps[0] + 1:steps[1]].index("data") < events[steps[0] + 1:].index("wait")
    monkeypatch.undo()
    assert {k: v for k, v in overlapped.history.items() if k != "seconds"} == \
        {k: v for k, v in saved.history.items() if k != "seconds"}
    for a, b in zip(jax.tree.leaves(overlapped.state), jax.tree.leaves(saved.state)):
        np.testing.assert_array_equal(a, b)


def test_evaluate_is_one_compiled_program_for_any_batch_count(digits, caplog):
    """The whole (padded) test set in one call; another batch size with the same shapes
    compiles once, then nothing; the result equals the mean over the samples."""
    params = NET.init(jax.random.key(0))
    x, y = digits.x_test, digits.y_test
    result = jaxbp.evaluate(NET, params, x, y, batch_size=100)  # 359 rows: 4 batches, padded
    full = jaxbp.evaluate(NET, params, x, y, batch_size=1000)
    np.testing.assert_allclose(result["loss"], float(NET.cost(params, x, y)), rtol=1e-5)
    np.testing.assert_allclose(result["accuracy"], full["accuracy"], rtol=1e-6)
    assert _compilations(caplog, lambda: jaxbp.evaluate(NET, params, x, y, batch_size=100)) \
        == []
