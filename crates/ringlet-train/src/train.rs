//! The training loop: exact data parallelism with the gradient all-reduce overlapped with
//! backward, per-device batch balancing, checkpoints.
//!
//! Each step takes the next `global_batch` samples of one global order (a permutation of the
//! training set per epoch, from the seed); rank r computes the contiguous slice that the
//! cumulative local batch sizes give it. Ranks sum per-sample gradients, the all-reduce adds the
//! sums, and the optimizer divides by the global batch: the update is the one a single process
//! would make with the whole batch, whatever the number of ranks or the split.
//!
//! Overlap: gradients are grouped into buckets in reverse layer order (the first bucket small, so
//! communication starts early); backward hands each layer's gradient over as soon as it is
//! computed, and a bucket's asynchronous all-reduce starts as soon as its last layer is in,
//! while backward goes on with the layers below.

use crate::balance::{self, Balance, Rebalancer};
use crate::checkpoint::{self, Checkpointer, Snapshot, State, Tensor};
use crate::data::Dataset;
use crate::gpu::GpuBackend;
use crate::model::{Layer, Mlp, Workspace};
use crate::tensor::{Backend, Host};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use ringlet::{AllReduceHandle, Communicator, Error, ReduceOp};
use ringlet_cuda::reference::{AdamW, Sgd};
use std::io::Write;
use std::ops::Range;
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// The optimizer and its hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum OptimizerKind {
    Sgd(Sgd),
    AdamW(AdamW),
}

impl OptimizerKind {
    fn name(&self) -> &'static str {
        match self {
            OptimizerKind::Sgd(_) => "sgd",
            OptimizerKind::AdamW(_) => "adamw",
        }
    }
    fn lr(&self) -> f32 {
        match self {
            OptimizerKind::Sgd(o) => o.lr,
            OptimizerKind::AdamW(o) => o.lr,
        }
    }
}

/// `--device`: what computes the model on this rank.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    Cpu,
    /// GPU local rank modulo the number of GPUs; an error where there is none.
    Gpu,
    /// The GPU where CUDA, NVRTC, cuBLAS and a device are found, else the CPU.
    Auto,
}

/// `--resume`.
#[derive(Clone, Debug, PartialEq)]
pub enum Resume {
    /// The newest committed checkpoint whose checksums verify, if any.
    Auto,
    Never,
    Path(PathBuf),
}

#[derive(Clone, Debug)]
pub struct CheckpointOptions {
    pub dir: PathBuf,
    pub every: u64,
    pub keep: usize,
    pub resume: Resume,
}

#[derive(Clone, Debug)]
pub struct Options {
    pub device: DeviceChoice,
    /// Hidden layer sizes (input and output come from the data).
    pub hidden: Vec<usize>,
    pub optimizer: OptimizerKind,
    /// Steps over which the learning rate rises linearly to its value.
    pub warmup: u64,
    pub global_batch: usize,
    /// Total optimizer steps (a resumed run continues up to it).
    pub steps: u64,
    pub seed: u64,
    pub balance: Balance,
    pub bucket_cap_bytes: usize,
    pub first_bucket_bytes: usize,
    pub overlap: bool,
    pub checkpoint: Option<CheckpointOptions>,
    /// Steps between rebalancing checks (`--balance auto`).
    pub rebalance_every: u64,
    /// Steps after start-up whose timings do not count (warm caches, first connections).
    pub calibration_steps: u64,
}

/// What one step did, for the progress line and `--metrics`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct StepReport {
    pub rank: usize,
    pub step: u64,
    pub epoch: u64,
    /// Mean loss over the global batch.
    pub loss: f64,
    pub local_batch: usize,
    pub global_batch: usize,
    pub step_time_s: f64,
    pub compute_time_s: f64,
    /// Blocked waiting for all-reduces after backward.
    pub comm_wait_s: f64,
    /// Blocked taking a checkpoint snapshot (copy, and waiting for the previous save).
    pub checkpoint_stall_s: f64,
    pub bytes_allreduced: usize,
    pub lr: f32,
    /// Set on the step where the split changed.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rebalanced: Option<Vec<usize>>,
}

