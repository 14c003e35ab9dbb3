//! The collective algorithms, as data: which chunks a rank sends to which peer, which it expects
//! from which peer (in order), and what it does with each. The [`engine`](crate::engine)
//! executes any schedule over any [`Peers`](ringlet_transport::Peers); nothing here touches a
//! socket or a buffer.
//!
//! Every schedule keeps two rules the engine relies on: the ranks a collective sends to form a
//! strongly connected graph (so an abort notice, passed to every rank one sends to, reaches every
//! rank), and a received chunk never overwrites a region whose send is still queued (the engine
//! also holds a reduction back until such sends are out, for exchanges where both sides send the
//! same region at once).
//!
//! Ring algorithms use the usual numbering: at step `g` rank `r` sends segment `r - g` and
//! receives segment `r - g - 1` (mod n). Every received chunk is forwarded at the next step, so a
//! chunk starts its next hop as soon as it has arrived and been reduced — the pipeline is per
//! chunk, not per segment.

use ringlet_core::ReduceOp;
use std::ops::Range;

/// One frame's worth of the caller's buffer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Xfer {
    /// The rank the frame goes to (a send) or comes from (a receive).
    pub peer: usize,
    pub step: u32,
    pub chunk: u32,
    /// Elements of the buffer the frame carries.
    pub range: Range<usize>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Apply {
    /// `buf[range] = buf[range] (op) payload`.
    Reduce,
    /// `buf[range] = payload (op) buf[range]`: the lower rank's operand stays on the left, so two
    /// ranks that reduce each other's data get the same bits even where `op` is not commutative
    /// bit for bit (NaN payloads, `min(0.0, -0.0)`).
    ReduceRev,
    /// `buf[range] = payload`.
    Copy,
}

#[derive(Clone, Debug)]
pub struct RecvSpec {
    pub xfer: Xfer,
    pub apply: Apply,
    /// This chunk is final: divide by the world size (for `Avg`).
    pub finish_avg: bool,
    /// Send the chunk on once applied, in this order (to several peers where the chunk is
    /// final and others still lack it).
    pub forwards: Vec<Xfer>,
}

#[derive(Clone, Debug)]
pub struct Schedule {
    /// Sent at the start, in order.
    pub sends: Vec<Xfer>,
    /// Expected, in this order (each from its own peer).
    pub recvs: Vec<RecvSpec>,
    /// The pairwise op for `Reduce` (`Avg` reduces as `Sum`).
    pub op: ReduceOp,
    /// Scratch chunks for payloads that cannot land in place yet, and their length in elements.
    pub slots: usize,
    pub slot_len: usize,
}

impl Schedule {
    /// A schedule of reductions with `op` (`Avg` reduces as `Sum`) and two scratch slots of
    /// `slot_len` elements (at least one): a chunk waiting for its reduction while the next one
    /// lands.
    fn reducing(sends: Vec<Xfer>, recvs: Vec<RecvSpec>, op: ReduceOp, slot_len: usize) -> Schedule {
        Schedule {
            sends,
            recvs,
            op: op.pairwise(),
            slots: 2,
            slot_len: slot_len.max(1),
        }
    }

    pub fn scratch_len(&self) -> usize {
        self.slots * self.slot_len
    }

    /// The ranks this schedule exchanges frames with, ascending.
    pub fn peers(&self) -> Vec<usize> {
        let mut peers: Vec<usize> = self.send_peers();
        peers.extend(self.recvs.iter().map(|r| r.xfer.peer));
        peers.sort_unstable();
        peers.dedup();
        peers
    }

    /// The ranks this schedule sends to, ascending.
    pub fn send_peers(&self) -> Vec<usize> {
        let forwards = self.recvs.iter().flat_map(|r| &r.forwards);
        let mut peers: Vec<usize> = self.sends.iter().chain(forwards).map(|x| x.peer).collect();
        peers.sort_unstable();
        peers.dedup();
        peers
    }

    /// The most elements any one frame carries.
    pub fn longest_transfer(&self) -> usize {
        let sends = self.sends.iter().map(|x| x.range.len());
        let recvs = self.recvs.iter().map(|r| r.xfer.range.len());
        sends.chain(recvs).max().unwrap_or(0)
    }
}

/// `count` elements cut into `n` near-equal contiguous segments (the first `count % n` one longer).
pub fn segments(count: usize, n: usize) -> Vec<Range<usize>> {
    let (base, rem) = (count / n, count % n);
    let mut start = 0;
    (0..n)
        .map(|i| {
            let len = base + usize::from(i < rem);
            let r = start..start + len;
            start += len;
            r
        })
        .collect()
}

/// Chunk `c` of `seg`, `chunk` elements each (possibly empty at the end).
pub(crate) fn chunk_of(seg: &Range<usize>, c: usize, chunk: usize) -> Range<usize> {
    let start = (seg.start + c * chunk).min(seg.end);
    start..(start + chunk).min(seg.end)
}

/// The chunk for pipelining `len` elements: `max_chunk`, or less (down to a quarter of it) so that
/// a short buffer is still cut into about four chunks and its hops overlap. Measured on two
/// loopback ranks: at 2 MiB, 256 KiB chunks gave 3.7–5.2 GB/s busbw against 3.3–3.6 with 1 MiB;
/// from 8 MiB, 1 MiB chunks were best.
pub fn pipeline_chunk(len: usize, max_chunk: usize) -> usize {
    (len / 4).clamp((max_chunk / 4).max(1), max_chunk.max(1))
}

/// Every segment is cut into the same number of chunks (at least one, so that even an empty
/// call exchanges a frame and a mismatched peer is noticed).
pub(crate) fn chunks_per_segment(segs: &[Range<usize>], chunk: usize) -> usize {
    let longest = segs.iter().map(|s| s.len()).max().unwrap_or(0);
    longest.div_ceil(chunk).max(1)
}

pub(crate) fn md(a: isize, n: usize) -> usize {
    a.rem_euclid(n as isize) as usize
}

mod doubling;
mod halving;
mod ring;
#[cfg(test)]
mod tests;
mod two_level;

pub use doubling::doubling_all_reduce;
pub use halving::halving_all_reduce;
pub use ring::{chain_broadcast, ring_all_gather, ring_all_reduce, ring_reduce_scatter};
pub use two_level::two_level_all_reduce;
