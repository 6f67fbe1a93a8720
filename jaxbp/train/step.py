"""Training: a pure TrainState, the jitted step, k steps in one scan, evaluation.

One step, for any optax ``GradientTransformation``:

.. math::
    (C, g) = \\text{backprop}(\\theta_t; x, y), \\quad
    (u, s_{t+1}) = \\text{update}(g, s_t, \\theta_t), \\quad
    \\theta_{t+1} = \\theta_t + u

The step is a pure function ``(state, x, y) -> (state, metrics)`` compiled
once; :func:`make_train_loop` runs k of them inside one ``lax.scan`` (no
Python between steps: the benchmarkable unit). The epoch loop with progress,
evaluation, checkpoints and plots is :func:`jaxbp.train.fit.fit`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbp import input_checks, network, sources, value_checks
from jaxbp.losses import sample_sums
from jaxbp.matmul_precision import check_precision, precision_scope
from jaxbp.mlp import Net
from jaxbp.sources import GradientSource
from jaxbp.train.state import (
    TrainState,
    check_extras_used,
    check_opt_state,
    check_optimizer,
    check_state,
    guard_donation,
    optimizer_update,
)
from jaxbp.types import Array, ArrayLike, Params, check_bool, check_int, is_int

GradFn = GradientSource
"""A gradient source: ``(net, params, x, y, step, mask=None) -> SourceResult(loss, grads,
output, extras)`` for checked inputs (see :mod:`jaxbp.sources`); a plain 3- or 4-tuple
is read too."""

GRADIENTS: dict[str, GradFn] = sources.NAMED
"""The gradient sources a train step can use by name: ``"backprop"`` (the hand-written
recursion) and ``"autodiff"`` (``jax.value_and_grad``). Others are passed as a source
(:mod:`jaxbp.sources`: clipped, dp_sgd, kfac, the feedback rules)."""


def gradient_source(grad: str | GradFn) -> GradFn:
    """A source as given, or the one :data:`GRADIENTS` names (else a ValueError)."""
    if callable(grad):
        return grad
    if not isinstance(grad, str):
        raise TypeError(f"grad must be one of {sorted(GRADIENTS)} or a gradient source (a "
                        f"callable (net, params, x, y, step), such as jaxbp.sources.dp_sgd"
                        f"(...)), got {type(grad).__name__}")
    if grad not in GRADIENTS:
        raise ValueError(f"Unknown grad {grad!r}. It needs to be one of {sorted(GRADIENTS)}, "
                         f"or a gradient source: jaxbp.sources.clipped(C), dp_sgd(...), "
                         f"jaxbp.feedback.alignment(B), direct(B), sign_symmetry(), "
                         f"jaxbp.kfac_gradient() (the command line's fa, dfa and sign are "
                         f"the feedback rules).")
    return GRADIENTS[grad]


def _nonfinite_layer(grads: Params) -> Array:
    """Index of the first layer whose grads hold a NaN/inf, or -1 (a layer without params
    is finite)."""
    # one fused reduction per leaf: no copy of the gradient into a concatenated buffer
    bad = jnp.stack([~functools.reduce(jnp.logical_and,
                                       [jnp.all(jnp.isfinite(leaf)) for leaf in
                                        jax.tree.leaves(g)], jnp.bool_(True))
                     for g in grads])
    return jnp.where(jnp.any(bad), jnp.argmax(bad), -1)


def update_step(net: Net, optimizer: optax.GradientTransformation, gradient: GradFn,
                state: TrainState, x: Array, y: Array,
                mask: Array | None = None) -> tuple[TrainState, dict[str, Array]]:
    """One update (uncompiled, for checked inputs): the source's gradient, the optimizer's
    update, and the step's metrics (loss, grad_norm, nonfinite_layer, accuracy, ...)."""
    if mask is None:
        result = sources.as_result(gradient(net, state.params, x, y, state.step), gradient)
    else:  # a padded batch: only the rows where mask is True are samples
        result = sources.as_result(gradient(net, state.params, x, y, state.step, mask=mask),
                                   gradient)
    loss, grads, out, extras = result
    check_opt_state(optimizer, state)
    # a source may hand the optimizer extra arguments (K-FAC factors)
    check_extras_used(optimizer, grads, state, extras)
    updates, opt_state = optimizer_update(optimizer, grads, state, extras, loss,
                                          private=getattr(gradient, "private", False))
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss.astype(jnp.float32),
               "grad_norm": optax.tree.norm(grads).astype(jnp.float32),
               "nonfinite_layer": _nonfinite_layer(grads)}
    _, hits, counts = sample_sums(net.loss_fn, out, y)
    if hits is not None:
        weights = counts if mask is None else counts * mask
        metrics["accuracy"] = jnp.sum(hits * (weights > 0)) / jnp.maximum(jnp.sum(weights), 1)
    metrics.update(_invalid_counts(net, x, y, mask))
    if mask is not None:
        metrics["batch_size"] = jnp.sum(mask, dtype=jnp.int32)
    return TrainState(state.step + 1, params, opt_state), metrics


