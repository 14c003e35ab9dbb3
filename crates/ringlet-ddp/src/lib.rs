//! Data-parallel training as a library, for any model and any framework.
//!
//! The pieces a training program needs around its forward and backward passes, each usable on
//! its own:
//!
//! - [`sampler`]: one global sample order per epoch from a seed; each rank's contiguous slice of
//!   every step by the current local batch sizes; a global cursor that resumes on any world
//!   size; [`locality`]: each rank's samples from shards its host holds instead.
//! - [`grad_sync`]: gradients all-reduced in buckets (reverse parameter order, a small first
//!   bucket) with `all_reduce_async`, starting while backward goes on; sum-then-divide by the
//!   global batch makes n ranks with any split compute the update one process would.
//! - [`balance`]: how the global batch is split over ranks of different speed (`off`,
//!   `static:w0,w1,..`, `auto`: calibrated, then re-balanced from measured compute times).
//! - [`checkpoint`]: atomic, verified safetensors + manifest checkpoints on shared storage
//!   (Python's `safetensors` reads them); [`resume`]: the collective protocol around them (rank 0
//!   writes, every rank resumes from the same one, numbers from the file checked).
//! - [`agree`](mod@agree): a failure on one rank fails every rank at once, naming it; the
//!   launcher's restart count.
//! - [`membership`]: going on without a lost rank — the survivors re-form, agree on the newest
//!   completed step, the ranks behind take the state of one ahead, and the interrupted step is
//!   redone over the survivors (`ringrun --min-ranks`); replacements join back.
//! - [`run_state`]: what a loop carries across communicators apart from its model, and its
//!   catch-up after a membership change.
//! - [`report`]: per-step metrics as JSON lines, the progress bar, throughput figures.
//! - [`local_world`]: several ranks as threads of one process, over real loopback sockets (for
//!   tests of code built on these pieces).
//!
//! It knows nothing of models: parameters are names and element counts, gradients are `f32`
//! slices handed over one parameter at a time. `ringlet-burn` builds Burn training on it, and
//! `ringlet-train`'s hand-written MLP uses it the same way.
//!
//! # Example
//!
//! Linear regression `y = w·x` trained data-parallel, one process per rank (`ringrun -n 4 --
//! my-program`): each rank computes the gradient sum of its slice of every global batch, the
//! sums are all-reduced, and every rank applies the same update.
//!
//! ```no_run
//! use ringlet::Communicator;
//! use ringlet_ddp::balance::{Balance, Balancer};
//! use ringlet_ddp::grad_sync::{GradSync, ParamSpec, SyncOptions};
//! use ringlet_ddp::sampler::Sampler;
//!
//! fn main() -> Result<(), ringlet::Error> {
//!     let comm = Communicator::from_env()?;
//!     // The data set: 1000 samples of 4 features, y = x · [1, 2, 3, 4].
//!     let xs: Vec<[f32; 4]> = (0..1000).map(|i| [i as f32 / 1000.0, 0.5, -1.0, (i % 7) as f32 / 7.0]).collect();
//!     let ys: Vec<f32> = xs.iter().map(|x| x[0] + 2.0 * x[1] + 3.0 * x[2] + 4.0 * x[3]).collect();
//!     let global = 100;
//!     let mut w = [0.0f32; 4];
//!     let mut sampler = Sampler::new(7, xs.len(), global)?;
//!     let balancer = Balancer::new(&comm, &Balance::Off, global, 10, None, |_| Ok(1.0))?;
//!     let opts = SyncOptions { scalars: 1, ..SyncOptions::default() };
//!     let mut sync = GradSync::new(&comm, vec![ParamSpec::new("w", 4)], opts)?;
//!     for step in 0..200 {
//!         let mine = sampler.next_step(balancer.batches(), comm.rank())?;
//!         // Sums over this rank's samples (not means): the all-reduce adds them up.
//!         let (mut grad, mut loss) = ([0.0f32; 4], 0.0f32);
//!         for &i in mine {
//!             let err: f32 = w.iter().zip(&xs[i]).map(|(w, x)| w * x).sum::<f32>() - ys[i];
//!             loss += err * err / 2.0;
//!             for k in 0..4 {
//!                 grad[k] += err * xs[i][k];
//!             }
//!         }
//!         sync.set_scalar(0, loss)?;
//!         sync.push(0, &grad)?;
//!         sync.finish()?;
//!         // Divide by the global batch: the update one process makes with the whole batch.
//!         for (w, g) in w.iter_mut().zip(sync.grad(0)) {
//!             *w -= 0.5 * g / global as f32;
//!         }
//!         if comm.rank() == 0 && step % 50 == 0 {
//!             println!("step {step}: loss {:.5}", sync.scalar(0) / global as f32);
//!         }
//!     }
//!     Ok(())
//! }
//! ```

pub mod agree;
pub mod balance;
pub mod checkpoint;
pub mod grad_sync;
pub mod local_world;
pub mod locality;
pub mod membership;
pub mod report;
pub mod resume;
pub mod run_state;
pub mod sampler;

pub use agree::agree;
pub use balance::{Balance, Balancer};
pub use grad_sync::{GradSync, ParamSpec, SyncOptions};
pub use membership::Survival;
pub use report::{Progress, StepReport, Timing};
pub use resume::{CheckpointOptions, JobCheckpoints, Resume};
pub use run_state::RunState;
pub use sampler::Sampler;
