//! Data-parallel training of [Burn](burn) models on Ringlet.
//!
//! Any [`burn::module::Module`] trains on it: [`DataParallel`] broadcasts the parameters from
//! rank 0 (or a checkpoint loads them on every rank), all-reduces the gradients of each step in
//! buckets through `ringlet-ddp`, and hands them back as Burn's `GradientsParams`, divided by the
//! global batch, so Burn's own optimizers (SGD, AdamW, ...) step the model. [`Stages`] overlaps
//! the all-reduce with backward for models written as a sequence of stages. [`params`] and
//! [`optim_state`] turn the model and the optimizer's state into named tensors for
//! `ringlet-ddp`'s checkpoints (Python's `safetensors` reads them).
//!
//! The model runs on whatever Burn device it was built on: the pure-Rust CPU backend (`flex`)
//! always, CUDA with this crate's `cuda` feature (Burn's CUDA runtime loads the driver at run
//! time, so the build needs no CUDA; Burn 0.22's `cubecl-cuda` does download an LLVM bundle while
//! it builds, so that feature builds only where the network allows it). The all-reduce works on
//! host copies of the gradients.
//!
//! # Example
//!
//! A user's own model trained with [`fit`] (`examples/bring_your_own_model.rs`; run it with
//! `ringrun -n 2 -- target/release/examples/bring_your_own_model`):
//!
#![doc = concat!("```no_run\n", include_str!("../examples/bring_your_own_model.rs"), "\n```")]

pub mod optim_state;
pub mod params;
pub mod sync;
pub mod trainer;

pub use params::ParamInfo;
pub use sync::{DataParallel, Stages};
pub use trainer::{fit, fit_then, Objective, Samples, TrainOptions, TrainSummary};
