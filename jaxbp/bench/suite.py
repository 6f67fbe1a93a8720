"""The training-step benchmark: manual vs autodiff vs the machine's GEMM rate and peaks, per case.

Each case is an MLP ``(W, ..., W, 10)`` with ``depth`` weight layers, batch B,
a loss and a numerical recipe (:data:`jaxbp.bench.cases.RECIPES`: ``float32``;
``bf16-operands``: float32 master weights and activations, bfloat16 matmul operands
with float32 accumulation; ``bf16``: activations and errors stored in bfloat16 too, as flax's
``Dense(dtype=bfloat16)`` and jmp's bf16 policy). Manual and autodiff run the SAME
recipe: autodiff is ``jax.grad`` of the same forward. For each case:

* the donated single step a user runs (:func:`jaxbp.make_train_step`) is
  compiled with ``grad="backprop"`` and with ``grad="autodiff"``: its compile
  time, XLA's memory analysis (a donated state counted once) and cost
  analysis (where the backend gives one; else "n/a");
* a few calls of it estimate the step time, and the k-step ``lax.scan`` loop
  (:func:`jaxbp.make_train_loop`, donated) is built with k chosen so that one
  call is at least ``min_sample_s`` of device work (on a CPU unrolled where k <=
  :data:`CPU_UNROLLED_UP_TO`, for both gradients); both loops are timed
  interleaved in one process, each timed sample holding ``steps_per_sample``
  steps;
* the matmul FLOPs of one step are counted by hand
  (:func:`jaxbp.bench.roof.step_matmul_flops`) and set against XLA's count;
* the machine's own GEMM rate is measured for the three matmul shapes of the
  widest layer (forward, input error, weight gradient with the batch as
  inner dimension), in the same precision; ``roofline`` is the time those
  rates would need for the step's matmuls over the step's time;
* on a known accelerator (:mod:`jaxbp.bench.peaks`) the achieved FLOP/s is also a
  fraction of the datasheet peak for the arithmetic that ran (TF32 for
  float32 at default precision on NVIDIA, ...), and the step's arithmetic
  intensity is set against the device's balance point.

Where the step runs its matmuls faster than the roof's rates allow, the roof is
measured again, longer (:data:`ROOF_REMEASURES`). A fraction above 1 is never
reported silently: the row carries a warning that says which figure exceeds
which and why it can.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbp import files
from jaxbp.bench.cases import (
    FULL,
    LOSSES,
    PRECISIONS,
    QUICK,
    QUICK_ACCELERATOR,
    RECIPES,
    BenchCase,
    ConvCase,
    quick_cases,
)
from jaxbp.bench.gpt import GptCase
from jaxbp.bench.harness import (
    compile_ahead,
    describe_machine,
    machine_info,
    paired_ratio,
    time_interleaved,
    xla_cost,
)
from jaxbp.bench.peaks import device_peaks, matmul_arithmetic
from jaxbp.bench.report import markdown, plot
from jaxbp.bench.roof import (
    ConvShape,
    conv_rate,
    gemm_rate,
)
from jaxbp.losses import get_loss
from jaxbp.train.step import TrainState, make_train_loop, make_train_step

__all__ = ["FULL", "LOSSES", "PRECISIONS", "QUICK", "QUICK_ACCELERATOR", "RECIPES", "BenchCase",
           "ConvCase", "benchmark_case", "quick_cases", "run_suite"]

def _data(case: BenchCase | ConvCase | GptCase) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(0)
    if isinstance(case, GptCase):                      # tokens and next tokens
        tokens = rng.integers(0, case.vocab, size=(case.batch, case.seq_len + 1))
        return (jnp.asarray(tokens[:, :-1], jnp.int32), jnp.asarray(tokens[:, 1:], jnp.int32))
    x = jnp.asarray(rng.normal(size=(case.batch, *case.input_shape)), jnp.float32)
    if get_loss(case.loss).integer_labels:
        return x, jnp.asarray(rng.integers(0, case.n_out, size=case.batch), jnp.int32)
    return x, jnp.asarray(rng.normal(size=(case.batch, case.n_out)), jnp.float32)


def _estimate_step_s(compiled: Any, state: TrainState, x: jax.Array, y: jax.Array,
                     calls: int = 10) -> tuple[float, TrainState]:
    """Seconds per call of a compiled donated step (after two warm calls); the state it leaves.

    An upper bound on the device time (dispatch included), so the k chosen from it
    errs towards longer samples.
    """
    for _ in range(2):
        state, metrics = compiled(state, x, y)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(calls):
        state, metrics = compiled(state, x, y)
    jax.block_until_ready(metrics)
    return (time.perf_counter() - t0) / calls, state


CPU_UNROLLED_UP_TO = 16
"""On a CPU a loop of at most this many steps is compiled unrolled, for both gradients:
XLA:CPU runs jax.grad's backward convolutions inside a rolled loop with a naive emitter,
20-90x slower than unrolled (jax-ml/jax#12868), which would make autodiff a weak baseline
for every CNN (k is 1-16 for them). The hand-written step is as fast either way."""


def _unrolled(steps: int) -> bool:
    return jax.default_backend() == "cpu" and steps <= CPU_UNROLLED_UP_TO


ROOF_REMEASURES = 2
"""Times a case's roof is measured again, with 2x and then 4x the budget, while its step
runs the matmuls faster than the roof's rates allow (a roofline fraction above 1): the
roof is the best the machine does, and the step has just shown that the loops missed it.
On a CPU slowed to under half its speed (another tenant), the loops' best sample rose
with the sampling time (a 16x16x8 CNN's weight-gradient conv 53, 61 and 64 GFLOP/s with
1, 6 and 6 more seconds), and its bf16 step read 1.07 of the shorter measurement's roof.
A fraction still above 1 after these is reported as it is, with its warning."""


def _fraction(value: float | None, roof: float | None) -> float | None:
    return None if value is None or not roof else value / roof


def benchmark_case(case: BenchCase | ConvCase, budget_s: float = 1.0, precision: str | None = None,
                   steps: int | None = None, min_sample_s: float = 5e-3,
                   max_steps: int = 1000, roofs: dict[Any, float] | None = None
                   ) -> dict[str, Any]:
    """Time, count and place one case (see the module docstring). Returns a JSON-able row.

    Args:
      case: the case.
      budget_s: seconds of interleaved timing (the GEMM rates get as much again).
      precision: matmul precision (:data:`jaxbp.matmul_precision.MATMUL_PRECISIONS`), None for
        JAX's current setting.
      steps: steps per loop call; None chooses k so that one call is at least
        ``min_sample_s`` of work (at most ``max_steps``).
      roofs: the best rate measured so far of each product (shape, dtypes, precision),
        updated with this case's: :func:`run_suite` shares one over its cases, so that a
        product measured in several cases has the fastest of its measurements as its
        roof (a shared machine's slow spell during one case's loops cannot lower it).
    """
    net = case.net()
    params = net.init(jax.random.key(0))
    x, y = _data(case)
    optimizer = optax.sgd(1e-4)
    grads = ("backprop", "autodiff")
    memory, cost, step_s = {}, {}, {}
    for grad in grads:
        # exactly the donated step a user runs: its memory counts the state once
        step = make_train_step(net, optimizer, grad=grad, precision=precision)
        state = TrainState.create(jax.tree.map(jnp.copy, params), optimizer)
        single, _, mem = compile_ahead(step, state, x, y)
        memory[grad] = None if mem is None else {**dataclasses.asdict(mem), "peak": mem.peak}
        cost[grad] = xla_cost(single)  # one step: XLA counts a loop body once
        step_s[grad], _ = _estimate_step_s(single, state, x, y)
    if steps is None:
        steps = int(min(max_steps, max(1, math.ceil(min_sample_s / max(step_s.values())))))
    compiled, compile_s, states = {}, {}, {}
    for grad in grads:
        loop = make_train_loop(net, optimizer, steps=steps, grad=grad, precision=precision,
                               unroll=_unrolled(steps))
        states[grad] = TrainState.create(jax.tree.map(jnp.copy, params), optimizer)
        compiled[grad], compile_s[grad], _ = compile_ahead(loop, states[grad], x, y)

    def call(grad: str):
        def run():
            states[grad], metrics = compiled[grad](states[grad], x, y)
            return metrics
        return run

    # the roof is measured half before and half after the step's timing, each shape's
    # best rate kept: a machine that slows or speeds up meanwhile (a shared CPU, a clock)
    # cannot leave the roof measured in its slow spell and the step in its fast one
    roofs = {} if roofs is None else roofs
    before = _roof_rates(case, budget_s / 2, precision, roofs)
    timings = time_interleaved({g: call(g) for g in grads}, budget_s=budget_s,
                               compile_s=compile_s, min_sample_s=min_sample_s)
    after = _roof_rates(case, budget_s / 2, precision, roofs)
    rates = {k: max(before[k], after[k]) for k in before}
    for measured in range(2, 3 + ROOF_REMEASURES):
        row, matmul_s = _roof_row(case, steps, rates, precision)
        for grad, timing in timings.items():
            row[grad] = _timing_row(case, timing, steps, row, matmul_s, cost[grad],
                                    compile_s[grad], memory[grad])
        if measured == 2 + ROOF_REMEASURES or all(
                row[grad]["roofline_fraction"] <= 1 for grad in grads):
            break
        # the step outran the loops: they missed the machine's best, so measure longer
        again = _roof_rates(case, budget_s * 2 ** (measured - 1), precision, roofs)
        rates = {k: max(rates[k], again[k]) for k in rates}
    row["roof_measurements"] = measured
    row["unrolled"] = _unrolled(steps)
    for grad in grads:
        row["warnings"] += _warnings(grad, row[grad], measured)
    row["manual_over_autodiff"] = paired_ratio(timings["backprop"], timings["autodiff"])
    return row


def _roof_work(case: BenchCase | ConvCase | GptCase) -> list[tuple[str, Any, int]]:
    """``(key, shape, FLOPs)``: the step's matmul work, each piece credited at the measured
    rate of its shape (a case's own ``roof_work``, else its three shapes with the FLOPs
    of their kind)."""
    if hasattr(case, "roof_work"):
        return case.roof_work()
    flops = case.flops()
    return [(shape.name, shape, flops[shape.name]) for shape in case.roof_shapes()]


def _roof_rates(case: BenchCase | ConvCase, budget_s: float, precision: str | None,
                roofs: dict[Any, float] | None = None) -> dict[str, float]:
    """The measured FLOP/s of each of the case's own GEMM/conv shapes, each product as the
    recipe runs it (bf16 outputs in the bf16 recipe, weight gradients included:
    precision.weight_grad). On a CPU, where XLA widens bf16 operands to float32 (it has no
    bf16 matmul of its own), the faster of bf16 and float32 operands: the loops of bf16
    operands alone had measured a CNN's convolutions below the rate its bf16-operands
    step reached (roofline fraction 1.03-1.05 in two runs). Each rate is the best of this
    measurement and ``roofs``' (updated): the same product measured earlier in the run (a
    bf16 CNN's float32 way is the float32 CNN's product; a quick run on a CPU slowed to
    less than half its speed had measured it 17% lower there, roofline fraction 1.12)."""
    recipe = RECIPES[case.precision]
    compute = recipe.get("compute_dtype")
    out = recipe.get("activation_dtype")
    # (compute dtype, output dtype) of each way measured; float32 operands give float32
    # outputs (a narrower preferred type is refused), the rounding being elementwise work
    ways = ((compute, out), (None, None)) if compute and jax.devices()[0].platform == "cpu" \
        else ((compute, out),)
    roofs = {} if roofs is None else roofs
    rates = {}
    for key, shape, _ in _roof_work(case):
        rate = conv_rate if isinstance(shape, ConvShape) else gemm_rate
        for dtype, out_dtype in ways:
            product = (shape, dtype, out_dtype, precision)
            roofs[product] = max(roofs.get(product, 0.0), rate(
                shape, "float32", dtype, budget_s=budget_s / 3 / len(ways),
                precision=precision, out_dtype=out_dtype))
        rates[key] = max(roofs[(shape, dtype, out_dtype, precision)]
                         for dtype, out_dtype in ways)
    return rates


def _roof_row(case: BenchCase | ConvCase, steps: int, rates: dict[str, float],
              precision: str | None) -> tuple[dict[str, Any], float]:
    """The case's row without timings: the measured rates of its own GEMM/conv shapes, the
    datasheet peak; and the seconds those rates need for the step's matmuls."""
    flops = case.flops()
    compute = RECIPES[case.precision].get("compute_dtype")
    # time the measured rates need for the step's matmuls: each piece at its own shape's rate
    matmul_s = sum(piece / rates[key] for key, _, piece in _roof_work(case))
    device = jax.devices()[0]
    arithmetic = matmul_arithmetic(device.platform, compute or "float32", precision)
    peaks = device_peaks(device.device_kind)
    row: dict[str, Any] = {**dataclasses.asdict(case), "label": case.label(arithmetic),
                           "arithmetic": arithmetic, "steps_per_call": steps,
                           "matmul_flops_per_step": flops["total"],
                           "gemm_flops_per_s": rates,
                           "peak_flops_per_s": None if peaks is None else peaks.peak(arithmetic),
                           "balance_point": (None if peaks is None
                                             else peaks.balance_point(arithmetic)),
                           "warnings": []}
    return row, matmul_s


