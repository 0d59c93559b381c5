#!/usr/bin/env bash
# Run the whole benchmark suite on one GPU at the paper's shapes (bf16) and keep what it measured.
#
# Kernels (linear cross-entropy, decoder fast path), training steps of every family (SONAR-LLM fast vs
# reference path at the 600M preset with the released SONAR decoder's shape), generation, SONAR decoding
# and SONAR encoding, then the triton_op compile tests (SONAR_GPU_COMPILE_TESTS, default `tests/test_compile.py -k
# triton`, within SONAR_COMPILE_TEST_BUDGET_S, default 120 s) and compiled vs eager (bench/measure_compile.py,
# SONAR_COMPILE_BUDGET_S, default 240 s), a separate stage; the pytest stages are sized to finish within 8 minutes on one H200 (a hard stop at SONAR_BENCH_BUDGET_S,
# default 380 s, interrupts pytest, which still writes what it measured). Before them, the kernel
# correctness tests run on the GPU against float64 references (SONAR_GPU_TESTS, a space-separated list of
# test files, within SONAR_GPU_TEST_BUDGET_S, default 90 s): both stages together stay under 8 minutes.
#
# Writes bench/results/<date>_<gpu>_<commit>.json / .md / .png (through bench/conftest.py and
# bench/report.py), a <date>_gpu_run.log with nvidia-smi and the pytest output, and prints the issue's
# targets against the measured figures (bench/common.py targets). Usage: bash bench/run_gpu.sh [pytest args]
#
# It needs no installation of this project, so it runs on a bare GPU machine that has only torch, triton,
# pytest and pytest-benchmark: the checkout's source roots kernels/ and train/ are put on PYTHONPATH (ahead of
# any installed copy, so this checkout is what gets measured). Wheels in .whl/ (for example Liger-Kernel
# and Cut Cross-Entropy, fetched by scripts/fetch_gpu_wheels.sh on a machine with a package registry) are
# unpacked to a temporary directory and put on PYTHONPATH too.
#
# Environment: PYTHON (default python3), SONAR_BENCH_BUDGET_S, SONAR_BENCH_RESULTS_DIR (default
# bench/results). SONAR_BENCH_REHEARSE=1 rehearses the script on a CPU machine: quick shapes, Triton
# kernels in the interpreter, a 300 s budget unless SONAR_BENCH_BUDGET_S says otherwise (what
# tests/test_run_gpu_script.py runs, so the script itself is tested where no GPU is).
set -uo pipefail
cd "$(dirname "$0")/.."
repo="$PWD"
py="${PYTHON:-python3}"
rehearse="${SONAR_BENCH_REHEARSE:-0}"
[[ "$rehearse" == "1" ]] && budget="${SONAR_BENCH_BUDGET_S:-300}" || budget="${SONAR_BENCH_BUDGET_S:-380}"

if ! command -v "$py" >/dev/null 2>&1; then
    echo "run_gpu.sh: no '$py' on PATH (set PYTHON)" >&2
    exit 2
fi
if [[ "$rehearse" == "1" ]]; then
    export SONAR_BENCH_SCALE=quick TRITON_INTERPRET=1
elif ! "$py" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "run_gpu.sh: no CUDA device; on the CPU run: python -m pytest bench/ " \
         "(or SONAR_BENCH_REHEARSE=1 bash bench/run_gpu.sh to rehearse this script)" >&2
    exit 2
fi

