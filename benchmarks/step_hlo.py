"""The compiled programs of one training step, hand-written and jax.grad, side by side.

    python benchmarks/step_hlo.py [--width 4096] [--depth 4] [--batch 8192] [--recipe bf16]
                                  [--out benchmarks/results]

Why: on an H200 the bf16 MLPs took 1.05-1.13x jax.grad's time in the `bf16` recipe,
while the two steps' matmuls agree in shape, operand dtypes and order (README,
Benchmarks); what differs is the elementwise work XLA fuses around them (the bias
gradient summed in float32 against bf16, a relu mask multiplied against selected).
Which of it costs the time is read from the optimized program of each step, which only
the accelerator's compiler gives. This compiles both steps (nothing is run: no timing)
and writes, for ``jaxbp.MLP((W,) * D + (10,), "relu")`` at batch B in the recipe:

* ``step_hlo_<platform>_<label>_<grad>.txt``: the optimized HLO (after fusion);
* ``step_hlo_<platform>_<label>.md``: a table of what each program holds: the kernels
  of its entry computation by kind, its matmuls (``dot`` or the GEMM custom calls) by
  operand and result types, its reductions by input and result type, the converts,
  selects and multiplies inside its fusions, and XLA's FLOP and byte counts.
"""

from __future__ import annotations

import collections
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxbp
from jaxbp import files
from jaxbp.bench.gpt import RECIPES
from jaxbp.bench.harness import describe_machine, machine_info, xla_cost
from jaxbp.cli.common import OneLineParser

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+) = (.+?) ([a-z][\w\-]*)\((.*)$")
_TYPE = re.compile(r"^\(?([a-z]+\d*)\[")


def _element_type(hlo_type: str) -> str:
    """``bf16[8192,4096]{1,0}`` -> ``bf16``; a tuple's first element's."""
    match = _TYPE.match(hlo_type.strip())
    return match.group(1) if match else hlo_type.split("[")[0]


def hlo_summary(text: str) -> collections.Counter:
    """What an optimized HLO module holds, counted (keys are the table's row names)."""
    counts: collections.Counter = collections.Counter()
    entry, types = False, {}
    for line in text.splitlines():
        if line[:1] not in ("", " ", "}") and line.rstrip().endswith("{"):  # a computation
            entry, types = line.startswith("ENTRY"), {}
            continue
        found = _INSTRUCTION.match(line)
        if not found:
            continue
        name, hlo_type, op, rest = found.groups()
        types[name] = _element_type(hlo_type)
        operands = [types.get(o.lstrip("%"), "?") for o in
                    re.findall(r"%([\w.\-]+)", rest.split(")")[0])]
        if entry and op not in ("parameter", "constant", "get-tuple-element", "tuple",
                                "bitcast"):
            kind = re.search(r"kind=(k\w+)", rest)
            counts[f"kernel: {op}" + (f" {kind.group(1)}" if kind else "")] += 1
        if op == "dot" or (op == "custom-call" and re.search(r"gemm|matmul", rest)):
            counts[f"matmul: {' x '.join(operands[:2])} -> {types[name]}"] += 1
        elif op == "reduce":
            counts[f"reduce: {operands[0] if operands else '?'} -> {types[name]}"] += 1
        elif op in ("convert", "select", "multiply") and not entry:
            counts[f"fused {op}"] += 1
    return counts


def compiled_step(net: jaxbp.MLP, grad: str, batch: int) -> jax.stages.Compiled:
    """The donated train step a user runs (sgd), compiled for one batch of the net."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, net.sizes[0])), jnp.float32)
    y = jnp.asarray(rng.integers(0, net.sizes[-1], size=batch), jnp.int32)
    optimizer = optax.sgd(1e-4)
    state = jax.eval_shape(lambda: jaxbp.TrainState.create(net.init(jax.random.key(0)),
                                                           optimizer))
    step = jaxbp.make_train_step(net, optimizer, grad=grad)
    return step.lower(state, x, y).compile()


def markdown(label: str, summaries: dict[str, collections.Counter],
             costs: dict[str, dict | None], info: dict) -> str:
    rows = sorted(set().union(*summaries.values()))
    lines = [f"# The compiled train step: {label}, hand-written vs jax.grad", "",
             f"Machine: {describe_machine(info)}.", "",
             "Counts in each step's optimized HLO (`python benchmarks/step_hlo.py`): the "
             "entry computation's kernels by kind; matmuls (dot, or the GEMM custom calls) "
             "by operand and result types; reductions by input and result type; converts, "
             "selects and multiplies inside fusions. The HLO texts are beside this file.", "",
             "| | backprop | autodiff |", "|---|---|---|"]
    lines += [f"| {row} | {summaries['backprop'][row]} | {summaries['autodiff'][row]} |"
              for row in rows]
    for what in ("flops", "bytes"):
        values = [costs[g][what] if costs[g] else None for g in ("backprop", "autodiff")]
        lines.append(f"| XLA {what} | " + " | ".join("n/a" if v is None else f"{v:,.0f}"
                                                      for v in values) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = OneLineParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=8192)
    parser.add_argument("--recipe", default="bf16", choices=sorted(RECIPES))
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    info = machine_info()
    net = jaxbp.MLP((args.width,) * args.depth + (10,), "relu", **RECIPES[args.recipe])
    label = f"W{args.width} D{args.depth} B{args.batch} {args.recipe}"
    stem = f"step_hlo_{info['device_platform']}_{label.replace(' ', '_').lower()}"
    out = pathlib.Path(args.out)
    summaries, costs = {}, {}
    for grad in ("backprop", "autodiff"):
        compiled = compiled_step(net, grad, args.batch)
        text = compiled.as_text()
        files.write_text(out / f"{stem}_{grad}.txt", text)
        summaries[grad], costs[grad] = hlo_summary(text), xla_cost(compiled)
    table = markdown(label, summaries, costs, info)
    files.write_text(out / f"{stem}.md", table)
    print(table)
    print(f"wrote {out / stem}.md and the two HLO texts")


if __name__ == "__main__":
    main()
