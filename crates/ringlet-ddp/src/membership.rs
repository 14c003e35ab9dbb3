//! Going on without a rank that died or hung: the hooks a training loop calls so that the
//! survivors finish the job without losing a step.
//!
//! Data parallelism here is exact (the global batch and its sample order do not depend on the
//! world size), so a step can be redone over fewer ranks and still make the update one process
//! would. When a collective fails because a rank is gone, [`Survival::survive`] has the
//! survivors form a new communicator among themselves ([`Communicator::shrink`]) and calls the
//! loop's *catch-up*, which:
//!
//! 1. agrees with [`catch_up`] on where to go on from: ranks may be a step apart when one dies
//!    (some finished the last all-reduce, others did not), so the newest completed step wins, held
//!    by its lowest rank, the *source*;
//! 2. if any member is behind, has the source send its state with [`share_snapshot`] (the same
//!    [`Snapshot`] a checkpoint holds, sent instead of written) and the members behind load it;
//! 3. puts every member's sampler at the source's position and splits the same global batch over
//!    the members ([`crate::balance::for_members`]);
//!
//! and the loop then redoes the step that was interrupted ([`crate::RunState::catch_up`] does all
//! three for a loop). Replacements started by the launcher are admitted at step boundaries and
//! catch up the same way ([`Survival::drive`] runs a loop through every change). Rank 0 logs
//! each change (cause, world size before and after, the step redone, the time it took). A
//! failure while catching up (a second rank lost) forms the next epoch the same way.
//!
//! Who decides: `ringrun --min-ranks K` sets [`MIN_RANKS_ENV`] for its ranks and serves the
//! rendezvous store, so that it outlives any rank. Without it (`mpirun`, `srun`, a store served
//! by rank 0) a lost rank fails every rank, as before, and a launcher's restart resumes from the
//! newest checkpoint.

use crate::checkpoint::{Snapshot, State, Tensor};
use crate::Sampler;
use ringlet::{Communicator, Error};
use ringlet_core::error::PeerId;
use std::time::{Duration, Instant};

/// The least number of ranks a job goes on with after losing some (set by `ringrun --min-ranks`).
pub const MIN_RANKS_ENV: &str = "RINGLET_MIN_RANKS";

/// Replacements the launcher may start for lost ranks (`ringrun --min-ranks --max-restarts`):
/// while any may come, the members look for them at every step boundary.
pub const REPLACEMENTS_ENV: &str = "RINGLET_REPLACEMENTS";

/// Whether, and down to how many ranks, a job goes on after losing a rank, and whether
/// replacements may join it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Survival {
    min_ranks: Option<usize>,
    replacements: bool,
}

impl Survival {
    /// A lost rank fails every rank (the default).
    pub fn never() -> Survival {
        Survival {
            min_ranks: None,
            replacements: false,
        }
    }

    /// Go on while at least `k` ranks (at least 1) are left.
    pub fn at_least(k: usize) -> Survival {
        Survival {
            min_ranks: Some(k.max(1)),
            replacements: false,
        }
    }

    /// Replacements may join (see [`Communicator::admit`]).
    pub fn with_replacements(mut self, yes: bool) -> Survival {
        self.replacements = yes;
        self
    }

    /// From [`MIN_RANKS_ENV`]: unset or empty is [`never`](Self::never); anything but a positive
    /// count is refused.
    /// [`REPLACEMENTS_ENV`] above 0 (with a minimum) lets replacements join.
    pub fn from_env() -> Result<Survival, Error> {
        let s = Survival::parse(std::env::var(MIN_RANKS_ENV).ok().as_deref())?;
        let replacements = std::env::var(REPLACEMENTS_ENV)
            .ok()
            .and_then(|v| v.trim().parse::<u64>().ok())
            .is_some_and(|r| r > 0);
        Ok(s.with_replacements(replacements && s.min_ranks.is_some()))
    }

