"""A GPT's train step with attention's plain form (P kept) vs the blockwise form: memory and time.

    python benchmarks/attention_memory.py [--lengths 256,512,1024,2048] [--block 128]
                                          [--batch 32] [--budget 1] [--out benchmarks/results]

The README's GPT (vocab 65, d 128, 2 blocks, 4 heads; jaxbp.models.gpt) at each T:
the compiled peak of the donated adam train step (XLA's memory analysis: arguments +
outputs - donated aliases + temporaries) with ``SelfAttention(block=None)`` (the
plain form, keeping P: (batch, heads, T, T) per block) and with ``block=--block``
(keys a block at a time, each row's log-sum-exp kept), and the steps' times
interleaved in one process. The lengths after the first whose plain step took more
than --max-step-s are not timed (their memory is still compiled and reported). Writes
attention_memory_<platform>.json/.md.
"""

from __future__ import annotations

import json
import pathlib

import jax
import numpy as np
import optax

import jaxbp
from jaxbp import files
from jaxbp.bench.harness import compile_ahead, describe_machine, machine_info, time_interleaved
from jaxbp.check.suite import random_tokens
from jaxbp.cli.common import OneLineParser

VOCAB, DIM, DEPTH, HEADS = 65, 128, 2, 4


def measure(length: int, block: int, batch: int, budget: float, timed: bool) -> dict:
    optimizer = optax.adam(1e-3)
    x, y = random_tokens(np.random.default_rng(0), jaxbp.models.gpt(VOCAB, DIM, DEPTH, HEADS,
                                                                    length), batch, 0.0)
    row, calls = {"seq_len": length, "batch": batch, "block": block}, {}
    for name, attention_block in (("plain", None), ("blockwise", block)):
        net = jaxbp.models.gpt(VOCAB, DIM, DEPTH, HEADS, length, attention_block=attention_block)
        state = jaxbp.TrainState.create(net.init(jax.random.key(0)), optimizer)
        step = jaxbp.make_train_step(net, optimizer)
        compiled, _, memory = compile_ahead(step, state, x, y)
        row[f"{name}_peak_bytes"] = None if memory is None else memory.peak
        holder = {"state": state}

        def call(compiled=compiled, holder=holder):
            holder["state"], metrics = compiled(holder["state"], x, y)
            return metrics

        calls[name] = call
    if timed:
        times = time_interleaved(calls, budget_s=budget, min_rounds=3)
        row.update({f"{k}_ms": t.median * 1e3 for k, t in times.items()})
        row["blockwise_over_plain"] = float(np.median(
            [b / p for b, p in zip(times["blockwise"].rounds, times["plain"].rounds)]))
    return row


def markdown(rows: list[dict], info: dict, block: int) -> str:
    def mib(b):
        return "n/a" if b is None else f"{b / 2**20:,.0f}"

    lines = ["# Attention's plain form vs its blockwise form: a GPT's train step", "",
             f"Machine: {describe_machine(info)}.", "",
             f"GPT vocab {VOCAB}, d {DIM}, {DEPTH} blocks, {HEADS} heads, float32, adam; "
             f"blockwise: `SelfAttention(block={block})` (keys {block} at a time, P never "
             "formed, the scores computed twice). Memory: the compiled peak of the donated "
             "train step (XLA's memory analysis). Times: medians of interleaved calls "
             "(`python benchmarks/attention_memory.py`); '-' where the plain step was too "
             "slow to time here.", "",
             "| T | batch | plain MiB | blockwise MiB | plain / blockwise memory | plain ms | "
             "blockwise ms | blockwise / plain time |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        a, b = r["plain_peak_bytes"], r["blockwise_peak_bytes"]
        ratio = "n/a" if a is None or b is None else f"{a / b:.2f}"
        times = (f"{r['plain_ms']:.1f} | {r['blockwise_ms']:.1f} | "
                 f"{r['blockwise_over_plain']:.2f}") if "plain_ms" in r else "- | - | -"
        lines.append(f"| {r['seq_len']} | {r['batch']} | {mib(a)} | {mib(b)} | {ratio} | "
                     f"{times} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = OneLineParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="256,512,1024,2048")
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--budget", type=float, default=1.0)
    parser.add_argument("--max-step-s", type=float, default=3.0)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    info = machine_info()
    print(describe_machine(info))
    rows, timed = [], True
    for length in (int(n) for n in args.lengths.split(",")):
        row = measure(length, args.block, args.batch, args.budget, timed)
        rows.append(row)
        timed = timed and row.get("plain_ms", 0) / 1e3 < args.max_step_s
        print(json.dumps(row), flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"attention_memory_{info['device_platform']}"
    files.write_text(stem.with_suffix(".json"),
                     json.dumps({"machine": info, "rows": rows}, indent=1))
    files.write_text(stem.with_suffix(".md"), markdown(rows, info, args.block))
    print(f"wrote {stem}.md")


if __name__ == "__main__":
    main()
