"""The training-step benchmark: manual vs autodiff vs the machine's GEMM rate and peaks, per case.

Each case is an MLP ``(W, ..., W, 10)`` with ``depth`` weight layers, batch B,
a loss and a numerical recipe (:data:`RECIPES`: ``float32``; ``bf16-operands``: float32
master weights and activations, bfloat16 matmul operands with float32 accumulation;
``bf16``: activations and errors stored in bfloat16 too, as flax's
``Dense(dtype=bfloat16)`` and jmp's bf16 policy). Manual and autodiff run the SAME
recipe: autodiff is ``jax.grad`` of the same forward. For each case:

* the donated single step a user runs (:func:`jaxbp.make_train_step`) is
  compiled with ``grad="backprop"`` and with ``grad="autodiff"``: its compile
  time, XLA's memory analysis (a donated state counted once) and cost
  analysis (where the backend gives one; else "n/a");
* a few calls of it estimate the step time, and the k-step ``lax.scan`` loop
  (:func:`jaxbp.make_train_loop`, donated) is built with k chosen so that one
  call is at least ``min_sample_s`` of device work; both loops are timed
  interleaved in one process, each timed sample holding ``steps_per_sample``
  steps;
* the matmul FLOPs of one step are counted by hand
  (:func:`jaxbp.bench.harness.step_matmul_flops`) and set against XLA's count;
* the machine's own GEMM rate is measured for the three matmul shapes of the
  widest layer (forward, input error, weight gradient with the batch as
  inner dimension), in the same precision; ``roofline`` is the time those
  rates would need for the step's matmuls over the step's time;
* on a known accelerator (:mod:`jaxbp.peaks`) the achieved FLOP/s is also a
  fraction of the datasheet peak for the arithmetic that ran (TF32 for
  float32 at default precision on NVIDIA, ...), and the step's arithmetic
  intensity is set against the device's balance point.

A fraction above 1 is never reported silently: the row carries a warning
that says which figure exceeds which and why it can.
"""

from __future__ import annotations

import dataclasses
import json
import math
import pathlib
import time
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxbp import layers
from jaxbp.bench.gpt import GptCase
from jaxbp.bench.harness import (
    ConvShape,
    MatmulShape,
    compile_ahead,
    conv_rate,
    describe_machine,
    gemm_rate,
    machine_info,
    paired_ratio,
    step_conv_shapes,
    step_matmul_flops,
    step_matmul_shapes,
    time_interleaved,
    xla_cost,
)
from jaxbp.bench.peaks import device_peaks, matmul_arithmetic
from jaxbp.mlp import MLP
from jaxbp.network import Network
from jaxbp.train.step import TrainState, make_train_loop, make_train_step

RECIPES = {"float32": {},
           "bf16-operands": {"compute_dtype": "bfloat16"},
           "bf16": {"compute_dtype": "bfloat16", "activation_dtype": "bfloat16"}}
"""The numerical recipes a case can run, as the layers' ``compute_dtype``/``activation_dtype``."""
PRECISIONS = tuple(RECIPES)
LOSSES = ("softmax_cross_entropy", "squared_error")


@dataclasses.dataclass(frozen=True)
class BenchCase:
    """One benchmark case; ``depth`` counts weight layers."""

    width: int
    depth: int
    batch: int
    loss: str = "softmax_cross_entropy"
    precision: str = "float32"
    n_out: int = 10

    @property
    def sizes(self) -> tuple[int, ...]:
        return (self.width,) * self.depth + (self.n_out,)

    def net(self) -> MLP:
        return MLP(self.sizes, "relu", "identity", self.loss, "float32",
                   **RECIPES[self.precision])

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.width,)

    def flops(self) -> dict[str, int]:
        """Matmul FLOPs of one step by kind (:func:`jaxbp.bench.harness.step_matmul_flops`)."""
        return step_matmul_flops(self.sizes, self.batch)

    def roof_shapes(self) -> tuple[MatmulShape, ...]:
        """The widest layer's three matmuls, whose measured rates are the roof."""
        width = max(self.sizes[:-1])
        return step_matmul_shapes(self.batch, width, width)

    @property
    def gflop(self) -> float:
        """Matmul GFLOP of one training step."""
        return self.flops()["total"] / 1e9

    def label(self, arithmetic: str | None = None) -> str:
        """``W512 D2 B32 CE float32``, with the arithmetic that ran: ``float32 (tf32)``."""
        loss = "CE" if self.loss == "softmax_cross_entropy" else "SE"
        ran = f" ({arithmetic})" if arithmetic else ""
        return f"W{self.width} D{self.depth} B{self.batch} {loss} {self.precision}{ran}"


