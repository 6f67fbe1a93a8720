"""The epoch loop: batches, the jitted step, progress, evaluation, checkpoints, resume, plots.

:func:`fit` is the research-script entry point; all numerical work is the
jitted step of :mod:`jaxbp.train`. Epoch e shuffles with
``jax.random.fold_in(key, e)``, so the batch order depends only on the key and
the epoch: a run stopped after epoch 3 and resumed from its checkpoint gives
the same params, bit for bit, as a run that never stopped.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import pathlib
import tempfile
import time
import warnings
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbp import _checks, checkpoint, network, parallel, sources
from jaxbp._typing import Params, PRNGKey
from jaxbp.data import Dataset, epoch_order, num_batches
from jaxbp.diagnostics import layer_stats
from jaxbp.mlp import MLP
from jaxbp.network import Network
from jaxbp.run_config import describe_run, run_differences
from jaxbp.train import (
    GradFn,
    TrainState,
    check_optimizer,
    evaluate_checked,
    make_train_loop,
)

HISTORY_KEYS = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
                "seconds")


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    Attributes:
      state: the final :class:`~jaxbp.train.TrainState`.
      history: per epoch (lists, one entry per epoch since the first run):
        ``epoch`` (1-based), ``train_loss``/``train_accuracy`` (means over the
        epoch's steps), ``test_loss``/``test_accuracy`` (:func:`evaluate` after
        the epoch; accuracies are nan for squared error), ``seconds``.
    """

    state: TrainState
    history: dict[str, list[float]]


DEVICE_DATA_BYTES = 2 * 2**30
"""Data sets up to this size (x and y of train and test together) are put on the device
once and batched there; larger ones are gathered on the host chunk by chunk and copied
to the device one chunk ahead of the step that needs it."""

CHUNK_STEPS = 100
"""Default steps per compiled chunk: the host waits for the device once per chunk."""


def _check_chunk(metrics: dict[str, np.ndarray], first_step: int) -> None:
    """Raise for the first step of a chunk that went wrong; steps are numbered from 1.

    Raises:
      FloatingPointError: a loss or a layer's gradient that is NaN/inf.
      ValueError: labels outside ``[0, n_out)`` in a batch.
    """
    layers = metrics["nonfinite_layer"]
    losses = metrics["loss"]
    invalid = metrics.get("invalid_labels", np.zeros_like(layers))
    bad = np.flatnonzero((layers >= 0) | ~np.isfinite(losses) | (invalid > 0))
    if bad.size == 0:
        return
    i = int(bad[0])
    step = first_step + i + 1
    if invalid[i] > 0:
        raise ValueError(f"training stopped at step {step}: its batch holds {int(invalid[i])} "
                         f"labels outside [0, n_out); fix the labels of the data set")
    layer, loss = int(layers[i]), float(losses[i])
    where = (f"the gradient of layer {layer} (params[{layer}]) is the first that is not "
             f"finite" if layer >= 0 else "the gradients are finite")
    raise FloatingPointError(f"training stopped at step {step}: loss {loss}; {where}. "
                             f"Lower the learning rate or check the data for NaN/inf.")


