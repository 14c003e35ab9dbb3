//! A model rebuilt from a checkpoint of `ringlet-train`, scoring batches of samples: the MLP with
//! the forward pass training runs (on the CPU, or on a GPU through cuBLAS), the CNN and the
//! character transformer on Burn's CPU backend (or its CUDA backend in a `cuda` build). The
//! checkpoint's model config says which, and its sizes ([`build`] checks every tensor against
//! them). A transformer's record is text, and its prediction the next character.

mod build;

use crate::engine::Record;
use burn::tensor::{activation::softmax, Device, Int, Tensor, TensorData};
use ringlet_burn::{params, Stages};
use ringlet_train::gpu::GpuBackend;
use ringlet_train::model::{Mlp, Workspace};
use ringlet_train::models::cnn::Cnn;
use ringlet_train::models::transformer::CharTransformer;
use ringlet_train::tensor::{Backend, Host};
use std::rc::Rc;

/// One prediction: the class and its softmax probability (for a transformer, the next
/// character's id, and the character).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prediction {
    pub class: usize,
    pub confidence: f32,
    pub next: Option<char>,
}

/// The longest text a transformer's record may hold (its last `context` characters are read).
const MAX_TEXT_BYTES: usize = 64 << 10;

pub enum Scorer {
    Mlp {
        mlp: Mlp,
        on: MlpOn,
    },
    Cnn {
        model: Box<Cnn>,
        side: usize,
        classes: usize,
        device: Device,
    },
    Lm {
        model: Box<CharTransformer>,
        /// The characters of the ids, sorted (as training made them).
        vocab: Vec<char>,
        context: usize,
        device: Device,
    },
}

/// Why a checkpoint's model is not served here.
#[derive(Debug, Clone, PartialEq)]
pub enum Unservable {
    /// The checkpoint: its config or tensors (it stays refused until it is written again).
    Model(String),
    /// The device: the GPU could not be opened for it, or has no room (tried again later).
    Device(String),
}

impl std::fmt::Display for Unservable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unservable::Model(why) | Unservable::Device(why) => f.write_str(why),
        }
    }
}

impl From<String> for Unservable {
    fn from(why: String) -> Unservable {
        Unservable::Model(why)
    }
}

impl From<&str> for Unservable {
    fn from(why: &str) -> Unservable {
        Unservable::Model(why.into())
    }
}

/// Where the MLP's parameters and activations live.
pub enum MlpOn {
    Host {
        params: Vec<f32>,
        ws: Box<Workspace<Host>>,
    },
    /// The buffers come before the GPU so that they are freed while its context lives.
    Gpu {
        params: <GpuBackend as Backend>::Buf,
        ws: Box<Workspace<GpuBackend>>,
        be: Rc<GpuBackend>,
    },
}

impl Scorer {
    /// What scores: "the CPU", or the GPU's name.
    pub fn runs_on(&self) -> String {
        match self {
            Scorer::Mlp {
                on: MlpOn::Gpu { be, .. },
                ..
            } => be.describe(),
            Scorer::Mlp { .. } => "the CPU".into(),
            Scorer::Cnn { device, .. } | Scorer::Lm { device, .. } if *device == Device::flex() => {
                "the CPU".into()
            }
            Scorer::Cnn { device, .. } | Scorer::Lm { device, .. } => format!("{device:?}"),
        }
    }

    /// Inputs per sample.
    pub fn features(&self) -> usize {
        match self {
            Scorer::Mlp { mlp, .. } => mlp.sizes[0],
            Scorer::Cnn { side, .. } => side * side,
            // The ids, padded, then how many there are.
            Scorer::Lm { context, .. } => context + 1,
        }
    }

    /// A record's input, [`Scorer::features`] numbers: the features field's JSON array, or for a
    /// transformer the field's UTF-8 text (its last `context` characters). `Err`: why the
    /// record is dead-lettered.
    pub fn input(&self, r: &Record, field: &str) -> Result<Vec<f32>, String> {
        let Scorer::Lm { vocab, context, .. } = self else {
            return crate::serve::parse(r, field, self.features());
        };
        let raw = r
            .field(field)
            .ok_or_else(|| format!("no field {field:?}"))?;
        if raw.len() > MAX_TEXT_BYTES {
            return Err(format!(
                "field {field:?} is {} bytes, more than {MAX_TEXT_BYTES}",
                raw.len()
            ));
        }
        let text =
            std::str::from_utf8(raw).map_err(|e| format!("field {field:?} is not UTF-8: {e}"))?;
        let chars: Vec<char> = text.chars().collect();
        let tail = &chars[chars.len().saturating_sub(*context)..];
        if tail.is_empty() {
            return Err(format!("field {field:?} holds no text"));
        }
        let mut ids = Vec::with_capacity(context + 1);
        for c in tail {
            let id = vocab
                .binary_search(c)
                .map_err(|_| format!("character {c:?} is not in the model's vocabulary"))?;
            ids.push(id as f32);
        }
        ids.resize(*context, 0.0);
        ids.push(tail.len() as f32);
        Ok(ids)
    }

