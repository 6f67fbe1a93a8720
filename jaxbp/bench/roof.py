"""The roof a step is measured against: its matmul FLOPs counted by hand, and the rate
this device reaches on the step's own GEMM and conv shapes.

Each shape is timed in loops of chained and independent products (:data:`GEMM_LOOPS`),
and the best rate is the roof: a loop whose per-iteration overhead is visible is not
allowed to lower it.
"""

from __future__ import annotations

import functools
import itertools
import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jaxbp.bench.harness import compile_ahead, time_interleaved
from jaxbp.layers.conv import backward_conv
from jaxbp.matmul_precision import precision_scope


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

TIME_ALONE = True
"""Also time the product called alone (one compiled call per product, no loop): a loop
rewrites an entry of its operand every round, and on a CPU that made a weight gradient's
transposing conv 6% slower than its plain call (8.6 against 8.1 ms, bf16 operands), so
that a bf16 CNN step outran a loops-only roof. For a product of microseconds the call's
dispatch lowers this rate and a loop's is the higher: the best is kept."""

LONG_PRODUCT_S = 5e-3
"""A chain iteration (one product) at least this long is timed alone: a loop's overhead
(microseconds; tens on a GPU's host round trip) is then a percent or less of it."""

_ITERATION_HOOK: Any = None
"""Tests only: a host function called once per loop iteration (a fake loop overhead)."""

_COMPILED_LOOPS: dict[tuple[Any, ...], Any] = {}
"""Each loop compiled once per process, keyed by its product, loop form and hook: a roof
measured again (before and after a case's timing, again where the step outran it) costs
no second compilation (the iteration count is a run-time argument)."""

_MAX_COMPILED_LOOPS = 256


