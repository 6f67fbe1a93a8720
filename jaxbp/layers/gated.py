"""GatedDense: a gated linear unit ``g(x W_g + b_g) * (x W_u + b_u)`` (SwiGLU with silu).

.. math::
    z = x W_g + b_g, \\quad u = x W_u + b_u, \\quad a = g(z) \\odot u

    \\delta_z = \\delta_a \\odot u \\odot g'(z), \\quad \\delta_u = \\delta_a \\odot g(z),
    \\quad \\delta_{in} = \\delta_z W_g^\\top + \\delta_u W_u^\\top

    \\frac{\\partial C}{\\partial W_g} = x^\\top \\delta_z, \\quad
    \\frac{\\partial C}{\\partial W_u} = x^\\top \\delta_u

(the biases: the errors summed over the batch and positions). Two token-wise Dense
products that share their input and meet in a product: the LLaMA/PaLM feed-forward's
first half, ``GatedDense(h, "silu")`` then ``Dense(d)`` (Shazeer 2020, "GLU Variants
Improve Transformer"). Each of the two weights has a Dense's per-sample rules
(:mod:`jaxbp.layers.token_grads`), a Kronecker K-FAC block and a feedback matrix in its
W^T place, as attention's projections have.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from jaxbp.activations import get_activation
from jaxbp.layers import kfac, precision, token_grads
from jaxbp.layers.base import (
    Shape,
    named_weights_transposed,
    register,
    repr_beside_defaults,
    variance_init,
    with_named_feedback,
)
from jaxbp.layers.dense import (
    affine,
    affine_grads,
    affine_input_error,
    check_width_record,
    last_axis_shape,
)
from jaxbp.types import Array

_BRANCHES = ("g", "u")


@register
@dataclasses.dataclass(frozen=True)
class GatedDense:
    """A gated linear unit on the last axis: ``g(x W_g + b_g) * (x W_u + b_u)``.

    On (batch, d) inputs or tokens (batch, T, d), as :class:`~jaxbp.layers.Dense`.

    Args:
      units: the output width (>= 1).
      activation: the gate's activation, a name of :data:`jaxbp.ACTIVATIONS` (default
        ``"silu"``: SwiGLU; ``"gelu"``: GEGLU; ``"sigmoid"``: the original GLU).
      compute_dtype, activation_dtype: the numerical recipe, as Dense's
        (:mod:`jaxbp.layers.precision`).
      bias: whether both branches add a bias (default True; False: ``g(x W_g) * (x
        W_u)``, LLaMA's).

    Params: ``{"wg", "wu": (d, units), "bg", "bu": (units,)}``: the gate's weight and
    bias, the linear branch's; the weights Glorot (He for the gate's rectifying
    activations, as Dense's), the biases 0 (none without ``bias``).
    """

    units: int
    activation: str = "silu"
    compute_dtype: DTypeLike | None = None
    activation_dtype: DTypeLike | None = None
    bias: bool = True

    def __post_init__(self) -> None:
        check_width_record(self)

    def __repr__(self) -> str:
        """The fields, ``bias`` only when False (a net saved before it reads the same)."""
        return repr_beside_defaults(self, ("bias",))

    def output_shape(self, in_shape: Shape) -> Shape:
        return last_axis_shape(in_shape, self.units)

    def init(self, key: Array, in_shape: Shape, dtype: Any) -> dict[str, Array]:
        fan_in = in_shape[-1]
        he = get_activation(self.activation).he_init
        gate_key, linear_key = jax.random.split(key)
        params = {"wg": variance_init(gate_key, (fan_in, self.units), fan_in, self.units,
                                      he, dtype),
                  "wu": variance_init(linear_key, (fan_in, self.units), fan_in, self.units,
                                      False, dtype)}
        if self.bias:
            params.update({f"b{p}": jnp.zeros((self.units,), dtype) for p in _BRANCHES})
        return params

    def forward(self, params: dict[str, Array], x: Array) -> tuple[Array, tuple[Array, ...]]:
        x = precision.to_activation(x, self.activation_dtype)
        out = precision.output_dtype(self, jnp.result_type(x, params["wg"]))
        z, u = (affine(self, params, x, p, out) for p in _BRANCHES)  # x W_p + b_p
        gate = get_activation(self.activation).g(z)
        return gate * u, (x, z, gate, u)                              # a = g(z) * u

    def _branch_errors(self, cache: tuple[Array, ...], delta_a: Array) -> dict[str, Array]:
        """The errors at z and u: ``delta_a u g'(z)`` and ``delta_a g(z)``."""
        _, z, gate, u = cache
        delta_a = precision.to_activation(delta_a, self.activation_dtype)
        return {"g": delta_a * u * get_activation(self.activation).dg(z, gate),
                "u": delta_a * gate}

    def backward(self, params: dict[str, Array], cache: tuple[Array, ...], delta_a: Array,
                 need_input: bool = True) -> tuple[Array | None, dict[str, Array]]:
        return self.backward_kept(params, cache, delta_a, need_input)[:2]

    def backward_kept(self, params: dict[str, Array], cache: tuple[Array, ...],
                      delta_a: Array, need_input: bool = True
                      ) -> tuple[Array | None, dict[str, Array], dict[str, Array]]:
        """The backward, and the errors at z and u it formed: what K-FAC reads."""
        errors = self._branch_errors(cache, delta_a)
        grads = affine_grads(self, {p: cache[0] for p in _BRANCHES}, errors,
                             params["wg"].dtype)                 # x^T delta_z, x^T delta_u
        if not need_input:
            return None, grads, errors
        return (affine_input_error(self, params, errors, _BRANCHES), grads,
                errors)                                      # delta_z W_g^T + delta_u W_u^T

    def _in_params_dtype(self, params: dict[str, Array], cache: tuple[Array, ...],
                         delta_a: Array) -> tuple[dict[str, Array], dict[str, Array]]:
        """Each branch's input and error, (B, T, ...) positions flat, in the params' dtype."""
        dtype = params["wg"].dtype
        x = token_grads.positions_flat(cache[0].astype(dtype))
        errors = self._branch_errors(cache, delta_a)
        return ({p: x for p in _BRANCHES},
                {p: token_grads.positions_flat(e.astype(dtype)) for p, e in errors.items()})

    def per_sample_grads(self, params: dict[str, Array], cache: tuple[Array, ...],
                         delta_a: Array) -> dict[str, Array]:
        return token_grads.projections_grads(*self._in_params_dtype(params, cache, delta_a),
                                             self.bias)

    def per_sample_sq_norms(self, params: dict[str, Array], cache: tuple[Array, ...],
                            delta_a: Array) -> Array:
        return token_grads.projections_sq_norms(*self._in_params_dtype(params, cache, delta_a),
                                                self.bias)

    def per_sample_sq_norms_and_sum(self, params: dict[str, Array], cache: tuple[Array, ...],
                                    delta_a: Array) -> tuple[Array, Any]:
        """``(B,)`` squared norms of both branches and ``weights -> sum_i w_i g_i``, each
        branch a token-wise weight by the routes of :mod:`jaxbp.layers.token_grads`."""
        return token_grads.projections_sq_norms_and_sum(
            *self._in_params_dtype(params, cache, delta_a), self.bias)

    def kfac_factors(self, params: dict[str, Array], cache: tuple[Array, ...],
                     errors: dict[str, Array], scale: kfac.KfacScale, where: str
                     ) -> dict[str, Any]:
        """A Kronecker block per branch, ``{"g", "u"}``: both read x; their errors ``(k, B,
        ..., units)`` are delta_z and delta_u as :meth:`backward_kept` kept them."""
        return {p: kfac.kronecker_block(cache[0], errors[p], scale, self.bias)
                for p in _BRANCHES}

    def model_axis_fans(self, params: dict[str, Any]) -> tuple[int, int]:
        """``(fan_in, fan_out)`` of both weights (:func:`jaxbp.parallel.layer_splits`)."""
        return tuple(params["wg"].shape)

    def model_axis_specs(self, split: str, axis: str) -> dict[str, Any]:
        """Both branches split alike: a ``"column"`` split over the units (the product
        ``g(z) * u`` stays on each device), a ``"row"`` split over fan_in."""
        from jax.sharding import PartitionSpec

        if split == "column":
            weight, bias = PartitionSpec(None, axis), PartitionSpec(axis)
        else:
            weight, bias = PartitionSpec(axis, None), PartitionSpec()
        specs = {"wg": weight, "wu": weight}
        return {**specs, "bg": bias, "bu": bias} if self.bias else specs

    def feedback_shape(self, in_shape: Shape) -> dict[str, Shape]:
        """A feedback B in each branch's W^T place, ``{"g", "u"}: (units, fan_in)``."""
        return {p: (self.units, in_shape[-1]) for p in _BRANCHES}

    def feedback_params(self, params: dict[str, Array],
                        feedback: dict[str, Array]) -> dict[str, Array]:
        """The params the backward reads: each ``w_p`` replaced by ``B_p^T``."""
        return with_named_feedback(params, feedback)

    def feedback_of(self, params: dict[str, Array], in_shape: Shape) -> dict[str, Array]:
        """``{p: W_p^T}``: the feedback that is backprop."""
        return named_weights_transposed(params, _BRANCHES)
