"""Derivative checks for any JAX function of pytrees: its VJP and its JVP as JAX runs them.

For ``f: args -> out`` (any pytrees of floating arrays; ``custom_vjp`` and
``custom_jvp`` rules included) draw a random output cotangent ``u`` and
random input directions ``v``. Every check reduces to the scalar

.. math::
    L(x) = \\langle u, f(x) \\rangle, \\qquad
    \\frac{d}{dh} L(x + h v) = \\langle u, J v \\rangle = \\langle J^\\top u, v \\rangle

so the witnesses of :func:`jaxbp.verify_grads` apply unchanged:

1. central differences of L along random unit directions against
   ``<J^T u, d>`` (:func:`verify_vjp`) or ``<u, J d>`` (:func:`verify_jvp`),
   with the dtype-aware step, and the Taylor test (the remainder must fall
   like h^2);
2. with a plain ``reference`` implementation: ``jax.vjp``/``jax.jvp`` of it,
   block by block (one output leaf's cotangent at a time for the VJP, one
   input leaf's direction at a time for the JVP), with the index and both
   values of the worst entry, and the two functions' values;
3. where both exist, ``<u, J v>`` from the JVP against ``<J^T u, v>`` from
   the VJP (a ``custom_vjp`` has no JVP: then noted, not checked).

Without a reference, a miss of FD or Taylor at a point where L is not smooth
along v (``|L(x+hv) + L(x-hv) - 2L(x)|`` falling only like h: a kink) is
"inconclusive", never a pass; any other miss fails. In bfloat16/float16 FD
and Taylor are skipped and the report says so. ``order=2`` also checks the
derivative of the derivative: the VJP of ``x -> J(x)^T u`` (the JVP of
``x -> J(x) v``), against the reference's.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbp import value_checks
from jaxbp.check.directions import Slope, directional_checks, gradient_slope
from jaxbp.check.leaves import (
    LOW_PRECISION_EPS,
    as_arrays,
    check_has_entries,
    check_knobs,
    compare_leaves,
    rtol_for,
    rtol_table,
    to_f64,
)
from jaxbp.check.report import DirectionCheck, GradReport, LeafCheck
from jaxbp.types import PyTree, check_callable, check_not_deleted

_ArgsFn = Callable[..., PyTree]


def _floating(tree: PyTree, what: str) -> list[Any]:
    """The leaves of a pytree, each a floating array (else a TypeError naming it) of finite
    values (else a ValueError)."""
    check_not_deleted(what, tree)   # donated to a train step: named, not JAX's bare shape
    leaves = []
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(f"{what}{jax.tree_util.keystr(path)} must be floating, got "
                            f"{jnp.result_type(leaf)} (close over non-float arguments with "
                            f"functools.partial)")
        # a derivative is checked at a finite point (else every comparison is NaN: FAILED)
        value_checks.check_finite(leaf, f"{what}{jax.tree_util.keystr(path)}")
        leaves.append(leaf)
    check_has_entries(leaves, what)
    return leaves


def _paths(tree: PyTree, prefix: str) -> list[str]:
    return [prefix + jax.tree_util.keystr(path)
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def _random_like(rng: np.random.Generator, leaves: list[Any]) -> list[Any]:
    """Standard normal arrays shaped and typed like ``leaves``."""
    return [jnp.asarray(rng.standard_normal(np.shape(x)), jnp.result_type(x)) for x in leaves]


def _inner(a: list[Any], b: list[Any]) -> float:
    """``<a, b>`` summed in float64 on the host (inf or nan where the function overflowed
    at a step: the checks that read it call such a direction inconclusive, silently)."""
    with np.errstate(invalid="ignore", over="ignore"):
        return float(sum(np.sum(to_f64(x) * to_f64(y)) for x, y in zip(a, b)))


def _level(a: list[Any], b: list[Any]) -> float:
    """``sum |a_i b_i|``: the size of the terms of ``<a, b>`` that rounding acts on."""
    with np.errstate(invalid="ignore", over="ignore"):
        return float(sum(np.sum(np.abs(to_f64(x) * to_f64(y)))
                         for x, y in zip(a, b)))


def _masked(leaves: list[Any], keep: int) -> list[Any]:
    """Zeros everywhere but leaf ``keep``."""
    return [x if i == keep else jnp.zeros_like(x) for i, x in enumerate(leaves)]


def _scalar_row(path: str, manual: float, reference: float, dtype: Any,
                rtol: float | None, level: float) -> LeafCheck:
    """One number against another, judged against ``level`` (the size of its terms)."""
    tol = rtol_for(jnp.zeros((), dtype), rtol) * max(level, 1e-300)
    error = abs(manual - reference)
    return LeafCheck(path, (), jnp.dtype(dtype).name, error, (), manual, reference,
                     level, error / max(level, 1e-300), tol, bool(error <= tol))


class _Setup:
    """What both checks share: the flattened args and outputs, u, v, and L."""

    def __init__(self, f: _ArgsFn, args: tuple[Any, ...], seed: int) -> None:
        if not args:
            raise ValueError("verify_vjp/verify_jvp need at least one argument of f to "
                             "differentiate at")
        self.f = f
        self.args = as_arrays(tuple(args), "args")
        self.in_leaves, self.in_def = jax.tree.flatten(self.args)
        _floating(self.args, "args")
        self.out = f(*self.args)
        self.out_leaves, self.out_def = jax.tree.flatten(self.out)
        _floating(self.out, "f(*args)")
        if not self.out_leaves:
            raise ValueError("f returned no arrays: nothing to differentiate")
        rng = np.random.default_rng(seed)
        self.u = _random_like(rng, self.out_leaves)
        self.v = _random_like(rng, self.in_leaves)
        self.in_paths = _paths(self.args, "args")
        self.out_paths = _paths(self.out, "out")
        self.dtype = jnp.result_type(*self.in_leaves)
        self.eps = max(float(jnp.finfo(x.dtype).eps) for x in self.in_leaves)

    def loss(self, args: tuple[Any, ...]) -> float:
        """L = <u, f(args)> in float64 on the host."""
        return _inner(self.u, jax.tree.leaves(self.f(*args)))

    def tangents(self, d: list[np.ndarray]) -> tuple[Any, ...]:
        """A float64 step d as input tangents of the args' dtypes."""
        return self.in_def.unflatten([jnp.asarray(x, leaf.dtype)
                                      for x, leaf in zip(d, self.in_leaves)])

    def directions(self, manual: Slope, reference: Slope | None,
                   fd_eps: float | None, fd_rtol: float | None, n_fd: int,
                   seed: int) -> tuple[tuple[DirectionCheck, ...], list[str]]:
        if n_fd <= 0:
            return (), []
        if self.eps > LOW_PRECISION_EPS:
            return (), [f"FD and Taylor skipped: machine eps {self.eps:.1e} of the inputs' "
                        f"dtype makes the rounding noise of <u, f> exceed the signal of any "
                        f"usable step; only the comparisons with the reference were made"]
        checks = directional_checks(
            lambda args: self.loss(args), self.args, (), manual, reference, self.in_def,
            self.eps, fd_eps, fd_rtol, n_fd, np.random.default_rng(seed + 1),
            level=_level(self.u, self.out_leaves))
        notes = []
        if any("inconclusive" in (d.fd_status, d.taylor_status) for d in checks):
            notes.append("inconclusive: along some direction <u, f> is not smooth (a kink "
                         "inside the step) or FD noise dominates; not counted as a pass")
        return checks, notes


