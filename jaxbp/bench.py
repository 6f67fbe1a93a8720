"""The benchmark harness: compile apart, time interleaved, report the machine.

Timings on a shared machine are noisy, so every comparison here is made side by
side in one process: the candidates are compiled first (compile time reported
apart), warmed up, then called in turn, round after round, until a time
budget is spent; each gets its median and interquartile range. Ratios of
medians from one interleaved run are what the benchmarks report, never an
absolute time from one run against one from another.
"""

from __future__ import annotations

import dataclasses
import datetime
import itertools
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock seconds per call of one candidate.

    Attributes:
      median, p25, p75: quantiles over the timed calls.
      runs: how many calls were timed (over all rounds).
      compile_s: seconds spent lowering and compiling (not in the quantiles).
      rounds: the per-round seconds per call, in round order (for paired ratios).
    """

    median: float
    p25: float
    p75: float
    runs: int
    compile_s: float
    rounds: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes of a compiled program, from XLA's ``memory_analysis()``.

    ``temp`` is the scratch XLA allocates while running: the measure of what a
    computation materialises beyond its inputs and outputs.
    """

    argument: int
    output: int
    temp: int

    @property
    def peak(self) -> int:
        """argument + output + temp: the most the program can hold at once."""
        return self.argument + self.output + self.temp


def compile_ahead(fn: Callable[..., Any], *args: Any) -> tuple[Any, float, Memory]:
    """``jax.jit(fn)`` lowered and compiled for ``args``; with its compile time and memory."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    seconds = time.perf_counter() - start
    analysis = compiled.memory_analysis()
    memory = Memory(int(analysis.argument_size_in_bytes), int(analysis.output_size_in_bytes),
                    int(analysis.temp_size_in_bytes))
    return compiled, seconds, memory


def time_interleaved(
    calls: dict[str, Callable[[], Any]],
    budget_s: float = 2.0,
    min_rounds: int = 5,
    max_rounds: int = 10_000,
    warmup: int = 2,
    compile_s: dict[str, float] | None = None,
) -> dict[str, Timing]:
    """Time zero-argument callables in turn, round by round, within one budget.

    Each call's outputs are waited for (``jax.block_until_ready``). After
    ``warmup`` untimed calls, each round gives every candidate about the same
    wall time: a fast candidate is called ``reps`` times in a row (``reps``
    from the warm-up timings) and its round sample is the mean per call.
    Rounds repeat until ``budget_s`` has passed and ``min_rounds`` are done.

    Returns:
      A :class:`Timing` per name (quantiles over the round samples).
    """
    first: dict[str, float] = {}
    for name, call in calls.items():
        for _ in range(warmup):
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            first[name] = time.perf_counter() - t0
    slowest = max(first.values(), default=0.0)
    reps = {name: max(1, min(1000, int(slowest / max(t, 1e-7)))) for name, t in first.items()}
    samples: dict[str, list[float]] = {name: [] for name in calls}
    start = time.perf_counter()
    for rounds in range(1, max_rounds + 1):
        for name, call in calls.items():
            t0 = time.perf_counter()
            for _ in range(reps[name]):
                out = call()
            jax.block_until_ready(out)
            samples[name].append((time.perf_counter() - t0) / reps[name])
        if rounds >= min_rounds and time.perf_counter() - start >= budget_s:
            break
    compile_s = compile_s or {}
    return {name: Timing(float(np.median(s)), float(np.percentile(s, 25)),
                         float(np.percentile(s, 75)), len(s) * reps[name],
                         compile_s.get(name, float("nan")), tuple(s))
            for name, s in samples.items()}


def paired_ratio(a: Timing, b: Timing) -> float:
    """Median over rounds of ``a``'s time / ``b``'s time in the same round.

    Both ran back to back in each round, so a slow spell of a shared machine
    (other tenants, CPU steal) scales both and cancels in the ratio, where a
    ratio of the two medians could take one candidate's slow rounds and the
    other's fast ones.
    """
    return float(np.median(np.asarray(a.rounds) / np.asarray(b.rounds)))


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as file:
            for line in file:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on: device, CPU, cores, versions, date."""
    device = jax.devices()[0]
    return {
        "device_platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "python": platform.python_version(),
        "jax": jax.__version__,
        "jaxlib": getattr(jax.lib, "__version__", None) or jax.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }


