"""The hand-written backpropagation recursion: forward cache -> deltas -> grads.

The three equations of the seeds, batch-first (rows are samples):

.. math::
    \\delta^L = \\frac{\\partial C}{\\partial a^L} \\odot g^{L\\prime}(z^L)
    \\qquad \\text{(output error; seed 002's } E_o\\text{)}

    \\delta^l = (\\delta^{l+1} W^{l+1\\top}) \\odot g^{l\\prime}(z^l)
    \\qquad \\text{(the recursion; seed 002's } E_h\\text{)}

    \\frac{\\partial C}{\\partial W^l} = a^{l-1\\top} \\delta^l, \\qquad
    \\frac{\\partial C}{\\partial b^l} = \\sum_n \\delta^l_n
    \\qquad \\text{(error times input activation)}

For the cross-entropies on logits ``dC/da^L`` is the fused ``(p - y) / N``.
The equations are written out once, in the Dense rule
(:meth:`jaxbp.layers.Dense.backward`), and the recursion is the one reversed
loop over the layer records (:func:`jaxbp.layers.chain.chain_backward`); an
MLP runs it over its Dense layers (:attr:`jaxbp.MLP.network`). Nothing here
calls JAX's autodiff; every derivative is from :mod:`jaxbp.activations` and
:mod:`jaxbp.losses`. The MLP pieces (:func:`output_delta`, :func:`layer_deltas`) are
public so that curvature code reuses the one loop.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax

from jaxbp import _checks, network
from jaxbp._typing import Array, ArrayLike, Params
from jaxbp.layers.chain import chain_backward
from jaxbp.mlp import MLP, Cache, cache_to_caches
from jaxbp.network import as_network


def sample_output_delta(net: MLP, cache: Cache, y: Array) -> Array:
    """delta^L of each sample's own loss: dl_n/da^L_n * g^L'(z^L_n), shape (batch, n_out).

    Not divided by N: row n is the output error of the loss of sample n alone
    (the fused ``p - y`` for the cross-entropies on logits). Per-example
    gradients start here.
    """
    a_out, z_out = cache.acts[-1], cache.zs[-1]
    return net.loss_fn.sample_grad(a_out, y) * net.activations[-1].dg(z_out, a_out)


def output_delta(net: MLP, cache: Cache, y: Array) -> Array:
    """delta^L = dC/da^L * g^L'(z^L) for the batch mean C, shape (batch, n_out).

    C is the mean of the N sample losses, so delta^L is the per-sample output
    error divided by N; for softmax and sigmoid cross-entropy on logits it is
    the fused (p - y)/N.
    """
    return sample_output_delta(net, cache, y) / cache.acts[-1].shape[0]


def layer_deltas(net: MLP, params: Params, cache: Cache, delta_out: Array) -> tuple[Array, ...]:
    """Every layer's error from the output error, by the recursion.

    .. math::
        \\delta^l = (\\delta^{l+1} W^{l+1\\top}) \\odot g^{l\\prime}(z^l)

    The one reversed loop over the net's Dense records
    (:func:`jaxbp.layers.chain.chain_backward`), started at the output layer's
    pre-activation: that layer runs with ``g' = 1`` so that ``delta_out`` is its
    error as given, and every other layer's error at z is the error arriving at
    its output times ``g'(z)`` (the first line of :meth:`jaxbp.layers.Dense.backward`).

    Args:
      net: the network description.
      params: the parameters the cache was computed with.
      cache: the forward pass's :class:`~jaxbp.mlp.Cache`.
      delta_out: (batch, n_out) delta^L, the error at the output pre-activation.

    Returns:
      ``(delta^1, ..., delta^L)``, ``delta^l: (batch, sizes[l])``.
    """
    layers = net.network.layers
    from_z = (*layers[:-1], dataclasses.replace(layers[-1], activation="identity"))
    _, _, at_outputs = chain_backward(from_z, params, cache_to_caches(cache), delta_out,
                                      need_input=False)
    hidden = tuple(delta_a * act.dg(z, a) for delta_a, act, z, a
                   in zip(at_outputs[:-1], net.activations, cache.zs, cache.acts[1:]))
    return (*hidden, delta_out)


def value_grads_and_output(
    net: MLP, params: Params, x: Array, y: Array
) -> tuple[Array, Params, Array]:
    """C, dC/dparams by the recursion, and a^L, for checked inputs (no input checks).

    The reversed loop over the layer records (an MLP's are its Dense layers,
    :attr:`jaxbp.MLP.network`); see :func:`jaxbp.network.value_grads_and_output`.
    The training step uses the output a^L for its metrics without a second
    forward pass.
    """
    return network.value_grads_and_output(as_network(net), params, x, y)


@functools.partial(jax.jit, static_argnums=0)
def _value_and_backprop(net: MLP, params: Params, x: Array, y: Array) -> tuple[Array, Params]:
    return value_grads_and_output(net, params, x, y)[:2]


def value_and_backprop(
    net: MLP, params: Params, x: ArrayLike, y: ArrayLike
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
    x, y = _checks.check_inputs(net, params, x, y)
    value, grads = _value_and_backprop(net, params, x, y)
    # Same container as the params (a list in gives a list out), as jax.grad does.
    return value, jax.tree.unflatten(jax.tree.structure(params), jax.tree.leaves(grads))


def backprop(net: MLP, params: Params, x: ArrayLike, y: ArrayLike) -> Params:
    """The gradient dC/dparams by the hand-written recursion (see :func:`value_and_backprop`)."""
    return value_and_backprop(net, params, x, y)[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _apply_manual(net: MLP, params: Params, x: Array) -> Array:
    return network.forward(as_network(net), params, x)[0]


def _apply_manual_fwd(net: MLP, params: Params, x: Array) -> tuple[Array, tuple[Params, Any]]:
    out, caches = network.forward(as_network(net), params, x)
    return out, (params, caches)


def _apply_manual_bwd(
    net: MLP, residuals: tuple[Params, Any], a_out_bar: Array
) -> tuple[Params, Array]:
    params, caches = residuals
    # The reversed loop from the incoming cotangent dC/da^L, carried one step past
    # the first layer: dC/dx is the error at the input.
    x_bar, grads, _ = chain_backward(as_network(net).layers, params, caches, a_out_bar,
                                     need_input=True)
    return grads, x_bar


_apply_manual.defvjp(_apply_manual_fwd, _apply_manual_bwd)


def apply_with_manual_vjp(net: MLP, params: Params, x: ArrayLike) -> Array:
    """``net.apply`` whose reverse-mode derivative is the hand-written recursion.

    A :func:`jax.custom_vjp`: ``jax.grad`` of any scalar built from the output
    (any loss, regulariser or downstream model) runs the reversed loop over the
    layer records with the incoming cotangent dC/da^L in place of the loss gradient, and returns
    dC/dparams and dC/dx. Forward-mode (``jax.jvp``) is not defined for it.

    Args:
      net: the network description.
      params: as ``net.init`` returns.
      x: (batch, n_in), floating.

    Returns:
      (batch, n_out) a^L.
    """
    x, _ = _checks.check_inputs(net, params, x)
    return _apply_manual(net, params, x)
