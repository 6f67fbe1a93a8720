"""Dense: ``a = g(x W + b)``, the seeds' layer; its three equations are written out here.

.. math::
    z = a_{in} W + b, \\qquad a = g(z)

    \\delta = \\delta_a \\odot g'(z), \\qquad
    \\delta_{in} = \\delta W^\\top, \\qquad
    \\frac{\\partial C}{\\partial W} = a_{in}^\\top \\delta, \\qquad
    \\frac{\\partial C}{\\partial b} = \\sum_n \\delta_n

(``delta_a`` is the error arriving at the layer's output a; the layer's own
activation turns it into the error at z, ``delta = delta_a * g'(z)``.)
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from jaxbp.activations import get_activation
from jaxbp.layers import precision, token_grads
from jaxbp.layers.base import (
    Shape,
    register,
    repr_beside_defaults,
    variance_init,
    weighted_backward,
)
from jaxbp.types import Array, check_bool, check_int


@register
@dataclasses.dataclass(frozen=True)
class Dense:
    """A fully connected layer on the last axis: ``g(x W + b)``, W: (d, units).

    On (batch, d) inputs the seeds' layer; on (batch, ..., d) (tokens: (batch, T, d))
    the same W at every position (a token-wise dense), its weight gradient summed
    over the batch and the positions.

    Args:
      units: the output width (>= 1).
      activation: a name of :data:`jaxbp.ACTIVATIONS` (default identity).
      compute_dtype: None, or a lower precision for the operands of its three matmuls
        (bf16 operands: products accumulated in the params' dtype; what
        :class:`jaxbp.MLP` ``compute_dtype`` builds).
      activation_dtype: None, or the dtype the layer's input, z, a and errors are
        stored in (``"bfloat16"``: flax's ``Dense(dtype=bfloat16)``); matmul
        outputs in it, the weight gradient accumulated in float32, rounded once
        to it and returned in the params' dtype (:mod:`jaxbp.layers.precision`).
      bias: whether the layer adds a bias b (default True; False: ``g(x W)``, params
        ``{"w"}`` alone, as LLaMA's and GPT-2's head).
    """

    units: int
    activation: str = "identity"
    compute_dtype: DTypeLike | None = None
    activation_dtype: DTypeLike | None = None
    bias: bool = True

    def __post_init__(self) -> None:
        check_width_record(self)

    def __repr__(self) -> str:
        """The fields, ``bias`` only when False (a net saved before it reads the same)."""
        return repr_beside_defaults(self, ("bias",))

    def output_shape(self, in_shape: Shape) -> Shape:
        return last_axis_shape(in_shape, self.units)

    def init(self, key: Array, in_shape: Shape, dtype: Any) -> dict[str, Array]:
        fan_in = in_shape[-1]
        he = get_activation(self.activation).he_init
        params = {"w": variance_init(key, (fan_in, self.units), fan_in, self.units, he,
                                     dtype)}
        if self.bias:
            params["b"] = jnp.zeros((self.units,), dtype)
        return params

    def forward(self, params: dict[str, Array], x: Array) -> tuple[Array, tuple[Array, ...]]:
        x = precision.to_activation(x, self.activation_dtype)
        out = precision.output_dtype(self, jnp.result_type(x, params["w"]))
        z = precision.dot(self, x, params["w"], out)                 # z = a_in W + b
        if self.bias:
            z = z + precision.to_activation(params["b"], self.activation_dtype)
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
        grads = {"w": precision.weight_grad(self, x, delta, w.dtype)}    # a_in^T delta
        if self.bias:
            grads["b"] = jnp.sum(delta, axis=leading, dtype=w.dtype)  # dC/db = sum_n delta_n
        if not need_input:
            return None, grads
        out = precision.output_dtype(self, jnp.result_type(delta, w))
        return precision.dot(self, delta, w, out, transpose_b=True), grads  # delta W^T

    def per_sample_grads(self, params: dict[str, Array], cache: tuple[Array, ...],
                         delta_a: Array) -> dict[str, Array]:
        x, delta = precision.in_params_dtype(self, params, cache, delta_a)
        if x.ndim == 2:                      # g_i = a_i (x) delta_i, and delta_i for b
            grads = {"w": x[:, :, None] * delta[:, None, :]}
            return {**grads, "b": delta} if self.bias else grads
        return token_grads.projections_grads(*_as_tokens(x, delta), self.bias)

    def per_sample_sq_norms(self, params: dict[str, Array], cache: tuple[Array, ...],
                            delta_a: Array) -> Array:
        x, delta = precision.in_params_dtype(self, params, cache, delta_a)
        if x.ndim == 2:
            return _vector_sq_norms(x, delta, self.bias)
        return token_grads.projections_sq_norms(*_as_tokens(x, delta), self.bias)

    def per_sample_sq_norms_and_sum(self, params: dict[str, Array], cache: tuple[Array, ...],
                                    delta_a: Array) -> tuple[Array, Any]:
        """``(B,)`` squared norms and ``weights -> sum_i w_i g_i``.

        On vectors ``||a_i delta_i^T||^2 + ||delta_i||^2 = ||delta_i||^2 (||a_i||^2 + 1)``
        (``+ 0`` without a bias) and the sum is the layer's own rule on the weighted
        errors; on tokens the routes of :mod:`jaxbp.layers.token_grads` (T x T Grams or
        the formed ``g_i``)."""
        x, delta = precision.in_params_dtype(self, params, cache, delta_a)
        if x.ndim == 2:
            return (_vector_sq_norms(x, delta, self.bias),
                    weighted_backward(self, params, cache, delta_a))
        return token_grads.projections_sq_norms_and_sum(*_as_tokens(x, delta), self.bias)

    def sq_grad_sum(self, params: dict[str, Array], cache: tuple[Array, ...],
                    deltas: Array) -> dict[str, Array]:
        """``sum_k sum_i g_{k,i} (.) g_{k,i}`` for (k, B, ..., units) output errors; on (B, d)
        inputs without a per-sample gradient: ``(a^2)^T sum_k dz_k^2`` and ``sum dz^2``."""
        if cache[0].ndim != 2:                  # tokens: each sample's sum over t, formed
            grads = jax.vmap(self.per_sample_grads, in_axes=(None, None, 0))(params, cache,
                                                                              deltas)
            return jax.tree.map(lambda g: jnp.sum(g * g, axis=(0, 1)), grads)
        dz = jax.vmap(self.pre_activation_error, in_axes=(None, 0))(cache, deltas)
        x, dz = cache[0].astype(params["w"].dtype), dz.astype(params["w"].dtype)
        sq = jnp.sum(dz * dz, axis=0)                                       # (B, units)
        sums = {"w": jax.lax.dot_general(x * x, sq, (((0,), (0,)), ((), ())))}
        return {**sums, "b": jnp.sum(sq, axis=0)} if self.bias else sums

    def kfac_inputs(self, cache: tuple[Array, ...]) -> tuple[Array, int]:
        """K-FAC's input rows ``(B [T], d_in)`` and the positions per sample (1 on vectors)."""
        x = cache[0]
        return x.reshape(-1, x.shape[-1]), math.prod(x.shape[1:-1])

    def model_axis_fans(self, params: dict[str, Any]) -> tuple[int, int]:
        """``(fan_in, fan_out)`` of W: what a model axis may split (Megatron pairs,
        :func:`jaxbp.parallel.layer_splits`)."""
        return tuple(params["w"].shape)

    def model_axis_specs(self, split: str, axis: str) -> dict[str, Any]:
        """The PartitionSpecs of W and b for a ``"column"`` split (W over its fan_out, b
        with it) or a ``"row"`` split (W over its fan_in, b replicated)."""
        from jax.sharding import PartitionSpec

        if split == "column":
            specs = {"w": PartitionSpec(None, axis), "b": PartitionSpec(axis)}
        else:
            specs = {"w": PartitionSpec(axis, None), "b": PartitionSpec()}
        return specs if self.bias else {"w": specs["w"]}

    def feedback_shape(self, in_shape: Shape) -> Shape:
        """A feedback B in W^T's place: ``(units, fan_in)``."""
        return (self.units, in_shape[-1])

    def feedback_transport(self, array: Array) -> Array:
        """B (W^T's shape) as the array the backward reads as W, and back: a transpose."""
        return array.T


def check_width_record(record: Any) -> None:
    """A layer of ``units`` outputs on the last axis (Dense, GatedDense): its width an int
    >= 1, its activation known, its recipe canonical (else errors naming the record)."""
    kind = type(record).__name__
    object.__setattr__(record, "units", check_int(f"{kind} units", record.units, 1))
    object.__setattr__(record, "bias", check_bool(f"{kind} bias", record.bias))
    get_activation(record.activation)
    precision.check_recipe(record)


def affine(record: Any, params: dict[str, Array], x: Array, name: str, out: Any) -> Array:
    """``x W_name + b_name`` in the record's recipe (:func:`jaxbp.layers.precision.dot`),
    the bias added where the record has one (``record.bias``): a named weight of a layer
    with several (attention's projections, a gated unit's branches)."""
    z = precision.dot(record, x, params[f"w{name}"], out)
    if not record.bias:
        return z
    return z + precision.to_activation(params[f"b{name}"], record.activation_dtype)


def affine_grads(record: Any, inputs: dict[str, Array], errors: dict[str, Array],
                 dtype: Any) -> dict[str, Array]:
    """The gradients of named affine maps (:func:`affine`): ``x_p^T e_p`` for each weight
    ``w_p`` and, where the record has biases, ``sum e_p`` over every axis but the last
    for ``b_p``, in ``dtype`` (the params')."""
    grads = {}
    for p, e in errors.items():
        grads[f"w{p}"] = precision.weight_grad(record, inputs[p], e, dtype)     # x^T e
        if record.bias:
            grads[f"b{p}"] = jnp.sum(e, axis=tuple(range(e.ndim - 1)), dtype=dtype)
    return grads


def affine_input_error(record: Any, params: dict[str, Array], errors: dict[str, Array],
                       names: str | tuple[str, ...]) -> Array:
    """``sum_p e_p W_p^T`` over the named affine maps that read the layer's input, in the
    record's recipe."""
    first = names[0]
    out = precision.output_dtype(record, jnp.result_type(errors[first],
                                                          params[f"w{first}"]))
    return sum(precision.dot(record, errors[p], params[f"w{p}"], out, transpose_b=True)
               for p in names)


def last_axis_shape(in_shape: Shape, units: int) -> Shape:
    """``(..., d) -> (..., units)``: a layer on the last axis of any rank."""
    if not in_shape:
        raise ValueError("needs at least one feature axis")
    return (*in_shape[:-1], units)


def _vector_sq_norms(x: Array, delta: Array, bias: bool) -> Array:
    """``||a_i delta_i^T||^2 + ||delta_i||^2 = ||delta_i||^2 (||a_i||^2 + 1)``: (B,) from
    (B, d_in) inputs and (B, d_out) errors (the ``+ 1`` the bias's)."""
    return jnp.sum(delta * delta, axis=1) * (jnp.sum(x * x, axis=1) + int(bias))


def _as_tokens(x: Array, delta: Array) -> tuple[dict[str, Array], dict[str, Array]]:
    """(B, ..., d) inputs and errors as the one unnamed weight of
    :mod:`jaxbp.layers.token_grads`' projections (``"w"``, ``"b"``): (B, T, d) each."""
    return {"": token_grads.positions_flat(x)}, {"": token_grads.positions_flat(delta)}
