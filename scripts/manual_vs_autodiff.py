"""Train the same net twice from the same key, with the hand-written gradient and with
jax.grad, and plot how far the two parameter trajectories drift apart (public API only).

    python scripts/manual_vs_autodiff.py [--steps 300] [--out FILE.png]

For float32 and float64, on the shipped digits with adam: after every step, the
largest |manual - autodiff| over all parameters, relative to the largest |param|.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jaxbp
from jaxbp import files
from jaxbp.cli.common import OneLineParser


def drift(dtype: str, steps: int) -> tuple[np.ndarray, float]:
    """Per-step max |theta_manual - theta_autodiff| / max |theta_autodiff|, and final accuracy."""
    digits = jaxbp.data.load_digits()
    net = jaxbp.MLP((64, 128, 128, 10), "relu", dtype=dtype)
    optimizer = optax.adam(1e-3)
    params = net.init(jax.random.key(0))
    steps_fns = {g: jaxbp.make_train_step(net, optimizer, grad=g) for g in ("backprop",
                                                                            "autodiff")}
    # each state owns its arrays: the steps donate (consume) the state they are given
    states = {g: jaxbp.TrainState.create(jax.tree.map(jnp.copy, params), optimizer)
              for g in steps_fns}
    order = jax.random.permutation(jax.random.key(1), steps * 64) % len(digits.x_train)
    x_all = jnp.asarray(digits.x_train, dtype)
    out = []
    for step in range(steps):
        index = order[step * 64:(step + 1) * 64]
        x, y = x_all[index], digits.y_train[np.asarray(index)]
        for g, fn in steps_fns.items():
            states[g], _ = fn(states[g], x, y)
        leaves_m = jax.tree.leaves(states["backprop"].params)
        leaves_a = jax.tree.leaves(states["autodiff"].params)
        diff = max(float(jnp.max(jnp.abs(m - a))) for m, a in zip(leaves_m, leaves_a))
        scale = max(float(jnp.max(jnp.abs(a))) for a in leaves_a)
        out.append(diff / scale)
    accuracy = jaxbp.evaluate(net, states["backprop"].params, digits.x_test,
                              digits.y_test)["accuracy"]
    return np.array(out), accuracy


def main() -> None:
    parser = OneLineParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--out", default="scripts/figures/manual_vs_autodiff.png")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for dtype in ("float32", "float64"):
        with jax.enable_x64(dtype == "float64"):
            rel, accuracy = drift(dtype, args.steps)
        print(f"{dtype}: max relative param difference after {args.steps} steps "
              f"{rel[-1]:.2e} (worst along the way {rel.max():.2e}); test accuracy "
              f"{accuracy:.4f}")
        ax.semilogy(np.arange(1, args.steps + 1), np.maximum(rel, 1e-18), label=dtype)
    ax.set(xlabel="adam step", ylabel="max |manual - autodiff| / max |param|",
           title="hand-written backprop vs jax.grad: same training run")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    files.save_figure(fig, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
