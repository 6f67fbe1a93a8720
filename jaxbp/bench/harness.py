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
import functools
import itertools
import math
import os
import platform
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxbp.bench.peaks import device_peaks
from jaxbp.matmul_precision import current_precision, precision_scope


@dataclasses.dataclass(frozen=True)
class Timing:
    """Wall-clock seconds per call of one candidate.

    Attributes:
      median, p25, p75: quantiles over the timed samples (seconds per call).
      runs: how many calls were timed (over all rounds).
      compile_s: seconds spent lowering and compiling (not in the quantiles).
      rounds: the per-round seconds per call, in round order (for paired ratios).
      reps: calls per round sample (enough for ``min_sample_s`` of work).
    """

    median: float
    p25: float
    p75: float
    runs: int
    compile_s: float
    rounds: tuple[float, ...] = ()
    reps: int = 1


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
                         compile_s.get(name, float("nan")), tuple(s), reps[name])
            for name, s in samples.items()}


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


def step_matmul_flops(sizes: tuple[int, ...], batch: int) -> dict[str, int]:
    """FLOPs of the matrix multiplies of one training step, counted by hand.

    With ``P = sum_l fan_in_l * fan_out_l`` weights and batch B:
    forward ``z = a W``: 2BP; weight gradients ``a^T delta``: 2BP; errors
    passed back ``delta W^T``: ``2B(P - n_in n_1)`` (layer 1's error is not
    passed on to the input). Elementwise work (activations, g', the loss, the
    optimizer) is O(B * widths + P) and is left out here; XLA's count
    includes it.

    Returns:
      ``forward``, ``weight_grad``, ``input_error``, ``backward`` (the last
      two summed) and ``total``.
    """
    weights = sum(i * o for i, o in itertools.pairwise(sizes))
    forward = weight_grad = 2 * batch * weights
    input_error = 2 * batch * (weights - sizes[0] * sizes[1])
    return {"forward": forward, "weight_grad": weight_grad, "input_error": input_error,
            "backward": weight_grad + input_error, "total": forward + weight_grad + input_error}


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


class MatmulShape(NamedTuple):
    """One matmul ``(m, k) @ (k, n)`` of a step, as :func:`jaxbp.layers.precision.dot` lays it out.

    ``transpose_a``/``transpose_b``: the operand is stored transposed and its
    other axis is contracted (no transpose op): the input error
    ``delta W^T`` contracts W's fan_out, the weight gradient ``a^T delta``
    contracts the batch.
    """

    name: str
    m: int
    k: int
    n: int
    transpose_a: bool = False
    transpose_b: bool = False

    @property
    def flops(self) -> int:
        return 2 * self.m * self.k * self.n


def step_matmul_shapes(batch: int, fan_in: int, fan_out: int) -> tuple[MatmulShape, ...]:
    """The three matmuls a dense layer costs a training step (batch B, W: (fan_in, fan_out)).

    forward ``z = a W``: (B, fan_in) @ (fan_in, fan_out); input error
    ``delta W^T``: (B, fan_out) @ (fan_out, fan_in); weight gradient
    ``a^T delta``: (fan_in, B) @ (B, fan_out), the batch as inner dimension.
    """
    return (MatmulShape("forward", batch, fan_in, fan_out),
            MatmulShape("input_error", batch, fan_out, fan_in, transpose_b=True),
            MatmulShape("weight_grad", fan_in, batch, fan_out, transpose_a=True))


GEMM_LOOPS = ((1, 1), (8, 1), (8, 4))
"""The loops :func:`gemm_rate` takes the best of, as (unroll, independent products):
a chain of products, the chain unrolled 8-fold, and 4 independent products per step
unrolled 8-fold (32 products per loop iteration)."""

LONG_PRODUCT_S = 5e-3
"""A chain iteration (one product) at least this long is timed alone: a loop's overhead
(microseconds; tens on a GPU's host round trip) is then a percent or less of it."""

_ITERATION_HOOK: Any = None
"""Tests only: a host function called once per loop iteration (a fake loop overhead)."""


