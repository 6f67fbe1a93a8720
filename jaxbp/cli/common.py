"""What every subcommand shares (and the scripts' and benchmarks' command lines): the
one-line parser, the usage error, option checks, one-line messages."""

from __future__ import annotations

import argparse
import math
import pathlib
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from jaxbp import files


class OneLineParser(argparse.ArgumentParser):
    """argparse's parser whose errors are one line (argparse prints the whole usage block
    first: 21 lines for ``jaxbp train`` at 80 columns), with the usual exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (--help lists the options)\n")


class UsageError(ValueError):
    """A bad option, file or value: exit status 2, found before any work."""


def writable_dir(option: str, directory: pathlib.Path) -> None:
    """The folder exists or can be made, and a file can be written in it."""
    try:
        files.check_writable_folder(option, directory)
    except ValueError as err:
        raise UsageError(str(err)) from None


def writable_file(option: str, path: str) -> None:
    """A figure can be written there later (a file name in a writable folder, matplotlib)."""
    try:
        files.check_figure_path(option, path)
    except (ValueError, ImportError) as err:
        raise UsageError(str(err)) from None


def positive(option: str, value: float, integer: bool = False, allow_zero: bool = False) -> None:
    good = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not good:
        kind = "an integer" if integer else "a finite number"
        raise UsageError(f"{option} must be {kind} {'>= 0' if allow_zero else '> 0'}, "
                         f"got {value!r}")


def option_for(err: Exception, message: str) -> str:
    """Put the command-line option in front of a library message about an MLP argument."""
    for word, option in (("output_activation", "--output-activation"),
                         ("activation", "--activation"), ("loss", "--loss"),
                         ("sizes", "--sizes")):
        if word in message:
            return f"{option}: {message}"
    return message


def one_line_warning(command: str) -> Callable[..., None]:
    """``warnings.showwarning`` for the command line: ``jaxbp CMD: warning: text`` on
    stderr, one line (``--debug`` keeps Python's form, with the source location)."""
    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any
             ) -> None:
        print(f"jaxbp {command}: warning: {one_line(message)}", file=sys.stderr)

    return show


def one_line(err: BaseException | str) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__
