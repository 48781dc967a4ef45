#!/usr/bin/env bash
# The GPU check (benchmarks/gpu.py): run it first whenever a GPU machine is available, and record its table
# in BENCHMARKS.md with the GPU named. --smoke runs the same path at toy sizes on the CPU (the test suite does).
set -euo pipefail
cd "$(dirname "$0")/.."
exec python benchmarks/gpu.py "$@"
