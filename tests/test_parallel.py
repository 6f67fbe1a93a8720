"""The sharded step on 8 host devices and a 2-process run, each in its own Python process.

XLA_FLAGS must be set before JAX starts, so these tests launch workers
(tests/workers/) with --xla_force_host_platform_device_count.
"""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import optax
import pytest
from helpers import assert_leaves_close

import jaxbp
from jaxbp import parallel

WORKERS = pathlib.Path(__file__).parent / "workers"
ROOT = WORKERS.parent.parent


def _env(devices: int, **extra: str) -> dict[str, str]:
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                         f"--xla_force_host_platform_device_count={devices}",
               PYTHONPATH=str(ROOT))
    env.update(extra)
    return env


@pytest.mark.slow
def test_sharded_step_equals_single_device_on_1d_and_2d_meshes():
    result = subprocess.run([sys.executable, str(WORKERS / "mesh_checks.py")], env=_env(8),
                            capture_output=True, text=True, timeout=600)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("ok mesh") == 9 and "ok uneven batch" in result.stdout
    assert "ok collectives" in result.stdout  # Megatron pairs: no all-gather
    assert "ok gpt mesh (4, 2)" in result.stdout and "ok cnn mesh (8, 1)" in result.stdout
    assert "ok user record replicated, Dense pairs split" in result.stdout


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run_two_processes(worker: str, *args: str, **env: str) -> list[str]:
    """The worker in two processes on 127.0.0.1, 2 host devices each; their stdouts."""
    port = _free_port()
    procs = [subprocess.Popen(
        [sys.executable, str(WORKERS / worker), *args],
        env=_env(2, JAXBP_COORDINATOR=f"127.0.0.1:{port}", JAXBP_NUM_PROCESSES="2",
                 JAXBP_PROCESS_ID=str(i), **env),
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    outputs = [p.communicate(timeout=300) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stdout + stderr
    return [stdout for stdout, _ in outputs]


@pytest.mark.slow
def test_two_processes_end_with_the_single_process_params(tmp_path):
    out = tmp_path / "params"
    for stdout in _run_two_processes("multiprocess_train.py", str(out)):
        assert "of 2, 4 devices" in stdout

    # the same 5 adam steps on one device, here: on the CPU like the workers, so an
    # accelerator's arithmetic never meets the workers' CPU arithmetic
    with jax.default_device(jax.devices("cpu")[0]):
        reference = _single_device_reference()
    for i in range(2):
        with np.load(f"{out}.{i}.npz") as saved:
            got = [saved[f"arr_{k}"] for k in range(len(reference))]
        for a, b in zip(got, reference):
            np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def _single_device_reference() -> list[np.ndarray]:
    net = jaxbp.MLP((12, 16, 10), "tanh")
    optimizer = optax.adam(1e-2)
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(5, 32, 12)).astype(np.float32)
    ys = rng.integers(0, 10, size=(5, 32)).astype(np.int32)
    step = jaxbp.make_train_step(net, optimizer)
    state = jaxbp.TrainState.create(net.init(jax.random.key(0)), optimizer)
    for x, y in zip(xs, ys):
        state, _ = step(state, x, y)
    return [np.asarray(leaf) for leaf in jax.tree.leaves(state.params)]


def test_megatron_splits_alternate_columns_and_rows():
    splits = parallel.layer_splits([(64, 512), (512, 512), (512, 512), (512, 10)], 2)
    assert splits == ("column", "row", "column", "row")
    # a layer that does not divide stays whole and the pairing starts again after it
    assert parallel.layer_splits([(6, 9), (9, 8), (8, 8), (8, 3)], 2) == (
        "replicated", "column", "row", "replicated")
    assert parallel.layer_splits([(4, 4), (4, 4)], 1) == ("replicated", "replicated")


@pytest.mark.slow
def test_initialize_gives_up_on_a_missing_peer_with_a_message():
    code = "from jaxbp import parallel\nparallel.initialize(timeout_s=3)\n"
    address = f"127.0.0.1:{_free_port()}"
    stderr = {}
    for rank in ("1", "0"):  # no coordinator; a coordinator whose peer never comes
        start = time.monotonic()
        result = subprocess.run(
            [sys.executable, "-c", code],
            env=_env(1, JAXBP_COORDINATOR=address, JAXBP_NUM_PROCESSES="2",
                     JAXBP_PROCESS_ID=rank),
            capture_output=True, text=True, timeout=120)
        assert result.returncode != 0 and time.monotonic() - start < 60
        assert f"process {rank} of 2 joining {address} (waiting up to 3 s" in result.stderr
        stderr[rank] = result.stderr
    assert (f"RuntimeError: process 1 of 2 could not join the run at {address} within 3 s: "
            f"no coordinator (process 0) is listening there") in stderr["1"]
    assert "DEADLINE_EXCEEDED" in stderr["0"]  # XLA's own exit, after the bounded wait


def test_initialize_names_a_bad_environment_variable(monkeypatch):
    monkeypatch.setenv("JAXBP_NUM_PROCESSES", "two")
    with pytest.raises(ValueError, match="JAXBP_NUM_PROCESSES must be an integer, got 'two'"):
        parallel.initialize()
    monkeypatch.setenv("JAXBP_NUM_PROCESSES", "2")
    monkeypatch.setenv("JAXBP_LOCAL_DEVICE_IDS", "0;1")
    with pytest.raises(ValueError, match="JAXBP_LOCAL_DEVICE_IDS must be comma-separated"):
        parallel.initialize()
    monkeypatch.delenv("JAXBP_LOCAL_DEVICE_IDS")
    for kwargs, words in (({"num_processes": 0}, "num_processes must be None or an int >= 1"),
                          ({"process_id": 2}, r"process_id must be in \[0, num_processes\) = "
                                              r"\[0, 2\), got 2")):
        with pytest.raises(ValueError, match=words):
            parallel.initialize(**kwargs)


def test_initialize_after_jax_started_says_so_not_that_it_waited():
    jax.numpy.ones(1).block_until_ready()      # JAX has started in this process
    before = jax.config.jax_cpu_collectives_implementation
    try:
        with pytest.raises(RuntimeError, match=r"initialize\(\) must run before anything "
                                               r"starts JAX in this process"):
            parallel.initialize(f"127.0.0.1:{_free_port()}", num_processes=1, process_id=0)
    finally:
        jax.config.update("jax_cpu_collectives_implementation", before)


def test_make_mesh_and_process_rows_on_one_device():
    mesh = parallel.make_mesh()
    assert mesh.shape == {"data": jax.device_count(), "model": 1}
    with pytest.raises(ValueError, match="data x model = 3 x 1 must equal"):
        parallel.make_mesh(data=3 * jax.device_count(), model=1)
    with pytest.raises(ValueError, match="model must be an int >= 1 that divides"):
        parallel.make_mesh(model=0)
    for data in (0, "1"):    # were "data x model = '1' x 1 must equal the 1 devices"
        with pytest.raises(ValueError, match=f"data must be an int >= 1, got {data!r}"):
            parallel.make_mesh(data=data)
    with pytest.raises(ValueError, match=r"mesh has axes \('data', 'model'\), no data_axis "
                                         r"'batch'"):      # was JAX's "Resource axis: batch"
        parallel.batch_sharding(mesh, 2, "batch")
    batch = np.arange(8)
    assert list(parallel.process_rows(batch, 1, 2)) == [4, 5, 6, 7]
    with pytest.raises(ValueError, match=r"does not split over process_count = 3 processes "
                                         r"\(8 % 3 = 2\)"):
        parallel.process_rows(batch, 0, 3)
    for bad in (8, None):   # was "object of type 'int' has no len()"
        with pytest.raises(TypeError, match=r"batch must be an array of rows \(the global "
                                            r"batch\), got"):
            parallel.process_rows(bad, 0, 2)


@pytest.mark.parametrize("index, count, error, words", [
    (2, 2, ValueError, r"process_index must be in \[0, process_count\) = \[0, 2\), got 2"),
    (-1, 2, ValueError, r"process_index must be in \[0, process_count\) = \[0, 2\), got -1"),
    (0, 0, ValueError, "process_count must be >= 1, got 0"),
    (0.5, 2, TypeError, "process_index must be an int, got float: 0.5"),
    (0, "2", TypeError, "process_count must be an int, got str"),
])
def test_process_rows_refuses_impossible_processes(index, count, error, words):
    with pytest.raises(error, match=words):
        parallel.process_rows(np.arange(8), index, count)
    assert list(parallel.process_rows(np.arange(8), np.int64(1), np.int64(2))) == [4, 5, 6, 7]


def test_sharded_step_on_a_one_device_mesh_equals_the_plain_step():
    net = jaxbp.MLP((5, 8, 3), "relu")
    optimizer = optax.sgd(0.1)
    params = net.init(jax.random.key(0))
    x = np.random.default_rng(0).normal(size=(4, 5)).astype(np.float32)
    y = np.arange(4) % 3
    plain, _ = jaxbp.make_train_step(net, optimizer, donate=False)(
        jaxbp.TrainState.create(params, optimizer), x, y)
    sharded, metrics = parallel.make_sharded_train_step(net, optimizer, parallel.make_mesh())(
        jaxbp.TrainState.create(jax.tree.map(np.array, params), optimizer), x, y)
    assert_leaves_close(plain, sharded, rtol=1e-6)
    assert metrics["loss"].shape == ()
    # the loop splits each step's batch: one batch for every step (which make_train_loop
    # takes) is named, not an IndexError from the batch's sharding
    loop = parallel.make_sharded_train_loop(net, optimizer, parallel.make_mesh(), steps=2)
    state = jaxbp.TrainState.create(jax.tree.map(np.array, params), optimizer)
    with pytest.raises(ValueError, match=r"xs has shape \(4, 5\) and ys \(4,\) but expected "
                                         r"\(steps, batch, \*sample\)"):
        loop(state, x, y)
    looped, _ = loop(state, np.stack([x, x]), np.stack([y, y]))
    assert int(looped.step) == 2


@pytest.mark.slow
def test_fit_over_meshes_and_resume_across_device_counts(tmp_path):
    result = subprocess.run([sys.executable, str(WORKERS / "fit_mesh_checks.py"), str(tmp_path)],
                            env=_env(8), capture_output=True, text=True, timeout=600)
    print(result.stdout)
    assert result.returncode == 0, result.stdout + result.stderr
    for check in ("fit on mesh (8, 1)", "fit on mesh (4, 2)", "mesh resume", "1 device -> 8",
                  "8 devices -> 1", "private MLP on mesh (8, 1)", "private MLP on mesh (4, 2)",
                  "private GPT on mesh (4, 2)", "private mesh resume",
                  "private loop collectives"):
        assert f"ok {check}:" in result.stdout, check


def _fit_two_processes(prefix, epochs, folder=None):
    stdouts = _run_two_processes("fit_multiprocess.py", str(prefix), str(epochs),
                                 *([str(folder)] if folder else []))
    print(stdouts[0])
    return [dict(np.load(f"{prefix}.{i}.npz")) for i in range(2)]


@pytest.mark.slow
def test_fit_over_two_processes_resumes_bit_identical(tmp_path):
    whole = _fit_two_processes(tmp_path / "whole", 2)
    _fit_two_processes(tmp_path / "first", 1, tmp_path / "ckpt")
    resumed = _fit_two_processes(tmp_path / "resumed", 2, tmp_path / "ckpt")
    names = [k for k in whole[0] if k.startswith("arr_")]
    for i in range(2):  # both processes hold the same, gathered params
        for name in names:
            np.testing.assert_array_equal(resumed[i][name], whole[0][name])
    np.testing.assert_array_equal(resumed[0]["accuracy"], whole[0]["accuracy"])
    assert len(resumed[0]["saves"]) == 1  # epoch 2 only: epoch 1 came from the checkpoint
    # the same run on one CPU device here (not an accelerator's arithmetic)
    with jax.default_device(jax.devices("cpu")[0]):
        single = jaxbp.fit(jaxbp.MLP((64, 32, 32, 10), "tanh"), optax.sgd(0.05, momentum=0.9),
                           jaxbp.data.load_digits(), epochs=2, batch_size=64,
                           key=jax.random.key(3), progress=False)
    for name, leaf in zip(names, jax.tree.leaves(single.state.params)):
        np.testing.assert_allclose(whole[0][name], np.asarray(leaf), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_a_private_run_over_two_processes_is_the_single_process_run(tmp_path):
    """DP-SGD over a mesh of two processes: both draw the same Poisson batches, each feeds
    its rows of every draw (padded to split), and the params after an epoch are those of
    the same private fit on one device."""
    stdouts = _run_two_processes("fit_multiprocess.py", str(tmp_path / "dp"), "1",
                                 JAXBP_TEST_PRIVATE="1")
    assert "of 2, 4 devices" in stdouts[0]
    with jax.default_device(jax.devices("cpu")[0]):
        single = jaxbp.fit(jaxbp.MLP((64, 32, 32, 10), "tanh"), optax.sgd(0.05, momentum=0.9),
                           jaxbp.data.load_digits(), epochs=1, batch_size=64,
                           key=jax.random.key(3), progress=False,
                           privacy=jaxbp.privacy.Privacy(1.0, 1e-5, noise_multiplier=1.0))
    for i in range(2):
        with np.load(tmp_path / f"dp.{i}.npz") as saved:
            for k, leaf in enumerate(jax.tree.leaves(single.state.params)):
                np.testing.assert_allclose(saved[f"arr_{k}"], np.asarray(leaf), rtol=1e-5,
                                           atol=1e-6)
            np.testing.assert_array_equal(saved["accuracy"], single.history["test_accuracy"])
