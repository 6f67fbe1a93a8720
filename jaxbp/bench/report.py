"""The bench suite's report: a markdown table of the measured ratios, and a figure."""

from __future__ import annotations

import pathlib
from typing import Any

import numpy as np

from jaxbp import files
from jaxbp.bench.harness import describe_machine


def _recipes(result: dict[str, Any]) -> list[str]:
    """The numerical recipes of the rows, in their order of first appearance."""
    return list(dict.fromkeys(row["precision"] for row in result["rows"]))

def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value / scale, spec)


METHOD = (
    "One sgd training step, relu MLP (W, ..., W, 10) with `D` weight layers (CNN: "
    "`D` 3x3 SAME relu convs of `F` filters, Dense(10); GPT: `jaxbp.models.gpt` of "
    "width d, L blocks, H heads on T tokens (GPT-2's blocks; LLaMA-style: RMSNorm, "
    "rotary attention and a SwiGLU MLP), its FLOPs the model FLOPs 6N + 12LTd per "
    "token, so that `peak` is its MFU), in a numerical recipe named "
    "in the label: `float32`; `bf16-operands` (bf16 matmul operands, float32 "
    "activations, errors and master weights); `bf16` (activations and errors stored "
    "in bf16 too, weight gradients accumulated in float32 and rounded once to bf16: flax's "
    "`Dense(dtype=bfloat16)`). autodiff is jax.grad of the SAME recipe's forward. "
    "The label ends with the arithmetic the matmuls ran in (float32 is `tf32` on "
    "NVIDIA GPUs and one bf16 pass on TPUs at the default matmul precision). The "
    "timed program is the donated k-step `lax.scan` loop a user runs (on a CPU, for "
    "k <= 16, unrolled for both gradients: XLA:CPU runs jax.grad's backward convolutions "
    "inside a rolled loop with a naive emitter, jax-ml/jax#12868); `steps/sample`: "
    "train steps in one timed sample (k per call x calls per sample, the mean over "
    "samples; a sample repeats its calls until it holds at least `--min-sample-ms` of "
    "work), chosen so that device time dominates every sample. `manual/autodiff`: the "
    "median over rounds of "
    "the ratio of the back-to-back step times with `grad=\"backprop\"` and `grad=\"autodiff\"` "
    "(< 1: the hand-written step is faster). `GEMM fwd/err/wgrad`: the machine's "
    "measured rate for the widest layer's three matmul shapes (forward B x W x W, input "
    "error, weight gradient with the batch inner; for a CNN the widest conv's three "
    "convolutions, timed alone, and the first conv's forward and weight gradient at its "
    "own channels, each conv credited at its own shapes' rates) in the same recipe, the "
    "best of "
    "three loops (a chain of products, the chain unrolled, independent products "
    "unrolled) so that no loop overhead lowers it, measured half before and half after "
    "the step's timing and the faster kept (on a CPU, which widens bf16 operands, also "
    "with float32 operands, the faster kept), or the fastest any earlier case of the run "
    "measured of the same product, and measured again for 2x and 4x as long where the "
    "step ran faster than those rates allow (the loops had missed the machine's best); "
    "`roofline`: "
    "the time those rates need for the step's matmuls / the step's time. "
)
"""How the table was measured (the paragraph under the machine line)."""


