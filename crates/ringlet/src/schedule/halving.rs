use super::{
    chunk_of, chunks_per_segment, pipeline_chunk, segments, Apply, RecvSpec, Schedule, Xfer,
};
use ringlet_core::ReduceOp;
use std::ops::Range;

/// Rabenseifner's all-reduce in place: a reduce-scatter by recursive halving, then an all-gather
/// by recursive doubling. Like the ring it sends 2(p − 1)/p of the buffer per rank, but in
/// 2·log2 p exchanges instead of 2(n − 1) hops, so it wins on medium buffers where the ring's
/// latency terms still count and doubling's whole-buffer exchanges already cost too much.
///
/// With `p` the largest power of two not above `n`, the first `2(n − p)` ranks pair up as in
/// [`doubling_all_reduce`](super::doubling_all_reduce): each odd one hands its buffer to the even
/// one below it and gets the result back at the end. The `p` others split the buffer into `p`
/// blocks. At halving level `k` a rank swaps halves of the blocks it still holds with the rank
/// whose position differs in bit `log2 p − 1 − k`, keeping and reducing one half; afterwards
/// position `v` holds block `v`, fully reduced (by it alone, so every rank later copies the
/// same bits). At doubling level `j` it sends every block it holds to the rank whose position
/// differs in bit `j` and receives as many. Pipelined by chunk: a chunk moves on as soon as it
/// is reduced, and a final chunk goes to every later partner at once.
pub fn halving_all_reduce(
    count: usize,
    rank: usize,
    n: usize,
    max_chunk: usize,
    op: ReduceOp,
) -> Schedule {
    if n == 1 {
        // Nothing to exchange (a communicator of one never runs a schedule).
        return Schedule::reducing(Vec::new(), Vec::new(), op, 0);
    }
    let p = 1usize << (usize::BITS - 1 - n.leading_zeros());
    let rem = n - p;
    let levels = p.trailing_zeros() as usize;
    let blocks = segments(count, p);
    let chunk = pipeline_chunk(blocks.iter().map(|b| b.len()).max().unwrap_or(0), max_chunk);
    let nch = chunks_per_segment(&blocks, chunk);
    let slot_len = chunk.min(blocks[0].len());
    // Chunk `c` of block `b`, as a frame of `step` to or from `peer`.
    let xfer = |peer: usize, step: usize, b: usize, c: usize| Xfer {
        peer,
        step: step as u32,
        chunk: (b * nch + c) as u32,
        range: chunk_of(&blocks[b], c, chunk),
    };
    let real = |v: usize| if v < rem { 2 * v } else { v + rem };
    // The last step: the result goes back to a folded-in rank.
    let last = 2 * levels + 1;
    if rank < 2 * rem && rank % 2 == 1 {
        let v = rank / 2;
        let sends = (0..p)
            .flat_map(|b| (0..nch).map(move |c| (b, c)))
            .map(|(b, c)| xfer(rank - 1, 0, b, c))
            .collect();
        let recvs = gathered_order(v, levels)
            .into_iter()
            .flat_map(|b| (0..nch).map(move |c| (b, c)))
            .map(|(b, c)| RecvSpec {
                xfer: xfer(rank - 1, last, b, c),
                apply: Apply::Copy,
                finish_avg: false,
                forwards: Vec::new(),
            })
            .collect();
        return Schedule::reducing(sends, recvs, op, slot_len);
    }
    let v = if rank < 2 * rem { rank / 2 } else { rank - rem };
    let extra = (rank < 2 * rem).then_some(rank + 1);
    // Halving level k: the partner, and the blocks kept and sent.
    let halving = |k: usize| -> (usize, Range<usize>, Range<usize>) {
        let mask = p >> (k + 1);
        let lo = v & !(2 * mask - 1);
        let (low, high) = (lo..lo + mask, lo + mask..lo + 2 * mask);
        let partner = real(v ^ mask);
        if v & mask == 0 {
            (partner, low, high)
        } else {
            (partner, high, low)
        }
    };
    // Where a final chunk goes: every doubling partner from level `from` on, then the
    // folded-in rank.
    let finals = |from: usize, b: usize, c: usize| -> Vec<Xfer> {
        let mut to: Vec<Xfer> = (from..levels)
            .map(|j| xfer(real(v ^ (1 << j)), levels + 1 + j, b, c))
            .collect();
        to.extend(extra.map(|x| xfer(x, last, b, c)));
        to
    };
    let mut recvs = Vec::new();
    let (first, _, first_sent) = halving(0);
    if let Some(x) = extra {
        for b in 0..p {
            for c in 0..nch {
                let forwards = if first_sent.contains(&b) {
                    vec![xfer(first, 1, b, c)]
                } else {
                    Vec::new()
                };
                recvs.push(RecvSpec {
                    xfer: xfer(x, 0, b, c),
                    apply: Apply::Reduce,
                    finish_avg: false,
                    forwards,
                });
            }
        }
    }
    for k in 0..levels {
        let (q, kept, _) = halving(k);
        let next = (k + 1 < levels).then(|| halving(k + 1));
        for b in kept {
            for c in 0..nch {
                let forwards = match &next {
                    Some((q2, _, sent)) if sent.contains(&b) => vec![xfer(*q2, k + 2, b, c)],
                    Some(_) => Vec::new(),
                    None => finals(0, b, c),
                };
                recvs.push(RecvSpec {
                    xfer: xfer(q, k + 1, b, c),
                    apply: if rank < q {
                        Apply::Reduce
                    } else {
                        Apply::ReduceRev
                    },
                    finish_avg: next.is_none() && op == ReduceOp::Avg,
                    forwards,
                });
            }
        }
    }
    for j in 0..levels {
        let w = v ^ (1 << j);
        for b in gathered_order(w, j) {
            for c in 0..nch {
                recvs.push(RecvSpec {
                    xfer: xfer(real(w), levels + 1 + j, b, c),
                    apply: Apply::Copy,
                    finish_avg: false,
                    forwards: finals(j + 1, b, c),
                });
            }
        }
    }
    let sends = if extra.is_some() {
        Vec::new()
    } else {
        first_sent
            .flat_map(|b| (0..nch).map(move |c| (b, c)))
            .map(|(b, c)| xfer(first, 1, b, c))
            .collect()
    };
    Schedule::reducing(sends, recvs, op, slot_len)
}

/// The blocks position `v` holds before doubling level `j`, in the order it got them (the
/// order it sends them in): its own, then what each earlier level brought.
fn gathered_order(v: usize, j: usize) -> Vec<usize> {
    if j == 0 {
        return vec![v];
    }
    let mut order = gathered_order(v, j - 1);
    order.extend(gathered_order(v ^ (1 << (j - 1)), j - 1));
    order
}
