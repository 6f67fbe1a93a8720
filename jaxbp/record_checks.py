"""A user's activation or loss checked against ``jax.grad`` once, when it is registered.

The derivatives of a registered record are the user's, written by hand, like the
built-ins'. Before any network uses them they are compared, in float64, with
``jax.grad`` (and ``jax.jvp``, ``jax.hessian``) of the record's own function at fixed
points: a wrong derivative is a ``ValueError`` naming the point and both values, and
nothing is registered. This is the only place outside the checkers where autodiff
runs, and it runs once per registration, never on the manual path.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

RTOL, ATOL = 1e-6, 1e-9
"""How close a hand-written derivative must be to jax.grad's (float64)."""

ACTIVATION_POINTS = 41
"""An activation is compared at this many points of [-4.1, 3.9], none at 0 (a kink)."""

LOSS_ROWS, LOSS_OUTPUTS = 7, 3
"""A loss is compared on this many rows of outputs a (normal) and targets y (uniform in
[0, 1], rows summing to 1 for normalised targets; integer labels too where it takes them)."""


def check_fields(kind: str, name: Any, record: Any, functions: Sequence[str],
                 optional: Sequence[str], flags: Sequence[str]) -> None:
    """The record's name, functions (``optional`` ones may be None) and bool flags."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{kind} name must be a non-empty str, got {name!r}")
    for part in (*functions, *optional):
        value = getattr(record, part)
        if not callable(value) and not (part in optional and value is None):
            expected = "a function or None" if part in optional else "a function"
            raise TypeError(f"{kind} {name!r}: {part} must be {expected}, got "
                            f"{type(value).__name__}")
    for flag in flags:
        if not isinstance(getattr(record, flag), bool):
            raise TypeError(f"{kind} {name!r}: {flag} must be True or False, got "
                            f"{getattr(record, flag)!r}")


def check_unregistered(kind: str, name: str, registry: dict[str, Any],
                       built_in: frozenset[str]) -> None:
    """A ValueError if ``name`` is taken in ``registry`` (a built-in, or registered)."""
    if name in registry:
        taken = "a built-in" if name in built_in else "already registered"
        raise ValueError(f"{kind} {name!r} is {taken}; a name is registered once per process "
                         f"(a compiled step would keep the first): pick another")


def _compare(label: str, what: str, manual: Any, reference: Any,
             where: Callable[[tuple[int, ...]], str]) -> None:
    manual = np.asarray(manual, np.float64)
    reference = np.asarray(reference, np.float64)
    if manual.shape != reference.shape:
        raise ValueError(f"{label}: {what} has shape {manual.shape}, jax.grad's "
                         f"{reference.shape}")
    bad = ~np.isclose(manual, reference, rtol=RTOL, atol=ATOL)
    if bad.any():
        at = np.unravel_index(int(np.argmax(bad)), bad.shape)
        raise ValueError(f"{label}: {what} differs from jax.grad's at {where(at)}: "
                         f"{manual[at]:.6g} by hand, {reference[at]:.6g} by jax.grad "
                         f"({int(bad.sum())} of {bad.size} entries)")


def _autodiff(label: str, compute: Callable[[], Any]) -> Any:
    """``compute()`` (which runs jax.grad of the user's function), its failure named."""
    try:
        return compute()
    except Exception as err:  # any failure of the user's function is reported, named
        raise ValueError(f"{label}: jax.grad of its function failed ({type(err).__name__}: "
                         f"{str(err).splitlines()[0]}); it must be written in JAX, or be "
                         f"registered with check=False") from None


def check_activation(activation: Any) -> None:
    """``dg`` and ``d2g`` against jax.grad of ``g`` and of ``g'`` (float64, off 0)."""
    label = f"activation {activation.name!r}"
    with jax.enable_x64(True):
        z = jnp.linspace(-4.1, 3.9, ACTIVATION_POINTS, dtype=jnp.float64)
        first, second = _autodiff(label, lambda: (
            jax.vmap(jax.grad(activation.g))(z),
            jax.vmap(jax.grad(jax.grad(activation.g)))(z)))
        a = activation.g(z)
        for what, manual, reference in (("dg", activation.dg(z, a), first),
                                        ("d2g", activation.d2g(z, a), second)):
            _compare(label, what, np.broadcast_to(np.asarray(manual, np.float64), z.shape),
                     reference, lambda at: f"z = {float(z[at]):.2f}")


def _loss_points(loss: Any) -> list[tuple[np.ndarray, np.ndarray]]:
    """(a, y) pairs: float targets, and integer labels where the loss takes them."""
    rng = np.random.default_rng(0)
    a = rng.normal(size=(LOSS_ROWS, LOSS_OUTPUTS))
    y = rng.uniform(size=(LOSS_ROWS, LOSS_OUTPUTS))
    if loss.normalised_targets:
        y = y / y.sum(axis=-1, keepdims=True)
    points = [(a, y)]
    if loss.integer_labels:
        points.append((a, rng.integers(0, LOSS_OUTPUTS, LOSS_ROWS)))
    return points


def check_loss(loss: Any) -> None:
    """``sample_grad`` (and the fused form, ``sample_hvp``, the Hessian factor where given)
    against jax.grad, jax.jvp and jax.hessian of ``sample_loss``, row by row (float64)."""
    with jax.enable_x64(True):
        for a, y in _loss_points(loss):
            _check_loss_at(loss, jnp.asarray(a), jnp.asarray(y))


def _check_loss_at(loss: Any, a: jax.Array, y: jax.Array) -> None:
    label = f"loss {loss.name!r}"

    def where(at: tuple[int, ...]) -> str:
        return f"row {at[0]}" + (f", output {at[1]}" if len(at) > 1 else "")

    def row_loss(a_n: jax.Array, y_n: jax.Array) -> jax.Array:
        return loss.sample_loss(a_n[None], y_n[None])[0]

    def row_hvp(a_n: jax.Array, y_n: jax.Array, r_n: jax.Array) -> jax.Array:
        return jax.jvp(lambda b: jax.grad(row_loss)(b, y_n), (a_n,), (r_n,))[1]

    grad = _autodiff(label, lambda: jax.vmap(jax.grad(row_loss))(a, y))
    _compare(label, "sample_grad", loss.sample_grad(a, y), grad, where)
    if loss.sample_loss_and_grad is not None:
        fused_loss, fused_grad = loss.sample_loss_and_grad(a, y)
        _compare(label, "sample_loss_and_grad's loss", fused_loss, loss.sample_loss(a, y),
                 where)
        _compare(label, "sample_loss_and_grad's gradient", fused_grad, grad, where)
    if loss.sample_hvp is not None:
        r = jnp.asarray(np.random.default_rng(1).normal(size=a.shape))
        hvp = _autodiff(label, lambda: jax.vmap(row_hvp)(a, y, r))
        _compare(label, "sample_hvp", loss.sample_hvp(a, y, r), hvp, where)
    if loss.sample_hessian_factor is not None:
        hessian = _autodiff(label, lambda: jax.vmap(jax.hessian(row_loss))(a, y))
        factor = loss.sample_hessian_factor(a, y)
        _compare(label, "sample_hessian_factor S (as S S^T)",
                 jnp.einsum("nik,njk->nij", factor, factor), hessian, where)
