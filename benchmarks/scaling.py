"""Samples per second of the data-parallel step against the number of host devices.

    python benchmarks/scaling.py [--devices 1,2,4,8] [--batch 1024] [--width 512]

Each device count runs in its own process (XLA_FLAGS=--xla_force_host_platform_device_count)
with the same global batch and net; writes scaling_<platform>.json and .md under --out.
On a CPU the "devices" share the machine's cores: this measures the overhead of the
sharded program and its collectives, not a speed-up.
"""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

from jaxbp import files
from jaxbp.cli.common import OneLineParser

CHILD = """
import json, sys
import jax, numpy as np, optax
import jaxbp
from jaxbp import parallel
from jaxbp.bench.harness import time_interleaved, machine_info
width, batch, budget = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
net = jaxbp.MLP((width, width, width, 10), "relu")
optimizer = optax.sgd(1e-3)
mesh = parallel.make_mesh()
step = parallel.make_sharded_train_step(net, optimizer, mesh)
rng = np.random.default_rng(0)
x = rng.normal(size=(batch, width)).astype(np.float32)
y = rng.integers(0, 10, size=batch).astype(np.int32)
holder = {"state": jaxbp.TrainState.create(net.init(jax.random.key(0)), optimizer)}
from jax.sharding import NamedSharding, PartitionSpec
xs = jax.device_put(x, parallel.batch_sharding(mesh, 2))
ys = jax.device_put(y, parallel.batch_sharding(mesh, 1))
def call():
    holder["state"], metrics = step(holder["state"], xs, ys)
    return metrics
t = time_interleaved({"step": call}, budget_s=budget)["step"]
print(json.dumps({"devices": jax.device_count(), "step_s": t.median,
                  "iqr_s": [t.p25, t.p75], "samples_per_s": batch / t.median,
                  "machine": machine_info()}))
"""


def main() -> None:
    parser = OneLineParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="1,2,4,8")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--budget", type=float, default=3.0)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args()
    rows = []
    for n in (int(d) for d in args.devices.split(",")):
        env = dict(os.environ, JAX_PLATFORMS="cpu",
                   XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
        result = subprocess.run([sys.executable, "-c", CHILD, str(args.width), str(args.batch),
                                 str(args.budget)], env=env, capture_output=True, text=True,
                                check=True)
        row = json.loads(result.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"{n} devices: {row['samples_per_s']:.0f} samples/s "
              f"({row['step_s'] * 1e3:.2f} ms per step)", flush=True)
    machine = rows[0]["machine"]
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"scaling_{machine['device_platform']}"
    files.write_text(stem.with_suffix(".json"), json.dumps(
        {"batch": args.batch, "width": args.width, "rows": rows}, indent=1))
    lines = [
        "# Data-parallel scaling: samples/s against the number of devices", "",
        f"Machine: {machine['device_platform']} ({machine['device_kind']}); CPU "
        f"{machine['cpu']}, {machine['cpu_cores']} cores; jax {machine['jax']}; "
        f"{machine['date']}.", "",
        f"Net ({args.width}, {args.width}, {args.width}, 10) relu, softmax cross-entropy, "
        f"sgd, global batch {args.batch}, `jaxbp.parallel.make_sharded_train_step` on a "
        "(devices, 1) mesh; one process per device count, median step time.", "",
        "**These are host devices on a CPU with "
        f"{machine['cpu_cores']} cores: the devices share those cores, so the table "
        "measures the overhead of the sharded program and its all-reduces, not a "
        "speed-up.** On GPUs or TPUs each device adds its own compute.", "",
        "| devices | step ms | samples/s | relative to 1 device |", "|---|---|---|---|"]
    base = rows[0]["samples_per_s"]
    for row in rows:
        lines.append(f"| {row['devices']} | {row['step_s'] * 1e3:.2f} | "
                     f"{row['samples_per_s']:.0f} | {row['samples_per_s'] / base:.2f} |")
    files.write_text(stem.with_suffix(".md"), "\n".join(lines) + "\n")
    print(f"wrote {stem}.json and {stem}.md")


if __name__ == "__main__":
    main()
