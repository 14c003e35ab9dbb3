//! Byte links between the ranks of a job.
//!
//! Collective algorithms (crate `ringlet`) are written against [`Peers`]: non-blocking byte
//! streams to and from any other rank, named by rank, plus one bounded wait over several of them.
//! Two implementations plug in underneath:
//! - [`ProcessPeers`]: ranks in other processes, over authenticated TCP connections (one or
//!   several per peer, [`stripe`]), or over
//!   shared memory ([`shm`]) between ranks of one host. [`join`] listens, publishes our address
//!   in the rendezvous store and connects the ring (next and previous rank) at once; a link to
//!   any other rank is made when a schedule first names it, and cached. Every connection proves
//!   the job token and says which rank it is; strangers on our ports are refused and logged.
//!   [`iface`] picks the interface (`RINGLET_SOCKET_IFNAME`).
//! - [`MemPeers`]: every rank of a job as threads of one process, over bounded in-memory pipes,
//!   so that the engine, the schedules and failure handling are unit-tested without sockets.
//!
//! Framing, validation and what the bytes mean belong to the algorithms, not here.

mod accept;
pub mod iface;
mod mem;
mod process;
mod setup;
pub mod shm;
pub mod stripe;

pub use mem::{mem_world, MemPeers};
pub use process::{PeerInfo, ProcessPeers};
pub use setup::{addr_key, join, JoinOptions};

use ringlet_core::error::PeerId;
use ringlet_core::Result;
use std::io::IoSlice;
use std::time::{Duration, Instant};

/// What [`Peers::wait`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// Something may be read, or written, without blocking.
    Ready,
    /// The deadline passed first.
    TimedOut,
}

/// What a [`Peers::wait`] waits for on one peer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Interest {
    pub peer: usize,
    /// Wake when bytes from `peer` can be read.
    pub recv: bool,
    /// Wake when bytes to `peer` can be written.
    pub send: bool,
    /// Wake when `peer` closes the link we send on (the wait then fails naming it), even with
    /// nothing to send.
    pub hangup: bool,
}

/// Non-blocking byte streams to and from the other ranks of a job. The stream to a peer and the
/// stream from it are independent (each keeps its own order and buffers); bytes sent to a peer
/// arrive in order and complete, or the peer is reported lost. Errors name the peer at fault.
pub trait Peers: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// This rank, with the address the others know it by.
    fn local(&self) -> &PeerId;
    /// Rank `rank`, with the address it is known by.
    fn peer(&self, rank: usize) -> PeerId;
    /// Makes sure we can send to each of `peers` (connecting, and proving who we are, where
    /// needed), within `timeout` (the clock is read only if a link must be made: this is called
    /// at the start of every collective). Streams *from* peers arrive when they connect to us;
    /// until then `recv` finds nothing and `wait` wakes when one arrives.
    fn connect(&mut self, peers: &[usize], timeout: Duration) -> Result<()>;
    /// Writes what it can of `bufs` to `peer` without blocking; `Ok(0)` when nothing could be
    /// written now. `connect` must have been called for `peer`.
    fn send(&mut self, peer: usize, bufs: &[IoSlice<'_>]) -> Result<usize>;
    /// Reads what is available from `peer` into `buf` without blocking; `Ok(0)` when nothing is
    /// available now. The peer closing its stream is an error (`PeerLost`), never `Ok(0)`.
    fn recv(&mut self, peer: usize, buf: &mut [u8]) -> Result<usize>;
    /// Blocks until one of `interests` can make progress, a peer we send to hangs up (an error
    /// naming it), or `deadline` passes.
    fn wait(&mut self, interests: &[Interest], deadline: Instant) -> Result<Readiness>;
}
