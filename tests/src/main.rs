//! `ringlet-testrank`: one rank of a test job. The integration tests start N of these (with the
//! torchrun environment) and read what they print:
//!
//! - `READY rank=R pid=P` once the communicator is up;
//! - `OK checks=N` when every check passed (exit 0); `WRONG ...` lines and exit 1 otherwise;
//! - `ERROR after_ms=T: MESSAGE` when a collective failed (exit 3), followed by
//!   `BROKEN: MESSAGE` from one more call, which must fail at once.
//!
//! Scenarios:
//! - `correctness COUNTS DTYPES OPS COLLECTIVES`: comma lists (`all` for every dtype, op or
//!   collective); every collective on every combination, checked element by element and for
//!   bitwise agreement across ranks. Also accepted by name (not in `all`): `all_reduce_device`
//!   (`_lagging`: its copies complete a few polls late) and `broadcast_device`, device buffers of
//!   `HostDevice` staged through host blocks;
//! - `mismatch KIND`: rank 0 calls something different from the others (`count`, `collective`,
//!   `dtype`, `op`, `root`);
//! - `loop ITERS COUNT`: all-reduces in a loop, each checked (a victim for kill/stop tests);
//! - `shrink ITERS COUNT`: the same loop, going on without a rank that fails: the survivors
//!   re-form the communicator (`SHRUNK epoch=E world=W rank=R original=[..] after_ms=T`) and
//!   resume from the earliest call any of them had not completed;
//! - `threads`: four threads issue asynchronous and synchronous all-reduces at once;
//! - `bits`: signed zeros and NaN payloads, whose result bits depend on operand order, must
//!   still come out identical on every rank.

mod data;

use data::TestElem;
use ringlet::staged::HostDevice;
use ringlet::{Communicator, DType, Error, ReduceOp};
use ringlet_core::with_dtype;
use std::io::Write;
use std::time::Instant;

const COLLECTIVES: [&str; 5] = [
    "all_reduce",
    "all_reduce_async",
    "broadcast",
    "all_gather",
    "reduce_scatter",
];

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RINGLET_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args: Vec<String> = std::env::args().skip(1).collect();
    let comm = match Communicator::from_env() {
        Ok(c) => c,
        Err(e) => {
            say(format!("ERROR after_ms=0: {e}"));
            std::process::exit(3);
        }
    };
    say(format!(
        "READY rank={} pid={}",
        comm.rank(),
        std::process::id()
    ));
    let started = Instant::now();
    if args.len() == 3 && args[0] == "shrink" {
        // The loop owns the communicator: it replaces it with each new epoch.
        report(shrinking(comm, &args[1], &args[2]), started, None);
        return;
    }
    let outcome = match args.first().map(String::as_str) {
        Some("correctness") if args.len() == 5 => correctness(&comm, &args[1..]),
        Some("mismatch") if args.len() == 2 => mismatch(&comm, &args[1]),
        Some("loop") if args.len() == 3 => looped(&comm, &args[1], &args[2]),
        Some("threads") if args.len() == 1 => threads(&comm),
        Some("bits") if args.len() == 1 => bits(&comm),
        _ => {
            eprintln!("usage: ringlet-testrank correctness COUNTS DTYPES OPS COLLECTIVES | mismatch KIND | loop ITERS COUNT | shrink ITERS COUNT");
            std::process::exit(2);
        }
    };
    report(outcome, started, Some(&comm));
}

/// Prints how the scenario ended and exits accordingly; after a failed collective, one more
/// call on `probe` (when given) must fail at once.
fn report(outcome: Result<u64, Failure>, started: Instant, probe: Option<&Communicator>) {
    match outcome {
        Ok(0) => say("OK".into()),
        Ok(checks) => say(format!("OK checks={checks}")),
        Err(Failure::Wrong(n)) => {
            say(format!("WRONG total={n}"));
            std::process::exit(1);
        }
        Err(Failure::Collective(e)) => {
            say(format!(
                "ERROR after_ms={}: {e}",
                started.elapsed().as_millis()
            ));
            if let Some(comm) = probe {
                let mut byte = [0u8; 1];
                match comm.all_reduce(&mut byte, ReduceOp::Sum) {
                    Err(e) => say(format!("BROKEN: {e}")),
                    Ok(()) => say("BROKEN: no (a call after the failure succeeded)".into()),
                }
            }
            std::process::exit(3);
        }
    }
}

fn say(line: String) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "{line}");
    let _ = out.flush();
}

enum Failure {
    Wrong(u64),
    Collective(Error),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Failure {
        Failure::Collective(e)
    }
}

fn list<T>(arg: &str, all: &[T], parse: impl Fn(&str) -> Option<T>) -> Vec<T>
where
    T: Clone,
{
    if arg == "all" {
        return all.to_vec();
    }
    arg.split(',')
        .map(|s| parse(s).unwrap_or_else(|| panic!("bad list element {s:?}")))
        .collect()
}

