"""The bench suite's cases: MLPs, CNNs and GPTs, each in a numerical recipe, and the presets.

:data:`RECIPES` names the three recipes (``float32``; ``bf16-operands``: float32 master
weights and activations, bfloat16 matmul operands with float32 accumulation; ``bf16``:
activations and errors stored in bfloat16 too). :data:`QUICK` (CPU),
:data:`QUICK_ACCELERATOR` and :data:`FULL` are the presets of ``jaxbp bench``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any

from jaxbp import layers
from jaxbp.bench.gpt import RECIPES, GptCase
from jaxbp.bench.roof import (
    ConvShape,
    MatmulShape,
    step_conv_shapes,
    step_matmul_flops,
    step_matmul_shapes,
)
from jaxbp.losses import get_loss
from jaxbp.mlp import MLP
from jaxbp.network import Network

PRECISIONS = tuple(RECIPES)
LOSSES = ("softmax_cross_entropy", "squared_error")


@dataclasses.dataclass(frozen=True)
class BenchCase:
    """One benchmark case; ``depth`` counts weight layers."""

    width: int
    depth: int
    batch: int
    loss: str = "softmax_cross_entropy"
    precision: str = "float32"
    n_out: int = 10

    @property
    def sizes(self) -> tuple[int, ...]:
        return (self.width,) * self.depth + (self.n_out,)

    def net(self) -> MLP:
        return MLP(self.sizes, "relu", "identity", self.loss, "float32",
                   **RECIPES[self.precision])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.width,)

    def flops(self) -> dict[str, int]:
        """Matmul FLOPs of one step by kind (:func:`jaxbp.bench.roof.step_matmul_flops`)."""
        return step_matmul_flops(self.sizes, self.batch)

    def roof_shapes(self) -> tuple[MatmulShape, ...]:
        """The widest layer's three matmuls, whose measured rates are the roof."""
        width = max(self.sizes[:-1])
        return step_matmul_shapes(self.batch, width, width)

    @property
    def gflop(self) -> float:
        """Matmul GFLOP of one training step."""
        return self.flops()["total"] / 1e9

    def label(self, arithmetic: str | None = None) -> str:
        """``W512 D2 B32 CE float32``, with the arithmetic that ran: ``float32 (tf32)``."""
        loss = "CE" if get_loss(self.loss).integer_labels else "SE"
        ran = f" ({arithmetic})" if arithmetic else ""
        return f"W{self.width} D{self.depth} B{self.batch} {loss} {self.precision}{ran}"


@dataclasses.dataclass(frozen=True)
class ConvCase:
    """A conv case: ``depth`` Conv2D(filters, 3x3, SAME, relu) on (side, side, channels)
    images, a ``pool`` x ``pool`` MaxPool when ``pool`` > 1, Flatten, Dense(10); softmax
    cross-entropy.

    A conv layer's matmul work is an implicit GEMM of ``M = B H W`` rows, ``K = 9 c_in``
    and ``N = filters``, less the taps that fall on SAME padding's zeros (as XLA counts
    them): per spatial axis ``3 side - 2`` of the ``3 side`` (position, tap) pairs touch
    the image, so forward, input error and weight gradient are
    ``2 B (3 side - 2)^2 c_in filters`` FLOPs each (no input error for the first layer).
    """

    side: int
    channels: int
    filters: int
    depth: int
    batch: int
    pool: int = 1
    precision: str = "float32"
    loss: str = "softmax_cross_entropy"
    n_out: int = 10

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.side, self.side, self.channels)

    @property
    def _pooled(self) -> tuple[Any, ...]:
        return (layers.MaxPool(self.pool),) if self.pool > 1 else ()

    def net(self) -> Network:
        convs = tuple(layers.Conv2D(self.filters, (3, 3), activation="relu")
                      for _ in range(self.depth))
        return Network((*convs, *self._pooled, layers.Flatten(), layers.Dense(self.n_out)),
                       self.input_shape, self.loss, **RECIPES[self.precision])

    def flops(self) -> dict[str, int]:
        taps = self.batch * (3 * self.side - 2) ** 2  # (sample, position, tap) on the image
        per_layer = [2 * taps * c_in * self.filters
                     for c_in in (self.channels, *(self.filters,) * (self.depth - 1))]
        pooled_side = self.side // self.pool
        dense = 2 * self.batch * pooled_side ** 2 * self.filters * self.n_out  # the head
        forward = weight_grad = sum(per_layer) + dense
        input_error = sum(per_layer[1:]) + dense
        return {"forward": forward, "weight_grad": weight_grad, "input_error": input_error,
                "backward": weight_grad + input_error,
                "total": forward + weight_grad + input_error}

    def roof_shapes(self) -> tuple[ConvShape, ...]:
        """The widest conv's three convolutions (filters -> filters), timed alone: their
        rates are the roof (the implicit GEMM of the same shape is not what the conv
        library runs)."""
        return step_conv_shapes(self.batch, self.side, self.filters, self.filters)

    def roof_work(self) -> list[tuple[str, ConvShape, int]]:
        """``(key, shape, FLOPs)`` for every convolution of the step, each credited at the
        rate of its own shape: the first layer's forward and weight gradient at its
        ``channels -> filters`` shapes (it passes no error on), every other conv's three
        at the ``filters -> filters`` ones (the dense head, ~1% of the work, with them)."""
        taps = self.batch * (3 * self.side - 2) ** 2
        first = 2 * taps * self.channels * self.filters
        rest = self.flops()["forward"] - first         # the other convs and the head
        widest = {shape.name: shape for shape in self.roof_shapes()}
        work = [(name, widest[name], rest) for name in ("forward", "input_error",
                                                        "weight_grad")]
        if self.channels == self.filters:
            return [(name, shape, flops + (first if name != "input_error" else 0))
                    for name, shape, flops in work]
        firsts = step_conv_shapes(self.batch, self.side, self.channels, self.filters)
        return work + [(f"first {shape.name}", shape, first) for shape in firsts
                       if shape.name != "input_error"]

    @property
    def gflop(self) -> float:
        return self.flops()["total"] / 1e9

    def label(self, arithmetic: str | None = None) -> str:
        """``CNN 16x16x8 F32 D2 B32 float32``."""
        ran = f" ({arithmetic})" if arithmetic else ""
        pool = f" P{self.pool}" if self.pool > 1 else ""
        return (f"CNN {self.side}x{self.side}x{self.channels} F{self.filters} D{self.depth}{pool} "
                f"B{self.batch} {self.precision}{ran}")


