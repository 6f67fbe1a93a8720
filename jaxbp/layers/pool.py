"""MaxPool and AvgPool: non-overlapping windows (stride = window), VALID; backward by hand.

The forward is ``lax.reduce_window``; a trailing row or column that does not
fill a window is dropped (VALID) and gets a zero error. The backward passes
each window's error to its inputs:

* max: all of it to the window's (first) largest input, as XLA's
  select-and-scatter does, written as a one-hot mask of the argmax;
* average: ``delta / (ph pw)`` to each input of the window.

No parameters: ``{}``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxbp._typing import Array
from jaxbp.layers.base import Shape, register


def _window(value: Any) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(pair, tuple | list) or len(pair) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair)):
        raise ValueError(f"pool window must be an int >= 1 or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


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

    def _windows(self, x: Array) -> Array:
        """(N, H, W, C) -> (N, Ho, Wo, C, ph * pw): each window's inputs on the last axis."""
        (ph, pw), (n, h, w, c) = self.window, x.shape
        ho, wo = h // ph, w // pw
        cropped = x[:, :ho * ph, :wo * pw]
        return cropped.reshape(n, ho, ph, wo, pw, c).transpose(0, 1, 3, 5, 2, 4).reshape(
            n, ho, wo, c, ph * pw)

    def _unwindow(self, per_input: Array, in_hw: tuple[int, int]) -> Array:
        """The inverse of :meth:`_windows`, zeros where the VALID crop dropped inputs."""
        (ph, pw), (n, ho, wo, c, _) = self.window, per_input.shape
        full = per_input.reshape(n, ho, wo, c, ph, pw).transpose(0, 1, 4, 2, 5, 3).reshape(
            n, ho * ph, wo * pw, c)
        return jnp.pad(full, ((0, 0), (0, in_hw[0] - ho * ph), (0, in_hw[1] - wo * pw), (0, 0)))

    def per_sample_grads(self, params: Any, cache: Any, delta_out: Array) -> dict[str, Array]:
        return {}

    def per_sample_sq_norms(self, params: Any, cache: Any, delta_out: Array) -> None:
        return None


@register
@dataclasses.dataclass(frozen=True)
class MaxPool(_Pool):
    """The largest input of each ``window`` (stride = window, VALID)."""

    window: tuple[int, int] = (2, 2)

    def __post_init__(self) -> None:
        object.__setattr__(self, "window", _window(self.window))

    def forward(self, params: Any, x: Array) -> tuple[Array, Array]:
        return self._reduce(x, -jnp.inf, jax.lax.max), x

    def backward(self, params: Any, x: Array, delta_out: Array,
                 need_input: bool = True) -> tuple[Array | None, dict[str, Array]]:
        if not need_input:
            return None, {}
        windows = self._windows(x)
        # the error goes to the first largest input of each window (ties: the first)
        mask = jax.nn.one_hot(jnp.argmax(windows, axis=-1), windows.shape[-1], dtype=x.dtype)
        return self._unwindow(mask * delta_out[..., None], x.shape[1:3]), {}


@register
@dataclasses.dataclass(frozen=True)
class AvgPool(_Pool):
    """The mean input of each ``window`` (stride = window, VALID)."""

    window: tuple[int, int] = (2, 2)

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
        share = jnp.broadcast_to(delta_out[..., None] / (ph * pw), (*delta_out.shape, ph * pw))
        return self._unwindow(share, in_hw), {}
