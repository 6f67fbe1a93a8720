"""Gradient flow: per-layer error, gradient, weight and update sizes, from the recursion.

The vanishing-gradient problem: through a deep stack of sigmoids the
error ``delta^l = (delta^{l+1} W^{l+1 T}) * g'(z^l)`` shrinks by the factor
``g' <= 1/4`` at every layer. :func:`layer_stats` shows it layer by layer.
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp

from jaxbp import input_checks, network, tied_embedding
from jaxbp.layers.chain import chain_backward, records
from jaxbp.losses import cost_and_output_error, counted
from jaxbp.mlp import Net
from jaxbp.types import Array, ArrayLike, Params, check_like_params


@functools.partial(jax.jit, static_argnums=0)
def _layer_stats(net: Net, params: Params, x: Array, y: Array,
                 updates: Params | None) -> dict[str, Array]:
    """The statistics of the layers with an activation (the ``pre_activation_error``
    capability: Dense, Conv2D; their weight is ``"w"``), from one reversed loop."""
    chain = network.as_network(net)
    out, caches = network.forward(chain, params, x)
    delta = cost_and_output_error(chain.loss_fn, out, y)[1]    # dC/da^L of the mean cost
    count = counted(out, y)                  # M: samples, or counted tokens of sequences
    # kept: a block's errors are its inner layers' (the same pass; what K-FAC reads too)
    params = tied_embedding.layer_params(chain, params)    # a tied head's weight: the table^T
    _, grads, deltas = chain_backward(chain.layers, params, caches, delta, need_input=False,
                                      kept=True)
    # a tied head's step is the table's, transposed (its gradient: its own use's)
    steps = grads if updates is None else tied_embedding.layer_params(chain, updates)
    rows = list(_weighted(chain.layers, params, grads, steps, caches, deltas))
    # delta^l at the pre-activation z^l, of the mean cost, times M: the per-sample scale
    weight = jnp.stack([jnp.linalg.norm(w) for _, w, _, _ in rows])
    return {
        "mean_abs_delta": jnp.stack([jnp.mean(jnp.abs(e)) * count for e, _, _, _ in rows]),
        "grad_norm": jnp.stack([jnp.linalg.norm(g) for _, _, g, _ in rows]),
        "weight_norm": weight,
        "update_ratio": jnp.stack([jnp.linalg.norm(s) for _, _, _, s in rows]) / weight,
    }


def layer_stats_places(net: Net) -> list[str]:
    """Where each entry of :func:`layer_stats` sits, in its order (``layers[2].layers[1]``
    for a block's inner layer): the labels of a flow figure."""
    return [place for place, record in records(network.as_network(net).layers)
            if hasattr(record, "pre_activation_error")]


def _weighted(layers: tuple[Any, ...], params: Any, grads: Any, steps: Any, caches: Any,
              errors: Any) -> Iterator[tuple[Array, Array, Array, Array]]:
    """``(error at z, W, dC/dW, step of W)`` of every layer with an activation (the
    ``pre_activation_error`` capability), in :func:`layer_stats_places`' order: those
    inside blocks (a Residual's chain, with its kept errors) included."""
    for _, layer, p, g, s, c, e in records(layers, "layers", params, grads, steps, caches,
                                            errors):
        if hasattr(layer, "pre_activation_error"):
            yield layer.pre_activation_error(c, e), p["w"], g["w"], s["w"]


def layer_stats(net: Net, params: Params, x: ArrayLike, y: ArrayLike,
                updates: Params | None = None) -> dict[str, Array]:
    """Per weight layer l = 1..L: how large the error, gradient, weights and update are.

    Returns a dict of (L,) arrays:

    * ``mean_abs_delta``: mean over batch and units of ``|delta^l|`` for the
      per-sample loss (the batch-mean delta times N);
    * ``grad_norm``: ``||dC/dW^l||`` (Frobenius);
    * ``weight_norm``: ``||W^l||``;
    * ``update_ratio``: ``||update of W^l|| / ||W^l||`` for the given
      ``updates`` (e.g. an optax update); without them, ``||dC/dW^l|| /
      ||W^l||`` (the ratio for a unit-learning-rate sgd step).

    For a :class:`jaxbp.Network` the entries are its layers that have a weight and an
    activation (Dense, Conv2D), in order, those inside Residual blocks included;
    ``mean_abs_delta`` is, as for an MLP, the error at the layer's pre-activation z
    (after its own ``g'``). For a sequence output (a GPT) the per-sample scale is that of
    one counted token's loss (times M, the counted tokens), and the entries are each
    block's two MLP layers, then the head (attention's projections have no activation:
    not an entry; nor a SwiGLU MLP's GatedDense, two weights with no one pre-activation).
    """
    x, y = input_checks.check_inputs(net, params, x, y)
    if updates is not None:
        check_like_params("updates", updates, params)
    return _layer_stats(net, params, x, y, updates)
