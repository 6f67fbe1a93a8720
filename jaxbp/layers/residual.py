"""Residual: ``x + f(x)`` for an inner chain f that keeps the shape.

.. math::
    a = x + f(x), \\qquad \\delta_{in} = \\delta + J_f^\\top \\delta

(the skip passes the error on unchanged; the inner chain's own reversed loop adds
its part). Params: the tuple of the inner layers' params.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax

from jaxbp.layers import kfac
from jaxbp.layers.base import (
    Shape,
    capability,
    feedback_of,
    feedback_params,
    register,
    sq_norms_and_sum,
)
from jaxbp.layers.chain import (
    chain_backward,
    chain_forward,
    chain_init,
    chain_shapes,
    check_layers,
    takes_key,
)
from jaxbp.types import Array


@register
@dataclasses.dataclass(frozen=True)
class Residual:
    """``x + f(x)`` with f the chain ``layers`` (which must give back x's shape)."""

    layers: Sequence[Any]

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

    @property
    def takes_key(self) -> bool:
        """Whether its chain draws randomness (a Dropout inside)."""
        return any(takes_key(layer) for layer in self.layers)

    def forward(self, params: tuple[Any, ...], x: Array,
                key: Array | None = None) -> tuple[Array, tuple[Any, ...]]:
        out, caches = chain_forward(self.layers, params, x, key)
        return x + out, caches                                        # a = x + f(x)

    def backward(self, params: tuple[Any, ...], caches: tuple[Any, ...], delta_out: Array,
                 need_input: bool = True) -> tuple[Array | None, tuple[Any, ...]]:
        return self.backward_kept(params, caches, delta_out, need_input)[:2]

    def backward_kept(self, params: tuple[Any, ...], caches: tuple[Any, ...], delta_out: Array,
                      need_input: bool = True) -> tuple[Array | None, tuple[Any, ...], tuple]:
        """The backward, and the inner layers' kept errors from the same inner loop."""
        delta_f, grads, kept = chain_backward(self.layers, params, caches, delta_out,
                                              need_input, kept=True)
        return (delta_out + delta_f if need_input else None), grads, kept  # delta + J_f^T delta

    def per_sample_grads(self, params: tuple[Any, ...], caches: tuple[Any, ...],
                         delta_out: Array) -> tuple[Any, ...]:
        _, _, deltas = chain_backward(self.layers, params, caches, delta_out, False)
        return tuple(layer.per_sample_grads(p, c, d)
                     for layer, p, c, d in zip(self.layers, params, caches, deltas))

    def per_sample_sq_norms(self, params: tuple[Any, ...], caches: tuple[Any, ...],
                            delta_out: Array) -> Array | None:
        return self.per_sample_sq_norms_and_sum(params, caches, delta_out)[0]

    def per_sample_sq_norms_and_sum(self, params: tuple[Any, ...], caches: tuple[Any, ...],
                                    delta_out: Array) -> tuple[Array | None, Any]:
        """The inner layers' squared norms summed (None: no parameters inside) and
        ``weights -> sum_i w_i g_i`` for each inner layer, from one pass of the inner
        errors (each inner layer's own :func:`~jaxbp.layers.base.sq_norms_and_sum`)."""
        _, _, deltas = chain_backward(self.layers, params, caches, delta_out, False)
        parts = [sq_norms_and_sum(layer, p, c, d) if jax.tree.leaves(p) else (None, None)
                 for layer, p, c, d in zip(self.layers, params, caches, deltas)]
        norms = [sq for sq, _ in parts if sq is not None]

        def weighted_sum(weights: Array) -> tuple[Any, ...]:
            return tuple(p if rule is None else rule(weights)
                         for p, (_, rule) in zip(params, parts))

        return (sum(norms) if norms else None), weighted_sum

    def kfac_factors(self, params: tuple[Any, ...], caches: tuple[Any, ...],
                     kept: tuple[Any, ...], scale: kfac.KfacScale, where: str) -> tuple[Any, ...]:
        """The inner layers' factors, each from its own kept errors ``(k, B, ...)``
        (:meth:`backward_kept`'s, from the pass that gave the errors: the skip adds
        nothing to a parameter)."""
        return tuple(kfac.layer_factors(layer, p, c, e, scale, f"{where}.layers[{j}]")
                     for j, (layer, p, c, e)
                     in enumerate(zip(self.layers, params, caches, kept)))

    def feedback_shape(self, in_shape: Shape) -> tuple[Any, ...] | None:
        """The inner layers' feedback shapes, a tuple (None where one keeps its own J^T;
        None for the block when none takes feedback): the skip carries the error as it is."""
        shapes = chain_shapes(self.layers, in_shape, "its layers")
        inner = tuple(capability(layer, "feedback_shape", f"its layers[{j}]",
                                 "the feedback rules")(shape)
                      for j, (layer, shape) in enumerate(zip(self.layers, shapes)))
        return None if all(s is None for s in inner) else inner

    def feedback_params(self, params: tuple[Any, ...], feedback: tuple[Any, ...]
                        ) -> tuple[Any, ...]:
        return tuple(feedback_params(layer, p, f)
                     for layer, p, f in zip(self.layers, params, feedback))

    def feedback_of(self, params: tuple[Any, ...], in_shape: Shape) -> tuple[Any, ...]:
        shapes = chain_shapes(self.layers, in_shape, "its layers")
        return tuple(feedback_of(layer, p, shape)
                     for layer, p, shape in zip(self.layers, params, shapes))
