"""The benchmark harness (no timing is asserted: only that it measures and reports)."""

from __future__ import annotations

import time

import jax.numpy as jnp

from jaxbp import bench


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


def test_machine_info_names_the_machine():
    info = bench.machine_info()
    assert info["device_platform"] == "cpu" and info["cpu_cores"] >= 1
    line = bench.describe_machine(info)
    assert info["jax"] in line and info["cpu"] in line


def test_hand_flop_count_matches_xla_for_the_matmuls():
    from jaxbp.bench_suite import BenchCase, benchmark_case

    case = BenchCase(width=32, depth=3, batch=16)
    row = benchmark_case(case, steps=2, budget_s=0.05)
    flops = bench.step_matmul_flops(case.sizes, case.batch)
    # forward 2BP, weight grads 2BP, errors passed back 2B(P - n_in n_1)
    weights = 32 * 32 * 2 + 32 * 10
    assert flops["total"] == 2 * 16 * weights * 2 + 2 * 16 * (weights - 32 * 32)
    for grad in ("backprop", "autodiff"):
        ratio = row[grad]["xla_flops_per_step"] / row["matmul_flops_per_step"]
        assert 1.0 <= ratio < 1.5, ratio  # XLA adds the elementwise work on top
        assert row[grad]["step_s"] > 0 and row[grad]["memory_bytes"]["argument"] > 0
    assert row["manual_over_autodiff"] > 0 and row["gemm_flops_per_s"] > 0


def test_bench_command_writes_json_markdown_and_png(tmp_path, capsys):
    from jaxbp import cli

    code = cli.main(["bench", "--quick", "--max-gflop", "0.001", "--budget", "0.05",
                     "--steps", "2", "--out", str(tmp_path), "--name", "t"])
    out = capsys.readouterr().out
    assert code == 0 and "worst manual/autodiff" in out
    text = (tmp_path / "t.md").read_text()
    assert "W64 D2 B32 CE float32" in text and "bf16-mixed" in text and "Left out" in text
    assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "t.json").exists()


def test_full_suite_on_cpu_is_capped_by_default(monkeypatch, capsys):
    from jaxbp import bench_suite, cli

    seen = {}
    monkeypatch.setattr(bench_suite, "run_suite",
                        lambda cases, out, name, **kw: seen.update(kw, cases=len(cases)))
    assert cli.main(["bench"]) == 0
    assert seen["max_gflop"] == cli.CPU_MAX_GFLOP and seen["cases"] == len(bench_suite.FULL)
    assert "leaves out cases above 20" in capsys.readouterr().out
    assert cli.main(["bench", "--max-gflop", "5"]) == 0 and seen["max_gflop"] == 5
    assert cli.main(["bench", "--quick"]) == 0 and seen["max_gflop"] is None
