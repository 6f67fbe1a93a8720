"""Per-example norms, clipping and the DP step of a GPT vs jax.vmap(jax.grad), B and T varied.

    python benchmarks/per_example_gpt.py [--cases 16x32,16x128,64x128] [--budget 2]
                                         [--out benchmarks/results]
    python benchmarks/per_example_gpt.py --gpt2-small [--cases 8x1024] [--budget 2]

A character-level GPT (vocab 65, dim 64, 2 blocks, 4 heads; jaxbp.models.gpt) in float32,
one case per ``BxT`` (batch x sequence length; the position table is T long). A sample is
one sequence, its loss the mean over its T tokens. The programs and their timing are
those of benchmarks/per_example_networks.py (compiled ahead, interleaved in one process):
norms (jaxbp.per_example_grad_norms) against vmap_norms (jax.vmap(jax.grad) of one
sequence's cost, then norms), clipped (jaxbp.clipped_grad) against vmap_clipped and
against a plain hand-written backprop of the batch, the DP-SGD step of a padded Poisson
batch, and the compiled peaks. Goals (issue 27, on a CPU): norms >= 10x faster than
vmap(grad) at T = 128, the clipped step <= 1.25x a plain one, its compiled peak <= 1.3x.
Writes per_example_gpt_<platform>.json/.md.

``--gpt2-small`` (for a GPU/TPU): a GPT-2-small-shaped model (vocab 50257, d 768, 12
blocks, 12 heads, float32 params at the default matmul precision) at each ``BxT`` (default
8x1024), the clipped step against a plain hand-written step only (no vmap(grad), no DP
step: its padded Poisson batch holds several times B sequences), with tokens/s and
compiled peaks; writes clipped_gpt2_small_<platform>.json/.md.
"""

from __future__ import annotations

import numpy as np
from per_example_networks import run_case, write_tables

import jaxbp
from jaxbp.bench.harness import describe_machine, machine_info
from jaxbp.check.suite import random_tokens
from jaxbp.cli.common import OneLineParser

VOCAB, DIM, DEPTH, HEADS = 65, 64, 2, 4
GPT2_SMALL = {"vocab": 50257, "dim": 768, "depth": 12, "heads": 12}


def peak_ratio(row: dict) -> str:
    """The clipped step's compiled peak over the plain step's."""
    a, b = row["peak_bytes"]["clipped"], row["peak_bytes"]["backprop"]
    return "n/a" if a is None or b is None else f"{a / b:.2f}"


