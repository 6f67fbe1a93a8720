"""Backprop, feedback alignment, direct feedback alignment and sign symmetry on the digits
(public API only): test accuracy per epoch and each hidden layer's angle to the true
gradient over training (Lillicrap et al. 2016, their Fig. 2).

    python scripts/feedback_alignment.py [--epochs 40] [--out FIGURE.png]

One MLP 64-128-128-10 (tanh), the same initial params, data order and adam(1e-3) for every
rule; the feedback matrices are fixed draws (jaxbp.feedback.random_feedback). The angle is
measured every epoch on the first 512 training digits.
"""

from __future__ import annotations

import jax
import numpy as np
import optax

import jaxbp
from jaxbp import feedback, files
from jaxbp.cli.common import OneLineParser


def sources(net: jaxbp.MLP, key: jax.Array) -> dict[str, object]:
    return {"backprop": "backprop",
            "feedback alignment": feedback.alignment(feedback.random_feedback(net, key)),
            "direct feedback alignment": feedback.direct(
                feedback.random_feedback(net, key, kind="direct")),
            "sign symmetry": feedback.sign_symmetry()}


def train(net, source, digits, epochs: int, batch: int = 128) -> dict[str, list]:
    optimizer = optax.adam(1e-3)
    step = jaxbp.make_train_step(net, optimizer, grad=source)
    state = jaxbp.TrainState.create(net.init(jax.random.key(0)), optimizer)
    rng = np.random.default_rng(0)
    probe_x, probe_y = digits.x_train[:512], digits.y_train[:512]
    history: dict[str, list] = {"accuracy": [], "angles": []}
    for _ in range(epochs):
        order = rng.permutation(len(digits.x_train))
        for start in range(0, len(order) - batch + 1, batch):
            rows = order[start:start + batch]
            state, _ = step(state, digits.x_train[rows], digits.y_train[rows])
        history["accuracy"].append(jaxbp.evaluate(net, state.params, digits.x_test,
                                                  digits.y_test)["accuracy"])
        if source != "backprop":
            history["angles"].append(feedback.angles(net, state.params, probe_x, probe_y,
                                                     source)[:-1])
    return history


def main() -> None:
    parser = OneLineParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--out", default="scripts/figures/feedback_alignment.png")
    args = parser.parse_args()

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    digits = jaxbp.data.load_digits()
    net = jaxbp.MLP((64, 128, 128, 10), "tanh")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    epochs = np.arange(1, args.epochs + 1)
    for (name, source), color in zip(sources(net, jax.random.key(1)).items(),
                                     ("k", "C0", "C1", "C2")):
        history = train(net, source, digits, args.epochs)
        axes[0].plot(epochs, history["accuracy"], color=color, label=name)
        line = f"{name:>26}: test accuracy {history['accuracy'][-1]:.4f}"
        if history["angles"]:
            angles = np.array(history["angles"])
            for layer, style in zip(range(angles.shape[1]), ("-", "--")):
                axes[1].plot(epochs, angles[:, layer], style, color=color,
                             label=f"{name}, hidden layer {layer + 1}")
            line += ("; angle to backprop's update, hidden layers: start "
                     + ", ".join(f"{a:.0f}" for a in angles[0]) + " deg, end "
                     + ", ".join(f"{a:.0f}" for a in angles[-1]) + " deg")
        print(line)
    axes[0].set(xlabel="epoch", ylabel="test accuracy", title="digits, MLP 64-128-128-10 tanh",
                ylim=(0.5, 1.0))
    axes[1].axhline(90, color="grey", lw=0.8)
    axes[1].set(xlabel="epoch", ylabel="degrees", ylim=(0, 100),
                title="angle between the rule's update and the true gradient")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    files.save_figure(fig, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
