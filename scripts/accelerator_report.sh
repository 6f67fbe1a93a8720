#!/usr/bin/env bash
# One device run within one wall-clock budget, from the repository root:
#
#   bash scripts/accelerator_report.sh [--budget SECONDS] [--out DIR]
#
# Needs JAX with a GPU/TPU backend and the test extras (pytest, pytest-xdist, optax,
# orbax); installs nothing and runs jaxbp from this tree (PYTHONPATH), so it also runs on a
# lent machine that has them. The budget (default 600 s: 10 minutes on an H200) is spent in
# order, each part stopped by `timeout` at its share of what is left (the most telling
# measurements first, so that a short budget still has them):
#   1. jaxbp bench --quick: the CNNs (with a max pool), the bf16 MLPs, the GPT-2-small
#      step, the other MLPs, in float32, bf16-operands and bf16, each against jax.grad of
#      the same recipe                                                     45% of the budget
#   2. benchmarks/step_hlo.py: both compiled steps of the bf16 W4096 D4 B8192 MLP, their
#      optimized HLO and a table of their kernels, matmul and reduction types (compiled,
#      not run: where the bf16 MLPs' 1.05-1.13x against jax.grad is)     5% of what is left
#   3. benchmarks/per_example_gpt.py --gpt2-small (the clipped step of a GPT-2-small-shaped
#      model vs a plain one, tokens/s)                                     15% of what is left
#   4. benchmarks/fit_overhead.py (fit vs the bare loop)                  15% of what is left
#   5. jaxbp verify in float32 and bfloat16, and the bf16 and bf16-operands recipes against
#      the float64 truth (6 cases each)                                   17% of what is left
#   6. the fast tests (pytest -m "not slow", xdist workers, every failure named)  the rest
# and writes one report, DIR/accelerator_<device kind>.md (default DIR benchmarks/results),
# beside the parts' own tables (12 files in all). The max pool's backward
# (benchmarks/pool_backward.py) was measured on an H200 and is not repeated here. Each part's exit status is recorded (124:
# stopped by its limit); the script exits non-zero if any part failed or ran out of time.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

budget=600
out=benchmarks/results
while [ $# -gt 0 ]; do
    case $1 in
        --budget) budget=$2; shift 2 ;;
        --out) out=$2; shift 2 ;;
        *) echo "accelerator_report: unknown argument $1 (--budget SECONDS, --out DIR)" >&2
           exit 2 ;;
    esac
done
case $budget in ''|*[!0-9]*) echo "accelerator_report: --budget must be whole seconds, got $budget" >&2
                             exit 2 ;; esac

kind=$(python -c "import jax; d = jax.devices()[0]; print(d.platform + '_' + d.device_kind)" \
       | tr 'A-Z' 'a-z' | tr -c 'a-z0-9_\n' '_' | sed 's/__*/_/g; s/_$//')
platform=${kind%%_*}
if [ "$platform" = "cpu" ] && [ -z "${ACCELERATOR_REPORT_ALLOW_CPU:-}" ]; then
    echo "accelerator_report: JAX sees no GPU or TPU (device: $kind)" >&2
    exit 2
fi
mkdir -p "$out"
report=$out/accelerator_${kind}.md
start=$(date +%s)
failed=0

share() {  # share PERCENT: seconds for the next part, of what is left of the budget
    local left=$(( budget - ($(date +%s) - start) ))
    local s=$(( left * $1 / 100 ))
    [ "$s" -lt 10 ] && s=10
    echo "$s"
}

section() {  # section TITLE SECONDS COMMAND...: run it under `timeout`, keep its output
    local title=$1 limit=$2; shift 2
    { echo; echo "## $title (limit ${limit} s)"; echo; echo '```'; echo "\$ $*"; } >> "$report"
    timeout --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$report"
    local status=${PIPESTATUS[0]}
    { echo "(exit status $status$([ "$status" -eq 124 ] && echo ': stopped by its time limit'))"
      echo '```'; } >> "$report"
    [ "$status" -eq 0 ] || failed=1
}

{
    echo "# jaxbp on $kind"
    echo
    echo "Written by scripts/accelerator_report.sh (budget ${budget} s) on" \
         "$(date -u '+%Y-%m-%d %H:%M UTC'), commit $(git rev-parse --short HEAD 2>/dev/null || echo '?')."
    echo "XLA_FLAGS='${XLA_FLAGS:-}', JAX_DEFAULT_MATMUL_PRECISION='${JAX_DEFAULT_MATMUL_PRECISION:-}'."
} > "$report"
command -v nvidia-smi > /dev/null && section "nvidia-smi" 30 nvidia-smi -L

limit=$(share 45)
section "step benchmark (--quick: CNNs, bf16 MLPs, GPT-2 small, other MLPs; three recipes), default matmul precision" \
    "$limit" python -m jaxbp.cli bench --quick --time-limit $(( limit * 3 / 4 )) --budget 0.4 \
        --out "$out" --name "step_quick_${kind}"
limit=$(share 5)
section "compiled train step, bf16 W4096 D4 B8192, backprop vs jax.grad (HLO, not timed)" \
    "$limit" python benchmarks/step_hlo.py --out "$out"
limit=$(share 15)
section "clipped step of a GPT-2-small-shaped model" "$limit" \
    python benchmarks/per_example_gpt.py --gpt2-small --budget 0.5 --out "$out"
limit=$(share 15)
section "fit overhead" "$limit" python benchmarks/fit_overhead.py --rounds 3 --out "$out"
limit=$(share 17)
section "gradient suite, float32 and bfloat16, and both bf16 recipes" "$limit" \
    python -m jaxbp.cli verify --dtypes float32,bfloat16 --cases 6 --n-fd 1 \
    --recipes bf16,bf16-operands
limit=$(share 100)
# one process per core, each taking GPU memory as it needs it (not 75% each up front)
section "tests (not slow)" "$limit" env XLA_PYTHON_CLIENT_PREALLOCATE=false \
    python -m pytest -m "not slow" -q -rf -p no:cacheprovider -n "$(( $(nproc) > 12 ? 12 : $(nproc) ))"
echo
echo "wrote $report (and step_quick_${kind}.md/json/png, step_hlo, clipped_gpt2_small, fit_overhead in $out) in" \
     "$(( $(date +%s) - start )) s of ${budget} s"
exit $failed
