"""What a gradient check found: per leaf, per direction, and the verdict."""

from __future__ import annotations

import dataclasses
import math


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
    sides with the manual gradient ("reference disagrees"), or when nothing could be
    checked at all. Inconclusive and skipped checks are listed, never counted as passes.
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
    def checked_anything(self) -> bool:
        """Some comparison was made: a leaf against a reference, or an FD or Taylor check
        that passed (none at all: no reference, and no step usable in the dtype)."""
        return bool(self.leaves) or any("ok" in (d.fd_status, d.taylor_status)
                                        for d in self.directions)

    @property
    def verdict(self) -> str:
        """``"OK"``, ``"FAILED"`` or ``"INCONCLUSIVE"`` (see the class docstring)."""
        if any("FAIL" in (d.fd_status, d.taylor_status) for d in self.directions):
            return "FAILED"
        if not self.checked_anything:
            return "INCONCLUSIVE"
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
        if not self.checked_anything:
            why = (" (nothing was checked: no reference, and no FD or Taylor check could be "
                   "made; give a reference, or check in float32/float64)")
        elif self.verdict == "INCONCLUSIVE":
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


