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
import math
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import jax
import numpy as np

from jaxbp.bench.peaks import device_peaks
from jaxbp.matmul_precision import current_precision


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock seconds per call of one candidate.

    Attributes:
      median, p25, p75: quantiles over the timed samples (seconds per call).
      runs: how many calls were timed (over all rounds).
      compile_s: seconds spent lowering and compiling (not in the quantiles).
      rounds: the per-round seconds per call, in round order (for paired ratios).
      reps: calls per round sample as calibrated (enough for ``min_sample_s`` of work;
        a sample repeats them until that much time has passed).
      sample_s: each round sample's wall-clock seconds, at least ``min_sample_s``.
    """

    median: float
    p25: float
    p75: float
    runs: int
    compile_s: float
    rounds: tuple[float, ...] = ()
    reps: int = 1
    sample_s: tuple[float, ...] = ()


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes of a compiled program, from XLA's ``memory_analysis()``.

    ``temp`` is the scratch XLA allocates while running: the measure of what a
    computation materialises beyond its inputs and outputs. ``alias`` is the
    part of the outputs that reuses donated input buffers (a donated train
    state is updated in place and so is not held twice).
    """

    argument: int
    output: int
    temp: int
    alias: int = 0

    @property
    def peak(self) -> int:
        """argument + output - alias + temp: the most the program can hold at once."""
        return self.argument + self.output - self.alias + self.temp


def memory_of(compiled: Any) -> Memory | None:
    """The compiled program's :class:`Memory`, or None where XLA does not say.

    ``memory_analysis()`` has raised, returned None or returned zeros/-1 on
    some GPU/TPU versions of JAX; then there is no figure rather than a wrong one.
    """
    try:
        analysis = compiled.memory_analysis()
        values = [int(getattr(analysis, f"{name}_size_in_bytes"))
                  for name in ("argument", "output", "temp", "alias")]
    except Exception:  # any backend's failure means "not available"
        return None
    if any(v < 0 for v in values) or values[0] + values[1] <= 0:
        return None
    return Memory(*values)


def compile_ahead(fn: Callable[..., Any], *args: Any) -> tuple[Any, float, Memory | None]:
    """``fn`` lowered and compiled for ``args``; with its compile time and memory.

    A function that is already jitted (``make_train_step``'s, with its
    donation) is lowered as it is; anything else is wrapped in ``jax.jit``
    first. Wrapping a jitted, donating function in another ``jit`` would
    drop its donation: benchmark the function a user calls.
    """
    start = time.perf_counter()
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    compiled = jitted.lower(*args).compile()
    seconds = time.perf_counter() - start
    return compiled, seconds, memory_of(compiled)


def time_interleaved(
    calls: dict[str, Callable[[], Any]],
    budget_s: float = 2.0,
    min_rounds: int = 5,
    max_rounds: int = 10_000,
    warmup: int = 2,
    compile_s: dict[str, float] | None = None,
    min_sample_s: float = 1e-3,
) -> dict[str, Timing]:
    """Time zero-argument callables in turn, round by round, within one budget.

    Each call's outputs are waited for (``jax.block_until_ready``). After
    ``warmup`` untimed calls, each round gives every candidate about the same
    wall time, and at least ``min_sample_s``: a fast candidate is called
    ``reps`` times in a row (from the warm-up timings) and its round sample is
    the mean per call, so that one dispatch and one host sync are a small
    part of a sample even where a call is microseconds of device work.
    Rounds repeat until ``budget_s`` has passed and ``min_rounds`` are done.

    Returns:
      A :class:`Timing` per name (quantiles over the round samples).
    """
    first: dict[str, float] = {}
    for name, call in calls.items():
        for _ in range(warmup):
            t0 = time.perf_counter()
            jax.block_until_ready(call())
            elapsed = time.perf_counter() - t0
            first[name] = min(first.get(name, elapsed), elapsed)
    target = max(max(first.values(), default=0.0), min_sample_s)
    reps = {name: _calibrated_reps(call, target, first[name]) for name, call in calls.items()}
    samples: dict[str, list[float]] = {name: [] for name in calls}
    walls: dict[str, list[float]] = {name: [] for name in calls}
    counts = dict.fromkeys(calls, 0)
    start = time.perf_counter()
    for rounds in range(1, max_rounds + 1):
        for name, call in calls.items():
            seconds, n = _sample(call, reps[name], min_sample_s)
            samples[name].append(seconds / n)
            walls[name].append(seconds)
            counts[name] += n
        if rounds >= min_rounds and time.perf_counter() - start >= budget_s:
            break
    compile_s = compile_s or {}
    return {name: Timing(float(np.median(s)), float(np.percentile(s, 25)),
                         float(np.percentile(s, 75)), counts[name],
                         compile_s.get(name, float("nan")), tuple(s), reps[name],
                         tuple(walls[name]))
            for name, s in samples.items()}


