"""Gradient checks for any scalar function of any pytree: a gradient vs jax.grad, FD and Taylor.

:func:`verify_grads` puts three independent witnesses against a gradient
function ``grad_fn`` (the "manual" gradient), for a scalar ``loss_fn``:

1. **Reference**: ``jax.grad(loss_fn)`` leaf by leaf. Per leaf it reports the
   largest absolute error ``max_i |m_i - r_i|``, the index where it occurs and
   the normwise relative error ``max_i |m_i - r_i| / max_i |r_i|``. A leaf
   passes when ``max_i |m_i - r_i| <= atol + rtol * max_i |r_i|``. The error is
   measured against the leaf's scale, not elementwise: an element that is
   small only because of cancellation has no meaningful relative error of its own.
2. **Central differences** along random unit directions v:
   ``L(p + h v) - L(p - h v)`` against ``<g, d>`` where ``d`` is the step
   actually taken after rounding ``p +- h v`` to the params' dtype (so rounding
   of the step itself is no error source). The step is chosen per dtype,
   ``h = cbrt(eps) * ||p||`` (1 for p = 0), the balance of truncation (h^2) and
   rounding (eps / h). Tolerance: ``fd_rtol * |<g_ref, d>|`` plus the rounding
   noise ``8 eps |L| / h`` of the two evaluations.
3. **Taylor test** (no step size to tune): the first-order remainder
   ``r(h) = |L(p + h v) - L(p) - <g, d_h>|`` must shrink like h^2 as h halves;
   the measured order is reported and must be >= 1.5. A wrong gradient leaves
   an ``O(h)`` remainder (order 1).

When FD or Taylor are meaningless, the report says so instead of passing:

* In bfloat16/float16 (eps > 1e-4) the rounding noise of L is larger than
  the signal of any usable step, so both are **skipped** and listed as skipped;
  only the comparison with ``jax.grad`` is made (it is exact in any dtype,
  both gradients being evaluated in the same arithmetic).
* At a non-smooth point (ReLU at 0, a kink inside ``[p - h v, p + h v]``) a
  difference quotient is not the derivative. If the reference ``jax.grad``
  disagrees with FD/Taylor as much as the manual gradient does, the check is
  **inconclusive** for that direction, reported as such and not counted as a
  pass; only a manual gradient that fails where the reference succeeds fails.
* Where the manual gradient agrees with FD and the reference does not (a
  subgradient choice at a kink: ``d|x|/dx`` at 0 is 0 by hand, 1 by
  ``jax.grad``), the direction says **reference disagrees**, and a leaf
  mismatch against that reference makes the report **INCONCLUSIVE**, not
  FAILED: the witnesses contradict each other, and the manual gradient is
  not the one FD refutes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbp.check.directions import (
    DEFAULT_FD_RTOL,
    TAYLOR_MAX_ORDER,
    TAYLOR_MIN_ORDER,
    directional_checks,
    gradient_slope,
)
from jaxbp.check.leaves import (
    DEFAULT_RTOL,
    LOW_PRECISION_EPS,
    ROUNDING_ULPS,
    as_arrays,
    check_float_leaves,
    check_knobs,
    check_same_structure,
    compare_leaves,
    rtol_table,
)
from jaxbp.check.report import DirectionCheck, GradientCheckError, GradReport, LeafCheck
from jaxbp.matmul_precision import check_precision, current_precision, precision_scope
from jaxbp.types import PyTree, check_callable, check_not_deleted

__all__ = ["DEFAULT_FD_RTOL", "DEFAULT_RTOL", "LOW_PRECISION_EPS", "ROUNDING_ULPS",
           "TAYLOR_MAX_ORDER", "TAYLOR_MIN_ORDER", "DirectionCheck", "GradReport",
           "GradientCheckError", "LeafCheck", "verify_grads"]
"""The tolerances and report types its docstring names, with :func:`verify_grads`; the
helpers live in :mod:`jaxbp.check.leaves` and :mod:`jaxbp.check.directions`."""


def verify_grads(
    grad_fn: Callable[..., PyTree],
    loss_fn: Callable[..., Any],
    params: PyTree,
    *args: Any,
    rtol: float | None = None,
    atol: float | None = None,
    fd_eps: float | None = None,
    fd_rtol: float | None = None,
    n_fd: int = 3,
    seed: int = 0,
    precision: str | None = "highest",
) -> GradReport:
    """Check a gradient function against ``jax.grad``, finite differences and a Taylor test.

    Works for any scalar ``loss_fn(params, *args)`` and any pytree of floating
    ``params``; ``grad_fn(params, *args)`` must return a pytree of the same
    structure and shapes (the "manual" gradient).

    Args:
      grad_fn: ``(params, *args) -> grads``, the gradient under test.
      loss_fn: ``(params, *args) -> scalar``, differentiated by ``jax.grad``
        for the reference and evaluated for FD and Taylor.
      params: the point, any pytree of floating arrays.
      *args: passed unchanged to both functions.
      rtol: relative tolerance vs the reference; default per leaf dtype from
        :data:`DEFAULT_RTOL` (float64 1e-10, float32 1e-4, float16 2e-2,
        bfloat16 5e-2: about 100x the worst error jaxbp's own suite measures).
      atol: absolute tolerance added to ``rtol * max|reference|`` per leaf.
        Default: ``ROUNDING_ULPS`` (16) ulps of the largest reference entry of the
        whole gradient (float64/float32), and for bfloat16/float16 leaves ``rtol``
        times it. A leaf that is small because its terms cancel (a bias summed over
        the batch; attention's key bias, whose exact gradient is 0 as softmax
        ignores a per-row shift) keeps the rounding error of the terms, about eps
        times their size, so it is judged against the gradient's scale rather than
        its own.
      fd_eps: the FD step h along a unit direction; default
        ``cbrt(eps) * ||params||`` (1 for params of zeros; a miss retried at h/16, h/256).
      fd_rtol: relative tolerance vs FD; default :data:`DEFAULT_FD_RTOL`.
      n_fd: the number of random directions for FD and Taylor (0 for none).
      seed: seeds the NumPy generator that draws the directions.
      precision: the matmul precision ``loss_fn`` is evaluated at for FD and Taylor
        (:data:`jaxbp.matmul_precision.MATMUL_PRECISIONS`; default ``"highest"``: on a GPU/TPU
        JAX's default runs float32 matmuls as TF32 or one bf16 pass, whose rounding
        swamps the differences of L); None keeps JAX's setting. The report names it.
        The gradients themselves run as the caller set them up.

    Returns:
      A :class:`GradReport`; ``print`` it for the table, call
      ``raise_if_failed()`` in tests.

    Raises:
      TypeError: params holds a non-floating leaf.
      ValueError: grad_fn's output does not match params' structure or
        shapes, or loss_fn does not return a scalar.
    """
    check_callable("grad_fn", grad_fn, "(params, *args) -> grads")
    check_callable("loss_fn", loss_fn, "(params, *args) -> scalar")
    check_precision(precision)
    check_knobs(rtol=rtol, atol=atol, fd_eps=fd_eps, fd_rtol=fd_rtol, n_fd=n_fd, seed=seed)
    check_not_deleted("params", params)   # donated to a train step: named, not JAX's shape
    check_not_deleted("args", args)
    params = as_arrays(params)
    leaves, treedef = jax.tree.flatten(params)
    check_float_leaves(params)
    _check_scalar_loss(loss_fn, params, args)
    manual = grad_fn(params, *args)
    reference = jax.grad(loss_fn)(params, *args)
    check_same_structure(params, manual)

    paths = [jax.tree_util.keystr(path)
             for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    manual_leaves = treedef.flatten_up_to(manual)
    reference_leaves = treedef.flatten_up_to(reference)
    rows = tuple(compare_leaves(paths, manual_leaves, reference_leaves, rtol, atol))

    notes: list[str] = []
    eps = max(float(jnp.finfo(leaf.dtype).eps) for leaf in leaves) if leaves else 0.0
    directions: tuple[DirectionCheck, ...] = ()
    if n_fd > 0 and leaves:
        if eps > LOW_PRECISION_EPS:
            notes.append(f"FD and Taylor skipped: machine eps {eps:.1e} of the params' dtype "
                         f"makes the rounding noise of L exceed the signal of any usable "
                         f"step; only the comparison with jax.grad was made")
        else:
            with precision_scope(precision):
                directions = directional_checks(
                    loss_fn, params, args, gradient_slope(manual_leaves),
                    gradient_slope(reference_leaves), treedef, eps, fd_eps, fd_rtol, n_fd,
                    np.random.default_rng(seed))
            if any("inconclusive" in (d.fd_status, d.taylor_status) for d in directions):
                notes.append("inconclusive: along some direction the reference jax.grad "
                             "misses FD/Taylor as well; L is not smooth there (a kink "
                             "such as ReLU at 0 inside the step) or FD noise dominates")
    return GradReport(rows, directions, rtol_table(rows, rtol), tuple(notes),
                      matmul_precision=current_precision(precision) if directions else None)


def _check_scalar_loss(loss_fn: Callable[..., Any], params: PyTree, args: tuple) -> None:
    """``loss_fn(params, *args)`` is a floating scalar (by its shape, nothing computed)."""
    value = jax.eval_shape(loss_fn, params, *args)
    if not (hasattr(value, "shape") and value.shape == ()
            and jnp.issubdtype(value.dtype, jnp.floating)):
        raise ValueError(f"loss_fn must return a floating scalar (shape ()), got "
                         f"{_described(value)}")


def _described(value: Any) -> str:
    """What a function returned, as its shapes and dtypes say it."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"shape {tuple(value.shape)} of {value.dtype}"
    return f"a {type(value).__name__} ({jax.tree.structure(value)})"