    /// [`from_env`](Self::from_env) of the variable's value.
    pub fn parse(value: Option<&str>) -> Result<Survival, Error> {
        match value {
            None => Ok(Survival::never()),
            Some(v) if v.trim().is_empty() => Ok(Survival::never()),
            Some(v) => match v.trim().parse::<usize>() {
                Ok(k) if k > 0 => Ok(Survival::at_least(k)),
                _ => Err(Error::Config(format!(
                    "{MIN_RANKS_ENV}={v:?} is not a positive number of ranks"
                ))),
            },
        }
    }

    pub fn min_ranks(&self) -> Option<usize> {
        self.min_ranks
    }

    /// Whether the survivors of `failure` should re-form rather than fail.
    pub fn recovers(&self, failure: &Error) -> bool {
        self.min_ranks.is_some() && lost_a_rank(failure)
    }

    /// After `failure` (an error of a collective on `comm`): if it lost a rank and enough are
    /// left, replaces `comm` by the survivors' communicator and runs `catch_up` on it (see the
    /// module doc), again for each rank lost meanwhile. Every survivor must call it. Returns
    /// the change, for the loop's figures; hands `failure` back where it is not survivable.
    pub fn survive(
        &self,
        comm: &mut Communicator,
        failure: Error,
        mut catch_up: impl FnMut(&Communicator) -> Result<Agreed, Error>,
    ) -> Result<Change, Error> {
        let started = Instant::now();
        let (old_world, old_members) = (comm.world_size(), comm.original_ranks());
        let cause = failure.to_string();
        let mut failure = failure;
        loop {
            let Some(k) = self.min_ranks.filter(|_| lost_a_rank(&failure)) else {
                return Err(failure);
            };
            let next = comm.shrink(&failure, k)?;
            *comm = next;
            match catch_up(comm) {
                Ok(agreed) => {
                    let members = comm.original_ranks();
                    let change = Change {
                        cause,
                        lost: old_members
                            .into_iter()
                            .filter(|r| !members.contains(r))
                            .collect(),
                        joined: Vec::new(),
                        old_world,
                        new_world: comm.world_size(),
                        epoch: comm.epoch(),
                        redo_step: agreed.position.step + 1,
                        sent_state: agreed.anyone_behind(),
                        took: started.elapsed(),
                        at: started,
                    };
                    if comm.rank() == 0 {
                        tracing::warn!("{change}");
                    }
                    return Ok(change);
                }
                Err(e) => failure = e,
            }
        }
    }
}

/// What one stretch of a training loop on one communicator ended with.
pub enum Stretch<T> {
    /// The loop is done.
    Done(T),
    /// Replacements were admitted at a step boundary: this is the members' new communicator.
    Grown(Box<Communicator>),
}

/// The hooks a training loop gives [`Survival::drive`].
pub trait Membered {
    type Output;
    /// Runs the loop on `comm` from where it stands to its end, or to a step boundary where
    /// replacements were admitted ([`Survival::admit`]).
    fn stretch(&mut self, comm: &Communicator) -> Result<Stretch<Self::Output>, Error>;
    /// On a new communicator: agree where to go on from ([`catch_up`]), share state with the
    /// members behind, put the loop there (see the module doc).
    fn catch_up(&mut self, comm: &Communicator) -> Result<Agreed, Error>;
    /// A change completed (for the loop's log and figures).
    fn changed(&mut self, change: Change);
}

impl Survival {
    /// At a step boundary, collective: the members' communicator with the replacements that
    /// wait, if replacements may come and some wait.
    pub fn admit(&self, comm: &Communicator) -> Result<Option<Communicator>, Error> {
        match self.replacements {
            true => comm.admit(),
            false => Ok(None),
        }
    }

