"""RMSNorm over the last axis, scale only (Zhang and Sennrich 2019); its backward by formula.

.. math::
    r = \\Big(\\frac{1}{d}\\sum_k x_k^2 + \\epsilon\\Big)^{-1/2}, \\quad
    \\hat x = r\\, x, \\quad y = \\gamma \\hat x

    \\frac{\\partial C}{\\partial \\gamma} = \\sum \\delta \\hat x, \\quad
    \\delta_{in} = r \\big(g - \\hat x \\, \\overline{g \\hat x}\\big), \\quad g = \\gamma \\delta

(the bar: the mean over the last axis; the sum runs over every axis but the last).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from jax.typing import DTypeLike

from jaxbp.layers import kfac, precision
from jaxbp.layers.base import Shape, register
from jaxbp.types import Array, is_real


@register
@dataclasses.dataclass(frozen=True)
class RMSNorm:
    """Divide each sample's last axis (each token's, for sequences) by its RMS, then scale.

    Args:
      eps: added to the mean square (default 1e-6).
      activation_dtype: None, or the dtype its output and the error it passes on are
        stored in (``"bfloat16"``); the mean square and the scaling are computed in the
        params' dtype, as in :class:`jaxbp.layers.LayerNorm`.

    Params: ``{"scale": (d,)}``, initialised to ones.
    """

    eps: float = 1e-6
    activation_dtype: DTypeLike | None = None

    def __post_init__(self) -> None:
        precision.check_recipe(self)
        if not is_real(self.eps) or not self.eps > 0:
            raise ValueError(f"RMSNorm eps must be a number > 0, got {self.eps!r}")
        object.__setattr__(self, "eps", float(self.eps))

    def output_shape(self, in_shape: Shape) -> Shape:
        if not in_shape:
            raise ValueError("needs at least one feature axis")
        return in_shape

    def init(self, key: Array, in_shape: Shape, dtype: Any) -> dict[str, Array]:
        return {"scale": jnp.ones((in_shape[-1],), dtype)}

    def forward(self, params: dict[str, Array], x: Array) -> tuple[Array, tuple[Array, Array]]:
        x = x.astype(jnp.result_type(x, params["scale"]))
        r = 1 / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + self.eps)
        x_hat = x * r                                                  # x / rms(x)
        return precision.to_activation(x_hat * params["scale"], self.activation_dtype), (x_hat, r)

    def backward(self, params: dict[str, Array], cache: tuple[Array, Array], delta_out: Array,
                 need_input: bool = True) -> tuple[Array | None, dict[str, Array]]:
        x_hat, r = cache
        delta_out = delta_out.astype(x_hat.dtype)
        grads = {"scale": jnp.sum(delta_out * x_hat, axis=tuple(range(delta_out.ndim - 1)))}
        if not need_input:
            return None, grads
        g = delta_out * params["scale"]
        # delta_in = r (g - x_hat mean(g x_hat))
        delta_in = r * (g - x_hat * jnp.mean(g * x_hat, axis=-1, keepdims=True))
        return precision.to_activation(delta_in, self.activation_dtype), grads

    def per_sample_grads(self, params: dict[str, Array], cache: tuple[Array, Array],
                         delta_out: Array) -> dict[str, Array]:
        x_hat = cache[0]
        axes = tuple(range(1, delta_out.ndim - 1))
        return {"scale": jnp.sum(delta_out.astype(x_hat.dtype) * x_hat, axis=axes)}

    def per_sample_sq_norms(self, params: dict[str, Array], cache: tuple[Array, Array],
                            delta_out: Array) -> Array:
        return jnp.sum(self.per_sample_grads(params, cache, delta_out)["scale"] ** 2, axis=1)

    def kfac_factors(self, params: dict[str, Array], cache: tuple[Array, Array],
                     delta_out: Array, scale: kfac.KfacScale, where: str) -> dict[str, Any]:
        """The exact diagonal of its Fisher block (an elementwise scale has no Kronecker
        structure): :func:`jaxbp.layers.kfac.diagonal_block`."""
        return kfac.diagonal_block(self, params, cache, delta_out, scale)

    def feedback_shape(self, in_shape: Shape) -> None:
        """No feedback: the feedback rules keep this layer's own J^T
        (its J^T reads its own scale and cache)."""
        return None