def _product_loop(product: Callable[[Any, Any], Any], out: Any, unroll: int, independent: int,
                  precision: str | None) -> Any:
    """``loop(a, bs, iterations)``: ``iterations`` loop steps of ``unroll`` rounds, each
    round ``independent`` products ``product(a, b_i)`` (``out``: their ShapeDtypeStruct).
    One entry of ``a`` is rewritten from the previous round's products (an in-place update:
    no pass over ``a``), so XLA can neither hoist nor drop a product and the loop adds no
    elementwise work."""

    def one_round(a, bs):
        outs = tuple(product(a, b) for b in bs)
        link = sum(o[(0,) * o.ndim].astype(a.dtype) for o in outs) * 1e-30
        return a.at[(0,) * a.ndim].add(link), outs

    def loop(a, bs, iterations):
        def body(_, carry):
            a, outs = carry
            if _ITERATION_HOOK is not None:
                jax.debug.callback(_ITERATION_HOOK, a[(0,) * a.ndim])
            for _ in range(unroll):
                a, outs = one_round(a, bs)
            return a, outs

        zeros = tuple(jnp.zeros(out.shape, out.dtype) for _ in bs)
        with precision_scope(precision):
            return jax.lax.fori_loop(0, iterations, body, (a, zeros))[1]

    return loop


def _iteration_s(compiled: Any, a: jax.Array, bs: tuple[jax.Array, ...]) -> float:
    """Seconds one more loop iteration costs: a call of 3 iterations less a call of 1
    (the best of two each, after a warm call), so the fixed cost of a call (dispatch and
    the host sync: milliseconds on a loaded machine) is not taken for product time."""
    def best_of_two(iterations: int) -> float:
        times = []
        for _ in range(2):
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(a, bs, jnp.int32(iterations)))
            times.append(time.perf_counter() - t0)
        return min(times)

    jax.block_until_ready(compiled(a, bs, jnp.int32(1)))  # warm
    one = best_of_two(1)
    return max((best_of_two(3) - one) / 2, one / 100, 1e-9)


def _best_loop_rate(product: Callable[[Any, Any], Any], a: jax.Array, b: jax.Array,
                    flops: int, budget_s: float, precision: str | None,
                    min_sample_s: float) -> float:
    """FLOP/s of ``product(a, b)`` (``flops`` each): the fastest sample of the fastest of
    :data:`GEMM_LOOPS` (see :func:`gemm_rate`)."""
    with precision_scope(precision):
        out = jax.eval_shape(product, a, b)
    calls, per_call = {}, {}
    for unroll, independent in GEMM_LOOPS:
        loop = _product_loop(product, out, unroll, independent, precision)
        bs = tuple(b + i for i in range(independent))
        compiled, _, _ = compile_ahead(loop, a, bs, jnp.int32(1))
        per_iteration = _iteration_s(compiled, a, bs)
        iterations = int(min(1 << 20, max(1, math.ceil(min_sample_s / per_iteration))))
        name = f"unroll {unroll} x {independent}"
        calls[name] = functools.partial(compiled, a, bs, jnp.int32(iterations))
        per_call[name] = unroll * independent * iterations
        if per_iteration >= LONG_PRODUCT_S:
            break  # loop overheads are microseconds: under 1% of an iteration this long
    timings = time_interleaved(calls, budget_s=budget_s, min_sample_s=min_sample_s)
    # the roof is the best the machine did: the fastest sample of the fastest loop
    return max(flops * per_call[name] / min(t.rounds) for name, t in timings.items())


def gemm_rate(shape: MatmulShape, dtype: str = "float32", compute_dtype: str | None = None,
              budget_s: float = 0.5, precision: str | None = None,
              min_sample_s: float = 2e-3, out_dtype: str | None = None) -> float:
    """The machine's measured FLOP/s for one matmul shape, in this recipe: the best of
    :data:`GEMM_LOOPS`.

    Each loop runs its products inside one compiled ``fori_loop``; the iteration
    count is a run-time argument, set after a probe (the marginal cost of an iteration)
    so that one call is at least ``min_sample_s`` of device work, and the timed samples
    of :func:`time_interleaved` hold several such calls. A loop's per-iteration cost
    (the trip count's check, on a GPU a host round trip) is spread over up to 32
    products, so it cannot lower the rate of small shapes (a chain product of
    :data:`LONG_PRODUCT_S` or more is timed alone: no 32-product calls for large
    shapes); the rate is that of the fastest sample of the fastest loop (a roof is the
    best the machine does: a slow spell of a shared machine must not lower it).

    Args:
      shape: the matmul (:func:`step_matmul_shapes`).
      dtype: the dtype of the operands as stored.
      compute_dtype: round the operands to this (mixed precision).
      precision: the matmul precision (:data:`jaxbp.matmul_precision.MATMUL_PRECISIONS`),
        None for JAX's current setting.
      out_dtype: the product's dtype (the bf16 recipe's bf16 outputs); default ``dtype``
        (products accumulated in it).
    """
    low, out = jnp.dtype(compute_dtype or dtype), jnp.dtype(out_dtype or dtype)
    dims = (((0 if shape.transpose_a else 1,), (1 if shape.transpose_b else 0,)), ((), ()))
    a = jnp.ones((shape.k, shape.m) if shape.transpose_a else (shape.m, shape.k), dtype)
    b = jnp.ones((shape.n, shape.k) if shape.transpose_b else (shape.k, shape.n), dtype)

    def product(a: jax.Array, b: jax.Array) -> jax.Array:
        return jax.lax.dot_general(a.astype(low), b.astype(low), dims,
                                   preferred_element_type=out)

    return _best_loop_rate(product, a, b, shape.flops, budget_s, precision, min_sample_s)


