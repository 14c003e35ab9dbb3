//! The whole training loop for a Burn model, built from `ringlet-ddp`'s pieces: the global
//! sampler, per-device batch balancing, bucketed gradient all-reduce (overlapping backward when
//! the model cuts its stages), Burn's optimizer, checkpoints on shared storage, and a report per
//! step.
//!
//! The caller brings a model that computes the *sum* of its per-sample losses on a batch
//! ([`Objective`]) and training data that builds a batch from sample indices ([`Samples`]).

use crate::optim_state;
use crate::params::{self, ParamInfo};
use crate::sync::{DataParallel, Stages};
use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::tensor::{Device, Tensor};
use ringlet::{Communicator, Error};
use ringlet_ddp::checkpoint::{Snapshot, State};
use ringlet_ddp::resume::{self, Expect};
use ringlet_ddp::{
    Balance, Balancer, CheckpointOptions, JobCheckpoints, Sampler, StepReport, SyncOptions, Timing,
};
use std::time::{Duration, Instant};

/// Training data: a number of samples and a way to turn some of them into a batch.
pub trait Samples {
    type Batch;
    /// Training samples.
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The batch of samples `indices` (in that order), on `device`.
    fn batch(&self, indices: &[usize], device: &Device) -> Self::Batch;
}

/// A model the trainer can train on batches of type `B`.
pub trait Objective<B>: Module {
    /// The *sum* of the per-sample losses of `batch` (the trainer divides the summed gradients
    /// by the global batch). Calling `stages.cut(x)` between stages lets the all-reduce of the
    /// stages above overlap the backward of the stages below; a model that never calls it is
    /// back-propagated in one piece.
    fn loss_sum(&self, batch: &B, stages: &mut Stages) -> Tensor<1>;
}

/// What to train and how.
#[derive(Clone, Debug)]
pub struct TrainOptions {
    /// Samples per step over all ranks.
    pub global_batch: usize,
    /// Optimizer steps in all (a resumed run continues up to it).
    pub steps: u64,
    /// Seed of the sample order (and, for the caller, of the initial parameters).
    pub seed: u64,
    /// Peak learning rate.
    pub lr: f64,
    /// Steps of linear warm-up to `lr`.
    pub warmup: u64,
    pub balance: Balance,
    /// Steps between re-balancing checks with `Balance::Auto`.
    pub rebalance_every: u64,
    /// Buckets and overlap (its `scalars` are the trainer's own).
    pub sync: SyncOptions,
    /// Back-propagate stage by stage where the model cuts its stages (`false`: one backward).
    pub staged: bool,
    pub checkpoint: Option<CheckpointOptions>,
    /// Steps after start-up left out of the throughput figures.
    pub calibration_steps: u64,
    /// The caller's configuration, saved in checkpoints; the keys of `config_keys` must be equal
    /// to resume.
    pub config: serde_json::Value,
    pub config_keys: Vec<String>,
}

impl TrainOptions {
    pub fn new(global_batch: usize, steps: u64) -> TrainOptions {
        TrainOptions {
            global_batch,
            steps,
            seed: 0,
            lr: 0.05,
            warmup: 0,
            balance: Balance::Off,
            rebalance_every: 10,
            sync: SyncOptions::default(),
            staged: true,
            checkpoint: None,
            calibration_steps: 3,
            config: serde_json::Value::Null,
            config_keys: Vec::new(),
        }
    }
}

/// The end of a run.
#[derive(Clone, Debug, serde::Serialize)]
pub struct TrainSummary {
    pub steps: u64,
    pub resumed_from: Option<u64>,
    pub final_batches: Vec<usize>,
    pub samples_per_s: f64,
    pub mean_step_s: f64,
    pub comm_wait_fraction: f64,
    pub checkpoint_stall_fraction: f64,
}

