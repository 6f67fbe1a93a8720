"""The README stays true: its map from the seeds' equations to code lines, and every
Python block in it runs."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _references():
    """(file, line, snippet) for every `path:N` `code` and `:N` `code` in the math table."""
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## The math, and where it lives")[1].split("## Public API")[0]
    refs = []
    for row in table.splitlines():
        path = None
        for match in re.finditer(r"`(jaxbp/[\w/]+\.py)?:(\d+)` `([^`]+)`", row):
            path = match.group(1) or path
            refs.append((path, int(match.group(2)), match.group(3)))
    return refs


def test_readme_line_references_point_at_their_code():
    refs = _references()
    assert len(refs) >= 6
    for path, line, snippet in refs:
        lines = (ROOT / path).read_text().splitlines()
        assert snippet in lines[line - 1], f"{path}:{line} is {lines[line - 1]!r}, not {snippet!r}"


def test_readme_quickstart_runs():
    readme = (ROOT / "README.md").read_text()
    code = readme.split("## Quickstart")[1].split("```python")[1].split("```")[0]
    namespace: dict = {}
    exec(code, namespace)  # the README's own quickstart, as a user would paste it
    assert namespace["report"].ok
    assert namespace["loss"].shape == ()


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)


AFTER_QUICKSTART = "# after the Quickstart"
"""The first line of a README block that continues the Quickstart's net, params, x, y (with
``import optax`` and ``key = jax.random.key(3)`` where it says so)."""


def _runnable(index: int) -> str:
    """Block ``index`` as a user would run it: alone, or after the Quickstart it names."""
    blocks = _python_blocks()
    code = blocks[index]
    if code.startswith(AFTER_QUICKSTART):
        code = blocks[0] + "import optax\nkey = jax.random.key(3)\n" + code
    return "import jax\n" + code


def _gpt_run(folder: pathlib.Path) -> None:
    """A one-epoch run of the README's GPT on a few windows, checkpointed in ``folder``
    (the sampling block reads a run's checkpoints)."""
    import jax
    import optax

    import jaxbp
    from jaxbp import models

    text = jaxbp.data.load_text(seq_len=64)
    net = models.gpt(len(text.vocab), dim=128, depth=2, heads=4, seq_len=64)
    few = jaxbp.data.Dataset(text.x_train[:64], text.y_train[:64], text.x_test[:16],
                             text.y_test[:16])
    jaxbp.fit(net, optax.adam(1e-3), few, epochs=1, batch_size=32, key=jax.random.key(0),
              checkpoint_dir=folder, progress=False)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(1, 13))
def test_every_python_block_of_the_readme_runs(index, tmp_path, monkeypatch):
    """Each block runs as pasted (in an empty folder: the runs and figures they write go
    there); a block on many devices runs on 8 host devices in its own process."""
    assert len(_python_blocks()) == 13
    code = _runnable(index)
    monkeypatch.chdir(tmp_path)
    if "parallel.make_mesh" in code:
        env = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(ROOT),
                   XLA_FLAGS="--xla_force_host_platform_device_count=8")
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        return
    if 'load_params("runs/gpt"' in code:
        _gpt_run(tmp_path / "runs" / "gpt")
    namespace: dict = {}
    exec(code, namespace)  # the README's own code, as a user would paste it
    for name, test in list(namespace.items()):
        if name.startswith("test_") and callable(test):
            test()             # the block that shows a test of a custom rule: run it too