    /// Runs a training loop to its end over every membership change: ranks lost (the survivors
    /// re-form and catch up), replacements admitted (all catch up), and, on a replacement's
    /// communicator, taking the members' state before its first step. `comm` ends as the
    /// communicator of the ranks that finished.
    pub fn drive<L: Membered>(
        &self,
        comm: &mut Communicator,
        lp: &mut L,
    ) -> Result<L::Output, Error> {
        // When a growth whose catch-up is due happened.
        let mut grown = comm.is_replacement().then(Instant::now);
        loop {
            let result = match grown.take() {
                Some(at) => lp.catch_up(comm).map(|agreed| {
                    let members = comm.original_ranks();
                    let change = Change {
                        cause: "replacements admitted".into(),
                        lost: Vec::new(),
                        // The members with no state of their own are the newcomers.
                        joined: (0..members.len())
                            .filter(|&i| agreed.steps[i].is_none())
                            .map(|i| members[i])
                            .collect(),
                        old_world: agreed.steps.iter().flatten().count(),
                        new_world: comm.world_size(),
                        epoch: comm.epoch(),
                        redo_step: agreed.position.step + 1,
                        sent_state: agreed.anyone_behind(),
                        took: at.elapsed(),
                        at,
                    };
                    if comm.rank() == 0 {
                        tracing::warn!("{change}");
                    }
                    lp.changed(change);
                    None
                }),
                None => lp.stretch(comm).map(Some),
            };
            match result {
                Ok(Some(Stretch::Done(out))) => {
                    if self.replacements {
                        if let Err(e) = comm.close_admissions() {
                            tracing::warn!("cannot tell waiting replacements the job ended: {e}");
                        }
                    }
                    return Ok(out);
                }
                Ok(Some(Stretch::Grown(next))) => {
                    grown = Some(Instant::now());
                    *comm = *next;
                }
                Ok(None) => {}
                Err(failure) => {
                    let change = self.survive(comm, failure, |c| lp.catch_up(c))?;
                    lp.changed(change);
                }
            }
        }
    }
}

/// Whether `e` says a rank is gone or stopped answering (rather than a bug, an attack or a local
/// failure, which a new communicator would meet again).
pub fn lost_a_rank(e: &Error) -> bool {
    matches!(
        e,
        Error::PeerLost { .. }
            | Error::Timeout { .. }
            | Error::Aborted { .. }
            | Error::Broken(_)
            // Re-forming links (a shrink's or an admission's) with a rank that never came.
            | Error::Deadline { .. }
    )
}

/// One membership change, as rank 0 logs it.
#[derive(Clone, Debug)]
pub struct Change {
    /// The first failure seen (or the admission of replacements).
    pub cause: String,
    /// The first-epoch ranks no longer in the job.
    pub lost: Vec<usize>,
    /// The first-epoch ranks whose replacements joined.
    pub joined: Vec<usize>,
    pub old_world: usize,
    pub new_world: usize,
    /// The new communicator's epoch.
    pub epoch: u64,
    /// The step done next (counted from 1, as step reports count): after a loss, the one
    /// interrupted, done again.
    pub redo_step: u64,
    /// Some member was a step behind and loaded the source's state.
    pub sent_state: bool,
    /// From the failure reaching [`Survival::survive`] to the members agreeing.
    pub took: Duration,
    /// When the failure reached [`Survival::survive`].
    pub at: Instant,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if !self.joined.is_empty() {
            return write!(
                f,
                "membership change (epoch {}): replacement(s) for rank(s) {:?} joined; world {} -> {}; they took the state after step {}; joined in {} ms",
                self.epoch,
                self.joined,
                self.old_world,
                self.new_world,
                self.redo_step - 1,
                self.took.as_millis()
            );
        }
        write!(
            f,
            "membership change (epoch {}): lost rank(s) {:?}; world {} -> {}; redoing step {}{}; re-formed in {} ms; cause: {}",
            self.epoch,
            self.lost,
            self.old_world,
            self.new_world,
            self.redo_step,
            if self.sent_state { " (state sent to the ranks a step behind)" } else { "" },
            self.took.as_millis(),
            self.cause
        )
    }
}

