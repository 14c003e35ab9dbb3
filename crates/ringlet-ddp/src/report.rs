//! What a step did: metrics as JSON lines, and the progress bar or log lines on rank 0.

use indicatif::{ProgressBar, ProgressStyle};
use ringlet::Error;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What one step did, for the progress line and `--metrics`.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct StepReport {
    pub rank: usize,
    /// Ranks in the job at this step (fewer after a rank was lost, see `crate::membership`).
    pub world_size: usize,
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

/// Writes each [`StepReport`] as one JSON line.
pub struct Metrics(std::io::BufWriter<std::fs::File>);

impl Metrics {
    /// Creates (truncates) `path`. Opening never blocks (a FIFO without a reader would), and
    /// only a regular file is written to.
    pub fn create(path: &Path) -> Result<Metrics, Error> {
        Metrics::open(path, false)
    }

    /// Appends to `path` (a replacement's, after the lines of the rank it stands in for); a
    /// last line the lost rank left cut is ended first, so every line stays whole JSON or is
    /// visibly cut.
    pub fn append(path: &Path) -> Result<Metrics, Error> {
        Metrics::open(path, true)
    }

    fn open(path: &Path, append: bool) -> Result<Metrics, Error> {
        use std::os::unix::fs::{FileExt, OpenOptionsExt};
        let what = || format!("opening {}", path.display());
        let f = std::fs::OpenOptions::new()
            .read(append)
            .write(true)
            .append(append)
            .create(true)
            .truncate(!append)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| Error::io(what(), e))?;
        let meta = f.metadata().map_err(|e| Error::io(what(), e))?;
        if !meta.is_file() {
            return Err(Error::InvalidArgument(format!(
                "{}: not a regular file",
                path.display()
            )));
        }
        let mut out = std::io::BufWriter::new(f);
        if append && meta.len() > 0 {
            let mut last = [0u8];
            out.get_ref()
                .read_at(&mut last, meta.len() - 1)
                .map_err(|e| Error::io(what(), e))?;
            if last[0] != b'\n' {
                out.write_all(b"\n").map_err(|e| Error::io(what(), e))?;
            }
        }
        Ok(Metrics(out))
    }
    pub fn write(&mut self, r: &StepReport) -> std::io::Result<()> {
        serde_json::to_writer(&mut self.0, r)?;
        self.0.write_all(b"\n")
    }
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.0.flush()
    }
}

/// Rank `rank`'s metrics file: `{rank}` in the name is replaced by the rank; without it, ranks
/// other than 0 append `.rank<R>`.
pub fn metrics_path(p: &Path, rank: usize) -> PathBuf {
    let s = p.display().to_string();
    if s.contains("{rank}") {
        PathBuf::from(s.replace("{rank}", &rank.to_string()))
    } else if rank == 0 {
        p.to_path_buf()
    } else {
        PathBuf::from(format!("{s}.rank{rank}"))
    }
}

/// Rank 0's view of the run: a progress bar on a terminal, else a log line every `log_every`
/// steps; every rank's reports go to the metrics file if there is one. Other ranks show
/// nothing. Rank 0 is the current one: after a lost rank (`crate::membership`) another process
/// may take over the log lines (the bar stays with the process that drew it).
pub struct Progress {
    steps: u64,
    log_every: u64,
    bar: Option<ProgressBar>,
    started: Instant,
    /// (when, at which step) of the last rate shown; set at the first report, so a resumed run
    /// does not count the steps before it.
    last: Option<(Instant, u64)>,
    metrics: Option<Metrics>,
    metrics_error: Option<std::io::Error>,
}

impl Progress {
    /// `log_every` 0: about ten lines per run.
    pub fn new(rank: usize, steps: u64, log_every: u64, metrics: Option<Metrics>) -> Progress {
        let bar = (rank == 0 && std::io::stderr().is_terminal()).then(|| {
            let b = ProgressBar::new(steps);
            b.set_style(
                ProgressStyle::with_template("{bar:30} step {pos}/{len} {msg} eta {eta}")
                    .expect("a valid template"),
            );
            b
        });
        let log_every = if log_every == 0 {
            steps / 10
        } else {
            log_every
        };
        Progress {
            steps,
            log_every: log_every.max(1),
            bar,
            started: Instant::now(),
            last: None,
            metrics,
            metrics_error: None,
        }
    }

