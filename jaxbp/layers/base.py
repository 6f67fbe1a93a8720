"""What every layer record provides, the registry, and the pieces the records share.

A layer maps the error at its output to the error at its input,
``delta_in = J^T delta_out``, and reads its parameter gradient from its input
and that error. Each record (one frozen, hashable dataclass per layer type)
holds, written by hand from lax primitives:

* ``output_shape(in_shape)``: the shape of one sample's output (checks it);
* ``init(key, in_shape, dtype)``: its parameters (``{}`` when it has none);
* ``forward(params, x) -> (out, cache)``: the output and what the backward keeps;
* ``backward(params, cache, delta_out, need_input) -> (delta_in, grads)``: the
  error at its input (None when ``need_input`` is False: the first layer) and
  the gradient of its parameters for the batch (``delta_out`` already holds
  the 1/N of the mean cost);
* ``per_sample_grads(params, cache, delta_out)``: the same gradient for every
  sample apart, a leading batch axis (never by autodiff);
* ``per_sample_sq_norms(params, cache, delta_out)``: ``(batch,)`` squared norms.

Optional capabilities, each read by the quantity that needs it (a record without
one is refused by that quantity alone, with one error naming the layer and the
capability: :func:`capability`):

* ``pre_activation_error(cache, delta_a)``: the error at z from the error at the
  layer's output (layers with an activation: Dense, Conv2D); ``layer_stats``
  reports the layers that have it.
* ``kfac_inputs(cache) -> (rows, positions)``: K-FAC's input rows ``(B [T], d_in)``
  (a Dense's input, a Conv2D's patches) and the positions per sample they hold.
* ``kfac_factors(params, cache, errors, scale, where)``: the layer's own K-FAC blocks
  from its errors ``(k, B, ...)`` (:mod:`jaxbp.layers.kfac`: SelfAttention's
  four projections, Embedding's tables, the norms' diagonals, a Residual's inner
  layers); a layer with ``kfac_inputs`` and ``pre_activation_error`` needs none.
  ``errors`` is the error at the layer's output, or what its ``backward_kept``
  kept.
* ``backward_kept(params, cache, delta_out, need_input) -> (delta_in, grads, kept)``:
  the backward, and the errors it formed on the way that its ``kfac_factors`` reads
  (a Residual's inner layers' kept errors, SelfAttention's at its projections), so
  that K-FAC reads them from the gradient's own pass
  (``chain_backward(..., kept=True)``) instead of running the inner backward again.
* ``feedback_shape(in_shape)``: the shape of the fixed feedback that replaces the
  weights in the layer's input error (None: the layer keeps its own ``J^T``, it
  has no weights to replace), and ``feedback_transport(array)``: between that
  entry's layout and the weight's (its own inverse: a Dense transposes). A record
  with several weights in its input error gives a pytree of shapes instead
  (SelfAttention ``{"q", "k", "v", "o"}``, Residual a tuple over its inner layers) and
  ``feedback_params(params, feedback)`` (the params its backward reads, the feedback in
  the weights' places) and ``feedback_of(params, in_shape)`` (the feedback that is
  backprop itself); :func:`feedback_params` and :func:`feedback_of` read either form.
* ``sq_grad_sum(params, cache, deltas)``: ``sum_k sum_i g_{k,i} (.) g_{k,i}`` for k
  sets of per-sample output errors ``(k, B, ...)`` without forming the per-sample
  gradients (Dense); the quantities form them through ``per_sample_grads``
  otherwise.
* ``model_axis_fans(params) -> (fan_in, fan_out)`` and ``model_axis_specs(split, axis)``:
  the weight a mesh's model axis may split and the layer's PartitionSpecs for a
  ``"column"`` or ``"row"`` split (Dense; :func:`jaxbp.parallel.state_shardings` pairs
  them Megatron style); a layer without them stays replicated.
* ``per_sample_sq_norms_and_sum(params, cache, delta_out)``: the norms and
  ``weights -> sum_i w_i g_i`` (the clipped sum) from what the norms formed (the
  routes of :mod:`jaxbp.layers.token_grads`: Dense on tokens, SelfAttention, Conv2D;
  Residual over its inner layers); :func:`sq_norms_and_sum` reads it or builds it.

Shapes are one sample's (no batch axis); arrays carry the batch first.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from jaxbp.types import Array

Shape = tuple[int, ...]

LAYER_TYPES: dict[str, type] = {}
"""Every layer record type by name (``Dense``, ``Conv2D``, ...)."""


REQUIRED = ("output_shape", "init", "forward", "backward")
"""The methods a record cannot run without (the per-sample ones are asked for by the
per-example quantities, the optional capabilities by theirs)."""


def register(cls: type) -> type:
    """Class decorator: add a layer record type to :data:`LAYER_TYPES` (a TypeError naming
    what it lacks of :data:`REQUIRED`, when it is registered rather than when it runs).
    Its hand-written rules are checked against ``jax.vjp`` of its forward by
    :func:`jaxbp.verify_layer` (at a point you give: a record has no shape of its own)."""
    missing = [name for name in REQUIRED if not callable(getattr(cls, name, None))]
    if missing:
        raise TypeError(f"layer record {cls.__name__} must define {missing} to be "
                        f"registered (jaxbp.layers.LayerRecord: output_shape, init, forward, "
                        f"backward)")
    LAYER_TYPES[cls.__name__] = cls
    return cls


def repr_beside_defaults(record: Any, later: tuple[str, ...]) -> str:
    """A record's dataclass repr, the fields in ``later`` left out while at their defaults:
    fields a record gained after runs were saved, so that a net built as before prints as
    before and a saved run's recorded net still reads as this one's."""
    shown = [f"{f.name}={getattr(record, f.name)!r}" for f in dataclasses.fields(record)
             if f.name not in later or getattr(record, f.name) != f.default]
    return f"{type(record).__name__}({', '.join(shown)})"


class LayerError(ValueError):
    """A layer that does not fit where it stands in a network (names its index and type)."""


@runtime_checkable
class LayerRecord(Protocol):
    """The methods every layer record has (the optional capabilities: the module docs)."""

    def output_shape(self, in_shape: Shape) -> Shape: ...

    def init(self, key: Array, in_shape: Shape, dtype: Any) -> Any: ...

    def forward(self, params: Any, x: Array) -> tuple[Array, Any]: ...

    def backward(self, params: Any, cache: Any, delta_out: Array,
                 need_input: bool = True) -> tuple[Array | None, Any]: ...

    def per_sample_grads(self, params: Any, cache: Any, delta_out: Array) -> Any: ...

    def per_sample_sq_norms(self, params: Any, cache: Any, delta_out: Array) -> Array: ...


def capability(layer: Any, name: str, where: str, quantity: str) -> Any:
    """The layer's bound method ``name``, or a :class:`LayerError` naming the layer, the
    capability and the quantity that needs it (the one refusal every quantity gives)."""
    method = getattr(layer, name, None)
    if method is None:
        raise LayerError(f"{where} ({type(layer).__name__}): has no `{name}` capability, "
                         f"which {quantity} needs (see jaxbp.layers.base for what each "
                         f"capability is)")
    return method


def weighted_backward(layer: Any, params: Any, cache: Any, delta_out: Array
                      ) -> Callable[[Array], Any]:
    """``weights (B,) -> sum_i w_i g_i`` by the layer's own gradient rule applied once to
    the weighted errors ``w_i delta_i`` (every rule is linear in the error)."""
    def weighted(weights: Array) -> Any:
        scale = weights.astype(delta_out.dtype).reshape((-1,) + (1,) * (delta_out.ndim - 1))
        return layer.backward(params, cache, delta_out * scale, need_input=False)[1]

    return weighted


def sq_norms_and_sum(layer: Any, params: Any, cache: Any, delta_out: Array
                     ) -> tuple[Array | None, Callable[[Array], Any]]:
    """A layer's ``(B,)`` per-sample squared gradient norms (None: it has no parameters) and
    ``weights (B,) -> sum_i w_i g_i`` (the clipped sum when ``w_i = s_i / B``).

    The record's ``per_sample_sq_norms_and_sum`` where it has one (what its norms
    formed, reused); otherwise its ``per_sample_sq_norms`` and :func:`weighted_backward`.
    """
    if hasattr(layer, "per_sample_sq_norms_and_sum"):
        return layer.per_sample_sq_norms_and_sum(params, cache, delta_out)
    return (layer.per_sample_sq_norms(params, cache, delta_out),
            weighted_backward(layer, params, cache, delta_out))


def named_weights_transposed(params: dict[str, Array], names: Sequence[str]
                             ) -> dict[str, Array]:
    """``{p: W_p^T}`` of named weights ``"w" + p`` (attention's projections, a gated
    unit's branches): the feedback that is backprop, in each W^T place."""
    return {p: params[f"w{p}"].T for p in names}


def with_named_feedback(params: dict[str, Array], feedback: dict[str, Array]
                        ) -> dict[str, Array]:
    """The params a backward reads under named feedback ``{p: B_p}``: each weight
    ``"w" + p`` replaced by ``B_p^T`` (the biases, and the forward, untouched)."""
    return {**params, **{f"w{p}": b.T for p, b in feedback.items()}}


def feedback_params(layer: Any, params: Any, feedback: Any) -> Any:
    """The params a layer's backward reads under a feedback rule: its own where the entry
    is None, the record's ``feedback_params`` where it has one, else the weight ``"w"``
    replaced by the transported feedback (Dense: ``B^T``; Conv2D: B as the kernel)."""
    if feedback is None:
        return params
    if hasattr(layer, "feedback_params"):
        return layer.feedback_params(params, feedback)
    return {**params, "w": layer.feedback_transport(feedback)}


def is_shape(node: Any) -> bool:
    """A shape, a tuple of ints: a leaf of a ``feedback_shape`` pytree (whose nodes are
    tuples too, so ``jax.tree`` reads it with ``is_leaf=is_shape``)."""
    return isinstance(node, tuple) and all(isinstance(n, int) for n in node)


def feedback_of(layer: Any, params: Any, in_shape: Shape) -> Any:
    """The feedback entry under which the rule is backprop exactly (W^T for a Dense; None
    for a layer that takes no feedback): random feedback draws it from the initialiser,
    sign symmetry takes its signs."""
    if layer.feedback_shape(in_shape) is None:
        return None
    if hasattr(layer, "feedback_of"):
        return layer.feedback_of(params, in_shape)
    return layer.feedback_transport(params["w"])


# The std of a standard normal truncated to [-2, 2]; dividing by it restores unit variance.
TRUNCATED_NORMAL_STD = 0.87962566103423978


def variance_init(key: Array, shape: Shape, fan_in: int, fan_out: int, he: bool,
                  dtype: Any) -> Array:
    """Truncated-normal weights: He ``2/fan_in`` or Glorot ``2/(fan_in + fan_out)`` variance.

    The same scheme as :meth:`jaxbp.MLP.init` (normals truncated at two standard
    deviations, rescaled to the variance), per layer.
    """
    variance = 2.0 / fan_in if he else 2.0 / (fan_in + fan_out)
    unit = jax.random.truncated_normal(key, -2.0, 2.0, shape, jnp.float32)
    return (unit / TRUNCATED_NORMAL_STD * math.sqrt(variance)).astype(dtype)