class _EpochFeed:
    """One epoch's batches as chunks of ``(xs, ys)``: (k, batch, ...) arrays on the device.

    The order is :func:`jaxbp.data.epoch_order`'s (the same permutation of the
    same key). Data that fit in :data:`DEVICE_DATA_BYTES` live on the device:
    the permutation and each chunk's gather run there, dispatched without a
    host round trip. Larger data are gathered on the host and copied over one
    chunk ahead, so the copy overlaps the previous chunk's steps.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, drop_last: bool,
                 on_device: bool, process_rows: bool = False):
        self.on_device, self.batch_size, self.drop_last = on_device, batch_size, drop_last
        self.x, self.y = (jax.device_put(x), jax.device_put(y)) if on_device else (x, y)
        self.n = len(x)
        self.process_rows = process_rows  # a mesh run: each process feeds its own rows

    def _order(self, key: PRNGKey) -> tuple[Any, Any]:
        if not self.on_device:
            return epoch_order(self.n, self.batch_size, key, self.drop_last)
        full, tail = _device_order(key, self.n, self.batch_size)
        keep_tail = not self.drop_last and self.n % self.batch_size
        return full, tail if keep_tail else None

    def _take(self, index: Any) -> tuple[Any, Any]:
        if self.on_device:
            return _gather(self.x, self.y, index)
        if self.process_rows:  # rows [i B/n, (i+1) B/n) of every batch; the mesh places them
            index = parallel.process_rows(np.asarray(index).T).T
            return self.x[index], self.y[index]
        return jax.device_put((self.x[index], self.y[index]))

    def chunks(self, key: PRNGKey, chunk: int):
        """Yield ``(xs, ys)``; the next chunk is already on its way while one is used."""
        full, tail = self._order(key)
        pieces = [full[i:i + chunk] for i in range(0, len(full), chunk)]
        if tail is not None:
            pieces.append(tail[None])
        upcoming = self._take(pieces[0]) if pieces else None
        for i in range(len(pieces)):
            current = upcoming
            if i + 1 < len(pieces):
                upcoming = self._take(pieces[i + 1])
            yield current


_LOOPS: dict[Any, Any] = {}
"""Compiled train loops of earlier ``fit`` calls, by (net, optimizer, steps, grad, mesh)."""
_MAX_LOOPS = 32


def _train_loop(net: Any, optimizer: Any, steps: int, grad: Any, mesh: Any) -> Any:
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


@functools.partial(jax.jit, static_argnums=(1, 2))
def _device_order(key: PRNGKey, n: int, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """:func:`jaxbp.data.epoch_order` computed on the device: (full, tail) index arrays."""
    order = jax.random.permutation(key, n).astype(jnp.int32)
    n_full = n // batch_size
    return order[:n_full * batch_size].reshape(n_full, batch_size), order[n_full * batch_size:]


@jax.jit
def _gather(x: jax.Array, y: jax.Array, index: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Rows ``index`` (k, batch) of x and y: (k, batch, ...)."""
    return x[index], y[index]


class _PoissonFeed:
    """One epoch of Poisson-sampled batches (DP-SGD) as chunks of ``(xs, ys, masks)``.

    Each step takes every row independently with the sample rate, padded to
    ``max_batch`` with a mask (:func:`jaxbp.privacy.poisson_batches`). The draw is a
    pure function of the epoch's key, so a resumed run samples what it would have.
    """

    def __init__(self, x: np.ndarray, y: np.ndarray, rate: float, steps: int, max_batch: int):
        self.x, self.y, self.rate, self.steps, self.max_batch = x, y, rate, steps, max_batch
        self.overflow = 0
        self.on_device = False  # gathered on the host: the padded rows differ every step

    def chunks(self, key: PRNGKey, chunk: int):
        from jaxbp.privacy import poisson_batches

        seed = np.asarray(jax.random.key_data(key)).ravel().tolist()
        index, masks, overflow = poisson_batches(np.random.default_rng(seed), len(self.x),
                                                 self.rate, self.steps, self.max_batch)
        self.overflow += overflow
        if overflow:  # P < 1e-12 per step by max_batch_size; said, never silent
            warnings.warn(f"{overflow} Poisson-sampled rows did not fit the padded batch of "
                          f"{self.max_batch} this epoch and were left out of their step",
                          RuntimeWarning, stacklevel=2)
        for i in range(0, self.steps, chunk):
            rows = index[i:i + chunk]
            yield jax.device_put((self.x[rows], self.y[rows], masks[i:i + chunk]))