def _timing_row(case: BenchCase | ConvCase, timing: Any, steps: int, row: dict[str, Any],
                matmul_s: float, xla: dict[str, float] | None, compile_s: float,
                memory: dict[str, Any] | None) -> dict[str, Any]:
    """One gradient source's figures: per-step time, XLA's counts, the fractions of the
    measured roof and of the datasheet peak, memory."""
    per_step = timing.median / steps
    achieved = row["matmul_flops_per_step"] / per_step
    figures = {
        "step_s": per_step,
        "step_iqr_s": [timing.p25 / steps, timing.p75 / steps],
        "steps_per_sample": round(steps * timing.runs / len(timing.rounds)),   # mean
        "shortest_sample_s": min(timing.sample_s),
        "compile_s": compile_s,
        "xla_flops_per_step": None if xla is None else xla["flops"],
        "xla_bytes_per_step": None if xla is None else xla["bytes"],
        "arithmetic_intensity": None if xla is None else xla["flops"] / xla["bytes"],
        "achieved_flops_per_s": achieved,
        "roofline_fraction": matmul_s / per_step,
        "peak_fraction": _fraction(achieved, row["peak_flops_per_s"]),
        "memory_bytes": memory,
    }
    if isinstance(case, GptCase):
        figures["tokens_per_s"] = case.tokens / per_step
    return figures


