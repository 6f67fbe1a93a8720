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
Nothing here calls JAX's autodiff; every derivative is from
:mod:`jaxbp.activations` and :mod:`jaxbp.losses`. The pieces
(:func:`output_delta`, :func:`layer_deltas`, :func:`grads_from_deltas`) are
public so that per-example, curvature and parallel code reuse the one recursion.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jaxbp import _checks, network
from jaxbp._typing import Array, ArrayLike, Params
from jaxbp.layers.chain import chain_backward
from jaxbp.losses import sample_loss_and_grad
from jaxbp.mlp import MLP, Cache, forward, matmul
from jaxbp.network import Network


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

    Args:
      net: the network description.
      params: the parameters the cache was computed with.
      cache: the forward pass's :class:`~jaxbp.mlp.Cache`.
      delta_out: (batch, n_out) delta^L, the error at the output pre-activation.

    Returns:
      ``(delta^1, ..., delta^L)``, ``delta^l: (batch, sizes[l])``.
    """
    deltas = [delta_out]
    for l in range(net.n_layers - 1, 0, -1):  # hidden layers l = L-1, ..., 1 (0-based: l-1)
        act = net.activations[l - 1]
        back = matmul(net, deltas[-1], params[l]["w"], transpose_b=True)  # delta W^T
        deltas.append(back * act.dg(cache.zs[l - 1], cache.acts[l]))
    return tuple(reversed(deltas))


def grads_from_deltas(net: MLP, acts: tuple[Array, ...], deltas: tuple[Array, ...]) -> Params:
    """dC/dW^l = a^{l-1 T} delta^l and dC/db^l = sum_n delta^l_n, for every layer.

    Args:
      net: the network description (its matmul precision).
      acts: ``(a^0, ..., a^L)`` (only ``a^0 .. a^{L-1}`` are read).
      deltas: ``(delta^1, ..., delta^L)``.

    Returns:
      Grads shaped like the params: a tuple of ``{"w", "b"}`` dicts.
    """
    return tuple(
        {"w": matmul(net, a_in, delta, transpose_a=True), "b": delta.sum(axis=0)}
        for a_in, delta in zip(acts, deltas)
    )


def value_grads_and_output(
    net: MLP, params: Params, x: Array, y: Array
) -> tuple[Array, Params, Array]:
    """C, dC/dparams by the recursion, and a^L, for checked inputs (no input checks).

    The training step uses the output a^L for its metrics without a second
    forward pass. A :class:`jaxbp.Network` runs the reversed loop over its
    layer records (:func:`jaxbp.network.value_grads_and_output`).
    """
    if isinstance(net, Network):
        return network.value_grads_and_output(net, params, x, y)
    cache = forward(net, params, x)
    a_out, z_out = cache.acts[-1], cache.zs[-1]
    # C and delta^L from one evaluation of the loss (softmax shares its exp)
    losses, dl_da = sample_loss_and_grad(net.loss_fn, a_out, y)
    delta_out = dl_da * net.activations[-1].dg(z_out, a_out) / a_out.shape[0]
    deltas = layer_deltas(net, params, cache, delta_out)
    return jnp.mean(losses), grads_from_deltas(net, cache.acts, deltas), a_out


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
    if isinstance(net, Network):
        return network.forward(net, params, x)[0]
    return forward(net, params, x).acts[-1]


def _apply_manual_fwd(net: MLP, params: Params, x: Array) -> tuple[Array, tuple[Params, Cache]]:
    if isinstance(net, Network):
        out, caches = network.forward(net, params, x)
        return out, (params, caches)
    cache = forward(net, params, x)
    return cache.acts[-1], (params, cache)


def _apply_manual_bwd(
    net: MLP, residuals: tuple[Params, Cache], a_out_bar: Array
) -> tuple[Params, Array]:
    params, cache = residuals
    if isinstance(net, Network):  # the reversed loop, carried to the input
        x_bar, grads, _ = chain_backward(net.layers, params, cache, a_out_bar, need_input=True)
        return grads, x_bar
    # delta^L = (dC/da^L) * g^L'(z^L), with dC/da^L the incoming cotangent.
    delta_out = a_out_bar * net.activations[-1].dg(cache.zs[-1], cache.acts[-1])
    deltas = layer_deltas(net, params, cache, delta_out)
    # dC/dx = dC/da^0 = delta^1 W^{1 T}: the recursion taken one step further.
    x_bar = matmul(net, deltas[0], params[0]["w"], transpose_b=True)
    return grads_from_deltas(net, cache.acts, deltas), x_bar


_apply_manual.defvjp(_apply_manual_fwd, _apply_manual_bwd)


def apply_with_manual_vjp(net: MLP, params: Params, x: ArrayLike) -> Array:
    """``net.apply`` whose reverse-mode derivative is the hand-written recursion.

    A :func:`jax.custom_vjp`: ``jax.grad`` of any scalar built from the output
    (any loss, regulariser or downstream model) runs :func:`layer_deltas` with
    the incoming cotangent dC/da^L in place of the loss gradient, and returns
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
