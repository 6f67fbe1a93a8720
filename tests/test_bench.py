"""The benchmark harness (no timing is asserted: only that it measures and reports)."""

from __future__ import annotations

import time
import types

import jax
import jax.numpy as jnp
import optax
import pytest

import jaxbp
from jaxbp.bench import harness as bench
from jaxbp.bench import roof


def test_compile_ahead_reports_time_and_memory():
    compiled, seconds, memory = bench.compile_ahead(lambda x: (x @ x.T).sum(), jnp.ones((64, 32)))
    assert float(compiled(jnp.ones((64, 32)))) == 64 * 64 * 32
    assert seconds > 0
    assert memory.argument == 64 * 32 * 4 and memory.output == 4
    assert memory.peak == memory.argument + memory.output + memory.temp


def test_time_interleaved_runs_every_candidate_in_rounds():
    calls = {"fast": lambda: jnp.zeros(()), "slow": lambda: (time.sleep(0.01), jnp.ones(()))[1]}
    timings = bench.time_interleaved(calls, budget_s=0.2, min_rounds=3, compile_s={"fast": 1.0})
    assert set(timings) == {"fast", "slow"}
    slow = timings["slow"]
    assert slow.median >= 0.01 and slow.p25 <= slow.median <= slow.p75
    assert timings["fast"].runs >= timings["slow"].runs >= 3  # fast ones repeat per round
    assert timings["fast"].compile_s == 1.0


def test_time_interleaved_makes_every_sample_long_enough():
    timings = bench.time_interleaved({"tiny": lambda: jnp.zeros(())}, budget_s=0.05,
                                     min_rounds=3, min_sample_s=5e-3)
    tiny = timings["tiny"]         # a sample repeats its calls until 5 ms have passed
    assert tiny.reps > 1 and len(tiny.sample_s) == len(tiny.rounds) >= 3
    assert all(wall >= 5e-3 for wall in tiny.sample_s)
    assert tiny.runs >= tiny.reps * len(tiny.rounds)


