"""Gradient sources: what a train step asks for its gradient, as one protocol.

A source returns a :class:`SourceResult`::

    source(net, params, x, y, step, mask=None) -> SourceResult(loss, grads, output, extras)

Each source here checks its inputs as :func:`jaxbp.backprop` does: a train step checks
them first, when it is traced, and a direct call gets the same named errors, labels
included. ``step`` is the int32 update count (sources that draw fresh randomness each
step fold it into their key); ``mask`` (B,) bool marks the real rows of a padded batch
(a source that cannot take one raises a ``TypeError`` for it); ``extras`` is a dict the
train step passes to ``optimizer.update`` as keyword arguments (K-FAC's factors). Every
source here runs the hand-written recursion except :func:`autodiff`, the reference. A
user's own source may return a plain ``(loss, grads, output)`` or
``(loss, grads, output, extras)`` tuple: :func:`as_result` reads either.

=========================  ====================================================
``backprop()``             the one reversed loop over the layer records
``autodiff()``             ``jax.value_and_grad`` of the same cost (the reference)
``clipped(C)``             the mean of per-example gradients clipped to C, one pass
``dp_sgd(C, sigma, key)``  clipped sum plus Gaussian noise (Abadi et al. 2016);
                           with ``expected_batch_size`` the Poisson-sampled variant;
                           with ``microbatch=m`` the real rows only, m at a time
``kfac(kind, key)``        the gradient and the K-FAC factors for the optimizer
``alignment(B)``, ...      the feedback rules of :mod:`jaxbp.feedback`
=========================  ====================================================
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple, Protocol, runtime_checkable

import jax
import jax.numpy as jnp

from jaxbp import autodiff as _autodiff_module
from jaxbp import backprop as _backprop_module
from jaxbp import input_checks, network, per_example
from jaxbp import microbatch as microbatched
from jaxbp.types import Array, Params, PRNGKey, check_int

__all__ = ["NAMED", "GradientSource", "SourceResult", "as_result", "autodiff", "backprop",
           "clipped", "dp_sgd"]


class SourceResult(NamedTuple):
    """What a gradient source returns.

    Attributes:
      loss: the scalar cost C of the batch (the mean over its real rows).
      grads: the update direction, shaped like the params.
      output: a^L, for the step's metrics without a second forward pass.
      extras: keyword arguments for ``optimizer.update`` (empty for most sources).
    """

    loss: Array
    grads: Params
    output: Array
    extras: dict[str, Any] = {}  # noqa: RUF012 (never mutated; an empty pytree under jit)


@runtime_checkable
class GradientSource(Protocol):
    """``(net, params, x, y, step, mask=None) -> SourceResult`` for checked inputs."""

    def __call__(self, net: Any, params: Params, x: Array, y: Array, step: Array,
                 **kwargs: Any) -> SourceResult: ...


def as_result(value: Any, source: Any = None) -> SourceResult:
    """A source's return value as a :class:`SourceResult` (a 3- or 4-tuple accepted)."""
    if isinstance(value, SourceResult):
        return value
    if isinstance(value, tuple) and len(value) in (3, 4):
        extras = value[3] if len(value) == 4 else {}
        if not isinstance(extras, Mapping):
            raise TypeError(f"a gradient source's fourth element must be a dict of keyword "
                            f"arguments for optimizer.update, got {type(extras).__name__} "
                            f"from {_name(source)}")
        return SourceResult(value[0], value[1], value[2], extras)
    raise TypeError(f"a gradient source must return (loss, grads, output[, extras]), got "
                    f"{type(value).__name__} from {_name(source)}")


