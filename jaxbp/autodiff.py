"""The reference: the same cost differentiated by :func:`jax.value_and_grad`.

This is what the hand-written recursion is checked against; it shares the
forward pass (:func:`jaxbp.network.forward`) and the loss value, and nothing of
the backward pass.
"""

from __future__ import annotations

import functools

import jax

from jaxbp import input_checks, network
from jaxbp.losses import mean_loss
from jaxbp.mlp import Net
from jaxbp.types import Array, ArrayLike, Params


def value_grads_and_output(
    net: Net, params: Params, x: Array, y: Array, key: Array | None = None
) -> tuple[Array, Params, Array]:
    """C, dC/dparams by ``jax.value_and_grad``, and a^L, for checked inputs (``key``: a
    training step's: the same dropout masks as the hand-written step's)."""

    def cost_and_output(params: Params) -> tuple[Array, Array]:
        out = network.forward(network.as_network(net), params, x, key)[0]
        return mean_loss(net.loss_fn, out, y), out

    (value, out), grads = jax.value_and_grad(cost_and_output, has_aux=True)(params)
    return value, grads, out


@functools.partial(jax.jit, static_argnums=0)
def _value_and_autodiff(net: Net, params: Params, x: Array, y: Array) -> tuple[Array, Params]:
    return value_grads_and_output(net, params, x, y)[:2]


def value_and_autodiff(
    net: Net, params: Params, x: ArrayLike, y: ArrayLike
) -> tuple[Array, Params]:
    """The cost and ``jax.value_and_grad`` of it: the reference gradient.

    Args:
      net: the network description (static under jit).
      params: as ``net.init`` returns.
      x: (batch, n_in), floating; cast to the params' dtype.
      y: (batch, n_out) targets, or (batch,) integer labels for
        ``softmax_cross_entropy``.

    Returns:
      ``(C, grads)``: the scalar cost and grads shaped like ``params``.
    """
    x, y = input_checks.check_inputs(net, params, x, y)
    return _value_and_autodiff(net, params, x, y)
