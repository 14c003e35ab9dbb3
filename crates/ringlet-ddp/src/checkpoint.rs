//! Atomic, verified, resumable checkpoints on shared storage.
//!
//! This module owns the on-disk checkpoint format and the protocol for writing and reading it.
//! Every rank of a data-parallel job sees the same directory (NFS, a shared volume); only rank 0
//! writes, every rank reads on resume. Training stalls only for the host-memory [`Snapshot`]
//! the caller builds; [`Checkpointer::save`] writes it on a background thread, at most one in
//! flight.
//!
//! # Layout
//!
//! ```text
//! DIR/step-000000001234/model.safetensors      F32 tensors, in snapshot order
//! DIR/step-000000001234/optimizer.safetensors  F32 tensors, in snapshot order
//! DIR/step-000000001234/manifest.json          {format, state, files: {name: {bytes, sha256}}}
//! ```
//!
//! The safetensors files are plain safetensors (Python's `safetensors` package opens them). Their
//! `__metadata__` carries the tensor order (`ringlet.tensor_order`) because the safetensors
//! header itself is an unordered map.
//!
//! # Why the protocol is safe
//!
//! - **Commit marker.** A checkpoint is written into `DIR/.tmp-step-…-<pid>-<nanos>`; each data
//!   file is fsynced, then `manifest.json` (with the size and SHA-256 of every file) is written
//!   and fsynced, then the temp directory is fsynced, renamed to `step-…` and `DIR` is fsynced.
//!   `rename` of a directory within one file system is atomic, so a reader sees either no
//!   `step-…` directory or one whose files were all durable before the name appeared. A crash
//!   at any earlier point leaves only a `.tmp-*` directory, which readers never look at.
//! - **Verification.** Readers do not trust the rename alone (shared storage and disks do lose
//!   or corrupt data): [`load`] checks the manifest, every file's size and SHA-256 and the
//!   safetensors structure; [`load_latest`] falls back to the next older checkpoint and reports
//!   (and `tracing::warn!`s) every one it skipped, with the reason.
//! - **Re-saving a step** (a restart that saves the same step again): the new checkpoint is
//!   complete in its temp directory first; the old `step-N` is renamed aside to
//!   `step-N.replaced-<pid>-<nanos>`, the new one is renamed into place, and only then is the
//!   aside deleted. Readers accept an aside as a lower-priority candidate for step N, so a
//!   crash between the two renames still leaves step N loadable. The newest save wins because it
//!   reflects what this run actually trained.
//! - **Retention** runs only after the new commit is durable: committed checkpoints (those with a
//!   manifest) other than the newest `keep` steps are deleted, as are uncommitted `step-*`
//!   leftovers older than those. Deletion first renames a directory to `.tmp-del-…`, so readers
//!   never see a half-deleted checkpoint under a `step-…` name.
//! - **Crashed writers' temp directories** (`.tmp-step-*`) are removed by the next successful
//!   save only when nothing in them has been modified for [`STALE_TMP_AGE`]: a live writer keeps
//!   touching its files, and the margin absorbs clock skew between NFS clients and server. Until
//!   then they are ignored. Our own temp directory is never swept because at most one save is in
//!   flight and the sweep runs after it was renamed.
//! - **Exit.** Dropping a [`Checkpointer`] waits for the save in flight, so our own orderly exit
//!   never leaves a half-written temp directory.
//!
//! One writer (one [`Checkpointer`]) per directory is assumed. Readers on different ranks can see
//! different directory listings on NFS (attribute caching) or hit a transient read error and fall
//! back to an older checkpoint, so callers should agree on the step they resume from (for
//! example, rank 0 picks it and the others [`load`] that path).

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use safetensors::tensor::{Metadata, TensorInfo};
use safetensors::{Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// The `format` string of `manifest.json`; readers reject any other.
pub const FORMAT: &str = "ringlet-checkpoint/1";
/// The commit marker, written last.
pub const MANIFEST_FILE: &str = "manifest.json";
/// Model parameters.
pub const MODEL_FILE: &str = "model.safetensors";
/// Optimizer state.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// A `.tmp-step-*` directory untouched for this long belongs to a crashed writer.
pub const STALE_TMP_AGE: Duration = Duration::from_secs(15 * 60);
/// Readers refuse a larger `manifest.json`. Ours are a few KiB (the model config included), so
/// this only stops a tampered or broken one from exhausting memory before it is even parsed.
pub const MAX_MANIFEST_BYTES: u64 = 64 << 20;

const STEP_PREFIX: &str = "step-";
const REPLACED_INFIX: &str = ".replaced-";
const TMP_WRITE_PREFIX: &str = ".tmp-step-";
const TMP_DELETE_PREFIX: &str = ".tmp-del-";
const ORDER_KEY: &str = "ringlet.tensor_order";
/// Same limit the safetensors readers enforce.
const MAX_HEADER_BYTES: usize = 100_000_000;
/// f32s converted and hashed per write call: large enough to amortise syscalls, small enough
/// not to double the snapshot's memory.
const WRITE_CHUNK_FLOATS: usize = 1 << 18;

/// One named f32 tensor.
#[derive(Clone, Debug, PartialEq)]
pub struct Tensor {
    pub name: String,
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
}

/// Everything needed to resume exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct State {
    /// Optimizer steps done.
    pub step: u64,
    pub epoch: u64,
    /// Global sample cursor within the epoch (samples consumed); world-size independent.
    pub cursor: u64,
    /// Data-order / init seed.
    pub seed: u64,
    /// Any extra RNG state words.
    pub rng: Vec<u64>,
    /// Per-rank local batch sizes (the balance vector).
    pub batches: Vec<usize>,
    pub world_size: usize,
    /// Model config (layer sizes, optimizer, ...).
    pub model: serde_json::Value,
    /// The caller's own state that is not a tensor (an optimizer's step counts, say); absent
    /// in checkpoints written before it existed.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub extra: serde_json::Value,
    /// What training measured at this step (`{"train_loss": ...}`), for choosing a version to
    /// serve; absent in checkpoints written before it existed.
    #[serde(default, skip_serializing_if = "serde_json::Value::is_null")]
    pub metrics: serde_json::Value,
    /// With data locality: the local batches the epoch's plan was made from, so that a run
    /// resumed mid-epoch makes the same plan (see `locality`); absent otherwise.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan_batches: Option<Vec<usize>>,
}

/// A checkpoint in memory.
#[derive(Clone, Debug, PartialEq)]
pub struct Snapshot {
    pub state: State,
    pub model: Vec<Tensor>,
    pub optimizer: Vec<Tensor>,
}

/// Checkpoint failures; every message names the path (or step) involved.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("checkpoint retention `keep` must be at least 1, got {keep}")]
    InvalidKeep { keep: usize },
    #[error("invalid snapshot for step {step} ({file}): {reason}")]
    InvalidSnapshot {
        step: u64,
        file: &'static str,
        reason: String,
    },
    #[error("cannot {op} {}: {source}", .path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot rename {} to {}: {source}", .from.display(), .to.display())]
    Rename {
        from: PathBuf,
        to: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("incomplete checkpoint {}: no manifest.json (never committed)", .path.display())]
    Incomplete { path: PathBuf },
    #[error("corrupt checkpoint file {}: {reason}", .path.display())]
    Corrupt { path: PathBuf, reason: String },
    #[error("checkpoint thread for {} panicked", .path.display())]
    WriterPanicked { path: PathBuf },
    #[error("cannot {op} {} within {secs} s (storage hung?)", .path.display())]
    TimedOut {
        op: &'static str,
        path: PathBuf,
        secs: f64,
    },
    #[error("writing checkpoint {} did not finish within {} s (storage hung?)", .path.display(), .secs)]
    WriteTimedOut { path: PathBuf, secs: f64 },
}

type Result<T, E = CheckpointError> = std::result::Result<T, E>;

/// The checkpoint [`load_latest`] found: its directory and contents.
pub type Latest = Option<(PathBuf, Snapshot)>;
/// Entries [`load_latest`] skipped, in the order examined: `(path, reason)`.
pub type Skipped = Vec<(PathBuf, String)>;

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> CheckpointError + 'a {
    move |source| CheckpointError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

fn corrupt(path: &Path, reason: impl Into<String>) -> CheckpointError {
    CheckpointError::Corrupt {
        path: path.to_path_buf(),
        reason: reason.into(),
    }
}

#[derive(Serialize, Deserialize)]
struct Manifest {
    format: String,
    state: State,
    files: BTreeMap<String, FileEntry>,
}

#[derive(Serialize, Deserialize)]
struct FileEntry {
    bytes: u64,
    sha256: String,
}

struct InFlight {
    target: PathBuf,
    handle: JoinHandle<Result<PathBuf>>,
}

impl std::fmt::Debug for InFlight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InFlight")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

/// Writes checkpoints of one directory on a background thread (rank 0 only).
#[derive(Debug)]
pub struct Checkpointer {
    dir: PathBuf,
    keep: usize,
    in_flight: Option<InFlight>,
    /// The longest a save may take before waiting for it gives up (the writer is abandoned).
    deadline: Duration,
}

impl Checkpointer {
    /// Writes go to `dir` (created if missing); keeps the newest `keep` committed checkpoints
    /// (`keep >= 1`).
    pub fn new(dir: impl Into<PathBuf>, keep: usize) -> Result<Checkpointer> {
        if keep == 0 {
            return Err(CheckpointError::InvalidKeep { keep });
        }
        let dir = dir.into();
        fs::create_dir_all(&dir).map_err(io_err("create checkpoint directory", &dir))?;
        Ok(Checkpointer {
            dir,
            keep,
            in_flight: None,
            deadline: ringlet_core::DEFAULT_TIMEOUT,
        })
    }

    /// [`new`](Self::new) with every wait bounded by `deadline`, creating the directory too:
    /// shared storage that hangs is an error naming the directory, not a rank stuck forever.
    pub fn open(dir: impl Into<PathBuf>, keep: usize, deadline: Duration) -> Result<Checkpointer> {
        let dir = dir.into();
        let owned = dir.clone();
        within(&dir, deadline, "create checkpoint directory", move || {
            Checkpointer::new(owned, keep)
        })
        .map(|c| c.with_deadline(deadline))
    }

