"""Activation functions g, each beside its hand-written derivatives g' and g''.

Every record holds the forward map ``g(z)``, ``dg(z, a)``, the derivative
g'(z) given both the pre-activation ``z`` and the output ``a = g(z)``, and
``d2g(z, a)``, the second derivative g''(z) (for Hessian-vector products). Passing
both lets each derivative use whichever is cheaper: sigmoid reads
``a * (1 - a)`` off the cached output, ReLU only looks at the sign of ``z``.
No derivative here calls :mod:`jax`'s autodiff (:func:`register` only compares a user's
derivatives with it, once, when they are added).

At the kinks the derivative is the one ``jax.grad`` takes, so the hand-written
gradient and the reference agree everywhere: ``relu'(0) = 0`` (``jax.nn.relu``'s
custom rule), ``leaky_relu'(0) = 1`` and ``elu'(0) = alpha`` (the branch
``jnp.where`` selects at 0).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxbp import record_checks
from jaxbp.types import Array

LEAKY_RELU_SLOPE = 0.01
ELU_ALPHA = 1.0
_GELU_C = float(np.sqrt(2.0 / np.pi))
_GELU_K = 0.044715


class Activation(NamedTuple):
    """An activation g with its hand-written derivative.

    Attributes:
      name: the registry name, e.g. ``"relu"``.
      g: ``z -> a``, elementwise.
      dg: ``(z, a) -> g'(z)``, elementwise, where ``a = g(z)``.
      he_init: whether ``MLP.init`` draws this layer's weights with He
        (variance 2 / fan_in, the ReLU family) rather than Glorot scaling.
      d2g: ``(z, a) -> g''(z)``, elementwise (0 for the piecewise-linear ones).
    """

    name: str
    g: Callable[[Array], Array]
    dg: Callable[[Array, Array], Array]
    he_init: bool
    d2g: Callable[[Array, Array], Array]


def _identity_dg(z: Array, a: Array) -> Array:
    """identity'(z) = 1."""
    del a
    return jnp.ones_like(z)


def _sigmoid_dg(z: Array, a: Array) -> Array:
    """sigma'(z) = sigma(z) (1 - sigma(z)) = a (1 - a)."""
    del z
    return a * (1 - a)


def _tanh_dg(z: Array, a: Array) -> Array:
    """tanh'(z) = 1 - tanh(z)^2 = 1 - a^2."""
    del z
    return 1 - a * a


def _relu_dg(z: Array, a: Array) -> Array:
    """relu'(z) = 1 if z > 0 else 0 (0 at z = 0, as ``jax.nn.relu``) = [a > 0]: read from
    the output (z > 0 exactly when a = max(z, 0) > 0), so the step need not keep z."""
    del z
    return (a > 0).astype(a.dtype)


def _leaky_relu(z: Array) -> Array:
    """leaky_relu(z) = z if z >= 0 else 0.01 z."""
    return jax.nn.leaky_relu(z, LEAKY_RELU_SLOPE)


def _leaky_relu_dg(z: Array, a: Array) -> Array:
    """leaky_relu'(z) = 1 if z >= 0 else 0.01."""
    del a
    return jnp.where(z >= 0, jnp.ones_like(z), jnp.full_like(z, LEAKY_RELU_SLOPE))


def _elu(z: Array) -> Array:
    """elu(z) = z if z > 0 else alpha (e^z - 1), alpha = 1."""
    return jax.nn.elu(z, ELU_ALPHA)


def _elu_dg(z: Array, a: Array) -> Array:
    """elu'(z) = 1 if z > 0 else alpha e^z = a + alpha; z > 0 exactly when a > 0 (e^z - 1
    <= 0 for z <= 0), so it is read from the output alone."""
    del z
    return jnp.where(a > 0, jnp.ones_like(a), a + ELU_ALPHA)


def _softplus_dg(z: Array, a: Array) -> Array:
    """softplus'(z) = d/dz log(1 + e^z) = sigma(z)."""
    del a
    return jax.nn.sigmoid(z)


def _gelu(z: Array) -> Array:
    """gelu(z) = z/2 (1 + tanh(c (z + k z^3))), c = sqrt(2/pi), k = 0.044715."""
    return jax.nn.gelu(z, approximate=True)


def _gelu_dg(z: Array, a: Array) -> Array:
    """gelu'(z) = (1 + t)/2 + z/2 (1 - t^2) c (1 + 3 k z^2), t = tanh(c (z + k z^3))."""
    del a
    t = jnp.tanh(_GELU_C * (z + _GELU_K * z**3))
    return 0.5 * (1 + t) + 0.5 * z * (1 - t * t) * _GELU_C * (1 + 3 * _GELU_K * z * z)


def _silu_dg(z: Array, a: Array) -> Array:
    """silu'(z) = d/dz z sigma(z) = sigma(z) (1 + z (1 - sigma(z)))."""
    del a
    s = jax.nn.sigmoid(z)
    return s * (1 + z * (1 - s))


def _zero_d2g(z: Array, a: Array) -> Array:
    """g''(z) = 0: identity, and relu / leaky_relu away from the kink (jax's value at it)."""
    del a
    return jnp.zeros_like(z)


