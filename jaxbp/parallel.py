"""The train step over a device mesh (``jax.sharding``), on one host or many (``jax.distributed``).

The hand-written recursion is not rewritten for parallelism. The step is the
same pure function as :func:`jaxbp.make_train_step`, compiled with explicit
:class:`~jax.sharding.NamedSharding` s for its inputs and outputs, and XLA's
SPMD partitioner derives the collectives from them:

* **data parallel** (mesh axis ``"data"``): x and y are split over their batch
  rows. ``dC/dW = a^T delta`` contracts over the batch, so XLA sums the
  per-device partial products with an all-reduce; ``delta @ W^T`` and the
  forward pass need no communication.
* **model parallel** (optional mesh axis ``"model"``): every ``W^l`` and
  ``b^l`` is split over its fan_out columns (when fan_out divides evenly; a
  narrow layer such as a 10-class output stays replicated). Then ``a W`` is
  local, ``delta W^T`` contracts over the split axis (an all-reduce), and
  ``a^T delta`` gives each device its own columns.

Choosing ``jit`` with shardings over ``shard_map`` with hand-placed
``psum``: the recursion stays exactly the one of :mod:`jaxbp.backprop`, with
no per-device rewrite, and the same code runs on 1 CPU, 8 GPUs or a pod. The
cost is that the collectives are XLA's choice; ``step.lower(...).as_text()``
shows them.

Multi-host: call :func:`initialize` in every process first (it wraps
``jax.distributed.initialize``); each process then passes its own rows of the
global batch (:func:`process_rows`) and the step assembles the global array
with ``jax.make_array_from_process_local_data``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxbp import _checks
from jaxbp._typing import Array, ArrayLike, PyTree
from jaxbp.mlp import MLP
from jaxbp.train import GradFn, TrainState, _check_optimizer, _gradient, _step

DATA, MODEL = "data", "model"


def make_mesh(data: int | None = None, model: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, model)`` mesh over ``devices`` (default: all of them, every process's).

    Args:
      data: devices along the batch axis; default all devices / ``model``.
      model: devices along the fan_out axis of the weights (1: pure data parallel).
      devices: the devices to use, default ``jax.devices()``.

    Raises:
      ValueError: the sizes do not multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    if model < 1 or len(devices) % model:
        raise ValueError(f"model must be >= 1 and divide the {len(devices)} devices, "
                         f"got {model}")
    data = len(devices) // model if data is None else data
    if data * model != len(devices):
        raise ValueError(f"data x model = {data} x {model} = {data * model} but there are "
                         f"{len(devices)} devices")
    return Mesh(np.asarray(devices).reshape(data, model), (DATA, MODEL))


def _axis_size(mesh: Mesh, axis: str | None) -> int:
    return mesh.shape[axis] if axis is not None and axis in mesh.shape else 1


def _leaf_spec(shape: tuple[int, ...], model_axis: str | None, model_size: int) -> PartitionSpec:
    """W-shaped (fan_in, fan_out) leaves split columns, b-shaped (fan_out,) split entries,
    when the mesh has a model axis and fan_out divides evenly; anything else replicated."""
    if model_size > 1 and len(shape) in (1, 2) and shape[-1] % model_size == 0:
        return PartitionSpec(*([None] * (len(shape) - 1)), model_axis)
    return PartitionSpec()


def state_shardings(state: PyTree, mesh: Mesh, model_axis: str | None = MODEL) -> PyTree:
    """A NamedSharding for every leaf of a TrainState (params and optimizer moments alike)."""
    size = _axis_size(mesh, model_axis)
    return jax.tree.map(
        lambda leaf: NamedSharding(mesh, _leaf_spec(np.shape(leaf), model_axis, size)), state)


def batch_sharding(mesh: Mesh, ndim: int, data_axis: str = DATA) -> NamedSharding:
    """Rows of an ``ndim``-dimensional batch array split over ``data_axis``."""
    return NamedSharding(mesh, PartitionSpec(data_axis, *([None] * (ndim - 1))))


def make_sharded_train_step(
    net: MLP,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    grad: str | GradFn = "backprop",
    data_axis: str = DATA,
    model_axis: str | None = MODEL,
    donate: bool = True,
) -> Callable[[TrainState, ArrayLike, ArrayLike], tuple[TrainState, dict[str, Array]]]:
    """:func:`jaxbp.make_train_step` over ``mesh``: the same numbers, data (and model) parallel.

    Args:
      net, optimizer, grad, donate: as :func:`jaxbp.make_train_step`.
      mesh: a :class:`jax.sharding.Mesh`, e.g. :func:`make_mesh`.
      data_axis: the mesh axis the batch is split over.
      model_axis: the mesh axis the weights' fan_out is split over (ignored
        when the mesh has no such axis or it has size 1).

    Returns:
      ``step(state, x, y) -> (state, metrics)``. ``state`` may live anywhere
      (it is placed on its shardings); x and y may be host or device arrays
      of the global batch, or, with several processes, each process's rows
      (:func:`process_rows`). The state comes back on its declared shardings
      (:func:`state_shardings`); metrics are replicated.

    Raises:
      ValueError: the global batch does not split evenly over ``data_axis``.
    """
    gradient = _gradient(grad)
    _check_optimizer(optimizer)
    if data_axis not in mesh.shape:
        raise ValueError(f"mesh has axes {tuple(mesh.shape)}, no data_axis {data_axis!r}")
    n_data = mesh.shape[data_axis]
    replicated = NamedSharding(mesh, PartitionSpec())
    compiled: dict[Any, tuple[Any, ...]] = {}

    def body(state: TrainState, x: Array, y: Array):
        x, y = _checks.check_inputs(net, state.params, x, y)
        return _step(net, optimizer, gradient, state, x, y)

    def step(state: TrainState, x: ArrayLike, y: ArrayLike):
        x, y = _checks.as_array("x", x), _checks.as_array("y", y)
        local_rows = int(np.shape(x)[0]) if np.ndim(x) else 0
        global_rows = local_rows * jax.process_count()
        if global_rows % n_data:
            raise ValueError(f"the global batch of {global_rows} rows does not split evenly "
                             f"over the {n_data} devices of mesh axis {data_axis!r}; use a "
                             f"multiple of {n_data} (drop or pad the last batch)")
        key = (jax.tree.structure(state), tuple(np.shape(a) for a in jax.tree.leaves(state)),
               np.shape(x), np.shape(y), str(x.dtype), str(y.dtype))
        if key not in compiled:  # shardings and the program, once per shape
            state_sh = state_shardings(state, mesh, model_axis)
            x_sh = batch_sharding(mesh, np.ndim(x), data_axis)
            y_sh = batch_sharding(mesh, np.ndim(y), data_axis)
            fn = jax.jit(body, in_shardings=(state_sh, x_sh, y_sh),
                         out_shardings=(state_sh, replicated),
                         donate_argnums=(0,) if donate else ())
            compiled[key] = (fn, state_sh, x_sh, y_sh)
        fn, state_sh, x_sh, y_sh = compiled[key]
        state = jax.device_put(state, state_sh)  # a no-op once the state lives there
        return fn(state, _place(x, x_sh), _place(y, y_sh))

    return step


def _place(value: Any, sharding: NamedSharding) -> Array:
    """A global array on ``sharding``: this process's rows when several processes run."""
    if jax.process_count() > 1:
        return jax.make_array_from_process_local_data(sharding, np.asarray(value))
    return jax.device_put(value, sharding)


