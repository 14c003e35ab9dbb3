use super::*;
use ringlet_core::ReduceOp;

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
                for f in &spec.forwards {
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

/// Runs `make(count, rank, chunk, op)` for every rank of `n` through the simulator on `counts`
/// and `chunks`, summing and averaging: every rank must end with the exact result.
fn assert_all_reduces(
    what: &str,
    n: usize,
    counts: &[usize],
    chunks: &[usize],
    make: impl Fn(usize, usize, usize, ReduceOp) -> Schedule,
) {
    for &count in counts {
        for &chunk in chunks {
            for op in [ReduceOp::Sum, ReduceOp::Avg] {
                let scheds: Vec<_> = (0..n).map(|r| make(count, r, chunk, op)).collect();
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
                            "{what} n={n} count={count} chunk={chunk} {op} rank {r}"
                        );
                    }
                }
            }
        }
    }
}

#[test]
fn all_reduce_schedules_sum_and_average_for_many_shapes() {
    for n in 2..=5 {
        let counts = [0, 1, n - 1, n + 1, 17, 64];
        assert_all_reduces(
            "ring",
            n,
            &counts,
            &[1, 3, 8, 1000],
            |count, r, chunk, op| ring_all_reduce(count, r, n, chunk, op),
        );
    }
}

#[test]
fn doubling_sums_and_averages_for_every_world_size() {
    for n in 2..=9 {
        assert_all_reduces(
            "doubling",
            n,
            &[0, 1, 5, 64],
            &[1, 3, 1000],
            |count, r, chunk, op| doubling_all_reduce(count, r, n, chunk, op),
        );
    }
}

#[test]
fn halving_sums_and_averages_for_every_world_size() {
    for n in 2..=9 {
        let counts = [0, 1, 5, 64, 131];
        assert_all_reduces(
            "halving",
            n,
            &counts,
            &[1, 3, 1000],
            |count, r, chunk, op| halving_all_reduce(count, r, n, chunk, op),
        );
    }
}

#[test]
fn halving_sends_what_the_ring_sends_in_log_exchanges() {
    // 8 ranks, 64 elements: 2·(7/8)·64 = 112 elements out of every rank, to 3 partners.
    for r in 0..8 {
        let s = halving_all_reduce(64, r, 8, 1000, ReduceOp::Sum);
        let forwarded: usize = s
            .recvs
            .iter()
            .flat_map(|x| &x.forwards)
            .map(|x| x.range.len())
            .sum();
        let sent: usize = s.sends.iter().map(|x| x.range.len()).sum::<usize>() + forwarded;
        assert_eq!(sent, 112, "rank {r}");
        assert_eq!(s.peers().len(), 3, "rank {r}");
        let steps: std::collections::BTreeSet<u32> = s.recvs.iter().map(|x| x.xfer.step).collect();
        assert_eq!(steps.len(), 6, "rank {r}: 2·log2 8 exchanges");
    }
}

#[test]
fn two_level_sums_and_averages_for_every_layout() {
    for (nh, nl) in [(2, 2), (2, 3), (3, 2), (4, 2), (2, 4), (3, 3)] {
        let n = nh * nl;
        // Hosts of consecutive ranks, and hosts whose ranks interleave.
        let contiguous: Vec<Vec<usize>> = (0..nh)
            .map(|h| (0..nl).map(|l| h * nl + l).collect())
            .collect();
        let interleaved: Vec<Vec<usize>> = (0..nh)
            .map(|h| (0..nl).map(|l| l * nh + h).collect())
            .collect();
        for hosts in [contiguous, interleaved] {
            let what = format!("two-level {hosts:?}");
            assert_all_reduces(
                &what,
                n,
                &[0, 1, 5, 64, 131],
                &[1, 3, 1000],
                |count, r, chunk, op| two_level_all_reduce(count, r, &hosts, chunk, op),
            );
        }
    }
}

#[test]
fn two_level_sends_a_share_of_the_buffer_between_hosts() {
    // 4 hosts × 2 ranks, 64 elements: each rank sends 2·(3/4)·(64/2) = 48 elements to the next
    // host, where the flat ring sends 2·(7/8)·64 = 112 to its neighbour, and 2·(1/2)·64 = 64 to
    // the other rank of its host.
    let hosts: Vec<Vec<usize>> = (0..4).map(|h| vec![2 * h, 2 * h + 1]).collect();
    for r in 0..8 {
        let s = two_level_all_reduce(64, r, &hosts, 1000, ReduceOp::Sum);
        let mut out = vec![0usize; 8];
        let forwards = s.recvs.iter().flat_map(|x| &x.forwards);
        for x in s.sends.iter().chain(forwards) {
            out[x.peer] += x.range.len();
        }
        let next_host = (r + 2) % 8;
        assert_eq!(out[next_host], 48, "rank {r}: {out:?}");
        assert_eq!(out[r ^ 1], 64, "rank {r}: {out:?}");
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
