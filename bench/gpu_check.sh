#!/usr/bin/env bash
# One prepared call on a lent GPU: environment, kernel tests on CUDA, benchmarks, one table.
# Runs from the source tree (nothing is installed there). Results land in $OUT (or bench/gpu_check_out).
#   bash bench/gpu_check.sh            # everything, a few minutes on an H100 / H200
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec python3 bench/gpu_check.py --out "${OUT:-bench/gpu_check_out}" "$@"
