#!/usr/bin/env bash
# The first run on a GPU or TPU, in one command, from the repository root:
#
#   pip install -e ".[test]" "jax[cuda12]"      # or "jax[tpu]"; then
#   bash scripts/accelerator_report.sh [--full]
#
# Runs the fast tests (pytest -m "not slow"), the gradient suite in float32 and bfloat16,
# and the quick step benchmark at JAX's default matmul precision and at "highest"
# (--full: the whole suite, capped by its accelerator time limit), and writes one report,
# benchmarks/results/accelerator_<device kind>.md, beside the bench's own tables. Each
# part's exit status is recorded; the script exits non-zero if any part failed.
set -uo pipefail
cd "$(dirname "$0")/.."

kind=$(python -c "import jax; d = jax.devices()[0]; print(d.platform + '_' + d.device_kind)" \
       | tr 'A-Z' 'a-z' | tr -c 'a-z0-9_\n' '_' | sed 's/__*/_/g; s/_$//')
platform=${kind%%_*}
if [ "$platform" = "cpu" ]; then
    echo "accelerator_report: JAX sees no GPU or TPU (device: $kind); install jax[cuda12] or jax[tpu]" >&2
    exit 2
fi
out=benchmarks/results
report=$out/accelerator_${kind}.md
preset=--quick
[ "${1:-}" = "--full" ] && preset=
mkdir -p "$out"
failed=0

section() {  # section TITLE COMMAND...: run it, keep its output and status in the report
    local title=$1; shift
    {
        echo; echo "## $title"; echo; echo '```'; echo "\$ $*"
    } >> "$report"
    "$@" 2>&1 | tee -a "$report"
    local status=${PIPESTATUS[0]}
    { echo "(exit status $status)"; echo '```'; } >> "$report"
    [ "$status" -eq 0 ] || failed=1
}

{
    echo "# jaxbp on $kind"
    echo
    echo "Written by scripts/accelerator_report.sh on $(date -u '+%Y-%m-%d %H:%M UTC')."
    echo "XLA_FLAGS='${XLA_FLAGS:-}', JAX_DEFAULT_MATMUL_PRECISION='${JAX_DEFAULT_MATMUL_PRECISION:-}'."
} > "$report"
command -v nvidia-smi > /dev/null && section "nvidia-smi" nvidia-smi -L
section "tests (not slow)" pytest -m "not slow" -q -p no:cacheprovider
section "gradient suite, float32 and bfloat16" jaxbp verify --dtypes float32,bfloat16
section "step benchmark, default matmul precision" \
    jaxbp bench $preset --out "$out" --name "step_${kind}_default"
section "step benchmark, highest matmul precision" \
    jaxbp bench $preset --precision highest --out "$out" --name "step_${kind}_highest"
section "fit overhead" python benchmarks/fit_overhead.py --rounds 3 --out "$out"
echo
echo "wrote $report (and the bench tables step_${kind}_*.md/json/png in $out)"
exit $failed
