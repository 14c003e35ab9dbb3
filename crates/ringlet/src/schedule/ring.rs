use super::{
    chunk_of, chunks_per_segment, md, pipeline_chunk, segments, Apply, RecvSpec, Schedule, Xfer,
};
use ringlet_core::ReduceOp;
use std::ops::Range;

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
                forwards: (g + 1 < steps)
                    .then(|| xfer(next, g + 1, c, seg))
                    .into_iter()
                    .collect(),
            });
        }
    }
    let longest = segs.iter().map(|s| s.len()).max().unwrap_or(0);
    Schedule::reducing(sends, recvs, op, chunk.min(longest))
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
            forwards: Vec::new(),
        }];
        ((0..nch).map(|c| xfer(next, c)).collect(), recvs)
    } else {
        let recvs = (0..nch)
            .map(|c| RecvSpec {
                xfer: xfer(prev, c),
                apply: Apply::Copy,
                finish_avg: false,
                forwards: if pos + 1 < n {
                    vec![xfer(next, c)]
                } else if c + 1 == nch {
                    vec![ack(next)]
                } else {
                    Vec::new()
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
