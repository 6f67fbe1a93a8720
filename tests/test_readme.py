"""The README's map from the seeds' equations to code lines stays true."""

from __future__ import annotations

import pathlib
import re

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