/// The end of a run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct Summary {
    pub steps: u64,
    pub resumed_from: Option<u64>,
    pub test_accuracy: f64,
    pub test_loss: f64,
    pub final_batches: Vec<usize>,
    pub samples_per_s: f64,
    pub mean_step_s: f64,
    pub comm_wait_fraction: f64,
    pub checkpoint_stall_fraction: f64,
    /// Parameters after the last step (every rank holds the same).
    #[serde(skip)]
    pub params: Vec<f32>,
}

/// A contiguous range of the flat gradient vector, whole layers, all-reduced together.
#[derive(Clone, Debug, PartialEq)]
pub struct Bucket {
    pub range: Range<usize>,
    /// The layer whose gradient completes the bucket (its lowest).
    pub last_layer: usize,
}

/// Buckets in reverse layer order: the first closes once it holds `first_bytes`, the others at
/// `cap_bytes` (a layer is never split, so a bucket may exceed its cap by one layer).
pub fn buckets(layers: &[Layer], first_bytes: usize, cap_bytes: usize) -> Vec<Bucket> {
    let mut out: Vec<Bucket> = Vec::new();
    let mut open: Option<Bucket> = None;
    for (i, l) in layers.iter().enumerate().rev() {
        let b = open.get_or_insert(Bucket {
            range: l.range(),
            last_layer: i,
        });
        b.range.start = l.range().start;
        b.last_layer = i;
        let cap = if out.is_empty() {
            first_bytes
        } else {
            cap_bytes
        };
        if b.range.len() * 4 >= cap {
            out.extend(open.take());
        }
    }
    out.extend(open);
    out
}

/// The order of the training samples in `epoch`.
pub fn epoch_order(seed: u64, epoch: u64, len: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ epoch);
    order.shuffle(&mut rng);
    order
}

enum OptimState<Buf> {
    Sgd { v: Buf },
    AdamW { m: Buf, v: Buf },
}

/// Every rank learns whether `what` failed anywhere, so that a failure on one rank (a checkpoint
/// write on rank 0, a file only one rank cannot open) fails all of them at once, naming the
/// ranks, instead of leaving the others waiting for it at their deadline. Collective. Hands
/// back this rank's value when every rank succeeded.
pub fn agree<T>(comm: &Communicator, result: Result<T, String>, what: &str) -> Result<T, Error> {
    let mut flags = vec![0u8; comm.world_size()];
    comm.all_gather(&[u8::from(result.is_err())], &mut flags)?;
    let value = result.map_err(|why| Error::Config(format!("{what}: {why}")))?;
    let bad: Vec<String> = (0..flags.len())
        .filter(|&r| flags[r] != 0)
        .map(|r| r.to_string())
        .collect();
    if bad.is_empty() {
        Ok(value)
    } else {
        Err(Error::Config(format!(
            "{what} failed on rank {}",
            bad.join(", ")
        )))
    }
}

/// Trains on `data` with `comm`'s ranks; `report` sees every step on every rank. Each rank
/// computes on the device `opts.device` picks for it (ranks may differ: the all-reduce is over
/// host memory, and `--balance auto` gives faster devices larger shares).
pub fn train(
    comm: &Communicator,
    data: &Dataset,
    opts: &Options,
    report: impl FnMut(&StepReport),
) -> Result<Summary, Error> {
    let gpu = match opts.device {
        DeviceChoice::Cpu => Ok(None),
        choice => match open_gpu(comm.local_rank()) {
            Ok(g) => Ok(Some(g)),
            Err(why) if choice == DeviceChoice::Auto => {
                tracing::info!("rank {}: training on the CPU ({why})", comm.rank());
                Ok(None)
            }
            Err(why) => Err(why),
        },
    };
    match agree(comm, gpu, "opening the GPU (--device gpu)")? {
        Some(g) => {
            tracing::info!("rank {}: training on {}", comm.rank(), g.describe());
            run(comm, data, opts, &g, report)
        }
        None => run(comm, data, opts, &Host, report),
    }
}

