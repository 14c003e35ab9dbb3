//! Datasets for the data-parallel MLP classifier: this module owns everything between a dataset
//! spec string and row-major `f32` features with `u32` labels in memory, split into train and test.
//!
//! Specs accepted by [`load`]:
//! - `digits` (the default): scikit-learn's copy of the UCI 8×8 handwritten digits (1797 samples,
//!   64 features, 10 classes), embedded in the binary from `crates/ringlet-train/data/` (see the
//!   README there for origin, licence and the export command);
//! - `synthetic:N`: N deterministic training samples (64 features, 10 classes) for throughput
//!   tests, plus a test set of `max(N / 5, 1)` samples drawn from a different random stream;
//! - `PATH` or `idx:PATH`: a directory of MNIST-format IDX files (`train-images-idx3-ubyte`,
//!   `train-labels-idx1-ubyte`, optional `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`; the
//!   dotted `.idx3-ubyte` / `.idx1-ubyte` names are accepted too). Files must be uncompressed.
//!
//! Held-out split: where no test files exist (the embedded digits, a directory without `t10k`
//! files) the indices are shuffled with a fixed-seed ChaCha8 permutation and the last
//! `max(n / 5, 1)` of that permutation form the test set. A plain "last 20%" would take a single
//! class from a file sorted by label. Both parts keep file order, so the split is reproducible and
//! independent of anything but `n`.
//!
//! Pixel scaling: IDX pixels are divided by the largest value their format can hold, guessed from
//! the data (train and test together, so both share one scale): 16 if no pixel exceeds 16 (the
//! digits' 0..16 counts), else 255 (MNIST). Number of classes of an IDX directory: the largest
//! label + 1.

use std::path::{Path, PathBuf};

use rand::{Rng, RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Exported once by `data/export_digits.py`; the README in that folder has their SHA-256.
const DIGITS_IMAGES: &[u8] = include_bytes!("../data/digits-images.idx3-ubyte");
const DIGITS_LABELS: &[u8] = include_bytes!("../data/digits-labels.idx1-ubyte");
const DIGITS_CLASSES: usize = 10;

/// IDX data type code for unsigned bytes, the only one MNIST-format files use.
const IDX_TYPE_U8: u8 = 0x08;

/// Seed of the held-out permutation: changing it changes every reported test accuracy.
const HOLDOUT_SEED: u64 = 0x5249_4e47_4c45_5431; // "RINGLET1"

/// Seed of the synthetic data; stream 0 draws the class centres, 1 the train set, 2 the test set.
const SYNTHETIC_SEED: u64 = 0x5359_4e54_4845_5449; // "SYNTHETI"
/// Features per synthetic sample (the same as the digits, so the same model shapes fit both).
pub const SYNTHETIC_FEATURES: usize = 64;
/// Classes of the synthetic data.
pub const SYNTHETIC_CLASSES: usize = 10;
/// Per-feature noise standard deviation around centres drawn uniformly from [0, 1)^64: chosen so
/// that even the Bayes-optimal (nearest-centre) classifier scores about 85-90%, i.e. learnable but
/// never trivially 100%.
const SYNTHETIC_NOISE: f32 = 0.8;

/// A classification dataset in memory: features row-major f32.
#[derive(Clone, Debug)]
pub struct Dataset {
    /// "digits", "synthetic:1000", or the directory path.
    pub name: String,
    /// Features per sample.
    pub features: usize,
    pub classes: usize,
    /// `train_len * features` values.
    pub train_x: Vec<f32>,
    pub train_y: Vec<u32>,
    /// `test_len * features` values.
    pub test_x: Vec<f32>,
    pub test_y: Vec<u32>,
    /// Which samples of the training set the rows are, when they are only some of them (a rank
    /// with data locality holds its host's shards); `None`: all, in order.
    pub held: Option<Held>,
}

/// Some samples of a training set of `total`: `runs` of `(first sample id, rows, first row)`,
/// ascending by sample id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Held {
    pub total: usize,
    pub runs: Vec<(usize, usize, usize)>,
}

impl Dataset {
    /// Samples in the training set (all ranks together, with data locality).
    pub fn train_len(&self) -> usize {
        self.held.as_ref().map_or(self.train_y.len(), |h| h.total)
    }

    /// The row holding training sample `id`, if this process holds it.
    pub fn row(&self, id: usize) -> Option<usize> {
        let Some(held) = &self.held else {
            return (id < self.train_y.len()).then_some(id);
        };
        let i = held.runs.partition_point(|&(first, _, _)| first <= id);
        let &(first, rows, row) = held.runs.get(i.checked_sub(1)?)?;
        (id - first < rows).then_some(row + id - first)
    }

    pub fn test_len(&self) -> usize {
        self.test_y.len()
    }

    /// Copies the samples with the given train indices into x (len*features) and y.
    ///
    /// `x` and `y` are cleared first and keep their capacity, so a batch loop can reuse them
    /// without reallocating.
    ///
    /// # Panics
    /// If a sample is not held here (a caller bug, not bad input data).
    pub fn gather(&self, indices: &[usize], x: &mut Vec<f32>, y: &mut Vec<u32>) {
        let rows = indices.iter().map(|&i| {
            self.row(i)
                .unwrap_or_else(|| panic!("sample {i} is not held by this process"))
        });
        self.gather_rows(rows, x, y);
    }

