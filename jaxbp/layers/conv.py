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

each one ``lax.conv_general_dilated`` (:func:`backward_conv`): on accelerators in the
form JAX's transpose rules emit for the forward conv (dimension numbers, paddings,
dilations; cuDNN picks its algorithm from this form), the weight gradient coming out as
HWIO directly, the input error as NHWC; on a CPU the same convolutions with their operands
transposed to NHWC x HWIO.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from jaxbp.activations import get_activation
from jaxbp.layers import precision, token_grads
from jaxbp.layers.base import Shape, register, repr_beside_defaults, variance_init
from jaxbp.types import Array, check_bool, check_int, is_int

PADDINGS = ("SAME", "VALID")
CHANNELS_LAST = ("NHWC", "HWIO", "NHWC")


def backward_conv(conv: Any, lhs: Array, rhs: Array, numbers: tuple[str, str, str]) -> Array:
    """``conv(lhs, rhs, numbers)``, a backward convolution in the dimension numbers JAX's
    transpose rule gives it, on accelerators; on a CPU the same convolution with ``lhs``
    transposed to NHWC, ``rhs`` to HWIO and the NHWC result back to ``numbers[2]``.

    Inside a ``lax.scan`` (the train loop) XLA:CPU runs a convolution in any other layout
    with its naive loop emitter, 20-90x slower than alone (jax-ml/jax#12868: the weight
    gradient of a 16x16x32 -> 32 conv, B128, 766 ms against 8 ms). The choice is made by
    ``lax.platform_dependent`` when the step is lowered: one traced step serves both.
    """
    lhs_spec, rhs_spec, out_spec = numbers

    def channels_last(lhs: Array, rhs: Array) -> Array:
        out = conv(lhs.transpose([lhs_spec.index(d) for d in "NHWC"]),
                   rhs.transpose([rhs_spec.index(d) for d in "HWIO"]), CHANNELS_LAST)
        return out.transpose(["NHWC".index(d) for d in out_spec])

    return jax.lax.platform_dependent(lhs, rhs, cpu=channels_last,
                                      default=lambda lhs, rhs: conv(lhs, rhs, numbers))


