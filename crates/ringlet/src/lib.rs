//! Collectives for data-parallel training.
//!
//! A [`Communicator`] joins a job (from the torchrun-style environment or an explicit
//! [`Config`]) and runs `all_reduce`, `all_reduce_async`, `broadcast`, `all_gather`,
//! `reduce_scatter` and `barrier` on host slices of any [`Element`] type.
//!
//! Layers, top down:
//! - [`comm`]: the communicator, call ordering, the asynchronous handle;
//! - [`algo`]: which algorithm an all-reduce runs (by size, world size and host layout, or
//!   `RINGLET_ALGO`); [`cost`]: their alpha–beta model, read off the schedules, and its fit;
//! - [`schedule`]: each algorithm as data (which chunk goes to which peer at which step);
//! - [`engine`]: executes a schedule over [`ringlet_transport::Peers`], checks every frame,
//!   enforces deadlines and spreads failures to every rank taking part;
//! - [`card`]: what ranks tell each other when they join (addresses, settings to agree on);
//! - [`wire`]: the frame header;
//! - [`memory`], [`staged`]: the buffer as the engine sees it — a host slice, or a device buffer
//!   staged through host blocks (the TCP fallback for device buffers);
//! - [`gpu`]: a CUDA GPU as the staging device (pinned blocks, copies and kernels on its stream);
//! - [`nccl`]: [`NcclCommunicator`], NCCL's collectives on device buffers, with deadlines;
//! - [`topology`]: every rank's devices, and the backend chosen once for all;
//! - `mpi_boot` (the `mpi` feature): `Communicator::from_mpi`, bootstrap under `mpirun`.
//!
//! ```no_run
//! use ringlet::{Communicator, ReduceOp};
//! let comm = Communicator::from_env()?;
//! let mut grads = vec![1.0f32; 1 << 20];
//! comm.all_reduce(&mut grads, ReduceOp::Avg)?;
//! # Ok::<(), ringlet::Error>(())
//! ```

pub mod algo;
pub mod bootstrap;
pub mod card;
pub mod comm;
pub mod config;
pub mod cost;
pub mod engine;
pub mod gpu;
pub mod memory;
#[cfg(feature = "mpi")]
pub mod mpi_boot;
pub mod nccl;
pub mod schedule;
pub mod staged;
pub mod topology;
pub mod wire;

pub use comm::{AllReduceHandle, Communicator, REPLACEMENT_ENV};
pub use config::Config;
/// The MPI bindings `Communicator::from_mpi` takes (the `mpi` feature).
#[cfg(feature = "mpi")]
pub use mpi;
pub use nccl::NcclCommunicator;
pub use ringlet_core::half_types::{bf16, f16};
pub use ringlet_core::{DType, Element, Error, JobToken, ReduceOp, Result};
/// CUDA as Ringlet loads it (at run time; absent CUDA is an error value, never a panic).
pub use ringlet_cuda as cuda;