    /// Bounds every wait for a save (default: Ringlet's default collective timeout).
    pub fn with_deadline(mut self, deadline: Duration) -> Checkpointer {
        self.deadline = deadline;
        self
    }

    /// Starts writing `snap` on a background thread and returns at once, after waiting for the
    /// previous save if one is still in flight (at most one in flight). Returns the time spent
    /// waiting.
    ///
    /// An invalid snapshot (shape/data mismatch, duplicate or reserved tensor name) is rejected
    /// here, before waiting. If the *previous* save failed, `snap` is still started (a transient
    /// storage error should not stop the next checkpoint) and the previous error is returned.
    pub fn save(&mut self, snap: Snapshot) -> Result<Duration> {
        validate_snapshot(&snap)?;
        let start = Instant::now();
        let previous = self.wait();
        let waited = start.elapsed();
        // A writer still stuck on the storage: starting another beside it would break the one
        // writer per directory the format relies on.
        if let Err(e @ CheckpointError::WriteTimedOut { .. }) = previous {
            return Err(e);
        }

        let target = self.dir.join(step_dir_name(snap.state.step));
        let (dir, keep) = (self.dir.clone(), self.keep);
        let spawned = std::thread::Builder::new()
            .name(format!("ringlet-ckpt-{}", snap.state.step))
            .spawn(move || write_checkpoint(&dir, keep, &snap));
        match spawned {
            Ok(handle) => self.in_flight = Some(InFlight { target, handle }),
            Err(source) => {
                if let Err(e) = previous {
                    tracing::error!("previous checkpoint save failed: {e}");
                }
                return Err(CheckpointError::Io {
                    op: "start the writer thread for",
                    path: target,
                    source,
                });
            }
        }
        previous?;
        Ok(waited)
    }

    /// Waits for the save in flight (if any); returns its result (the committed path).
    pub fn wait(&mut self) -> Result<Option<PathBuf>> {
        let Some(InFlight { target, handle }) = self.in_flight.take() else {
            return Ok(None);
        };
        let until = Instant::now() + self.deadline;
        while !handle.is_finished() {
            if Instant::now() >= until {
                let secs = self.deadline.as_secs_f64();
                let path = target.clone();
                // Kept: the writer may still finish, and no second one may start beside it.
                self.in_flight = Some(InFlight { target, handle });
                return Err(CheckpointError::WriteTimedOut { path, secs });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        match handle.join() {
            Ok(result) => result.map(Some),
            Err(_) => Err(CheckpointError::WriterPanicked { path: target }),
        }
    }
}

impl Drop for Checkpointer {
    fn drop(&mut self) {
        // Waiting here is what keeps an orderly exit from abandoning a half-written temp dir.
        if let Err(e) = self.wait() {
            tracing::error!("checkpoint save failed: {e}");
        }
    }
}

/// The newest checkpoint under `dir` whose manifest exists and whose checksums verify.
///
/// Corrupt or incomplete ones are skipped with a `tracing::warn!` naming them and are also
/// returned as `(path, reason)`: first `step-*` names that are not checkpoint names, then the
/// checkpoints tried, newest first. A missing `dir` means no checkpoint. Only
/// listing `dir` itself can fail; any problem with one checkpoint (including an I/O error) makes
/// it skipped.
pub fn load_latest(dir: &Path) -> Result<(Latest, Skipped)> {
    let (candidates, mut skipped) = match list_candidates(dir) {
        Ok(found) => found,
        Err(CheckpointError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Ok((None, Vec::new()));
        }
        Err(e) => return Err(e),
    };
    for (path, reason) in &skipped {
        tracing::warn!(path = %path.display(), "skipping checkpoint: {reason}");
    }
    for candidate in candidates {
        match load(&candidate.path) {
            Ok(snap) => return Ok((Some((candidate.path, snap)), skipped)),
            Err(e) => {
                let reason = e.to_string();
                tracing::warn!(path = %candidate.path.display(), "skipping checkpoint: {reason}");
                skipped.push((candidate.path, reason));
            }
        }
    }
    Ok((None, skipped))
}

/// Loads and verifies one checkpoint directory; any problem is an error naming the file.
///
/// The directory and every file in it are untrusted (anyone who can write the shared directory
/// can tamper with them): only regular files directly inside `path` are opened, no read goes
/// past the size the manifest declares (nor [`MAX_MANIFEST_BYTES`] for the manifest), and every
/// number taken from the manifest or a safetensors header is checked before it sizes or
/// indexes anything.
pub fn load(path: &Path) -> Result<Snapshot> {
    // `symlink_metadata`: a symlinked step directory is refused rather than followed, because
    // following it would let a `step-*` entry in the shared directory point the files that
    // "lie inside the checkpoint" anywhere on the machine. Parent components (the configured
    // checkpoint directory itself) may still be symlinks; those are the operator's choice.
    // Rebuilt from its components to drop a trailing slash, with which lstat follows the link.
    let meta = fs::symlink_metadata(path.components().collect::<PathBuf>())
        .map_err(io_err("open checkpoint directory", path))?;
    if meta.file_type().is_symlink() {
        return Err(corrupt(
            path,
            "is a symbolic link, not a checkpoint directory (load the directory it points to)",
        ));
    }
    if !meta.is_dir() {
        return Err(corrupt(path, "not a directory"));
    }
    let manifest_path = path.join(MANIFEST_FILE);
    let file = match open_regular(&manifest_path) {
        Ok(file) => file,
        Err(CheckpointError::Io { source, .. }) if source.kind() == io::ErrorKind::NotFound => {
            return Err(CheckpointError::Incomplete {
                path: path.to_path_buf(),
            });
        }
        Err(e) => return Err(e),
    };
    let len = file
        .metadata()
        .map_err(io_err("stat", &manifest_path))?
        .len();
    if len > MAX_MANIFEST_BYTES {
        return Err(corrupt(
            &manifest_path,
            format!("manifest is {len} bytes, more than the {MAX_MANIFEST_BYTES} allowed"),
        ));
    }
    let raw = read_capped(file, &manifest_path, MAX_MANIFEST_BYTES).map_err(|e| match e {
        ReadCapped::Io(e) => e,
        ReadCapped::Over => corrupt(
            &manifest_path,
            format!("manifest grew past the {MAX_MANIFEST_BYTES} bytes allowed while reading"),
        ),
    })?;
    let manifest: Manifest = serde_json::from_slice(&raw)
        .map_err(|e| corrupt(&manifest_path, format!("unreadable manifest: {e}")))?;
    if manifest.format != FORMAT {
        return Err(corrupt(
            &manifest_path,
            format!("format is {:?}, expected {FORMAT:?}", manifest.format),
        ));
    }
    if let Some(problem) = state_problem(&manifest.state) {
        return Err(corrupt(&manifest_path, problem));
    }
    if let Some(name) = path.file_name().and_then(|n| n.to_str()) {
        if let Some((step, _)) = parse_step_name(name) {
            if step != manifest.state.step {
                return Err(corrupt(
                    &manifest_path,
                    format!(
                        "records step {} but the directory is step {step}",
                        manifest.state.step
                    ),
                ));
            }
        }
    }
    for required in [MODEL_FILE, OPTIMIZER_FILE] {
        if !manifest.files.contains_key(required) {
            return Err(corrupt(&manifest_path, format!("does not list {required}")));
        }
    }
    // Everything listed is held in memory (the data files one at a time, but their tensors all
    // together), so a total no machine here could hold is refused before any read: a sparse
    // file declared at its (true) 1 TB size would otherwise be read until the OOM killer ends
    // the job, long after `load_within` gave up on it.
    let total = manifest
        .files
        .values()
        .try_fold(0u64, |acc, e| acc.checked_add(e.bytes))
        .ok_or_else(|| corrupt(&manifest_path, "file sizes overflow when summed"))?;
    if let Some(memory) = physical_memory().filter(|&m| total > m) {
        return Err(corrupt(
            &manifest_path,
            format!(
                "lists {total} bytes of files, more than this machine's {memory} bytes of memory"
            ),
        ));
    }

    let mut model = None;
    let mut optimizer = None;
    for (name, entry) in &manifest.files {
        if !is_plain_file_name(name) {
            return Err(corrupt(
                &manifest_path,
                format!("lists {name:?}, which is not a plain file name"),
            ));
        }
        let file_path = path.join(name);
        let bytes = read_verified(&file_path, entry)?;
        match name.as_str() {
            MODEL_FILE => model = Some(parse_safetensors(&file_path, &bytes)?),
            OPTIMIZER_FILE => optimizer = Some(parse_safetensors(&file_path, &bytes)?),
            // Verified but not interpreted: room for later format additions.
            _ => {}
        }
    }
    match (model, optimizer) {
        (Some(model), Some(optimizer)) => Ok(Snapshot {
            state: manifest.state,
            model,
            optimizer,
        }),
        _ => Err(corrupt(&manifest_path, "model or optimizer file missing")),
    }
}

/// [`load`], bounded by `deadline`: storage that hangs (a dead NFS server) is an error naming
/// the checkpoint, not a rank stuck forever. The read goes on in a thread that is abandoned.
pub fn load_within(path: &Path, deadline: Duration) -> Result<Snapshot> {
    let owned = path.to_path_buf();
    within(path, deadline, "load checkpoint", move || load(&owned))
}

/// [`load_latest`], bounded by `deadline` as [`load_within`] is.
pub fn load_latest_within(dir: &Path, deadline: Duration) -> Result<(Latest, Skipped)> {
    let owned = dir.to_path_buf();
    within(dir, deadline, "look for checkpoints in", move || {
        load_latest(&owned)
    })
}

/// Runs `work` on its own thread and waits at most `deadline` for it.
pub fn within<T: Send + 'static>(
    path: &Path,
    deadline: Duration,
    op: &'static str,
    work: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::Builder::new()
        .name("ringlet-ckpt-read".into())
        .spawn(move || {
            let _ = tx.send(work());
        })
        .map_err(io_err("start a reader thread for", path))?;
    match rx.recv_timeout(deadline) {
        Ok(result) => result,
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => Err(CheckpointError::TimedOut {
            op,
            path: path.to_path_buf(),
            secs: deadline.as_secs_f64(),
        }),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            Err(CheckpointError::WriterPanicked {
                path: path.to_path_buf(),
            })
        }
    }
}

