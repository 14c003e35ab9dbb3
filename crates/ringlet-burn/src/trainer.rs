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
use ringlet_ddp::membership::{Agreed, Change, Membered, Stretch};
use ringlet_ddp::resume::{self, Expect};
use ringlet_ddp::run_state::{LoopSetup, RunState, SharedState};
use ringlet_ddp::{
    Balance, Balancer, CheckpointOptions, JobCheckpoints, Sampler, StepReport, Survival,
    SyncOptions,
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
    /// Up to `n` samples this process holds, to time a batch with (all samples are held unless
    /// the data is read with locality: see [`TrainOptions::locality`]).
    fn held(&self, n: usize) -> Vec<usize> {
        (0..n.min(self.len())).collect()
    }
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
    /// Each rank takes its samples from the shards its host holds (see
    /// [`ringlet_ddp::locality`]); `None`: the exact order.
    pub locality: Option<ringlet_ddp::locality::ShardLayout>,
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
            locality: None,
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
///
/// With [`ringlet_ddp::membership::MIN_RANKS_ENV`] set (`ringrun --min-ranks`), a lost rank
/// does not end the run: the survivors re-form, catch up and redo the interrupted step, and
/// `comm` becomes their communicator (see [`ringlet_ddp::membership`]).
pub fn fit<M, D>(
    comm: &mut Communicator,
    model: M,
    optim: ModuleOptimizer,
    data: &D,
    device: &Device,
    opts: &TrainOptions,
    report: impl FnMut(&StepReport),
) -> Result<(M, TrainSummary), Error>
where
    D: Samples,
    M: Objective<D::Batch>,
{
    let (model, summary, ()) =
        fit_then(
            comm,
            model,
            optim,
            data,
            device,
            opts,
            report,
            |_, _| Ok(()),
        )?;
    Ok((model, summary))
}

/// As [`fit`], then `finish(comm, &model)` on every rank after the last step, as part of the
/// run (an evaluation's collectives, say): a rank lost meanwhile is survived as in a step (the
/// survivors catch up and run `finish` again on their communicator).
#[allow(clippy::too_many_arguments)]
pub fn fit_then<M, D, E>(
    comm: &mut Communicator,
    model: M,
    optim: ModuleOptimizer,
    data: &D,
    device: &Device,
    opts: &TrainOptions,
    mut report: impl FnMut(&StepReport),
    mut finish: impl FnMut(&Communicator, &M) -> Result<E, Error>,
) -> Result<(M, TrainSummary, E), Error>
where
    D: Samples,
    M: Objective<D::Batch>,
{
    let survival = Survival::from_env()?;
    let (rank, n) = (comm.rank(), comm.world_size());
    let global = opts.global_batch;
    let mut sampler = Sampler::with_layout(opts.seed, data.len(), global, opts.locality.clone())?;
    let infos = params::list(&model);
    // A replacement joining the running job takes its state from the members instead.
    let late = comm.is_replacement();
    let saver = match &opts.checkpoint {
        Some(c) if !late => Some(JobCheckpoints::open(comm, c.clone())?),
        _ => None,
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
            (model, optim) = load(model, optim, &infos, &snap, &path.display().to_string())?;
            (step, resumed_split) = resume::resume_loop(&snap.state, &path, &mut sampler, rank, n)?;
            resumed_from = Some(step);
        }
        None if late => {}
        None => {
            let sync = SyncOptions {
                scalars: 1,
                ..opts.sync.clone()
            };
            model = DataParallel::new(comm, &model, sync)?.broadcast(model, 0)?;
        }
    }
    if !late {
        JobCheckpoints::announce_restart(comm, saver.is_some(), resumed_from);
    }
    let mut run = Run {
        state: RunState::new(
            comm,
            step,
            sampler,
            &opts.balance,
            resumed_split,
            saver,
            opts.calibration_steps,
            resumed_from,
        ),
        model: Some(model),
        optim,
    };
    let job = Job {
        data,
        device,
        opts,
        infos,
        survival,
    };
    let (summary, extra) = survival.drive(
        comm,
        &mut FitLoop {
            job: &job,
            run: &mut run,
            report: &mut report,
            finish: &mut finish,
        },
    )?;
    Ok((run.model.expect(PUT_BACK), summary, extra))
}

