//! The training loop: exact data parallelism with the gradient all-reduce overlapped with
//! backward, per-device batch balancing, checkpoints.
//!
//! Each step takes the next `global_batch` samples of one global order (a permutation of the
//! training set per epoch, from the seed); rank r computes the contiguous slice that the
//! cumulative local batch sizes give it. Ranks sum per-sample gradients, the all-reduce adds the
//! sums, and the optimizer divides by the global batch: the update is the one a single process
//! would make with the whole batch, whatever the number of ranks or the split.
//!
//! The gradient sum runs where the gradients are (`crate::grad_path`, decided once for the job):
//! NCCL in place on device buffers when every rank trains on a GPU with NCCL; otherwise the TCP
//! ring, in buckets in reverse layer order (the first bucket small, so communication starts
//! early). A CPU rank hands each layer's gradient over as soon as backward computes it, and a
//! bucket's asynchronous all-reduce starts as soon as its last layer is in, while backward goes
//! on with the layers below; a GPU rank sums the same buckets from device buffers, staged through
//! pinned host blocks, after backward. One rank sums nothing.

use crate::data::Dataset;
use crate::gpu::GpuBackend;
use crate::grad_path::{self, GradPath};
use crate::model::{Layer, Mlp, Workspace};
use crate::tensor::{Backend, Host};
use ringlet::{Communicator, Error, ReduceOp};

use crate::optim::{AdamW, Sgd};
use ringlet_ddp::agree::at_start;
use ringlet_ddp::checkpoint::{Snapshot, State, Tensor};
use ringlet_ddp::membership::{Agreed, Change, Membered, Stretch};
use ringlet_ddp::resume::{self, Expect};
use ringlet_ddp::run_state::{LoopSetup, RunState, SharedState};
use ringlet_ddp::{
    Balance, Balancer, CheckpointOptions, JobCheckpoints, Sampler, StepReport, Survival,
    SyncOptions,
};
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

impl std::str::FromStr for DeviceChoice {
    type Err = String;
    /// `cpu`, `gpu` or `auto`, as `--device` takes them.
    fn from_str(name: &str) -> Result<DeviceChoice, String> {
        match name {
            "cpu" => Ok(DeviceChoice::Cpu),
            "gpu" => Ok(DeviceChoice::Gpu),
            "auto" => Ok(DeviceChoice::Auto),
            other => Err(format!("--device {other}: auto, cpu or gpu")),
        }
    }
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
    /// Each rank takes its samples from the shards its host holds (see
    /// [`ringlet_ddp::locality`]); `None`: the exact order.
    pub locality: Option<ringlet_ddp::locality::ShardLayout>,
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
    /// How this rank's gradients were summed: `none` (one rank), `nccl`, `tcp-device-buckets`
    /// or `tcp-host-buckets` (see `crate::grad_path`).
    pub grad_sync: &'static str,
    /// Parameters after the last step (every rank holds the same).
    #[serde(skip)]
    pub params: Vec<f32>,
}

enum OptimState<Buf> {
    Sgd { v: Buf },
    AdamW { m: Buf, v: Buf },
}

/// Trains on `data` with `comm`'s ranks; `report` sees every step on every rank. Each rank
/// computes on the device `opts.device` picks for it (ranks may differ: GPU and CPU ranks meet
/// in the TCP ring's all-reduces, and `--balance auto` gives faster devices larger shares).
/// `RINGLET_GRAD_PATH` may force this rank's way of summing gradients (see `crate::grad_path`).
pub fn train(
    comm: &mut Communicator,
    data: &Dataset,
    opts: &Options,
    report: impl FnMut(&StepReport),
) -> Result<Summary, Error> {
    let path = at_start(
        comm,
        grad_path::Choice::from_env(),
        "reading RINGLET_GRAD_PATH",
    )?;
    train_with(comm, data, opts, path, report)
}

