#!/usr/bin/env bash
# One prepared call on a lent GPU: environment, ceilings, every kernel compiled for the card's
# architecture (gspo_kernels.compile_check, so that a kernel which cannot build or fit there is told
# apart from one that computes wrong), kernel tests on CUDA, the tiny default trained on the GPU,
# every benchmark family at its target shapes, results.json and a markdown table (bench/gpu_check.py
# documents both). Runs from the source tree (nothing is installed there). The stages share a budget of
# 9 minutes (--budget-s 540): give the device call a limit of about 590 s. On an H200 the kernel tests
# took over 3 minutes (fla-core's autotuning, compiled FlexAttention, CUDA graphs) and the tiny
# training 75 s; the ahead-of-time compile stage adds about a minute on 16 cores and repeats what CI's
# compile check and the kernel tests already show, so --skip-compile-check saves it (bench/RESULTS.md).
# The machine stays warm only 30 s after a call: have the rerun of what may fail ready before calling.
# Results land in $OUT when set (the device tool's folder), else bench/out/. On a machine without
# a GPU it measures nothing, marks every GPU row "not run" and exits 0.
#
#   bash bench/gpu_check.sh                          # everything
#   bash bench/gpu_check.sh --families loss,moe      # some families; --help for the rest
#
# Peers and kernels the GPU image lacks (liger-kernel; fla-core, the flash-linear-attention kernels
# of the Qwen3-Next / Qwen3.5 layers) travel as wheels. Once, here, in the repository root:
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl liger-kernel==0.8.5 fla-core==0.6.0
# (liger-kernel needs only torch and triton, fla-core also einops: all three are in the image.) Then
# the device call names `.whl` in carry and runs:
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
#       .whl/*.whl && export PYTHONPATH=/tmp/site || exit; bash bench/gpu_check.sh
# Without the wheels the Liger rows are "skipped: liger-kernel not installed", tests/test_qwen3_next_cuda.py
# is skipped and the gated-deltanet rows of ours fail naming the missing extra; the rest still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
exec python3 bench/gpu_check.py --out "${OUT:-bench/out}" "$@"