/// GPU `local_rank` modulo the number of GPUs: the rank's index on its host, from whichever
/// launcher started it (LOCAL_RANK, Open MPI, Slurm, PMI, Volcano); each container of
/// `ringrun --image` sees its own GPUs from 0.
fn open_gpu(local_rank: usize) -> Result<GpuBackend, String> {
    let count = ringlet_cuda::devices().map_err(|e| e.to_string())?.len();
    if count == 0 {
        return Err("no CUDA device".into());
    }
    GpuBackend::new(local_rank % count).map_err(|e| e.to_string())
}

fn run<B: Backend>(
    comm: &Communicator,
    data: &Dataset,
    opts: &Options,
    be: &B,
    mut report: impl FnMut(&StepReport),
) -> Result<Summary, Error> {
    let (rank, n) = (comm.rank(), comm.world_size());
    let global = opts.global_batch;
    if global == 0 || global > data.train_len() {
        return Err(Error::InvalidArgument(format!(
            "global batch {global} must be between 1 and the {} training samples of {}",
            data.train_len(),
            data.name
        )));
    }
    let mut sizes = vec![data.features];
    sizes.extend(&opts.hidden);
    sizes.push(data.classes);
    let mlp = Mlp::new(sizes).map_err(Error::InvalidArgument)?;
    let layers = mlp.layers();
    let model_config = serde_json::json!({
        "sizes": mlp.sizes,
        "optimizer": opts.optimizer.name(),
        "dataset": data.name,
    });
    let mut params = mlp.init(opts.seed);
    let count = params.len();
    let mut optim = match opts.optimizer {
        OptimizerKind::Sgd(_) => OptimState::Sgd {
            v: vec![0.0f32; count],
        },
        OptimizerKind::AdamW(_) => OptimState::AdamW {
            m: vec![0.0f32; count],
            v: vec![0.0f32; count],
        },
    };
    let (mut step, mut epoch, mut cursor) = (0u64, 0u64, 0usize);
    let mut batches: Option<Vec<usize>> = None;
    let mut resumed_from = None;

    // Only rank 0 writes checkpoints.
    let mut saver = match &opts.checkpoint {
        Some(c) => {
            let opened = match rank {
                0 => Checkpointer::new(&c.dir, c.keep)
                    .map(|saver| Some(saver.with_deadline(comm.timeout())))
                    .map_err(|e| e.to_string()),
                _ => Ok(None),
            };
            agree(comm, opened, "opening the checkpoint directory")?
        }
        None => None,
    };
    if let Some(c) = &opts.checkpoint {
        if let Some((path, snap)) = choose_resume(comm, c)? {
            check_compatible(&snap, &model_config, opts.seed, data.train_len(), &path)?;
            let s = &snap.state;
            restore(&layers, &snap.model, "", &mut params, &path)?;
            match &mut optim {
                OptimState::Sgd { v } => restore(&layers, &snap.optimizer, "momentum.", v, &path)?,
                OptimState::AdamW { m, v } => {
                    restore(&layers, &snap.optimizer, "exp_avg.", m, &path)?;
                    restore(&layers, &snap.optimizer, "exp_avg_sq.", v, &path)?;
                }
            }
            (step, epoch, cursor) = (s.step, s.epoch, s.cursor as usize);
            // The split the run had (auto's measurements, or off's), unless the world or the
            // batch changed; a static split comes from the flag, as the user may have changed it.
            if s.world_size == n
                && s.batches.iter().sum::<usize>() == global
                && !matches!(opts.balance, Balance::Static(_))
            {
                batches = Some(s.batches.clone());
            }
            resumed_from = Some(step);
            if rank == 0 {
                tracing::info!(
                    "resumed from {} (step {step}, epoch {epoch}, cursor {cursor}, saved by {} ranks)",
                    path.display(),
                    s.world_size
                );
            }
        }
    }

    // From here on the parameters and the optimizer's state live where the backend keeps them.
    let mut params = be.upload(&params)?;
    let mut optim = match optim {
        OptimState::Sgd { v } => OptimState::Sgd { v: be.upload(&v)? },
        OptimState::AdamW { m, v } => OptimState::AdamW {
            m: be.upload(&m)?,
            v: be.upload(&v)?,
        },
    };
    let mut ws = Workspace::default();
    let (mut x, mut y) = (Vec::new(), Vec::new());
    let mut grads = be.zeros(count)?;
    let plan = buckets(&layers, opts.first_bucket_bytes, opts.bucket_cap_bytes);
    // Bucket buffers, handed to the all-reduce and back each step; the first carries this rank's
    // loss in one extra slot.
    let mut bufs: Vec<Vec<f32>> = plan
        .iter()
        .enumerate()
        .map(|(i, b)| vec![0.0; b.range.len() + usize::from(i == 0)])
        .collect();
    let mut batches = match batches {
        Some(b) => b,
        None => initial_split(comm, data, &mlp, be, &params, opts, &mut ws)?,
    };
    if rank == 0 {
        tracing::info!("local batches {batches:?} (global {global})");
    }
    let mut rebalancer = Rebalancer::new(0.15, opts.rebalance_every.max(1).saturating_mul(2));
    let mut order = epoch_order(opts.seed, epoch, data.train_len());
    let (mut total_time, mut total_wait, mut total_stall, mut timed_steps) = (0.0, 0.0, 0.0, 0u64);
    let mut timed_samples = 0usize;
    let start_step = step;

    while step < opts.steps {
        if cursor + global > data.train_len() {
            epoch += 1;
            cursor = 0;
            order = epoch_order(opts.seed, epoch, data.train_len());
        }
        let t0 = Instant::now();
        let from = cursor + balance::offset(&batches, rank);
        data.gather(&order[from..from + batches[rank]], &mut x, &mut y);
        let (loss, _) = mlp.forward(be, &params, &x, &y, &mut ws)?;

        // Every element of every bucket is written below (each layer's gradient, the loss slot).
        bufs[0][plan[0].range.len()] = loss as f32;
        let mut handles: Vec<Option<AllReduceHandle<f32>>> =
            (0..plan.len()).map(|_| None).collect();
        let mut next = 0;
        let overlap = opts.overlap;
        mlp.backward(be, &params, &mut ws, &mut grads, |layer, g| {
            let l = &layers[layer].range();
            let b = next;
            let at = l.start - plan[b].range.start;
            be.read(g, l.start, &mut bufs[b][at..at + l.len()])?;
            if plan[b].last_layer == layer {
                if overlap {
                    handles[b] =
                        Some(comm.all_reduce_async(std::mem::take(&mut bufs[b]), ReduceOp::Sum));
                }
                next += 1;
            }
            Ok(())
        })?;
        if !overlap {
            for (b, h) in handles.iter_mut().enumerate() {
                *h = Some(comm.all_reduce_async(std::mem::take(&mut bufs[b]), ReduceOp::Sum));
            }
        }
        let compute = t0.elapsed();
        let t1 = Instant::now();
        let mut global_loss = 0.0;
        for (b, h) in handles.into_iter().enumerate() {
            let summed = h.expect("every bucket was submitted").wait()?;
            let r = plan[b].range.clone();
            be.write(&summed[..r.len()], &mut grads, r.start)?;
            if b == 0 {
                global_loss = summed[r.len()] as f64 / global as f64;
            }
            bufs[b] = summed;
        }
        let wait = t1.elapsed();

        let lr = opts.optimizer.lr() * ((step + 1) as f32 / opts.warmup.max(1) as f32).min(1.0);
        let scale = 1.0 / global as f32;
        match (&opts.optimizer, &mut optim) {
            (OptimizerKind::Sgd(o), OptimState::Sgd { v }) => {
                be.sgd(&Sgd { lr, ..*o }, &mut params, &grads, v, scale)?
            }
            (OptimizerKind::AdamW(o), OptimState::AdamW { m, v }) => {
                let t = u32::try_from(step + 1).unwrap_or(u32::MAX);
                be.adamw(&AdamW { lr, ..*o }, &mut params, &grads, m, v, scale, t)?
            }
            _ => unreachable!("the state is made for the optimizer"),
        }
        step += 1;
        cursor += global;

        rebalancer.observe(compute.as_secs_f64(), batches[rank]);
        let mut rebalanced = None;
        if opts.balance == Balance::Auto && step % opts.rebalance_every.max(1) == 0 {
            let mut both = vec![0.0f64; 2 * n];
            (both[rank], both[n + rank]) = rebalancer.averages();
            comm.all_reduce(&mut both, ReduceOp::Sum)?;
            let (costs, times) = both.split_at(n);
            if let Some(b) = rebalancer.propose(step, costs, times, &batches) {
                batches = b.clone();
                rebalanced = Some(b);
            }
        }

        let mut stall = Duration::ZERO;
        // After any re-balance, so that a resumed run goes on with the split this one uses next.
        if let Some(c) = &opts.checkpoint {
            if c.every > 0 && (step % c.every == 0 || step == opts.steps) {
                let t = Instant::now();
                let mut saved = Ok(());
                if let Some(saver) = saver.as_mut() {
                    // A failed copy off the device is this rank's failure to save: agreed below,
                    // so the others hear of it at once.
                    saved = snapshot(
                        be,
                        &layers,
                        &params,
                        &optim,
                        State {
                            step,
                            epoch,
                            cursor: cursor as u64,
                            seed: opts.seed,
                            rng: Vec::new(),
                            batches: batches.clone(),
                            world_size: n,
                            model: model_config.clone(),
                        },
                    )
                    .map_err(|e| e.to_string())
                    .and_then(|snap| saver.save(snap).map(drop).map_err(|e| e.to_string()));
                }
                stall = t.elapsed();
                agree(comm, saved, "saving a checkpoint")?;
            }
        }

        let step_time = t0.elapsed();
        if step > start_step + opts.calibration_steps {
            total_time += step_time.as_secs_f64();
            total_wait += wait.as_secs_f64();
            total_stall += stall.as_secs_f64();
            timed_steps += 1;
            timed_samples += global;
        }
        report(&StepReport {
            rank,
            step,
            epoch,
            loss: global_loss,
            local_batch: y.len(),
            global_batch: global,
            step_time_s: step_time.as_secs_f64(),
            compute_time_s: compute.as_secs_f64(),
            comm_wait_s: wait.as_secs_f64(),
            checkpoint_stall_s: stall.as_secs_f64(),
            bytes_allreduced: if n > 1 { (count + 1) * 4 } else { 0 },
            lr,
            rebalanced,
        });
    }
    if opts.checkpoint.is_some() {
        let last = match saver.as_mut() {
            Some(s) => s.wait().map(drop).map_err(|e| e.to_string()),
            None => Ok(()),
        };
        agree(comm, last, "writing the last checkpoint")?;
    }
    let (test_accuracy, test_loss) = evaluate(comm, data, &mlp, be, &params, &mut ws)?;
    let params = be.download(&params)?;
    Ok(Summary {
        steps: step,
        resumed_from,
        test_accuracy,
        test_loss,
        final_batches: batches,
        samples_per_s: if total_time > 0.0 {
            timed_samples as f64 / total_time
        } else {
            0.0
        },
        mean_step_s: total_time / timed_steps.max(1) as f64,
        comm_wait_fraction: if total_time > 0.0 {
            total_wait / total_time
        } else {
            0.0
        },
        checkpoint_stall_fraction: if total_time > 0.0 {
            total_stall / total_time
        } else {
            0.0
        },
        params,
    })
}

