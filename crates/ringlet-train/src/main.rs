//! `ringlet-train`: data-parallel training of a built-in model, one process per rank.

use clap::Parser;
use ringlet::{Communicator, Error};
use ringlet_burn::{TrainOptions, TrainSummary};
use ringlet_ddp::agree::at_start;
use ringlet_ddp::report::{metrics_path, Metrics, Progress};
use ringlet_ddp::{Balance, CheckpointOptions, Resume, StepReport, Survival};
use ringlet_train::burn_models::{self, CnnShape, LmShape, OptimizerChoice, Outcome};
use ringlet_train::models::cnn::Cnn;
use ringlet_train::models::transformer::{CharText, TEXT};
use ringlet_train::optim::{AdamW, Sgd};
use ringlet_train::shards;
use ringlet_train::train::{self, DeviceChoice, OptimizerKind, Options};
use std::io::IsTerminal;
use std::path::PathBuf;

/// Data-parallel training over Ringlet, without Python. Start one process per rank with a
/// launcher, e.g. `ringrun -n 4 -- ringlet-train --model cnn`. With no flags it trains an MLP on
/// the embedded 8x8 digits (scikit-learn's copy of the UCI digits, 1438 train / 359 test) and
/// prints the held-out accuracy.
///
/// Models: `mlp` (hand-written forward/backward, CPU or GPU), `cnn` (a Burn convolutional
/// network, for the digits or MNIST) and `transformer` (a Burn character-level language model on
/// the embedded text, Genesis 1-11 in the King James Version; prints held-out perplexity).
///
/// Exact data parallelism: each step takes the next --global-batch samples of one global order
/// (shuffled per epoch from --seed); rank r computes its contiguous slice; the gradient sums are
/// all-reduced and divided by the global batch, so any number of ranks and any split make the
/// update one process would. Gradients are all-reduced in buckets (reverse layer order) while
/// backward goes on; an mlp on GPUs sums its device buffers instead (NCCL when every rank has a
/// GPU of its own, else the TCP ring after backward; rank 0 logs which).
#[derive(Parser, Debug)]
#[command(version, verbatim_doc_comment)]
struct Args {
    /// `mlp`, `cnn` (Burn) or `transformer` (Burn).
    #[arg(long, default_value = "mlp", value_parser = ["mlp", "cnn", "transformer"])]
    model: String,
    /// For mlp and cnn: `digits` (embedded), `synthetic:N` (N deterministic samples of 64
    /// features, any size), a directory of MNIST-format IDX files (train-images-idx3-ubyte,
    /// train-labels-idx1-ubyte, and t10k-* for the test set if present), or `shards:DIR`, a
    /// sharded dataset written by `ringlet-shards convert` (DIR: its shared copy). For transformer:
    /// `genesis` (embedded) or a UTF-8 text file (its last 10% held out). Default: digits, or
    /// genesis for transformer.
    #[arg(long)]
    dataset: Option<String>,
    /// With --dataset shards:DIR: `on` makes each rank read and train on only the shards its host
    /// holds (per --shard-map); every sample is still used once per epoch and the global batch
    /// is unchanged, but each step draws from every host's shards in proportion to what it
    /// reads, rather than uniformly from the whole set (the exact order, `off`, the default).
    #[arg(long, default_value = "off", value_parser = ["on", "off"])]
    data_locality: String,
    /// JSON map of which hosts hold local copies of which shards:
    /// {"hosts": {"NAME": {"dir": "/local/copy", "shards": "0-7,test"}}}. Shards a host does not
    /// hold are read from the dataset's shared DIR.
    #[arg(long, env = "RINGLET_SHARD_MAP")]
    shard_map: Option<PathBuf>,
    /// This rank's host as the shard map names it (default: the host name).
    #[arg(long, env = "RINGLET_DATA_HOST")]
    data_host: Option<String>,
    /// What computes the model on each rank: `gpu` (GPU <local rank> modulo the GPUs present),
    /// `cpu`, or `auto` (the GPU where one can be used, else the CPU). mlp: cuBLAS for the matrix
    /// products, kernels/ compiled by NVRTC for the rest. cnn, transformer: Burn's CUDA backend,
    /// in a build with the `cuda` feature only (else Burn's CPU backend). Ranks may differ;
    /// --balance auto then gives the faster ones larger batches.
    #[arg(long, env = "RINGLET_DEVICE", default_value = "auto", value_parser = ["auto", "cpu", "gpu"])]
    device: String,
    /// mlp: hidden layer sizes, comma-separated (input and output sizes come from the data).
    #[arg(long, value_delimiter = ',', default_value = "128,64")]
    hidden: Vec<usize>,
    /// cnn: channels of the first convolution block (the second has twice as many).
    #[arg(long, default_value_t = 16, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    cnn_channels: usize,
    /// cnn: width of the hidden dense layer.
    #[arg(long, default_value_t = 64, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=1 << 20))]
    cnn_hidden: usize,
    /// transformer: characters of context.
    #[arg(long, default_value_t = 64, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=8192))]
    context: usize,
    /// transformer: model width (a multiple of --heads).
    #[arg(long, default_value_t = 64, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=16384))]
    d_model: usize,
    /// transformer: attention heads.
    #[arg(long, default_value_t = 4, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256))]
    heads: usize,
    /// transformer: blocks.
    #[arg(long, default_value_t = 2, value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=256))]
    layers: usize,
    /// Optimizer steps in all (a resumed run continues up to this). Default: --epochs.
    #[arg(long, conflicts_with = "epochs")]
    steps: Option<u64>,
    /// Passes over the training set (steps = epochs x floor(train samples / global batch)).
    /// Default: 20, or 1 for transformer (every character starts a window).
    #[arg(long)]
    epochs: Option<u64>,
    /// Samples per step over all ranks; the local batches sum to it.
    #[arg(long, default_value_t = 64)]
    global_batch: usize,
    /// Seed of the initial parameters and of the per-epoch sample order.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// `sgd` (with momentum) or `adamw`. Default: sgd, or adamw for transformer.
    #[arg(long, value_parser = ["sgd", "adamw"])]
    optimizer: Option<String>,
    /// Peak learning rate (default 0.05 for sgd; for adamw 0.001, or 0.003 for transformer).
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
    #[arg(long, env = "RINGLET_BALANCE", default_value = "off")]
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
    /// All-reduce after backward instead of during it, and back-propagate a Burn model in one
    /// piece instead of stage by stage (for comparison).
    #[arg(long)]
    no_overlap: bool,
    /// Shared directory for checkpoints (every rank must see it: NFS, a shared volume).
    #[arg(long, env = "RINGLET_CHECKPOINT_DIR")]
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
            ringlet_core::error_line!("ringlet-train: rank {rank} on {host}: {e}");
            1
        }
    };
    std::process::exit(code);
}

