//! Model versions: the committed checkpoints of a training run's directory, verified as resume
//! verifies them (manifest, sizes, SHA-256 of every file) before one is served. A version is
//! named by its step and the first 12 hex digits of its model file's SHA-256.

use crate::scorer::Scorer;
use ringlet_ddp::checkpoint::{self, Snapshot};
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

/// Loads and verifies the checkpoint at `path` within `deadline` (storage that hangs is an
/// error) and rebuilds its model.
pub fn load(path: &Path, deadline: Duration) -> Result<Version, String> {
    let snap: Snapshot = checkpoint::load_within(path, deadline).map_err(|e| e.to_string())?;
    let scorer = Scorer::from_snapshot(&snap).map_err(|e| format!("{}: {e}", path.display()))?;
    let digest = checkpoint::model_digest(path).map_err(|e| e.to_string())?;
    Ok(Version {
        step: snap.state.step,
        path: path.to_path_buf(),
        label: format!(
            "step-{}@{}",
            snap.state.step,
            &digest[..12.min(digest.len())]
        ),
        scorer,
    })
}

/// Which version to serve: the newest of a directory, or one pinned.
pub struct Source {
    dir: Option<PathBuf>,
    deadline: Duration,
    every: Duration,
    last_look: Option<Instant>,
    /// Checkpoints refused once (corrupt, or a model that cannot be served): not retried.
    refused: HashSet<PathBuf>,
}

impl Source {
    /// Follows `dir` (a new version is looked for at most every `every`); `None`: pinned.
    pub fn new(dir: Option<PathBuf>, every: Duration, deadline: Duration) -> Source {
        Source {
            dir,
            deadline,
            every,
            last_look: None,
            refused: HashSet::new(),
        }
    }

    /// The newest version of the directory that loads, falling back to older ones; each one
    /// refused is logged with its reason.
    pub fn first(&mut self) -> Result<Version, String> {
        let dir = self.dir.clone().expect("a directory to follow");
        self.last_look = Some(Instant::now());
        let steps = checkpoint::steps(&dir).map_err(|e| e.to_string())?;
        for (_, path) in steps {
            match load(&path, self.deadline) {
                Ok(v) => return Ok(v),
                Err(why) => self.refuse(path, &why),
            }
        }
        Err(format!(
            "{} holds no checkpoint that can be served",
            dir.display()
        ))
    }

    /// A committed version newer than `current`, verified and loaded, when the time to look has
    /// come; `None` otherwise. A newer one that fails is refused (logged once) and the current
    /// one goes on serving.
    pub fn newer(&mut self, current: u64) -> Option<Version> {
        let dir = self.dir.clone()?;
        if self.last_look.is_some_and(|t| t.elapsed() < self.every) {
            return None;
        }
        self.last_look = Some(Instant::now());
        let steps = match checkpoint::steps(&dir) {
            Ok(s) => s,
            Err(e) => {
                tracing::warn!("listing versions: {e}; serving step {current} on");
                return None;
            }
        };
        for (step, path) in steps {
            if step <= current {
                return None;
            }
            if self.refused.contains(&path) {
                continue;
            }
            match load(&path, self.deadline) {
                Ok(v) => return Some(v),
                Err(why) => self.refuse(path, &why),
            }
        }
        None
    }

    fn refuse(&mut self, path: PathBuf, why: &str) {
        eprintln!("ringlet-serve: refused version {}: {why}", path.display());
        self.refused.insert(path);
    }
}

/// One line per checkpoint of `dir`, newest first: step, epoch, the model, the recorded metrics
/// and the model file's SHA-256, or why it would be refused.
pub fn list(dir: &Path, deadline: Duration) -> Result<Vec<String>, String> {
    let steps = checkpoint::steps(dir).map_err(|e| e.to_string())?;
    Ok(steps
        .into_iter()
        .map(|(step, path)| {
            let loaded = checkpoint::load_within(&path, deadline)
                .map_err(|e| e.to_string())
                .and_then(|snap| {
                    let digest = checkpoint::model_digest(&path).map_err(|e| e.to_string())?;
                    let servable = Scorer::from_snapshot(&snap).err();
                    Ok((snap, digest, servable))
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
                Err(why) => format!("step {step} refused: {why}"),
            }
        })
        .collect())
}
