"""Curvature of any :class:`jaxbp.Network` from its layer records: GGN diagonal, K-FAC
factors (Dense and Conv2D), Hessian-vector products.

**GGN diagonal** (BackPACK's DiagGGNExact). With the loss Hessian at the output
``H_n = S_n S_n^T`` (k columns), each column of S is sent back through the one
reversed loop as an output error (all k at once, ``jax.vmap``), and every layer
with parameters squares the per-sample gradients of its errors:

.. math::
    \\mathrm{diag}(G) = \\tfrac1N \\sum_{n,c} g_{n,c} \\odot g_{n,c}

For a sequence output the rows are the M counted tokens: token t's k columns go back
as errors at position t alone (T k columns; attention couples the positions, so the
tokens of one sample cannot share a column), ``1/M`` in place of ``1/N``.

A Dense layer needs no per-sample gradient for it, ``(a^2)^T (delta^2)`` (its record's
``sq_grad_sum``); Conv2D, LayerNorm and Residual form theirs (``per_sample_grads``).

**K-FAC** from every record's blocks (:mod:`jaxbp.layers.kfac`: Kronecker for Dense,
Conv2D and attention's projections, diagonal-A tables for Embedding, diagonal blocks
for the norms; a Residual's inner layers; "expand" for sequence outputs). A Dense layer's
factors are those of :func:`jaxbp.kfac_factors`. For a Conv2D (KFC, Grosse and Martens 2016), with
``p_{n,t}`` the input patch of output position t (T of them) and ``p_bar = [p, 1]``:

.. math::
    A = \\tfrac1N \\sum_n \\sum_t \\bar p_{n,t} \\bar p_{n,t}^\\top, \\qquad
    G = \\tfrac1N \\sum_n \\tfrac1T \\sum_t \\mathbb{E}[\\delta_{n,t} \\delta_{n,t}^\\top]

(positions summed for A, averaged for G: the paper's convention, under which
``A \\otimes G`` is the Fisher block when the errors of different positions are
uncorrelated). The patch features are in ``lax.conv_general_dilated_patches``
order, channel first: row ``c kh kw + i kw + j`` of A is ``W[i, j, c, :]``, the
bias last, so ``A \\otimes G`` acts on ``[W.transpose(2, 0, 1, 3).reshape(-1, O); b]``
flattened row by row.

**Hessian-vector products**: forward mode over the hand-written gradient,
``Hv = d/dr grad C(theta + r v)`` by ``jax.jvp`` of
:func:`jaxbp.network.value_grads_and_output` (Pearlmutter's trick applied to our
own backward, for every layer type; an MLP through its Dense chain).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from jaxbp import losses, network, tied_embedding
from jaxbp.layers import kfac
from jaxbp.layers.chain import chain_backward, require_per_sample
from jaxbp.network import Network
from jaxbp.types import Array, Params


def _column_errors(net: Network, params: Params, caches: Any, columns: Array,
                   kept: bool = False) -> tuple:
    """Every layer's output error (``kept``: its kept errors, what K-FAC reads) for each of
    the k output errors in ``columns`` (k, B, n)."""
    def one(column: Array) -> tuple[Any, ...]:
        return chain_backward(net.layers, params, caches, column, need_input=False,
                              kept=kept)[2]

    return jax.vmap(one)(columns)


def _require_loss_part(net: Network, part: str, needed_by: str) -> None:
    """A loss of the user's (:func:`jaxbp.losses.register`) may lack an optional part:
    named here, at trace time, with what needs it."""
    if getattr(net.loss_fn, part) is None:
        raise ValueError(f"loss {net.loss!r} has no {part}, which {needed_by} needs: give "
                         f"it one (jaxbp.losses.Loss(..., {part}=...)), or use another "
                         f"kind")


def _hessian_columns(net: Network, out: Array, y: Array) -> Array:
    """(k, B, n_out): the columns of the loss Hessian's factor at a^L; for a sequence
    output (T k, B, T, n_out), each token's columns at its own position
    (:func:`jaxbp.losses.token_hessian_columns`)."""
    _require_loss_part(net, "sample_hessian_factor",
                       "ggn_diag and kfac_factors(kind='exact') (the loss Hessian H = S S^T)")
    if net.is_sequence:
        return losses.token_hessian_columns(net.loss_fn, out, y)
    return jnp.moveaxis(net.loss_fn.sample_hessian_factor(out, y), -1, 0)


@functools.partial(jax.jit, static_argnums=0)
def ggn_diag(net: Network, params: Params, x: Array, y: Array) -> Params:
    """diag((1/M) sum_m J_m^T H_m J_m) over the M samples (counted tokens of sequences)
    for checked inputs."""
    require_per_sample(net.layers, params, "layers", "the GGN diagonal")
    tied_embedding.require_untied(net, "the GGN diagonal")
    out, caches = network.forward(net, params, x)
    errors = _column_errors(net, params, caches, _hessian_columns(net, out, y))
    count = losses.counted(out, y)
    return tuple(jax.tree.map(lambda g: g / count, sq_grad_sum(layer, p, cache, delta))
                 for layer, p, cache, delta in zip(net.layers, params, caches, errors))


@functools.partial(jax.jit, static_argnums=0)
def hvp(net: Network, params: Params, x: Array, y: Array, v: Params) -> Params:
    """H v by forward mode over the hand-written gradient, for checked inputs."""
    def gradient(p: Params) -> Params:
        return network.value_grads_and_output(net, p, x, y)[1]

    return jax.jvp(gradient, (params,), (v,))[1]


def kfac_rows(w: Array) -> Array:
    """A weight as the rows A acts on: a Dense ``(d_in, d_out)`` as it is, a conv kernel
    ``(kh, kw, c, o)`` as ``(c kh kw, o)``, channel first (the patch order)."""
    return w if w.ndim == 2 else jnp.transpose(w, (2, 0, 1, 3)).reshape(-1, w.shape[-1])


def from_kfac_rows(rows: Array, shape: tuple[int, ...]) -> Array:
    """The inverse of :func:`kfac_rows`: rows back to a weight of ``shape``."""
    if len(shape) == 2:
        return rows
    kh, kw, c, o = shape
    return jnp.transpose(rows.reshape(c, kh, kw, o), (1, 2, 0, 3))


def sq_grad_sum(layer: Any, params: Any, cache: Any, deltas: Array) -> Any:
    """``sum_k sum_i g_{k,i} (.) g_{k,i}`` for (k, B, ...) output errors: the record's own
    ``sq_grad_sum`` where it has one (Dense: no per-sample gradient formed), else from
    its ``per_sample_grads``."""
    if not jax.tree.leaves(params):
        return params
    if hasattr(layer, "sq_grad_sum"):
        return layer.sq_grad_sum(params, cache, deltas)
    grads = jax.vmap(layer.per_sample_grads, in_axes=(None, None, 0))(params, cache, deltas)
    return jax.tree.map(lambda g: jnp.sum(g * g, axis=(0, 1)), grads)


def _target_columns(net: Network, out: Array, y: Array, kind: str,
                    key: Array | None) -> Array:
    """``(k, B, ...)`` output errors of each sample's own loss (of each token's, for
    sequences; ignored tokens 0): the Hessian factor's columns (``"exact"``), or one
    column at targets drawn from the model (``"sampled"``) or at the labels."""
    if kind == "exact":
        return _hessian_columns(net, out, y)
    rows, targets, valid = losses.tokens(out, y)
    if kind == "sampled":
        _require_loss_part(net, "sample_targets", "K-FAC of kind 'sampled' (targets drawn "
                                                  "from the model)")
        targets = net.loss_fn.sample_targets(rows, key)
    grads = net.loss_fn.sample_grad(rows, targets)
    if valid is not None:
        grads = jnp.where(valid[:, None], grads, 0)
    return grads.reshape(out.shape)[None]


@functools.partial(jax.jit, static_argnums=(0, 4))
def kfac_factors(net: Network, params: Params, x: Array, y: Array, kind: str,
                 key: Array | None) -> tuple[Any, ...]:
    """Every layer's K-FAC factors (:mod:`jaxbp.layers.kfac`) for checked inputs."""
    tied_embedding.require_untied(net, "K-FAC")
    out, caches = network.forward(net, params, x)
    columns = _target_columns(net, out, y, kind, key)
    errors = _column_errors(net, params, caches, columns, kept=True)
    return kfac_from_errors(net, params, caches, errors, kfac_scale(net, out, y))


def kfac_scale(net: Network, out: Array, y: Array) -> kfac.KfacScale:
    """The normalisers: the batch, the cost's count M, and "expand" for sequence outputs."""
    return kfac.KfacScale(out.shape[0], losses.counted(out, y), net.is_sequence)


def kfac_from_errors(net: Network, params: Params, caches: tuple, errors: tuple,
                     scale: kfac.KfacScale) -> tuple[Any, ...]:
    """The factors from every layer's cache and its kept errors ``(k, B, ...)`` (k target
    draws or Hessian columns of each sample's own loss; ``chain_backward(..., kept=True)``):
    one entry per layer, ``{}`` for a layer without parameters."""
    tied_embedding.require_untied(net, "K-FAC")
    return tuple(kfac.layer_factors(layer, p, cache, delta, scale, f"layers[{i}]")
                 for i, (layer, p, cache, delta)
                 in enumerate(zip(net.layers, params, caches, errors)))
