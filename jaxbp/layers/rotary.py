"""Rotary position embedding (RoPE): each head's query and key turned by an angle that
grows with the position, so that their dot product depends on the positions' distance.

A head's d_h features form d_h/2 pairs, feature i with feature i + d_h/2 (the
"rotate half" layout of GPT-NeoX and LLaMA), pair i turning at the frequency
``f_i = base^(-2 i / d_h)``. At position t, with ``c = cos(t f)``, ``s = sin(t f)``
and ``x = [x_1, x_2]`` the two halves:

.. math::
    R_t x = [x_1 c - x_2 s,\\; x_2 c + x_1 s], \\qquad
    R_t^\\top \\delta = [\\delta_1 c + \\delta_2 s,\\; \\delta_2 c - \\delta_1 s]

R_t is a rotation, so the error at the unrotated Q is ``R_t^T dQ`` (the transpose
turns back): :func:`rotate_back`. Shapes: x (batch, heads, T, d_h); the angles
(T, d_h / 2). References: Su et al., RoFormer (2021).
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from jaxbp.types import Array


def angles(steps: int, head_width: int, base: float, dtype: Any) -> tuple[Array, Array]:
    """``(cos(t f_i), sin(t f_i))``, each (steps, head_width / 2), in ``dtype``."""
    freqs = base ** (-jnp.arange(0, head_width // 2, dtype=dtype) * 2 / head_width)
    turn = jnp.arange(steps, dtype=dtype)[:, None] * freqs[None, :]    # t f_i
    return jnp.cos(turn), jnp.sin(turn)


def _halves(x: Array) -> tuple[Array, Array]:
    half = x.shape[-1] // 2
    return x[..., :half], x[..., half:]


def rotate(x: Array, cos: Array, sin: Array) -> Array:
    """``R_t x`` at every position t: (batch, heads, T, d_h), in x's dtype (the turn is
    computed in the angles' dtype)."""
    x1, x2 = _halves(x.astype(jnp.result_type(x, cos)))
    turned = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return turned.astype(x.dtype)


def rotate_back(delta: Array, cos: Array, sin: Array) -> Array:
    """``R_t^T delta``: the error at the unrotated input from the error at the rotated one."""
    d1, d2 = _halves(delta.astype(jnp.result_type(delta, cos)))
    turned = jnp.concatenate([d1 * cos + d2 * sin, d2 * cos - d1 * sin], axis=-1)
    return turned.astype(delta.dtype)
