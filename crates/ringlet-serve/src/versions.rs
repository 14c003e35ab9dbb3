//! Model versions: the committed checkpoints of a training run's directory, verified as resume
//! verifies them (manifest, sizes, SHA-256 of every file) before one is served. A version is
//! named by its step and the first 12 hex digits of its model file's SHA-256.

use crate::compute::Compute;
use crate::scorer::{Scorer, Unservable};
use ringlet_ddp::checkpoint::{self, CheckpointError, Snapshot};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A loaded, verified version.
pub struct Version {
    pub step: u64,
    pub path: PathBuf,
    /// `step-<N>@<12 hex digits>`: what every prediction it made is tagged with.
    pub label: String,
    pub scorer: Scorer,
}

/// Why a checkpoint was not loaded, and whose fault that is.
pub struct Refusal {
    pub why: String,
    pub fault: Fault,
}

/// Whose fault a refusal is, which says what becomes of the checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Corrupt, or a model that cannot be served: not tried again until its manifest changes.
    Checkpoint,
    /// The storage failed to answer: tried again at the next look.
    Storage,
    /// The GPU could not be opened for it, or had no room: tried again at the next look; at
    /// start an older checkpoint would meet the same device, so the replica stops.
    Device,
}

/// The checkpoint, verified, and its model file's digest, read within `deadline`.
fn read(path: &Path, deadline: Duration) -> Result<(Snapshot, String), Refusal> {
    let owned = path.to_path_buf();
    checkpoint::within(path, deadline, "load checkpoint", move || {
        let snap = checkpoint::load(&owned)?;
        let digest = checkpoint::model_digest(&owned)?;
        Ok((snap, digest))
    })
    .map_err(|e| Refusal {
        fault: match e {
            CheckpointError::Corrupt { .. } | CheckpointError::Incomplete { .. } => {
                Fault::Checkpoint
            }
            _ => Fault::Storage,
        },
        why: e.to_string(),
    })
}

/// `step-<N>@<first 12 characters of the digest>`.
pub fn label(step: u64, digest: &str) -> String {
    format!("step-{step}@{}", digest.get(..12).unwrap_or(digest))
}

/// Loads and verifies the checkpoint at `path` within `deadline` (storage that hangs is an
/// error) and rebuilds its model on what `compute` gives it.
pub fn load(path: &Path, deadline: Duration, compute: &mut Compute) -> Result<Version, Refusal> {
    let (snap, digest) = read(path, deadline)?;
    let scorer = Scorer::from_snapshot(&snap, compute).map_err(|e| Refusal {
        why: format!("{}: {e}", path.display()),
        fault: match e {
            Unservable::Model(_) => Fault::Checkpoint,
            Unservable::Device(_) => Fault::Device,
        },
    })?;
    Ok(Version {
        step: snap.state.step,
        path: path.to_path_buf(),
        label: label(snap.state.step, &digest),
        scorer,
    })
}

/// The checkpoints of `dir`, newest first, listed within `deadline`.
fn steps(dir: &Path, deadline: Duration) -> Result<Vec<(u64, PathBuf)>, String> {
    let owned = dir.to_path_buf();
    checkpoint::within(dir, deadline, "list checkpoints", move || {
        checkpoint::steps(&owned)
    })
    .map_err(|e| e.to_string())
}

/// What identifies one write of a checkpoint: its path and its manifest's modification time
/// (a step saved again gets a new manifest, and is looked at again).
fn identity(path: &Path) -> (PathBuf, Option<std::time::SystemTime>) {
    let manifest = path.join(checkpoint::MANIFEST_FILE);
    let modified = std::fs::symlink_metadata(manifest)
        .and_then(|m| m.modified())
        .ok();
    (path.to_path_buf(), modified)
}

/// Which version to serve: the newest of a directory, or one pinned.
pub struct Source {
    dir: Option<PathBuf>,
    /// What versions score on (a GPU, once opened, is kept across versions).
    compute: Compute,
    deadline: Duration,
    every: Duration,
    last_look: Option<Instant>,
    /// Checkpoints refused for good (corrupt, or a model that cannot be served), as written.
    refused: HashSet<(PathBuf, Option<std::time::SystemTime>)>,
    /// Storage failures already logged (they are tried again at every look).
    failing: HashSet<PathBuf>,
}

