"""A tied embedding: the head's weight is the token table, transposed (GPT-2's).

.. math::
    a_{n,t}^{(0)} = E[x_{n,t}] (+ P[t]), \\qquad z^{(L)} = h\\, E^\\top + b, \\qquad
    \\frac{\\partial C}{\\partial E} = \\mathrm{scatter}_x(\\delta^{(0)})
        + (h^\\top \\delta^{(L)})^\\top

(E: (vocab, dim) the table, h: the head's input, delta^(0) the error at the embedding's
output, delta^(L) at the head's pre-activation). The params hold E once; the records
read :func:`layer_params` (the head's ``"w"`` put in as E^T) and their gradients are
summed back by :func:`tied_grads`. A sample's squared norm gains the cross term of the
two uses, ``2 <scatter_x(e_i), (h_i^T d_i)^T> = 2 sum_{t,s} <e_t, h_s> d_s[x_t]``
(:func:`cross_sq_norms`): no (vocab, dim) table per sample.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp

from jaxbp.layers.base import LayerError
from jaxbp.types import Array


def check_tie(layers: Sequence[Any], shapes: list[tuple[int, ...]], dtype: Any) -> None:
    """An Embedding first (a token table) and a head last whose params are one weight
    ``"w"`` of shape (dim, vocab) (and a bias): the table, transposed, fits it."""
    first, head = layers[0], layers[-1]
    if not getattr(first, "takes_tokens", False) or not hasattr(first, "vocab"):
        raise LayerError(f"tie_embedding ties the head to the token table of an Embedding "
                         f"first, but layers[0] is a {type(first).__name__}")
    last = f"layers[{len(layers) - 1}] ({type(head).__name__})"
    head_params = jax.eval_shape(lambda key: head.init(key, shapes[-2], dtype),
                                 jax.random.key(0))
    weight = head_params.get("w") if isinstance(head_params, dict) else None
    want = (first.dim, first.vocab)
    if weight is None or set(head_params) - {"w", "b"}:
        raise LayerError(f"tie_embedding reads the token table as the head's one weight, but "
                         f"{last} has params {sorted(head_params or {})}: end with a "
                         f"Dense(vocab)")
    if tuple(weight.shape) != want:
        raise LayerError(f"tie_embedding: the head {last} has a weight of shape "
                         f"{tuple(weight.shape)}, but the token table transposed is (dim, "
                         f"vocab) = {want}")


def layer_params(net: Any, params: Any) -> Any:
    """The params each record reads: ``params`` itself, or with ``net.tie_embedding`` the
    head's entry completed by its weight ``W_head = E^T`` (the token table)."""
    if not net.tie_embedding:
        return params
    return (*params[:-1], {**params[-1], "w": params[0]["tokens"].T})


def tied_grads(net: Any, grads: Any) -> Any:
    """The gradient of ``params`` from the records' gradients of :func:`layer_params`: with
    ``net.tie_embedding`` the table's two uses summed, ``dC/dE += (dC/dW_head)^T`` (the
    head's entry keeps its bias only). Per-sample gradients (a leading batch axis) and
    clipped sums are tied the same way (both uses are linear in the gradient)."""
    if not net.tie_embedding:
        return grads
    head = grads[-1]
    table = grads[0]["tokens"]
    table = table + jnp.swapaxes(head["w"], -1, -2).astype(table.dtype)
    return ({**grads[0], "tokens": table}, *grads[1:-1],
            {k: v for k, v in head.items() if k != "w"})


def cross_sq_norms(net: Any, params: Any, caches: Sequence[Any],
                   deltas: Sequence[Array]) -> Array:
    """(B,): ``2 <g_i^E, (g_i^W)^T>`` for each sample, the cross term of the table's two
    uses in ``||g_i||^2`` (a net with ``tie_embedding``), from the per-sample
    errors: ``2 sum_{t,s} <e_t, h_s> d_s[x_t]`` with e (T, dim) the error at the
    embedding's output, h (S, dim) the head's input and d (S, vocab) its pre-activation
    error (``params``: :func:`layer_params`'s)."""
    tokens, e = caches[0], deltas[0]
    dtype = params[0]["tokens"].dtype
    head, cache = net.layers[-1], caches[-1]
    batch = tokens.shape[0]
    h = cache[0].astype(dtype).reshape(batch, -1, cache[0].shape[-1])
    d = head.pre_activation_error(cache, deltas[-1]).astype(dtype)
    d = d.reshape(batch, -1, d.shape[-1])
    gram = jnp.einsum("ntd,nsd->nts", e.astype(dtype), h)              # <e_t, h_s>
    picked = jnp.take_along_axis(d, jnp.broadcast_to(tokens[:, None, :], (
        batch, d.shape[1], tokens.shape[1])), axis=2)                   # d_s[x_t]: (B, S, T)
    return 2 * jnp.einsum("nts,nst->n", gram, picked)


def with_cross_term(net: Any, params: Any, caches: Sequence[Any], deltas: Sequence[Array],
                    sq: Array) -> Array:
    """(B, G) per-group squared norms (the parametrised layers of :func:`layer_params`)
    with the cross term added to the embedding's, the first, group: the sum over groups
    is then each sample's ``||g_i||^2``."""
    if not net.tie_embedding:
        return sq
    return sq.at[:, 0].add(cross_sq_norms(net, params, caches, deltas))


def require_untied(net: Any, quantity: str) -> None:
    """A ValueError (at trace time, before XLA) for a quantity that does not take a
    network whose head and embedding share the token table."""
    if getattr(net, "tie_embedding", False):
        raise ValueError(f"{quantity} does not take a network with tie_embedding=True (the "
                         f"token table's two uses, embedding and head, share one block); "
                         f"build it with tie_embedding=False")
