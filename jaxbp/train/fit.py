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
import pathlib
import time
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from jaxbp import input_checks, parallel, user_warnings
from jaxbp.data import AnyDataset, num_batches
from jaxbp.mlp import Net
from jaxbp.train import checkpoint, feeds, fit_checks, plots, resume
from jaxbp.train import private as train_private
from jaxbp.train.epoch import (
    RunTally,
    chunks_and_ahead,
    epoch_line,
    epoch_row,
    evaluation_of,
    layer_stats_lists,
    loops_of,
    progress_bar,
    train_epoch,
)
from jaxbp.train.run_config import describe_run
from jaxbp.train.step import (
    GradFn,
    TrainState,
)
from jaxbp.types import Params, PRNGKey

DEFAULT_KEEP = 3   # checkpoints kept when fit is not told
HISTORY_KEYS = ("epoch", "train_loss", "train_accuracy", "test_loss", "test_accuracy",
                "seconds")


class FitResult(NamedTuple):
    """What :func:`fit` returns.

    Attributes:
      state: the final :class:`~jaxbp.train.TrainState`.
      history: per epoch (lists, one entry per epoch since the first run):
        ``epoch`` (1-based), ``train_loss``/``train_accuracy`` (means over the
        epoch's steps), ``test_loss``/``test_accuracy`` (:func:`evaluate` after
        the epoch; accuracies are nan for squared error), ``seconds`` (from the
        epoch's start, or from the line before when the epoch ran while the host
        wrote that line).
    """

    state: TrainState
    history: dict[str, list[float]]