/// As [`train`], with this rank's way of summing gradients given instead of read from
/// `RINGLET_GRAD_PATH` (ranks may differ; [`grad_path::Choice::Auto`] for the default).
pub fn train_with(
    comm: &mut Communicator,
    data: &Dataset,
    opts: &Options,
    path: grad_path::Choice,
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
    match at_start(comm, gpu, "opening the GPU (--device gpu)")? {
        Some(g) => {
            tracing::info!("rank {}: training on {}", comm.rank(), g.describe());
            run(comm, data, opts, &g, path, report)
        }
        None => run(comm, data, opts, &Host, path, report),
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

/// What a run keeps across communicators: all a membership change must not lose.
struct Run<B: Backend> {
    params: B::Buf,
    optim: OptimState<B::Buf>,
    /// Steps, sampler, position, split, checkpoints, timings.
    state: RunState,
    ws: Workspace<B>,
}

/// What does not change during a run.
struct Job<'a, B: Backend> {
    data: &'a Dataset,
    opts: &'a Options,
    be: &'a B,
    path: grad_path::Choice,
    mlp: Mlp,
    layers: Vec<Layer>,
    model_config: serde_json::Value,
    survival: Survival,
}

fn run<B: Backend>(
    comm: &mut Communicator,
    data: &Dataset,
    opts: &Options,
    be: &B,
    path: grad_path::Choice,
    mut report: impl FnMut(&StepReport),
) -> Result<Summary, Error> {
    let survival = Survival::from_env()?;
    let (rank, n) = (comm.rank(), comm.world_size());
    let global = opts.global_batch;
    let layout = opts.locality.clone();
    let mut sampler =
        Sampler::with_layout(opts.seed, data.train_len(), global, layout).map_err(|e| match e {
            Error::InvalidArgument(why) => {
                Error::InvalidArgument(format!("{why} of {}", data.name))
            }
            e => e,
        })?;
    let mut sizes = vec![data.features];
    sizes.extend(&opts.hidden);
    sizes.push(data.classes);
    let mlp = Mlp::new(sizes).map_err(Error::InvalidArgument)?;
    let layers = mlp.layers();
    let model_config = serde_json::json!({
        "model": "mlp",
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
    let mut step = 0u64;
    let mut resumed_split = None;
    let mut resumed_from = None;

    // Only rank 0 writes checkpoints; every rank resumes from the one rank 0 picks. A
    // replacement joining the running job takes its state from the members instead.
    let late = comm.is_replacement();
    let saver = match &opts.checkpoint {
        Some(c) if !late => Some(JobCheckpoints::open(comm, c.clone())?),
        _ => None,
    };
    if let Some(saver) = &saver {
        if let Some((path, snap)) = saver.resume(comm)? {
            let expect = Expect {
                seed: opts.seed,
                train_len: data.train_len(),
                config: &model_config,
                keys: &["sizes", "optimizer"],
            };
            resume::check_resumable(&snap, &expect, &path)?;
            restore_all(&layers, &snap, &mut params, &mut optim, &path)?;
            (step, resumed_split) = resume::resume_loop(&snap.state, &path, &mut sampler, rank, n)?;
            resumed_from = Some(step);
        }
    }

    if !late {
        JobCheckpoints::announce_restart(comm, saver.is_some(), resumed_from);
    }

    // From here on the parameters and the optimizer's state live where the backend keeps them.
    let mut run = Run {
        params: be.upload(&params)?,
        optim: upload_optim(be, optim)?,
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
        ws: Workspace::default(),
    };
    let job = Job {
        data,
        opts,
        be,
        path,
        mlp,
        layers,
        model_config,
        survival,
    };
    // A lost rank (with `ringrun --min-ranks`): the survivors re-form, catch up, and the
    // interrupted step is done again over them; a replacement admitted at a step boundary
    // takes the members' state.
    survival.drive(
        comm,
        &mut MlpLoop {
            job: &job,
            run: &mut run,
            report: &mut report,
        },
    )
}

/// The MLP loop's hooks for [`Survival::drive`].
struct MlpLoop<'a, 'j, B: Backend, R> {
    job: &'a Job<'j, B>,
    run: &'a mut Run<B>,
    report: &'a mut R,
}

impl<B: Backend, R: FnMut(&StepReport)> Membered for MlpLoop<'_, '_, B, R> {
    type Output = Summary;
    fn stretch(&mut self, comm: &Communicator) -> Result<Stretch<Summary>, Error> {
        steps(comm, self.job, self.run, self.report)
    }
    fn catch_up(&mut self, comm: &Communicator) -> Result<Agreed, Error> {
        catch_up(comm, self.job, self.run)
    }
    fn changed(&mut self, change: Change) {
        self.run.state.changed = Some(change);
    }
}

/// The steps left, the last checkpoint and the evaluation, on one communicator; or the steps
/// up to a boundary where replacements were admitted.
fn steps<B: Backend>(
    comm: &Communicator,
    job: &Job<B>,
    run: &mut Run<B>,
    report: &mut impl FnMut(&StepReport),
) -> Result<Stretch<Summary>, Error> {
    let (opts, be, data) = (job.opts, job.be, job.data);
    let (rank, global) = (comm.rank(), opts.global_batch);
    let (mut x, mut y) = (Vec::new(), Vec::new());
    // Buckets hold whole layers (weight and bias together); this rank's loss sum rides along.
    let sync_opts = SyncOptions {
        first_bucket_bytes: opts.first_bucket_bytes,
        bucket_cap_bytes: opts.bucket_cap_bytes,
        overlap: opts.overlap,
        scalars: 1,
    };
    let mut sync = GradPath::new(comm, be, &job.layers, sync_opts, job.path)?;
    let mut grads = sync.gradient_buffer(be)?;
    let mut balancer = Balancer::new(
        comm,
        &run.state.balance,
        global,
        opts.rebalance_every,
        run.state.split.clone(),
        |share| calibrate(data, &job.mlp, be, &run.params, share, &mut run.ws),
    )?;
    run.state.started(comm, balancer.batches());
    if rank == 0 {
        tracing::info!(
            "local batches {:?} (global {global}, {} ranks)",
            balancer.batches(),
            comm.world_size()
        );
    }

    while run.state.step < opts.steps {
        if let Some(grown) = job.survival.admit(comm)? {
            return Ok(Stretch::Grown(Box::new(grown)));
        }
        let t0 = Instant::now();
        let mine = run.state.sampler.next_step(balancer.batches(), rank)?;
        data.gather(mine, &mut x, &mut y);
        let (loss, _) = job.mlp.forward(be, &run.params, &x, &y, &mut run.ws)?;
        sync.backward(
            be,
            &job.mlp,
            &run.params,
            &mut run.ws,
            &mut grads,
            loss as f32,
        )?;
        let compute = t0.elapsed();
        let (loss_sum, synced) = sync.finish(be, &mut grads)?;
        let global_loss = loss_sum as f64 / global as f64;

        let step = run.state.step;
        let lr = opts.optimizer.lr() * ((step + 1) as f32 / opts.warmup.max(1) as f32).min(1.0);
        let scale = 1.0 / global as f32;
        match (&opts.optimizer, &mut run.optim) {
            (OptimizerKind::Sgd(o), OptimState::Sgd { v }) => {
                be.sgd(&Sgd { lr, ..*o }, &mut run.params, &grads, v, scale)?
            }
            (OptimizerKind::AdamW(o), OptimState::AdamW { m, v }) => {
                let t = u32::try_from(step + 1).unwrap_or(u32::MAX);
                be.adamw(&AdamW { lr, ..*o }, &mut run.params, &grads, m, v, scale, t)?
            }
            _ => unreachable!("the state is made for the optimizer"),
        }
        let step = run.state.completed();

        let rebalanced = balancer.after_step(comm, step, compute.as_secs_f64(), y.len())?;
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
                job.model_config.clone(),
                global_loss,
            );
            let (params, optim) = (&run.params, &run.optim);
            stall = saver.save(comm, || snapshot(be, &job.layers, params, optim, state))?;
        }

        let r = StepReport {
            rank,
            world_size: comm.world_size(),
            step,
            epoch: run.state.sampler.epoch(),
            loss: global_loss,
            local_batch: y.len(),
            global_batch: global,
            step_time_s: t0.elapsed().as_secs_f64(),
            compute_time_s: compute.as_secs_f64(),
            comm_wait_s: synced.wait.as_secs_f64(),
            checkpoint_stall_s: stall.as_secs_f64(),
            bytes_allreduced: synced.bytes,
            lr,
            rebalanced,
        };
        report(&r);
        run.state.reported(comm, &r);
    }
    if let Some(saver) = run.state.saver.as_mut() {
        saver.finish(comm)?;
    }
    let (test_accuracy, test_loss) = evaluate(comm, data, &job.mlp, be, &run.params, &mut run.ws)?;
    Ok(Stretch::Done(Summary {
        steps: run.state.step,
        resumed_from: run.state.resumed_from,
        test_accuracy,
        test_loss,
        final_batches: balancer.batches().to_vec(),
        samples_per_s: run.state.timing.samples_per_s(),
        mean_step_s: run.state.timing.mean_step_s(),
        comm_wait_fraction: run.state.timing.comm_wait_fraction(),
        checkpoint_stall_fraction: run.state.timing.checkpoint_stall_fraction(),
        grad_sync: sync.path().name(),
        params: be.download(&run.params)?,
    }))
}

/// After a membership change, on the new communicator: `RunState::catch_up` with the
/// MLP's parameters and optimizer state (the snapshot a checkpoint would hold).
fn catch_up<B: Backend>(
    comm: &Communicator,
    job: &Job<B>,
    run: &mut Run<B>,
) -> Result<Agreed, Error> {
    let opts = job.opts;
    let setup = LoopSetup {
        seed: opts.seed,
        config: &job.model_config,
        balance: &opts.balance,
        global_batch: opts.global_batch,
        checkpoint: opts.checkpoint.as_ref(),
        // Parameters and at most two optimizer buffers of the same size.
        max_elements: job.mlp.param_count().saturating_mul(3),
    };
    let mut state = MlpState {
        be: job.be,
        layers: &job.layers,
        params: &mut run.params,
        optim: &mut run.optim,
    };
    run.state.catch_up(comm, &setup, &mut state)
}

/// The MLP's state as a catch-up moves it.
struct MlpState<'a, B: Backend> {
    be: &'a B,
    layers: &'a [Layer],
    params: &'a mut B::Buf,
    optim: &'a mut OptimState<B::Buf>,
}