    /// Seconds since the progress started.
    pub fn elapsed_s(&self) -> f64 {
        self.started.elapsed().as_secs_f64()
    }

    pub fn report(&mut self, r: &StepReport) {
        if let Some(m) = self.metrics.as_mut() {
            if let Err(e) = m.write(r) {
                self.metrics_error.get_or_insert(e);
            }
        }
        // The current rank 0: after a membership change it may be another process.
        if r.rank != 0 {
            return;
        }
        if let Some(rb) = &r.rebalanced {
            tracing::info!("step {}: re-balanced local batches to {rb:?}", r.step);
        }
        let (since, at) = *self
            .last
            .get_or_insert((self.started, r.step.saturating_sub(1)));
        let dt = since.elapsed().as_secs_f64();
        let rate = (dt > 0.5 || r.step.is_multiple_of(self.log_every)).then(|| {
            self.last = Some((Instant::now(), r.step));
            (r.step - at) as f64 * r.global_batch as f64 / dt.max(1e-9)
        });
        match &self.bar {
            Some(b) => {
                b.set_position(r.step);
                if let Some(rate) = rate {
                    b.set_message(format!("loss {:.4} {rate:.0} samples/s", r.loss));
                }
            }
            None if r.step.is_multiple_of(self.log_every) || r.step == self.steps => tracing::info!(
                "step {}/{} epoch {} loss {:.4} lr {:.4} {:.0} samples/s on {} ranks, step {:.2} ms (comm wait {:.2} ms)",
                r.step,
                self.steps,
                r.epoch,
                r.loss,
                r.lr,
                rate.unwrap_or(0.0),
                r.world_size,
                r.step_time_s * 1e3,
                r.comm_wait_s * 1e3
            ),
            None => {}
        }
    }

    /// Clears the bar and flushes the metrics; the first metrics write error, if any.
    pub fn finish(mut self) -> Result<(), Error> {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
        if let Some(m) = self.metrics.as_mut() {
            if let Err(e) = m.flush() {
                self.metrics_error.get_or_insert(e);
            }
        }
        match self.metrics_error {
            Some(e) => Err(Error::io("writing --metrics", e)),
            None => Ok(()),
        }
    }
}

/// Throughput and time fractions over the timed steps of a run (the first steps after start-up
/// are left out: warm caches, first connections).
#[derive(Clone, Debug, Default)]
pub struct Timing {
    calibration_steps: u64,
    seen: u64,
    time: f64,
    wait: f64,
    stall: f64,
    steps: u64,
    samples: usize,
}

impl Timing {
    pub fn new(calibration_steps: u64) -> Timing {
        Timing {
            calibration_steps,
            ..Timing::default()
        }
    }

    pub fn add(&mut self, r: &StepReport) {
        self.seen += 1;
        if self.seen > self.calibration_steps {
            self.time += r.step_time_s;
            self.wait += r.comm_wait_s;
            self.stall += r.checkpoint_stall_s;
            self.steps += 1;
            self.samples += r.global_batch;
        }
    }

    fn fraction(&self, x: f64) -> f64 {
        if self.time > 0.0 {
            x / self.time
        } else {
            0.0
        }
    }

    pub fn samples_per_s(&self) -> f64 {
        self.fraction(self.samples as f64)
    }
    pub fn mean_step_s(&self) -> f64 {
        self.time / self.steps.max(1) as f64
    }
    pub fn comm_wait_fraction(&self) -> f64 {
        self.fraction(self.wait)
    }
    pub fn checkpoint_stall_fraction(&self) -> f64 {
        self.fraction(self.stall)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A replacement appends after the lost rank's lines, ending a line it left cut.
    #[test]
    fn a_replacement_appends_after_a_cut_line() {
        let path =
            std::env::temp_dir().join(format!("ringlet-metrics-append-{}", std::process::id()));
        std::fs::write(&path, b"{\"step\":1}\n{\"step\":2,\"lo").unwrap();
        let mut m = Metrics::append(&path).unwrap();
        m.0.write_all(b"{\"step\":3}\n").unwrap();
        m.flush().unwrap();
        drop(m);
        let text = std::fs::read_to_string(&path).unwrap();
        let _ = std::fs::remove_file(&path);
        assert_eq!(text, "{\"step\":1}\n{\"step\":2,\"lo\n{\"step\":3}\n");
    }
}
