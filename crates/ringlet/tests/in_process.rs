//! Every collective, element type and reduction on every all-reduce algorithm (forced, and the
//! automatic choice), for 1 to 8 ranks and odd counts, over in-process links: each rank a thread,
//! the real engine and schedules, bounded in-memory pipes instead of sockets. Every rank must end
//! with the same bits, and the right values. Then failures, on every algorithm: a rank that dies,
//! one that stops answering, and ranks that call different things, each named by every survivor.
//! (The same paths across real processes and sockets: `tests/tests/` of the workspace.)

use ringlet::algo::{Algo, AlgoSetting};
use ringlet::{bf16, f16, Communicator, Config, Element, Error, ReduceOp};
use ringlet_transport::mem_world;
use std::time::{Duration, Instant};

const ALGOS: [AlgoSetting; 5] = [
    AlgoSetting::Auto,
    AlgoSetting::Ring,
    AlgoSetting::Doubling,
    AlgoSetting::Halving,
    AlgoSetting::TwoLevel,
];
/// Pipes smaller than a chunk, so frames are written and read in pieces.
const PIPE: usize = 3000;

fn config(rank: usize, n: usize, algo: AlgoSetting, timeout: Duration) -> Config {
    let mut c = Config::new(rank, n, "in-process");
    c.algo = algo;
    // The smallest chunk: counts below span several chunks.
    c.chunk_bytes = 4 << 10;
    c.timeout = timeout;
    c.host_id = Some(host_of(rank, n));
    // So that `auto` also picks other algorithms than doubling for the counts below.
    c.small_bytes = 1 << 10;
    c
}

/// Pretend hosts, so that `auto` and `two_level` run the two-level all-reduce: 2 ranks on each
/// of n/2 hosts where 4 divides n, else 2 hosts whose ranks interleave where n is even (n = 6:
/// 2 hosts of 3), else hosts of unequal size (the ring).
fn host_of(rank: usize, n: usize) -> String {
    if n.is_multiple_of(4) {
        format!("host{}", rank / 2)
    } else if n.is_multiple_of(2) {
        format!("host{}", rank % 2)
    } else {
        format!("host{}", rank * 2 / n)
    }
}

