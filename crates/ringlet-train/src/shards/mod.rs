//! Sharded datasets: the format, the converter, the shard map, and reading a rank's shards.
//!
//! A sharded dataset is a directory holding `index.json` and shard files. Each shard is a
//! safetensors file with `x` (F32, `[samples, features]`) and `y` (U32, `[samples]`), so Python's
//! `safetensors` reads it; the training shards are `train-NNNNN.safetensors`, the held-out set
//! `test.safetensors`. The index lists every file with its sample count, byte length and SHA-256;
//! a file that does not match is refused, naming it.
//!
//! The **shard map** (JSON) says which hosts hold a local copy of which shards:
//!
//! ```json
//! {"hosts": {"node-a": {"dir": "/local/mnist", "shards": "0-7"},
//!            "node-b": {"dir": "/local/mnist", "shards": "8-15,test"}}}
//! ```
//!
//! A rank on a host of the map reads the shards listed there from that host's `dir`, and any
//! other shard from the dataset's own directory (`--dataset shards:DIR`: the shared, usually
//! remote, copy). Bytes read from each are counted ([`ReadStats`]).
//!
//! [`map`]: the shard map and the job's layout over hosts; [`job`]: reading a rank's shards.

mod job;
mod map;

pub use job::{open_for_job, Opened, ReadStats, Sharded};
pub use map::{parse_shards, HostShards, ShardMap};

use crate::data::{DataError, Dataset};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use safetensors::{Dtype, SafeTensors};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::Path;
use std::time::Duration;

/// The index's file name in a sharded dataset's directory.
pub const INDEX: &str = "index.json";
/// The index's `format`.
pub const FORMAT: &str = "ringlet-shards/1";
/// Seed of the converter's shuffle (samples are shuffled before sharding, so that every shard is
/// a uniform draw from the data even when the source is sorted by label).
const CONVERT_SEED: u64 = 0x5348_4152_4453;
/// Limits on what an index or a map may ask for: a corrupt or hostile file gets an error, not
/// an allocation of its choosing.
pub(crate) const MAX_INDEX_BYTES: u64 = 64 << 20;
const MAX_SHARDS: usize = 1 << 20;
const MAX_FEATURES: usize = 1 << 24;
const MAX_CLASSES: usize = 1 << 20;

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ShardFile {
    pub file: String,
    pub samples: u64,
    pub bytes: u64,
    pub sha256: String,
}

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Index {
    pub format: String,
    /// The source's name (`digits`, `synthetic:N`, an IDX directory).
    pub name: String,
    pub features: usize,
    pub classes: usize,
    pub train: Vec<ShardFile>,
    pub test: ShardFile,
}

impl Index {
    pub fn train_samples(&self) -> u64 {
        self.train.iter().map(|s| s.samples).sum()
    }

    /// Samples of each training shard (checked to fit in memory's address space at read).
    pub fn sizes(&self) -> Vec<usize> {
        self.train.iter().map(|s| s.samples as usize).collect()
    }
}