/// The data of a run: labelled samples (mlp, cnn) or a text (transformer).
enum Data {
    Labelled(ringlet_train::data::Dataset),
    Text(CharText),
}

/// What a rank reads before joining: the data, or where a sharded dataset's shared copy is (read
/// once the ranks know each other's hosts).
enum Loaded {
    Ready(Data),
    Sharded(PathBuf),
}

fn load(args: &Args) -> Result<Loaded, String> {
    let ready = |d| Ok(Loaded::Ready(d));
    match (args.model.as_str(), args.dataset.as_deref()) {
        ("transformer", _) if args.data_locality == "on" || args.shard_map.is_some() => {
            Err("--data-locality and --shard-map are for mlp and cnn".into())
        }
        ("transformer", None | Some("genesis")) => ready(Data::Text(CharText::new(TEXT, 0.1))),
        ("transformer", Some(path)) => {
            let text = read_text(std::path::Path::new(path))?;
            ready(Data::Text(CharText::new(&text, 0.1)))
        }
        (_, Some(spec)) if spec.starts_with("shards:") => {
            Ok(Loaded::Sharded(PathBuf::from(&spec["shards:".len()..])))
        }
        (_, _) if args.data_locality == "on" || args.shard_map.is_some() => Err(
            "--data-locality and --shard-map need --dataset shards:DIR (see ringlet-shards convert)"
                .into(),
        ),
        (_, spec) => ringlet_train::data::load(spec.unwrap_or("digits"))
            .map(|d| Loaded::Ready(Data::Labelled(d)))
            .map_err(|e| e.to_string()),
    }
}