def fit(
    net: MLP,
    optimizer: optax.GradientTransformation,
    data: Dataset,
    *,
    epochs: int,
    batch_size: int,
    key: PRNGKey,
    grad: str | GradFn = "backprop",
    params: Params | None = None,
    drop_last: bool = True,
    eval_batch_size: int = 1024,
    checkpoint_dir: str | pathlib.Path | None = None,
    keep: int = 3,
    progress: bool = True,
    plot: str | pathlib.Path | None = None,
    diagnostics: bool = False,
    chunk_steps: int | None = None,
    run_config: dict[str, Any] | None = None,
    allow_run_change: bool = False,
    mesh: jax.sharding.Mesh | None = None,
    privacy: Any = None,
) -> FitResult:
    """Train ``net`` on ``data`` for ``epochs`` epochs with the jitted step.

    Args:
      net: the network description.
      optimizer: any optax ``GradientTransformation``.
      data: a :class:`~jaxbp.data.Dataset`.
      epochs: the total number of epochs (a resumed run continues up to it).
      batch_size: training batch size.
      key: PRNG key, split in two: the first initialises the params (unless
        ``params`` is given), the second orders the batches of every epoch.
      grad: ``"backprop"``, ``"autodiff"`` or a gradient source such as
        ``jaxbp.sources.dp_sgd(...)`` (see :func:`jaxbp.make_train_step`).
      params: start here instead of ``net.init(jax.random.split(key)[0])``.
      drop_last: drop each epoch's short last batch (one compiled shape); the
        shuffle differs per epoch, so every sample is still used.
      eval_batch_size: batch size of the per-epoch evaluation.
      checkpoint_dir: save state, key, position, history and the run's record
        (:func:`jaxbp.run_config.describe_run`: net, optimizer
        hyperparameters, gradient source, batch size, seed, data) after every
        epoch (atomic, newest ``keep`` kept; a NaN/inf state is never
        written). If it already holds a checkpoint, training resumes from it,
        and only if the record matches. The folder is locked while the run
        lasts (a second run on it raises); temporaries of a save that was
        killed are removed.
      keep: how many checkpoints to keep.
      progress: show a tqdm bar per epoch and print one line per epoch.
      plot: write a PNG of train/test loss and accuracy here at the end
        (needs matplotlib: ``pip install 'jaxbp[plot]'``).
      diagnostics: after every epoch, record :func:`jaxbp.layer_stats` on the
        first ``eval_batch_size`` training samples in ``history["layer_stats"]``
        (one dict of per-layer lists per epoch; see :func:`plot_flow`).
      chunk_steps: steps run in one compiled ``lax.scan`` between two host
        syncs (default :data:`CHUNK_STEPS`, at most an epoch). A NaN/inf or a
        bad label is still pinned to its step from the chunk's metrics.
      run_config: extra entries for the run's record (the command line adds
        its options: optimizer name, learning rate, seed, data).
      allow_run_change: resume although the record differs (on purpose: a
        new learning rate after a restart, say); the differences are printed.
      mesh: run every step over this device mesh
        (:func:`jaxbp.parallel.make_sharded_train_loop`: the batch split over
        its ``"data"`` axis, the weights over ``"model"``), on one host or
        many. With several processes every process calls ``fit`` with the
        same arguments and feeds its own rows of each batch; only process 0
        prints and plots. Checkpoints are then written by every process
        through orbax (:mod:`jaxbp.sharded_checkpoint`, ``pip install
        'jaxbp[scale]'``); a run resumes from the newest checkpoint of either
        format, so it can move between one device and a mesh.
      privacy: a :class:`jaxbp.privacy.Privacy`: differentially private
        training (DP-SGD, needs ``pip install "jaxbp[privacy]"``). Each step
        Poisson-samples the training set with rate ``q = batch_size / N``
        (``batch_size`` is the expected batch), ``round(N / batch_size)``
        steps make an epoch, per-example gradients are clipped and noised
        (:func:`jaxbp.sources.dp_sgd` with ``expected_batch_size``). A ``target_epsilon`` without a
        noise multiplier calibrates sigma for all ``epochs`` before training.
        The epsilon spent is recorded after every epoch (``history["epsilon"]``,
        the progress line, the checkpoint); training stops, with a warning,
        before an epoch that would exceed the target. ``grad`` must stay
        "backprop" and ``mesh`` None.

    Returns:
      A :class:`FitResult` ``(state, history)``.

    Raises:
      FloatingPointError: a loss, gradient or the updated state became
        NaN/inf; names the step and, for a gradient, the first layer that is
        not finite.
      ValueError: a bad argument, labels outside ``[0, n_out)`` or targets
        that do not fit the loss (found before training, or, for a bad batch
        built inside the compiled loop, named by its step).
      TypeError: an argument of the wrong type.
      jaxbp.checkpoint.CheckpointMismatchError: the checkpoint belongs to
        another run (another tree, or another record without
        ``allow_run_change``).
      jaxbp.checkpoint.CheckpointLockedError: another run uses ``checkpoint_dir``.
    """
    _check_fit_arguments(net, optimizer, data, epochs, batch_size, key, keep, eval_batch_size,
                         chunk_steps)
    _check_mesh(mesh, len(data.x_train), batch_size, drop_last)
    _check_privacy(privacy, grad, mesh)
    _checks.check_target_values(net, data.y_train, "data.y_train")
    _checks.check_target_values(net, data.y_test, "data.y_test")
    main_process = jax.process_index() == 0
    progress, plot = progress and main_process, plot if main_process else None
    file_lock = None
    if checkpoint_dir is not None and main_process:  # one lock for the whole run
        file_lock = checkpoint.lock(checkpoint_dir)
        checkpoint.remove_stale_temporaries(checkpoint_dir)
    try:
        return _fit(net, optimizer, data, epochs=epochs, batch_size=batch_size, key=key,
                    grad=grad, params=params, drop_last=drop_last,
                    eval_batch_size=eval_batch_size, checkpoint_dir=checkpoint_dir, keep=keep,
                    progress=progress, plot=plot, diagnostics=diagnostics,
                    chunk_steps=chunk_steps, run_config=run_config,
                    allow_run_change=allow_run_change, mesh=mesh, privacy=privacy)
    finally:
        if file_lock is not None:
            file_lock.release()


