"""The ``jaxbp`` command: ``jaxbp verify``, ``jaxbp train``, ``jaxbp bench``.

Every error is one line on stderr, ``jaxbp <command>: error: ...``, naming the
option, file or value; the exit status is 2 for a bad option, file or value
(all found before any work starts) and 1 for a run that failed; ``--debug``
shows the traceback instead. One module per subcommand; :mod:`jaxbp.cli.plan`
checks ``train``'s options.
"""

from __future__ import annotations

import argparse
import sys
import traceback
import warnings
from collections.abc import Sequence

from jaxbp.cli import bench, train, verify
from jaxbp.cli.bench import ACCELERATOR_TIME_LIMIT_S, CPU_MAX_GFLOP
from jaxbp.cli.common import OneLineParser, UsageError, one_line, one_line_warning
from jaxbp.cli.optimizer import OPTIMIZERS
from jaxbp.cli.verify import DTYPES

__all__ = ["ACCELERATOR_TIME_LIMIT_S", "CPU_MAX_GFLOP", "DTYPES", "OPTIMIZERS", "UsageError",
           "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``jaxbp`` and its subcommands (their parsers of the same
    one-line class: ``add_subparsers`` makes them so)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error")
    # no abbreviations: a misspelt option is an error, never another option's prefix
    # (`jaxbp train --out x` was read as --output-activation x)
    parser = OneLineParser(
        prog="jaxbp", allow_abbrev=False,
        description="Hand-written backpropagation in JAX: verify the gradient, train, "
                    "benchmark.")
    commands = parser.add_subparsers(dest="command", required=True)
    for command in (verify, train, bench):
        command.add_parser(commands, common)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jaxbp`` command; returns the exit code.

    Errors print one line and return 2 (a bad option, file or value) or 1 (a failed
    run); with ``--debug`` they print their traceback instead and return the same code.
    """
    args, unknown = build_parser().parse_known_args(argv)
    prefix = f"jaxbp {args.command}: error:"
    if unknown:              # the subcommand's words, not the top level's "jaxbp: error"
        print(f"{prefix} unrecognized arguments: {' '.join(unknown)} (--help lists the "
              f"options)", file=sys.stderr)
        raise SystemExit(2)
    try:
        with warnings.catch_warnings():
            if not args.debug:        # a notice is one line, without a source location
                warnings.showwarning = one_line_warning(args.command)
            return args.run(args)
    except UsageError as err:
        _report(args.debug, f"{prefix} {one_line(err)}")
        return 2
    except KeyboardInterrupt:
        folder = getattr(args, "checkpoint_dir", None)
        print(f"{prefix} interrupted" + (f"; the checkpoints in {folder} are whole: the same "
                                         f"command resumes from the last" if folder else ""),
              file=sys.stderr)
        return 130
    except Exception as err:  # a failed run: one line, unless --debug
        _report(args.debug, f"{prefix} {type(err).__name__}: {one_line(err)} (--debug for "
                            f"the traceback)")
        return 1


def _report(debug: bool, line: str) -> None:
    """The error being handled: its traceback with ``--debug``, else one line."""
    if debug:
        traceback.print_exc()
    else:
        print(line, file=sys.stderr)
