"""The ``jaxbp`` command: ``jaxbp verify``, ``jaxbp train``, ``jaxbp bench``.

Every error is one line on stderr, ``jaxbp <command>: error: ...``, naming the
option, file or value; the exit status is 2 for a bad option, file or value
(all found before any work starts) and 1 for a run that failed; ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import pathlib
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import jax
import optax

from jaxbp import compilation_cache
from jaxbp.matmul_precision import MATMUL_PRECISIONS


class UsageError(ValueError):
    """A bad option, file or value: exit status 2, found before any work."""


DTYPES = ("float64", "float32", "bfloat16", "float16")


def _verify(args: argparse.Namespace) -> int:
    from jaxbp.check.suite import random_cases, run_case

    dtypes = tuple(args.dtypes.split(","))
    print(f"jaxbp verify: hand-written backprop vs jax.grad, central FD and the Taylor test "
          f"(L at matmul precision highest); seed {args.seed}, dtypes {', '.join(dtypes)}, "
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
        print(f"{i:>3} {case.net.dtype:<9} {case.describe():<68} {report.max_rel_error:>9.2e} "
              f"{fd:>9.2e} {min(orders) if orders else math.nan:>6.2f}  {status}")
        worst[case.net.dtype] = max(worst.get(case.net.dtype, 0.0), report.max_rel_error)
        if report.failed:
            failed += 1
            print(report)
    print("worst relative error vs jax.grad: " +
          ", ".join(f"{dtype} {err:.2e}" for dtype, err in worst.items()))
    print(f"{'FAILED' if failed else 'all ok'}: {failed} of {count} cases failed "
          f"({time.perf_counter() - start:.1f} s)")
    return 1 if failed else 0


CPU_MAX_GFLOP = 20.0
"""The full bench suite's default cap on a CPU: its largest cases need TFLOPs per step."""

ACCELERATOR_TIME_LIMIT_S = 1800.0
"""The full bench suite's default time limit on a GPU/TPU: cases not started by then are
listed as left out (the largest need seconds per step and minutes to time)."""

OPTIMIZERS = {
    "sgd": lambda lr: optax.sgd(lr),
    "momentum": lambda lr: optax.sgd(lr, momentum=0.9),
    "nesterov": lambda lr: optax.sgd(lr, momentum=0.9, nesterov=True),
    "adam": lambda lr: optax.adam(lr),
    "adamw": lambda lr: optax.adamw(lr),
}


def _load_data(name: str, seed: int, seq_len: int | None = None):
    from jaxbp import data

    if seq_len is not None:                      # --model gpt: a text, char-level
        try:
            return data.load_text(None if name == "shakespeare" else name, seq_len=seq_len)
        except (ValueError, UnicodeDecodeError) as err:
            raise UsageError(f"--data: {err}") from None
    if name == "digits":
        return data.load_digits()
    if name == "teacher":
        return data.teacher_regression(jax.random.key(seed + 1))
    if not pathlib.Path(name).is_file():
        raise UsageError(f"--data: {name!r} is neither 'digits', 'teacher' nor an existing "
                         f".npz file")
    try:
        return data.load_npz(name)
    except ValueError as err:
        raise UsageError(f"--data: {err}") from None