/// Runs `body(rank, comm)` on `n` ranks joined over in-process links; returns their results.
fn world<R: Send>(
    n: usize,
    algo: AlgoSetting,
    timeout: Duration,
    body: impl Fn(usize, Communicator) -> R + Sync,
) -> Vec<R> {
    let peers = mem_world(n, PIPE);
    std::thread::scope(|s| {
        let handles: Vec<_> = peers
            .into_iter()
            .enumerate()
            .map(|(rank, p)| {
                let body = &body;
                s.spawn(move || {
                    let comm = Communicator::over(Box::new(p), config(rank, n, algo, timeout))
                        .expect("joining over in-process links");
                    body(rank, comm)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// Small integers, so sums and products are exact in every type (even f16) and the expected
/// value is known whatever order an algorithm reduces in.
fn value(rank: usize, i: usize, op: ReduceOp) -> f64 {
    let h = (rank * 7919 + i * 104729) % 11;
    match op {
        ReduceOp::Prod => [1.0, 2.0, 1.0, -1.0][h % 4],
        _ => h as f64 - 5.0,
    }
}

fn expected(n: usize, i: usize, op: ReduceOp) -> f64 {
    let vals = (0..n).map(|r| value(r, i, op));
    match op {
        ReduceOp::Sum => vals.sum(),
        ReduceOp::Avg => vals.sum::<f64>() / n as f64,
        ReduceOp::Prod => vals.product(),
        ReduceOp::Min => vals.fold(f64::INFINITY, f64::min),
        ReduceOp::Max => vals.fold(f64::NEG_INFINITY, f64::max),
    }
}

fn bits<T: Element>(v: &[T]) -> Vec<u8> {
    bytemuck::cast_slice(v).to_vec()
}

/// All-reduces of several counts with every op, on one world; checks values, returns the bits.
fn all_reduces<T: Element>(rank: usize, comm: &Communicator, n: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let unsigned = T::DTYPE == ringlet::DType::U8;
    for count in [0, 1, 7, 1001, 5003] {
        for op in [
            ReduceOp::Sum,
            ReduceOp::Prod,
            ReduceOp::Min,
            ReduceOp::Max,
            ReduceOp::Avg,
        ] {
            if unsigned && op != ReduceOp::Prod {
                // u8 wraps below zero: checked with its own values below.
                continue;
            }
            let mut buf: Vec<T> = (0..count)
                .map(|i| T::from_f64(value(rank, i, op)))
                .collect();
            comm.all_reduce(&mut buf, op).unwrap();
            for (i, v) in buf.iter().enumerate() {
                let want = T::from_f64(expected(n, i, op)).to_f64();
                let ok = if op == ReduceOp::Avg
                    && !matches!(T::DTYPE, ringlet::DType::I32 | ringlet::DType::I64)
                {
                    (v.to_f64() - want).abs() <= 0.01 * want.abs().max(1.0)
                } else if op == ReduceOp::Avg {
                    // Integer averages truncate the integer sum.
                    v.to_f64()
                        == (T::from_f64(expected(n, i, ReduceOp::Sum)).to_f64() / n as f64).trunc()
                } else {
                    v.to_f64() == want
                };
                assert!(
                    ok,
                    "{} {op} count {count} elem {i}: {} vs {want}",
                    T::DTYPE,
                    v.to_f64()
                );
            }
            out.push(bits(&buf));
        }
    }
    if unsigned {
        let mut buf: Vec<T> = (0..301)
            .map(|i| T::from_f64(((rank + i) % 7) as f64))
            .collect();
        comm.all_reduce(&mut buf, ReduceOp::Sum).unwrap();
        for (i, v) in buf.iter().enumerate() {
            let want: usize = (0..n).map(|r| (r + i) % 7).sum();
            assert_eq!(v.to_f64(), want as f64);
        }
        out.push(bits(&buf));
    }
    out
}

/// Broadcast from every root, all-gather and reduce-scatter of odd sizes.
fn other_collectives<T: Element>(rank: usize, comm: &Communicator, n: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    for root in 0..n {
        let mut buf: Vec<T> = (0..1003)
            .map(|i| T::from_f64(((rank * 3 + i) % 9) as f64))
            .collect();
        comm.broadcast(&mut buf, root).unwrap();
        let want: Vec<T> = (0..1003)
            .map(|i| T::from_f64(((root * 3 + i) % 9) as f64))
            .collect();
        assert_eq!(bits(&buf), bits(&want), "broadcast from {root}");
        out.push(bits(&buf));
    }
    let m = 517;
    let send: Vec<T> = (0..m)
        .map(|i| T::from_f64(((rank + i) % 5) as f64))
        .collect();
    let mut recv = vec![T::from_f64(0.0); n * m];
    comm.all_gather(&send, &mut recv).unwrap();
    for r in 0..n {
        for i in 0..m {
            assert_eq!(recv[r * m + i].to_f64(), ((r + i) % 5) as f64);
        }
    }
    out.push(bits(&recv));
    let send: Vec<T> = (0..n * m)
        .map(|i| T::from_f64(((rank + i) % 4) as f64))
        .collect();
    let mut block = vec![T::from_f64(0.0); m];
    comm.reduce_scatter(&send, &mut block, ReduceOp::Max)
        .unwrap();
    for (j, v) in block.iter().enumerate() {
        let i = rank * m + j;
        let want = (0..n).map(|r| (r + i) % 4).max().unwrap();
        assert_eq!(v.to_f64(), want as f64);
    }
    comm.barrier().unwrap();
    out
}

fn every_type(rank: usize, comm: &Communicator, n: usize) -> Vec<Vec<u8>> {
    let mut out = all_reduces::<f32>(rank, comm, n);
    out.extend(all_reduces::<f64>(rank, comm, n));
    out.extend(all_reduces::<f16>(rank, comm, n));
    out.extend(all_reduces::<bf16>(rank, comm, n));
    out.extend(all_reduces::<i32>(rank, comm, n));
    out.extend(all_reduces::<i64>(rank, comm, n));
    out.extend(all_reduces::<u8>(rank, comm, n));
    out.extend(other_collectives::<f32>(rank, comm, n));
    out.extend(other_collectives::<u8>(rank, comm, n));
    out
}

#[test]
fn every_collective_type_and_op_on_every_algorithm_gives_every_rank_the_same_bits() {
    for algo in ALGOS {
        for n in 1..=8 {
            let t = Instant::now();
            let results = world(n, algo, Duration::from_secs(60), |rank, comm| {
                let two_level = n >= 4 && n.is_multiple_of(2);
                if two_level && matches!(algo, AlgoSetting::Auto | AlgoSetting::TwoLevel) {
                    assert_eq!(comm.all_reduce_algorithm(4 << 10), Algo::TwoLevel);
                }
                every_type(rank, &comm, n)
            });
            for (r, res) in results.iter().enumerate().skip(1) {
                assert!(
                    res == &results[0],
                    "{algo:?} n={n}: rank {r}'s bits differ from rank 0's"
                );
            }
            eprintln!(
                "{algo:?} n={n}: {} calls per rank, {:?}",
                results[0].len(),
                t.elapsed()
            );
        }
    }
}

/// Bit patterns where a reduction's operand order shows: NaNs with different payloads, and
/// zeros of both signs under min and max. Every algorithm must still agree across ranks.
#[test]
fn operand_order_never_splits_the_ranks() {
    for algo in ALGOS {
        for n in [2, 3, 5, 8] {
            let results = world(n, algo, Duration::from_secs(60), |rank, comm| {
                let mut out = Vec::new();
                for op in [ReduceOp::Sum, ReduceOp::Min, ReduceOp::Max, ReduceOp::Prod] {
                    let mut buf: Vec<f32> = (0..64)
                        .map(|i| match (rank + i) % 4 {
                            0 => f32::from_bits(0x7fc0_0000 | (rank as u32 + 1)),
                            1 => 0.0,
                            2 => -0.0,
                            _ => f32::from_bits(0xffc0_0000 | (i as u32 + 7)),
                        })
                        .collect();
                    comm.all_reduce(&mut buf, op).unwrap();
                    out.push(bits(&buf));
                }
                out
            });
            for res in &results[1..] {
                assert!(res == &results[0], "{algo:?} n={n}: ranks disagree");
            }
        }
    }
}

/// What every survivor said, checked to name the rank at fault.
fn assert_named(errors: &[(usize, Error)], culprit: usize, what: &str) {
    let name = format!("rank {culprit} (mem:{culprit})");
    for (r, e) in errors {
        assert!(
            e.to_string().contains(&name),
            "{what}: rank {r}'s error does not name {name}: {e}"
        );
    }
}

#[test]
fn a_rank_that_dies_is_named_by_every_survivor_promptly() {
    for algo in ALGOS {
        for n in [2, 3, 4, 5, 8] {
            for dead in [0, n / 2, n - 1] {
                let t = Instant::now();
                let out = world(n, algo, Duration::from_secs(60), |rank, comm| {
                    if rank == dead {
                        drop(comm);
                        return None;
                    }
                    let mut buf = vec![1.0f32; 3001];
                    let e = comm.all_reduce(&mut buf, ReduceOp::Sum).unwrap_err();
                    // Broken for good: the next call fails at once with the same story.
                    assert!(matches!(comm.barrier(), Err(Error::Broken(_))));
                    Some((rank, e))
                });
                let errors: Vec<_> = out.into_iter().flatten().collect();
                assert_named(&errors, dead, &format!("{algo:?} n={n} rank {dead} died"));
                assert!(
                    t.elapsed() < Duration::from_secs(20),
                    "{algo:?} n={n}: took {:?}",
                    t.elapsed()
                );
            }
        }
    }
}

#[test]
fn a_rank_that_stops_answering_is_blamed_at_the_deadline() {
    for algo in [
        AlgoSetting::Ring,
        AlgoSetting::Doubling,
        AlgoSetting::Halving,
    ] {
        for n in [3, 4, 6] {
            let stuck = n - 2;
            let t = Instant::now();
            let out = world(n, algo, Duration::from_millis(800), |rank, comm| {
                if rank == stuck {
                    // Alive (its links stay open) but never calls: a SIGSTOPped process.
                    std::thread::sleep(Duration::from_secs(6));
                    return None;
                }
                let mut buf = vec![1.0f32; 100];
                Some((rank, comm.all_reduce(&mut buf, ReduceOp::Sum).unwrap_err()))
            });
            let errors: Vec<_> = out.into_iter().flatten().collect();
            assert_named(
                &errors,
                stuck,
                &format!("{algo:?} n={n} rank {stuck} stopped"),
            );
            assert!(t.elapsed() < Duration::from_secs(30));
        }
    }
}

#[test]
fn ranks_calling_different_things_all_fail_naming_a_peer() {
    for algo in ALGOS {
        for n in [2, 3, 4, 7] {
            let odd = n - 1;
            let out = world(n, algo, Duration::from_secs(5), |rank, comm| {
                let count = if rank == odd { 11 } else { 10 };
                let mut buf = vec![1.0f32; count];
                let e = comm.all_reduce(&mut buf, ReduceOp::Sum).unwrap_err();
                (rank, e)
            });
            for (r, e) in &out {
                let s = e.to_string();
                assert!(
                    s.contains("mismatch") || s.contains("count"),
                    "{algo:?} n={n}: rank {r}: {s}"
                );
            }
        }
    }
}

/// Ranks whose schedules differ in shape (recursive doubling on some, the ring on one): every
/// rank must hear of it promptly, including those already done with the rank at fault.
#[test]
fn ranks_on_different_algorithms_all_fail_promptly() {
    for n in [3, 4, 5, 8] {
        let t = Instant::now();
        let out = world(
            n,
            AlgoSetting::Auto,
            Duration::from_secs(30),
            |rank, comm| {
                // 4 KiB takes recursive doubling, 400 KiB the ring.
                let count = if rank == n - 1 { 100_000 } else { 1000 };
                let mut buf = vec![1.0f32; count];
                (rank, comm.all_reduce(&mut buf, ReduceOp::Sum).unwrap_err())
            },
        );
        for (r, e) in &out {
            let s = e.to_string();
            assert!(
                s.contains("mismatch") || s.contains("count"),
                "n={n}: rank {r}: {s}"
            );
        }
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "n={n}: took {:?}",
            t.elapsed()
        );
    }
}

#[test]
fn ranks_with_different_settings_fail_at_join_naming_both_values() {
    let peers = mem_world(3, PIPE);
    let errors: Vec<String> = std::thread::scope(|s| {
        let hs: Vec<_> = peers
            .into_iter()
            .enumerate()
            .map(|(rank, p)| {
                s.spawn(move || {
                    let mut c = config(rank, 3, AlgoSetting::Auto, Duration::from_secs(10));
                    if rank == 2 {
                        c.algo = AlgoSetting::Ring;
                    }
                    Communicator::over(Box::new(p), c)
                        .err()
                        .map(|e| e.to_string())
                })
            })
            .collect();
        hs.into_iter()
            .map(|h| h.join().unwrap().expect("join must fail"))
            .collect()
    });
    for e in errors {
        assert!(
            e.contains("RINGLET_ALGO") && e.contains("auto") && e.contains("ring"),
            "{e}"
        );
    }
}
