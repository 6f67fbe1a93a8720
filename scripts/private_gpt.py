"""Differentially private training of a small GPT on the shipped text: validation bits per
character against the epsilon spent, at two privacy targets, beside the non-private run
(public API only).

    python scripts/private_gpt.py [--epochs 4] [--targets 3,8] [--batch-size 256]
                                  [--microbatch 64] [--out scripts/figures/private_gpt.png]

A character-level GPT (dim 64, 2 blocks, 4 heads, T 64) on tiny Shakespeare (the text
``jaxbp.data.load_text`` ships). DP-SGD through ``jaxbp.fit(..., privacy=Privacy(...))``:
one sample is one window of 64 characters, its loss the mean over its tokens; Poisson
sampling with the expected batch ``--batch-size``, clip norm 1, sigma calibrated so that
the whole run spends at most each target epsilon (delta 1e-5, RDP accounting), adam(3e-3);
only the sampled rows of each padded Poisson batch run, ``--microbatch`` at a time
(default a quarter of the batch; 0: the whole padded batch; the same training).
The non-private run is the same net, optimizer, batch size and epochs with the plain
gradient. Every epoch adds a point (epsilon spent, validation bits/char).
"""

from __future__ import annotations

import math

import jax
import optax

import jaxbp
from jaxbp import files
from jaxbp.cli.common import OneLineParser
from jaxbp.privacy import Privacy


def run(net, text, epochs: int, batch: int, privacy: Privacy | None) -> dict[str, list]:
    return jaxbp.fit(net, optax.adam(3e-3), text, epochs=epochs, batch_size=batch,
                     key=jax.random.key(0), progress=False, privacy=privacy).history


def main() -> None:
    parser = OneLineParser(allow_abbrev=False, description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--targets", default="3,8", help="target epsilons (3,8)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--microbatch", type=int, default=None,
                        help="sampled rows at a time (default batch-size/4; 0: padded batch)")
    parser.add_argument("--out", default="scripts/figures/private_gpt.png")
    args = parser.parse_args()
    microbatch = max(1, args.batch_size // 4) if args.microbatch is None else args.microbatch

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    text = jaxbp.data.load_text(seq_len=args.seq_len)
    net = jaxbp.models.gpt(text.n_out, 64, 2, 4, args.seq_len)
    bits = 1 / math.log(2)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    plain = [loss * bits for loss in run(net, text, args.epochs, args.batch_size,
                                         None)["test_loss"]]
    ax.axhline(plain[-1], color="k", lw=1, label=f"non-private: {plain[-1]:.3f}")
    print(f"non-private: validation {plain[-1]:.3f} bits/char after {args.epochs} epochs "
          f"(per epoch {', '.join(f'{b:.3f}' for b in plain)})")
    for target in (float(t) for t in args.targets.split(",")):
        history = run(net, text, args.epochs, args.batch_size,
                      Privacy(clip_norm=1.0, target_epsilon=target,
                              microbatch=microbatch or None))
        curve = [loss * bits for loss in history["test_loss"]]
        ax.plot(history["epsilon"], curve, "o-", ms=3,
                label=f"target epsilon {target:g}: {curve[-1]:.3f} at {history['epsilon'][-1]:.2f}")
        print(f"target epsilon {target:g}: validation {curve[-1]:.3f} bits/char at epsilon "
              f"{history['epsilon'][-1]:.3f} (delta 1e-5) after {args.epochs} epochs "
              f"(per epoch {', '.join(f'{b:.3f}' for b in curve)})")
    ax.set(xlabel="epsilon spent (delta = 1e-5, RDP)", ylabel="validation bits/char")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"DP-SGD, GPT 64 x 2 blocks, tiny Shakespeare\nexpected batch "
                 f"{args.batch_size}, clip 1, adam 3e-3, {args.epochs} epochs", fontsize=9)
    fig.tight_layout()
    files.save_figure(fig, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
