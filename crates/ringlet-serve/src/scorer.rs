//! A model rebuilt from a checkpoint of `ringlet-train`, scoring batches of samples: the MLP on
//! the CPU (the same forward pass training runs), the CNN and the character transformer on
//! Burn's CPU backend. The checkpoint's model config says which, and its sizes; every tensor is
//! checked against them. A transformer's record is text, and its prediction the next character.

use crate::engine::Record;
use burn::module::Module;
use burn::tensor::{activation::softmax, Device, Int, Tensor, TensorData};
use ringlet_burn::{params, Stages};
use ringlet_ddp::checkpoint::Snapshot;
use ringlet_train::model::{Mlp, Workspace};
use ringlet_train::models::cnn::Cnn;
use ringlet_train::models::transformer::CharTransformer;
use ringlet_train::tensor::Host;

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
        params: Vec<f32>,
        ws: Box<Workspace<Host>>,
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

impl Scorer {
    /// The model a checkpoint holds. `Err`: why it cannot be served.
    pub fn from_snapshot(snap: &Snapshot) -> Result<Scorer, String> {
        let config = &snap.state.model;
        let size = |key: &str| -> Result<usize, String> {
            config[key]
                .as_u64()
                .and_then(|v| usize::try_from(v).ok())
                .filter(|&v| (1..=1 << 20).contains(&v))
                .ok_or_else(|| format!("the model config has no valid {key:?}: {config}"))
        };
        // The config's sizes must account for exactly the checkpoint's parameters before the
        // model is built: a tampered config must not make it allocate what no file holds.
        let held: usize = snap.model.iter().map(|t| t.data.len()).sum();
        let account = |needed: Option<usize>| match needed {
            Some(n) if n == held => Ok(()),
            _ => Err(format!(
                "the model config {config} does not match the checkpoint's {held} parameters"
            )),
        };
        match config["model"].as_str() {
            Some("mlp") => {
                let sizes: Vec<usize> = config["sizes"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|v| v.as_u64().and_then(|v| usize::try_from(v).ok()))
                            .collect::<Option<Vec<usize>>>()
                            .unwrap_or_default()
                    })
                    .unwrap_or_default();
                account(sizes.windows(2).try_fold(0usize, |sum, w| {
                    sum.checked_add(w[0].checked_mul(w[1])?.checked_add(w[1])?)
                }))?;
                let mlp = Mlp::new(sizes)?;
                let mut params = Vec::with_capacity(mlp.param_count());
                for (i, l) in mlp.layers().iter().enumerate() {
                    for (part, shape) in [
                        ("weight", vec![l.outputs, l.inputs]),
                        ("bias", vec![l.outputs]),
                    ] {
                        let name = format!("layers.{i}.{part}");
                        let t = snap
                            .model
                            .iter()
                            .find(|t| t.name == name)
                            .ok_or_else(|| format!("the checkpoint has no tensor {name}"))?;
                        if t.shape != shape || t.data.len() != shape.iter().product::<usize>() {
                            return Err(format!(
                                "{name} has shape {:?}, the model needs {shape:?}",
                                t.shape
                            ));
                        }
                        params.extend_from_slice(&t.data);
                    }
                }
                Ok(Scorer::Mlp {
                    mlp,
                    params,
                    ws: Box::default(),
                })
            }
            Some("cnn") => {
                let (side, classes) = (size("side")?, size("classes")?);
                let (c, hidden) = (size("channels")?, size("hidden")?);
                if !(4..=4096).contains(&side) {
                    return Err(format!("image side {side} is out of range"));
                }
                // Two blocks of two 3x3 convolutions (1 -> c -> c, c -> 2c -> 2c) with biases, a
                // hidden and an output layer.
                account((|| {
                    let convs = c
                        .checked_mul(c)?
                        .checked_mul(9 + 18 + 36)?
                        .checked_add(9 * c + 6 * c)?;
                    let flat = (2 * c).checked_mul((side / 4) * (side / 4))?;
                    let dense = flat.checked_mul(hidden)?.checked_add(hidden)?;
                    let out = hidden.checked_mul(classes)?.checked_add(classes)?;
                    convs.checked_add(dense)?.checked_add(out)
                })())?;
                let channels = c;
                let device = Device::flex();
                // Built where parameters train (autodiff), as params::list lists only those,
                // loaded, then taken off autodiff for inference.
                let model = Cnn::new(side, channels, hidden, classes, &device.clone().autodiff());
                let infos = params::list(&model);
                if infos.len() != snap.model.len() {
                    return Err(format!(
                        "the model has {} parameters, the checkpoint {} tensors",
                        infos.len(),
                        snap.model.len()
                    ));
                }
                let model = params::load_named(model, &infos, &snap.model, "the checkpoint")
                    .map_err(|e| e.to_string())?;
                Ok(Scorer::Cnn {
                    model: Box::new(model.valid()),
                    side,
                    classes,
                    device,
                })
            }
            Some("transformer") => {
                let (context, d, heads, layers) = (
                    size("context")?,
                    size("d_model")?,
                    size("heads")?,
                    size("layers")?,
                );
                let v = size("vocab")?;
                let vocab: Vec<char> = config["vocab_chars"]
                    .as_str()
                    .ok_or("the checkpoint records no vocabulary (\"vocab_chars\"): it was written before transformers could be served; train it again")?
                    .chars()
                    .collect();
                if vocab.len() != v || vocab.windows(2).any(|w| w[0] >= w[1]) {
                    return Err(format!(
                        "the checkpoint's vocabulary is not {v} distinct sorted characters"
                    ));
                }
                if !d.is_multiple_of(heads) || context > 8192 || layers > 256 {
                    return Err(format!("the model config {config} is out of range"));
                }
                // Embeddings, blocks (12 d^2 + 13 d each), the final norm and the head.
                account((|| {
                    let block = d.checked_mul(d)?.checked_mul(12)?.checked_add(13 * d)?;
                    layers
                        .checked_mul(block)?
                        .checked_add((2 * v + context + 2).checked_mul(d)?)?
                        .checked_add(v)
                })())?;
                let device = Device::flex();
                let model =
                    CharTransformer::new(v, context, d, heads, layers, &device.clone().autodiff());
                let infos = params::list(&model);
                if infos.len() != snap.model.len() {
                    return Err(format!(
                        "the model has {} parameters, the checkpoint {} tensors",
                        infos.len(),
                        snap.model.len()
                    ));
                }
                let model = params::load_named(model, &infos, &snap.model, "the checkpoint")
                    .map_err(|e| e.to_string())?;
                Ok(Scorer::Lm {
                    model: Box::new(model.valid()),
                    vocab,
                    context,
                    device,
                })
            }
            Some(other) => Err(format!(
                "--model {other} checkpoints cannot be served (mlp, cnn and transformer can)"
            )),
            None => Err(format!(
                "the checkpoint's model config names no model: {config}"
            )),
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
            Scorer::Mlp { mlp, params, ws } => {
                let logits = mlp
                    .logits(&Host, params, x, ws)
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
    use ringlet_ddp::checkpoint::{State, Tensor};

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
            let e = Scorer::from_snapshot(&snapshot(config)).err().unwrap();
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
            let e = Scorer::from_snapshot(&snapshot(config.clone()))
                .err()
                .unwrap();
            assert!(
                e.contains("does not match the checkpoint's 6 parameters"),
                "{config}: {e}"
            );
        }
    }
}