def _check_privacy(privacy: Any, grad: Any, mesh: Any) -> None:
    if privacy is None:
        return
    from jaxbp.privacy import Privacy

    if not isinstance(privacy, Privacy):
        raise TypeError(f"privacy must be a jaxbp.privacy.Privacy, got {type(privacy).__name__}")
    if not (isinstance(grad, str) and grad == "backprop"):
        raise ValueError(f"privacy sets the gradient (clipped, noised per-example gradients): "
                         f"leave grad as 'backprop', got {grad!r}")
    if mesh is not None:
        raise ValueError("privacy runs on one device for now: pass mesh=None")


def _check_int(name: str, value: Any, least: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")


def _check_fit_arguments(net: Any, optimizer: Any, data: Any, epochs: Any, batch_size: Any,
                         key: Any, keep: Any, eval_batch_size: Any, chunk_steps: Any) -> None:
    """Every argument of :func:`fit` checked before anything is loaded or compiled."""
    if not isinstance(net, MLP | Network):
        raise TypeError(f"net must be a jaxbp.MLP or jaxbp.Network, got {type(net).__name__}")
    check_optimizer(optimizer)
    if not all(hasattr(data, name) for name in Dataset._fields):
        raise TypeError(f"data must be a jaxbp.data.Dataset (x_train, y_train, x_test, "
                        f"y_test), got {type(data).__name__}")
    if not (isinstance(key, jax.Array) and (
            jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
            or (key.dtype == np.uint32 and key.shape == (2,)))):
        raise TypeError(f"key must be a PRNG key such as jax.random.key(0), got "
                        f"{type(key).__name__}: {key!r}")
    _check_int("epochs", epochs, 1)
    _check_int("batch_size", batch_size, 1)
    _check_int("keep", keep, 1)
    _check_int("eval_batch_size", eval_batch_size, 1)
    if chunk_steps is not None:
        _check_int("chunk_steps", chunk_steps, 1)


def _check_mesh(mesh: Any, n_train: int, batch_size: int, drop_last: bool) -> None:
    """A mesh with a data axis that splits every batch (and this process's share) evenly."""
    if mesh is None:
        return
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(f"mesh must be a jax.sharding.Mesh (jaxbp.parallel.make_mesh), got "
                        f"{type(mesh).__name__}")
    if parallel.DATA not in mesh.shape:
        raise ValueError(f"mesh has axes {tuple(mesh.shape)}, expected a {parallel.DATA!r} axis")
    n_data, processes = mesh.shape[parallel.DATA], jax.process_count()
    sizes = [batch_size] + ([] if drop_last or n_train % batch_size == 0
                            else [n_train % batch_size])
    for size in sizes:
        if size % n_data or size % processes:
            raise ValueError(f"a batch of {size} rows does not split over the {n_data} devices "
                             f"of the mesh's data axis and {processes} process(es); choose "
                             f"batch_size (and drop_last=True) so that every batch does")


def _fit(net: MLP, optimizer: optax.GradientTransformation, data: Dataset, *, epochs: int,
         batch_size: int, key: PRNGKey, grad: str | GradFn, params: Params | None,
         drop_last: bool, eval_batch_size: int, checkpoint_dir: str | pathlib.Path | None,
         keep: int, progress: bool, plot: str | pathlib.Path | None, diagnostics: bool,
         chunk_steps: int | None, run_config: dict[str, Any] | None,
         allow_run_change: bool, mesh: jax.sharding.Mesh | None, privacy: Any = None
         ) -> FitResult:
    """:func:`fit` on checked arguments, with the checkpoint folder locked."""
    key_init, key_data = jax.random.split(key)
    if params is None:
        params = net.init(key_init)
    state = TrainState.create(params, optimizer)
    shardings = None
    if mesh is not None:
        shardings = parallel.state_shardings(state, mesh)
        state = jax.device_put(jax.tree.map(np.asarray, state), shardings)
    history: dict[str, list[float]] = {name: [] for name in HISTORY_KEYS}
    first_epoch = 0
    private = None
    if privacy is not None:
        private = _private_plan(privacy, len(data.x_train), batch_size, epochs)
        grad = private["gradient"](jax.random.fold_in(key_data, 0xD9))
        history["epsilon"] = []
        record = dataclasses.asdict(privacy)          # as the checkpoint's JSON keeps it:
        if isinstance(privacy.clip_norm, tuple):      # per-layer norms as a list
            record["clip_norm"] = list(privacy.clip_norm)
        run_config = {**(run_config or {}), "privacy": record,
                      "noise_multiplier": private["sigma"]}
        if progress:
            print(f"private training: sample rate {private['rate']:.5f} (expected batch "
                  f"{batch_size}, padded to {private['max_batch']}), noise multiplier "
                  f"{private['sigma']:.4f}, clip norm {privacy.clip_norm}, delta "
                  f"{privacy.delta}, {privacy.accountant} accountant")
    run = describe_run(net, optimizer, grad, batch_size, drop_last, key_data, data, run_config)
    metadata: dict[str, Any] = {}
    if checkpoint_dir is not None:
        found = _restore_latest(checkpoint_dir, state, key_data, shardings)
        if found is not None:
            restored, metadata, path = found
            _check_same_run(path, metadata.get("run"), run, allow_run_change, progress)
            state, key_data = restored["state"], restored["key"]
            history, first_epoch = metadata["history"], metadata["epoch"]
            if progress:
                print(f"resumed from {path} (after epoch {first_epoch})")

    n_train = len(data.x_train)
    steps_per_epoch = (num_batches(n_train, batch_size, drop_last) if private is None
                       else private["steps_per_epoch"])
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the {n_train} "
                         f"training samples and drop_last=True leaves no batch")
    chunk = min(steps_per_epoch, chunk_steps or CHUNK_STEPS)
    dtype = jax.tree.leaves(state.params)[0].dtype
    tokens = getattr(network.as_network(net), "input_dtype", None)   # integer inputs stay
    x_train = np.asarray(data.x_train, tokens or dtype)  # cast once, not in every step
    labels = np.ndim(data.y_train) == _checks.label_rank(net)          # class labels
    y_train = np.asarray(data.y_train, np.int32 if labels else dtype)
    nbytes = sum(np.asarray(a).nbytes for a in data)
    feed = _EpochFeed(x_train, y_train, batch_size, drop_last,
                      on_device=mesh is None and nbytes <= DEVICE_DATA_BYTES,
                      process_rows=mesh is not None) if private is None else \
        _PoissonFeed(x_train, y_train, private["rate"], steps_per_epoch, private["max_batch"])
    x_test = np.asarray(data.x_test, x_train.dtype)  # checked once in fit(), cast once here
    y_test = np.asarray(data.y_test, y_train.dtype)
    if feed.on_device:
        x_test, y_test = jax.device_put(x_test), jax.device_put(y_test)
    loops: dict[int, Any] = {}  # one compiled scan per chunk length (at most three)
    step_count = int(parallel.fetch(state.step))  # replicated: each process's own copy
    spent: tuple[tuple[float, float, int], ...] = ()
    if private is not None:
        spent = _spent_segments(metadata, step_count, private["rate"])
        if any(segment[:2] != (private["sigma"], private["rate"]) for segment in spent):
            private = _private_plan(privacy, n_train, batch_size, epochs, spent, first_epoch)
            grad = private["gradient"](jax.random.fold_in(key_data, 0xD9))
            if progress:
                print(f"noise multiplier {private['sigma']:.4f} for the remaining steps: the "
                      f"{step_count} steps taken ran at {_segment_text(spent)}")
    spent_steps = sum(segment[2] for segment in spent)

    def segments(steps_now: int) -> list[tuple[float, float, int]]:
        """Every segment of the run so far, this call's steps at this call's sigma."""
        now = steps_now - spent_steps
        return [*spent, *([(private["sigma"], private["rate"], now)] if now else [])]

    for epoch in range(first_epoch, epochs):
        if private is not None and _over_budget(privacy, segments(step_count + steps_per_epoch),
                                                epoch):
            break
        start = time.perf_counter()
        sums = {"loss": 0.0, "accuracy": 0.0}
        bar = _progress_bar(steps_per_epoch, f"epoch {epoch + 1}/{epochs}", progress)
        for xs, ys, *masks in feed.chunks(jax.random.fold_in(key_data, epoch), chunk):
            k = len(xs)
            if k not in loops:
                loops[k] = _train_loop(net, optimizer, k, grad, mesh)
            state, metrics = loops[k](state, xs, ys, *masks)
            metrics = parallel.fetch(metrics)  # the one sync of this chunk
            _check_chunk(metrics, step_count)
            step_count += k
            sums["loss"] += float(np.sum(metrics["loss"]))
            sums["accuracy"] += float(np.sum(metrics.get("accuracy", math.nan)))
            if bar is not None:
                bar.update(k)
                bar.set_postfix(loss=f"{float(metrics['loss'][-1]):.4f}")
        if bar is not None:
            bar.close()
        params_here = _params_here(state.params)
        test = evaluate_checked(net, params_here, x_test, y_test, eval_batch_size)
        row = {"epoch": epoch + 1,
               "train_loss": sums["loss"] / steps_per_epoch,
               "train_accuracy": sums["accuracy"] / steps_per_epoch,
               "test_loss": test["loss"],
               "test_accuracy": test.get("accuracy", math.nan),
               "seconds": time.perf_counter() - start}
        if private is not None:
            from jaxbp.privacy import composed_epsilon

            row["epsilon"] = composed_epsilon(segments(step_count), privacy.delta,
                                              privacy.accountant)
            history["epsilon"].append(row["epsilon"])
        for name in HISTORY_KEYS:
            history[name].append(row[name])
        if diagnostics:
            stats = layer_stats(net, params_here, data.x_train[:eval_batch_size],
                                data.y_train[:eval_batch_size])
            history.setdefault("layer_stats", []).append(
                {k: [float(v) for v in np.asarray(a)] for k, a in stats.items()})
        if progress:
            print(_epoch_line(net, row, epochs))
        if checkpoint_dir is not None:
            try:
                record = {"epoch": epoch + 1, "history": history, "run": run}
                if private is not None:
                    record["privacy_segments"] = [list(seg) for seg in segments(step_count)]
                _save(checkpoint_dir, epoch + 1, state, key_data, record, keep, mesh)
            except FloatingPointError as err:
                raise FloatingPointError(
                    f"training stopped after epoch {epoch + 1} (step {step_count}): the "
                    f"updated state holds NaN/inf, so it was not saved ({err}); the newest "
                    f"checkpoint is still the one before. Lower the learning rate") from None
    if plot is not None:
        plot_history(history, plot)
    return FitResult(state, history)


