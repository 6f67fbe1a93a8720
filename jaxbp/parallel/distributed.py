"""Multi-host start-up: join a ``jax.distributed`` run, split a global batch, fetch results.

Call :func:`initialize` in every process first (it wraps
``jax.distributed.initialize`` and reads ``JAXBP_*`` environment variables); each
process then passes its own rows of the global batch (:func:`process_rows`) to the
sharded step (:mod:`jaxbp.parallel.sharding`), which assembles the global array with
``jax.make_array_from_process_local_data``; :func:`fetch` brings replicated results home.
"""

from __future__ import annotations

import math
import os
import socket
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np

from jaxbp.types import PyTree, check_int


def process_rows(batch: np.ndarray, process_index: int | None = None,
                 process_count: int | None = None) -> np.ndarray:
    """This process's contiguous block of a global batch (every process loads the same order).

    Rows ``[i * B / n, (i + 1) * B / n)`` of the B rows for process i of n.

    Raises:
      ValueError: ``process_count`` < 1, ``process_index`` outside ``[0, process_count)``,
        or a batch that does not split evenly (each named with its value).
      TypeError: a batch that is not an array of rows, or an index or count that is not
        an integer.
    """
    if not hasattr(batch, "__len__") or np.ndim(batch) < 1:
        raise TypeError(f"batch must be an array of rows (the global batch), got "
                        f"{type(batch).__name__}: {batch!r}"[:200])
    i = jax.process_index() if process_index is None else process_index
    n = jax.process_count() if process_count is None else process_count
    for name, value in (("process_index", i), ("process_count", n)):
        if isinstance(value, bool) or not isinstance(value, int | np.integer):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}: {value!r}")
    if n < 1:
        raise ValueError(f"process_count must be >= 1, got {n}")
    if not 0 <= i < n:
        raise ValueError(f"process_index must be in [0, process_count) = [0, {n}), got {i}")
    if len(batch) % n:
        raise ValueError(f"a global batch of {len(batch)} rows does not split over "
                         f"process_count = {n} processes ({len(batch)} % {n} = "
                         f"{len(batch) % n})")
    size = len(batch) // n
    return batch[int(i) * size:(int(i) + 1) * size]


def fetch(tree: PyTree) -> PyTree:
    """A host (NumPy) copy of ``tree``: whole arrays in one process; with several processes
    each replicated array's local copy (params and metrics of a data-parallel step).

    Raises:
      ValueError: with several processes, an array that is split across them.
    """
    if jax.process_count() == 1:  # one transfer for the whole tree
        return jax.tree.map(np.asarray, jax.device_get(tree))

    def one(leaf: Any) -> Any:
        if not isinstance(leaf, jax.Array):
            return np.asarray(leaf)
        if not leaf.is_fully_replicated:
            raise ValueError(f"an array of shape {leaf.shape} is split across processes "
                             f"({leaf.sharding}); gather it first")
        return np.asarray(leaf.addressable_data(0))

    return jax.tree.map(one, tree)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def _env_ids(name: str) -> list[int] | None:
    value = os.environ.get(name)
    if not value:
        return None
    try:
        return [int(part) for part in value.split(",")]
    except ValueError:
        raise ValueError(f"environment variable {name} must be comma-separated device ids, "
                         f"got {value!r}") from None