/// Writes `data` as a sharded dataset of `per_shard` samples per training shard into `out` (new,
/// or an empty directory). Files are written under temporary names and renamed; the index is
/// written last, so an interrupted conversion leaves no index.
pub fn convert(data: &Dataset, out: &Path, per_shard: usize) -> Result<Index, DataError> {
    let io = |file: &Path| {
        let file = file.display().to_string();
        move |source| DataError::Io { file, source }
    };
    if per_shard == 0 {
        return Err(bad(out, "samples per shard must be at least 1".into()));
    }
    if data.test_y.is_empty() || data.train_y.is_empty() {
        return Err(bad(
            out,
            format!("{} has an empty training or held-out set", data.name),
        ));
    }
    if out.exists() {
        let mut entries = std::fs::read_dir(out).map_err(io(out))?;
        if entries.next().is_some() {
            return Err(bad(
                out,
                "exists and is not empty; nothing was written".into(),
            ));
        }
    }
    std::fs::create_dir_all(out).map_err(io(out))?;
    let mut order: Vec<usize> = (0..data.train_len()).collect();
    order.shuffle(&mut ChaCha8Rng::seed_from_u64(CONVERT_SEED));
    let (mut x, mut y) = (Vec::new(), Vec::new());
    let mut train = Vec::new();
    for (i, ids) in order.chunks(per_shard).enumerate() {
        data.gather(ids, &mut x, &mut y);
        train.push(write_shard(
            out,
            &format!("train-{i:05}.safetensors"),
            &x,
            &y,
            data.features,
        )?);
    }
    let test = write_shard(
        out,
        "test.safetensors",
        &data.test_x,
        &data.test_y,
        data.features,
    )?;
    let index = Index {
        format: FORMAT.into(),
        name: data.name.clone(),
        features: data.features,
        classes: data.classes,
        train,
        test,
    };
    let text = serde_json::to_vec_pretty(&index).expect("an index serialises");
    write_atomic(&out.join(INDEX), &text)?;
    Ok(index)
}

pub(crate) fn bad(path: &Path, reason: String) -> DataError {
    DataError::BadSpec {
        spec: path.display().to_string(),
        reason,
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DataError> {
    let tmp = path.with_extension("partial");
    let io = |source| DataError::Io {
        file: path.display().to_string(),
        source,
    };
    std::fs::write(&tmp, bytes).map_err(io)?;
    std::fs::rename(&tmp, path).map_err(io)
}

fn write_shard(
    dir: &Path,
    name: &str,
    x: &[f32],
    y: &[u32],
    features: usize,
) -> Result<ShardFile, DataError> {
    use safetensors::tensor::TensorView;
    let n = y.len();
    let xb: &[u8] = bytemuck::cast_slice(x);
    let yb: &[u8] = bytemuck::cast_slice(y);
    let view = |dtype, shape: Vec<usize>, data| {
        TensorView::new(dtype, shape, data).map_err(|e| bad(dir, format!("{name}: {e}")))
    };
    let tensors = [
        ("x", view(Dtype::F32, vec![n, features], xb)?),
        ("y", view(Dtype::U32, vec![n], yb)?),
    ];
    let bytes =
        safetensors::serialize(tensors, None).map_err(|e| bad(dir, format!("{name}: {e}")))?;
    write_atomic(&dir.join(name), &bytes)?;
    Ok(ShardFile {
        file: name.into(),
        samples: n as u64,
        bytes: bytes.len() as u64,
        sha256: format!("{:x}", Sha256::digest(&bytes)),
    })
}

/// Reads at most `limit` bytes of `path` (more is an error), giving up after `deadline`: shared
/// storage that stops answering fails the read instead of hanging the rank.
pub(crate) fn read_bounded(
    path: &Path,
    limit: u64,
    deadline: Duration,
) -> Result<Vec<u8>, DataError> {
    let owned = path.to_path_buf();
    let (tx, rx) = std::sync::mpsc::channel();
    let io = |source| DataError::Io {
        file: path.display().to_string(),
        source,
    };
    std::thread::Builder::new()
        .name("ringlet-shard-read".into())
        .spawn(move || {
            let read = || -> std::io::Result<Vec<u8>> {
                let mut bytes = Vec::new();
                std::fs::File::open(&owned)?
                    .take(limit.saturating_add(1))
                    .read_to_end(&mut bytes)?;
                Ok(bytes)
            };
            let _ = tx.send(read());
        })
        .map_err(io)?;
    let bytes = match rx.recv_timeout(deadline) {
        Ok(r) => r.map_err(io)?,
        Err(_) => {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!(
                    "no answer from storage within {:.0} s",
                    deadline.as_secs_f64()
                ),
            )))
        }
    };
    if bytes.len() as u64 > limit {
        return Err(bad(path, format!("longer than the {limit} bytes expected")));
    }
    Ok(bytes)
}

