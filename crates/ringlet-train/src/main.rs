//! `ringlet-train`: data-parallel training of an MLP classifier, one process per rank.

use clap::Parser;
use ringlet::{Communicator, Error};
use ringlet_cuda::reference::{AdamW, Sgd};
use ringlet_ddp::report::{metrics_path, Metrics, Progress};
use ringlet_ddp::{agree, Balance, CheckpointOptions, Resume};
use ringlet_train::train::{self, DeviceChoice, OptimizerKind, Options};
use std::io::IsTerminal;
use std::path::PathBuf;

/// Data-parallel training of an MLP classifier over Ringlet, without Python. Start one process
/// per rank with a launcher, e.g. `ringrun -n 4 -- ringlet-train`. With no flags it trains on the
/// embedded 8x8 digits (scikit-learn's copy of the UCI digits, 1438 train / 359 test) and prints
/// the held-out accuracy.
///
/// Exact data parallelism: each step takes the next --global-batch samples of one global order
/// (shuffled per epoch from --seed); rank r computes its contiguous slice; the gradient sums are
/// all-reduced and divided by the global batch, so any number of ranks and any split make the
/// update one process would. Gradients are all-reduced in buckets (reverse layer order) while
/// backward goes on.
#[derive(Parser, Debug)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// `digits` (embedded), `synthetic:N` (N deterministic samples, any size), or a directory of
    /// MNIST-format IDX files (train-images-idx3-ubyte, train-labels-idx1-ubyte, and t10k-* for
    /// the test set if present).
    #[arg(long, default_value = "digits")]
    dataset: String,
    /// What computes the model on each rank: `gpu` (GPU <local rank> modulo the GPUs present;
    /// cuBLAS for the matrix products, kernels/ compiled by NVRTC for the rest), `cpu`, or `auto`
    /// (the GPU where CUDA, NVRTC, cuBLAS and a device are found, else the CPU). Ranks may
    /// differ; --balance auto then gives the faster ones larger batches.
    #[arg(long, env = "RINGLET_DEVICE", default_value = "auto", value_parser = ["auto", "cpu", "gpu"])]
    device: String,
    /// Hidden layer sizes, comma-separated (input and output sizes come from the data).
    #[arg(long, value_delimiter = ',', default_value = "128,64")]
    hidden: Vec<usize>,
    /// Optimizer steps in all (a resumed run continues up to this). Default: --epochs.
    #[arg(long, conflicts_with = "epochs")]
    steps: Option<u64>,
    /// Passes over the training set (steps = epochs x floor(train samples / global batch)).
    #[arg(long, default_value_t = 20)]
    epochs: u64,
    /// Samples per step over all ranks; the local batches sum to it.
    #[arg(long, default_value_t = 64)]
    global_batch: usize,
    /// Seed of the initial parameters and of the per-epoch sample order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// `sgd` (with momentum) or `adamw`.
    #[arg(long, default_value = "sgd", value_parser = ["sgd", "adamw"])]
    optimizer: String,
    /// Peak learning rate (default 0.05 for sgd, 0.001 for adamw).
    #[arg(long)]
    lr: Option<f32>,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9)]
    momentum: f32,
    /// Weight decay (L2 for sgd, decoupled for adamw).
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f32,
    /// Steps of linear learning-rate warm-up.
    #[arg(long, default_value_t = 20)]
    warmup: u64,
    /// How the global batch is split: `off` (equal), `static:w0,w1,...` (one weight per rank),
    /// `auto` (measured speed at start-up, then re-balanced when the slowest rank's compute time
    /// is more than 15% above the mean).
    #[arg(long, default_value = "off")]
    balance: Balance,
    /// Steps between re-balancing checks with --balance auto (one small all-reduce each).
    #[arg(long, default_value_t = 10)]
    rebalance_every: u64,
    /// Largest gradient bucket, in MiB.
    #[arg(long, default_value_t = 25.0)]
    bucket_cap_mb: f64,
    /// The first bucket (the last layers) closes at this many KiB, so communication starts early.
    #[arg(long, default_value_t = 1024.0)]
    first_bucket_kb: f64,
    /// All-reduce after backward instead of during it (for comparison).
    #[arg(long)]
    no_overlap: bool,
    /// Shared directory for checkpoints (every rank must see it: NFS, a shared volume).
    #[arg(long)]
    checkpoint_dir: Option<PathBuf>,
    /// Save every N steps and after the last (0: never save).
    #[arg(long, default_value_t = 100)]
    checkpoint_every: u64,
    /// Committed checkpoints to keep (at least 1).
    #[arg(long, default_value_t = 3, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..))]
    keep: usize,
    /// `auto` (newest verified checkpoint in --checkpoint-dir, if any), `never`, or a checkpoint
    /// directory.
    #[arg(long, default_value = "auto")]
    resume: String,
    /// Write one JSON line per step (step, loss, local batch, step/compute/comm-wait times, bytes
    /// all-reduced...). `{rank}` in the name is replaced by the rank; without it, ranks other than
    /// 0 append `.rank<R>`.
    #[arg(long)]
    metrics: Option<PathBuf>,
    /// Plain log lines every N steps when not on a terminal (default: about 10 per run).
    #[arg(long)]
    log_every: Option<u64>,
    /// Steps at the start left out of the throughput figures.
    #[arg(long, default_value_t = 3)]
    calibration_steps: u64,
    /// Rank 0 writes the final parameters here (raw little-endian f32), for comparisons.
    #[arg(long)]
    dump_params: Option<PathBuf>,
    /// Rank 0 writes the run's summary here as JSON.
    #[arg(long)]
    summary: Option<PathBuf>,
}

