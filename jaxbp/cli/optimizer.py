"""``jaxbp train``'s optimizer: the rule of ``--optimizer`` at ``--lr``, on the schedule of
``--schedule`` and ``--warmup-steps``, after ``--clip-grad-norm``, with adamw's
``--weight-decay``. The defaults build the plain rule at a constant rate, as before these
options were added (so a run record of an earlier run still matches). adamw decays the
weights and tables only (:func:`decays`)."""

from __future__ import annotations

import argparse
import inspect
from typing import Any

import jax
import optax

from jaxbp.cli.common import UsageError, positive

OPTIMIZERS = {
    "sgd": lambda lr: optax.sgd(lr),
    "momentum": lambda lr: optax.sgd(lr, momentum=0.9),
    "nesterov": lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True),
    "adam": lambda lr: optax.adam(lr),
    "adamw": lambda lr: optax.adamw(lr, mask=decays),
}
SCHEDULES = ("constant", "cosine")
FINAL_FRACTION = 0.1
"""The cosine schedule ends at this fraction of ``--lr`` (nanoGPT's min_lr = lr / 10)."""


def decays(params: Any) -> Any:
    """adamw's weight-decay mask: True for the leaves of two or more axes (dense and conv
    weights, attention's projections, an Embedding's token and position tables), False
    for biases and norm scales and shifts, as GPT-2 and nanoGPT decay (shrinking a
    LayerNorm's scale to 0 would only fight the normalisation)."""
    return jax.tree.map(lambda leaf: jax.numpy.ndim(leaf) >= 2, params)


def add_options(parser: argparse.ArgumentParser) -> None:
    """The optimizer's options: ``--optimizer``, ``--lr`` and how they are applied."""
    parser.add_argument("--optimizer", default="adam", choices=sorted(OPTIMIZERS))
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (1e-3)")
    parser.add_argument("--schedule", default="constant", choices=SCHEDULES,
                        help="learning-rate schedule: constant, or cosine decay to lr/10 at "
                             "the last step of the run (optax.warmup_cosine_decay_schedule)")
    parser.add_argument("--warmup-steps", type=int, default=0,
                        help="steps of linear warmup from 0 to --lr (0)")
    parser.add_argument("--clip-grad-norm", type=float, default=None, metavar="G",
                        help="scale the batch gradient to global norm <= G before the "
                             "optimizer (optax.clip_by_global_norm; with --dp, after the "
                             "noise: post-processing, no privacy cost)")
    parser.add_argument("--grad-accum", type=int, default=1, metavar="K",
                        help="average the gradients of K consecutive batches before each "
                             "optimizer update (optax.MultiSteps): an update on K x "
                             "batch-size samples in the memory of one batch; the schedule "
                             "and --warmup-steps count updates (1)")
    parser.add_argument("--weight-decay", type=float, default=None,
                        help="adamw's decoupled weight decay (default optax's 1e-4), on the "
                             "weights and embedding tables, not the biases or norm scales")


def check_options(args: argparse.Namespace) -> None:
    """The numbers, before any data are read (the run's length is checked in ``build``)."""
    positive("--warmup-steps", args.warmup_steps, integer=True, allow_zero=True)
    positive("--grad-accum", args.grad_accum, integer=True)
    if args.grad_accum > 1 and getattr(args, "dp", False):
        raise UsageError(f"--grad-accum {args.grad_accum} with --dp would average "
                         f"{args.grad_accum} separately noised DP-SGD gradients (the privacy "
                         f"of {args.grad_accum} steps spent on one update, with "
                         f"sqrt({args.grad_accum}) times the noise of one DP step on their "
                         f"samples): raise --batch-size instead (--dp-microbatch bounds its "
                         f"memory)")
    if args.clip_grad_norm is not None:
        positive("--clip-grad-norm", args.clip_grad_norm)
    if args.weight_decay is not None:
        if args.optimizer != "adamw":
            raise UsageError(f"--weight-decay is adamw's (decoupled weight decay), but "
                             f"--optimizer is {args.optimizer}")
        positive("--weight-decay", args.weight_decay, allow_zero=True)


def learning_rate(lr: float, schedule: str, warmup_steps: int,
                  total_steps: int) -> float | optax.Schedule:
    """``lr`` itself, or the schedule over a run of ``total_steps`` optimizer steps."""
    if schedule == "cosine":
        if warmup_steps >= total_steps:
            raise UsageError(f"--warmup-steps {warmup_steps} leaves no step of the cosine "
                             f"decay: the run has {total_steps} steps")
        return optax.warmup_cosine_decay_schedule(0.0, lr, warmup_steps, total_steps,
                                                  end_value=lr * FINAL_FRACTION)
    if warmup_steps:
        return optax.warmup_constant_schedule(0.0, lr, warmup_steps)
    return lr


def build(args: argparse.Namespace, total_steps: int) -> optax.GradientTransformation:
    """The optimizer of the options, for a run of ``total_steps`` steps (``total_steps /
    --grad-accum`` updates: what the schedule counts)."""
    updates = max(1, total_steps // args.grad_accum)
    rule = _rule(args, learning_rate(args.lr, args.schedule, args.warmup_steps, updates))
    if args.grad_accum == 1:
        return rule
    return optax.MultiSteps(rule, every_k_schedule=args.grad_accum).gradient_transformation()


def _rule(args: argparse.Namespace, rate: float | optax.Schedule
          ) -> optax.GradientTransformation:
    """The update rule at ``rate``, after ``--clip-grad-norm`` (of the batch gradient, or
    of the K batches' average)."""
    if args.weight_decay is not None:
        rule = optax.adamw(rate, weight_decay=args.weight_decay, mask=decays)
    else:
        rule = OPTIMIZERS[args.optimizer](rate)
    if args.clip_grad_norm is None:
        return rule
    return optax.chain(optax.clip_by_global_norm(args.clip_grad_norm), rule)


def describe(args: argparse.Namespace) -> str:
    """The optimizer in the run's first line: ``adam lr 0.003`` and what is not default."""
    words = [f"{args.optimizer} lr {args.lr}"]
    if args.schedule != "constant":
        words.append(f"{args.schedule} schedule")
    if args.warmup_steps:
        words.append(f"{args.warmup_steps} warmup steps")
    if args.clip_grad_norm is not None:
        words.append(f"gradient clipped to norm {args.clip_grad_norm}")
    if args.grad_accum > 1:
        words.append(f"an update every {args.grad_accum} batches (their mean gradient)")
    if args.optimizer == "adamw":
        rate = args.weight_decay
        if rate is None:
            rate = inspect.signature(optax.adamw).parameters["weight_decay"].default
        words.append(f"weight decay {rate} on the weights (not biases or norms)")
    return ", ".join(words)


def record(args: argparse.Namespace, total_steps: int) -> dict[str, Any]:
    """The options for the run's record: only those set (an earlier run's record, which has
    none of them, still matches a run at the defaults). A cosine schedule's length is the
    run's: resuming it for more epochs would stretch the decay, so that is a change of run."""
    cosine = args.schedule == "cosine"
    entries = {"schedule": args.schedule if cosine else None,
               "schedule_steps": total_steps if cosine else None,
               "warmup_steps": args.warmup_steps or None,
               "clip_grad_norm": args.clip_grad_norm, "weight_decay": args.weight_decay,
               "grad_accum": args.grad_accum if args.grad_accum > 1 else None}
    return {name: value for name, value in entries.items() if value is not None}
