//! A model rebuilt from a checkpoint of `ringlet-train`, scoring batches of samples: the MLP on
//! the CPU (the same forward pass training runs), the CNN on Burn's CPU backend. The checkpoint's
//! model config says which, and its sizes; every tensor is checked against them.

use burn::module::Module;
use burn::tensor::{activation::softmax, Device, Tensor, TensorData};
use ringlet_burn::{params, Stages};
use ringlet_ddp::checkpoint::Snapshot;
use ringlet_train::model::{Mlp, Workspace};
use ringlet_train::models::cnn::Cnn;
use ringlet_train::tensor::Host;

/// One prediction: the class and its softmax probability.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Prediction {
    pub class: usize,
    pub confidence: f32,
}

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
            Some(other) => Err(format!(
                "--model {other} checkpoints cannot be served yet (mlp and cnn can)"
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
        }
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
        };
        Ok(probs
            .chunks(classes)
            .map(|row| {
                let (class, &confidence) = row
                    .iter()
                    .enumerate()
                    .max_by(|a, b| a.1.total_cmp(b.1))
                    .expect("at least one class");
                Prediction { class, confidence }
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

    /// A config that claims more than the file holds is refused before anything is built.
    #[test]
    fn a_config_that_does_not_match_the_tensors_is_refused_before_building() {
        for config in [
            serde_json::json!({"model": "cnn", "side": 8, "classes": 10, "channels": 1 << 20, "hidden": 1 << 20}),
            serde_json::json!({"model": "mlp", "sizes": [1usize << 40, 1usize << 40]}),
            serde_json::json!({"model": "mlp", "sizes": [u64::MAX, 2]}),
            serde_json::json!({"model": "mlp", "sizes": [3, 2]}),
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
