"""The GPT case of the training-step benchmark, its model FLOPs counted by hand.

Per token, with N the parameters that multiply (each block's four attention
projections ``4 d^2`` and its MLP ``2 r d^2``, ``3 r d^2`` with SwiGLU's gate, the head
``d V``; the embedding is a lookup, biases, norms and rotary turns are elementwise), L
blocks and T positions (PaLM's convention, Chowdhery et al. 2022, appendix B):

.. math::
    \\text{FLOPs per token} = 6 N + 12 L T d

``2 N`` forward and ``4 N`` backward (input error and weight gradient) for the
products with weights, and ``4 L T d`` forward for attention's ``Q K^T`` and ``P V``
(each ``2 T d`` per token per block: the full T x T product, the causal mask
applied to it, as the step computes it), twice that backward (``dV, dP, dQ, dK``).
MFU is these FLOPs per second over the datasheet peak.
"""

from __future__ import annotations

import dataclasses

from jaxbp.bench.roof import MatmulShape, step_matmul_shapes
from jaxbp.layers.precision import RECIPES
from jaxbp.models import gpt
from jaxbp.network import Network

STYLES = {"gpt2": {}, "llama": {"norm": "rms", "positions": "rope", "mlp": "swiglu",
                                "bias": False}}
"""The GPT styles of the bench, as :func:`jaxbp.models.gpt`'s options."""


@dataclasses.dataclass(frozen=True)
class GptCase:
    """A GPT training step (:func:`jaxbp.models.gpt`, mlp_ratio 4) on (batch, seq_len)
    tokens in one of the :data:`RECIPES`; softmax cross-entropy over every token.
    ``style``: ``"gpt2"`` (LayerNorm, learned positions, gelu MLP) or ``"llama"``
    (RMSNorm, rotary attention, SwiGLU, no biases: :data:`STYLES`). ``tie_embedding``:
    the head reads the token table (GPT-2's): the same products, so the same model
    FLOPs (the table multiplies in the head in place of a weight of its own)."""

    dim: int
    depth: int
    heads: int
    seq_len: int
    batch: int
    vocab: int = 65
    precision: str = "float32"
    loss: str = "softmax_cross_entropy"
    mlp_ratio: int = 4
    style: str = "gpt2"
    tie_embedding: bool = False

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.seq_len,)

    @property
    def n_out(self) -> int:
        return self.vocab

    @property
    def tokens(self) -> int:
        """Tokens per step, batch x seq_len."""
        return self.batch * self.seq_len

    def net(self) -> Network:
        return gpt(self.vocab, self.dim, self.depth, self.heads, self.seq_len, self.mlp_ratio,
                   tie_embedding=self.tie_embedding, **STYLES[self.style],
                   **RECIPES[self.precision])

    @property
    def matmul_params(self) -> int:
        """N: the parameters that multiply (projections, MLP, head)."""
        d, mlp_weights = self.dim, 3 if STYLES[self.style].get("mlp") == "swiglu" else 2
        return self.depth * (4 + mlp_weights * self.mlp_ratio) * d * d + d * self.vocab

    def flops(self) -> dict[str, int]:
        """Model FLOPs of one step, ``tokens (6 N + 12 L T d)``, by kind."""
        forward = self.tokens * (2 * self.matmul_params + 4 * self.depth * self.seq_len * self.dim)
        return {"forward": forward, "weight_grad": forward, "input_error": forward,
                "backward": 2 * forward, "total": 3 * forward}

    def roof_shapes(self) -> tuple[MatmulShape, ...]:
        """The MLP's first product's three matmuls, (B T) x d x (r d): the widest layer."""
        return step_matmul_shapes(self.tokens, self.dim, self.mlp_ratio * self.dim)

    @property
    def gflop(self) -> float:
        return self.flops()["total"] / 1e9

    def label(self, arithmetic: str | None = None) -> str:
        """``GPT d128 L2 H4 T64 B16 float32`` (``LLaMA-style GPT ...`` in that style,
        ``tied GPT ...`` with a tied embedding)."""
        ran = f" ({arithmetic})" if arithmetic else ""
        style = "LLaMA-style " if self.style == "llama" else ""
        style += "tied " * self.tie_embedding
        return (f"{style}GPT d{self.dim} L{self.depth} H{self.heads} T{self.seq_len} "
                f"B{self.batch} {self.precision}{ran}")
