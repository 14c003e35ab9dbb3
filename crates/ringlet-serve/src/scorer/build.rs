//! A checkpoint's model rebuilt for scoring. The config's sizes must account for exactly the
//! checkpoint's parameters before anything is built, so a tampered config cannot make a replica
//! allocate what no file holds; every tensor is then checked against the model's.

use super::{MlpOn, Scorer, Unservable};
use crate::compute::Compute;
use burn::module::Module;
use ringlet_burn::params;
use ringlet_ddp::checkpoint::Snapshot;
use ringlet_train::model::Mlp;
use ringlet_train::models::cnn::Cnn;
use ringlet_train::models::transformer::CharTransformer;
use ringlet_train::tensor::Backend;

/// The checkpoint's model config and how many parameters its files hold.
struct Config<'a> {
    json: &'a serde_json::Value,
    held: usize,
}

impl Config<'_> {
    /// A size of the config, in 1..=2^20.
    fn size(&self, key: &str) -> Result<usize, String> {
        self.json[key]
            .as_u64()
            .and_then(|v| usize::try_from(v).ok())
            .filter(|&v| (1..=1 << 20).contains(&v))
            .ok_or_else(|| format!("the model config has no valid {key:?}: {}", self.json))
    }

    /// `Ok` when `needed` (`None`: it overflowed) is what the checkpoint holds.
    fn account(&self, needed: Option<usize>) -> Result<(), String> {
        match needed {
            Some(n) if n == self.held => Ok(()),
            _ => Err(format!(
                "the model config {} does not match the checkpoint's {} parameters",
                self.json, self.held
            )),
        }
    }
}

impl Scorer {
    /// The model a checkpoint holds, on what `compute` gives it. `Err`: why it cannot be served,
    /// the checkpoint's fault or the device's.
    pub fn from_snapshot(snap: &Snapshot, compute: &mut Compute) -> Result<Scorer, Unservable> {
        let config = Config {
            json: &snap.state.model,
            held: snap.model.iter().map(|t| t.data.len()).sum(),
        };
        match config.json["model"].as_str() {
            Some("mlp") => mlp(snap, &config, compute),
            Some("cnn") => cnn(snap, &config, compute),
            Some("transformer") => transformer(snap, &config, compute),
            Some(other) => Err(Unservable::Model(format!(
                "--model {other} checkpoints cannot be served (mlp, cnn and transformer can)"
            ))),
            None => Err(Unservable::Model(format!(
                "the checkpoint's model config names no model: {}",
                config.json
            ))),
        }
    }
}

fn mlp(snap: &Snapshot, config: &Config, compute: &mut Compute) -> Result<Scorer, Unservable> {
    let sizes: Vec<usize> = config.json["sizes"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| v.as_u64().and_then(|v| usize::try_from(v).ok()))
                .collect::<Option<Vec<usize>>>()
                .unwrap_or_default()
        })
        .unwrap_or_default();
    config.account(sizes.windows(2).try_fold(0usize, |sum, w| {
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
                return Err(Unservable::Model(format!(
                    "{name} has shape {:?}, the model needs {shape:?}",
                    t.shape
                )));
            }
            params.extend_from_slice(&t.data);
        }
    }
    let on = match compute.mlp_gpu().map_err(Unservable::Device)? {
        Some(be) => MlpOn::Gpu {
            params: be
                .upload(&params)
                .map_err(|e| Unservable::Device(format!("{}: {e}", be.describe())))?,
            ws: Box::default(),
            be,
        },
        None => MlpOn::Host {
            params,
            ws: Box::default(),
        },
    };
    Ok(Scorer::Mlp { mlp, on })
}

fn cnn(snap: &Snapshot, config: &Config, compute: &mut Compute) -> Result<Scorer, Unservable> {
    let (side, classes) = (config.size("side")?, config.size("classes")?);
    let (c, hidden) = (config.size("channels")?, config.size("hidden")?);
    if !(4..=4096).contains(&side) {
        return Err(Unservable::Model(format!(
            "image side {side} is out of range"
        )));
    }
    // Two blocks of two 3x3 convolutions (1 -> c -> c, c -> 2c -> 2c) with biases, a hidden and
    // an output layer.
    config.account((|| {
        let convs = c
            .checked_mul(c)?
            .checked_mul(9 + 18 + 36)?
            .checked_add(9 * c + 6 * c)?;
        let flat = (2 * c).checked_mul((side / 4) * (side / 4))?;
        let dense = flat.checked_mul(hidden)?.checked_add(hidden)?;
        let out = hidden.checked_mul(classes)?.checked_add(classes)?;
        convs.checked_add(dense)?.checked_add(out)
    })())?;
    let device = compute.burn_device().map_err(Unservable::Device)?;
    let model = Cnn::new(side, c, hidden, classes, &device.clone().autodiff());
    Ok(Scorer::Cnn {
        model: Box::new(load_burn(model, snap)?),
        side,
        classes,
        device,
    })
}

fn transformer(
    snap: &Snapshot,
    config: &Config,
    compute: &mut Compute,
) -> Result<Scorer, Unservable> {
    let (context, d) = (config.size("context")?, config.size("d_model")?);
    let (heads, layers) = (config.size("heads")?, config.size("layers")?);
    let v = config.size("vocab")?;
    let vocab: Vec<char> = config.json["vocab_chars"]
        .as_str()
        .ok_or("the checkpoint records no vocabulary (\"vocab_chars\"): it was written before transformers could be served; train it again")?
        .chars()
        .collect();
    if vocab.len() != v || vocab.windows(2).any(|w| w[0] >= w[1]) {
        return Err(Unservable::Model(format!(
            "the checkpoint's vocabulary is not {v} distinct sorted characters"
        )));
    }
    if !d.is_multiple_of(heads) || context > 8192 || layers > 256 {
        return Err(Unservable::Model(format!(
            "the model config {} is out of range",
            config.json
        )));
    }
    // Embeddings, blocks (12 d^2 + 13 d each), the final norm and the head.
    config.account((|| {
        let block = d.checked_mul(d)?.checked_mul(12)?.checked_add(13 * d)?;
        layers
            .checked_mul(block)?
            .checked_add((2 * v + context + 2).checked_mul(d)?)?
            .checked_add(v)
    })())?;
    let device = compute.burn_device().map_err(Unservable::Device)?;
    let model = CharTransformer::new(v, context, d, heads, layers, &device.clone().autodiff());
    Ok(Scorer::Lm {
        model: Box::new(load_burn(model, snap)?),
        vocab,
        context,
        device,
    })
}

/// A Burn model built on an autodiff device (the parameters `params::list` lists are those that
/// train) loaded with the checkpoint's tensors by name, then taken off autodiff for inference.
fn load_burn<M: Module>(model: M, snap: &Snapshot) -> Result<M, String> {
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
    Ok(model.valid())
}
