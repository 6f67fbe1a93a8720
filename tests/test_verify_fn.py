"""verify_vjp / verify_jvp and jaxbp.testing: correct custom rules pass, planted bugs are
caught and pointed at, kinks are inconclusive, low precision says what it skipped."""

from __future__ import annotations

import functools
import pathlib
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from planted_rules import CORRECT, PLANTED, make_args

import jaxbp
from jaxbp import GradientCheckError
from jaxbp.testing import assert_grads_correct, assert_jvp_correct, assert_vjp_correct


def _check(kind):
    return jaxbp.verify_vjp if kind == "vjp" else jaxbp.verify_jvp


@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_correct_rules_raise_no_alarm(dtype):
    with jax.enable_x64(dtype == "float64"):
        for name, (kind, f, reference) in CORRECT.items():
            args = make_args(name, dtype)
            for report in (_check(kind)(f, *args, reference=reference),
                           _check(kind)(f, *args)):
                assert report.ok, f"{name}\n{report}"
            assert report.directions and all(d.fd_status == "ok" for d in report.directions)


def test_second_order_of_correct_rules(x64):
    for name in ("norm (custom_vjp, scalar out)", "layer (custom_vjp, pytree in and out)",
                 "sigmoid (custom_jvp, vector)"):
        kind, f, reference = CORRECT[name]
        report = _check(kind)(f, *make_args(name), reference=reference, order=2)
        assert report.ok, f"{name}\n{report}"
        assert any(row.path.startswith("2nd ") for row in report.leaves)


@pytest.mark.parametrize("name", sorted(PLANTED))
def test_planted_bug_is_caught_and_pointed_at(name, x64):
    kind, f, reference, bad = PLANTED[name]
    args = make_args(name)
    with_reference = _check(kind)(f, *args, reference=reference)
    assert with_reference.failed, f"{name}\n{with_reference}"
    failing = [row.path for row in with_reference.leaves if not row.ok]
    assert failing and all(bad in path for path in failing), (name, failing)
    # FD and Taylor alone catch it too (no reference given)
    alone = _check(kind)(f, *args)
    assert alone.failed, f"{name}\n{alone}"
    with pytest.raises(AssertionError, match="FAILED") as info:
        (assert_vjp_correct if kind == "vjp" else assert_jvp_correct)(f, *args,
                                                                      reference=reference)
    assert bad in str(info.value)


def test_the_wrong_entry_is_named_with_both_values(x64):
    _kind, f, reference, _ = PLANTED["one wrong entry (logsumexp)"]
    (x,) = make_args("one wrong entry (logsumexp)")
    report = jaxbp.verify_vjp(f, x, reference=reference)
    row = next(r for r in report.leaves if not r.ok)
    assert row.index == (2,)   # the planted entry, with the rule's value 1.5x the true one
    assert row.manual_at_index == pytest.approx(1.5 * row.reference_at_index, rel=1e-12)


def test_a_kink_is_inconclusive_never_a_pass(x64):
    absolute = jax.custom_vjp(jnp.abs)
    absolute.defvjp(lambda x: (jnp.abs(x), x), lambda x, g: (g * jnp.sign(x),))
    x = jnp.array([0.0, 1.0, -2.0])
    for report in (jaxbp.verify_vjp(absolute, x), jaxbp.verify_vjp(absolute, x,
                                                                    reference=jnp.abs)):
        assert report.verdict == "INCONCLUSIVE" and not report.ok and not report.failed
    with pytest.raises(AssertionError, match="INCONCLUSIVE"):
        assert_vjp_correct(absolute, x)
    assert assert_vjp_correct(absolute, x, allow_inconclusive=True).verdict == "INCONCLUSIVE"


def test_low_precision_skips_fd_and_says_so():
    _kind, f, reference = CORRECT["softplus (custom_jvp, vector)"]
    x = jnp.linspace(-2, 2, 7, dtype=jnp.bfloat16)
    report = jaxbp.verify_jvp(f, x, reference=reference)
    assert report.ok and not report.directions
    assert any("skipped" in note for note in report.notes)


def test_nothing_checked_is_inconclusive_never_ok():
    """A wrong custom_vjp rule in bf16 with no reference: no jvp to compare with, and FD
    and Taylor skipped for the dtype. The report said OK with nothing checked."""
    wrong = jax.custom_vjp(jnp.sin)
    wrong.defvjp(lambda x: (jnp.sin(x), x), lambda x, g: (g * jnp.sin(x),))
    for dtype in (jnp.bfloat16, jnp.float16):
        report = jaxbp.verify_vjp(wrong, jnp.ones(3, dtype))
        assert not report.leaves and not report.directions
        assert report.verdict == "INCONCLUSIVE" and "nothing was checked" in report.summary()
        with pytest.raises(GradientCheckError, match="nothing was checked"):
            assert_vjp_correct(wrong, jnp.ones(3, dtype))
    assert jaxbp.verify_vjp(wrong, jnp.ones(3, jnp.float32)).failed   # FD refutes it there