/// The split for the first step: equal, static weights, or measured speed (`auto`: each rank
/// times a few forward + backward passes on an equal share; all see the same speeds).
fn initial_split<B: Backend>(
    comm: &Communicator,
    data: &Dataset,
    mlp: &Mlp,
    be: &B,
    params: &B::Buf,
    opts: &Options,
    ws: &mut Workspace<B>,
) -> Result<Vec<usize>, Error> {
    let n = comm.world_size();
    let global = opts.global_batch;
    match &opts.balance {
        Balance::Off => Ok(balance::split(global, &vec![1.0; n])),
        Balance::Static(w) if w.len() == n => Ok(balance::split(global, w)),
        Balance::Static(w) => Err(Error::InvalidArgument(format!(
            "--balance static has {} weights for {n} ranks",
            w.len()
        ))),
        Balance::Auto => {
            let share = (global / n).max(1).min(data.train_len());
            let idx: Vec<usize> = (0..share).collect();
            let (mut x, mut y) = (Vec::new(), Vec::new());
            data.gather(&idx, &mut x, &mut y);
            let mut g = be.zeros(mlp.param_count())?;
            let mut last = [0.0f32];
            let mut times = Vec::new();
            for _ in 0..5 {
                let t = Instant::now();
                mlp.forward(be, params, &x, &y, ws)?;
                mlp.backward(be, params, ws, &mut g, |_, _| Ok(()))?;
                // Reading one element waits for the device to finish the pass.
                be.read(&g, 0, &mut last)?;
                times.push(t.elapsed().as_secs_f64());
            }
            times.sort_by(f64::total_cmp);
            let mut speeds = vec![0.0f64; n];
            speeds[comm.rank()] = share as f64 / times[times.len() / 2].max(1e-9);
            comm.all_reduce(&mut speeds, ReduceOp::Sum)?;
            if comm.rank() == 0 {
                let shown: Vec<String> = speeds.iter().map(|s| format!("{s:.0}")).collect();
                tracing::info!("calibration: samples/s per rank [{}]", shown.join(", "));
            }
            Ok(balance::split(global, &speeds))
        }
    }
}

