"""``jaxbp train``'s options checked and turned into data, net, optimizer, mesh and privacy
before any work starts."""

from __future__ import annotations

import argparse
import math
import pathlib
from typing import Any

import jax

from jaxbp.cli import gpt_options, optimizer
from jaxbp.cli.common import UsageError, option_for, positive, writable_dir, writable_file
from jaxbp.layers.precision import RECIPES


def _load_data(name: str, seed: int, seq_len: int | None = None):
    from jaxbp import data

    if seq_len is not None:                      # --model gpt: a text, char-level
        try:
            return data.load_text(None if name == "shakespeare" else name, seq_len=seq_len)
        except (ValueError, OSError) as err:
            raise UsageError(f"--data: {err}") from None
    if name == "digits":
        return data.load_digits()
    if name == "teacher":
        return data.teacher_regression(jax.random.fold_in(jax.random.key(seed), 1))
    if not pathlib.Path(name).is_file():
        raise UsageError(f"--data: {name!r} is neither 'digits', 'teacher' nor an existing "
                         f".npz file" + ("; it is the GPT's text: --model gpt"
                                         if name == "shakespeare" else ""))
    try:
        return data.load_npz(name)
    except ValueError as err:
        hint = "; a text trains a GPT: --model gpt" if _is_text(pathlib.Path(name)) else ""
        raise UsageError(f"--data: {err}{hint}") from None


def _is_text(path: pathlib.Path) -> bool:
    """The file's first KiB is UTF-8 with no NUL byte (a cut last character allowed)."""
    with open(path, "rb") as file:
        head = file.read(1024)
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:
            return False
    return bool(head) and b"\0" not in head


GPT_DEFAULTS = {"dim": 128, "depth": 2, "heads": 4, "seq_len": 64, "attention_block": None,
                "norm": "layer", "positions": "learned", "mlp": "gelu", "kv_heads": None,
                "no_bias": False, "mlp_hidden": None, "tie_embedding": False, "dropout": 0.0,
                "sample_length": 200, "sample_temperature": 0.0, "sample_top_k": None}
"""``--model gpt``'s shape and sample options and their defaults (another model's: refused)."""

NETWORK_DEFAULTS = {"activation": "relu", "output_activation": "identity"}
"""``--model mlp``'s and ``cnn``'s activations and their defaults (a GPT's: refused)."""

DP_DEFAULTS = {"delta": 1e-5, "clip_norm": 1.0, "accountant": "rdp"}
"""``--dp``'s settings and their defaults (without --dp: refused)."""

FEEDBACK_RULES = {"fa": "feedback alignment", "dfa": "direct feedback alignment",
                  "sign": "sign symmetry"}


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


def plan_train(args: argparse.Namespace) -> dict[str, Any]:
    """Every option of ``jaxbp train`` checked and turned into what fit needs (no training)."""
    _check_options(args)
    if args.data is None:
        args.data = "shakespeare" if args.model == "gpt" else "digits"
    dataset = _load_data(args.data, args.seed, args.seq_len if args.model == "gpt" else None)
    loss = args.loss or ("softmax_cross_entropy" if dataset.is_classification
                         else "squared_error")
    recipe = RECIPES[args.recipe]
    # the same network without the recipe: its float64 gradient is the truth checked
    exact_net = _network(args, dataset, loss, {})[0] if recipe else None
    net, dataset = _network(args, dataset, loss, recipe)
    _check_fits(args, net, dataset, loss)
    mesh = _parse_mesh(args)
    if mesh is not None:
        _check_mesh(args, mesh)
    privacy = _plan_privacy(args, mesh, len(dataset.x_train))
    steps = _steps_per_epoch(args, privacy, len(dataset.x_train)) * args.epochs
    return {"dataset": dataset, "net": net, "exact_net": net if exact_net is None else exact_net,
            "optimizer": optimizer.build(args, steps), "steps": steps, "mesh": mesh,
            "privacy": privacy}


def _network(args: argparse.Namespace, dataset: Any, loss: str,
             recipe: dict[str, str]) -> tuple[Any, Any]:
    """``--model``'s network in the numerical ``recipe`` (``--recipe``'s layer fields),
    and the data as it takes them (a CNN's images)."""
    if args.model == "cnn":
        return _cnn(args, dataset, loss, recipe)
    if args.model == "gpt":
        return _gpt(args, dataset, recipe), dataset
    return _mlp(args, dataset, loss, recipe), dataset


def _steps_per_epoch(args: argparse.Namespace, privacy: Any, n_train: int) -> int:
    """The optimizer steps of one epoch, as fit will take them (for a schedule's length)."""
    from jaxbp.data import num_batches
    from jaxbp.train import private

    if privacy is None:
        return num_batches(n_train, args.batch_size, drop_last=True)
    return private.plan(privacy, n_train, args.batch_size, args.epochs).steps_per_epoch