def sample_rank(net: Net) -> int:
    """The rank of one input sample: 1 for an MLP, ``len(input_shape)`` for a Network."""
    return len(net.input_shape)


def invalid_label_count(labels: Array, n_classes: int, low: int = 0) -> Array:
    """How many integer labels lie outside ``[low, n_classes)`` (int32 scalar).

    Such a label selects no class: its one-hot row is all zeros and its loss
    and error come out as if it were right. Compiled steps cannot raise on a
    value, so they report this count; :func:`jaxbp.fit` stops on it.
    """
    return jnp.sum((labels < low) | (labels >= n_classes), dtype=jnp.int32)


def _invalid_counts(net: Net, x: Array, y: Array, mask: Array | None) -> dict[str, Array]:
    """The values a compiled step cannot raise on (unknown at trace time), counted over the
    batch's samples: ``invalid_labels``, integer labels outside ``[0, n_out)`` (``[-1,
    n_out)`` for a sequence's, -1 an ignored token), and ``invalid_tokens``, tokens outside
    ``[0, vocab)`` (indexing would take another token's row)."""
    def samples(a: Array) -> Array:
        return a if mask is None else jnp.where(mask.reshape(mask.shape + (1,) * (a.ndim - 1)),
                                                a, 0)

    counts = {}
    if jnp.issubdtype(y.dtype, jnp.integer):
        counts["invalid_labels"] = invalid_label_count(samples(y), net.n_out,
                                                       low=-1 if y.ndim == 2 else 0)
    vocab = value_checks.token_vocab(net)
    if vocab is not None:
        counts["invalid_tokens"] = invalid_label_count(samples(x), vocab)
    return counts


def make_train_step(
    net: Net,
    optimizer: optax.GradientTransformation,
    grad: str | GradFn = "backprop",
    donate: bool = True,
    precision: str | None = None,
) -> Callable[[TrainState, ArrayLike, ArrayLike], tuple[TrainState, dict[str, Array]]]:
    """One jitted, pure training step ``(state, x, y) -> (state, metrics)``.

    Args:
      net: the network description.
      optimizer: any optax ``GradientTransformation`` (sgd, adam, chains with
        clipping and schedules, ...).
      grad: ``"backprop"`` (the hand-written recursion), ``"autodiff"``
        (``jax.value_and_grad``), or a :data:`GradFn` such as
        ``jaxbp.sources.dp_sgd(clip_norm, noise_multiplier, key)``.
      donate: donate the input state's buffers to the output (updates in
        place). The state passed in, and any array it shares with other
        objects (the params it was created from), must not be used again.
        False keeps them.
      precision: the matmul precision the step is compiled with
        (``"highest"``, ``"high"``, ``"default"``, or any name of
        :func:`jax.default_matmul_precision`); None keeps JAX's setting. Under
        ``"default"`` float32 matmuls run as TF32 on NVIDIA GPUs and as one
        bf16 pass on TPUs; ``"highest"`` is true float32. No effect on a CPU.

    Returns:
      ``step(state, x, y)``; x: (batch, n_in), y as for ``net.cost``.
      ``metrics`` holds float32 scalars ``loss`` (C before the update),
      ``grad_norm`` (global 2-norm of the gradient), ``accuracy`` for the
      cross-entropies (see :func:`correct`), the int ``nonfinite_layer``
      (first layer whose gradient is not finite, -1 if none) and, for integer
      labels, the int ``invalid_labels`` (labels outside ``[0, n_out)`` in
      the batch, ``[-1, n_out)`` for a sequence's, :func:`invalid_label_count`:
      labels cannot be checked by value inside a compiled step, so a caller must
      look at it; ``fit`` does), and for a GPT's tokens ``invalid_tokens``
      (tokens outside ``[0, vocab)``).

    Inputs are checked when the step is traced (once per shape), before XLA.
    """
    gradient = gradient_source(grad)
    check_optimizer(optimizer)
    check_precision(precision)
    check_bool("donate", donate)

    def step(state: TrainState, x: Array, y: Array) -> tuple[TrainState, dict[str, Array]]:
        check_state(state)
        x, y = input_checks.check_inputs(net, state.params, x, y)
        with precision_scope(precision):
            return update_step(net, optimizer, gradient, state, x, y)

    return guard_donation(jax.jit(step, donate_argnums=(0,) if donate else ()))