/// Rank 0 picks the checkpoint to resume from and tells the others its path (shared storage:
/// every rank then loads and verifies it itself).
fn choose_resume(
    comm: &Communicator,
    c: &CheckpointOptions,
) -> Result<Option<(PathBuf, Snapshot)>, Error> {
    const MAX_PATH: usize = 4096;
    let mut msg = vec![0u8; 1 + MAX_PATH];
    let mut mine = None;
    if comm.rank() == 0 {
        let chosen: Result<Option<(PathBuf, Snapshot)>, String> = match &c.resume {
            Resume::Never => Ok(None),
            Resume::Auto => match checkpoint::load_latest(&c.dir) {
                // load_latest warns about each checkpoint it skips, naming it.
                Ok((found, _skipped)) => Ok(found),
                Err(e) => Err(e.to_string()),
            },
            Resume::Path(p) => checkpoint::load(p)
                .map(|s| Some((p.clone(), s)))
                .map_err(|e| e.to_string()),
        };
        let (tag, text) = match &chosen {
            Ok(None) => (0, String::new()),
            Ok(Some((p, _))) => match p.to_str() {
                Some(t) if t.len() <= MAX_PATH => (1, t.to_string()),
                _ => (
                    2,
                    format!(
                        "{}: the path must be UTF-8 and at most {MAX_PATH} bytes",
                        p.display()
                    ),
                ),
            },
            Err(why) => (2, why.clone()),
        };
        msg[0] = tag;
        let k = text.len().min(MAX_PATH);
        msg[1..1 + k].copy_from_slice(&text.as_bytes()[..k]);
        mine = chosen.ok().flatten();
    }
    comm.broadcast(&mut msg, 0)?;
    let text = String::from_utf8_lossy(&msg[1..])
        .trim_end_matches('\0')
        .to_string();
    match msg[0] {
        0 => Ok(None),
        2 => Err(Error::Config(format!("rank 0 could not resume: {text}"))),
        _ if comm.rank() == 0 => agree(comm, Ok(mine), "loading the checkpoint rank 0 chose"),
        _ => {
            let path = PathBuf::from(text);
            let loaded = checkpoint::load(&path).map_err(|e| {
                format!(
                    "rank {} cannot load it (is {} shared storage?): {e}",
                    comm.rank(),
                    c.dir.display()
                )
            });
            let snap = agree(comm, loaded, "loading the checkpoint rank 0 chose")?;
            Ok(Some((path, snap)))
        }
    }
}

