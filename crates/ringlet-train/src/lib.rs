//! Data-parallel training on Ringlet without Python.
//!
//! - [`data`]: datasets — the embedded 8×8 digits, deterministic synthetic data, MNIST-format IDX;
//! - [`shards`]: sharded datasets (safetensors shards and an index), the converter, the shard
//!   map saying which hosts hold which shards, and reading a rank's shards;
//! - [`model`]: the MLP classifier, forward and backward written once over [`tensor::Backend`];
//! - [`tensor`]: the operations it is written in, on the CPU (GEMM by `matrixmultiply`);
//! - [`gpu`]: the same on a GPU (through cudarc): [`gpu::blas`], cuBLAS's GEMM for row-major
//!   matrices, and [`gpu::kernels`], the kernels of `kernels/model.cu` and `kernels/optim.cu`
//!   (compiled and cached by `ringlet-cuda`);
//! - [`optim`]: SGD with momentum and AdamW, their hyper-parameters and CPU updates (the
//!   references the optimizer kernels match bit for bit);
//! - [`train`]: the MLP's loop, built from `ringlet-ddp`'s pieces (sampler, bucketed all-reduce
//!   overlapping backward, balancing, checkpoints, metrics);
//! - [`grad_path`]: how its gradients are summed, decided once for the job: NCCL on device
//!   buffers, or the TCP ring from host buckets (CPU ranks) and device buckets (GPU ranks).

pub mod burn_models;
pub mod data;
pub mod gpu;
pub mod grad_path;
pub mod model;
pub mod models;
pub mod optim;
pub mod shards;
pub mod tensor;
pub mod train;