def fit(
    net: Net,
    optimizer: optax.GradientTransformation,
    data: AnyDataset,
    *,
    epochs: int,
    batch_size: int,
    key: PRNGKey,
    grad: str | GradFn = "backprop",
    params: Params | None = None,
    drop_last: bool = True,
    eval_batch_size: int = 1024,
    checkpoint_dir: str | pathlib.Path | None = None,
    keep: int | None = None,
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
        (:func:`jaxbp.train.run_config.describe_run`: net, optimizer
        hyperparameters, gradient source, batch size, seed, data) after every
        epoch (atomic, newest ``keep`` kept; a NaN/inf state is never
        written). If it already holds a checkpoint, training resumes from it,
        and only if the record matches. The folder is locked while the run
        lasts (a second run on it raises); temporaries of a save that was
        killed are removed.
      keep: how many checkpoints to keep (default 3). ``keep``, ``run_config``
        and ``allow_run_change`` shape the checkpoints, so they need a
        ``checkpoint_dir``.
      progress: show a tqdm bar per epoch and print one line per epoch.
      plot: write a figure of train/test loss and accuracy here at the end (PNG, or the
        format its suffix names: .pdf, .svg, ...)
        (needs matplotlib: ``pip install 'jaxbp[plot]'``).
      diagnostics: after every epoch, record :func:`jaxbp.layer_stats` on the
        first ``eval_batch_size`` training samples in ``history["layer_stats"]``
        (one dict of per-layer lists per epoch, with ``"layers"``, where each entry
        sits; see :func:`jaxbp.train.plots.plot_flow`).
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
        through orbax (:mod:`jaxbp.train.sharded_checkpoint`, ``pip install
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
        "backprop". On a ``mesh`` the padded batch is rounded up to split over
        the data axis (each process feeds its rows of every draw) and runs
        whole (``microbatch`` None): the same gradient as on one device.

    Returns:
      A :class:`FitResult` ``(state, history)``.

    Raises:
      FloatingPointError: a loss, gradient or the updated state became
        NaN/inf; names the step and, for a gradient, the first layer that is
        not finite.
      ValueError: a bad argument, labels outside ``[0, n_out)``, targets
        that do not fit the loss, or data that are not finite (found before
        training, or, for a bad batch
        built inside the compiled loop, named by its step).
      TypeError: an argument of the wrong type.
      jaxbp.checkpoint.CheckpointMismatchError: the checkpoint belongs to
        another run (another tree, or another record without
        ``allow_run_change``).
      jaxbp.checkpoint.CheckpointLockedError: another run uses ``checkpoint_dir``.
    """
    fit_checks.arguments(net, optimizer, data, epochs, batch_size, key, keep, eval_batch_size,
                         chunk_steps)
    fit_checks.flags(drop_last=drop_last, progress=progress, diagnostics=diagnostics,
                     allow_run_change=allow_run_change)
    fit_checks.destinations(plot, checkpoint_dir)
    fit_checks.run_record(run_config)
    fit_checks.checkpoint_options(checkpoint_dir, keep=keep, run_config=run_config,
                                  allow_run_change=allow_run_change)
    keep = DEFAULT_KEEP if keep is None else keep
    fit_checks.mesh(mesh, len(data.x_train), batch_size, drop_last, private=privacy is not None)
    train_private.check_privacy(privacy, grad, mesh)
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


def _fit(net: Net, optimizer: optax.GradientTransformation, data: AnyDataset, *, epochs: int,
         batch_size: int, key: PRNGKey, grad: str | GradFn, params: Params | None,
         drop_last: bool, eval_batch_size: int, checkpoint_dir: str | pathlib.Path | None,
         keep: int, progress: bool, plot: str | pathlib.Path | None, diagnostics: bool,
         chunk_steps: int | None, run_config: dict[str, Any] | None,
         allow_run_change: bool, mesh: jax.sharding.Mesh | None, privacy: Any = None
         ) -> FitResult:
    """:func:`fit` on checked arguments, with the checkpoint folder locked."""
    key_init, key_data = jax.random.split(key)
    state, shardings = _initial_state(net, optimizer, params, key_init, mesh)
    history: dict[str, list[Any]] = {name: [] for name in HISTORY_KEYS}
    private, recorded = None, grad
    if privacy is not None:
        private, grad, recorded, run_config = _private_start(
            privacy, len(data.x_train), batch_size, epochs, key_data, run_config, progress,
            mesh)
        history["epsilon"] = []
    run = describe_run(net, optimizer, recorded, batch_size, drop_last, key_data, data, run_config)
    state, key_data, history, first_epoch, metadata = _restore(
        checkpoint_dir, state, key_data, shardings, history, run, allow_run_change, progress)
    tally = RunTally(int(parallel.fetch(state.step)))  # replicated: each process's own copy
    private, grad = _resumed_privately(private, metadata, tally.done, batch_size, epochs,
                                       first_epoch, key_data, grad, progress)
    private = None if private is None else private.on_mesh(mesh)   # a re-plan on resume
    steps_per_epoch = _steps_per_epoch(len(data.x_train), batch_size, drop_last, private)
    dtype = jax.tree.leaves(state.params)[0].dtype
    feed, test = feeds.make_feed(net, data, dtype, batch_size, drop_last, mesh, private,
                                 steps_per_epoch)
    chunk = min(steps_per_epoch, chunk_steps or feeds.CHUNK_STEPS)
    loop_of = loops_of(net, optimizer, grad, mesh)
    evaluation, upcoming, behind = evaluation_of(net, test, eval_batch_size), None, None
    # with nothing to do on the host between two epochs but to read and write the epoch's
    # line, that is done while the next epoch runs
    overlap = checkpoint_dir is None and not diagnostics and private is None
    for epoch in range(first_epoch, epochs):
        if private is not None and private.over_budget(tally.done + steps_per_epoch, epoch):
            break
        start = time.perf_counter()
        chunks, ahead = chunks_and_ahead(feed, key_data, epoch, epochs, chunk, upcoming)
        new_bar = functools.partial(progress_bar, steps_per_epoch, f"epoch {epoch + 1}/{epochs}",
                                    progress)
        state, finish, upcoming = train_epoch(loop_of, chunks, state, tally, new_bar,
                                              then=evaluation, ahead=ahead, behind=behind)
        record = functools.partial(_record_epoch, net, finish, history, steps_per_epoch,
                                   epoch, epochs, start, tally, private, progress)
        if overlap:
            behind = record
            continue
        record()
        if diagnostics:
            history.setdefault("layer_stats", []).append(layer_stats_lists(
                net, parallel.gather_params(state.params), data, eval_batch_size))
        if checkpoint_dir is not None:
            _save(checkpoint_dir, epoch, tally.done, state, key_data,
                  {"epoch": epoch + 1, "history": history, "run": run}, private, keep, mesh)
    if behind is not None:
        behind()
    if plot is not None:
        plots.plot_history(history, plot)
    return FitResult(state, history)


def _record_epoch(net: Net, finish: Any, history: dict[str, list[Any]], steps_per_epoch: int,
                  epoch: int, epochs: int, start: float, tally: RunTally,
                  private: train_private.Plan | None, progress: bool) -> None:
    """Wait for the epoch's end (``finish``), then add its line to ``history`` and print
    it. Its seconds count from ``start`` or, when the epoch ran while the host wrote the
    line before (an overlapped run), from that line: the epochs' seconds add up to the
    run's."""
    sums, scores = finish()
    row = epoch_row(net, scores, sums, steps_per_epoch, epoch, max(start, tally.written))
    if private is not None:
        row["epsilon"] = private.epsilon(tally.done)
    for name in row:
        history[name].append(row[name])
    _say(progress, epoch_line(net, row, epochs))
    tally.written = time.perf_counter()


def _private_start(privacy: Any, n_train: int, batch_size: int, epochs: int, key: PRNGKey,
                   run_config: dict[str, Any] | None, progress: bool, mesh: Any
                   ) -> tuple[train_private.Plan, GradFn, GradFn, dict[str, Any]]:
    """A private run's plan (its padded batch split over ``mesh``), its DP-SGD source, that
    source as the run record describes it (whole batches: microbatches are how, not what),
    and the record's privacy entries."""
    private = train_private.plan(privacy, n_train, batch_size, epochs).on_mesh(mesh)
    if privacy.delta >= 1 / n_train:
        user_warnings.warn(
            f"delta {privacy.delta:g} is not below 1/N = 1/{n_train}: publishing one random "
            f"training example outright is (0, 1/N)-DP, so such a delta permits it; use a "
            f"delta well below {1 / n_train:.2g}")
    identity = {k: v for k, v in dataclasses.asdict(privacy).items() if k != "microbatch"}
    record = {**(run_config or {}), "privacy": identity,   # microbatch: how, not what
              "noise_multiplier": private.sigma}
    _say(progress, private.describe(batch_size))
    noise_key = jax.random.fold_in(key, _NOISE_KEY)
    return (private, private.gradient(noise_key), private.gradient(noise_key, recorded=True),
            record)


def _resumed_privately(private: train_private.Plan | None, metadata: dict, done: int,
                       batch_size: int, epochs: int, first_epoch: int, key: PRNGKey,
                       grad: Any, progress: bool) -> tuple[Any, Any]:
    """A private run's plan and DP-SGD source as resumed after ``done`` steps (the
    source drawn again when the plan changed; :func:`train_private.resumed`)."""
    if private is None:
        return None, grad
    private, notice = train_private.resumed(private, metadata, done, batch_size, epochs,
                                            first_epoch)
    if notice is not None:
        grad = private.gradient(jax.random.fold_in(key, _NOISE_KEY))
        _say(progress, notice)
    return private, grad


def _initial_state(net: Net, optimizer: optax.GradientTransformation, params: Params | None,
                   key: PRNGKey, mesh: Any) -> tuple[TrainState, Any]:
    """The step-0 state (``net.init(key)`` unless ``params`` are given), checked against the
    optimizer in half precision, and placed on the mesh's shardings (None without one)."""
    if params is not None:
        input_checks.check_params(net, params)
    state = TrainState.create(net.init(key) if params is None else params, optimizer)
    fit_checks.optimizer_in_half_precision(optimizer, state)
    shardings = None if mesh is None else parallel.state_shardings(state, mesh, net=net)
    if shardings is not None:
        state = jax.device_put(jax.tree.map(np.asarray, state), shardings)
    return state, shardings


def _restore(directory: Any, state: TrainState, key: PRNGKey, shardings: Any,
             history: dict[str, list[Any]], run: dict[str, Any], allow_run_change: bool,
             progress: bool) -> tuple[TrainState, PRNGKey, dict[str, list[Any]], int, dict]:
    """State, key, history, epochs done and the checkpoint's metadata: from the newest
    checkpoint of this run in ``directory``, or as given (epoch 0) when there is none.

    Raises:
      jaxbp.checkpoint.CheckpointMismatchError: the checkpoint is another run's.
    """
    try:
        found = None if directory is None else resume.restore_latest(directory, state, key,
                                                                     shardings)
    except checkpoint.CheckpointMismatchError as err:
        raise resume.explained(err, run) from None
    if found is None:
        return state, key, history, 0, {}
    restored, metadata, path = found
    resume.check_same_run(path, metadata.get("run"), run, allow_run_change, progress)
    _say(progress, f"resumed from {path} (after epoch {metadata['epoch']})")
    return (restored["state"], restored["key"], metadata["history"], metadata["epoch"],
            metadata)


_NOISE_KEY = 0xD9
"""``fold_in(key, _NOISE_KEY)`` of the run's data key seeds a private run's noise."""


def _say(progress: bool, line: str) -> None:
    if progress:
        print(line)


def _steps_per_epoch(n_train: int, batch_size: int, drop_last: bool,
                     private: train_private.Plan | None) -> int:
    steps = num_batches(n_train, batch_size, drop_last) if private is None \
        else private.steps_per_epoch
    if steps == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the {n_train} "
                         f"training samples and drop_last=True leaves no batch")
    return steps


def _save(directory: str | pathlib.Path, epoch: int, step_count: int, state: TrainState,
          key: PRNGKey, record: dict[str, Any], private: train_private.Plan | None, keep: int,
          mesh: Any) -> None:
    """The epoch's checkpoint, a private run's segments in its record; a NaN/inf state is
    refused, naming the epoch and step."""
    if private is not None:
        record = {**record, "privacy_segments": [list(s) for s in private.segments(step_count)]}
    try:
        resume.save(directory, epoch + 1, state, key, record, keep, mesh)
    except FloatingPointError as err:
        raise FloatingPointError(
            f"training stopped after epoch {epoch + 1} (step {step_count}): the "
            f"updated state holds NaN/inf, so it was not saved ({err}); the newest "
            f"checkpoint is still the one before. Lower the learning rate") from None