# this checkout's kernels as `sonar_kernels`, and any carried wheels, without installing anything
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
pypath="$repo/kernels:$repo/train:$repo"
shopt -s nullglob
wheels=("$repo"/.whl/*.whl)
if (( ${#wheels[@]} )); then
    if "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$tmp/site" \
            "${wheels[@]}"; then
        pypath="$pypath:$tmp/site"
    else
        echo "run_gpu.sh: could not unpack the wheels in .whl/; going on without them" >&2
    fi
fi
export PYTHONPATH="$pypath${PYTHONPATH:+:$PYTHONPATH}"
if ! where="$("$py" -c "import os, sonar_kernels; print(os.path.realpath(os.path.dirname(sonar_kernels.__file__)))")" \
        || [[ "$where" != "$(realpath "$repo/kernels/sonar_kernels")" ]]; then
    echo "run_gpu.sh: sonar_kernels does not resolve to $repo/kernels/sonar_kernels (got: ${where:-an import error})" >&2
    exit 2
fi

# the commit goes into the result names; a tree copied without .git needs SONAR_BENCH_COMMIT from outside
export SONAR_BENCH_COMMIT="${SONAR_BENCH_COMMIT:-$("$py" -c "import sys; sys.path.insert(0, 'bench'); import report; print(report.git_commit())")}"

results="${SONAR_BENCH_RESULTS_DIR:-$repo/bench/results}"
mkdir -p "$results"
export SONAR_BENCH_RESULTS_DIR="$results"
stamp="$(date -u +%Y%m%d-%H%M%S)"
log="$results/${stamp}_gpu_run.log"
{
    echo "# bench/run_gpu.sh ${stamp} UTC (rehearsal: ${rehearse}, commit ${SONAR_BENCH_COMMIT})"
    nvidia-smi || true
    "$py" -c "import sys, torch, triton; print('python', sys.version.split()[0], '| torch', torch.__version__,
'| triton', triton.__version__)" || true
    "$py" -m pip list 2>/dev/null | grep -iE "^(liger|cut.cross|flash.attn|pytest.benchmark) " || true
} >"$log" 2>&1

# paper shapes (unless rehearsing): no quick mode, real (not interpreted) Triton kernels
unset SONAR_BENCH_QUICK SONAR_KERNELS_IMPL
[[ "$rehearse" == "1" ]] || unset SONAR_BENCH_SCALE TRITON_INTERPRET
export PYTORCH_CUDA_ALLOC_CONF="${PYTORCH_CUDA_ALLOC_CONF:-expandable_segments:True}"
extra=()
if "$py" -c "import pytest_timeout" 2>/dev/null; then
    extra+=(--timeout=300)  # one hung benchmark must not eat the whole budget
fi

# 1. correctness on the device first: the kernel tests (Triton for real on CUDA tensors, against float64)
#    and the linear cross-entropy at the SONAR shape in bf16; one autotune config each, for a fast start
test_budget="${SONAR_GPU_TEST_BUDGET_S:-90}"
read -r -a tests <<<"${SONAR_GPU_TESTS:-tests/test_kernels_at_scale.py tests/test_linear_cross_entropy.py tests/test_lce_grad_in_forward.py \
tests/test_decoder_ops.py tests/test_packed_decoder.py}"
echo "run_gpu.sh: kernel correctness tests (budget ${test_budget} s)" | tee -a "$log"
SONAR_KERNELS_AUTOTUNE=0 timeout --signal=INT --kill-after=15 "$test_budget" \
    "$py" -m pytest "${tests[@]}" -q -p no:cacheprovider --benchmark-disable -rfEs 2>&1 | tee -a "$log"
test_status=${PIPESTATUS[0]}
echo "run_gpu.sh: correctness tests exit status ${test_status}" | tee -a "$log"

# 2. the benchmarks, in the order of what matters most, so a budget stop cuts the least important: the training
# step (3x and MFU targets), the fused cross-entropy, generation (10x / 5x), the encoder, the decoder ops
files=(bench/test_bench_training.py bench/test_bench_linear_cross_entropy.py bench/test_bench_generation.py
       bench/test_bench_encoder.py bench/test_bench_decoder_ops.py bench/test_bench_native.py)
for f in bench/test_bench_*.py; do [[ " ${files[*]} " == *" $f "* ]] || files+=("$f"); done

start=$(date +%s)
touch "$tmp/started"  # result files newer than this are this run's (the log itself keeps growing)
timeout --signal=INT --kill-after=30 "$budget" \
    "$py" -m pytest "${files[@]}" -q -p no:cacheprovider ${extra[@]+"${extra[@]}"} "$@" 2>&1 | tee -a "$log"
status=${PIPESTATUS[0]}
echo "run_gpu.sh: pytest exit status ${status} after $(( $(date +%s) - start )) s" | tee -a "$log"

# 3. torch.compile (issue 28): the training step (`small` backbone, full-width 2-layer SONAR decoder) and the
#    decoder loss at the released decoder's shape, compiled per layer vs eager, with compile time, recompiles
#    over 100 varying batches and graph breaks; a measurement only (its failure does not fail the run).
#    Written to $results/compile/. A rehearsal skips it unless SONAR_BENCH_COMPILE=1 (then at quick shapes).
compile_budget="${SONAR_COMPILE_BUDGET_S:-240}"
if [[ "$rehearse" != "1" || "${SONAR_BENCH_COMPILE:-0}" == "1" ]]; then
    mkdir -p "$results/compile"
    compile_args=(--out "$results/compile/compile_${stamp}.json")
    [[ "$rehearse" == "1" ]] && compile_args+=(--quick --rows decoder-loss --steps 2 --rounds 1)
    # first the triton_op checks that only a GPU can make (tests/test_compile.py -k triton: inductor traces into
    # the Triton kernels of add_layer_norm and the linear cross-entropy, compiled vs eager vs float64); a failure
    # counts as a failed correctness test
    read -r -a compile_tests <<<"${SONAR_GPU_COMPILE_TESTS:-tests/test_compile.py -k triton}"
    echo "run_gpu.sh: triton_op compile tests (budget ${SONAR_COMPILE_TEST_BUDGET_S:-120} s)" | tee -a "$log"
    SONAR_KERNELS_AUTOTUNE=0 timeout --signal=INT --kill-after=15 "${SONAR_COMPILE_TEST_BUDGET_S:-120}" \
        "$py" -m pytest "${compile_tests[@]}" -q -p no:cacheprovider --benchmark-disable -rfEs 2>&1 | tee -a "$log"
    compile_test_status=${PIPESTATUS[0]}
    echo "run_gpu.sh: triton_op compile tests exit status ${compile_test_status}" | tee -a "$log"
    (( test_status == 0 )) && test_status=$compile_test_status
    echo "run_gpu.sh: compiled vs eager (budget ${compile_budget} s)" | tee -a "$log"
    timeout --signal=INT --kill-after=15 "$compile_budget" \
        "$py" bench/measure_compile.py "${compile_args[@]}" 2>&1 | tee -a "$log"
    echo "run_gpu.sh: compile measurement exit status ${PIPESTATUS[0]}" | tee -a "$log"
fi

result="$(find "$results" -maxdepth 1 -name '*.json' -newer "$tmp/started" | sort | tail -n 1)"
if [[ -n "$result" ]]; then
    echo "results: ${result%.json}.{json,md,png}" | tee -a "$log"
    "$py" bench/common.py targets "$result" 2>&1 | tee -a "$log"
else
    echo "run_gpu.sh: no result file was written (see $log)" | tee -a "$log"
fi
echo "run_gpu.sh: correctness tests exit status ${test_status}, benchmarks exit status ${status}" | tee -a "$log"
(( status != 0 )) && exit "$status"
exit "$test_status"