impl<B: Backend> SharedState for MlpState<'_, B> {
    fn snapshot(&self, state: State) -> Result<Snapshot, Error> {
        snapshot(self.be, self.layers, self.params, self.optim, state)
    }
    fn restore(&mut self, snap: &Snapshot, from: &str) -> Result<(), Error> {
        let mut params = self.be.download(self.params)?;
        let mut optim = download_optim(self.be, self.optim)?;
        restore_all(self.layers, snap, &mut params, &mut optim, from.as_ref())?;
        *self.params = self.be.upload(&params)?;
        *self.optim = upload_optim(self.be, optim)?;
        Ok(())
    }
}

fn upload_optim<B: Backend>(
    be: &B,
    optim: OptimState<Vec<f32>>,
) -> Result<OptimState<B::Buf>, Error> {
    Ok(match optim {
        OptimState::Sgd { v } => OptimState::Sgd { v: be.upload(&v)? },
        OptimState::AdamW { m, v } => OptimState::AdamW {
            m: be.upload(&m)?,
            v: be.upload(&v)?,
        },
    })
}

fn download_optim<B: Backend>(
    be: &B,
    optim: &OptimState<B::Buf>,
) -> Result<OptimState<Vec<f32>>, Error> {
    Ok(match optim {
        OptimState::Sgd { v } => OptimState::Sgd { v: be.download(v)? },
        OptimState::AdamW { m, v } => OptimState::AdamW {
            m: be.download(m)?,
            v: be.download(v)?,
        },
    })
}

