"""The variance over a batch of the per-example gradients, from the one recursion's deltas.

.. math::
    \\mathrm{Var}[g] = E[g^2] - E[g]^2

For dense layers both moments are matrix products of per-sample (B, width) arrays
(the record's ``sq_grad_sum``); other layers form their per-sample gradients
(``per_sample_grads``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxbp import input_checks, network, tied_embedding
from jaxbp.layers.chain import require_per_sample
from jaxbp.mlp import Net
from jaxbp.types import Array, ArrayLike, Params


def _moments_variance(layer: Any, params: Any, cache: Any, delta: Array) -> Any:
    """Var = E[g^2] - E[g]^2 from the record's ``sq_grad_sum`` and its batch gradient
    (Dense: ``(a^2)^T (delta^2) / B``, no (B, fan_in, fan_out) formed)."""
    batch = delta.shape[0]
    second = layer.sq_grad_sum(params, cache, delta[None])
    mean = layer.backward(params, cache, delta, need_input=False)[1]
    return jax.tree.map(lambda s, m: jnp.maximum(s / batch - (m / batch) ** 2, 0), second, mean)


@functools.partial(jax.jit, static_argnums=0)
def _per_example_grad_variance(net: Net, params: Params, x: Array,
                               y: Array) -> Params:
    chain = network.as_network(net)
    require_per_sample(chain.layers, params, "layers", "the gradient variance")
    _, caches, deltas = network.layer_deltas(chain, params, x, y, per_sample=True)
    seen = tied_embedding.layer_params(chain, params)
    tied = (0, chain.n_layers - 1) if chain.tie_embedding else ()
    out = []
    for l, (layer, p, cache, delta) in enumerate(zip(chain.layers, seen, caches, deltas)):
        if not jax.tree.leaves(p):
            out.append(p)
        elif l in tied:                # formed: the table's two uses summed per sample below
            out.append(layer.per_sample_grads(p, cache, delta))
        elif hasattr(layer, "sq_grad_sum"):   # the moments, no per-sample gradient formed
            out.append(_moments_variance(layer, p, cache, delta))
        else:                          # the layer's per-sample gradients, then their variance
            out.append(_variance(layer.per_sample_grads(p, cache, delta)))
    if tied:
        out[0], out[-1] = map(_variance, tied_embedding.tied_grads(chain, (out[0], out[-1])))
    return tuple(out)


def _variance(per_sample: Any) -> Any:
    return jax.tree.map(lambda g: jnp.var(g, axis=0), per_sample)


def per_example_grad_variance(net: Net, params: Params, x: ArrayLike, y: ArrayLike) -> Params:
    """Elementwise variance over the batch of the per-example gradients ``g_i = dl_i/dtheta``.

    .. math::
        \\mathrm{Var}[g^{W}]_{jk} = \\frac{1}{B}\\sum_i a_{ij}^2 \\delta_{ik}^2
        - \\Big(\\frac{1}{B}\\sum_i a_{ij}\\delta_{ik}\\Big)^2

    The population variance (divide by B) of the gradients of each sample's own
    loss ``l_i`` (not divided by B). Against BackPACK's ``Variance``: BackPACK's
    individual gradients are those of the loss as the module computes it, so on a
    *summed* loss (``reduction="sum"``) its Variance is this one; on jaxbp's
    *mean* cost ``C = (1/B) sum_i l_i`` (``reduction="mean"``) its individual
    gradients are ``g_i / B`` and its Variance is this one divided by ``B^2``.

    For dense layers both moments are matrix products of (B, width) arrays, so
    nothing per-example is materialised; for the other layers of a
    :class:`jaxbp.Network` (Conv2D, LayerNorm, Residual) the layer's per-sample
    gradients are formed (its record's ``per_sample_grads``) and their variance
    taken. ``E[g^2] - E[g]^2`` cancels where the variance is tiny against the
    squared mean; rounding below zero is clipped to 0. A tied token table
    (``tie_embedding``) is formed per sample, its two uses summed, (B, vocab, dim).

    Returns:
      Variances shaped like ``params``.
    """
    x, y = input_checks.check_inputs(net, params, x, y)
    return _per_example_grad_variance(net, params, x, y)