def _writable_dir(option: str, directory: pathlib.Path) -> None:
    """The folder exists or can be made, and a file can be written in it."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, prefix=".jaxbp-write-test-"):
            pass
    except OSError as err:
        raise UsageError(f"{option}: cannot write in {str(directory)!r}: "
                         f"{err.strerror or err}") from None


def _writable_file(option: str, path: str) -> None:
    target = pathlib.Path(path)
    if target.is_dir():
        raise UsageError(f"{option}: {path!r} is a folder, expected a file name such as "
                         f"{str(target / 'curves.png')!r}")
    _writable_dir(option, target.parent if str(target.parent) else pathlib.Path("."))
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError(f"{option}: plotting needs matplotlib: pip install "
                         f"'jaxbp[plot]'") from None


def _positive(option: str, value: float, integer: bool = False, allow_zero: bool = False) -> None:
    good = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not good:
        kind = "an integer" if integer else "a finite number"
        raise UsageError(f"{option} must be {kind} {'>= 0' if allow_zero else '> 0'}, "
                         f"got {value!r}")


def _check_checkpoint_reader(directory: pathlib.Path) -> None:
    """Refuse (before anything is read or renamed) a folder of sharded checkpoints that
    this environment cannot read: a missing library is not a corrupt checkpoint."""
    from jaxbp.train import sharded_checkpoint

    steps = sharded_checkpoint.list_steps(directory)
    if not steps:
        return
    try:
        import orbax.checkpoint  # noqa: F401
    except ImportError:
        raise UsageError(f"--checkpoint-dir {directory} holds {len(steps)} sharded checkpoints "
                         f"(written by a --mesh run through orbax); reading them needs "
                         f"orbax-checkpoint: pip install 'jaxbp[scale]'") from None


def _plan_train(args: argparse.Namespace) -> dict[str, Any]:
    """Every option of ``jaxbp train`` checked and turned into what fit needs (no training)."""
    import jaxbp

    _positive("--lr", args.lr)
    _positive("--epochs", args.epochs, integer=True)
    _positive("--batch-size", args.batch_size, integer=True)
    if not -2**63 <= args.seed < 2**63:
        raise UsageError(f"--seed must be an integer in [-2**63, 2**63), got {args.seed}")
    if args.checkpoint_dir is not None:
        if not args.checkpoint_dir.strip():
            raise UsageError("--checkpoint-dir must name a folder, got an empty string "
                             "(use . for the current folder)")
        _writable_dir("--checkpoint-dir", pathlib.Path(args.checkpoint_dir))
    if args.plot is not None:
        _writable_file("--plot", args.plot)
    if args.diagnostics is not None:
        _writable_file("--diagnostics", args.diagnostics)
    if args.data is None:
        args.data = "shakespeare" if args.model == "gpt" else "digits"
    if args.model == "gpt":
        _positive("--seq-len", args.seq_len, integer=True)
    dataset = _load_data(args.data, args.seed, args.seq_len if args.model == "gpt" else None)
    loss = args.loss or ("softmax_cross_entropy" if dataset.is_classification
                         else "squared_error")
    if args.model == "cnn":
        net, dataset = _cnn(args, dataset, loss)
    elif args.model == "gpt":
        net = _gpt(args, dataset)
    else:
        if args.sizes:
            try:
                sizes = tuple(int(s) for s in args.sizes.split(","))
            except ValueError:
                raise UsageError(f"--sizes must be comma-separated integers, got "
                                 f"{args.sizes!r}") from None
        else:
            sizes = (dataset.n_in, 256, 256, dataset.n_out)
        if sizes[0] != dataset.n_in or sizes[-1] != dataset.n_out:
            raise UsageError(f"--sizes {args.sizes}: the first size must be the data's "
                             f"{dataset.n_in} inputs and the last its {dataset.n_out} outputs "
                             f"({args.data})")
        try:
            net = jaxbp.MLP(sizes, args.activation, args.output_activation, loss)
        except (TypeError, ValueError) as err:
            raise UsageError(_option_for(err, str(err))) from None
    if dataset.is_classification and not net.loss_fn.integer_labels:
        raise UsageError(f"--loss {loss}: the data hold integer class labels, which only "
                         f"softmax_cross_entropy takes; use it or give one-hot targets")
    if len(dataset.x_train) < args.batch_size:
        raise UsageError(f"--batch-size {args.batch_size} is larger than the "
                         f"{len(dataset.x_train)} training samples of {args.data}")
    try:
        from jaxbp import _checks

        _checks.check_target_values(net, dataset.y_train, "the training targets")
        _checks.check_target_values(net, dataset.y_test, "the test targets")
    except ValueError as err:
        raise UsageError(f"--data {args.data}: {err}") from None
    if args.checkpoint_dir is not None:
        _check_checkpoint_reader(pathlib.Path(args.checkpoint_dir))
    mesh = _parse_mesh(args)
    if mesh is not None:
        if args.checkpoint_dir is not None:
            try:
                import orbax.checkpoint  # noqa: F401
            except ImportError:
                raise UsageError("--checkpoint-dir with --mesh/--devices writes sharded "
                                 "checkpoints through orbax: pip install "
                                 "'jaxbp[scale]'") from None
        n_data = mesh.shape["data"]
        if args.batch_size % (n_data * jax.process_count()):
            raise UsageError(f"--batch-size {args.batch_size} does not split over the "
                             f"{n_data} devices of the mesh's data axis and "
                             f"{jax.process_count()} process(es)")
    return {"dataset": dataset, "net": net, "optimizer": OPTIMIZERS[args.optimizer](args.lr),
            "mesh": mesh, "privacy": _plan_privacy(args, mesh)}


def _plan_privacy(args: argparse.Namespace, mesh: Any) -> Any:
    """``--dp`` and its options as a :class:`jaxbp.privacy.Privacy` (None without --dp)."""
    dp_options = {"--target-epsilon": args.target_epsilon,
                  "--noise-multiplier": args.noise_multiplier}
    if not args.dp:
        given = [name for name, value in dp_options.items() if value is not None]
        if given:
            raise UsageError(f"{given[0]} needs --dp (differentially private training)")
        return None
    if args.grad != "backprop":
        raise UsageError(f"--dp sets the gradient (clipped, noised per-example gradients): "
                         f"drop --grad {args.grad}")
    if mesh is not None:
        raise UsageError("--dp runs on one device: drop --mesh/--devices")
    if args.target_epsilon is None and args.noise_multiplier is None:
        raise UsageError("--dp needs --target-epsilon E (sigma calibrated to it) or "
                         "--noise-multiplier S")
    try:
        import dp_accounting  # noqa: F401
    except ImportError:
        raise UsageError('--dp accounts the privacy spent through dp-accounting: pip install '
                         '"jaxbp[privacy]"') from None
    from jaxbp.privacy import Privacy

    for name, value in (("--clip-norm", args.clip_norm), ("--delta", args.delta),
                        *dp_options.items()):
        if value is not None and not (value > 0 and math.isfinite(value)):
            raise UsageError(f"{name} must be a finite number > 0, got {value}")
    if not args.delta < 1:
        raise UsageError(f"--delta must be in (0, 1), got {args.delta}")
    return Privacy(args.clip_norm, args.delta, args.target_epsilon, args.noise_multiplier,
                   args.accountant)


def _parse_mesh(args: argparse.Namespace) -> Any:
    """``--mesh data=4,model=2`` or ``--devices N`` as a mesh (None for neither)."""
    if args.mesh is None and args.devices is None:
        return None
    from jaxbp import parallel

    if args.mesh is not None and args.devices is not None:
        raise UsageError("--mesh and --devices: give one of them")
    devices = jax.devices()
    if args.devices is not None:
        _positive("--devices", args.devices, integer=True)
        if args.devices > len(devices):
            raise UsageError(f"--devices {args.devices}: only {len(devices)} device(s) are "
                             f"visible ({devices[0].platform})")
        return parallel.make_mesh(args.devices, 1, devices[:args.devices])
    sizes = {}
    for part in args.mesh.split(","):
        name, _, value = part.partition("=")
        if name not in ("data", "model") or not value.isdigit() or int(value) < 1:
            raise UsageError(f"--mesh must look like data=4,model=2 (axes data and model, "
                             f"sizes >= 1), got {args.mesh!r}")
        sizes[name] = int(value)
    model = sizes.get("model", 1)
    data = sizes.get("data", len(devices) // model)
    if data * model > len(devices) or data < 1:
        raise UsageError(f"--mesh {args.mesh}: data x model = {data} x {model} but "
                         f"{len(devices)} device(s) are visible")
    return parallel.make_mesh(data, model, devices[:data * model])


def _cnn(args: argparse.Namespace, dataset: Any, loss: str) -> tuple[Any, Any]:
    """The small CNN of ``--model cnn`` on square one-channel images (digits: 8x8x1).

    Conv 3x3 (16, act) -> MaxPool 2 -> Conv 3x3 (32, act) -> MaxPool 2 -> Flatten ->
    Dense 64 (act) -> Dense n_out; act is ``--activation``.
    """
    from jaxbp import models

    side = math.isqrt(dataset.n_in)
    if side * side != dataset.n_in or side < 4:
        raise UsageError(f"--model cnn reads each sample as a square one-channel image, but "
                         f"{args.data} has {dataset.n_in} features")
    if args.sizes:
        raise UsageError("--sizes sets the layers of an MLP; --model cnn has its own")
    act = args.activation
    try:
        net = models.cnn(side, dataset.n_out, act, args.output_activation, loss)
    except (TypeError, ValueError) as err:
        raise UsageError(_option_for(err, str(err))) from None
    images = dataset._replace(x_train=dataset.x_train.reshape(-1, side, side, 1),
                              x_test=dataset.x_test.reshape(-1, side, side, 1))
    return net, images


def _gpt(args: argparse.Namespace, dataset: Any) -> Any:
    """The GPT of ``--model gpt`` (:func:`jaxbp.models.gpt`) on the text's characters."""
    from jaxbp import models

    if args.sizes:
        raise UsageError("--sizes sets the layers of an MLP; --model gpt takes --dim, "
                         "--depth and --heads")
    for option, value in (("--dim", args.dim), ("--depth", args.depth),
                          ("--heads", args.heads)):
        _positive(option, value, integer=True)
    if args.dim % args.heads:
        raise UsageError(f"--heads {args.heads} must divide --dim {args.dim}")
    return models.gpt(dataset.n_out, args.dim, args.depth, args.heads, args.seq_len)