/// A text file of at most 64 MiB (a character model has no use for more here, and a FIFO or
/// device would otherwise read without end).
fn read_text(path: &std::path::Path) -> Result<String, String> {
    use std::io::Read;
    const MAX: u64 = 64 << 20;
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let meta = file
        .metadata()
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if !meta.is_file() {
        return Err(format!("{}: not a regular file", path.display()));
    }
    let mut bytes = Vec::new();
    file.take(MAX + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if bytes.len() as u64 > MAX || bytes.len() < 2 {
        return Err(format!(
            "{}: a text of 2 bytes to {MAX} bytes is needed, it has {}",
            path.display(),
            bytes.len()
        ));
    }
    String::from_utf8(bytes).map_err(|e| format!("{}: not UTF-8: {e}", path.display()))
}

fn run(args: &Args) -> Result<(), Error> {
    // Replaced by the survivors' communicator when a rank is lost (`ringrun --min-ranks`). A
    // replacement (`--max-restarts` with it) joins the running job, or finds it finished.
    // Read before joining: a replacement joins a running job whose members wait for it.
    let loaded = load(args);
    let Some(mut comm) = Communicator::join_from_env()? else {
        println!("ringlet-train: the job finished before this replacement could join it");
        return Ok(());
    };
    let (rank, n) = (comm.rank(), comm.world_size());
    // Each rank reads the data itself; one that cannot makes all fail together.
    let data = at_start(&comm, loaded, "loading the dataset")?;
    let (data, locality, read) = match data {
        Loaded::Sharded(dir) => {
            let host = args
                .data_host
                .clone()
                .unwrap_or_else(ringlet::topology::hostname);
            let on = args.data_locality == "on";
            if on && Survival::from_env()?.min_ranks().is_some() {
                return Err(Error::InvalidArgument(
                    "--data-locality on cannot go on after a lost rank (its host's shards would go unread): drop --min-ranks or turn locality off".into(),
                ));
            }
            let o = shards::open_for_job(&comm, &dir, args.shard_map.as_deref(), &host, on)?;
            (Data::Labelled(o.data), o.locality, Some(o.all))
        }
        Loaded::Ready(d) => (d, None, None),
    };
    let transformer = args.model == "transformer";
    let train_len = match &data {
        Data::Labelled(d) => d.train_len(),
        Data::Text(t) => t.train.len().saturating_sub(args.context),
    };
    let per_epoch = (train_len / args.global_batch.max(1)) as u64;
    let epochs = args.epochs.unwrap_or(if transformer { 1 } else { 20 });
    let steps = args.steps.unwrap_or(epochs.saturating_mul(per_epoch));
    let resume: Resume = match args.resume.as_str() {
        "auto" | "never" => args.resume.parse().map_err(Error::InvalidArgument)?,
        p if args.checkpoint_dir.is_none() => {
            return Err(Error::InvalidArgument(format!(
                "--resume {p} needs --checkpoint-dir (where this run's own checkpoints go)"
            )))
        }
        p => Resume::Path(PathBuf::from(p)),
    };
    let checkpoint = args.checkpoint_dir.as_ref().map(|dir| CheckpointOptions {
        dir: dir.clone(),
        every: args.checkpoint_every,
        keep: args.keep,
        resume,
    });
    let device: DeviceChoice = args.device.parse().map_err(Error::InvalidArgument)?;
    let optimizer = args
        .optimizer
        .clone()
        .unwrap_or_else(|| if transformer { "adamw" } else { "sgd" }.to_string());
    if rank == 0 {
        let what = match &data {
            Data::Labelled(d) => format!(
                "{} ({} train / {} test, {} features, {} classes)",
                d.name,
                d.train_len(),
                d.test_len(),
                d.features,
                d.classes
            ),
            Data::Text(t) => format!(
                "text of {} train / {} held-out characters, {} distinct",
                t.train.len(),
                t.test.len(),
                t.vocab.len()
            ),
        };
        tracing::info!(
            "training {} on {what}, {n} ranks, {steps} steps, global batch {}",
            args.model,
            args.global_batch
        );
    }
    let metrics = match &args.metrics {
        Some(p) => Some(at_start(
            &comm,
            // By first-epoch rank: a replacement writes the file of the rank it stands in for.
            // A replacement appends: the lines of the rank it replaces stay.
            match comm.is_replacement() {
                true => Metrics::append(&metrics_path(p, comm.original_ranks()[rank])),
                false => Metrics::create(&metrics_path(p, comm.original_ranks()[rank])),
            }
            .map_err(|e| e.to_string()),
            "opening --metrics",
        )?),
        None => None,
    };
    let mut progress = Progress::new(rank, steps, args.log_every.unwrap_or(0), metrics);
    let report = |r: &StepReport| progress.report(r);
    let outcome = match (&data, args.model.as_str()) {
        (Data::Labelled(d), "mlp") => {
            let optimizer = match optimizer.as_str() {
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
            let opts = Options {
                device,
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
                checkpoint,
                rebalance_every: args.rebalance_every,
                calibration_steps: args.calibration_steps,
                locality: locality.clone(),
            };
            let s = train::train(&mut comm, d, &opts, report)?;
            Outcome {
                evaluation: format!(
                    "test accuracy {:.2}% (loss {:.4}) on {} held-out samples",
                    s.test_accuracy * 100.0,
                    s.test_loss,
                    d.test_len()
                ),
                metrics: serde_json::json!({"test_accuracy": s.test_accuracy, "test_loss": s.test_loss, "grad_sync": s.grad_sync}),
                summary: TrainSummary {
                    steps: s.steps,
                    resumed_from: s.resumed_from,
                    final_batches: s.final_batches,
                    samples_per_s: s.samples_per_s,
                    mean_step_s: s.mean_step_s,
                    comm_wait_fraction: s.comm_wait_fraction,
                    checkpoint_stall_fraction: s.checkpoint_stall_fraction,
                },
                params: s.params,
            }
        }
        (data, model) => {
            let default_lr = match (optimizer.as_str(), transformer) {
                ("adamw", true) => 0.003,
                ("adamw", false) => 0.001,
                _ => 0.05,
            };
            let optim = OptimizerChoice {
                kind: optimizer.clone(),
                lr: args.lr.map_or(default_lr, f64::from),
                momentum: f64::from(args.momentum),
                weight_decay: f64::from(args.weight_decay),
            };
            let mut opts = TrainOptions::new(args.global_batch, steps);
            opts.seed = args.seed;
            opts.lr = optim.lr;
            opts.warmup = args.warmup;
            opts.balance = args.balance.clone();
            opts.rebalance_every = args.rebalance_every;
            opts.sync.bucket_cap_bytes = (args.bucket_cap_mb * 1048576.0) as usize;
            opts.sync.first_bucket_bytes = (args.first_bucket_kb * 1024.0) as usize;
            opts.sync.overlap = !args.no_overlap;
            opts.staged = !args.no_overlap;
            opts.checkpoint = checkpoint;
            opts.calibration_steps = args.calibration_steps;
            opts.locality = locality.clone();
            // Every rank learns of one that cannot use its device, instead of waiting for it.
            let burn_device = at_start(
                &comm,
                burn_models::device(&comm, device).map_err(|e| e.to_string()),
                "opening the device (--device)",
            )?;
            match data {
                Data::Labelled(d) => {
                    let shape = CnnShape {
                        channels: args.cnn_channels,
                        hidden: args.cnn_hidden,
                    };
                    // side and classes: what ringlet-serve needs to rebuild the model.
                    let side = Cnn::side_of(d).map_err(Error::InvalidArgument)?;
                    opts.config = serde_json::json!({
                        "model": model, "channels": shape.channels, "hidden": shape.hidden,
                        "optimizer": optim.kind, "dataset": d.name, "side": side,
                        "classes": d.classes,
                    });
                    opts.config_keys = ["model", "channels", "hidden", "optimizer"]
                        .map(String::from)
                        .to_vec();
                    burn_models::train_cnn(
                        &mut comm,
                        d,
                        shape,
                        &burn_device,
                        &optim,
                        &opts,
                        report,
                    )?
                }
                Data::Text(t) => {
                    let shape = LmShape {
                        context: args.context,
                        d_model: args.d_model,
                        heads: args.heads,
                        layers: args.layers,
                    };
                    if !shape.d_model.is_multiple_of(shape.heads) {
                        return Err(Error::InvalidArgument(format!(
                            "--d-model {} is not a multiple of --heads {}",
                            shape.d_model, shape.heads
                        )));
                    }
                    opts.config = serde_json::json!({
                        "model": model, "context": shape.context, "d_model": shape.d_model,
                        "heads": shape.heads, "layers": shape.layers, "vocab": t.vocab.len(),
                        "optimizer": optim.kind,
                        // What ringlet-serve needs to turn text into ids and back.
                        "vocab_chars": t.vocab.iter().collect::<String>(),
                    });
                    opts.config_keys = [
                        "model",
                        "context",
                        "d_model",
                        "heads",
                        "layers",
                        "vocab",
                        "optimizer",
                    ]
                    .map(String::from)
                    .to_vec();
                    burn_models::train_transformer(
                        &mut comm,
                        t,
                        shape,
                        &burn_device,
                        &optim,
                        &opts,
                        report,
                    )?
                }
            }
        }
    };
    let elapsed = progress.elapsed_s();
    progress.finish()?;
    // The rank 0 of the ranks that finished: after a lost rank, perhaps another process.
    if comm.rank() == 0 {
        let s = &outcome.summary;
        let left = comm.world_size();
        let ranks = match left == n {
            true => format!("{n} ranks"),
            false => format!("{left} ranks (of {n}: {} lost)", n - left),
        };
        println!(
            "ringlet-train: {} steps on {ranks} in {elapsed:.1} s{}: {}; {:.0} samples/s, step {:.2} ms, comm wait {:.1}%, checkpoint stall {:.2}%, local batches {:?}{}",
            s.steps,
            s.resumed_from
                .map(|s| format!(" (resumed at step {s})"))
                .unwrap_or_default(),
            outcome.evaluation,
            s.samples_per_s,
            s.mean_step_s * 1e3,
            s.comm_wait_fraction * 100.0,
            s.checkpoint_stall_fraction * 100.0,
            s.final_batches,
            match locality.is_some() {
                // The balancer's split sets each host's share of the shards; a step's local
                // batches then follow the shards each host reads (see --metrics).
                true => " (the balancer's split; with data locality each host's share of a step follows its shards)",
                false => "",
            }
        );
        if let Some(r) = &read {
            println!(
                "ringlet-train: shards read by all ranks (data locality {}): {} files, {} B from hosts' own copies, {} B from the shared copy",
                args.data_locality,
                r.local_files + r.remote_files,
                r.local_bytes,
                r.remote_bytes
            );
        }
        if let Some(p) = &args.dump_params {
            let bytes: Vec<u8> = outcome
                .params
                .iter()
                .flat_map(|v| v.to_le_bytes())
                .collect();
            std::fs::write(p, bytes)
                .map_err(|e| Error::io(format!("writing {}", p.display()), e))?;
        }
        if let Some(p) = &args.summary {
            let mut json = serde_json::to_value(s).expect("the summary serialises");
            if let (Some(obj), Some(extra)) = (json.as_object_mut(), outcome.metrics.as_object()) {
                obj.extend(extra.clone());
                if let Some(r) = &read {
                    obj.insert("data_local_bytes".into(), r.local_bytes.into());
                    obj.insert("data_remote_bytes".into(), r.remote_bytes.into());
                    obj.insert("data_read_s".into(), r.seconds.into());
                }
            }
            let text = serde_json::to_string_pretty(&json).expect("the summary serialises");
            std::fs::write(p, text)
                .map_err(|e| Error::io(format!("writing {}", p.display()), e))?;
        }
    }
    Ok(())
}
