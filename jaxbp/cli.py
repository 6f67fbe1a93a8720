"""The ``jaxbp`` command: ``jaxbp verify`` (and the subcommands later issues add)."""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from collections.abc import Sequence

import jax
import optax


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


CPU_MAX_GFLOP = 20.0
"""The full bench suite's default cap on a CPU: its largest cases need TFLOPs per step."""

OPTIMIZERS = {
    "sgd": lambda lr: optax.sgd(lr),
    "momentum": lambda lr: optax.sgd(lr, momentum=0.9),
    "nesterov": lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True),
    "adam": lambda lr: optax.adam(lr),
    "adamw": lambda lr: optax.adamw(lr),
}


def _load_data(name: str, seed: int):
    from jaxbp import data

    if name == "digits":
        return data.load_digits()
    if name == "teacher":
        return data.teacher_regression(jax.random.key(seed + 1))
    return data.load_npz(name)


def _train(args: argparse.Namespace) -> int:
    import jaxbp
    from jaxbp.fit import fit
    from jaxbp.suite import verify_mlp

    start = time.perf_counter()
    dataset = _load_data(args.data, args.seed)
    loss = args.loss or ("softmax_cross_entropy" if dataset.is_classification
                         else "squared_error")
    if args.sizes:
        sizes = tuple(int(s) for s in args.sizes.split(","))
    else:
        sizes = (dataset.n_in, 256, 256, dataset.n_out)
    net = jaxbp.MLP(sizes, args.activation, args.output_activation, loss)
    optimizer = OPTIMIZERS[args.optimizer](args.lr)
    print(f"jaxbp train: {args.data} ({len(dataset.x_train)} train, {len(dataset.x_test)} "
          f"test), sizes {net.sizes}, {args.activation}, {loss}, {args.optimizer} lr {args.lr}, "
          f"grad {args.grad}, jax {jax.__version__} on {jax.devices()[0].platform}")

    key = jax.random.key(args.seed)
    params = net.init(jax.random.split(key)[0])  # the params fit starts from
    x0, y0 = dataset.x_train[:args.batch_size], dataset.y_train[:args.batch_size]
    report = verify_mlp(net, params, x0, y0, n_fd=2, float64=True)
    print(f"gradient check at the initial params, first {len(x0)} samples, in float64: "
          f"{report.summary()}")
    if not report.ok:
        print(report)
        return 1

    result = fit(net, optimizer, dataset, epochs=args.epochs, batch_size=args.batch_size,
                 key=key, grad=args.grad, checkpoint_dir=args.checkpoint_dir,
                 progress=not args.quiet, plot=args.plot,
                 diagnostics=args.diagnostics is not None)
    history = result.history
    final = f"final test loss {history['test_loss'][-1]:.4f}"
    if dataset.is_classification:
        final = f"final test accuracy {history['test_accuracy'][-1]:.4f}, " + final
    print(f"{final} after {history['epoch'][-1]} epochs "
          f"({time.perf_counter() - start:.1f} s in all)")
    if args.plot:
        print(f"wrote {args.plot}")
    if args.diagnostics:
        from jaxbp.fit import plot_flow

        plot_flow(history, args.diagnostics)
        print(f"wrote {args.diagnostics}")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from jaxbp import bench_suite

    cases = bench_suite.QUICK if args.quick else bench_suite.FULL
    platform = jax.devices()[0].platform
    name = args.name or f"step_{'quick' if args.quick else 'full'}_{platform}"
    max_gflop = args.max_gflop
    if max_gflop is None and platform == "cpu" and not args.quick:
        max_gflop = CPU_MAX_GFLOP
        print(f"jaxbp bench: on a CPU the full suite leaves out cases above {max_gflop:g} "
              f"matmul GFLOP per step (set --max-gflop to change)")
    bench_suite.run_suite(cases, args.out, name, steps=args.steps, budget_s=args.budget,
                          max_gflop=max_gflop)
    return 0


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

    train = commands.add_parser(
        "train", help="train an MLP with the hand-written gradient",
        description="Verify the gradient once on the first batch, then train with the "
                    "jitted step, evaluating every epoch. Defaults reach >= 97%% test "
                    "accuracy on the shipped digits data.")
    train.add_argument("--data", default="digits",
                       help="'digits' (shipped), 'teacher' (synthetic regression) or a .npz "
                            "file with arrays x and y (default digits)")
    train.add_argument("--sizes", default=None,
                       help="comma-separated layer sizes (default n_in,256,256,n_out)")
    train.add_argument("--activation", default="relu", help="hidden activation (relu)")
    train.add_argument("--output-activation", default="identity",
                       help="output activation (identity)")
    train.add_argument("--loss", default=None, help="default: softmax_cross_entropy for "
                       "integer labels, squared_error for targets")
    train.add_argument("--optimizer", default="adam", choices=sorted(OPTIMIZERS))
    train.add_argument("--lr", type=float, default=1e-3, help="learning rate (1e-3)")
    train.add_argument("--epochs", type=int, default=30, help="epochs (30)")
    train.add_argument("--batch-size", type=int, default=128, help="batch size (128)")
    train.add_argument("--grad", default="backprop", choices=["backprop", "autodiff"])
    train.add_argument("--seed", type=int, default=0, help="PRNG seed (0)")
    train.add_argument("--checkpoint-dir", default=None,
                       help="save after every epoch; resume from here if it has checkpoints")
    train.add_argument("--plot", default=None, help="write a PNG of the curves here")
    train.add_argument("--diagnostics", default=None, metavar="FLOW.png",
                       help="record per-layer gradient flow every epoch and plot it here")
    train.add_argument("--quiet", action="store_true", help="no progress bar or epoch lines")
    train.set_defaults(run=_train)

    bench = commands.add_parser(
        "bench", help="benchmark the training step: manual vs autodiff vs the GEMM rate",
        description="Time the k-step scan train loop with the hand-written gradient and "
                    "with jax.grad, interleaved in one process, over widths x depths x "
                    "batches x losses x precisions; report ratios, roofline fractions and "
                    "memory; write JSON, markdown and PNG.")
    bench.add_argument("--quick", action="store_true",
                       help="24 small cases (under 2 minutes on 2 CPU cores)")
    bench.add_argument("--out", default="benchmarks/results", help="results folder")
    bench.add_argument("--name", default=None, help="file stem (default step_<preset>_<platform>)")
    bench.add_argument("--steps", type=int, default=10, help="train steps per timed call (10)")
    bench.add_argument("--budget", type=float, default=1.0, help="timing seconds per case (1)")
    bench.add_argument("--max-gflop", type=float, default=None,
                       help="leave out cases above this many matmul GFLOP per step "
                            f"(default: none on accelerators, {CPU_MAX_GFLOP:g} for the full "
                            "suite on a CPU)")
    bench.set_defaults(run=_bench)
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
