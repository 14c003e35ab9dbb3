//! The rendezvous store: a small key-value store over authenticated TCP that the ranks of a job
//! use to find each other (who listens where, who has arrived). Rank 0 or the launcher runs a
//! [`StoreServer`]; every rank talks to it through a [`StoreClient`].
//!
//! This crate owns the store's wire protocol (requests and replies after the job-token handshake,
//! as `ringlet_core::msg` frames), the server's defences against whatever else connects to its
//! port, and the client's deadline discipline: no call blocks past its deadline (plus a small
//! margin for the reply to travel), and every error names the store's `host:port`.

mod client;
mod limits;
mod protocol;
mod server;

pub use client::{lookup, StoreClient};
pub use protocol::{MAX_KEY_LEN, MAX_VALUE_LEN};
pub use server::{ServerConfig, StoreServer};

/// The key under which the survivors of a failure publish epoch `epoch`'s members (first-epoch
/// ranks, `0,2,3`), under the job's first communicator name `base` (`world` by default): written
/// by `ringlet`'s `Communicator::shrink`, read by `ringrun` to stop the ranks left out.
pub fn epoch_members_key(base: &str, epoch: u64) -> String {
    format!("{base}/epoch/{epoch}/members")
}

#[cfg(test)]
mod tests;
