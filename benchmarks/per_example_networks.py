"""Per-example norms, clipping and the DP step of conv and layernorm nets vs jax.vmap(jax.grad).

    python benchmarks/per_example_networks.py [--batch 256] [--budget 2] [--out benchmarks/results]

Nets (float32, softmax cross-entropy, relu), each at --batch:

  cnn8     the digits CNN of `jaxbp train --model cnn` on 8x8x1 images
  cnn32    conv 3x3 32, maxpool 2, conv 3x3 64, maxpool 2, dense 128, dense 10 on 32x32x3
  cnn_wide conv 3x3 64, conv 3x3 128, avgpool 2, dense 10 on 8x8x16 (its second conv takes
           the ghost route: T (d_in + d_out) < d_in d_out)
  ln_mlp   dense 512, layernorm, dense 512, layernorm, dense 10 on 256 features
  mlp      dense 512, dense 512, dense 10 on 256 features (the dense reference)

Programs, compiled ahead and timed interleaved in one process (two groups, as in
benchmarks/per_example.py): backprop (the plain hand-written gradient), norms
(jaxbp.per_example_grad_norms), vmap_norms (jax.vmap(jax.grad) then norms), errors (the
forward pass and every layer's per-sample error, no weight gradient: the floor of any
norm computed from backprop's errors), clipped
(jaxbp.clipped_grad), vmap_clipped, and dp (jaxbp.sources.dp_sgd on a Poisson batch
of expected size B from N = 60000, padded with a mask). Memory is XLA's compiled peak.
Also reported: the compiled peak of the clipped step over the plain step's, and which
route each conv layer's norms take (ghost Gram or formed gradient; see
jaxbp.layers.Conv2D.uses_ghost_norm). Writes per_example_networks_<platform>.json/.md.
"""

from __future__ import annotations

import json
import pathlib
import statistics

import jax
import jax.numpy as jnp
import numpy as np
from per_example import dp_candidate

import jaxbp
from jaxbp import files
from jaxbp import layers as L
from jaxbp.bench.harness import compile_ahead, describe_machine, machine_info, time_interleaved
from jaxbp.cli.common import OneLineParser


def nets() -> dict[str, jaxbp.Network]:
    relu = "relu"
    return {
        "cnn8": jaxbp.Network((L.Conv2D(16, (3, 3), activation=relu), L.MaxPool(2),
                               L.Conv2D(32, (3, 3), activation=relu), L.MaxPool(2),
                               L.Flatten(), L.Dense(64, relu), L.Dense(10)), (8, 8, 1)),
        "cnn32": jaxbp.Network((L.Conv2D(32, (3, 3), activation=relu), L.MaxPool(2),
                                L.Conv2D(64, (3, 3), activation=relu), L.MaxPool(2),
                                L.Flatten(), L.Dense(128, relu), L.Dense(10)), (32, 32, 3)),
        "cnn_wide": jaxbp.Network((L.Conv2D(64, (3, 3), activation=relu),
                                   L.Conv2D(128, (3, 3), activation=relu), L.AvgPool(2),
                                   L.Flatten(), L.Dense(10)), (8, 8, 16)),
        "ln_mlp": jaxbp.Network((L.Dense(512, relu), L.LayerNorm(), L.Dense(512, relu),
                                 L.LayerNorm(), L.Dense(10)), (256,)),
        "mlp": jaxbp.Network((L.Dense(512, relu), L.Dense(512, relu), L.Dense(10)), (256,)),
    }


