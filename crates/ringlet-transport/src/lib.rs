//! Byte transport between ring neighbours.
//!
//! Collective algorithms (crate `ringlet`) are written against [`Link`]: a non-blocking duplex of
//! bytes to the next rank and from the previous one, plus a bounded wait. This crate owns the TCP
//! implementation ([`TcpLink`]) and how a ring of them is formed ([`form_ring`]): each rank
//! listens, publishes its address in the rendezvous store, connects to its successor and accepts
//! its predecessor, every connection authenticated with the job token; and which interface it
//! uses ([`iface`], `RINGLET_SOCKET_IFNAME`). Framing, validation and
//! what the bytes mean belong to the algorithms, not here.

pub mod iface;
mod setup;
mod tcp;

pub use setup::{form_ring, RingOptions};
pub use tcp::TcpLink;

use ringlet_core::error::PeerId;
use ringlet_core::Result;
use std::io::IoSlice;
use std::time::Instant;

/// What [`Link::wait`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Readiness {
    /// Something may be read, or written, without blocking.
    Ready,
    /// The deadline passed first.
    TimedOut,
}

/// A non-blocking byte duplex to the ring neighbours: bytes go to the next rank
/// (`rank + 1 mod n`) and come from the previous one. Errors name the neighbour at fault.
pub trait Link: Send {
    fn rank(&self) -> usize;
    fn world_size(&self) -> usize;
    /// This rank, with the address its neighbours know it by.
    fn local(&self) -> &PeerId;
    /// The rank bytes are sent to.
    fn next(&self) -> &PeerId;
    /// The rank bytes come from.
    fn prev(&self) -> &PeerId;
    /// Writes what it can of `bufs` without blocking; `Ok(0)` when nothing could be written now.
    fn send(&mut self, bufs: &[IoSlice<'_>]) -> Result<usize>;
    /// Reads what is available into `buf` without blocking; `Ok(0)` when nothing is available now.
    /// The peer closing the connection is an error (`PeerLost`), never `Ok(0)`.
    fn recv(&mut self, buf: &mut [u8]) -> Result<usize>;
    /// Blocks until a `recv` (if `want_recv`) or a `send` (if `want_send`) can make progress, a
    /// neighbour hangs up (an error naming it), or `deadline` passes.
    fn wait(&mut self, want_recv: bool, want_send: bool, deadline: Instant) -> Result<Readiness>;
}
