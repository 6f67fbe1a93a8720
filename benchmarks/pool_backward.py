"""Max pool backward: three ways to send each window's error to its first largest input.

    python benchmarks/pool_backward.py [--budget 0.5] [--out benchmarks/results]

All three give the same result, bit for bit (asserted before timing): each window's
error goes, unchanged, to its first largest input (row-major window order).

* ``first_max_mask`` (what :class:`jaxbp.layers.MaxPool` runs): the input viewed as
  (N, Ho, ph, Wo, pw, C) by a reshape, the mask of the first input equal to its
  window's max, one ``where``; no transpose, no scatter.
* ``window_onehot`` (what MaxPool ran before): the windows moved to a trailing axis
  (a transpose), the one-hot of their ``argmax``, and the transpose back.
* ``select_and_scatter``: XLA's own op, as ``jax.vjp`` of ``lax.reduce_window``
  emits it; the reference for speed (autodiff is only used here to time it).

Each is timed as a jitted function of (x, error), side by side in one process
(:func:`jaxbp.bench.harness.time_interleaved`), for the max pools of the accelerator preset's
CNNs (after their convs) on a GPU/TPU and small ones on a CPU, in float32 and bfloat16.
Writes pool_backward_<platform>.json and .md under ``--out``.
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
from jaxbp.layers import MaxPool

ACCELERATOR_SHAPES = ((256, 32, 32, 128), (512, 16, 16, 64))
CPU_SHAPES = ((128, 16, 16, 32), (32, 8, 8, 16))


def window_onehot(x: jax.Array, delta: jax.Array) -> jax.Array:
    """The earlier backward: windows on a trailing axis, a one-hot argmax, back again."""
    n, h, w, c = x.shape
    ho, wo = h // 2, w // 2
    windows = x.reshape(n, ho, 2, wo, 2, c).transpose(0, 1, 3, 5, 2, 4).reshape(n, ho, wo, c, 4)
    mask = jax.nn.one_hot(jnp.argmax(windows, axis=-1), 4, dtype=x.dtype)
    spread = (mask * delta[..., None]).reshape(n, ho, wo, c, 2, 2)
    return spread.transpose(0, 1, 4, 2, 5, 3).reshape(n, h, w, c)


def first_max_mask(x: jax.Array, delta: jax.Array) -> jax.Array:
    """The layer's backward (2x2 windows, sides even)."""
    return MaxPool(2).backward({}, x, delta)[0]


def select_and_scatter(x: jax.Array, delta: jax.Array) -> jax.Array:
    """XLA's select-and-scatter-add, as jax.vjp of the forward emits it."""
    forward = lambda v: MaxPool(2).forward({}, v)[0]  # noqa: E731
    return jax.vjp(forward, x)[1](delta)[0]


VARIANTS = {"first_max_mask": first_max_mask, "window_onehot": window_onehot,
            "select_and_scatter": select_and_scatter}


def measure(shape: tuple[int, ...], dtype: str, budget_s: float) -> dict:
    rng = np.random.default_rng(0)
    # after a relu, as in the nets: many windows of zeros tie
    x = jnp.asarray(np.maximum(rng.normal(size=shape), 0), dtype)
    n, h, w, c = shape
    delta = jnp.asarray(rng.normal(size=(n, h // 2, w // 2, c)), dtype)
    compiled = {name: jax.jit(fn).lower(x, delta).compile() for name, fn in VARIANTS.items()}
    outputs = {name: np.asarray(fn(x, delta).astype(jnp.float32)) for name, fn in compiled.items()}
    for name, out in outputs.items():
        if not np.array_equal(out, outputs["select_and_scatter"]):
            raise AssertionError(f"{name} differs from XLA's select-and-scatter at {shape} {dtype}")
    timings = time_interleaved({name: (lambda f=fn: f(x, delta)) for name, fn in compiled.items()},
                               budget_s=budget_s)
    moved = 2 * x.nbytes + delta.nbytes  # read x and the error, write the input error
    return {"shape": shape, "dtype": dtype,
            "ms": {name: t.median * 1e3 for name, t in timings.items()},
            "gb_per_s": {name: moved / t.median / 1e9 for name, t in timings.items()},
            "over_select_and_scatter": {name: paired_ratio(t, timings["select_and_scatter"])
                                        for name, t in timings.items()}}


def main() -> None:
    parser = OneLineParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--budget", type=float, default=0.5, help="seconds of timing per row")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    info = machine_info()
    platform = info["device_platform"]
    shapes = CPU_SHAPES if platform == "cpu" else ACCELERATOR_SHAPES
    rows = []
    for shape in shapes:
        for dtype in ("float32", "bfloat16"):
            row = measure(shape, dtype, args.budget)
            rows.append(row)
            print(f"{shape} {dtype}: " + ", ".join(
                f"{k} {row['ms'][k]:.4f} ms ({row['over_select_and_scatter'][k]:.2f}x)"
                for k in VARIANTS), flush=True)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files.write_text((out / f"pool_backward_{platform}.json"),
        json.dumps({"machine": info, "rows": rows}, indent=1))
    lines = ["# Max pool backward (2x2): three ways, one result", "",
             f"Machine: {describe_machine(info)}.", "",
             "Median ms per call of the jitted backward (x, error) -> input error; in brackets "
             "the paired ratio to XLA's select-and-scatter (< 1: faster); GB/s: bytes read "
             "and written (2 x + error) over the time. Results asserted equal bit for bit "
             "first.", "",
             "| shape | dtype | " + " | ".join(VARIANTS) + " | GB/s (" + ", ".join(VARIANTS)
             + ") |", "|---|---|" + "---|" * (len(VARIANTS) + 1)]
    for r in rows:
        cells = " | ".join(f"{r['ms'][k]:.4f} ({r['over_select_and_scatter'][k]:.2f}x)"
                           for k in VARIANTS)
        rates = ", ".join(f"{r['gb_per_s'][k]:.1f}" for k in VARIANTS)
        lines.append(f"| {'x'.join(map(str, r['shape']))} | {r['dtype']} | {cells} | {rates} |")
    files.write_text((out / f"pool_backward_{platform}.md"), "\n".join(lines) + "\n")
    print(f"wrote {out}/pool_backward_{platform}.md")


if __name__ == "__main__":
    main()
