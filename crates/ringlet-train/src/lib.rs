//! Data-parallel training on Ringlet without Python.
//!
//! - [`data`]: datasets — the embedded 8×8 digits, deterministic synthetic data, MNIST-format IDX;
//! - [`model`]: the MLP classifier, forward and backward written once over [`tensor::Backend`];
//! - [`tensor`]: the operations it is written in, on the CPU (GEMM by `matrixmultiply`);
//! - [`gpu`]: the same on a GPU (cuBLAS and the kernels of `kernels/model.cu`, through cudarc);
//! - [`balance`]: how the global batch is split over ranks of different speed;
//! - [`train`]: the loop — exact data parallelism, bucketed all-reduce overlapping backward,
//!   re-balancing, checkpoints, metrics;
//! - [`checkpoint`]: atomic, verified, resumable checkpoints on shared storage (safetensors +
//!   a manifest written last).

pub mod balance;
pub mod checkpoint;
pub mod data;
pub mod gpu;
pub mod model;
pub mod tensor;
pub mod train;
