//! Reading a rank's shards: from its host's copy where the map says it holds one, else from the
//! dataset's shared directory; collectively, for a job, with the layout `--data-locality` needs.

use super::{bad, read_index, read_shard, Index, ShardFile, ShardMap};
use crate::data::{DataError, Dataset, Held};
use ringlet_ddp::locality::ShardLayout;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Bytes and time spent reading shards, from the host's local copies and from the dataset's
/// own (shared) directory.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct ReadStats {
    pub local_bytes: u64,
    pub remote_bytes: u64,
    pub local_files: u64,
    pub remote_files: u64,
    pub seconds: f64,
}

/// A sharded dataset as a rank sees it: its index, the shared directory and the map.
#[derive(Clone, Debug)]
pub struct Sharded {
    pub dir: PathBuf,
    pub index: Index,
    pub map: Option<ShardMap>,
}

impl Sharded {
    /// Where `host` reads `file` from: its own copy if the map lists it there, else `dir`.
    fn location(&self, host: &str, shard: Option<usize>) -> (PathBuf, bool) {
        let entry = self.map.as_ref().and_then(|m| m.hosts.get(host));
        let local = entry.filter(|h| match shard {
            Some(s) => h.holds(s),
            None => h.test,
        });
        let file = match shard {
            Some(s) => &self.index.train[s].file,
            None => &self.index.test.file,
        };
        match local {
            Some(h) => (h.dir.join(file), true),
            None => (self.dir.join(file), false),
        }
    }

    /// Reads the training shards `wanted` (ascending) and the test set, as `host` does: the rows
    /// of the returned dataset are those shards' samples, in shard order.
    pub fn load(
        &self,
        host: &str,
        wanted: &[usize],
        budget: Duration,
    ) -> Result<(Dataset, ReadStats), DataError> {
        let t0 = Instant::now();
        // Each read gets what is left of the budget; one that runs out says what to raise.
        let read = |path: &Path, entry: &ShardFile| {
            let left = budget.saturating_sub(t0.elapsed());
            read_shard(path, entry, &self.index, left).map_err(|e| match t0.elapsed() < budget {
                true => e,
                false => bad(
                    path,
                    format!(
                        "{e}: the rank's shards must be read within {:.0} s (3/4 of RINGLET_TIMEOUT); raise RINGLET_TIMEOUT for storage this slow",
                        budget.as_secs_f64()
                    ),
                ),
            })
        };
        let mut stats = ReadStats::default();
        let index = &self.index;
        let sizes = index.sizes();
        let total = index.train_samples();
        let total = usize::try_from(total)
            .ok()
            .filter(|&t| t.checked_mul(index.features + 1).is_some())
            .ok_or_else(|| bad(&self.dir, format!("{total} samples do not fit in memory")))?;
        let mut count = |local: bool, bytes: u64| match local {
            true => (stats.local_bytes += bytes, stats.local_files += 1),
            false => (stats.remote_bytes += bytes, stats.remote_files += 1),
        };
        let (mut train_x, mut train_y) = (Vec::new(), Vec::new());
        let mut runs = Vec::new();
        let mut first = 0usize;
        let mut starts = Vec::with_capacity(sizes.len());
        for &s in &sizes {
            starts.push(first);
            first += s;
        }
        for &s in wanted {
            let (path, local) = self.location(host, Some(s));
            let (x, y) = read(&path, &index.train[s])?;
            count(local, index.train[s].bytes);
            runs.push((starts[s], y.len(), train_y.len()));
            train_x.extend_from_slice(&x);
            train_y.extend_from_slice(&y);
        }
        let (path, local) = self.location(host, None);
        let (test_x, test_y) = read(&path, &index.test)?;
        count(local, index.test.bytes);
        stats.seconds = t0.elapsed().as_secs_f64();
        let everything = wanted.len() == sizes.len();
        let data = Dataset {
            name: format!("shards:{}", self.dir.display()),
            features: index.features,
            classes: index.classes,
            train_x,
            train_y,
            test_x,
            test_y,
            held: (!everything).then_some(Held { total, runs }),
        };
        Ok((data, stats))
    }
}
/// Refuses, on every rank, a job whose ranks read different indexes or maps (a host-local copy
/// that differs, a file changed during start-up): their plans would differ, and samples be used
/// twice or not at all.
fn same_index_and_map(
    comm: &ringlet::Communicator,
    sharded: &Sharded,
) -> Result<(), ringlet::Error> {
    use sha2::{Digest, Sha256};
    let text = format!("{:?}{:?}", sharded.index, sharded.map);
    let mine: [u8; 32] = Sha256::digest(text.as_bytes()).into();
    let mut all = vec![0u8; 32 * comm.world_size()];
    comm.all_gather(&mine, &mut all)?;
    let differ: Vec<String> = all
        .chunks_exact(32)
        .enumerate()
        .filter(|(_, d)| *d != &all[..32])
        .map(|(r, _)| r.to_string())
        .collect();
    match differ.is_empty() {
        true => Ok(()),
        false => Err(ringlet::Error::Config(format!(
            "ranks {} read a different index.json or shard map from rank 0's: every rank must see the same files",
            differ.join(", ")
        ))),
    }
}

