//! `ringlet-bench`: the nccl-tests sweep for Ringlet's collectives. Run one process per rank
//! (`ringrun -n 4 -- ringlet-bench all_reduce -b 8 -e 128M`); rank 0 prints the table.

mod backend;
mod gpu_backend;
mod pattern;

use backend::{Backend, BackendKind, Buffers};
use clap::{Parser, ValueEnum};
use ringlet::{Communicator, DType, Element, Error, ReduceOp};
use ringlet_core::with_dtype;
use std::time::Instant;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
#[value(rename_all = "snake_case")]
enum Op {
    AllReduce,
    Broadcast,
    AllGather,
    ReduceScatter,
}

/// Bandwidth of Ringlet's collectives, in nccl-tests' columns. Start one process per rank with a
/// launcher (ringrun, torchrun, ...); rank 0 prints one row per size:
/// size, count, type, redop, root, time (median µs of one call, slowest rank), algbw = size/time,
/// busbw = algbw x (2(n-1)/n for all_reduce, (n-1)/n for all_gather and reduce_scatter, 1 for
/// broadcast), #wrong (elements differing from the exact expected result, all ranks, with -c 1).
/// Exits non-zero if any element is wrong or a collective fails.
///
/// Built with `--features mpi` and started by mpirun, ranks bootstrap over MPI (no MASTER_ADDR),
/// and `--backend mpi` (or `tcp,mpi`) measures the MPI library's collectives on the same
/// buffers, size by size, beside Ringlet's ring.
#[derive(Parser, Debug)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// The collective to measure.
    #[arg(value_enum, default_value = "all_reduce")]
    collective: Op,
    /// Smallest size in bytes (K, M, G suffixes allowed). For all_gather this is the gathered
    /// (output) size, for reduce_scatter the input size, as in nccl-tests.
    #[arg(short = 'b', long = "minbytes", default_value = "8", value_parser = parse_size)]
    min_bytes: usize,
    /// Largest size in bytes.
    #[arg(short = 'e', long = "maxbytes", default_value = "128M", value_parser = parse_size)]
    max_bytes: usize,
    /// Multiply the size by this factor at each step.
    #[arg(short = 'f', long = "stepfactor", default_value_t = 2)]
    step_factor: usize,
    /// Timed iterations per size.
    #[arg(short = 'n', long = "iters", default_value_t = 20)]
    iters: usize,
    /// Untimed warm-up iterations per size.
    #[arg(short = 'w', long = "warmup_iters", default_value_t = 5)]
    warmup: usize,
    /// 1: check every element of one extra call against the exact expected result.
    #[arg(short = 'c', long = "check", default_value_t = 1)]
    check: u8,
    /// Element type: float, double, half, bfloat16, int32, int64, uint8.
    #[arg(short = 'd', long = "datatype", default_value = "float", value_parser = parse_dtype)]
    dtype: DType,
    /// Reduction: sum, prod, min, max, avg.
    #[arg(short = 'o', long = "op", default_value = "sum", value_parser = parse_op)]
    op: ReduceOp,
    /// Root rank of broadcast.
    #[arg(short = 'r', long = "root", default_value_t = 0)]
    root: usize,
    /// Also write the rows as JSON: {"rows": [{backend, size_bytes, count, dtype, op, time_us,
    /// algbw_gbps, busbw_gbps, wrong}, ...]} (rank 0 only).
    #[arg(long)]
    json: Option<std::path::PathBuf>,
    /// What to measure, comma-separated, each size in turn (a `backend` column is added when
    /// there are several).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "tcp")]
    backend: Vec<BackendKind>,
    /// Run `tcp` on device buffers: each chunk staged through pinned host blocks and reduced on
    /// the GPU (Ringlet's fallback where NCCL cannot serve). `nccl` always uses device buffers.
    #[arg(long)]
    device: bool,
}

fn parse_size(s: &str) -> Result<usize, String> {
    ringlet::config::parse_bytes(s)
        .ok_or_else(|| format!("{s:?} is not a size (e.g. 8, 64K, 128M)"))
}

fn parse_dtype(s: &str) -> Result<DType, String> {
    DType::parse(s).ok_or_else(|| {
        format!("unknown datatype {s:?} (float, double, half, bfloat16, int32, int64, uint8)")
    })
}

fn parse_op(s: &str) -> Result<ReduceOp, String> {
    ReduceOp::parse(s).ok_or_else(|| format!("unknown op {s:?} (sum, prod, min, max, avg)"))
}

