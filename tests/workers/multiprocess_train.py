"""One process of a 2-process data-parallel run on 127.0.0.1 (gloo CPU collectives).

Environment: JAXBP_COORDINATOR, JAXBP_NUM_PROCESSES, JAXBP_PROCESS_ID; argv[1]: an
.npz path where process 0 writes the final params. Each process loads the same data
and feeds only its rows of every global batch.
"""

from __future__ import annotations

import sys

from jaxbp import parallel

parallel.initialize()  # before anything touches a JAX backend

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

import jaxbp  # noqa: E402


def main() -> None:
    net = jaxbp.MLP((12, 16, 10), "tanh")
    optimizer = optax.adam(1e-2)
    rng = np.random.default_rng(0)
    xs = rng.normal(size=(5, 32, 12)).astype(np.float32)
    ys = rng.integers(0, 10, size=(5, 32)).astype(np.int32)
    mesh = parallel.make_mesh()  # every device of every process on the data axis
    step = parallel.make_sharded_train_step(net, optimizer, mesh)
    state = jaxbp.TrainState.create(net.init(jax.random.key(0)), optimizer)
    for x, y in zip(xs, ys):
        state, metrics = step(state, parallel.process_rows(x), parallel.process_rows(y))
    params, loss = parallel.fetch((jax.tree.leaves(state.params), metrics["loss"]))
    print(f"process {jax.process_index()} of {jax.process_count()}, {jax.device_count()} "
          f"devices, loss {float(loss):.6f}", flush=True)
    np.savez(f"{sys.argv[1]}.{jax.process_index()}.npz", *params)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
