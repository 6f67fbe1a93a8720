"""Multi-head self-attention, causal or not, with its backward written out by hand.

Per head h (``d_h = d / heads``), with ``Q = x W_q + b_q`` (K, V alike) split into
heads and M the mask (0 on and below the diagonal, -inf above it when causal):

.. math::
    S = Q K^\\top / \\sqrt{d_h} + M, \\quad P = \\mathrm{softmax}(S), \\quad O = P V,
    \\quad a = O W_o + b_o

    dO = \\delta W_o^\\top, \\quad dV = P^\\top dO, \\quad dP = dO\\, V^\\top, \\quad
    dS = P \\odot \\big(dP - \\mathrm{rowsum}(dP \\odot P)\\big)

    dQ = dS\\, K / \\sqrt{d_h}, \\quad dK = dS^\\top Q / \\sqrt{d_h}, \\quad
    \\delta_{in} = dQ\\, W_q^\\top + dK\\, W_k^\\top + dV\\, W_v^\\top

and every projection's gradient is a token-wise Dense's, ``x^T dQ`` (O^T delta for
W_o), its bias the sum of its error over batch and tokens. The masked positions
have P = 0, so dS is 0 there: they get no error. With ``rope``, Q and K are turned by
their positions' rotations before the scores (:mod:`jaxbp.layers.rotary`) and dQ, dK
turned back, ``R_t^T dQ``, before the projections' rules. With ``kv_heads`` below
``heads`` (grouped-query attention; 1: multi-query), each key/value head serves a group
of ``heads / kv_heads`` query heads, and its dK, dV are the sums of the errors its group's
heads send it. Memory: P is (batch, heads, T, T);
with ``block`` set, the keys are taken that many at a time and P is never formed
(:mod:`jaxbp.layers.blockwise_attention`: the forward keeps each row's log-sum-exp,
the backward recomputes P block by block).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from jaxbp.layers import blockwise_attention, kfac, precision, rotary, token_grads
from jaxbp.layers.base import (
    Shape,
    named_weights_transposed,
    register,
    repr_beside_defaults,
    variance_init,
    with_named_feedback,
)
from jaxbp.layers.dense import affine, affine_grads, affine_input_error
from jaxbp.types import Array, check_bool, check_int

_PROJECTIONS = ("q", "k", "v", "o")


def _split(x: Array, heads: int) -> Array:
    """(B, T, d) -> (B, heads, T, d_h)."""
    b, t, d = x.shape
    return x.reshape(b, t, heads, d // heads).transpose(0, 2, 1, 3)


def _merge(x: Array) -> Array:
    """(B, heads, T, d_h) -> (B, T, d)."""
    b, h, t, dh = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b, t, h * dh)


@register
@dataclasses.dataclass(frozen=True)
class SelfAttention:
    """Self-attention on (batch, T, d): softmax(Q K^T / sqrt(d_h) [+ causal mask]) V, then W_o.

    Args:
      heads: the number of heads (>= 1; must divide d).
      causal: each token attends to itself and the tokens before it only (default).
      compute_dtype, activation_dtype: the numerical recipe (:mod:`jaxbp.layers.precision`),
        as Dense's: with ``activation_dtype="bfloat16"`` the input, Q, K, V, O, the output
        and the errors passed on are stored in bf16 and every matmul takes bf16 operands;
        the scores S, the softmax P and its backward (dP, dS) run in the params' dtype
        (float32: a softmax in bf16 loses the small probabilities), P and dS rounded to
        the operand dtype where they enter a matmul; weight gradients as Dense's.
      block: None (the plain form, which keeps P: (batch, heads, T, T)), or the number
        of keys taken at a time (an int >= 1): the forward keeps (batch, heads, T)
        log-sum-exps instead of P and the backward recomputes P one (T, block) slice
        at a time, so memory grows as T block instead of T^2 (the same gradient to
        rounding; more work: the scores are computed twice).
      rope: rotary position embedding (RoFormer; LLaMA's): each head's Q and K turned
        by their positions' angles before the scores (:mod:`jaxbp.layers.rotary`), so
        attention sees the tokens' distances; needs an even head width d / heads.
      rope_base: the base of the rotary frequencies ``base^(-2i/d_h)`` (a number > 0;
        10000 as RoFormer and LLaMA 1-2; LLaMA 3 takes 500000).
      kv_heads: None (one key/value head per query head), or fewer key/value heads that
        groups of query heads share (an int >= 1 dividing ``heads``: grouped-query
        attention, Ainslie et al. 2023, as LLaMA 2-3 and Mistral; 1 is multi-query).
      bias: whether the four projections add biases (default True, GPT-2's; False:
        LLaMA's).

    Params: ``{"wq", "wo": (d, d), "wk", "wv": (d, kv_heads d_h), "bq", "bo": (d,),
    "bk", "bv": (kv_heads d_h,)}``; the weights Glorot truncated normals, the biases 0
    (none without ``bias``).
    """

    heads: int
    causal: bool = True
    compute_dtype: DTypeLike | None = None
    activation_dtype: DTypeLike | None = None
    block: int | None = None
    rope: bool = False
    rope_base: float = 10000.0
    kv_heads: int | None = None
    bias: bool = True

    def __post_init__(self) -> None:
        precision.check_recipe(self)
        object.__setattr__(self, "heads", check_int("SelfAttention heads", self.heads, 1))
        object.__setattr__(self, "causal", check_bool("SelfAttention causal", self.causal))
        object.__setattr__(self, "block", check_int("SelfAttention block", self.block, 1,
                                                    optional=True))
        object.__setattr__(self, "rope", check_bool("SelfAttention rope", self.rope))
        object.__setattr__(self, "bias", check_bool("SelfAttention bias", self.bias))
        base = self.rope_base
        if isinstance(base, bool) or not isinstance(base, (int, float)) \
                or not math.isfinite(base) or base <= 0:
            raise ValueError(f"SelfAttention rope_base must be a finite number > 0, "
                             f"got {base!r}")
        object.__setattr__(self, "rope_base", float(base))
        kv = check_int("SelfAttention kv_heads", self.kv_heads, 1, optional=True)
        if kv is not None and self.heads % kv:
            raise ValueError(f"SelfAttention kv_heads = {kv} must divide heads = "
                             f"{self.heads}: each key/value head serves a group of query "
                             f"heads")
        object.__setattr__(self, "kv_heads", kv)

    def __repr__(self) -> str:
        """The fields, rope's two, kv_heads and bias only when set (a GPT saved before
        them reads the same)."""
        return repr_beside_defaults(self, ("rope", "rope_base", "kv_heads", "bias"))

    @property
    def _groups(self) -> tuple[int, int]:
        """``(key/value heads, query heads each serves)``."""
        kv = self.kv_heads or self.heads
        return kv, self.heads // kv

    def _widths(self, d: int) -> dict[str, int]:
        """Each projection's output width: d, and ``kv_heads d_h`` for k and v."""
        kv = d // self.heads * self._groups[0]
        return {"q": d, "k": kv, "v": kv, "o": d}

    def _shared(self, a: Array) -> Array:
        """(B, kv_heads, T, d_h) -> (B, heads, T, d_h): each query head's key/value head."""
        group = self._groups[1]
        return a if group == 1 else jnp.repeat(a, group, axis=1)

    def _grouped(self, e: Array) -> Array:
        """(B, heads, T, d_h) -> (B, kv_heads, T, d_h): the errors a key/value head gets,
        summed over the query heads of its group (the transpose of :meth:`_shared`)."""
        kv, group = self._groups
        if group == 1:
            return e
        b, _, t, dh = e.shape
        return jnp.sum(e.reshape(b, kv, group, t, dh), axis=2)

    def output_shape(self, in_shape: Shape) -> Shape:
        if len(in_shape) != 2:
            raise ValueError(f"takes (batch, T, d) sequences but gets samples of shape "
                             f"{in_shape}")
        if in_shape[1] % self.heads:
            raise ValueError(f"its {self.heads} heads do not divide the width d = "
                             f"{in_shape[1]}")
        if self.rope and (in_shape[1] // self.heads) % 2:
            raise ValueError(f"rope turns pairs of a head's features, but the head width "
                             f"d / heads = {in_shape[1] // self.heads} is odd")
        return in_shape

    def init(self, key: Array, in_shape: Shape, dtype: Any) -> dict[str, Array]:
        d = in_shape[-1]
        widths = self._widths(d)
        keys = jax.random.split(key, len(_PROJECTIONS))
        params = {f"w{p}": variance_init(k, (d, widths[p]), d, widths[p], False, dtype)
                  for p, k in zip(_PROJECTIONS, keys)}
        if self.bias:
            params.update({f"b{p}": jnp.zeros((widths[p],), dtype) for p in _PROJECTIONS})
        return params

    def _scores(self, q: Array, k: Array, dtype: Any) -> Array:
        """S = Q K^T / sqrt(d_h) in ``dtype``, -inf above the diagonal when causal:
        (B, heads, T, T)."""
        s = self._heads_dot("bhtd,bhsd->bhts", q, k, dtype) / math.sqrt(q.shape[-1])
        if not self.causal:
            return s
        t = q.shape[2]
        return jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -jnp.inf)

    def _heads_dot(self, spec: str, a: Array, b: Array, out: Any) -> Array:
        """A per-head product in the recipe: operands rounded to its operand dtype, the
        result in ``out``."""
        a, b = precision.low_operands(self, a, b)
        return jnp.einsum(spec, a, b, preferred_element_type=precision.preferred(out, a, b))

    def forward(self, params: dict[str, Array], x: Array) -> tuple[Array, tuple[Array, ...]]:
        x = precision.to_activation(x.astype(jnp.result_type(x, params["wq"])),
                                    self.activation_dtype)
        out = precision.output_dtype(self, jnp.result_type(x, params["wq"]))
        q = _split(affine(self, params, x, "q", out), self.heads)      # x W_q + b_q
        k, v = (_split(affine(self, params, x, p, out), self._groups[0]) for p in "kv")
        if self.rope:                                             # R_t Q, R_t K
            q, k = (rotary.rotate(a, *self._angles(q, params)) for a in (q, k))
        k_all, v_all = self._shared(k), self._shared(v)     # each query head's K and V
        if self.block is not None:                   # O and each row's lse, P never formed
            o, kept = blockwise_attention.forward(self._heads_dot, q, k_all, v_all,
                                                  self.block, self.causal, out,
                                                  params["wq"].dtype)
        else:
            s = self._scores(q, k_all, params["wq"].dtype)
            e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
            kept = e / jnp.sum(e, axis=-1, keepdims=True)             # P = softmax(S)
            o = self._heads_dot("bhts,bhsd->bhtd", kept, v_all, out)   # O = P V
        o = _merge(o)
        return affine(self, params, o, "o", out), (x, q, k, v, kept, o)

    def _angles(self, q: Array, params: dict[str, Array]) -> tuple[Array, Array]:
        """RoPE's ``(cos, sin)`` for q's T positions and head width, in the params' dtype
        or float32 if that is wider (bf16 angles ``t f`` are off by a tenth of their
        cosine at t in the hundreds: the turn is computed in float32, as LLaMA's)."""
        dtype = jnp.promote_types(params["wq"].dtype, jnp.float32)
        return rotary.angles(q.shape[2], q.shape[3], self.rope_base, dtype)

    def _turned_back(self, params: dict[str, Array], q: Array, d_q: Array, d_k: Array,
                     d_v: Array, delta: Array) -> dict[str, Array]:
        """The projections' errors, (B, T, width): dK and dV summed over each key/value
        head's group; with rope, dQ and dK (at the turned Q, K) turned back, ``R_t^T dQ``."""
        d_k, d_v = self._grouped(d_k), self._grouped(d_v)
        if self.rope:
            d_q, d_k = (rotary.rotate_back(e, *self._angles(q, params)) for e in (d_q, d_k))
        return {"q": _merge(d_q), "k": _merge(d_k), "v": _merge(d_v), "o": delta}

    def _projection_errors(self, params: dict[str, Array], cache: tuple[Array, ...],
                           delta: Array) -> dict[str, Array]:
        """The error at each projection's output, (B, T, d): dQ, dK, dV and delta itself."""
        _, q, k, v, prob, o = cache          # prob: P, or each row's lse in the blockwise form
        k, v = self._shared(k), self._shared(v)
        delta = precision.to_activation(delta, self.activation_dtype)
        out = precision.output_dtype(self, jnp.result_type(delta, params["wo"]))
        d_o = _split(precision.dot(self, delta, params["wo"], out, transpose_b=True),
                     self.heads)                                       # dO = delta W_o^T
        if self.block is not None:
            d_q, d_k, d_v = blockwise_attention.backward(
                self._heads_dot, q, k, v, _split(o, self.heads), prob, d_o, self.block,
                self.causal, out, params["wq"].dtype)
            return self._turned_back(params, q, d_q, d_k, d_v, delta)
        d_v = self._heads_dot("bhts,bhtd->bhsd", prob, d_o, out)       # dV = P^T dO
        d_p = self._heads_dot("bhtd,bhsd->bhts", d_o, v, prob.dtype)   # dP = dO V^T
        d_s = prob * (d_p - jnp.sum(d_p * prob, axis=-1, keepdims=True))
        scale = 1 / math.sqrt(q.shape[-1])
        d_q = self._heads_dot("bhts,bhsd->bhtd", d_s, k, out) * scale  # dQ = dS K / sqrt(d_h)
        d_k = self._heads_dot("bhts,bhtd->bhsd", d_s, q, out) * scale  # dK = dS^T Q / sqrt(d_h)
        return self._turned_back(params, q, d_q, d_k, d_v, delta)

    def _projection_inputs(self, cache: tuple[Array, ...]) -> dict[str, Array]:
        x, o = cache[0], cache[-1]
        return {"q": x, "k": x, "v": x, "o": o}

    def backward(self, params: dict[str, Array], cache: tuple[Array, ...], delta_out: Array,
                 need_input: bool = True) -> tuple[Array | None, dict[str, Array]]:
        return self.backward_kept(params, cache, delta_out, need_input)[:2]

    def backward_kept(self, params: dict[str, Array], cache: tuple[Array, ...],
                      delta_out: Array, need_input: bool = True
                      ) -> tuple[Array | None, dict[str, Array], dict[str, Array]]:
        """The backward, and the errors at the four projections (dQ, dK, dV, delta) it
        formed on the way: what :meth:`kfac_factors` reads."""
        errors = self._projection_errors(params, cache, delta_out.astype(params["wq"].dtype))
        grads = affine_grads(self, self._projection_inputs(cache), errors,
                             params["wq"].dtype)                       # x^T dQ, O^T delta
        if not need_input:
            return None, grads, errors
        return affine_input_error(self, params, errors, "qkv"), grads, errors

    def feedback_shape(self, in_shape: Shape) -> dict[str, Shape]:
        """A feedback B in each projection's W^T place, ``{"q", "k", "v", "o"}: (width,
        d)`` (d, or ``kv_heads d_h`` for k and v): B_o carries delta to the heads (dO),
        B_q, B_k, B_v carry dQ, dK, dV to the input; the softmax backward between them
        stays exact."""
        d = in_shape[-1]
        return {p: (width, d) for p, width in self._widths(d).items()}

    def feedback_params(self, params: dict[str, Array],
                        feedback: dict[str, Array]) -> dict[str, Array]:
        """The params the backward reads: each ``w_p`` replaced by ``B_p^T``."""
        return with_named_feedback(params, feedback)

    def feedback_of(self, params: dict[str, Array], in_shape: Shape) -> dict[str, Array]:
        """``{p: W_p^T}``: the feedback that is backprop."""
        return named_weights_transposed(params, _PROJECTIONS)

    def kfac_factors(self, params: dict[str, Array], cache: tuple[Array, ...],
                     errors: dict[str, Array], scale: kfac.KfacScale, where: str
                     ) -> dict[str, Any]:
        """A Kronecker block per projection (:func:`jaxbp.layers.kfac.kronecker_block`),
        ``{"q", "k", "v", "o"}``: q, k and v read x, o reads O; their errors ``(k, B, T, d)``
        are dQ, dK, dV and delta as :meth:`backward_kept` kept them (the softmax backward
        exact for every error column)."""
        inputs = self._projection_inputs(cache)
        return {p: kfac.kronecker_block(inputs[p], errors[p], scale, self.bias)
                for p in _PROJECTIONS}

    def _in_params_dtype(self, params: dict[str, Array], cache: tuple[Array, ...],
                         delta_out: Array) -> tuple[dict[str, Array], dict[str, Array]]:
        """The projections' inputs and errors in the params' dtype: per-sample quantities
        are formed there, whatever the recipe (as Dense's)."""
        dtype = params["wq"].dtype
        errors = self._projection_errors(params, cache, delta_out.astype(dtype))
        cast = {p: e.astype(dtype) for p, e in errors.items()}
        return {p: x.astype(dtype) for p, x in self._projection_inputs(cache).items()}, cast

    def per_sample_grads(self, params: dict[str, Array], cache: tuple[Array, ...],
                         delta_out: Array) -> dict[str, Array]:
        return token_grads.projections_grads(*self._in_params_dtype(params, cache, delta_out),
                                             self.bias)

    def per_sample_sq_norms(self, params: dict[str, Array], cache: tuple[Array, ...],
                            delta_out: Array) -> Array:
        return token_grads.projections_sq_norms(
            *self._in_params_dtype(params, cache, delta_out), self.bias)

    def per_sample_sq_norms_and_sum(self, params: dict[str, Array], cache: tuple[Array, ...],
                                    delta_out: Array) -> tuple[Array, Any]:
        """``(B,)`` squared norms over the four projections and ``weights -> sum_i w_i g_i``:
        each projection a token-wise weight (input x or O, error dQ, dK, dV or delta) by the
        routes of :mod:`jaxbp.layers.token_grads`; the softmax backward runs once."""
        return token_grads.projections_sq_norms_and_sum(
            *self._in_params_dtype(params, cache, delta_out), self.bias)