@dataclasses.dataclass(frozen=True)
class ConvCase:
    """A conv case: ``depth`` Conv2D(filters, 3x3, SAME, relu) on (side, side, channels)
    images, a ``pool`` x ``pool`` MaxPool when ``pool`` > 1, Flatten, Dense(10); softmax
    cross-entropy.

    A conv layer's matmul work is an implicit GEMM of ``M = B H W`` rows, ``K = 9 c_in``
    and ``N = filters``, less the taps that fall on SAME padding's zeros (as XLA counts
    them): per spatial axis ``3 side - 2`` of the ``3 side`` (position, tap) pairs touch
    the image, so forward, input error and weight gradient are
    ``2 B (3 side - 2)^2 c_in filters`` FLOPs each (no input error for the first layer).
    """

    side: int
    channels: int
    filters: int
    depth: int
    batch: int
    pool: int = 1
    precision: str = "float32"
    loss: str = "softmax_cross_entropy"
    n_out: int = 10

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.side, self.side, self.channels)

    @property
    def _pooled(self) -> tuple[Any, ...]:
        return (layers.MaxPool(self.pool),) if self.pool > 1 else ()

    def net(self) -> Network:
        convs = tuple(layers.Conv2D(self.filters, (3, 3), activation="relu")
                      for _ in range(self.depth))
        return Network((*convs, *self._pooled, layers.Flatten(), layers.Dense(self.n_out)),
                       self.input_shape, self.loss, **RECIPES[self.precision])

    def flops(self) -> dict[str, int]:
        taps = self.batch * (3 * self.side - 2) ** 2  # (sample, position, tap) on the image
        per_layer = [2 * taps * c_in * self.filters
                     for c_in in (self.channels, *(self.filters,) * (self.depth - 1))]
        pooled_side = self.side // self.pool
        dense = 2 * self.batch * pooled_side ** 2 * self.filters * self.n_out  # the head
        forward = weight_grad = sum(per_layer) + dense
        input_error = sum(per_layer[1:]) + dense
        return {"forward": forward, "weight_grad": weight_grad, "input_error": input_error,
                "backward": weight_grad + input_error,
                "total": forward + weight_grad + input_error}

    def roof_shapes(self) -> tuple[ConvShape, ...]:
        """The widest conv's three convolutions (filters -> filters), timed alone: their
        rates are the roof (the implicit GEMM of the same shape is not what the conv
        library runs)."""
        return step_conv_shapes(self.batch, self.side, self.filters, self.filters)

    @property
    def gflop(self) -> float:
        return self.flops()["total"] / 1e9

    def label(self, arithmetic: str | None = None) -> str:
        """``CNN 16x16x8 F32 D2 B32 float32``."""
        ran = f" ({arithmetic})" if arithmetic else ""
        pool = f" P{self.pool}" if self.pool > 1 else ""
        return (f"CNN {self.side}x{self.side}x{self.channels} F{self.filters} D{self.depth}{pool} "
                f"B{self.batch} {self.precision}{ran}")


def _grid(widths: Iterable[int], depths: Iterable[int], batches: Iterable[int],
          recipes: Iterable[str] = PRECISIONS) -> list[BenchCase]:
    return [BenchCase(w, d, b, loss, precision)
            for precision in recipes for loss in LOSSES
            for w in widths for d in depths for b in batches]