    /// Predictions for `x`, whole samples of [`Scorer::features`] each.
    pub fn score(&mut self, x: &[f32]) -> Result<Vec<Prediction>, String> {
        let f = self.features();
        let n = x.len() / f;
        if n == 0 {
            return Ok(Vec::new());
        }
        let (probs, classes) = match self {
            Scorer::Mlp { mlp, on } => {
                let logits = match on {
                    MlpOn::Host { params, ws } => mlp.logits(&Host, params, x, ws),
                    MlpOn::Gpu { params, ws, be } => mlp.logits(&**be, params, x, ws),
                }
                .map_err(|e| e.to_string())?;
                let classes = mlp.classes();
                (softmax_rows(logits, classes), classes)
            }
            Scorer::Cnn {
                model,
                side,
                classes,
                device,
            } => {
                let images = Tensor::<4>::from_data(
                    TensorData::new(x.to_vec(), [n, 1, *side, *side]),
                    &*device,
                );
                let logits = model.forward(images, &mut Stages::whole());
                let probs = softmax(logits, 1);
                let host =
                    params::to_host(probs.reshape([n * *classes])).map_err(|e| e.to_string())?;
                (host, *classes)
            }
            Scorer::Lm {
                model,
                vocab,
                context,
                device,
            } => {
                // Padded on the right to the longest text of the batch: causal attention keeps
                // the padding out of the positions read.
                let rows: Vec<(&[f32], usize)> = x
                    .chunks(*context + 1)
                    .map(|r| (&r[..*context], r[*context] as usize))
                    .collect();
                let seq = rows.iter().map(|r| r.1).max().unwrap_or(1);
                let ids: Vec<i64> = rows
                    .iter()
                    .flat_map(|(ids, _)| ids[..seq].iter().map(|&v| v as i64))
                    .collect();
                let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [n, seq]), &*device);
                let logits = model.forward(ids, &mut Stages::whole());
                let v = vocab.len();
                let probs = params::to_host(softmax(logits, 1).reshape([n * seq * v]))
                    .map_err(|e| e.to_string())?;
                let last = rows
                    .iter()
                    .enumerate()
                    .flat_map(|(i, &(_, len))| {
                        let at = (i * seq + len - 1) * v;
                        probs[at..at + v].iter().copied()
                    })
                    .collect();
                (last, v)
            }
        };
        let vocab = match self {
            Scorer::Lm { vocab, .. } => Some(vocab),
            _ => None,
        };
        Ok(probs
            .chunks(classes)
            .map(|row| {
                let (class, &confidence) = row
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .expect("at least one class");
                Prediction {
                    class,
                    confidence,
                    next: vocab.as_ref().and_then(|v| v.get(class).copied()),
                }
            })
            .collect())
    }
}

