"""Differentially private training of the digits MLP and CNN: test accuracy against the
epsilon spent, at several noise levels, beside the non-private run (public API only).

    python scripts/private_digits.py [--epochs 40] [--out scripts/figures/private_digits.png]

DP-SGD through ``jaxbp.fit(..., privacy=Privacy(...))``: Poisson sampling with expected
batch 128 (q = 128/1438), clip norm 1, sigma in --sigmas, delta 1e-5, RDP accounting
(dp-accounting), adam(3e-3); the non-private run is the same net, optimizer, batch size and
epochs with the plain gradient. Every epoch adds a point (epsilon spent, test accuracy).
"""

from __future__ import annotations

import jax
import optax

import jaxbp
from jaxbp import files, layers
from jaxbp.cli.common import OneLineParser
from jaxbp.privacy import Privacy


def models(digits: jaxbp.data.Dataset) -> dict[str, tuple[object, jaxbp.data.Dataset]]:
    cnn = jaxbp.Network((layers.Conv2D(16, (3, 3), activation="relu"), layers.MaxPool(2),
                         layers.Conv2D(32, (3, 3), activation="relu"), layers.MaxPool(2),
                         layers.Flatten(), layers.Dense(64, "relu"), layers.Dense(10)),
                        (8, 8, 1))
    images = digits._replace(x_train=digits.x_train.reshape(-1, 8, 8, 1),
                             x_test=digits.x_test.reshape(-1, 8, 8, 1))
    return {"MLP 64-256-256-10": (jaxbp.MLP((64, 256, 256, 10), "relu"), digits),
            "CNN (jaxbp train --model cnn)": (cnn, images)}


def run(net, data, epochs: int, privacy: Privacy | None) -> dict[str, list[float]]:
    return jaxbp.fit(net, optax.adam(3e-3), data, epochs=epochs, batch_size=128,
                     key=jax.random.key(0), progress=False, privacy=privacy).history


def main() -> None:
    parser = OneLineParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--sigmas", default="0.7,1.0,2.0")
    parser.add_argument("--out", default="scripts/figures/private_digits.png")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    digits = jaxbp.data.load_digits()
    sigmas = [float(s) for s in args.sigmas.split(",")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, (name, (net, data)) in zip(axes, models(digits).items()):
        plain = run(net, data, args.epochs, None)["test_accuracy"][-1]
        ax.axhline(plain, color="k", lw=1, label=f"non-private {plain:.3f}")
        print(f"{name}: non-private test accuracy {plain:.4f} after {args.epochs} epochs")
        for sigma in sigmas:
            history = run(net, data, args.epochs, Privacy(clip_norm=1.0, noise_multiplier=sigma))
            ax.plot(history["epsilon"], history["test_accuracy"], "o-", ms=3,
                    label=f"sigma {sigma}: {history['test_accuracy'][-1]:.3f} at "
                          f"epsilon {history['epsilon'][-1]:.2f}")
            print(f"{name}: sigma {sigma}: test accuracy {history['test_accuracy'][-1]:.4f} at "
                  f"epsilon {history['epsilon'][-1]:.2f} (delta 1e-5); epoch 10: "
                  f"{history['test_accuracy'][9]:.4f} at epsilon {history['epsilon'][9]:.2f}")
        ax.set(xscale="log", xlabel="epsilon spent (delta = 1e-5, RDP)", title=name,
               ylim=(0.0, 1.0))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="lower right")
    axes[0].set_ylabel("test accuracy")
    fig.suptitle(f"DP-SGD on the digits: Poisson q = 128/1438, clip 1, adam 3e-3, "
                 f"{args.epochs} epochs")
    fig.tight_layout()
    files.save_figure(fig, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
