"""Matmul precision: the names JAX accepts, a scope that traces code under one, the current one.

``jax.default_matmul_precision`` decides what a float32 matmul runs as on an
accelerator (TensorFloat-32 or one bf16 pass at "default", true float32 at
"highest"). The train step, the sharded step, ``verify_grads`` and the bench
take a ``precision`` argument and trace their bodies inside :func:`precision_scope`.
"""

from __future__ import annotations

import contextlib
from typing import Any

import jax

MATMUL_PRECISIONS = ("default", "high", "highest", "bfloat16", "tensorfloat32", "float32",
                     "bfloat16_3x")
"""The names :func:`jax.default_matmul_precision` accepts; None leaves JAX's setting."""


def check_precision(precision: str | None) -> str | None:
    """``precision`` itself if JAX knows it (or None), else a ValueError naming the choices."""
    if precision is not None and precision not in MATMUL_PRECISIONS:
        raise ValueError(f"Unknown precision {precision!r}. It needs to be one of "
                         f"{list(MATMUL_PRECISIONS)} (or None: JAX's current setting).")
    return precision


def precision_scope(precision: str | None) -> Any:
    """``jax.default_matmul_precision(precision)`` for the code traced inside; None: no change.

    Used around the body of a step at trace time, so the compiled program's
    dot_generals carry the precision (``precision=[HIGHEST, HIGHEST]`` in its HLO).
    """
    check_precision(precision)
    if precision is None:
        return contextlib.nullcontext()
    return jax.default_matmul_precision(precision)


def current_precision(precision: str | None = None) -> str:
    """``precision``, else JAX's ``jax_default_matmul_precision`` setting, else "default"."""
    return precision or jax.config.jax_default_matmul_precision or "default"