/// Where a training loop stands after its last completed step: the step count, the sampler's
/// position after it, and the split it was made with (`batches[i]` for first-epoch rank
/// `members[i]`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Position {
    /// Holds no state at all (a replacement that has just joined): it takes the source's.
    pub fresh: bool,
    pub step: u64,
    pub epoch: u64,
    pub cursor: u64,
    pub batches: Vec<usize>,
    pub members: Vec<usize>,
}

impl Position {
    /// A replacement's, before it has any state.
    pub fn fresh() -> Position {
        Position {
            fresh: true,
            ..Position::default()
        }
    }

    /// After `step` steps, with `sampler` past them and `batches` the split of `comm`'s ranks.
    pub fn new(step: u64, sampler: &Sampler, batches: &[usize], comm: &Communicator) -> Position {
        Position {
            fresh: false,
            step,
            epoch: sampler.epoch(),
            cursor: sampler.cursor(),
            batches: batches.to_vec(),
            members: comm.original_ranks(),
        }
    }
}

/// What the members of a new communicator agreed on: whose progress they go on from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Agreed {
    /// The lowest rank holding the newest step; its state is the one every member takes.
    pub source: usize,
    /// Each member's completed steps (`None`: a replacement with no state yet).
    pub steps: Vec<Option<u64>>,
    /// The source's progress.
    pub position: Position,
}

impl Agreed {
    /// Whether `rank` must load the source's state.
    pub fn is_behind(&self, rank: usize) -> bool {
        self.steps[rank].is_none_or(|s| s < self.position.step)
    }

    pub fn anyone_behind(&self) -> bool {
        (0..self.steps.len()).any(|r| self.is_behind(r))
    }
}

/// The most a progress record names (first-epoch ranks and their local batches).
const MAX_MEMBERS: usize = 1 << 20;

/// Collective on a new communicator: every member shares its completed steps, and the source
/// (lowest rank with the most) sends its progress to all.
pub fn catch_up(comm: &Communicator, mine: &Position) -> Result<Agreed, Error> {
    let n = comm.world_size();
    // Counts travel as i64 (the collectives' integer type); every one received is checked.
    let wire = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
    let mut gathered = vec![0i64; n];
    let ours = if mine.fresh { -1 } else { wire(mine.step) };
    comm.all_gather(&[ours], &mut gathered)?;
    let steps = gathered
        .iter()
        .enumerate()
        .map(|(r, &s)| match s {
            -1 => Ok(None),
            s => u64::try_from(s)
                .map(Some)
                .map_err(|_| bad_peer(r, format!("{s} as its step"))),
        })
        .collect::<Result<Vec<Option<u64>>, Error>>()?;
    let newest = steps.iter().flatten().copied().max();
    let source = steps
        .iter()
        .position(|&s| s.is_some() && s == newest)
        .ok_or_else(|| Error::Broken("no member holds any state to go on from".into()))?;

    let mut len = [mine.batches.len().min(mine.members.len()) as i64];
    comm.broadcast(&mut len, source)?;
    let m = usize::try_from(len[0])
        .ok()
        .filter(|&m| m <= MAX_MEMBERS)
        .ok_or_else(|| bad_peer(source, format!("a progress record of {} members", len[0])))?;
    let mut msg = vec![0i64; 3 + 2 * m];
    if comm.rank() == source {
        msg[..3].copy_from_slice(&[wire(mine.step), wire(mine.epoch), wire(mine.cursor)]);
        for i in 0..m {
            msg[3 + i] = wire(mine.batches[i] as u64);
            msg[3 + m + i] = wire(mine.members[i] as u64);
        }
    }
    comm.broadcast(&mut msg, source)?;
    let count = |v: i64| {
        u64::try_from(v)
            .ok()
            .and_then(|c| usize::try_from(c).ok().map(|_| c))
            .ok_or_else(|| bad_peer(source, format!("{v} as a count")))
    };
    let counts = msg
        .iter()
        .map(|&v| count(v))
        .collect::<Result<Vec<u64>, Error>>()?;
    let position = Position {
        fresh: false,
        step: counts[0],
        epoch: counts[1],
        cursor: counts[2],
        batches: counts[3..3 + m].iter().map(|&c| c as usize).collect(),
        members: counts[3 + m..].iter().map(|&c| c as usize).collect(),
    };
    Ok(Agreed {
        source,
        steps,
        position,
    })
}