#[derive(serde::Serialize)]
struct Row {
    backend: String,
    /// The all-reduce algorithm Ringlet's own transport ran ("" for other collectives and
    /// backends).
    algo: String,
    size_bytes: usize,
    count: usize,
    dtype: String,
    op: String,
    time_us: f64,
    algbw_gbps: f64,
    busbw_gbps: f64,
    wrong: u64,
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RINGLET_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let args = Args::parse();
    match run(&args) {
        Ok(wrong) if wrong > 0 => {
            ringlet_core::error_line!("ringlet-bench: {wrong} wrong elements");
            std::process::exit(1);
        }
        Ok(_) => {}
        Err(e) => {
            ringlet_core::error_line!("ringlet-bench: {e}");
            std::process::exit(1);
        }
    }
}

fn run(args: &Args) -> Result<u64, Error> {
    if args.step_factor < 2 || args.min_bytes > args.max_bytes || args.iters == 0 {
        return Err(Error::InvalidArgument(
            "need -f >= 2, -b <= -e and -n >= 1".into(),
        ));
    }
    let wants = |k| args.backend.contains(&k);
    #[cfg(feature = "mpi")]
    let universe =
        if wants(BackendKind::Mpi) || ringlet::mpi_boot::launched_by_mpi() {
            Some(ringlet::mpi::initialize().ok_or_else(|| {
                Error::Config("MPI was already initialised in this process".into())
            })?)
        } else {
            None
        };
    #[cfg(not(feature = "mpi"))]
    if wants(BackendKind::Mpi) {
        return Err(Error::Config(
            "--backend mpi needs a build with the mpi feature: cargo build --release -p ringlet-bench --features mpi (Open MPI and libclang-dev installed)".into(),
        ));
    }
    let ring_needed = [BackendKind::Tcp, BackendKind::Auto, BackendKind::Nccl]
        .iter()
        .any(|k| wants(*k));
    let tcp = if ring_needed {
        #[cfg(feature = "mpi")]
        let comm = match &universe {
            Some(u) => Communicator::from_mpi(&u.world())?,
            None => Communicator::from_env()?,
        };
        #[cfg(not(feature = "mpi"))]
        let comm = Communicator::from_env()?;
        Some(comm)
    } else {
        None
    };
    #[cfg(feature = "mpi")]
    let mpi = universe
        .as_ref()
        .filter(|_| wants(BackendKind::Mpi))
        .map(|u| backend::MpiBackend { world: u.world() });
    let backends = resolve_backends(&args.backend, tcp.as_ref())?;
    let (rank, n) = match (&tcp, args.backend.first()) {
        (Some(c), _) => (c.rank(), c.world_size()),
        #[cfg(feature = "mpi")]
        (None, _) => {
            let m = mpi.as_ref().expect("mpi backend requested");
            (m.rank(), m.world_size())
        }
        #[cfg(not(feature = "mpi"))]
        (None, _) => unreachable!("tcp is the only backend without the mpi feature"),
    };
    if args.root >= n {
        return Err(Error::InvalidArgument(format!(
            "root {} is not below world size {n}",
            args.root
        )));
    }
    let lead = rank == 0;
    let several = backends.len() > 1;
    if lead {
        let names: Vec<String> = backends
            .iter()
            .map(|b| format!("{b:?}").to_lowercase())
            .collect();
        println!(
            "# ringlet-bench {:?}: {n} ranks, {} {}, iters {} warmup {} check {}, backend {}",
            args.collective,
            args.dtype,
            args.op,
            args.iters,
            args.warmup,
            args.check,
            names.join(",")
        );
        println!("#");
        let extra = if several {
            format!(" {:>7}", "backend")
        } else {
            String::new()
        };
        println!(
            "# {:>10} {:>12} {:>8} {:>6} {:>5} {:>10} {:>8} {:>8} {:>7} {:>8}{extra}",
            "size", "count", "type", "redop", "root", "time", "algbw", "busbw", "#wrong", "algo"
        );
        println!(
            "# {:>10} {:>12} {:>8} {:>6} {:>5} {:>10} {:>8} {:>8} {:>7}",
            "(B)", "(elements)", "", "", "", "(us)", "(GB/s)", "(GB/s)", ""
        );
    }
    let gpu = match &tcp {
        Some(ring) if args.device || backends.contains(&BackendKind::Nccl) => {
            Some(gpu_backend::open_gpu(ring)?)
        }
        _ => None,
    };
    let nccl = match (&tcp, &gpu) {
        (Some(ring), Some(g)) if backends.contains(&BackendKind::Nccl) => {
            Some(gpu_backend::GpuBackend::new(
                ring,
                g.clone(),
                gpu_backend::Engine::Nccl(ring.nccl(g.clone())?),
            ))
        }
        _ => None,
    };
    let staged = match (&tcp, &gpu) {
        (Some(ring), Some(g)) if args.device => Some(gpu_backend::GpuBackend::new(
            ring,
            g.clone(),
            gpu_backend::Engine::Staged,
        )),
        _ => None,
    };
    let mut rows = Vec::new();
    let mut size = args.min_bytes;
    while size <= args.max_bytes {
        for kind in &backends {
            let row = match kind {
                BackendKind::Tcp => match &staged {
                    Some(s) => with_dtype!(args.dtype, T => measure::<T>(s, args, size)?),
                    None => {
                        let c = tcp.as_ref().expect("tcp backend started");
                        with_dtype!(args.dtype, T => measure::<T>(c, args, size)?)
                    }
                },
                BackendKind::Nccl => {
                    let c = nccl.as_ref().expect("nccl backend started");
                    with_dtype!(args.dtype, T => measure::<T>(c, args, size)?)
                }
                #[cfg(feature = "mpi")]
                BackendKind::Mpi => {
                    let m = mpi.as_ref().expect("mpi backend started");
                    with_dtype!(args.dtype, T => measure::<T>(m, args, size)?)
                }
                #[cfg(not(feature = "mpi"))]
                BackendKind::Mpi => unreachable!("refused above"),
                BackendKind::Auto => unreachable!("resolved above"),
            };
            let Some(mut row) = row else { continue };
            row.backend = format!("{kind:?}").to_lowercase();
            if let (BackendKind::Tcp, Op::AllReduce, Some(c)) = (kind, args.collective, &tcp) {
                row.algo = c.all_reduce_algorithm(row.size_bytes).name().into();
            }
            if lead {
                let extra = if several {
                    format!(" {:>7}", row.backend)
                } else {
                    String::new()
                };
                println!(
                    "  {:>10} {:>12} {:>8} {:>6} {:>5} {:>10.2} {:>8.3} {:>8.3} {:>7} {:>8}{extra}",
                    row.size_bytes,
                    row.count,
                    row.dtype,
                    row.op,
                    if args.collective == Op::Broadcast {
                        args.root as i64
                    } else {
                        -1
                    },
                    row.time_us,
                    row.algbw_gbps,
                    row.busbw_gbps,
                    row.wrong,
                    if row.algo.is_empty() { "-" } else { &row.algo }
                );
            }
            rows.push(row);
        }
        size = match size.checked_mul(args.step_factor) {
            Some(s) => s,
            None => break,
        };
    }
    let wrong: u64 = rows.iter().map(|r| r.wrong).sum();
    if lead {
        let avg = rows.iter().map(|r| r.busbw_gbps).sum::<f64>() / rows.len().max(1) as f64;
        println!(
            "# Out of bounds values : {wrong} {}",
            if wrong == 0 { "OK" } else { "FAILED" }
        );
        println!("# Avg bus bandwidth    : {avg:.4}");
        if let Some(path) = &args.json {
            let hosts = tcp.as_ref().map(|c| c.host_layout().hosts().to_vec());
            let doc = serde_json::json!({
                "collective": format!("{:?}", args.collective),
                "ranks": n,
                "hosts": hosts,
                "rows": rows,
            });
            std::fs::write(
                path,
                serde_json::to_vec_pretty(&doc).expect("rows serialise"),
            )
            .map_err(|e| Error::io(format!("writing {}", path.display()), e))?;
        }
    }
    if let Some(rss) = peak_rss_mib() {
        println!("# rank {rank} peak RSS: {rss:.1} MiB");
    }
    Ok(wrong)
}

