"""Central differences and the Taylor test along random unit directions.

``L(p + h v) - L(p - h v)`` against ``<g, d>`` (``d`` the step actually taken after
rounding), and the first-order remainder ``|L(p + h v) - L(p) - <g, d_h>|``, which must
shrink like h^2 as h halves. Where the reference ``jax.grad`` misses as much as the
gradient under test, the direction is inconclusive (a kink), never a pass.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import numpy as np

from jaxbp.check.leaves import to_f64
from jaxbp.check.report import DirectionCheck
from jaxbp.types import PyTree

DEFAULT_FD_RTOL = {"float64": 1e-6, "float32": 2e-2}
"""fd_rtol of manual vs central differences per dtype."""
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
    moved = functools.partial(_moved, treedef, base, leaves)
    central = functools.partial(_central, loss_fn, args, moved, manual, reference, fd_rtol,
                                _NOISE_FACTOR * eps * level)
    checks = []
    for _ in range(n_fd):
        v = _unit_direction(rng, base)
        # Is L smooth along v at all? Asked only when a check would fail: across a kink
        # no difference quotient refutes a gradient (nor confirms one).
        kink = functools.cache(functools.partial(_kinked, loss_fn, args, loss0, moved, v, eps,
                                                 h, level))
        step, delta_loss, slope_m, slope_r, err_m, err_r, fd_status = _fd_check(
            central, v, h, reference is None, kink)
        order_m, order_r, taylor_status = _taylor(
            loss_fn, args, loss0, moved, v, manual, reference, eps, h, kink, level)
        checks.append(DirectionCheck(step, delta_loss / (2 * step), slope_m / (2 * step),
                                     slope_r / (2 * step), err_m, err_r, fd_status,
                                     order_m, order_r, taylor_status))
    return tuple(checks)


def _moved(treedef: Any, base: list[np.ndarray], leaves: list[Any], v: list[np.ndarray],
           step: float) -> tuple[PyTree, list[np.ndarray]]:
    """params + step v rounded to the leaves' dtypes, and the step really taken."""
    new = [jnp.asarray(np.asarray(b + step * vi, dtype=leaf.dtype))
           for b, vi, leaf in zip(base, v, leaves)]
    return treedef.unflatten(new), [to_f64(n) - b for n, b in zip(new, base)]


def _central(loss_fn: Callable[..., Any], args: tuple[Any, ...], moved: Callable[..., Any],
             manual: Slope, reference: Slope | None, fd_rtol: float, noise: float,
             v: list[np.ndarray], step: float) -> tuple[float, float, float, bool, bool]:
    """(L(p + step v) - L(p - step v), manual's and the reference's predictions of it,
    whether each is within the tolerance ``fd_rtol * scale + noise``)."""
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


def _fd_check(central: Callable[..., Any], v: list[np.ndarray], h: float, alone: bool,
              kink: Callable[[], bool]) -> tuple[float, float, float, float, float, float, str]:
    """Central differences along v: the step, the difference, both slopes, both errors and
    the status. A miss is retried at smaller steps; if every step misses, the first one's
    is told. ``alone``: no reference slope (a miss is judged by the kink test only)."""
    tries = []
    for divisor in _SMALLER_STEPS:
        tries.append((h / divisor, *central(v, h / divisor)))
        if all(tries[-1][-2:]):
            break
    step, delta_loss, slope_m, slope_r, manual_ok, reference_ok = (
        tries[-1] if all(tries[-1][-2:]) else tries[0])
    if alone:
        scale = max(abs(delta_loss), abs(slope_m), 1e-300)
        return (step, delta_loss, slope_m, slope_r, abs(delta_loss - slope_m) / scale,
                float("nan"), _verdict_alone(manual_ok, kink))
    err_m = abs(delta_loss - slope_m) / max(abs(slope_r), 1e-300)
    err_r = abs(delta_loss - slope_r) / max(abs(slope_r), 1e-300)
    return (step, delta_loss, slope_m, slope_r, err_m, err_r,
            _unless_kinked(_verdict(manual_ok, reference_ok), kink))


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