def process_rows(batch: np.ndarray, process_index: int | None = None,
                 process_count: int | None = None) -> np.ndarray:
    """This process's contiguous block of a global batch (every process loads the same order).

    Rows ``[i * B / n, (i + 1) * B / n)`` of the B rows for process i of n.
    """
    i = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    if len(batch) % n:
        raise ValueError(f"a global batch of {len(batch)} rows does not split over "
                         f"{n} processes")
    size = len(batch) // n
    return batch[i * size:(i + 1) * size]


def fetch(tree: PyTree) -> PyTree:
    """A host (NumPy) copy of ``tree``: whole arrays in one process; with several processes
    each replicated array's local copy (params and metrics of a data-parallel step).

    Raises:
      ValueError: with several processes, an array that is split across them.
    """
    def one(leaf: Any) -> Any:
        if not isinstance(leaf, jax.Array) or jax.process_count() == 1:
            return np.asarray(leaf)
        if not leaf.is_fully_replicated:
            raise ValueError(f"an array of shape {leaf.shape} is split across processes "
                             f"({leaf.sharding}); gather it first")
        return np.asarray(leaf.addressable_data(0))

    return jax.tree.map(one, tree)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, cpu_collectives: str = "gloo") -> None:
    """Join a multi-process JAX run (``jax.distributed.initialize``) before anything else.

    Arguments left out are read from ``JAXBP_COORDINATOR`` /
    ``JAXBP_NUM_PROCESSES`` / ``JAXBP_PROCESS_ID``, then left to JAX, which
    detects Slurm, Open MPI and TPU/GPU pod environments itself. On CPU the
    collectives go through ``cpu_collectives`` (gloo by default).

    Run the same script in every process, e.g. on two hosts::

        JAXBP_COORDINATOR=host0:1234 JAXBP_NUM_PROCESSES=2 JAXBP_PROCESS_ID=0 python train.py
        JAXBP_COORDINATOR=host0:1234 JAXBP_NUM_PROCESSES=2 JAXBP_PROCESS_ID=1 python train.py

    On a TPU pod or a Slurm GPU cluster no variables are needed.
    """
    env = os.environ
    coordinator_address = coordinator_address or env.get("JAXBP_COORDINATOR")
    if num_processes is None and "JAXBP_NUM_PROCESSES" in env:
        num_processes = int(env["JAXBP_NUM_PROCESSES"])
    if process_id is None and "JAXBP_PROCESS_ID" in env:
        process_id = int(env["JAXBP_PROCESS_ID"])
    # Only the CPU backend reads this; it must be set before any backend starts.
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)
