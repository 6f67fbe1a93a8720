"""Assertions for a user's own tests: a derivative check that raises with its table.

    from jaxbp.testing import assert_vjp_correct

    def test_my_rule():
        assert_vjp_correct(my_fn_with_custom_vjp, x, w, reference=my_plain_fn)

Each runs :func:`jaxbp.verify_vjp`, :func:`jaxbp.verify_jvp`, :func:`jaxbp.verify_grads`
or :func:`jaxbp.verify_layer` (a layer record of your own) and raises
:class:`jaxbp.GradientCheckError` (an ``AssertionError``) whose message is the report:
the verdict, every leaf or block with the index and both values of its worst entry,
every FD/Taylor direction. An INCONCLUSIVE report (a kink inside the step, or witnesses
that contradict each other) raises too unless ``allow_inconclusive=True``: it is not a
pass. The report is returned when the check passes.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from jaxbp.check.layer import verify_layer
from jaxbp.check.verify import GradientCheckError, GradReport, verify_grads
from jaxbp.check.verify_fn import verify_jvp, verify_vjp
from jaxbp.types import check_bool


def _assert_ok(report: GradReport, allow_inconclusive: bool) -> GradReport:
    if report.ok or (allow_inconclusive and report.verdict == "INCONCLUSIVE"):
        return report
    raise GradientCheckError(str(report))


def assert_vjp_correct(f: Callable[..., Any], *args: Any, allow_inconclusive: bool = False,
                       **options: Any) -> GradReport:
    """:func:`jaxbp.verify_vjp` that raises unless OK (``options``: its keyword arguments)."""
    check_bool("allow_inconclusive", allow_inconclusive)
    return _assert_ok(verify_vjp(f, *args, **options), allow_inconclusive)


def assert_jvp_correct(f: Callable[..., Any], *args: Any, allow_inconclusive: bool = False,
                       **options: Any) -> GradReport:
    """:func:`jaxbp.verify_jvp` that raises unless OK (``options``: its keyword arguments)."""
    check_bool("allow_inconclusive", allow_inconclusive)
    return _assert_ok(verify_jvp(f, *args, **options), allow_inconclusive)


def assert_grads_correct(grad_fn: Callable[..., Any], loss_fn: Callable[..., Any], params: Any,
                         *args: Any, allow_inconclusive: bool = False,
                         **options: Any) -> GradReport:
    """:func:`jaxbp.verify_grads` that raises unless OK (``options``: its keyword arguments)."""
    check_bool("allow_inconclusive", allow_inconclusive)
    return _assert_ok(verify_grads(grad_fn, loss_fn, params, *args, **options),
                      allow_inconclusive)


def assert_layer_correct(layer: Any, x: Any, params: Any = None, *,
                         allow_inconclusive: bool = False, **options: Any) -> GradReport:
    """:func:`jaxbp.verify_layer` that raises unless OK (``options``: its keyword arguments)."""
    check_bool("allow_inconclusive", allow_inconclusive)
    return _assert_ok(verify_layer(layer, x, params, **options), allow_inconclusive)
