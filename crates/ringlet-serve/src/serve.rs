//! The scoring loop: gather a micro-batch (new records, or a dead replica's taken over), check
//! each record, score the good ones with the version being served, and commit predictions and
//! dead letters with the records' acknowledgement in one step. A newer version is swapped in
//! between batches only, so a batch is scored by one version.

use crate::engine::{id_millis, Committed, Outcome, Record, StreamEngine};
use crate::versions::{Source, Version};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The longest a record's features field may be: a malformed record must not cost unbounded
/// parsing (16 bytes per number is far more than `-0.12345678e-10,` needs).
fn max_field_bytes(features: usize) -> usize {
    features.saturating_mul(32).saturating_add(64)
}

#[derive(Clone, Debug)]
pub struct Options {
    /// Records per micro-batch, at most.
    pub batch: usize,
    /// How long a batch waits to fill once its first record is in.
    pub max_wait: Duration,
    /// A record pending this long with another replica is taken over (that replica died).
    pub claim_idle: Duration,
    /// Stop after no record came for this long (benchmarks, tests); `None`: until a signal.
    pub exit_when_idle: Option<Duration>,
    /// The record field holding the features (a JSON array of numbers), or a transformer's
    /// text.
    pub field: String,
    /// This replica's name (the consumer's), written with every result.
    pub replica: String,
    /// A record handed out more often than this (every replica holding it died: a poison
    /// record) is dead-lettered instead of scored.
    pub max_deliveries: u64,
}

/// What a replica did, for its closing line.
#[derive(Default, Debug)]
pub struct Report {
    pub scored: usize,
    pub dead: usize,
    /// Records another replica had taken over before this one committed them.
    pub lost: usize,
    pub batches: usize,
    /// From each record's id (its arrival at the engine) to the commit of its prediction.
    pub latencies: Latencies,
    pub versions: Vec<String>,
    pub busy: Duration,
    /// When the last counted batch's commit ended.
    last_end: Option<Instant>,
}

/// Latencies in whole milliseconds, counted per millisecond up to a minute (longer ones count
/// as a minute): a fixed 480 KB however long the service runs.
#[derive(Debug)]
pub struct Latencies {
    counts: Vec<u64>,
    total: u64,
}

impl Default for Latencies {
    fn default() -> Latencies {
        Latencies {
            counts: vec![0; 60_001],
            total: 0,
        }
    }
}

impl Latencies {
    pub fn add(&mut self, ms: u64) {
        let at = (ms as usize).min(self.counts.len() - 1);
        self.counts[at] += 1;
        self.total += 1;
    }

    /// The q-quantile (0..=1), nearest rank; `None` with no latency counted.
    pub fn percentile(&self, q: f64) -> Option<u64> {
        if self.total == 0 {
            return None;
        }
        let rank = ((self.total - 1) as f64 * q.clamp(0.0, 1.0)).round() as u64;
        let mut seen = 0;
        for (ms, &c) in self.counts.iter().enumerate() {
            seen += c;
            if seen > rank {
                return Some(ms as u64);
            }
        }
        None
    }
}

/// A scored batch on its way to the commit thread: its results and when its scoring began.
type Scored = (Vec<Outcome>, Vec<Outcome>, Instant);

/// Serves until `stop` is set (between batches) or, with `exit_when_idle`, the input stays empty.
///
/// Batch k is committed on a second connection while batch k+1 is read and scored, one commit
/// in flight at most: a replica then holds at most two batches uncommitted, and the engine's
/// work on one overlaps the scoring of the other. A commit still writes only records that are
/// this consumer's, so a batch taken over meanwhile is written once, by its new holder.
pub fn run(
    engine: &mut dyn StreamEngine,
    source: &mut Source,
    version: Version,
    opts: &Options,
    stop: &AtomicBool,
) -> Result<Report, String> {
    let mut committer = engine.another().map_err(|e| e.to_string())?;
    std::thread::scope(|s| {
        // A rendezvous: a hand-over waits until the commit before it is done.
        let (hand, batches) = std::sync::mpsc::sync_channel::<Scored>(0);
        let (done_tx, done) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("ringlet-serve-commit".into())
            .spawn_scoped(s, move || {
                for (outputs, dead, t0) in batches {
                    let r = committer.commit(&outputs, &dead).map_err(|e| e.to_string());
                    let failed = r.is_err();
                    let _ = done_tx.send(r.map(|c| (c, outputs, t0, Instant::now())));
                    if failed {
                        break;
                    }
                }
            })
            .map_err(|e| format!("starting the commit thread: {e}"))?;
        let mut report = Report {
            versions: vec![version.label.clone()],
            ..Report::default()
        };
        let served = score_and_hand_over(
            engine,
            source,
            version,
            opts,
            stop,
            &hand,
            &done,
            &mut report,
        );
        drop(hand);
        let _ = thread.join();
        // What was still in flight, then what the loop stopped on.
        for r in done.try_iter() {
            count(&mut report, r?);
        }
        served.map(|()| report)
    })
}

