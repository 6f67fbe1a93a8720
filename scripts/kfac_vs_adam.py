"""Train digits with K-FAC (the factors from the hand-written recursion) and with adam,
and plot both runs' test curves in one figure (public API only).

    python scripts/kfac_vs_adam.py [--model mlp|cnn] [--epochs 15] [--out FIGURE]

--model mlp: MLP (64, 128, 128, 10) relu (figure scripts/figures/kfac_vs_adam.png);
--model cnn: the CNN of `jaxbp train --model cnn` on 8x8x1 images, K-FAC's conv blocks
the KFC factors (figure scripts/figures/kfac_vs_adam_cnn.png). K-FAC: damping 0.1 and sgd
lr 0.3 for the MLP, damping 1 and lr 0.1 for the CNN (whose loss oscillates at the MLP's).
"""

from __future__ import annotations

import argparse

import jax
import optax

import jaxbp
from jaxbp import layers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", default=None, help="default scripts/figures/"
                        "kfac_vs_adam.png (mlp) or kfac_vs_adam_cnn.png (cnn)")
    args = parser.parse_args()
    out = args.out or f"scripts/figures/kfac_vs_adam{'_cnn' if args.model == 'cnn' else ''}.png"

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