fn check_compatible(
    snap: &Snapshot,
    config: &serde_json::Value,
    seed: u64,
    train_len: usize,
    path: &std::path::Path,
) -> Result<(), Error> {
    // The manifest is what the checksums cannot vouch for: its numbers must make sense here
    // before any of them indexes anything.
    let s = &snap.state;
    if s.batches.len() != s.world_size {
        return Err(Error::Config(format!(
            "{}: the manifest's batch vector {:?} does not fit its world size {}",
            path.display(),
            s.batches,
            s.world_size
        )));
    }
    if s.cursor > train_len as u64 {
        return Err(Error::Config(format!(
            "{}: data cursor {} is past the {train_len} training samples of this dataset",
            path.display(),
            s.cursor
        )));
    }
    if snap.state.seed != seed {
        return Err(Error::Config(format!(
            "{} was saved by a run with --seed {}, this one has --seed {seed} (the sample order would differ)",
            path.display(),
            snap.state.seed
        )));
    }
    for key in ["sizes", "optimizer"] {
        if snap.state.model.get(key) != config.get(key) {
            return Err(Error::Config(format!(
                "{} was saved with {key} {} but this run has {}",
                path.display(),
                snap.state
                    .model
                    .get(key)
                    .unwrap_or(&serde_json::Value::Null),
                config.get(key).unwrap_or(&serde_json::Value::Null)
            )));
        }
    }
    Ok(())
}