/// The reading and scoring side of [`run`].
#[allow(clippy::too_many_arguments)]
fn score_and_hand_over(
    engine: &mut dyn StreamEngine,
    source: &mut Source,
    mut version: Version,
    opts: &Options,
    stop: &AtomicBool,
    hand: &std::sync::mpsc::SyncSender<Scored>,
    done: &std::sync::mpsc::Receiver<Result<Finished, String>>,
    report: &mut Report,
) -> Result<(), String> {
    eprintln!(
        "ringlet-serve: {} serving {} on {}",
        opts.replica,
        version.label,
        version.scorer.runs_on()
    );
    let mut last_claim: Option<Instant> = None;
    let mut idle_since = Instant::now();
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        if let Some(newer) = source.newer(version.step) {
            eprintln!(
                "ringlet-serve: {} now serving {} (was {})",
                opts.replica, newer.label, version.label
            );
            report.versions.push(newer.label.clone());
            version = newer;
        }
        let records = gather(engine, opts, &mut last_claim)?;
        if records.is_empty() {
            if opts
                .exit_when_idle
                .is_some_and(|d| idle_since.elapsed() >= d)
            {
                break;
            }
            continue;
        }
        let t0 = Instant::now();
        seq += 1;
        let batch_id = format!("{}:{seq}", opts.replica);
        let (outputs, dead) = score(&mut version, &records, opts, &batch_id)?;
        if hand.send((outputs, dead, t0)).is_err() {
            // The commit thread stopped on an error, which it sent.
            break;
        }
        for r in done.try_iter() {
            count(report, r?);
        }
        idle_since = Instant::now();
    }
    Ok(())
}

/// A committed batch: what the commit did, the batch's results, when its scoring began and
/// when its commit ended.
type Finished = (Committed, Vec<Outcome>, Instant, Instant);

/// A committed batch in the report. Busy time is the union of the batches' spans from scoring
/// to commit (they overlap by the pipelining).
fn count(report: &mut Report, (done, outputs, t0, end): Finished) {
    let from = report.last_end.map_or(t0, |e| e.max(t0));
    report.busy += end.saturating_duration_since(from);
    report.last_end = Some(end);
    report.batches += 1;
    report.lost += done.lost;
    report.scored += done.written;
    report.dead += done.dead;
    // When some were taken over, which is not known: the batch's latencies are left out.
    if done.lost == 0 {
        for t in outputs.iter().filter_map(|o| id_millis(&o.id)) {
            report.latencies.add(done.at_ms.saturating_sub(t));
        }
    }
}

/// A micro-batch: stale records of a dead replica when it is time to look for them, else new
/// ones, filling until `batch` records or `max_wait` after the first.
fn gather(
    engine: &mut dyn StreamEngine,
    opts: &Options,
    last_claim: &mut Option<Instant>,
) -> Result<Vec<Record>, String> {
    if last_claim.is_none_or(|t| t.elapsed() >= opts.claim_idle / 2) {
        *last_claim = Some(Instant::now());
        let stale = engine
            .claim_stale(opts.batch, opts.claim_idle)
            .map_err(|e| e.to_string())?;
        if !stale.is_empty() {
            eprintln!(
                "ringlet-serve: {} took over {} records left pending by another replica",
                opts.replica,
                stale.len()
            );
            return Ok(stale);
        }
    }
    // Until the first record: short waits, so that a signal or a new version is seen soon.
    let mut records = engine
        .read(opts.batch, Duration::from_millis(200))
        .map_err(|e| e.to_string())?;
    let first = Instant::now();
    while !records.is_empty() && records.len() < opts.batch {
        let left = opts.max_wait.saturating_sub(first.elapsed());
        if left.is_zero() {
            break;
        }
        let more = engine
            .read(opts.batch - records.len(), left)
            .map_err(|e| e.to_string())?;
        if more.is_empty() {
            break;
        }
        records.extend(more);
    }
    Ok(records)
}

