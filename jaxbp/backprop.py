"""The hand-written backpropagation recursion: forward cache -> deltas -> grads.

The three equations of backpropagation, batch-first (rows are samples):

.. math::
    \\delta^L = \\frac{\\partial C}{\\partial a^L} \\odot g^{L\\prime}(z^L)
    \\qquad \\text{(the output error)}

    \\delta^l = (\\delta^{l+1} W^{l+1\\top}) \\odot g^{l\\prime}(z^l)
    \\qquad \\text{(the error passed back)}

    \\frac{\\partial C}{\\partial W^l} = a^{l-1\\top} \\delta^l, \\qquad
    \\frac{\\partial C}{\\partial b^l} = \\sum_n \\delta^l_n
    \\qquad \\text{(error times input activation)}

For the cross-entropies on logits ``dC/da^L`` is the fused ``(p - y) / N``.
The equations are written out once, in the Dense rule
(:meth:`jaxbp.layers.Dense.backward`), and the recursion is the one reversed
loop over the layer records (:func:`jaxbp.layers.chain.chain_backward`); an
MLP runs it over its Dense layers (:attr:`jaxbp.MLP.network`). Nothing here
calls JAX's autodiff; every derivative is from :mod:`jaxbp.activations` and
:mod:`jaxbp.losses`. :func:`layer_deltas` gives every layer's error for code
that reuses them.
"""

from __future__ import annotations

import functools
from typing import Any

import jax

from jaxbp import input_checks, network, tied_embedding
from jaxbp.layers.chain import chain_backward
from jaxbp.mlp import Net
from jaxbp.network import Network, as_network
from jaxbp.types import Array, ArrayLike, Params, check_bool


@functools.partial(jax.jit, static_argnums=(0, 4))
def _layer_deltas(net: Network, params: Params, x: Array, y: Array, per_sample: bool):
    return network.layer_deltas(net, params, x, y, per_sample)


def layer_deltas(net: Net, params: Params, x: ArrayLike, y: ArrayLike,
                 per_sample: bool = False) -> tuple[Array, tuple[Any, ...], tuple[Array, ...]]:
    """Every layer's cache and the error at its output, from one forward and one backward.

    ``deltas[l] = dC/da^l`` for the batch-mean cost C (or, with ``per_sample=True``,
    each sample's own loss: not divided by N), from the one reversed loop over the
    layer records. A layer's error at its pre-activation (the textbook's
    ``delta^l = dC/dz^l``) is its record's ``pre_activation_error(cache, deltas[l])``
    (``deltas[l] * g'(z^l)`` for a Dense).

    Args:
      net: an :class:`~jaxbp.MLP` (its Dense chain) or a :class:`~jaxbp.Network`
        with a vector output.
      params, x, y: as :func:`value_and_backprop`.
      per_sample: errors of each sample's own loss instead of the batch mean's.

    Returns:
      ``(a^L, caches, deltas)``: the output, each layer's forward cache (a Dense's
      ``(a^{l-1}, z^l, a^l)``) and the error at each layer's output.
    """
    x, y = input_checks.check_inputs(net, params, x, y)
    return _layer_deltas(as_network(net), params, x, y, check_bool("per_sample", per_sample))


def value_grads_and_output(
    net: Net, params: Params, x: Array, y: Array, key: Array | None = None
) -> tuple[Array, Params, Array]:
    """C, dC/dparams by the recursion, and a^L, for checked inputs (no input checks).

    The reversed loop over the layer records (an MLP's are its Dense layers,
    :attr:`jaxbp.MLP.network`); see :func:`jaxbp.network.value_grads_and_output`.
    The training step uses the output a^L for its metrics without a second
    forward pass. ``key``: a training step's (dropout masks), None to evaluate.
    """
    return network.value_grads_and_output(as_network(net), params, x, y, key)


@functools.partial(jax.jit, static_argnums=0)
def _value_and_backprop(net: Net, params: Params, x: Array, y: Array) -> tuple[Array, Params]:
    return value_grads_and_output(net, params, x, y)[:2]


def value_and_backprop(
    net: Net, params: Params, x: ArrayLike, y: ArrayLike
) -> tuple[Array, Params]:
    """The cost and its gradient by the hand-written recursion, compiled.

    Args:
      net: the network description (static: jit recompiles per distinct net).
      params: as ``net.init`` returns.
      x: (batch, n_in), floating; cast to the params' dtype.
      y: (batch, n_out) targets, or (batch,) integer labels for
        ``softmax_cross_entropy``.

    Returns:
      ``(C, grads)``: the scalar cost and grads shaped like ``params``.

    Raises:
      TypeError, ValueError: bad params, x or y (see :func:`jaxbp.MLP.cost`).
    """
    x, y = input_checks.check_inputs(net, params, x, y)
    value, grads = _value_and_backprop(net, params, x, y)
    # Same container as the params (a list in gives a list out), as jax.grad does.
    return value, jax.tree.unflatten(jax.tree.structure(params), jax.tree.leaves(grads))


def backprop(net: Net, params: Params, x: ArrayLike, y: ArrayLike) -> Params:
    """The gradient dC/dparams by the hand-written recursion (see :func:`value_and_backprop`)."""
    return value_and_backprop(net, params, x, y)[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _apply_manual(net: Net, params: Params, x: Array) -> Array:
    return network.forward(as_network(net), params, x)[0]


def _apply_manual_fwd(net: Net, params: Params, x: Array) -> tuple[Array, tuple[Params, Any]]:
    out, caches = network.forward(as_network(net), params, x)
    return out, (params, caches)


def _apply_manual_bwd(
    net: Net, residuals: tuple[Params, Any], a_out_bar: Array
) -> tuple[Params, Array]:
    params, caches = residuals
    chain = as_network(net)
    # The reversed loop from the incoming cotangent dC/da^L, carried one step past
    # the first layer: dC/dx is the error at the input.
    seen = tied_embedding.layer_params(chain, params)     # a tied head's weight: E^T
    x_bar, grads, _ = chain_backward(chain.layers, seen, caches, a_out_bar, need_input=True)
    return tied_embedding.tied_grads(chain, grads), x_bar


_apply_manual.defvjp(_apply_manual_fwd, _apply_manual_bwd)


def apply_with_manual_vjp(net: Net, params: Params, x: ArrayLike) -> Array:
    """``net.apply`` whose reverse-mode derivative is the hand-written recursion.

    A :func:`jax.custom_vjp`: ``jax.grad`` of any scalar built from the output
    (any loss, regulariser or downstream model) runs the reversed loop over the
    layer records with the incoming cotangent dC/da^L in place of the loss gradient, and returns
    dC/dparams and dC/dx. Forward-mode (``jax.jvp``) is not defined for it.

    Args:
      net: the network description.
      params: as ``net.init`` returns.
      x: (batch, *input_shape), floating; or int tokens (batch, T) for a network of
        tokens (a GPT), which get no cotangent.

    Returns:
      a^L: (batch, n_out), or (batch, T, n_out) for a sequence output.
    """
    x, _ = input_checks.check_inputs(net, params, x)
    return _apply_manual(net, params, x)