/// Parameters and optimizer state from a snapshot (a checkpoint, or a peer's state).
fn restore_all(
    layers: &[Layer],
    snap: &Snapshot,
    params: &mut [f32],
    optim: &mut OptimState<Vec<f32>>,
    path: &std::path::Path,
) -> Result<(), Error> {
    restore(layers, &snap.model, "", params, path)?;
    match optim {
        OptimState::Sgd { v } => restore(layers, &snap.optimizer, "momentum.", v, path),
        OptimState::AdamW { m, v } => {
            restore(layers, &snap.optimizer, "exp_avg.", m, path)?;
            restore(layers, &snap.optimizer, "exp_avg_sq.", v, path)
        }
    }
}

/// `--balance auto`'s measurement: the median time of five forward + backward passes over
/// `share` samples.
fn calibrate<B: Backend>(
    data: &Dataset,
    mlp: &Mlp,
    be: &B,
    params: &B::Buf,
    share: usize,
    ws: &mut Workspace<B>,
) -> Result<f64, Error> {
    // Rows, not sample ids: with data locality a rank holds only its host's samples.
    let (mut x, mut y) = (Vec::new(), Vec::new());
    data.gather_rows(0..share.min(data.train_y.len()), &mut x, &mut y);
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
    Ok(times[times.len() / 2])
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
    let per_layer = |prefix: &str, flat: &[f32]| crate::model::layer_tensors(layers, prefix, flat);
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
