"""Atomic checkpoints: round trip, keep-last-k, crashes, corruption, mismatches."""

from __future__ import annotations

import gc
import os
import signal
import threading

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbp
from jaxbp import files
from jaxbp.train import checkpoint
from jaxbp.train.checkpoint import CheckpointError, CheckpointMismatchError
from jaxbp.train.step import TrainState


def _tree(seed=0):
    net = jaxbp.MLP((3, 4, 2))
    state = TrainState.create(net.init(jax.random.key(seed)), optax.adam(1e-3))
    return {"state": state, "key": jax.random.key(seed), "raw": jnp.arange(3)}


def _assert_equal(a, b):
    a = jax.tree.map(lambda t: jax.random.key_data(t) if jax.dtypes.issubdtype(
        t.dtype, jax.dtypes.prng_key) else t, a)
    b = jax.tree.map(lambda t: jax.random.key_data(t) if jax.dtypes.issubdtype(
        t.dtype, jax.dtypes.prng_key) else t, b)
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(x, y)


def test_round_trip_with_metadata(tmp_path):
    tree = _tree(1)
    path = checkpoint.save(tmp_path, 7, tree, {"epoch": 3, "history": {"loss": [1.0, 0.5]}})
    assert path.name == "ckpt_000000007.npz"
    restored, metadata = checkpoint.restore(path, _tree(2))
    _assert_equal(restored, tree)
    assert metadata == {"epoch": 3, "history": {"loss": [1.0, 0.5]}}
    assert isinstance(restored["state"], TrainState)


def test_keeps_the_newest_k(tmp_path):
    for step in range(5):
        checkpoint.save(tmp_path, step, _tree(), keep=2)
    assert [p.name for p in checkpoint.list_checkpoints(tmp_path)] == [
        "ckpt_000000003.npz", "ckpt_000000004.npz"]
    assert not list(tmp_path.glob(".*tmp"))


def test_a_crash_while_writing_leaves_no_file_and_the_old_ones_intact(tmp_path, monkeypatch):
    good = checkpoint.save(tmp_path, 1, _tree(1))

    def crash(file, **arrays):
        file.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 2, _tree(2))
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == [good.name]
    _assert_equal(checkpoint.restore(good, _tree())[0], _tree(1))


def test_a_ctrl_c_while_writing_is_raised_once_the_checkpoint_is_whole(tmp_path, monkeypatch):
    """Ctrl-C inside numpy's savez became zipfile's "Can't close the ZIP file while there
    is an open writing handle" (ValueError), which `jaxbp train` reported as a failed run;
    now the interrupt waits for the file and then is the KeyboardInterrupt it was."""
    assert threading.current_thread() is threading.main_thread()   # where signals land
    handler, savez = signal.getsignal(signal.SIGINT), np.savez

    def interrupted(file, **arrays):
        os.kill(os.getpid(), signal.SIGINT)      # as a user's Ctrl-C, mid-write
        savez(file, **arrays)

    monkeypatch.setattr(np, "savez", interrupted)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.save(tmp_path, 3, _tree(3))
    monkeypatch.undo()
    _assert_equal(checkpoint.restore(checkpoint.path_for(tmp_path, 3), _tree())[0], _tree(3))
    with pytest.raises(KeyboardInterrupt), files.interrupts_deferred():
        os.kill(os.getpid(), signal.SIGINT)
        reached = True                           # the block ran on after the signal
    assert reached and signal.getsignal(signal.SIGINT) is handler     # put back


