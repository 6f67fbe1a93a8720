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

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbp._typing import PyTree
from jaxbp.matmul_precision import check_precision, current_precision, precision_scope

DEFAULT_RTOL = {"float64": 1e-10, "float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}
"""rtol of manual vs jax.grad per leaf dtype (see :func:`verify_grads`)."""
DEFAULT_FD_RTOL = {"float64": 1e-6, "float32": 2e-2}
"""fd_rtol of manual vs central differences per dtype."""
LOW_PRECISION_EPS = 1e-4
"""Above this machine epsilon FD and Taylor tests are skipped (bfloat16, float16)."""
ROUNDING_ULPS = 16
"""A leaf's error below this many ulps of the gradient's largest entry is rounding alone."""
TAYLOR_MIN_ORDER = 1.5
TAYLOR_MAX_ORDER = 3.5
"""Above this the Taylor remainder is not yet in its asymptotic range (the steps are too
large for the function's curvature): retried with smaller steps, then inconclusive."""
_TAYLOR_STEPS = 5
_SMALLER_STEPS = (1, 16, 256)
"""FD and Taylor retry a miss at the step divided by these before calling it one (a
function that curves on a scale far below its input's needs a smaller step; a wrong
derivative misses at every step)."""
_NOISE_FACTOR = 8.0


class GradientCheckError(AssertionError):
    """A gradient did not pass :func:`verify_grads` (raised by ``raise_if_failed``)."""


@dataclasses.dataclass(frozen=True)
class LeafCheck:
    """Manual vs reference for one leaf.

    Attributes:
      path: the leaf's path in the pytree, e.g. ``[0]['w']``.
      shape, dtype: of the leaf.
      max_abs_error: ``max_i |manual_i - reference_i|``.
      index: where it occurs (a tuple index into the leaf).
      manual_at_index, reference_at_index: the two values there.
      reference_scale: ``max_i |reference_i|``.
      rel_error: ``max_abs_error / reference_scale`` (0 when both are 0).
      tolerance: ``atol + rtol * reference_scale``.
      ok: ``max_abs_error <= tolerance`` and all values finite.
      rounding_floor: the ``atol`` part: an error below it is rounding alone (the
        leaf's own scale is at the rounding level of the whole gradient).
    """

    path: str
    shape: tuple[int, ...]
    dtype: str
    max_abs_error: float
    index: tuple[int, ...]
    manual_at_index: float
    reference_at_index: float
    reference_scale: float
    rel_error: float
    tolerance: float
    ok: bool
    rounding_floor: float = 0.0

    @property
    def at_rounding_level(self) -> bool:
        """It passes by the rounding floor alone (its relative error is above rtol: its
        own scale is at the rounding level of the gradient, so that ratio says nothing)."""
        return self.ok and self.max_abs_error > self.tolerance - self.rounding_floor


@dataclasses.dataclass(frozen=True)
class DirectionCheck:
    """Manual vs central differences and the Taylor test along one random direction.

    Attributes:
      h: the FD step along the unit direction v.
      fd_slope: ``(L(p + h v) - L(p - h v)) / 2h``.
      manual_slope, reference_slope: ``<g, d> / 2h`` for the two gradients.
      fd_error_manual, fd_error_reference: ``|fd - slope| / |reference slope|``.
      fd_status: ``"ok"``, ``"FAIL"``, ``"inconclusive"`` (both gradients miss
        FD), ``"reference disagrees"`` (the manual one matches FD, the
        reference does not) or ``"skipped"``.
      taylor_order_manual, taylor_order_reference: the measured order of the
        first-order remainder (2 for a correct gradient; nan when not measured).
      taylor_status: ``"ok"``, ``"FAIL"``, ``"inconclusive"``, ``"reference
        disagrees"``, ``"flat"`` (the remainder is at rounding level: L is
        linear along v) or ``"skipped"``.
    """

    h: float
    fd_slope: float
    manual_slope: float
    reference_slope: float
    fd_error_manual: float
    fd_error_reference: float
    fd_status: str
    taylor_order_manual: float
    taylor_order_reference: float
    taylor_status: str


@dataclasses.dataclass(frozen=True)
class GradReport:
    """The outcome of :func:`verify_grads`: per-leaf rows, per-direction rows, notes.

    :attr:`verdict` is ``"OK"`` when every leaf matches the reference and no
    FD or Taylor check failed; ``"FAILED"`` when a check refutes the manual
    gradient; ``"INCONCLUSIVE"`` when leaves differ from the reference but FD
    sides with the manual gradient ("reference disagrees"). Inconclusive and
    skipped checks are listed, never counted as passes.
    """

    leaves: tuple[LeafCheck, ...]
    directions: tuple[DirectionCheck, ...]
    rtol: dict[str, float]
    notes: tuple[str, ...] = ()
    title: str = "verify_grads"
    reference_name: str = "jax.grad"
    has_reference: bool = True
    matmul_precision: str | None = None

    @property
    def reference_disputed(self) -> bool:
        """FD sides with the manual gradient against the reference somewhere, and
        nowhere refutes the manual one."""
        statuses = [s for d in self.directions for s in (d.fd_status, d.taylor_status)]
        return "reference disagrees" in statuses and "FAIL" not in statuses

    @property
    def verdict(self) -> str:
        """``"OK"``, ``"FAILED"`` or ``"INCONCLUSIVE"`` (see the class docstring)."""
        if any("FAIL" in (d.fd_status, d.taylor_status) for d in self.directions):
            return "FAILED"
        if not self.has_reference and any("inconclusive" in (d.fd_status, d.taylor_status)
                                          for d in self.directions):
            return "INCONCLUSIVE" if all(leaf.ok for leaf in self.leaves) else "FAILED"
        if all(leaf.ok for leaf in self.leaves):
            return "OK"
        return "INCONCLUSIVE" if self.reference_disputed else "FAILED"

    @property
    def ok(self) -> bool:
        """Every leaf within tolerance and no direction failed (verdict OK)."""
        return self.verdict == "OK"

    @property
    def failed(self) -> bool:
        """A check refutes the manual gradient (verdict FAILED)."""
        return self.verdict == "FAILED"

    @property
    def max_rel_error(self) -> float:
        """The largest normwise relative error of any leaf, manual vs reference (leaves
        whose error is within the rounding floor left out: their scale is rounding)."""
        return max((leaf.rel_error for leaf in self.leaves if not leaf.at_rounding_level),
                   default=0.0)

    @property
    def max_abs_error(self) -> float:
        """The largest absolute error of any element, manual vs reference."""
        return max((leaf.max_abs_error for leaf in self.leaves), default=0.0)

    def summary(self) -> str:
        """One line: verdict, worst relative error, FD and Taylor outcomes."""
        statuses = [d.fd_status for d in self.directions]
        orders = [d.taylor_order_manual for d in self.directions
                  if math.isfinite(d.taylor_order_manual)]
        fd = ", ".join(f"{statuses.count(s)} {s}" for s in dict.fromkeys(statuses)) or "none"
        taylor = f"order {min(orders):.2f}..{max(orders):.2f}" if orders else "not measured"
        if self.matmul_precision is not None:
            taylor += f" (L at matmul precision {self.matmul_precision})"
        why = ""
        if self.verdict == "INCONCLUSIVE":
            why = (" (reference disagrees: the manual gradient matches finite differences "
                   f"where {self.reference_name} does not)" if self.has_reference else
                   " (no reference, and FD/Taylor missed where the function has a kink)")
        rounding = sum(leaf.at_rounding_level for leaf in self.leaves)
        versus = (f"manual vs reference ({self.reference_name}) max rel error "
                  f"{self.max_rel_error:.2e} over {len(self.leaves)} leaves" if self.leaves
                  else f"no reference ({self.reference_name})")
        if rounding:
            versus += (f" ({rounding} more at the rounding level of the whole gradient: "
                       f"their errors are within its floor)")
        return f"{self.title}: {self.verdict}{why}: {versus}; FD directions: {fd}; Taylor {taylor}"

    def __str__(self) -> str:
        lines = [self.summary(), ""]
        disputed = "differs (reference disputed)" if self.reference_disputed else "FAIL"
        lines.append(f"{'leaf':<16} {'shape':<14} {'dtype':<9} {'max|manual-ref|':>15} "
                     f"{'at index':<12} {'manual':>11} {'reference':>11} {'rel err':>9} "
                     f"{'tol':>9}  status")
        for leaf in self.leaves:
            lines.append(
                f"{leaf.path:<16} {leaf.shape!s:<14} {leaf.dtype:<9} "
                f"{leaf.max_abs_error:>15.3e} {leaf.index!s:<12} "
                f"{leaf.manual_at_index:>11.4e} {leaf.reference_at_index:>11.4e} "
                f"{leaf.rel_error:>9.2e} {leaf.tolerance:>9.2e}  "
                f"{'ok' if leaf.ok else disputed}")
        if self.directions:
            lines.append("")
            lines.append(f"{'dir':<4} {'h':>9} {'FD slope':>12} {'manual':>12} {'reference':>12} "
                         f"{'err manual':>10} {'err ref':>9} {'FD':<19} "
                         f"{'Taylor order manual/ref':>23} Taylor")
            for i, d in enumerate(self.directions):
                lines.append(
                    f"{i:<4} {d.h:>9.2e} {d.fd_slope:>12.5e} {d.manual_slope:>12.5e} "
                    f"{d.reference_slope:>12.5e} {d.fd_error_manual:>10.2e} "
                    f"{d.fd_error_reference:>9.2e} {d.fd_status:<19} "
                    f"{d.taylor_order_manual:>11.2f}/{d.taylor_order_reference:<11.2f} "
                    f"{d.taylor_status}")
        lines.extend(f"note: {note}" for note in self.notes)
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        """Raise :class:`GradientCheckError` with the full table when :attr:`failed`.

        An INCONCLUSIVE report does not raise: nothing refutes the manual gradient.
        """
        if self.failed:
            raise GradientCheckError(str(self))


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
    check_precision(precision)
    check_knobs(rtol=rtol, atol=atol, fd_eps=fd_eps, fd_rtol=fd_rtol, n_fd=n_fd)
    params = as_arrays(params)
    leaves, treedef = jax.tree.flatten(params)
    _check_float_leaves(params)
    manual = grad_fn(params, *args)
    reference = jax.grad(loss_fn)(params, *args)
    _check_same_structure(params, manual)

    paths = [jax.tree_util.keystr(path)
             for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    manual_leaves = treedef.flatten_up_to(manual)
    reference_leaves = treedef.flatten_up_to(reference)
    global_scale = max((float(np.max(np.abs(to_f64(r)), initial=0.0))
                        for r in reference_leaves), default=0.0)
    rows = tuple(
        compare_leaf(path, m, r, rtol_for(r, rtol), atol_for(r, atol, rtol, global_scale))
        for path, m, r in zip(paths, manual_leaves, reference_leaves)
    )

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


def as_arrays(params: PyTree) -> PyTree:
    """Leaves as arrays: Python/NumPy scalars and lists become JAX arrays (floats in JAX's
    default float dtype); arrays are kept as they are."""
    def one(path: Any, leaf: Any) -> Any:
        if isinstance(leaf, jax.Array | np.ndarray):
            return leaf
        try:
            return jnp.asarray(leaf)
        except TypeError:
            raise TypeError(f"params{jax.tree_util.keystr(path)} must be an array or a number, "
                            f"got {type(leaf).__name__}") from None

    return jax.tree_util.tree_map_with_path(one, params)


def _check_float_leaves(params: PyTree) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(f"params{jax.tree_util.keystr(path)} must be floating to be "
                            f"differentiated, got dtype {jnp.result_type(leaf)}")


def _check_same_structure(params: PyTree, manual: PyTree) -> None:
    expected, got = jax.tree.structure(params), jax.tree.structure(manual)
    if expected != got:
        hint = ""
        if isinstance(manual, tuple) and len(manual) == 2 and \
                jax.tree.structure(manual[1]) == expected:
            hint = " (grad_fn seems to return (value, grads): pass a function returning grads)"
        raise ValueError(f"grad_fn returned a pytree of structure {got} but expected the "
                         f"structure of params, {expected}{hint}")
    problems = [
        f"manual{jax.tree_util.keystr(path)} has shape {np.shape(m)} but expected {np.shape(p)}"
        for (path, p), m in zip(jax.tree_util.tree_flatten_with_path(params)[0],
                                jax.tree.leaves(manual))
        if np.shape(m) != np.shape(p)
    ]
    if problems:
        raise ValueError("grad_fn's leaves do not match params: " + "; ".join(problems))


def check_knobs(**knobs: Any) -> None:
    """Tolerances finite and >= 0 (or None for the default), the FD step > 0, ``n_fd`` an
    int >= 0: a bad one is a ValueError naming it, not a FAILED report."""
    for name, value in knobs.items():
        if value is None:
            continue
        if name == "n_fd":
            if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < 0:
                raise ValueError(f"n_fd must be an int >= 0, got {value!r}")
            continue
        if isinstance(value, bool) or not isinstance(value, int | float | np.number):
            raise TypeError(f"{name} must be a number, got {type(value).__name__}")
        if not math.isfinite(value) or value < 0 or (name == "fd_eps" and value == 0):
            bound = "> 0" if name == "fd_eps" else ">= 0"
            raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")


def rtol_for(reference: Any, rtol: float | None) -> float:
    if rtol is not None:
        return rtol
    return DEFAULT_RTOL.get(jnp.dtype(reference.dtype).name, DEFAULT_RTOL["float32"])


def atol_for(reference: Any, atol: float | None, rtol: float | None,
              global_scale: float) -> float:
    if atol is not None:
        return atol
    eps = float(jnp.finfo(reference.dtype).eps)
    if eps <= LOW_PRECISION_EPS:
        return ROUNDING_ULPS * eps * global_scale
    return rtol_for(reference, rtol) * global_scale


def rtol_table(rows: Sequence[LeafCheck], rtol: float | None) -> dict[str, float]:
    return {row.dtype: (rtol if rtol is not None else
                        DEFAULT_RTOL.get(row.dtype, DEFAULT_RTOL["float32"])) for row in rows}


def to_f64(value: Any) -> np.ndarray:
    """A host float64 copy (NumPy converts bfloat16 itself: no XLA compile per shape)."""
    return np.asarray(value).astype(np.float64)


def compare_leaf(path: str, manual: Any, reference: Any, rtol: float, atol: float) -> LeafCheck:
    m, r = to_f64(manual), to_f64(reference)
    shape = tuple(np.shape(r))
    dtype = jnp.dtype(reference.dtype).name
    if m.size == 0:
        return LeafCheck(path, shape, dtype, 0.0, (), 0.0, 0.0, 0.0, 0.0, atol, True)
    error = np.abs(m - r)
    finite = bool(np.all(np.isfinite(m)) and np.all(np.isfinite(r)))
    # A non-finite value is the worst error there is: point the index at it.
    flat = int(np.argmax(np.where(np.isfinite(error), error, np.inf)))
    index = tuple(int(i) for i in np.unravel_index(flat, shape)) if shape else ()
    max_abs = float(error.flat[flat])
    scale = float(np.max(np.abs(r))) if finite else float("nan")
    if max_abs == 0.0:
        rel = 0.0
    else:
        rel = max_abs / scale if scale > 0 else float("inf")
    tolerance = atol + rtol * scale
    ok = finite and max_abs <= tolerance
    return LeafCheck(path, shape, dtype, max_abs, index, float(m.flat[flat]),
                     float(r.flat[flat]), scale, rel, tolerance, ok, atol)


def _loss_value(loss_fn: Callable[..., Any], params: PyTree, args: tuple[Any, ...]) -> float:
    value = loss_fn(params, *args)
    if np.ndim(value) != 0:
        raise ValueError(f"loss_fn must return a scalar, got shape {np.shape(value)}")
    if isinstance(value, float | np.floating | np.ndarray):   # a host value: keep float64
        return float(value)
    return float(to_f64(jnp.asarray(value)))


Slope = Callable[[list[np.ndarray]], float]
"""``d -> <g, d>``: a first-order change along a step d (one float64 array per leaf)."""


def gradient_slope(gradient: list[Any]) -> Slope:
    """The slope of a gradient given leaf by leaf: ``<g, d>``."""
    g64 = [to_f64(g) for g in gradient]
    return lambda d: float(sum(np.sum(g * di) for g, di in zip(g64, d)))


def directional_checks(
    loss_fn: Callable[..., Any],
    params: PyTree,
    args: tuple[Any, ...],
    manual: Slope,
    reference: Slope | None,
    treedef: Any,
    eps: float,
    fd_eps: float | None,
    fd_rtol: float | None,
    n_fd: int,
    rng: np.random.Generator,
    level: float | None = None,
) -> tuple[DirectionCheck, ...]:
    """FD and Taylor along ``n_fd`` random unit directions for the ``manual`` slope, with
    the ``reference`` slope as the second witness. Without a reference (None), a miss
    where the one-sided differences disagree (a kink inside the step) is inconclusive,
    any other miss a failure. ``level``: the size of L's terms that rounding acts on
    (default ``|L(p)|``; larger when L is a sum whose terms cancel)."""
    leaves = treedef.flatten_up_to(params)
    base = [to_f64(leaf) for leaf in leaves]
    norm = math.sqrt(sum(float(np.sum(b * b)) for b in base))
    # the step is scaled to the input (the unit for an input of zeros)
    h = fd_eps if fd_eps is not None else eps ** (1 / 3) * (norm if norm > 0 else 1.0)
    if fd_rtol is None:
        fd_rtol = DEFAULT_FD_RTOL["float64" if eps < 1e-10 else "float32"]
    loss0 = _loss_value(loss_fn, params, args)
    level = abs(loss0) if level is None else max(level, abs(loss0))

    def moved(v: list[np.ndarray], step: float) -> tuple[PyTree, list[np.ndarray]]:
        """params + step v rounded to the leaves' dtypes, and the step really taken."""
        new = [jnp.asarray(np.asarray(b + step * vi, dtype=leaf.dtype))
               for b, vi, leaf in zip(base, v, leaves)]
        return treedef.unflatten(new), [to_f64(n) - b for n, b in zip(new, base)]

    noise = _NOISE_FACTOR * eps * level

    def central(v: list[np.ndarray], step: float) -> tuple[float, float, float, bool, bool]:
        """(L(p + step v) - L(p - step v), manual's and the reference's predictions of it,
        whether each is within the tolerance)."""
        plus, d_plus = moved(v, step)
        minus, d_minus = moved(v, -step)
        delta_loss = _loss_value(loss_fn, plus, args) - _loss_value(loss_fn, minus, args)
        d = [p - m for p, m in zip(d_plus, d_minus)]
        slope_m = manual(d)
        slope_r = float("nan") if reference is None else reference(d)
        scale = (max(abs(delta_loss), abs(slope_m), 1e-300) if reference is None
                 else abs(slope_r))
        tol = fd_rtol * scale + noise
        return (delta_loss, slope_m, slope_r, abs(delta_loss - slope_m) <= tol,
                reference is None or abs(delta_loss - slope_r) <= tol)

    checks = []
    for _ in range(n_fd):
        v = _unit_direction(rng, base)
        # a miss is retried at smaller steps; if every step misses, the first one's is told
        tries = []
        for divisor in _SMALLER_STEPS:
            tries.append((h / divisor, *central(v, h / divisor)))
            if all(tries[-1][-2:]):
                break
        step, delta_loss, slope_m, slope_r, manual_ok, reference_ok = (
            tries[-1] if all(tries[-1][-2:]) else tries[0])
        # Is L smooth along v at all? Asked only when a check would fail: across a kink
        # no difference quotient refutes a gradient (nor confirms one).
        kink = functools.cache(functools.partial(_kinked, loss_fn, args, loss0, moved, v, eps,
                                                 h, level))
        if reference is None:
            scale = max(abs(delta_loss), abs(slope_m), 1e-300)
            err_m, err_r = abs(delta_loss - slope_m) / scale, float("nan")
            fd_status = _verdict_alone(manual_ok, kink)
        else:
            err_m = abs(delta_loss - slope_m) / max(abs(slope_r), 1e-300)
            err_r = abs(delta_loss - slope_r) / max(abs(slope_r), 1e-300)
            fd_status = _unless_kinked(_verdict(manual_ok, reference_ok), kink)

        order_m, order_r, taylor_status = _taylor(
            loss_fn, args, loss0, moved, v, manual, reference, eps, h, kink, level)
        checks.append(DirectionCheck(step, delta_loss / (2 * step), slope_m / (2 * step),
                                     slope_r / (2 * step), err_m, err_r, fd_status,
                                     order_m, order_r, taylor_status))
    return tuple(checks)


def _kinked(loss_fn, args, loss0, moved, v, eps, h_fd, level) -> bool:
    """Whether L has a kink along v near p: the asymmetry ``|L(p+hv) + L(p-hv) - 2L(p)|``
    falls like h^2 where L is smooth and only like h across a kink (order < 1.5)."""
    h0 = eps ** 0.25 * h_fd / eps ** (1 / 3)
    floor = 20 * eps * max(level, 1e-300)
    asymmetry = []
    for k in range(_TAYLOR_STEPS):
        plus, _ = moved(v, h0 / 2**k)
        minus, _ = moved(v, -h0 / 2**k)
        asymmetry.append(abs(_loss_value(loss_fn, plus, args) + _loss_value(loss_fn, minus, args)
                             - 2 * loss0))
    order = _order(asymmetry, floor)
    return not math.isnan(order) and order < TAYLOR_MIN_ORDER


def _verdict_alone(manual_ok: bool, kink: Callable[[], bool]) -> str:
    """A check with no reference: a miss at a kink is inconclusive, any other a failure."""
    if manual_ok:
        return "ok"
    return "inconclusive" if kink() else "FAIL"


def _unless_kinked(status: str, kink: Callable[[], bool]) -> str:
    """A FAIL across a kink of L is inconclusive."""
    return "inconclusive" if status == "FAIL" and kink() else status


def _verdict(manual_ok: bool, reference_ok: bool) -> str:
    if manual_ok:
        return "ok" if reference_ok else "reference disagrees"
    return "inconclusive" if not reference_ok else "FAIL"


def _unit_direction(rng: np.random.Generator, base: list[np.ndarray]) -> list[np.ndarray]:
    """A standard normal direction shaped like the params, scaled to unit 2-norm."""
    v = [rng.standard_normal(b.shape) for b in base]
    norm = math.sqrt(sum(float(np.sum(vi * vi)) for vi in v))
    return [vi / norm for vi in v]


def _taylor(loss_fn, args, loss0, moved, v, manual, reference, eps, h_fd, kink, level):
    """Measured order of r(h) = |L(p + h v) - L(p) - <g, d_h>| over halving h.

    ``reference`` None: judged alone, a low order where FD saw a ``kink`` is inconclusive.
    """
    floor = 20 * eps * max(level, 1e-300)

    def remainders(h0: float) -> tuple[list[float], list[float]]:
        rem_m, rem_r = [], []
        for k in range(_TAYLOR_STEPS):
            point, d = moved(v, h0 / 2**k)
            change = _loss_value(loss_fn, point, args) - loss0
            rem_m.append(abs(change - manual(d)))
            if reference is not None:
                rem_r.append(abs(change - reference(d)))
        return rem_m, rem_r

    for divisor in _SMALLER_STEPS:  # an order far above 2: the steps are still too large
        # eps^(1/4) * the same input scale as the FD step's
        remainders_m, remainders_r = remainders(eps ** 0.25 * h_fd / eps ** (1 / 3) / divisor)
        order_m = _order(remainders_m, floor)
        if not order_m > TAYLOR_MAX_ORDER:
            break
    if order_m > TAYLOR_MAX_ORDER:   # never in the asymptotic range: no verdict
        return order_m, _order(remainders_r, floor), "inconclusive"
    if reference is None:
        if math.isnan(order_m):   # at most one remainder above rounding: nothing to measure
            return order_m, order_m, "flat"
        return order_m, float("nan"), _verdict_alone(order_m >= TAYLOR_MIN_ORDER, kink)
    order_r = _order(remainders_r, floor)
    if math.isnan(order_m) and math.isnan(order_r):
        return order_m, order_r, "flat"
    if math.isnan(order_m):
        return order_m, order_r, _unless_kinked(
            "FAIL" if max(remainders_m) > floor else "flat", kink)
    manual_ok = order_m >= TAYLOR_MIN_ORDER
    reference_ok = not math.isnan(order_r) and order_r >= TAYLOR_MIN_ORDER
    return order_m, order_r, _unless_kinked(_verdict(manual_ok, reference_ok
                                                     or math.isnan(order_r)), kink)


def _order(remainders: list[float], floor: float) -> float:
    """Median of log2(r(h) / r(h/2)) over consecutive pairs above the rounding floor."""
    slopes = [math.log2(a / b) for a, b in itertools.pairwise(remainders)
              if a > floor and b > floor]
    return float(np.median(slopes)) if slopes else float("nan")
