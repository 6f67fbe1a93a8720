"""A chain of layer records: shapes, init, the forward pass and the one reversed loop.

The recursion over any chain is the seeds' recursion with each layer's own
``J^T``: starting from the error at the chain's output,

.. math::
    \\delta_{in}^{(l)} = J_l^\\top \\delta_{out}^{(l)}, \\qquad
    \\delta_{out}^{(l-1)} = \\delta_{in}^{(l)}

and every layer reads its parameter gradient from its cached input and
``delta_out``. :class:`jaxbp.Network` and :class:`jaxbp.layers.Residual` are chains.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import jax

from jaxbp.layers.base import LAYER_TYPES, LayerError, Shape, capability
from jaxbp.types import Array


def check_layers(layers: Any, where: str) -> tuple[Any, ...]:
    """The layers as a tuple, each a registered record (else a TypeError naming it)."""
    if isinstance(layers, str) or not isinstance(layers, Sequence) or not layers:
        raise TypeError(f"{where} must be a non-empty sequence of layers (jaxbp.layers.Dense, "
                        f"Conv2D, ...), got {type(layers).__name__}")
    for i, layer in enumerate(layers):
        if isinstance(layer, type) and LAYER_TYPES.get(layer.__name__) is layer:
            raise TypeError(f"{where}[{i}] is the class {layer.__name__} itself, not a layer: "
                            f"make one, {layer.__name__}(...)")
        if type(layer).__name__ not in LAYER_TYPES or LAYER_TYPES[type(layer).__name__] \
                is not type(layer):
            raise TypeError(f"{where}[{i}] is a {type(layer).__name__}, which is no layer "
                            f"jaxbp knows (a record of your own: decorate its class with "
                            f"@jaxbp.layers.register); the layer types are "
                            f"{sorted(LAYER_TYPES)}")
    return tuple(layers)


def chain_shapes(layers: tuple[Any, ...], in_shape: Shape, where: str) -> list[Shape]:
    """``[in_shape, shape after layer 0, ...]``; a layer that does not fit raises
    :class:`~jaxbp.layers.base.LayerError` naming its index and type."""
    shapes = [tuple(in_shape)]
    for i, layer in enumerate(layers):
        try:
            shapes.append(tuple(layer.output_shape(shapes[-1])))
        except LayerError:
            raise
        except ValueError as err:
            raise LayerError(f"{where}[{i}] ({type(layer).__name__}): {err}") from None
    return shapes


def chain_init(layers: tuple[Any, ...], key: Array, shapes: list[Shape],
               dtype: Any) -> tuple[Any, ...]:
    keys = jax.random.split(key, len(layers))
    return tuple(layer.init(k, shape, dtype) for layer, k, shape in zip(layers, keys, shapes))


def chain_forward(layers: tuple[Any, ...], params: Sequence[Any], x: Array,
                  key: Array | None = None) -> tuple[Array, tuple[Any, ...]]:
    """The output and every layer's cache. ``key``: None (evaluation), or the key of a
    training step, which layer i that draws randomness (``takes_key``: Dropout, a
    block holding one) gets as ``fold_in(key, i)``."""
    caches = []
    for i, (layer, p) in enumerate(zip(layers, params)):
        if key is not None and takes_key(layer):
            x, cache = layer.forward(p, x, key=jax.random.fold_in(key, i))
        else:
            x, cache = layer.forward(p, x)
        caches.append(cache)
    return x, tuple(caches)


def takes_key(layer: Any) -> bool:
    """Whether a record's forward draws randomness from a key (Dropout), or holds such a
    record in its chain (a Residual)."""
    return bool(getattr(layer, "takes_key", False))


def chain_backward(layers: tuple[Any, ...], params: Sequence[Any], caches: Sequence[Any],
                   delta: Array, need_input: bool = True, kept: bool = False
                   ) -> tuple[Array | None, tuple[Any, ...], tuple[Any, ...]]:
    """The one reversed loop: ``(delta at the chain's input, grads, errors per layer)``.

    ``errors[l]`` is the error arriving at layer l's output (what its per-sample
    rules take). With ``kept``, a record with ``backward_kept`` gives instead the errors
    its own rules read, from the same pass (a Residual its inner layers' errors,
    SelfAttention the errors at its four projections): what K-FAC takes. The first
    layer passes no error on unless ``need_input``.
    """
    grads: list[Any] = [None] * len(layers)
    errors: list[Any] = [None] * len(layers)
    for l in reversed(range(len(layers))):
        layer, need = layers[l], need_input or l > 0
        if kept and hasattr(layer, "backward_kept"):
            delta, grads[l], errors[l] = layer.backward_kept(params[l], caches[l], delta,
                                                             need_input=need)
        else:
            errors[l] = delta
            delta, grads[l] = layer.backward(params[l], caches[l], delta, need_input=need)
    return delta, tuple(grads), tuple(errors)


PER_SAMPLE = ("per_sample_grads", "per_sample_sq_norms")
"""The per-sample methods every record with parameters has (:class:`LayerRecord`)."""


def records(layers: tuple[Any, ...], where: str = "layers",
            *trees: Any) -> Iterator[tuple[Any, ...]]:
    """``(place, record, *its entries)`` of every record that is not a block, the records
    inside blocks (a Residual's chain) included, in order. ``trees``: per-layer tuples
    parallel to ``layers`` (params, grads, caches, kept errors: a block's entry is a tuple
    over its inner layers), each record's own entry of each given."""
    for i, layer in enumerate(layers):
        entries = tuple(tree[i] for tree in trees)
        inner = getattr(layer, "layers", None)
        if isinstance(inner, tuple):                                # a block: its chain
            yield from records(inner, f"{where}[{i}].layers", *entries)
        else:
            yield (f"{where}[{i}]", layer, *entries)


def require_per_sample(layers: tuple[Any, ...], params: Any, where: str, quantity: str) -> None:
    """Every layer with parameters, inner layers of a block too, has :data:`PER_SAMPLE`:
    else the uniform :class:`LayerError` naming it (a record of one's own may leave them
    out until a per-example quantity asks; an AttributeError said nothing of why)."""
    for place, layer, p in records(layers, where, params):
        if jax.tree.leaves(p):
            for name in PER_SAMPLE:
                capability(layer, name, place, quantity)
