#!/usr/bin/env bash
# The GPU checks, in one call on a machine with an NVIDIA GPU and its driver, using binaries
# built elsewhere and carried (that machine needs no Rust and no network):
#
#   cargo build --release            # here; then, on the GPU machine, from the repository root:
#   scripts/gpu-check.sh [BIN_DIR]   # BIN_DIR: where the binaries are (default target/release)
#
# NVRTC and CUDA's headers come from a CUDA install or pip's nvidia-cuda-nvrtc-cu12 and
# nvidia-cuda-runtime-cu12 (found by themselves; RINGLET_NVRTC_LIB / RINGLET_CUDA_INCLUDE
# otherwise). Runs:
#   1. ringlet-gpu-check: every kernel of kernels/ vs its CPU reference on fresh random data
#      (f32, f16, bf16, f64, i32, i64, u8; SGD and AdamW), bit for bit; the reduction kernel's
#      bandwidth against a device-to-device copy (target >= 85%).
# Not yet in this build (issue 4 goes on): NCCL world=1 all-reduce, and the TCP device
# fallback across 2 and 4 processes sharing the GPU. One GPU cannot host a multi-rank NCCL ring.
set -uo pipefail
bin=${1:-target/release}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
echo "== kernels vs CPU reference, bandwidth"
"$bin/ringlet-gpu-check"
status=$?
echo "== gpu-check: exit $status"
exit $status