class TrainLoop(Protocol):
    """``loop(state, xs, ys, masks=None) -> (state, metrics)``: k steps, one batch per step
    (:func:`make_train_loop`); ``masks`` (k, batch) marks a padded batch's samples."""

    def __call__(self, state: TrainState, xs: ArrayLike, ys: ArrayLike,
                 masks: ArrayLike | None = None) -> tuple[TrainState, dict[str, Array]]: ...


def make_train_loop(
    net: Net,
    optimizer: optax.GradientTransformation,
    steps: int,
    grad: str | GradFn = "backprop",
    donate: bool = True,
    precision: str | None = None,
    unroll: int | bool = 1,
) -> TrainLoop:
    """``steps`` training steps inside one ``lax.scan``, compiled as one program.

    Args:
      net, optimizer, grad, donate, precision: as :func:`make_train_step`.
      steps: k >= 1.
      unroll: steps per iteration of the compiled loop (``lax.scan``'s ``unroll``); True
        unrolls all k (no loop: compile time grows with k). The hand-written step runs as
        fast in a loop as unrolled; ``grad="autodiff"`` of a conv net on a CPU does not:
        XLA:CPU runs jax.grad's backward convolutions inside a loop with a naive emitter,
        20-90x slower (jax-ml/jax#12868), and ``unroll=True`` avoids that.

    Returns:
      ``loop(state, xs, ys) -> (state, metrics)``. ``xs: (k, batch, n_in)``
      and ``ys: (k, batch, ...)`` give one batch per step; ``xs: (batch,
      n_in)`` and ``ys: (batch, ...)`` reuse one batch for all k steps (the
      benchmark setting). Every metric comes back with a leading axis of k.
      ``loop(state, xs, ys, masks)`` trains on padded batches: ``masks``
      (k, batch) bool marks the rows that are samples, and ``grad`` must be a
      source that takes ``mask=`` (the Poisson-sampled DP-SGD of
      :func:`jaxbp.sources.dp_sgd`); metrics then include ``batch_size``.
    """
    steps = check_int("steps", steps, 1)
    if not isinstance(unroll, bool) and (not is_int(unroll) or unroll < 1):
        raise ValueError(f"unroll must be True, False or an int >= 1, got {unroll!r}")
    gradient = gradient_source(grad)
    check_optimizer(optimizer)
    check_precision(precision)
    check_bool("donate", donate)

    def loop(state: TrainState, xs: Array, ys: Array,
             masks: Array | None = None) -> tuple[TrainState, dict[str, Array]]:
        check_state(state)
        xs, ys = input_checks.as_array("xs", xs), input_checks.as_array("ys", ys)
        per_step = np.ndim(xs) == sample_rank(net) + 2  # (k, batch, *sample)
        if per_step and (np.shape(xs)[0] != steps or np.shape(ys)[0] != steps):
            raise ValueError(f"xs has shape {np.shape(xs)} and ys {np.shape(ys)} but expected "
                             f"a leading axis of steps = {steps} (or one batch for all steps)")
        x0, y0 = (xs[0], ys[0]) if per_step else (xs, ys)
        x0, y0 = input_checks.check_inputs(net, state.params, x0, y0)
        # cast like the first batch: x to the params' dtype, targets too, labels stay ints
        xs, ys = (jnp.asarray(xs, x0.dtype), jnp.asarray(ys, y0.dtype)) if per_step else (x0, y0)

        if masks is not None:
            masks = sources.check_mask("masks", masks,
                                       np.shape(xs)[:np.ndim(xs) - sample_rank(net)], "xs")

        def body(state: TrainState, batch: tuple[Array, ...] | None):
            x, y, mask = batch if per_step else (xs, ys, masks)
            return update_step(net, optimizer, gradient, state, x, y, mask)

        with precision_scope(precision):
            return scan(body, state, (xs, ys, masks) if per_step else None, steps, unroll)

    return guard_donation(jax.jit(loop, donate_argnums=(0,) if donate else ()))


