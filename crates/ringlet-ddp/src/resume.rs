//! A job's checkpoints: rank 0 writes them, every rank resumes from the same one.
//!
//! [`crate::checkpoint`] is the format and the single writer; this module is the collective
//! protocol around it. Rank 0 picks the checkpoint to resume from (the newest that verifies, or
//! the one named) and broadcasts its path; every rank then loads and verifies it itself (shared
//! storage). Every failure on one rank — opening the directory, a save, loading — is agreed, so
//! all ranks fail at once naming the rank.

use crate::agree::agree;
use crate::checkpoint::{self, Checkpointer, Snapshot, State};
use ringlet::{Communicator, Error};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Which checkpoint to start from (`--resume`).
#[derive(Clone, Debug, PartialEq)]
pub enum Resume {
    /// The newest committed checkpoint whose checksums verify, if any.
    Auto,
    Never,
    Path(PathBuf),
}

impl std::str::FromStr for Resume {
    type Err = String;
    fn from_str(s: &str) -> Result<Resume, String> {
        Ok(match s {
            "auto" => Resume::Auto,
            "never" => Resume::Never,
            "" => return Err("expected auto, never or a checkpoint directory".into()),
            p => Resume::Path(PathBuf::from(p)),
        })
    }
}

#[derive(Clone, Debug)]
pub struct CheckpointOptions {
    /// Shared by every rank (NFS, a shared volume).
    pub dir: PathBuf,
    /// Save every N steps and after the last (0: never).
    pub every: u64,
    /// Committed checkpoints to keep (at least 1).
    pub keep: usize,
    pub resume: Resume,
}

/// What a resumed run must match: the checkpoint's numbers are checked against it before any of
/// them indexes anything.
#[derive(Clone, Debug)]
pub struct Expect<'a> {
    /// The sample-order seed (a different one would change the order).
    pub seed: u64,
    /// Training samples (the cursor must lie within them).
    pub train_len: usize,
    /// The caller's configuration, and the keys of it that must be equal.
    pub config: &'a serde_json::Value,
    pub keys: &'a [&'a str],
}

/// Checks a loaded checkpoint's manifest against this run. Numbers from the file are checked
/// with overflow in mind: it may have been edited, or written by something else.
pub fn check_resumable(snap: &Snapshot, expect: &Expect, path: &Path) -> Result<(), Error> {
    let s = &snap.state;
    let fail = |why: String| Err(Error::Config(format!("{}: {why}", path.display())));
    if s.batches.len() != s.world_size {
        return fail(format!(
            "the manifest's batch vector {:?} does not fit its world size {}",
            s.batches, s.world_size
        ));
    }
    if s.batches
        .iter()
        .try_fold(0usize, |a, &b| a.checked_add(b))
        .is_none()
    {
        return fail(format!(
            "the manifest's batch vector {:?} overflows when summed",
            s.batches
        ));
    }
    if s.epoch > s.step {
        return fail(format!(
            "epoch {} is past its step {} (every epoch takes at least one step)",
            s.epoch, s.step
        ));
    }
    if s.cursor > expect.train_len as u64 {
        return fail(format!(
            "data cursor {} is past the {} training samples of this dataset",
            s.cursor, expect.train_len
        ));
    }
    if s.seed != expect.seed {
        return fail(format!(
            "saved by a run with --seed {}, this one has --seed {} (the sample order would differ)",
            s.seed, expect.seed
        ));
    }
    for &key in expect.keys {
        let (saved, ours) = (s.model.get(key), expect.config.get(key));
        if saved != ours {
            let show = |v: Option<&serde_json::Value>| v.cloned().unwrap_or_default().to_string();
            return fail(format!(
                "saved with {key} {} but this run has {}",
                show(saved),
                show(ours)
            ));
        }
    }
    Ok(())
}

/// The saved split, if it still applies: same world size and global batch (checked sum).
pub fn saved_split(state: &State, world_size: usize, global_batch: usize) -> Option<Vec<usize>> {
    let sum = state
        .batches
        .iter()
        .try_fold(0usize, |a, &b| a.checked_add(b));
    // A rank with no sample could never be measured again by `auto`: a split with one is not
    // taken where every rank can have some.
    let empty = global_batch >= world_size && state.batches.contains(&0);
    (state.world_size == world_size
        && state.batches.len() == world_size
        && sum == Some(global_batch)
        && !empty)
        .then(|| state.batches.clone())
}