def candidates(net: jaxbp.Network, clip: float, batch: int) -> dict:
    def sample_loss(params, x_i, y_i):
        return net.cost(params, x_i[None], y_i[None])

    vmap_grad = jax.vmap(jax.grad(sample_loss), in_axes=(None, 0, 0))

    def flat_norms(grads):
        return jnp.sqrt(sum(jnp.sum(g.reshape(g.shape[0], -1) ** 2, axis=1)
                            for g in jax.tree.leaves(grads)))

    def vmap_clipped(params, x, y):
        grads = vmap_grad(params, x, y)
        factor = jnp.minimum(1.0, clip / jnp.maximum(flat_norms(grads), 1e-30))
        return jax.tree.map(lambda g: jnp.tensordot(factor, g, axes=1) / g.shape[0], grads)

    return {
        "backprop": lambda p, x, y: jaxbp.value_and_backprop(net, p, x, y),
        "norms": lambda p, x, y: jaxbp.per_example_grad_norms(net, p, x, y),
        "vmap_norms": lambda p, x, y: flat_norms(vmap_grad(p, x, y)),
        "errors": lambda p, x, y: jaxbp.network.layer_deltas(net, p, x, y, per_sample=True)[2],
        "clipped": lambda p, x, y: jaxbp.clipped_grad(net, p, x, y, clip),
        "vmap_clipped": vmap_clipped,
        "dp": dp_candidate(net, clip, batch)[0],
        "dp_micro": dp_candidate(net, clip, batch, microbatch=microbatch_of(batch))[0],
    }


