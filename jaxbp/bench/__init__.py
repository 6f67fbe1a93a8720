"""The training-step benchmark: the timing harness, the roof (hand-counted FLOPs and the
measured GEMM rate), datasheet peaks, the suite of cases and its report."""