def _check_functions(f: Any, reference: Any) -> None:
    check_callable("f", f, "(*args) -> outputs")
    if reference is not None:
        check_callable("reference", reference, "(*args) -> outputs, or None")


def verify_vjp(
    f: _ArgsFn,
    *args: Any,
    reference: _ArgsFn | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    fd_eps: float | None = None,
    fd_rtol: float | None = None,
    n_fd: int = 3,
    seed: int = 0,
    order: int = 1,
) -> GradReport:
    """Check ``jax.vjp(f, *args)`` (custom rules included) against central differences,
    the Taylor test and, if given, ``jax.vjp`` of a plain ``reference``.

    Args:
      f: any function of the args (pytrees of floating arrays) to a pytree of
        floating arrays; every arg is differentiated (bind others with
        ``functools.partial``).
      *args: the point.
      reference: a plain implementation of the same function (no custom rule),
        differentiated by JAX for the leaf-by-leaf comparison.
      rtol, atol, fd_eps, fd_rtol, n_fd, seed: as :func:`jaxbp.verify_grads`.
      order: 1, or 2 to check the VJP of ``x -> J(x)^T u`` too (rows and
        directions prefixed ``2nd``).

    Returns:
      A :class:`~jaxbp.check.GradReport`: one row per (output leaf, input leaf)
      block ``out... -> args...`` and per output value, a ``<u, J v>`` row for
      the JVP/VJP consistency, the FD/Taylor directions, notes.
    """
    _check_functions(f, reference)
    _check_order(order)
    check_knobs(rtol=rtol, atol=atol, fd_eps=fd_eps, fd_rtol=fd_rtol, n_fd=n_fd, seed=seed)
    setup = _Setup(f, args, seed)
    _, vjp_fn = jax.vjp(f, *setup.args)
    manual = setup.in_def.flatten_up_to(vjp_fn(setup.out_def.unflatten(setup.u)))
    rows: list[LeafCheck] = []
    reference_slope = None
    if reference is not None:
        ref_out, ref_vjp = jax.vjp(reference, *setup.args)
        rows += _value_rows(setup, ref_out, rtol, atol)
        for o, out_path in enumerate(setup.out_paths):
            u_o = setup.out_def.unflatten(_masked(setup.u, o))
            m = setup.in_def.flatten_up_to(vjp_fn(u_o))
            r = setup.in_def.flatten_up_to(ref_vjp(u_o))
            rows += compare_leaves([f"{out_path} -> {p}" for p in setup.in_paths], m, r,
                                   rtol, atol)
        ref_full = setup.in_def.flatten_up_to(ref_vjp(setup.out_def.unflatten(setup.u)))
        reference_slope = gradient_slope(ref_full)
    notes: list[str] = []
    try:
        _, jv = jax.jvp(f, setup.args, setup.in_def.unflatten(setup.v))
        rows.append(_scalar_row("<u, J v>: vjp vs jvp", _inner(manual, setup.v),
                                _inner(setup.u, jax.tree.leaves(jv)), setup.dtype, rtol,
                                _level(manual, setup.v) + _level(setup.u, jax.tree.leaves(jv))))
    except Exception as err:  # a custom_vjp defines no JVP (a TypeError)
        notes.append(f"JVP/VJP consistency not checked: jax.jvp of f fails ({str(err)[:80]})")
    directions, more = setup.directions(gradient_slope(manual), reference_slope,
                                        fd_eps, fd_rtol, n_fd, seed)
    report = _report("verify_vjp", reference, rows, directions, notes + more, rtol)
    if order == 2:
        u = setup.out_def.unflatten(setup.u)
        second = verify_vjp(lambda *a: jax.vjp(f, *a)[1](u), *setup.args,
                            reference=None if reference is None else
                            (lambda *a: jax.vjp(reference, *a)[1](u)),
                            rtol=rtol, atol=atol, fd_eps=fd_eps, fd_rtol=fd_rtol, n_fd=n_fd,
                            seed=seed + 7)
        report = _merge(report, second)
    return report


