"""K-FAC blocks from a layer's input rows and its errors: Kronecker, table and diagonal.

Each record with parameters turns its cache and the errors at its output, ``(k, B, ...)``
(k target draws or Hessian columns, each of one sample's own loss), into the factors of
its Fisher block. Three kinds of block, told apart by their keys:

* ``{"A", "G"}``, a weight ``W`` with its bias (Dense, Conv2D, each projection of
  SelfAttention): with ``a_bar = [a, 1]`` the input rows and ``delta`` the errors at the
  pre-activation, ``F ~ A (x) G`` acting on ``[W; b]`` row by row (a layer without a
  bias: ``a_bar = a``, on W alone);
* ``{"A_diag", "G"}``, a table read by one-hot rows (Embedding): ``A`` is diagonal, the
  counts of the rows read;
* ``{"diag"}``, the exact diagonal of the block (LayerNorm, RMSNorm scales and shifts):
  ``(1/M) sum g (.) g`` over the per-sample gradients of every error column.

**Positions.** A layer applied at P positions per sample (a conv's output pixels, a
token-wise layer's T tokens) has ``B P`` input rows. Two conventions (Eschenhagen et al.
2023), chosen by the network's output:

.. math::
    \\text{vector output (KFC, reduce-like):}\\quad
    A = \\tfrac1B \\sum_{n,p} \\bar a \\bar a^\\top, \\quad
    G = \\tfrac1{BP} \\sum_{n,p} \\delta \\delta^\\top

    \\text{sequence output (expand):}\\quad
    A = \\tfrac1{BT} \\sum_{n,t} \\bar a \\bar a^\\top, \\quad
    G = \\tfrac1M \\sum_{n,t} \\delta \\delta^\\top

with M what the cost averages (the counted tokens): under "expand" every position is a
sample of its own, and ``delta_{n,t}`` is the error at position t of sample n's summed
token loss, so ``A (x) G`` estimates the Fisher of the token-mean cost.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxbp.layers.base import capability
from jaxbp.types import Array


class KfacScale(NamedTuple):
    """What the factors are normalised by: the batch B, the cost's count M (samples, or
    counted tokens) and whether positions are samples of their own (``expand``)."""

    batch: int
    count: Any
    expand: bool


def _norms(scale: KfacScale, positions: int) -> tuple[Any, Any]:
    """What ``sum a_bar a_bar^T`` and ``sum delta delta^T`` are divided by."""
    if scale.expand:
        return scale.batch * positions, scale.count
    return scale.batch, scale.batch * positions


def kronecker_block(rows: Array, delta: Array, scale: KfacScale,
                    bias: bool = True) -> dict[str, Array]:
    """``{"A", "G"}`` of a weight and bias from input rows ``(B, ..., d_in)`` (or patches
    already flat, ``(B P, d_in)``) and pre-activation errors ``(k, B, ..., d_out)``;
    without ``bias``, of the weight alone (``a_bar = a``: A is ``(d_in, d_in)``)."""
    rows = rows.reshape(-1, rows.shape[-1])
    a_norm, g_norm = _norms(scale, rows.shape[0] // scale.batch)
    a_bar = (jnp.concatenate([rows, jnp.ones((rows.shape[0], 1), rows.dtype)], axis=1)
             if bias else rows)
    flat = delta.reshape(-1, delta.shape[-1])                       # (k B P, d_out)
    return {"A": a_bar.T @ a_bar / a_norm, "G": flat.T @ flat / g_norm}


def table_block(indices: Array, size: int, delta: Array, scale: KfacScale) -> dict[str, Array]:
    """``{"A_diag", "G"}`` of a ``(size, d)`` table read at integer ``indices`` (B, T): A
    is the diagonal of the one-hot rows' second moment (how often each row is read),
    normalised as :func:`kronecker_block`; G from the errors ``(k, B, T, d)`` at the rows
    read."""
    a_norm, g_norm = _norms(scale, indices.size // scale.batch)
    counts = jnp.zeros((size,), delta.dtype).at[indices.reshape(-1)].add(1)
    flat = delta.reshape(-1, delta.shape[-1])
    return {"A_diag": counts / a_norm, "G": flat.T @ flat / g_norm}


def diagonal_block(layer: Any, params: Any, cache: Any, delta_out: Array,
                   scale: KfacScale) -> dict[str, Any]:
    """``{"diag"}``: ``(1/M) sum_{k,n} g_{k,n} (.) g_{k,n}`` from the record's per-sample
    gradients of every error column (the exact diagonal of its Fisher block)."""
    grads = jax.vmap(layer.per_sample_grads, in_axes=(None, None, 0))(params, cache,
                                                                      delta_out)
    return {"diag": jax.tree.map(lambda g: jnp.sum(g * g, axis=(0, 1)) / scale.count,
                                 grads)}


def layer_factors(layer: Any, params: Any, cache: Any, errors: Any, scale: KfacScale,
                  where: str) -> Any:
    """A layer's K-FAC factors from its kept errors ``(k, B, ...)`` (its output errors, or
    what its ``backward_kept`` kept): ``{}`` without parameters, the record's own
    ``kfac_factors`` where it has one, else the Kronecker block of its ``kfac_inputs`` and
    ``pre_activation_error`` (else a LayerError naming ``where``)."""
    if not jax.tree.leaves(params):
        return {}
    if hasattr(layer, "kfac_factors"):
        return layer.kfac_factors(params, cache, errors, scale, where)
    delta_out = errors
    capability(layer, "kfac_inputs", where, "K-FAC")
    capability(layer, "pre_activation_error", where, "K-FAC")
    delta = jax.vmap(layer.pre_activation_error, in_axes=(None, 0))(cache, delta_out)
    return kronecker_block(layer.kfac_inputs(cache)[0], delta, scale, bias="b" in params)
