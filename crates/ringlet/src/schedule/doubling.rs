use super::{chunk_of, Apply, RecvSpec, Schedule, Xfer};
use ringlet_core::ReduceOp;

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
        forwards: forward.into_iter().collect(),
    };
    let last = levels + 1;
    let slot_len = chunk.min(count);
    if rank < 2 * rem && rank % 2 == 1 {
        // Folded into rank − 1: hand it our buffer, take the result.
        let sends = (0..nch).map(|c| xfer(rank - 1, 0, c)).collect();
        let recvs = (0..nch)
            .map(|c| recv(xfer(rank - 1, last, c), Apply::Copy, false, None))
            .collect();
        return Schedule::reducing(sends, recvs, op, slot_len);
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
    Schedule::reducing(sends, recvs, op, slot_len)
}