    /// As [`gather`](Self::gather), by row rather than by sample id.
    pub fn gather_rows(
        &self,
        rows: impl ExactSizeIterator<Item = usize>,
        x: &mut Vec<f32>,
        y: &mut Vec<u32>,
    ) {
        let f = self.features;
        x.clear();
        y.clear();
        x.reserve(rows.len() * f);
        y.reserve(rows.len());
        for i in rows {
            x.extend_from_slice(&self.train_x[i * f..(i + 1) * f]);
            y.push(self.train_y[i]);
        }
    }
}

/// Why a dataset could not be loaded; every message names the spec, file or directory at fault.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    #[error(
        "unknown dataset {spec:?}: expected \"digits\", \"synthetic:N\", or a directory of \
         MNIST-format IDX files (\"PATH\" or \"idx:PATH\")"
    )]
    UnknownSpec { spec: String },
    #[error("bad dataset spec {spec:?}: {reason}")]
    BadSpec { spec: String, reason: String },
    #[error("{file}: {source}")]
    Io {
        file: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{dir}: not a usable MNIST-format IDX directory: {reason}")]
    MissingFiles { dir: String, reason: String },
    #[error("{file}: bad IDX magic 0x{magic:08x}: {reason}")]
    BadMagic {
        file: String,
        magic: u32,
        reason: String,
    },
    #[error("{file}: truncated: {reason}")]
    Truncated { file: String, reason: String },
    #[error(
        "{file}: {extra} unexpected bytes after the {expected} bytes its IDX header describes"
    )]
    TrailingBytes {
        file: String,
        expected: usize,
        extra: usize,
    },
    #[error("{file}: bad IDX dimensions {dims:?}: {reason}")]
    BadDims {
        file: String,
        dims: Vec<u32>,
        reason: String,
    },
    #[error("{images} has {n_images} images but {labels} has {n_labels} labels")]
    CountMismatch {
        images: String,
        n_images: usize,
        labels: String,
        n_labels: usize,
    },
    #[error("{file}: samples are {got:?} but those of {other} are {expected:?}")]
    ShapeMismatch {
        file: String,
        got: Vec<usize>,
        other: String,
        expected: Vec<usize>,
    },
    #[error("{file}: label {label} of sample {index} is out of range for {classes} classes")]
    LabelOutOfRange {
        file: String,
        index: usize,
        label: u8,
        classes: usize,
    },
    /// Too few samples or classes to train and evaluate.
    #[error("{name}: {reason}")]
    TooSmall { name: String, reason: String },
    /// `synthetic:N` with an N whose samples do not fit in memory.
    #[error("{name}: cannot allocate {bytes} bytes for the samples")]
    TooLarge { name: String, bytes: u128 },
}

/// "digits" (the embedded default), "synthetic:N", or a path to a directory of MNIST-format IDX
/// files (also accepted as "idx:PATH").
pub fn load(spec: &str) -> Result<Dataset, DataError> {
    if spec == "digits" {
        return load_digits();
    }
    if let Some(n) = spec.strip_prefix("synthetic:") {
        let n = parse_count(n).ok_or_else(|| DataError::BadSpec {
            spec: spec.to_string(),
            reason: format!("N = {n:?} is not a positive integer"),
        })?;
        return synthetic(n);
    }
    if spec == "synthetic" {
        return Err(DataError::BadSpec {
            spec: spec.to_string(),
            reason: "give the number of training samples, e.g. synthetic:100000".to_string(),
        });
    }
    if let Some(dir) = spec.strip_prefix("idx:") {
        return load_idx_dir(Path::new(dir));
    }
    let path = Path::new(spec);
    // A bare word that is not an existing path is far more likely a typo of a built-in name
    // ("digit") than a missing directory, so say what the valid specs are.
    if spec.is_empty() || !path.exists() {
        return Err(DataError::UnknownSpec {
            spec: spec.to_string(),
        });
    }
    load_idx_dir(path)
}

/// Accepts `1000` and `1_000_000`; zero is rejected because an empty training set cannot train.
fn parse_count(s: &str) -> Option<usize> {
    if s.is_empty() || s.starts_with('_') || !s.bytes().all(|b| b.is_ascii_digit() || b == b'_') {
        return None;
    }
    let n: usize = s.replace('_', "").parse().ok()?;
    (n > 0).then_some(n)
}

fn load_digits() -> Result<Dataset, DataError> {
    let images_name = "digits-images.idx3-ubyte (embedded)";
    let labels_name = "digits-labels.idx1-ubyte (embedded)";
    let pair = parse_pair(DIGITS_IMAGES, images_name, DIGITS_LABELS, labels_name)?;
    build("digits".to_string(), &pair, None, Some(DIGITS_CLASSES))
}

/// Looks for `{stem}-{suffix}` or `{stem}.{suffix}` in `dir`.
fn find_file(dir: &Path, stem: &str, suffix: &str) -> Option<PathBuf> {
    [format!("{stem}-{suffix}"), format!("{stem}.{suffix}")]
        .into_iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
}

fn find_gz(dir: &Path, stem: &str, suffix: &str) -> Option<PathBuf> {
    [format!("{stem}-{suffix}.gz"), format!("{stem}.{suffix}.gz")]
        .into_iter()
        .map(|name| dir.join(name))
        .find(|p| p.is_file())
}

fn require_file(dir: &Path, stem: &str, suffix: &str) -> Result<PathBuf, DataError> {
    find_file(dir, stem, suffix).ok_or_else(|| missing_file(dir, stem, suffix))
}

