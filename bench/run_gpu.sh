#!/usr/bin/env bash
# Run the whole benchmark suite on one GPU at the paper's shapes (bf16) and keep what it measured.
#
# Kernels (linear cross-entropy, decoder fast path), training steps of every family (SONAR-LLM fast vs
# reference path at the 600M preset with the released SONAR decoder's shape), generation, SONAR decoding
# and SONAR encoding; sized to finish within 8 minutes on one H200 (a hard stop at SONAR_BENCH_BUDGET_S,
# default 470 s, interrupts pytest, which still writes what it measured).
#
# Writes bench/results/<date>_<gpu>_<commit>.json / .md / .png (through bench/conftest.py and
# bench/report.py), a <date>_gpu_run.log with nvidia-smi and the pytest output, and prints the issue's
# targets against the measured figures (bench/common.py targets). Usage: bash bench/run_gpu.sh [pytest args]
set -uo pipefail
cd "$(dirname "$0")/.."

budget="${SONAR_BENCH_BUDGET_S:-470}"
if ! python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "run_gpu.sh: no CUDA device; on the CPU run: python -m pytest bench/" >&2
    exit 2
fi
mkdir -p bench/results
stamp="$(date -u +%Y%m%d-%H%M%S)"
log="bench/results/${stamp}_gpu_run.log"
{ echo "# bench/run_gpu.sh ${stamp} UTC"; nvidia-smi || true; } >"$log" 2>&1

# paper shapes: no quick mode, no forced scale, real (not interpreted) Triton kernels
unset SONAR_BENCH_QUICK SONAR_BENCH_SCALE TRITON_INTERPRET SONAR_KERNELS_IMPL
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
extra=()
if python -c "import pytest_timeout" 2>/dev/null; then
    extra+=(--timeout=300)  # one hung benchmark must not eat the whole budget
fi

start=$(date +%s)
timeout --signal=INT --kill-after=30 "$budget" \
    python -m pytest bench -q -p no:cacheprovider ${extra[@]+"${extra[@]}"} "$@" 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
echo "run_gpu.sh: pytest exit status ${status} after $(( $(date +%s) - start )) s" | tee -a "$log"

result="$(find bench/results -maxdepth 1 -name '*.json' -newer "$log" | sort | tail -n 1)"
if [[ -n "$result" ]]; then
    echo "results: ${result%.json}.{json,md,png}" | tee -a "$log"
    python bench/common.py targets "$result" 2>&1 | tee -a "$log"
else
    echo "run_gpu.sh: no result file was written (see $log)" | tee -a "$log"
fi
exit "$status"