fn softmax_rows(mut logits: Vec<f32>, classes: usize) -> Vec<f32> {
    for row in logits.chunks_mut(classes) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for v in row.iter_mut() {
            *v = (*v - max).exp();
            sum += *v;
        }
        row.iter_mut().for_each(|v| *v /= sum);
    }
    logits
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::compute::Compute;
    use ringlet_ddp::checkpoint::{Snapshot, State, Tensor};

    fn snapshot(model: serde_json::Value) -> Snapshot {
        let state: State = serde_json::from_value(serde_json::json!({
            "step": 1, "epoch": 0, "cursor": 0, "seed": 0, "rng": [], "batches": [1],
            "world_size": 1, "model": model,
        }))
        .unwrap();
        Snapshot {
            state,
            model: vec![Tensor {
                name: "layers.0.weight".into(),
                shape: vec![2, 3],
                data: vec![0.0; 6],
            }],
            optimizer: Vec::new(),
        }
    }

    /// A transformer's vocabulary must be the characters training sorted: a checkpoint from
    /// before they were recorded, or a tampered list, is refused with the reason.
    #[test]
    fn a_transformer_needs_its_vocabulary() {
        for (config, why) in [
            (
                serde_json::json!({"model": "transformer", "context": 4, "d_model": 2, "heads": 1,
                "layers": 1, "vocab": 3}),
                "records no vocabulary",
            ),
            (
                serde_json::json!({"model": "transformer", "context": 4, "d_model": 2, "heads": 1,
                "layers": 1, "vocab": 3, "vocab_chars": "bca"}),
                "distinct sorted",
            ),
        ] {
            let e = Scorer::from_snapshot(&snapshot(config), &mut Compute::cpu())
                .err()
                .unwrap()
                .to_string();
            assert!(e.contains(why), "{e}");
        }
    }

    /// A config that claims more than the file holds is refused before anything is built.
    #[test]
    fn a_config_that_does_not_match_the_tensors_is_refused_before_building() {
        for config in [
            serde_json::json!({"model": "cnn", "side": 8, "classes": 10, "channels": 1 << 20, "hidden": 1 << 20}),
            serde_json::json!({"model": "mlp", "sizes": [1usize << 40, 1usize << 40]}),
            serde_json::json!({"model": "mlp", "sizes": [u64::MAX, 2]}),
            serde_json::json!({"model": "mlp", "sizes": [3, 2]}),
            serde_json::json!({"model": "transformer", "context": 64, "d_model": 1 << 20,
                "heads": 1, "layers": 256, "vocab": 3, "vocab_chars": "abc"}),
        ] {
            let e = Scorer::from_snapshot(&snapshot(config.clone()), &mut Compute::cpu())
                .err()
                .unwrap()
                .to_string();
            assert!(
                e.contains("does not match the checkpoint's 6 parameters"),
                "{config}: {e}"
            );
        }
    }

    /// An MLP checkpoint of `sizes` with `Mlp::init(seed)`'s parameters, named as training
    /// names them.
    fn mlp_snapshot(sizes: &[usize], seed: u64) -> Snapshot {
        let mlp = Mlp::new(sizes.to_vec()).unwrap();
        let p = mlp.init(seed);
        let mut snap = snapshot(serde_json::json!({"model": "mlp", "sizes": sizes}));
        snap.model = ringlet_train::model::layer_tensors(&mlp.layers(), "", &p);
        snap
    }

    /// `n` inputs in [-1, 1), spread without a pattern the model could line up with.
    fn inputs(n: usize) -> Vec<f32> {
        (0..n)
            .map(|i| ((i as u64 * 2_654_435_761) % 2000) as f32 / 1000.0 - 1.0)
            .collect()
    }

    /// Every class's probability for each sample of `x`, where the scorer's MLP computes.
    fn mlp_probs(s: &mut Scorer, x: &[f32]) -> Vec<f32> {
        let Scorer::Mlp { mlp, on } = s else {
            panic!("not an MLP")
        };
        let logits = match on {
            MlpOn::Host { params, ws } => mlp.logits(&Host, params, x, ws),
            MlpOn::Gpu { params, ws, be } => mlp.logits(&**be, params, x, ws),
        };
        softmax_rows(logits.unwrap(), mlp.classes())
    }

    /// The MLP scores on the CPU unless a GPU is asked for and found.
    #[test]
    fn the_mlp_scores_on_the_cpu_without_a_gpu() {
        let snap = mlp_snapshot(&[6, 5, 3], 1);
        let mut s = Scorer::from_snapshot(&snap, &mut Compute::cpu()).unwrap();
        assert_eq!(s.runs_on(), "the CPU");
        let x = inputs(6 * 4);
        let p = s.score(&x).unwrap();
        let probs = mlp_probs(&mut s, &x);
        for (row, pred) in probs.chunks(3).zip(&p) {
            let best = row.iter().copied().fold(f32::MIN, f32::max);
            assert_eq!(row[pred.class], best);
            assert_eq!(pred.confidence, best);
            assert!((row.iter().sum::<f32>() - 1.0).abs() < 1e-6);
        }
    }

    /// On a GPU (cuBLAS and kernels/model.cu), the MLP's probabilities are the CPU's within FP32
    /// rounding and its classes the same wherever the top two are not within that rounding, for
    /// batches of 1, 7, 4096 (the largest --batch) and 3 (a workspace larger than the batch).
    /// A second version loaded on the same replica uses the GPU the first opened.
    #[test]
    fn gpu_the_mlp_scores_what_the_cpu_scores() {
        let sizes = [784, 256, 128, 10];
        let snap = mlp_snapshot(&sizes, 5);
        let mut gpu = match Compute::new(ringlet_train::train::DeviceChoice::Gpu, None, 0) {
            Ok(c) => c,
            Err(e) => {
                ringlet_core::skipped!("no GPU to score on ({e})");
                return;
            }
        };
        let mut on_gpu = Scorer::from_snapshot(&snap, &mut gpu).unwrap();
        let mut on_cpu = Scorer::from_snapshot(&snap, &mut Compute::cpu()).unwrap();
        println!("scoring on {}", on_gpu.runs_on());
        assert_ne!(on_gpu.runs_on(), "the CPU");
        let (mut compared, mut ties) = (0, 0);
        for n in [1, 7, 4096, 3] {
            let x = inputs(n * sizes[0]);
            let (pg, pc) = (mlp_probs(&mut on_gpu, &x), mlp_probs(&mut on_cpu, &x));
            let worst = pg
                .iter()
                .zip(&pc)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(worst <= 1e-5, "batch {n}: probabilities differ by {worst}");
            let (g, c) = (on_gpu.score(&x).unwrap(), on_cpu.score(&x).unwrap());
            assert_eq!(g.len(), n);
            for ((g, c), row) in g.iter().zip(&c).zip(pc.chunks(sizes[3])) {
                let mut sorted = row.to_vec();
                sorted.sort_by(|a, b| b.total_cmp(a));
                if sorted[0] - sorted[1] <= 1e-5 {
                    ties += 1;
                    continue;
                }
                compared += 1;
                assert_eq!(g.class, c.class, "batch {n}");
                assert!((g.confidence - c.confidence).abs() <= 1e-5);
            }
        }
        println!("{compared} classes compared, {ties} near-ties left out");
        assert!(compared >= 4000, "{compared} compared, {ties} near-ties");
        let again = Scorer::from_snapshot(&mlp_snapshot(&sizes, 6), &mut gpu).unwrap();
        let (
            Scorer::Mlp {
                on: MlpOn::Gpu { be: a, .. },
                ..
            },
            Scorer::Mlp {
                on: MlpOn::Gpu { be: b, .. },
                ..
            },
        ) = (&on_gpu, &again)
        else {
            panic!("both versions should score on the GPU");
        };
        assert!(Rc::ptr_eq(a, b), "a second version opened the GPU again");
    }

    /// The CNN on a GPU: with the `cuda` feature, Burn's CUDA backend scores what its CPU
    /// backend scores; without it, `--device gpu` refuses the version, saying so.
    #[test]
    fn gpu_the_cnn_scores_on_burn_cuda_or_is_refused_without_it() {
        let mut gpu = match Compute::new(ringlet_train::train::DeviceChoice::Gpu, None, 0) {
            Ok(c) => c,
            Err(e) => {
                ringlet_core::skipped!("no GPU to score on ({e})");
                return;
            }
        };
        let (side, channels, hidden, classes) = (8, 2, 8, 3);
        let built = Cnn::new(side, channels, hidden, classes, &Device::flex().autodiff());
        let infos = params::list(&built);
        let mut snap = snapshot(serde_json::json!({"model": "cnn", "side": side,
            "channels": channels, "hidden": hidden, "classes": classes}));
        snap.model = params::named_tensors(&built, &infos).unwrap();
        let result = Scorer::from_snapshot(&snap, &mut gpu);
        if cfg!(not(feature = "cuda")) {
            let Some(Unservable::Device(e)) = result.err() else {
                panic!("a CNN on --device gpu without the cuda feature must be a device refusal");
            };
            println!("refused as expected: {e}");
            assert!(e.contains("--device gpu") && e.contains("cuda"), "{e}");
            return;
        }
        let mut on_gpu = result.unwrap();
        let mut on_cpu = Scorer::from_snapshot(&snap, &mut Compute::cpu()).unwrap();
        println!("scoring on {}", on_gpu.runs_on());
        let x = inputs(64 * side * side);
        let (g, c) = (on_gpu.score(&x).unwrap(), on_cpu.score(&x).unwrap());
        for (g, c) in g.iter().zip(&c) {
            assert!((g.confidence - c.confidence).abs() <= 1e-4, "{g:?} {c:?}");
        }
    }
}