fn correctness(comm: &Communicator, args: &[String]) -> Result<u64, Failure> {
    let n = comm.world_size();
    let counts: Vec<usize> = list(&args[0], &[], |s| match s {
        "n-1" => Some(n - 1),
        "n+1" => Some(n + 1),
        _ => match s.strip_suffix("MiB") {
            Some(m) => m.parse::<usize>().ok().map(|m| m << 20),
            None => s.parse().ok(),
        },
    });
    let dtypes = list(&args[1], &DType::ALL, DType::parse);
    let ops = list(&args[2], &ReduceOp::ALL, ReduceOp::parse);
    let colls = list(&args[3], &COLLECTIVES.map(String::from), |s| {
        Some(s.to_string())
    });
    let mut checks = 0;
    let mut wrong = 0;
    for &dtype in &dtypes {
        for &count in &counts {
            // A count ending in MiB means bytes; convert to elements of this type.
            let count = if args[0].contains("MiB") && count >= 1 << 20 {
                count / dtype.size()
            } else {
                count
            };
            for coll in &colls {
                let op_list: &[ReduceOp] = if coll.contains("reduce") {
                    &ops
                } else {
                    &ops[..1]
                };
                for &op in op_list {
                    let w = with_dtype!(dtype, T => run_case::<T>(comm, coll, count, op)?);
                    if w > 0 {
                        say(format!(
                            "WRONG {coll} dtype={dtype} op={op} count={count}: {w} elements"
                        ));
                    }
                    wrong += w;
                    checks += 1;
                }
            }
        }
    }
    if wrong > 0 {
        return Err(Failure::Wrong(wrong));
    }
    Ok(checks)
}

/// Runs one collective and returns how many elements are wrong on this rank, plus one if the
/// ranks' results differ bit for bit.
fn run_case<T: TestElem>(
    comm: &Communicator,
    coll: &str,
    count: usize,
    op: ReduceOp,
) -> Result<u64, Error> {
    let (rank, n) = (comm.rank(), comm.world_size());
    let inputs = |r: usize, len: usize| (0..len).map(|i| T::input(r, i, op)).collect::<Vec<T>>();
    let count_wrong = |got: &[T], expect: &dyn Fn(usize) -> T| {
        got.iter()
            .enumerate()
            .filter(|(i, g)| !T::close(**g, expect(*i), n))
            .count() as u64
    };
    let (result, wrong) = match coll {
        "all_reduce" => {
            let mut buf = inputs(rank, count);
            comm.all_reduce(&mut buf, op)?;
            let w = count_wrong(&buf, &|i| T::expect(op, n, i));
            (buf, w)
        }
        "all_reduce_async" => {
            // Three in flight, with a synchronous call issued behind them.
            let a = count / 2;
            let first = comm.all_reduce_async(inputs(rank, count)[..a].to_vec(), op);
            let second = comm.all_reduce_async(inputs(rank, count)[a..].to_vec(), op);
            let third = comm.all_reduce_async(inputs(rank, count), op);
            let mut sync = inputs(rank, count);
            comm.all_reduce(&mut sync, op)?;
            let (x, y, z) = (first.wait()?, second.wait()?, third.wait()?);
            let mut w = count_wrong(&x, &|i| T::expect(op, n, i));
            w += count_wrong(&y, &|i| T::expect(op, n, a + i));
            w += count_wrong(&z, &|i| T::expect(op, n, i));
            w += count_wrong(&sync, &|i| T::expect(op, n, i));
            (z, w)
        }
        // Device buffers staged through host blocks (the TCP fallback's logic on a host "device"):
        // the same frames as the host path, so the same bits.
        "all_reduce_device" | "all_reduce_device_lagging" => {
            let lag = if coll.ends_with("lagging") { 3 } else { 0 };
            let mut buf = inputs(rank, count);
            comm.all_reduce_device(&HostDevice { lag }, &mut buf[..], op)?;
            let mut host = inputs(rank, count);
            comm.all_reduce(&mut host, op)?;
            let mut w = count_wrong(&buf, &|i| T::expect(op, n, i));
            w += u64::from(bytemuck_bytes(&buf) != bytemuck_bytes(&host));
            (buf, w)
        }
        "broadcast_device" => {
            let root = (count + 1) % n;
            let mut buf = inputs(rank, count);
            comm.broadcast_device(&HostDevice { lag: 2 }, &mut buf[..], root)?;
            let w = count_wrong(&buf, &|i| T::input(root, i, op));
            (buf, w)
        }
        "broadcast" => {
            let root = count % n;
            let mut buf = inputs(rank, count);
            comm.broadcast(&mut buf, root)?;
            let w = count_wrong(&buf, &|i| T::input(root, i, op));
            (buf, w)
        }
        "all_gather" => {
            let mut recv = vec![T::zeroed(); count * n];
            comm.all_gather(&inputs(rank, count), &mut recv)?;
            let w = count_wrong(&recv, &|i| T::input(i / count.max(1), i % count.max(1), op));
            (recv, w)
        }
        "reduce_scatter" => {
            let mut recv = vec![T::zeroed(); count];
            comm.reduce_scatter(&inputs(rank, count * n), &mut recv, op)?;
            let w = count_wrong(&recv, &|i| T::expect(op, n, rank * count + i));
            (recv, w)
        }
        other => panic!("unknown collective {other}"),
    };
    // Data-parallel replicas must not drift: every rank must hold the same bits.
    let digest = fnv(bytemuck_bytes(&result)) as i64;
    let digests = if coll == "reduce_scatter" {
        vec![digest]
    } else {
        let mut all = vec![0i64; n];
        comm.all_gather(&[digest], &mut all)?;
        all
    };
    Ok(wrong + u64::from(digests.iter().any(|d| *d != digest)))
}