def _private_plan(privacy: Any, n_train: int, batch_size: int, epochs: int,
                  spent: tuple[tuple[float, float, int], ...] = (),
                  first_epoch: int = 0) -> dict[str, Any]:
    """Sample rate, steps per epoch, sigma (calibrated to the target if not given: for
    epochs ``first_epoch..epochs`` after the ``spent`` segments of a resumed run), the
    padded batch size and the gradient source of a private run."""
    from jaxbp import privacy as dp

    if batch_size > n_train:
        raise ValueError(f"batch_size {batch_size} (the expected Poisson batch) is larger than "
                         f"the {n_train} training samples")
    rate = batch_size / n_train
    steps_per_epoch = max(1, round(n_train / batch_size))
    sigma = privacy.noise_multiplier
    if sigma is None:
        sigma = dp.noise_multiplier(privacy.target_epsilon, privacy.delta, rate,
                                    max(1, (epochs - first_epoch) * steps_per_epoch),
                                    privacy.accountant, spent=spent)
    return {"rate": rate, "steps_per_epoch": steps_per_epoch, "sigma": sigma,
            "max_batch": dp.max_batch_size(n_train, rate),
            "gradient": lambda key: sources.dp_sgd(privacy.clip_norm, sigma, key,
                                                   expected_batch_size=rate * n_train)}


