import atexit
import os
import shutil
import subprocess
import sys
import tempfile

# Tests that compare float32 results hold on a GPU/TPU too: there JAX's default matmul
# precision runs float32 as TF32 or one bf16 pass. Set before JAX starts, so the
# workers the tests launch inherit it.
os.environ.setdefault("JAX_DEFAULT_MATMUL_PRECISION", "highest")
# `jaxbp train` keeps compiled programs on disk by default; the cache is process-wide JAX
# state, so the in-process CLI tests run without it (test_cli tests the option itself).
os.environ.setdefault("JAXBP_COMPILATION_CACHE", "off")
# The tests' programs are small, so compiling them costs far more than running them: XLA's
# backend (LLVM) optimisations are off for the suite and the processes it starts (about
# 1.7x faster on a CPU). The HLO passes are those users get; only the machine code is less
# optimised (float rounding may differ in the last bits, within every test's tolerance);
# `JAX_DISABLE_MOST_OPTIMIZATIONS=0 pytest` compiles exactly as a user's run does.
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")
# For the same reason the CPU backend emits its fusions by the older elemental emitter in
# one codegen thread (about 0.65x the compile time of a transformer test on 2 cores, where
# two workers share the cores). Only the CPU's machine code changes; JAXBP_TEST_XLA_FLAGS=""
# turns this off. The processes the tests start inherit XLA_FLAGS and add their own flags.
# XLA aborts on a flag it does not know, so the first process tries them once in a child
# (about a second) and leaves them out where this jaxlib lacks them.
FAST_COMPILE = "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1"


def _xla_accepts(flags: str) -> bool:
    probe = subprocess.run(
        [sys.executable, "-c", "import jax; jax.numpy.zeros(1).block_until_ready()"],
        env={**os.environ, "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {flags}",
             "JAX_PLATFORMS": "cpu"}, capture_output=True, timeout=300)
    return probe.returncode == 0


if "JAXBP_TEST_XLA_FLAGS" not in os.environ:
    os.environ["JAXBP_TEST_XLA_FLAGS"] = FAST_COMPILE if _xla_accepts(FAST_COMPILE) else ""
if os.environ["JAXBP_TEST_XLA_FLAGS"] not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (f"{os.environ.get('XLA_FLAGS', '')} "
                               f"{os.environ['JAXBP_TEST_XLA_FLAGS']}").strip()

# One persistent compilation cache for the run: a program that several tests compile (the
# digits MLP's step, the CLI's runs, the processes the tests start) is compiled once and
# then loaded (about a quarter off test_cli on 2 cores). A fresh folder per run, so nothing
# carries over from an earlier one; the xdist workers and the tests' subprocesses inherit
# it through the environment. JAX_COMPILATION_CACHE_DIR set beforehand is used as it is.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ and "PYTEST_XDIST_WORKER" not in os.environ:
    _CACHE = tempfile.mkdtemp(prefix="jaxbp-tests-xla-")
    atexit.register(shutil.rmtree, _CACHE, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
    os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
    os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    # Unbounded, unlike jaxbp.compilation_cache's: bounded, JAX scans the whole folder on
    # every write (thousands of entries here: the suite took several times as long). So
    # JAX writes entries in place without a lock, and a worker may read one another is
    # still writing: JAX warns and compiles it again (pyproject's filterwarnings).

sys.path.insert(0, os.path.dirname(__file__))

import jax  # noqa: E402 (after the environment above, which JAX reads once)
import pytest  # noqa: E402

jax.config.update(
    "jax_disable_most_optimizations", os.environ["JAX_DISABLE_MOST_OPTIMIZATIONS"] not in ("0", "")
)


@pytest.fixture
def x64():
    """64-bit JAX for the test's duration."""
    with jax.enable_x64(True):
        yield


@pytest.fixture
def restore_x64():
    """`jaxbp verify`/`train` turn on 64-bit JAX for their process; undo it for the others."""
    before = jax.config.jax_enable_x64
    yield
    jax.config.update("jax_enable_x64", before)
    jax.clear_caches()