def _pair(value: Any, name: str) -> tuple[int, int]:
    pair = (value, value) if is_int(value) else value
    if (not isinstance(pair, tuple | list) or len(pair) != 2
            or not all(is_int(v) and v >= 1 for v in pair)):
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
      padding: ``"SAME"`` (output ``ceil(size / stride)``) or ``"VALID"``, in any case.
      activation: a name of :data:`jaxbp.ACTIVATIONS` (default identity).
      compute_dtype, activation_dtype: the numerical recipe, as for
        :class:`~jaxbp.layers.Dense` (:mod:`jaxbp.layers.precision`).
      bias: whether it adds a bias per filter (default True; False: params ``{"w"}``
        alone, as a conv before a norm usually is).

    Params: ``{"w": (kh, kw, c_in, filters), "b": (filters,)}`` (HWIO, as lax and flax).
    """

    filters: int
    kernel: int | tuple[int, int] = (3, 3)
    stride: int | tuple[int, int] = 1
    padding: str = "SAME"
    activation: str = "identity"
    compute_dtype: DTypeLike | None = None
    activation_dtype: DTypeLike | None = None
    bias: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "filters", check_int("Conv2D filters", self.filters, 1))
        object.__setattr__(self, "bias", check_bool("Conv2D bias", self.bias))
        object.__setattr__(self, "kernel", _pair(self.kernel, "kernel"))
        object.__setattr__(self, "stride", _pair(self.stride, "stride"))
        if not isinstance(self.padding, str) or self.padding.upper() not in PADDINGS:
            raise ValueError(f"Unknown Conv2D padding {self.padding!r}. It needs to be one of "
                             f"{list(PADDINGS)} (any case, as lax takes it).")
        object.__setattr__(self, "padding", self.padding.upper())   # one spelling: one jit
        get_activation(self.activation)
        precision.check_recipe(self)

    def __repr__(self) -> str:
        """The fields, ``bias`` only when False (a net saved before it reads the same)."""
        return repr_beside_defaults(self, ("bias",))

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
        return {"w": w, "b": jnp.zeros((self.filters,), dtype)} if self.bias else {"w": w}

    def _conv(self, lhs: Array, rhs: Array, out: Any, **conv: Any) -> Array:
        """One ``conv_general_dilated`` with the layer's operands, its output in ``out``."""
        lhs, rhs = precision.low_operands(self, lhs, rhs)
        return jax.lax.conv_general_dilated(
            lhs, rhs, preferred_element_type=precision.preferred(out, lhs, rhs), **conv)

    def forward(self, params: dict[str, Array], x: Array) -> tuple[Array, tuple[Array, ...]]:
        x = precision.to_activation(x, self.activation_dtype)
        out = precision.output_dtype(self, jnp.result_type(x, params["w"]))
        z = self._conv(x, params["w"], out, window_strides=self.stride,
                       padding=self._pads(x.shape[1:3]),
                       dimension_numbers=CHANNELS_LAST)
        if self.bias:
            z = z + precision.to_activation(params["b"], self.activation_dtype)
        a = get_activation(self.activation).g(z)
        return a, (x, z, a)

    def pre_activation_error(self, cache: tuple[Array, ...], delta_a: Array) -> Array:
        """The error at z from the error at the output a: ``delta = delta_a * g'(z)``."""
        _, z, a = cache
        delta_a = precision.to_activation(delta_a, self.activation_dtype)
        return delta_a * get_activation(self.activation).dg(z, a)     # delta = delta_a g'(z)

    def _weight_grad(self, x: Array, delta: Array, out: Any) -> Array:
        """dC/dW = correlation of x with the stride-dilated delta, the batch contracted:
        x read as (C, H, W, N) (channels the "batch", samples the contracted features),
        delta as the kernel (I = samples, O = filters), the result HWIO directly."""
        pads = [(lo, k + (n_out - 1) * s - size - lo) for size, k, s, n_out, (lo, _) in zip(
            x.shape[1:3], self.kernel, self.stride, delta.shape[1:3], self._pads(x.shape[1:3]))]
        return backward_conv(
            lambda lhs, rhs, numbers: self._conv(
                lhs, rhs, out, window_strides=(1, 1), padding=pads, rhs_dilation=self.stride,
                dimension_numbers=numbers),
            x, delta, ("CHWN", "IHWO", "HWNC"))

    def _input_error(self, w: Array, delta: Array, in_hw: tuple[int, int], out: Any) -> Array:
        """delta_in = the stride-dilated delta correlated with the flipped kernel (O <-> I)."""
        pads = [(k - 1 - lo, size - 1 - (n_out - 1) * s + lo) for size, k, s, n_out, (lo, _)
                in zip(in_hw, self.kernel, self.stride, delta.shape[1:3], self._pads(in_hw))]
        return backward_conv(
            lambda lhs, rhs, numbers: self._conv(
                lhs, rhs, out, window_strides=(1, 1), padding=pads, lhs_dilation=self.stride,
                dimension_numbers=numbers),
            delta, jax.lax.rev(w, (0, 1)), ("NHWC", "HWOI", "NHWC"))

    def backward(self, params: dict[str, Array], cache: tuple[Array, ...], delta_a: Array,
                 need_input: bool = True) -> tuple[Array | None, dict[str, Array]]:
        x, w = cache[0], params["w"]
        delta = self.pre_activation_error(cache, delta_a)
        # in the bf16 recipe the kernel accumulates in float32 and rounds once to bf16, as
        # jax.grad of the same forward does (precision.weight_grad): cuDNN runs bf16 convs
        # with float32 outputs at a fraction of the bf16 rate (H200, bf16 CNNs: 1.2-1.3x
        # jax.grad's step with them)
        wgrad = self._weight_grad(x, delta, precision.output_dtype(self, w.dtype))
        grads = {"w": wgrad.astype(w.dtype)}
        if self.bias:
            grads["b"] = jnp.sum(delta, axis=(0, 1, 2), dtype=w.dtype)
        if not need_input:
            return None, grads
        out = precision.output_dtype(self, jnp.result_type(delta, w))
        return self._input_error(w, delta, x.shape[1:3], out), grads

    def per_sample_grads(self, params: dict[str, Array], cache: tuple[Array, ...],
                         delta_a: Array) -> dict[str, Array]:
        x, delta = precision.in_params_dtype(self, params, cache, delta_a)
        grads = jnp.moveaxis(self._formed_grads(x, delta), 0, 1)       # (B, kh kw, c, o)
        formed = {"w": grads.reshape(x.shape[0], *params["w"].shape)}
        return {**formed, "b": jnp.sum(delta, axis=(1, 2))} if self.bias else formed

    def _padded(self, x: Array) -> Array:
        return jnp.pad(x, ((0, 0), *self._pads(x.shape[1:3]), (0, 0)))

    def _window(self, padded: Array, p: Any, q: Any, out_hw: tuple[int, ...]) -> Array:
        """``x^{pad}[:, s i + p, s j + q, :]`` at every output position (i, j): the input
        that kernel offset (p, q) sees, shape (B, H', W', c_in)."""
        (sh, sw), (h, w) = self.stride, out_hw
        span = jax.lax.dynamic_slice(padded, (0, p, q, 0), (padded.shape[0], (h - 1) * sh + 1,
                                                            (w - 1) * sw + 1, padded.shape[3]))
        return span[:, ::sh, ::sw]

    def _offset_scan(self, x: Array, out_hw: tuple[int, ...], body: Any, init: Any) -> Any:
        """``lax.scan`` of ``body(carry, window)`` over the kernel offsets (p, q), row major:
        one window of the padded input is alive at a time."""
        padded, kw = self._padded(x), self.kernel[1]

        def step(carry: Any, pq: Array) -> Any:
            return body(carry, self._window(padded, pq // kw, pq % kw, out_hw))

        return jax.lax.scan(step, init, jnp.arange(self.kernel[0] * kw))

    def _formed_grads(self, x: Array, delta: Array) -> Array:
        """(kh kw, B, c_in, c_out): each sample's weight gradient, one kernel offset at a time,

        .. math:: g_{n,p,q,c,o} = \\sum_{i,j} x^{pad}_{n, s i + p, s j + q, c} \\delta_{n,i,j,o}

        a batched product per offset (no patch matrix, no grouped convolution)."""
        _, grads = self._offset_scan(
            x, delta.shape[1:3],
            lambda _, window: (None, jnp.einsum("nhwc,nhwo->nco", window, delta)), None)
        return grads

    def _ghost_sq_norms(self, x: Array, delta: Array) -> Array:
        """(B,): each sample's ``||P^T E||^2 = <P P^T, E E^T>`` from T x T Gram matrices,
        the patch Gram as the sum over kernel offsets of the windows' Grams,

        .. math:: (P P^T)_{(i,j),(i',j')} = \\sum_{p,q}
            \\langle x^{pad}_{s i + p, s j + q}, x^{pad}_{s i' + p, s j' + q} \\rangle

        each window's Gram contracted with ``E E^T`` as it comes (P and P P^T are never
        held whole)."""
        positions = delta.shape[1] * delta.shape[2]
        errors = delta.reshape(x.shape[0], positions, -1)               # (B, T, d_out)
        error_gram = jnp.einsum("nto,nso->nts", errors, errors)

        def add(total: Array, window: Array) -> tuple[Array, None]:
            rows = window.reshape(x.shape[0], positions, -1)
            window_gram = jnp.einsum("ntc,nsc->nts", rows, rows)
            return total + jnp.einsum("nts,nts->n", window_gram, error_gram), None

        total, _ = self._offset_scan(x, delta.shape[1:3], add, jnp.zeros(x.shape[0], x.dtype))
        return total

    def kfac_inputs(self, cache: tuple[Array, ...]) -> tuple[Array, int]:
        """K-FAC's input rows ``(B T, kh kw c_in)``: every output position's patch (KFC)."""
        patches = self._patches(cache[0])
        return patches.reshape(-1, patches.shape[-1]), patches.shape[1]

    def feedback_shape(self, in_shape: Shape) -> Shape:
        """A feedback B in the kernel's place, HWIO: ``(kh, kw, c_in, filters)``."""
        return (*self.kernel, in_shape[-1], self.filters)

    def feedback_transport(self, array: Array) -> Array:
        """B is read as the kernel as it is."""
        return array

    def _patches(self, x: Array) -> Array:
        """(B, T, d_in): every output position's input patch, ``d_in = kh kw c_in``, features
        in ``lax.conv_general_dilated_patches`` order (channel, then kernel row and column)."""
        patches = jax.lax.conv_general_dilated_patches(
            x, self.kernel, self.stride, self._pads(x.shape[1:3]),
            dimension_numbers=CHANNELS_LAST)
        return patches.reshape(x.shape[0], -1, patches.shape[-1])

    def uses_ghost_norm(self, in_shape: Shape) -> bool:
        """Whether the per-sample norms take the Gram ("ghost") route for this input.

        A sample's weight gradient is ``P^T E`` (T output positions, patches ``P: (T,
        d_in)``, ``d_in = kh kw c_in``, errors ``E: (T, d_out)``), so the choice is
        :func:`jaxbp.layers.token_grads.prefers_ghost`'s: wide layers on small images go
        ghost, early layers on large images (T large, d_in small) go formed.
        """
        positions = math.prod(self.output_shape(in_shape)[:2])
        return token_grads.prefers_ghost(positions, math.prod(self.kernel) * in_shape[-1],
                                         self.filters)

    def per_sample_sq_norms(self, params: dict[str, Array], cache: tuple[Array, ...],
                            delta_a: Array) -> Array:
        return self.per_sample_sq_norms_and_sum(params, cache, delta_a)[0]

    def per_sample_sq_norms_and_sum(self, params: dict[str, Array], cache: tuple[Array, ...],
                                    delta_a: Array) -> tuple[Array, Any]:
        """``(B,)`` squared norms, and ``weights -> sum_i w_i g_i`` (the clipped gradient
        when ``w_i = s_i / B``) from what the route computed.

        Formed route: the weighted sum of the formed ``g_i = P_i^T E_i``, B d_in d_out
        instead of another weight-gradient convolution (the book-keeping of Bu et al.
        2022). Ghost route: the layer's weight-gradient convolution of the weighted
        pre-activation errors, ``sum_i w_i g_i = P^T (w E)`` (the rule is linear in E).
        """
        x, delta = precision.in_params_dtype(self, params, cache, delta_a)
        bias_sq, bias_sum = (token_grads.bias_sq_norms_and_sum(token_grads.positions_flat(delta))
                             if self.bias else (0, None))
        if self.uses_ghost_norm(x.shape[1:]):
            weight_sq = self._ghost_sq_norms(x, delta)

            def weighted_errors_sum(weights: Array) -> dict[str, Array]:
                return self._with_bias(self._weight_grad(
                    x, delta * weights[:, None, None, None], params["w"].dtype),
                    bias_sum, weights)

            return weight_sq + bias_sq, weighted_errors_sum
        formed = self._formed_grads(x, delta)                          # (kh kw, B, c, o)

        def weighted_sum(weights: Array) -> dict[str, Array]:
            # a fused multiply-reduce: a dot here would copy the formed gradients to its layout
            w = jnp.sum(weights[:, None, None] * formed, axis=1)
            return self._with_bias(w.reshape(params["w"].shape), bias_sum, weights)

        return jnp.sum(jnp.square(formed), axis=(0, 2, 3)) + bias_sq, weighted_sum

    def _with_bias(self, w_sum: Array, bias_sum: Any, weights: Array) -> dict[str, Array]:
        """``{"w": w_sum}`` and, where the layer has a bias, its ``sum_i w_i g_i``."""
        return {"w": w_sum, "b": bias_sum(weights)} if self.bias else {"w": w_sum}
