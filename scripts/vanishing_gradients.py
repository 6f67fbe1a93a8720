"""Seed 001's closing remark, measured: a 10-layer sigmoid net's errors vanish layer by
layer; a ReLU net with He initialisation keeps them (public API only).

    python scripts/vanishing_gradients.py [--out scripts/figures/vanishing_gradients.png]

On one batch of 256 digits, at initialisation, mean |delta^l| and ||dC/dW^l|| per layer.
"""

from __future__ import annotations

import jax
import numpy as np

import jaxbp
from jaxbp import files
from jaxbp.cli.common import OneLineParser


def flow(activation: str) -> dict[str, np.ndarray]:
    digits = jaxbp.data.load_digits()
    net = jaxbp.MLP((64,) + (64,) * 9 + (10,), activation)  # 10 weight layers
    params = net.init(jax.random.key(0))
    stats = jaxbp.layer_stats(net, params, digits.x_train[:256], digits.y_train[:256])
    return {k: np.asarray(v) for k, v in stats.items()}


def main() -> None:
    parser = OneLineParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="scripts/figures/vanishing_gradients.png")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for activation, label in (("sigmoid", "sigmoid, Glorot"), ("relu", "relu, He")):
        stats = flow(activation)
        layers = np.arange(1, len(stats["mean_abs_delta"]) + 1)
        axes[0].semilogy(layers, stats["mean_abs_delta"], "o-", label=label)
        axes[1].semilogy(layers, stats["grad_norm"], "o-", label=label)
        print(f"{label:>16}: mean |delta| layer 1 {stats['mean_abs_delta'][0]:.2e}, "
              f"layer 10 {stats['mean_abs_delta'][-1]:.2e} (ratio "
              f"{stats['mean_abs_delta'][0] / stats['mean_abs_delta'][-1]:.1e})")
    axes[0].set(xlabel="layer l", ylabel="mean |delta^l|", title="error per layer")
    axes[1].set(xlabel="layer l", ylabel="||dC/dW^l||", title="gradient norm per layer")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle("10 weight layers at initialisation, one batch of 256 digits")
    fig.tight_layout()
    files.save_figure(fig, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