def _option_for(err: Exception, message: str) -> str:
    """Put the command-line option in front of a library message about an MLP argument."""
    for word, option in (("output_activation", "--output-activation"),
                         ("activation", "--activation"), ("loss", "--loss"),
                         ("sizes", "--sizes")):
        if word in message:
            return f"{option}: {message}"
    return message


FEEDBACK_RULES = {"fa": "feedback alignment", "dfa": "direct feedback alignment",
                  "sign": "sign symmetry"}


def _gradient_source(name: str, net: Any, key: Any) -> Any:
    """``--grad``: a name fit knows, or a feedback rule whose fixed matrices come from the
    run's key (so the same seed gives the same feedback, on resume too)."""
    from jaxbp import feedback

    feedback_key = jax.random.fold_in(key, 0xFEED)
    if name == "fa":
        return feedback.alignment(feedback.random_feedback(net, feedback_key))
    if name == "dfa":
        return feedback.direct(feedback.random_feedback(net, feedback_key, "direct"))
    if name == "sign":
        return feedback.sign_symmetry()
    return name


def _train(args: argparse.Namespace) -> int:
    from jaxbp import network
    from jaxbp.check.suite import verify_mlp
    from jaxbp.train.fit import fit

    if os.environ.get("JAXBP_COORDINATOR"):  # one of several processes: join before JAX starts
        from jaxbp import parallel

        parallel.initialize()
    start = time.perf_counter()
    plan = _plan_train(args)
    compilation_cache.enable(args.compilation_cache)
    dataset, net, optimizer = plan["dataset"], plan["net"], plan["optimizer"]
    main_process = jax.process_index() == 0
    if hasattr(net, "sizes"):
        shape = f"sizes {net.sizes}, {args.activation}, {net.loss}"
    elif args.model == "gpt":
        shape = (f"gpt dim {args.dim}, depth {args.depth}, heads {args.heads}, seq_len "
                 f"{args.seq_len}, vocab {dataset.n_out} ({_n_params(net)} params)")
    else:
        shape = f"cnn {network.describe(net)}, {args.activation}"  # describe names the loss
    grad_name = "dp-sgd (clipped, noised per-example backprop)" if args.dp else args.grad
    if main_process:
        print(f"jaxbp train: {args.data} ({len(dataset.x_train)} train, {len(dataset.x_test)} "
              f"test), {shape}, {args.optimizer} lr "
              f"{args.lr}, grad {grad_name}, jax {jax.__version__} on "
              f"{jax.devices()[0].platform}" + (f", mesh {dict(plan['mesh'].shape)}"
                                                if plan["mesh"] is not None else ""))

    n_train = len(dataset.x_train)
    if plan["privacy"] is not None and args.delta >= 1 / n_train and main_process:
        print(f"warning: --delta {args.delta:g} is not below 1/N = 1/{n_train}: publishing "
              f"one random training example outright is (0, 1/N)-DP, so such a delta permits "
              f"it; use a delta well below {1 / n_train:.2g}",
              file=sys.stderr)

    key = jax.random.key(args.seed)
    params = net.init(jax.random.split(key)[0])  # the params fit starts from
    x0, y0 = dataset.x_train[:args.batch_size], dataset.y_train[:args.batch_size]
    report = verify_mlp(net, params, x0, y0, n_fd=2, float64=True)
    if main_process:
        print(f"gradient check at the initial params, first {len(x0)} samples, in float64: "
              f"{report.summary()}")
    if report.failed:
        print(report)
        return 1

    result = fit(net, optimizer, dataset, epochs=args.epochs, batch_size=args.batch_size,
                 key=key, grad=_gradient_source(args.grad, net, key),
                 checkpoint_dir=args.checkpoint_dir,
                 progress=not args.quiet, plot=args.plot,
                 diagnostics=args.diagnostics is not None,
                 run_config={"optimizer": args.optimizer, "lr": args.lr, "seed": args.seed,
                             "data": args.data},
                 allow_run_change=args.allow_run_change, mesh=plan["mesh"],
                 privacy=plan["privacy"])
    if not main_process:
        return 0
    history = result.history
    final = f"final test loss {history['test_loss'][-1]:.4f}"
    if args.model == "gpt":
        final += f" ({history['test_loss'][-1] / math.log(2):.3f} bits/char)"
    if dataset.is_classification:
        final = f"final test accuracy {history['test_accuracy'][-1]:.4f}, " + final
    if history.get("epsilon"):  # shown with --quiet too: what the run spent
        final += f", epsilon {history['epsilon'][-1]:.4f} at delta {args.delta:g}"
    done = history["epoch"][-1]
    already = (f" (the checkpoint was already at epoch {done}, past --epochs {args.epochs}: "
               f"nothing was trained)" if done > args.epochs else "")
    print(f"{final} after {done} epochs{already} "
          f"({time.perf_counter() - start:.1f} s in all)")
    if args.model == "gpt":
        _print_sample(net, result.state.params, dataset)
    if args.plot:
        print(f"wrote {args.plot}")
    if args.diagnostics:
        from jaxbp.train.plots import plot_flow

        plot_flow(history, args.diagnostics)
        print(f"wrote {args.diagnostics}")
    return 0


