"""The `jaxbp` command line."""

from __future__ import annotations

import subprocess
import sys

import jax
import pytest

from jaxbp import checkpoint, cli


def test_verify_passes_and_prints_the_table(restore_x64, capsys):
    code = cli.main(["verify", "--cases", "5", "--dtypes", "float64,float32", "--n-fd", "1"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "all ok: 0 of 5 cases failed" in out
    assert "worst relative error vs jax.grad: float64" in out
    assert out.count(" ok") >= 5


def test_verify_fails_with_exit_code_one_on_a_wrong_derivative(restore_x64, capsys, monkeypatch):
    from jaxbp import activations

    for name, act in list(activations.ACTIVATIONS.items()):  # every g' off by 10%
        monkeypatch.setitem(activations.ACTIVATIONS, name,
                            act._replace(dg=lambda z, a, dg=act.dg: 1.1 * dg(z, a)))
    jax.clear_caches()
    code = cli.main(["verify", "--cases", "3", "--dtypes", "float64", "--n-fd", "1"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAILED: 3 of 3 cases failed" in out
    assert "reference" in out


def test_unknown_dtype_is_a_usage_error(capsys):
    assert cli.main(["verify", "--dtypes", "float8"]) == 2
    assert "--dtypes: unknown ['float8']" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "jaxbp.cli", "verify", "--cases", "2",
                             "--dtypes", "float32"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all ok" in result.stdout


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    assert "verify" in capsys.readouterr().out


def test_train_verifies_then_trains(capsys, tmp_path):
    code = cli.main(["train", "--epochs", "3", "--sizes", "64,32,10", "--quiet",
                     "--checkpoint-dir", str(tmp_path / "ckpt"), "--plot",
                     str(tmp_path / "c.png")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "gradient check at the initial params" in out and "verify_grads: OK" in out
    assert "final test accuracy" in out
    assert (tmp_path / "c.png").exists()
    assert len(checkpoint.list_checkpoints(tmp_path / "ckpt")) == 3
    assert not jax.config.jax_enable_x64  # the float64 check did not leak


@pytest.mark.slow
def test_default_train_reaches_97_percent_on_digits(capsys):
    """The README's main job: plain `jaxbp train` (64,256,256,10 relu, adam 1e-3, 30 epochs)."""
    assert cli.main(["train", "--quiet"]) == 0
    out = capsys.readouterr().out
    accuracy = float(out.split("final test accuracy ")[1].split(",")[0])
    assert accuracy >= 0.97, out


def test_train_regression_on_teacher_data(capsys):
    code = cli.main(["train", "--data", "teacher", "--epochs", "2", "--sizes", "32,16,8",
                     "--quiet", "--optimizer", "momentum", "--lr", "0.01"])
    out = capsys.readouterr().out
    assert code == 0 and "final test loss" in out and "accuracy" not in out.split("final")[1]


def test_train_on_a_one_device_mesh_with_sharded_checkpoints(capsys, tmp_path):
    argv = ["train", "--epochs", "2", "--sizes", "64,16,10", "--quiet", "--devices", "1",
            "--checkpoint-dir", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "mesh {'data': 1, 'model': 1}" in out and "final test accuracy" in out
    assert sorted(p.name for p in tmp_path.glob("ckpt_*")) == [
        "ckpt_000000001", "ckpt_000000002"]
    resume = [a for a in argv if a != "--quiet"]
    assert cli.main([*resume[:2], "3", *resume[3:]]) == 0  # resumes from the orbax step
    out = capsys.readouterr().out
    assert "resumed from" in out and "ckpt_000000002 (after epoch 2)" in out
    assert out.count("epoch   3/3") == 1 and "epoch   1/3" not in out