fn step_dir_name(step: u64) -> String {
    format!("{STEP_PREFIX}{step:012}")
}

/// The checkpoints of `dir` by name (`step-<number>` directories, asides left out), newest first:
/// what [`load`] may be asked for. Nothing is verified here.
pub fn steps(dir: &Path) -> Result<Vec<(u64, PathBuf)>> {
    let (candidates, _) = list_candidates(dir)?;
    Ok(candidates
        .into_iter()
        .filter(|c| !c.replaced)
        .map(|c| (c.step, c.path))
        .collect())
}

/// The SHA-256 (hex) of the model file that the manifest of checkpoint `path` records: a
/// version's identity. Call it after [`load`] verified the files against the manifest.
pub fn model_digest(path: &Path) -> Result<String> {
    let manifest_path = path.join(MANIFEST_FILE);
    let file = open_regular(&manifest_path)?;
    let raw = read_capped(file, &manifest_path, MAX_MANIFEST_BYTES).map_err(|e| match e {
        ReadCapped::Io(e) => e,
        ReadCapped::Over => corrupt(&manifest_path, "manifest over its size limit"),
    })?;
    let manifest: Manifest = serde_json::from_slice(&raw)
        .map_err(|e| corrupt(&manifest_path, format!("unreadable manifest: {e}")))?;
    manifest
        .files
        .get(MODEL_FILE)
        .map(|e| e.sha256.clone())
        .ok_or_else(|| corrupt(&manifest_path, format!("does not list {MODEL_FILE}")))
}

/// `step-<digits>` (primary) or `step-<digits>.replaced-…` (an aside kept during a re-save).
fn parse_step_name(name: &str) -> Option<(u64, bool)> {
    let rest = name.strip_prefix(STEP_PREFIX)?;
    let digits_end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    let (digits, suffix) = rest.split_at(digits_end);
    if digits.is_empty() {
        return None;
    }
    let step = digits.parse().ok()?;
    if suffix.is_empty() {
        Some((step, false))
    } else if suffix.starts_with(REPLACED_INFIX) {
        Some((step, true))
    } else {
        None
    }
}

fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\\')
        && !name.contains('\0')
}

struct Candidate {
    path: PathBuf,
    step: u64,
    replaced: bool,
}

/// `step-*` entries of `dir`, newest first (a primary before its asides); names that start with
/// `step-` but are not checkpoints come back as skipped.
fn list_candidates(dir: &Path) -> Result<(Vec<Candidate>, Skipped)> {
    let mut candidates = Vec::new();
    let mut skipped = Vec::new();
    let entries = fs::read_dir(dir).map_err(io_err("list checkpoint directory", dir))?;
    for entry in entries {
        let entry = entry.map_err(io_err("list checkpoint directory", dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if !name.starts_with(STEP_PREFIX) {
            continue;
        }
        let path = entry.path();
        match parse_step_name(name) {
            Some((step, replaced)) => candidates.push(Candidate {
                path,
                step,
                replaced,
            }),
            None => skipped.push((path, "name is not step-<number>".to_string())),
        }
    }
    candidates.sort_by(|a, b| {
        b.step
            .cmp(&a.step)
            .then(a.replaced.cmp(&b.replaced))
            .then(b.path.cmp(&a.path))
    });
    Ok((candidates, skipped))
}

/// Opens `path` for reading only if it is a regular file, never following a symlink in its last
/// component: a FIFO would block the open (and the read) forever, a device such as `/dev/zero`
/// never ends, and a symlink could lead out of the checkpoint directory.
fn open_regular(path: &Path) -> Result<File> {
    let not_regular = |kind: &str| {
        corrupt(
            path,
            format!("not a regular file ({kind}); refusing to open it"),
        )
    };
    let meta = fs::symlink_metadata(path).map_err(io_err("open", path))?;
    if !meta.file_type().is_file() {
        return Err(not_regular(file_kind(meta.file_type())));
    }
    // The entry can be swapped between the check above and the open: O_NOFOLLOW makes a symlink
    // fail the open, O_NONBLOCK keeps a FIFO's open from waiting for a writer (it has no effect
    // on reads of a regular file, the only kind read below), and the fstat catches the rest.
    let file = File::options()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) => not_regular("a symbolic link"),
            _ => io_err("open", path)(e),
        })?;
    let opened = file.metadata().map_err(io_err("stat", path))?;
    if !opened.file_type().is_file() {
        return Err(not_regular(file_kind(opened.file_type())));
    }
    Ok(file)
}

fn file_kind(t: fs::FileType) -> &'static str {
    if t.is_symlink() {
        "a symbolic link"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_socket() {
        "a socket"
    } else {
        "of an unknown kind"
    }
}

enum ReadCapped {
    Io(CheckpointError),
    /// More than the limit arrived.
    Over,
}

/// All of `reader`, but never more than `limit + 1` bytes read (the one extra byte is how a
/// source longer than `limit` is told apart). The buffer grows with the bytes that actually
/// arrive, so a large `limit` costs nothing until the data is there.
fn read_capped(reader: impl Read, path: &Path, limit: u64) -> Result<Vec<u8>, ReadCapped> {
    let mut bytes = Vec::new();
    // `read_to_end` reserves fallibly: an allocation failure is an error, not an abort.
    reader
        .take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| ReadCapped::Io(io_err("read", path)(e)))?;
    if u64::try_from(bytes.len()).map_or(true, |n| n > limit) {
        return Err(ReadCapped::Over);
    }
    Ok(bytes)
}

/// Total physical memory, if the system says (what a read, or a model, can be held to).
pub fn physical_memory() -> Option<u64> {
    // SAFETY: sysconf only reads its integer argument and has no memory-safety preconditions.
    let (pages, page_size) = unsafe {
        (
            libc::sysconf(libc::_SC_PHYS_PAGES),
            libc::sysconf(libc::_SC_PAGESIZE),
        )
    };
    let pages = u64::try_from(pages).ok()?;
    let page_size = u64::try_from(page_size).ok()?;
    pages.checked_mul(page_size)
}

fn read_verified(path: &Path, entry: &FileEntry) -> Result<Vec<u8>> {
    if usize::try_from(entry.bytes).is_err() {
        return Err(corrupt(
            path,
            format!(
                "manifest says {} bytes, more than this platform can address",
                entry.bytes
            ),
        ));
    }
    let file = open_regular(path)?;
    let len = file.metadata().map_err(io_err("stat", path))?.len();
    if len != entry.bytes {
        return Err(corrupt(
            path,
            format!("size is {len} bytes, manifest says {}", entry.bytes),
        ));
    }
    let bytes = read_capped(file, path, entry.bytes).map_err(|e| match e {
        ReadCapped::Io(e) => e,
        ReadCapped::Over => corrupt(
            path,
            format!(
                "more than the {} bytes the manifest says arrived (file grew while reading?)",
                entry.bytes
            ),
        ),
    })?;
    if bytes.len() as u64 != entry.bytes {
        return Err(corrupt(
            path,
            format!(
                "read {} bytes, manifest says {} (file changed while reading?)",
                bytes.len(),
                entry.bytes
            ),
        ));
    }
    let actual = format!("{:x}", Sha256::digest(&bytes));
    if !actual.eq_ignore_ascii_case(&entry.sha256) {
        return Err(corrupt(
            path,
            format!(
                "SHA-256 checksum mismatch: manifest says {}, file hashes to {actual}",
                entry.sha256
            ),
        ));
    }
    Ok(bytes)
}

fn parse_safetensors(path: &Path, bytes: &[u8]) -> Result<Vec<Tensor>> {
    let (header_len, metadata) = SafeTensors::read_metadata(bytes)
        .map_err(|e| corrupt(path, format!("not a valid safetensors file: {e}")))?;
    let data = bytes
        .get(8 + header_len..)
        .ok_or_else(|| corrupt(path, "safetensors data section missing"))?;

    let by_offset = metadata.offset_keys();
    let order = match metadata.metadata().as_ref().and_then(|m| m.get(ORDER_KEY)) {
        Some(order) => {
            let order: Vec<String> = serde_json::from_str(order)
                .map_err(|e| corrupt(path, format!("bad {ORDER_KEY} metadata: {e}")))?;
            let listed: HashSet<&str> = order.iter().map(String::as_str).collect();
            if listed.len() != order.len()
                || order.len() != by_offset.len()
                || by_offset.iter().any(|n| !listed.contains(n.as_str()))
            {
                return Err(corrupt(
                    path,
                    format!("{ORDER_KEY} metadata does not match the tensors in the file"),
                ));
            }
            order
        }
        // Not written by us: fall back to file order.
        None => by_offset,
    };

    let mut tensors = Vec::with_capacity(order.len());
    for name in order {
        let info = metadata
            .info(&name)
            .ok_or_else(|| corrupt(path, format!("tensor {name:?} missing from header")))?;
        if info.dtype != Dtype::F32 {
            return Err(corrupt(
                path,
                format!("tensor {name:?} has dtype {:?}, expected F32", info.dtype),
            ));
        }
        let (start, end) = info.data_offsets;
        let raw = data
            .get(start..end)
            .ok_or_else(|| corrupt(path, format!("tensor {name:?} lies outside the file")))?;
        let values = f32_values(path, &name, &info.shape, raw)?;
        tensors.push(Tensor {
            name,
            shape: info.shape.clone(),
            data: values,
        });
    }
    Ok(tensors)
}

/// The values of one F32 tensor, refused unless `shape` accounts for exactly the bytes of `raw`.
/// The safetensors parser checks this too; it is repeated here because a mismatch would
/// otherwise surface as an out-of-bounds index far from the checkpoint that caused it.
fn f32_values(path: &Path, name: &str, shape: &[usize], raw: &[u8]) -> Result<Vec<f32>> {
    let words = raw.chunks_exact(4);
    if !words.remainder().is_empty() {
        return Err(corrupt(
            path,
            format!(
                "tensor {name:?} spans {} bytes, not a multiple of 4 (F32)",
                raw.len()
            ),
        ));
    }
    let needed = shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .and_then(|n| n.checked_mul(4))
        .ok_or_else(|| corrupt(path, format!("tensor {name:?}: shape {shape:?} overflows")))?;
    if needed != raw.len() {
        return Err(corrupt(
            path,
            format!(
                "tensor {name:?}: shape {shape:?} needs {needed} bytes, its data spans {}",
                raw.len()
            ),
        ));
    }
    Ok(words
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect())
}

