"""The cost of one checkpoint save: the single-file .npz against orbax's sharded format.

    python benchmarks/checkpoint_cost.py [--sizes 64,1024,1024,10] [--repeats 3]
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python benchmarks/checkpoint_cost.py

The state is an adam TrainState of the net (params and two moments) plus the data key.
``.npz``: :func:`jaxbp.checkpoint.save` (host copy, SHA-256, fsync, rename);
``orbax``: :func:`jaxbp.train.sharded_checkpoint.save` on one device, and on a (data, 2) mesh
when more than one device is visible. Each is saved ``--repeats`` times into a fresh
folder; the median seconds and the bytes on disk are reported. Writes
checkpoint_cost_<platform>.json and .md under --out.
"""

from __future__ import annotations

import json
import pathlib
import statistics
import tempfile
import time

import jax
import numpy as np
import optax

import jaxbp
from jaxbp import files, parallel
from jaxbp.bench.harness import describe_machine, machine_info
from jaxbp.cli.common import OneLineParser
from jaxbp.train import checkpoint, sharded_checkpoint


def _bytes(path: pathlib.Path) -> int:
    return path.stat().st_size if path.is_file() else sum(
        p.stat().st_size for p in path.rglob("*") if p.is_file())


def _time_saves(save, repeats: int) -> tuple[float, int]:
    seconds, size = [], 0
    for i in range(repeats):
        with tempfile.TemporaryDirectory() as folder:
            start = time.perf_counter()
            path = save(pathlib.Path(folder), i + 1)
            seconds.append(time.perf_counter() - start)
            size = _bytes(path)
    return statistics.median(seconds), size


def main() -> None:
    parser = OneLineParser(allow_abbrev=False, description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="64,1024,1024,10")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()

    net = jaxbp.MLP(tuple(int(s) for s in args.sizes.split(",")), "relu")
    state = jaxbp.TrainState.create(net.init(jax.random.key(0)), optax.adam(1e-3))
    key = jax.random.key(1)
    state_bytes = sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(state))
    rows = {}
    rows[".npz (one file)"] = _time_saves(
        lambda folder, step: checkpoint.save(folder, step, {"state": state, "key": key},
                                             {"epoch": step}), args.repeats)
    key_data = np.asarray(jax.random.key_data(key))
    rows["orbax, 1 device"] = _time_saves(
        lambda folder, step: sharded_checkpoint.save(
            folder, step, {"state": state, "key": key_data}, {"epoch": step}), args.repeats)
    if jax.device_count() > 1:
        mesh = parallel.make_mesh(model=2)
        sharded = jax.device_put(state, parallel.state_shardings(state, mesh, net=net))
        rows[f"orbax, mesh {dict(mesh.shape)}"] = _time_saves(
            lambda folder, step: sharded_checkpoint.save(
                folder, step, {"state": sharded, "key": key_data}, {"epoch": step}),
            args.repeats)
    info = machine_info()
    for name, (seconds, size) in rows.items():
        print(f"{name:<32} {seconds * 1e3:9.1f} ms  {size / 2**20:7.2f} MiB")
    platform = info["device_platform"]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    files.write_text((out / f"checkpoint_cost_{platform}.json"), json.dumps(
        {"machine": info, "sizes": net.sizes, "state_bytes": state_bytes,
         "rows": {k: {"seconds": s, "bytes": b} for k, (s, b) in rows.items()}}, indent=1))
    lines = ["# Checkpoint save cost", "", f"Machine: {describe_machine(info)}.", "",
             f"Adam TrainState of MLP {'-'.join(map(str, net.sizes))} ({state_bytes / 2**20:.2f}"
             f" MiB of arrays) plus the data key; median of {args.repeats} saves, each into a "
             f"fresh folder.", "", "| format | save ms | on disk MiB |", "|---|---|---|"]
    lines += [f"| {k} | {s * 1e3:.1f} | {b / 2**20:.2f} |" for k, (s, b) in rows.items()]
    files.write_text((out / f"checkpoint_cost_{platform}.md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
