"""``jaxbp verify``: verify_grads over random architectures, one table line per case."""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import time
from typing import Any

import jax

from jaxbp.cli.common import UsageError, positive

DTYPES = ("float64", "float32", "bfloat16", "float16")


def add_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    """The ``verify`` subcommand's options."""
    verify = commands.add_parser(
        "verify", parents=[common], allow_abbrev=False,
        help="check the hand-written gradient over random architectures",
        description="Run verify_grads over every activation x loss x dtype, each on a "
                    "random architecture; print the table; exit 1 on any failure.")
    verify.add_argument("--seed", type=int, default=0, help="suite seed (default 0)")
    verify.add_argument("--dtypes", default="float64,float32,bfloat16",
                        help="comma-separated dtypes (default float64,float32,bfloat16)")
    verify.add_argument("--n-fd", type=int, default=2,
                        help="random directions for FD and Taylor per case (default 2)")
    verify.add_argument("--max-depth", type=int, default=4, help="max weight layers (4)")
    verify.add_argument("--max-width", type=int, default=16, help="max layer width (16)")
    verify.add_argument("--cases", type=int, default=None,
                        help="run only the first N cases of each dtype and recipe (default: "
                             "all, 32 per dtype)")
    verify.add_argument("--recipes", default="bf16",
                        help="comma-separated numerical recipes (bf16, bf16-operands) whose "
                             "gradient is judged on the float32 cases against the float64 "
                             "truth, beside jax.grad of the same recipe; none: no recipe "
                             "(default bf16)")
    verify.set_defaults(run=run)


def check(args: argparse.Namespace) -> None:
    bad = sorted(set(args.dtypes.split(",")) - set(DTYPES))
    if bad:
        raise UsageError(f"--dtypes: unknown {bad}; choose from {', '.join(DTYPES)}")
    bad = sorted(set(_recipes(args)) - set(_ROUNDING))
    if bad:
        raise UsageError(f"--recipes: unknown {bad}; choose from {', '.join(_ROUNDING)} or "
                         f"none")
    if args.cases is not None:
        positive("--cases", args.cases, integer=True)
    positive("--n-fd", args.n_fd, integer=True, allow_zero=True)
    positive("--seed", args.seed, integer=True, allow_zero=True)
    positive("--max-depth", args.max_depth, integer=True)
    positive("--max-width", args.max_width, integer=True)


def run(args: argparse.Namespace) -> int:
    """Every case's line, the worst error per dtype, and 1 if any case failed."""
    from jaxbp.check.suite import random_cases, run_case

    check(args)
    jax.config.update("jax_enable_x64", True)

    dtypes = tuple(args.dtypes.split(","))
    print(f"jaxbp verify: hand-written backprop vs jax.grad, central FD and the Taylor test "
          f"(L at matmul precision highest); seed {args.seed}, dtypes {', '.join(dtypes)}, "
          f"recipes {', '.join(_recipes(args)) or 'none'}, "
          f"jax {jax.__version__} on "
          f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})")
    print(f"{'#':>3} {'dtype':<9} {'case':<68} {'rel err':>9} {'FD err':>9} "
          f"{'Taylor':>6}  status")
    worst: dict[str, float] = {}
    failed, count, start = 0, 0, time.perf_counter()
    cases = random_cases(args.seed, dtypes, max_depth=args.max_depth, max_width=args.max_width)
    per_dtype = itertools.groupby(cases, key=lambda case: case.net.dtype)
    cases = itertools.chain.from_iterable(itertools.islice(group, args.cases)
                                          for _, group in per_dtype)
    for i, case in enumerate(cases):
        count += 1
        report = run_case(case, n_fd=args.n_fd)
        fd = max((d.fd_error_manual for d in report.directions), default=math.nan)
        orders = [d.taylor_order_manual for d in report.directions
                  if math.isfinite(d.taylor_order_manual)]
        status = {"OK": "ok", "FAILED": "FAIL", "INCONCLUSIVE": "inconclusive"}[report.verdict]
        if any("inconclusive" in (d.fd_status, d.taylor_status) for d in report.directions):
            status += " (FD inconclusive)"
        elif not report.directions:
            status += " (FD skipped)"
        elif any(d.taylor_status == "flat" for d in report.directions):
            status += " (Taylor flat)"   # the remainder at rounding level: no order (nan)
        print(f"{i:>3} {case.net.dtype:<9} {case.describe():<68} {report.max_rel_error:>9.2e} "
              f"{fd:>9.2e} {min(orders) if orders else math.nan:>6.2f}  {status}")
        worst[case.net.dtype] = max(worst.get(case.net.dtype, 0.0), report.max_rel_error)
        if report.failed:
            failed += 1
            print(report)
    print("worst relative error vs jax.grad: " +
          ", ".join(f"{dtype} {err:.2e}" for dtype, err in worst.items()))
    if _recipes(args):
        recipe_failed, recipe_count = _run_recipes(args)
        failed, count = failed + recipe_failed, count + recipe_count
    print(f"{'FAILED' if failed else 'all ok'}: {failed} of {count} cases failed "
          f"({time.perf_counter() - start:.1f} s)")
    return 1 if failed else 0


_ROUNDING = ("bf16", "bf16-operands")
"""The recipes that round (``float32`` is the float32 dtype's cases above)."""


def _recipes(args: argparse.Namespace) -> list[str]:
    return [] if args.recipes == "none" else args.recipes.split(",")


def _run_recipes(args: argparse.Namespace) -> tuple[int, int]:
    """Each recipe on the float32 cases (:func:`jaxbp.check.recipe.check_recipe`): one line
    per case, the worst per recipe; returns (failed, cases)."""
    from jaxbp.check.recipe import check_recipe
    from jaxbp.check.suite import case_data, random_cases
    from jaxbp.layers.precision import RECIPES

    print("recipes: the hand-written gradient in the recipe vs the float64 truth, normwise, "
          "beside jax.grad of the same recipe; ok within max(1e-2, 2 x jax.grad's)")
    print(f"{'#':>3} {'recipe':<13} {'case':<68} {'manual':>9} {'jax.grad':>9}  status")
    failed, count, worst = 0, 0, {}
    for recipe in _recipes(args):
        cases = itertools.islice(random_cases(args.seed, ("float32",), max_depth=args.max_depth,
                                              max_width=args.max_width), args.cases)
        for case in cases:
            params, x, y = case_data(case)
            net = dataclasses.replace(case.net, **RECIPES[recipe])
            result = check_recipe(net, case.net, params, x, y)
            print(f"{count:>3} {recipe:<13} {case.describe():<68} {result.manual:>9.2e} "
                  f"{result.autodiff:>9.2e}  {'ok' if result.ok else 'FAIL'}")
            worst[recipe] = max(worst.get(recipe, (0.0, 0.0)), (result.manual, result.autodiff))
            failed, count = failed + (not result.ok), count + 1
    print("worst error from the float64 truth: " +
          "; ".join(f"{r} {m:.2e} (jax.grad {a:.2e})" for r, (m, a) in worst.items()))
    return failed, count
