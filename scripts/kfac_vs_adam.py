"""Train digits with K-FAC (the factors from the hand-written recursion) and with adam,
and plot both runs' test curves in one figure (public API only).

    python scripts/kfac_vs_adam.py [--epochs 15] [--out scripts/figures/kfac_vs_adam.png]
"""

from __future__ import annotations

import argparse

import jax
import optax

import jaxbp


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--out", default="scripts/figures/kfac_vs_adam.png")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    digits = jaxbp.data.load_digits()
    net = jaxbp.MLP((64, 128, 128, 10), "relu")
    runs = {
        "adam (lr 1e-3)": (optax.adam(1e-3), "backprop"),
        "K-FAC (damping 0.1) + sgd momentum (lr 0.3)": (
            optax.chain(jaxbp.kfac_preconditioner(0.1), optax.sgd(0.3, momentum=0.9)),
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
    fig.suptitle("digits, MLP (64, 128, 128, 10) relu, batch 128")
    fig.tight_layout()
    fig.savefig(args.out, dpi=100)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