/// Numbers from the rank whose state the others take that cannot be right: a protocol error
/// naming it (not a lost rank: the members do not re-form over it).
fn bad_peer(rank: usize, what: String) -> Error {
    Error::protocol(
        &PeerId::rank(rank, "the rank sending its state"),
        format!("it sent {what}"),
    )
}

/// The most a shared snapshot may hold: its description and its elements.
const MAX_HEADER_BYTES: i64 = 64 << 20;
const MAX_ELEMENTS: i64 = 1 << 36;

/// Collective: `root` sends its snapshot (`Some` there, ignored elsewhere) to every rank; each
/// gets it back whole. The tensors' values travel as one `f32` broadcast; their names and shapes
/// and the loop state as JSON. Sizes from the root are checked before anything is allocated:
/// at most `max_elements` values (what this rank's own model and optimizer state hold, say).
pub fn share_snapshot(
    comm: &Communicator,
    root: usize,
    snap: Option<&Snapshot>,
    max_elements: usize,
) -> Result<Snapshot, Error> {
    let mine = (comm.rank() == root)
        .then(|| {
            snap.ok_or_else(|| {
                Error::InvalidArgument("share_snapshot: the root must give a snapshot".into())
            })
        })
        .transpose()?;
    let mut header = Vec::new();
    let mut sizes = [0i64; 2];
    if let Some(s) = mine {
        let names = |list: &[Tensor]| -> Vec<(String, Vec<usize>)> {
            list.iter()
                .map(|t| (t.name.clone(), t.shape.clone()))
                .collect()
        };
        let described = Described {
            state: s.state.clone(),
            model: names(&s.model),
            optimizer: names(&s.optimizer),
        };
        header = serde_json::to_vec(&described)
            .map_err(|e| Error::InvalidArgument(format!("describing the snapshot: {e}")))?;
        let elements: usize = s
            .model
            .iter()
            .chain(&s.optimizer)
            .map(|t| t.data.len())
            .sum();
        sizes = [header.len() as i64, elements as i64];
    }
    comm.broadcast(&mut sizes, root)?;
    let bad = |what: String| bad_peer(root, format!("a snapshot {what}"));
    let most = MAX_ELEMENTS.min(i64::try_from(max_elements).unwrap_or(i64::MAX));
    if !(0..=MAX_HEADER_BYTES).contains(&sizes[0]) || !(0..=most).contains(&sizes[1]) {
        return Err(bad(format!(
            "of {} header bytes and {} elements",
            sizes[0], sizes[1]
        )));
    }
    header.resize(sizes[0] as usize, 0);
    comm.broadcast(&mut header, root)?;
    let mut values = Vec::new();
    if let Some(s) = mine {
        values.reserve_exact(sizes[1] as usize);
        for t in s.model.iter().chain(&s.optimizer) {
            values.extend_from_slice(&t.data);
        }
    } else {
        values
            .try_reserve_exact(sizes[1] as usize)
            .map_err(|e| bad(format!("of {} elements, more than fit here: {e}", sizes[1])))?;
        values.resize(sizes[1] as usize, 0.0f32);
    }
    comm.broadcast(&mut values, root)?;
    if let Some(s) = mine {
        return Ok(s.clone());
    }
    let described: Described = serde_json::from_slice(&header)
        .map_err(|e| bad(format!("whose description does not parse: {e}")))?;
    let mut rest = &values[..];
    let mut take = |list: Vec<(String, Vec<usize>)>| -> Result<Vec<Tensor>, Error> {
        list.into_iter()
            .map(|(name, shape)| {
                let len = shape
                    .iter()
                    .try_fold(1usize, |a, &d| a.checked_mul(d))
                    .filter(|&l| l <= rest.len())
                    .ok_or_else(|| bad(format!("whose {name} of shape {shape:?} overflows it")))?;
                let (data, tail) = rest.split_at(len);
                rest = tail;
                Ok(Tensor {
                    name,
                    shape,
                    data: data.to_vec(),
                })
            })
            .collect()
    };
    let model = take(described.model)?;
    let optimizer = take(described.optimizer)?;
    if !rest.is_empty() {
        return Err(bad(format!("with {} elements no tensor holds", rest.len())));
    }
    Ok(Snapshot {
        state: described.state,
        model,
        optimizer,
    })
}

