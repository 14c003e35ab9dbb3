//! What a training loop carries across communicators, whatever its model: the steps done, the
//! sampler and the position of the last completed step, the balance and split to start the
//! next balancer from, the checkpoint writer, the timings, the last membership change. A loop
//! keeps one [`RunState`] beside its model and calls it at start-up, at each stretch's start,
//! after each step, and to catch up after a membership change (see [`crate::membership`]).

use crate::checkpoint::{Snapshot, State};
use crate::membership::{catch_up, share_snapshot, Agreed, Change, Position};
use crate::{Balance, CheckpointOptions, JobCheckpoints, Sampler, StepReport, Timing};
use ringlet::{Communicator, Error};

/// A training loop's model and optimizer state, as the catch-up moves it between ranks.
pub trait SharedState {
    /// The snapshot a checkpoint would hold of this rank's state, with the loop's `state`.
    fn snapshot(&self, state: State) -> Result<Snapshot, Error>;
    /// Takes the state of `snap` (sent by another rank; `from` names it in errors).
    fn restore(&mut self, snap: &Snapshot, from: &str) -> Result<(), Error>;
}

/// How a training loop was set up, as its catch-up needs it.
pub struct LoopSetup<'a> {
    pub seed: u64,
    /// The model's configuration, as checkpoints record it.
    pub config: &'a serde_json::Value,
    /// The job's balance (static weights per first-epoch rank).
    pub balance: &'a Balance,
    pub global_batch: usize,
    pub checkpoint: Option<&'a CheckpointOptions>,
    /// The most values a shared snapshot may hold (this rank's model and optimizer state).
    pub max_elements: usize,
}

/// Everything a training loop must not lose when its communicator changes, apart from its
/// model and optimizer state.
pub struct RunState {
    /// Steps completed.
    pub step: u64,
    pub sampler: Sampler,
    /// Where the last completed step left the loop (what the members agree on after a change).
    pub done: Position,
    /// The balance of the current members, and the split to start their balancer from (a
    /// checkpoint's, or the one the members take over after a change).
    pub balance: Balance,
    pub split: Option<Vec<usize>>,
    pub saver: Option<JobCheckpoints>,
    pub timing: Timing,
    pub resumed_from: Option<u64>,
    /// The last membership change, until the first step after it completes.
    pub changed: Option<Change>,
}

impl RunState {
    /// At start-up, `step` steps done (a resumed checkpoint's, with its `split`) and `sampler`
    /// there; on a replacement's communicator it holds no state yet.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        comm: &Communicator,
        step: u64,
        sampler: Sampler,
        balance: &Balance,
        split: Option<Vec<usize>>,
        saver: Option<JobCheckpoints>,
        calibration_steps: u64,
        resumed_from: Option<u64>,
    ) -> RunState {
        RunState {
            done: match comm.is_replacement() {
                true => Position::fresh(),
                false => Position::new(step, &sampler, &[], comm),
            },
            step,
            sampler,
            balance: balance.clone(),
            split,
            saver,
            timing: Timing::new(calibration_steps),
            resumed_from,
            changed: None,
        }
    }

    /// At the start of a stretch on `comm`, once its balancer split the batch as `batches`, and
    /// whenever the split changes.
    pub fn started(&mut self, comm: &Communicator, batches: &[usize]) {
        self.done.members = comm.original_ranks();
        self.done.batches = batches.to_vec();
    }

    /// Once a step's update is applied: counts it and records where it left the sampler.
    /// Returns the step's number (from 1).
    pub fn completed(&mut self) -> u64 {
        self.step += 1;
        self.done.step = self.step;
        self.done.epoch = self.sampler.epoch();
        self.done.cursor = self.sampler.cursor();
        self.step
    }

    /// After a step's report `r`: counts it in the timings, and rank 0 says how long after the
    /// last membership change the first step completed.
    pub fn reported(&mut self, comm: &Communicator, r: &StepReport) {
        self.timing.add(r);
        if let Some(change) = self.changed.take().filter(|_| comm.rank() == 0) {
            tracing::info!(
                "step {} completed on {} ranks {} ms after the membership change began",
                r.step,
                comm.world_size(),
                change.at.elapsed().as_millis()
            );
        }
    }

    /// After a membership change, on the new communicator: agree where to go on from
    /// ([`catch_up`]); the source shares its state ([`share_snapshot`]) and the ranks behind
    /// restore it into `model`; every rank puts its sampler and position at the source's, takes
    /// the split for the members ([`crate::balance::for_members`]) and reopens the checkpoints
    /// (the new rank 0 writes them).
    pub fn catch_up(
        &mut self,
        comm: &Communicator,
        setup: &LoopSetup,
        model: &mut impl SharedState,
    ) -> Result<Agreed, Error> {
        // The old writer first: its last write is waited for before the new rank 0 opens.
        self.saver = None;
        let agreed = catch_up(comm, &self.done)?;
        let p = &agreed.position;
        if agreed.anyone_behind() {
            let mine = match comm.rank() == agreed.source {
                true => Some(model.snapshot(State {
                    step: p.step,
                    epoch: p.epoch,
                    cursor: p.cursor,
                    seed: setup.seed,
                    rng: Vec::new(),
                    batches: p.batches.clone(),
                    world_size: p.batches.len(),
                    model: setup.config.clone(),
                    extra: serde_json::Value::Null,
                    metrics: serde_json::Value::Null,
                    plan_batches: None,
                })?),
                false => None,
            };
            let snap = share_snapshot(comm, agreed.source, mine.as_ref(), setup.max_elements)?;
            if agreed.is_behind(comm.rank()) {
                model.restore(&snap, &format!("the state rank {} sent", agreed.source))?;
            }
        }
        self.sampler.seek(p.epoch, p.cursor)?;
        self.step = p.step;
        (self.balance, self.split) = crate::balance::for_members(
            setup.balance,
            &comm.original_ranks(),
            &p.batches,
            &p.members,
            setup.global_batch,
        );
        self.done = p.clone();
        if let Some(c) = setup.checkpoint {
            self.saver = Some(JobCheckpoints::open(comm, c.clone())?);
        }
        Ok(agreed)
    }
}
