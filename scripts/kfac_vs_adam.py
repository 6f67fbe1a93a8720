"""Train digits with K-FAC (the factors from the hand-written recursion) and with adam,
and plot both runs' test curves in one figure (public API only).

    python scripts/kfac_vs_adam.py [--model mlp|cnn|gpt] [--epochs 15] [--steps 300]
                                   [--out FIGURE]

--model mlp: MLP (64, 128, 128, 10) relu (figure scripts/figures/kfac_vs_adam.png);
--model cnn: the CNN of `jaxbp train --model cnn` on 8x8x1 images, K-FAC's conv blocks
the KFC factors (figure scripts/figures/kfac_vs_adam_cnn.png). K-FAC: damping 0.1 and sgd
lr 0.3 for the MLP, damping 1 and lr 0.1 for the CNN (whose loss oscillates at the MLP's).
--model gpt: a character-level GPT (dim 64, 2 blocks, 4 heads, T 64) on the shipped tiny
Shakespeare, ``--steps`` steps of batch 32, K-FAC in the "expand" convention (every
record's blocks; damping 0.1, sgd lr 0.1 momentum 0.9) against adam (lr 3e-3); validation
loss in bits per character against steps and against seconds of training
(scripts/figures/kfac_vs_adam_gpt.png).
"""

from __future__ import annotations

import math
import time

import jax
import numpy as np
import optax

import jaxbp
from jaxbp import files, layers
from jaxbp.cli.common import OneLineParser


def gpt_runs(steps: int, plt, out: str) -> None:
    """K-FAC and adam on the shipped text: validation bits/char every 25 steps, by step
    and by the seconds the steps took (the evaluation not counted)."""
    text = jaxbp.data.load_text(seq_len=64)
    net = jaxbp.models.gpt(text.n_out, 64, 2, 4, 64)
    x_val, y_val = text.x_test[:256], text.y_test[:256]
    val_cost = jax.jit(lambda p: net.cost(p, x_val, y_val) / math.log(2))
    runs = {
        "adam (lr 3e-3)": (optax.adam(3e-3), "backprop"),
        "K-FAC expand (damping 0.1) + sgd momentum (lr 0.1)": (
            optax.chain(jaxbp.kfac_preconditioner(0.1), optax.sgd(0.1, momentum=0.9)),
            jaxbp.kfac_gradient()),
    }
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label, (optimizer, grad) in runs.items():
        step = jaxbp.make_train_step(net, optimizer, grad=grad)
        state = jaxbp.TrainState.create(net.init(jax.random.key(0)), optimizer)
        rng = np.random.default_rng(0)
        rows = rng.integers(0, len(text.x_train), (steps, 32))
        state, metrics = step(state, text.x_train[rows[0]], text.y_train[rows[0]])  # compile
        jax.block_until_ready(metrics)
        seconds, marks = 0.0, [(1, 0.0, float(val_cost(state.params)))]
        for i in range(1, steps):
            start = time.perf_counter()
            state, metrics = step(state, text.x_train[rows[i]], text.y_train[rows[i]])
            jax.block_until_ready(metrics)
            seconds += time.perf_counter() - start
            if (i + 1) % 25 == 0:
                marks.append((i + 1, seconds, float(val_cost(state.params))))
        done, secs, bits = zip(*marks)
        axes[0].plot(done, bits, label=label)
        axes[1].plot(secs, bits, label=label)
        print(f"{label}: validation bits/char {bits[-1]:.3f} after {steps} steps, "
              f"{secs[-1]:.1f} s of steps ({1e3 * secs[-1] / (steps - 1):.1f} ms/step)")
    axes[0].set(xlabel="step", ylabel="validation bits/char", title="per step")
    axes[1].set(xlabel="seconds of training steps", ylabel="validation bits/char",
                title="per second")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("tiny Shakespeare, GPT dim 64, 2 blocks, 4 heads, T 64, batch 32")
    fig.tight_layout()
    files.save_figure(fig, out)
    print(f"wrote {out}")


def main() -> None:
    parser = OneLineParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("mlp", "cnn", "gpt"), default="mlp")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--steps", type=int, default=300, help="gpt training steps (300)")
    parser.add_argument("--out", default=None, help="default scripts/figures/"
                        "kfac_vs_adam.png (mlp), kfac_vs_adam_cnn.png (cnn) or "
                        "kfac_vs_adam_gpt.png (gpt)")
    args = parser.parse_args()
    suffix = {"mlp": "", "cnn": "_cnn", "gpt": "_gpt"}[args.model]
    out = args.out or f"scripts/figures/kfac_vs_adam{suffix}.png"

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if args.model == "gpt":
        gpt_runs(args.steps, plt, out)
        return

    digits = jaxbp.data.load_digits()
    net, title = jaxbp.MLP((64, 128, 128, 10), "relu"), "MLP (64, 128, 128, 10) relu"
    if args.model == "cnn":
        net, title = jaxbp.Network(
            (layers.Conv2D(16, (3, 3), activation="relu"), layers.MaxPool(2),
             layers.Conv2D(32, (3, 3), activation="relu"), layers.MaxPool(2),
             layers.Flatten(), layers.Dense(64, "relu"), layers.Dense(10)), (8, 8, 1)), \
            "CNN (conv 16, pool, conv 32, pool, dense 64, dense 10)"
        digits = digits._replace(x_train=digits.x_train.reshape(-1, 8, 8, 1),
                                 x_test=digits.x_test.reshape(-1, 8, 8, 1))
    damping, lr = (0.1, 0.3) if args.model == "mlp" else (1.0, 0.1)
    runs = {
        "adam (lr 1e-3)": (optax.adam(1e-3), "backprop"),
        f"K-FAC (damping {damping}) + sgd momentum (lr {lr})": (
            optax.chain(jaxbp.kfac_preconditioner(damping), optax.sgd(lr, momentum=0.9)),
            jaxbp.kfac_gradient()),
    }
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for label, (optimizer, grad) in runs.items():
        result = jaxbp.fit(net, optimizer, digits, epochs=args.epochs, batch_size=128,
                           key=jax.random.key(0), grad=grad, progress=False)
        history = result.history
        axes[0].semilogy(history["epoch"], history["train_loss"], label=label)
        axes[1].plot(history["epoch"], history["test_accuracy"], label=label)
        print(f"{label}: test accuracy after epoch 1 {history['test_accuracy'][0]:.4f}, "
              f"after {args.epochs} {history['test_accuracy'][-1]:.4f}; seconds "
              f"{sum(history['seconds']):.1f}")
    axes[0].set(xlabel="epoch", ylabel="train loss", title="training loss")
    axes[1].set(xlabel="epoch", ylabel="test accuracy", title="test accuracy", ylim=(0.5, 1))
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"digits, {title}, batch 128")
    fig.tight_layout()
    files.save_figure(fig, out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