def test_empty_arrays_are_checked_as_they_are_and_nothing_but_them_is_named():
    """A zero-size leaf among others is checked like any (its finite check crashed on an
    empty argmax: JAX's bare "attempt to get argmax of an empty sequence"); only empty
    arrays leave no derivative to check, which would pass vacuously: a ValueError."""
    params = {"w": jnp.zeros((0, 3)), "b": jnp.ones(2)}
    assert jaxbp.verify_grads(lambda p: {"w": p["w"], "b": 2 * p["b"]},
                              lambda p: jnp.sum(p["b"] ** 2), params).ok
    with pytest.raises(ValueError, match=r"args hold no entries \(each of its 1 arrays has "
                                         r"size 0\): there is no derivative to check"):
        jaxbp.verify_vjp(lambda z: 2 * z, jnp.zeros((0,)))
    with pytest.raises(ValueError, match="f\\(\\*args\\) hold no entries"):
        jaxbp.verify_jvp(lambda z: z[:0], jnp.ones(3))
    with pytest.raises(ValueError, match="params hold no entries"):
        jaxbp.verify_grads(lambda p: p, lambda p: jnp.sum(p["w"]), {"w": jnp.zeros((0, 3))})


def test_custom_vjp_without_jvp_is_noted_not_failed(x64):
    _kind, f, reference = CORRECT["norm (custom_vjp, scalar out)"]
    report = jaxbp.verify_vjp(f, *make_args("norm"), reference=reference)
    assert report.ok and any("consistency not checked" in n for n in report.notes)
    assert not any(row.path.startswith("<u, J v>") for row in report.leaves)


def test_nonlinear_jvp_rule_fails_the_consistency_row(x64):
    """A JVP rule not linear in the tangent: jax.vjp cannot transpose it, or the
    <u, J v> row tells JVP and VJP apart; FD refutes it either way."""
    square_t = jax.custom_jvp(jnp.sin)
    square_t.defjvp(lambda p, t: (jnp.sin(p[0]), jnp.cos(p[0]) * t[0] * (1 + t[0])))
    report = jaxbp.verify_jvp(square_t, jnp.linspace(0.1, 1, 5), reference=jnp.sin)
    assert report.failed


def test_bad_arguments_are_named():
    with pytest.raises(TypeError, match=r"f must be a function \(\*args\) -> outputs, got str"):
        jaxbp.verify_vjp("sin", jnp.ones(3))
    with pytest.raises(TypeError, match=r"reference must be a function .* got str"):
        jaxbp.verify_jvp(jnp.sin, jnp.ones(3), reference="sin")
    for names, bad in (("grad_fn", (None, jnp.sin)), ("loss_fn", (jnp.cos, "cost"))):
        with pytest.raises(TypeError, match=f"{names} must be a function \\(params, \\*args\\)"):
            jaxbp.verify_grads(*bad, jnp.ones(3))   # were "'NoneType' object is not callable"
    with pytest.raises(ValueError, match="at least one argument"):
        jaxbp.verify_vjp(jnp.sin)
    with pytest.raises(TypeError, match=r"args\[0\] must be an array or a number, got str"):
        jaxbp.verify_vjp(jnp.sin, "x")
    with pytest.raises(TypeError, match=r"args\[1\] must be floating, got int32"):
        jaxbp.verify_vjp(lambda x, i: x[i], jnp.ones(3), jnp.int32(1))
    with pytest.raises(ValueError, match=r"args\[0\] holds values that are not finite: "
                                         r"args\[0\]\[1\] = nan"):   # was FAILED (NaN rows)
        jaxbp.verify_vjp(jnp.sin, jnp.array([1.0, jnp.nan]))
    with pytest.raises(ValueError, match=r"params\['w'\]\[0\] = inf"):
        jaxbp.verify_grads(lambda p: p, lambda p: jnp.sum(p["w"]), {"w": jnp.array([jnp.inf])})
    with pytest.raises(ValueError, match="order must be 1 or 2"):
        jaxbp.verify_jvp(jnp.sin, jnp.ones(3), order=3)
    with pytest.raises(ValueError, match="output structure"):
        jaxbp.verify_vjp(lambda x: (x, x), jnp.ones(3), reference=lambda x: x)
    for check in (jaxbp.verify_vjp, jaxbp.verify_jvp):   # was JAX's "unexpected JAX type"
        with pytest.raises(ValueError, match=r"reference\(\*args\)\[1\] has shape \(3,\) "
                                             r"and dtype float16, but f's has \(3,\) and "
                                             r"float32"):
            check(lambda x: (x, jnp.sin(x)), jnp.ones(3),
                  reference=lambda x: (x, jnp.sin(x).astype(jnp.float16)))