def microbatch_of(batch: int) -> int:
    """The ``microbatch`` of the dp_micro column: a quarter of the expected batch."""
    return max(1, batch // 4)


VERSUS = ("norms", "vmap_norms", "errors", "clipped", "vmap_clipped")
OVERHEAD = ("backprop", "clipped", "dp", "dp_micro")


def run_case(name: str, net: jaxbp.Network, batch: int, budget: float,
             inputs: tuple | None = None, with_vmap: bool = True) -> dict:
    """Every program of :func:`candidates` on ``inputs`` (default: normal x, labels of 10
    classes), compiled ahead and timed interleaved; ratios, peaks and conv routes.
    ``with_vmap=False``: the clipped step against the plain one only (no vmap(grad), no DP
    step, whose padded Poisson batch holds several times B rows)."""
    params = net.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    if inputs is None:
        inputs = (rng.normal(size=(batch, *net.input_shape)), rng.integers(0, 10, size=batch))
    x = jnp.asarray(inputs[0], jnp.int32 if net.input_dtype else jnp.float32)
    y = jnp.asarray(inputs[1], jnp.int32)
    calls, compile_s, peak = {}, {}, {}
    overhead_group = OVERHEAD if with_vmap else ("backprop", "clipped")
    wanted = {*overhead_group, *(VERSUS if with_vmap else ())}
    for key, fn in candidates(net, 1.0, batch).items():
        if key not in wanted:
            continue
        compiled, compile_s[key], mem = compile_ahead(fn, params, x, y)
        peak[key] = None if mem is None else mem.peak
        calls[key] = (lambda c: lambda: c(params, x, y))(compiled)
    overhead = time_interleaved({k: calls[k] for k in overhead_group}, budget_s=budget)
    against_vmap = (time_interleaved({k: calls[k] for k in VERSUS}, budget_s=budget)
                    if with_vmap else {})

    def paired(a: str, b: str, group: dict) -> float:
        return statistics.median(x / y for x, y in zip(group[a].rounds, group[b].rounds))

    shapes = net.shapes
    routes = [("ghost" if layer.uses_ghost_norm(shapes[i]) else "formed")
              for i, layer in enumerate(net.layers) if isinstance(layer, L.Conv2D)]
    row = {"net": name, "describe": jaxbp.network.describe(net), "batch": batch,
           "params": int(sum(p.size for p in jax.tree.leaves(params))),
           "ms": {k: t.median * 1e3 for k, t in {**against_vmap, **overhead}.items()}}
    if against_vmap:
        row.update(norms_speedup=paired("vmap_norms", "norms", against_vmap),
                   norms_speedup_bound=paired("vmap_norms", "errors", against_vmap),
                   clipped_speedup=paired("vmap_clipped", "clipped", against_vmap))
    if "dp" in overhead:
        row["dp_over_backprop"] = paired("dp", "backprop", overhead)
        row["dp_micro_over_backprop"] = paired("dp_micro", "backprop", overhead)
    return {**row, "clipped_over_backprop": paired("clipped", "backprop", overhead),
            "peak_bytes": peak, "compile_s": compile_s, "conv_norm_routes": routes}


def markdown(rows: list[dict], info: dict) -> str:
    def mem(row, a, b):
        pa, pb = row["peak_bytes"][a], row["peak_bytes"][b]
        return "n/a" if pa is None or pb is None else f"{pa / pb:.2f}"

    lines = ["# Per-example quantities of conv and layernorm nets: jaxbp vs jax.vmap(jax.grad)",
             "", f"Machine: {describe_machine(info)}.", "",
             "float32, softmax cross-entropy. Ratios are medians of per-round ratios of "
             "interleaved calls (norms, vmap norms, clipped, vmap clipped in one group; "
             "backprop, clipped, dp in another). Memory: XLA's compiled peak. dp: the DP-SGD "
             "gradient of a Poisson batch of expected size B from N = 60000, padded with a "
             "mask, clipped, noised (jaxbp.sources.dp_sgd); dp, B/4 at a time: the same "
             "with microbatch=B/4 (only the real rows run, B/4 at a time: jaxbp.microbatch). "
             "Conv norm routes: ghost = "
             "the T x T Gram matrices, formed = P^T E (Conv2D.uses_ghost_norm). errors: the "
             "forward pass and every layer's per-sample output error, no weight gradient "
             "(jaxbp.network.layer_deltas), the work any exact per-example norm that runs "
             "backprop's errors needs; bound = vmap norms / errors, the most such a method "
             "could gain over vmap(grad) on this machine.", "",
             "| net | B | params | norms ms | vmap norms ms | norms speed-up | errors ms | "
             "bound | clipped ms | "
             "vmap clipped ms | clipped speed-up | backprop ms | clipped / backprop | "
             "clipped peak / backprop peak | dp / backprop | dp, B/4 at a time / backprop | "
             "conv norm routes |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        ms = r["ms"]
        lines.append(
            f"| {r['net']} | {r['batch']} | {r['params']:,} | {ms['norms']:.2f} | "
            f"{ms['vmap_norms']:.2f} | {r['norms_speedup']:.1f}x | {ms['errors']:.2f} | "
            f"{r['norms_speedup_bound']:.1f}x | {ms['clipped']:.2f} | "
            f"{ms['vmap_clipped']:.2f} | {r['clipped_speedup']:.1f}x | {ms['backprop']:.2f} | "
            f"{r['clipped_over_backprop']:.2f} | {mem(r, 'clipped', 'backprop')} | "
            f"{r['dp_over_backprop']:.2f} | {r['dp_micro_over_backprop']:.2f} | "
            f"{', '.join(r['conv_norm_routes']) or '-'} |")
    lines += ["", "Nets: " + "; ".join(f"{r['net']}: {r['describe']}" for r in rows) + "."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = OneLineParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--budget", type=float, default=2.0)
    parser.add_argument("--nets", default=",".join(nets()))
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    info = machine_info()
    print(describe_machine(info))
    rows = []
    for name in args.nets.split(","):
        row = run_case(name, nets()[name], args.batch, args.budget)
        rows.append(row)
        print(f"{name}: norms {row['norms_speedup']:.1f}x faster than vmap (bound "
              f"{row['norms_speedup_bound']:.1f}x), clipped "
              f"{row['clipped_speedup']:.1f}x; clipped/backprop {row['clipped_over_backprop']:.2f}"
              f", dp/backprop {row['dp_over_backprop']:.2f} "
              f"(B/4 at a time {row['dp_micro_over_backprop']:.2f}), "
              f"routes {row['conv_norm_routes']}",
              flush=True)
    write_tables(args.out, "per_example_networks", info, rows, markdown(rows, info))


def write_tables(out: str, name: str, info: dict, rows: list[dict], table: str) -> None:
    """``<out>/<name>_<platform>.json`` (machine and rows) and ``.md`` (the table)."""
    folder = pathlib.Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / f"{name}_{info['device_platform']}"
    files.write_text(stem.with_suffix(".json"),
                     json.dumps({"machine": info, "rows": rows}, indent=1))
    files.write_text(stem.with_suffix(".md"), table)
    print(f"wrote {stem}.md")


if __name__ == "__main__":
    main()
