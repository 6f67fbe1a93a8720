"""Warnings attributed to the caller's own line, however deep inside jaxbp they arise.

``warnings.warn(..., stacklevel=k)`` needs the number of jaxbp frames between the
warning and the user, which changes whenever the call path does (a fixed ``k`` that was
right for ``fit`` points into jaxbp when the path is longer). :func:`warn` counts them.
"""

from __future__ import annotations

import pathlib
import sys
import warnings

PACKAGE_DIR = pathlib.Path(__file__).resolve().parent


def warn(message: str, category: type[Warning] = RuntimeWarning) -> None:
    """``warnings.warn(message, category)`` attributed to the first frame outside jaxbp."""
    frame, level = sys._getframe(1), 2          # the function calling warn: stacklevel 2
    while frame is not None and inside_package(frame.f_code.co_filename):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)


def inside_package(filename: str) -> bool:
    """Whether ``filename`` is one of jaxbp's own source files."""
    try:
        return pathlib.Path(filename).resolve().is_relative_to(PACKAGE_DIR)
    except (OSError, ValueError):
        return False
