//! `ringlet-serve run` scores a stream; `ringlet-serve versions DIR` lists model versions.

use clap::{Parser, Subcommand};
use ringlet_serve::compute::Compute;
use ringlet_serve::redis_streams::{RedisStreams, Streams};
use ringlet_serve::serve::{self, Options};
use ringlet_serve::versions::{self, Source};
use ringlet_train::train::DeviceChoice;
use std::collections::HashMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Score records of a stream with a model trained by ringlet-train, and list model versions.
#[derive(Parser, Debug)]
#[command(version)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Consume records as one replica of a consumer group, score them in micro-batches and
    /// write each prediction (record id, class, confidence, model version, batch; a
    /// transformer's also the next character) to the output stream, acknowledging the record in the same atomic step. Malformed records go to the
    /// dead-letter stream with the reason. Runs until SIGINT/SIGTERM (the batch in hand is
    /// finished) or --exit-when-idle, then prints records/s and latency percentiles.
    Run(Box<RunArgs>),
    /// List the checkpoints of DIR, newest first: step, epoch, model, training loss and the
    /// model file's SHA-256, or why one would be refused. Each is verified as resume verifies.
    Versions {
        dir: PathBuf,
        /// Seconds the storage has to answer, per checkpoint.
        #[arg(long, default_value_t = 60.0)]
        timeout: f64,
    },
}

#[derive(clap::Args, Debug)]
struct RunArgs {
    /// The Redis server (redis://host:port[/db]).
    #[arg(
        long,
        env = "RINGLET_SERVE_REDIS",
        default_value = "redis://127.0.0.1:6379"
    )]
    redis: String,
    /// The input stream.
    #[arg(long, default_value = "records")]
    input: String,
    /// The output stream: one entry per scored record.
    #[arg(long, default_value = "predictions")]
    output: String,
    /// The dead-letter stream: one entry per malformed record, with the reason.
    #[arg(long, default_value = "records-dead")]
    dead_letter: String,
    /// The consumer group the replicas share (made if missing, from the stream's start).
    #[arg(long, default_value = "ringlet-serve")]
    group: String,
    /// This replica's consumer name. Default: host name, process id and a nonce.
    #[arg(long)]
    consumer: Option<String>,
    /// Serve the newest committed checkpoint of this directory, and each newer one committed
    /// later (swapped in between batches). Wins over --pin.
    #[arg(long, required_unless_present = "pin")]
    checkpoints: Option<PathBuf>,
    /// Serve this checkpoint (a step-N directory) and no other (an image made with `ringrun image
    /// build --model` sets RINGLET_SERVE_PIN to the one it holds).
    #[arg(long, env = "RINGLET_SERVE_PIN")]
    pin: Option<PathBuf>,
    /// The record field with the features: a JSON array of numbers; for a transformer, UTF-8
    /// text whose next character is predicted (its last `context` characters are read).
    #[arg(long, default_value = "features")]
    field: String,
    /// What scores: `gpu` (--gpu, else GPU <local rank> modulo the GPUs present; an error where
    /// none can be used), `cpu`, or `auto` (the GPU where one can be used, else the CPU). mlp:
    /// cuBLAS and kernels/ compiled by NVRTC, the forward pass GPU training runs. cnn,
    /// transformer: Burn's CUDA backend in a build with the `cuda` feature (`auto` falls back to
    /// the CPU without it, `gpu` refuses the version).
    #[arg(long, env = "RINGLET_DEVICE", default_value = "auto", value_parser = ["auto", "cpu", "gpu"])]
    device: String,
    /// The GPU to score on, by CUDA ordinal. Default: the local rank the launcher gives
    /// (LOCAL_RANK, ...; 0 without one) modulo the GPUs present.
    #[arg(long)]
    gpu: Option<usize>,
    /// Records per micro-batch, at most.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u32).range(1..=4096))]
    batch: u32,
    /// Milliseconds a batch waits to fill once its first record is in (at most 1000). 0: a
    /// batch is what has arrived, up to --batch (lowest latency; batches grow with the load).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=1000))]
    max_wait_ms: u64,
    /// Milliseconds a record may stay pending with another replica before this one takes it
    /// over (that replica died mid-batch).
    /// At least 1000, and 2 x --max-wait-ms + 1000: a live replica's batch must never look dead.
    #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u64).range(1000..=3_600_000))]
    claim_idle_ms: u64,
    /// A record handed out more than this many times (each replica holding it died: a poison
    /// record) goes to the dead-letter stream instead of being scored again.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..))]
    max_deliveries: u64,
    /// Milliseconds between looks for a newer version.
    #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u64).range(10..))]
    poll_versions_ms: u64,
    /// Seconds any one operation on Redis or the checkpoint storage may take.
    #[arg(long, default_value_t = 30.0)]
    timeout: f64,
    /// Exit after no record came for this many seconds.
    #[arg(long)]
    exit_when_idle: Option<f64>,
}

