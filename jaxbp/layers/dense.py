"""Dense: ``a = g(x W + b)``, the seeds' layer; its three equations are written out here.

.. math::
    z = a_{in} W + b, \\qquad a = g(z)

    \\delta = \\delta_a \\odot g'(z), \\qquad
    \\delta_{in} = \\delta W^\\top, \\qquad
    \\frac{\\partial C}{\\partial W} = a_{in}^\\top \\delta, \\qquad
    \\frac{\\partial C}{\\partial b} = \\sum_n \\delta_n

(``delta_a`` is the error arriving at the layer's output a; the layer's own
activation turns it into the error at z, seed 002's ``E = ... R'(Z)``.)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp

from jaxbp._typing import Array, is_int
from jaxbp.activations import get_activation
from jaxbp.layers import precision
from jaxbp.layers.base import Shape, register, variance_init


@register
@dataclasses.dataclass(frozen=True)
class Dense:
    """A fully connected layer on (batch, d) inputs: ``g(x W + b)``, W: (d, units).

    Args:
      units: the output width (>= 1).
      activation: a name of :data:`jaxbp.ACTIVATIONS` (default identity).
      compute_dtype: None, or a lower precision for the operands of its three matmuls
        (bf16 operands: products accumulated in the params' dtype; what
        :class:`jaxbp.MLP` ``compute_dtype`` builds).
      activation_dtype: None, or the dtype the layer's input, z, a and errors are
        stored in (``"bfloat16"``: flax's ``Dense(dtype=bfloat16)``); matmul
        outputs in it, the weight gradient accumulated in the params' dtype
        (:mod:`jaxbp.layers.precision`).
    """

    units: int
    activation: str = "identity"
    compute_dtype: str | None = None
    activation_dtype: str | None = None

    def __post_init__(self) -> None:
        if not is_int(self.units) or self.units < 1:
            raise ValueError(f"Dense units must be an int >= 1, got {self.units!r}")
        object.__setattr__(self, "units", int(self.units))
        get_activation(self.activation)
        precision.check_recipe(self)

    def output_shape(self, in_shape: Shape) -> Shape:
        if len(in_shape) != 1:
            raise ValueError(f"takes (batch, features) inputs but gets samples of shape "
                             f"{in_shape}; put a Flatten() before it")
        return (self.units,)

    def init(self, key: Array, in_shape: Shape, dtype: Any) -> dict[str, Array]:
        fan_in = in_shape[0]
        he = get_activation(self.activation).he_init
        return {"w": variance_init(key, (fan_in, self.units), fan_in, self.units, he, dtype),
                "b": jnp.zeros((self.units,), dtype)}

    def forward(self, params: dict[str, Array], x: Array) -> tuple[Array, tuple[Array, ...]]:
        x = precision.to_activation(x, self.activation_dtype)
        out = precision.output_dtype(self, jnp.result_type(x, params["w"]))
        z = precision.dot(self, x, params["w"], out) \
            + precision.to_activation(params["b"], self.activation_dtype)  # z = a_in W + b
        a = get_activation(self.activation).g(z)                     # a = g(z)
        return a, (x, z, a)

    def pre_activation_error(self, cache: tuple[Array, ...], delta_a: Array) -> Array:
        """The error at z from the error at the output a: ``delta = delta_a * g'(z)``."""
        _, z, a = cache
        delta_a = precision.to_activation(delta_a, self.activation_dtype)
        return delta_a * get_activation(self.activation).dg(z, a)   # delta = delta_a g'(z)

    def backward(self, params: dict[str, Array], cache: tuple[Array, ...], delta_a: Array,
                 need_input: bool = True) -> tuple[Array | None, dict[str, Array]]:
        x, w = cache[0], params["w"]
        delta = self.pre_activation_error(cache, delta_a)
        leading = tuple(range(delta.ndim - 1))
        grads = {"w": precision.dot(self, x, delta, w.dtype, transpose_a=True),  # a_in^T delta
                 "b": jnp.sum(delta, axis=leading, dtype=w.dtype)}   # dC/db = sum_n delta_n
        if not need_input:
            return None, grads
        out = precision.output_dtype(self, jnp.result_type(delta, w))
        return precision.dot(self, delta, w, out, transpose_b=True), grads  # delta W^T

    def per_sample_grads(self, params: dict[str, Array], cache: tuple[Array, ...],
                         delta_a: Array) -> dict[str, Array]:
        x, delta = precision.in_params_dtype(self, params, cache, delta_a)
        return {"w": x[:, :, None] * delta[:, None, :], "b": delta}  # g_i = a_i (x) delta_i

    def per_sample_sq_norms(self, params: dict[str, Array], cache: tuple[Array, ...],
                            delta_a: Array) -> Array:
        x, delta = precision.in_params_dtype(self, params, cache, delta_a)
        # ||a_i delta_i^T||^2 + ||delta_i||^2 = ||delta_i||^2 (||a_i||^2 + 1)
        return jnp.sum(delta * delta, axis=1) * (jnp.sum(x * x, axis=1) + 1)