fn bytemuck_bytes<T: TestElem>(s: &[T]) -> &[u8] {
    bytemuck::cast_slice(s)
}

fn fnv(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

fn mismatch(comm: &Communicator, kind: &str) -> Result<u64, Failure> {
    let odd = comm.rank() == 0;
    let mut buf = vec![1.0f32; 1000];
    match kind {
        "count" => comm.all_reduce(&mut buf[..if odd { 999 } else { 1000 }], ReduceOp::Sum)?,
        "collective" if odd => comm.broadcast(&mut buf, 0)?,
        "collective" => comm.all_reduce(&mut buf, ReduceOp::Sum)?,
        "dtype" if odd => comm.all_reduce(&mut vec![1.0f64; 1000], ReduceOp::Sum)?,
        "dtype" => comm.all_reduce(&mut buf, ReduceOp::Sum)?,
        "op" => comm.all_reduce(&mut buf, if odd { ReduceOp::Max } else { ReduceOp::Sum })?,
        "root" => comm.broadcast(&mut buf, if odd { 1 } else { 0 })?,
        other => panic!("unknown mismatch kind {other}"),
    }
    Ok(0)
}

fn looped(comm: &Communicator, iters: &str, count: &str) -> Result<u64, Failure> {
    let iters: usize = iters.parse().expect("ITERS is a number");
    let count: usize = count.parse().expect("COUNT is a number");
    let n = comm.world_size();
    let mut wrong = 0;
    // With a stop file, ITERS is the least: the loop goes on until some rank sees the file
    // (agreed by an all-reduce every 100 calls), so a test can act on a running job for as long
    // as it needs whatever the machine's speed.
    let stop_file = std::env::var_os("RINGLET_TEST_STOP_FILE").map(std::path::PathBuf::from);
    let mut it = 0;
    loop {
        if it >= iters {
            let Some(file) = &stop_file else { break };
            if it % 100 == 0 {
                let mut seen = [u8::from(file.exists())];
                comm.all_reduce(&mut seen, ReduceOp::Max)?;
                if seen[0] == 1 {
                    break;
                }
            }
        }
        let mut buf: Vec<f32> = (0..count)
            .map(|i| f32::input(comm.rank(), i + it, ReduceOp::Max))
            .collect();
        comm.all_reduce(&mut buf, ReduceOp::Max)?;
        wrong += buf
            .iter()
            .enumerate()
            .filter(|(i, v)| **v != f32::expect(ReduceOp::Max, n, i + it))
            .count() as u64;
        if it == 0 {
            say("LOOPING".into());
        }
        it += 1;
    }
    if wrong > 0 {
        return Err(Failure::Wrong(wrong));
    }
    Ok(it as u64)
}

/// As `looped` with Sum, each rank contributing its first-epoch rank + 1; on a failure the
/// survivors form the next epoch and go on.
fn shrinking(first: Communicator, iters: &str, count: &str) -> Result<u64, Failure> {
    let iters: usize = iters.parse().expect("ITERS is a number");
    let count: usize = count.parse().expect("COUNT is a number");
    let stop_file = std::env::var_os("RINGLET_TEST_STOP_FILE").map(std::path::PathBuf::from);
    let mut comm = first;
    let (mut it, mut wrong) = (0usize, 0u64);
    loop {
        // One call of the loop: the stop check (every 100 calls past ITERS) or a checked sum.
        let step = |comm: &Communicator, it: usize| -> Result<(bool, u64), Error> {
            if it >= iters && it.is_multiple_of(100) {
                let Some(file) = &stop_file else {
                    return Ok((true, 0));
                };
                let mut seen = [u8::from(file.exists())];
                comm.all_reduce(&mut seen, ReduceOp::Max)?;
                if seen[0] == 1 {
                    return Ok((true, 0));
                }
            }
            let original = comm.original_ranks();
            let mine = (original[comm.rank()] + 1) as f32;
            let want: f32 = original.iter().map(|&r| (r + 1) as f32).sum();
            let mut buf = vec![mine; count];
            comm.all_reduce(&mut buf, ReduceOp::Sum)?;
            Ok((false, buf.iter().filter(|&&v| v != want).count() as u64))
        };
        match step(&comm, it) {
            Ok((true, _)) => break,
            Ok((false, w)) => {
                wrong += w;
                if it == 0 {
                    say("LOOPING".into());
                }
                it += 1;
            }
            Err(e) => {
                let started = Instant::now();
                // A rank whose error named no peer (as when the dead rank's abort notice never
                // reached it) suspects no one: the test makes one so on purpose.
                let blames_no_one = std::env::var("RINGLET_TEST_BLAME_NO_ONE")
                    .is_ok_and(|r| r == comm.original_ranks()[comm.rank()].to_string());
                let next = if blames_no_one {
                    comm.shrink(&Error::Broken(format!("the test hides the cause: {e}")), 2)?
                } else {
                    comm.shrink(&e, 2)?
                };
                // Ranks may be a call apart when one dies: resume where the earliest stopped.
                let mut at = [it as i64];
                next.all_reduce(&mut at, ReduceOp::Min)?;
                say(format!(
                    "SHRUNK epoch={} world={} rank={} original={:?} after_ms={} resume={} cause: {e}",
                    next.epoch(),
                    next.world_size(),
                    next.rank(),
                    next.original_ranks(),
                    started.elapsed().as_millis(),
                    at[0]
                ));
                it = at[0] as usize;
                comm = next;
            }
        }
    }
    if wrong > 0 {
        return Err(Failure::Wrong(wrong));
    }
    Ok(it as u64)
}

/// Four threads issue collectives concurrently. Tickets may pair different threads' calls across
/// ranks, so every call has the same shape and the same per-rank input.
fn threads(comm: &Communicator) -> Result<u64, Failure> {
    let n = comm.world_size();
    let wrong = std::thread::scope(|scope| {
        let workers: Vec<_> = (0..4)
            .map(|t| {
                scope.spawn(move || -> Result<u64, Error> {
                    let input: Vec<f32> = (0..5000)
                        .map(|i| f32::input(comm.rank(), i, ReduceOp::Max))
                        .collect();
                    let mut wrong = 0;
                    for round in 0..25 {
                        let out = if (round + t) % 2 == 0 {
                            comm.all_reduce_async(input.clone(), ReduceOp::Max).wait()?
                        } else {
                            let mut b = input.clone();
                            comm.all_reduce(&mut b, ReduceOp::Max)?;
                            b
                        };
                        wrong += out
                            .iter()
                            .enumerate()
                            .filter(|(i, v)| **v != f32::expect(ReduceOp::Max, n, *i))
                            .count() as u64;
                    }
                    Ok(wrong)
                })
            })
            .collect();
        workers
            .into_iter()
            .map(|w| w.join().expect("worker thread"))
            .sum::<Result<u64, Error>>()
    })?;
    if wrong > 0 {
        return Err(Failure::Wrong(wrong));
    }
    Ok(100)
}

/// Signed zeros under min/max and NaNs with different payloads under sum: IEEE leaves the result
/// bits to operand order, and replicas must not drift even there.
fn bits(comm: &Communicator) -> Result<u64, Failure> {
    let (rank, n) = (comm.rank(), comm.world_size());
    let mut mismatches = 0;
    for count in [1usize, 7, 100_000] {
        for op in [ReduceOp::Min, ReduceOp::Max, ReduceOp::Sum, ReduceOp::Prod] {
            let mut buf: Vec<f32> = (0..count)
                .map(|i| match i % 3 {
                    0 => {
                        if rank % 2 == 0 {
                            0.0
                        } else {
                            -0.0
                        }
                    }
                    1 => f32::from_bits(0x7fc0_0000 | (rank as u32 + 1)),
                    _ => {
                        if rank % 2 == 0 {
                            -0.0
                        } else {
                            0.0
                        }
                    }
                })
                .collect();
            comm.all_reduce(&mut buf, op)?;
            let digest = fnv(bytemuck::cast_slice(&buf)) as i64;
            let mut all = vec![0i64; n];
            comm.all_gather(&[digest], &mut all)?;
            if all.iter().any(|d| *d != digest) {
                say(format!(
                    "WRONG bits differ across ranks: op={op} count={count}"
                ));
                mismatches += 1;
            }
        }
    }
    if mismatches > 0 {
        return Err(Failure::Wrong(mismatches));
    }
    Ok(12)
}
