"""What defines a training run: recorded with its checkpoints, compared when it resumes.

A checkpoint restores only into a state of the same tree, shapes and dtypes;
that cannot tell a relu net from a tanh net of the same sizes, adam at 1e-3
from adam at 1e-2, or another seed, batch size or data set. :func:`describe_run`
records each of those as a JSON-able value; :func:`run_differences` names the
ones that differ, and :func:`jaxbp.fit` refuses to resume across them unless
asked to (``allow_run_change=True``, ``jaxbp train --allow-run-change``).

The optimizer is an optax ``GradientTransformation``: a pair of closures with
no public hyperparameters. It is described by walking its ``update``
function's closure cells: the names of the functions it chains and every
number, string and small array they hold (adam's b1, b2, eps, the learning
rate or the schedule's parameters). Two optimizers that differ in any of
those differ here; a value hidden elsewhere (a global) is not seen.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxbp.train.checkpoint import where_they_differ

_MAX_DEPTH = 32   # a chain of a clip and adamw on a schedule holds its numbers at depth 13
_SMALL_ARRAY = 16
SPELLINGS = frozenset({"data"})
"""Entries kept for the reader but never compared: the data's path as typed (``./d.npz``,
an absolute path, a renamed copy); the data's identity is its ``data_sha256``."""


def describe(obj: Any, depth: int = 0) -> Any:
    """A JSON-able description of a value, a function's closure or an optax transformation."""
    if depth > _MAX_DEPTH:
        return "..."
    if isinstance(obj, bool | int | float | str | type(None)):
        return obj
    if isinstance(obj, np.ndarray | jax.Array | np.generic):
        if jax.dtypes.issubdtype(getattr(obj, "dtype", None), jax.dtypes.prng_key):
            obj = jax.random.key_data(obj)
        array = np.asarray(obj)
        return array.tolist() if array.size <= _SMALL_ARRAY else f"array{array.shape}"
    if hasattr(obj, "update") and hasattr(obj, "init"):  # an optax GradientTransformation
        return describe(obj.update, depth + 1)
    if isinstance(obj, tuple | list):
        return [describe(value, depth + 1) for value in obj]
    if isinstance(obj, dict):
        return {str(k): describe(v, depth + 1) for k, v in obj.items()}
    if callable(obj):
        cells = getattr(obj, "__closure__", None) or ()
        return [getattr(obj, "__qualname__", type(obj).__name__),
                [describe(cell.cell_contents, depth + 1) for cell in cells]]
    return type(obj).__name__


def data_fingerprint(arrays: Any) -> str:
    """SHA-256 of the arrays' shapes, dtypes and bytes (the data a run trained on)."""
    sha = hashlib.sha256()
    for array in arrays:
        array = np.ascontiguousarray(array)
        sha.update(str((array.shape, array.dtype.str)).encode())
        sha.update(array.tobytes())
    return sha.hexdigest()


def describe_run(net: Any, optimizer: Any, grad: str | Callable[..., Any], batch_size: int,
                 drop_last: bool, key: Any, data: Any,
                 extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The record of what defines a run (see the module docstring).

    Args:
      net: the network description (its repr names every field).
      optimizer: the optax transformation.
      grad: the gradient source's name, or the source itself.
      batch_size, drop_last: the batching.
      key: the PRNG key that orders the batches (the run's seed).
      data: the data set's arrays.
      extra: the caller's own entries (the command line adds its options).
    """
    return {"net": repr(net), "optimizer": describe(optimizer), "grad": describe(grad),
            "batch_size": batch_size, "drop_last": drop_last, "seed_key": describe(key),
            "data_sha256": data_fingerprint(data), **describe(extra or {})}


def run_differences(saved: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """One line per entry that differs between a saved run record and this run's."""
    lines = []
    for name in sorted((set(saved) | set(now)) - SPELLINGS):
        before, after = saved.get(name, "(absent)"), now.get(name, "(absent)")
        if before != after:
            shown = where_they_differ(repr(before), repr(after))
            lines.append(f"{name}: checkpoint {shown[0]}, now {shown[1]}")
    return lines

