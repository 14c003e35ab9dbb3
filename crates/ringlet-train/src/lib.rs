//! Data-parallel training on Ringlet without Python.
//!
//! - [`data`]: datasets — the embedded 8×8 digits, deterministic synthetic data, MNIST-format IDX;
//! - [`model`]: the MLP classifier, forward and backward written once over [`tensor::Backend`];
//! - [`tensor`]: the operations it is written in, on the CPU (GEMM by `matrixmultiply`);
//! - [`gpu`]: the same on a GPU (cuBLAS and the kernels of `kernels/model.cu`, through cudarc);
//! - [`train`]: the MLP's loop, built from `ringlet-ddp`'s pieces (sampler, bucketed all-reduce
//!   overlapping backward, balancing, checkpoints, metrics).

pub mod burn_models;
pub mod data;
pub mod gpu;
pub mod model;
pub mod models;
pub mod tensor;
pub mod train;