def _sigmoid_d2g(z: Array, a: Array) -> Array:
    """sigma''(z) = a (1 - a) (1 - 2a)."""
    del z
    return a * (1 - a) * (1 - 2 * a)


def _tanh_d2g(z: Array, a: Array) -> Array:
    """tanh''(z) = -2 a (1 - a^2)."""
    del z
    return -2 * a * (1 - a * a)


def _elu_d2g(z: Array, a: Array) -> Array:
    """elu''(z) = 0 if z > 0 else alpha e^z = a + alpha (z > 0 exactly when a > 0)."""
    del z
    return jnp.where(a > 0, jnp.zeros_like(a), a + ELU_ALPHA)


def _softplus_d2g(z: Array, a: Array) -> Array:
    """softplus''(z) = sigma(z) (1 - sigma(z))."""
    del a
    s = jax.nn.sigmoid(z)
    return s * (1 - s)


def _gelu_d2g(z: Array, a: Array) -> Array:
    """gelu''(z) = (1 - t^2) u' + z/2 (1 - t^2) (u'' - 2 t u'^2), u = c (z + k z^3), t = tanh u."""
    del a
    t = jnp.tanh(_GELU_C * (z + _GELU_K * z**3))
    du = _GELU_C * (1 + 3 * _GELU_K * z * z)
    d2u = 6 * _GELU_C * _GELU_K * z
    return (1 - t * t) * du + 0.5 * z * (1 - t * t) * (d2u - 2 * t * du * du)


def _silu_d2g(z: Array, a: Array) -> Array:
    """silu''(z) = sigma(z) (1 - sigma(z)) (2 + z (1 - 2 sigma(z)))."""
    del a
    s = jax.nn.sigmoid(z)
    return s * (1 - s) * (2 + z * (1 - 2 * s))


ACTIVATIONS: dict[str, Activation] = {
    act.name: act
    for act in (
        Activation("identity", lambda z: z, _identity_dg, False, _zero_d2g),
        Activation("sigmoid", jax.nn.sigmoid, _sigmoid_dg, False, _sigmoid_d2g),
        Activation("tanh", jnp.tanh, _tanh_dg, False, _tanh_d2g),
        Activation("relu", jax.nn.relu, _relu_dg, True, _zero_d2g),
        Activation("leaky_relu", _leaky_relu, _leaky_relu_dg, True, _zero_d2g),
        Activation("elu", _elu, _elu_dg, True, _elu_d2g),
        Activation("softplus", jax.nn.softplus, _softplus_dg, True, _softplus_d2g),
        Activation("gelu", _gelu, _gelu_dg, True, _gelu_d2g),
        Activation("silu", jax.nn.silu, _silu_dg, True, _silu_d2g),
    )
}
"""Every activation by name, the built-ins and those added by :func:`register`; ``MLP``
and the layers accept exactly these keys."""

_BUILT_IN = frozenset(ACTIVATIONS)


def register(activation: Activation, *, check: bool = True) -> Activation:
    """Add a user's activation to :data:`ACTIVATIONS`: every layer, ``MLP``, the
    per-example, curvature and feedback quantities take it by its name, like a built-in.

    Its derivatives ``dg`` and ``d2g`` are the user's, written by hand, like the
    built-ins'. With ``check`` (the default) they are compared, before any network uses
    them, with ``jax.grad`` of ``g`` and of ``g'`` in float64 at 41 points of [-4.1, 3.9]
    (:mod:`jaxbp.record_checks`): a wrong derivative is refused here, not found in a
    training run.

    Example::

        relu2 = Activation("squared_relu", lambda z: jnp.maximum(z, 0) ** 2,
                           lambda z, a: 2 * jnp.maximum(z, 0), True,
                           lambda z, a: 2.0 * (z > 0))
        activations.register(relu2)
        jaxbp.MLP((64, 128, 10), activation="squared_relu")

    A name is registered once for the life of the process (a compiled step keyed on a
    network would keep using the first one); built-ins cannot be replaced.

    Raises:
      TypeError: not an :class:`Activation`, a part that is not a function, or
        ``he_init`` not a bool.
      ValueError: the name is empty or taken, or a derivative differs from jax.grad's.
    """
    if not isinstance(activation, Activation):
        raise TypeError(f"activation must be a jaxbp.activations.Activation(name, g, dg, "
                        f"he_init, d2g), got {type(activation).__name__}")
    record_checks.check_fields("activation", activation.name, activation,
                               ("g", "dg", "d2g"), (), ("he_init",))
    record_checks.check_unregistered("activation", activation.name, ACTIVATIONS, _BUILT_IN)
    if check:
        record_checks.check_activation(activation)
    ACTIVATIONS[activation.name] = activation
    return activation


def get_activation(name: str) -> Activation:
    """The registered activation called ``name``.

    Raises:
      ValueError: ``name`` is not one of :data:`ACTIVATIONS`.
    """
    try:
        return ACTIVATIONS[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"Unknown activation {name!r}. It needs to be one of {sorted(ACTIVATIONS)} (a "
            f"function of your own, with its derivatives: jaxbp.activations.register)."
        ) from None
