"""Vendor peak rates per accelerator, and what a float32 matmul really runs as.

A roofline needs the device's peak FLOP/s for the arithmetic that actually
ran and its memory bandwidth. Under JAX's default matmul precision a
"float32" matmul is TensorFloat-32 on NVIDIA tensor cores (Ampere and newer)
and one pass of bfloat16 on a TPU's MXU; only ``"highest"`` gives true
float32 (on TPU, six bfloat16 passes). :func:`matmul_arithmetic` names what
ran; :func:`device_peaks` looks the device up by ``jax.Device.device_kind``.

Figures are dense (no 2:4 sparsity), per chip, from the vendor datasheets:

* NVIDIA H100 Tensor Core GPU datasheet (SXM5 and PCIe, NVL), 2023; NVIDIA
  H200 Tensor Core GPU datasheet (SXM and NVL), 2024: the datasheets give
  tensor-core TF32/BF16 "with sparsity"; dense is half of that.
* NVIDIA A100 Tensor Core GPU datasheet, 2021 (40 GB and 80 GB, SXM4 and PCIe).
* NVIDIA L4 Tensor Core GPU datasheet, 2023.
* Google Cloud TPU documentation, "TPU v4", "TPU v5e", "TPU v5p", "TPU v6e"
  (system architecture pages: peak bf16 TFLOP/s and HBM bandwidth per chip).
  TPU float32 peaks are derived: ``"high"`` runs 3 bf16 passes, ``"highest"``
  6, so their peaks are the bf16 peak / 3 and / 6.
"""

from __future__ import annotations

import dataclasses
import re

from jaxbp.matmul_precision import current_precision

TERA, GIGA = 1e12, 1e9

@dataclasses.dataclass(frozen=True)
class DevicePeaks:
    """One accelerator's datasheet peaks.

    Attributes:
      name: the product, as the datasheet names it.
      flops: peak FLOP/s per arithmetic (``"fp64"``, ``"fp32"``, ``"tf32"``,
        ``"bf16"``, and on TPU ``"bf16x3"``/``"bf16x6"``), dense.
      bandwidth: peak memory bandwidth, bytes/s.
      source: where the figures come from.
    """

    name: str
    flops: dict[str, float]
    bandwidth: float
    source: str

    def peak(self, arithmetic: str) -> float | None:
        """Peak FLOP/s of ``arithmetic`` (see :func:`matmul_arithmetic`), None if not listed."""
        return self.flops.get(arithmetic)

    def balance_point(self, arithmetic: str) -> float | None:
        """FLOPs per byte at which the device turns from memory- to compute-bound."""
        peak = self.peak(arithmetic)
        return None if peak is None else peak / self.bandwidth


def _nvidia(name: str, fp64: float | None, fp32: float, tf32_sparse: float,
            bf16_sparse: float, bandwidth_tb: float, source: str) -> DevicePeaks:
    # datasheets list tensor-core TF32/BF16 with 2:4 sparsity; dense is half
    flops = {"fp32": fp32 * TERA, "tf32": tf32_sparse / 2 * TERA, "bf16": bf16_sparse / 2 * TERA}
    if fp64 is not None:  # tensor-core FP64 (what a float64 GEMM runs on)
        flops["fp64"] = fp64 * TERA
    return DevicePeaks(name, flops, bandwidth_tb * TERA, source)


def _tpu(name: str, bf16: float, bandwidth_gb: float, source: str) -> DevicePeaks:
    return DevicePeaks(name, {"bf16": bf16 * TERA, "bf16x3": bf16 / 3 * TERA,
                              "bf16x6": bf16 / 6 * TERA}, bandwidth_gb * GIGA, source)


_H100 = "NVIDIA H100 Tensor Core GPU datasheet"
_H200 = "NVIDIA H200 Tensor Core GPU datasheet"
_A100 = "NVIDIA A100 Tensor Core GPU datasheet"

# (pattern on the lower-cased device_kind, peaks); the first match wins, so the
# specific variants come before the generic ones.
PEAKS: tuple[tuple[str, DevicePeaks], ...] = (
    (r"h200.*nvl", _nvidia("H200 NVL", 60, 60, 835, 1671, 4.8, _H200)),
    (r"h200", _nvidia("H200 SXM", 67, 67, 989, 1979, 4.8, _H200)),
    (r"h100.*nvl", _nvidia("H100 NVL", 60, 60, 835, 1671, 3.9, _H100)),
    (r"h100.*pcie", _nvidia("H100 PCIe", 51, 51, 756, 1513, 2.0, _H100)),
    (r"h100", _nvidia("H100 SXM", 67, 67, 989, 1979, 3.35, _H100)),
    (r"a100.*80gb.*pcie|a100.*pcie.*80gb", _nvidia("A100 80GB PCIe", 19.5, 19.5, 312, 624,
                                                    1.935, _A100)),
    (r"a100.*80gb", _nvidia("A100 80GB SXM", 19.5, 19.5, 312, 624, 2.039, _A100)),
    (r"a100", _nvidia("A100 40GB", 19.5, 19.5, 312, 624, 1.555, _A100)),
    (r"\bl4\b", _nvidia("L4", None, 30.3, 120, 242, 0.3, "NVIDIA L4 Tensor Core GPU datasheet")),
    (r"tpu v6|tpu v6e|trillium", _tpu("TPU v6e", 918, 1640, "Google Cloud TPU v6e docs")),
    (r"tpu v5 ?lite|tpu v5e", _tpu("TPU v5e", 197, 819, "Google Cloud TPU v5e docs")),
    (r"tpu v5p|tpu v5", _tpu("TPU v5p", 459, 2765, "Google Cloud TPU v5p docs")),
    (r"tpu v4", _tpu("TPU v4", 275, 1200, "Google Cloud TPU v4 docs")),
)


def device_peaks(device_kind: str) -> DevicePeaks | None:
    """The datasheet peaks of a ``device_kind``, or None for an unknown device (a CPU).

    With None the benchmark falls back to the measured GEMM rate as the roof.
    """
    kind = device_kind.lower()
    for pattern, peaks in PEAKS:
        if re.search(pattern, kind):
            return peaks
    return None


def matmul_arithmetic(platform: str, operand_dtype: str, precision: str | None = None) -> str:
    """The arithmetic a matmul of ``operand_dtype`` runs in on ``platform`` at ``precision``.

    ``"fp64"``, ``"fp32"``, ``"tf32"`` (NVIDIA tensor cores below "highest"),
    ``"bf16"`` (bf16 operands; TPU float32 at "default"), ``"bf16x3"``/``"bf16x6"``
    (TPU float32 at "high"/"highest"). A CPU computes float32 as float32 at
    every precision.
    """
    dtype = str(operand_dtype)
    if dtype in ("bfloat16", "float16"):
        return "bf16" if dtype == "bfloat16" else "fp16"
    if dtype == "float64":
        return "fp64"
    precision = current_precision(precision)
    full = precision in ("highest", "float32")
    if platform in ("gpu", "cuda", "rocm"):
        if precision == "bfloat16":
            return "bf16"
        return "fp32" if full else "tf32"
    if platform == "tpu":
        if full:
            return "bf16x6"
        return "bf16x3" if precision in ("high", "tensorfloat32", "bfloat16_3x") else "bf16"
    return "fp32"