def _product_loop(product: Callable[[Any, Any], Any], out: Any, unroll: int,
                  precision: str | None) -> Any:
    """``loop(a, bs, iterations)``: ``iterations`` loop steps of ``unroll`` rounds, each
    round one product ``product(a, b_i)`` per b in ``bs`` (``out``: their ShapeDtypeStruct).
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


def _cached(key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
    """``build()`` (a compiled program), once per ``key`` and process."""
    if key not in _COMPILED_LOOPS:
        if len(_COMPILED_LOOPS) >= _MAX_COMPILED_LOOPS:
            _COMPILED_LOOPS.clear()
        _COMPILED_LOOPS[key] = build()
    return _COMPILED_LOOPS[key]


def _compiled_loop(key: tuple[Any, ...], product: Callable[[Any, Any], Any], out: Any,
                   unroll: int, precision: str | None, a: jax.Array,
                   bs: tuple[jax.Array, ...]) -> Any:
    """The loop of :func:`_product_loop` compiled for ``a, bs``, from the cache when the
    same product (``key``: its kind, shape, dtypes and precision) was compiled before."""
    def build() -> Any:
        loop = _product_loop(product, out, unroll, precision)
        return compile_ahead(loop, a, bs, jnp.int32(1))[0]
    return _cached((*key, unroll, len(bs), _ITERATION_HOOK), build)


def _compiled_alone(key: tuple[Any, ...], product: Callable[[Any, Any], Any],
                    precision: str | None, a: jax.Array, b: jax.Array) -> Any:
    """``product`` compiled for ``a, b`` as one program (cached as the loops are)."""
    def build() -> Any:
        with precision_scope(precision):
            return compile_ahead(product, a, b)[0]
    return _cached((*key, "alone"), build)


def _best_loop_rate(key: tuple[Any, ...], product: Callable[[Any, Any], Any], a: jax.Array,
                    b: jax.Array, flops: int, budget_s: float, precision: str | None,
                    min_sample_s: float) -> float:
    """FLOP/s of ``product(a, b)`` (``flops`` each; ``key`` names the product for the
    cache of compiled loops): the fastest sample of the fastest of :data:`GEMM_LOOPS`
    and, with :data:`TIME_ALONE`, of the product called alone (see :func:`gemm_rate`)."""
    with precision_scope(precision):
        out = jax.eval_shape(product, a, b)
    calls, per_call = {}, {}
    for unroll, independent in GEMM_LOOPS:
        bs = tuple(b + i for i in range(independent))
        compiled = _compiled_loop(key, product, out, unroll, precision, a, bs)
        per_iteration = _iteration_s(compiled, a, bs)
        iterations = int(min(1 << 20, max(1, math.ceil(min_sample_s / per_iteration))))
        name = f"unroll {unroll} x {independent}"
        calls[name] = functools.partial(compiled, a, bs, jnp.int32(iterations))
        per_call[name] = unroll * independent * iterations
        if per_iteration >= LONG_PRODUCT_S:
            break  # loop overheads are microseconds: under 1% of an iteration this long
    if TIME_ALONE:
        calls["alone"] = functools.partial(_compiled_alone(key, product, precision, a, b),
                                           a, b)
        per_call["alone"] = 1
    timings = time_interleaved(calls, budget_s=budget_s, min_sample_s=min_sample_s)
    # the roof is the best the machine did: the fastest sample of the fastest loop
    return max(flops * per_call[name] / min(t.rounds) for name, t in timings.items())


def gemm_rate(shape: MatmulShape, dtype: str = "float32", compute_dtype: str | None = None,
              budget_s: float = 0.5, precision: str | None = None,
              min_sample_s: float = 2e-3, out_dtype: str | None = None) -> float:
    """The machine's measured FLOP/s for one matmul shape, in this recipe: the best of
    :data:`GEMM_LOOPS` and of the product called alone (:data:`TIME_ALONE`).

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
      dtype: the dtype of the operands and of the product, unless the next two say
        otherwise.
      compute_dtype: the operands' dtype (mixed precision), stored in it: the rounding
        is the step's elementwise work, not the product's (timed inside the loop, it
        lowered the bf16 roofs below what the step's products ran at on a CPU).
      precision: the matmul precision (:data:`jaxbp.matmul_precision.MATMUL_PRECISIONS`),
        None for JAX's current setting.
      out_dtype: the product's dtype (the bf16 recipe's bf16 outputs); default ``dtype``
        (products accumulated in it).
    """
    low, out = jnp.dtype(compute_dtype or dtype), jnp.dtype(out_dtype or dtype)
    dims = (((0 if shape.transpose_a else 1,), (1 if shape.transpose_b else 0,)), ((), ()))
    a = jnp.ones((shape.k, shape.m) if shape.transpose_a else (shape.m, shape.k), low)
    b = jnp.ones((shape.n, shape.k) if shape.transpose_b else (shape.k, shape.n), low)

    def product(a: jax.Array, b: jax.Array) -> jax.Array:
        return jax.lax.dot_general(a, b, dims, preferred_element_type=out)

    key = ("gemm", shape, low.name, out.name, precision)
    return _best_loop_rate(key, product, a, b, shape.flops, budget_s, precision, min_sample_s)


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
    key = ("conv", shape, jnp.dtype(compute_dtype or dtype).name,
           jnp.dtype(out_dtype or dtype).name, precision)
    return _best_loop_rate(key, product, a, b, shape.flops, budget_s, precision, min_sample_s)


def conv_product(shape: ConvShape, dtype: str = "float32", compute_dtype: str | None = None,
                 out_dtype: str | None = None) -> tuple[jax.Array, jax.Array, Any]:
    """``(a, b, product)``: operands of ones and the convolution :func:`conv_rate` times."""
    low, out = jnp.dtype(compute_dtype or dtype), jnp.dtype(out_dtype or dtype)
    b_, s, c_in, c_out = shape.batch, shape.side, shape.c_in, shape.c_out
    padding = ((1, 1), (1, 1))  # SAME for 3x3, stride 1, in all three
    if shape.name == "weight_grad":
        a, b = jnp.ones((b_, s, s, c_in), low), jnp.ones((b_, s, s, c_out), low)
        numbers = ("CHWN", "IHWO", "HWNC")
    else:
        c_from, c_to = (c_in, c_out) if shape.name == "forward" else (c_out, c_in)
        a, b = jnp.ones((b_, s, s, c_from), low), jnp.ones((3, 3, c_from, c_to), low)
        numbers = ("NHWC", "HWIO", "NHWC")

    def conv(a: jax.Array, b: jax.Array, numbers: Any) -> jax.Array:
        return jax.lax.conv_general_dilated(a, b, (1, 1), padding, dimension_numbers=numbers,
                                            preferred_element_type=out)

    # the form the step runs: a weight gradient's transposes on a CPU, where the transpose
    # rule's layout runs a naive loop inside the timing loop (jaxbp.layers.conv)
    return a, b, functools.partial(backward_conv, conv, numbers=numbers)

