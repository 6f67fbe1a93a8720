"""Each feedback rule's training step against backprop's, timed side by side in one process.

    python benchmarks/feedback_cost.py [--budget 3] [--batch 256] [--out benchmarks/results]

Nets 64-W-W-W-10 (relu, adam, softmax cross-entropy) for W in --widths, one batch of
--batch random inputs on the device. Every candidate is ``jaxbp.make_train_step`` with its
gradient source (compiled, donated), called in interleaved rounds
(``jaxbp.bench.harness.time_interleaved``); the ratio is the median of the per-round ratios to
backprop's step. Feedback alignment and sign symmetry do the same three matmuls per layer
as backprop (sign symmetry adds a sign per weight); DFA replaces the chain of input errors
by one (batch, n_out) x (n_out, W) product per hidden layer. Writes
feedback_cost_<platform>.json and .md under --out.
"""

from __future__ import annotations

import json
import pathlib
import statistics

import jax
import optax

import jaxbp
from jaxbp import feedback, files
from jaxbp.bench.harness import describe_machine, machine_info, time_interleaved
from jaxbp.cli.common import OneLineParser


def rule_sources(net: jaxbp.MLP) -> dict[str, object]:
    key = jax.random.key(1)
    return {"backprop": "backprop",
            "fa": feedback.alignment(feedback.random_feedback(net, key)),
            "dfa": feedback.direct(feedback.random_feedback(net, key, "direct")),
            "sign": feedback.sign_symmetry()}


def time_rules(width: int, batch: int, budget_s: float) -> dict[str, dict[str, float]]:
    net = jaxbp.MLP((64, width, width, width, 10), "relu")
    optimizer = optax.adam(1e-3)
    x = jax.random.normal(jax.random.key(2), (batch, 64))
    y = jax.random.randint(jax.random.key(3), (batch,), 0, 10)
    calls, states = {}, {}
    for name, source in rule_sources(net).items():
        step = jaxbp.make_train_step(net, optimizer, grad=source)
        states[name] = jaxbp.TrainState.create(net.init(jax.random.key(0)), optimizer)

        def call(name=name, step=step):
            states[name], metrics = step(states[name], x, y)
            return metrics

        calls[name] = call
    timed = time_interleaved(calls, budget_s=budget_s)
    base = timed["backprop"].rounds
    return {name: {"median_ms": t.median * 1e3,
                   "ratio": statistics.median(r / b for r, b in zip(t.rounds, base))}
            for name, t in timed.items()}


def main() -> None:
    parser = OneLineParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", default="256,1024")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--budget", type=float, default=3.0)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    rows = {}
    for width in (int(w) for w in args.widths.split(",")):
        rows[width] = time_rules(width, args.batch, args.budget)
        print(f"W={width}: " + ", ".join(f"{name} {r['median_ms']:.3f} ms ({r['ratio']:.3f}x)"
                                        for name, r in rows[width].items()))
    info = machine_info()
    platform = info["device_platform"]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files.write_text((out / f"feedback_cost_{platform}.json"), json.dumps(
        {"machine": info, "batch": args.batch, "rows": rows}, indent=1))
    names = list(next(iter(rows.values())))
    lines = ["# Feedback rules: training step time against backprop's", "",
             f"Machine: {describe_machine(info)}.", "",
             f"MLP 64-W-W-W-10 relu, adam, batch {args.batch}; `make_train_step(grad=...)` "
             f"per rule, interleaved rounds; ratio = median of per-round ratios to backprop.",
             "", "| W | " + " | ".join(f"{n} ms (ratio)" for n in names) + " |",
             "|---|" + "---|" * len(names)]
    for width, row in rows.items():
        lines.append(f"| {width} | " + " | ".join(
            f"{row[n]['median_ms']:.3f} ({row[n]['ratio']:.3f})" for n in names) + " |")
    files.write_text((out / f"feedback_cost_{platform}.md"), "\n".join(lines) + "\n")
    print(f"wrote {out}/feedback_cost_{platform}.md")


if __name__ == "__main__":
    main()