/// A snapshot's description, sent before its values.
#[derive(serde::Serialize, serde::Deserialize)]
struct Described {
    state: State,
    model: Vec<(String, Vec<usize>)>,
    optimizer: Vec<(String, Vec<usize>)>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use ringlet_core::error::PeerId;

    #[test]
    fn the_setting_is_a_positive_count() {
        assert_eq!(Survival::parse(None).unwrap(), Survival::never());
        assert_eq!(Survival::parse(Some(" ")).unwrap(), Survival::never());
        assert_eq!(Survival::parse(Some("2")).unwrap().min_ranks(), Some(2));
        for bad in ["0", "-1", "two", "99999999999999999999999"] {
            let e = Survival::parse(Some(bad)).unwrap_err().to_string();
            assert!(e.contains(MIN_RANKS_ENV), "{e}");
        }
        let lost = Error::PeerLost {
            peer: PeerId::rank(2, "h:1"),
            detail: "closed".into(),
        };
        let bug = Error::Mismatch {
            peer: PeerId::rank(2, "h:1"),
            detail: "sizes".into(),
        };
        assert!(Survival::at_least(2).recovers(&lost));
        assert!(!Survival::at_least(2).recovers(&bug));
        assert!(!Survival::never().recovers(&lost));
    }

    /// Ranks a step apart agree on the newest step and its lowest holder, and take its position
    /// and split; the state it shares arrives whole on every rank.
    #[test]
    fn members_a_step_apart_take_the_newest_state() {
        let snap = Snapshot {
            state: State {
                step: 7,
                epoch: 1,
                cursor: 128,
                seed: 3,
                rng: vec![9],
                batches: vec![30, 34],
                world_size: 2,
                model: serde_json::json!({"model": "mlp"}),
                extra: serde_json::Value::Null,
                metrics: serde_json::Value::Null,
                plan_batches: None,
            },
            model: vec![Tensor {
                name: "w".into(),
                shape: vec![2, 3],
                data: (0..6).map(|i| i as f32 * 0.5).collect(),
            }],
            optimizer: vec![Tensor {
                name: "momentum.w".into(),
                shape: vec![6],
                data: vec![-1.0; 6],
            }],
        };
        let got = crate::local_world::run(3, |comm| {
            let r = comm.rank();
            let mine = Position {
                fresh: false,
                step: [6, 7, 7][r],
                epoch: 1,
                cursor: [64, 128, 128][r],
                batches: vec![20, 22, 22],
                members: vec![0, 1, 2],
            };
            let agreed = catch_up(&comm, &mine).unwrap();
            let shared = share_snapshot(
                &comm,
                agreed.source,
                (r == agreed.source).then_some(&snap),
                12,
            )
            .unwrap();
            (agreed, shared)
        });
        for (agreed, shared) in &got {
            assert_eq!(agreed.source, 1);
            assert_eq!(agreed.steps, vec![Some(6), Some(7), Some(7)]);
            assert_eq!(agreed.position.cursor, 128);
            assert_eq!(agreed.position.batches, vec![20, 22, 22]);
            assert!(agreed.is_behind(0) && !agreed.is_behind(2) && agreed.anyone_behind());
            assert_eq!(shared, &snap);
        }
    }
}