fn seconds(v: f64, what: &str) -> Result<Duration, String> {
    match v {
        v if v.is_finite() && v > 0.0 && v <= 1e6 => Ok(Duration::from_secs_f64(v)),
        _ => Err(format!("{what} {v}: between 0 and 1e6 seconds")),
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RINGLET_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let result = match Cli::parse().command {
        Command::Versions { dir, timeout } => seconds(timeout, "--timeout").and_then(|t| {
            for line in versions::list(&dir, t)? {
                println!("{line}");
            }
            Ok(())
        }),
        Command::Run(args) => run(*args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("ringlet-serve: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: RunArgs) -> Result<(), String> {
    let timeout = seconds(args.timeout, "--timeout")?;
    if timeout < Duration::from_secs(2) {
        return Err("--timeout: at least 2 seconds (reads wait up to 1 s)".into());
    }
    let max_wait = Duration::from_millis(args.max_wait_ms);
    if args.claim_idle_ms < 2 * args.max_wait_ms + 1000 {
        return Err(format!(
            "--claim-idle-ms {} is too short for --max-wait-ms {}: at least {} (twice the wait, \
             and a second to score), or live replicas' batches are taken over",
            args.claim_idle_ms,
            args.max_wait_ms,
            2 * args.max_wait_ms + 1000
        ));
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(sig, Arc::clone(&stop))
            .map_err(|e| format!("installing a signal handler: {e}"))?;
    }
    let consumer = args.consumer.unwrap_or_else(default_consumer);
    let choice: DeviceChoice = args.device.parse()?;
    // A replica started by a launcher (ringrun, torchrun, mpirun, Slurm, ...) takes the GPU of
    // its local rank; one started alone, GPU 0.
    let env: HashMap<String, String> = std::env::vars().collect();
    let local_rank = ringlet::bootstrap::detect(&env).map_or(0, |p| p.local_rank);
    let compute = Compute::new(choice, args.gpu, local_rank)?;
    let mut source = Source::new(
        args.checkpoints.clone(),
        Duration::from_millis(args.poll_versions_ms),
        timeout,
        compute,
    );
    let version = match (&args.pin, &args.checkpoints) {
        // --checkpoints wins: an image's RINGLET_SERVE_PIN then yields to the directory named.
        (_, Some(_)) => source.first()?,
        (Some(pin), None) => source.pinned(pin)?,
        (None, None) => unreachable!("clap requires one of them"),
    };
    let streams = Streams {
        input: args.input,
        output: args.output,
        dead_letter: args.dead_letter,
        group: args.group,
        consumer: consumer.clone(),
    };
    let mut engine =
        RedisStreams::connect(&args.redis, streams, timeout).map_err(|e| e.to_string())?;
    let opts = Options {
        batch: args.batch as usize,
        max_wait,
        claim_idle: Duration::from_millis(args.claim_idle_ms),
        exit_when_idle: args
            .exit_when_idle
            .map(|s| seconds(s, "--exit-when-idle"))
            .transpose()?,
        field: args.field,
        replica: consumer.clone(),
        max_deliveries: args.max_deliveries,
    };
    let started = Instant::now();
    let report = serve::run(&mut engine, &mut source, version, &opts, &stop)?;
    let busy = report.busy.as_secs_f64().max(1e-9);
    let ms = |q| {
        report
            .latencies
            .percentile(q)
            .map_or("-".into(), |v| v.to_string())
    };
    println!(
        "ringlet-serve: {consumer} scored {} records ({} dead-lettered, {} left to other replicas) \
         in {} batches, {:.1} s running: {:.0} records/s while busy; latency p50 {} ms p99 {} ms; \
         versions {}",
        report.scored,
        report.dead,
        report.lost,
        report.batches,
        started.elapsed().as_secs_f64(),
        (report.scored + report.dead) as f64 / busy,
        ms(0.5),
        ms(0.99),
        report.versions.join(" ")
    );
    Ok(())
}

fn default_consumer() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "replica".into());
    let nonce = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!("{host}-{}-{nonce:08x}", std::process::id())
}
