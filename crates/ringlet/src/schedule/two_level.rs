use super::{
    chunk_of, chunks_per_segment, md, pipeline_chunk, segments, Apply, RecvSpec, Schedule, Xfer,
};
use ringlet_core::ReduceOp;

/// Two-level all-reduce in place, for `hosts` of equal size (`hosts[h][l]` is the rank with
/// local index `l` on host `h`; at least two hosts of at least two ranks):
/// 1. a ring reduce-scatter among the `L` ranks of each host leaves local rank `l` with its
///    host's sum of part `l` of the buffer (of `L` parts);
/// 2. `L` rings between hosts, one per local index, each all-reduce their part: local rank `l`
///    of every host carries 1/L of the buffer, so every host's links are busy with the whole of
///    it, and each byte crosses the network 2(H − 1)/H times instead of the flat ring's
///    2(n − 1)/n;
/// 3. a ring all-gather within each host.
///
/// Pipelined by chunk across the phases: a chunk of part `l` enters the host ring as soon as
/// the host's reduce-scatter has finished it, and leaves for the host's all-gather as soon as
/// it is final. Every chunk is finished by one rank only and copied from there, so every rank
/// ends with the same bits.
pub fn two_level_all_reduce(
    count: usize,
    rank: usize,
    hosts: &[Vec<usize>],
    max_chunk: usize,
    op: ReduceOp,
) -> Schedule {
    let (nh, nl) = (hosts.len(), hosts[0].len());
    let (h, l) = hosts
        .iter()
        .enumerate()
        .find_map(|(h, m)| m.iter().position(|&r| r == rank).map(|l| (h, l)))
        .expect("the rank is on one of the hosts");
    // Part `i` is blocks i·H .. (i + 1)·H: its H segments for the ring between hosts.
    let blocks = segments(count, nl * nh);
    let chunk = pipeline_chunk(blocks.iter().map(|b| b.len()).max().unwrap_or(0), max_chunk);
    let nch = chunks_per_segment(&blocks, chunk);
    let xfer = |peer: usize, step: usize, b: usize, c: usize| Xfer {
        peer,
        step: step as u32,
        chunk: (b * nch + c) as u32,
        range: chunk_of(&blocks[b], c, chunk),
    };
    // The chunks of part `i`, blocks in the order `order` gives (segment indices).
    let part = |i: usize, order: Vec<usize>| {
        order
            .into_iter()
            .flat_map(move |s| (0..nch).map(move |c| (i * nh + s, c)))
    };
    let ascending = || (0..nh).collect::<Vec<_>>();
    // The order in which a rank of host `h` finishes the segments of its part: the ring's last
    // reduction finishes segment h + 1, its copies bring h, h − 1, ...
    let finished: Vec<usize> = (0..nh)
        .map(|t| md(h as isize + 1 - t as isize, nh))
        .collect();
    let (next_local, prev_local) = (hosts[h][(l + 1) % nl], hosts[h][(l + nl - 1) % nl]);
    let (next_host, prev_host) = (hosts[(h + 1) % nh][l], hosts[(h + nh - 1) % nh][l]);
    // Steps: host reduce-scatter 0..L−1, host ring from `ring0`, host all-gather from `gather0`.
    let ring0 = nl - 1;
    let gather0 = ring0 + 2 * (nh - 1);
    // A final chunk of our part goes to the host's all-gather.
    let gather = |b: usize, c: usize| xfer(next_local, gather0, b, c);
    let mut recvs = Vec::new();
    // 1. Reduce-scatter within the host: at step g part l − g − 1 goes out, l − g − 2 comes in.
    for g in 0..nl - 1 {
        let i = md(l as isize - g as isize - 2, nl);
        for (b, c) in part(i, ascending()) {
            let forwards = if g + 2 < nl {
                vec![xfer(next_local, g + 1, b, c)]
            } else if b % nh == h {
                // Our part, finished within the host: segment h starts the host ring.
                vec![xfer(next_host, ring0, b, c)]
            } else {
                Vec::new()
            };
            recvs.push(RecvSpec {
                xfer: xfer(prev_local, g, b, c),
                apply: Apply::Reduce,
                finish_avg: false,
                forwards,
            });
        }
    }
    // 2. The ring between hosts over part l: at step g segment h − g − 1 comes in, reduced for
    //    the first H − 1 steps and final from the last of those.
    let steps = 2 * (nh - 1);
    for g in 0..steps {
        let s = md(h as isize - g as isize - 1, nh);
        for (b, c) in part(l, vec![s]) {
            let mut forwards: Vec<Xfer> = (g + 1 < steps)
                .then(|| xfer(next_host, ring0 + g + 1, b, c))
                .into_iter()
                .collect();
            if g + 2 >= nh {
                forwards.push(gather(b, c));
            }
            recvs.push(RecvSpec {
                xfer: xfer(prev_host, ring0 + g, b, c),
                apply: if g + 1 < nh {
                    Apply::Reduce
                } else {
                    Apply::Copy
                },
                finish_avg: g + 2 == nh && op == ReduceOp::Avg,
                forwards,
            });
        }
    }
    // 3. All-gather within the host: at step g part l − g − 1 comes in, in the order its owner
    //    finished it (the same on every rank of the host).
    for g in 0..nl - 1 {
        let i = md(l as isize - g as isize - 1, nl);
        for (b, c) in part(i, finished.clone()) {
            recvs.push(RecvSpec {
                xfer: xfer(prev_local, gather0 + g, b, c),
                apply: Apply::Copy,
                finish_avg: false,
                forwards: (g + 2 < nl)
                    .then(|| xfer(next_local, gather0 + g + 1, b, c))
                    .into_iter()
                    .collect(),
            });
        }
    }
    let sends = part(md(l as isize - 1, nl), ascending())
        .map(|(b, c)| xfer(next_local, 0, b, c))
        .collect();
    Schedule::reducing(sends, recvs, op, chunk.min(blocks[0].len()))
}
