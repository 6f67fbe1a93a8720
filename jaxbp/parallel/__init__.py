"""Data- and model-parallel training over a device mesh (sharding) and multi-host start-up
(distributed)."""

from jaxbp.parallel.distributed import fetch, gather_params, initialize, process_rows
from jaxbp.parallel.sharding import (
    DATA,
    MODEL,
    batch_sharding,
    layer_splits,
    make_mesh,
    make_sharded_train_loop,
    make_sharded_train_step,
    state_shardings,
)

__all__ = [
    "DATA",
    "MODEL",
    "batch_sharding",
    "fetch",
    "gather_params",
    "initialize",
    "layer_splits",
    "make_mesh",
    "make_sharded_train_loop",
    "make_sharded_train_step",
    "process_rows",
    "state_shardings",
]
