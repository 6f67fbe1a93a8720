"""One epoch of a run: the compiled k-step loops, the chunks through them, the epoch's line.

:func:`train_loop` keeps one jitted loop per (net, optimizer, k, gradient source, mesh),
so a second :func:`jaxbp.fit` of the same setting compiles nothing.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math
import time
from collections.abc import Iterable, Iterator
from typing import Any

import numpy as np

from jaxbp import parallel
from jaxbp.data import AnyDataset
from jaxbp.diagnostics import layer_stats, layer_stats_places
from jaxbp.mlp import Net
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


@dataclasses.dataclass
class RunTally:
    """What the host has read of a run, shared by its epochs (an epoch's last chunk may
    be read after the next epoch has started): ``done``, the steps whose metrics it read
    (the next chunk's first step is ``done + 1``), and ``written``, the
    ``time.perf_counter()`` at which it last wrote an epoch's line."""

    done: int
    written: float = -math.inf


def train_epoch(loop_of: Any, chunks: Iterable[Any], state: TrainState, tally: RunTally,
                new_bar: Any, then: Any = None, ahead: Any = None, behind: Any = None
                ) -> tuple[TrainState, Any, Any]:
    """One epoch of chunks, dispatched: the state after it (a device value), ``finish``
    and what ``ahead()`` returned (the next epoch's :func:`epoch_chunks`; None without
    ``ahead``). ``finish()`` waits for the epoch's end and returns the sums of its steps'
    loss and accuracy and the host copy of ``then(state)`` (device values: the epoch's
    evaluation; None without ``then``), having counted the steps into ``tally``.

    The device is never left waiting on the host: a chunk's metrics are read while the
    next chunk runs; the last chunk's together with ``then``'s values, dispatched before
    that wait, as is ``ahead`` (the next epoch's first data). ``behind`` (the epoch
    before's ``finish``, when the caller defers it) is called once this epoch's first
    chunk is running, so that the host's reading and writing of that epoch's line overlap
    the device's work; then ``new_bar()`` makes this epoch's progress bar (or None). One
    wait per chunk.

    ``finish`` raises what :func:`jaxbp.train.feeds.check_chunk` raises, naming the step.
    """
    sums, bar = {"loss": 0.0, "accuracy": 0.0}, None

    def settle(metrics: dict[str, np.ndarray], k: int) -> None:
        feeds.check_chunk(metrics, tally.done)
        sums["loss"] += float(np.sum(metrics["loss"]))
        sums["accuracy"] += float(np.sum(metrics.get("accuracy", math.nan)))
        tally.done += k
        if bar is not None:
            bar.update(k)
            bar.set_postfix(loss=f"{float(metrics['loss'][-1]):.4f}")

    pending = None
    for xs, ys, *masks in chunks:
        state, metrics = loop_of(len(xs))(state, xs, ys, *masks)
        if pending is None:                      # the first chunk is running
            if behind is not None:
                behind()
            bar = new_bar()
        else:                                    # the previous chunk's, this one running
            settle(parallel.fetch(pending[0]), pending[1])
        pending = (metrics, len(xs))
    if pending is None and behind is not None:
        behind()
    after = None if then is None else then(state)
    upcoming = None if ahead is None else ahead()

    def finish() -> tuple[dict[str, float], Any]:
        last, scores = parallel.fetch((None if pending is None else pending[0], after))
        if pending is not None:
            settle(last, pending[1])
        if bar is not None:
            bar.close()
        return sums, scores

    return state, finish, upcoming


def evaluation_of(net: Net, test: tuple[Any, Any], eval_batch_size: int) -> Any:
    """``state -> device sums of the test evaluation`` (:func:`jaxbp.train.step.eval_sums`)
    of the state's params, gathered from every process when there are several."""
    def then(state: TrainState) -> Any:
        return eval_sums(net, parallel.gather_params(state.params), *test, eval_batch_size)

    return then


def epoch_row(net: Net, test_sums: Any, sums: dict[str, float], steps: int, epoch: int,
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


def layer_stats_lists(net: Net, params: Params, data: AnyDataset, n: int) -> dict[str, list[Any]]:
    """:func:`jaxbp.layer_stats` on the first ``n`` training samples, as lists, with where
    each entry sits (``"layers"``: :func:`jaxbp.diagnostics.layer_stats_places`)."""
    stats = layer_stats(net, params, data.x_train[:n], data.y_train[:n])
    return {**{k: [float(v) for v in np.asarray(a)] for k, a in stats.items()},
            "layers": layer_stats_places(net)}


def progress_bar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (logs, CI)
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)


def epoch_line(net: Net, row: dict[str, float], epochs: int) -> str:
    line = f"epoch {row['epoch']:>3}/{epochs}  train loss {row['train_loss']:.4f}"
    if net.loss_fn.is_classification:
        line += f" acc {row['train_accuracy']:.4f}"
    line += f"  test loss {row['test_loss']:.4f}"
    if net.loss_fn.is_classification:
        line += f" acc {row['test_accuracy']:.4f}"
    if "epsilon" in row:
        line += f"  epsilon {row['epsilon']:.3f}"
    seconds = row["seconds"]   # a short epoch in ms: "(0.00 s)" read as if it had not run
    return line + (f"  ({seconds * 1e3:.1f} ms)" if seconds < 0.1 else f"  ({seconds:.2f} s)")


