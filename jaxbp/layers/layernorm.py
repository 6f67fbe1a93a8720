"""LayerNorm over the last axis, with scale and bias; the backward by its formula.

.. math::
    \\mu = \\frac{1}{d}\\sum_k x_k, \\quad \\sigma^2 = \\frac{1}{d}\\sum_k (x_k - \\mu)^2,
    \\quad \\hat x = \\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}}, \\quad
    y = \\gamma \\hat x + \\beta

    \\frac{\\partial C}{\\partial \\gamma} = \\sum \\delta \\hat x, \\quad
    \\frac{\\partial C}{\\partial \\beta} = \\sum \\delta, \\quad
    \\delta_{in} = \\frac{1}{\\sqrt{\\sigma^2 + \\epsilon}}\\Big(g - \\overline{g}
        - \\hat x \\, \\overline{g \\hat x}\\Big), \\quad g = \\gamma \\delta

(bars: means over the last axis; the sums run over every axis but the last).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
from jax.typing import DTypeLike

from jaxbp.layers import kfac, precision
from jaxbp.layers.base import Shape, register, repr_beside_defaults
from jaxbp.types import Array, check_bool, is_real


@register
@dataclasses.dataclass(frozen=True)
class LayerNorm:
    """Normalise each sample's last axis (per position for images), then scale and shift.

    Args:
      eps: added to the variance (default 1e-5).
      activation_dtype: None, or the dtype its output and the error it passes on are
        stored in (``"bfloat16"``); the statistics and the normalisation are computed
        in the params' dtype, as flax's ``LayerNorm(dtype=bfloat16)`` does.
      bias: whether it shifts by beta (default True; False: ``gamma x_hat`` alone, the
        LayerNorm of nanoGPT's ``bias=False``, PyTorch's ``LayerNorm(bias=False)``).

    Params: ``{"scale": (d,), "bias": (d,)}``, initialised to ones and zeros (``{"scale"}``
    alone without ``bias``).
    """

    eps: float = 1e-5
    activation_dtype: DTypeLike | None = None
    bias: bool = True

    def __post_init__(self) -> None:
        if not is_real(self.eps) or not self.eps > 0:
            raise ValueError(f"LayerNorm eps must be a number > 0, got {self.eps!r}")
        object.__setattr__(self, "eps", float(self.eps))
        precision.check_recipe(self)
        object.__setattr__(self, "bias", check_bool("LayerNorm bias", self.bias))

    def __repr__(self) -> str:
        """The fields, ``bias`` only when False (a net saved before it reads the same)."""
        return repr_beside_defaults(self, ("bias",))

    def output_shape(self, in_shape: Shape) -> Shape:
        if not in_shape:
            raise ValueError("needs at least one feature axis")
        return in_shape

    def init(self, key: Array, in_shape: Shape, dtype: Any) -> dict[str, Array]:
        d = in_shape[-1]
        params = {"scale": jnp.ones((d,), dtype)}
        return {**params, "bias": jnp.zeros((d,), dtype)} if self.bias else params

    def forward(self, params: dict[str, Array], x: Array) -> tuple[Array, tuple[Array, Array]]:
        x = x.astype(jnp.result_type(x, params["scale"]))
        mu = jnp.mean(x, axis=-1, keepdims=True)
        centred = x - mu
        inv_std = 1 / jnp.sqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + self.eps)
        x_hat = centred * inv_std                                   # (x - mu) / sqrt(var + eps)
        out = x_hat * params["scale"]                                # gamma x_hat + beta
        if self.bias:
            out = out + params["bias"]
        return precision.to_activation(out, self.activation_dtype), (x_hat, inv_std)

    def backward(self, params: dict[str, Array], cache: tuple[Array, Array], delta_out: Array,
                 need_input: bool = True) -> tuple[Array | None, dict[str, Array]]:
        x_hat, inv_std = cache
        delta_out = delta_out.astype(x_hat.dtype)
        axes = tuple(range(delta_out.ndim - 1))
        grads = self._sums(delta_out, x_hat, axes)
        if not need_input:
            return None, grads
        g = delta_out * params["scale"]
        # delta_in = (g - mean(g) - x_hat mean(g x_hat)) / sqrt(var + eps)
        delta_in = inv_std * (g - jnp.mean(g, axis=-1, keepdims=True)
                              - x_hat * jnp.mean(g * x_hat, axis=-1, keepdims=True))
        return precision.to_activation(delta_in, self.activation_dtype), grads

    def per_sample_grads(self, params: dict[str, Array], cache: tuple[Array, Array],
                         delta_out: Array) -> dict[str, Array]:
        return self._sums(delta_out, cache[0], tuple(range(1, delta_out.ndim - 1)))

    def _sums(self, delta_out: Array, x_hat: Array, axes: tuple[int, ...]) -> dict[str, Array]:
        """``dC/dgamma = sum delta x_hat`` and ``dC/dbeta = sum delta`` over ``axes``: every
        axis but the last (the batch gradient), or but the batch's and the last (each
        sample's)."""
        sums = {"scale": jnp.sum(delta_out * x_hat, axis=axes)}
        return {**sums, "bias": jnp.sum(delta_out, axis=axes)} if self.bias else sums

    def kfac_factors(self, params: dict[str, Array], cache: tuple[Array, Array],
                     delta_out: Array, scale: kfac.KfacScale, where: str) -> dict[str, Any]:
        """The exact diagonal of its Fisher block (an elementwise scale has no Kronecker
        structure): :func:`jaxbp.layers.kfac.diagonal_block`."""
        return kfac.diagonal_block(self, params, cache, delta_out, scale)

    def feedback_shape(self, in_shape: Shape) -> None:
        """No feedback: the feedback rules keep this layer's own J^T
        (its J^T reads its own scale and cache)."""
        return None

    def per_sample_sq_norms(self, params: dict[str, Array], cache: tuple[Array, Array],
                            delta_out: Array) -> Array:
        grads = self.per_sample_grads(params, cache, delta_out)
        return sum(jnp.sum(g ** 2, axis=1) for g in grads.values())