def _wait_for_coordinator(address: str, timeout_s: int, process_id: int,
                          num_processes: int) -> int:
    """Retry a TCP connection to ``host:port`` until it opens; the seconds left of the wait.

    Raises:
      RuntimeError: nothing listens there within ``timeout_s``.
    """
    host, _, port = address.rpartition(":")
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=1.0):
                return max(1, math.ceil(deadline - time.monotonic()))
        except (OSError, ValueError):
            if time.monotonic() >= deadline:
                raise RuntimeError(
                    f"process {process_id} of {num_processes} could not join the run at "
                    f"{address} within {timeout_s} s: no coordinator (process 0) is "
                    f"listening there. Start process 0 with the same JAXBP_COORDINATOR, or "
                    f"raise JAXBP_INIT_TIMEOUT") from None
            time.sleep(0.2)


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, local_device_ids: Sequence[int] | None = None,
               timeout_s: int | None = None, heartbeat_timeout_s: int | None = None,
               cpu_collectives: str = "gloo") -> None:
    """Join a multi-process JAX run (``jax.distributed.initialize``) before anything else.

    Arguments left out are read from ``JAXBP_COORDINATOR``,
    ``JAXBP_NUM_PROCESSES``, ``JAXBP_PROCESS_ID``, ``JAXBP_LOCAL_DEVICE_IDS``
    (e.g. ``0`` or ``0,1``), ``JAXBP_INIT_TIMEOUT`` and
    ``JAXBP_HEARTBEAT_TIMEOUT``, then left to JAX, which detects Slurm, Open
    MPI and TPU/GPU pod environments itself. On CPU the collectives go
    through ``cpu_collectives`` (gloo by default).

    Args:
      coordinator_address: ``host:port`` of process 0.
      num_processes, process_id: this run's size and this process's rank.
      local_device_ids: the local GPUs this process owns (one process per
        GPU: process i passes ``[i]``); None gives it every visible device.
      timeout_s: how long to wait for every process to join (default 300 s).
        A process other than 0 first waits for the coordinator to listen and
        raises a ``RuntimeError`` naming it if it never does; a wait for a
        missing peer that runs out ends the process with XLA's own
        ``DEADLINE_EXCEEDED`` message (XLA exits rather than raise), after the
        line this function prints naming what it waits for.
      heartbeat_timeout_s: how long a silent peer is waited for once the run
        is up (JAX's default 100 s); then the others stop with an error.
        Resume from the last checkpoint after restarting every process.

    Run the same script in every process, e.g. on two hosts::

        JAXBP_COORDINATOR=host0:1234 JAXBP_NUM_PROCESSES=2 JAXBP_PROCESS_ID=0 python train.py
        JAXBP_COORDINATOR=host0:1234 JAXBP_NUM_PROCESSES=2 JAXBP_PROCESS_ID=1 python train.py

    On one node with 8 GPUs, one process per GPU: the same with
    ``JAXBP_NUM_PROCESSES=8``, ``JAXBP_PROCESS_ID=i`` and
    ``JAXBP_LOCAL_DEVICE_IDS=i``. Under Slurm (``srun --ntasks-per-node=8
    --gpus-per-task=1``) or on a TPU pod no variables are needed.

    Raises:
      ValueError: an environment variable that is not a number; a number of processes
        below 1, or a process id outside [0, num_processes).
      RuntimeError: not every process joined within ``timeout_s``.
    """
    coordinator_address = coordinator_address or os.environ.get("JAXBP_COORDINATOR")
    num_processes = num_processes if num_processes is not None else _env_int(
        "JAXBP_NUM_PROCESSES")
    process_id = process_id if process_id is not None else _env_int("JAXBP_PROCESS_ID")
    if local_device_ids is None:
        local_device_ids = _env_ids("JAXBP_LOCAL_DEVICE_IDS")
    timeout_s = timeout_s if timeout_s is not None else _env_int("JAXBP_INIT_TIMEOUT")
    heartbeat_timeout_s = (heartbeat_timeout_s if heartbeat_timeout_s is not None
                           else _env_int("JAXBP_HEARTBEAT_TIMEOUT"))
    timeout_s = 300 if timeout_s is None else timeout_s
    for name, value in (("timeout_s", timeout_s), ("heartbeat_timeout_s", heartbeat_timeout_s)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1 second, got {value}")
    check_int("num_processes", num_processes, 1, optional=True)
    check_int("process_id", process_id, 0, optional=True)
    if process_id is not None and num_processes is not None:
        if process_id >= num_processes:
            raise ValueError(f"process_id must be in [0, num_processes) = [0, "
                             f"{num_processes}), got {process_id}")
    # Only the CPU backend reads this; it must be set before any backend starts.
    jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    extra = {} if heartbeat_timeout_s is None else {
        "heartbeat_timeout_seconds": heartbeat_timeout_s}
    if num_processes is not None and num_processes > 1:
        print(f"jaxbp: process {process_id} of {num_processes} joining {coordinator_address} "
              f"(waiting up to {timeout_s} s for the others)", file=sys.stderr, flush=True)
        if process_id and coordinator_address:
            # XLA ends the whole process (no exception) when its wait runs out; a coordinator
            # that never comes up is found here first, with a message that says so.
            timeout_s = _wait_for_coordinator(coordinator_address, timeout_s, process_id,
                                              num_processes)
    try:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id,
                                   local_device_ids=local_device_ids,
                                   initialization_timeout=timeout_s, **extra)
    except Exception as err:  # XLA raises its own status types; name what was waited for
        first_line = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "before any JAX calls" in first_line:   # not a wait: JAX had started already
            raise RuntimeError(f"jaxbp.parallel.initialize() must run before anything "
                               f"starts JAX in this process (a computation, jax.devices(), "
                               f"a jaxbp call): {first_line}") from err
        raise RuntimeError(
            f"process {process_id} of {num_processes} could not join the run at "
            f"{coordinator_address} within {timeout_s} s: {first_line}. Start every process "
            f"with the same coordinator and number of processes (or raise "
            f"JAXBP_INIT_TIMEOUT)") from err


def gather_params(params: PyTree) -> PyTree:
    """Params this process can evaluate: as they are, or gathered from every process."""
    if jax.process_count() == 1:
        return params
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(params, tiled=True)