/// The copy into host memory the step waits for; the write happens in the background. Tensors
/// are per layer (`layers.{i}.weight` `[out, in]`, `layers.{i}.bias`), as Python tools expect;
/// the optimizer's state uses the same names behind its own prefix.
fn snapshot<B: Backend>(
    be: &B,
    layers: &[Layer],
    params: &B::Buf,
    optim: &OptimState<B::Buf>,
    state: State,
) -> Result<Snapshot, Error> {
    let per_layer = |prefix: &str, flat: &[f32]| -> Vec<Tensor> {
        layers
            .iter()
            .enumerate()
            .flat_map(|(i, l)| {
                [
                    Tensor {
                        name: format!("{prefix}layers.{i}.weight"),
                        shape: vec![l.outputs, l.inputs],
                        data: flat[l.weight.clone()].to_vec(),
                    },
                    Tensor {
                        name: format!("{prefix}layers.{i}.bias"),
                        shape: vec![l.outputs],
                        data: flat[l.bias.clone()].to_vec(),
                    },
                ]
            })
            .collect()
    };
    let optimizer = match optim {
        OptimState::Sgd { v } => per_layer("momentum.", &be.download(v)?),
        OptimState::AdamW { m, v } => {
            let mut t = per_layer("exp_avg.", &be.download(m)?);
            t.extend(per_layer("exp_avg_sq.", &be.download(v)?));
            t
        }
    };
    Ok(Snapshot {
        state,
        model: per_layer("", &be.download(params)?),
        optimizer,
    })
}

/// The inverse of [`snapshot`]'s naming: fills `flat` from the tensors named `prefix`layers.*.
fn restore(
    layers: &[Layer],
    list: &[Tensor],
    prefix: &str,
    flat: &mut [f32],
    path: &std::path::Path,
) -> Result<(), Error> {
    for (i, l) in layers.iter().enumerate() {
        for (part, range, shape) in [
            ("weight", l.weight.clone(), vec![l.outputs, l.inputs]),
            ("bias", l.bias.clone(), vec![l.outputs]),
        ] {
            let name = format!("{prefix}layers.{i}.{part}");
            let t = list.iter().find(|t| t.name == name).ok_or_else(|| {
                Error::Config(format!("{} has no tensor {name:?}", path.display()))
            })?;
            if t.shape != shape || t.data.len() != range.len() {
                return Err(Error::Config(format!(
                    "{}: {name} has shape {:?}, the model needs {shape:?}",
                    path.display(),
                    t.shape
                )));
            }
            flat[range].copy_from_slice(&t.data);
        }
    }
    Ok(())
}