def test_truncated_file_is_a_clear_error_and_the_previous_one_restores(tmp_path):
    old = checkpoint.save(tmp_path, 1, _tree(1))
    new = checkpoint.save(tmp_path, 2, _tree(2))
    new.write_bytes(new.read_bytes()[: new.stat().st_size // 2])
    truncated = new.read_bytes()
    with pytest.raises(CheckpointError, match=r"ckpt_000000002.npz.*truncated or corrupt"):
        checkpoint.restore(new, _tree())
    with pytest.warns(RuntimeWarning, match="ckpt_000000002.npz"):
        restored, _, path = checkpoint.restore_latest(tmp_path, _tree())
    assert path == old
    _assert_equal(restored, _tree(1))
    # nothing the user saved is deleted: the corrupt file is kept aside, out of the count
    aside = new.with_name(new.name + ".corrupt")
    assert not new.exists() and aside.read_bytes() == truncated
    assert checkpoint.list_checkpoints(tmp_path) == [old]


def test_a_file_named_for_another_step_is_set_aside_not_taken_as_newest(tmp_path):
    """A step-1 checkpoint copied by hand to the name of step 9 is not "the newest": the
    name and the step stored inside disagree, so it is kept aside and step 2 restores."""
    checkpoint.save(tmp_path, 1, _tree(1))
    two = checkpoint.save(tmp_path, 2, _tree(2))
    copied = checkpoint.path_for(tmp_path, 9)
    copied.write_bytes(checkpoint.path_for(tmp_path, 1).read_bytes())
    with pytest.raises(CheckpointError, match=r"ckpt_000000009.npz' is named for step 9 but "
                                              r"holds step 1"):
        checkpoint.restore(copied, _tree())
    with pytest.warns(RuntimeWarning, match="named for step 9 but holds step 1"):
        restored, _, path = checkpoint.restore_latest(tmp_path, _tree())
    assert path == two
    _assert_equal(restored, _tree(2))
    assert copied.with_name(copied.name + ".corrupt").exists()


def test_flipped_bits_fail_the_digest(tmp_path):
    path = checkpoint.save(tmp_path, 1, _tree(1))
    leaves, _header = checkpoint.read(path)
    leaves[3] = leaves[3].copy()
    leaves[3].flat[0] += 1
    arrays = {f"leaf_{i:05d}": leaf for i, leaf in enumerate(leaves)}
    with np.load(path) as data:
        arrays["__header__"] = data["__header__"]
    np.savez(path, **arrays)  # a well-formed zip with one changed number
    with pytest.raises(CheckpointError, match="do not match the SHA-256"):
        checkpoint.restore(path, _tree())


def test_another_tree_is_a_mismatch_not_skipped(tmp_path):
    checkpoint.save(tmp_path, 1, _tree())
    other = {"state": TrainState.create(jaxbp.MLP((3, 5, 2)).init(jax.random.key(0)),
                                        optax.adam(1e-3)),
             "key": jax.random.key(0), "raw": jnp.arange(3)}
    with pytest.raises(CheckpointMismatchError, match=r"leaf \['state'\]\.params\[0\]\['w'\] "
                                                      r"is float32\[3, 4\], template "
                                                      r"float32\[3, 5\]"):   # by its path
        checkpoint.restore_latest(tmp_path, other)
    with pytest.raises(CheckpointMismatchError, match="template has") as raised:
        checkpoint.restore(checkpoint.list_checkpoints(tmp_path)[0], {"only": jnp.ones(2)})
    # another structure: where the two trees part, not both trees whole (a GPT's optimizer
    # state printed thousands of characters on one line)
    deep = {"state": TrainState.create(jaxbp.models.gpt(5, 4, 2, 2, 3).init(jax.random.key(0)),
                                       optax.adam(1e-3))}
    checkpoint.save(tmp_path / "gpt", 1, deep)
    with pytest.raises(CheckpointMismatchError, match="they part at: checkpoint ") as raised:
        checkpoint.restore(checkpoint.list_checkpoints(tmp_path / "gpt")[0],
                           {"state": TrainState.create(jaxbp.models.gpt(
                               5, 4, 2, 2, 3, norm="rms").init(jax.random.key(0)),
                               optax.adam(1e-3))})
    assert len(str(raised.value)) < 500 and "'bias'" in str(raised.value), raised.value


def test_empty_folder_and_bad_arguments(tmp_path):
    assert checkpoint.restore_latest(tmp_path / "none", _tree()) is None
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        checkpoint.save(tmp_path, -1, _tree())
    for keep in (0, "3", 2.0):   # "3" was a TypeError from `<` naming no argument
        with pytest.raises(ValueError, match=f"keep must be None or an int >= 1, got {keep!r}"):
            checkpoint.save(tmp_path, 1, _tree(), keep=keep)
    with pytest.raises(TypeError, match=r"metadata must be JSON-serialisable .*object"):
        checkpoint.save(tmp_path, 1, _tree(), metadata={"a": object()})   # json's own words
    assert not list(tmp_path.iterdir())                                  # named nothing
    with pytest.raises(FileNotFoundError, match="does not exist"):
        checkpoint.restore(tmp_path / "ckpt_000000001.npz", _tree())


def test_setting_aside_never_fails_on_a_name_set_aside_before(tmp_path):
    """A corrupt step whose ``.corrupt`` name is taken (an earlier run set one aside) is
    kept under the next free name; nothing is replaced."""
    old = checkpoint.save(tmp_path, 1, _tree(1))
    for round_ in (1, 2):
        new = checkpoint.save(tmp_path, 2, _tree(2))
        new.write_bytes(b"not a checkpoint %d" % round_)
        with pytest.warns(RuntimeWarning, match="ckpt_000000002.npz"):
            assert checkpoint.restore_latest(tmp_path, _tree())[2] == old
    first = new.with_name(new.name + ".corrupt")
    second = new.with_name(new.name + ".corrupt.2")
    assert first.read_bytes() == b"not a checkpoint 1"
    assert second.read_bytes() == b"not a checkpoint 2"
    assert checkpoint.list_checkpoints(tmp_path) == [old]


def test_sharded_steps_without_orbax_are_refused_untouched(tmp_path, monkeypatch, capsys):
    """A folder of orbax steps read where orbax-checkpoint is not installed: an ImportError
    that names the fix, before anything is renamed (a missing library is not corruption),
    and `jaxbp train` exits 2 with one line."""
    from jaxbp import cli
    from jaxbp.train import sharded_checkpoint

    steps = [sharded_checkpoint.path_for(tmp_path, s) for s in (1, 2)]
    for step in steps:
        step.mkdir()
        (step / "data").write_bytes(b"orbax's files")
    monkeypatch.setitem(__import__("sys").modules, "orbax.checkpoint", None)  # not installed
    with pytest.raises(ImportError, match=r"need orbax-checkpoint: pip install 'jaxbp\[scale\]'"):
        sharded_checkpoint.restore_latest(tmp_path, _tree())
    code = cli.main(["train", "--epochs", "1", "--checkpoint-dir", str(tmp_path), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1
    assert "holds 2 sharded checkpoints" in err and "pip install 'jaxbp[scale]'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == [s.name for s in steps]
    assert all((s / "data").read_bytes() == b"orbax's files" for s in steps)


@pytest.mark.parametrize("damage", ["metadata", "arrays"])
def test_a_corrupt_sharded_step_is_told_in_one_short_warning(tmp_path, damage, caplog):
    """A damaged orbax step (its JSON metadata, or the arrays' OCDBT files) is set aside
    with one warning of at most ~300 characters besides its paths (no tensorstore spec dump:
    the error is cut at 240), orbax's
    own log lines held back, and the step before it restores."""
    pytest.importorskip("orbax.checkpoint")
    from jaxbp.train import sharded_checkpoint

    tree = {"w": jnp.arange(12.0).reshape(3, 4), "b": jnp.ones(4)}
    for step in (1, 2):
        sharded_checkpoint.save(tmp_path, step, tree, {"epoch": step})
    for f in sharded_checkpoint.path_for(tmp_path, 2).rglob("*"):
        data = "/d/" in str(f) or f.name == "manifest.ocdbt"
        if f.is_file() and f.stat().st_size and (data if damage == "arrays" else not data):
            f.write_bytes(f.read_bytes()[: max(1, f.stat().st_size // 3)])
    with pytest.warns(RuntimeWarning, match="skipping checkpoint") as record:
        restored, metadata, path = sharded_checkpoint.restore_latest(tmp_path, tree)
    assert metadata["epoch"] == 1 and path.name == sharded_checkpoint.path_for(tmp_path, 1).name
    _assert_equal(restored, tree)
    messages = [str(w.message) for w in record if "skipping" in str(w.message)]
    folder = str(sharded_checkpoint.path_for(tmp_path, 2))
    assert len(messages) == 1 and len(messages[0].replace(folder, "")) < 320, messages
    assert "tensorstore_spec" not in messages[0] and messages[0].endswith(".corrupt'")
    gc.collect()  # the abandoned reads' tasks, collected now rather than at any later moment
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text


def test_late_callbacks_into_orbaxs_closed_loop_are_dropped_and_nothing_else(monkeypatch):
    """After a failed restore, tensorstore's completions of the abandoned reads call
    ``call_soon_threadsafe`` on orbax's closed asyncio loop; Python would print each as an
    "Exception ignored" traceback. The hook jaxbp installs then drops exactly that error
    (a real one, raised by asyncio here) and passes any other on."""
    import asyncio
    import sys
    import types

    from jaxbp.train import sharded_checkpoint

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    sharded_checkpoint.drop_closed_loop_callbacks()
    sharded_checkpoint.drop_closed_loop_callbacks()            # installed once
    loop = asyncio.new_event_loop()
    loop.close()
    try:
        loop.call_soon_threadsafe(print)
    except RuntimeError as err:
        closed = err
    other = RuntimeError("Event loop is closed")              # not from asyncio's check
    for err in (closed, other, ValueError("unrelated")):
        sys.unraisablehook(types.SimpleNamespace(exc_type=type(err), exc_value=err,
                                                 exc_traceback=err.__traceback__,
                                                 err_msg=None, object=None))
    assert len(seen) == 2 and seen[0].exc_value is other
    assert isinstance(seen[1].exc_value, ValueError)
    # the abandoned reads' coroutines, collected unawaited: that warning alone is dropped
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        sharded_checkpoint.drop_closed_loop_callbacks()
        for name in ("Store._get_array_metadatas", "my_own_coroutine"):
            warnings.warn(f"coroutine '{name}' was never awaited", RuntimeWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == ["coroutine 'my_own_coroutine' was never "
                                                "awaited"]


def test_abandoned_reads_never_retrieved_errors_are_dropped_and_nothing_else(caplog):
    """The sibling reads of a damaged step fail with tensorstore errors nobody retrieves;
    asyncio logs each at ERROR (with the whole spec) when the task is collected, at any
    later moment (seen in CI). The filter jaxbp installs drops exactly those: a task or a
    future whose exception is tensorstore's; asyncio's other errors still reach the log."""
    import asyncio
    import logging

    from jaxbp.train import sharded_checkpoint

    sharded_checkpoint.drop_unretrieved_read_errors()
    sharded_checkpoint.drop_unretrieved_read_errors()          # installed once
    logger = logging.getLogger("asyncio")
    assert sum(type(f).__name__ == "_UnretrievedReadErrors" for f in logger.filters) == 1

    async def failing(text):
        raise ValueError(text)

    caplog.set_level(logging.ERROR, logger="asyncio")
    spec = "DATA_LOSS: Error opening \"zarr\" driver [tensorstore_spec='{}']"
    for text in (spec, "my own error"):
        loop = asyncio.new_event_loop()
        task = loop.create_task(failing(text))
        loop.run_until_complete(asyncio.sleep(0))
        loop.close()
        del task
        gc.collect()
    logged = [r.getMessage() for r in caplog.records if r.name == "asyncio"]
    assert len(logged) == 1 and "my own error" in logged[0], logged