class ConvShape(NamedTuple):
    """One 3x3 SAME stride-1 convolution of a conv layer's training step, as
    :class:`jaxbp.layers.Conv2D` calls it: ``forward`` (x (B, S, S, c_in) with the kernel),
    ``input_error`` (the error (B, S, S, c_out) with the flipped kernel, O <-> I) or
    ``weight_grad`` (x read as CHWN with the error as the kernel, the result HWIO)."""

    name: str
    batch: int
    side: int
    c_in: int
    c_out: int

    @property
    def flops(self) -> int:
        """``2 B (3 S - 2)^2 c_in c_out``: the (position, tap) pairs that touch the image
        (XLA's count; SAME padding's zeros are not multiplied)."""
        return 2 * self.batch * (3 * self.side - 2) ** 2 * self.c_in * self.c_out


def step_conv_shapes(batch: int, side: int, c_in: int, c_out: int) -> tuple[ConvShape, ...]:
    """The three convolutions a 3x3 SAME conv layer costs a training step."""
    return tuple(ConvShape(name, batch, side, c_in, c_out)
                 for name in ("forward", "input_error", "weight_grad"))


def conv_rate(shape: ConvShape, dtype: str = "float32", compute_dtype: str | None = None,
              budget_s: float = 0.5, precision: str | None = None,
              min_sample_s: float = 2e-3, out_dtype: str | None = None) -> float:
    """The machine's measured FLOP/s for one of a conv layer's three convolutions, timed
    alone in the loops of :func:`gemm_rate` (same arguments): the roof of a conv step,
    where the implicit GEMM of the same shape is not what the conv library runs (cuDNN
    beats cuBLAS's rate for those narrow GEMMs on an H200, so a GEMM roof sat below the
    step: fractions up to 2.6)."""
    a, b, product = conv_product(shape, dtype, compute_dtype, out_dtype)
    return _best_loop_rate(product, a, b, shape.flops, budget_s, precision, min_sample_s)


def conv_product(shape: ConvShape, dtype: str = "float32", compute_dtype: str | None = None,
                 out_dtype: str | None = None) -> tuple[jax.Array, jax.Array, Any]:
    """``(a, b, product)``: operands of ones and the convolution :func:`conv_rate` times."""
    low, out = jnp.dtype(compute_dtype or dtype), jnp.dtype(out_dtype or dtype)
    b_, s, c_in, c_out = shape.batch, shape.side, shape.c_in, shape.c_out
    padding = ((1, 1), (1, 1))  # SAME for 3x3, stride 1, in all three
    if shape.name == "weight_grad":
        a, b = jnp.ones((b_, s, s, c_in), dtype), jnp.ones((b_, s, s, c_out), dtype)
        numbers = ("CHWN", "IHWO", "HWNC")
    else:
        c_from, c_to = (c_in, c_out) if shape.name == "forward" else (c_out, c_in)
        a, b = jnp.ones((b_, s, s, c_from), dtype), jnp.ones((3, 3, c_from, c_to), dtype)
        numbers = ("NHWC", "HWIO", "NHWC")

    def product(a: jax.Array, b: jax.Array) -> jax.Array:
        return jax.lax.conv_general_dilated(
            a.astype(low), b.astype(low), (1, 1), padding, dimension_numbers=numbers,
            preferred_element_type=out)

    return a, b, product

