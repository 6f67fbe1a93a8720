"""The train step over a device mesh (``jax.sharding``), on one host or many (``jax.distributed``).

The hand-written recursion is not rewritten for parallelism. The step is the
same pure function as :func:`jaxbp.make_train_step`, compiled with explicit
:class:`~jax.sharding.NamedSharding` s for its inputs and outputs, and XLA's
SPMD partitioner derives the collectives from them:

* **data parallel** (mesh axis ``"data"``): x and y are split over their batch
  rows. ``dC/dW = a^T delta`` contracts over the batch, so XLA sums the
  per-device partial products with an all-reduce; ``delta @ W^T`` and the
  forward pass need no communication.
* **model parallel** (optional mesh axis ``"model"``), Megatron style: the
  layers alternate between a column split (``W^l`` over its fan_out, ``b^l``
  with it) and a row split (``W^{l+1}`` over its fan_in, ``b^{l+1}``
  replicated). In the forward pass ``z^l = a W^l`` is local and leaves
  ``a^l`` split over its features, exactly the split the row-split
  ``W^{l+1}`` contracts, so the pair needs one all-reduce (of the partial
  ``z^{l+1}``); in the recursion ``delta^{l+1} W^{l+1 T}`` is local and
  ``delta^l W^{l T}`` needs the pair's one all-reduce. Splitting every layer
  by fan_out instead would all-gather every activation. A layer whose
  dimension does not divide evenly stays replicated and the alternation
  starts again after it (:func:`layer_splits`).

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

from collections.abc import Callable, Sequence
from typing import Any

import jax
import numpy as np
import optax
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from jaxbp import input_checks, tied_embedding
from jaxbp.matmul_precision import check_precision, precision_scope
from jaxbp.mlp import Net
from jaxbp.train.state import check_not_donated
from jaxbp.train.step import (
    GradFn,
    TrainLoop,
    TrainState,
    check_optimizer,
    gradient_source,
    make_train_loop,
    sample_rank,
    update_step,
)
from jaxbp.types import Array, ArrayLike, PyTree, check_bool, check_int, is_int

DATA, MODEL = "data", "model"


def make_mesh(data: int | None = None, model: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ``(data, model)`` mesh over ``devices`` (default: all of them, every process's).

    Built with :func:`jax.make_mesh`, which orders the devices for the
    interconnect (TPU rings, NVLink islands); the axes are ``Auto``, so the
    compiler places the collectives.

    Args:
      data: devices along the batch axis; default all devices / ``model``.
      model: devices along the weights' split axis (1: pure data parallel).
      devices: the devices to use, default ``jax.devices()``.

    Raises:
      ValueError: the sizes do not multiply to the number of devices.
    """
    devices = list(jax.devices() if devices is None else devices)
    if not is_int(model) or model < 1 \
            or len(devices) % model:
        raise ValueError(f"model must be an int >= 1 that divides the {len(devices)} devices, "
                         f"got {model!r}")
    data = len(devices) // model if data is None else check_int("data", data, 1)
    if data * model != len(devices):
        raise ValueError(f"data x model = {data!r} x {model} must equal the {len(devices)} "
                         f"devices")
    return jax.make_mesh((int(data), int(model)), (DATA, MODEL), (AxisType.Auto, AxisType.Auto),
                         devices=devices)


def _axis_size(mesh: Mesh, axis: str | None) -> int:
    return mesh.shape[axis] if axis is not None and axis in mesh.shape else 1


def layer_splits(shapes: Sequence[tuple[int, int] | None],
                 model_size: int) -> tuple[str, ...]:
    """Per dense layer ``(fan_in, fan_out)``: ``"column"``, ``"row"`` or ``"replicated"``.

    A layer is row-split when the one before it was column-split (its output
    arrives split over features) and its fan_in divides evenly; else
    column-split when its fan_out divides; else replicated. With
    ``model_size`` 1 everything is replicated. A ``None`` entry (a layer record without
    the ``model_axis_fans`` capability: conv, pooling, layernorm, attention, ...)
    stays replicated and ends any pair.
    """
    splits: list[str] = []
    for shape in shapes:
        if shape is None:
            splits.append("replicated")
            continue
        fan_in, fan_out = shape
        previous = splits[-1] if splits else None
        if model_size > 1 and previous == "column" and fan_in % model_size == 0:
            splits.append("row")
        elif model_size > 1 and fan_out % model_size == 0:
            splits.append("column")
        else:
            splits.append("replicated")
    return tuple(splits)


def _network(net: Any) -> Any:
    from jaxbp import network

    return network.as_network(net)


def _records(net: Any) -> tuple[Any, ...]:
    return _network(net).layers


def _fans(layer: Any, params: Any) -> tuple[int, int] | None:
    """The record's ``(fan_in, fan_out)`` for the model axis, None without the capability."""
    fans = getattr(layer, "model_axis_fans", None)
    return None if fans is None else fans(params)