def _row(a: Array, i: int) -> Array:
    return a[i]


def scan(body: Callable[[Any, Any], tuple[Any, Any]], carry: Any, xs: Any, length: int,
         unroll: int | bool = 1) -> tuple[Any, Any]:
    """``lax.scan(body, carry, xs, length, unroll)``, but a full unroll (``unroll`` True or
    >= ``length``, a single step included) is the body traced ``length`` times and its
    outputs stacked: JAX emits a one-trip while loop for those, which XLA keeps (and on a
    CPU a loop is what slows jax.grad's convolutions, see :func:`make_train_loop`)."""
    if unroll is not True and length > max(1, unroll):
        return jax.lax.scan(body, carry, xs, length=length, unroll=unroll)
    outs = []
    for i in range(length):
        carry, out = body(carry, jax.tree.map(functools.partial(_row, i=i), xs))
        outs.append(out)
    return carry, jax.tree.map(lambda *steps: jnp.stack(steps), *outs)


@functools.partial(jax.jit, static_argnums=(0, 4))
def _eval_sums(net: Net, params: Params, x: Array, y: Array,
               size: int) -> tuple[Array, Array, Array]:
    """(sum of the losses, sum of hits, count) over all n rows (over their counted tokens
    for sequences), one compiled program: the rows padded to whole batches of ``size``,
    the batches scanned on the device."""
    n = x.shape[0]
    batches = -(-n // size)
    pad = batches * size - n

    def padded(a: Array) -> Array:
        a = jnp.pad(a, ((0, pad), *[(0, 0)] * (a.ndim - 1)))
        return a.reshape(batches, size, *a.shape[1:])

    mask = (jnp.arange(batches * size) < n).reshape(batches, size)

    def body(sums: tuple[Array, ...], batch: tuple[Array, Array, Array]) -> Any:
        x_b, y_b, mask_b = batch
        out = network.forward(network.as_network(net), params, x_b)[0]
        losses, hits, counts = sample_sums(net.loss_fn, out, y_b)
        hits = jnp.zeros_like(losses) if hits is None else hits
        return tuple(total + jnp.sum(v * mask_b)
                     for total, v in zip(sums, (losses, hits, counts))), None

    zero = jnp.zeros((), jnp.float32)
    return jax.lax.scan(body, (zero, zero, zero), (padded(x), padded(y), mask))[0]


def evaluate(
    net: Net, params: Params, x: ArrayLike, y: ArrayLike, batch_size: int = 1024
) -> dict[str, float]:
    """Mean loss (and accuracy for the cross-entropies) over a whole data set.

    One compiled call: the rows are padded to whole batches of ``batch_size``
    (masked: every sample counts once) and the batches scanned on the device; one
    host sync per call. A second call with the same shapes compiles nothing.

    Args:
      net: the network description.
      params: the parameters to evaluate.
      x: (n, n_in); y as for ``net.cost``.
      batch_size: rows per evaluated batch.

    Returns:
      ``{"loss": C, "accuracy": ...}`` as Python floats (accuracy only for
      classification losses); for sequences the means over every counted token, nan
      for both where no target counts (every one -1).
    """
    x, y = input_checks.check_inputs(net, params, x, y)
    return evaluate_checked(net, params, x, y, check_int("batch_size", batch_size, 1))


def evaluate_checked(net: Net, params: Params, x: Array, y: Array,
                     batch_size: int) -> dict[str, float]:
    """:func:`evaluate` for inputs already checked (``fit`` checks its data set once)."""
    return scores_of(net, jax.device_get(eval_sums(net, params, x, y, batch_size)))


def eval_sums(net: Net, params: Params, x: Array, y: Array,
              batch_size: int) -> tuple[Array, Array, Array]:
    """The device sums (loss, hits, count) of :func:`evaluate` on checked inputs,
    dispatched without waiting: ``fit`` reads them with its last chunk's metrics."""
    return _eval_sums(net, params, x, y, min(batch_size, x.shape[0]))


def scores_of(net: Net, sums: tuple[Any, Any, Any]) -> dict[str, float]:
    """``{"loss", "accuracy"}`` from the host copy of :func:`eval_sums`' sums."""
    loss_sum, hit_sum, count = sums
    count = float(count) or float("nan")      # no counted target: no mean (not a loss of 0)
    result = {"loss": float(loss_sum) / count}
    if net.loss_fn.is_classification:
        result["accuracy"] = float(hit_sum) / count
    return result