/// Why `state` cannot be resumed from, if it cannot. The per-rank batches index and sum in the
/// sampler and balancer, so a vector that does not fit its world size, or whose sum wraps,
/// must not get that far.
fn state_problem(state: &State) -> Option<String> {
    if state.world_size == 0 {
        return Some("records a world size of 0".into());
    }
    if state.batches.len() != state.world_size {
        return Some(format!(
            "records {} per-rank batch sizes for a world size of {}",
            state.batches.len(),
            state.world_size
        ));
    }
    if state
        .batches
        .iter()
        .try_fold(0usize, |acc, &b| acc.checked_add(b))
        .is_none()
    {
        return Some("per-rank batch sizes overflow when summed".into());
    }
    if let Some(p) = &state.plan_batches {
        if p.len() != state.world_size
            || p.iter()
                .try_fold(0usize, |a, &b| a.checked_add(b))
                .is_none()
        {
            return Some(format!(
                "records {} plan batch sizes (or a sum that overflows) for a world size of {}",
                p.len(),
                state.world_size
            ));
        }
    }
    None
}

fn validate_snapshot(snap: &Snapshot) -> Result<()> {
    // A checkpoint that readers would refuse must not be written in the first place.
    if let Some(reason) = state_problem(&snap.state) {
        return Err(CheckpointError::InvalidSnapshot {
            step: snap.state.step,
            file: MANIFEST_FILE,
            reason,
        });
    }
    validate_tensors(snap.state.step, MODEL_FILE, &snap.model)?;
    validate_tensors(snap.state.step, OPTIMIZER_FILE, &snap.optimizer)
}

fn validate_tensors(step: u64, file: &'static str, tensors: &[Tensor]) -> Result<()> {
    let invalid = |reason: String| CheckpointError::InvalidSnapshot { step, file, reason };
    let mut seen = HashSet::new();
    for t in tensors {
        if t.name == "__metadata__" {
            return Err(invalid(
                "tensor name \"__metadata__\" is reserved by safetensors".into(),
            ));
        }
        if !seen.insert(t.name.as_str()) {
            return Err(invalid(format!("duplicate tensor name {:?}", t.name)));
        }
        let elements = t
            .shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .and_then(|n| n.checked_mul(4).map(|_| n))
            .ok_or_else(|| invalid(format!("tensor {:?}: shape overflows", t.name)))?;
        if elements != t.data.len() {
            return Err(invalid(format!(
                "tensor {:?}: shape {:?} needs {elements} values, data has {}",
                t.name,
                t.shape,
                t.data.len()
            )));
        }
    }
    Ok(())
}

/// The whole write-and-commit of one checkpoint (runs on the writer thread).
fn write_checkpoint(dir: &Path, keep: usize, snap: &Snapshot) -> Result<PathBuf> {
    let started = Instant::now();
    // Someone may have removed the directory since `new`; recreating it is harmless.
    fs::create_dir_all(dir).map_err(io_err("create checkpoint directory", dir))?;
    let name = step_dir_name(snap.state.step);
    let final_path = dir.join(&name);
    let tmp = dir.join(format!(
        ".tmp-{name}-{}-{}",
        std::process::id(),
        unique_nanos()
    ));
    fs::create_dir(&tmp).map_err(io_err("create temp directory", &tmp))?;

    let bytes = match write_and_commit(dir, &tmp, &final_path, snap) {
        Ok(bytes) => bytes,
        Err(e) => {
            // Best effort: our own failure should not leave debris for the stale sweep.
            if fs::symlink_metadata(&tmp).is_ok() {
                if let Err(rm) = fs::remove_dir_all(&tmp) {
                    tracing::warn!(path = %tmp.display(), "cannot remove temp directory: {rm}");
                }
            }
            return Err(e);
        }
    };
    tracing::info!(
        path = %final_path.display(),
        step = snap.state.step,
        bytes,
        secs = started.elapsed().as_secs_f64(),
        "checkpoint committed"
    );
    prune(dir, keep, &final_path);
    Ok(final_path)
}

/// Writes the files into `tmp`, then commits `tmp` as `final_path`. Returns bytes written.
fn write_and_commit(dir: &Path, tmp: &Path, final_path: &Path, snap: &Snapshot) -> Result<u64> {
    let step = snap.state.step;
    let mut files = BTreeMap::new();
    for (file, tensors) in [(MODEL_FILE, &snap.model), (OPTIMIZER_FILE, &snap.optimizer)] {
        let entry = write_safetensors(&tmp.join(file), step, file, tensors)?;
        files.insert(file.to_string(), entry);
    }
    let total = files.values().map(|e| e.bytes).sum();
    let manifest = Manifest {
        format: FORMAT.to_string(),
        state: snap.state.clone(),
        files,
    };
    let json =
        serde_json::to_vec_pretty(&manifest).map_err(|e| CheckpointError::InvalidSnapshot {
            step,
            file: MANIFEST_FILE,
            reason: e.to_string(),
        })?;
    let manifest_path = tmp.join(MANIFEST_FILE);
    let mut out = File::create_new(&manifest_path).map_err(io_err("create", &manifest_path))?;
    out.write_all(&json)
        .map_err(io_err("write", &manifest_path))?;
    out.sync_all().map_err(io_err("fsync", &manifest_path))?;
    drop(out);
    // The directory entries of the three files must be durable before the rename publishes them.
    fsync_dir(tmp)?;
    install(dir, tmp, final_path)?;
    Ok(total)
}

/// Streams `tensors` as a safetensors file, hashing exactly the bytes written, and fsyncs it.
fn write_safetensors(
    path: &Path,
    step: u64,
    file_name: &'static str,
    tensors: &[Tensor],
) -> Result<FileEntry> {
    let invalid = |reason: String| CheckpointError::InvalidSnapshot {
        step,
        file: file_name,
        reason,
    };
    let mut infos = Vec::with_capacity(tensors.len());
    let mut offset = 0usize;
    for t in tensors {
        let end = t
            .data
            .len()
            .checked_mul(4)
            .and_then(|n| offset.checked_add(n))
            .ok_or_else(|| invalid("total size overflows".into()))?;
        infos.push((
            t.name.clone(),
            TensorInfo {
                dtype: Dtype::F32,
                shape: t.shape.clone(),
                data_offsets: (offset, end),
            },
        ));
        offset = end;
    }
    let order: Vec<&str> = tensors.iter().map(|t| t.name.as_str()).collect();
    let order = serde_json::to_string(&order).map_err(|e| invalid(e.to_string()))?;
    let metadata = Metadata::new(Some([(ORDER_KEY.to_string(), order)].into()), infos)
        .map_err(|e| invalid(e.to_string()))?;
    let mut header = serde_json::to_vec(&metadata).map_err(|e| invalid(e.to_string()))?;
    // The safetensors spec pads the header with spaces to 8-byte alignment.
    header.resize(header.len().next_multiple_of(8), b' ');
    if header.len() > MAX_HEADER_BYTES {
        return Err(invalid(format!(
            "safetensors header is {} bytes, limit {MAX_HEADER_BYTES}",
            header.len()
        )));
    }

    let mut file = File::create_new(path).map_err(io_err("create", path))?;
    let mut hasher = Sha256::new();
    let mut bytes = 0u64;
    let mut put = |chunk: &[u8]| -> Result<()> {
        hasher.update(chunk);
        bytes += chunk.len() as u64;
        file.write_all(chunk).map_err(io_err("write", path))
    };
    put(&(header.len() as u64).to_le_bytes())?;
    put(&header)?;
    let mut buf = Vec::with_capacity(WRITE_CHUNK_FLOATS * 4);
    for t in tensors {
        for chunk in t.data.chunks(WRITE_CHUNK_FLOATS) {
            buf.clear();
            for x in chunk {
                buf.extend_from_slice(&x.to_le_bytes());
            }
            put(&buf)?;
        }
    }
    file.sync_all().map_err(io_err("fsync", path))?;
    Ok(FileEntry {
        bytes,
        sha256: format!("{:x}", hasher.finalize()),
    })
}

/// Publishes the complete `tmp` as `final_path`, replacing an existing one without ever leaving
/// step N without a loadable directory (see the module docs).
fn install(dir: &Path, tmp: &Path, final_path: &Path) -> Result<()> {
    let rename = |from: &Path, to: &Path| {
        fs::rename(from, to).map_err(|source| CheckpointError::Rename {
            from: from.to_path_buf(),
            to: to.to_path_buf(),
            source,
        })
    };
    match fs::symlink_metadata(final_path) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            rename(tmp, final_path)?;
            fsync_dir(dir)
        }
        Err(e) => Err(io_err("stat", final_path)(e)),
        Ok(_) => {
            let mut aside = final_path.as_os_str().to_owned();
            aside.push(format!(
                "{REPLACED_INFIX}{}-{}",
                std::process::id(),
                unique_nanos()
            ));
            let aside = PathBuf::from(aside);
            tracing::info!(path = %final_path.display(), "replacing existing checkpoint of the same step");
            rename(final_path, &aside)?;
            // The aside must be durable before the new directory takes the name.
            fsync_dir(dir)?;
            if let Err(e) = rename(tmp, final_path) {
                if let Err(back) = fs::rename(&aside, final_path) {
                    tracing::warn!(path = %aside.display(), "cannot restore replaced checkpoint: {back}");
                }
                return Err(e);
            }
            fsync_dir(dir)?;
            discard(dir, &aside);
            Ok(())
        }
    }
}

/// fsync a directory so renames and new entries in it survive a crash.
fn fsync_dir(path: &Path) -> Result<()> {
    let dir = File::open(path).map_err(io_err("open directory", path))?;
    match dir.sync_all() {
        Ok(()) => Ok(()),
        // Some file systems refuse fsync on a directory (EINVAL/ENOTSUP); there the metadata
        // durability is the file system's business and failing every save would help nobody.
        Err(e)
            if matches!(
                e.kind(),
                io::ErrorKind::InvalidInput | io::ErrorKind::Unsupported
            ) =>
        {
            tracing::debug!(path = %path.display(), "directory fsync not supported: {e}");
            Ok(())
        }
        Err(e) => Err(io_err("fsync directory", path)(e)),
    }
}

