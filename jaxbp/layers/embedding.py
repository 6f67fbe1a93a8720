"""Embedding: integer tokens to vectors, a table lookup; its backward a scatter-add.

.. math::
    a_{n,t} = E[x_{n,t}] + P[t], \\qquad
    \\frac{\\partial C}{\\partial E[v]} = \\sum_{n,t:\\, x_{n,t} = v} \\delta_{n,t}, \\qquad
    \\frac{\\partial C}{\\partial P[t]} = \\sum_n \\delta_{n,t}

(E: (vocab, dim) the token table, P: (positions, dim) the learned positions, its
first T rows used). The tokens are integers: no error passes to the input.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from jaxbp.layers import kfac, precision
from jaxbp.layers.base import TRUNCATED_NORMAL_STD, Shape, register
from jaxbp.types import Array, check_int

EMBEDDING_STD = 0.02
"""The standard deviation of the token and position tables at init (GPT-2's)."""


@register
@dataclasses.dataclass(frozen=True)
class Embedding:
    """Tokens (batch, T) of ints in ``[0, vocab)`` -> (batch, T, dim) vectors.

    Args:
      vocab: the number of distinct tokens (>= 1).
      dim: the vector width (>= 1).
      positions: None, or the length of a learned position table added to every
        sequence (>= T; a sequence of T tokens uses its first T rows).
      activation_dtype: None, or the dtype its output is stored in (``"bfloat16"``); the
        rows are added in the tables' dtype and the errors scattered in it (float32
        master tables).

    Params: ``{"tokens": (vocab, dim)}`` and, with positions, ``{"positions":
    (positions, dim)}``; truncated normals of std 0.02.

    The backward scatters the errors into the rows of the tokens seen
    (``.at[tokens].add``): O(batch T dim) work and no (batch T, vocab) one-hot,
    which a one-hot matmul would form (O(batch T vocab dim)).
    """

    vocab: int
    dim: int
    positions: int | None = None
    takes_tokens: ClassVar[bool] = True
    """Its input is integer tokens: it starts a Network with an integer ``input_dtype``."""
    activation_dtype: DTypeLike | None = None

    def __post_init__(self) -> None:
        precision.check_recipe(self)
        for name in ("vocab", "dim", "positions"):
            object.__setattr__(self, name, check_int(f"Embedding {name}", getattr(self, name),
                                                     1, optional=name == "positions"))

    def output_shape(self, in_shape: Shape) -> Shape:
        if len(in_shape) != 1:
            raise ValueError(f"takes (batch, T) integer tokens but gets samples of shape "
                             f"{in_shape}")
        if self.positions is not None and in_shape[0] > self.positions:
            raise ValueError(f"sequences of {in_shape[0]} tokens are longer than its "
                             f"position table ({self.positions} rows)")
        return (in_shape[0], self.dim)

    def init(self, key: Array, in_shape: Shape, dtype: Any) -> dict[str, Array]:
        def table(k: Array, rows: int) -> Array:
            unit = jax.random.truncated_normal(k, -2.0, 2.0, (rows, self.dim), jnp.float32)
            return (unit / TRUNCATED_NORMAL_STD * EMBEDDING_STD).astype(dtype)

        k_tokens, k_positions = jax.random.split(key)
        params = {"tokens": table(k_tokens, self.vocab)}
        if self.positions is not None:
            params["positions"] = table(k_positions, self.positions)
        return params

    def forward(self, params: dict[str, Array], x: Array) -> tuple[Array, Array]:
        out = jnp.take(params["tokens"], x, axis=0)                    # E[x_{n,t}]
        if "positions" in params:
            out = out + params["positions"][:x.shape[1]]               # + P[t]
        return precision.to_activation(out, self.activation_dtype), x

    def backward(self, params: dict[str, Array], tokens: Array, delta_out: Array,
                 need_input: bool = True) -> tuple[None, dict[str, Array]]:
        table = params["tokens"]
        delta_out = delta_out.astype(table.dtype)
        grads = {"tokens": jnp.zeros_like(table).at[tokens].add(delta_out)}  # scatter-add
        if "positions" in params:
            grads["positions"] = jnp.zeros_like(params["positions"]).at[:tokens.shape[1]].set(
                jnp.sum(delta_out, axis=0))                            # sum_n delta_{n,t}
        return None, grads

    def per_sample_grads(self, params: dict[str, Array], tokens: Array,
                         delta_out: Array) -> dict[str, Array]:
        table = params["tokens"]
        delta_out = delta_out.astype(table.dtype)
        rows = jax.vmap(lambda tok, d: jnp.zeros_like(table).at[tok].add(d))(tokens, delta_out)
        grads = {"tokens": rows}
        if "positions" in params:
            positions = jnp.zeros((tokens.shape[0], *params["positions"].shape), table.dtype)
            grads["positions"] = positions.at[:, :tokens.shape[1]].set(delta_out)
        return grads

    def feedback_shape(self, in_shape: Shape) -> None:
        """No feedback: tokens take no error (the feedback rules start above it)."""
        return None

    def kfac_factors(self, params: dict[str, Array], tokens: Array, delta_out: Array,
                     scale: kfac.KfacScale, where: str) -> dict[str, Any]:
        """A table block per table (:func:`jaxbp.layers.kfac.table_block`): a one-hot input
        makes A diagonal, how often each token (each position) is read; G from the errors
        at the output, which both tables share."""
        delta = delta_out.astype(params["tokens"].dtype)
        factors = {"tokens": kfac.table_block(tokens, self.vocab, delta, scale)}
        if "positions" in params:
            steps = jnp.broadcast_to(jnp.arange(tokens.shape[1]), tokens.shape)
            factors["positions"] = kfac.table_block(steps, params["positions"].shape[0],
                                                    delta, scale)
        return factors

    def per_sample_sq_norms(self, params: dict[str, Array], tokens: Array,
                            delta_out: Array) -> Array:
        """``sum_{t,s} [x_t = x_s] <delta_t, delta_s>`` (token-equality Gram) for the table,
        ``sum_t ||delta_t||^2`` for the positions: no (vocab, dim) table per sample."""
        delta = delta_out.astype(params["tokens"].dtype)
        same = (tokens[:, :, None] == tokens[:, None, :]).astype(delta.dtype)
        gram = jnp.einsum("ntd,nsd->nts", delta, delta)
        norms = jnp.einsum("nts,nts->n", same, gram)
        if "positions" in params:
            norms = norms + jnp.sum(delta * delta, axis=(1, 2))
        return norms