/// `fit`'s hooks for [`Survival::drive`].
struct FitLoop<'a, 'j, M, D, R, F> {
    job: &'a Job<'j, D>,
    run: &'a mut Run<M>,
    report: &'a mut R,
    finish: &'a mut F,
}

impl<M, D, R, F, E> Membered for FitLoop<'_, '_, M, D, R, F>
where
    D: Samples,
    M: Objective<D::Batch>,
    R: FnMut(&StepReport),
    F: FnMut(&Communicator, &M) -> Result<E, Error>,
{
    type Output = (TrainSummary, E);
    fn stretch(&mut self, comm: &Communicator) -> Result<Stretch<(TrainSummary, E)>, Error> {
        let summary = match steps(comm, self.job, self.run, self.report)? {
            Stretch::Done(summary) => summary,
            Stretch::Grown(next) => return Ok(Stretch::Grown(next)),
        };
        let extra = (self.finish)(comm, self.run.model())?;
        Ok(Stretch::Done((summary, extra)))
    }
    fn catch_up(&mut self, comm: &Communicator) -> Result<Agreed, Error> {
        catch_up(comm, self.job, self.run)
    }
    fn changed(&mut self, change: Change) {
        self.run.state.changed = Some(change);
    }
}

/// What a run keeps across communicators: all a membership change must not lose.
struct Run<M> {
    /// Always there, but for the moment of the optimizer's step (see [`PUT_BACK`]).
    model: Option<M>,
    optim: ModuleOptimizer,
    /// Steps, sampler, position, split, checkpoints, timings.
    state: RunState,
}

/// The model is taken out of [`Run`] only for the optimizer's step, which cannot fail.
const PUT_BACK: &str = "the model is put back after every optimizer step";

impl<M> Run<M> {
    fn model(&self) -> &M {
        self.model.as_ref().expect(PUT_BACK)
    }
}

/// What does not change during a run.
struct Job<'a, D> {
    data: &'a D,
    device: &'a Device,
    opts: &'a TrainOptions,
    infos: Vec<ParamInfo>,
    survival: Survival,
}

/// The steps left and the last checkpoint, on one communicator; or the steps up to a boundary
/// where replacements were admitted.
fn steps<M, D>(
    comm: &Communicator,
    job: &Job<D>,
    run: &mut Run<M>,
    report: &mut impl FnMut(&StepReport),
) -> Result<Stretch<TrainSummary>, Error>
where
    D: Samples,
    M: Objective<D::Batch>,
{
    let (opts, data, device) = (job.opts, job.data, job.device);
    let (rank, global) = (comm.rank(), opts.global_batch);
    let sync = SyncOptions {
        scalars: 1,
        ..opts.sync.clone()
    };
    let mut dp = DataParallel::new(comm, run.model(), sync)?;
    let mut balancer = Balancer::new(
        comm,
        &run.state.balance,
        global,
        opts.rebalance_every,
        run.state.split.clone(),
        |share| calibrate(run.model(), data, share, device),
    )?;
    run.state.started(comm, balancer.batches());
    if rank == 0 {
        tracing::info!(
            "{} parameters in {} tensors, {} buckets; local batches {:?} (global {global}, {} ranks)",
            dp.numel(),
            dp.params().len(),
            dp.buckets(),
            balancer.batches(),
            comm.world_size()
        );
    }

    while run.state.step < opts.steps {
        if let Some(grown) = job.survival.admit(comm)? {
            return Ok(Stretch::Grown(Box::new(grown)));
        }
        let t0 = Instant::now();
        let mine = run
            .state
            .sampler
            .next_step(balancer.batches(), rank)?
            .to_vec();
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
            let loss = run.model().loss_sum(&batch, &mut stages);
            let value = params::to_host(loss.clone().detach())?;
            dp.set_scalar(0, value.first().copied().unwrap_or(f32::NAN))?;
            dp.backward(run.model(), loss, stages)?;
        }
        let compute = t0.elapsed();
        let (grads, synced) = dp.finish(run.model(), global)?;
        let loss = dp.scalar(0) as f64 / global as f64;
        let lr = opts.lr * ((run.state.step + 1) as f64 / opts.warmup.max(1) as f64).min(1.0);
        // Moved out and back (nothing in between can fail): with no other handle on its
        // tensors, the optimizer updates them in place.
        let model = run.model.take().expect(PUT_BACK);
        run.model = Some(run.optim.step(lr, model, grads));
        let step = run.state.completed();

        let rebalanced = balancer.after_step(comm, step, compute.as_secs_f64(), mine.len())?;
        if rebalanced.is_some() {
            run.state.started(comm, balancer.batches());
        }
        let mut stall = Duration::ZERO;
        // After any re-balance, so that a resumed run goes on with the split this one uses next.
        if let Some(saver) = run.state.saver.as_mut().filter(|s| s.due(step, opts.steps)) {
            let state = resume::loop_state(
                step,
                &run.state.sampler,
                &balancer,
                opts.seed,
                opts.config.clone(),
                loss,
            );
            let (model, optim) = (run.model.as_ref().expect(PUT_BACK), &run.optim);
            stall = saver.save(comm, || snapshot(model, optim, dp.params(), state))?;
        }
        let r = StepReport {
            rank,
            world_size: comm.world_size(),
            step,
            epoch: run.state.sampler.epoch(),
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
        report(&r);
        run.state.reported(comm, &r);
    }
    if let Some(saver) = run.state.saver.as_mut() {
        saver.finish(comm)?;
    }
    Ok(Stretch::Done(TrainSummary {
        steps: run.state.step,
        resumed_from: run.state.resumed_from,
        final_batches: balancer.batches().to_vec(),
        samples_per_s: run.state.timing.samples_per_s(),
        mean_step_s: run.state.timing.mean_step_s(),
        comm_wait_fraction: run.state.timing.comm_wait_fraction(),
        checkpoint_stall_fraction: run.state.timing.checkpoint_stall_fraction(),
    }))
}

