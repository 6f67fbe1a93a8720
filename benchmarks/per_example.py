"""Per-example norms and clipped gradients from the deltas vs jax.vmap(jax.grad), side by side.

    python benchmarks/per_example.py [--batches 32,128,512,1024] [--widths 256,512,1024,2048]
                                     [--budget 1.0] [--out benchmarks/results]

For each (batch B, width W), net (W, W, W, 10) relu with softmax cross-entropy,
float32, five programs are compiled and then timed interleaved in one process:

  backprop       the plain hand-written gradient (value_and_backprop): the baseline
  norms          jaxbp.per_example_grad_norms: ||g_i|| from the deltas
  vmap_norms     jax.vmap(jax.grad(per-sample loss)) then the norms
  clipped        jaxbp.clipped_grad: the clipped mean in one backward pass
  vmap_clipped   jax.vmap(jax.grad(...)), clip each g_i, mean (the usual JAX way)
  dp             jaxbp.sources.dp_sgd: the DP-SGD gradient of a Poisson batch of
                 expected size B from N = 60000 examples, padded with a mask to
                 max_batch_size(N, B/N) rows (B real rows here), clipped, noised

Memory is XLA's compiled peak (arguments + outputs + temporaries). A vmap
program whose compiled peak exceeds --max-gb is not run (marked so).
Writes per_example_<platform>.json and .md under --out.
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

POISSON_N = 60_000
"""The data set size the dp column's Poisson batches are drawn from (q = B / N)."""


def dp_candidate(net: jaxbp.MLP, clip: float, batch: int, microbatch: int | None = None):
    """The DP-SGD gradient of a padded Poisson batch: the B given rows real, the rest pad
    (with ``microbatch``: only the real rows run, that many at a time)."""
    from jaxbp import privacy, sources

    padded = privacy.max_batch_size(POISSON_N, batch / POISSON_N)
    source = sources.dp_sgd(clip, 1.0, jax.random.key(1), expected_batch_size=batch,
                            microbatch=microbatch)

    def dp(params, x, y):
        rows = jnp.arange(padded) % batch          # the B rows, then copies as padding
        x_pad, y_pad = x[rows], y[rows]
        return source(net, params, x_pad, y_pad, 0, mask=jnp.arange(padded) < batch)[1]

    return dp, padded


def candidates(net: jaxbp.MLP, clip: float):
    def sample_loss(params, x_i, y_i):
        out = jaxbp.network.forward(net.network, params, x_i[None])[0]
        return net.loss_fn.sample_loss(out, y_i[None])[0]

    vmap_grad = jax.vmap(jax.grad(sample_loss), in_axes=(None, 0, 0))

    def vmap_norms(params, x, y):
        grads = vmap_grad(params, x, y)
        return jnp.sqrt(sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1)
                            for g in jax.tree.leaves(grads)))

    def vmap_clipped(params, x, y):
        grads = vmap_grad(params, x, y)
        norms = jnp.sqrt(sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1)
                             for g in jax.tree.leaves(grads)))
        factor = jnp.minimum(1.0, clip / jnp.maximum(norms, 1e-30))
        return jax.tree.map(lambda g: jnp.tensordot(factor, g, axes=1) / g.shape[0], grads)

    return {
        "backprop": lambda p, x, y: jaxbp.value_and_backprop(net, p, x, y),
        "norms": lambda p, x, y: jaxbp.per_example_grad_norms(net, p, x, y),
        "vmap_norms": vmap_norms,
        "clipped": lambda p, x, y: jaxbp.clipped_grad(net, p, x, y, clip),
        "vmap_clipped": vmap_clipped,
    }


def run_case(batch: int, width: int, budget: float, max_bytes: float) -> dict:
    net = jaxbp.MLP((width, width, width, 10), "relu")
    params = net.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(batch, width)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 10, size=batch), jnp.int32)
    calls, compile_s, memory, skipped = {}, {}, {}, []
    dp, padded = dp_candidate(net, 1.0, batch)
    for name, fn in {**candidates(net, clip=1.0), "dp": dp}.items():
        compiled, seconds, mem = compile_ahead(fn, params, x, y)
        # memory_analysis can be unavailable on some backends: then no figure, no skip
        compile_s[name], memory[name] = seconds, None if mem is None else mem.peak
        if mem is not None and mem.peak > max_bytes:
            skipped.append(name)
            continue
        calls[name] = (lambda c: lambda: c(params, x, y))(compiled)
    # Two interleaved groups: jaxbp against vmap (speed-ups), and clipping against the
    # plain gradient (overhead) on their own, so the slow vmap rounds do not dilute them.
    versus_vmap = time_interleaved(
        {k: v for k, v in calls.items() if k not in ("backprop", "dp")}, budget_s=budget,
        compile_s=compile_s)
    overhead = time_interleaved(
        {k: calls[k] for k in ("backprop", "clipped", "norms", "dp")}, budget_s=budget,
        compile_s=compile_s)
    n_params = sum(p.size for p in jax.tree.leaves(params))
    return {"batch": batch, "width": width, "params": int(n_params), "dp_padded": padded,
            "time_s": {k: t.median for k, t in versus_vmap.items()},
            "iqr_s": {k: [t.p25, t.p75] for k, t in versus_vmap.items()},
            "overhead_time_s": {k: t.median for k, t in overhead.items()},
            "overhead_iqr_s": {k: [t.p25, t.p75] for k, t in overhead.items()},
            "compile_s": compile_s, "peak_bytes": memory, "not_run": skipped}