/// Reads and checks `dir`'s index.
pub fn read_index(dir: &Path, deadline: Duration) -> Result<Index, DataError> {
    let path = dir.join(INDEX);
    let bytes = read_bounded(&path, MAX_INDEX_BYTES, deadline)?;
    let index: Index = serde_json::from_slice(&bytes)
        .map_err(|e| bad(&path, format!("not a sharded dataset's index: {e}")))?;
    let sum = index
        .train
        .iter()
        .try_fold(0u64, |a, s| a.checked_add(s.samples));
    let why = if index.format != FORMAT {
        Some(format!("format {:?}, expected {FORMAT:?}", index.format))
    } else if index.train.is_empty() || index.train.len() > MAX_SHARDS {
        Some(format!(
            "{} training shards (1 to {MAX_SHARDS})",
            index.train.len()
        ))
    } else if sum.is_none_or(|n| usize::try_from(n).is_err()) {
        Some("the shards' sample counts overflow".into())
    } else if !(1..=MAX_FEATURES).contains(&index.features)
        || !(2..=MAX_CLASSES).contains(&index.classes)
    {
        Some(format!(
            "{} features and {} classes",
            index.features, index.classes
        ))
    } else {
        index.train.iter().chain([&index.test]).find_map(|s| {
            let plain = !s.file.is_empty()
                && s.file
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
                && !s.file.starts_with('.');
            let expect = shard_bytes_bound(s.samples, index.features);
            match () {
                _ if !plain => Some(format!(
                    "shard file name {:?} is not a plain file name",
                    s.file
                )),
                _ if s.samples == 0 => Some(format!("{} has no samples", s.file)),
                _ if expect.is_none_or(|e| s.bytes > e) => Some(format!(
                    "{}: {} bytes for {} samples",
                    s.file, s.bytes, s.samples
                )),
                _ => None,
            }
        })
    };
    match why {
        Some(why) => Err(bad(&path, why)),
        None => Ok(index),
    }
}

/// At most how long a shard of `samples` samples of `features` may be (data plus a header of at
/// most 1 MiB), or `None` if that overflows or cannot be held in memory.
fn shard_bytes_bound(samples: u64, features: usize) -> Option<u64> {
    let per = (features as u64).checked_add(1)?.checked_mul(4)?;
    let total = samples.checked_mul(per)?.checked_add(1 << 20)?;
    usize::try_from(total).ok()?;
    Some(total)
}

