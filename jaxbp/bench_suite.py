"""The training-step benchmark: manual vs autodiff vs the machine's GEMM rate, per case.

Each case is an MLP ``(W, ..., W, 10)`` with ``depth`` weight layers, batch B,
a loss and a precision (``float32``, or ``bf16-mixed``: float32 master weights,
bfloat16 matmul operands with float32 accumulation). For each case:

* the k-step ``lax.scan`` train loop (sgd) with ``grad="backprop"`` and with
  ``grad="autodiff"`` is compiled (compile time and XLA's memory and cost
  analysis recorded), then both are timed interleaved in one process;
* the matmul FLOPs of one step are counted by hand
  (:func:`jaxbp.bench.step_matmul_flops`) and set against XLA's count;
* the machine's own GEMM rate is measured for the step's largest matmul
  shape in the same precision, and the step's achieved FLOP/s is reported as
  a fraction of it (the roofline fraction), with the step's arithmetic
  intensity (XLA FLOPs / XLA bytes).
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbp.bench import (
    compile_ahead,
    describe_machine,
    gemm_rate,
    machine_info,
    paired_ratio,
    step_matmul_flops,
    time_interleaved,
    xla_cost,
)
from jaxbp.mlp import MLP
from jaxbp.train import TrainState, make_train_loop, make_train_step

PRECISIONS = ("float32", "bf16-mixed")
LOSSES = ("softmax_cross_entropy", "squared_error")


@dataclasses.dataclass(frozen=True)
class BenchCase:
    """One benchmark case; ``depth`` counts weight layers."""

    width: int
    depth: int
    batch: int
    loss: str = "softmax_cross_entropy"
    precision: str = "float32"
    n_out: int = 10

    @property
    def sizes(self) -> tuple[int, ...]:
        return (self.width,) * self.depth + (self.n_out,)

    def net(self) -> MLP:
        compute = "bfloat16" if self.precision == "bf16-mixed" else None
        return MLP(self.sizes, "relu", "identity", self.loss, "float32", compute)

    @property
    def gflop(self) -> float:
        """Matmul GFLOP of one training step."""
        return step_matmul_flops(self.sizes, self.batch)["total"] / 1e9

    def label(self) -> str:
        loss = "CE" if self.loss == "softmax_cross_entropy" else "SE"
        return f"W{self.width} D{self.depth} B{self.batch} {loss} {self.precision}"


def _grid(widths: Iterable[int], depths: Iterable[int], batches: Iterable[int]) -> list[BenchCase]:
    return [BenchCase(w, d, b, loss, precision)
            for precision in PRECISIONS for loss in LOSSES
            for w in widths for d in depths for b in batches]


QUICK = [c for c in _grid((64, 512), (2, 4), (32, 512))
         if not (c.loss == "squared_error" and c.depth == 4)]
"""The ``--quick`` preset: 24 small cases, under 2 minutes on 2 CPU cores."""

FULL = _grid((64, 256, 1024, 4096), (2, 4, 8), (32, 256, 4096))
"""Widths 64..4096, depths 2..8, batch 32..4096, both losses and precisions (144 cases);
``max_gflop`` leaves out what a small machine cannot run in reasonable time."""


def _data(case: BenchCase) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(case.batch, case.width)), jnp.float32)
    if case.loss == "softmax_cross_entropy":
        return x, jnp.asarray(rng.integers(0, case.n_out, size=case.batch), jnp.int32)
    return x, jnp.asarray(rng.normal(size=(case.batch, case.n_out)), jnp.float32)


def benchmark_case(case: BenchCase, steps: int = 10, budget_s: float = 1.0) -> dict[str, Any]:
    """Time, count and place one case (see the module docstring). Returns a JSON-able row."""
    net = case.net()
    params = net.init(jax.random.key(0))
    x, y = _data(case)
    optimizer = optax.sgd(1e-4)
    compiled, compile_s, memory, cost, states = {}, {}, {}, {}, {}
    for grad in ("backprop", "autodiff"):
        loop = make_train_loop(net, optimizer, steps=steps, grad=grad)
        states[grad] = TrainState.create(jax.tree.map(jnp.copy, params), optimizer)
        compiled[grad], compile_s[grad], _ = compile_ahead(
            lambda s, x, y, loop=loop: loop(s, x, y), states[grad], x, y)
        # XLA's cost analysis counts a while-loop body once, so cost and memory are
        # read off the single-step program.
        one_step = make_train_step(net, optimizer, grad=grad, donate=False)
        single, _, mem = compile_ahead(lambda s, x, y, f=one_step: f(s, x, y),
                                       states[grad], x, y)
        memory[grad] = dataclasses.asdict(mem)
        cost[grad] = xla_cost(single)

    def call(grad: str):
        def run():
            states[grad], metrics = compiled[grad](states[grad], x, y)
            return metrics
        return run

    timings = time_interleaved({g: call(g) for g in compiled}, budget_s=budget_s,
                               compile_s=compile_s)
    flops = step_matmul_flops(case.sizes, case.batch)
    width = max(case.sizes[:-1])
    gemm = gemm_rate(case.batch, width, width, "float32",
                     "bfloat16" if case.precision == "bf16-mixed" else None,
                     budget_s=budget_s / 2)
    row: dict[str, Any] = {**dataclasses.asdict(case), "label": case.label(),
                           "steps_per_call": steps, "matmul_flops_per_step": flops["total"],
                           "gemm_flops_per_s": gemm}
    for grad, timing in timings.items():
        per_step = timing.median / steps
        xla_flops = cost[grad]["flops"]
        row[grad] = {
            "step_s": per_step,
            "step_iqr_s": [timing.p25 / steps, timing.p75 / steps],
            "compile_s": compile_s[grad],
            "xla_flops_per_step": xla_flops,
            "xla_bytes_per_step": cost[grad]["bytes"],
            "arithmetic_intensity": cost[grad]["flops"] / cost[grad]["bytes"],
            "achieved_flops_per_s": flops["total"] / per_step,
            "roofline_fraction": flops["total"] / per_step / gemm,
            "memory_bytes": memory[grad],
        }
    row["manual_over_autodiff"] = paired_ratio(timings["backprop"], timings["autodiff"])
    return row


def run_suite(cases: list[BenchCase], out_dir: str | pathlib.Path, name: str,
              steps: int = 10, budget_s: float = 1.0, max_gflop: float | None = None,
              log: Any = print) -> dict[str, Any]:
    """Benchmark ``cases`` and write ``<name>.json``, ``<name>.md`` and ``<name>.png``.

    Cases above ``max_gflop`` matmul GFLOP per step are listed as left out.
    """
    info = machine_info()
    log(f"jaxbp bench: {len(cases)} cases on {describe_machine(info)}")
    rows, left_out = [], []
    for case in cases:
        if max_gflop is not None and case.gflop > max_gflop:
            left_out.append(case.label())
            continue
        row = benchmark_case(case, steps=steps, budget_s=budget_s)
        rows.append(row)
        log(f"{case.label():<32} manual/autodiff {row['manual_over_autodiff']:.3f}  "
            f"roofline {row['backprop']['roofline_fraction']:.2f}  "
            f"step {row['backprop']['step_s'] * 1e3:.3f} ms")
    result = {"machine": info, "rows": rows, "left_out": left_out, "max_gflop": max_gflop}
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{name}.md").write_text(markdown(result))
    plot(result, out / f"{name}.png")
    if rows:
        worst = max(rows, key=lambda r: r["manual_over_autodiff"])
        best = max(rows, key=lambda r: r["backprop"]["roofline_fraction"])
        log(f"worst manual/autodiff {worst['manual_over_autodiff']:.3f} ({worst['label']}); "
            f"best roofline fraction {best['backprop']['roofline_fraction']:.2f} "
            f"({best['label']})")
    log(f"wrote {out / name}.json, .md, .png")
    return result


def markdown(result: dict[str, Any]) -> str:
    """The results as a markdown table, with the machine and the method."""
    lines = [
        "# Training-step benchmark: hand-written backprop vs jax.grad",
        "",
        f"Machine: {describe_machine(result['machine'])}.",
        "",
        "One sgd training step (k steps in one `lax.scan`, per-step times), relu MLP "
        "(W, ..., W, 10) with `D` weight layers. `manual/autodiff`: median step time with "
        "`grad=\"backprop\"` over `grad=\"autodiff\"`, timed interleaved in one process "
        "(< 1: the hand-written step is faster), the median over rounds of the two "
        "back-to-back times' ratio, so a slow spell of this shared machine cancels. "
        "`GEMM`: the machine's measured rate for the "
        "step's largest matmul (B x W x W) in the same precision; `roofline`: achieved "
        "matmul FLOP/s of the manual step / GEMM. `FLOPs XLA/hand`: XLA's cost-analysis "
        "FLOPs over the hand count of matmul FLOPs (the excess is elementwise work). "
        "`AI`: arithmetic intensity, XLA FLOPs / XLA bytes. `mem`: compiled peak "
        "(arguments + outputs + temporaries) of one step.",
        "",
        "| case | manual ms | autodiff ms | manual/autodiff | GEMM GFLOP/s | achieved "
        "GFLOP/s | roofline | FLOPs XLA/hand | AI | mem MiB | compile s (manual/autodiff) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        m, a = row["backprop"], row["autodiff"]
        lines.append(
            f"| {row['label']} | {m['step_s'] * 1e3:.3f} | {a['step_s'] * 1e3:.3f} | "
            f"{row['manual_over_autodiff']:.3f} | {row['gemm_flops_per_s'] / 1e9:.1f} | "
            f"{m['achieved_flops_per_s'] / 1e9:.1f} | {m['roofline_fraction']:.2f} | "
            f"{m['xla_flops_per_step'] / row['matmul_flops_per_step']:.3f} | "
            f"{m['arithmetic_intensity']:.1f} | "
            f"{sum(m['memory_bytes'].values()) / 2**20:.1f} | "
            f"{m['compile_s']:.2f}/{a['compile_s']:.2f} |")
    if result["left_out"]:
        lines += ["", f"Left out (over {result['max_gflop']} matmul GFLOP per step): "
                      + ", ".join(result["left_out"]) + "."]
    if result["rows"]:
        ratios = [r["manual_over_autodiff"] for r in result["rows"]]
        lines += ["", f"manual/autodiff: median {np.median(ratios):.3f}, worst "
                      f"{max(ratios):.3f}, best {min(ratios):.3f} over {len(ratios)} cases."]
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: pathlib.Path) -> None:
    """manual/autodiff and roofline fraction against the step's matmul FLOPs (PNG)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    rows = result["rows"]
    if not rows:
        return
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for precision, marker in zip(PRECISIONS, ("o", "s")):
        chosen = [r for r in rows if r["precision"] == precision]
        flops = [r["matmul_flops_per_step"] for r in chosen]
        axes[0].scatter(flops, [r["manual_over_autodiff"] for r in chosen], marker=marker,
                        label=precision)
        axes[1].scatter(flops, [r["backprop"]["roofline_fraction"] for r in chosen],
                        marker=marker, label=precision)
    axes[0].axhline(1.0, color="gray", lw=1)
    axes[0].set(xscale="log", xlabel="matmul FLOPs per step", ylabel="manual / autodiff time",
                title="hand-written step vs jax.grad step")
    axes[1].set(xscale="log", xlabel="matmul FLOPs per step",
                ylabel="achieved / measured GEMM FLOP/s", title="roofline fraction (manual)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(describe_machine(result["machine"]), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