/// Predictions for the good records and dead letters (with the reason) for the others.
fn score(
    version: &mut Version,
    records: &[Record],
    opts: &Options,
    batch_id: &str,
) -> Result<(Vec<Outcome>, Vec<Outcome>), String> {
    let mut x = Vec::new();
    let (mut good, mut dead) = (Vec::new(), Vec::new());
    for r in records {
        let checked = match r.deliveries > opts.max_deliveries {
            true => Err(format!(
                "handed out {} times without a result: every replica holding it died \
                 (--max-deliveries {})",
                r.deliveries, opts.max_deliveries
            )),
            false => version.scorer.input(r, &opts.field),
        };
        match checked {
            Ok(v) => {
                x.extend_from_slice(&v);
                good.push(r);
            }
            Err(reason) => {
                // A bounded copy of what came: the first 16 fields, 1 KiB of each.
                let original = r.fields.iter().take(16).map(|(k, v)| {
                    let cut = &v[..v.len().min(1024)];
                    (
                        format!("field.{k}"),
                        String::from_utf8_lossy(cut).into_owned(),
                    )
                });
                dead.push(Outcome {
                    id: r.id.clone(),
                    fields: [
                        ("reason".to_string(), reason),
                        ("replica".to_string(), opts.replica.clone()),
                    ]
                    .into_iter()
                    .chain(original)
                    .collect(),
                });
            }
        }
    }
    let predictions = version.scorer.score(&x)?;
    let outputs = good
        .iter()
        .zip(predictions)
        .map(|(r, p)| Outcome {
            id: r.id.clone(),
            fields: vec![
                ("class".into(), p.class.to_string()),
                ("confidence".into(), format!("{:.6}", p.confidence)),
                ("version".into(), version.label.clone()),
                ("batch".into(), batch_id.to_string()),
            ]
            .into_iter()
            .chain(p.next.map(|c| ("next".to_string(), c.to_string())))
            .collect(),
        })
        .collect();
    Ok((outputs, dead))
}

/// The features of a record: its field `field`, a JSON array of `features` finite numbers.
pub fn parse(r: &Record, field: &str, features: usize) -> Result<Vec<f32>, String> {
    let raw = r
        .field(field)
        .ok_or_else(|| format!("no field {field:?}"))?;
    if raw.len() > max_field_bytes(features) {
        return Err(format!(
            "field {field:?} is {} bytes, more than {features} numbers need",
            raw.len()
        ));
    }
    let values: Vec<f64> = serde_json::from_slice(raw)
        .map_err(|e| format!("field {field:?} is not a JSON array of numbers: {e}"))?;
    if values.len() != features {
        return Err(format!(
            "field {field:?} has {} numbers, the model takes {features}",
            values.len()
        ));
    }
    values
        .into_iter()
        .map(|v| match v as f32 {
            f if f.is_finite() => Ok(f),
            _ => Err(format!("field {field:?} holds {v}, out of range")),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(v: &str) -> Record {
        Record {
            deliveries: 1,
            id: "1-0".into(),
            fields: vec![("features".into(), v.as_bytes().to_vec())],
        }
    }

    #[test]
    fn malformed_records_are_refused_with_the_reason() {
        assert_eq!(
            parse(&record("[1, 2.5]"), "features", 2).unwrap(),
            [1.0, 2.5]
        );
        for (text, why) in [
            ("[1, 2, 3]", "has 3 numbers"),
            ("[1, \"a\"]", "not a JSON array"),
            ("{}", "not a JSON array"),
            ("[1, 1e300]", "out of range"),
            (&"1,".repeat(100), "bytes"),
        ] {
            let e = parse(&record(text), "features", 2).unwrap_err();
            assert!(e.contains(why), "{text}: {e}");
        }
        let e = parse(&record("[1]"), "x", 1).unwrap_err();
        assert!(e.contains("no field \"x\""), "{e}");
    }

    #[test]
    fn percentiles_pick_the_nearest_rank() {
        let mut l = Latencies::default();
        for ms in (1..=100).rev() {
            l.add(ms);
        }
        assert_eq!(l.percentile(0.5), Some(51));
        assert_eq!(l.percentile(0.99), Some(99));
        l.add(10_000_000);
        assert_eq!(l.percentile(1.0), Some(60_000));
        assert_eq!(Latencies::default().percentile(0.5), None);
    }
}
