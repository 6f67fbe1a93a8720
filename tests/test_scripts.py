"""The research scripts in scripts/ run end to end (short settings)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _run(*args: str) -> str:
    result = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


@pytest.mark.slow
def test_train_digits_script(tmp_path):
    out = _run("scripts/train_digits.py", "--epochs", "2", "--plot", str(tmp_path / "c.png"))
    assert "verify_grads: OK" in out and "test accuracy" in out
    assert (tmp_path / "c.png").exists()


@pytest.mark.slow
def test_manual_vs_autodiff_script(tmp_path):
    out = _run("scripts/manual_vs_autodiff.py", "--steps", "20", "--out",
               str(tmp_path / "drift.png"))
    float32 = float(out.split("float32: max relative param difference after 20 steps ")[1]
                    .split()[0])
    float64 = float(out.split("float64: max relative param difference after 20 steps ")[1]
                    .split()[0])
    assert float32 < 1e-5 and float64 < 1e-13
    assert (tmp_path / "drift.png").exists()


@pytest.mark.slow
def test_data_parallel_script_on_a_2d_mesh():
    import os

    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} "
                         "--xla_force_host_platform_device_count=4")
    result = subprocess.run([sys.executable, "scripts/data_parallel.py", "--model", "2",
                             "--epochs", "2"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "mesh {'data': 2, 'model': 2} over 4 devices" in result.stdout
    assert float(result.stdout.split("test accuracy ")[-1]) > 0.9


@pytest.mark.slow
def test_vanishing_and_kfac_scripts(tmp_path):
    out = _run("scripts/vanishing_gradients.py", "--out", str(tmp_path / "v.png"))
    assert "sigmoid, Glorot" in out and (tmp_path / "v.png").exists()
    out = _run("scripts/kfac_vs_adam.py", "--model", "gpt", "--steps", "26", "--out",
               str(tmp_path / "k.png"))
    assert "K-FAC expand" in out and "bits/char" in out and (tmp_path / "k.png").exists()
    out = _run("scripts/kfac_vs_adam.py", "--model", "cnn", "--epochs", "1", "--out",
               str(tmp_path / "c.png"))
    kfac_line = next(line for line in out.splitlines() if line.startswith("K-FAC"))
    assert float(kfac_line.split("epoch 1 ")[1].split(",")[0]) > 0.6  # one epoch: 0.79
    assert (tmp_path / "c.png").exists()


def test_every_script_and_benchmark_parses_its_options_in_one_line():
    """A bad option is one line and exit status 2 (argparse printed its whole usage block
    first): every command line here builds jaxbp.cli's one-line parser."""
    programs = sorted([*ROOT.glob("scripts/*.py"), *ROOT.glob("benchmarks/*.py")])
    assert len(programs) >= 20
    for program in programs:
        text = program.read_text()
        assert "argparse.ArgumentParser(" not in text, program.name
        assert "OneLineParser(" in text, program.name
    result = subprocess.run([sys.executable, "benchmarks/fit_overhead.py", "--bogus"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr == (
        "fit_overhead.py: error: unrecognized arguments: --bogus (--help lists the options)\n")