def test_machine_info_names_the_machine(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/nowhere")
    info = bench.machine_info("highest")
    assert info["cpu_cores"] >= 1 and info["matmul_precision"] == "highest"
    assert info["xla_flags"] == "--xla_dump_to=/nowhere"
    line = bench.describe_machine(info)
    assert info["jax"] in line and info["cpu"] in line and "highest" in line
    assert "xla_dump_to" in line


class _Broken:
    """A compiled program whose analyses fail the ways some GPU/TPU backends have."""

    def __init__(self, cost, memory):
        self.cost, self.memory = cost, memory

    def cost_analysis(self):
        if isinstance(self.cost, Exception):
            raise self.cost
        return self.cost

    def memory_analysis(self):
        if isinstance(self.memory, Exception):
            raise self.memory
        return self.memory


def test_cost_and_memory_analysis_failures_read_not_available():
    for cost in (RuntimeError("unimplemented"), None, [], [{"flops": -1.0}],
                 {"flops": 0.0, "bytes accessed": 0.0}, {}):
        assert bench.xla_cost(_Broken(cost, None)) is None, cost
    stats = types.SimpleNamespace(argument_size_in_bytes=-1, output_size_in_bytes=-1,
                                  temp_size_in_bytes=-1, alias_size_in_bytes=-1)
    for memory in (NotImplementedError("no"), None, stats):
        assert bench.memory_of(_Broken(None, memory)) is None, memory
    assert bench.xla_cost(_Broken({"flops": 10.0, "bytes accessed": 5.0}, None)) == {
        "flops": 10.0, "bytes": 5.0}


def test_donated_step_is_compiled_as_is_and_its_state_counted_once():
    net = jaxbp.MLP((16, 32, 4))
    state = jaxbp.TrainState.create(net.init(jax.random.key(0)), optax.sgd(0.1))
    x, y = jnp.ones((8, 16)), jnp.zeros((8,), jnp.int32)
    donated = jaxbp.make_train_step(net, optax.sgd(0.1))
    kept = jaxbp.make_train_step(net, optax.sgd(0.1), donate=False)
    _, _, mem_donated = bench.compile_ahead(donated, state, x, y)
    _, _, mem_kept = bench.compile_ahead(kept, state, x, y)
    state_bytes = sum(leaf.nbytes for leaf in jax.tree.leaves(state))
    assert mem_donated.alias >= state_bytes and mem_kept.alias == 0
    assert mem_donated.peak < mem_kept.peak  # the aliased state is not held twice


def test_step_precision_reaches_the_compiled_program():
    net = jaxbp.MLP((16, 32, 4))
    state = jaxbp.TrainState.create(net.init(jax.random.key(0)), optax.sgd(0.1))
    x, y = jnp.ones((8, 16)), jnp.zeros((8,), jnp.int32)
    for precision, word in (("highest", "HIGHEST"), ("high", "HIGH")):
        step = jaxbp.make_train_step(net, optax.sgd(0.1), precision=precision)
        text = step.lower(state, x, y).as_text()
        assert f"precision = [{word}, {word}]" in text, precision
    with pytest.raises(ValueError, match="Unknown precision 'fp33'"):
        jaxbp.make_train_step(net, optax.sgd(0.1), precision="fp33")


def test_three_matmul_shapes_and_their_rates():
    shapes = roof.step_matmul_shapes(batch=32, fan_in=64, fan_out=16)
    assert [s.name for s in shapes] == ["forward", "input_error", "weight_grad"]
    assert [(s.m, s.k, s.n) for s in shapes] == [(32, 64, 16), (32, 16, 64), (64, 32, 16)]
    assert all(s.flops == 2 * 32 * 64 * 16 for s in shapes)
    for shape in shapes:
        assert roof.gemm_rate(shape, budget_s=0.02, min_sample_s=1e-3) > 0


def test_gemm_roof_is_not_lowered_by_a_slow_loop(monkeypatch):
    """A fake loop overhead of 1 ms per iteration (a host callback that sleeps) on a
    tiny matmul: the single-product chain measures about one product per overhead; the
    best loop spreads the overhead over 32 products. Asserted: the roof is at least 8x
    the chain's own rate under the same overhead (a factor 4 of margin for noise)."""
    shape = roof.step_matmul_shapes(batch=8, fan_in=8, fan_out=8)[0]
    monkeypatch.setattr(roof, "_ITERATION_HOOK", lambda _: time.sleep(1e-3))
    monkeypatch.setattr(roof, "TIME_ALONE", False)            # the loops alone
    # every loop is measured, however slow a loaded machine makes an iteration look
    monkeypatch.setattr(roof, "LONG_PRODUCT_S", float("inf"))
    best = roof.gemm_rate(shape, budget_s=0.2, min_sample_s=1e-3)
    monkeypatch.setattr(roof, "GEMM_LOOPS", roof.GEMM_LOOPS[:1])
    chain = roof.gemm_rate(shape, budget_s=0.2, min_sample_s=1e-3)
    assert best >= 8 * chain, (best, chain)


def test_gemm_roof_also_times_the_product_alone(monkeypatch):
    """Where every loop iteration costs a fake 20 ms (a loop that rewrites its operand,
    or a slow trip), the product called alone still gives the roof: at least 8x the
    loops' best rate under the same overhead."""
    shape = roof.step_matmul_shapes(batch=8, fan_in=8, fan_out=8)[0]
    monkeypatch.setattr(roof, "_ITERATION_HOOK", lambda _: time.sleep(2e-2))
    monkeypatch.setattr(roof, "LONG_PRODUCT_S", float("inf"))
    best = roof.gemm_rate(shape, budget_s=0.3, min_sample_s=1e-3)
    monkeypatch.setattr(roof, "TIME_ALONE", False)
    loops = roof.gemm_rate(shape, budget_s=0.3, min_sample_s=1e-3)
    assert best >= 8 * loops, (best, loops)


def test_a_product_measured_again_compiles_nothing(monkeypatch):
    """The roof's loops are compiled once per product: measured again (after a case's
    timing, or longer where the step outran it) they are reused."""
    compiled = []
    original = roof.compile_ahead
    monkeypatch.setattr(roof, "compile_ahead",
                        lambda *args: compiled.append(1) or original(*args))
    monkeypatch.setattr(roof, "_COMPILED_LOOPS", {})
    shape = roof.ConvShape("weight_grad", 2, 4, 2, 3)
    roof.conv_rate(shape, budget_s=0.02, min_sample_s=1e-4)
    first = len(compiled)
    assert first >= 2                                  # a loop and the product alone
    roof.conv_rate(shape, budget_s=0.02, min_sample_s=1e-4)
    assert len(compiled) == first
    roof.conv_rate(shape, "float32", "bfloat16", budget_s=0.02, min_sample_s=1e-4)
    assert len(compiled) > first                       # another product: its own programs


@pytest.mark.parametrize("caught_up", [True, False])
def test_a_roof_the_step_outran_is_measured_again_longer(monkeypatch, caught_up):
    """A step faster than its roof's rates allow (fraction > 1) has its roof measured
    again with 2x, then 4x the budget; the row keeps the best rates and says how many
    measurements it took, and a fraction still above 1 keeps its warning."""
    from jaxbp.bench import suite
    from jaxbp.bench.suite import BenchCase

    budgets = []

    def fake_rates(case, budget_s, precision, roofs=None):
        budgets.append(budget_s)
        fast = caught_up and len(budgets) == 3          # the first longer look catches it
        return {key: 1e30 if fast else 1.0 for key, *_ in suite._roof_work(case)}

    monkeypatch.setattr(suite, "_roof_rates", fake_rates)
    row = suite.benchmark_case(BenchCase(16, 2, 8), steps=1, budget_s=0.05,
                               min_sample_s=1e-3)
    if caught_up:
        assert budgets == [0.025, 0.025, 0.1] and row["roof_measurements"] == 3
        assert row["backprop"]["roofline_fraction"] < 1e-6 and not row["warnings"]
    else:
        assert budgets == [0.025, 0.025, 0.1, 0.2] and row["roof_measurements"] == 4
        assert row["backprop"]["roofline_fraction"] > 1
        assert any("best of 4 measurements" in w for w in row["warnings"])


def test_every_recipe_runs_its_own_net_and_gemm_outputs():
    from jaxbp.bench.suite import RECIPES, BenchCase, ConvCase

    for recipe, fields in RECIPES.items():
        for case in (BenchCase(16, 2, 8, precision=recipe),
                     ConvCase(6, 2, 4, 2, 4, precision=recipe)):
            layers = jaxbp.network.as_network(case.net()).layers
            assert all(getattr(l, k, None) == v for l in layers if hasattr(l, "units")
                       for k, v in fields.items()), (recipe, layers)
    assert set(RECIPES) == {"float32", "bf16-operands", "bf16"}


def test_hand_flop_count_matches_xla_for_the_matmuls():
    from jaxbp.bench.suite import BenchCase, benchmark_case

    case = BenchCase(width=32, depth=3, batch=16)
    row = benchmark_case(case, steps=2, budget_s=0.05)
    flops = roof.step_matmul_flops(case.sizes, case.batch)
    # forward 2BP, weight grads 2BP, errors passed back 2B(P - n_in n_1)
    weights = 32 * 32 * 2 + 32 * 10
    assert flops["total"] == 2 * 16 * weights * 2 + 2 * 16 * (weights - 32 * 32)
    for grad in ("backprop", "autodiff"):
        ratio = row[grad]["xla_flops_per_step"] / row["matmul_flops_per_step"]
        assert 1.0 <= ratio < 1.5, ratio  # XLA adds the elementwise work on top
        assert row[grad]["step_s"] > 0 and row[grad]["memory_bytes"]["argument"] > 0
    assert row["manual_over_autodiff"] > 0
    assert set(row["gemm_flops_per_s"]) == {"forward", "input_error", "weight_grad"}
    assert all(rate > 0 for rate in row["gemm_flops_per_s"].values())
    assert row["backprop"]["steps_per_sample"] >= row["steps_per_call"] == 2
    assert row["label"] == f"W32 D3 B16 CE float32 ({row['arithmetic']})"


def test_conv_case_flops_match_xla_and_its_shapes_are_the_implicit_gemm():
    from jaxbp.bench.suite import ConvCase, benchmark_case

    case = ConvCase(side=6, channels=2, filters=4, depth=2, batch=4)
    row = benchmark_case(case, budget_s=0.02, min_sample_s=1e-3)
    for grad in ("backprop", "autodiff"):
        ratio = row[grad]["xla_flops_per_step"] / row["matmul_flops_per_step"]
        # XLA:CPU counts the convs' in-image taps plus elementwise work; XLA:GPU counts its
        # cuDNN convs differently (0.31 of the hand count on an H200), so there: positive
        on_cpu = jax.devices()[0].platform == "cpu"
        assert (1.0 <= ratio < 1.5) if on_cpu else (0.0 < ratio < 1.5), ratio
    assert [(s.name, s.batch, s.side, s.c_in, s.c_out) for s in case.roof_shapes()] == [
        (kind, 4, 6, 4, 4) for kind in ("forward", "input_error", "weight_grad")]
    assert all(rate > 0 for rate in row["gemm_flops_per_s"].values())
    work = case.roof_work()       # every conv at its own shapes' rate; the work adds up
    assert sum(flops for *_, flops in work) == case.flops()["total"]
    assert set(row["gemm_flops_per_s"]) == {key for key, *_ in work} == {
        "forward", "input_error", "weight_grad", "first forward", "first weight_grad"}
    assert [(s.c_in, s.c_out) for key, s, _ in work if key.startswith("first")] == [(2, 4)] * 2
    for shape in case.roof_shapes():  # each timed convolution does the work it is credited
        a, b, product = roof.conv_product(shape, "float32")
        cost = jax.jit(product).lower(a, b).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        if jax.devices()[0].platform == "cpu":
            assert cost["flops"] == shape.flops, (shape, cost["flops"])
    assert row["label"].startswith("CNN 6x6x2 F4 D2 B4 float32")


def test_steps_per_call_scale_with_the_case():
    from jaxbp.bench.suite import BenchCase, benchmark_case

    small = benchmark_case(BenchCase(width=16, depth=2, batch=8), budget_s=0.02,
                           min_sample_s=2e-3)
    assert small["steps_per_call"] > 1  # a tiny step alone would be dispatch-bound
    for grad in ("backprop", "autodiff"):  # every sample at least min_sample_s, by construction
        assert small[grad]["shortest_sample_s"] >= 2e-3
        assert small[grad]["steps_per_sample"] >= small["steps_per_call"]


def test_fractions_above_one_carry_a_warning():
    from jaxbp.bench.suite import _warnings

    assert _warnings("backprop", {"roofline_fraction": 0.9, "peak_fraction": None}) == []
    notes = _warnings("backprop", {"roofline_fraction": 1.2, "peak_fraction": 1.1})
    assert len(notes) == 2 and "1.20 > 1" in notes[0] and "datasheet peak" in notes[1]


def test_bench_command_writes_json_markdown_and_png(tmp_path, capsys, monkeypatch):
    from jaxbp import cli
    from jaxbp.bench import suite as bench_suite

    # the CPU preset's smallest MLP in its three recipes and one larger case to leave out,
    # on any device (the accelerator preset is all > 1 GFLOP)
    small = [c for c in bench_suite.QUICK if isinstance(c, bench_suite.BenchCase)
             and (c.width, c.depth, c.batch, c.loss) == (64, 2, 32, "softmax_cross_entropy")]
    assert len(small) == 3
    monkeypatch.setattr(bench_suite, "quick_cases",
                        lambda platform: [*small, bench_suite.QUICK[-1]])

    code = cli.main(["bench", "--quick", "--max-gflop", "0.001", "--budget", "0.05",
                     "--steps", "2", "--out", str(tmp_path), "--name", "t"])
    out = capsys.readouterr().out
    assert code == 0 and "worst manual/autodiff" in out
    text = (tmp_path / "t.md").read_text()
    assert "W64 D2 B32 CE float32" in text and "Left out" in text
    assert "B32 CE bf16-operands" in text and "B32 CE bf16 (" in text  # both bf16 recipes
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "t.json").exists()


