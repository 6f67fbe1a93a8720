"""Other feedback rules: the one recursion with its weight-transport term replaced.

Backprop passes the error back through the transposed forward weights,

.. math::
    \\delta^{l-1} = (\\delta^l W^{l\\top}) \\odot g'(z^{l-1}).

The rules of the biologically-plausible-learning literature change exactly
that term and keep everything else (each layer's gradient is still its
input activation times its own error):

* feedback alignment (Lillicrap et al. 2016): a fixed random ``B^l`` in place
  of ``W^{l T}``, ``delta^{l-1} = (delta^l B^l) * g'(z^{l-1})``;
* sign symmetry (Liao, Leibo & Poggio 2016; Moskovitz et al. 2018):
  ``B^l = sign(W^l)^T``, the current weights' signs (uniform sign-concordant);
* direct feedback alignment (Nokland 2016): the output error ``e = delta^L``
  straight to every hidden layer, ``delta^l = (e B^l) * g'(z^l)``.

Each rule is a gradient source ``(net, params, x, y, step) -> (C, grads, a^L)``
for :func:`jaxbp.make_train_step` (``grad=``), :func:`jaxbp.make_train_loop`
and :func:`jaxbp.fit`. It runs the layer records' own hand-written backward
(:mod:`jaxbp.layers`) with the feedback weights in place of the forward ones
for the input error: for Dense and Conv2D the weight gradient reads only the
layer's input and its error, never its weights, so it stays exact for the
error the rule delivers. Flatten, MaxPool, AvgPool, LayerNorm, RMSNorm and
Embedding pass errors back with their own local ``J^T`` (no weight transport). A
record takes part through its ``feedback_shape``/``feedback_transport`` capabilities
(SelfAttention and Residual with a pytree of entries: one per projection, one per inner
layer; :func:`jaxbp.layers.base.feedback_params`); one without them is refused with
the capability error naming it. DFA refuses a sequence output (one error per sample).
The feedback matrices are fixed: a pure function of the key they are drawn from, never
state that drifts. Nothing here calls JAX's autodiff.

References:
  Lillicrap, Cownden, Tweed & Akerman, "Random synaptic feedback weights
  support error backpropagation for deep learning", Nat. Commun. 2016.
  Nokland, "Direct feedback alignment provides learning in deep neural
  networks", NeurIPS 2016.
  Liao, Leibo & Poggio, "How important is weight symmetry in
  backpropagation?", AAAI 2016. Moskovitz, Litwin-Kumar & Abbott,
  "Feedback alignment in deep convolutional networks", 2018.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbp import input_checks, network, tied_embedding
from jaxbp.backprop import value_grads_and_output as _backprop_grads
from jaxbp.layers.base import (
    LayerError,
    capability,
    feedback_of,
    feedback_params,
    is_shape,
    variance_init,
)
from jaxbp.losses import cost_and_output_error
from jaxbp.sources import GradientSource, SourceResult
from jaxbp.types import Array, ArrayLike, Params, PRNGKey

Feedback = tuple[Array | None, ...]
"""One entry per layer: a feedback array, or None where the layer keeps its own rule."""


def _chain_of(net: Any) -> network.Network:
    """The net as a chain whose every layer has the ``feedback_shape`` capability (Dense and
    Conv2D take feedback; Flatten, pools and LayerNorm keep their own J^T)."""
    chain = network.as_network(net)
    for i, layer in enumerate(chain.layers):
        capability(layer, "feedback_shape", f"layers[{i}]", "the feedback rules")
    return chain


def _alignment_shape(layer: Any, in_shape: tuple[int, ...], where: str) -> Any:
    """B^l's shape for layer l: the record's ``feedback_shape`` (W^T's for Dense, the HWIO
    kernel's for Conv2D, a pytree of them for SelfAttention and Residual; None for a layer
    that keeps its own J^T). An inner layer without the capability is named with ``where``."""
    try:
        return layer.feedback_shape(in_shape)
    except LayerError as err:
        raise LayerError(f"{where} ({type(layer).__name__}): {err}") from None


def _direct_shape(params: Any, out_shape: tuple[int, ...], n_out: int) -> tuple[int, ...] | None:
    """B^l's shape for DFA: (n_out, size of the layer's output) for a layer with parameters."""
    return (n_out, math.prod(out_shape)) if jax.tree.leaves(params) else None


def feedback_shapes(net: Any, kind: str = "alignment") -> tuple[tuple[int, ...] | None, ...]:
    """The shape of every feedback entry a rule takes for this net (None: no entry).

    ``kind="alignment"``: one entry per layer after the first, ``(B^2, ..., B^L)``:
    ``(fan_out^l, fan_out^{l-1})`` for a Dense (the shape of ``W^{l T}``), the
    kernel's HWIO shape for a Conv2D (used in place of W in the input-error
    convolution), None for a layer that keeps its own ``J^T``.
    ``kind="direct"``: one entry per layer before the last, ``(B^1, ..., B^{L-1})``:
    ``(n_out, size of layer l's output)`` for a layer with parameters, else None.
    """
    chain = _chain_of(net)
    shapes = chain.shapes
    if kind == "alignment":
        return tuple(_alignment_shape(layer, shapes[l], f"layers[{l}]")
                     for l, layer in enumerate(chain.layers) if l > 0)
    if kind == "direct":
        network.require_vector_output(chain, "direct feedback alignment (one error per "
                                             "sample sent to every layer)")
        return tuple(_direct_shape(p, shapes[l + 1], chain.n_out)
                     for l, p in enumerate(chain.param_shapes()[:-1]))
    raise ValueError(f"kind must be 'alignment' or 'direct', got {kind!r}")


def _check_feedback_sequence(feedback: Any, count: int | str = "the net's") -> None:
    """A sequence of feedback entries (not a string), before any net is known."""
    if isinstance(feedback, str) or not isinstance(feedback, Sequence):
        raise TypeError(f"feedback must be a sequence of {count} arrays (None where a "
                        f"layer takes none), got {type(feedback).__name__}")


def _check_feedback(net: Any, feedback: Any, kind: str) -> Feedback:
    """The feedback as a tuple whose entries have the shapes :func:`feedback_shapes` gives."""
    expected = feedback_shapes(net, kind)
    _check_feedback_sequence(feedback, len(expected))
    if len(feedback) != len(expected):
        raise ValueError(f"feedback must hold {len(expected)} entries for this net "
                         f"({kind}), got {len(feedback)}")
    first = 1 if kind == "alignment" else 0
    return tuple(_checked_entry(entry, shape, f"feedback[{i}] (for layers[{i + first}])")
                 for i, (entry, shape) in enumerate(zip(feedback, expected)))


def _checked_entry(entry: Any, shape: Any, where: str) -> Any:
    """One entry against its expected shape: None, an array, or a dict or tuple of them
    (SelfAttention's projections, a Residual's inner layers), checked part by part."""
    if shape is None:
        if entry is not None:
            raise ValueError(f"{where} must be None: that layer keeps its own rule")
        return None
    if is_shape(shape):
        if entry is None or not hasattr(entry, "shape"):
            raise TypeError(f"{where} must be an array of shape {shape}, got "
                            f"{type(entry).__name__}")
        if tuple(entry.shape) != shape:
            raise ValueError(f"{where} must have shape {shape}, got {tuple(entry.shape)}")
        return entry
    if isinstance(shape, dict):
        if not isinstance(entry, dict) or set(entry) != set(shape):
            raise TypeError(f"{where} must be a dict with keys {sorted(shape)}, got "
                            f"{sorted(entry) if isinstance(entry, dict) else type(entry).__name__}")
        return {k: _checked_entry(entry[k], shape[k], f"{where}[{k!r}]") for k in shape}
    if not isinstance(entry, tuple | list) or len(entry) != len(shape):
        raise TypeError(f"{where} must be a sequence of {len(shape)} entries (one per inner "
                        f"layer, None where one takes none), got {type(entry).__name__}")
    return tuple(_checked_entry(e, s, f"{where}[{j}]")
                 for j, (e, s) in enumerate(zip(entry, shape)))


def random_feedback(net: Any, key: PRNGKey, kind: str = "alignment") -> Feedback:
    """Fixed random feedback for :func:`alignment` (or :func:`direct` with ``kind="direct"``).

    Scale convention: every matrix is drawn as the forward weights are
    initialised (:meth:`jaxbp.MLP.init`: truncated normals), so the errors start
    at backprop's scale. Alignment: ``B^l`` is an independent draw of ``W^l``'s
    initialiser (He or Glorot by layer l's activation), transposed.
    Direct: ``B^l`` has the Glorot variance ``2 / (n_out + size_l)`` of a dense
    map between the output and layer l. A pure function of ``key``.
    """
    input_checks.check_key("key", key)
    chain = _chain_of(net)
    shapes = feedback_shapes(chain, kind)
    dtype = jnp.dtype(chain.dtype)
    keys = jax.random.split(key, len(shapes))
    first = 1 if kind == "alignment" else 0
    out = []
    for i, (shape, k) in enumerate(zip(shapes, keys)):
        layer, in_shape = chain.layers[i + first], chain.shapes[i + first]
        if shape is None:
            out.append(None)
        elif kind == "direct":
            out.append(variance_init(k, shape, shape[0], shape[1], False, dtype))
        else:
            out.append(feedback_of(layer, layer.init(k, in_shape, dtype), in_shape))
    return tuple(out)


def _backward_with(net: network.Network, params: Params, x: Array, y: Array,
                   transports: Sequence[Any], step: Array) -> tuple[Array, Params, Array]:
    """The reversed loop with layer l's feedback ``transports[l]`` in its weights' places
    (:func:`jaxbp.layers.base.feedback_params`; None: its own), on step ``step``'s
    forward (its dropout masks)."""
    out, caches = network.forward(net, params, x, network.step_key(net, step))
    cost, delta = cost_and_output_error(net.loss_fn, out, y)
    params = tied_embedding.layer_params(net, params)     # a tied head's weight: the table^T
    grads: list[Any] = [None] * net.n_layers
    for l in reversed(range(net.n_layers)):
        layer = net.layers[l]
        seen = feedback_params(layer, params[l], transports[l])
        # the records read their weights only to pass errors on: each weight gradient is
        # exact for the error that arrives
        delta, grads[l] = layer.backward(seen, caches[l], delta, need_input=l > 0)
    return SourceResult(cost, tied_embedding.tied_grads(net, tuple(grads)), out)


def alignment(feedback: Sequence[ArrayLike | None]) -> GradientSource:
    """Feedback alignment with fixed feedback ``(B^2, ..., B^L)``.

    .. math::
        \\delta^{l-1} = (\\delta^l B^l) \\odot g'(z^{l-1}), \\qquad
        \\Delta W^l = a^{l-1\\top} \\delta^l

    ``B^l`` has the shape of ``W^{l T}`` (Dense) or of the kernel (Conv2D); see
    :func:`feedback_shapes` and :func:`random_feedback`. With ``B^l = W^{l T}`` it is
    backprop exactly. The shapes are checked against the net at the first call.
    """
    _check_feedback_sequence(feedback)

    def gradient(net: Any, params: Params, x: Array, y: Array, step: Array):
        chain = _chain_of(net)
        x, y = input_checks.check_inputs(net, params, x, y)   # called directly: named errors
        entries = _check_feedback(chain, feedback, "alignment")
        dtype = jnp.result_type(*jax.tree.leaves(params))
        transports = [None] + [jax.tree.map(lambda b: jnp.asarray(b, dtype), entry)
                               for entry in entries]
        return _backward_with(chain, params, x, y, transports, step)

    gradient.__qualname__ = "feedback.alignment"
    return gradient


def sign_symmetry() -> GradientSource:
    """Sign symmetry: ``B^l = sign(W^l)^T`` from the current weights, at every step.

    .. math::
        \\delta^{l-1} = (\\delta^l \\, \\mathrm{sign}(W^l)^\\top) \\odot g'(z^{l-1})

    Uniform sign-concordant feedback (Liao et al. 2016): the magnitudes are
    all 1, only the signs are shared with the forward weights; for a Conv2D the
    kernel's signs.
    """
    def gradient(net: Any, params: Params, x: Array, y: Array, step: Array):
        chain = _chain_of(net)
        x, y = input_checks.check_inputs(net, params, x, y)   # called directly: named errors
        seen = tied_embedding.layer_params(chain, params)
        transports = [None] + [jax.tree.map(jnp.sign, feedback_of(layer, p, shape))
                               for layer, p, shape
                               in zip(chain.layers[1:], seen[1:], chain.shapes[1:])]
        return _backward_with(chain, params, x, y, transports, step)

    gradient.__qualname__ = "feedback.sign_symmetry"
    return gradient


def direct(feedback: Sequence[ArrayLike | None]) -> GradientSource:
    """Direct feedback alignment with fixed ``(B^1, ..., B^{L-1})``, ``B^l: (n_out, size_l)``.

    .. math::
        e = \\delta^L, \\qquad \\delta^l = (e B^l) \\odot g'(z^l), \\qquad
        \\Delta W^l = a^{l-1\\top} \\delta^l

    ``e`` is the output layer's error at its pre-activation (``dC/da^L * g^L'``,
    the fused ``(p - y)/N`` on logits); the output layer's own gradient is
    backprop's. No error travels through the chain: every hidden layer with
    parameters gets ``e B^l`` (reshaped to its output) as the error at its
    output and applies its own ``g'``. Layers without parameters get nothing.
    """
    _check_feedback_sequence(feedback)

    def gradient(net: Any, params: Params, x: Array, y: Array, step: Array):
        chain = _chain_of(net)
        x, y = input_checks.check_inputs(net, params, x, y)   # called directly: named errors
        entries = _check_feedback(chain, feedback, "direct")
        out, caches = network.forward(chain, params, x, network.step_key(chain, step))
        cost, delta_out = cost_and_output_error(chain.loss_fn, out, y)
        params = tied_embedding.layer_params(chain, params)   # a tied head's weight: the table^T
        last = chain.layers[-1]
        _, last_grads = last.backward(params[-1], caches[-1], delta_out, need_input=False)
        e = (last.pre_activation_error(caches[-1], delta_out)
             if hasattr(last, "pre_activation_error") else delta_out)
        grads = []
        for l, (layer, b) in enumerate(zip(chain.layers[:-1], entries)):
            if b is None:                   # a layer without parameters: nothing to learn
                grads.append(jax.tree.map(jnp.zeros_like, params[l]))
                continue
            delta_a = (e @ jnp.asarray(b, x.dtype)).reshape((x.shape[0], *chain.shapes[l + 1]))
            grads.append(layer.backward(params[l], caches[l], delta_a, need_input=False)[1])
        return SourceResult(cost, tied_embedding.tied_grads(chain, (*grads, last_grads)), out)

    gradient.__qualname__ = "feedback.direct"
    return gradient


def _angles_deg(a: Params, b: Params) -> Array:
    """Per top-level entry with parameters, the angle in degrees between a and b."""
    out = []
    for pa, pb in zip(a, b):
        la, lb = jax.tree.leaves(pa), jax.tree.leaves(pb)
        if not la:
            continue
        va = jnp.concatenate([v.ravel() for v in la])
        vb = jnp.concatenate([v.ravel() for v in lb])
        na, nb = jnp.linalg.norm(va), jnp.linalg.norm(vb)
        cos = jnp.vdot(va, vb) / jnp.where(na * nb > 0, na * nb, 1.0)
        angle = jnp.degrees(jnp.arccos(jnp.clip(cos, -1.0, 1.0)))
        # a zero update against a nonzero one: 90 (no descent); both zero: 0 (they agree)
        out.append(jnp.where(na * nb > 0, angle, jnp.where((na > 0) | (nb > 0), 90.0, 0.0)))
    return jnp.stack(out)


def angles(net: Any, params: Params, x: ArrayLike, y: ArrayLike,
           source: GradientSource) -> np.ndarray:
    """Per layer with parameters, the angle in degrees between the source's update and
    the true gradient (backprop's), over all of that layer's parameters.

    0 means the rule's update points where backprop's does; below 90 it still
    descends the cost (Lillicrap et al.'s measure of alignment). The last layer's
    is 0 for every rule here (it gets the true output error). Where one of the two
    is zero the angle is 90 (a zero update does not descend), where both are, 0.

    Returns:
      A NumPy array, one angle per layer with parameters, in order.
    """
    if not callable(source):
        raise TypeError(f"source must be a gradient source (alignment(...), direct(...), "
                        f"sign_symmetry()), got {type(source).__name__}")
    x, y = input_checks.check_inputs(net, params, x, y)
    return np.asarray(_angles_between(net, source, params, x, y))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _angles_between(net: Any, source: GradientSource, params: Params, x: Array,
                    y: Array) -> Array:
    _, true, _ = _backprop_grads(net, params, x, y)
    rule = source(net, params, x, y, jnp.zeros((), jnp.int32))[1]
    return _angles_deg(rule, true)
