"""One epoch of a run: the compiled k-step loops, the chunks through them, the epoch's line.

:func:`train_loop` keeps one jitted loop per (net, optimizer, k, gradient source, mesh),
so a second :func:`jaxbp.fit` of the same setting compiles nothing.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from jaxbp import parallel
from jaxbp.data import Dataset
from jaxbp.diagnostics import layer_stats
from jaxbp.mlp import MLP
from jaxbp.train import feeds
from jaxbp.train.step import TrainState, eval_sums, make_train_loop, scores_of
from jaxbp.types import Params, PRNGKey

_LOOPS: dict[Any, Any] = {}
"""Compiled train loops of earlier ``fit`` calls, by (net, optimizer, steps, grad, mesh)."""
_MAX_LOOPS = 32


def train_loop(net: Any, optimizer: Any, steps: int, grad: Any, mesh: Any) -> Any:
    """The k-step train loop, the same jitted function for the same (net, optimizer object,
    k, gradient source, mesh): a second ``fit`` of the same setting compiles nothing (jit's
    cache answers). An unhashable gradient source gets a fresh loop."""
    key = (net, optimizer, steps, grad, mesh)
    try:
        hash(key)
    except TypeError:
        key = None
    if key is None or key not in _LOOPS:
        loop = (make_train_loop(net, optimizer, steps=steps, grad=grad) if mesh is None
                else parallel.make_sharded_train_loop(net, optimizer, mesh, steps, grad))
        if key is None:
            return loop
        if len(_LOOPS) >= _MAX_LOOPS:
            _LOOPS.pop(next(iter(_LOOPS)))
        _LOOPS[key] = loop
    return _LOOPS[key]


def loops_of(net: Any, optimizer: Any, grad: Any, mesh: Any) -> Any:
    """``loop_of(k)``: the compiled k-step loop of this run (at most three lengths)."""
    loops: dict[int, Any] = {}

    def loop_of(k: int) -> Any:
        if k not in loops:
            loops[k] = train_loop(net, optimizer, k, grad, mesh)
        return loops[k]

    return loop_of


def epoch_chunks(feed: Any, key_data: PRNGKey, epoch: int, chunk: int) -> Iterator[Any]:
    """Epoch ``epoch``'s chunks from ``feed``, the first one already dispatched (its
    shuffle, slice and gather queued on the device before anything else is asked)."""
    chunks = feed.chunks(feeds.fold_in(key_data, epoch), chunk)
    first = next(chunks, None)
    return chunks if first is None else itertools.chain([first], chunks)


def chunks_and_ahead(feed: Any, key_data: PRNGKey, epoch: int, epochs: int, chunk: int,
                     upcoming: Any) -> tuple[Iterable[Any], Any]:
    """This epoch's chunks (``upcoming`` when the epoch before fetched them ahead) and the
    thunk that fetches the next epoch's, for :func:`train_epoch`'s ``ahead``: device data
    only (a Poisson feed draws on the host and warns as it draws, never ahead of its
    epoch), and None after the last epoch."""
    chunks = upcoming if upcoming is not None else epoch_chunks(feed, key_data, epoch, chunk)
    if not feed.on_device or epoch + 1 >= epochs:
        return chunks, None
    return chunks, functools.partial(epoch_chunks, feed, key_data, epoch + 1, chunk)


def train_epoch(loop_of: Any, chunks: Iterable[Any], state: TrainState, step_count: int,
                bar: Any, then: Any = None, ahead: Any = None
                ) -> tuple[TrainState, dict[str, float], int, Any, Any]:
    """One epoch of chunks: the state after it, the sums of its steps' loss and accuracy,
    the step count after it, the host copy of ``then(state)`` (device values: the
    epoch's evaluation; None without ``then``) and what ``ahead()`` returned (the next
    epoch's :func:`epoch_chunks`; None without ``ahead``).

    The device is never left waiting on the host: a chunk's metrics are read while the
    next chunk runs, and the last chunk's together with ``then``'s values, dispatched
    before that wait, as is ``ahead`` (so the next epoch's first data are on their way
    while the host writes this epoch's line). One wait per chunk.

    Raises what :func:`jaxbp.train.feeds.check_chunk` raises, naming the step.
    """
    sums = {"loss": 0.0, "accuracy": 0.0}

    def settle(metrics: dict[str, np.ndarray], k: int, step_count: int) -> int:
        feeds.check_chunk(metrics, step_count)
        sums["loss"] += float(np.sum(metrics["loss"]))
        sums["accuracy"] += float(np.sum(metrics.get("accuracy", math.nan)))
        if bar is not None:
            bar.update(k)
            bar.set_postfix(loss=f"{float(metrics['loss'][-1]):.4f}")
        return step_count + k

    pending = None
    for xs, ys, *masks in chunks:
        state, metrics = loop_of(len(xs))(state, xs, ys, *masks)
        if pending is not None:                  # the previous chunk's, this one running
            step_count = settle(parallel.fetch(pending[0]), pending[1], step_count)
        pending = (metrics, len(xs))
    after = None if then is None else then(state)
    upcoming = None if ahead is None else ahead()
    last, after = parallel.fetch((None if pending is None else pending[0], after))
    if pending is not None:
        step_count = settle(last, pending[1], step_count)
    if bar is not None:
        bar.close()
    return state, sums, step_count, after, upcoming


def evaluation_of(net: MLP, test: tuple[Any, Any], eval_batch_size: int) -> Any:
    """``state -> device sums of the test evaluation`` (:func:`jaxbp.train.step.eval_sums`)
    of the state's params, gathered from every process when there are several."""
    def then(state: TrainState) -> Any:
        return eval_sums(net, parallel.gather_params(state.params), *test, eval_batch_size)

    return then


def epoch_row(net: MLP, test_sums: Any, sums: dict[str, float], steps: int, epoch: int,
              start: float) -> dict[str, float]:
    """The epoch's line of the history: train means, the test evaluation (from the host
    copy of its sums), seconds."""
    scores = scores_of(net, test_sums)
    return {"epoch": epoch + 1,
            "train_loss": sums["loss"] / steps,
            "train_accuracy": sums["accuracy"] / steps,
            "test_loss": scores["loss"],
            "test_accuracy": scores.get("accuracy", math.nan),
            "seconds": time.perf_counter() - start}


def layer_stats_lists(net: MLP, params: Params, data: Dataset, n: int) -> dict[str, list[float]]:
    """:func:`jaxbp.layer_stats` on the first ``n`` training samples, as lists."""
    stats = layer_stats(net, params, data.x_train[:n], data.y_train[:n])
    return {k: [float(v) for v in np.asarray(a)] for k, a in stats.items()}


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (logs, CI)
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)


def epoch_line(net: MLP, row: dict[str, float], epochs: int) -> str:
    line = f"epoch {row['epoch']:>3}/{epochs}  train loss {row['train_loss']:.4f}"
    if net.loss_fn.is_classification:
        line += f" acc {row['train_accuracy']:.4f}"
    line += f"  test loss {row['test_loss']:.4f}"
    if net.loss_fn.is_classification:
        line += f" acc {row['test_accuracy']:.4f}"
    if "epsilon" in row:
        line += f"  epsilon {row['epsilon']:.3f}"
    return line + f"  ({row['seconds']:.2f} s)"


