"""Embedding backward: a scatter-add into the rows of the tokens seen, or a one-hot matmul.

    python benchmarks/embedding_backward.py [--budget 0.5] [--out benchmarks/results]

Both give the token table's gradient ``dE[v] = sum over (n, t) with x_{n,t} = v of
delta_{n,t}`` (asserted equal to float32 rounding before timing):

* ``scatter_add`` (what :class:`jaxbp.layers.Embedding` runs): ``zeros.at[tokens].add``,
  O(B T d) work;
* ``one_hot_matmul``: ``one_hot(tokens, V)^T @ delta``, a (V, B T) x (B T, d) product,
  O(B T V d) work that a matmul unit may still run faster for a small vocabulary.

Timed side by side (:func:`jaxbp.bench.harness.time_interleaved`) for the shipped text's 65
characters and GPT-2's 50257 tokens. Writes embedding_backward_<platform>.json/.md.
"""

from __future__ import annotations

import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from jaxbp import files
from jaxbp.bench.harness import describe_machine, machine_info, paired_ratio, time_interleaved
from jaxbp.cli.common import OneLineParser
from jaxbp.layers import Embedding

CPU_SHAPES = ((65, 128, 16, 64), (65, 256, 4, 128), (50257, 128, 8, 64))
ACCELERATOR_SHAPES = ((65, 128, 64, 256), (50257, 768, 8, 1024))
"""(vocab, dim, batch, T)."""


def scatter_add(tokens: jax.Array, delta: jax.Array, vocab: int) -> jax.Array:
    layer = Embedding(vocab, delta.shape[-1])
    table = jnp.zeros((vocab, delta.shape[-1]), delta.dtype)
    return layer.backward({"tokens": table}, tokens, delta)[1]["tokens"]


def one_hot_matmul(tokens: jax.Array, delta: jax.Array, vocab: int) -> jax.Array:
    rows = jax.nn.one_hot(tokens.reshape(-1), vocab, dtype=delta.dtype)   # (B T, V)
    return rows.T @ delta.reshape(-1, delta.shape[-1])


VARIANTS = {"scatter_add": scatter_add, "one_hot_matmul": one_hot_matmul}


def measure(vocab: int, dim: int, batch: int, steps: int, budget_s: float) -> dict:
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, vocab, (batch, steps)), jnp.int32)
    delta = jnp.asarray(rng.normal(size=(batch, steps, dim)), jnp.float32)
    compiled = {name: jax.jit(fn, static_argnums=2).lower(tokens, delta, vocab).compile()
                for name, fn in VARIANTS.items()}
    outs = {name: np.asarray(fn(tokens, delta)) for name, fn in compiled.items()}
    scale = np.max(np.abs(outs["scatter_add"]))
    if np.max(np.abs(outs["one_hot_matmul"] - outs["scatter_add"])) > 1e-5 * scale:
        raise AssertionError(f"the two differ at vocab {vocab}, dim {dim}")
    timings = time_interleaved({name: (lambda f=fn: f(tokens, delta))
                                for name, fn in compiled.items()}, budget_s=budget_s)
    return {"vocab": vocab, "dim": dim, "batch": batch, "T": steps,
            "ms": {name: t.median * 1e3 for name, t in timings.items()},
            "one_hot_over_scatter": paired_ratio(timings["one_hot_matmul"],
                                                 timings["scatter_add"])}


def main() -> None:
    parser = OneLineParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=0.5, help="seconds of timing per row")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    info = machine_info()
    platform = info["device_platform"]
    rows = []
    for shape in CPU_SHAPES if platform == "cpu" else ACCELERATOR_SHAPES:
        row = measure(*shape, args.budget)
        rows.append(row)
        print(f"V{row['vocab']} d{row['dim']} B{row['batch']} T{row['T']}: scatter_add "
              f"{row['ms']['scatter_add']:.3f} ms, one_hot_matmul "
              f"{row['ms']['one_hot_matmul']:.3f} ms (one-hot / scatter "
              f"{row['one_hot_over_scatter']:.2f})", flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files.write_text((out / f"embedding_backward_{platform}.json"),
        json.dumps({"machine": info, "rows": rows}, indent=1))
    lines = ["# Embedding backward: scatter-add vs one-hot matmul", "",
             f"Machine: {describe_machine(info)}.", "",
             "Median ms per call of the jitted token-table gradient from (tokens, errors); "
             "`one-hot / scatter`: the paired ratio (> 1: the scatter-add, which the layer "
             "runs, is faster). Results asserted equal first.", "",
             "| vocab | dim | batch | T | scatter_add ms | one_hot_matmul ms | one-hot / scatter |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['vocab']} | {r['dim']} | {r['batch']} | {r['T']} | "
              f"{r['ms']['scatter_add']:.3f} | {r['ms']['one_hot_matmul']:.3f} | "
              f"{r['one_hot_over_scatter']:.2f} |" for r in rows]
    files.write_text((out / f"embedding_backward_{platform}.md"), "\n".join(lines) + "\n")
    print(f"wrote {out}/embedding_backward_{platform}.md")


if __name__ == "__main__":
    main()