def _sample(call: Callable[[], Any], reps: int, min_sample_s: float) -> tuple[float, int]:
    """One timed sample: ``reps`` calls in a row, repeated until ``min_sample_s`` has
    passed (a call that got faster since the calibration still gives a long sample);
    ``(seconds, calls)``."""
    calls, t0 = 0, time.perf_counter()
    while True:
        for _ in range(reps):
            out = call()
        calls += reps
        jax.block_until_ready(out)
        elapsed = time.perf_counter() - t0
        if elapsed >= min_sample_s:
            return elapsed, calls


def _calibrated_reps(call: Callable[[], Any], target: float, guess_s: float) -> int:
    """Calls in a row that take at least ``target`` seconds, found by timing (untimed for
    the results): the warm-up time of one call overstates a fast call's cost."""
    reps = max(1, min(100_000, math.ceil(target / max(guess_s, 1e-7))))
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(reps):
            out = call()
        jax.block_until_ready(out)
        elapsed = time.perf_counter() - t0
        if elapsed >= target or reps >= 100_000:
            break
        reps = min(100_000, math.ceil(reps * 1.2 * target / max(elapsed, 1e-9)))
    return reps


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


def machine_info(precision: str | None = None) -> dict[str, Any]:
    """What the numbers were measured on: device, its datasheet peaks, CPU, versions, date,
    the matmul precision in force and ``XLA_FLAGS``."""
    device = jax.devices()[0]
    peaks = device_peaks(device.device_kind)
    return {
        "device_platform": device.platform,
        "device_kind": device.device_kind,
        "device_count": jax.device_count(),
        "peaks": None if peaks is None else dataclasses.asdict(peaks),
        "matmul_precision": current_precision(precision),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
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
    flags = f"; XLA_FLAGS={info['xla_flags']!r}" if info.get("xla_flags") else ""
    return (f"{info['device_platform']} ({info['device_kind']}, {info['device_count']} "
            f"device(s)); CPU {info['cpu']}, {info['cpu_cores']} cores; jax {info['jax']}; "
            f"matmul precision {info.get('matmul_precision', 'default')}{flags}; {info['date']}")


def xla_cost(compiled: Any) -> dict[str, float] | None:
    """``flops`` and ``bytes`` accessed of a compiled program (XLA's estimate), or None.

    ``cost_analysis()`` has raised, returned None, an empty list or -1 on some
    GPU/TPU versions of JAX; then there is no figure ("not available")
    rather than a wrong one.
    """
    try:
        analysis = compiled.cost_analysis()
        if isinstance(analysis, list):  # older jax returns one dict per device program
            analysis = analysis[0]
        flops = float(analysis["flops"])
        accessed = float(analysis["bytes accessed"])
    except Exception:  # any backend's failure means "not available"
        return None
    if not (flops > 0 and accessed > 0):
        return None
    return {"flops": flops, "bytes": accessed}
