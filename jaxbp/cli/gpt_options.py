"""``--model gpt``'s shape options checked together, each error naming its option: one
line per error on the command line, before a GPT is built."""

from __future__ import annotations

import argparse

from jaxbp.cli.common import UsageError, positive


def check(args: argparse.Namespace) -> None:
    """--dim, --depth, --heads (integers > 0, heads dividing dim), --kv-heads (dividing
    --heads), rotary's even head width, --dropout in [0, 1), --attention-block and
    --mlp-hidden (integers > 0 where given)."""
    for option, value in (("--dim", args.dim), ("--depth", args.depth),
                          ("--heads", args.heads)):
        positive(option, value, integer=True)
    if args.dim % args.heads:
        raise UsageError(f"--heads {args.heads} must divide --dim {args.dim}")
    if args.kv_heads is not None:
        positive("--kv-heads", args.kv_heads, integer=True)
        if args.heads % args.kv_heads:
            raise UsageError(f"--kv-heads {args.kv_heads} must divide --heads {args.heads}: "
                             f"each key/value head serves a group of query heads")
    if args.positions == "rope" and (args.dim // args.heads) % 2:
        raise UsageError(f"--positions rope turns pairs of a head's features: the head width "
                         f"--dim / --heads = {args.dim // args.heads} must be even")
    if not 0 <= args.dropout < 1:
        raise UsageError(f"--dropout must be a rate in [0, 1), got {args.dropout:g}")
    for option, value in (("--attention-block", args.attention_block),
                          ("--mlp-hidden", args.mlp_hidden)):
        if value is not None:
            positive(option, value, integer=True)