/// Reads one shard file and checks it against its index entry: length, SHA-256, tensors, labels.
pub fn read_shard(
    path: &Path,
    entry: &ShardFile,
    index: &Index,
    deadline: Duration,
) -> Result<(Vec<f32>, Vec<u32>), DataError> {
    let bytes = read_bounded(path, entry.bytes, deadline)?;
    let refuse = |why: String| Err(bad(path, why));
    if bytes.len() as u64 != entry.bytes {
        return refuse(format!(
            "{} bytes, the index says {}",
            bytes.len(),
            entry.bytes
        ));
    }
    let sha = format!("{:x}", Sha256::digest(&bytes));
    if sha != entry.sha256 {
        return refuse(format!(
            "SHA-256 {sha} does not match the index's {}",
            entry.sha256
        ));
    }
    let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(path, e.to_string()))?;
    let n = entry.samples as usize;
    let tensor = |name: &str, dtype: Dtype, shape: &[usize]| {
        let t = st
            .tensor(name)
            .map_err(|e| bad(path, format!("tensor {name}: {e}")))?;
        if t.dtype() != dtype || t.shape() != shape {
            return Err(bad(
                path,
                format!(
                    "tensor {name} is {:?} {:?}, expected {dtype:?} {shape:?}",
                    t.dtype(),
                    t.shape()
                ),
            ));
        }
        Ok(t.data().to_vec())
    };
    let x: Vec<f32> = bytemuck::pod_collect_to_vec(&tensor("x", Dtype::F32, &[n, index.features])?);
    let y: Vec<u32> = bytemuck::pod_collect_to_vec(&tensor("y", Dtype::U32, &[n])?);
    if let Some(i) = y.iter().position(|&l| l as usize >= index.classes) {
        return refuse(format!(
            "label {} of sample {i} is not below {} classes",
            y[i], index.classes
        ));
    }
    if let Some(i) = x.iter().position(|v| !v.is_finite()) {
        return refuse(format!(
            "feature {} of sample {} is not finite",
            i % index.features,
            i / index.features
        ));
    }
    Ok((x, y))
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use std::path::PathBuf;

    pub(super) fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("ringlet-shards-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    pub(super) const T: Duration = Duration::from_secs(10);

    #[test]
    fn converted_digits_read_back_as_the_same_samples() {
        let data = crate::data::load("digits").unwrap();
        let dir = tmp("digits");
        let index = convert(&data, &dir, 300).unwrap();
        assert_eq!(index.train.len(), 5);
        assert_eq!(index.train_samples() as usize, data.train_len());
        let again = read_index(&dir, T).unwrap();
        assert_eq!(again, index);
        // A second conversion into the same directory writes nothing.
        assert!(convert(&data, &dir, 300).is_err());
        let sharded = Sharded {
            dir: dir.clone(),
            index,
            map: None,
        };
        let (all, stats) = sharded.load("any", &[0, 1, 2, 3, 4], T).unwrap();
        assert!(all.held.is_none());
        assert_eq!(stats.remote_files, 6);
        // The same multiset of (features, label) rows as the source, and the same test set.
        let rows = |d: &Dataset| {
            let mut r: Vec<(Vec<u32>, u32)> = (0..d.train_y.len())
                .map(|i| {
                    let x = &d.train_x[i * d.features..(i + 1) * d.features];
                    (x.iter().map(|v| v.to_bits()).collect(), d.train_y[i])
                })
                .collect();
            r.sort();
            r
        };
        assert_eq!(rows(&all), rows(&data));
        assert_eq!(
            (all.test_x, all.test_y),
            (data.test_x.clone(), data.test_y.clone())
        );
        // Only shards 1 and 3: rows map back to global ids.
        let (part, _) = sharded.load("any", &[1, 3], T).unwrap();
        assert_eq!(part.train_len(), data.train_len());
        assert_eq!(part.train_y.len(), 600);
        assert_eq!(part.row(300), Some(0));
        assert_eq!(part.row(900), Some(300));
        assert_eq!(part.row(0), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn tampered_shards_and_indexes_are_refused() {
        let data = crate::data::load("synthetic:100").unwrap();
        let dir = tmp("tamper");
        let index = convert(&data, &dir, 40).unwrap();
        let shard = dir.join(&index.train[1].file);
        let mut bytes = std::fs::read(&shard).unwrap();
        let last = bytes.len() - 1;
        bytes[last] ^= 1;
        std::fs::write(&shard, &bytes).unwrap();
        let err = read_shard(&shard, &index.train[1], &index, T)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("SHA-256") && err.contains("train-00001"),
            "{err}"
        );
        bytes.push(0);
        std::fs::write(&shard, &bytes).unwrap();
        let err = read_shard(&shard, &index.train[1], &index, T)
            .unwrap_err()
            .to_string();
        assert!(err.contains("longer than"), "{err}");
        for (from, to) in [
            ("\"features\": 64", "\"features\": 0"),
            ("\"samples\": 40", "\"samples\": 18446744073709551615"),
            ("train-00000.safetensors", "../train-00000.safetensors"),
            ("ringlet-shards/1", "ringlet-shards/9"),
        ] {
            let text = std::fs::read_to_string(dir.join(INDEX)).unwrap();
            let bad_dir = tmp("tamper-index");
            std::fs::create_dir_all(&bad_dir).unwrap();
            assert!(text.contains(from), "{from}");
            std::fs::write(bad_dir.join(INDEX), text.replacen(from, to, 1)).unwrap();
            assert!(read_index(&bad_dir, T).is_err(), "{to}");
            let _ = std::fs::remove_dir_all(&bad_dir);
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
