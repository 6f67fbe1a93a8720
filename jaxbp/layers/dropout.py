"""Dropout: each activation kept with probability 1 - p and scaled by 1 / (1 - p) in training.

.. math::
    a = x \\odot m, \\qquad m_j = \\frac{[u_j \\geq p]}{1 - p},\\; u_j \\sim U(0, 1),
    \\qquad \\delta_{in} = \\delta \\odot m

(inverted dropout: the expected activation is x, so evaluation is the identity). The
mask is drawn from the key the chain hands the record (:func:`jaxbp.layers.chain.
chain_forward`), kept as its cache, and the backward multiplies by it: the same J^T as
any elementwise layer. Without a key (evaluation, gradient checks, the quantities asked
directly) it is the identity.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np

from jaxbp.layers.base import Shape, register
from jaxbp.types import Array, is_real


def check_rate(name: str, rate: Any) -> float:
    """A dropout rate as a float in [0, 1), or a ValueError naming ``name``."""
    if isinstance(rate, bool) or not is_real(rate) or not 0 <= rate < 1:
        raise ValueError(f"{name} must be a number in [0, 1), got {rate!r}")
    return float(rate)


@register
@dataclasses.dataclass(frozen=True)
class Dropout:
    """Inverted dropout of rate ``p`` (each activation zeroed with probability p, the rest
    scaled by 1 / (1 - p)) where the chain is given a key (a train step's), else the
    identity. No params."""

    rate: float
    takes_key: ClassVar[bool] = True
    """Its forward reads a key when one is given (:func:`jaxbp.layers.chain.chain_forward`)."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "rate", check_rate("Dropout rate", self.rate))

    def output_shape(self, in_shape: Shape) -> Shape:
        return tuple(in_shape)

    def init(self, key: Array, in_shape: Shape, dtype: Any) -> dict[str, Array]:
        return {}

    def forward(self, params: Any, x: Array, key: Array | None = None
                ) -> tuple[Array, Array | None]:
        """``(x * m, kept)``, kept the boolean mask (its cache: a byte per activation);
        ``(x, None)`` without a key."""
        if key is None or self.rate == 0:
            return x, None
        # a float32 draw whatever the mode: 64-bit JAX would draw float64 uniforms and
        # other masks, and a float64 check would not see the step's masks
        kept = jax.random.bernoulli(key, np.float32(1 - self.rate), x.shape)
        return self._masked(x, kept), kept

    def backward(self, params: Any, kept: Array | None, delta_out: Array,
                 need_input: bool = True) -> tuple[Array | None, dict[str, Array]]:
        if not need_input:
            return None, {}
        return (delta_out if kept is None else self._masked(delta_out, kept)), {}

    def _masked(self, v: Array, kept: Array) -> Array:
        """``v * m``: kept entries scaled by 1 / (1 - p) in at least float32 (a bf16 scale
        would round 1/0.9 to 1.109), then stored in v's dtype; the others 0."""
        wide = jnp.promote_types(v.dtype, jnp.float32)
        return jnp.where(kept, (v.astype(wide) * (1 / (1 - self.rate))).astype(v.dtype), 0)

    def per_sample_grads(self, params: Any, cache: Any, delta_out: Array) -> dict[str, Array]:
        return {}

    def feedback_shape(self, in_shape: Shape) -> None:
        """No feedback: the feedback rules keep its own J^T (the mask)."""
        return None

    def per_sample_sq_norms(self, params: Any, cache: Any, delta_out: Array) -> None:
        return None