fn unique_nanos() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

/// Removes a checkpoint-like directory so that readers never see it half-deleted: first renamed
/// out of the `step-*` namespace, then deleted. Best effort (the commit already succeeded).
fn discard(dir: &Path, path: &Path) {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let trash = dir.join(format!(
        "{TMP_DELETE_PREFIX}{name}-{}-{}",
        std::process::id(),
        unique_nanos()
    ));
    if let Err(e) = fs::rename(path, &trash) {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), "cannot remove old checkpoint: {e}");
        }
        return;
    }
    remove_tree(&trash);
}

fn remove_tree(path: &Path) {
    let result = match fs::symlink_metadata(path) {
        Ok(m) if m.is_dir() => fs::remove_dir_all(path),
        Ok(_) => fs::remove_file(path),
        Err(e) => Err(e),
    };
    if let Err(e) = result {
        if e.kind() != io::ErrorKind::NotFound {
            tracing::warn!(path = %path.display(), "cannot remove: {e}");
        }
    }
}

/// Retention and cleanup after a commit; never touches `just_committed`. Failures only warn.
fn prune(dir: &Path, keep: usize, just_committed: &Path) {
    let candidates = match list_candidates(dir) {
        Ok((candidates, _)) => candidates,
        Err(e) => {
            tracing::warn!("skipping checkpoint retention: {e}");
            return;
        }
    };
    let committed = |c: &Candidate| c.path.join(MANIFEST_FILE).is_file();
    let mut committed_steps: Vec<u64> = Vec::new();
    let mut primary_committed: HashSet<u64> = HashSet::new();
    for c in &candidates {
        if committed(c) {
            // `candidates` is sorted newest first, so this stays sorted and deduplicated.
            if committed_steps.last() != Some(&c.step) {
                committed_steps.push(c.step);
            }
            if !c.replaced {
                primary_committed.insert(c.step);
            }
        }
    }
    let cutoff = committed_steps.get(keep - 1).copied();
    for c in &candidates {
        if c.path == just_committed {
            continue;
        }
        let too_old = cutoff.is_some_and(|cutoff| c.step < cutoff);
        let superseded = c.replaced && primary_committed.contains(&c.step);
        if too_old || superseded {
            tracing::debug!(path = %c.path.display(), "removing old checkpoint");
            discard(dir, &c.path);
        }
    }
    sweep_temp_dirs(dir);
}

/// Deletes decommitted `.tmp-del-*` leftovers and `.tmp-step-*` directories of crashed writers.
fn sweep_temp_dirs(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let path = entry.path();
        if name.starts_with(TMP_DELETE_PREFIX) {
            remove_tree(&path);
        } else if name.starts_with(TMP_WRITE_PREFIX)
            && idle_for(&path).is_some_and(|idle| idle >= STALE_TMP_AGE)
        {
            tracing::warn!(path = %path.display(), "removing temp directory of a crashed checkpoint writer");
            remove_tree(&path);
        }
    }
}