def _n_params(net: Any) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(net.param_shapes()))


def _print_sample(net: Any, params: Any, dataset: Any, length: int = 200) -> None:
    """A greedy continuation of the validation text's first line, by a jitted forward."""
    from jaxbp import models

    prompt = dataset.x_test[0][:16]
    text = dataset.decode(models.generate(net, params, prompt.tolist(), length))
    print(f"sample (greedy, after {dataset.decode(prompt)!r}):\n{text}")


def _check_bench(args: argparse.Namespace) -> None:
    if args.max_gflop is not None:
        _positive("--max-gflop", args.max_gflop)
    if args.time_limit is not None:
        _positive("--time-limit", args.time_limit)
    if args.steps is not None:
        _positive("--steps", args.steps, integer=True)
    _positive("--budget", args.budget)
    _positive("--min-sample-ms", args.min_sample_ms)
    _writable_dir("--out", pathlib.Path(args.out))


def _bench(args: argparse.Namespace) -> int:
    from jaxbp.bench import suite as bench_suite

    _check_bench(args)
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


def _check_verify(args: argparse.Namespace) -> None:
    bad = sorted(set(args.dtypes.split(",")) - set(DTYPES))
    if bad:
        raise UsageError(f"--dtypes: unknown {bad}; choose from {', '.join(DTYPES)}")
    if args.cases is not None:
        _positive("--cases", args.cases, integer=True)
    _positive("--n-fd", args.n_fd, integer=True, allow_zero=True)
    _positive("--max-depth", args.max_depth, integer=True)
    _positive("--max-width", args.max_width, integer=True)



