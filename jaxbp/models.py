"""Model presets as :class:`jaxbp.Network` s of layer records: the digits CNN and a GPT,
and text generation from a GPT.

Scripts, the command line and the tests build their models here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.typing import DTypeLike

from jaxbp import input_checks, layers, network, value_checks
from jaxbp.layers.chain import records
from jaxbp.layers.dropout import check_rate
from jaxbp.network import Network
from jaxbp.types import Array, check_bool, check_int

NORMS = {"layer": layers.LayerNorm, "rms": layers.RMSNorm}
"""The norms :func:`gpt` takes by name."""

POSITIONS = ("learned", "rope")
"""How :func:`gpt` tells positions apart: a learned table added to the token embedding
(GPT-2), or rotary embeddings in every attention (LLaMA)."""

MLPS = ("gelu", "swiglu")
"""The feed-forward halves :func:`gpt` takes: ``Dense(h, gelu) -> Dense(d)`` (GPT-2), or
``GatedDense(h, silu) -> Dense(d)`` (SwiGLU, LLaMA)."""


def cnn(side: int, n_out: int, activation: str = "relu", output_activation: str = "identity",
        loss: str = "softmax_cross_entropy", compute_dtype: DTypeLike | None = None,
        activation_dtype: DTypeLike | None = None) -> Network:
    """The digits CNN on (side, side, 1) images.

    Conv 3x3 (16, act) -> MaxPool 2 -> Conv 3x3 (32, act) -> MaxPool 2 -> Flatten ->
    Dense 64 (act) -> Dense n_out (output_activation). ``compute_dtype``,
    ``activation_dtype``: the numerical recipe of every layer (:class:`jaxbp.Network`'s
    network-wide defaults).
    """
    return Network((layers.Conv2D(16, (3, 3), activation=activation), layers.MaxPool(2),
                    layers.Conv2D(32, (3, 3), activation=activation), layers.MaxPool(2),
                    layers.Flatten(), layers.Dense(64, activation),
                    layers.Dense(n_out, output_activation)),
                   (side, side, 1), loss, compute_dtype=compute_dtype,
                   activation_dtype=activation_dtype)


def gpt(vocab: int, dim: int, depth: int, heads: int, seq_len: int, mlp_ratio: int = 4,
        norm: str = "layer", dtype: DTypeLike = "float32", causal: bool = True,
        compute_dtype: DTypeLike | None = None, activation_dtype: DTypeLike | None = None,
        attention_block: int | None = None, positions: str = "learned",
        mlp: str = "gelu", kv_heads: int | None = None, bias: bool = True,
        mlp_hidden: int | None = None, tie_embedding: bool = False,
        dropout: float = 0.0) -> Network:
    """A GPT-2-style decoder: tokens (batch, seq_len) -> next-token logits (batch, seq_len,
    vocab), the mean softmax cross-entropy over every token whose target is not -1.

    ``Embedding(vocab, dim, positions=seq_len)``, then ``depth`` pre-norm blocks
    ``x + attn(norm(x))`` and ``x + mlp(norm(x))`` (the MLP ``Dense(mlp_ratio dim,
    gelu) -> Dense(dim)``; causal ``SelfAttention(heads)``), a final norm and a
    ``Dense(vocab)`` head. ``norm``: ``"layer"`` (LayerNorm) or ``"rms"`` (RMSNorm);
    ``causal=False`` lets every token attend to the whole sequence (an encoder).
    ``compute_dtype``, ``activation_dtype``: the numerical recipe of every layer
    (:class:`jaxbp.Network`'s network-wide defaults; ``"bfloat16"`` for both: bf16
    activations, errors and matmul operands, float32 params, softmax and loss).
    ``attention_block``: None (attention keeps its (T, T) softmax for the backward), or
    the keys taken at a time by :class:`jaxbp.layers.SelfAttention`'s blockwise form
    (memory T x block per head, the scores computed twice).
    ``positions``: ``"learned"`` (a (seq_len, dim) table added to the token embedding,
    GPT-2's) or ``"rope"`` (no table; every attention turns Q and K by rotary
    embeddings, LLaMA's; needs an even head width dim / heads). ``mlp``: ``"gelu"``
    (``Dense(mlp_ratio dim, gelu)``) or ``"swiglu"`` (``GatedDense(mlp_ratio dim,
    silu)``, a third weight: LLaMA takes a hidden width of 8 dim / 3 to keep the count,
    ``mlp_hidden``; the default is ``mlp_ratio dim`` whichever). ``norm="rms", positions="rope",
    mlp="swiglu", bias=False`` is a LLaMA-style decoder. ``kv_heads``: None (as many
    key/value heads as heads), or fewer that groups of query heads share (grouped-query
    attention, LLaMA 2-3's; 1: multi-query); it must divide ``heads``. ``bias``: whether
    the matmul layers (attention's projections, the MLP, the head) add biases and
    LayerNorm shifts (GPT-2's; False: LLaMA's, PaLM's, nanoGPT's ``bias=False``;
    RMSNorm has no shift either way). ``mlp_hidden``: None, or the MLP's hidden width in
    place of ``mlp_ratio dim`` (LLaMA's SwiGLU takes about ``8 dim / 3``, so that its
    three weights hold what GPT-2's two hold at ratio 4). ``tie_embedding``: the head's
    weight is the token table transposed (GPT-2's and nanoGPT's tied embedding:
    ``vocab dim`` fewer params; :class:`jaxbp.Network`'s ``tie_embedding``).
    ``dropout``: a rate p > 0 puts ``Dropout(p)`` where GPT-2 has its residual dropout,
    after the embedding and at the end of each block's two branches (``x + drop(attn(
    norm(x)))``; attention's probabilities are not dropped): active in training steps
    only, the identity when evaluating and generating.
    """
    _check_gpt(vocab, dim, depth, heads, seq_len, mlp_ratio, norm, causal, positions, mlp,
               kv_heads, bias, mlp_hidden)
    dropout = check_rate("gpt dropout", dropout)
    make_norm = functools.partial(NORMS[norm], bias=bias) if norm == "layer" else NORMS[norm]
    hidden = (layers.GatedDense if mlp == "swiglu" else layers.Dense)(
        mlp_hidden or int(mlp_ratio) * dim, "silu" if mlp == "swiglu" else "gelu", bias=bias)
    attention = layers.SelfAttention(heads, causal, block=attention_block,
                                     rope=positions == "rope", kv_heads=kv_heads, bias=bias)
    drop = (layers.Dropout(dropout),) if dropout else ()
    block = (layers.Residual((make_norm(), attention, *drop)),
             layers.Residual((make_norm(), hidden, layers.Dense(dim, bias=bias), *drop)))
    table = seq_len if positions == "learned" else None
    return Network((layers.Embedding(vocab, dim, positions=table), *drop, *block * int(depth),
                    make_norm(), layers.Dense(vocab, bias=bias)),
                   input_shape=(seq_len,), loss="softmax_cross_entropy", dtype=dtype,
                   input_dtype="int32", compute_dtype=compute_dtype,
                   activation_dtype=activation_dtype,
                   tie_embedding=check_bool("gpt tie_embedding", tie_embedding))


def _check_gpt(vocab: Any, dim: Any, depth: Any, heads: Any, seq_len: Any, mlp_ratio: Any,
               norm: Any, causal: Any, positions: Any, mlp: Any, kv_heads: Any, bias: Any,
               mlp_hidden: Any) -> None:
    """:func:`gpt`'s arguments, each error naming the argument, what it must be and what
    came."""
    for name, value in (("vocab", vocab), ("dim", dim), ("depth", depth), ("heads", heads),
                        ("seq_len", seq_len), ("mlp_ratio", mlp_ratio)):
        check_int(f"gpt {name}", value, 1)
    check_int("gpt mlp_hidden", mlp_hidden, 1, optional=True)
    if dim % heads:
        raise ValueError(f"gpt heads must divide dim: {heads} heads do not divide dim = {dim}")
    check_bool("gpt causal", causal)
    check_bool("gpt bias", bias)
    if not isinstance(norm, str) or norm not in NORMS:
        raise ValueError(f"gpt norm must be one of {sorted(NORMS)}, got {norm!r}")
    for name, value, allowed in (("positions", positions, POSITIONS), ("mlp", mlp, MLPS)):
        if not isinstance(value, str) or value not in allowed:
            raise ValueError(f"gpt {name} must be one of {list(allowed)}, got {value!r}")
    if check_int("gpt kv_heads", kv_heads, 1, optional=True) is not None \
            and heads % kv_heads:
        raise ValueError(f"gpt kv_heads must divide heads: {kv_heads} key/value heads "
                         f"cannot serve {heads} query heads in equal groups")
    if positions == "rope" and (dim // heads) % 2:
        raise ValueError(f"gpt positions='rope' turns pairs of a head's features: the head "
                         f"width dim / heads = {dim // heads} must be even")


@functools.partial(jax.jit, static_argnums=0)
def _logits_at(net: Network, params: Any, window: Array, position: Array) -> Array:
    """The logits a^L at ``position`` of one window of tokens (seq_len,)."""
    return network.forward(net, params, window[None])[0][0, position]


def generate(net: Network, params: Any, prompt: Sequence[int] | np.ndarray, length: int,
             key: Array | None = None, temperature: float = 0.0,
             top_k: int | None = None) -> list[int]:
    """``length`` tokens continuing ``prompt`` (ids), one jitted forward per token.

    Greedy (argmax) at ``temperature`` 0, else drawn from softmax(logits / temperature)
    with ``key``; ``top_k``: drawn from the k largest logits only (the others' probability
    0; ties with the k-th kept; k >= vocab: from all). The window is the last ``seq_len``
    tokens, right-padded while shorter: in a causal model the padding after a position
    does not reach it.
    """
    if not isinstance(net, Network) or value_checks.token_vocab(net) is None:
        first = f" whose first layer is a {type(net.layers[0]).__name__}" \
            if isinstance(net, Network) else ""
        raise TypeError(f"net must be a Network that takes tokens (an Embedding first, as "
                        f"models.gpt builds), got a {type(net).__name__}{first}")
    seq_len = net.input_shape[0]
    input_checks.check_params(net, params)
    _check_causal(net.layers, "layers")
    tokens = _prompt_tokens(prompt, net.n_out)
    length = check_int("length", length, 0)
    if not (isinstance(temperature, int | float) and math.isfinite(temperature)
            and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if key is not None:
        input_checks.check_key("key", key)
    if temperature > 0 and key is None:
        raise ValueError("a temperature > 0 samples: pass a PRNG key")
    if temperature == 0 and key is not None:   # would be read by nothing
        raise ValueError("key is used only to sample (temperature > 0); at temperature 0 "
                         "generate is greedy and draws nothing: give a temperature, or leave "
                         "key out")
    top_k = check_int("top_k", top_k, 1, optional=True)
    if top_k is not None and temperature == 0:
        raise ValueError("top_k limits what is sampled (temperature > 0); at temperature 0 "
                         "generate is greedy (top_k=1 already): give a temperature, or leave "
                         "top_k out")
    start = len(tokens)
    for _ in range(length):
        window = tokens[-seq_len:]
        padded = jnp.asarray(window + [0] * (seq_len - len(window)), jnp.int32)
        logits = _logits_at(net, params, padded, jnp.int32(len(window) - 1))
        if temperature > 0:
            key, draw = jax.random.split(key)
            if top_k is not None and top_k < logits.shape[-1]:
                # the k-th largest logit is the floor; below it, probability 0
                floor = jax.lax.top_k(logits, top_k)[0][-1]
                logits = jnp.where(logits >= floor, logits, -jnp.inf)
            tokens.append(int(jax.random.categorical(draw, logits / temperature)))
        else:
            tokens.append(int(jnp.argmax(logits)))
    return tokens[start:]


def _check_causal(chain: Sequence[Any], where: str) -> None:
    """Every attention of the chain (inside Residuals too) causal: the window is right-padded
    while shorter than seq_len, and a position that sees the ones after it would read the
    padding (and a model trained to see the future has nothing to continue)."""
    for place, layer in records(chain, where):
        if getattr(layer, "causal", True) is False:
            raise ValueError(f"generate needs causal attention, but {place} "
                             f"({type(layer).__name__}) has causal=False: each position would "
                             f"see the padding after it")


def _prompt_tokens(prompt: Any, vocab: int) -> list[int]:
    """The prompt as a list of token ids: a sequence or 1-D array of ints in [0, vocab)
    (an array too, as ``TextDataset.encode`` returns; not floats, not nested)."""
    if isinstance(prompt, str):
        raise TypeError(f"prompt must be token ids, got the str {prompt[:20]!r}; encode it "
                        f"first: text.encode(...) of jaxbp.data.load_text")
    ids = np.asarray(prompt)
    if ids.size == 0:
        raise ValueError("prompt must hold at least one token")
    if ids.ndim != 1:
        raise ValueError(f"prompt must be a 1-D sequence of token ids, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise TypeError(f"prompt must hold integer token ids, got {ids.dtype}")
    bad = ids[(ids < 0) | (ids >= vocab)]
    if bad.size:
        raise ValueError(f"prompt must hold tokens in [0, {vocab}), got {bad[:5].tolist()}")
    return ids.tolist()