def test_full_suite_on_cpu_is_capped_by_default(monkeypatch, capsys):
    from jaxbp import cli
    from jaxbp.bench import suite as bench_suite

    seen = {}
    monkeypatch.setattr(bench_suite, "run_suite",
                        lambda cases, out, name, **kw: seen.update(kw, cases=len(cases)))
    monkeypatch.setattr(jax, "devices", lambda: [types.SimpleNamespace(platform="cpu")])
    assert cli.main(["bench"]) == 0
    assert seen["max_gflop"] == cli.CPU_MAX_GFLOP and seen["cases"] == len(bench_suite.FULL)
    assert "leaves out cases above 20" in capsys.readouterr().out
    assert cli.main(["bench", "--max-gflop", "5"]) == 0 and seen["max_gflop"] == 5
    assert cli.main(["bench", "--quick"]) == 0 and seen["max_gflop"] is None
    assert seen["time_limit_s"] is None and seen["precision"] is None
    assert cli.main(["bench", "--quick", "--precision", "highest"]) == 0
    assert seen["precision"] == "highest"


def test_accelerator_presets_are_device_aware(monkeypatch, capsys):
    from jaxbp import cli
    from jaxbp.bench import suite as bench_suite

    assert bench_suite.quick_cases("cpu") is bench_suite.QUICK
    assert len(bench_suite.QUICK) == 37 and {c.precision for c in bench_suite.QUICK
                                             if hasattr(c, "side")} == set(bench_suite.RECIPES)
    assert {c.style for c in bench_suite.QUICK if hasattr(c, "seq_len")} == {"gpt2", "llama"}
    heavy = bench_suite.quick_cases("gpu")
    assert len(heavy) == 37 and min(c.gflop for c in heavy) > 1  # not launch-bound
    recipes = {c.precision for c in heavy if hasattr(c, "side")}
    assert recipes == {"float32", "bf16-operands", "bf16"}  # CNNs in every recipe
    gpt2 = [c for c in heavy if hasattr(c, "seq_len")]                 # GPT-2 small's shape
    assert [(c.dim, c.depth, c.heads, c.seq_len, c.vocab, c.precision) for c in gpt2] == [
        (768, 12, 12, 1024, 50257, r) for r in ("float32", "bf16-operands", "bf16")]
    # GPT-2 small's 124,439,808 params (tied) and the head's bias (GPT-2's has none)
    shapes = gpt2[0].net().param_shapes()
    assert sum(a.size for a in jax.tree.leaves(shapes)) == 124_439_808 + 50_257
    assert gpt2[0].label().startswith("tied GPT d768 L12 H12 T1024 B8")
    seen = {}
    monkeypatch.setattr(bench_suite, "run_suite",
                        lambda cases, out, name, **kw: seen.update(kw, cases=cases, name=name))
    monkeypatch.setattr(jax, "devices", lambda: [types.SimpleNamespace(platform="gpu")])
    assert cli.main(["bench"]) == 0
    assert seen["max_gflop"] is None and seen["time_limit_s"] == cli.ACCELERATOR_TIME_LIMIT_S
    assert cli.main(["bench", "--quick"]) == 0 and seen["cases"] == heavy
    assert seen["name"] == "step_quick_gpu"


