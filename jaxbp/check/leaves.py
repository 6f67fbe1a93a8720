"""Leaf-by-leaf comparison of a gradient with a reference, and the tolerances it uses.

A leaf passes when ``max_i |m_i - r_i| <= atol + rtol * max_i |r_i|``: the error is
measured against the leaf's scale, and ``atol`` (a few ulps of the whole gradient's
largest entry) lets a leaf that is small because its terms cancel keep their rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from jaxbp import value_checks
from jaxbp.check.report import LeafCheck
from jaxbp.types import PyTree, check_int

DEFAULT_RTOL = {"float64": 1e-10, "float32": 1e-4, "float16": 2e-2, "bfloat16": 5e-2}
"""rtol of manual vs jax.grad per leaf dtype (see :func:`verify_grads`)."""
LOW_PRECISION_EPS = 1e-4
"""Above this machine epsilon FD and Taylor tests are skipped (bfloat16, float16)."""
ROUNDING_ULPS = 16
"""A leaf's error below this many ulps of the gradient's largest entry is rounding alone."""


def as_arrays(params: PyTree, name: str = "params") -> PyTree:
    """Leaves as arrays: Python/NumPy scalars and lists become JAX arrays (floats in JAX's
    default float dtype); arrays are kept as they are. A leaf that is neither is named
    as ``name`` and its path."""
    def one(path: Any, leaf: Any) -> Any:
        if isinstance(leaf, jax.Array | np.ndarray):
            return leaf
        try:
            return jnp.asarray(leaf)
        except TypeError:
            raise TypeError(f"{name}{jax.tree_util.keystr(path)} must be an array or a number, "
                            f"got {type(leaf).__name__}") from None

    return jax.tree_util.tree_map_with_path(one, params)


def check_float_leaves(params: PyTree) -> None:
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(f"params{jax.tree_util.keystr(path)} must be floating to be "
                            f"differentiated, got dtype {jnp.result_type(leaf)}")
        value_checks.check_finite(leaf, f"params{jax.tree_util.keystr(path)}")  # a point
    check_has_entries(jax.tree.leaves(params), "params")


def check_has_entries(leaves: Sequence[Any], what: str) -> None:
    """Some leaf holds an entry: a check over nothing but empty arrays would pass vacuously
    (one empty leaf among others is checked as it is)."""
    if not any(np.size(leaf) for leaf in leaves):
        raise ValueError(f"{what} hold no entries (each of its {len(leaves)} arrays has size "
                         f"0): there is no derivative to check")


def check_same_structure(params: PyTree, manual: PyTree) -> None:
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
    """Tolerances finite and >= 0 (or None for the default), the FD step > 0, ``n_fd`` and
    ``seed`` ints >= 0: a bad one is a ValueError naming it, not a FAILED report."""
    for name, value in knobs.items():
        if value is None:
            continue
        if name in ("n_fd", "seed"):
            check_int(name, value, 0)
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


def compare_leaves(paths: Sequence[str], manual: Sequence[Any], reference: Sequence[Any],
                   rtol: float | None, atol: float | None) -> list[LeafCheck]:
    """One row per leaf, each judged with the tolerance of its dtype and an absolute floor
    relative to the largest entry of all ``reference`` leaves (a block of rows)."""
    scale = max((float(np.max(np.abs(to_f64(r)), initial=0.0)) for r in reference),
                default=0.0)
    return [compare_leaf(path, m, r, rtol_for(r, rtol), atol_for(r, atol, rtol, scale))
            for path, m, r in zip(paths, manual, reference)]


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