fn missing_file(dir: &Path, stem: &str, suffix: &str) -> DataError {
    let reason = match find_gz(dir, stem, suffix) {
        // MNIST is distributed gzipped; there is no decompressor among our dependencies.
        Some(gz) => format!(
            "found {} but not its decompressed form: gunzip it first",
            gz.display()
        ),
        None => format!("no {stem}-{suffix} (or {stem}.{suffix})"),
    };
    DataError::MissingFiles {
        dir: dir.display().to_string(),
        reason,
    }
}

fn read(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|source| DataError::Io {
        file: path.display().to_string(),
        source,
    })
}

fn load_idx_dir(dir: &Path) -> Result<Dataset, DataError> {
    let name = dir.display().to_string();
    let meta = std::fs::metadata(dir).map_err(|source| DataError::Io {
        file: name.clone(),
        source,
    })?;
    if !meta.is_dir() {
        return Err(DataError::MissingFiles {
            dir: name,
            reason: "not a directory".to_string(),
        });
    }
    let train_images = require_file(dir, "train-images", "idx3-ubyte")?;
    let train_labels = require_file(dir, "train-labels", "idx1-ubyte")?;
    let test_images = find_file(dir, "t10k-images", "idx3-ubyte");
    let test_labels = find_file(dir, "t10k-labels", "idx1-ubyte");
    // Half a test set is more likely an interrupted download than an intent to hold out.
    let test = match (test_images, test_labels) {
        (Some(i), Some(l)) => Some((i, l)),
        (None, None) => None,
        (Some(_), None) => return Err(missing_file(dir, "t10k-labels", "idx1-ubyte")),
        (None, Some(_)) => return Err(missing_file(dir, "t10k-images", "idx3-ubyte")),
    };

    let (ti, tl) = (read(&train_images)?, read(&train_labels)?);
    let train = parse_pair(
        &ti,
        &train_images.display().to_string(),
        &tl,
        &train_labels.display().to_string(),
    )?;
    match test {
        Some((images, labels)) => {
            let (ei, el) = (read(&images)?, read(&labels)?);
            let test = parse_pair(
                &ei,
                &images.display().to_string(),
                &el,
                &labels.display().to_string(),
            )?;
            build(name, &train, Some(&test), None)
        }
        None => build(name, &train, None, None),
    }
}

/// What an IDX file must hold.
#[derive(Clone, Copy)]
enum IdxKind {
    /// `[n, d1, d2, ...]`, at least two dimensions (MNIST: `[n, 28, 28]`).
    Images,
    /// `[n]`.
    Labels,
}

/// A parsed u8 IDX file, borrowing its data.
struct Idx<'a> {
    dims: Vec<usize>,
    data: &'a [u8],
}

/// Checks the magic, the dimensions and that the data is exactly as long as they say.
fn parse_idx<'a>(bytes: &'a [u8], file: &str, kind: IdxKind) -> Result<Idx<'a>, DataError> {
    let Some(magic_bytes) = bytes.first_chunk::<4>() else {
        return Err(DataError::Truncated {
            file: file.to_string(),
            reason: format!("{} bytes, shorter than the 4-byte IDX magic", bytes.len()),
        });
    };
    let magic = u32::from_be_bytes(*magic_bytes);
    let bad_magic = |reason: String| DataError::BadMagic {
        file: file.to_string(),
        magic,
        reason,
    };
    let expected = match kind {
        IdxKind::Images => "expected 0x00000803 (u8 images [n, rows, cols])",
        IdxKind::Labels => "expected 0x00000801 (u8 labels [n])",
    };
    if magic_bytes[..2] != [0, 0] {
        return Err(bad_magic(format!(
            "not an IDX file (the first two bytes must be zero; a gzipped file starts 1f 8b); \
             {expected}"
        )));
    }
    if magic_bytes[2] != IDX_TYPE_U8 {
        return Err(bad_magic(format!(
            "data type 0x{:02x} is not 0x08 (unsigned byte), the only one supported; {expected}",
            magic_bytes[2]
        )));
    }
    let ndims = usize::from(magic_bytes[3]);
    let ndims_ok = match kind {
        IdxKind::Images => ndims >= 2,
        IdxKind::Labels => ndims == 1,
    };
    if !ndims_ok {
        return Err(bad_magic(format!("{ndims} dimensions; {expected}")));
    }

    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(DataError::Truncated {
            file: file.to_string(),
            reason: format!(
                "{} bytes, but the header of {ndims} dimensions needs {header}",
                bytes.len()
            ),
        });
    }
    let raw_dims: Vec<u32> = bytes[4..header]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let bad_dims = |reason: &str| DataError::BadDims {
        file: file.to_string(),
        dims: raw_dims.clone(),
        reason: reason.to_string(),
    };
    let dims: Vec<usize> = raw_dims
        .iter()
        .map(|&d| usize::try_from(d))
        .collect::<Result<_, _>>()
        .map_err(|_| bad_dims("a dimension does not fit in usize"))?;
    if dims[1..].contains(&0) {
        return Err(bad_dims("a per-sample dimension is zero"));
    }
    let len = dims
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| bad_dims("the element count overflows"))?;

    let data = &bytes[header..];
    if data.len() < len {
        return Err(DataError::Truncated {
            file: file.to_string(),
            reason: format!(
                "dimensions {dims:?} need {len} data bytes after the {header}-byte header, \
                 the file has {}",
                data.len()
            ),
        });
    }
    if data.len() > len {
        return Err(DataError::TrailingBytes {
            file: file.to_string(),
            expected: header + len,
            extra: data.len() - len,
        });
    }
    Ok(Idx { dims, data })
}

