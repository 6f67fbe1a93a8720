"""Attention over key blocks: the softmax of a whole row without its (T, T) matrix.

The plain form keeps P (batch, heads, T, T) for the backward. Here the keys are taken
``block`` at a time (FlashAttention's order of work, written with ``lax.scan``), and
the forward keeps, per query row, only ``lse = log sum_s exp(S_ts)``:

.. math::
    m^{(j)} = \\max(m^{(j-1)}, \\max_{s \\in j} S_{ts}), \\quad
    \\ell^{(j)} = e^{m^{(j-1)} - m^{(j)}} \\ell^{(j-1)} + \\sum_{s \\in j} e^{S_{ts} - m^{(j)}}

    A^{(j)} = e^{m^{(j-1)} - m^{(j)}} A^{(j-1)} + \\sum_{s \\in j} e^{S_{ts} - m^{(j)}} V_s,
    \\quad O = A / \\ell, \\quad \\mathrm{lse} = m + \\log \\ell

The backward recomputes each block's ``P_j = exp(S_j - lse)`` and runs the plain
backward on it, with ``rowsum(dP * P) = rowsum(dO * O)`` (since ``O = P V``):

.. math::
    dV_j = P_j^\\top dO, \\quad dS_j = P_j \\odot (dO\\, V_j^\\top - D), \\quad
    D = \\mathrm{rowsum}(dO \\odot O)

    dQ = \\sum_j dS_j K_j / \\sqrt{d_h}, \\quad dK_j = dS_j^\\top Q / \\sqrt{d_h}

Memory: (batch, heads, T, block) scores at a time, (batch, heads, T) kept. Masked
positions (causal, and the padding of T to whole blocks) have P = 0: no error.
Shapes: q, k, v, dO are (batch, heads, T, d_h). ``dot(spec, a, b, out)`` is the
layer's per-head product in its recipe; scores, softmax and accumulators run in
``acc`` (the params' dtype).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from jaxbp.types import Array

Dot = Callable[[str, Array, Array, Any], Array]


def _key_blocks(a: Array, block: int) -> Array:
    """(B, H, T, d) keys or values -> (n_blocks, B, H, block, d), T padded with zeros
    (a block longer than T is T: one block, no padding)."""
    b, h, t, d = a.shape
    block = min(block, t)
    n = -(-t // block)
    a = jnp.pad(a, ((0, 0), (0, 0), (0, n * block - t), (0, 0)))
    return jnp.moveaxis(a.reshape(b, h, n, block, d), 2, 0)


def _scores(dot: Dot, q: Array, k_j: Array, j: Array, t_keys: int, causal: bool,
            acc: Any) -> Array:
    """S_j = Q K_j^T / sqrt(d_h), -inf at padded keys and (causal) keys after the query:
    (B, H, T, block)."""
    block = k_j.shape[2]
    s = dot("bhtd,bhsd->bhts", q, k_j, acc) / math.sqrt(q.shape[-1])
    key_pos = j * block + jnp.arange(block)
    valid = key_pos[None, :] < t_keys
    if causal:
        valid = valid & (key_pos[None, :] <= jnp.arange(q.shape[2])[:, None])
    return jnp.where(valid, s, -jnp.inf)


def forward(dot: Dot, q: Array, k: Array, v: Array, block: int, causal: bool, out: Any,
            acc: Any) -> tuple[Array, Array]:
    """``(O, lse)``: O = softmax(S) V in ``out`` (B, H, T, d_h), lse (B, H, T) in ``acc``.

    Key block 0 holds key 0, which every query sees, so the running max is finite
    from the first block on (no ``exp(-inf + inf)``)."""
    b, h, t, d = q.shape

    def step(carry: tuple[Array, Array, Array], blocks: tuple[Array, Array, Array]) -> Any:
        m, ell, a = carry
        k_j, v_j, j = blocks
        s = _scores(dot, q, k_j, j, t, causal, acc)
        m_new = jnp.maximum(m, jnp.max(s, axis=-1))
        rescale = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[..., None])
        ell = rescale * ell + jnp.sum(p, axis=-1)
        a = rescale[..., None] * a + dot("bhts,bhsd->bhtd", p, v_j, acc)
        return (m_new, ell, a), None

    start = (jnp.full((b, h, t), -jnp.inf, acc), jnp.zeros((b, h, t), acc),
             jnp.zeros((b, h, t, d), acc))
    k_blocks, v_blocks = _key_blocks(k, block), _key_blocks(v, block)
    (m, ell, a), _ = jax.lax.scan(step, start,
                                  (k_blocks, v_blocks, jnp.arange(k_blocks.shape[0])))
    return (a / ell[..., None]).astype(out), m + jnp.log(ell)


def backward(dot: Dot, q: Array, k: Array, v: Array, o: Array, lse: Array, d_o: Array,
             block: int, causal: bool, out: Any, acc: Any) -> tuple[Array, Array, Array]:
    """``(dQ, dK, dV)`` in ``out``, each (B, H, T, d_h), from dO and the forward's O, lse."""
    t = q.shape[2]
    scale = 1 / math.sqrt(q.shape[-1])
    big_d = jnp.sum(d_o.astype(acc) * o.astype(acc), axis=-1)         # rowsum(dO * O)

    def step(d_q: Array, blocks: tuple[Array, Array, Array]) -> Any:
        k_j, v_j, j = blocks
        p = jnp.exp(_scores(dot, q, k_j, j, t, causal, acc) - lse[..., None])  # P_j
        d_v = dot("bhts,bhtd->bhsd", p, d_o, out)                      # P_j^T dO
        d_p = dot("bhtd,bhsd->bhts", d_o, v_j, acc)                    # dO V_j^T
        d_s = p * (d_p - big_d[..., None])
        d_q = d_q + dot("bhts,bhsd->bhtd", d_s, k_j, acc) * scale      # dS_j K_j / sqrt(d_h)
        d_k = (dot("bhts,bhtd->bhsd", d_s, q, acc) * scale).astype(out)  # dS_j^T Q / sqrt
        return d_q, (d_k, d_v)

    k_blocks, v_blocks = _key_blocks(k, block), _key_blocks(v, block)
    d_q, (d_k, d_v) = jax.lax.scan(step, jnp.zeros(q.shape, acc),
                                   (k_blocks, v_blocks, jnp.arange(k_blocks.shape[0])))

    def unblocked(a: Array) -> Array:                 # (n, B, H, block, d) -> (B, H, T, d)
        n, b, h, blk, d = a.shape
        return jnp.moveaxis(a, 0, 2).reshape(b, h, n * blk, d)[:, :, :t]

    return d_q.astype(out), unblocked(d_k), unblocked(d_v)
