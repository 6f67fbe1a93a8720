"""The values of concrete data: class labels, target probabilities, tokens, finiteness.

Shapes and dtypes are static and checked at trace time (:mod:`jaxbp.input_checks`);
values are known only for concrete arrays, so these checks run on host arrays in NumPy
and on device arrays with one reduction, and leave tracers alone (a compiled train step
reports bad labels as its ``invalid_labels`` metric instead).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np

if TYPE_CHECKING:
    from jaxbp.mlp import Net


def is_concrete(value: Any) -> bool:
    return not isinstance(value, jax.core.Tracer)


def first_bad(bad: Any) -> tuple[int, int]:
    """(count, first flat index) of a boolean mask, host or device (one small sync).

    Under an outer ``jax.jit`` even a closed-over concrete array gives a traced mask:
    its values are not known at trace time, so nothing is reported (0, 0); nor in an
    empty mask (a zero-size array holds no bad entry).
    """
    if isinstance(bad, jax.core.Tracer) or np.size(bad) == 0:   # nothing to report
        return 0, 0
    if isinstance(bad, jax.Array):
        count, first = jax.device_get((jnp.sum(bad), jnp.argmax(jnp.ravel(bad))))
        return int(count), int(first)
    flat = np.flatnonzero(bad)
    return int(flat.size), int(flat[0]) if flat.size else 0


def first_bad_entry(what: str, value: Any, bad: Any, kind: type = float) -> tuple[int, str]:
    """``(count, "what[i, j] = v")`` for the first True of ``bad`` (a mask over ``value``),
    ``(0, "")`` when there is none (or its values are unknown: a tracer)."""
    count, i = first_bad(bad)
    if not count:
        return 0, ""
    at = np.unravel_index(i, np.shape(value))
    return count, f"{what}[{', '.join(map(str, at))}] = {kind(value[at])}"


def check_finite(value: Any, what: str) -> None:
    """A concrete floating array holds no NaN or inf (integers and tracers pass).

    For whole data sets (``fit``): one non-finite input or target makes every loss it
    enters NaN, which training would report steps later as a gradient that is not
    finite, and evaluation as a NaN loss each epoch. For the points the checkers
    differentiate at (``verify_grads``, ``verify_vjp``): every comparison there is NaN.

    Raises:
      ValueError: naming the first non-finite entry and how many there are.
    """
    if not is_concrete(value) or not jnp.issubdtype(value.dtype, jnp.inexact):
        return
    xp = jnp if isinstance(value, jax.Array) else np
    count, entry = first_bad_entry(what, value, ~xp.isfinite(value))
    if count:
        raise ValueError(f"{what} holds values that are not finite: {entry} ({count} not "
                         f"finite)")


def target_tolerance(dtype: Any) -> float:
    """How far a target value may sit from a bound (0, 1, a row sum of 1) in ``dtype``.

    Rounding each of a row's probabilities ``p_j`` to the dtype moves their sum by at
    most ``sum_j p_j eps / 2 = eps / 2``, and a softmax computed in the dtype can
    exceed 1 by an ulp; so the bounds hold within ``eps`` of the dtype (bfloat16:
    7.8e-3, float16: 9.8e-4), and never tighter than 1e-3 for row sums.
    """
    dtype = np.dtype(dtype)
    return float(jnp.finfo(dtype).eps) if jnp.issubdtype(dtype, jnp.floating) else 0.0


def check_target_values(net: Net, y: Any, what: str = "y") -> None:
    """Check the values of concrete targets against the loss (tracers are left alone).

    * integer labels (softmax cross-entropy): in ``[0, n_out)``; another value
      selects no class and would count as a zero loss;
    * sigmoid cross-entropy targets: probabilities in ``[-tol, 1 + tol]``;
    * softmax cross-entropy rows: probabilities in ``[-tol, 1 + tol]`` summing to 1
      within ``max(1e-3, tol)``; other targets give a loss that can go negative.

    ``tol`` is :func:`target_tolerance` of ``y``'s dtype (the rounding of the
    targets' own dtype: soft labels in bfloat16 or float16 are never refused).
    Host arrays are checked in NumPy; a device array with one reduction and one
    small transfer. Inside ``jax.jit`` values are unknown: compiled train
    steps report bad labels as the ``invalid_labels`` metric instead.

    Raises:
      ValueError: naming the first bad entry and how many there are.
    """
    if not is_concrete(y):
        return
    xp = jnp if isinstance(y, jax.Array) else np
    n_out = net.n_out
    name = net.loss
    if np.ndim(y) == label_rank(net) == 2 and jnp.issubdtype(y.dtype, jnp.integer):
        count, entry = first_bad_entry(what, y, (y < -1) | (y >= n_out), int)
        if count:
            raise ValueError(f"{what} holds labels outside [-1, {n_out}) (-1: an ignored "
                             f"token): {entry} ({count} out of range); n_out = {n_out}")
        return
    if np.ndim(y) == 1 and jnp.issubdtype(y.dtype, jnp.integer):
        count, i = first_bad((y < 0) | (y >= n_out))
        if count:
            raise ValueError(f"{what} holds labels outside [0, {n_out}): {what}[{i}] = "
                             f"{int(y[i])} ({count} out of range); {n_out_words(net)}")
        return
    loss = net.loss_fn
    if not loss.probability_targets:
        return
    tol = target_tolerance(y.dtype)
    count, entry = first_bad_entry(what, y, ~((y >= -tol) & (y <= 1 + tol)))
    if count:
        raise ValueError(f"{what} must hold probabilities in [0, 1] for loss {name!r} "
                         f"(within {tol:.2g} for {y.dtype}): {entry} ({count} outside); "
                         f"squared-error targets with a cross-entropy give a loss that can "
                         f"go negative")
    if loss.normalised_targets:
        sum_tol = max(1e-3, tol)
        sums = xp.sum(y, axis=-1, dtype=xp.float32)
        count, i = first_bad(xp.abs(sums - 1) > sum_tol)
        if count:
            raise ValueError(f"{what} rows must sum to 1 (one-hot or probabilities) for loss "
                             f"{name!r} (within {sum_tol:.2g} for {y.dtype}): row {i} sums "
                             f"to {float(sums[i]):.6g} ({count} rows do not)")


def n_out_words(net: Any) -> str:
    return f"n_out = sizes[-1] = {net.n_out}" if hasattr(net, "sizes") else f"n_out = {net.n_out}"


def token_vocab(net: Any) -> int | None:
    """The vocab of a network whose first layer takes integer tokens (an Embedding: a
    Network has an integer ``input_dtype`` exactly then), else None."""
    if getattr(net, "input_dtype", None) is None:
        return None
    return net.layers[0].vocab


def check_token_values(net: Any, x: Any, what: str = "x") -> None:
    """Concrete tokens of a network that starts with an Embedding: in ``[0, vocab)``.
    Another value selects no row of the table: indexing would clamp it (or, negative,
    count from the end) to another token's row, silently. Host arrays in NumPy, a device
    array with one reduction; tracers are left alone.

    Raises:
      ValueError: naming the first bad token and how many there are.
    """
    vocab = token_vocab(net)
    if vocab is None or not is_concrete(x):
        return
    count, entry = first_bad_entry(what, x, (x < 0) | (x >= vocab), int)
    if count:
        raise ValueError(f"{what} holds tokens outside [0, {vocab}): {entry} ({count} out of "
                         f"range); the Embedding's vocab is {vocab}")


def label_rank(net: Any) -> int:
    """The rank of integer class labels: (batch,), or (batch, T) for a sequence output."""
    return 2 if getattr(net, "is_sequence", False) else 1