/// Accuracy and mean loss on the held-out set, each rank taking every n-th sample.
fn evaluate<B: Backend>(
    comm: &Communicator,
    data: &Dataset,
    mlp: &Mlp,
    be: &B,
    params: &B::Buf,
    ws: &mut Workspace<B>,
) -> Result<(f64, f64), Error> {
    let (rank, n) = (comm.rank(), comm.world_size());
    let mine: Vec<usize> = (rank..data.test_len()).step_by(n).collect();
    let (mut loss, mut correct) = (0.0f64, 0usize);
    for chunk in mine.chunks(1024) {
        let mut x = Vec::with_capacity(chunk.len() * data.features);
        for &i in chunk {
            x.extend_from_slice(&data.test_x[i * data.features..(i + 1) * data.features]);
        }
        let y: Vec<u32> = chunk.iter().map(|&i| data.test_y[i]).collect();
        let (l, c) = mlp.forward(be, params, &x, &y, ws)?;
        loss += l;
        correct += c;
    }
    let mut totals = [loss, correct as f64, mine.len() as f64];
    comm.all_reduce(&mut totals, ReduceOp::Sum)?;
    if totals[2] == 0.0 {
        return Ok((f64::NAN, f64::NAN));
    }
    Ok((totals[1] / totals[2], totals[0] / totals[2]))
}

/// Writes each [`StepReport`] as one JSON line.
pub struct Metrics(std::io::BufWriter<std::fs::File>);

impl Metrics {
    pub fn create(path: &std::path::Path) -> Result<Metrics, Error> {
        let f = std::fs::File::create(path)
            .map_err(|e| Error::io(format!("creating {}", path.display()), e))?;
        Ok(Metrics(std::io::BufWriter::new(f)))
    }
    pub fn write(&mut self, r: &StepReport) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.0, r)?;
        self.0.write_all(b"\n")
    }
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_the_gradient_in_reverse_layer_order() {
        let mlp = Mlp::new(vec![64, 256, 256, 10]).unwrap();
        let layers = mlp.layers();
        // Layer sizes in bytes: 66560, 263168, 10280.
        let b = buckets(&layers, 1 << 10, 200_000);
        assert_eq!(
            b,
            vec![
                Bucket {
                    range: layers[2].range(),
                    last_layer: 2
                },
                Bucket {
                    range: layers[1].range(),
                    last_layer: 1
                },
                Bucket {
                    range: layers[0].range(),
                    last_layer: 0
                },
            ]
        );
        let one = buckets(&layers, 25 << 20, 25 << 20);
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].range, 0..mlp.param_count());
        assert_eq!(one[0].last_layer, 0);
    }

    /// A manifest whose numbers do not fit (edited, or written by something else) is refused
    /// naming the checkpoint, before a batch vector or cursor from it indexes anything.
    #[test]
    fn a_manifest_that_does_not_fit_is_refused() {
        let config = serde_json::json!({"sizes": [64, 10], "optimizer": "sgd"});
        let snap = |batches: Vec<usize>, world_size, cursor| Snapshot {
            state: State {
                step: 10,
                epoch: 0,
                cursor,
                seed: 1,
                rng: Vec::new(),
                batches,
                world_size,
                model: config.clone(),
            },
            model: Vec::new(),
            optimizer: Vec::new(),
        };
        let path = std::path::Path::new("/ckpt/step-000000000010");
        let check = |s: Snapshot| check_compatible(&s, &config, 1, 1000, path);
        assert!(check(snap(vec![32, 32], 2, 640)).is_ok());
        let e = check(snap(vec![64], 2, 640)).unwrap_err().to_string();
        assert!(
            e.contains("/ckpt/step-000000000010: the manifest's batch vector [64] does not fit its world size 2"),
            "{e}"
        );
        let e = check(snap(vec![32, 32], 2, u64::MAX - 15))
            .unwrap_err()
            .to_string();
        assert!(e.contains("is past the 1000 training samples"), "{e}");
    }

    #[test]
    fn epoch_orders_are_permutations_fixed_by_seed_and_epoch() {
        let a = epoch_order(5, 0, 100);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(5, 0, 100));
        assert_ne!(a, epoch_order(5, 1, 100));
        assert_ne!(a, epoch_order(6, 0, 100));
    }
}
