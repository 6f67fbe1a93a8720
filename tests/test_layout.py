"""The package's layout: imports flow one way, and layer types are asked only in layers/."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).parent.parent / "jaxbp"
LAYER_TYPES = {"Dense", "Conv2D", "MaxPool", "AvgPool", "Flatten", "LayerNorm", "RMSNorm",
               "Residual", "Embedding", "SelfAttention"}


def modules() -> dict[str, ast.Module]:
    found = {}
    for path in ROOT.rglob("*.py"):
        name = ".".join(path.relative_to(ROOT.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = ast.parse(path.read_text())
    return found


def test_module_level_imports_form_no_circle():
    trees = modules()
    graph: dict[str, set[str]] = {name: set() for name in trees}
    for name, tree in trees.items():
        for node in tree.body:                       # imports run when the module loads
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxbp"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    graph[name].add(sub if sub in trees else node.module)
    path: list[str] = []
    done: set[str] = set()

    def visit(name: str) -> None:
        path.append(name)
        for target in graph[name]:
            assert target not in path, " -> ".join([*path[path.index(target):], target])
            if target not in done:
                visit(target)
        path.pop()
        done.add(name)

    for name in sorted(graph):
        if name not in done:
            visit(name)


def test_layer_types_are_asked_only_inside_layers():
    offenders = []
    for name, tree in modules().items():
        if name.startswith("jaxbp.layers"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", "") == "isinstance":
                kinds = ast.unparse(node.args[1])
                if any(kind in kinds.replace("(", " ").replace(",", " ").replace("|", " ")
                       .replace(".", " ").split() for kind in LAYER_TYPES):
                    offenders.append(f"{name}: {ast.unparse(node)}")
    assert not offenders, offenders