def _spent_segments(metadata: dict[str, Any], steps: int, rate: float
                    ) -> tuple[tuple[float, float, int], ...]:
    """The (sigma, q, steps) segments a resumed private run has taken: as its checkpoint
    recorded them, or (a checkpoint from before segments were recorded) all its steps at
    the noise multiplier its run record names and this run's sample rate."""
    if steps == 0:
        return ()
    if "privacy_segments" in metadata:
        return tuple((float(s), float(q), int(t)) for s, q, t in metadata["privacy_segments"])
    sigma = (metadata.get("run") or {}).get("noise_multiplier")
    if sigma is None:
        raise ValueError("the checkpoint to resume was not written by a private run (its "
                         "record names no noise multiplier): its steps' privacy cost is "
                         "unknown; use another checkpoint folder")
    return ((float(sigma), rate, int(steps)),)


def _segment_text(segments: tuple[tuple[float, float, int], ...]) -> str:
    return ", ".join(f"{t} at sigma {s:.4f} (q {q:.5f})" for s, q, t in segments)


def _over_budget(privacy: Any, segments: list[tuple[float, float, int]], epoch: int) -> bool:
    """Whether the next epoch would spend more than the target epsilon (then warn)."""
    if privacy.target_epsilon is None:
        return False
    from jaxbp.privacy import composed_epsilon

    spent = composed_epsilon(segments, privacy.delta, privacy.accountant)
    if spent <= privacy.target_epsilon * (1 + 1e-9):
        return False
    warnings.warn(f"private training stopped before epoch {epoch + 1}: it would spend epsilon "
                  f"{spent:.4f}, more than the target {privacy.target_epsilon}", RuntimeWarning,
                  stacklevel=4)
    return True