def _check_options(args: argparse.Namespace) -> None:
    """The numbers and output paths, before any data are read."""
    positive("--lr", args.lr)
    positive("--epochs", args.epochs, integer=True)
    positive("--batch-size", args.batch_size, integer=True)
    if not -2**63 <= args.seed < 2**63:
        raise UsageError(f"--seed must be an integer in [-2**63, 2**63), got {args.seed}")
    if args.checkpoint_dir is not None:
        if not args.checkpoint_dir.strip():
            raise UsageError("--checkpoint-dir must name a folder, got an empty string "
                             "(use . for the current folder)")
        writable_dir("--checkpoint-dir", pathlib.Path(args.checkpoint_dir))
    if args.allow_run_change and args.checkpoint_dir is None:
        raise UsageError("--allow-run-change resumes a checkpoint of another run: it needs "
                         "--checkpoint-dir")
    if args.plot is not None:
        writable_file("--plot", args.plot)
    if args.diagnostics is not None:
        writable_file("--diagnostics", args.diagnostics)
    _model_options(args)
    optimizer.check_options(args)


def _model_options(args: argparse.Namespace) -> None:
    """``--dim``, ``--depth``, ``--heads``, ``--seq-len`` and ``--attention-block`` shape a
    GPT, ``--sample-length`` and ``--sample-temperature`` its final sample; ``--activation``,
    ``--output-activation`` and ``--loss`` an MLP or a CNN: their defaults filled in for
    the model they shape, refused for another (not silently unused)."""
    for name, default in GPT_DEFAULTS.items():
        option = "--" + name.replace("_", "-")
        if args.model != "gpt" and getattr(args, name) is not None:
            verb = "samples from" if name.startswith("sample") else "shapes"
            raise UsageError(f"{option} {verb} a GPT (--model gpt), but --model is "
                             f"{args.model}" + (": its layers are --sizes"
                                                if args.model == "mlp" else ""))
        if getattr(args, name) is None:
            setattr(args, name, default)
    for name, default in NETWORK_DEFAULTS.items():
        if args.model == "gpt" and getattr(args, name) is not None:
            raise UsageError(f"--{name.replace('_', '-')} sets an MLP's or a CNN's activation; "
                             f"a GPT's are its own (gelu in the MLP blocks, logits out)")
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.model == "gpt" and args.loss not in (None, "softmax_cross_entropy"):
        raise UsageError(f"--loss {args.loss}: a GPT is trained by softmax_cross_entropy on "
                         f"its next tokens")
    if args.model == "gpt":
        positive("--seq-len", args.seq_len, integer=True)
        positive("--sample-length", args.sample_length, integer=True, allow_zero=True)
        positive("--sample-temperature", args.sample_temperature, allow_zero=True)
        if args.sample_length == 0 and args.sample_temperature:
            raise UsageError(f"--sample-temperature {args.sample_temperature:g} draws the final "
                             f"sample, but --sample-length 0 makes none")
        if args.sample_top_k is not None:
            positive("--sample-top-k", args.sample_top_k, integer=True)
            if not args.sample_temperature:
                raise UsageError(f"--sample-top-k {args.sample_top_k} limits what the sample "
                                 f"draws from, but without --sample-temperature T > 0 it is "
                                 f"greedy")


def _mlp(args: argparse.Namespace, dataset: Any, loss: str, recipe: dict[str, str]) -> Any:
    """The MLP of ``--sizes`` (default n_in, 256, 256, n_out)."""
    import jaxbp

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
        return jaxbp.MLP(sizes, args.activation, args.output_activation, loss, **recipe)
    except (TypeError, ValueError) as err:
        raise UsageError(option_for(err, str(err))) from None


def _check_fits(args: argparse.Namespace, net: Any, dataset: Any, loss: str) -> None:
    """The data's targets suit the loss, a batch fits the data, a checkpoint can be read."""
    from jaxbp import value_checks

    if dataset.is_classification and not net.loss_fn.integer_labels:
        raise UsageError(f"--loss {loss}: the data hold integer class labels, which only "
                         f"softmax_cross_entropy takes; use it or give one-hot targets")
    if len(dataset.x_train) < args.batch_size:
        raise UsageError(f"--batch-size {args.batch_size} is larger than the "
                         f"{len(dataset.x_train)} training samples of {args.data}")
    try:
        value_checks.check_target_values(net, dataset.y_train, "the training targets")
        value_checks.check_target_values(net, dataset.y_test, "the test targets")
        value_checks.check_token_values(net, dataset.x_train, "the training tokens")
        value_checks.check_token_values(net, dataset.x_test, "the test tokens")
    except ValueError as err:
        raise UsageError(f"--data {args.data}: {err}") from None
    if args.checkpoint_dir is not None:
        _check_checkpoint_reader(pathlib.Path(args.checkpoint_dir))


