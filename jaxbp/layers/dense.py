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

import jax
import jax.numpy as jnp

from jaxbp._typing import Array
from jaxbp.activations import get_activation
from jaxbp.layers.base import Shape, register, variance_init


def _dot(a: Array, b: Array, low: str | None, transpose_a: bool = False,
         transpose_b: bool = False) -> Array:
    """``a @ b`` (``a.T``/``b.T`` as contraction dimensions), one dot_general.

    With a compute dtype ``low`` both operands are rounded to it and the products
    accumulate in ``a``'s dtype (``preferred_element_type``), as
    :func:`jaxbp.mlp.matmul` describes.
    """
    dims = (((0 if transpose_a else 1,), (1 if transpose_b else 0,)), ((), ()))
    if low is None:
        return jax.lax.dot_general(a, b, dims)
    return jax.lax.dot_general(a.astype(low), b.astype(low), dims,
                               preferred_element_type=a.dtype)


@register
@dataclasses.dataclass(frozen=True)
class Dense:
    """A fully connected layer on (batch, d) inputs: ``g(x W + b)``, W: (d, units).

    Args:
      units: the output width (>= 1).
      activation: a name of :data:`jaxbp.ACTIVATIONS` (default identity).
      compute_dtype: None, or a lower precision for this layer's three matmuls
        (mixed precision: operands rounded to it, products accumulated in the
        params' dtype; what :class:`jaxbp.MLP` ``compute_dtype`` builds).
    """

    units: int
    activation: str = "identity"
    compute_dtype: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.units, bool) or not isinstance(self.units, int) or self.units < 1:
            raise ValueError(f"Dense units must be an int >= 1, got {self.units!r}")
        get_activation(self.activation)
        if self.compute_dtype is not None:
            try:
                name = jnp.dtype(self.compute_dtype).name
            except TypeError:
                name = None
            if name not in ("float16", "bfloat16", "float32", "float64"):
                raise ValueError(f"Dense compute_dtype must be None or a floating dtype "
                                 f"name, got {self.compute_dtype!r}")
            object.__setattr__(self, "compute_dtype", name)

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
        z = _dot(x, params["w"], self.compute_dtype) + params["b"]   # z = a_in W + b
        a = get_activation(self.activation).g(z)                     # a = g(z)
        return a, (x, z, a)

    def pre_activation_error(self, cache: tuple[Array, ...], delta_a: Array) -> Array:
        """The error at z from the error at the output a: ``delta = delta_a * g'(z)``."""
        _, z, a = cache
        return delta_a * get_activation(self.activation).dg(z, a)   # delta = delta_a g'(z)

    def backward(self, params: dict[str, Array], cache: tuple[Array, ...], delta_a: Array,
                 need_input: bool = True) -> tuple[Array | None, dict[str, Array]]:
        x = cache[0]
        delta = self.pre_activation_error(cache, delta_a)
        low = self.compute_dtype
        grads = {"w": _dot(x, delta, low, transpose_a=True),         # dC/dW = a_in^T delta
                 "b": jnp.sum(delta, axis=0)}                        # dC/db = sum_n delta_n
        delta_in = _dot(delta, params["w"], low, transpose_b=True) if need_input else None
        return delta_in, grads                                       # delta_in = delta W^T

    def per_sample_grads(self, params: dict[str, Array], cache: tuple[Array, ...],
                         delta_a: Array) -> dict[str, Array]:
        x = cache[0]
        delta = self.pre_activation_error(cache, delta_a)
        return {"w": x[:, :, None] * delta[:, None, :], "b": delta}  # g_i = a_i (x) delta_i

    def per_sample_sq_norms(self, params: dict[str, Array], cache: tuple[Array, ...],
                            delta_a: Array) -> Array:
        x = cache[0]
        delta = self.pre_activation_error(cache, delta_a)
        # ||a_i delta_i^T||^2 + ||delta_i||^2 = ||delta_i||^2 (||a_i||^2 + 1)
        return jnp.sum(delta * delta, axis=1) * (jnp.sum(x * x, axis=1) + 1)
