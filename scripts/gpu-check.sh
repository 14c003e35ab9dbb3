#!/usr/bin/env bash
# The GPU checks, in one call on a machine with an NVIDIA GPU and its driver, using binaries
# built elsewhere and carried (that machine needs no Rust and no network):
#
#   cargo build --release            # here, and the GPU model's test binary:
#   cargo test --release -p ringlet-train --lib --no-run
#   scripts/gpu-check.sh [BIN_DIR]   # on the GPU machine, from the repository root; BIN_DIR:
#                                    # where the binaries are (default target/release)
#
# NVRTC and CUDA's headers come from a CUDA install or pip's nvidia-cuda-nvrtc-cu12 and
# nvidia-cuda-runtime-cu12 (found by themselves; RINGLET_NVRTC_LIB / RINGLET_CUDA_INCLUDE
# otherwise). Runs:
#   1. ringlet-gpu-check: the reduction kernels of kernels/ vs their CPU reference on fresh random
#      data (f32, f16, bf16, f64, i32, i64, u8), bit for bit; the reduction kernel's bandwidth
#      against a device-to-device copy (target >= 85%). The optimizer kernels (SGD and AdamW) are
#      checked bit for bit in step 4, by ringlet-train's gpu tests.
#   2. NCCL with world size 1: ringlet-bench --backend nccl, all_reduce/broadcast/all_gather/
#      reduce_scatter on device buffers, every element checked. One GPU cannot host a multi-rank
#      NCCL ring (NCCL refuses two ranks on one device), so no multi-rank NCCL figure comes from it.
#   3. The TCP fallback for device buffers across 2 and 4 processes sharing the GPU:
#      ringlet-bench --device (chunks staged through pinned blocks, reduced by the kernels),
#      float sum, half sum, bfloat16 max, and broadcast; every element checked; busbw.
#   4. The training binary's GPU model (cuBLAS + kernels/model.cu): ringlet-train's GPU tests
#      (forward, layer-by-layer gradients and both optimizers against the CPU model; the optimizer
#      kernels against their CPU references on fresh random data, bit for bit); training on
#      the embedded digits on the GPU and on the CPU (accuracies side by side); 2 ranks sharing the
#      GPU; a mixed job (rank 0 on the GPU, rank 1 on the CPU, --balance auto); and throughput of
#      a larger model on the GPU vs the CPU (synthetic data). Needs cuBLAS: a CUDA install, or
#      pip's nvidia-cublas-cu12, or RINGLET_CUBLAS_LIB.
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
unit=$(ls -t "$bin"/deps/ringlet_train-* 2>/dev/null | grep -v '\.d$' | head -1)
if [ -n "$unit" ]; then
    step "GPU model vs CPU model (ringlet-train's gpu tests)" "$unit" gpu:: --nocapture
else
    echo "== no ringlet-train test binary in $bin/deps (cargo test --release -p ringlet-train --lib --no-run)"
    [ $failed -eq 0 ] && failed=1
fi
for device in gpu cpu; do
    step "training on the digits, 1 rank, --device $device" "$bin/ringrun" -n 1 -- "$bin/ringlet-train" --device $device
done
step "training, 2 ranks sharing the GPU" "$bin/ringrun" -n 2 -- "$bin/ringlet-train" --device gpu
step "mixed devices: rank 0 GPU, rank 1 CPU, --balance auto" "$bin/ringrun" -n 2 -- sh -c \
    'if [ "$RANK" = 0 ]; then export RINGLET_DEVICE=gpu; else export RINGLET_DEVICE=cpu; fi; exec "$0" "$@"' \
    "$bin/ringlet-train" --dataset synthetic:200000 --hidden 1024,1024 --global-batch 2048 --steps 60 --balance auto
for device in gpu cpu; do
    step "throughput, 1 rank, --device $device, hidden 2048,2048, batch 4096" "$bin/ringrun" -n 1 -- "$bin/ringlet-train" \
        --device $device --dataset synthetic:200000 --hidden 2048,2048 --global-batch 4096 --steps 30
done
echo "== gpu-check: exit $failed"
exit $failed
