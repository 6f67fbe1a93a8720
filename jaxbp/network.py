"""Network: any chain of layer records with a loss; its forward pass and the one reversed loop.

.. math::
    a^{(0)} = x, \\quad a^{(l)} = f_l(a^{(l-1)}), \\quad C = \\frac{1}{N}\\sum_n l(a^{(L)}_n, y_n)

    \\delta^{(L)} = \\frac{\\partial C}{\\partial a^{(L)}} = \\frac{1}{N}\\frac{\\partial l}
        {\\partial a^{(L)}}, \\qquad \\delta^{(l-1)} = J_l^\\top \\delta^{(l)}

(the fused ``(p - y) / N`` for the cross-entropies on logits; each layer's
``J^T`` and parameter gradient are its record's hand-written backward,
:mod:`jaxbp.layers`). Nothing here calls JAX's autodiff.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from jaxbp import input_checks
from jaxbp.layers import precision
from jaxbp.layers.base import LayerError, repr_beside_defaults
from jaxbp.layers.chain import (
    chain_backward,
    chain_forward,
    chain_init,
    chain_shapes,
    check_layers,
    takes_key,
)
from jaxbp.losses import (
    LOSSES,
    Loss,
    cost_and_output_error,
    get_loss,
    mean_loss,
    per_sample_losses_and_errors,
)
from jaxbp.tied_embedding import check_tie, layer_params, tied_grads
from jaxbp.types import Array, ArrayLike, PRNGKey, check_bool, is_int

_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclasses.dataclass(frozen=True)
class Network:
    """A chain of layers, an input shape and a loss. Frozen and hashable (a static jit arg).

    Args:
      layers: records of :mod:`jaxbp.layers` (``Dense``, ``Conv2D``, ``MaxPool``,
        ``AvgPool``, ``Flatten``, ``LayerNorm``, ``Residual``).
      input_shape: one sample's shape, e.g. ``(8, 8, 1)`` for NHWC images or
        ``(64,)`` for vectors.
      loss: a name of :data:`jaxbp.LOSSES`; the chain must end in ``(n_out,)``.
      dtype: the floating dtype :meth:`init` gives the parameters.
      input_dtype: None (floating inputs, cast to the params' dtype), or an integer
        dtype such as ``"int32"`` for token inputs (an :class:`~jaxbp.layers.Embedding`
        first): x is then checked to be integers and passed on as it is.
      tie_embedding: the last layer, a ``Dense(vocab)`` head, reads the first layer's
        (an :class:`~jaxbp.layers.Embedding`'s) token table as its weight, transposed:
        ``W_head = E^T`` (GPT-2's tied embedding). The params hold the table once (the
        head's entry has no ``"w"``) and its gradient sums both uses:
        ``dC/dE = scatter(delta_embedding) + (a_head^T delta_head)^T``.
      compute_dtype, activation_dtype: network-wide defaults of the numerical recipe
        for every layer that has these fields and leaves them None (``Dense``,
        ``Conv2D``; ``LayerNorm`` takes the activation dtype; inside ``Residual``
        too): ``compute_dtype="bfloat16"`` alone rounds matmul operands to bf16;
        with ``activation_dtype="bfloat16"`` activations and errors are stored in
        bf16 as well (:mod:`jaxbp.layers.precision`). Params and the loss stay in
        ``dtype``.

    Raises:
      TypeError: a layer that is not a registered record.
      jaxbp.layers.LayerError: a layer that does not fit its input (names
        ``layers[i] (Type)``: a Dense on 4-D activations, a kernel larger
        than a VALID input, a Residual that changes the shape, ...).
      ValueError: an unknown loss or dtype, or an output that is neither a vector
        ``(n_out,)`` nor a sequence ``(T, n_out)`` (a loss per token).
    """

    layers: Sequence[Any]
    input_shape: Sequence[int]
    loss: str = "softmax_cross_entropy"
    dtype: DTypeLike = "float32"
    compute_dtype: DTypeLike | None = None
    activation_dtype: DTypeLike | None = None
    input_dtype: DTypeLike | None = None
    tie_embedding: bool = False

    def __repr__(self) -> str:   # as before where nothing is tied: saved runs still match
        return repr_beside_defaults(self, ("tie_embedding",))

    def __post_init__(self) -> None:
        layers = check_layers(self.layers, "layers")
        precision.check_recipe(self)
        object.__setattr__(self, "layers", precision.with_recipe(
            layers, compute_dtype=self.compute_dtype, activation_dtype=self.activation_dtype))
        shape = self.input_shape
        if (isinstance(shape, str) or not isinstance(shape, Sequence) or not shape
                or not all(is_int(d) and d >= 1
                           for d in shape)):
            raise ValueError(f"input_shape must be a non-empty tuple of ints >= 1 (one "
                             f"sample's shape), got {shape!r}")
        object.__setattr__(self, "input_shape", tuple(int(d) for d in shape))
        if not isinstance(self.loss, str) or self.loss not in LOSSES:
            raise ValueError(f"Unknown loss {self.loss!r}. It needs to be one of "
                             f"{sorted(LOSSES)}.")
        try:
            name = jnp.dtype(self.dtype).name
        except TypeError:
            name = None
        if name not in _FLOAT_DTYPES:
            raise ValueError(f"dtype must be one of {list(_FLOAT_DTYPES)}, got {self.dtype!r}")
        object.__setattr__(self, "dtype", name)
        if self.input_dtype is not None:
            try:
                kind = jnp.dtype(self.input_dtype)
            except TypeError:
                kind = None
            if kind is None or not jnp.issubdtype(kind, jnp.integer):
                raise ValueError(f"input_dtype must be None (floating inputs) or an integer "
                                 f"dtype such as 'int32' (tokens), got {self.input_dtype!r}")
            object.__setattr__(self, "input_dtype", kind.name)
        _check_token_input(self.layers, self.input_dtype)
        out = self.shapes[-1]
        if len(out) not in (1, 2):
            raise LayerError(f"layers[{len(self.layers) - 1}] ({type(self.layers[-1]).__name__})"
                             f": the network must end in a vector (n_out,) or a sequence "
                             f"(T, n_out) for the loss, got {out}; add Flatten() and a Dense")
        check_output_width(self.loss_fn, out[-1], "the last layer's width")
        object.__setattr__(self, "tie_embedding",
                           check_bool("Network tie_embedding", self.tie_embedding))
        if self.tie_embedding:
            check_tie(self.layers, self.shapes, jnp.dtype(self.dtype))

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        """One sample's shape before the first layer and after every layer."""
        return chain_shapes(self.layers, self.input_shape, "layers")

    @property
    def n_out(self) -> int:
        """The width of the output a^L (the number of classes for the cross-entropies)."""
        return self.shapes[-1][-1]

    @property
    def is_sequence(self) -> bool:
        """Whether the output is a sequence (T, n_out): one loss term per token."""
        return len(self.shapes[-1]) == 2

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    @property
    def loss_fn(self) -> Loss:
        return get_loss(self.loss)

    def init(self, key: PRNGKey) -> tuple[Any, ...]:
        """Fresh parameters: a tuple, one entry per layer (``{}`` for a layer without any).

        Dense and Conv2D weights are truncated normals with He (relu family) or
        Glorot variance by their activation, as :meth:`jaxbp.MLP.init`; biases 0;
        LayerNorm scale 1 and bias 0.
        """
        if self.dtype == "float64" and not jax.config.jax_enable_x64:
            raise ValueError("dtype 'float64' needs 64-bit JAX: call "
                             "jax.config.update('jax_enable_x64', True) or use "
                             "`with jax.enable_x64(True):` first")
        input_checks.check_key("key", key)
        params = chain_init(self.layers, key, self.shapes, jnp.dtype(self.dtype))
        if self.tie_embedding:   # the head's weight is the token table: not held twice
            params = (*params[:-1], {k: v for k, v in params[-1].items() if k != "w"})
        return params

    def apply(self, params: Any, x: ArrayLike) -> Array:
        """The network output a^L, (batch, n_out) or (batch, T, n_out)."""
        x, _ = input_checks.check_inputs(self, params, x)
        return forward(self, params, x)[0]

    def cost(self, params: Any, x: ArrayLike, y: ArrayLike) -> Array:
        """C, the mean over the batch of the per-sample loss."""
        x, y = input_checks.check_inputs(self, params, x, y)
        return mean_loss(self.loss_fn, forward(self, params, x)[0], y)

    def param_shapes(self) -> Any:
        """The params' pytree of ``ShapeDtypeStruct`` (no arrays made)."""
        return jax.eval_shape(self.init, jax.random.key(0))


def check_output_width(loss: Loss, n_out: int, where: str) -> None:
    """A loss whose targets are normalised over the outputs (softmax cross-entropy) has
    nothing to learn from one output: its one class has probability 1, the loss is 0 and
    every gradient is 0, so training would run and change nothing."""
    if loss.normalised_targets and n_out == 1:
        raise ValueError(
            f"loss {loss.name!r} normalises over the outputs, and {where} is 1: the "
            f"one class always has probability 1, so the loss and its gradient are 0 and "
            f"nothing trains. For a yes/no target use loss='sigmoid_cross_entropy' with one "
            f"output, or give two outputs")


def as_network(net: Any) -> Network:
    """A :class:`Network` as it is; a :class:`jaxbp.MLP` as its chain of Dense records."""
    return net if isinstance(net, Network) else net.network


DROPOUT_SEED = 0
"""The seed of a training step's dropout masks: step t's key is ``fold_in(key(0), t)``
(:func:`step_key`), so a run's masks are fixed by its steps (resumable, and the same
for the hand-written gradient and jax.grad's)."""


def step_key(net: Network, step: Array) -> Array | None:
    """The key of training step ``step`` for a network that draws randomness (a Dropout
    in it), None for one that does not (its step runs no random op)."""
    if not any(takes_key(layer) for layer in net.layers):
        return None
    return jax.random.fold_in(jax.random.key(DROPOUT_SEED), step)


def forward(net: Network, params: Any, x: Array,
            key: Array | None = None) -> tuple[Array, tuple[Any, ...]]:
    """The output a^L and every layer's cache, for checked inputs; ``key``: a training
    step's (:func:`step_key`: dropout masks drawn), None to evaluate.

    a^L comes back in the params' dtype when the layers stored it in a lower
    activation dtype: the loss and its error are computed in the params' dtype.
    """
    out, caches = chain_forward(net.layers, layer_params(net, params), x, key)
    leaves = jax.tree.leaves(params)
    if leaves and jnp.promote_types(out.dtype, leaves[0].dtype) != out.dtype:
        out = out.astype(leaves[0].dtype)
    return out, caches


def value_grads_and_errors(net: Network, params: Any, x: Array, y: Array,
                           key: Array | None = None
                           ) -> tuple[Array, Any, Array, tuple[Any, ...], tuple[Array, ...]]:
    """C, dC/dparams by the reversed loop over the layer records, a^L, every layer's
    cache and its kept errors, from one pass (checked inputs): the error ``dC/da^l`` at
    its output, or what a record's ``backward_kept`` kept (a Residual's inner layers',
    SelfAttention's at its projections; what K-FAC reads).

    The loss value and ``dl/da`` come from one pass (the fused softmax form); ``key``: a
    training step's (:func:`step_key`), None to evaluate.
    """
    out, caches = forward(net, params, x, key)
    cost, delta = cost_and_output_error(net.loss_fn, out, y)   # dC/da^L = (1/N) dl/da^L
    _, grads, kept = chain_backward(net.layers, layer_params(net, params), caches, delta,
                                    need_input=False, kept=True)
    return cost, tied_grads(net, grads), out, caches, kept


def value_grads_and_output(net: Network, params: Any, x: Array, y: Array,
                           key: Array | None = None) -> tuple[Array, Any, Array]:
    """C, dC/dparams by the reversed loop over the layer records, and a^L (checked inputs;
    ``key``: a training step's)."""
    return value_grads_and_errors(net, params, x, y, key)[:3]


def require_vector_output(net: Any, quantity: str) -> None:
    """A ValueError (at trace time, before XLA) for a quantity defined per sample on vector
    outputs only, asked of a network with a sequence output (T, n_out)."""
    if getattr(as_network(net), "is_sequence", False):
        raise ValueError(f"{quantity} takes networks with a vector output (n_out,); this one "
                         f"ends in a sequence {as_network(net).shapes[-1]} (a loss per token), "
                         f"which it does not cover yet")


def layer_deltas(net: Network, params: Any, x: Array, y: Array,
                 per_sample: bool = False) -> tuple[Array, tuple[Any, ...], tuple[Array, ...]]:
    """``(a^L, caches, deltas)``: every layer's cache and the error at its output.

    ``per_sample=True`` gives each sample's own errors, those of ``l_i`` (not divided by
    the batch; for sequences ``l_i`` is the sum of its tokens' losses over T:
    :func:`jaxbp.losses.per_sample_losses_and_errors`); else those of the cost C.
    """
    if per_sample:
        return per_sample_deltas(net, params, x, y)[1:]
    out, caches = forward(net, params, x)
    delta = cost_and_output_error(net.loss_fn, out, y)[1]
    _, _, deltas = chain_backward(net.layers, layer_params(net, params), caches, delta,
                                  need_input=False)
    return out, caches, deltas


def per_sample_deltas(net: Network, params: Any, x: Array, y: Array,
                      key: Array | None = None
                      ) -> tuple[Array, Array, tuple[Any, ...], tuple[Array, ...]]:
    """``(l, a^L, caches, deltas)``: each sample's loss ``l_i`` (B,) and the errors of
    ``l_i`` at every layer's output, from one forward and one reversed loop (``key``: a
    training step's)."""
    out, caches = forward(net, params, x, key)
    losses, delta = per_sample_losses_and_errors(net.loss_fn, out, y)
    _, _, deltas = chain_backward(net.layers, layer_params(net, params), caches, delta,
                                  need_input=False)
    return losses, out, caches, deltas


def describe(net: Network) -> str:
    """One line: the input, each layer with its output shape, the loss."""
    parts = [f"{type(layer).__name__}->{'x'.join(map(str, shape))}"
             for layer, shape in zip(net.layers, net.shapes[1:])]
    return f"input {'x'.join(map(str, net.input_shape))}: " + ", ".join(parts) + f"; {net.loss}"


def _check_token_input(layers: Sequence[Any], input_dtype: DTypeLike | None) -> None:
    """Integer tokens in, exactly when the first layer takes them (an Embedding): a float
    input reaching a table's rows, or tokens reaching a matmul, is named here rather than
    by JAX's indexing or dot."""
    for i, layer in enumerate(layers):
        if getattr(layer, "takes_tokens", False) and (i > 0 or input_dtype is None):
            where = "must be the first layer" if i > 0 else "takes integer tokens"
            raise LayerError(f"layers[{i}] ({type(layer).__name__}): {where}; a network of "
                             f"tokens starts with it and has input_dtype='int32' "
                             f"(models.gpt builds one)")
    if input_dtype is not None and not getattr(layers[0], "takes_tokens", False):
        raise LayerError(f"layers[0] ({type(layers[0]).__name__}): input_dtype "
                         f"{input_dtype!r} gives integer tokens, which only a first layer "
                         f"that takes them (Embedding) reads")