def describe_machine(info: dict[str, Any] | None = None) -> str:
    """One line naming the machine of :func:`machine_info`."""
    info = info or machine_info()
    return (f"{info['device_platform']} ({info['device_kind']}, {info['device_count']} "
            f"device(s)); CPU {info['cpu']}, {info['cpu_cores']} cores; jax {info['jax']}; "
            f"{info['date']}")


def step_matmul_flops(sizes: tuple[int, ...], batch: int) -> dict[str, int]:
    """FLOPs of the matrix multiplies of one training step, counted by hand.

    With ``P = sum_l fan_in_l * fan_out_l`` weights and batch B:
    forward ``z = a W``: 2BP; weight gradients ``a^T delta``: 2BP; errors
    passed back ``delta W^T``: ``2B(P - n_in n_1)`` (layer 1's error is not
    passed on to the input). Elementwise work (activations, g', the loss, the
    optimizer) is O(B * widths + P) and is left out here; XLA's count
    includes it.
    """
    weights = sum(i * o for i, o in itertools.pairwise(sizes))
    forward = 2 * batch * weights
    backward = 2 * batch * weights + 2 * batch * (weights - sizes[0] * sizes[1])
    return {"forward": forward, "backward": backward, "total": forward + backward}


def xla_cost(compiled: Any) -> dict[str, float]:
    """``flops`` and ``bytes accessed`` of a compiled program (XLA's estimate)."""
    analysis = compiled.cost_analysis()
    if isinstance(analysis, list):  # older jax returns one dict per device program
        analysis = analysis[0]
    return {"flops": float(analysis.get("flops", float("nan"))),
            "bytes": float(analysis.get("bytes accessed", float("nan")))}


def gemm_rate(m: int, k: int, n: int, dtype: str = "float32", compute_dtype: str | None = None,
              budget_s: float = 0.5, inner: int | None = None) -> float:
    """The machine's measured FLOP/s for ``(m, k) @ (k, n)`` in this precision.

    ``inner`` matmuls run inside one compiled ``fori_loop`` (each input scaled
    by the previous result's first entry, so XLA can neither hoist nor drop
    them), timed by :func:`time_interleaved`; ``compute_dtype`` rounds the
    operands and accumulates in ``dtype`` as :func:`jaxbp.mlp.matmul` does.
    By default ``inner`` gives each call about 2e8 FLOPs (8 to 4096 matmuls).
    For tiny shapes the loop's own overhead per matmul still counts, so the
    rate is a lower bound there (a step can then reach more than 1.0 of it).
    """
    if inner is None:
        inner = int(min(4096, max(8, 2e8 // (2 * m * k * n))))
    low = jax.numpy.dtype(compute_dtype or dtype)
    out_dtype = jax.numpy.dtype(dtype)

    def loop(a, b):
        def body(_, carry):
            scale, _ = carry
            c = jax.numpy.matmul((a * scale).astype(low), b.astype(low),
                                 preferred_element_type=out_dtype)
            return 1 + c[0, 0] * 1e-30, c
        return jax.lax.fori_loop(0, inner, body, (jax.numpy.ones((), a.dtype),
                                                  jax.numpy.zeros((m, n), out_dtype)))[1]

    a = jax.numpy.ones((m, k), out_dtype)
    b = jax.numpy.ones((k, n), out_dtype)
    compiled, _, _ = compile_ahead(loop, a, b)
    timing = time_interleaved({"gemm": lambda: compiled(a, b)}, budget_s=budget_s)["gemm"]
    return 2.0 * m * k * n * inner / timing.median
