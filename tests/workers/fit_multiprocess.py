"""One of two processes: fit over a mesh spanning both, with sharded checkpoints.

argv: out_prefix epochs [checkpoint_dir]. Reads JAXBP_COORDINATOR, JAXBP_NUM_PROCESSES,
JAXBP_PROCESS_ID; JAXBP_TEST_PRIVATE=1: DP-SGD (Poisson batches, each process its rows).
Writes <out_prefix>.<process>.npz with the final params (gathered from both processes),
the test accuracy per epoch, and the seconds the run's checkpoint saves took.
"""

from __future__ import annotations

import os
import sys
import time

from jaxbp import parallel

parallel.initialize(timeout_s=120)

import jax  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

import jaxbp  # noqa: E402
from jaxbp.train import sharded_checkpoint  # noqa: E402

out, epochs = sys.argv[1], int(sys.argv[2])
folder = sys.argv[3] if len(sys.argv) > 3 else None
net = jaxbp.MLP((64, 32, 32, 10), "tanh")
mesh = parallel.make_mesh(model=2)  # 2 processes x 2 devices: (data 2, model 2)
saves = []
original_save = sharded_checkpoint.save


def timed_save(*args, **kwargs):
    start = time.perf_counter()
    path = original_save(*args, **kwargs)
    saves.append(time.perf_counter() - start)
    return path


sharded_checkpoint.save = timed_save
private = os.environ.get("JAXBP_TEST_PRIVATE") == "1"
result = jaxbp.fit(net, optax.sgd(0.05, momentum=0.9), jaxbp.data.load_digits(),
                   epochs=epochs, batch_size=64, key=jax.random.key(3), mesh=mesh,
                   checkpoint_dir=folder, progress=jax.process_index() == 0,
                   privacy=jaxbp.privacy.Privacy(1.0, 1e-5, noise_multiplier=1.0)
                   if private else None)
params = multihost_utils.process_allgather(result.state.params, tiled=True)
np.savez(f"{out}.{jax.process_index()}.npz",
         *[np.asarray(leaf) for leaf in jax.tree.leaves(params)],
         accuracy=np.asarray(result.history["test_accuracy"]), saves=np.asarray(saves))
print(f"process {jax.process_index()} of {jax.process_count()}, {jax.device_count()} devices: "
      f"epochs {result.history['epoch']}, saves {[f'{s:.3f}' for s in saves]} s")
