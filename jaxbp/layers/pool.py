"""MaxPool and AvgPool: non-overlapping windows (stride = window), VALID; backward by hand.

The forward is ``lax.reduce_window``; a trailing row or column that does not
fill a window is dropped (VALID) and gets a zero error. The backward passes
each window's error to its inputs:

* max: all of it to the window's (first) largest input, as XLA's
  select-and-scatter does, written as a mask: the inputs equal to their window's
  max, the first of them in row-major window order (:func:`first_max_mask`);
* average: ``delta / (ph pw)`` to each input of the window.

No parameters: ``{}``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxbp.layers.base import Shape, register
from jaxbp.types import Array, is_int


def _window(value: Any) -> tuple[int, int]:
    pair = (value, value) if is_int(value) else value
    if (not isinstance(pair, tuple | list) or len(pair) != 2
            or not all(is_int(v) and v >= 1 for v in pair)):
        raise ValueError(f"pool window must be an int >= 1 or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


def first_max_mask(blocks: Array) -> Array:
    """True at the first largest input of each window (row-major order in the window).

    ``blocks``: (N, Ho, ph, Wo, pw, C), windows on axes 2 and 4. ``max`` over them, ``==``,
    then the smallest window position among the equal ones: elementwise work and
    reductions over non-minor axes that fuse into one kernel, no transpose and no
    scatter (XLA's select-and-scatter gives the same result: ties go to the first).
    """
    _, _, ph, _, pw, _ = blocks.shape
    largest = jnp.max(blocks, axis=(2, 4), keepdims=True)
    position = (jnp.arange(ph)[:, None, None] * pw + jnp.arange(pw)[None, None, :]
                ).reshape(1, 1, ph, 1, pw, 1)
    first = jnp.min(jnp.where(blocks == largest, position, ph * pw), axis=(2, 4), keepdims=True)
    return position == first


class _Pool:
    """What both pools share: the window, the output shape, windows as a trailing axis."""

    window: tuple[int, int]

    def output_shape(self, in_shape: Shape) -> Shape:
        if len(in_shape) != 3:
            raise ValueError(f"takes (batch, height, width, channels) inputs but gets samples "
                             f"of shape {in_shape}")
        (h, w, c), (ph, pw) = in_shape, self.window
        if h < ph or w < pw:
            raise ValueError(f"window {self.window} is larger than its input {(h, w)}")
        return (h // ph, w // pw, c)

    def init(self, key: Array, in_shape: Shape, dtype: Any) -> dict[str, Array]:
        return {}

    def _reduce(self, x: Array, init: Any, op: Any) -> Array:
        ph, pw = self.window
        return jax.lax.reduce_window(x, init, op, (1, ph, pw, 1), (1, ph, pw, 1), "VALID")

    def _blocks(self, x: Array) -> Array:
        """(N, H, W, C) -> (N, Ho, ph, Wo, pw, C), windows on axes 2 and 4: a reshape only."""
        (ph, pw), (n, h, w, c) = self.window, x.shape
        ho, wo = h // ph, w // pw
        return x[:, :ho * ph, :wo * pw].reshape(n, ho, ph, wo, pw, c)

    def _unblock(self, blocks: Array, in_hw: tuple[int, int]) -> Array:
        """The inverse of :meth:`_blocks`, zeros where the VALID crop dropped inputs."""
        n, ho, ph, wo, pw, c = blocks.shape
        full = blocks.reshape(n, ho * ph, wo * pw, c)
        return jnp.pad(full, ((0, 0), (0, in_hw[0] - ho * ph), (0, in_hw[1] - wo * pw), (0, 0)))

    def per_sample_grads(self, params: Any, cache: Any, delta_out: Array) -> dict[str, Array]:
        return {}

    def feedback_shape(self, in_shape: Shape) -> None:
        """No feedback: the feedback rules keep this layer's own J^T
        (its J^T reads its own cache)."""
        return None

    def per_sample_sq_norms(self, params: Any, cache: Any, delta_out: Array) -> None:
        return None


@register
@dataclasses.dataclass(frozen=True)
class MaxPool(_Pool):
    """The largest input of each ``window`` (stride = window, VALID)."""

    window: int | tuple[int, int] = (2, 2)

    def __post_init__(self) -> None:
        object.__setattr__(self, "window", _window(self.window))

    def forward(self, params: Any, x: Array) -> tuple[Array, Array]:
        return self._reduce(x, -jnp.inf, jax.lax.max), x

    def backward(self, params: Any, x: Array, delta_out: Array,
                 need_input: bool = True) -> tuple[Array | None, dict[str, Array]]:
        if not need_input:
            return None, {}
        blocks = self._blocks(x)
        spread = jnp.where(first_max_mask(blocks), delta_out[:, :, None, :, None, :], 0)
        return self._unblock(spread.astype(delta_out.dtype), x.shape[1:3]), {}


@register
@dataclasses.dataclass(frozen=True)
class AvgPool(_Pool):
    """The mean input of each ``window`` (stride = window, VALID)."""

    window: int | tuple[int, int] = (2, 2)

    def __post_init__(self) -> None:
        object.__setattr__(self, "window", _window(self.window))

    def forward(self, params: Any, x: Array) -> tuple[Array, tuple[int, int]]:
        ph, pw = self.window
        return self._reduce(x, 0.0, jax.lax.add) / (ph * pw), x.shape[1:3]

    def backward(self, params: Any, in_hw: tuple[int, int], delta_out: Array,
                 need_input: bool = True) -> tuple[Array | None, dict[str, Array]]:
        if not need_input:
            return None, {}
        ph, pw = self.window
        n, ho, wo, c = delta_out.shape
        share = jnp.broadcast_to((delta_out / (ph * pw))[:, :, None, :, None, :],
                                 (n, ho, ph, wo, pw, c))
        return self._unblock(share, in_hw), {}
