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
    /// Send the chunk on once applied.
    pub forward: Option<Xfer>,
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
        let forwards = self.recvs.iter().filter_map(|r| r.forward.as_ref());
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
fn chunk_of(seg: &Range<usize>, c: usize, chunk: usize) -> Range<usize> {
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
fn chunks_per_segment(segs: &[Range<usize>], chunk: usize) -> usize {
    let longest = segs.iter().map(|s| s.len()).max().unwrap_or(0);
    longest.div_ceil(chunk).max(1)
}

fn md(a: isize, n: usize) -> usize {
    a.rem_euclid(n as isize) as usize
}

/// Ring all-reduce in place: `n - 1` reduce-scatter steps, then `n - 1` all-gather steps.
/// With `op == Avg` each fully reduced chunk is divided once, by the rank that finished it.
pub fn ring_all_reduce(
    count: usize,
    rank: usize,
    n: usize,
    chunk: usize,
    op: ReduceOp,
) -> Schedule {
    let segs = segments(count, n);
    ring_steps(
        &segs,
        rank,
        pipelined(&segs, chunk),
        op,
        0,
        2 * (n - 1),
        n - 1,
    )
}

/// Ring reduce-scatter in place over `n` equal blocks: afterwards block `rank` holds the
/// reduction. (Shifted by one so that the last step's result is the rank's own block.)
pub fn ring_reduce_scatter(
    count: usize,
    rank: usize,
    n: usize,
    chunk: usize,
    op: ReduceOp,
) -> Schedule {
    let segs = segments(count, n);
    ring_steps(&segs, rank, pipelined(&segs, chunk), op, 1, n - 1, n - 1)
}

/// Ring all-gather in place: block `rank` is already there, the others arrive.
pub fn ring_all_gather(count: usize, rank: usize, n: usize, chunk: usize) -> Schedule {
    let segs = segments(count, n);
    ring_steps(
        &segs,
        rank,
        pipelined(&segs, chunk),
        ReduceOp::Sum,
        0,
        n - 1,
        0,
    )
}

/// Recursive doubling all-reduce in place: ⌈log2 n⌉ exchanges of the whole buffer instead of the
/// ring's 2(n − 1) hops, for buffers small enough that latency, not bandwidth, sets the time.
///
/// With `p` the largest power of two not above `n`, the first `2(n − p)` ranks pair up: each odd
/// one hands its buffer to the even one below it (step 0) and gets the result back at the end,
/// two hops more than the others. The `p` remaining ranks exchange with the rank whose position
/// differs in bit `k` at step `k + 1`, each reducing with the lower rank's data on the left, so
/// both ends of every exchange (and so every rank) hold the same bits. Pipelined by chunk: a
/// chunk goes to the next partner as soon as it is reduced.
pub fn doubling_all_reduce(
    count: usize,
    rank: usize,
    n: usize,
    chunk: usize,
    op: ReduceOp,
) -> Schedule {
    let p = 1usize << (usize::BITS - 1 - n.leading_zeros());
    let rem = n - p;
    let levels = p.trailing_zeros() as usize;
    let all = 0..count;
    let chunk = chunk.max(1);
    let nch = count.div_ceil(chunk).max(1);
    let xfer = |peer: usize, step: usize, c: usize| Xfer {
        peer,
        step: step as u32,
        chunk: c as u32,
        range: chunk_of(&all, c, chunk),
    };
    let recv = |xfer: Xfer, apply: Apply, finish_avg: bool, forward: Option<Xfer>| RecvSpec {
        xfer,
        apply,
        finish_avg,
        forward,
    };
    let last = levels + 1;
    let slot_len = chunk.min(count).max(1);
    if rank < 2 * rem && rank % 2 == 1 {
        // Folded into rank − 1: hand it our buffer, take the result.
        let sends = (0..nch).map(|c| xfer(rank - 1, 0, c)).collect();
        let recvs = (0..nch)
            .map(|c| recv(xfer(rank - 1, last, c), Apply::Copy, false, None))
            .collect();
        return Schedule {
            sends,
            recvs,
            op: op.pairwise(),
            slots: 2,
            slot_len,
        };
    }
    let v = if rank < 2 * rem { rank / 2 } else { rank - rem };
    let real = |v: usize| if v < rem { 2 * v } else { v + rem };
    let partner = |k: usize| real(v ^ (1 << k));
    let extra = (rank < 2 * rem).then_some(rank + 1);
    let mut recvs = Vec::with_capacity(nch * (levels + 2));
    if let Some(x) = extra {
        for c in 0..nch {
            let forward = Some(xfer(partner(0), 1, c));
            recvs.push(recv(xfer(x, 0, c), Apply::Reduce, false, forward));
        }
    }
    for k in 0..levels {
        let q = partner(k);
        let apply = if rank < q {
            Apply::Reduce
        } else {
            Apply::ReduceRev
        };
        for c in 0..nch {
            let forward = if k + 1 < levels {
                Some(xfer(partner(k + 1), k + 2, c))
            } else {
                extra.map(|x| xfer(x, last, c))
            };
            let avg = k + 1 == levels && op == ReduceOp::Avg;
            recvs.push(recv(xfer(q, k + 1, c), apply, avg, forward));
        }
    }
    let sends = if extra.is_some() {
        Vec::new()
    } else {
        (0..nch).map(|c| xfer(partner(0), 1, c)).collect()
    };
    Schedule {
        sends,
        recvs,
        op: op.pairwise(),
        slots: 2,
        slot_len,
    }
}

fn pipelined(segs: &[Range<usize>], max_chunk: usize) -> usize {
    pipeline_chunk(segs.iter().map(|s| s.len()).max().unwrap_or(0), max_chunk)
}

/// The common ring: `steps` steps; at step `g` the rank sends segment `rank - g - shift` and
/// receives segment `rank - g - shift - 1`, reducing it for the first `reduce_steps` steps and
/// copying it after.
fn ring_steps(
    segs: &[Range<usize>],
    rank: usize,
    chunk: usize,
    op: ReduceOp,
    shift: usize,
    steps: usize,
    reduce_steps: usize,
) -> Schedule {
    let n = segs.len();
    let nch = chunks_per_segment(segs, chunk);
    let (next, prev) = ((rank + 1) % n, (rank + n - 1) % n);
    let seg_at = |g: usize| &segs[md(rank as isize - (g + shift) as isize, n)];
    let xfer = |peer: usize, g: usize, c: usize, seg: &Range<usize>| Xfer {
        peer,
        step: g as u32,
        chunk: c as u32,
        range: chunk_of(seg, c, chunk),
    };
    let sends = (0..nch).map(|c| xfer(next, 0, c, seg_at(0))).collect();
    let mut recvs = Vec::with_capacity(steps * nch);
    for g in 0..steps {
        let seg = seg_at(g + 1);
        for c in 0..nch {
            recvs.push(RecvSpec {
                xfer: xfer(prev, g, c, seg),
                apply: if g < reduce_steps {
                    Apply::Reduce
                } else {
                    Apply::Copy
                },
                finish_avg: g + 1 == reduce_steps && op == ReduceOp::Avg,
                forward: (g + 1 < steps).then(|| xfer(next, g + 1, c, seg)),
            });
        }
    }
    Schedule {
        sends,
        recvs,
        op: op.pairwise(),
        slots: 2,
        slot_len: chunk
            .min(segs.iter().map(|s| s.len()).max().unwrap_or(0))
            .max(1),
    }
}

/// Pipelined chain from `root` around the ring: each rank forwards every chunk as soon as it has
/// it, and the last one sends the root an empty acknowledgement.
pub fn chain_broadcast(count: usize, rank: usize, n: usize, chunk: usize, root: usize) -> Schedule {
    let all = 0..count;
    let chunk = pipeline_chunk(count, chunk);
    let nch = count.div_ceil(chunk).max(1);
    let pos = md(rank as isize - root as isize, n);
    let (next, prev) = ((rank + 1) % n, (rank + n - 1) % n);
    let xfer = |peer: usize, c: usize| Xfer {
        peer,
        step: 0,
        chunk: c as u32,
        range: chunk_of(&all, c, chunk),
    };
    // The last rank of the chain acknowledges to the root, whose call therefore fails too when
    // a peer disagrees (it would otherwise only send, and never learn).
    let ack = |peer: usize| Xfer {
        peer,
        step: 1,
        chunk: 0,
        range: 0..0,
    };
    let (sends, recvs) = if pos == 0 {
        let recvs = vec![RecvSpec {
            xfer: ack(prev),
            apply: Apply::Copy,
            finish_avg: false,
            forward: None,
        }];
        ((0..nch).map(|c| xfer(next, c)).collect(), recvs)
    } else {
        let recvs = (0..nch)
            .map(|c| RecvSpec {
                xfer: xfer(prev, c),
                apply: Apply::Copy,
                finish_avg: false,
                forward: if pos + 1 < n {
                    Some(xfer(next, c))
                } else {
                    (c + 1 == nch).then(|| ack(next))
                },
            })
            .collect();
        (Vec::new(), recvs)
    };
    Schedule {
        sends,
        recvs,
        op: ReduceOp::Sum,
        slots: 1,
        slot_len: chunk.min(count.max(1)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Simulates every rank's schedule on f64 buffers, moving frames between ranks through one
    /// queue per ordered pair, and returns the final buffers. Each rank takes its expected frames
    /// in order, from the peer each names; checks that every frame is exactly the one expected.
    fn simulate(scheds: &[Schedule], mut bufs: Vec<Vec<f64>>) -> Vec<Vec<f64>> {
        use std::collections::VecDeque;
        let n = scheds.len();
        type Wire = VecDeque<(u32, u32, Vec<f64>)>;
        let mut wires: Vec<Vec<Wire>> = vec![vec![VecDeque::new(); n]; n];
        let mut next_recv = vec![0usize; n];
        for (r, s) in scheds.iter().enumerate() {
            for x in &s.sends {
                assert_ne!(x.peer, r, "rank {r} sends to itself");
                let data = bufs[r][x.range.clone()].to_vec();
                wires[r][x.peer].push_back((x.step, x.chunk, data));
            }
        }
        let mut moved = true;
        while moved {
            moved = false;
            for r in 0..n {
                while let Some(spec) = scheds[r].recvs.get(next_recv[r]) {
                    let Some((step, chunk, data)) = wires[spec.xfer.peer][r].pop_front() else {
                        break;
                    };
                    assert_eq!(
                        (step, chunk),
                        (spec.xfer.step, spec.xfer.chunk),
                        "rank {r} frame order from rank {}",
                        spec.xfer.peer
                    );
                    assert_eq!(data.len(), spec.xfer.range.len());
                    let dst = &mut bufs[r][spec.xfer.range.clone()];
                    match spec.apply {
                        Apply::Copy => dst.copy_from_slice(&data),
                        // Exact sums of integers: the operand order of `ReduceRev` shows only
                        // with the real reducers (tests/in_process.rs).
                        Apply::Reduce | Apply::ReduceRev => {
                            dst.iter_mut().zip(&data).for_each(|(a, b)| *a += b)
                        }
                    }
                    if spec.finish_avg {
                        dst.iter_mut().for_each(|x| *x /= n as f64);
                    }
                    if let Some(f) = &spec.forward {
                        let data = bufs[r][f.range.clone()].to_vec();
                        wires[r][f.peer].push_back((f.step, f.chunk, data));
                    }
                    next_recv[r] += 1;
                    moved = true;
                }
            }
        }
        for r in 0..n {
            assert_eq!(
                next_recv[r],
                scheds[r].recvs.len(),
                "rank {r} got every frame"
            );
            for (q, wire) in wires[r].iter().enumerate() {
                assert!(
                    wire.is_empty(),
                    "rank {r} sent rank {q} frames it never took"
                );
            }
        }
        assert_send_graph_connected(scheds);
        bufs
    }

    /// An abort notice goes to every rank one sends to: from any rank, those edges must reach
    /// every other rank.
    fn assert_send_graph_connected(scheds: &[Schedule]) {
        let n = scheds.len();
        for start in 0..n {
            let mut seen = vec![false; n];
            let mut todo = vec![start];
            seen[start] = true;
            while let Some(r) = todo.pop() {
                for q in scheds[r].send_peers() {
                    if !seen[q] {
                        seen[q] = true;
                        todo.push(q);
                    }
                }
            }
            assert!(
                seen.iter().all(|&s| s),
                "notices from rank {start} miss some rank"
            );
        }
    }

    fn inputs(n: usize, count: usize) -> Vec<Vec<f64>> {
        (0..n)
            .map(|r| (0..count).map(|i| (r * 1000 + i) as f64).collect())
            .collect()
    }

    #[test]
    fn all_reduce_schedules_sum_and_average_for_many_shapes() {
        for n in 2..=5 {
            for count in [0, 1, n - 1, n + 1, 17, 64] {
                for chunk in [1, 3, 8, 1000] {
                    for op in [ReduceOp::Sum, ReduceOp::Avg] {
                        let scheds: Vec<_> = (0..n)
                            .map(|r| ring_all_reduce(count, r, n, chunk, op))
                            .collect();
                        let out = simulate(&scheds, inputs(n, count));
                        for (i, v) in out[0].iter().enumerate() {
                            let sum: f64 = (0..n).map(|r| (r * 1000 + i) as f64).sum();
                            let want = if op == ReduceOp::Avg {
                                sum / n as f64
                            } else {
                                sum
                            };
                            for b in &out {
                                assert_eq!(b[i], want, "n={n} count={count} chunk={chunk} {op}");
                            }
                            assert_eq!(*v, want);
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn doubling_sums_and_averages_for_every_world_size() {
        for n in 2..=9 {
            for count in [0, 1, 5, 64] {
                for chunk in [1, 3, 1000] {
                    for op in [ReduceOp::Sum, ReduceOp::Avg] {
                        let scheds: Vec<_> = (0..n)
                            .map(|r| doubling_all_reduce(count, r, n, chunk, op))
                            .collect();
                        let out = simulate(&scheds, inputs(n, count));
                        for i in 0..count {
                            let sum: f64 = (0..n).map(|r| (r * 1000 + i) as f64).sum();
                            let want = if op == ReduceOp::Avg {
                                sum / n as f64
                            } else {
                                sum
                            };
                            for (r, b) in out.iter().enumerate() {
                                assert_eq!(
                                    b[i], want,
                                    "n={n} count={count} chunk={chunk} {op} rank {r}"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn doubling_takes_log_hops() {
        // Frames a rank receives per chunk: ⌈log2 n⌉ exchanges, plus the fold for ranks that
        // hold a folded-in partner; the folded-in ranks receive once.
        for (n, hops) in [(2, [1, 1]), (4, [2, 2]), (8, [3, 3])] {
            for r in 0..n {
                let s = doubling_all_reduce(4, r, n, 4, ReduceOp::Sum);
                assert_eq!(s.recvs.len(), hops[r % 2], "n={n} rank {r}");
            }
        }
        let s = doubling_all_reduce(4, 0, 6, 4, ReduceOp::Sum);
        assert_eq!((s.recvs.len(), s.peers()), (3, vec![1, 2, 4]));
        let s = doubling_all_reduce(4, 1, 6, 4, ReduceOp::Sum);
        assert_eq!((s.recvs.len(), s.peers()), (1, vec![0]));
    }

    #[test]
    fn reduce_scatter_leaves_each_rank_its_block() {
        for n in 2..=5 {
            for block in [0, 1, 7] {
                let count = n * block;
                let scheds: Vec<_> = (0..n)
                    .map(|r| ring_reduce_scatter(count, r, n, 3, ReduceOp::Sum))
                    .collect();
                let out = simulate(&scheds, inputs(n, count));
                for (r, b) in out.iter().enumerate() {
                    let own = &b[r * block..(r + 1) * block];
                    for (j, v) in own.iter().enumerate() {
                        let i = r * block + j;
                        let sum: f64 = (0..n).map(|q| (q * 1000 + i) as f64).sum();
                        assert_eq!(*v, sum, "n={n} rank {r} elem {i}");
                    }
                }
            }
        }
    }

    #[test]
    fn all_gather_and_broadcast_deliver_everything() {
        for n in 2..=5 {
            let block = 5;
            let scheds: Vec<_> = (0..n)
                .map(|r| ring_all_gather(n * block, r, n, 2))
                .collect();
            let bufs = (0..n)
                .map(|r| {
                    (0..n * block)
                        .map(|i| if i / block == r { i as f64 } else { -1.0 })
                        .collect()
                })
                .collect();
            for b in simulate(&scheds, bufs) {
                assert_eq!(b, (0..n * block).map(|i| i as f64).collect::<Vec<_>>());
            }
            for root in 0..n {
                let scheds: Vec<_> = (0..n).map(|r| chain_broadcast(11, r, n, 4, root)).collect();
                let bufs = (0..n).map(|r| vec![r as f64; 11]).collect();
                for b in simulate(&scheds, bufs) {
                    assert_eq!(b, vec![root as f64; 11]);
                }
            }
        }
    }

    #[test]
    fn short_buffers_get_smaller_chunks_down_to_a_quarter() {
        assert_eq!(pipeline_chunk(10 << 20, 1 << 20), 1 << 20);
        assert_eq!(pipeline_chunk(2 << 20, 1 << 20), 512 << 10);
        assert_eq!(pipeline_chunk(1 << 20, 1 << 20), 256 << 10);
        assert_eq!(pipeline_chunk(10, 1 << 20), 256 << 10);
        assert_eq!(pipeline_chunk(10, 1), 1);
    }

    #[test]
    fn segments_cover_the_buffer_evenly() {
        assert_eq!(segments(10, 3), vec![0..4, 4..7, 7..10]);
        assert_eq!(segments(2, 4), vec![0..1, 1..2, 2..2, 2..2]);
    }
}