/// Trains `model` (built identically on every rank, on `device` with autodiff) with `optim` on
/// `data`; `report` sees every step on every rank. Parameters come from the checkpoint to
/// resume from, else from rank 0. Returns the trained model (the same on every rank).
pub fn fit<M, D>(
    comm: &Communicator,
    model: M,
    optim: ModuleOptimizer,
    data: &D,
    device: &Device,
    opts: &TrainOptions,
    mut report: impl FnMut(&StepReport),
) -> Result<(M, TrainSummary), Error>
where
    D: Samples,
    M: Objective<D::Batch>,
{
    let (rank, n) = (comm.rank(), comm.world_size());
    let global = opts.global_batch;
    let mut sampler = Sampler::new(opts.seed, data.len(), global)?;
    let sync = SyncOptions {
        scalars: 1,
        ..opts.sync.clone()
    };
    let mut dp = DataParallel::new(comm, &model, sync)?;
    let mut saver = match &opts.checkpoint {
        Some(c) => Some(JobCheckpoints::open(comm, c.clone())?),
        None => None,
    };
    let (mut model, mut optim) = (model, optim);
    let mut step = 0;
    let (mut resumed_split, mut resumed_from) = (None, None);
    let resumed = match &saver {
        Some(s) => s.resume(comm)?,
        None => None,
    };
    match resumed {
        Some((path, snap)) => {
            let keys: Vec<&str> = opts.config_keys.iter().map(String::as_str).collect();
            let expect = Expect {
                seed: opts.seed,
                train_len: data.len(),
                config: &opts.config,
                keys: &keys,
            };
            resume::check_resumable(&snap, &expect, &path)?;
            let what = path.display().to_string();
            model = params::load_named(model, dp.params(), &snap.model, &what)?;
            optim = optim_state::load(optim, dp.params(), &snap.optimizer, &snap.state.extra)
                .map_err(|e| Error::Config(format!("{what}: {e}")))?;
            (step, resumed_split) = resume::resume_loop(&snap.state, &path, &mut sampler, rank, n)?;
            resumed_from = Some(step);
        }
        None => model = dp.broadcast(model, 0)?,
    }
    JobCheckpoints::announce_restart(comm, saver.is_some(), resumed_from);
    let mut balancer = Balancer::new(
        comm,
        &opts.balance,
        global,
        opts.rebalance_every,
        resumed_split,
        |share| calibrate(&model, data, share, device),
    )?;
    if rank == 0 {
        tracing::info!(
            "{} parameters in {} tensors, {} buckets; local batches {:?} (global {global})",
            dp.numel(),
            dp.params().len(),
            dp.buckets(),
            balancer.batches()
        );
    }
    let mut timing = Timing::new(opts.calibration_steps);

    while step < opts.steps {
        let t0 = Instant::now();
        let mine = sampler.next_step(balancer.batches(), rank)?.to_vec();
        if mine.is_empty() {
            dp.set_scalar(0, 0.0)?;
            dp.push_zeros()?;
        } else {
            let batch = data.batch(&mine, device);
            let mut stages = if opts.staged {
                Stages::new()
            } else {
                Stages::whole()
            };
            let loss = model.loss_sum(&batch, &mut stages);
            let value = params::to_host(loss.clone().detach())?;
            dp.set_scalar(0, value.first().copied().unwrap_or(f32::NAN))?;
            dp.backward(&model, loss, stages)?;
        }
        let compute = t0.elapsed();
        let (grads, synced) = dp.finish(&model, global)?;
        let loss = dp.scalar(0) as f64 / global as f64;
        let lr = opts.lr * ((step + 1) as f64 / opts.warmup.max(1) as f64).min(1.0);
        model = optim.step(lr, model, grads);
        step += 1;

        let rebalanced = balancer.after_step(comm, step, compute.as_secs_f64(), mine.len())?;
        let mut stall = Duration::ZERO;
        // After any re-balance, so that a resumed run goes on with the split this one uses next.
        if let Some(saver) = saver.as_mut().filter(|s| s.due(step, opts.steps)) {
            let state =
                resume::loop_state(step, &sampler, &balancer, opts.seed, opts.config.clone());
            stall = saver.save(comm, || snapshot(&model, &optim, dp.params(), state))?;
        }
        let r = StepReport {
            rank,
            step,
            epoch: sampler.epoch(),
            loss,
            local_batch: mine.len(),
            global_batch: global,
            step_time_s: t0.elapsed().as_secs_f64(),
            compute_time_s: compute.as_secs_f64(),
            comm_wait_s: synced.wait.as_secs_f64(),
            checkpoint_stall_s: stall.as_secs_f64(),
            bytes_allreduced: synced.bytes,
            lr: lr as f32,
            rebalanced,
        };
        timing.add(&r);
        report(&r);
    }
    if let Some(saver) = saver.as_mut() {
        saver.finish(comm)?;
    }
    Ok((
        model,
        TrainSummary {
            steps: step,
            resumed_from,
            final_batches: balancer.batches().to_vec(),
            samples_per_s: timing.samples_per_s(),
            mean_step_s: timing.mean_step_s(),
            comm_wait_fraction: timing.comm_wait_fraction(),
            checkpoint_stall_fraction: timing.checkpoint_stall_fraction(),
        },
    ))
}

/// The host copy a checkpoint writes: parameters by name, the optimizer's state by parameter
/// name, its scalars in the manifest.
fn snapshot<M: Module>(
    model: &M,
    optim: &ModuleOptimizer,
    params: &[ParamInfo],
    mut state: State,
) -> Result<Snapshot, Error> {
    let (optimizer, extra) = optim_state::save(optim, params)?;
    state.extra = extra;
    Ok(Snapshot {
        state,
        model: params::named_tensors(model, params)?,
        optimizer,
    })
}

/// `Balance::Auto`'s measurement: the median time of five forward + backward passes over
/// `share` samples.
fn calibrate<M, D>(model: &M, data: &D, share: usize, device: &Device) -> Result<f64, Error>
where
    D: Samples,
    M: Objective<D::Batch>,
{
    let idx: Vec<usize> = (0..share.min(data.len())).collect();
    let batch = data.batch(&idx, device);
    let mut times = Vec::new();
    for _ in 0..5 {
        let t = Instant::now();
        let loss = model.loss_sum(&batch, &mut Stages::whole());
        let grads = loss.backward();
        drop(grads);
        times.push(t.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times[times.len() / 2])
}