/// An images file and its labels file, parsed and cross-checked, still raw u8.
struct Pair<'a> {
    images_file: String,
    labels_file: String,
    /// Per-sample dimensions, e.g. `[28, 28]`.
    shape: Vec<usize>,
    pixels: &'a [u8],
    labels: &'a [u8],
}

impl Pair<'_> {
    fn features(&self) -> usize {
        self.shape.iter().product()
    }
}

fn parse_pair<'a>(
    images: &'a [u8],
    images_file: &str,
    labels: &'a [u8],
    labels_file: &str,
) -> Result<Pair<'a>, DataError> {
    let images = parse_idx(images, images_file, IdxKind::Images)?;
    let labels = parse_idx(labels, labels_file, IdxKind::Labels)?;
    if images.dims[0] != labels.dims[0] {
        return Err(DataError::CountMismatch {
            images: images_file.to_string(),
            n_images: images.dims[0],
            labels: labels_file.to_string(),
            n_labels: labels.dims[0],
        });
    }
    Ok(Pair {
        images_file: images_file.to_string(),
        labels_file: labels_file.to_string(),
        shape: images.dims[1..].to_vec(),
        pixels: images.data,
        labels: labels.data,
    })
}

/// Scales, checks labels and splits (or uses `test`). `classes`: the fixed class count of a known
/// dataset, or `None` to take the largest label + 1.
fn build(
    name: String,
    train: &Pair<'_>,
    test: Option<&Pair<'_>>,
    classes: Option<usize>,
) -> Result<Dataset, DataError> {
    if let Some(test) = test {
        if test.shape != train.shape {
            return Err(DataError::ShapeMismatch {
                file: test.images_file.clone(),
                got: test.shape.clone(),
                other: train.images_file.clone(),
                expected: train.shape.clone(),
            });
        }
    }
    let pairs: Vec<&Pair<'_>> = std::iter::once(train).chain(test).collect();

    let max_label = pairs
        .iter()
        .flat_map(|p| p.labels.iter().copied())
        .max()
        .unwrap_or(0);
    let classes = match classes {
        Some(classes) => {
            for p in &pairs {
                if let Some((index, &label)) = p
                    .labels
                    .iter()
                    .enumerate()
                    .find(|(_, &l)| usize::from(l) >= classes)
                {
                    return Err(DataError::LabelOutOfRange {
                        file: p.labels_file.clone(),
                        index,
                        label,
                        classes,
                    });
                }
            }
            classes
        }
        None => usize::from(max_label) + 1,
    };
    if classes < 2 {
        return Err(DataError::TooSmall {
            name,
            reason: format!("every label is {max_label}: a classifier needs at least 2 classes"),
        });
    }

    let max_pixel = pairs
        .iter()
        .flat_map(|p| p.pixels.iter().copied())
        .max()
        .unwrap_or(0);
    // A true division, not a multiply by 1/full: the result is then the correctly rounded
    // p / full, the same value any other reader of the files computes.
    let full: f32 = if max_pixel <= 16 { 16.0 } else { 255.0 };
    let to_x = |pixels: &[u8]| pixels.iter().map(|&p| f32::from(p) / full).collect();
    let to_y = |labels: &[u8]| labels.iter().map(|&l| u32::from(l)).collect();

    let features = train.features();
    let n = train.labels.len();
    let (train_x, train_y, test_x, test_y) = match test {
        Some(test) => {
            if n == 0 || test.labels.is_empty() {
                return Err(DataError::TooSmall {
                    name,
                    reason: format!(
                        "{} train and {} test samples: both must be non-empty",
                        n,
                        test.labels.len()
                    ),
                });
            }
            (
                to_x(train.pixels),
                to_y(train.labels),
                to_x(test.pixels),
                to_y(test.labels),
            )
        }
        None => {
            if n < 2 {
                return Err(DataError::TooSmall {
                    name,
                    reason: format!("{n} samples: holding out a test set needs at least 2"),
                });
            }
            let (train_idx, test_idx) = holdout_split(n);
            let rows = |idx: &[usize]| -> (Vec<f32>, Vec<u32>) {
                let x = idx
                    .iter()
                    .flat_map(|&i| &train.pixels[i * features..(i + 1) * features])
                    .map(|&p| f32::from(p) / full)
                    .collect();
                let y = idx.iter().map(|&i| u32::from(train.labels[i])).collect();
                (x, y)
            };
            let (train_x, train_y) = rows(&train_idx);
            let (test_x, test_y) = rows(&test_idx);
            (train_x, train_y, test_x, test_y)
        }
    };
    Ok(Dataset {
        name,
        features,
        classes,
        train_x,
        train_y,
        test_x,
        test_y,
        held: None,
    })
}

/// Splits `0..n` (n >= 2) into (train, test) indices: the last `max(n / 5, 1)` entries of a
/// fixed-seed permutation are the test set; both parts are returned in ascending (file) order.
fn holdout_split(n: usize) -> (Vec<usize>, Vec<usize>) {
    let mut perm: Vec<usize> = (0..n).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(HOLDOUT_SEED);
    // Fisher-Yates, written out so the permutation depends only on the ChaCha stream.
    for i in (1..n).rev() {
        let j = rng.random_range(0..=i);
        perm.swap(i, j);
    }
    let test_len = (n / 5).max(1);
    let mut test = perm.split_off(n - test_len);
    perm.sort_unstable();
    test.sort_unstable();
    (perm, test)
}