fn main() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RINGLET_LOG")
                .unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .try_init();
    let args = Args::parse();
    let code = match run(&args) {
        Ok(()) => 0,
        Err(e) => {
            // The rank as whichever launcher started us numbers it (torchrun, mpirun, Slurm...).
            let env = std::env::vars().collect();
            let rank = ringlet::bootstrap::detect(&env)
                .map_or_else(|_| "?".to_string(), |p| p.rank.to_string());
            let host = ringlet::topology::hostname();
            eprintln!("ringlet-train: rank {rank} on {host}: {e}");
            1
        }
    };
    std::process::exit(code);
}

fn run(args: &Args) -> Result<(), Error> {
    let comm = Communicator::from_env()?;
    let (rank, n) = (comm.rank(), comm.world_size());
    // Each rank reads the data itself; one that cannot makes all fail together.
    let data = agree(
        &comm,
        ringlet_train::data::load(&args.dataset).map_err(|e| e.to_string()),
        "loading the dataset",
    )?;
    let optimizer = match args.optimizer.as_str() {
        "adamw" => OptimizerKind::AdamW(AdamW {
            lr: args.lr.unwrap_or(AdamW::default().lr),
            weight_decay: args.weight_decay,
            ..AdamW::default()
        }),
        _ => OptimizerKind::Sgd(Sgd {
            lr: args.lr.unwrap_or(0.05),
            momentum: args.momentum,
            weight_decay: args.weight_decay,
        }),
    };
    let per_epoch = (data.train_len() / args.global_batch.max(1)) as u64;
    let steps = args.steps.unwrap_or(args.epochs * per_epoch);
    let resume = match args.resume.as_str() {
        "auto" => Resume::Auto,
        "never" => Resume::Never,
        p if args.checkpoint_dir.is_none() => {
            return Err(Error::InvalidArgument(format!(
                "--resume {p} needs --checkpoint-dir (where this run's own checkpoints go)"
            )))
        }
        p => Resume::Path(PathBuf::from(p)),
    };
    let opts = Options {
        device: match args.device.as_str() {
            "cpu" => DeviceChoice::Cpu,
            "gpu" => DeviceChoice::Gpu,
            _ => DeviceChoice::Auto,
        },
        hidden: args.hidden.clone(),
        optimizer,
        warmup: args.warmup,
        global_batch: args.global_batch,
        steps,
        seed: args.seed,
        balance: args.balance.clone(),
        bucket_cap_bytes: (args.bucket_cap_mb * 1048576.0) as usize,
        first_bucket_bytes: (args.first_bucket_kb * 1024.0) as usize,
        overlap: !args.no_overlap,
        checkpoint: args.checkpoint_dir.as_ref().map(|dir| CheckpointOptions {
            dir: dir.clone(),
            every: args.checkpoint_every,
            keep: args.keep,
            resume,
        }),
        rebalance_every: args.rebalance_every,
        calibration_steps: args.calibration_steps,
    };
    if rank == 0 {
        tracing::info!(
            "training on {} ({} train / {} test, {} features, {} classes), {n} ranks, {steps} steps, global batch {}",
            data.name,
            data.train_len(),
            data.test_len(),
            data.features,
            data.classes,
            args.global_batch
        );
    }
    let metrics = match &args.metrics {
        Some(p) => Some(agree(
            &comm,
            Metrics::create(&metrics_path(p, rank)).map_err(|e| e.to_string()),
            "opening --metrics",
        )?),
        None => None,
    };
    let mut progress = Progress::new(rank, steps, args.log_every.unwrap_or(0), metrics);
    let summary = train::train(&comm, &data, &opts, |r| progress.report(r))?;
    let elapsed = progress.elapsed_s();
    progress.finish()?;
    if rank == 0 {
        println!(
            "ringlet-train: {} steps on {n} ranks in {:.1} s{}: test accuracy {:.2}% (loss {:.4}) on {} held-out samples; {:.0} samples/s, step {:.2} ms, comm wait {:.1}%, checkpoint stall {:.2}%, local batches {:?}",
            summary.steps,
            elapsed,
            summary
                .resumed_from
                .map(|s| format!(" (resumed at step {s})"))
                .unwrap_or_default(),
            summary.test_accuracy * 100.0,
            summary.test_loss,
            data.test_len(),
            summary.samples_per_s,
            summary.mean_step_s * 1e3,
            summary.comm_wait_fraction * 100.0,
            summary.checkpoint_stall_fraction * 100.0,
            summary.final_batches
        );
        if let Some(p) = &args.dump_params {
            let bytes: Vec<u8> = summary
                .params
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            std::fs::write(p, bytes)
                .map_err(|e| Error::io(format!("writing {}", p.display()), e))?;
        }
        if let Some(p) = &args.summary {
            let text = serde_json::to_string_pretty(&summary).expect("the summary serialises");
            std::fs::write(p, text)
                .map_err(|e| Error::io(format!("writing {}", p.display()), e))?;
        }
    }
    Ok(())
}
