//! CUDA for Ringlet, without needing CUDA to build or run: every library is loaded at run time
//! (cudarc's `dynamic-loading`), and its absence is a typed [`CudaError::NoCuda`], never a panic.
//!
//! Layers, bottom up (cudarc's `sys` → `result` → `safe` split):
//! - [`libs`]: finding and loading `libcuda`, `libnvrtc`, `libnccl`, `libcublas` — the search
//!   path, `RINGLET_{CUDA,NVRTC,NCCL,CUBLAS}_LIB`, CUDA 12 and 13 installs and pip wheels of
//!   either layout — before cudarc asks for them by name;
//! - [`device`]: the devices (name, compute capability, memory, PCI bus id);
//! - [`kernels`]: the reduction kernels of `kernels/reduce.cu`, and the compilation of any kernel
//!   source with NVRTC for a device's architecture (machine code, or PTX for a device newer than
//!   NVRTC knows), cached on disk;
//! - [`versions`]: what was found: each library's version, as it reports it, and its file;
//! - [`headers`]: CUDA's headers for NVRTC, those beside the NVRTC in use first;
//! - [`kernel_cache`]: compiled images on disk, sealed with a checksum;
//! - [`launch`]: the reduction kernels loaded on a device and launched on its stream, and loading
//!   other kernel sources on the same context with the same launch shape;
//! - [`gpu`]: typed device buffers, pinned host blocks, async copies and events on one stream;
//! - [`nccl`]: NCCL's entry points from the library found, typed results, and a communicator
//!   handle created non-blocking, polled and aborted.
//!
//! This crate holds what the collectives need. The trainer's own GPU code — cuBLAS's GEMM, the
//! model and optimizer kernels (`kernels/model.cu`, `kernels/optim.cu`) and the optimizers' CPU
//! references — lives in `ringlet-train`, built on [`libs`], [`kernels`] and [`launch`].

pub mod device;
pub mod error;
pub mod gpu;
pub mod headers;
pub mod kernel_cache;
pub mod kernels;
pub mod launch;
pub mod libs;
pub mod nccl;
pub mod versions;

pub use device::{devices, DeviceInfo};
pub use error::CudaError;
pub use gpu::{DeviceBuffer, Gpu, Pinned};