def _params_here(params: Params) -> Params:
    """Params this process can evaluate: as they are, or gathered from every process."""
    if jax.process_count() == 1:
        return params
    from jax.experimental import multihost_utils

    return multihost_utils.process_allgather(params, tiled=True)


def _save(directory: str | pathlib.Path, step: int, state: TrainState, key: PRNGKey,
          metadata: dict[str, Any], keep: int, mesh: jax.sharding.Mesh | None) -> None:
    """One checkpoint: a sharded one through orbax on a mesh (every process writes its
    shards), else the single-file .npz."""
    if mesh is None:
        checkpoint.save(directory, step, {"state": state, "key": key}, metadata, keep=keep)
        return
    from jaxbp import sharded_checkpoint

    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    key_data = jax.device_put(np.asarray(jax.random.key_data(key)), replicated)
    sharded_checkpoint.save(directory, step, {"state": state, "key": key_data}, metadata,
                            keep=keep)


def _restore_latest(directory: str | pathlib.Path, state: TrainState, key: PRNGKey,
                    shardings: Any) -> tuple[dict[str, Any], dict[str, Any], pathlib.Path] | None:
    """The newest checkpoint of either format, placed like ``state`` (on ``shardings``)."""
    found = checkpoint.restore_latest(directory, {"state": state, "key": key})
    from jaxbp import sharded_checkpoint

    if sharded_checkpoint.list_steps(directory):  # written by a mesh run
        key_data = np.asarray(jax.random.key_data(key))
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        state_sh = shardings if shardings is not None else jax.tree.map(lambda _: device, state)
        key_sh = (device if shardings is None else jax.sharding.NamedSharding(
            jax.tree.leaves(shardings)[0].mesh, jax.sharding.PartitionSpec()))
        sharded = sharded_checkpoint.restore_latest(
            directory, {"state": state, "key": key_data}, {"state": state_sh, "key": key_sh})
        if sharded is not None and (found is None or sharded[1]["epoch"] > found[1]["epoch"]):
            tree, metadata, path = sharded
            key_host = np.asarray(parallel.fetch(tree["key"]))
            tree = {"state": tree["state"], "key": jax.random.wrap_key_data(
                key_host, impl=jax.random.key_impl(key))}
            return tree, metadata, path
    if found is not None and shardings is not None:  # an .npz of one device, onto the mesh
        tree, metadata, path = found
        state = jax.device_put(jax.tree.map(np.asarray, tree["state"]), shardings)
        return {"state": state, "key": tree["key"]}, metadata, path
    return found


