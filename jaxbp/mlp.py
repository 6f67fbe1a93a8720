"""The multi-layer perceptron: a builder of a :class:`jaxbp.Network` of Dense records.

An ``MLP`` is a static description (sizes, activations, loss, dtypes) and its
parameter draw; every computation on it (forward pass, the one reversed loop,
per-example quantities, curvature) runs on :attr:`MLP.network`, the same net as
a chain of :class:`~jaxbp.layers.Dense` records with the same params.
Batch-first, row vectors, as everywhere in jaxbp:

.. math::
    z^l = a^{l-1} W^l + b^l, \\qquad a^l = g^l(z^l), \\qquad a^0 = x

with ``W^l: (fan_in, fan_out)`` and ``b^l: (fan_out,)``. The textbook's weight
``w_jk`` (from node k of layer l-1 to node j of layer l) is ``W^l[k, j]``.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from jax.typing import DTypeLike

from jaxbp import input_checks
from jaxbp.activations import ACTIVATIONS, Activation, get_activation
from jaxbp.layers.base import TRUNCATED_NORMAL_STD
from jaxbp.layers.dense import Dense
from jaxbp.losses import LOSSES, Loss, get_loss
from jaxbp.network import Network, check_output_width
from jaxbp.types import Array, ArrayLike, Params, PRNGKey, is_int

_FLOAT_DTYPES = ("float16", "bfloat16", "float32", "float64")


@dataclasses.dataclass(frozen=True)
class MLP:
    """A fully connected network: sizes, activations, loss. Frozen and hashable.

    Being hashable, an ``MLP`` can be a static argument of :func:`jax.jit`
    (``jax.jit(f, static_argnums=0)``). It holds no parameters: those are the
    pytree :meth:`init` returns.

    Args:
      sizes: ``(n_in, hidden_1, ..., n_out)``, at least two ints >= 1.
      activation: one name for every hidden layer, or a sequence with one name
        per hidden layer (``len(sizes) - 2`` of them). Names: see
        :data:`jaxbp.activations.ACTIVATIONS`.
      output_activation: the activation g^L of the output layer.
      loss: one of :data:`jaxbp.losses.LOSSES`. The cross-entropies read
        the network output a^L as logits.
      dtype: the floating dtype :meth:`init` gives the parameters. The
        forward and backward passes run in the dtype of the params they get.
      compute_dtype: None, or a lower precision for the matrix multiplies
        only (mixed precision, e.g. ``"bfloat16"`` with float32 params): both
        operands of every matmul are rounded to it and the products are
        accumulated in the params' dtype (``preferred_element_type``); params
        (the master weights), activations, deltas and gradients stay in the
        params' dtype. See :mod:`jaxbp.layers.precision`.
      activation_dtype: None, or the dtype activations, pre-activations and
        errors are stored in (``"bfloat16"`` with ``compute_dtype="bfloat16"``:
        the bf16 recipe of flax's ``Dense(dtype=bfloat16)`` and jmp's bf16
        policy; matmul outputs in bf16, weight gradients accumulated in float32
        and rounded once to bf16, the loss in the params' dtype). See
        :mod:`jaxbp.layers.precision`.

    Raises:
      ValueError: a size < 1, fewer than two sizes, an unknown activation,
        loss or dtype, or an activation sequence of the wrong length.
      TypeError: sizes that are not integers.
    """

    sizes: Sequence[int]
    activation: str | Sequence[str] = "relu"
    output_activation: str = "identity"
    loss: str = "softmax_cross_entropy"
    dtype: DTypeLike = "float32"
    compute_dtype: DTypeLike | None = None
    activation_dtype: DTypeLike | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sizes", _checked_sizes(self.sizes))
        if not isinstance(self.activation, str):
            object.__setattr__(self, "activation", _checked_activation_list(
                self.activation, len(self.sizes) - 2))
        else:
            get_activation(self.activation)
        _name_in("output_activation", self.output_activation, ACTIVATIONS)
        _name_in("loss", self.loss, LOSSES)
        check_output_width(get_loss(self.loss), self.sizes[-1], "sizes[-1]")
        object.__setattr__(self, "dtype", _checked_dtype(self.dtype))
        if self.compute_dtype is not None:
            object.__setattr__(self, "compute_dtype",
                               _checked_dtype(self.compute_dtype, "compute_dtype"))
        if self.activation_dtype is not None:
            object.__setattr__(self, "activation_dtype",
                               _checked_dtype(self.activation_dtype, "activation_dtype"))

    @property
    def n_layers(self) -> int:
        """L, the number of weight layers (``len(sizes) - 1``)."""
        return len(self.sizes) - 1

    @property
    def n_out(self) -> int:
        """The output width, ``sizes[-1]`` (the number of classes for the cross-entropies)."""
        return self.sizes[-1]

    @property
    def input_shape(self) -> tuple[int, ...]:
        """One sample's shape, ``(n_in,)``."""
        return (self.sizes[0],)

    @functools.cached_property
    def network(self) -> Network:
        """The same net as a :class:`jaxbp.Network` of :class:`~jaxbp.layers.Dense` layers.

        Its params are this MLP's params (the same tuple of ``{"w", "b"}``), and
        every computation on an MLP runs through it: the forward pass and the
        one reversed loop over the Dense records.
        """
        names = (*self.hidden_activations, self.output_activation)
        return Network(tuple(Dense(units, act, self.compute_dtype, self.activation_dtype)
                             for units, act in zip(self.sizes[1:], names)),
                       self.input_shape, self.loss, self.dtype)

    @property
    def hidden_activations(self) -> tuple[str, ...]:
        """The activation name of each hidden layer, ``len(sizes) - 2`` of them."""
        if isinstance(self.activation, str):
            return (self.activation,) * (len(self.sizes) - 2)
        return self.activation

    @property
    def activations(self) -> tuple[Activation, ...]:
        """The records ``(g^1, ..., g^L)``, the output activation last."""
        names = (*self.hidden_activations, self.output_activation)
        return tuple(get_activation(name) for name in names)

    @property
    def loss_fn(self) -> Loss:
        """The loss record named by :attr:`loss`."""
        return get_loss(self.loss)

    def init(self, key: PRNGKey) -> Params:
        """Fresh parameters: He (ReLU family) or Glorot weights, zero biases.

        A layer's scheme follows its own activation g^l: ``Var(W) = 2 / fan_in``
        (He et al. 2015) for relu, leaky_relu, elu, softplus, gelu and silu;
        ``Var(W) = 2 / (fan_in + fan_out)`` (Glorot and Bengio 2010) for
        identity, sigmoid and tanh. Weights are normals truncated at two
        standard deviations and rescaled to that variance, as
        :func:`jax.nn.initializers.variance_scaling` draws them, but all
        layers come from one draw (one small compiled program per net).

        Args:
          key: a PRNG key (``jax.random.key`` or ``jax.random.PRNGKey``).

        Returns:
          A tuple of L dicts ``{"w": (fan_in, fan_out), "b": (fan_out,)}``.

        Raises:
          ValueError: ``dtype`` is float64 while 64-bit JAX is off.
        """
        if self.dtype == "float64" and not jax.config.jax_enable_x64:
            raise ValueError("dtype 'float64' needs 64-bit JAX: call "
                             "jax.config.update('jax_enable_x64', True) or use "
                             "`with jax.enable_x64(True):` first")
        input_checks.check_key("key", key)
        return _init(self, key)

    def apply(self, params: Params, x: ArrayLike) -> Array:
        """The network output a^L.

        Args:
          params: as :meth:`init` returns.
          x: (batch, n_in), floating; cast to the params' dtype.

        Returns:
          (batch, n_out) a^L (logits when the loss is a cross-entropy).
        """
        from jaxbp import input_checks, network

        x, _ = input_checks.check_inputs(self, params, x)
        return network.forward(self.network, params, x)[0]

    def cost(self, params: Params, x: ArrayLike, y: ArrayLike) -> Array:
        """The scalar cost C = (1/N) sum_n l(a^L_n, y_n).

        Args:
          params: as :meth:`init` returns.
          x: (batch, n_in), floating.
          y: (batch, n_out) targets, or (batch,) integer labels for
            ``softmax_cross_entropy``.

        Returns:
          A scalar of the params' dtype.
        """
        from jaxbp import input_checks, network
        from jaxbp.losses import mean_loss

        x, y = input_checks.check_inputs(self, params, x, y)
        return mean_loss(self.loss_fn, network.forward(self.network, params, x)[0], y)


Net = MLP | Network
"""A network description: every step, quantity and check takes either (an MLP builds a
Network of Dense records)."""


@functools.partial(jax.jit, static_argnums=0)
def _init(net: MLP, key: PRNGKey) -> Params:
    dtype = jnp.dtype(net.dtype)
    fans = list(zip(net.sizes[:-1], net.sizes[1:]))
    unit = jax.random.truncated_normal(
        key, -2.0, 2.0, (sum(i * o for i, o in fans),), jnp.float32) / TRUNCATED_NORMAL_STD
    params, start = [], 0
    for act, (fan_in, fan_out) in zip(net.activations, fans):
        # He: Var(W) = 2 / fan_in; Glorot: Var(W) = 2 / (fan_in + fan_out).
        variance = 2.0 / fan_in if act.he_init else 2.0 / (fan_in + fan_out)
        w = unit[start:start + fan_in * fan_out].reshape(fan_in, fan_out) * variance**0.5
        params.append({"w": w.astype(dtype), "b": jnp.zeros((fan_out,), dtype)})
        start += fan_in * fan_out
    return tuple(params)


def _checked_sizes(sizes: Any) -> tuple[int, ...]:
    if isinstance(sizes, str) or not isinstance(sizes, Sequence):
        raise TypeError(f"sizes must be a sequence of ints (n_in, ..., n_out), "
                        f"got {type(sizes).__name__}: {sizes!r}")
    bad_type = [s for s in sizes if not is_int(s)]
    if bad_type:
        raise TypeError(f"sizes must hold ints, got {sizes!r} "
                        f"(not ints: {bad_type!r})")
    if len(sizes) < 2:
        raise ValueError(f"sizes must have at least 2 entries (n_in, n_out), got {tuple(sizes)}")
    if min(sizes) < 1:
        raise ValueError(f"sizes must all be >= 1, got {tuple(sizes)}")
    return tuple(int(s) for s in sizes)


def _checked_activation_list(names: Any, n_hidden: int) -> tuple[str, ...]:
    if not isinstance(names, Sequence):
        raise TypeError(f"activation must be a name or a sequence of names, "
                        f"got {type(names).__name__}")
    names = tuple(names)
    if len(names) != n_hidden:
        raise ValueError(f"activation has {len(names)} names but expected {n_hidden}, "
                         f"one per hidden layer (len(sizes) - 2), got {names!r}")
    for i, name in enumerate(names):
        _name_in(f"activation[{i}]", name, ACTIVATIONS)
    return names


def _name_in(arg: str, name: Any, registry: dict[str, Any]) -> None:
    if not isinstance(name, str) or name not in registry:
        raise ValueError(f"Unknown {arg} {name!r}. It needs to be one of {sorted(registry)}.")


def _checked_dtype(dtype: Any, arg: str = "dtype") -> str:
    try:
        name = jnp.dtype(dtype).name
    except TypeError:
        name = None
    if name not in _FLOAT_DTYPES:
        raise ValueError(f"{arg} must be one of {list(_FLOAT_DTYPES)}, got {dtype!r}")
    return name