/// `auto` and `nccl` become what the job can run, decided once by rank 0 for every rank
/// (`RINGLET_DEBUG=1` prints the device table).
fn resolve_backends(
    asked: &[BackendKind],
    ring: Option<&Communicator>,
) -> Result<Vec<BackendKind>, Error> {
    use ringlet::topology::{Backend, BackendChoice};
    let mut out = Vec::new();
    for kind in asked {
        let choice = match kind {
            BackendKind::Auto => BackendChoice::Auto,
            BackendKind::Nccl => BackendChoice::Nccl,
            other => {
                out.push(*other);
                continue;
            }
        };
        let comm = ring.expect("the ring is started for auto and nccl");
        let topology = comm.topology(choice)?;
        match topology.backend {
            Backend::Tcp => out.push(BackendKind::Tcp),
            Backend::Nccl => out.push(BackendKind::Nccl),
        }
    }
    out.dedup();
    Ok(out)
}

/// The largest resident set this process reached (`VmHWM`), in MiB.
fn peak_rss_mib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Runs warm-up, timed iterations and the check for one size. `None` if the size holds no
/// element for this collective.
fn measure<T: Element>(
    comm: &impl Backend,
    args: &Args,
    size: usize,
) -> Result<Option<Row>, Error> {
    let n = comm.world_size();
    let rank = comm.rank();
    let esize = std::mem::size_of::<T>();
    // Elements per rank-block for all_gather / reduce_scatter, whole buffer otherwise.
    let (count, factor) = match args.collective {
        Op::AllReduce => (size / esize, 2.0 * (n as f64 - 1.0) / n as f64),
        Op::Broadcast => (size / esize, 1.0),
        Op::AllGather | Op::ReduceScatter => (size / esize / n, (n as f64 - 1.0) / n as f64),
    };
    if count == 0 {
        return Ok(None);
    }
    let total = match args.collective {
        Op::AllGather | Op::ReduceScatter => count * n,
        _ => count,
    };
    let mut b = Buffers::<T> {
        send: Vec::new(),
        recv: Vec::new(),
    };
    let out_of_place = comm.out_of_place();
    let fill = |b: &mut Buffers<T>| match args.collective {
        Op::AllReduce | Op::Broadcast if out_of_place => {
            b.send.resize(count, T::zeroed());
            pattern::fill(&mut b.send, rank, 0);
            b.recv.resize(count, T::zeroed());
            if args.collective == Op::Broadcast {
                b.recv.copy_from_slice(&b.send);
            }
        }
        Op::AllReduce | Op::Broadcast => {
            b.recv.resize(count, T::zeroed());
            pattern::fill(&mut b.recv, rank, 0);
        }
        Op::AllGather => {
            b.send.resize(count, T::zeroed());
            pattern::fill(&mut b.send, rank, rank * count);
            b.recv.resize(count * n, T::zeroed());
        }
        Op::ReduceScatter => {
            b.send.resize(count * n, T::zeroed());
            pattern::fill(&mut b.send, rank, 0);
            b.recv.resize(count, T::zeroed());
        }
    };
    let call = |b: &mut Buffers<T>| match args.collective {
        Op::AllReduce => comm.all_reduce(b, args.op),
        Op::Broadcast => comm.broadcast(b, args.root),
        Op::AllGather => comm.all_gather(b),
        Op::ReduceScatter => comm.reduce_scatter(b, args.op),
    };
    fill(&mut b);
    comm.upload(&b)?;
    comm.barrier()?;
    for _ in 0..args.warmup {
        call(&mut b)?;
    }
    let mut times = Vec::with_capacity(args.iters);
    for _ in 0..args.iters {
        let t = Instant::now();
        call(&mut b)?;
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    // Report the slowest rank's median: a collective is as fast as its slowest member.
    let median = [comm.max_f64(times[times.len() / 2])?];
    let mut wrong = [0i64];
    if args.check != 0 {
        fill(&mut b);
        comm.upload(&b)?;
        call(&mut b)?;
        comm.download(&mut b)?;
        corrupt_for_test(&mut b.recv, rank);
        wrong[0] = comm.sum_i64(check(args, &b, rank, n, count) as i64)?;
    }
    let bytes = total * esize;
    let algbw = bytes as f64 / median[0] / 1e9;
    Ok(Some(Row {
        backend: String::new(),
        algo: String::new(),
        size_bytes: bytes,
        count: total,
        dtype: T::DTYPE.name().into(),
        op: args.op.name().into(),
        time_us: median[0] * 1e6,
        algbw_gbps: algbw,
        busbw_gbps: algbw * factor,
        wrong: wrong[0] as u64,
    }))
}

/// Test hook: `RINGLET_BENCH_CORRUPT_RANK=R` makes rank R damage one element of its result
/// before checking, so tests can prove that the check (and the exit status) catch it.
fn corrupt_for_test<T: Element>(recv: &mut [T], rank: usize) {
    let target = std::env::var("RINGLET_BENCH_CORRUPT_RANK")
        .ok()
        .and_then(|v| v.parse::<usize>().ok());
    if target == Some(rank) {
        if let Some(x) = recv.first_mut() {
            *x = T::from_f64(x.to_f64() + 3.0);
        }
    }
}

fn check<T: Element>(args: &Args, b: &Buffers<T>, rank: usize, n: usize, count: usize) -> u64 {
    let op = args.op;
    match args.collective {
        Op::AllReduce => pattern::count_wrong(&b.recv, 0, op, |i| pattern::reduced::<T>(op, n, i)),
        Op::Broadcast => pattern::count_wrong(&b.recv, 0, ReduceOp::Sum, |i| {
            T::from_f64(pattern::input(T::DTYPE, args.root, i))
        }),
        Op::AllGather => pattern::count_wrong(&b.recv, 0, ReduceOp::Sum, |i| {
            T::from_f64(pattern::input(T::DTYPE, i / count, i))
        }),
        Op::ReduceScatter => pattern::count_wrong(&b.recv, rank * count, op, |i| {
            pattern::reduced::<T>(op, n, i)
        }),
    }
}