def markdown(result: dict[str, Any]) -> str:
    """The results as a markdown table, with the machine and the method."""
    peaks = result["machine"].get("peaks")
    peak_note = (f"`peak`: achieved / the datasheet peak of {peaks['name']} for the arithmetic "
                 f"that ran ({peaks['source']}); `AI`: the step's arithmetic intensity, XLA "
                 f"FLOPs / XLA bytes, and in brackets over the device's balance point (peak / "
                 f"memory bandwidth): below 1 the step is memory-bound." if peaks else
                 "`peak`: n/a, this device kind has no datasheet entry in jaxbp.bench.peaks; the "
                 "measured GEMM rates are the roof. `AI`: the step's arithmetic intensity, "
                 "XLA FLOPs / XLA bytes (no balance point without a datasheet: n/a).")
    lines = [
        "# Training-step benchmark: hand-written backprop vs jax.grad",
        "",
        f"Machine: {describe_machine(result['machine'])}.",
        "",
        METHOD
        + peak_note + " `FLOPs XLA/hand`: XLA's cost-analysis FLOPs over the hand count of "
        "matmul FLOPs (the excess is elementwise work). `mem`: compiled peak of the "
        "donated single step (arguments + outputs - donated aliases + temporaries). n/a: "
        "the backend gave no figure.",
        "",
        "| case | steps/sample | manual ms | autodiff ms | manual/autodiff | GEMM fwd/err/wgrad "
        "GFLOP/s | achieved GFLOP/s | roofline | peak | FLOPs XLA/hand | AI (AI/balance) | "
        "mem MiB | compile s (manual/autodiff) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    warnings = []
    for row in result["rows"]:
        lines.append(_table_line(row))
        warnings += [f"{row['label']}: {w}" for w in row["warnings"]]
    if warnings:
        lines += ["", "Warnings (fractions above 1, and why they can occur):", ""]
        lines += [f"- {w}" for w in warnings]
    if result["left_out"]:
        lines += ["", "Left out: " + ", ".join(result["left_out"]) + "."]
    gpts = [r for r in result["rows"] if "tokens_per_s" in r["backprop"]]
    if gpts:
        lines += ["", "GPT rows, tokens/s (manual, autodiff) and MFU (manual): " + "; ".join(
            f"{r['label']}: {r['backprop']['tokens_per_s']:,.0f}, "
            f"{r['autodiff']['tokens_per_s']:,.0f}, "
            f"MFU {_fmt(r['backprop']['peak_fraction'], '.3f')}" for r in gpts) + "."]
    lines += _summary(result)
    return "\n".join(lines) + "\n"


def _table_line(row: dict[str, Any]) -> str:
    """One case's line of the table."""
    m, a = row["backprop"], row["autodiff"]
    rates = "/".join(f"{row['gemm_flops_per_s'][k] / 1e9:.0f}"
                     for k in ("forward", "input_error", "weight_grad"))
    xla = (None if m["xla_flops_per_step"] is None
           else m["xla_flops_per_step"] / row["matmul_flops_per_step"])
    intensity = m["arithmetic_intensity"]
    balance = (None if intensity is None or not row["balance_point"]
               else intensity / row["balance_point"])
    mem = None if m["memory_bytes"] is None else m["memory_bytes"]["peak"]
    flag = " (!)" if row["warnings"] else ""
    return (f"| {row['label']} | {m['steps_per_sample']} | {m['step_s'] * 1e3:.3f} | "
            f"{a['step_s'] * 1e3:.3f} | {row['manual_over_autodiff']:.3f} | {rates} | "
            f"{m['achieved_flops_per_s'] / 1e9:.1f} | {m['roofline_fraction']:.2f}{flag} | "
            f"{_fmt(m['peak_fraction'], '.2f')} | {_fmt(xla, '.3f')} | "
            f"{_fmt(intensity, '.1f')} ({_fmt(balance, '.2f')}) | "
            f"{_fmt(mem, '.1f', 2**20)} | {m['compile_s']:.2f}/{a['compile_s']:.2f} |")


def _summary(result: dict[str, Any]) -> list[str]:
    """The median, worst and best manual/autodiff ratio, overall and per recipe."""
    if not result["rows"]:
        return []
    ratios = [r["manual_over_autodiff"] for r in result["rows"]]
    lines = ["", f"manual/autodiff: median {np.median(ratios):.3f}, worst "
                 f"{max(ratios):.3f}, best {min(ratios):.3f} over {len(ratios)} cases."]
    for recipe in _recipes(result):
        mine = [r["manual_over_autodiff"] for r in result["rows"] if r["precision"] == recipe]
        lines.append(f"- {recipe}: median {np.median(mine):.3f}, worst "
                     f"{max(mine):.3f} over {len(mine)} cases (autodiff: jax.grad "
                     f"of the same recipe).")
    return lines


def plot(result: dict[str, Any], path: pathlib.Path) -> bool:
    """manual/autodiff and roofline fraction against the step's matmul FLOPs (PNG).

    Returns False (nothing written) without matplotlib or without rows.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = result["rows"]
    if not rows:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    groups = [(p, lambda r, p=p: r["precision"] == p and "side" not in r) for p in _recipes(result)]
    groups.append(("CNN (every recipe)", lambda r: "side" in r))
    for (precision, keep), marker in zip(groups, ("o", "s", "^", "D")):
        chosen = [r for r in rows if keep(r)]
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
    fig.suptitle(describe_machine(result["machine"]), fontsize=7)
    fig.tight_layout()
    files.save_figure(fig, path)
    return True
