"""The package's layout: imports flow one way, rooms stay small, rules live on the records.

Checked from the source (``ast``), not by importing: no import circle (a subpackage's
``__init__`` counted as a step of every import through it), imports only down the
intended levels (:data:`LEVELS`: records below networks below quantities below training
below the checks, bench and command line), no private name imported
across modules, no module over ~400 lines, no function over 60 lines of code (its
docstring not counted), layer types asked only inside ``layers/`` and loss names
compared only inside ``losses.py``.
"""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).parent.parent / "jaxbp"
LOSS_NAMES = {"squared_error", "softmax_cross_entropy", "sigmoid_cross_entropy"}
LAYER_TYPES = {"Dense", "Conv2D", "MaxPool", "AvgPool", "Flatten", "LayerNorm", "RMSNorm",
               "Residual", "Embedding", "SelfAttention", "GatedDense", "Dropout"}


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
                parts = node.module.split(".")      # importing a.b.c runs a/b/__init__ first
                graph[name].update(".".join(parts[:i]) for i in range(2, len(parts))
                                   if ".".join(parts[:i]) in trees
                                   and not name.startswith(".".join(parts[:i])))
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


MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 60


def _code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    first = node.body[0]
    docstring = (isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant)
                 and isinstance(first.value.value, str))
    skipped = first.end_lineno - first.lineno + 1 if docstring else 0
    return node.end_lineno - node.lineno + 1 - skipped


def test_rooms_stay_small():
    big, long = [], []
    for path in ROOT.rglob("*.py"):
        text = path.read_text()
        if len(text.splitlines()) > MAX_MODULE_LINES:
            big.append(f"{path.relative_to(ROOT)}: {len(text.splitlines())} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                if _code_lines(node) > MAX_FUNCTION_LINES:
                    long.append(f"{path.relative_to(ROOT)}: {node.name} {_code_lines(node)}")
    assert not big and not long, (big, long)


def test_no_private_name_is_imported_across_modules():
    offenders = []
    for name, tree in modules().items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxbp"):
                offenders += [f"{name}: from {node.module} import {alias.name}"
                              for alias in node.names if alias.name.startswith("_")]
            if (isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxbp")
                    and (node.module or "").split(".")[-1][:1] == "_"):
                offenders.append(f"{name}: from {node.module}")
    assert not offenders, offenders


def test_loss_names_are_compared_only_in_losses():
    offenders = []
    for name, tree in modules().items():
        if name == "jaxbp.losses":
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare) and any(
                    isinstance(side, ast.Constant) and side.value in LOSS_NAMES
                    for side in (node.left, *node.comparators)):
                offenders.append(f"{name}: {ast.unparse(node)}")
    assert not offenders, offenders


# The intended layering, lowest first: a module imports (at load time) only from its own
# level or below. Matched by the longest prefix; train.step sits below parallel, which sits
# below the rest of train (fit feeds each chunk through the sharded loop).
LEVELS = (
    ("jaxbp.types", "jaxbp.matmul_precision", "jaxbp.compilation_cache",
     "jaxbp.user_warnings", "jaxbp.files"),
    ("jaxbp.input_checks", "jaxbp.value_checks", "jaxbp.record_checks", "jaxbp.activations",
     "jaxbp.losses", "jaxbp.data", "jaxbp.text", "jaxbp.privacy"),
    ("jaxbp.layers",),
    ("jaxbp.tied_embedding",),
    ("jaxbp.network", "jaxbp.network_curvature", "jaxbp.models", "jaxbp.mlp"),
    ("jaxbp.backprop", "jaxbp.autodiff", "jaxbp.per_example", "jaxbp.grad_variance",
     "jaxbp.microbatch", "jaxbp.diagnostics"),
    ("jaxbp.sources",),
    ("jaxbp.curvature", "jaxbp.feedback"),
    ("jaxbp.train.step", "jaxbp.train.state"),
    ("jaxbp.parallel",),
    ("jaxbp.train",),
    ("jaxbp.check",),
    ("jaxbp.testing",),
    ("jaxbp.bench",),
    ("jaxbp.cli",),
    ("jaxbp",),
)


def _level(module: str) -> int:
    best = max((prefix for group in LEVELS for prefix in group
                if module == prefix or module.startswith(prefix + ".")), key=len)
    return next(i for i, group in enumerate(LEVELS) if best in group)


def test_imports_flow_down_the_levels():
    trees = modules()
    upward = []
    for name, tree in trees.items():
        for node in tree.body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("jaxbp"):
                for alias in node.names:
                    sub = f"{node.module}.{alias.name}"
                    target = sub if sub in trees else node.module
                    if _level(target) > _level(name):
                        upward.append(f"{name} (level {_level(name)}) imports {target} "
                                      f"(level {_level(target)})")
    assert not upward, upward
    assert _level("jaxbp.train.fit") > _level("jaxbp.parallel.sharding") > _level(
        "jaxbp.train.step") > _level("jaxbp.layers.dense")     # the table reads as meant
