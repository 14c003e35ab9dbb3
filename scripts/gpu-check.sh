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
#   2. NCCL with world size 1: ringlet-bench --backend nccl, all_reduce/broadcast/all_gather/
#      reduce_scatter on device buffers, every element checked. One GPU cannot host a multi-rank
#      NCCL ring (NCCL refuses two ranks on one device), so no multi-rank NCCL figure comes from it.
#   3. The TCP fallback for device buffers across 2 and 4 processes sharing the GPU:
#      ringlet-bench --device (chunks staged through pinned blocks, reduced by the kernels),
#      float sum, half sum, bfloat16 max, and broadcast; every element checked; busbw.
# Exit status: the first failing step's, 0 when all pass.
set -uo pipefail
bin=${1:-target/release}
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: not available"
failed=0
step() {
    echo "== $1"
    shift
    "$@"
    local rc=$?
    echo "== exit $rc"
    if [ $rc -ne 0 ] && [ $failed -eq 0 ]; then failed=$rc; fi
}
export RINGLET_TIMEOUT=${RINGLET_TIMEOUT:-60}
step "kernels vs CPU reference, bandwidth" "$bin/ringlet-gpu-check"
for coll in all_reduce broadcast all_gather reduce_scatter; do
    step "NCCL world=1 $coll" "$bin/ringrun" -n 1 -- "$bin/ringlet-bench" "$coll" --backend nccl -b 8 -e 256M -f 8 -n 10 -w 3
done
for n in 2 4; do
    step "TCP device fallback, $n processes, float sum" "$bin/ringrun" -n $n -- "$bin/ringlet-bench" all_reduce --device -b 1K -e 256M -f 4 -n 5 -w 2
    step "TCP device fallback, $n processes, half sum" "$bin/ringrun" -n $n -- "$bin/ringlet-bench" all_reduce --device -d half -b 1K -e 64M -f 16 -n 3 -w 1
    step "TCP device fallback, $n processes, bfloat16 max" "$bin/ringrun" -n $n -- "$bin/ringlet-bench" all_reduce --device -d bfloat16 -o max -b 1K -e 64M -f 16 -n 3 -w 1
    step "TCP device fallback, $n processes, float avg" "$bin/ringrun" -n $n -- "$bin/ringlet-bench" all_reduce --device -o avg -b 1K -e 64M -f 16 -n 3 -w 1
    step "TCP device fallback, $n processes, broadcast" "$bin/ringrun" -n $n -- "$bin/ringlet-bench" broadcast --device -r 1 -b 1K -e 64M -f 16 -n 3 -w 1
    step "host ring for comparison, $n processes" "$bin/ringrun" -n $n -- "$bin/ringlet-bench" all_reduce -b 1K -e 256M -f 4 -n 5 -w 2
done
echo "== gpu-check: exit $failed"
exit $failed