def markdown(rows: list[dict], info: dict) -> str:
    lines = ["# Per-example quantities of a GPT: jaxbp vs jax.vmap(jax.grad)", "",
             f"Machine: {describe_machine(info)}.", "",
             f"GPT vocab {VOCAB}, dim {DIM}, {DEPTH} blocks, {HEADS} heads, float32; a sample "
             "is one sequence, its loss the mean over its T tokens. Ratios are medians of "
             "per-round ratios of interleaved calls (`python benchmarks/per_example_gpt.py`); "
             "memory is XLA's compiled peak. errors: the forward pass and every layer's "
             "per-sample error (no weight gradient), the floor of any norm from backprop's "
             "errors. dp: DP-SGD of a padded Poisson batch (jaxbp.sources.dp_sgd); dp, B/4 at a "
             "time: the same with microbatch=B/4 (only the real rows run: jaxbp.microbatch). "
             "Goals: "
             "norms >= 10x vmap(grad) at T = 128, clipped / backprop <= 1.25, its peak <= 1.3.",
             "", "| B | T | params | norms ms | vmap norms ms | norms speed-up | errors ms | "
             "clipped ms | vmap clipped ms | clipped speed-up | backprop ms | "
             "clipped / backprop | clipped peak / backprop peak | dp / backprop | "
             "dp, B/4 at a time / backprop |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = r["ms"]
        lines.append(
            f"| {r['batch']} | {r['seq_len']} | {r['params']:,} | {ms['norms']:.2f} | "
            f"{ms['vmap_norms']:.2f} | {r['norms_speedup']:.1f}x | {ms['errors']:.2f} | "
            f"{ms['clipped']:.2f} | {ms['vmap_clipped']:.2f} | {r['clipped_speedup']:.1f}x | "
            f"{ms['backprop']:.2f} | {r['clipped_over_backprop']:.2f} | "
            f"{peak_ratio(r)} | {r['dp_over_backprop']:.2f} | "
            f"{r['dp_micro_over_backprop']:.2f} |")
    return "\n".join(lines) + "\n"


def gpt2_small_markdown(rows: list[dict], info: dict) -> str:
    lines = ["# The clipped step of a GPT-2-small-shaped model vs a plain step", "",
             f"Machine: {describe_machine(info)}.", "",
             "vocab 50257, d 768, 12 blocks, 12 heads (jaxbp.models.gpt), float32 params at "
             "the default matmul precision; a sample is one sequence. clipped: "
             "jaxbp.clipped_grad (one backward pass, per-sample norms and the clipped sum); "
             "backprop: the plain hand-written gradient of the batch. Ratios are medians of "
             "per-round ratios of interleaved calls (`python benchmarks/per_example_gpt.py "
             "--gpt2-small`); memory is XLA's compiled peak. Goals (issue 27): clipped / "
             "backprop <= 1.25, its peak <= 1.3.", "",
             "| B | T | params | backprop ms | clipped ms | backprop tokens/s | "
             "clipped tokens/s | clipped / backprop | clipped peak / backprop peak |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms, tokens = r["ms"], r["batch"] * r["seq_len"]
        lines.append(
            f"| {r['batch']} | {r['seq_len']} | {r['params']:,} | {ms['backprop']:.2f} | "
            f"{ms['clipped']:.2f} | {tokens / ms['backprop'] * 1e3:,.0f} | "
            f"{tokens / ms['clipped'] * 1e3:,.0f} | {r['clipped_over_backprop']:.2f} | "
            f"{peak_ratio(r)} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = OneLineParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default=None,
                        help="BxT,... (default 16x32,16x128,64x128; 8x1024 with --gpt2-small)")
    parser.add_argument("--budget", type=float, default=2.0)
    parser.add_argument("--gpt2-small", action="store_true",
                        help="a GPT-2-small-shaped model, clipped and DP vs plain steps only")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    info = machine_info()
    print(describe_machine(info))
    if args.gpt2_small:
        gpt2_small(args.cases or "8x1024", args.budget, args.out, info)
        return
    rows = []
    for case in (args.cases or "16x32,16x128,64x128").split(","):
        batch, steps = (int(n) for n in case.split("x"))
        net = jaxbp.models.gpt(VOCAB, DIM, DEPTH, HEADS, steps)
        inputs = random_tokens(np.random.default_rng(0), net, batch, ignored=0.0)
        row = {**run_case(f"gpt {case}", net, batch, args.budget, inputs), "seq_len": steps}
        rows.append(row)
        print(f"B {batch} T {steps}: norms {row['norms_speedup']:.1f}x faster than vmap, "
              f"clipped {row['clipped_speedup']:.1f}x; clipped/backprop "
              f"{row['clipped_over_backprop']:.2f} (peak {peak_ratio(row)}x), dp/backprop "
              f"{row['dp_over_backprop']:.2f} (B/4 at a time "
              f"{row['dp_micro_over_backprop']:.2f})", flush=True)
    write_tables(args.out, "per_example_gpt", info, rows, markdown(rows, info))


def gpt2_small(cases: str, budget: float, out: str, info: dict) -> None:
    rows = []
    for case in cases.split(","):
        batch, steps = (int(n) for n in case.split("x"))
        net = jaxbp.models.gpt(**GPT2_SMALL, seq_len=steps)
        inputs = random_tokens(np.random.default_rng(0), net, batch, ignored=0.0)
        row = {**run_case(f"gpt2-small {case}", net, batch, budget, inputs, with_vmap=False),
               "seq_len": steps}
        rows.append(row)
        print(f"B {batch} T {steps}: clipped/backprop {row['clipped_over_backprop']:.2f} "
              f"(peak {peak_ratio(row)}x); "
              f"backprop {row['ms']['backprop']:.1f} ms, clipped {row['ms']['clipped']:.1f} ms",
              flush=True)
    write_tables(out, "clipped_gpt2_small", info, rows, gpt2_small_markdown(rows, info))


if __name__ == "__main__":
    main()
