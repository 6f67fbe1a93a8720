"""Files written whole or not at all.

A result, a figure or a table is written to a temporary file beside its target and then
renamed over it (``os.replace``, atomic on one file system): whoever reads the path,
and whatever stops the writer (an error, ``timeout``, Ctrl-C), sees the old file or the
whole new one, never a part. A Ctrl-C during the write is held back until the file is
whole (:func:`interrupts_deferred`). (Checkpoints have their own, fsynced, path:
:mod:`jaxbp.train.checkpoint`.)
"""

from __future__ import annotations

import contextlib
import os
import pathlib
import signal
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from typing import Any


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Ctrl-C (SIGINT) held back while the block writes a file, then raised as the
    ``KeyboardInterrupt`` it is. Inside a write, a library's own clean-up turns the
    interrupt into its error (numpy's ``savez`` closing its zip: "Can't close the ZIP
    file while there is an open writing handle"), which is what the user was then told.
    Python runs signal handlers in the main thread only; elsewhere (and where SIGINT's
    handler was not set from Python, so it cannot be put back) this does nothing."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is None:   # a handler set outside Python
        yield
        return
    frames: list[Any] = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: frames.append(frame))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if frames and callable(previous):
        previous(signal.SIGINT, frames[0])          # Python's own: raises KeyboardInterrupt
    elif frames and previous == signal.SIG_DFL:
        raise KeyboardInterrupt


def write_atomically(path: str | os.PathLike[str], write: Callable[[str], Any],
                     suffix: str = "") -> pathlib.Path:
    """``write(tmp)`` fills a temporary file in ``path``'s folder (created if missing),
    which then replaces ``path``; ``suffix`` ends the temporary name (a figure's format
    is read from it). The temporary file is removed if ``write`` raises."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}{suffix}")
    try:
        with interrupts_deferred():
            write(str(tmp))
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_text(path: str | os.PathLike[str], text: str) -> pathlib.Path:
    """``text`` (UTF-8) at ``path``, whole or not at all (:func:`write_atomically`)."""
    return write_atomically(path, lambda tmp: pathlib.Path(tmp).write_text(text,
                                                                           encoding="utf-8"))


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int = 100) -> pathlib.Path:
    """A matplotlib figure at ``path`` in the format its suffix names (``.png``, ``.pdf``,
    ``.svg``, ...; PNG without one), whole or not at all; the figure is closed."""
    import matplotlib.pyplot as plt

    suffix = pathlib.Path(path).suffix or ".png"
    try:
        return write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=dpi), suffix=suffix)
    finally:
        plt.close(fig)


def as_path(name: str, value: Any) -> pathlib.Path:
    """``value`` as a Path, or a TypeError naming ``name`` (pathlib's names nothing)."""
    if not isinstance(value, str | os.PathLike):
        raise TypeError(f"{name} must be a path (str or os.PathLike), got "
                        f"{type(value).__name__}")
    return pathlib.Path(value)


def require_file(what: str, path: str | os.PathLike[str]) -> pathlib.Path:
    """``path`` when a file is there; else a FileNotFoundError (nothing there) or an
    IsADirectoryError (a folder, or anything not a file), naming ``what`` it should be."""
    path = pathlib.Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    raise IsADirectoryError(f"{what} {str(path)!r} is "
                            f"{'a folder' if path.is_dir() else 'not a regular file'}, "
                            f"expected a file")


def make_folder(name: str, folder: str | os.PathLike[str]) -> pathlib.Path:
    """``folder``, made if missing; a file there, or a folder that cannot be made, is a
    ValueError naming ``name`` (not ``mkdir``'s FileExistsError or OSError)."""
    folder = as_path(name, folder)
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"{name}: {str(folder)!r} is a file, expected a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ValueError(f"{name}: cannot write in {str(folder)!r}: "
                         f"{err.strerror or err}") from None
    return folder


def check_writable_folder(name: str, folder: str | os.PathLike[str]) -> pathlib.Path:
    """``folder`` exists or is made, and a file can be written in it; else a ValueError
    naming ``name`` (a TypeError if it is no path). Run before the work whose result goes
    there, so that a long run never ends in an error it could have had at the start."""
    folder = make_folder(name, folder)
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".jaxbp-write-test-"):
            pass
    except OSError as err:
        raise ValueError(f"{name}: cannot write in {str(folder)!r}: "
                         f"{err.strerror or err}") from None
    return folder


def check_figure_path(name: str, path: str | os.PathLike[str]) -> pathlib.Path:
    """``path`` can take a figure later: not a folder, its folder writable
    (:func:`check_writable_folder`), a suffix matplotlib writes (or none), matplotlib
    installed (else an ImportError)."""
    target = as_path(name, path)
    if target.is_dir():
        raise ValueError(f"{name}: {str(path)!r} is a folder, expected a file name such as "
                         f"{str(target / 'curves.png')!r}")
    check_writable_folder(name, target.parent)
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise ImportError(f"{name}: plotting needs matplotlib: pip install 'jaxbp[plot]'") \
            from None
    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = target.suffix.lower().lstrip(".")
    if suffix and suffix not in formats:   # savefig would fail after the run
        raise ValueError(f"{name}: {str(path)!r} ends in .{suffix}, which is no figure format "
                         f"matplotlib writes; use one of "
                         f"{', '.join('.' + f for f in sorted(formats))} (no suffix: PNG)")
    return target
