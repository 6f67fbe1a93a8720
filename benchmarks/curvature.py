"""The cost of hvp and ggn_diag relative to one backprop step, timed side by side.

    python benchmarks/curvature.py [--budget 2] [--out benchmarks/results]

Net (W, W, W, 10) relu, softmax cross-entropy, float32; the three compiled programs
(value_and_backprop, hvp, ggn_diag) and jax's own jvp(grad) HVP run interleaved in
one process per case. Writes curvature_<platform>.md and .json.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

import jaxbp
from jaxbp import files
from jaxbp.bench.harness import compile_ahead, describe_machine, machine_info, time_interleaved
from jaxbp.cli.common import OneLineParser


def run_case(batch: int, width: int, budget: float) -> dict:
    net = jaxbp.MLP((width, width, width, 10), "relu")
    params = net.init(jax.random.key(0))
    v = net.init(jax.random.key(1))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, width)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=batch), jnp.int32)
    programs = {
        "backprop": lambda p, v, x, y: jaxbp.value_and_backprop(net, p, x, y),
        "hvp": lambda p, v, x, y: jaxbp.hvp(net, p, x, y, v),
        "ggn_diag": lambda p, v, x, y: jaxbp.ggn_diag(net, p, x, y),
        "jax_hvp": lambda p, v, x, y: jax.jvp(jax.grad(lambda q: net.cost(q, x, y)),
                                              (p,), (v,))[1],
    }
    calls = {}
    for name, fn in programs.items():
        compiled, _, _ = compile_ahead(fn, params, v, x, y)
        calls[name] = (lambda c: lambda: c(params, v, x, y))(compiled)
    timings = time_interleaved(calls, budget_s=budget)
    return {"batch": batch, "width": width,
            "time_s": {k: t.median for k, t in timings.items()}}


def main() -> None:
    parser = OneLineParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=2.0)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    info = machine_info()
    rows = []
    for batch, width in ((32, 256), (256, 256), (256, 1024), (1024, 512)):
        row = run_case(batch, width, args.budget)
        t = row["time_s"]
        rows.append(row)
        base = t["backprop"]
        print(f"B={batch} W={width}: hvp {t['hvp'] / base:.2f}x backprop, ggn_diag "
              f"{t['ggn_diag'] / base:.2f}x, jax jvp(grad) {t['jax_hvp'] / base:.2f}x",
              flush=True)
    lines = ["# Curvature cost relative to one backprop (gradient) evaluation", "",
             f"Machine: {describe_machine(info)}.", "",
             "Net (W, W, W, 10) relu, softmax cross-entropy, float32; medians of interleaved "
             "calls in one process. `jax jvp(grad)`: jax's forward-over-reverse HVP of the "
             "same cost, for comparison.", "",
             "| B | W | backprop ms | hvp / backprop | ggn_diag / backprop | "
             "jax jvp(grad) / backprop |", "|---|---|---|---|---|---|"]
    for row in rows:
        t = row["time_s"]
        lines.append(f"| {row['batch']} | {row['width']} | {t['backprop'] * 1e3:.3f} | "
                     f"{t['hvp'] / t['backprop']:.2f} | {t['ggn_diag'] / t['backprop']:.2f} | "
                     f"{t['jax_hvp'] / t['backprop']:.2f} |")
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"curvature_{info['device_platform']}"
    files.write_text(stem.with_suffix(".json"),
                     json.dumps({"machine": info, "rows": rows}, indent=1))
    files.write_text(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    print(f"wrote {stem}.md")


if __name__ == "__main__":
    main()
