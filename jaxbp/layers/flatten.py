"""Flatten: (batch, *shape) -> (batch, prod(shape)); the error is reshaped back."""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from jaxbp.layers.base import Shape, register
from jaxbp.types import Array


@register
@dataclasses.dataclass(frozen=True)
class Flatten:
    """Each sample's features in one row, C order (as ``x.reshape(batch, -1)``)."""

    def output_shape(self, in_shape: Shape) -> Shape:
        return (math.prod(in_shape),)

    def init(self, key: Array, in_shape: Shape, dtype: Any) -> dict[str, Array]:
        return {}

    def forward(self, params: Any, x: Array) -> tuple[Array, tuple[int, ...]]:
        return x.reshape(x.shape[0], -1), x.shape

    def backward(self, params: Any, in_shape: tuple[int, ...], delta_out: Array,
                 need_input: bool = True) -> tuple[Array | None, dict[str, Array]]:
        return (delta_out.reshape(in_shape) if need_input else None), {}

    def per_sample_grads(self, params: Any, cache: Any, delta_out: Array) -> dict[str, Array]:
        return {}

    def feedback_shape(self, in_shape: Shape) -> None:
        """No feedback: the feedback rules keep this layer's own J^T
        (a reshape)."""
        return None

    def per_sample_sq_norms(self, params: Any, cache: Any, delta_out: Array) -> None:
        return None