/// Puts a training loop where a checkpoint (`state`, from `path`, already checked with
/// [`check_resumable`]) left it: the sampler at its position. Returns the step to go on from and
/// the saved split, where it still applies to this world and global batch; rank 0 logs it.
pub fn resume_loop(
    state: &State,
    path: &Path,
    sampler: &mut crate::Sampler,
    rank: usize,
    world_size: usize,
) -> Result<(u64, Option<Vec<usize>>), Error> {
    sampler.seek(state.epoch, state.cursor)?;
    sampler.plan_from(state.plan_batches.clone());
    if rank == 0 {
        tracing::info!(
            "resumed from {} (step {}, epoch {}, cursor {}, saved by {} ranks)",
            path.display(),
            state.step,
            state.epoch,
            state.cursor,
            state.world_size
        );
    }
    let split = saved_split(state, world_size, sampler.global_batch());
    Ok((state.step, split))
}

/// What a checkpoint after step `step` records of the loop: the sampler's position, the split,
/// the world size, the caller's `config` and the step's mean training loss (the caller adds its
/// `extra` state and `rng`).
pub fn loop_state(
    step: u64,
    sampler: &crate::Sampler,
    balancer: &crate::Balancer,
    seed: u64,
    config: serde_json::Value,
    loss: f64,
) -> State {
    State {
        step,
        epoch: sampler.epoch(),
        cursor: sampler.cursor(),
        seed,
        rng: Vec::new(),
        batches: balancer.batches().to_vec(),
        world_size: balancer.batches().len(),
        model: config,
        extra: serde_json::Value::Null,
        metrics: serde_json::json!({ "train_loss": loss }),
        plan_batches: sampler.plan().map(|p| p.batches.clone()),
    }
}

/// How long one operation on the shared storage may take: less than the collective deadline
/// the other ranks wait with meanwhile, so that storage too slow for it fails on rank 0 naming
/// the checkpoint before the others give up on rank 0 with a bare timeout.
fn storage_deadline(comm: &Communicator) -> Duration {
    comm.timeout().mul_f64(0.8)
}

/// The job's checkpoints (see the module docs). Rank 0 holds the writer.
pub struct JobCheckpoints {
    opts: CheckpointOptions,
    writer: Option<Checkpointer>,
    deadline: Duration,
}

impl JobCheckpoints {
    /// Opens (creates) the directory on rank 0; collective. Saves are bounded by the
    /// communicator's timeout.
    pub fn open(comm: &Communicator, opts: CheckpointOptions) -> Result<JobCheckpoints, Error> {
        let deadline = storage_deadline(comm);
        let opened = match comm.rank() {
            0 => Checkpointer::open(&opts.dir, opts.keep, deadline)
                .map(Some)
                .map_err(|e| e.to_string()),
            _ => Ok(None),
        };
        let writer = agree(comm, opened, "opening the checkpoint directory")?;
        Ok(JobCheckpoints {
            opts,
            writer,
            deadline,
        })
    }

    pub fn options(&self) -> &CheckpointOptions {
        &self.opts
    }

    /// The checkpoint to resume from, loaded and verified on every rank; collective. Rank 0
    /// picks it (`--resume`) and tells the others its path.
    pub fn resume(&self, comm: &Communicator) -> Result<Option<(PathBuf, Snapshot)>, Error> {
        const MAX_PATH: usize = 4096;
        let mut msg = vec![0u8; 1 + MAX_PATH];
        let mut mine = None;
        let deadline = self.deadline;
        if comm.rank() == 0 {
            let chosen: Result<Option<(PathBuf, Snapshot)>, String> = match &self.opts.resume {
                Resume::Never => Ok(None),
                Resume::Auto => match checkpoint::load_latest_within(&self.opts.dir, deadline) {
                    // load_latest warns about each checkpoint it skips, naming it.
                    Ok((found, _skipped)) => Ok(found),
                    Err(e) => Err(e.to_string()),
                },
                Resume::Path(p) => checkpoint::load_within(p, deadline)
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
            let mut k = text.len().min(MAX_PATH);
            while !text.is_char_boundary(k) {
                k -= 1;
            }
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
                let loaded = checkpoint::load_within(&path, deadline).map_err(|e| {
                    format!(
                        "rank {} cannot load it (is {} shared storage?): {e}",
                        comm.rank(),
                        self.opts.dir.display()
                    )
                });
                let snap = agree(comm, loaded, "loading the checkpoint rank 0 chose")?;
                Ok(Some((path, snap)))
            }
        }
    }

    /// Says on rank 0 what a launcher's restart (`RINGLET_RESTART`, see
    /// [`crate::agree::restart_count`]) resumes from; `resumed` is the step, if any.
    pub fn announce_restart(comm: &Communicator, enabled: bool, resumed: Option<u64>) {
        let restart = crate::agree::restart_count();
        if restart == 0 || comm.rank() != 0 {
            return;
        }
        match (enabled, resumed) {
            (_, Some(step)) => tracing::info!("restart {restart}: resuming at step {step}"),
            (true, None) => tracing::warn!(
                "restart {restart}: no checkpoint to resume from yet, training starts over"
            ),
            (false, None) => tracing::warn!(
                "restart {restart}: no checkpoint directory, training starts over (give one to resume)"
            ),
        }
    }

