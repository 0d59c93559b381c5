#!/usr/bin/env bash
# Build the optional native CPU library (CMakeLists.txt + native/) and install it into kernels/sonar_kernels/_native/.
# Needs cmake >= 3.25, a C++ compiler for the standard torch needs (C++20 for torch 2.14) and the torch it
# will run with; the steps are kernels/sonar_kernels/native_build.py. Usage:
#   scripts/build_native.sh [--jobs N] [--build-dir DIR] [--verbose]
# The pure-Python package works without it; `python -m sonar_kernels.native status` says whether it loads.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python3 -m sonar_kernels.native build "$@"