/// The fixed class centres of the synthetic data, `SYNTHETIC_CLASSES x SYNTHETIC_FEATURES`.
fn synthetic_centres() -> Vec<f32> {
    let mut rng = ChaCha8Rng::seed_from_u64(SYNTHETIC_SEED);
    rng.set_stream(0);
    (0..SYNTHETIC_CLASSES * SYNTHETIC_FEATURES)
        .map(|_| rng.random::<f32>())
        .collect()
}

fn synthetic(n: usize) -> Result<Dataset, DataError> {
    let name = format!("synthetic:{n}");
    let centres = synthetic_centres();
    let (train_x, train_y) = synthetic_samples(&name, &centres, n, 1)?;
    let (test_x, test_y) = synthetic_samples(&name, &centres, (n / 5).max(1), 2)?;
    Ok(Dataset {
        name,
        features: SYNTHETIC_FEATURES,
        classes: SYNTHETIC_CLASSES,
        train_x,
        train_y,
        test_x,
        test_y,
        held: None,
    })
}

/// `n` samples from ChaCha8 stream `stream`. Samples are drawn one after another from the stream,
/// so `synthetic:N` is a prefix of `synthetic:M` for M > N (train and test alike).
fn synthetic_samples(
    name: &str,
    centres: &[f32],
    n: usize,
    stream: u64,
) -> Result<(Vec<f32>, Vec<u32>), DataError> {
    let too_large = || DataError::TooLarge {
        name: name.to_string(),
        bytes: n as u128 * (SYNTHETIC_FEATURES as u128 + 1) * 4,
    };
    // A huge N must come back as an error, not abort the process on allocation failure.
    let len = n.checked_mul(SYNTHETIC_FEATURES).ok_or_else(too_large)?;
    let mut x: Vec<f32> = Vec::new();
    x.try_reserve_exact(len).map_err(|_| too_large())?;
    let mut y: Vec<u32> = Vec::new();
    y.try_reserve_exact(n).map_err(|_| too_large())?;

    let mut rng = ChaCha8Rng::seed_from_u64(SYNTHETIC_SEED);
    rng.set_stream(stream);
    // Noise per feature: the sum of four 16-bit uniforms from one u64 (Irwin-Hall, close to a
    // Gaussian), rescaled to mean 0 and standard deviation SYNTHETIC_NOISE. One RNG word per
    // feature instead of Box-Muller's logarithm and trigonometry keeps 1M samples well under a
    // second; the sum of 4 U(0, 1) has mean 2 and standard deviation 1/sqrt(3).
    let k = SYNTHETIC_NOISE * 3f32.sqrt();
    let a = k / 65535.0;
    let b = -2.0 * k;
    // Four 16-bit lanes per feature, drawn for a whole sample at once.
    let mut noise = [0u8; SYNTHETIC_FEATURES * 8];
    for _ in 0..n {
        let label = rng.random_range(0..SYNTHETIC_CLASSES as u32);
        let start = label as usize * SYNTHETIC_FEATURES;
        rng.fill_bytes(&mut noise);
        let centre = &centres[start..start + SYNTHETIC_FEATURES];
        x.extend(centre.iter().zip(noise.chunks_exact(8)).map(|(&c, r)| {
            let lane = |i: usize| u32::from(u16::from_le_bytes([r[i], r[i + 1]]));
            let sum = lane(0) + lane(2) + lane(4) + lane(6);
            c + sum as f32 * a + b
        }));
        y.push(label);
    }
    Ok((x, y))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fresh directory per test (tests run in parallel threads of one process).
    struct TempDir(PathBuf);

    impl TempDir {
        fn new(tag: &str) -> Self {
            let dir = std::env::temp_dir()
                .join(format!("ringlet-train-data-{}-{tag}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            TempDir(dir)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn idx_bytes(magic: u32, dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut b = magic.to_be_bytes().to_vec();
        for d in dims {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b.extend_from_slice(data);
        b
    }

    fn write_images(path: &Path, n: u32, h: u32, w: u32, pixels: &[u8]) {
        std::fs::write(path, idx_bytes(0x0803, &[n, h, w], pixels)).unwrap();
    }

    fn write_labels(path: &Path, labels: &[u8]) {
        std::fs::write(path, idx_bytes(0x0801, &[labels.len() as u32], labels)).unwrap();
    }

    /// `n` 2x3 images whose pixels encode the sample index, labels `i % classes`.
    fn sample_set(n: usize, classes: usize, base: u8) -> (Vec<u8>, Vec<u8>) {
        let pixels = (0..n)
            .flat_map(|i| (0..6).map(move |j| base.wrapping_add((i * 6 + j) as u8)))
            .collect();
        let labels = (0..n).map(|i| (i % classes) as u8).collect();
        (pixels, labels)
    }

    fn s(p: &Path) -> &str {
        p.to_str().unwrap()
    }

    #[test]
    fn digits_loads_with_all_classes_in_both_splits() {
        let d = load("digits").unwrap();
        assert_eq!(d.name, "digits");
        assert_eq!(d.features, 64);
        assert_eq!(d.classes, 10);
        assert_eq!(d.train_len() + d.test_len(), 1797);
        assert_eq!(d.test_len(), 1797 / 5);
        assert_eq!(d.train_x.len(), d.train_len() * 64);
        assert_eq!(d.test_x.len(), d.test_len() * 64);
        for ys in [&d.train_y, &d.test_y] {
            let mut seen = [false; 10];
            for &y in ys.iter() {
                seen[y as usize] = true;
            }
            assert!(seen.iter().all(|&s| s), "a class is missing: {seen:?}");
        }
        let all = d.train_x.iter().chain(&d.test_x);
        assert!(all.clone().all(|&v| (0.0..=1.0).contains(&v)));
        // 16 is the digits' full scale, so the brightest pixel must map to exactly 1.
        assert_eq!(all.fold(0f32, |m, &v| m.max(v)), 1.0);
        // sklearn's digits.images[0] is a 0 with top row 0 0 5 13 9 1 0 0; the fixed split keeps
        // it in train, and train keeps file order, so it is train sample 0.
        let first: Vec<f32> = [0., 0., 5., 13., 9., 1., 0., 0.].map(|v| v / 16.0).to_vec();
        assert_eq!(d.train_y[0], 0);
        assert_eq!(&d.train_x[..8], &first[..]);
    }

    #[test]
    fn holdout_split_is_a_deterministic_partition() {
        let (train, test) = holdout_split(1797);
        assert_eq!((train.len(), test.len()), (1438, 359));
        assert_eq!(holdout_split(1797), (train.clone(), test.clone()));
        let mut all: Vec<usize> = train.iter().chain(&test).copied().collect();
        all.sort_unstable();
        assert_eq!(all, (0..1797).collect::<Vec<_>>());
        assert!(train.windows(2).all(|w| w[0] < w[1]));
        // Not simply the tail: the shuffled test set reaches into the first half.
        assert!(test[0] < 1797 / 2);
        assert_eq!(holdout_split(2).1.len(), 1);
    }

    #[test]
    fn idx_directory_with_t10k_round_trips() {
        let dir = TempDir::new("with-t10k");
        let (px, lb) = sample_set(5, 3, 10);
        let (tpx, tlb) = sample_set(2, 3, 200);
        write_images(&dir.0.join("train-images-idx3-ubyte"), 5, 2, 3, &px);
        write_labels(&dir.0.join("train-labels-idx1-ubyte"), &lb);
        // The dotted variants are accepted too.
        write_images(&dir.0.join("t10k-images.idx3-ubyte"), 2, 2, 3, &tpx);
        write_labels(&dir.0.join("t10k-labels.idx1-ubyte"), &tlb);

        let d = load(s(&dir.0)).unwrap();
        assert_eq!(d.name, s(&dir.0));
        assert_eq!((d.features, d.classes), (6, 3));
        assert_eq!((d.train_len(), d.test_len()), (5, 2));
        // Pixels above 16 mean an 8-bit scale.
        let scaled = |v: &[u8]| v.iter().map(|&p| p as f32 / 255.0).collect::<Vec<_>>();
        assert_eq!(d.train_x, scaled(&px));
        assert_eq!(d.test_x, scaled(&tpx));
        assert_eq!(d.train_y, vec![0, 1, 2, 0, 1]);
        assert_eq!(d.test_y, vec![0, 1]);

        let via_prefix = load(&format!("idx:{}", s(&dir.0))).unwrap();
        assert_eq!(via_prefix.train_x, d.train_x);
        assert_eq!(via_prefix.test_y, d.test_y);
    }

    #[test]
    fn idx_directory_without_t10k_holds_out_a_fifth() {
        let dir = TempDir::new("no-t10k");
        // Pixels 0..=16 only: the digits' 16-level scale.
        let px: Vec<u8> = (0..10 * 6).map(|i| (i % 17) as u8).collect();
        let lb: Vec<u8> = (0..10).map(|i| (i % 4) as u8).collect();
        write_images(&dir.0.join("train-images.idx3-ubyte"), 10, 3, 2, &px);
        write_labels(&dir.0.join("train-labels-idx1-ubyte"), &lb);

        let d = load(&format!("idx:{}", s(&dir.0))).unwrap();
        assert_eq!((d.features, d.classes), (6, 4));
        assert_eq!((d.train_len(), d.test_len()), (8, 2));
        let (train_idx, test_idx) = holdout_split(10);
        for (idx, xs, ys) in [
            (&train_idx, &d.train_x, &d.train_y),
            (&test_idx, &d.test_x, &d.test_y),
        ] {
            for (row, &i) in idx.iter().enumerate() {
                let want: Vec<f32> = px[i * 6..i * 6 + 6]
                    .iter()
                    .map(|&p| p as f32 / 16.0)
                    .collect();
                assert_eq!(&xs[row * 6..row * 6 + 6], &want[..]);
                assert_eq!(ys[row], lb[i] as u32);
            }
        }
    }

    /// Writes a valid 4-sample train pair, then lets `corrupt` spoil it, and returns the error.
    fn load_corrupted(tag: &str, corrupt: impl FnOnce(&Path, &Path)) -> (String, DataError) {
        let dir = TempDir::new(tag);
        let images = dir.0.join("train-images-idx3-ubyte");
        let labels = dir.0.join("train-labels-idx1-ubyte");
        let (px, lb) = sample_set(4, 2, 0);
        write_images(&images, 4, 2, 3, &px);
        write_labels(&labels, &lb);
        corrupt(&images, &labels);
        let err = load(s(&dir.0)).unwrap_err();
        (err.to_string(), err)
    }

    #[test]
    fn bad_magic_names_the_file() {
        let (msg, err) = load_corrupted("bad-magic", |images, _| {
            let mut b = std::fs::read(images).unwrap();
            b[..4].copy_from_slice(&[0x1f, 0x8b, 0x08, 0x00]); // a gzip header
            std::fs::write(images, b).unwrap();
        });
        assert!(matches!(err, DataError::BadMagic { .. }), "{err:?}");
        assert!(msg.contains("train-images-idx3-ubyte"), "{msg}");
        assert!(msg.contains("0x1f8b0800"), "{msg}");

        // Labels magic in the images file: right type, wrong number of dimensions.
        let (msg, err) = load_corrupted("swapped-magic", |images, _| {
            let mut b = std::fs::read(images).unwrap();
            b[3] = 1;
            std::fs::write(images, b).unwrap();
        });
        assert!(matches!(err, DataError::BadMagic { .. }), "{err:?}");
        assert!(msg.contains("train-images-idx3-ubyte"), "{msg}");
    }

    #[test]
    fn truncated_file_names_the_file() {
        let (msg, err) = load_corrupted("truncated", |images, _| {
            let b = std::fs::read(images).unwrap();
            std::fs::write(images, &b[..b.len() - 1]).unwrap();
        });
        assert!(matches!(err, DataError::Truncated { .. }), "{err:?}");
        assert!(msg.contains("train-images-idx3-ubyte"), "{msg}");

        let (msg, err) = load_corrupted("truncated-header", |_, labels| {
            std::fs::write(labels, [0, 0, 8, 1, 0]).unwrap();
        });
        assert!(matches!(err, DataError::Truncated { .. }), "{err:?}");
        assert!(msg.contains("train-labels-idx1-ubyte"), "{msg}");

        let (msg, err) = load_corrupted("trailing", |_, labels| {
            let mut b = std::fs::read(labels).unwrap();
            b.push(0);
            std::fs::write(labels, b).unwrap();
        });
        assert!(
            matches!(err, DataError::TrailingBytes { extra: 1, .. }),
            "{err:?}"
        );
        assert!(msg.contains("train-labels-idx1-ubyte"), "{msg}");
    }

    #[test]
    fn mismatched_counts_name_both_files() {
        let (msg, err) = load_corrupted("count-mismatch", |_, labels| {
            write_labels(labels, &[0, 1, 0]);
        });
        assert!(
            matches!(
                err,
                DataError::CountMismatch {
                    n_images: 4,
                    n_labels: 3,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(msg.contains("train-images-idx3-ubyte"), "{msg}");
        assert!(msg.contains("train-labels-idx1-ubyte"), "{msg}");
    }

    #[test]
    fn test_set_shape_must_match_train() {
        let dir = TempDir::new("shape-mismatch");
        let (px, lb) = sample_set(4, 2, 0);
        write_images(&dir.0.join("train-images-idx3-ubyte"), 4, 2, 3, &px);
        write_labels(&dir.0.join("train-labels-idx1-ubyte"), &lb);
        write_images(&dir.0.join("t10k-images-idx3-ubyte"), 1, 3, 2, &px[..6]);
        write_labels(&dir.0.join("t10k-labels-idx1-ubyte"), &lb[..1]);
        let err = load(s(&dir.0)).unwrap_err();
        assert!(matches!(err, DataError::ShapeMismatch { .. }), "{err:?}");
        assert!(err.to_string().contains("t10k-images-idx3-ubyte"), "{err}");
    }

    #[test]
    fn missing_or_half_present_files_are_errors() {
        let dir = TempDir::new("missing");
        let err = load(s(&dir.0)).unwrap_err();
        assert!(matches!(err, DataError::MissingFiles { .. }), "{err:?}");
        assert!(err.to_string().contains("train-images-idx3-ubyte"), "{err}");

        std::fs::write(dir.0.join("train-images-idx3-ubyte.gz"), [0x1f, 0x8b]).unwrap();
        let err = load(s(&dir.0)).unwrap_err();
        assert!(err.to_string().contains("gunzip"), "{err}");

        let (px, lb) = sample_set(4, 2, 0);
        write_images(&dir.0.join("train-images-idx3-ubyte"), 4, 2, 3, &px);
        write_labels(&dir.0.join("train-labels-idx1-ubyte"), &lb);
        write_images(&dir.0.join("t10k-images-idx3-ubyte"), 1, 2, 3, &px[..6]);
        let err = load(s(&dir.0)).unwrap_err();
        assert!(err.to_string().contains("t10k-labels-idx1-ubyte"), "{err}");

        let err = load(&format!("idx:{}", s(&dir.0.join("nope")))).unwrap_err();
        assert!(matches!(err, DataError::Io { .. }), "{err:?}");
    }

    #[test]
    fn labels_beyond_the_class_count_are_rejected() {
        let images = idx_bytes(0x0803, &[2, 1, 1], &[0, 1]);
        let labels = idx_bytes(0x0801, &[2], &[3, 10]);
        let pair = parse_pair(&images, "imgs", &labels, "lbls").unwrap();
        let err = build("t".into(), &pair, None, Some(10)).unwrap_err();
        assert!(
            matches!(
                err,
                DataError::LabelOutOfRange {
                    index: 1,
                    label: 10,
                    classes: 10,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("lbls"), "{err}");

        // Only one class present: nothing to classify.
        let labels = idx_bytes(0x0801, &[2], &[0, 0]);
        let pair = parse_pair(&images, "imgs", &labels, "lbls").unwrap();
        assert!(matches!(
            build("t".into(), &pair, None, None),
            Err(DataError::TooSmall { .. })
        ));
    }

    #[test]
    fn idx_parser_rejects_bad_headers() {
        let p = |b: &[u8], kind| parse_idx(b, "f", kind).err().map(|e| e.to_string());
        assert!(p(&[0, 0], IdxKind::Labels).unwrap().contains("truncated"));
        // Wrong data type (0x0d = f32).
        let f32_labels = idx_bytes(0x0d01, &[1], &[0, 0, 0, 0]);
        assert!(p(&f32_labels, IdxKind::Labels).unwrap().contains("0x0d"));
        let zero_dim = idx_bytes(0x0803, &[1, 0, 5], &[]);
        assert!(p(&zero_dim, IdxKind::Images).unwrap().contains("zero"));
        let huge = idx_bytes(0x0803, &[u32::MAX, u32::MAX, u32::MAX], &[]);
        assert!(p(&huge, IdxKind::Images).is_some());
        // Any number of per-sample dimensions >= 1.
        let flat = idx_bytes(0x0802, &[2, 3], &[1, 2, 3, 4, 5, 6]);
        let idx = parse_idx(&flat, "f", IdxKind::Images).unwrap();
        assert_eq!((idx.dims, idx.data.len()), (vec![2, 3], 6));
    }

    #[test]
    fn synthetic_is_deterministic_with_n_train_samples() {
        let a = load("synthetic:1000").unwrap();
        let b = load("synthetic:1_000").unwrap();
        assert_eq!(a.name, "synthetic:1000");
        assert_eq!((a.features, a.classes), (64, 10));
        assert_eq!((a.train_len(), a.test_len()), (1000, 200));
        assert_eq!(a.train_x.len(), 1000 * 64);
        assert_eq!((&a.train_x, &a.train_y), (&b.train_x, &b.train_y));
        assert_eq!((&a.test_x, &a.test_y), (&b.test_x, &b.test_y));
        // The test set comes from another stream, not a copy of the first train samples.
        assert_ne!(&a.test_x[..64], &a.train_x[..64]);
        // A larger N extends a smaller one.
        let c = load("synthetic:1500").unwrap();
        assert_eq!(&c.train_x[..a.train_x.len()], &a.train_x[..]);
        assert_eq!(&c.train_y[..1000], &a.train_y[..]);
        assert!(a.train_y.iter().all(|&y| y < 10));

        let one = load("synthetic:1").unwrap();
        assert_eq!((one.train_len(), one.test_len()), (1, 1));
    }

    #[test]
    fn synthetic_is_learnable_but_not_trivial() {
        // Nearest class mean (close to Bayes-optimal for this data) on held-out samples.
        let d = load("synthetic:5000").unwrap();
        let (f, k) = (d.features, d.classes);
        let mut means = vec![0f64; k * f];
        let mut counts = vec![0usize; k];
        for (i, &y) in d.train_y.iter().enumerate() {
            counts[y as usize] += 1;
            for j in 0..f {
                means[y as usize * f + j] += f64::from(d.train_x[i * f + j]);
            }
        }
        assert!(counts.iter().all(|&c| c > 300), "{counts:?}");
        for (c, m) in means.chunks_mut(f).enumerate() {
            m.iter_mut().for_each(|v| *v /= counts[c] as f64);
        }
        let correct = (0..d.test_len())
            .filter(|&i| {
                let x = &d.test_x[i * f..(i + 1) * f];
                let dist = |c: usize| -> f64 {
                    let m = &means[c * f..(c + 1) * f];
                    x.iter()
                        .zip(m)
                        .map(|(&a, &b)| (f64::from(a) - b).powi(2))
                        .sum()
                };
                let best = (0..k).min_by(|&a, &b| dist(a).total_cmp(&dist(b))).unwrap();
                best == d.test_y[i] as usize
            })
            .count();
        let acc = correct as f64 / d.test_len() as f64;
        assert!((0.6..0.97).contains(&acc), "nearest-mean accuracy {acc}");
    }

    #[test]
    fn bad_specs_are_errors() {
        for spec in [
            "synthetic:0",
            "synthetic:",
            "synthetic:-3",
            "synthetic:1e6",
            "synthetic",
        ] {
            assert!(
                matches!(load(spec), Err(DataError::BadSpec { .. })),
                "{spec}"
            );
        }
        for spec in ["digit", "", "no/such/dir"] {
            assert!(
                matches!(load(spec), Err(DataError::UnknownSpec { .. })),
                "{spec}"
            );
        }
        let huge = format!("synthetic:{}", usize::MAX / 8);
        assert!(matches!(load(&huge), Err(DataError::TooLarge { .. })));
    }

    #[test]
    fn gather_copies_the_requested_rows() {
        let d = Dataset {
            name: "t".into(),
            features: 2,
            classes: 3,
            train_x: vec![0., 1., 10., 11., 20., 21., 30., 31.],
            train_y: vec![0, 1, 2, 0],
            test_x: vec![],
            test_y: vec![],
            held: None,
        };
        let (mut x, mut y) = (vec![99.0], vec![99]);
        d.gather(&[3, 1, 1], &mut x, &mut y);
        assert_eq!(x, vec![30., 31., 10., 11., 10., 11.]);
        assert_eq!(y, vec![0, 1, 1]);
        d.gather(&[], &mut x, &mut y);
        assert!(x.is_empty() && y.is_empty());

        let digits = load("digits").unwrap();
        digits.gather(&[5, 0], &mut x, &mut y);
        assert_eq!(&x[..64], &digits.train_x[5 * 64..6 * 64]);
        assert_eq!(&x[64..], &digits.train_x[..64]);
        assert_eq!(y, vec![digits.train_y[5], digits.train_y[0]]);
    }
}