def verify_jvp(
    f: _ArgsFn,
    *args: Any,
    reference: _ArgsFn | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    fd_eps: float | None = None,
    fd_rtol: float | None = None,
    n_fd: int = 3,
    seed: int = 0,
    order: int = 1,
) -> GradReport:
    """Check ``jax.jvp(f, args, v)`` (custom_jvp rules included) against central
    differences, the Taylor test and, if given, ``jax.jvp`` of a plain ``reference``.

    Arguments as :func:`verify_vjp`; rows are per (input leaf, output leaf)
    block ``args... -> out...`` (the input's direction alone), per output value,
    and ``<u, J v>`` from the VJP where f has one (``jax.vjp`` transposes the
    JVP rule: a rule that is not linear in the tangent fails there).
    ``order=2`` checks the JVP of ``x -> J(x) v`` too.
    """
    _check_functions(f, reference)
    _check_order(order)
    check_knobs(rtol=rtol, atol=atol, fd_eps=fd_eps, fd_rtol=fd_rtol, n_fd=n_fd, seed=seed)
    setup = _Setup(f, args, seed)

    def jvp_of(fn: _ArgsFn, tangent_leaves: list[Any]) -> list[Any]:
        tangents = setup.in_def.unflatten(tangent_leaves)
        return setup.out_def.flatten_up_to(jax.jvp(fn, setup.args, tangents)[1])

    def slope_of(fn: _ArgsFn) -> Slope:
        return lambda d: _inner(setup.u, jvp_of(fn, jax.tree.leaves(setup.tangents(d))))

    rows: list[LeafCheck] = []
    reference_slope = None
    if reference is not None:
        rows += _value_rows(setup, reference(*setup.args), rtol, atol)
        for i, in_path in enumerate(setup.in_paths):
            v_i = _masked(setup.v, i)
            rows += compare_leaves([f"{in_path} -> {p}" for p in setup.out_paths],
                                   jvp_of(f, v_i), jvp_of(reference, v_i), rtol, atol)
        reference_slope = slope_of(reference)
    notes: list[str] = []
    jv = jvp_of(f, setup.v)
    try:
        _, vjp_fn = jax.vjp(f, *setup.args)
        ju = setup.in_def.flatten_up_to(vjp_fn(setup.out_def.unflatten(setup.u)))
        rows.append(_scalar_row("<u, J v>: jvp vs vjp", _inner(setup.u, jv),
                                _inner(ju, setup.v), setup.dtype, rtol,
                                _level(setup.u, jv) + _level(ju, setup.v)))
    except Exception as err:  # JAX raises assorted errors for a bad rule
        notes.append(f"JVP/VJP consistency not checked: jax.vjp of f fails ({str(err)[:80]})")
    directions, more = setup.directions(slope_of(f), reference_slope, fd_eps, fd_rtol,
                                        n_fd, seed)
    report = _report("verify_jvp", reference, rows, directions, notes + more, rtol)
    if order == 2:
        v = setup.in_def.unflatten(setup.v)
        second = verify_jvp(lambda *a: jax.jvp(f, a, v)[1], *setup.args,
                            reference=None if reference is None else
                            (lambda *a: jax.jvp(reference, a, v)[1]),
                            rtol=rtol, atol=atol, fd_eps=fd_eps, fd_rtol=fd_rtol, n_fd=n_fd,
                            seed=seed + 7)
        report = _merge(report, second)
    return report


