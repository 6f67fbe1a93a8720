"""Residual: ``x + f(x)`` for an inner chain f that keeps the shape.

.. math::
    a = x + f(x), \\qquad \\delta_{in} = \\delta + J_f^\\top \\delta

(the skip passes the error on unchanged; the inner chain's own reversed loop adds
its part). Params: the tuple of the inner layers' params.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from jaxbp._typing import Array
from jaxbp.layers.base import Shape, register
from jaxbp.layers.chain import (
    chain_backward,
    chain_forward,
    chain_init,
    chain_shapes,
    check_layers,
)


@register
@dataclasses.dataclass(frozen=True)
class Residual:
    """``x + f(x)`` with f the chain ``layers`` (which must give back x's shape)."""

    layers: tuple[Any, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "layers", check_layers(self.layers, "Residual layers"))

    def output_shape(self, in_shape: Shape) -> Shape:
        shapes = chain_shapes(self.layers, in_shape, "its layers")
        if shapes[-1] != tuple(in_shape):
            raise ValueError(f"its inner chain changes the shape {tuple(in_shape)} to "
                             f"{shapes[-1]}; x + f(x) needs them equal")
        return tuple(in_shape)

    def init(self, key: Array, in_shape: Shape, dtype: Any) -> tuple[Any, ...]:
        return chain_init(self.layers, key, chain_shapes(self.layers, in_shape, "layers"),
                          dtype)

    def forward(self, params: tuple[Any, ...], x: Array) -> tuple[Array, tuple[Any, ...]]:
        out, caches = chain_forward(self.layers, params, x)
        return x + out, caches                                        # a = x + f(x)

    def backward(self, params: tuple[Any, ...], caches: tuple[Any, ...], delta_out: Array,
                 need_input: bool = True) -> tuple[Array | None, tuple[Any, ...]]:
        delta_f, grads, _ = chain_backward(self.layers, params, caches, delta_out, need_input)
        return (delta_out + delta_f if need_input else None), grads   # delta + J_f^T delta

    def per_sample_grads(self, params: tuple[Any, ...], caches: tuple[Any, ...],
                         delta_out: Array) -> tuple[Any, ...]:
        _, _, deltas = chain_backward(self.layers, params, caches, delta_out, False)
        return tuple(layer.per_sample_grads(p, c, d)
                     for layer, p, c, d in zip(self.layers, params, caches, deltas))

    def per_sample_sq_norms(self, params: tuple[Any, ...], caches: tuple[Any, ...],
                            delta_out: Array) -> Array | None:
        _, _, deltas = chain_backward(self.layers, params, caches, delta_out, False)
        norms = [layer.per_sample_sq_norms(p, c, d)
                 for layer, p, c, d in zip(self.layers, params, caches, deltas)]
        norms = [n for n in norms if n is not None]
        return sum(norms) if norms else None