/// Time since anything in `path` (the directory or a direct entry) was modified; `None` when
/// unknown or in the future (clock skew), which callers treat as "still active".
fn idle_for(path: &Path) -> Option<Duration> {
    let mut newest = fs::symlink_metadata(path).ok()?.modified().ok()?;
    for entry in fs::read_dir(path).ok()? {
        let modified = entry.ok()?.metadata().ok()?.modified().ok()?;
        newest = newest.max(modified);
    }
    SystemTime::now().duration_since(newest).ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    const CHILD_ENV: &str = "RINGLET_CKPT_CHILD";
    const CHILD_TEST: &str = "checkpoint::tests::kill_child_writer_process";

    /// A unique directory under the system temp dir, removed on drop.
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> TempDir {
            let path = std::env::temp_dir().join(format!(
                "ringlet-ckpt-test-{}-{tag}-{}",
                std::process::id(),
                unique_nanos()
            ));
            fs::create_dir_all(&path).unwrap();
            TempDir(path)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    fn tensor(name: &str, shape: &[usize], seed: f32) -> Tensor {
        let n: usize = shape.iter().product();
        Tensor {
            name: name.to_string(),
            shape: shape.to_vec(),
            data: (0..n).map(|i| seed + i as f32 * 0.25 - 1.0).collect(),
        }
    }

    fn snapshot(step: u64) -> Snapshot {
        let s = step as f32;
        Snapshot {
            state: State {
                step,
                epoch: step / 3,
                cursor: step * 96 + 7,
                seed: 0x5eed_0000_0000_0001,
                rng: vec![u64::MAX, step, 0xdead_beef],
                batches: vec![32, 48, 16],
                world_size: 3,
                model: serde_json::json!({
                    "layers": [64, 32, 10],
                    "optimizer": {"kind": "adam", "lr": 0.001, "betas": [0.9, 0.999]},
                }),
                extra: serde_json::json!({"scalars": {"conv.weight.time": {"uint": 7}}}),
                metrics: serde_json::json!({"train_loss": 0.25}),
                plan_batches: None,
            },
            // Deliberately not in name order: the order must survive the round trip.
            model: vec![
                tensor("layers.1.weight", &[10, 32], s),
                tensor("layers.0.weight", &[32, 64], s + 1.0),
                tensor("layers.0.bias", &[32], s + 2.0),
                tensor("empty.b", &[0, 3], s),
                tensor("empty.a", &[0], s),
                tensor("scalar", &[], s),
            ],
            optimizer: vec![
                tensor("m.layers.1.weight", &[10, 32], -s),
                tensor("v.layers.1.weight", &[10, 32], s * 0.5),
            ],
        }
    }

    fn special_snapshot() -> Snapshot {
        let mut snap = snapshot(7);
        snap.model.push(Tensor {
            name: "special".into(),
            shape: vec![2, 4],
            data: vec![
                0.0,
                -0.0,
                f32::MIN_POSITIVE / 2.0,
                f32::INFINITY,
                f32::NEG_INFINITY,
                f32::from_bits(0x7fc0_1234),
                f32::MAX,
                -1.5e-30,
            ],
        });
        snap
    }

    /// Bitwise equality (plain `==` fails on NaN payloads and cannot tell 0.0 from -0.0).
    fn assert_bit_equal(a: &Snapshot, b: &Snapshot) {
        assert_eq!(a.state, b.state);
        for (x, y) in [(&a.model, &b.model), (&a.optimizer, &b.optimizer)] {
            assert_eq!(x.len(), y.len());
            for (s, t) in x.iter().zip(y) {
                assert_eq!(s.name, t.name);
                assert_eq!(s.shape, t.shape);
                let sb: Vec<u32> = s.data.iter().map(|v| v.to_bits()).collect();
                let tb: Vec<u32> = t.data.iter().map(|v| v.to_bits()).collect();
                assert_eq!(sb, tb, "tensor {}", s.name);
            }
        }
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    fn save_all(dir: &Path, keep: usize, steps: impl IntoIterator<Item = u64>) {
        let mut ck = Checkpointer::new(dir, keep).unwrap();
        for step in steps {
            ck.save(snapshot(step)).unwrap();
        }
        ck.wait().unwrap();
    }

    fn copy_dir(from: &Path, to: &Path) {
        fs::create_dir_all(to).unwrap();
        for entry in fs::read_dir(from).unwrap() {
            let entry = entry.unwrap();
            fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
        }
    }

    /// Storage that hangs (a dead NFS server: a read or mkdir that never returns) is an error naming
    /// the path once the deadline passes; the stuck thread is abandoned, not waited for.
    #[test]
    fn hung_storage_is_an_error_at_the_deadline() {
        let path = Path::new("/shared/ckpt");
        let started = Instant::now();
        let result: Result<()> =
            within(path, Duration::from_millis(100), "load checkpoint", || {
                std::thread::sleep(Duration::from_secs(30));
                Ok(())
            });
        let e = result.unwrap_err().to_string();
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "waited {:?}",
            started.elapsed()
        );
        assert!(
            e.contains("cannot load checkpoint /shared/ckpt within 0.1 s (storage hung?)"),
            "{e}"
        );
    }

    #[test]
    fn round_trip_is_bit_exact() {
        let tmp = TempDir::new("roundtrip");
        let snap = special_snapshot();
        let mut ck = Checkpointer::new(&tmp.0, 3).unwrap();
        ck.save(snap.clone()).unwrap();
        let committed = ck.wait().unwrap().unwrap();
        assert_eq!(committed, tmp.0.join("step-000000000007"));
        assert_eq!(ck.wait().unwrap(), None, "nothing left in flight");

        let (latest, skipped) = load_latest(&tmp.0).unwrap();
        assert!(skipped.is_empty(), "{skipped:?}");
        let (path, loaded) = latest.unwrap();
        assert_eq!(path, committed);
        assert_bit_equal(&loaded, &snap);
        assert_eq!(
            names(&committed),
            [MANIFEST_FILE, MODEL_FILE, OPTIMIZER_FILE]
        );
        assert_eq!(names(&tmp.0), ["step-000000000007"]);

        let manifest: serde_json::Value =
            serde_json::from_slice(&fs::read(committed.join(MANIFEST_FILE)).unwrap()).unwrap();
        assert_eq!(manifest["format"], FORMAT);
        assert_eq!(manifest["state"]["step"], 7);
        let entry = &manifest["files"][MODEL_FILE];
        let bytes = fs::read(committed.join(MODEL_FILE)).unwrap();
        assert_eq!(entry["bytes"], bytes.len() as u64);
        assert_eq!(entry["sha256"], format!("{:x}", Sha256::digest(&bytes)));
    }

    #[test]
    fn missing_dir_means_no_checkpoint() {
        let tmp = TempDir::new("missing");
        let (latest, skipped) = load_latest(&tmp.0.join("nope")).unwrap();
        assert!(latest.is_none() && skipped.is_empty());
        let err = load(&tmp.0.join("nope")).unwrap_err().to_string();
        assert!(err.contains("nope"), "{err}");
    }

    #[test]
    fn keep_retains_only_newest() {
        let tmp = TempDir::new("keep");
        save_all(&tmp.0, 2, 1..=5);
        assert_eq!(names(&tmp.0), ["step-000000000004", "step-000000000005"]);
        let (latest, _) = load_latest(&tmp.0).unwrap();
        assert_eq!(latest.unwrap().1, snapshot(5));
    }

    #[test]
    fn flipped_byte_falls_back_to_previous() {
        let tmp = TempDir::new("corrupt");
        save_all(&tmp.0, 3, [1, 2]);
        let newest = tmp.0.join("step-000000000002");
        let model = newest.join(MODEL_FILE);
        let mut bytes = fs::read(&model).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 0x01;
        fs::write(&model, &bytes).unwrap();

        let (latest, skipped) = load_latest(&tmp.0).unwrap();
        let (path, snap) = latest.unwrap();
        assert_eq!(path, tmp.0.join("step-000000000001"));
        assert_eq!(snap, snapshot(1));
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert_eq!(skipped[0].0, newest);
        assert!(skipped[0].1.contains("checksum"), "{}", skipped[0].1);

        let err = load(&newest).unwrap_err().to_string();
        assert!(err.contains(&model.display().to_string()), "{err}");
        assert!(err.contains("checksum"), "{err}");
    }

    #[test]
    fn damaged_files_are_rejected_with_reasons() {
        let tmp = TempDir::new("damaged");
        save_all(&tmp.0, 10, 1..=5);
        let dir = |s: u64| tmp.0.join(step_dir_name(s));

        // 5: truncated optimizer file.
        let opt = dir(5).join(OPTIMIZER_FILE);
        let len = fs::metadata(&opt).unwrap().len();
        File::options()
            .write(true)
            .open(&opt)
            .unwrap()
            .set_len(len - 3)
            .unwrap();
        // 4: missing model file.
        fs::remove_file(dir(4).join(MODEL_FILE)).unwrap();
        // 3: garbage manifest.
        fs::write(dir(3).join(MANIFEST_FILE), b"{not json").unwrap();
        // 2: not safetensors, but the manifest agrees with the garbage, so only parsing catches it.
        let garbage = b"definitely not a safetensors file".to_vec();
        fs::write(dir(2).join(MODEL_FILE), &garbage).unwrap();
        let mpath = dir(2).join(MANIFEST_FILE);
        let mut manifest: serde_json::Value =
            serde_json::from_slice(&fs::read(&mpath).unwrap()).unwrap();
        manifest["files"][MODEL_FILE] = serde_json::json!({
            "bytes": garbage.len(),
            "sha256": format!("{:x}", Sha256::digest(&garbage)),
        });
        fs::write(&mpath, serde_json::to_vec(&manifest).unwrap()).unwrap();

        let (latest, skipped) = load_latest(&tmp.0).unwrap();
        assert_eq!(latest.unwrap().0, dir(1));
        let reasons: Vec<&str> = skipped.iter().map(|(_, r)| r.as_str()).collect();
        assert_eq!(skipped.len(), 4, "{reasons:?}");
        assert!(reasons[0].contains("size is") && reasons[0].contains(OPTIMIZER_FILE));
        assert!(reasons[1].contains(MODEL_FILE) && reasons[1].contains("cannot open"));
        assert!(reasons[2].contains("unreadable manifest"));
        assert!(reasons[3].contains("not a valid safetensors file"));
        for (i, (path, reason)) in skipped.iter().enumerate() {
            assert_eq!(path, &dir(5 - i as u64));
            assert!(reason.contains(&path.display().to_string()), "{reason}");
        }
    }

    #[test]
    fn uncommitted_and_tmp_dirs_are_skipped() {
        let tmp = TempDir::new("incomplete");
        save_all(&tmp.0, 3, [1]);
        let good = tmp.0.join("step-000000000001");
        // A crash before commit under the final name (not something our writer produces).
        let incomplete = tmp.0.join("step-000000000009");
        copy_dir(&good, &incomplete);
        fs::remove_file(incomplete.join(MANIFEST_FILE)).unwrap();
        // A complete-looking temp directory must still never be loaded.
        copy_dir(&good, &tmp.0.join(".tmp-step-000000000010-1-2"));
        fs::create_dir(tmp.0.join("step-notanumber")).unwrap();

        let (latest, skipped) = load_latest(&tmp.0).unwrap();
        assert_eq!(latest.unwrap().0, good);
        assert_eq!(skipped.len(), 2, "{skipped:?}");
        assert!(skipped
            .iter()
            .all(|(p, _)| !p.to_string_lossy().contains(".tmp")));
        let (_, reason) = skipped.iter().find(|(p, _)| p == &incomplete).unwrap();
        assert!(reason.contains("no manifest.json"), "{reason}");
        assert!(matches!(
            load(&incomplete),
            Err(CheckpointError::Incomplete { .. })
        ));
    }

    #[test]
    fn at_most_one_in_flight() {
        let tmp = TempDir::new("inflight");
        let mut ck = Checkpointer::new(&tmp.0, 5).unwrap();
        let first = ck.save(snapshot(1)).unwrap();
        let second = ck.save(snapshot(2)).unwrap();
        eprintln!("waited {first:?} then {second:?}");
        assert_eq!(ck.wait().unwrap(), Some(tmp.0.join("step-000000000002")));
        assert_eq!(names(&tmp.0), ["step-000000000001", "step-000000000002"]);
        assert_eq!(load(&tmp.0.join("step-000000000001")).unwrap(), snapshot(1));
    }

    #[test]
    fn drop_waits_for_the_save_in_flight() {
        let tmp = TempDir::new("drop");
        {
            let mut ck = Checkpointer::new(&tmp.0, 1).unwrap();
            ck.save(snapshot(3)).unwrap();
        }
        assert_eq!(names(&tmp.0), ["step-000000000003"]);
        assert_eq!(load(&tmp.0.join("step-000000000003")).unwrap(), snapshot(3));
    }

    /// Storage that does not finish in time: the wait gives up at the deadline, naming the
    /// checkpoint, instead of holding rank 0 (and the job) forever.
    #[test]
    fn a_save_slower_than_the_deadline_is_an_error_not_a_hang() {
        let tmp = TempDir::new("deadline");
        let mut ck = Checkpointer::new(&tmp.0, 1)
            .unwrap()
            .with_deadline(Duration::from_micros(1));
        let mut big = snapshot(4);
        big.model.push(tensor("big", &[8 << 20], 1.0));
        ck.save(big).unwrap();
        let t = Instant::now();
        match ck.wait() {
            Err(CheckpointError::WriteTimedOut { path, .. }) => {
                assert_eq!(path, tmp.0.join("step-000000000004"))
            }
            other => panic!("{other:?}"),
        }
        assert!(t.elapsed() < Duration::from_secs(1));
        // The stuck writer is kept: no second one starts beside it.
        match ck.save(snapshot(5)) {
            Err(CheckpointError::WriteTimedOut { path, .. }) => {
                assert_eq!(path, tmp.0.join("step-000000000004"))
            }
            other => panic!("a second writer started: {other:?}"),
        }
    }

    #[test]
    fn resave_of_same_step_replaces_safely() {
        let tmp = TempDir::new("resave");
        save_all(&tmp.0, 1, [3]);
        let mut changed = snapshot(3);
        changed.state.world_size = 5;
        changed.state.batches = vec![16, 16, 16, 24, 24];
        changed.model[0].data[0] = 42.0;
        let mut ck = Checkpointer::new(&tmp.0, 1).unwrap();
        ck.save(changed.clone()).unwrap();
        ck.wait().unwrap();
        assert_eq!(names(&tmp.0), ["step-000000000003"]);
        assert_eq!(load_latest(&tmp.0).unwrap().0.unwrap().1, changed);

        // A crash between the two renames leaves only the aside: it must still be loadable.
        let aside = tmp.0.join("step-000000000003.replaced-1-2");
        fs::rename(tmp.0.join("step-000000000003"), &aside).unwrap();
        let (latest, skipped) = load_latest(&tmp.0).unwrap();
        assert!(skipped.is_empty(), "{skipped:?}");
        assert_eq!(latest.unwrap(), (aside.clone(), changed));

        // The next commit of that step supersedes the aside and removes it.
        ck.save(snapshot(3)).unwrap();
        ck.wait().unwrap();
        assert_eq!(names(&tmp.0), ["step-000000000003"]);
        assert_eq!(load_latest(&tmp.0).unwrap().0.unwrap().1, snapshot(3));
    }

    #[test]
    fn stale_tmp_dirs_are_swept_fresh_ones_kept() {
        let tmp = TempDir::new("sweep");
        let stale = tmp.0.join(".tmp-step-000000000001-99999-1");
        let fresh = tmp.0.join(".tmp-step-000000000002-99999-2");
        let deleting = tmp.0.join(".tmp-del-step-000000000000-99999-3");
        let foreign = tmp.0.join(".tmp-something-else");
        for d in [&stale, &fresh, &deleting, &foreign] {
            fs::create_dir(d).unwrap();
            fs::write(d.join(MODEL_FILE), b"partial").unwrap();
        }
        let old = SystemTime::now() - STALE_TMP_AGE - Duration::from_secs(60);
        File::options()
            .write(true)
            .open(stale.join(MODEL_FILE))
            .unwrap()
            .set_modified(old)
            .unwrap();
        File::open(&stale).unwrap().set_modified(old).unwrap();

        save_all(&tmp.0, 2, [5]);
        assert_eq!(
            names(&tmp.0),
            [
                ".tmp-something-else",
                ".tmp-step-000000000002-99999-2",
                "step-000000000005"
            ]
        );
    }

    #[test]
    fn invalid_inputs_are_errors() {
        let tmp = TempDir::new("invalid");
        assert!(matches!(
            Checkpointer::new(&tmp.0, 0),
            Err(CheckpointError::InvalidKeep { keep: 0 })
        ));
        let mut ck = Checkpointer::new(&tmp.0, 1).unwrap();
        let mut bad = snapshot(1);
        bad.model[0].shape = vec![3, 3];
        let err = ck.save(bad).unwrap_err().to_string();
        assert!(
            err.contains("layers.1.weight") && err.contains(MODEL_FILE),
            "{err}"
        );
        let mut dup = snapshot(1);
        dup.optimizer[1].name = dup.optimizer[0].name.clone();
        let err = ck.save(dup).unwrap_err().to_string();
        assert!(err.contains("duplicate"), "{err}");
        assert_eq!(ck.wait().unwrap(), None);
        assert!(names(&tmp.0).is_empty());

        let file = tmp.0.join("step-000000000001");
        fs::write(&file, b"x").unwrap();
        let err = load(&file).unwrap_err().to_string();
        assert!(err.contains("not a directory") && err.contains("step-000000000001"));
    }

    /// Makes a FIFO at `path`: opening it for reading blocks until a writer appears.
    fn mkfifo(path: &Path) {
        use std::os::unix::ffi::OsStrExt;
        let c_path = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: `c_path` is a NUL-terminated string that lives until after the call.
        let rc = unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) };
        assert_eq!(
            rc,
            0,
            "mkfifo {}: {}",
            path.display(),
            io::Error::last_os_error()
        );
    }

    fn edit_manifest(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
        let path = dir.join(MANIFEST_FILE);
        let mut manifest: serde_json::Value =
            serde_json::from_slice(&fs::read(&path).unwrap()).unwrap();
        edit(&mut manifest);
        fs::write(&path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    }

    /// Writes `bytes` as file `name` of checkpoint `dir` with a manifest that agrees, so that
    /// only the check under test can catch what is wrong with them.
    fn replace_agreeing(dir: &Path, name: &str, bytes: &[u8]) {
        fs::write(dir.join(name), bytes).unwrap();
        edit_manifest(dir, |m| {
            m["files"][name] = serde_json::json!({
                "bytes": bytes.len(),
                "sha256": format!("{:x}", Sha256::digest(bytes)),
            })
        });
    }

    /// The error loading `dir`, which must come within a second: a hang shows as a failure
    /// (after at most 10 s) instead of a stuck test run.
    fn refused_promptly(dir: &Path) -> CheckpointError {
        let started = Instant::now();
        let err = load_within(dir, Duration::from_secs(10))
            .expect_err("a tampered checkpoint was loaded");
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1), "took {took:?}: {err}");
        err
    }

    fn assert_corrupt(err: &CheckpointError, file: &Path, why: &str) {
        let text = err.to_string();
        assert!(
            matches!(err, CheckpointError::Corrupt { path, .. } if path == file),
            "expected {} to be refused: {text}",
            file.display()
        );
        assert!(text.contains(why), "{text}");
    }

    /// A FIFO blocks the open until a writer appears: rank 0 would hang forever on it.
    #[test]
    fn a_fifo_in_place_of_a_file_is_refused_promptly() {
        let tmp = TempDir::new("fifo");
        save_all(&tmp.0, 3, [1]);
        let dir = tmp.0.join(step_dir_name(1));
        let model = dir.join(MODEL_FILE);
        fs::remove_file(&model).unwrap();
        mkfifo(&model);
        let err = refused_promptly(&dir);
        assert_corrupt(&err, &model, "not a regular file (a FIFO)");

        let manifest = dir.join(MANIFEST_FILE);
        fs::remove_file(&manifest).unwrap();
        mkfifo(&manifest);
        let err = refused_promptly(&dir);
        assert_corrupt(&err, &manifest, "not a regular file (a FIFO)");
    }

    #[test]
    fn symlinks_in_place_of_files_are_refused() {
        let tmp = TempDir::new("symlink");
        save_all(&tmp.0, 3, [1]);
        let dir = tmp.0.join(step_dir_name(1));
        let model = dir.join(MODEL_FILE);
        // The very bytes the manifest describes, but outside the checkpoint directory.
        let outside = tmp.0.join("outside.safetensors");
        fs::rename(&model, &outside).unwrap();
        std::os::unix::fs::symlink(&outside, &model).unwrap();
        let err = refused_promptly(&dir);
        assert_corrupt(&err, &model, "not a regular file (a symbolic link)");

        // A device that never ends, declared empty so that no size check can catch it.
        fs::remove_file(&model).unwrap();
        std::os::unix::fs::symlink("/dev/zero", &model).unwrap();
        edit_manifest(&dir, |m| {
            m["files"][MODEL_FILE] = serde_json::json!({
                "bytes": 0,
                "sha256": format!("{:x}", Sha256::digest(b"")),
            })
        });
        let err = refused_promptly(&dir);
        assert_corrupt(&err, &model, "not a regular file (a symbolic link)");

        let manifest = dir.join(MANIFEST_FILE);
        let outside = tmp.0.join("outside.json");
        fs::rename(&manifest, &outside).unwrap();
        std::os::unix::fs::symlink(&outside, &manifest).unwrap();
        let err = refused_promptly(&dir);
        assert_corrupt(&err, &manifest, "not a regular file (a symbolic link)");
    }

    #[test]
    fn a_symlinked_checkpoint_directory_is_refused() {
        let tmp = TempDir::new("symlinked-dir");
        let elsewhere = TempDir::new("symlinked-dir-target");
        save_all(&tmp.0, 3, [1]);
        let link = tmp.0.join(step_dir_name(1));
        let real = elsewhere.0.join(step_dir_name(1));
        fs::rename(&link, &real).unwrap();
        std::os::unix::fs::symlink(&real, &link).unwrap();

        let err = refused_promptly(&link);
        assert_corrupt(&err, &link, "is a symbolic link");
        let mut slashed = link.clone().into_os_string();
        slashed.push("/");
        let slashed = PathBuf::from(slashed);
        let err = refused_promptly(&slashed);
        assert_corrupt(&err, &slashed, "is a symbolic link");
        let (latest, skipped) = load_latest(&tmp.0).unwrap();
        assert!(latest.is_none());
        assert_eq!(skipped.len(), 1, "{skipped:?}");
        assert_eq!(skipped[0].0, link);
        assert!(skipped[0].1.contains("is a symbolic link"), "{skipped:?}");
        assert_eq!(load(&real).unwrap(), snapshot(1));
    }

    #[test]
    fn huge_declared_sizes_are_refused_before_reading() {
        let tmp = TempDir::new("huge");
        save_all(&tmp.0, 3, [1]);
        let dir = tmp.0.join(step_dir_name(1));
        let model = dir.join(MODEL_FILE);
        let manifest = dir.join(MANIFEST_FILE);
        let err = {
            edit_manifest(&dir, |m| m["files"][MODEL_FILE]["bytes"] = u64::MAX.into());
            refused_promptly(&dir)
        };
        assert_corrupt(&err, &manifest, "file sizes overflow when summed");
        edit_manifest(&dir, |m| {
            m["files"][MODEL_FILE]["bytes"] = (1u64 << 40).into();
            m["files"][OPTIMIZER_FILE]["bytes"] = 0.into();
        });
        let err = refused_promptly(&dir).to_string();
        assert!(
            err.contains(&dir.display().to_string()) && err.contains("1099511627776"),
            "{err}"
        );

        // A sparse file really of the declared size: only the memory bound stops the read.
        let memory = physical_memory().expect("sysconf reports physical memory on Linux");
        let file = File::options().write(true).open(&model).unwrap();
        match file.set_len(memory + 1) {
            Ok(()) => {
                drop(file);
                edit_manifest(&dir, |m| {
                    m["files"][MODEL_FILE]["bytes"] = (memory + 1).into()
                });
                let err = refused_promptly(&dir);
                assert_corrupt(&err, &manifest, "bytes of memory");
            }
            Err(e) => ringlet_core::skipped!("the sparse-file case: {e}"),
        }

        // manifest.json itself has a fixed cap.
        File::options()
            .write(true)
            .open(&manifest)
            .unwrap()
            .set_len(MAX_MANIFEST_BYTES + 1)
            .unwrap();
        let err = refused_promptly(&dir);
        assert_corrupt(&err, &manifest, "more than the 67108864 allowed");
    }

    /// What arrives past the declared size (a file that grows, a device) is never read.
    #[test]
    fn reads_stop_one_byte_past_the_limit() {
        let path = Path::new("/ckpt/step-000000000001/model.safetensors");
        let mut endless = io::repeat(7).take(1 << 20);
        assert!(matches!(
            read_capped(&mut endless, path, 1000),
            Err(ReadCapped::Over)
        ));
        assert_eq!(endless.limit(), (1 << 20) - 1001);
        assert!(matches!(
            read_capped(io::repeat(7), path, 1000),
            Err(ReadCapped::Over)
        ));
        let three: &[u8] = &[1, 2, 3];
        assert_eq!(read_capped(three, path, 3).ok(), Some(vec![1, 2, 3]));
        assert_eq!(read_capped(three, path, u64::MAX).ok(), Some(vec![1, 2, 3]));
        assert!(matches!(read_capped(three, path, 2), Err(ReadCapped::Over)));
    }

    fn raw_safetensors(header: serde_json::Value, data: &[u8]) -> Vec<u8> {
        let mut header = serde_json::to_vec(&header).unwrap();
        header.resize(header.len().next_multiple_of(8), b' ');
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(&header);
        out.extend_from_slice(data);
        out
    }

    #[test]
    fn a_shape_that_does_not_match_its_bytes_is_refused() {
        let tmp = TempDir::new("shape");
        save_all(&tmp.0, 3, [1]);
        let dir = tmp.0.join(step_dir_name(1));
        let model = dir.join(MODEL_FILE);
        let bytes = raw_safetensors(
            serde_json::json!({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}),
            &[0; 8],
        );
        replace_agreeing(&dir, MODEL_FILE, &bytes);
        let err = refused_promptly(&dir);
        assert_corrupt(&err, &model, "shape");

        // The same checks on their own, where the safetensors parser is not in front of them.
        let values = |shape: &[usize], raw: &[u8]| {
            f32_values(&model, "t", shape, raw).map_err(|e| {
                let text = e.to_string();
                assert!(text.contains(&model.display().to_string()), "{text}");
                text
            })
        };
        let err = values(&[3], &[0; 8]).unwrap_err();
        assert!(
            err.contains("shape [3] needs 12 bytes, its data spans 8"),
            "{err}"
        );
        let err = values(&[], &[0; 6]).unwrap_err();
        assert!(err.contains("not a multiple of 4"), "{err}");
        let err = values(&[usize::MAX, 2], &[0; 8]).unwrap_err();
        assert!(err.contains("overflows"), "{err}");
        let err = values(&[usize::MAX / 4 + 1], &[0; 8]).unwrap_err();
        assert!(err.contains("overflows"), "{err}");
        assert_eq!(values(&[0, usize::MAX], &[]).unwrap(), Vec::<f32>::new());
        let one = 1.5f32.to_le_bytes();
        assert_eq!(values(&[1, 1], &one).unwrap(), vec![1.5]);
    }

    #[test]
    fn a_manifest_whose_batches_do_not_fit_is_refused() {
        let tmp = TempDir::new("batches");
        save_all(&tmp.0, 3, [1]);
        let dir = tmp.0.join(step_dir_name(1));
        let manifest = dir.join(MANIFEST_FILE);
        let cases = [
            (
                serde_json::json!([usize::MAX, 1]),
                2,
                "per-rank batch sizes overflow when summed",
            ),
            (
                serde_json::json!([32, 32]),
                3,
                "records 2 per-rank batch sizes for a world size of 3",
            ),
            (serde_json::json!([]), 0, "records a world size of 0"),
        ];
        for (batches, world_size, why) in cases {
            edit_manifest(&dir, |m| {
                m["state"]["batches"] = batches;
                m["state"]["world_size"] = world_size.into();
            });
            assert_corrupt(&load(&dir).unwrap_err(), &manifest, why);
        }

        // Nor does the writer produce one.
        let mut ck = Checkpointer::new(&tmp.0, 3).unwrap();
        let mut bad = snapshot(2);
        bad.state.batches = vec![usize::MAX, 1, 0];
        let err = ck.save(bad).unwrap_err().to_string();
        assert!(
            err.contains("overflow") && err.contains(MANIFEST_FILE),
            "{err}"
        );
    }

    #[test]
    fn load_latest_falls_back_past_tampered_checkpoints() {
        let tmp = TempDir::new("tampered");
        save_all(&tmp.0, 10, 1..=5);
        let dir = |s: u64| tmp.0.join(step_dir_name(s));
        // 5: the model is a FIFO.
        fs::remove_file(dir(5).join(MODEL_FILE)).unwrap();
        mkfifo(&dir(5).join(MODEL_FILE));
        // 4: the optimizer file leads to /dev/zero.
        fs::remove_file(dir(4).join(OPTIMIZER_FILE)).unwrap();
        std::os::unix::fs::symlink("/dev/zero", dir(4).join(OPTIMIZER_FILE)).unwrap();
        // 3: a 1 TiB model, says the manifest.
        edit_manifest(&dir(3), |m| {
            m["files"][MODEL_FILE]["bytes"] = (1u64 << 40).into()
        });
        // 2: per-rank batches that wrap when summed.
        edit_manifest(&dir(2), |m| {
            m["state"]["batches"] = serde_json::json!([usize::MAX, 1, 1])
        });

        let started = Instant::now();
        let (latest, skipped) = load_latest_within(&tmp.0, Duration::from_secs(10)).unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        let (path, snap) = latest.unwrap();
        assert_eq!(path, dir(1));
        assert_eq!(snap, snapshot(1));
        assert_eq!(skipped.len(), 4, "{skipped:?}");
        // Step 3 is refused for the memory it would take, or (on a machine with more than
        // 1 TiB) because the file is not that large.
        let whys: [&[&str]; 4] = [
            &["not a regular file (a FIFO)"],
            &["not a regular file (a symbolic link)"],
            &["bytes of memory", "manifest says 1099511627776"],
            &["overflow"],
        ];
        for (i, ((path, reason), why)) in skipped.iter().zip(whys).enumerate() {
            assert_eq!(path, &dir(5 - i as u64));
            assert!(reason.contains(&path.display().to_string()), "{reason}");
            assert!(why.iter().any(|w| reason.contains(w)), "{reason}");
        }
    }

    /// Opens a checkpoint with Python's `safetensors` (skipped where it is not installed, never in CI).
    #[test]
    fn python_safetensors_reads_checkpoint() {
        let probe = Command::new("python3")
            .args(["-c", "import safetensors.numpy, numpy"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !probe.is_ok_and(|s| s.success()) {
            assert!(
                std::env::var_os("CI").is_none(),
                "CI must have python3 with safetensors and numpy (.ci/run installs them)"
            );
            ringlet_core::skipped!("python3 with safetensors and numpy not available");
            return;
        }
        let tmp = TempDir::new("python");
        let snap = special_snapshot();
        let mut ck = Checkpointer::new(&tmp.0, 1).unwrap();
        ck.save(snap.clone()).unwrap();
        let dir = ck.wait().unwrap().unwrap();
        let script = r#"
import json, sys
from safetensors import safe_open
from safetensors.numpy import load_file
out = {}
for path in sys.argv[1:]:
    with safe_open(path, framework="np") as f:
        order = json.loads(f.metadata()["ringlet.tensor_order"])
    tensors = load_file(path)
    out[path] = [[n, str(tensors[n].dtype), list(tensors[n].shape),
                  tensors[n].view("<u4").reshape(-1).tolist()] for n in order]
print(json.dumps(out))
"#;
        let model = dir.join(MODEL_FILE);
        let optimizer = dir.join(OPTIMIZER_FILE);
        let output = Command::new("python3")
            .arg("-c")
            .arg(script)
            .arg(&model)
            .arg(&optimizer)
            .output()
            .unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        // Per file: [name, dtype, shape, f32 bit patterns] in snapshot order.
        type PyTensor = (String, String, Vec<usize>, Vec<u32>);
        let parsed: BTreeMap<String, Vec<PyTensor>> =
            serde_json::from_slice(&output.stdout).unwrap();
        for (path, tensors) in [(&model, &snap.model), (&optimizer, &snap.optimizer)] {
            let got = &parsed[&path.display().to_string()];
            assert_eq!(got.len(), tensors.len());
            for ((name, dtype, shape, bits), t) in got.iter().zip(tensors) {
                assert_eq!(
                    (name, dtype.as_str(), shape),
                    (&t.name, "float32", &t.shape)
                );
                let want: Vec<u32> = t.data.iter().map(|v| v.to_bits()).collect();
                assert_eq!(bits, &want, "tensor {name}");
            }
        }
    }

    /// A child's large snapshot: 64 MiB of model plus 32 MiB of optimizer state.
    fn big_snapshot(step: u64) -> Snapshot {
        let mut snap = snapshot(step);
        let fill = |n: usize| (0..n).map(|i| (i % 4099) as f32 + step as f32).collect();
        snap.model = vec![Tensor {
            name: "big.weight".into(),
            shape: vec![4096, 4096],
            data: fill(4096 * 4096),
        }];
        snap.optimizer = vec![Tensor {
            name: "big.momentum".into(),
            shape: vec![2048, 4096],
            data: fill(2048 * 4096),
        }];
        snap
    }

    /// Not a test on its own: the child process of `kill_during_write_keeps_previous_checkpoint`.
    /// Returns at once unless `RINGLET_CKPT_CHILD` names a directory.
    #[test]
    fn kill_child_writer_process() {
        let Some(dir) = std::env::var_os(CHILD_ENV) else {
            return;
        };
        let mut ck = Checkpointer::new(PathBuf::from(dir), 2).unwrap();
        ck.save(snapshot(1)).unwrap();
        ck.wait().unwrap();
        // Bounded even if the parent dies without killing us.
        let deadline = Instant::now() + Duration::from_secs(120);
        let mut step = 2;
        while Instant::now() < deadline {
            ck.save(big_snapshot(step)).unwrap();
            step += 1;
        }
    }

    /// A `.tmp-step-*` directory of a large checkpoint (step >= 2) with model bytes on disk.
    fn partial_write(dir: &Path) -> Option<PathBuf> {
        fs::read_dir(dir).ok()?.flatten().find_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let path = e.path();
            let started = name.starts_with(TMP_WRITE_PREFIX)
                && !name.starts_with(".tmp-step-000000000001-")
                && fs::metadata(path.join(MODEL_FILE)).is_ok_and(|m| m.len() > 0);
            started.then_some(path)
        })
    }

    #[test]
    fn kill_during_write_keeps_previous_checkpoint() {
        let tmp = TempDir::new("kill");
        let ckpt = tmp.0.join("ckpt");
        let log_path = tmp.0.join("child.log");
        let log = File::create(&log_path).unwrap();
        let started = Instant::now();
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([CHILD_TEST, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, &ckpt)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();

        let deadline = Instant::now() + Duration::from_secs(60);
        let partial = loop {
            if let Some(p) = partial_write(&ckpt) {
                break p;
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!(
                    "child exited early ({status}): {}",
                    fs::read_to_string(&log_path).unwrap_or_default()
                );
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("no partial write within 60 s");
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        child.kill().unwrap(); // SIGKILL
        let status = child.wait().unwrap();
        let partial_left = partial.exists();
        eprintln!(
            "killed child ({status}) after {:?} while writing {} (left behind: {partial_left})",
            started.elapsed(),
            partial.display()
        );

        let (latest, skipped) = load_latest(&ckpt).unwrap();
        assert!(skipped.is_empty(), "{skipped:?}");
        let (path, snap) = latest.expect("a committed checkpoint survives the kill");
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with(STEP_PREFIX), "{name}");
        let step = snap.state.step;
        let expected = if step == 1 {
            snapshot(1)
        } else {
            big_snapshot(step)
        };
        assert!(
            snap == expected,
            "step {step} does not match what was saved"
        );
        eprintln!("resumed from {name}; leftovers: {:?}", names(&ckpt));

        // Resuming and saving again works; the killed writer's fresh temp dir is left alone.
        let mut ck = Checkpointer::new(&ckpt, 2).unwrap();
        ck.save(snapshot(1000)).unwrap();
        ck.wait().unwrap();
        let (latest, _) = load_latest(&ckpt).unwrap();
        assert_eq!(latest.unwrap().1, snapshot(1000));
        assert_eq!(partial.exists(), partial_left);
    }
}
