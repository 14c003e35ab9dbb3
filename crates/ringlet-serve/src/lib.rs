//! `ringlet-serve`: a model trained by `ringlet-train` scoring a live stream.
//!
//! - [`compute`]: what a replica scores on (the CPU, or one GPU: cuBLAS for the MLP, Burn's
//!   CUDA backend for the others in a `cuda` build);
//! - [`engine`]: what the service needs from a stream engine (a small trait, so that NATS
//!   JetStream or Kafka can follow);
//! - [`redis_streams`]: that trait on Redis Streams (consumer group, `XAUTOCLAIM`, an atomic
//!   write-then-acknowledge script);
//! - [`scorer`]: the model rebuilt from a checkpoint (mlp, cnn, transformer), scoring batches;
//! - [`versions`]: which checkpoint is served, verified like a resume, swapped when a newer one
//!   is committed, refused when corrupt; the `versions` listing;
//! - [`serve`]: the loop: micro-batches, dead letters, commits, latency.
//!
//! Nothing is lost and nothing is scored twice: a record is acknowledged in the same atomic step
//! that writes its prediction, and only while it is still this replica's; a replica that dies
//! leaves its records pending, and after `--claim-idle` another replica takes them over.

pub mod compute;
pub mod engine;
pub mod redis_streams;
pub mod scorer;
pub mod serve;
pub mod versions;
