"""Conv2D: ``a = g(conv(x, W) + b)`` on NHWC images, W in HWIO; its backward by hand.

With stride s and the input padded by ``(lo, hi)`` per spatial axis,

.. math::
    z_{n,i,j,o} = \\sum_{p,q,c} x^{pad}_{n, s i + p, s j + q, c} W_{p,q,c,o} + b_o,
    \\qquad a = g(z), \\qquad \\delta = \\delta_a \\odot g'(z)

    \\frac{\\partial C}{\\partial W_{p,q,c,o}} = \\sum_{n,i,j}
        x^{pad}_{n, s i + p, s j + q, c} \\, \\delta_{n,i,j,o}
    \\qquad \\text{(a correlation of x with the s-dilated error)}

    \\delta_{in, n,y,x,c} = \\sum_{i,j,p,q,o:\\ s i + p - lo = y} \\delta_{n,i,j,o} W_{p,q,c,o}
    \\qquad \\text{(the s-dilated error correlated with the flipped kernel)}

each one ``lax.conv_general_dilated``, with the paddings worked out so the
result has exactly the kernel's (the input's) spatial size.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp

from jaxbp._typing import Array
from jaxbp.activations import get_activation
from jaxbp.layers.base import Shape, register, variance_init

PADDINGS = ("SAME", "VALID")
FORMED_BYTES = 64 * 2**20
"""Above this size of a batch's formed per-sample weight gradients, a conv whose Gram
matrices are smaller takes the ghost route (:meth:`Conv2D.uses_ghost_norm`)."""


def _pair(value: Any, name: str) -> tuple[int, int]:
    pair = (value, value) if isinstance(value, int) and not isinstance(value, bool) else value
    if (not isinstance(pair, tuple | list) or len(pair) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in pair)):
        raise ValueError(f"Conv2D {name} must be an int >= 1 or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


@register
@dataclasses.dataclass(frozen=True)
class Conv2D:
    """A 2-D convolution on (batch, height, width, channels) inputs, then ``g``.

    Args:
      filters: output channels (>= 1).
      kernel: ``(kh, kw)`` (or one int for both).
      stride: an int or a pair (default 1).
      padding: ``"SAME"`` (output ``ceil(size / stride)``) or ``"VALID"``.
      activation: a name of :data:`jaxbp.ACTIVATIONS` (default identity).

    Params: ``{"w": (kh, kw, c_in, filters), "b": (filters,)}`` (HWIO, as lax and flax).
    """

    filters: int
    kernel: tuple[int, int] = (3, 3)
    stride: int | tuple[int, int] = 1
    padding: str = "SAME"
    activation: str = "identity"

    def __post_init__(self) -> None:
        if isinstance(self.filters, bool) or not isinstance(self.filters, int) \
                or self.filters < 1:
            raise ValueError(f"Conv2D filters must be an int >= 1, got {self.filters!r}")
        object.__setattr__(self, "kernel", _pair(self.kernel, "kernel"))
        object.__setattr__(self, "stride", _pair(self.stride, "stride"))
        if self.padding not in PADDINGS:
            raise ValueError(f"Unknown Conv2D padding {self.padding!r}. It needs to be one of "
                             f"{list(PADDINGS)}.")
        get_activation(self.activation)

    def _pads(self, hw: tuple[int, int]) -> list[tuple[int, int]]:
        return jax.lax.padtype_to_pads(hw, self.kernel, self.stride, self.padding)

    def output_shape(self, in_shape: Shape) -> Shape:
        if len(in_shape) != 3:
            raise ValueError(f"takes (batch, height, width, channels) inputs but gets samples "
                             f"of shape {in_shape}")
        out = []
        for size, k, s, (lo, hi) in zip(in_shape[:2], self.kernel, self.stride,
                                         self._pads(in_shape[:2])):
            if size + lo + hi < k:
                raise ValueError(f"kernel {self.kernel} is larger than its {self.padding} input "
                                 f"{in_shape[:2]}")
            out.append((size + lo + hi - k) // s + 1)
        return (*out, self.filters)

    def init(self, key: Array, in_shape: Shape, dtype: Any) -> dict[str, Array]:
        kh, kw = self.kernel
        c_in = in_shape[-1]
        he = get_activation(self.activation).he_init
        w = variance_init(key, (kh, kw, c_in, self.filters), kh * kw * c_in,
                          kh * kw * self.filters, he, dtype)
        return {"w": w, "b": jnp.zeros((self.filters,), dtype)}

    def forward(self, params: dict[str, Array], x: Array) -> tuple[Array, tuple[Array, ...]]:
        z = jax.lax.conv_general_dilated(
            x, params["w"], self.stride, self._pads(x.shape[1:3]),
            dimension_numbers=("NHWC", "HWIO", "NHWC")) + params["b"]
        a = get_activation(self.activation).g(z)
        return a, (x, z, a)

    def pre_activation_error(self, cache: tuple[Array, ...], delta_a: Array) -> Array:
        """The error at z from the error at the output a: ``delta = delta_a * g'(z)``."""
        _, z, a = cache
        return delta_a * get_activation(self.activation).dg(z, a)     # delta = delta_a g'(z)

    def _weight_grad(self, x: Array, delta: Array) -> Array:
        """dC/dW = correlation of x with the stride-dilated delta; the batch is contracted."""
        pads = [(lo, k + (out - 1) * s - size - lo) for size, k, s, out, (lo, _) in zip(
            x.shape[1:3], self.kernel, self.stride, delta.shape[1:3], self._pads(x.shape[1:3]))]
        # x as (C, H, W, N): channels become the "batch", samples the contracted features
        grad = jax.lax.conv_general_dilated(
            x, delta, (1, 1), pads, rhs_dilation=self.stride,
            dimension_numbers=("CHWN", "IHWO", "NHWC"))
        return jnp.transpose(grad, (1, 2, 0, 3))                      # (c, kh, kw, o) -> HWIO

    def _input_error(self, w: Array, delta: Array, in_hw: tuple[int, int]) -> Array:
        """delta_in = the stride-dilated delta correlated with the flipped kernel (O <-> I)."""
        pads = [(k - 1 - lo, size - 1 - (out - 1) * s + lo) for size, k, s, out, (lo, _) in zip(
            in_hw, self.kernel, self.stride, delta.shape[1:3], self._pads(in_hw))]
        return jax.lax.conv_general_dilated(
            delta, w[::-1, ::-1], (1, 1), pads, lhs_dilation=self.stride,
            dimension_numbers=("NHWC", "HWOI", "NHWC"))

    def backward(self, params: dict[str, Array], cache: tuple[Array, ...], delta_a: Array,
                 need_input: bool = True) -> tuple[Array | None, dict[str, Array]]:
        x = cache[0]
        delta = self.pre_activation_error(cache, delta_a)
        grads = {"w": self._weight_grad(x, delta), "b": jnp.sum(delta, axis=(0, 1, 2))}
        delta_in = self._input_error(params["w"], delta, x.shape[1:3]) if need_input else None
        return delta_in, grads

    def per_sample_grads(self, params: dict[str, Array], cache: tuple[Array, ...],
                         delta_a: Array) -> dict[str, Array]:
        x = cache[0]
        delta = self.pre_activation_error(cache, delta_a)
        # each sample's correlation alone: the batch-of-one rule mapped over the batch
        w = jax.vmap(lambda xi, di: self._weight_grad(xi[None], di[None]))(x, delta)
        return {"w": w, "b": jnp.sum(delta, axis=(1, 2))}

    def _patches(self, x: Array) -> Array:
        """(B, T, d_in): every output position's input patch, ``d_in = kh kw c_in``."""
        patches = jax.lax.conv_general_dilated_patches(
            x, self.kernel, self.stride, self._pads(x.shape[1:3]),
            dimension_numbers=("NHWC", "HWIO", "NHWC"))
        return patches.reshape(x.shape[0], -1, patches.shape[-1])

    def uses_ghost_norm(self, in_shape: Shape, batch: int = 1, itemsize: int = 4) -> bool:
        """Whether the per-sample norms take the Gram ("ghost") route for this input.

        A sample's weight gradient is ``P^T E`` (T positions, patches ``P: (T, d_in)``,
        errors ``E: (T, d_out)``). Its squared norm can be had from the T x T Gram
        matrices, ``<P P^T, E E^T>`` (Li et al. 2022; about ``T^2 (d_in + d_out)``), or
        by forming ``P^T E`` (about ``T d_in d_out``). In the one-pass clipped step the
        formed gradients are reused for the clipped sum (book-keeping), while the ghost
        route still needs the layer's weight-gradient convolution afterwards, so forming
        is never the slower route; the Gram route saves memory. The rule: ghost when the
        Gram matrices are the smaller object, ``2 T^2 < d_in d_out`` (Bu et al.'s mixed
        ghost clipping), *and* the formed gradients of the batch would take more than
        :data:`FORMED_BYTES` (64 MiB); otherwise formed.
        """
        t = math.prod(self.output_shape(in_shape)[:2])
        d_in, d_out = math.prod(self.kernel) * in_shape[-1], self.filters
        return 2 * t * t < d_in * d_out and batch * d_in * d_out * itemsize > FORMED_BYTES

    def per_sample_sq_norms(self, params: dict[str, Array], cache: tuple[Array, ...],
                            delta_a: Array) -> Array:
        return self.per_sample_sq_norms_and_sum(params, cache, delta_a)[0]

    def per_sample_sq_norms_and_sum(self, params: dict[str, Array], cache: tuple[Array, ...],
                                    delta_a: Array) -> tuple[Array, Any]:
        """``(B,)`` squared norms, and ``weights -> sum_i w_i g_i`` where the route formed
        the per-sample gradients (None on the ghost route).

        Reusing the formed ``g_i = P_i^T E_i`` for a weighted sum (the clipped gradient)
        costs B d_in d_out instead of another weight-gradient convolution (the
        book-keeping of Bu et al. 2022); on the ghost route the caller applies
        :meth:`backward` to the weighted errors.
        """
        x = cache[0]
        delta = self.pre_activation_error(cache, delta_a)
        patches = self._patches(x)                                     # (B, T, d_in)
        errors = delta.reshape(x.shape[0], -1, delta.shape[-1])       # (B, T, d_out)
        bias = jnp.sum(errors, axis=1)                                 # (B, d_out)
        bias_sq = jnp.sum(jnp.square(bias), axis=1)
        if self.uses_ghost_norm(x.shape[1:], x.shape[0], x.dtype.itemsize):
            gram = jnp.einsum("btd,bsd->bts", patches, patches)
            weight_sq = jnp.sum(gram * jnp.einsum("bto,bso->bts", errors, errors), axis=(1, 2))
            return weight_sq + bias_sq, None
        formed = jnp.einsum("btd,bto->bdo", patches, errors)           # (B, d_in, d_out)
        c_in, (kh, kw) = x.shape[-1], self.kernel

        def weighted_sum(weights: Array) -> dict[str, Array]:
            w = jnp.einsum("b,bdo->do", weights, formed)               # rows (c, i, j)
            return {"w": jnp.transpose(w.reshape(c_in, kh, kw, -1), (1, 2, 0, 3)),
                    "b": jnp.einsum("b,bo->o", weights, bias)}

        return jnp.sum(jnp.square(formed), axis=(1, 2)) + bias_sq, weighted_sum
