#!/usr/bin/env bash
# One command on a bare GPU machine (torch 2.11 + CUDA, Triton, numpy; no torchrec,
# fbgemm-gpu or Ray, no registry): real HSTU training steps on CUDA with NCCL, bf16 autocast
# and the Triton attention kernel; prints one JSON line (step time, tokens/s, peak memory).
#
#   bash benchmarks/gpu_check.sh              # on the GPU machine, under 8 minutes
#   bash benchmarks/gpu_check.sh --dry-run    # the same code on CPU (gloo, fp32), for CI
#
# What runs and what does not: benchmarks/gpu_check.py's docstring. PYTHON picks the
# interpreter (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec timeout 470 "${PYTHON:-python3}" benchmarks/gpu_check.py "$@"
