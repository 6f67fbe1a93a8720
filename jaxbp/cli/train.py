"""``jaxbp train``: verify the gradient at the initial params, then train and report."""

from __future__ import annotations

import argparse
import math
import os
import time
from typing import Any

import jax

from jaxbp import compilation_cache, user_warnings
from jaxbp.cli import optimizer
from jaxbp.cli.common import UsageError
from jaxbp.cli.plan import DP_DEFAULTS, FEEDBACK_RULES, GPT_DEFAULTS, plan_train
from jaxbp.layers.precision import RECIPES
from jaxbp.matmul_precision import MATMUL_PRECISIONS, precision_scope
from jaxbp.models import MLPS, NORMS, POSITIONS


def add_parser(commands: Any, common: argparse.ArgumentParser) -> None:
    """The ``train`` subcommand's options."""
    train = commands.add_parser(
        "train", parents=[common], allow_abbrev=False, help="train an MLP, a CNN or a GPT",
        description="Verify the gradient once on the first batch, then train with the "
                    "jitted step, evaluating every epoch. Defaults reach >= 97% test "
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
    _add_gpt_options(train)
    train.add_argument("--sizes", default=None,
                       help="comma-separated layer sizes (default n_in,256,256,n_out)")
    train.add_argument("--activation", default=None, help="mlp/cnn hidden activation (relu)")
    train.add_argument("--output-activation", default=None,
                       help="mlp/cnn output activation (identity)")
    train.add_argument("--loss", default=None, help="mlp/cnn loss, default: "
                       "softmax_cross_entropy for integer labels, squared_error for targets")
    optimizer.add_options(train)
    _add_numerics_options(train)
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
    train.add_argument("--plot", default=None, help="write a figure of the curves here (PNG, or "
                       "the format its suffix names: .pdf, .svg, ...)")
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
    _add_privacy_options(train)
    train.set_defaults(run=run)


def _add_gpt_options(train: argparse.ArgumentParser) -> None:
    """``--model gpt``'s shape and its final sample (refused for another model)."""
    for option, what in (("dim", "width"), ("depth", "blocks"), ("heads", "attention heads"),
                         ("seq_len", "context length"),
                         ("sample_length", "characters of the sample generated at the end")):
        train.add_argument(f"--{option.replace('_', '-')}", type=int, default=None,
                           help=f"gpt {what} ({GPT_DEFAULTS[option]})")
    for option, choices, what in (
            ("norm", NORMS, "norm: layer (LayerNorm, GPT-2's) or rms (RMSNorm, LLaMA's)"),
            ("positions", POSITIONS, "positions: learned (a table, GPT-2's) or rope (rotary "
                                     "attention, LLaMA's)"),
            ("mlp", MLPS, "feed-forward: gelu (GPT-2's) or swiglu (a gated unit, LLaMA's)")):
        train.add_argument(f"--{option}", default=None, choices=list(choices),
                           help=f"gpt {what} (default {GPT_DEFAULTS[option]})")
    train.add_argument("--kv-heads", type=int, default=None,
                       help="gpt key/value heads shared by groups of query heads "
                            "(grouped-query attention; 1: multi-query; default: one per head)")
    train.add_argument("--mlp-hidden", type=int, default=None,
                       help="gpt MLP hidden width (default 4 x --dim; LLaMA's SwiGLU takes "
                            "about 8 x --dim / 3 to hold GPT-2's MLP parameter count)")
    train.add_argument("--no-bias", action="store_const", const=True, default=None,
                       help="gpt without biases (attention, MLP, head) and LayerNorm "
                            "shifts: LLaMA's, nanoGPT's bias=False (default: with, GPT-2's)")
    train.add_argument("--tie-embedding", action="store_const", const=True, default=None,
                       help="gpt head reading the token table, transposed, as its weight "
                            "(GPT-2's and nanoGPT's tied embedding: vocab x dim fewer "
                            "params; default: a head of its own)")
    train.add_argument("--dropout", type=float, default=None, metavar="P",
                       help="gpt residual dropout rate: after the embedding and each "
                            "block's two branches, in training steps only (GPT-2's, "
                            "nanoGPT's; default 0: none)")
    train.add_argument("--attention-block", type=int, default=None,
                       help="gpt attention over this many keys at a time, its (T, T) softmax "
                            "never kept (memory T x block; default: the plain form)")
    train.add_argument("--sample-temperature", type=float, default=None,
                       help="gpt sample: 0 greedy (the default), else drawn from "
                            "softmax(logits / temperature) with a key from --seed")
    train.add_argument("--sample-top-k", type=int, default=None, metavar="K",
                       help="gpt sample at a temperature: drawn from the K likeliest "
                            "characters only (default: from all)")


def _add_numerics_options(train: argparse.ArgumentParser) -> None:
    """``--recipe`` (the layers' dtypes) and ``--precision`` (what a float32 matmul runs as)."""
    train.add_argument("--recipe", default="float32", choices=list(RECIPES),
                       help="the numerical recipe of every layer: float32 (the default); "
                            "bf16-operands: matmul operands rounded to bf16, activations "
                            "and errors in float32; bf16: activations, errors and matmul "
                            "operands in bf16 (flax's Dense(dtype=bfloat16)). Params, "
                            "optimizer state and loss stay float32; the gradient check "
                            "adds the recipe's distance from the float64 truth")
    train.add_argument("--precision", default=None, choices=list(MATMUL_PRECISIONS),
                       help="the matmul precision the run is compiled with (a GPU's "
                            "float32 matmuls run as TF32 at JAX's default; highest: true "
                            "float32). Default: JAX's setting")


def _add_privacy_options(train: argparse.ArgumentParser) -> None:
    """``--dp`` and its budget, noise, delta, clip norm and accountant."""
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
    private.add_argument("--delta", type=float, default=None,
                         help=f"delta ({DP_DEFAULTS['delta']:g})")
    private.add_argument("--clip-norm", type=float, default=None,
                         help=f"per-example gradient clip norm C ({DP_DEFAULTS['clip_norm']:g})")
    private.add_argument("--accountant", default=None, choices=["rdp", "pld"],
                         help=f"privacy accountant of dp-accounting ({DP_DEFAULTS['accountant']})")
    private.add_argument("--dp-microbatch", type=int, default=None, metavar="M",
                         help="run only each Poisson batch's sampled rows, M at a time (the "
                              "same gradient); 0: the whole padded batch. Default: "
                              "batch-size/4 on a CPU (there 1.2-4.5x faster for CNNs and "
                              "GPTs), 0 on a GPU/TPU (not measured there) and on a mesh")


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


def run(args: argparse.Namespace) -> int:
    """Plan, check the gradient once, fit, and print the outcome."""
    from jaxbp.train.fit import fit

    if os.environ.get("JAXBP_COORDINATOR"):  # one of several processes: join before JAX starts
        from jaxbp import parallel

        parallel.initialize()
    start = time.perf_counter()
    plan = plan_train(args)
    try:
        compilation_cache.enable(args.compilation_cache, name="--compilation-cache")
    except ValueError as err:
        if args.compilation_cache != str(compilation_cache.DEFAULT):  # the user's own folder
            raise UsageError(str(err)) from None
        # the built-in default (a read-only home, a container): the run goes on, compiling
        user_warnings.warn(f"no compilation cache, so a rerun compiles again: {err} "
                           f"(--compilation-cache DIR or off)")
    dataset, net = plan["dataset"], plan["net"]
    key = jax.random.key(args.seed)
    try:   # before any work: a rule that does not cover this net is a usage error
        grad = _gradient_source(args.grad, net, key)
    except ValueError as err:
        raise UsageError(f"--grad {args.grad}: {err}") from None
    main_process = jax.process_index() == 0
    if main_process:
        print(_header(args, plan))
    if not _gradient_checked(args, plan, key, main_process):
        return 1
    with precision_scope(args.precision):
        result = fit(net, plan["optimizer"], dataset, epochs=args.epochs,
                     batch_size=args.batch_size, key=key, grad=grad,
                     checkpoint_dir=args.checkpoint_dir, progress=not args.quiet,
                     plot=args.plot, diagnostics=args.diagnostics is not None,
                     run_config=_run_record(args, plan),
                     allow_run_change=args.allow_run_change, mesh=plan["mesh"],
                     privacy=plan["privacy"])
    if main_process:
        _report(args, net, dataset, result, time.perf_counter() - start)
    return 0


def _run_record(args: argparse.Namespace, plan: dict[str, Any]) -> dict[str, Any] | None:
    """What the checkpoints record of the command line (none without --checkpoint-dir)."""
    if args.checkpoint_dir is None:
        return None
    precision = {} if args.precision is None else {"precision": args.precision}
    return {"optimizer": args.optimizer, "lr": args.lr, "seed": args.seed, "data": args.data,
            **optimizer.record(args, plan["steps"]), **precision}


def _header(args: argparse.Namespace, plan: dict[str, Any]) -> str:
    """The run's first line: data, net, optimizer, gradient source, JAX and device."""
    from jaxbp import network

    dataset, net = plan["dataset"], plan["net"]
    if hasattr(net, "sizes"):
        shape = f"sizes {net.sizes}, {args.activation}, {net.loss}"
    elif args.model == "gpt":
        shape = (f"gpt dim {args.dim}, depth {args.depth}, heads {args.heads}, seq_len "
                 f"{args.seq_len}, vocab {dataset.n_out} ({_n_params(net)} params)")
        if args.attention_block is not None:
            shape += f", attention over {args.attention_block} keys at a time"
        shape += "".join(f", {label}" for name, label in (
            ("norm", "RMSNorm"), ("positions", "rotary positions"), ("mlp", "SwiGLU"))
            if getattr(args, name) != GPT_DEFAULTS[name])
        if args.kv_heads is not None:
            shape += f", {args.kv_heads} key/value head" + "s" * (args.kv_heads > 1)
        if args.mlp_hidden is not None:
            shape += f", MLP hidden {args.mlp_hidden}"
        shape += ", no biases" * args.no_bias + ", tied embedding" * args.tie_embedding
        shape += f", dropout {args.dropout:g}" * (args.dropout > 0)
    else:
        shape = f"cnn {network.describe(net)}, {args.activation}"  # describe names the loss
    grad_name = "dp-sgd (clipped, noised per-example backprop)" if args.dp else args.grad
    mesh = "" if plan["mesh"] is None else f", mesh {dict(plan['mesh'].shape)}"
    numerics = f", recipe {args.recipe}" + ("" if args.precision is None else
                                            f", matmul precision {args.precision}")
    return (f"jaxbp train: {args.data} ({len(dataset.x_train)} train, {len(dataset.x_test)} "
            f"test), {shape}, {optimizer.describe(args)}, grad {grad_name}{numerics}, jax "
            f"{jax.__version__} on {jax.devices()[0].platform}{mesh}")


def _gradient_checked(args: argparse.Namespace, plan: dict[str, Any], key: Any,
                      main_process: bool) -> bool:
    """verify_grads in float64 at the params fit starts from, on the first batch; with a
    recipe, of the net without it, then the recipe's gradient against the float64 truth."""
    from jaxbp import network
    from jaxbp.check.recipe import check_recipe
    from jaxbp.check.suite import verify_mlp

    net, exact_net, dataset = plan["net"], plan["exact_net"], plan["dataset"]
    params = net.init(jax.random.split(key)[0])  # the params fit starts from
    x0, y0 = dataset.x_train[:args.batch_size], dataset.y_train[:args.batch_size]
    # a net with dropout is checked with the first step's masks: the gradient it trains on
    masks = network.step_key(network.as_network(exact_net), 0)
    report = verify_mlp(exact_net, params, x0, y0, n_fd=2, float64=True, key=masks)
    if main_process:
        rule = ("" if args.grad in ("backprop", "autodiff") or args.dp else
                f" (of the recursion, which --grad {args.grad} changes: its updates are not the "
                f"gradient)")
        without = "" if net is exact_net else f", without the {args.recipe} recipe"
        without += "" if masks is None else ", with the first step's dropout masks"
        print(f"gradient check at the initial params, first {len(x0)} samples, in float64"
              f"{without}{rule}: {report.summary()}")
    if report.failed:
        print(report)
        return False
    if net is exact_net:
        return True
    with precision_scope(args.precision):
        recipe = check_recipe(net, exact_net, params, x0, y0)
    if main_process:
        print(f"the {args.recipe} recipe's gradient there: {recipe.summary()}")
    return recipe.ok


def _report(args: argparse.Namespace, net: Any, dataset: Any, result: Any,
            seconds: float) -> None:
    """The final scores, a GPT's sample, and the files written."""
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
    print(f"{final} after {done} epochs{already} ({seconds:.1f} s in all)")
    if args.model == "gpt":
        _print_sample(args, net, result.state.params, dataset)
    if args.plot:
        print(f"wrote {args.plot}")
    if args.diagnostics:
        from jaxbp.train.plots import plot_flow

        plot_flow(history, args.diagnostics)
        print(f"wrote {args.diagnostics}")


def _n_params(net: Any) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(net.param_shapes()))


def _print_sample(args: argparse.Namespace, net: Any, params: Any, dataset: Any) -> None:
    """A continuation of the validation text's first line, by a jitted forward: greedy, or
    drawn at ``--sample-temperature`` (its key folded from the run's seed)."""
    from jaxbp import models

    if not args.sample_length:
        return
    prompt, temperature = dataset.x_test[0][:16], args.sample_temperature
    key = jax.random.fold_in(jax.random.key(args.seed), 2) if temperature else None
    text = dataset.decode(models.generate(net, params, prompt.tolist(), args.sample_length,
                                          key=key, temperature=temperature,
                                          top_k=args.sample_top_k))
    how = f"temperature {temperature:g}" if temperature else "greedy"
    how += "" if args.sample_top_k is None else f", top {args.sample_top_k}"
    print(f"sample ({how}, after {dataset.decode(prompt)!r}):\n{text}")