def _check_mesh(args: argparse.Namespace, mesh: Any) -> None:
    """A mesh run can write its checkpoints and split every batch (a private run's padded
    Poisson batch is rounded up to split: jaxbp.train.private.Plan.on_mesh)."""
    if args.checkpoint_dir is not None:
        try:
            import orbax.checkpoint  # noqa: F401
        except ImportError:
            raise UsageError("--checkpoint-dir with --mesh/--devices writes sharded "
                             "checkpoints through orbax: pip install "
                             "'jaxbp[scale]'") from None
    n_data = mesh.shape["data"]
    if not args.dp and args.batch_size % (n_data * jax.process_count()):
        raise UsageError(f"--batch-size {args.batch_size} does not split over the "
                         f"{n_data} devices of the mesh's data axis and "
                         f"{jax.process_count()} process(es)")


def _plan_privacy(args: argparse.Namespace, mesh: Any, n_train: int) -> Any:
    """``--dp`` and its options as a :class:`jaxbp.privacy.Privacy` (None without --dp),
    its plan for ``n_train`` samples made once here so that what fit would refuse (a noise
    multiplier that spends the whole target in one epoch) is refused before any work."""
    dp_options = {"--target-epsilon": args.target_epsilon,
                  "--noise-multiplier": args.noise_multiplier}
    if not args.dp:
        given = [name for name, value in {**dp_options, "--dp-microbatch": args.dp_microbatch,
                                          "--delta": args.delta, "--clip-norm": args.clip_norm,
                                          "--accountant": args.accountant}.items()
                 if value is not None]
        if given:
            raise UsageError(f"{given[0]} needs --dp (differentially private training)")
        return None
    for name, default in DP_DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.grad != "backprop":
        raise UsageError(f"--dp sets the gradient (clipped, noised per-example gradients): "
                         f"drop --grad {args.grad}")
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
    from jaxbp.train import private

    privacy = Privacy(args.clip_norm, args.delta, args.target_epsilon, args.noise_multiplier,
                      args.accountant, _dp_microbatch(args, mesh))
    try:
        private.plan(privacy, n_train, args.batch_size, args.epochs)
    except ValueError as err:
        message = str(err)
        for name in ("noise_multiplier", "target_epsilon", "batch_size"):
            message = message.replace(name, "--" + name.replace("_", "-"))
        raise UsageError(message) from None
    return privacy


def _dp_microbatch(args: argparse.Namespace, mesh: Any) -> int | None:
    """``--dp-microbatch`` as :class:`jaxbp.privacy.Privacy`'s ``microbatch``: 0 the whole
    padded batch (None); by default a quarter of the expected batch on a CPU, where running
    only the sampled rows measured faster (benchmarks/results/per_example_*_cpu.md), and
    the padded batch elsewhere (a while loop's trips not measured on a GPU/TPU) and on a
    mesh (whose devices each run their share of the padded batch)."""
    if args.dp_microbatch is None:
        on_cpu = jax.default_backend() == "cpu" and mesh is None
        return max(1, args.batch_size // 4) if on_cpu else None
    positive("--dp-microbatch", args.dp_microbatch, integer=True, allow_zero=True)
    if args.dp_microbatch and mesh is not None:
        raise UsageError(f"--dp-microbatch {args.dp_microbatch} runs a batch's sampled rows "
                         f"together, which a mesh keeps on different devices: on a mesh each "
                         f"device runs its share of the padded batch (--dp-microbatch 0)")
    return args.dp_microbatch or None


def _parse_mesh(args: argparse.Namespace) -> Any:
    """``--mesh data=4,model=2`` or ``--devices N`` as a mesh (None for neither)."""
    if args.mesh is None and args.devices is None:
        return None
    from jaxbp import parallel

    if args.mesh is not None and args.devices is not None:
        raise UsageError("--mesh and --devices: give one of them")
    devices = jax.devices()
    if args.devices is not None:
        positive("--devices", args.devices, integer=True)
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


def _cnn(args: argparse.Namespace, dataset: Any, loss: str,
         recipe: dict[str, str]) -> tuple[Any, Any]:
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
        net = models.cnn(side, dataset.n_out, act, args.output_activation, loss, **recipe)
    except (TypeError, ValueError) as err:
        raise UsageError(option_for(err, str(err))) from None
    images = dataset._replace(x_train=dataset.x_train.reshape(-1, side, side, 1),
                              x_test=dataset.x_test.reshape(-1, side, side, 1))
    return net, images


def _gpt(args: argparse.Namespace, dataset: Any, recipe: dict[str, str]) -> Any:
    """The GPT of ``--model gpt`` (:func:`jaxbp.models.gpt`) on the text's characters."""
    from jaxbp import models

    if args.sizes:
        raise UsageError("--sizes sets the layers of an MLP; --model gpt takes --dim, "
                         "--depth and --heads")
    gpt_options.check(args)
    return models.gpt(dataset.n_out, args.dim, args.depth, args.heads, args.seq_len,
                      attention_block=args.attention_block, norm=args.norm,
                      positions=args.positions, mlp=args.mlp, kv_heads=args.kv_heads,
                      bias=not args.no_bias, mlp_hidden=args.mlp_hidden,
                      tie_embedding=args.tie_embedding, dropout=args.dropout, **recipe)