def test_peaks_table_and_the_arithmetic_that_runs():
    from jaxbp.bench import peaks

    h100 = peaks.device_peaks("NVIDIA H100 80GB HBM3")
    assert h100.name == "H100 SXM" and h100.peak("bf16") == 989.5e12 / 1
    assert peaks.device_peaks("NVIDIA H100 PCIe").name == "H100 PCIe"
    assert peaks.device_peaks("NVIDIA H200").bandwidth == 4.8e12
    assert peaks.device_peaks("NVIDIA A100-SXM4-80GB").name == "A100 80GB SXM"
    assert peaks.device_peaks("TPU v5 lite").name == "TPU v5e"
    assert peaks.device_peaks("TPU v5p").name == "TPU v5p"
    assert peaks.device_peaks("TPU v6 lite").name == "TPU v6e"
    assert peaks.device_peaks("cpu") is None
    assert h100.balance_point("tf32") == h100.peak("tf32") / 3.35e12
    assert peaks.matmul_arithmetic("gpu", "float32", "default") == "tf32"
    assert peaks.matmul_arithmetic("gpu", "float32", "highest") == "fp32"
    assert peaks.matmul_arithmetic("tpu", "float32", "default") == "bf16"
    assert peaks.matmul_arithmetic("tpu", "float32", "highest") == "bf16x6"
    assert peaks.matmul_arithmetic("cpu", "float32", "default") == "fp32"
    assert peaks.matmul_arithmetic("gpu", "bfloat16", "highest") == "bf16"


