#!/usr/bin/env bash
# Download the optional comparison packages of the benchmark suite as wheels into .whl/, for a GPU
# machine that has no package registry: bench/run_gpu.sh unpacks whatever .whl/ holds and puts it on
# PYTHONPATH. Run it here (where pip reaches a registry), then carry .whl/ to the GPU machine.
#
# Liger-Kernel and Cut Cross-Entropy are pure-Python wheels (their kernels are Triton), so one wheel
# serves any Linux x86-64 machine; their own needs (torch, triton, packaging) are on the GPU image.
# Usage: bash scripts/fetch_gpu_wheels.sh [PYTHON_VERSION, default 3.12]
set -euo pipefail
cd "$(dirname "$0")/.."
pyver="${1:-3.12}"
mkdir -p .whl
python3 -m pip download --no-deps --only-binary=:all: --python-version "$pyver" --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "liger-kernel==0.8.5" "cut-cross-entropy==25.1.1"
ls -l .whl