def ratio(row: dict, slow: str, fast: str, kind: str = "time_s") -> float:
    table = row[kind]
    if table.get(slow) is None or table.get(fast) is None:  # not run, or not measured
        return float("nan")
    return table[slow] / table[fast]


def times(value: float, digits: int = 1) -> str:
    """``12.3x``, or ``n/a`` where the slower program was not run."""
    return "n/a" if np.isnan(value) else f"{value:.{digits}f}x"


def markdown(rows: list[dict], info: dict) -> str:
    lines = [
        "# Per-example gradients: jaxbp (from the deltas) vs jax.vmap(jax.grad)",
        "",
        f"Machine: {describe_machine(info)}.",
        "",
        "Net (W, W, W, 10), relu, softmax cross-entropy, float32. Times are medians of",
        "interleaved calls in one process (two groups: the four per-example programs",
        "together; backprop, clipped and norms together); memory is XLA's compiled peak",
        "(arguments + outputs + temporaries). Speed-up: vmap time / jaxbp time; memory",
        "ratio: vmap peak / jaxbp peak; `clipped / backprop`: the cost of clipping relative",
        "to a plain hand-written gradient of the same batch. \"not run\": the vmap program's",
        "compiled peak exceeds the memory limit (its per-example gradients alone need",
        "B x P x 4 bytes). `dp / backprop`: the DP-SGD gradient of a Poisson batch of",
        f"expected size B from N = {POISSON_N} (padded with a mask to the size exceeded with",
        "probability 1e-12, clipped, noised: `jaxbp.sources.dp_sgd`) against the plain",
        "gradient of B rows, timed in the same group.",
        "",
        "| B | W | params | norms ms | vmap+norm ms | norms speed-up | norms mem ratio "
        "| clipped ms | vmap+clip ms | clipped speed-up | backprop ms | clipped / backprop "
        "| DP padded to | dp / backprop |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        t = {k: v * 1e3 for k, v in row["time_s"].items()}
        o = {k: v * 1e3 for k, v in row["overhead_time_s"].items()}

        def cell(name: str, t: dict[str, float] = t) -> str:
            return f"{t[name]:.2f}" if name in t else "not run"

        lines.append(
            f"| {row['batch']} | {row['width']} | {row['params']:,} | {cell('norms')} | "
            f"{cell('vmap_norms')} | {times(ratio(row, 'vmap_norms', 'norms'))} | "
            f"{times(ratio(row, 'vmap_norms', 'norms', 'peak_bytes'))} | {cell('clipped')} | "
            f"{cell('vmap_clipped')} | {times(ratio(row, 'vmap_clipped', 'clipped'))} | "
            f"{o['backprop']:.2f} | {o['clipped'] / o['backprop']:.2f} | "
            f"{row['dp_padded']} | {o['dp'] / o['backprop']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = OneLineParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--batches", default="32,128,512,1024")
    parser.add_argument("--widths", default="256,512,1024,2048")
    parser.add_argument("--budget", type=float, default=1.0, help="seconds of timing per case")
    parser.add_argument("--max-gb", type=float, default=6.0,
                        help="do not run programs whose compiled peak exceeds this")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    info = machine_info()
    print(describe_machine(info))
    rows = []
    for width in (int(w) for w in args.widths.split(",")):
        for batch in (int(b) for b in args.batches.split(",")):
            row = run_case(batch, width, args.budget, args.max_gb * 2**30)
            rows.append(row)
            print(f"B={batch:5d} W={width:5d}  norms {times(ratio(row, 'vmap_norms', 'norms'))}"
                  f" faster, {times(ratio(row, 'vmap_norms', 'norms', 'peak_bytes'))} less "
                  f"memory;  clipped {times(ratio(row, 'vmap_clipped', 'clipped'))} faster, "
                  f"{ratio(row, 'clipped', 'backprop', 'overhead_time_s'):.2f}x backprop, dp "
                  f"{ratio(row, 'dp', 'backprop', 'overhead_time_s'):.2f}x"
                  + (f"  (not run: {row['not_run']})" if row["not_run"] else ""), flush=True)
    write(pathlib.Path(args.out), info, rows)


def write(out: pathlib.Path, info: dict, rows: list[dict]) -> None:
    """per_example_<platform>.json and .md under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"per_example_{info['device_platform']}"
    files.write_text(stem.with_suffix(".json"),
                     json.dumps({"machine": info, "rows": rows}, indent=1))
    files.write_text(stem.with_suffix(".md"), markdown(rows, info))
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