    /// Whether step `step` (counted after it is done) of a run of `last` steps is saved.
    pub fn due(&self, step: u64, last: u64) -> bool {
        self.opts.every > 0 && (step.is_multiple_of(self.opts.every) || step == last)
    }

    /// Saves on rank 0: `snapshot` builds the host copy (the only part the step waits for); the
    /// write goes on in the background. Collective: a failure on rank 0 (the copy, the previous
    /// write) fails every rank. Returns how long this rank stalled.
    pub fn save(
        &mut self,
        comm: &Communicator,
        snapshot: impl FnOnce() -> Result<Snapshot, Error>,
    ) -> Result<Duration, Error> {
        let t = Instant::now();
        let mut saved = Ok(());
        if let Some(w) = self.writer.as_mut() {
            saved = snapshot()
                .map_err(|e| e.to_string())
                .and_then(|snap| w.save(snap).map(drop).map_err(|e| e.to_string()));
        }
        let stall = t.elapsed();
        agree(comm, saved, "saving a checkpoint")?;
        Ok(stall)
    }

    /// Waits for the last write (bounded by the deadline); collective.
    pub fn finish(&mut self, comm: &Communicator) -> Result<(), Error> {
        let last = match self.writer.as_mut() {
            Some(w) => w.wait().map(drop).map_err(|e| e.to_string()),
            None => Ok(()),
        };
        agree(comm, last, "writing the last checkpoint")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snap(batches: Vec<usize>, world_size: usize, cursor: u64) -> Snapshot {
        Snapshot {
            state: State {
                step: 10,
                epoch: 0,
                cursor,
                seed: 1,
                rng: Vec::new(),
                batches,
                world_size,
                model: serde_json::json!({"sizes": [64, 10], "optimizer": "sgd"}),
                extra: serde_json::Value::Null,
                metrics: serde_json::Value::Null,
                plan_batches: None,
            },
            model: Vec::new(),
            optimizer: Vec::new(),
        }
    }

    /// A manifest whose numbers do not fit (edited, or written by something else) is refused
    /// naming the checkpoint, before a batch vector or cursor from it indexes anything.
    #[test]
    fn a_manifest_that_does_not_fit_is_refused() {
        let config = serde_json::json!({"sizes": [64, 10], "optimizer": "sgd"});
        let expect = Expect {
            seed: 1,
            train_len: 1000,
            config: &config,
            keys: &["sizes", "optimizer"],
        };
        let path = Path::new("/ckpt/step-000000000010");
        let check = |s: Snapshot| check_resumable(&s, &expect, path);
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
        // A batch vector whose sum wraps: refused, not summed to a small number.
        let e = check(snap(vec![usize::MAX, 65], 2, 0))
            .unwrap_err()
            .to_string();
        assert!(e.contains("overflows when summed"), "{e}");
        // An epoch past its step (a huge one would make the sampler's count wrap): refused.
        let mut late = snap(vec![32, 32], 2, 0);
        late.state.epoch = u64::MAX;
        let e = check(late).unwrap_err().to_string();
        assert!(
            e.contains("epoch 18446744073709551615 is past its step 10"),
            "{e}"
        );
        let mut other = snap(vec![32, 32], 2, 0);
        other.state.model = serde_json::json!({"sizes": [64, 32, 10], "optimizer": "sgd"});
        let e = check(other).unwrap_err().to_string();
        assert!(
            e.contains("saved with sizes [64,32,10] but this run has [64,10]"),
            "{e}"
        );
    }

    #[test]
    fn a_saved_split_applies_only_to_the_same_world_and_batch() {
        let s = snap(vec![20, 44], 2, 0).state;
        assert_eq!(saved_split(&s, 2, 64), Some(vec![20, 44]));
        assert_eq!(saved_split(&s, 3, 64), None);
        assert_eq!(saved_split(&s, 2, 128), None);
        let wrapping = snap(vec![usize::MAX, 65], 2, 0).state;
        assert_eq!(saved_split(&wrapping, 2, 64), None);
        // A rank with nothing to do is not resumed into when every rank can have samples.
        assert_eq!(saved_split(&snap(vec![0, 64], 2, 0).state, 2, 64), None);
        assert_eq!(
            saved_split(&snap(vec![0, 1], 2, 0).state, 2, 1),
            Some(vec![0, 1])
        );
    }
}
