"""``jaxbp bench``: the training step timed manual vs jax.grad, with the GEMM roof."""

from __future__ import annotations

import argparse
import pathlib
from typing import Any

import jax

from jaxbp.cli.common import UsageError, positive, writable_dir
from jaxbp.matmul_precision import MATMUL_PRECISIONS

CPU_MAX_GFLOP = 20.0
"""The full bench suite's default cap on a CPU: its largest cases need TFLOPs per step."""

ACCELERATOR_TIME_LIMIT_S = 1800.0
"""The full bench suite's default time limit on a GPU/TPU: cases not started by then are
listed as left out (the largest need seconds per step and minutes to time)."""


def add_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    """The ``bench`` subcommand's options."""
    bench = commands.add_parser(
        "bench", parents=[common], allow_abbrev=False,
        help="benchmark the training step: manual vs autodiff vs the GEMM rate",
        description="Time the k-step scan train loop with the hand-written gradient and "
                    "with jax.grad, interleaved in one process, over widths x depths x "
                    "batches x losses x precisions; report ratios, roofline fractions and "
                    "memory; write JSON, markdown and PNG.")
    from jaxbp.bench.cases import QUICK, QUICK_ACCELERATOR

    bench.add_argument("--quick", action="store_true",
                       help=f"{len(QUICK)} small cases on a CPU (2 CNNs and 28 MLPs in three "
                            f"recipes, 3 GPTs, one LLaMA-style: about 6 minutes on 2 cores); "
                            f"{len(QUICK_ACCELERATOR)} on a GPU/TPU (CNNs, a GPT-2-small step, "
                            f"W1024-4096 x B512-8192 MLPs) so that none is launch-bound")
    bench.add_argument("--out", default="benchmarks/results", help="results folder")
    bench.add_argument("--name", default=None, help="file stem (default step_<preset>_<platform>)")
    bench.add_argument("--precision", default=None, choices=list(MATMUL_PRECISIONS),
                       help="matmul precision of the step and the GEMM rates (default: JAX's "
                            "setting, 'default'; float32 then runs as TF32 on NVIDIA GPUs "
                            "and one bf16 pass on TPUs; 'highest' is true float32)")
    bench.add_argument("--steps", type=int, default=None,
                       help="train steps per timed call (default: chosen per case so that "
                            "a call is at least --min-sample-ms of work)")
    bench.add_argument("--min-sample-ms", type=float, default=5.0,
                       help="least device time of one timed sample, ms (5)")
    bench.add_argument("--budget", type=float, default=1.0, help="timing seconds per case (1)")
    bench.add_argument("--max-gflop", type=float, default=None,
                       help="leave out cases above this many matmul GFLOP per step "
                            f"(default: none on accelerators, {CPU_MAX_GFLOP:g} for the full "
                            "suite on a CPU)")
    bench.add_argument("--time-limit", type=float, default=None,
                       help="start no case after this many seconds (default: none on a CPU "
                            f"or with --quick, {ACCELERATOR_TIME_LIMIT_S:g} for the full "
                            "suite on a GPU/TPU)")
    bench.set_defaults(run=run)


def check(args: argparse.Namespace) -> None:
    if args.max_gflop is not None:
        positive("--max-gflop", args.max_gflop)
    if args.time_limit is not None:
        positive("--time-limit", args.time_limit)
    if args.steps is not None:
        positive("--steps", args.steps, integer=True)
    positive("--budget", args.budget)
    positive("--min-sample-ms", args.min_sample_ms)
    writable_dir("--out", pathlib.Path(args.out))
    if args.name is not None and (not args.name.strip() or args.name in (".", "..")
                                  or pathlib.Path(args.name).name != args.name):
        raise UsageError(f"--name must be a file stem (no folder: the files go in --out), "
                         f"got {args.name!r}")


def run(args: argparse.Namespace) -> int:
    """Run the quick or full suite and write its JSON, markdown and figure."""
    from jaxbp.bench import suite as bench_suite

    check(args)
    platform = jax.devices()[0].platform
    cases = bench_suite.quick_cases(platform) if args.quick else bench_suite.FULL
    name = args.name or f"step_{'quick' if args.quick else 'full'}_{platform}"
    max_gflop, time_limit = args.max_gflop, args.time_limit
    if max_gflop is None and platform == "cpu" and not args.quick:
        max_gflop = CPU_MAX_GFLOP
        print(f"jaxbp bench: on a CPU the full suite leaves out cases above {max_gflop:g} "
              f"matmul GFLOP per step (set --max-gflop to change)")
    if time_limit is None and platform != "cpu" and not args.quick:
        time_limit = ACCELERATOR_TIME_LIMIT_S
        print(f"jaxbp bench: on {platform} the full suite starts no case after "
              f"{time_limit:g} s (set --time-limit to change)")
    bench_suite.run_suite(cases, args.out, name, budget_s=args.budget, max_gflop=max_gflop,
                          time_limit_s=time_limit, precision=args.precision,
                          steps=args.steps, min_sample_s=args.min_sample_ms / 1e3)
    return 0