def test_the_compiled_step_tables_count_both_programs(tmp_path, monkeypatch):
    """benchmarks/step_hlo.py, for the GPU run (issue 24's bf16 MLP gap): both steps of a
    small bf16 MLP compiled (not run), their HLO written, and the table counting the same
    matmuls for both, since the hand-written step runs the matmuls jax.grad runs."""
    import pathlib
    import sys

    monkeypatch.syspath_prepend(str(pathlib.Path(__file__).resolve().parent.parent
                                    / "benchmarks"))
    import step_hlo

    monkeypatch.setattr(sys, "argv", ["step_hlo.py", "--width", "32", "--depth", "2",
                                      "--batch", "16", "--out", str(tmp_path)])
    step_hlo.main()
    platform = jax.devices()[0].platform
    table = (tmp_path / f"step_hlo_{platform}_w32_d2_b16_bf16.md").read_text()
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()
             if line.startswith("| ")]
    rows = {row[0]: row[1:3] for row in cells}
    matmuls = {row: counts for row, counts in rows.items() if row.startswith("matmul:")}
    assert sum(int(b) for b, _ in matmuls.values()) == 5   # 2 forward, 1 error, 2 wgrad
    assert all(b == a for b, a in matmuls.values()), matmuls
    assert any(row.startswith("kernel:") for row in rows)
    for grad in ("backprop", "autodiff"):
        assert "HloModule" in (tmp_path / f"step_hlo_{platform}_w32_d2_b16_bf16_{grad}.txt"
                               ).read_text()