def _quick(widths: tuple[int, int], batches: tuple[int, int], convs: list[ConvCase],
           gpts: list[GptCase], conv_recipes: tuple[str, ...] = PRECISIONS) -> list[Any]:
    """float32: both losses (squared error at depth 2); each bf16 recipe: cross-entropy;
    the CNNs first, in ``conv_recipes``, then the GPTs (float32), then the MLPs (so a time
    limit leaves out MLPs, not them)."""
    mlps = [c for c in _grid(widths, (2, 4), batches)
            if c.loss == "softmax_cross_entropy" or (c.precision == "float32" and c.depth == 2)]
    return [dataclasses.replace(c, precision=r) for r in conv_recipes for c in convs] \
        + gpts + mlps


QUICK = _quick((64, 512), (32, 512),
               [ConvCase(8, 1, 16, 2, 32), ConvCase(16, 8, 32, 2, 128, pool=2)],
               [GptCase(128, 2, 4, 64, 16), GptCase(192, 3, 6, 128, 4)], ("float32",))
"""The CPU ``--quick`` preset: 2 float32 CNNs, 2 small float32 GPTs (the shipped text's
65 characters) and 28 small MLP cases (three recipes). The CNNs run in float32 only:
XLA:CPU runs bf16 convolutions at a small fraction of its float32 rate (seconds per
step), which measures the CPU's conv library, not the step."""

QUICK_ACCELERATOR = _quick((1024, 4096), (512, 8192),
                           [ConvCase(32, 64, 128, 2, 256, pool=2),
                            ConvCase(16, 16, 64, 2, 512, pool=2)],
                           [GptCase(768, 12, 12, 1024, 8, vocab=50257)])
"""The ``--quick`` preset on a GPU/TPU: 6 CNNs (two shapes with a max pool, in three
recipes), a GPT-2-small-shaped step (d 768, 12 blocks, 12 heads, T 1024, vocab 50257,
batch 8; float32) and 28 MLP cases of 3 to 3300 matmul GFLOP per step, so that no case
is launch-bound (the CPU preset's smallest would be microseconds there)."""

FULL = _grid((64, 256, 1024, 4096), (2, 4, 8), (32, 256, 4096))
"""Widths 64..4096, depths 2..8, batch 32..4096, both losses and precisions (144 cases);
``max_gflop`` and ``time_limit_s`` leave out what a machine cannot run in reasonable time."""


def quick_cases(platform: str) -> list[BenchCase]:
    """The quick preset for a platform: :data:`QUICK` on a CPU, else :data:`QUICK_ACCELERATOR`."""
    return QUICK if platform == "cpu" else QUICK_ACCELERATOR


def _data(case: BenchCase | ConvCase | GptCase) -> tuple[jax.Array, jax.Array]:
    rng = np.random.default_rng(0)
    if isinstance(case, GptCase):                      # tokens and next tokens
        tokens = rng.integers(0, case.vocab, size=(case.batch, case.seq_len + 1))
        return (jnp.asarray(tokens[:, :-1], jnp.int32), jnp.asarray(tokens[:, 1:], jnp.int32))
    x = jnp.asarray(rng.normal(size=(case.batch, *case.input_shape)), jnp.float32)
    if case.loss == "softmax_cross_entropy":
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


def _fraction(value: float | None, roof: float | None) -> float | None:
    return None if value is None or not roof else value / roof


