"""The `jaxbp` command line."""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jaxbp
from jaxbp import cli, models
from jaxbp.cli import optimizer
from jaxbp.train import checkpoint


def test_verify_runs_in_every_dtype_it_offers(restore_x64, capsys):
    """`jaxbp verify` over all of --dtypes' choices, two cases each (soft labels in
    bfloat16/float16 included: their rows sum to 1 only within the dtype's rounding)."""
    code = cli.main(["verify", "--cases", "2", "--dtypes", ",".join(cli.DTYPES), "--n-fd", "1",
                     "--recipes", "bf16,bf16-operands"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"all ok: 0 of {2 * len(cli.DTYPES) + 4} cases failed" in out
    assert "worst error from the float64 truth: bf16 " in out and "; bf16-operands " in out
    worst = out.split("worst relative error vs jax.grad: ")[1].splitlines()[0]
    assert [part.split()[0] for part in worst.split(", ")] == list(cli.DTYPES)
    assert out.count(" ok") >= 2 * len(cli.DTYPES)


def test_verify_fails_with_exit_code_one_on_a_wrong_derivative(restore_x64, capsys, monkeypatch):
    from jaxbp import activations

    for name, act in list(activations.ACTIVATIONS.items()):  # every g' off by 10%
        monkeypatch.setitem(activations.ACTIVATIONS, name,
                            act._replace(dg=lambda z, a, dg=act.dg: 1.1 * dg(z, a)))
    jax.clear_caches()
    code = cli.main(["verify", "--cases", "3", "--dtypes", "float64", "--n-fd", "1"])
    out = capsys.readouterr().out
    assert code == 1
    assert "FAILED: 6 of 6 cases failed" in out   # the bf16 recipe rows too: their truth
    #                                                is jax.grad's, which no g' moves
    assert "reference" in out


def test_verify_fails_a_recipe_whose_gradient_is_off(restore_x64, capsys, monkeypatch):
    """The recipe rows judge: a recipe's hand-written gradient 5% off fails them (exit 1),
    while the dtype cases (no recipe) pass."""
    from jaxbp.check import recipe

    def five_percent_off(net, params, x, y):
        loss, grads = jaxbp.value_and_backprop(net, params, x, y)
        return loss, jax.tree.map(lambda g: g * (1.05 if net.compute_dtype else 1.0), grads)

    monkeypatch.setattr(recipe, "value_and_backprop", five_percent_off)
    assert cli.main(["verify", "--cases", "2", "--dtypes", "float32", "--n-fd", "1"]) == 1
    out = capsys.readouterr().out
    assert "FAILED: 2 of 4 cases failed" in out and out.count("  FAIL") == 2, out
    assert cli.main(["verify", "--recipes", "fp8"]) == 2
    assert "--recipes: unknown ['fp8']; choose from bf16, bf16-operands or none" in \
        capsys.readouterr().err


def test_verify_says_why_a_taylor_order_is_nan(restore_x64, capsys, monkeypatch):
    """A direction along which the Taylor remainder stayed at rounding level ("flat", as
    one float32 case on an H200 did) prints nan with the reason beside the status."""
    import dataclasses

    from jaxbp.check import suite

    real = suite.run_case

    def flat(case, n_fd):
        report = real(case, n_fd)
        return dataclasses.replace(report, directions=tuple(
            dataclasses.replace(d, taylor_order_manual=float("nan"), taylor_status="flat")
            for d in report.directions))

    monkeypatch.setattr(suite, "run_case", flat)
    assert cli.main(["verify", "--cases", "1", "--dtypes", "float32", "--n-fd", "1"]) == 0
    row = capsys.readouterr().out.splitlines()[2]
    assert row.endswith("   nan  ok (Taylor flat)"), row


def test_unknown_dtype_is_a_usage_error(capsys):
    assert cli.main(["verify", "--dtypes", "float8"]) == 2
    assert "--dtypes: unknown ['float8']" in capsys.readouterr().err


@pytest.mark.slow
def test_console_script_runs():
    result = subprocess.run([sys.executable, "-m", "jaxbp.cli", "verify", "--cases", "2",
                             "--dtypes", "float32"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "all ok" in result.stdout


@pytest.mark.parametrize("argv, unknown", [
    (["train", "--out", "run"], "--out run"),          # was read as --output-activation
    (["bench", "--min", "3"], "--min 3"),              # was read as --min-sample-ms
    (["verify", "--max", "3"], "--max 3"),             # ambiguous: --max-depth, --max-width
])
def test_an_abbreviated_option_is_a_usage_error_not_another_option(capsys, argv, unknown):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert f"unrecognized arguments: {unknown}" in capsys.readouterr().err


def test_help_lists_the_subcommands(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    assert "verify" in capsys.readouterr().out


def test_train_verifies_then_trains(capsys, tmp_path):
    code = cli.main(["train", "--epochs", "3", "--sizes", "64,32,10", "--quiet",
                     "--checkpoint-dir", str(tmp_path / "ckpt"), "--plot",
                     str(tmp_path / "c.png")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "gradient check at the initial params" in out and "verify_grads: OK" in out
    assert "final test accuracy" in out
    assert (tmp_path / "c.png").exists()
    assert len(checkpoint.list_checkpoints(tmp_path / "ckpt")) == 3
    assert not jax.config.jax_enable_x64  # the float64 check did not leak


def test_train_on_a_schedule_and_resume_it_only_as_the_same_run(capsys, tmp_path):
    """--schedule cosine --warmup-steps --clip-grad-norm --weight-decay build the optimizer
    (named in the first line); a cosine run's length is part of the run, so resuming it for
    more epochs is refused, unless --allow-run-change."""
    argv = ["train", "--sizes", "64,16,10", "--quiet", "--optimizer", "adamw",
            "--schedule", "cosine", "--warmup-steps", "4", "--clip-grad-norm", "1",
            "--weight-decay", "0.01", "--checkpoint-dir", str(tmp_path)]
    assert cli.main([*argv, "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert ("adamw lr 0.001, cosine schedule, 4 warmup steps, gradient clipped to norm 1.0, "
            "weight decay 0.01 on the weights (not biases or norms), grad backprop") in out
    assert cli.main([*argv, "--epochs", "3"]) == 1
    assert "schedule_steps: checkpoint 22, now 33" in capsys.readouterr().err
    assert cli.main([*argv, "--epochs", "3", "--allow-run-change"]) == 0
    assert "after 3 epochs" in capsys.readouterr().out


def test_the_optimizer_options_build_the_schedule_they_name():
    lr = optimizer.learning_rate(1e-2, "cosine", 10, 110)
    np.testing.assert_allclose([lr(0), lr(5), lr(10), lr(110)], [0, 5e-3, 1e-2, 1e-3],
                               rtol=1e-6)
    warm = optimizer.learning_rate(1e-2, "constant", 10, 110)
    np.testing.assert_allclose([warm(0), warm(5), warm(10), warm(100)], [0, 5e-3, 1e-2, 1e-2],
                               rtol=1e-6)
    assert optimizer.learning_rate(1e-2, "constant", 0, 110) == 1e-2   # the plain rate
    args = cli.build_parser().parse_args(["train", "--clip-grad-norm", "0.5", "--optimizer",
                                          "sgd", "--lr", "1"])
    rule = optimizer.build(args, 100)      # the gradient (norm 50) clipped to norm 0.5
    params = {"w": jnp.zeros(2)}
    update = rule.update({"w": jnp.array([30.0, 40.0])}, rule.init(params), params)[0]
    np.testing.assert_allclose(update["w"], [-0.3, -0.4], rtol=1e-6)
    assert optimizer.record(args, 100) == {"clip_grad_norm": 0.5}   # only what was set


def test_grad_accum_updates_once_on_the_mean_gradient_of_k_batches():
    """--grad-accum 2 in the train loop: two steps on two halves of a batch (the second
    update on their mean gradient, the first none) give the params of one step on the whole
    batch; the schedule counts updates, and the run's record and first line name it."""
    argv = ["train", "--optimizer", "sgd", "--lr", "0.5", "--clip-grad-norm", "1"]
    args = cli.build_parser().parse_args([*argv, "--grad-accum", "2"])
    plain = cli.build_parser().parse_args(argv)
    net = jaxbp.MLP((6, 5, 3), "tanh")
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(8, 6)).astype(np.float32), rng.integers(0, 3, 8)
    params = net.init(jax.random.key(0))
    accumulated = optimizer.build(args, 10)
    state = jaxbp.TrainState.create(jax.tree.map(jnp.copy, params), accumulated)
    state, _ = jaxbp.make_train_loop(net, accumulated, 2)(state, x.reshape(2, 4, 6),
                                                          y.reshape(2, 4))
    rule = optimizer.build(plain, 10)
    whole, _ = jaxbp.make_train_step(net, rule)(jaxbp.TrainState.create(params, rule), x, y)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(whole.params)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert optimizer.record(args, 10) == {"clip_grad_norm": 1.0, "grad_accum": 2}
    assert "an update every 2 batches (their mean gradient)" in optimizer.describe(args)
    cosine = cli.build_parser().parse_args(["train", "--schedule", "cosine", "--warmup-steps",
                                            "5", "--grad-accum", "2"])
    with pytest.raises(cli.common.UsageError, match="leaves no step of the cosine decay: the "
                                                    "run has 5 steps"):
        optimizer.build(cosine, 10)   # 10 steps are 5 updates: all warmup


@pytest.mark.parametrize("decay", [None, 0.1])
def test_adamw_decays_the_weights_and_tables_not_the_biases_and_norms(decay):
    """With a zero gradient adamw's update is the decay alone, -lr * decay * param: on every
    leaf of two or more axes of a GPT (tables, projections, dense weights), on no bias or
    norm scale (GPT-2's and nanoGPT's convention)."""
    argv = ["train", "--optimizer", "adamw", "--lr", "0.5"]
    args = cli.build_parser().parse_args(argv + ([] if decay is None else
                                                 ["--weight-decay", str(decay)]))
    rule = optimizer.build(args, 10)
    params = models.gpt(vocab=5, dim=4, depth=1, heads=2, seq_len=3).init(jax.random.key(0))
    zero = jax.tree.map(jnp.zeros_like, params)
    update = rule.update(zero, rule.init(params), params)[0]
    rate = 1e-4 if decay is None else decay          # optax's default, or the option
    decayed = [path for path, leaf in jax.tree_util.tree_leaves_with_path(params)
               if leaf.ndim >= 2]
    assert len(decayed) == 9      # tokens, positions, wq wk wv wo, the two dense, the head
    for (path, leaf), step in zip(jax.tree_util.tree_leaves_with_path(params),
                                  jax.tree.leaves(update)):
        expected = -0.5 * rate * leaf if leaf.ndim >= 2 else jnp.zeros_like(leaf)
        np.testing.assert_allclose(step, expected, rtol=1e-6, atol=0, err_msg=str(path))


@pytest.mark.slow
def test_train_gpt_on_a_users_text_checkpoints_resumes_and_samples(capsys, tmp_path):
    """--model gpt on the user's own text file: verified, trained with checkpoints, bits
    per character reported, a sample generated; a second run resumes from epoch 2; a
    private run (--dp --target-epsilon 8) calibrates its noise and trains."""
    text = tmp_path / "poem.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 60)
    argv = ["train", "--model", "gpt", "--data", str(text), "--dim", "16", "--depth", "1",
            "--heads", "2", "--seq-len", "16", "--batch-size", "32", "--lr", "1e-2",
            "--quiet", "--checkpoint-dir", str(tmp_path / "ckpt"), "--compilation-cache",
            "off", "--dropout", "0.1"]
    code = cli.main([*argv, "--epochs", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "gpt dim 16, depth 1, heads 2, seq_len 16, vocab 28" in out
    assert ", dropout 0.1," in out and "with the first step's dropout masks: verify_grads: " \
        "OK" in out
    assert "verify_grads: OK" in out and "bits/char)" in out and "sample (greedy" in out
    code = cli.main([*argv, "--epochs", "3"])
    out = capsys.readouterr().out
    assert code == 0 and "after 3 epochs" in out, out
    assert len(checkpoint.list_checkpoints(tmp_path / "ckpt")) == 3
    private = [a for a in argv if a not in ("--checkpoint-dir", str(tmp_path / "ckpt"))]
    code = cli.main([*private, "--epochs", "1", "--dp", "--target-epsilon", "8",
                     "--sample-temperature", "0.7", "--sample-length", "30",
                     "--sample-top-k", "5", "--norm", "rms", "--positions", "rope",
                     "--mlp", "swiglu", "--kv-heads", "1", "--no-bias",
                     "--mlp-hidden", "40", "--tie-embedding"])  # private, LLaMA-style, tied
    out = capsys.readouterr().out
    assert code == 0 and "grad dp-sgd" in out and "bits/char)" in out, out
    # tokens 28x16, no positions table; norms 3x16; attention 2 (16x16) for q and o,
    # 2 (16x8) for the one key/value head of 8; GatedDense 2 (16x40); Dense 40x16; the head
    # the token table; no biases
    assert ("(3184 params), RMSNorm, rotary positions, SwiGLU, 1 key/value head, MLP hidden "
            "40, no biases, tied embedding,") in out, out
    sample = out.split("sample (temperature 0.7, top 5, after 'the quick brown '):\n")[1]
    assert len(sample.splitlines()[0]) <= 30 and len(sample.rstrip("\n")) == 30, sample
    assert 7 < float(out.split(", epsilon ")[1].split()[0]) <= 8, out
    assert cli.main(["train", "--model", "gpt", "--heads", "3", "--dim", "16"]) == 2
    assert "--heads 3 must divide --dim 16" in capsys.readouterr().err
    assert cli.main(["train", "--model", "gpt", "--positions", "rope", "--heads", "4",
                     "--dim", "12"]) == 2
    assert "--positions rope turns pairs of a head's features: the head width --dim / " \
        "--heads = 3 must be even" in capsys.readouterr().err
    assert cli.main(["train", "--model", "gpt", "--kv-heads", "3"]) == 2
    assert "--kv-heads 3 must divide --heads 4" in capsys.readouterr().err
    assert cli.main(["train", "--mlp", "swiglu"]) == 2
    assert "--mlp shapes a GPT (--model gpt), but --model is mlp" in capsys.readouterr().err
    assert cli.main(["train", "--model", "gpt", "--mlp-hidden", "0"]) == 2
    assert "--mlp-hidden must be an integer > 0, got 0" in capsys.readouterr().err
    assert cli.main(["train", "--tie-embedding"]) == 2
    assert "--tie-embedding shapes a GPT (--model gpt), but --model is mlp" in \
        capsys.readouterr().err
    assert cli.main(["train", "--model", "cnn", "--no-bias"]) == 2
    assert "--no-bias shapes a GPT (--model gpt), but --model is cnn" in \
        capsys.readouterr().err
    assert cli.main(["train", "--model", "gpt", "--attention-block", "0"]) == 2
    assert "--attention-block must be an integer > 0, got 0" in capsys.readouterr().err
    assert cli.main(["train", "--attention-block", "8"]) == 2
    assert "--attention-block shapes a GPT (--model gpt), but --model is mlp" in \
        capsys.readouterr().err
    assert cli.main(["train", "--model", "gpt", "--sample-top-k", "3"]) == 2
    assert "--sample-top-k 3 limits what the sample draws from, but without " \
        "--sample-temperature T > 0 it is greedy" in capsys.readouterr().err
    assert cli.main(["train", "--sample-top-k", "3"]) == 2
    assert "--sample-top-k samples from a GPT" in capsys.readouterr().err


@pytest.mark.slow
def test_default_train_reaches_97_percent_on_digits(capsys):
    """The README's main job: plain `jaxbp train` (64,256,256,10 relu, adam 1e-3, 30 epochs)."""
    assert cli.main(["train", "--quiet"]) == 0
    out = capsys.readouterr().out
    accuracy = float(out.split("final test accuracy ")[1].split(",")[0])
    assert accuracy >= 0.97, out


def test_train_regression_on_teacher_data(capsys):
    """At the largest seed --seed takes (its data's key was key(seed + 1): an overflow)."""
    code = cli.main(["train", "--data", "teacher", "--epochs", "2", "--sizes", "32,16,8",
                     "--quiet", "--optimizer", "momentum", "--lr", "0.01",
                     "--seed", str(2**63 - 1)])
    out = capsys.readouterr().out
    assert code == 0 and "final test loss" in out and "accuracy" not in out.split("final")[1]


def test_train_on_a_one_device_mesh_with_sharded_checkpoints(capsys, tmp_path):
    argv = ["train", "--epochs", "2", "--sizes", "64,16,10", "--quiet", "--devices", "1",
            "--checkpoint-dir", str(tmp_path)]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "mesh {'data': 1, 'model': 1}" in out and "final test accuracy" in out
    assert sorted(p.name for p in tmp_path.glob("ckpt_*")) == [
        "ckpt_000000001", "ckpt_000000002"]
    resume = [a for a in argv if a != "--quiet"]
    assert cli.main([*resume[:2], "3", *resume[3:]]) == 0  # resumes from the orbax step
    out = capsys.readouterr().out
    assert "resumed from" in out and "ckpt_000000002 (after epoch 2)" in out
    assert out.count("epoch   3/3") == 1 and "epoch   1/3" not in out
    net = jaxbp.MLP((64, 16, 10), "relu")           # the trained params, for inference
    with pytest.raises(ValueError, match=r"written by a mesh run .* pass the optimizer"):
        jaxbp.load_params(tmp_path, net)
    params, metadata = jaxbp.load_params(tmp_path, net, optimizer=optax.adam(1e-3))
    digits = jaxbp.data.load_digits()
    final = float(out.split("final test loss ")[1].split()[0])
    assert metadata["epoch"] == 3 and abs(jaxbp.evaluate(net, params, digits.x_test,
                                                         digits.y_test)["loss"] - final) < 1e-4


def test_train_in_a_recipe_checks_it_against_the_float64_truth(capsys, tmp_path):
    """--recipe bf16: the layers store activations and errors in bf16 (the header names the
    recipe); the float64 check is of the same net without the recipe, then the recipe's
    gradient is judged against that truth beside jax.grad's; the checkpoints record the
    recipe (its net) and --precision, so another one does not resume them."""
    argv = ["train", "--sizes", "64,32,10", "--quiet", "--lr", "1e-2", "--recipe", "bf16",
            "--checkpoint-dir", str(tmp_path)]
    assert cli.main([*argv, "--epochs", "2"]) == 0
    out = capsys.readouterr().out
    assert "grad backprop, recipe bf16, jax" in out
    assert "in float64, without the bf16 recipe: verify_grads: OK" in out
    errors = out.split("the bf16 recipe's gradient there: manual ")[1]
    manual, autodiff = float(errors.split()[0]), float(errors.split("recipe ")[1].split(":")[0])
    assert 1e-4 < manual <= max(1e-2, 2 * autodiff) and errors.split("\n")[0].endswith(": OK")
    assert float(out.split("final test accuracy ")[1].split(",")[0]) > 0.9  # float32: 0.936
    saved = checkpoint.read(checkpoint.list_checkpoints(tmp_path)[-1])[1]["metadata"]["run"]
    assert "activation_dtype='bfloat16'" in saved["net"]
    float32 = [a for a in argv if a not in ("--recipe", "bf16")]
    assert cli.main([*float32, "--epochs", "3"]) == 1
    assert "activation_dtype" in capsys.readouterr().err     # recipe float32: another net
    assert cli.main([*argv, "--epochs", "3", "--precision", "highest"]) == 1
    assert "precision" in capsys.readouterr().err


def test_a_recipe_whose_gradient_is_off_stops_the_run(capsys, monkeypatch):
    """The recipe check judges: a hand-written recipe gradient 5% off fails it (exit 1)."""
    from jaxbp.check import recipe

    def five_percent_off(net, params, x, y):
        loss, grads = jaxbp.value_and_backprop(net, params, x, y)
        scale = 1.05 if net.compute_dtype else 1.0
        return loss, jax.tree.map(lambda g: g * scale, grads)

    monkeypatch.setattr(recipe, "value_and_backprop", five_percent_off)
    assert cli.main(["train", "--sizes", "64,16,10", "--quiet", "--epochs", "1",
                     "--recipe", "bf16-operands"]) == 1
    out = capsys.readouterr().out
    assert "without the bf16-operands recipe: verify_grads: OK" in out
    assert "recipe's gradient there: manual 5." in out and ": FAILED (above" in out
    assert "final test" not in out


README = pathlib.Path(__file__).resolve().parent.parent / "README.md"
CHEAP = ["--epochs", "1", "--quiet"]
NOT_RUN_HERE = {
    "jaxbp bench": "the full suite takes minutes; the --quick preset is run by test_bench",
    "jaxbp bench --quick": "about 6 minutes on 2 cores; its cases are run by test_bench",
    "jaxbp bench --quick --precision highest": "as --quick; test_bench runs precisions",
    "jaxbp train --allow-run-change": "a flag the README names in prose (a resume); "
    "tests/test_hardening.py runs it",
    "jaxbp verify": "run over every dtype, two cases each, by "
    "test_verify_runs_in_every_dtype_it_offers",
    "jaxbp train --model gpt --epochs 8 --batch-size 32 --lr 3e-3": "8 epochs of the "
    "default GPT on the whole text take about 2 minutes on 2 cores; "
    "test_train_gpt_on_a_users_text_checkpoints_resumes_and_samples runs --model gpt on a "
    "small text",
    "jaxbp train --model gpt --dp --target-epsilon 8": "the GPT on the whole text for "
    "minutes; test_train_gpt_on_a_users_text_checkpoints_resumes_and_samples runs it on a "
    "small text",
    "jaxbp train --devices 2 --checkpoint-dir /shared/run": "two processes on two hosts; "
    "tests/workers run the same loop on 8 CPU devices",
}


def readme_commands() -> list[str]:
    """Every `jaxbp ...` command the README shows (code blocks and inline), comments cut,
    `a|b` alternatives expanded, placeholders (`[...]`, `|` lists of subcommands) left out."""
    text = README.read_text()
    found = re.findall(r"^ *(jaxbp [^#&\n]*)", text, flags=re.M)
    found += re.findall(r"`(jaxbp [^`]*)`", text)
    commands = set()
    for command in found:
        command = " ".join(command.split())
        if "[" in command or "train|" in command or command.split()[1].endswith(":"):
            continue
        match = re.search(r"(\S+\|\S+)", command)
        choices = match.group(1).split("|") if match else [None]
        for choice in choices:
            commands.add(command.replace(match.group(1), choice) if choice else command)
    return sorted(commands)


def test_the_readme_commands_are_all_accounted_for():
    commands = readme_commands()
    assert "jaxbp train --model cnn" in commands and "jaxbp train --grad dfa" in commands
    assert set(NOT_RUN_HERE) <= set(commands), set(NOT_RUN_HERE) - set(commands)


@pytest.mark.slow
@pytest.mark.parametrize("command", [c for c in readme_commands() if c not in NOT_RUN_HERE])
def test_every_cheap_readme_command_runs(command, tmp_path, restore_x64, capsys, monkeypatch):
    """Each README command as written, shortened to one epoch: exit 0 and a summary."""
    monkeypatch.chdir(tmp_path)
    argv = command.split()[1:]
    if argv == ["train", "--help"]:
        with pytest.raises(SystemExit) as info:
            cli.main(argv)
        assert info.value.code == 0 and "--epochs" in capsys.readouterr().out
        return
    code = cli.main(argv + CHEAP)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "final test" in out
    if "--grad" in argv and argv[argv.index("--grad") + 1] in ("fa", "dfa", "sign"):
        # the check is of the recursion, not of the rule that trains (no gradient)
        assert "(of the recursion, which --grad" in out and "verify_grads: OK" in out


@pytest.mark.slow
def test_train_keeps_compiled_programs_for_a_rerun(tmp_path):
    """--compilation-cache DIR: the first run writes JAX's persistent cache entries, the
    rerun reads them (JAX logs the hits) and writes no new ones. The cache is bounded, so
    JAX locks the folder around reads and writes (its lock file is there). An entry an
    unbounded writer left there (no access-time file, which JAX's eviction reads for
    every entry) is adopted: without that, every write failed with a warning."""
    cache = tmp_path / "xla"
    cache.mkdir()
    (cache / "jit_stale-0123abcd-cache").write_bytes(b"left by an unbounded writer")
    argv = [sys.executable, "-m", "jaxbp.cli", "train", "--epochs", "1", "--sizes",
            "64,16,10", "--quiet", "--compilation-cache", str(cache)]
    env = {**os.environ, "JAX_LOG_COMPILES": "1"}
    first = subprocess.run(argv, capture_output=True, text=True, timeout=300, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "Error writing persistent compilation cache" not in first.stderr, first.stderr
    assert (cache / "jit_stale-0123abcd-atime").exists()
    entries = sorted(p.name for p in cache.iterdir())
    assert ".lockfile" in entries and any(name.endswith("-cache") for name in entries)
    second = subprocess.run([sys.executable, "-m", "jaxbp", *argv[3:]],   # python -m jaxbp
                            capture_output=True, text=True, timeout=300, env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert "cache hit" in second.stderr.lower()
    assert sorted(p.name for p in cache.iterdir()) == entries