def test_the_roof_of_every_recipe_is_measured_and_on_a_cpu_also_in_float32(monkeypatch):
    """Each recipe's roof rates are measured (the bf16 recipe's float32 way gives float32
    outputs: a bf16 preferred type of float32 operands is refused by JAX, which stopped a
    quick run); on a CPU the faster of bf16 and float32 operands is kept."""
    from jaxbp.bench import suite
    from jaxbp.bench.suite import BenchCase, ConvCase

    asked = []

    def fake_rate(shape, dtype, compute_dtype, budget_s, precision, out_dtype):
        asked.append((compute_dtype, out_dtype))
        return 2.0 if compute_dtype is None else 1.0          # float32 the faster here

    monkeypatch.setattr(suite, "gemm_rate", fake_rate)
    monkeypatch.setattr(suite, "conv_rate", fake_rate)
    cpu = jax.devices()[0].platform == "cpu"       # elsewhere bf16 operands have their rate
    for recipe in ("float32", "bf16-operands", "bf16"):
        own = (None, None) if recipe == "float32" else (
            "bfloat16", "bfloat16" if recipe == "bf16" else None)
        for case in (BenchCase(16, 2, 8, precision=recipe),
                     ConvCase(6, 2, 4, 2, 4, precision=recipe)):
            asked.clear()
            rates = suite._roof_rates(case, 0.01, None)
            ways = {own, (None, None)} if cpu else {own}
            assert set(asked) == ways, (recipe, asked)
            assert set(rates.values()) == {2.0 if (None, None) in ways else 1.0}, rates
    # and the real loops take each way's dtypes (the bf16 case with float32 operands ran
    # into JAX's "preferred_element_type must not be narrower")
    monkeypatch.undo()
    rates = suite._roof_rates(BenchCase(16, 2, 8, precision="bf16"), 0.01, None)
    assert all(r > 0 for r in rates.values())


def test_a_products_roof_is_its_best_rate_over_the_run(monkeypatch):
    """A product measured again in a later case (the bf16 CNN's float32 way is the float32
    CNN's product) keeps the faster of the two measurements: a slow spell of the machine
    during the later case's loops does not lower its roof."""
    from jaxbp.bench import suite
    from jaxbp.bench.suite import ConvCase

    pieces = len(suite._roof_work(ConvCase(6, 2, 4, 2, 4)))
    calls = []

    def fake_rate(shape, dtype, compute_dtype, budget_s, precision, out_dtype):
        calls.append(shape)
        return 3.0 if len(calls) <= pieces else 1.0     # the first case's loops the faster

    monkeypatch.setattr(suite, "gemm_rate", fake_rate)
    monkeypatch.setattr(suite, "conv_rate", fake_rate)
    roofs = {}
    first = suite._roof_rates(ConvCase(6, 2, 4, 2, 4), 0.01, None, roofs)
    later = suite._roof_rates(ConvCase(6, 2, 4, 2, 4, precision="bf16"), 0.01, None, roofs)
    assert set(first.values()) == {3.0}
    cpu = jax.devices()[0].platform == "cpu"          # where the float32 way is measured too
    assert set(later.values()) == ({3.0} if cpu else {1.0}), later
    assert set(suite._roof_rates(ConvCase(6, 2, 4, 2, 4), 0.01, None).values()) == {1.0}