def benchmark_case(case: BenchCase | ConvCase, budget_s: float = 1.0, precision: str | None = None,
                   steps: int | None = None, min_sample_s: float = 5e-3,
                   max_steps: int = 1000) -> dict[str, Any]:
    """Time, count and place one case (see the module docstring). Returns a JSON-able row.

    Args:
      case: the case.
      budget_s: seconds of interleaved timing (the GEMM rates get as much again).
      precision: matmul precision (:data:`jaxbp.matmul_precision.MATMUL_PRECISIONS`), None for
        JAX's current setting.
      steps: steps per loop call; None chooses k so that one call is at least
        ``min_sample_s`` of work (at most ``max_steps``).
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
        loop = make_train_loop(net, optimizer, steps=steps, grad=grad, precision=precision)
        states[grad] = TrainState.create(jax.tree.map(jnp.copy, params), optimizer)
        compiled[grad], compile_s[grad], _ = compile_ahead(loop, states[grad], x, y)

    def call(grad: str):
        def run():
            states[grad], metrics = compiled[grad](states[grad], x, y)
            return metrics
        return run

    timings = time_interleaved({g: call(g) for g in grads}, budget_s=budget_s,
                               compile_s=compile_s, min_sample_s=min_sample_s)
    flops = case.flops()
    recipe = RECIPES[case.precision]
    compute = recipe.get("compute_dtype")
    # each product as the recipe runs it: bf16 outputs in the bf16 recipe, except a dense
    # weight gradient (accumulated into float32; a conv's rounds to bf16, as in Conv2D)
    rates = {}
    for shape in case.roof_shapes():
        conv = isinstance(shape, ConvShape)
        rate = conv_rate if conv else gemm_rate
        out = None if shape.name == "weight_grad" and not conv else recipe.get("activation_dtype")
        rates[shape.name] = rate(shape, "float32", compute, budget_s=budget_s / 3,
                                 precision=precision, out_dtype=out)
    # time the measured rates need for the step's matmuls: each kind at its own shape's rate
    matmul_s = (flops["forward"] / rates["forward"]
                + flops["weight_grad"] / rates["weight_grad"]
                + flops["input_error"] / rates["input_error"])
    device = jax.devices()[0]
    arithmetic = matmul_arithmetic(device.platform, compute or "float32", precision)
    peaks = device_peaks(device.device_kind)
    peak = None if peaks is None else peaks.peak(arithmetic)
    balance = None if peaks is None else peaks.balance_point(arithmetic)
    row: dict[str, Any] = {**dataclasses.asdict(case), "label": case.label(arithmetic),
                           "arithmetic": arithmetic, "steps_per_call": steps,
                           "matmul_flops_per_step": flops["total"],
                           "gemm_flops_per_s": rates, "peak_flops_per_s": peak,
                           "balance_point": balance, "warnings": []}
    for grad, timing in timings.items():
        per_step = timing.median / steps
        achieved = flops["total"] / per_step
        xla = cost[grad]
        intensity = None if xla is None else xla["flops"] / xla["bytes"]
        row[grad] = {
            "step_s": per_step,
            "step_iqr_s": [timing.p25 / steps, timing.p75 / steps],
            "steps_per_sample": steps * timing.reps,
            "compile_s": compile_s[grad],
            "xla_flops_per_step": None if xla is None else xla["flops"],
            "xla_bytes_per_step": None if xla is None else xla["bytes"],
            "arithmetic_intensity": intensity,
            "achieved_flops_per_s": achieved,
            "roofline_fraction": matmul_s / per_step,
            "peak_fraction": _fraction(achieved, peak),
            "memory_bytes": memory[grad],
        }
        if isinstance(case, GptCase):
            row[grad]["tokens_per_s"] = case.tokens / per_step
        row["warnings"] += _warnings(grad, row[grad])
    row["manual_over_autodiff"] = paired_ratio(timings["backprop"], timings["autodiff"])
    return row


def _warnings(grad: str, result: dict[str, Any]) -> list[str]:
    """Why a fraction above 1 can appear, for each one that did."""
    notes = []
    if result["roofline_fraction"] > 1:
        notes.append(f"{grad}: roofline fraction {result['roofline_fraction']:.2f} > 1: the "
                     f"step ran its matmuls faster than the best GEMM loop measured them "
                     f"alone (a noisy round of the loops, or the step's smaller layers "
                     f"counted at the widest layer's rate); read it as ~1")
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
    start = time.perf_counter()
    for case in cases:
        if max_gflop is not None and case.gflop > max_gflop:
            left_out.append(f"{case.label()} (over {max_gflop:g} GFLOP)")
            continue
        if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
            left_out.append(f"{case.label()} (time limit {time_limit_s:g} s)")
            continue
        row = benchmark_case(case, budget_s=budget_s, precision=precision, steps=steps,
                             min_sample_s=min_sample_s)
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
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{name}.md").write_text(markdown(result))
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


def _fmt(value: float | None, spec: str, scale: float = 1.0) -> str:
    return "n/a" if value is None else format(value / scale, spec)


def markdown(result: dict[str, Any]) -> str:
    """The results as a markdown table, with the machine and the method."""
    peaks = result["machine"].get("peaks")
    peak_note = (f"`peak`: achieved / the datasheet peak of {peaks['name']} for the arithmetic "
                 f"that ran ({peaks['source']}); `AI`: the step's arithmetic intensity, XLA "
                 f"FLOPs / XLA bytes, and in brackets over the device's balance point (peak / "
                 f"memory bandwidth): below 1 the step is memory-bound." if peaks else
                 "`peak`: n/a, this device kind has no datasheet entry in jaxbp.peaks; the "
                 "measured GEMM rates are the roof. `AI`: the step's arithmetic intensity, "
                 "XLA FLOPs / XLA bytes (no balance point without a datasheet: n/a).")
    lines = [
        "# Training-step benchmark: hand-written backprop vs jax.grad",
        "",
        f"Machine: {describe_machine(result['machine'])}.",
        "",
        "One sgd training step, relu MLP (W, ..., W, 10) with `D` weight layers (CNN: "
        "`D` 3x3 SAME relu convs of `F` filters, Dense(10); GPT: `jaxbp.models.gpt` of "
        "width d, L blocks, H heads on T tokens, its FLOPs the model FLOPs 6N + 12LTd per "
        "token, so that `peak` is its MFU), in a numerical recipe named "
        "in the label: `float32`; `bf16-operands` (bf16 matmul operands, float32 "
        "activations, errors and master weights); `bf16` (activations and errors stored "
        "in bf16 too, weight gradients accumulated in float32: flax's "
        "`Dense(dtype=bfloat16)`). autodiff is jax.grad of the SAME recipe's forward. "
        "The label ends with the arithmetic the matmuls ran in (float32 is `tf32` on "
        "NVIDIA GPUs and one bf16 pass on TPUs at the default matmul precision). The "
        "timed program is the donated k-step `lax.scan` loop a user runs; `steps/sample`: "
        "train steps in one timed sample (k per call x calls per sample), chosen so that "
        "device time dominates every sample. `manual/autodiff`: the median over rounds of "
        "the ratio of the back-to-back step times with `grad=\"backprop\"` and `grad=\"autodiff\"` "
        "(< 1: the hand-written step is faster). `GEMM fwd/err/wgrad`: the machine's "
        "measured rate for the widest layer's three matmul shapes (forward B x W x W, input "
        "error, weight gradient with the batch inner; for a CNN the widest conv's three "
        "convolutions, timed alone) in the same recipe, the best of "
        "three loops (a chain of products, the chain unrolled, independent products "
        "unrolled) so that no loop overhead lowers it; `roofline`: "
        "the time those rates need for the step's matmuls / the step's time. "
        + peak_note + " `FLOPs XLA/hand`: XLA's cost-analysis FLOPs over the hand count of "
        "matmul FLOPs (the excess is elementwise work). `mem`: compiled peak of the "
        "donated single step (arguments + outputs - donated aliases + temporaries). n/a: "
        "the backend gave no figure.",
        "",
        "| case | steps/sample | manual ms | autodiff ms | manual/autodiff | GEMM fwd/err/wgrad "
        "GFLOP/s | achieved GFLOP/s | roofline | peak | FLOPs XLA/hand | AI (AI/balance) | "
        "mem MiB | compile s (manual/autodiff) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    warnings = []
    for row in result["rows"]:
        m, a = row["backprop"], row["autodiff"]
        rates = "/".join(f"{row['gemm_flops_per_s'][k] / 1e9:.0f}"
                         for k in ("forward", "input_error", "weight_grad"))
        xla = (None if m["xla_flops_per_step"] is None
               else m["xla_flops_per_step"] / row["matmul_flops_per_step"])
        intensity = m["arithmetic_intensity"]
        balance = (None if intensity is None or not row["balance_point"]
                   else intensity / row["balance_point"])
        mem = None if m["memory_bytes"] is None else m["memory_bytes"]["peak"]
        flag = " (!)" if row["warnings"] else ""
        lines.append(
            f"| {row['label']} | {m['steps_per_sample']} | {m['step_s'] * 1e3:.3f} | "
            f"{a['step_s'] * 1e3:.3f} | {row['manual_over_autodiff']:.3f} | {rates} | "
            f"{m['achieved_flops_per_s'] / 1e9:.1f} | {m['roofline_fraction']:.2f}{flag} | "
            f"{_fmt(m['peak_fraction'], '.2f')} | {_fmt(xla, '.3f')} | "
            f"{_fmt(intensity, '.1f')} ({_fmt(balance, '.2f')}) | "
            f"{_fmt(mem, '.1f', 2**20)} | {m['compile_s']:.2f}/{a['compile_s']:.2f} |")
        warnings += [f"{row['label']}: {w}" for w in row["warnings"]]
    if warnings:
        lines += ["", "Warnings (fractions above 1, and why they can occur):", ""]
        lines += [f"- {w}" for w in warnings]
    if result["left_out"]:
        lines += ["", "Left out: " + ", ".join(result["left_out"]) + "."]
    gpts = [r for r in result["rows"] if "tokens_per_s" in r["backprop"]]
    if gpts:
        lines += ["", "GPT rows, tokens/s (manual, autodiff) and MFU (manual): " + "; ".join(
            f"{r['label']}: {r['backprop']['tokens_per_s']:,.0f}, "
            f"{r['autodiff']['tokens_per_s']:,.0f}, "
            f"MFU {_fmt(r['backprop']['peak_fraction'], '.3f')}" for r in gpts) + "."]
    if result["rows"]:
        ratios = [r["manual_over_autodiff"] for r in result["rows"]]
        lines += ["", f"manual/autodiff: median {np.median(ratios):.3f}, worst "
                      f"{max(ratios):.3f}, best {min(ratios):.3f} over {len(ratios)} cases."]
        for recipe in PRECISIONS:
            mine = [r["manual_over_autodiff"] for r in result["rows"]
                    if r["precision"] == recipe]
            if mine:
                lines.append(f"- {recipe}: median {np.median(mine):.3f}, worst "
                             f"{max(mine):.3f} over {len(mine)} cases (autodiff: jax.grad "
                             f"of the same recipe).")
    return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: pathlib.Path) -> bool:
    """manual/autodiff and roofline fraction against the step's matmul FLOPs (PNG).

    Returns False (nothing written) without matplotlib or without rows.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = result["rows"]
    if not rows:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    groups = [(p, lambda r, p=p: r["precision"] == p and "side" not in r) for p in PRECISIONS]
    groups.append(("CNN (every recipe)", lambda r: "side" in r))
    for (precision, keep), marker in zip(groups, ("o", "s", "^", "D")):
        chosen = [r for r in rows if keep(r)]
        flops = [r["matmul_flops_per_step"] for r in chosen]
        axes[0].scatter(flops, [r["manual_over_autodiff"] for r in chosen], marker=marker,
                        label=precision)
        axes[1].scatter(flops, [r["backprop"]["roofline_fraction"] for r in chosen],
                        marker=marker, label=precision)
    axes[0].axhline(1.0, color="gray", lw=1)
    axes[0].set(xscale="log", xlabel="matmul FLOPs per step", ylabel="manual / autodiff time",
                title="hand-written step vs jax.grad step")
    axes[1].set(xscale="log", xlabel="matmul FLOPs per step",
                ylabel="achieved / measured GEMM FLOP/s", title="roofline fraction (manual)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(describe_machine(result["machine"]), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