def _warnings(grad: str, result: dict[str, Any], roof_measurements: int = 2) -> list[str]:
    """Why a fraction above 1 can appear, for each one that did."""
    notes = []
    if result["roofline_fraction"] > 1:
        notes.append(f"{grad}: roofline fraction {result['roofline_fraction']:.2f} > 1: the "
                     f"step ran its matmuls faster than the best of {roof_measurements} "
                     f"measurements of the GEMM/conv loops ran them alone (a machine "
                     f"whose speed varies, or layers credited at another shape's rate); "
                     f"read it as ~1")
    if result["peak_fraction"] is not None and result["peak_fraction"] > 1:
        notes.append(f"{grad}: {result['peak_fraction']:.2f} of the datasheet peak > 1: the "
                     f"arithmetic that ran is not the one assumed (check the matmul precision "
                     f"and XLA_FLAGS) or the device kind was matched to the wrong datasheet")
    return notes


def run_suite(cases: list[BenchCase], out_dir: str | pathlib.Path, name: str,
              budget_s: float = 1.0, max_gflop: float | None = None,
              time_limit_s: float | None = None, precision: str | None = None,
              steps: int | None = None, min_sample_s: float = 5e-3,
              log: Any = print) -> dict[str, Any]:
    """Benchmark ``cases`` and write ``<name>.json``, ``<name>.md`` (and ``<name>.png``).

    Cases above ``max_gflop`` matmul GFLOP per step, and those not started
    before ``time_limit_s`` seconds have passed, are listed as left out with
    the reason. The PNG is written only when there is a row to plot.
    """
    info = machine_info(precision)
    log(f"jaxbp bench: {len(cases)} cases on {describe_machine(info)}")
    rows, left_out = [], []
    roofs: dict[Any, float] = {}          # each product's best rate over the whole run
    start = time.perf_counter()
    for case in cases:
        if max_gflop is not None and case.gflop > max_gflop:
            left_out.append(f"{case.label()} (over {max_gflop:g} GFLOP)")
            continue
        if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
            left_out.append(f"{case.label()} (time limit {time_limit_s:g} s)")
            continue
        row = benchmark_case(case, budget_s=budget_s, precision=precision, steps=steps,
                             min_sample_s=min_sample_s, roofs=roofs)
        rows.append(row)
        m = row["backprop"]
        peak = "" if m["peak_fraction"] is None else f"  peak {m['peak_fraction']:.2f}"
        log(f"{row['label']:<38} manual/autodiff {row['manual_over_autodiff']:.3f}  "
            f"roofline {m['roofline_fraction']:.2f}{peak}  step {m['step_s'] * 1e3:.3f} ms "
            f"({m['steps_per_sample']} steps/sample)")
        for warning in row["warnings"]:
            log(f"  warning: {warning}")
    result = {"machine": info, "rows": rows, "left_out": left_out, "max_gflop": max_gflop,
              "time_limit_s": time_limit_s}
    out = pathlib.Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files.write_text(out / f"{name}.json", json.dumps(result, indent=1))
    files.write_text(out / f"{name}.md", markdown(result))
    written = [f"{name}.json", f"{name}.md"]
    if rows and plot(result, out / f"{name}.png"):
        written.append(f"{name}.png")
    if rows:
        worst = max(rows, key=lambda r: r["manual_over_autodiff"])
        best = max(rows, key=lambda r: r["backprop"]["roofline_fraction"])
        log(f"worst manual/autodiff {worst['manual_over_autodiff']:.3f} ({worst['label']}); "
            f"best roofline fraction {best['backprop']['roofline_fraction']:.2f} "
            f"({best['label']})")
    else:
        log(f"no case was run ({len(left_out)} left out)")
    log(f"wrote {', '.join(str(out / w) for w in written)}")
    return result