def _grid(widths: Iterable[int], depths: Iterable[int], batches: Iterable[int],
          recipes: Iterable[str] = PRECISIONS) -> list[BenchCase]:
    return [BenchCase(w, d, b, loss, precision)
            for precision in recipes for loss in LOSSES
            for w in widths for d in depths for b in batches]


def _quick(widths: tuple[int, int], batches: tuple[int, int], convs: list[ConvCase],
           gpts: list[GptCase], conv_recipes: tuple[str, ...] = PRECISIONS,
           mlp_recipes: tuple[str, ...] = PRECISIONS, mlps_before_gpts: int = 0
           ) -> list[Any]:
    """float32: both losses (squared error at depth 2); each bf16 recipe: cross-entropy.
    The CNNs first, in ``conv_recipes``, then the GPTs, then the MLPs recipe by recipe in
    ``mlp_recipes``' order (so a time limit leaves out MLPs, not them); the first
    ``mlps_before_gpts`` MLPs run before the GPTs."""
    mlps = [c for c in _grid(widths, (2, 4), batches, mlp_recipes)
            if get_loss(c.loss).integer_labels or (c.precision == "float32" and c.depth == 2)]
    return [dataclasses.replace(c, precision=r) for r in conv_recipes for c in convs] \
        + mlps[:mlps_before_gpts] + gpts + mlps[mlps_before_gpts:]


QUICK = _quick((64, 512), (32, 512),
               [ConvCase(8, 1, 16, 2, 32), ConvCase(16, 8, 32, 2, 128, pool=2)],
               [GptCase(128, 2, 4, 64, 16), GptCase(128, 2, 4, 64, 16, style="llama"),
                GptCase(192, 3, 6, 128, 4)])
"""The CPU ``--quick`` preset: 2 CNNs and 28 small MLP cases in the three recipes, 3
small float32 GPTs (the shipped text's 65 characters; one LLaMA-style): 37 cases."""

QUICK_ACCELERATOR = _quick((1024, 4096), (512, 8192),
                           [ConvCase(32, 64, 128, 2, 256, pool=2),
                            ConvCase(16, 16, 64, 2, 512, pool=2)],
                           [GptCase(768, 12, 12, 1024, 8, vocab=50257, precision=r,
                                    tie_embedding=True)
                            for r in PRECISIONS], mlp_recipes=PRECISIONS[::-1],
                           mlps_before_gpts=8)
"""The ``--quick`` preset on a GPU/TPU: 6 CNNs (two shapes with a max pool, in three
recipes), a GPT-2-small-shaped step (d 768, 12 blocks, 12 heads, T 1024, vocab 50257,
the head tied to the token table as GPT-2's: 124.5M params; batch 8) and 28 MLP cases
of 3 to 3300 matmul GFLOP per step, so that no case
is launch-bound (the CPU preset's smallest would be microseconds there). The GPT runs in
each recipe (``float32`` as TF32 at the default precision). Order: the CNNs, the 8 bf16
MLPs, the GPTs, the other MLPs (float32 last): on the one GPU run so far float32 held
(0.93-1.03x jax.grad), bf16 did not, and a time limit cut the bf16 MLPs."""

FULL = _grid((64, 256, 1024, 4096), (2, 4, 8), (32, 256, 4096))
"""Widths 64..4096, depths 2..8, batch 32..4096, both losses, in the three recipes (216
cases); ``max_gflop`` and ``time_limit_s`` leave out what a machine cannot run in
reasonable time."""


def quick_cases(platform: str) -> list[BenchCase]:
    """The quick preset for a platform: :data:`QUICK` on a CPU, else :data:`QUICK_ACCELERATOR`."""
    return QUICK if platform == "cpu" else QUICK_ACCELERATOR