def test_assert_grads_correct_raises_with_the_table():
    loss = lambda p: jnp.sum(jnp.sin(p["w"]))  # noqa: E731
    good = lambda p: {"w": jnp.cos(p["w"])}  # noqa: E731
    bad = lambda p: {"w": jnp.cos(p["w"]).at[1].set(0.0)}  # noqa: E731
    params = {"w": jnp.linspace(0.1, 1.0, 4)}
    assert assert_grads_correct(good, loss, params).ok
    with pytest.raises(jaxbp.GradientCheckError, match=r"\['w'\].*\(1,\)"):
        assert_grads_correct(bad, loss, params)


def _checkers_side_by_side():
    """(caught by jax.test_util.check_grads at its defaults, caught by verify_vjp/jvp)."""
    from jax.test_util import check_grads

    ours = theirs = 0
    for name, (kind, f, _reference, _) in PLANTED.items():
        args = make_args(name)
        ours += _check(kind)(f, *args).failed
        try:
            check_grads(f, args, order=1, modes=("rev",) if kind == "vjp" else ("fwd",))
        except AssertionError:
            theirs += 1
    return theirs, ours


@functools.cache
def _readme_counts():
    text = (pathlib.Path(__file__).resolve().parent.parent / "README.md").read_text()
    match = re.search(r"check_grads` at its\s+defaults catches (\d+) of (\d+);\s+`verify_vjp`/"
                      r"`verify_jvp`\s+without a reference catch (\d+)", text)
    assert match, "the README's checker comparison sentence is missing"
    return tuple(int(g) for g in match.groups())


def test_readme_comparison_counts_are_measured(x64):
    theirs, ours = _checkers_side_by_side()
    assert _readme_counts() == (theirs, len(PLANTED), ours)
    assert ours == len(PLANTED)


def _exp_fast(x):
    return jnp.exp(x * 1e6)


def test_the_fd_step_follows_the_input_scale_and_both_checkers_judge_alike(x64):
    """The issue's case: inputs of size 1e-6 and a function that curves on that scale.
    A step cbrt(eps) max(1, |x|) was six times the inputs (FD 80-140% off, FAILED); scaled
    to the input, FD agrees, Taylor measures order 2, and verify_grads says the same."""
    x = 1e-6 * jnp.asarray(np.random.default_rng(0).normal(size=5))
    report = jaxbp.verify_vjp(_exp_fast, x)
    assert report.ok, str(report)
    assert all(d.fd_status == "ok" and d.taylor_status == "ok" for d in report.directions)
    assert all(abs(d.taylor_order_manual - 2) < 0.2 for d in report.directions)
    grads = jaxbp.verify_grads(lambda p: 1e6 * jnp.exp(p * 1e6),
                                lambda p: jnp.sum(jnp.exp(p * 1e6)), x)
    assert grads.ok, str(grads)


def test_smaller_steps_never_pass_a_wrong_derivative(x64):
    """The retries at smaller steps cannot rescue a derivative 1e-3 off: a wrong slope
    misses at every step."""
    @jax.custom_vjp
    def f(x):
        return jnp.sin(x)

    f.defvjp(lambda x: (jnp.sin(x), x), lambda x, u: (u * jnp.cos(x) * (1 + 1e-3),))
    report = jaxbp.verify_vjp(f, jnp.linspace(0.1, 1.0, 5))
    assert not report.ok
    assert all(d.fd_status == "FAIL" for d in report.directions)


def test_an_order_far_above_two_is_inconclusive_not_ok(x64):
    """Steps forced far outside the function's asymptotic range (fd_eps 1e-3 for a
    function that curves on 1e-6): a Taylor order of ~10 is no evidence either way."""
    x = 1e-6 * jnp.asarray(np.random.default_rng(0).normal(size=5))
    report = jaxbp.verify_vjp(_exp_fast, x, fd_eps=1e-3)
    top = jaxbp.check.verify.TAYLOR_MAX_ORDER
    high = [d for d in report.directions if d.taylor_order_manual > top]
    assert high and all(d.taylor_status == "inconclusive" for d in high)
    assert not report.ok