def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``jaxbp`` and its subcommands."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true",
                        help="show the Python traceback of an error")
    parser = argparse.ArgumentParser(
        prog="jaxbp", description="Hand-written backpropagation for MLPs in JAX.")
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser(
        "verify", parents=[common],
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
                        help="run only the first N cases of each dtype (default: all, "
                             "29 per dtype)")
    verify.set_defaults(run=_verify)

    train = commands.add_parser(
        "train", parents=[common], help="train an MLP with the hand-written gradient",
        description="Verify the gradient once on the first batch, then train with the "
                    "jitted step, evaluating every epoch. Defaults reach >= 97%% test "
                    "accuracy on the shipped digits data.")
    train.add_argument("--data", default=None,
                       help="'digits' (shipped), 'teacher' (synthetic regression) or a .npz "
                            "file with arrays x and y (default digits); for --model gpt "
                            "'shakespeare' (shipped, the default) or a UTF-8 text file")
    train.add_argument("--model", default="mlp", choices=["mlp", "cnn", "gpt"],
                       help="mlp (--sizes); cnn: conv 3x3 16, maxpool 2, conv 3x3 32, "
                            "maxpool 2, dense 64, dense n_out on square one-channel images "
                            "(digits as 8x8x1); gpt: a character-level GPT (--dim, --depth, "
                            "--heads, --seq-len) on a text, ending with a generated sample")
    train.add_argument("--dim", type=int, default=128, help="gpt width (128)")
    train.add_argument("--depth", type=int, default=2, help="gpt blocks (2)")
    train.add_argument("--heads", type=int, default=4, help="gpt attention heads (4)")
    train.add_argument("--seq-len", type=int, default=64, help="gpt context length (64)")
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
    train.add_argument("--grad", default="backprop",
                       choices=["backprop", "autodiff", *FEEDBACK_RULES],
                       help="the gradient source: the hand-written recursion, jax.grad, or a "
                            "feedback rule (fa: feedback alignment, dfa: direct feedback "
                            "alignment, sign: sign symmetry; jaxbp.feedback)")
    train.add_argument("--seed", type=int, default=0, help="PRNG seed (0)")
    train.add_argument("--checkpoint-dir", default=None,
                       help="save after every epoch; resume from here if it has checkpoints")
    train.add_argument("--plot", default=None, help="write a PNG of the curves here")
    train.add_argument("--diagnostics", default=None, metavar="FLOW.png",
                       help="record per-layer gradient flow every epoch and plot it here")
    train.add_argument("--quiet", action="store_true", help="no progress bar or epoch lines")
    train.add_argument("--compilation-cache", default=compilation_cache.default_dir(),
                       metavar="DIR",
                       help="keep compiled programs in DIR so that a rerun skips XLA "
                            "compilation ('off': no cache; default $JAXBP_COMPILATION_CACHE "
                            "or ~/.cache/jaxbp/xla)")
    train.add_argument("--mesh", default=None, metavar="data=N,model=M",
                       help="train over a device mesh: the batch split over data, the "
                            "weights over model (default: one device)")
    train.add_argument("--devices", type=int, default=None,
                       help="train data-parallel over the first N devices")
    train.add_argument("--allow-run-change", action="store_true",
                       help="resume a checkpoint although the net, optimizer, seed, batch "
                            "size or data differ from the run that wrote it")
    private = train.add_argument_group(
        "differential privacy", "DP-SGD with Poisson sampling (expected batch --batch-size), "
        "per-example clipping and Gaussian noise; the epsilon spent is printed every epoch "
        "(needs pip install \"jaxbp[privacy]\")")
    private.add_argument("--dp", action="store_true", help="train with DP-SGD")
    private.add_argument("--target-epsilon", type=float, default=None,
                         help="the privacy budget: sigma is calibrated to spend at most this "
                              "over all epochs; training stops rather than exceed it")
    private.add_argument("--noise-multiplier", type=float, default=None,
                         help="sigma, the noise std over the clip norm (instead of calibrating)")
    private.add_argument("--delta", type=float, default=1e-5, help="delta (1e-5)")
    private.add_argument("--clip-norm", type=float, default=1.0,
                         help="per-example gradient clip norm C (1.0)")
    private.add_argument("--accountant", default="rdp", choices=["rdp", "pld"],
                         help="privacy accountant of dp-accounting (rdp)")
    train.set_defaults(run=_train)

    bench = commands.add_parser(
        "bench", parents=[common],
        help="benchmark the training step: manual vs autodiff vs the GEMM rate",
        description="Time the k-step scan train loop with the hand-written gradient and "
                    "with jax.grad, interleaved in one process, over widths x depths x "
                    "batches x losses x precisions; report ratios, roofline fractions and "
                    "memory; write JSON, markdown and PNG.")
    bench.add_argument("--quick", action="store_true",
                       help="24 cases: small ones on a CPU (about 2 minutes on 2 cores), "
                            "W1024-4096 x B512-8192 on a GPU/TPU so none is launch-bound")
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
    bench.set_defaults(run=_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jaxbp`` command; returns the exit code.

    Errors print one line and return 2 (a bad option, file or value) or 1 (a failed
    run); with ``--debug`` they raise with their traceback.
    """
    args = build_parser().parse_args(argv)
    prefix = f"jaxbp {args.command}: error:"
    try:
        if args.command == "verify":
            _check_verify(args)
            jax.config.update("jax_enable_x64", True)
        with warnings.catch_warnings():
            if not args.debug:        # a notice is one line, without a source location
                warnings.showwarning = _one_line_warning(args.command)
            return args.run(args)
    except UsageError as err:
        if args.debug:
            raise
        print(f"{prefix} {_one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prefix} interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a failed run: one line, unless --debug
        if args.debug:
            raise
        print(f"{prefix} {type(err).__name__}: {_one_line(err)} (--debug for the traceback)",
              file=sys.stderr)
        return 1


def _one_line_warning(command: str) -> Callable[..., None]:
    """``warnings.showwarning`` for the command line: ``jaxbp CMD: warning: text`` on
    stderr, one line (``--debug`` keeps Python's form, with the source location)."""
    def show(message: Warning | str, category: type[Warning], *args: Any, **kwargs: Any
             ) -> None:
        print(f"jaxbp {command}: warning: {_one_line(message)}", file=sys.stderr)

    return show


def _one_line(err: BaseException | str) -> str:
    text = " ".join(str(err).split())
    return text or type(err).__name__


if __name__ == "__main__":
    sys.exit(main())
