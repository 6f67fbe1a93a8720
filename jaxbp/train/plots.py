"""Figures of a run: loss and accuracy per epoch, and the recorded gradient flow per layer.

PNG files written atomically (a temporary file renamed over the target); matplotlib is
an extra (``pip install 'jaxbp[plot]'``).
"""

from __future__ import annotations

import math
import pathlib
from typing import Any

import numpy as np

from jaxbp.files import save_figure


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the Agg backend.

    Raises:
      ImportError: matplotlib is not installed (``pip install 'jaxbp[plot]'``).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        raise ImportError("plotting needs matplotlib: pip install 'jaxbp[plot]'") from err
    return plt


POINTS = {"marker": "o", "markersize": 3}
"""Each epoch's point marked: a one-epoch run's figure shows its values, not empty axes."""


def plot_history(history: dict[str, list[float]], path: str | pathlib.Path) -> pathlib.Path:
    """A PNG of train/test loss (and accuracy, where there is one) per epoch.

    Written to a temporary file and renamed, so ``path`` is never half-written.

    Raises:
      ImportError: matplotlib is not installed (``pip install 'jaxbp[plot]'``).
      ValueError: a history without fit's per-epoch lists (named).
    """
    needed = ("epoch", "train_loss", "test_loss", "train_accuracy", "test_accuracy")
    missing = [name for name in needed if not isinstance(history, dict) or name not in history]
    if missing:
        raise ValueError(f"history must be fit's (result.history), with the lists "
                         f"{list(needed)}; it has no {missing}")
    plt = pyplot()
    path = pathlib.Path(path)
    has_accuracy = not all(math.isnan(a) for a in history["test_accuracy"])
    fig, axes = plt.subplots(1, 2 if has_accuracy else 1, figsize=(10 if has_accuracy else 5, 4))
    axes = np.atleast_1d(axes)
    for split in ("train", "test"):
        axes[0].plot(history["epoch"], history[f"{split}_loss"], label=split, **POINTS)
        if has_accuracy:
            axes[1].plot(history["epoch"], history[f"{split}_accuracy"], label=split, **POINTS)
    axes[0].set(xlabel="epoch", ylabel="loss", yscale="log", title="loss")
    if has_accuracy:
        axes[1].set(xlabel="epoch", ylabel="accuracy", title="accuracy")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))     # whole epochs
    fig.tight_layout()
    return save_figure(fig, path)


def plot_flow(history: dict[str, Any], path: str | pathlib.Path) -> pathlib.Path:
    """A PNG of the recorded gradient flow: per layer, mean |delta| and the update ratio by epoch.

    Needs a history from ``fit(..., diagnostics=True)``; written atomically.
    """
    if not history.get("layer_stats"):
        raise ValueError("history has no layer_stats: run fit(..., diagnostics=True)")
    plt = pyplot()
    path = pathlib.Path(path)
    epochs = history["epoch"][-len(history["layer_stats"]):]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    first = history["layer_stats"][0]
    labels = first.get("layers") or [f"layer {l + 1}"      # where each sits (a GPT's blocks)
                                      for l in range(len(first["mean_abs_delta"]))]
    for l, label in enumerate(labels):
        for ax, key in zip(axes, ("mean_abs_delta", "update_ratio")):
            ax.semilogy(epochs, [s[key][l] for s in history["layer_stats"]], label=label,
                        **POINTS)
    axes[0].set(xlabel="epoch", ylabel="mean |delta^l|", title="error per layer")
    axes[1].set(xlabel="epoch", ylabel="||dC/dW^l|| / ||W^l||", title="gradient / weight")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax.xaxis.set_major_locator(plt.MaxNLocator(integer=True))     # whole epochs
    fig.tight_layout()
    return save_figure(fig, path)
