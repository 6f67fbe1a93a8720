"""The ``jaxbp`` command: ``jaxbp verify`` (and the subcommands later issues add)."""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from collections.abc import Sequence

import jax


def _verify(args: argparse.Namespace) -> int:
    from jaxbp.suite import random_cases, run_case

    dtypes = tuple(args.dtypes.split(","))
    print(f"jaxbp verify: hand-written backprop vs jax.grad, central FD and the Taylor test; "
          f"seed {args.seed}, dtypes {', '.join(dtypes)}, jax {jax.__version__} on "
          f"{jax.devices()[0].platform} ({jax.devices()[0].device_kind})")
    print(f"{'#':>3} {'dtype':<9} {'case':<68} {'rel err':>9} {'FD err':>9} "
          f"{'Taylor':>6}  status")
    worst: dict[str, float] = {}
    failed, start = 0, time.perf_counter()
    cases = random_cases(args.seed, dtypes, max_depth=args.max_depth, max_width=args.max_width)
    for i, case in enumerate(itertools.islice(cases, args.cases)):
        report = run_case(case, n_fd=args.n_fd)
        fd = max((d.fd_error_manual for d in report.directions), default=math.nan)
        orders = [d.taylor_order_manual for d in report.directions
                  if math.isfinite(d.taylor_order_manual)]
        status = "ok" if report.ok else "FAIL"
        if any("inconclusive" in (d.fd_status, d.taylor_status) for d in report.directions):
            status += " (FD inconclusive)"
        elif not report.directions:
            status += " (FD skipped)"
        print(f"{i:>3} {case.net.dtype:<9} {case.describe():<68} {report.max_rel_error:>9.2e} "
              f"{fd:>9.2e} {min(orders) if orders else math.nan:>6.2f}  {status}")
        worst[case.net.dtype] = max(worst.get(case.net.dtype, 0.0), report.max_rel_error)
        if not report.ok:
            failed += 1
            print(report)
    print("worst relative error vs jax.grad: " +
          ", ".join(f"{dtype} {err:.2e}" for dtype, err in worst.items()))
    print(f"{'FAILED' if failed else 'all ok'}: {failed} of {i + 1} cases failed "
          f"({time.perf_counter() - start:.1f} s)")
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``jaxbp`` and its subcommands."""
    parser = argparse.ArgumentParser(
        prog="jaxbp", description="Hand-written backpropagation for MLPs in JAX.")
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser(
        "verify", help="check the hand-written gradient over random architectures",
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
                        help="run only the first N cases (default: all, 27 per dtype)")
    verify.set_defaults(run=_verify)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jaxbp`` command; returns the exit code."""
    args = build_parser().parse_args(argv)
    if args.command == "verify":
        bad = set(args.dtypes.split(",")) - {"float64", "float32", "bfloat16", "float16"}
        if bad:
            print(f"jaxbp verify: error: --dtypes: unknown {sorted(bad)}; choose from "
                  f"float64, float32, bfloat16, float16", file=sys.stderr)
            return 2
        jax.config.update("jax_enable_x64", True)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
