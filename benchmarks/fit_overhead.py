"""The cost of `fit`'s epoch loop over the bare compiled training loop, per step.

    python benchmarks/fit_overhead.py [--rounds 5] [--epochs 6] [--sizes 64,512,512,10]

The net (default 64-512-512-10, relu, adam 1e-3) trains on the shipped digits at batch
128 (11 steps per epoch). Each round runs ``fit`` for ``--epochs`` epochs (progress off,
per-epoch evaluation on the test set included) and takes its median seconds per epoch
over epochs 2.. (epoch 1 compiles), then times the same epoch's 11 steps as one call of
``make_train_loop`` (compiled ahead, donated, one batch per step, data on the device).
The ratio fit/loop per step is taken per round, back to back, and its median reported.
Writes fit_overhead_<platform>.json and .md under --out.
"""

from __future__ import annotations

import json
import pathlib
import statistics

import jax
import optax

import jaxbp
from jaxbp import files
from jaxbp.bench.harness import describe_machine, machine_info, time_interleaved
from jaxbp.cli.common import OneLineParser
from jaxbp.data import epoch_order


def main() -> None:
    parser = OneLineParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--sizes", default="64,512,512,10")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    digits = jaxbp.data.load_digits()
    net = jaxbp.MLP(tuple(int(s) for s in args.sizes.split(",")), "relu")
    optimizer = optax.adam(1e-3)
    key = jax.random.key(0)
    full, _ = epoch_order(len(digits.x_train), args.batch, key, drop_last=True)
    steps = len(full)
    xs, ys = jax.device_put((digits.x_train[full], digits.y_train[full]))
    loop = jaxbp.make_train_loop(net, optimizer, steps=steps)
    holder = {"state": jaxbp.TrainState.create(net.init(key), optimizer)}

    def call():
        holder["state"], metrics = loop(holder["state"], xs, ys)
        return metrics

    x_test, y_test = jax.device_put((digits.x_test, digits.y_test))

    def evaluation():
        return jaxbp.evaluate(net, holder["state"].params, x_test, y_test)["loss"]

    rounds = []
    for _ in range(args.rounds):
        result = jaxbp.fit(net, optimizer, digits, epochs=args.epochs, batch_size=args.batch,
                           key=key, progress=False)
        fit_step = statistics.median(result.history["seconds"][1:]) / steps
        timed = time_interleaved({"loop": call, "evaluate": evaluation}, budget_s=0.5)
        loop_step = timed["loop"].median / steps
        eval_step = timed["evaluate"].median / steps  # the epoch's evaluation, per step
        rounds.append({"fit_step_s": fit_step, "loop_step_s": loop_step,
                       "ratio": fit_step / loop_step, "evaluate_step_s": eval_step,
                       "ratio_with_evaluate": fit_step / (loop_step + eval_step)})
        print(f"fit {fit_step * 1e3:.3f} ms/step, make_train_loop {loop_step * 1e3:.3f} "
              f"ms/step, ratio {fit_step / loop_step:.3f}; evaluate alone {eval_step * 1e3:.3f} "
              f"ms/step, fit / (loop + evaluate) {fit_step / (loop_step + eval_step):.3f}")
    ratio = statistics.median(r["ratio"] for r in rounds)
    bare = statistics.median(r["ratio_with_evaluate"] for r in rounds)
    info = machine_info()
    report = {"machine": info, "sizes": net.sizes, "batch": args.batch,
              "steps_per_epoch": steps, "rounds": rounds, "median_ratio": ratio,
              "median_ratio_with_evaluate": bare}
    platform = info["device_platform"]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files.write_text((out / f"fit_overhead_{platform}.json"), json.dumps(report, indent=1))
    lines = ["# fit's epoch loop vs the bare compiled loop", "",
             f"Machine: {describe_machine(info)}.", "",
             f"Net {'-'.join(map(str, net.sizes))} relu, adam, digits, batch {args.batch} "
             f"({steps} steps per epoch). fit: median seconds per epoch over epochs 2-"
             f"{args.epochs} (per-epoch test evaluation included) / {steps}; loop: "
             f"`make_train_loop(steps={steps})` on the same batches, data on the device; "
             f"evaluate: `jaxbp.evaluate` of the {len(digits.x_test)} test samples (the "
             f"epoch's evaluation) / {steps}, timed beside the loop.", "",
             "| round | fit ms/step | loop ms/step | fit/loop | evaluate ms/step | "
             "fit/(loop+evaluate) |", "|---|---|---|---|---|---|"]
    lines += [f"| {i + 1} | {r['fit_step_s'] * 1e3:.3f} | {r['loop_step_s'] * 1e3:.3f} | "
              f"{r['ratio']:.3f} | {r['evaluate_step_s'] * 1e3:.3f} | "
              f"{r['ratio_with_evaluate']:.3f} |" for i, r in enumerate(rounds)]
    lines += ["", f"Median fit/loop: {ratio:.3f} (goal <= 1.15); fit over the loop plus the "
                  f"evaluation it runs: {bare:.3f}."]
    files.write_text((out / f"fit_overhead_{platform}.md"), "\n".join(lines) + "\n")
    print(f"median fit/loop {ratio:.3f}, fit/(loop+evaluate) {bare:.3f}; "
          f"wrote {out}/fit_overhead_{platform}.md")


if __name__ == "__main__":
    main()