def _check_same_run(path: pathlib.Path, saved: dict[str, Any] | None, now: dict[str, Any],
                    allow_change: bool, progress: bool) -> None:
    """Refuse to resume another run's checkpoint, naming what differs."""
    if saved is None:
        warnings.warn(f"checkpoint {str(path)!r} has no run record (written by an older "
                      f"jaxbp): net, optimizer, seed and data are not checked", RuntimeWarning,
                      stacklevel=3)
        return
    differences = run_differences(saved, now)
    if not differences:
        return
    if allow_change:          # said always (a warning when quiet): the run is not the same
        notice = f"resuming {path} although the run changed: " + "; ".join(differences)
        if progress:
            print(notice)
        else:
            warnings.warn(notice, RuntimeWarning, stacklevel=3)
        return
    raise checkpoint.CheckpointMismatchError(
        f"checkpoint {str(path)!r} was written by another run: " + "; ".join(differences)
        + ". Use another checkpoint folder, or pass allow_run_change=True "
          "(jaxbp train --allow-run-change) to resume it anyway")


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (logs, CI)
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)


def _epoch_line(net: MLP, row: dict[str, float], epochs: int) -> str:
    line = f"epoch {row['epoch']:>3}/{epochs}  train loss {row['train_loss']:.4f}"
    if net.loss_fn.is_classification:
        line += f" acc {row['train_accuracy']:.4f}"
    line += f"  test loss {row['test_loss']:.4f}"
    if net.loss_fn.is_classification:
        line += f" acc {row['test_accuracy']:.4f}"
    if "epsilon" in row:
        line += f"  epsilon {row['epsilon']:.3f}"
    return line + f"  ({row['seconds']:.2f} s)"


def plot_history(history: dict[str, list[float]], path: str | pathlib.Path) -> pathlib.Path:
    """A PNG of train/test loss (and accuracy, where there is one) per epoch.

    Written to a temporary file and renamed, so ``path`` is never half-written.

    Raises:
      ImportError: matplotlib is not installed (``pip install 'jaxbp[plot]'``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("plotting needs matplotlib: pip install 'jaxbp[plot]'") from err
    path = pathlib.Path(path)
    has_accuracy = not all(math.isnan(a) for a in history["test_accuracy"])
    fig, axes = plt.subplots(1, 2 if has_accuracy else 1, figsize=(10 if has_accuracy else 5, 4))
    axes = np.atleast_1d(axes)
    for split in ("train", "test"):
        axes[0].plot(history["epoch"], history[f"{split}_loss"], label=split)
        if has_accuracy:
            axes[1].plot(history["epoch"], history[f"{split}_accuracy"], label=split)
    axes[0].set(xlabel="epoch", ylabel="loss", yscale="log", title="loss")
    if has_accuracy:
        axes[1].set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save_figure(fig, path)


def plot_flow(history: dict[str, Any], path: str | pathlib.Path) -> pathlib.Path:
    """A PNG of the recorded gradient flow: per layer, mean |delta| and the update ratio by epoch.

    Needs a history from ``fit(..., diagnostics=True)``; written atomically.
    """
    if not history.get("layer_stats"):
        raise ValueError("history has no layer_stats: run fit(..., diagnostics=True)")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("plotting needs matplotlib: pip install 'jaxbp[plot]'") from err
    path = pathlib.Path(path)
    epochs = history["epoch"][-len(history["layer_stats"]):]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    n_layers = len(history["layer_stats"][0]["mean_abs_delta"])
    for l in range(n_layers):
        for ax, key in zip(axes, ("mean_abs_delta", "update_ratio")):
            ax.semilogy(epochs, [s[key][l] for s in history["layer_stats"]], label=f"layer {l + 1}")
    axes[0].set(xlabel="epoch", ylabel="mean |delta^l|", title="error per layer")
    axes[1].set(xlabel="epoch", ylabel="||dC/dW^l|| / ||W^l||", title="gradient / weight")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save_figure(fig, path)


def _save_figure(fig: Any, path: pathlib.Path) -> pathlib.Path:
    """fig as a PNG at path: written to a temporary file, then renamed over it."""
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".png", dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=100)
        os.replace(tmp, path)
    finally:
        pathlib.Path(tmp).unlink(missing_ok=True)
        plt.close(fig)
    return path