def state_shardings(state: PyTree, mesh: Mesh, model_axis: str | None = MODEL, *,
                    net: Any) -> PyTree:
    """A NamedSharding for every leaf of ``net``'s TrainState.

    Each layer record that can be split over the model axis says so
    (``model_axis_fans``, ``model_axis_specs``: Dense); :func:`layer_splits` pairs
    those layers. The params and every optimizer moment shaped like them (a subtree
    with the params' structure and shapes: adam's mu and nu, momentum's trace)
    follow the splits; everything else (the step, counts, the layers that cannot be
    split) is replicated.
    """
    size = _axis_size(mesh, model_axis)
    params = state.params
    records = _records(net)
    # a tied head's weight is the table transposed: split as its shape says, held by none
    seen = tied_embedding.layer_params(_network(net), params)
    shapes = tuple(_fans(layer, p) for layer, p in zip(records, seen))
    splits = layer_splits(shapes, size)
    replicated = NamedSharding(mesh, PartitionSpec())
    param_shardings = tuple(
        jax.tree.map(lambda _: replicated, layer_params) if split == "replicated" else
        {name: NamedSharding(mesh, spec)
         for name, spec in layer.model_axis_specs(split, model_axis).items()
         if name in layer_params}
        for layer, layer_params, split in zip(records, params, splits))
    structure = jax.tree.structure(params)
    leaf_shapes = [np.shape(leaf) for leaf in jax.tree.leaves(params)]

    def like_params(node: Any) -> bool:
        return (jax.tree.structure(node) == structure
                and [np.shape(leaf) for leaf in jax.tree.leaves(node)] == leaf_shapes)

    return jax.tree.map(lambda node: param_shardings if like_params(node) else replicated,
                        state, is_leaf=like_params)


def batch_sharding(mesh: Mesh, ndim: int, data_axis: str = DATA,
                   batch_dim: int = 0) -> NamedSharding:
    """An ``ndim``-dimensional batch array split over ``data_axis`` along ``batch_dim``
    (0 for one batch, 1 for a chunk of batches ``(k, batch, ...)``)."""
    _check_data_axis(mesh, data_axis)
    spec = [None] * ndim
    spec[batch_dim] = data_axis
    return NamedSharding(mesh, PartitionSpec(*spec))


def _check_step_arguments(optimizer: Any, mesh: Mesh, data_axis: str,
                          precision: str | None, donate: Any) -> None:
    check_optimizer(optimizer)
    check_precision(precision)
    check_bool("donate", donate)
    if not isinstance(mesh, Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (jaxbp.parallel.make_mesh), got "
                        f"{type(mesh).__name__}")
    _check_data_axis(mesh, data_axis)


def _check_data_axis(mesh: Mesh, data_axis: str) -> None:
    if data_axis not in mesh.shape:
        raise ValueError(f"mesh has axes {tuple(mesh.shape)}, no data_axis {data_axis!r}")


def _over_mesh(net: Any, body: Callable[..., Any], mesh: Mesh, data_axis: str,
               model_axis: str | None, donate: bool, batch_dim: int) -> Callable[..., Any]:
    """``body(state, x, y, *rest) -> (state, metrics)`` compiled over ``mesh``, once per
    shape.

    The state is placed on :func:`state_shardings`, x, y and the rest (a loop's masks)
    split over ``data_axis`` along ``batch_dim``; metrics come back replicated. The
    returned function has ``.lower(state, x, y, *rest)`` for the HLO.
    """
    n_data = mesh.shape[data_axis]
    replicated = NamedSharding(mesh, PartitionSpec())
    compiled: dict[Any, tuple[Any, ...]] = {}

    def program(state: TrainState, batch: tuple[Any, ...]):
        names = ("x", "y", "masks")
        batch = tuple(input_checks.as_array(name, a) for name, a in zip(names, batch))
        x, y = batch[:2]
        if batch_dim and (np.ndim(x) != sample_rank(net) + 2 or np.ndim(y) < 2):
            raise ValueError(f"xs has shape {np.shape(x)} and ys {np.shape(y)} but expected "
                             f"(steps, batch, *sample) and (steps, batch, ...): one batch per "
                             f"step (the sharded loop splits each step's batch)")
        local_rows = int(np.shape(x)[batch_dim]) if np.ndim(x) > batch_dim else 0
        global_rows = local_rows * jax.process_count()
        if global_rows % n_data:
            raise ValueError(f"the global batch of {global_rows} rows does not split evenly "
                             f"over the {n_data} devices of mesh axis {data_axis!r}; use a "
                             f"multiple of {n_data} (drop or pad the last batch)")
        key = (jax.tree.structure(state), tuple(np.shape(a) for a in jax.tree.leaves(state)),
               tuple((np.shape(a), str(a.dtype)) for a in batch))
        if key not in compiled:  # shardings and the program, once per shape
            state_sh = state_shardings(state, mesh, model_axis, net=net)
            batch_sh = tuple(batch_sharding(mesh, np.ndim(a), data_axis, batch_dim)
                             for a in batch)
            fn = jax.jit(body, in_shardings=(state_sh, *batch_sh),
                         out_shardings=(state_sh, replicated),
                         donate_argnums=(0,) if donate else ())
            compiled[key] = (fn, state_sh, batch_sh)
        return compiled[key]

    def placed(state: TrainState, batch: tuple[Any, ...]) -> tuple[Any, ...]:
        fn, state_sh, batch_sh = program(state, batch)
        state = jax.device_put(state, state_sh)  # a no-op once the state lives there
        return fn, state, *(_place(a, sh) for a, sh in zip(batch, batch_sh))

    def step(state: TrainState, x: ArrayLike, y: ArrayLike, *rest: ArrayLike):
        check_not_donated(state)
        fn, *arguments = placed(state, (x, y, *rest))
        return fn(*arguments)

    def lower(state: TrainState, x: ArrayLike, y: ArrayLike, *rest: ArrayLike):
        """The step's ``jax.stages.Lowered`` for these shapes (``.compile().as_text()``
        shows the collectives XLA placed)."""
        fn, *arguments = placed(state, (x, y, *rest))
        return fn.lower(*arguments)

    step.lower = lower
    return step