def _check_order(order: Any) -> None:
    if order not in (1, 2) or isinstance(order, bool):
        raise ValueError(f"order must be 1 or 2, got {order!r}")


def _value_rows(setup: _Setup, ref_out: PyTree, rtol: float | None,
                atol: float | None) -> list[LeafCheck]:
    """f's value against the reference's, leaf by leaf (a wrong primal misleads the rest)."""
    if jax.tree.structure(ref_out) != setup.out_def:
        raise ValueError(f"reference(*args) must have f's output structure {setup.out_def}, "
                         f"got {jax.tree.structure(ref_out)}")
    for path, mine, theirs in zip(setup.out_paths, setup.out_leaves, jax.tree.leaves(ref_out)):
        if (jnp.shape(mine), jnp.result_type(mine)) != (jnp.shape(theirs),
                                                        jnp.result_type(theirs)):
            raise ValueError(f"reference(*args){path.removeprefix('out')} has shape "
                             f"{jnp.shape(theirs)} and dtype {jnp.result_type(theirs)}, but "
                             f"f's has {jnp.shape(mine)} and {jnp.result_type(mine)}: the two "
                             f"derivatives are compared entry by entry at f's tolerance; give "
                             f"a reference in f's shapes and dtypes")
    return compare_leaves([f"value {p}" for p in setup.out_paths], setup.out_leaves,
                          jax.tree.leaves(ref_out), rtol, atol)


def _report(title: str, reference: Any, rows: list[LeafCheck],
            directions: tuple[DirectionCheck, ...], notes: list[str],
            rtol: float | None) -> GradReport:
    name = ("jax.vjp of reference" if title == "verify_vjp" else "jax.jvp of reference") \
        if reference is not None else "none given: FD and Taylor only"
    return GradReport(tuple(rows), directions, rtol_table(rows, rtol), tuple(notes),
                      title=title, reference_name=name, has_reference=reference is not None)


def _merge(first: GradReport, second: GradReport) -> GradReport:
    """One report of the first and the second order (second-order rows prefixed ``2nd``)."""
    import dataclasses

    rows = tuple(dataclasses.replace(row, path=f"2nd {row.path}") for row in second.leaves)
    return dataclasses.replace(
        first, leaves=first.leaves + rows, directions=first.directions + second.directions,
        notes=first.notes + tuple(f"2nd order: {n}" for n in second.notes),
        rtol={**second.rtol, **first.rtol})