impl Source {
    /// Follows `dir` (a new version is looked for at most every `every`); `None`: pinned.
    /// Versions are built on `compute`.
    pub fn new(
        dir: Option<PathBuf>,
        every: Duration,
        deadline: Duration,
        compute: Compute,
    ) -> Source {
        Source {
            dir,
            compute,
            deadline,
            every,
            last_look: None,
            refused: HashSet::new(),
            failing: HashSet::new(),
        }
    }

    /// The newest version of the directory that loads, falling back to older ones; each one
    /// refused is logged with its reason.
    pub fn first(&mut self) -> Result<Version, String> {
        let dir = self.dir.clone().expect("a directory to follow");
        self.last_look = Some(Instant::now());
        let mut newest = None;
        for (_, path) in steps(&dir, self.deadline)? {
            match load(&path, self.deadline, &mut self.compute) {
                Ok(v) => return Ok(v),
                // Not the checkpoint's fault: an older one would meet the same device.
                Err(r) if r.fault == Fault::Device => {
                    return Err(format!("cannot score on this replica's device: {}", r.why))
                }
                Err(r) => {
                    newest.get_or_insert_with(|| r.why.clone());
                    self.refuse(&path, r)
                }
            }
        }
        Err(format!(
            "{} holds no checkpoint that can be served{}",
            dir.display(),
            newest.map_or(String::new(), |why| format!(" (the newest: {why})"))
        ))
    }

    /// The checkpoint at `path` and no other (`--pin`).
    pub fn pinned(&mut self, path: &Path) -> Result<Version, String> {
        load(path, self.deadline, &mut self.compute)
            .map_err(|r| format!("the pinned version cannot be served: {}", r.why))
    }

    /// A committed version newer than `current`, verified and loaded, when the time to look has
    /// come; `None` otherwise. A newer one that fails is refused (logged once) and the current
    /// one goes on serving; one the storage failed to read is tried again at the next look.
    pub fn newer(&mut self, current: u64) -> Option<Version> {
        let dir = self.dir.clone()?;
        if self.last_look.is_some_and(|t| t.elapsed() < self.every) {
            return None;
        }
        self.last_look = Some(Instant::now());
        let listed = match steps(&dir, self.deadline) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("listing versions: {e}; serving step {current} on");
                return None;
            }
        };
        for (step, path) in listed {
            if step <= current {
                return None;
            }
            if self.refused.contains(&identity(&path)) {
                continue;
            }
            match load(&path, self.deadline, &mut self.compute) {
                Ok(v) => return Some(v),
                Err(r) => self.refuse(&path, r),
            }
        }
        None
    }

    fn refuse(&mut self, path: &Path, r: Refusal) {
        if r.fault == Fault::Checkpoint {
            eprintln!(
                "ringlet-serve: refused version {}: {}",
                path.display(),
                r.why
            );
            self.refused.insert(identity(path));
        } else if self.failing.insert(path.to_path_buf()) {
            eprintln!(
                "ringlet-serve: cannot load version {} yet ({}); trying again",
                path.display(),
                r.why
            );
        }
    }
}

/// One line per checkpoint of `dir`, newest first: step, epoch, the model, the recorded metrics
/// and the model file's SHA-256, or why it would be refused (servable meaning: on the CPU).
pub fn list(dir: &Path, deadline: Duration) -> Result<Vec<String>, String> {
    Ok(steps(dir, deadline)?
        .into_iter()
        .map(|(step, path)| {
            let loaded = read(&path, deadline).map(|(snap, digest)| {
                let servable = Scorer::from_snapshot(&snap, &mut Compute::cpu()).err();
                (snap, digest, servable)
            });
            match loaded {
                Ok((snap, digest, servable)) => {
                    let s = &snap.state;
                    let metrics = match &s.metrics {
                        serde_json::Value::Null => String::new(),
                        m => format!(" metrics {m}"),
                    };
                    format!(
                        "step {step} epoch {} model {}{metrics} sha256 {digest}{}",
                        s.epoch,
                        s.model["model"].as_str().unwrap_or("?"),
                        servable
                            .map(|w| format!(" (not servable: {w})"))
                            .unwrap_or_default()
                    )
                }
                Err(r) => format!("step {step} refused: {}", r.why),
            }
        })
        .collect())
}