/// After a membership change, on the new communicator: `RunState::catch_up` with the
/// model's parameters and the optimizer's state by parameter name.
fn catch_up<M: Module, D>(
    comm: &Communicator,
    job: &Job<D>,
    run: &mut Run<M>,
) -> Result<Agreed, Error> {
    let opts = job.opts;
    // Parameters and the optimizer's state (at most two buffers of their size, and its
    // scalars).
    let numel: usize = job.infos.iter().map(ParamInfo::numel).sum();
    let setup = LoopSetup {
        seed: opts.seed,
        config: &opts.config,
        balance: &opts.balance,
        global_batch: opts.global_batch,
        checkpoint: opts.checkpoint.as_ref(),
        max_elements: numel.saturating_mul(3).saturating_add(1 << 16),
    };
    let mut state = BurnState {
        model: run.model.as_mut().expect(PUT_BACK),
        optim: &mut run.optim,
        infos: &job.infos,
    };
    run.state.catch_up(comm, &setup, &mut state)
}

/// A Burn model and its optimizer as a catch-up moves them.
struct BurnState<'a, M> {
    model: &'a mut M,
    optim: &'a mut ModuleOptimizer,
    infos: &'a [ParamInfo],
}

impl<M: Module> SharedState for BurnState<'_, M> {
    fn snapshot(&self, state: State) -> Result<Snapshot, Error> {
        snapshot(self.model, self.optim, self.infos, state)
    }
    fn restore(&mut self, snap: &Snapshot, from: &str) -> Result<(), Error> {
        (*self.model, *self.optim) = load(
            self.model.clone(),
            self.optim.clone(),
            self.infos,
            snap,
            from,
        )?;
        Ok(())
    }
}

/// The model and optimizer state of a snapshot (a checkpoint, or a peer's state); `what` names
/// where it came from in errors.
fn load<M: Module>(
    model: M,
    optim: ModuleOptimizer,
    infos: &[ParamInfo],
    snap: &Snapshot,
    what: &str,
) -> Result<(M, ModuleOptimizer), Error> {
    let model = params::load_named(model, infos, &snap.model, what)?;
    let optim = optim_state::load(optim, infos, &snap.optimizer, &snap.state.extra)
        .map_err(|e| Error::Config(format!("{what}: {e}")))?;
    Ok((model, optim))
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
    let idx = data.held(share);
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