def make_sharded_train_step(
    net: Net,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    grad: str | GradFn = "backprop",
    data_axis: str = DATA,
    model_axis: str | None = MODEL,
    donate: bool = True,
    precision: str | None = None,
) -> Callable[[TrainState, ArrayLike, ArrayLike], tuple[TrainState, dict[str, Array]]]:
    """:func:`jaxbp.make_train_step` over ``mesh``: the same numbers, data (and model) parallel.

    Args:
      net, optimizer, grad, donate, precision: as :func:`jaxbp.make_train_step`.
      mesh: a :class:`jax.sharding.Mesh`, e.g. :func:`make_mesh`.
      data_axis: the mesh axis the batch is split over.
      model_axis: the mesh axis the weights are split over (:func:`layer_splits`;
        ignored when the mesh has no such axis or it has size 1).

    Returns:
      ``step(state, x, y) -> (state, metrics)``. ``state`` may live anywhere
      (it is placed on its shardings); x and y may be host or device arrays
      of the global batch, or, with several processes, each process's rows
      (:func:`process_rows`). The state comes back on its declared shardings
      (:func:`state_shardings`); metrics are replicated. ``step.lower(state,
      x, y)`` gives the lowered program (its HLO shows the collectives).

    Raises:
      ValueError: the global batch does not split evenly over ``data_axis``.
    """
    gradient = gradient_source(grad)
    _check_step_arguments(optimizer, mesh, data_axis, precision, donate)

    def body(state: TrainState, x: Array, y: Array):
        x, y = input_checks.check_inputs(net, state.params, x, y)
        with precision_scope(precision):
            return update_step(net, optimizer, gradient, state, x, y)

    return _over_mesh(net, body, mesh, data_axis, model_axis, donate, batch_dim=0)


def make_sharded_train_loop(
    net: Net,
    optimizer: optax.GradientTransformation,
    mesh: Mesh,
    steps: int,
    grad: str | GradFn = "backprop",
    data_axis: str = DATA,
    model_axis: str | None = MODEL,
    donate: bool = True,
    precision: str | None = None,
) -> TrainLoop:
    """:func:`jaxbp.make_train_loop` over ``mesh``: k steps in one scan, data (and model)
    parallel, as :func:`make_sharded_train_step` shards one.

    Returns:
      ``loop(state, xs, ys) -> (state, metrics)`` with ``xs: (k, batch, n_in)``
      (with several processes each process's rows of every batch,
      ``(k, batch / processes, n_in)``); the batch axis is split over
      ``data_axis``. Metrics have a leading axis of k and are replicated.
      ``loop(state, xs, ys, masks)``: padded batches, as :func:`jaxbp.make_train_loop`
      takes them (DP-SGD's Poisson batches), ``masks`` (k, batch) split like the rows.
    """
    _check_step_arguments(optimizer, mesh, data_axis, precision, donate)
    loop = make_train_loop(net, optimizer, steps, grad, donate=False, precision=precision)

    return _over_mesh(net, loop, mesh, data_axis, model_axis, donate, batch_dim=1)


def _place(value: Any, sharding: NamedSharding) -> Array:
    """A global array on ``sharding``: this process's rows when several processes run."""
    if jax.process_count() > 1:
        return jax.make_array_from_process_local_data(sharding, np.asarray(value))
    return jax.device_put(value, sharding)
