"""The epoch loop: batches, the jitted step, progress, evaluation, checkpoints, resume, plots.

:func:`fit` is the research-script entry point; all numerical work is the
jitted step of :mod:`jaxbp.train`. Epoch e shuffles with
``jax.random.fold_in(key, e)``, so the batch order depends only on the key and
the epoch: a run stopped after epoch 3 and resumed from its checkpoint gives
the same params, bit for bit, as a run that never stopped.
"""

from __future__ import annotations

import math
import os
import pathlib
import tempfile
import time
from typing import Any, NamedTuple

import jax
import numpy as np
import optax

from jaxbp import checkpoint
from jaxbp._typing import Params, PRNGKey
from jaxbp.data import Dataset, batches, num_batches
from jaxbp.diagnostics import layer_stats
from jaxbp.mlp import MLP
from jaxbp.train import (
    CLASSIFICATION_LOSSES,
    GradFn,
    TrainState,
    evaluate,
    make_train_step,
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


def _check_finite(metrics: dict[str, Any], step: int) -> None:
    layer = int(metrics["nonfinite_layer"])
    loss = float(metrics["loss"])
    if layer >= 0 or not math.isfinite(loss):
        where = (f"the gradient of layer {layer} (params[{layer}]) is the first that is not "
                 f"finite" if layer >= 0 else "the gradients are finite")
        raise FloatingPointError(f"training stopped at step {step}: loss {loss}; {where}. "
                                 f"Lower the learning rate or check the data for NaN/inf.")


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
        ``jaxbp.dp_sgd_gradient(...)`` (see :func:`jaxbp.make_train_step`).
      params: start here instead of ``net.init(jax.random.split(key)[0])``.
      drop_last: drop each epoch's short last batch (one compiled shape); the
        shuffle differs per epoch, so every sample is still used.
      eval_batch_size: batch size of the per-epoch evaluation.
      checkpoint_dir: save state, key, position and history after every
        epoch (atomic, newest ``keep`` kept); if it already holds a
        checkpoint of this net and optimizer, training resumes from it.
      keep: how many checkpoints to keep.
      progress: show a tqdm bar per epoch and print one line per epoch.
      plot: write a PNG of train/test loss and accuracy here at the end
        (needs matplotlib: ``pip install 'jaxbp[plot]'``).
      diagnostics: after every epoch, record :func:`jaxbp.layer_stats` on the
        first ``eval_batch_size`` training samples in ``history["layer_stats"]``
        (one dict of per-layer lists per epoch; see :func:`plot_flow`).

    Returns:
      A :class:`FitResult` ``(state, history)``.

    Raises:
      FloatingPointError: a loss or gradient became NaN/inf; names the step
        and the first layer whose gradient is not finite.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"epochs must be an int >= 1, got {epochs!r}")
    key_init, key_data = jax.random.split(key)
    if params is None:
        params = net.init(key_init)
    state = TrainState.create(params, optimizer)
    history: dict[str, list[float]] = {name: [] for name in HISTORY_KEYS}
    first_epoch = 0
    if checkpoint_dir is not None:
        found = checkpoint.restore_latest(checkpoint_dir, {"state": state, "key": key_data})
        if found is not None:
            restored, metadata, path = found
            state, key_data = restored["state"], restored["key"]
            history, first_epoch = metadata["history"], metadata["epoch"]
            if progress:
                print(f"resumed from {path} (after epoch {first_epoch})")

    step_fn = make_train_step(net, optimizer, grad)
    steps_per_epoch = num_batches(len(data.x_train), batch_size, drop_last)
    if steps_per_epoch == 0:
        raise ValueError(f"batch_size {batch_size} is larger than the {len(data.x_train)} "
                         f"training samples and drop_last=True leaves no batch")
    for epoch in range(first_epoch, epochs):
        start = time.perf_counter()
        sums = {"loss": 0.0, "accuracy": 0.0}
        bar = _progress_bar(steps_per_epoch, f"epoch {epoch + 1}/{epochs}", progress)
        epoch_key = jax.random.fold_in(key_data, epoch)
        for x, y in batches(data.x_train, data.y_train, batch_size, epoch_key, drop_last):
            state, metrics = step_fn(state, x, y)
            metrics = jax.device_get(metrics)
            _check_finite(metrics, int(state.step))
            sums["loss"] += float(metrics["loss"])
            sums["accuracy"] += float(metrics.get("accuracy", math.nan))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{float(metrics['loss']):.4f}")
        if bar is not None:
            bar.close()
        test = evaluate(net, state.params, data.x_test, data.y_test, eval_batch_size)
        row = {"epoch": epoch + 1,
               "train_loss": sums["loss"] / steps_per_epoch,
               "train_accuracy": sums["accuracy"] / steps_per_epoch,
               "test_loss": test["loss"],
               "test_accuracy": test.get("accuracy", math.nan),
               "seconds": time.perf_counter() - start}
        for name in HISTORY_KEYS:
            history[name].append(row[name])
        if diagnostics:
            stats = layer_stats(net, state.params, data.x_train[:eval_batch_size],
                                data.y_train[:eval_batch_size])
            history.setdefault("layer_stats", []).append(
                {k: [float(v) for v in np.asarray(a)] for k, a in stats.items()})
        if progress:
            print(_epoch_line(net, row, epochs))
        if checkpoint_dir is not None:
            checkpoint.save(checkpoint_dir, epoch + 1, {"state": state, "key": key_data},
                            {"epoch": epoch + 1, "history": history}, keep=keep)
    if plot is not None:
        plot_history(history, plot)
    return FitResult(state, history)


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    # disable=None: no bar when stderr is not a terminal (logs, CI)
    return tqdm(total=total, desc=desc, leave=False, dynamic_ncols=True, disable=None)


def _epoch_line(net: MLP, row: dict[str, float], epochs: int) -> str:
    line = f"epoch {row['epoch']:>3}/{epochs}  train loss {row['train_loss']:.4f}"
    if net.loss in CLASSIFICATION_LOSSES:
        line += f" acc {row['train_accuracy']:.4f}"
    line += f"  test loss {row['test_loss']:.4f}"
    if net.loss in CLASSIFICATION_LOSSES:
        line += f" acc {row['test_accuracy']:.4f}"
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