/// What `--data-locality` chose, and what reading took (for the job's report).
pub struct Opened {
    pub data: Dataset,
    pub locality: Option<ShardLayout>,
    /// This rank's reads, and all ranks' summed.
    pub mine: ReadStats,
    pub all: ReadStats,
}

/// Opens the sharded dataset `dir` for a job, collectively: every rank reads the index and the
/// map, learns which host every rank is on (`host`: this rank's name in the map), and reads its
/// shards — all of them (`locality` false), or the ones its host holds (plus any orphan it was
/// given). Any rank's failure fails every rank, naming it.
pub fn open_for_job(
    comm: &ringlet::Communicator,
    dir: &Path,
    map: Option<&Path>,
    host: &str,
    locality: bool,
) -> Result<Opened, ringlet::Error> {
    use ringlet_ddp::agree::at_start;
    const NAME: usize = 256;
    let deadline = comm.timeout();
    // A replacement joins members that are long past their start-up: it calls no collective
    // here (and there is no locality with replacements: --min-ranks is refused with it).
    let alone = comm.is_replacement();
    let opened = (|| {
        if host.is_empty() || host.len() >= NAME {
            return Err(format!(
                "data host name {host:?} must be 1 to {} bytes",
                NAME - 1
            ));
        }
        let index = read_index(dir, deadline).map_err(|e| e.to_string())?;
        let map = match map {
            Some(p) => {
                Some(ShardMap::read(p, index.train.len(), deadline).map_err(|e| e.to_string())?)
            }
            None => None,
        };
        Ok(Sharded {
            dir: dir.to_path_buf(),
            index,
            map,
        })
    })();
    let sharded = at_start(comm, opened, "opening the sharded dataset")?;
    let hosts = match alone {
        true => vec![host.to_string()],
        false => {
            same_index_and_map(comm, &sharded)?;
            let mut card = [0u8; NAME];
            card[0] = host.len() as u8;
            card[1..=host.len()].copy_from_slice(host.as_bytes());
            let mut cards = vec![0u8; NAME * comm.world_size()];
            comm.all_gather(&card, &mut cards)?;
            cards
                .chunks_exact(NAME)
                .map(|c| String::from_utf8_lossy(&c[1..=c[0] as usize]).into_owned())
                .collect()
        }
    };
    let planned = match locality {
        false => Ok((None, (0..sharded.index.train.len()).collect(), Vec::new())),
        true => sharded
            .layout(&hosts, host)
            .map(|(l, wanted, orphans)| (Some(l), wanted, orphans))
            .map_err(|e| e.to_string()),
    };
    let (layout, wanted, orphans) = at_start(comm, planned, "laying out the shards over hosts")?;
    if comm.rank() == 0 && !orphans.is_empty() {
        tracing::warn!(
            "data locality: shards {orphans:?} are held by no host of this job; they are read from {}",
            dir.display()
        );
    }
    // All of this rank's reads within 3/4 of the deadline the others wait with meanwhile, so that
    // storage too slow for it fails here, naming the file, before they give up on this rank.
    let loaded = sharded
        .load(host, &wanted, deadline.mul_f64(0.75))
        .map_err(|e| e.to_string());
    let (data, mine) = at_start(comm, loaded, "reading the shards")?;
    tracing::info!(
        "rank {} on data host {host}: {} shards in {:.2} s, {} B local, {} B remote",
        comm.rank(),
        mine.local_files + mine.remote_files,
        mine.seconds,
        mine.local_bytes,
        mine.remote_bytes
    );
    let mut sums = [
        mine.local_bytes as f64,
        mine.remote_bytes as f64,
        mine.local_files as f64,
        mine.remote_files as f64,
        mine.seconds,
    ];
    if !alone {
        comm.all_reduce(&mut sums, ringlet::ReduceOp::Sum)?;
    }
    let all = ReadStats {
        local_bytes: sums[0] as u64,
        remote_bytes: sums[1] as u64,
        local_files: sums[2] as u64,
        remote_files: sums[3] as u64,
        seconds: sums[4],
    };
    Ok(Opened {
        data,
        locality: layout,
        mine,
        all,
    })
}
