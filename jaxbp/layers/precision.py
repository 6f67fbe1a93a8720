"""The numerical recipe of a layer with matmuls: which dtype its operands and activations take.

Two fields on a layer record (``Dense``, ``Conv2D``, ``LayerNorm``) choose it:

* ``compute_dtype`` alone (bf16 operands): both operands of every matmul are rounded
  to it and the products accumulate in the params' dtype
  (``preferred_element_type``); activations, pre-activations and errors stay in
  the params' dtype.
* ``activation_dtype`` (bf16 as flax ``Dense(dtype=bfloat16)`` and jmp's bf16
  compute policy write it): the layer's input, pre-activation z, output a and the
  errors it passes on are stored in that dtype; every matmul takes operands in
  ``compute_dtype`` (default: the activation dtype) and gives its output in the
  activation dtype. A weight gradient too is accumulated in float32 and rounded
  once to the activation dtype, then handed on in the params' dtype (float32
  master weights): the product ``jax.grad`` of the same forward emits, so the step
  runs the matmuls autodiff's does (on an H200 cuDNN ran bf16 convs with float32
  outputs at a fraction of the bf16 rate). Bias gradients are summed in the
  params' dtype.

``None`` for both: everything runs in the dtype of the params (and x) the layer gets.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jaxbp.types import Array

FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")
RECIPE_FIELDS = ("compute_dtype", "activation_dtype")

RECIPES = {"float32": {},
           "bf16-operands": {"compute_dtype": "bfloat16"},
           "bf16": {"compute_dtype": "bfloat16", "activation_dtype": "bfloat16"}}
"""The numerical recipes by name, as the layers' ``compute_dtype``/``activation_dtype``:
``float32`` (everything in the params' dtype), ``bf16-operands`` (matmul operands rounded
to bf16, products, activations and errors in float32) and ``bf16`` (activations, errors
and matmul operands in bf16 as flax's ``Dense(dtype=bfloat16)`` keeps them; params,
optimizer state and the loss in float32)."""


def checked_dtype_name(value: Any, what: str) -> str | None:
    """``None``, or the canonical name of a floating dtype (else a ValueError naming ``what``)."""
    if value is None:
        return None
    try:
        name = jnp.dtype(value).name
    except TypeError:
        name = None
    if name not in FLOAT_DTYPES:
        raise ValueError(f"{what} must be None or one of {list(FLOAT_DTYPES)}, got {value!r}")
    return name


def check_recipe(layer: Any) -> None:
    """Canonicalise a frozen record's ``compute_dtype``/``activation_dtype`` in place."""
    kind = type(layer).__name__
    for field in (f for f in RECIPE_FIELDS if hasattr(layer, f)):
        object.__setattr__(layer, field,
                           checked_dtype_name(getattr(layer, field), f"{kind} {field}"))


def with_recipe(layers: tuple[Any, ...], **recipe: str | None) -> tuple[Any, ...]:
    """Network-wide defaults: every layer (inner chains included) that has a recipe field
    left at None takes the given value; a layer's own setting wins."""
    def one(layer: Any) -> Any:
        if hasattr(layer, "layers"):
            layer = dataclasses.replace(layer, layers=with_recipe(layer.layers, **recipe))
        unset = {field: value for field, value in recipe.items()
                 if value is not None and getattr(layer, field, "") is None}
        return dataclasses.replace(layer, **unset) if unset else layer

    return tuple(one(layer) for layer in layers)


def to_activation(x: Array, activation_dtype: str | None) -> Array:
    """``x`` in the activation dtype (unchanged without one)."""
    return x if activation_dtype is None else x.astype(activation_dtype)


def operand_dtype(layer: Any) -> str | None:
    """The dtype matmul operands are rounded to: compute, else activation dtype, else none."""
    return layer.compute_dtype or layer.activation_dtype


def output_dtype(layer: Any, accumulate: Any) -> Any:
    """A matmul's output dtype: the activation dtype, else ``accumulate`` (the dtype the
    products were accumulated in before; the params' or the errors' dtype)."""
    return layer.activation_dtype or accumulate


def low_operands(layer: Any, *arrays: Array) -> tuple[Array, ...]:
    """The operands of one matmul, rounded to :func:`operand_dtype` when there is one."""
    low = operand_dtype(layer)
    return arrays if low is None else tuple(a.astype(low) for a in arrays)


def preferred(out: Any, *operands: Array) -> Any:
    """``preferred_element_type`` for a product of ``operands`` with result dtype ``out``:
    None when it is what the operands give anyway (a plain product)."""
    return None if jnp.dtype(out) == jnp.result_type(*operands) else jnp.dtype(out)


def dot(layer: Any, a: Array, b: Array, out: Any, transpose_a: bool = False,
        transpose_b: bool = False) -> Array:
    """``a @ b`` over a's last axis, ``a.T @ b`` over every leading axis (the weight
    gradient: batch, and tokens for token-wise layers) or ``a @ b.T``; one dot_general
    (the transposes are contraction dimensions), the layer's operands, output in ``out``."""
    a, b = low_operands(layer, a, b)
    if transpose_a:
        contract = (tuple(range(a.ndim - 1)), tuple(range(b.ndim - 1)))
    else:
        contract = ((a.ndim - 1,), (b.ndim - 1,) if transpose_b else (0,))
    return jax.lax.dot_general(a, b, (contract, ((), ())),
                               preferred_element_type=preferred(out, a, b))


def weight_grad(layer: Any, a: Array, b: Array, params_dtype: Any) -> Array:
    """A weight gradient ``a^T b`` contracted over every leading axis (batch, and tokens
    for token-wise layers): output in the activation dtype when the recipe has one (the
    float32 accumulator rounded once, as jax.grad's transpose of the forward product
    gives it), else in ``params_dtype``; returned in ``params_dtype``."""
    out = dot(layer, a, b, output_dtype(layer, params_dtype), transpose_a=True)
    return out.astype(params_dtype)


def in_params_dtype(layer: Any, params: dict[str, Array], cache: tuple[Array, ...],
                    delta_a: Array) -> tuple[Array, Array]:
    """A weight layer's input and pre-activation error in its params' dtype: per-sample
    quantities (gradients, norms, clipped sums) are formed there, whatever the recipe."""
    dtype = params["w"].dtype
    return cache[0].astype(dtype), layer.pre_activation_error(cache, delta_a).astype(dtype)