def _positive_number(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0 \
            or value == float("inf"):
        raise ValueError(f"expected_batch_size must be a finite number > 0, got {value!r}")
    return float(value)


def _name(source: Any) -> str:
    return getattr(source, "__qualname__", type(source).__name__)


def _no_mask(name: str, mask: Array | None) -> None:
    if mask is not None:
        raise TypeError(f"the {name} source takes no mask (padded batches): use "
                        f"jaxbp.sources.dp_sgd(..., expected_batch_size=...) for "
                        f"Poisson-sampled batches")


def check_mask(name: str, mask: Any, shape: tuple[int, ...], rows: str) -> Array:
    """A padded batch's mask (or a loop's masks) as an array: booleans of ``shape``, one per
    row of ``rows`` (a shorter one broadcast, an int or a float one weighed the rows)."""
    mask = input_checks.as_array(name, mask)
    if tuple(jnp.shape(mask)) != tuple(shape) or jnp.result_type(mask) != jnp.bool_:
        raise ValueError(f"{name} must be booleans of shape {tuple(shape)} (one per row of "
                         f"{rows}), got {jnp.result_type(mask)} {tuple(jnp.shape(mask))}")
    return jnp.asarray(mask)


def _check_mask(mask: Any, x: Array) -> None:
    if mask is not None:
        check_mask("mask", mask, jnp.shape(x)[:1], "x")


def _unmasked(name: str, value_grads_and_output: Any) -> GradientSource:
    """A source of ``value_grads_and_output(net, params, x, y, key) -> (C, grads, a^L)``,
    the key step ``step``'s (:func:`jaxbp.network.step_key`: dropout masks)."""
    def gradient(net: Any, params: Params, x: Array, y: Array, step: Array,
                 mask: Array | None = None) -> SourceResult:
        x, y = input_checks.check_inputs(net, params, x, y)   # called directly: named errors
        _no_mask(name, mask)
        key = network.step_key(network.as_network(net), step)
        return SourceResult(*value_grads_and_output(net, params, x, y, key))

    gradient.__qualname__ = f"sources.{name}"
    return gradient


def backprop() -> GradientSource:
    """The hand-written recursion: C, dC/dparams and a^L from one forward and one backward."""
    return _unmasked("backprop", _backprop_module.value_grads_and_output)


def autodiff() -> GradientSource:
    """``jax.value_and_grad`` of the same forward pass and loss: the reference."""
    return _unmasked("autodiff", _autodiff_module.value_grads_and_output)


def clipped(clip_norm: per_example.ClipNorm) -> GradientSource:
    """The mean of per-example gradients, each clipped to ``clip_norm``, in one backward
    pass (:func:`jaxbp.clipped_grad`). With a mask, the mean over the real rows."""
    per_example.check_clip_values(clip_norm)

    def gradient(net: Any, params: Params, x: Array, y: Array, step: Array,
                 mask: Array | None = None) -> SourceResult:
        x, y = input_checks.check_inputs(net, params, x, y)   # called directly: named errors
        clip = per_example.check_clip_norm(net, clip_norm)
        _check_mask(mask, x)
        count = None if mask is None else jnp.maximum(jnp.sum(mask), 1)
        chain = network.as_network(net)
        return SourceResult(*per_example.clipped_mean(chain, params, x, y, clip, mask, count,
                                                      network.step_key(chain, step)))

    gradient.__qualname__ = "sources.clipped"
    return gradient


def dp_sgd(clip_norm: per_example.ClipNorm, noise_multiplier: float, key: PRNGKey,
           expected_batch_size: float | None = None,
           microbatch: int | None = None) -> GradientSource:
    """DP-SGD (Abadi et al. 2016): the clipped sum plus Gaussian noise, fresh each step.

    .. math::
        \\tilde g = \\frac{1}{B}\\Big(\\sum_i m_i\\, \\mathrm{clip}_C(g_i)
        + \\mathcal{N}(0, \\sigma^2 C^2 I)\\Big)

    with ``m_i`` the mask (1 without one), ``C = sqrt(sum_l C_l^2)`` for per-layer
    norms, and the noise of step t from ``fold_in(key, t)`` (reproducible, resumable).
    B is ``expected_batch_size`` when given (qN, the divisor the accountant assumes for
    Poisson-sampled, padded batches: :mod:`jaxbp.privacy`), else the batch given (its
    real rows under a mask). One
    forward and one backward pass (the book-keeping of :func:`jaxbp.clipped_grad`).
    The reported loss is the mean over the real rows (not private).

    ``microbatch=m``: only the real rows of a masked batch run, m at a time
    (:mod:`jaxbp.microbatch`): the padding of a Poisson batch costs nothing but the
    rounding up to a multiple of m; the same gradient up to the order of its sum.
    """
    per_example.check_clip_values(clip_norm)
    per_example.check_noise(noise_multiplier)
    input_checks.check_key("key", key)
    expected = None if expected_batch_size is None else _positive_number(expected_batch_size)
    check_int("microbatch", microbatch, 1, optional=True)

    # two closures, so that a run record (jaxbp.train.run_config, which describes a source
    # by its closure) of a whole-batch source is the one it has always been
    if microbatch is None:
        def gradient(net: Any, params: Params, x: Array, y: Array, step: Array,
                     mask: Array | None = None) -> SourceResult:
            return _noised_clipped_mean(net, params, x, y, step, mask, clip_norm,
                                        noise_multiplier, key, expected, None)
    else:
        def gradient(net: Any, params: Params, x: Array, y: Array, step: Array,
                     mask: Array | None = None) -> SourceResult:
            return _noised_clipped_mean(net, params, x, y, step, mask, clip_norm,
                                        noise_multiplier, key, expected, int(microbatch))

    gradient.__qualname__ = "sources.dp_sgd"
    gradient.private = True   # its gradient only: the step keeps the batch loss from the
    return gradient           # optimizer (jaxbp.train.state.optimizer_update)


def _noised_clipped_mean(net: Any, params: Params, x: Array, y: Array, step: Array,
                         mask: Array | None, clip_norm: Any, noise_multiplier: Any,
                         key: PRNGKey, expected: float | None,
                         microbatch: int | None) -> SourceResult:
    """:func:`dp_sgd`'s gradient: the clipped sum of the real rows (all at once, or
    ``microbatch`` at a time), the noise of step ``step``, over the divisor."""
    x, y = input_checks.check_inputs(net, params, x, y)   # called directly: named errors
    clip, sigma = per_example.check_noise_and_clip(net, clip_norm, noise_multiplier)
    _check_mask(mask, x)
    divisor = expected if expected is not None else (
        x.shape[0] if mask is None else jnp.maximum(jnp.sum(mask), 1))
    chain = network.as_network(net)
    masks_key = network.step_key(chain, step)            # dropout's, not the noise's
    if microbatch is None:
        value, grads, out = per_example.clipped_mean(chain, params, x, y, clip, mask, divisor,
                                                     masks_key)
    else:
        value, grads, out = microbatched.clipped_mean(chain, params, x, y, clip, mask, divisor,
                                                      microbatch, masks_key)
    noisy = per_example.add_noise(grads, jax.random.fold_in(key, step),
                                  per_example.noise_std(clip, sigma), divisor)
    return SourceResult(value, noisy, out)


_ELSEWHERE = {"kfac": ("jaxbp.curvature", "kfac_gradient"),
              "alignment": ("jaxbp.feedback", "alignment"),
              "sign_symmetry": ("jaxbp.feedback", "sign_symmetry"),
              "direct": ("jaxbp.feedback", "direct")}


def __getattr__(name: str) -> Any:
    """The sources that live beside their quantity (K-FAC, the feedback rules), by name here
    too (imported on first use: those modules build on this one)."""
    if name in _ELSEWHERE:
        import importlib

        module, attr = _ELSEWHERE[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'jaxbp.sources' has no attribute {name!r}")


NAMED: dict[str, GradientSource] = {"backprop": backprop(), "autodiff": autodiff()}
"""The sources a train step takes by name (``grad="backprop"`` or ``"autodiff"``)."""
