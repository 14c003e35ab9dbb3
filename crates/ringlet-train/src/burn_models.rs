//! `--model cnn|transformer`: the Burn models of [`crate::models`] trained by
//! `ringlet_burn::fit`, evaluated on the held-out data by every rank's share.

use crate::data::Dataset;
use crate::models::cnn::{Cnn, Images};
use crate::models::cross_entropy_sum;
use crate::models::transformer::{CharText, CharTransformer, Windows};
use crate::train::DeviceChoice;
use burn::module::Module;
use burn::optim::decay::WeightDecayConfig;
use burn::optim::momentum::MomentumConfig;
use burn::optim::{AdamWConfig, ModuleOptimizer, SgdConfig};
use burn::tensor::Device;
use ringlet::{Communicator, Error, ReduceOp};
use ringlet_burn::{fit_then, params, Samples, Stages, TrainOptions, TrainSummary};
use ringlet_ddp::StepReport;

/// Burn's optimizer and its settings.
#[derive(Clone, Debug)]
pub struct OptimizerChoice {
    /// `sgd` (with momentum) or `adamw`.
    pub kind: String,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
}

impl OptimizerChoice {
    pub fn build(&self) -> ModuleOptimizer {
        match self.kind.as_str() {
            "adamw" => AdamWConfig::new()
                .with_weight_decay(self.weight_decay as f32)
                .init(),
            _ => {
                let decay = (self.weight_decay > 0.0)
                    .then(|| WeightDecayConfig::new(self.weight_decay as f32));
                SgdConfig::new()
                    .with_momentum(Some(
                        MomentumConfig::new()
                            .with_momentum(self.momentum)
                            .with_dampening(0.0),
                    ))
                    .with_weight_decay(decay)
                    .init()
            }
        }
    }
}

/// The shape of the CNN.
#[derive(Clone, Copy, Debug)]
pub struct CnnShape {
    pub channels: usize,
    pub hidden: usize,
}

/// The shape of the character transformer.
#[derive(Clone, Copy, Debug)]
pub struct LmShape {
    pub context: usize,
    pub d_model: usize,
    pub heads: usize,
    pub layers: usize,
}

/// How a Burn run ended, in the binary's terms.
pub struct Outcome {
    pub summary: TrainSummary,
    /// "test accuracy ... on N held-out samples" or "held-out loss ... per character".
    pub evaluation: String,
    /// The figures of `evaluation`, for `--summary`.
    pub metrics: serde_json::Value,
    /// Every parameter, flattened in module order (for `--dump-params`).
    pub params: Vec<f32>,
}

/// The Burn device this rank computes on: the CPU (`flex`), or GPU `local rank mod count` with
/// the `cuda` feature where CUDA is found.
pub fn device(comm: &Communicator, choice: DeviceChoice) -> Result<Device, Error> {
    let gpu = match choice {
        DeviceChoice::Cpu => Err("--device cpu".to_string()),
        _ => cuda_device(comm.local_rank()),
    };
    match (gpu, choice) {
        (Ok(d), _) => {
            tracing::info!("rank {}: training on {d:?}", comm.rank());
            Ok(d)
        }
        (Err(why), DeviceChoice::Gpu) => Err(Error::Device(why)),
        (Err(why), _) => {
            if choice == DeviceChoice::Auto {
                tracing::info!("rank {}: training on the CPU ({why})", comm.rank());
            }
            Ok(Device::flex())
        }
    }
}

/// Burn's CUDA device `index` modulo the GPUs found (`Err`: why there is none, or that this
/// build has no CUDA backend for Burn models).
#[cfg(feature = "cuda")]
pub fn cuda_device(index: usize) -> Result<Device, String> {
    let count = ringlet_cuda::devices().map_err(|e| e.to_string())?.len();
    if count == 0 {
        return Err("no CUDA device".into());
    }
    Ok(Device::cuda(index % count))
}

/// Burn's CUDA device `index` modulo the GPUs found (`Err`: why there is none, or that this
/// build has no CUDA backend for Burn models).
#[cfg(not(feature = "cuda"))]
pub fn cuda_device(_index: usize) -> Result<Device, String> {
    Err("this build has no CUDA backend for Burn models (cargo feature `cuda`)".into())
}

/// Refuses a model whose parameters (with their gradients and two optimizer moments) and the
/// activations of a whole global batch cannot fit in this machine's memory, before anything is
/// allocated: each size flag is bounded, their product is not. `None`: the estimate overflowed.
fn check_fits(
    model: &str,
    params: Option<u64>,
    per_sample: Option<u64>,
    batch: usize,
) -> Result<(), Error> {
    let bytes = params
        .and_then(|p| p.checked_mul(4 * 4))
        .zip(per_sample.and_then(|a| a.checked_mul(4 * 3 * batch as u64)))
        .and_then(|(p, a)| p.checked_add(a));
    let memory = ringlet_ddp::checkpoint::physical_memory().unwrap_or(u64::MAX);
    match bytes {
        Some(b) if b <= memory => Ok(()),
        _ => Err(Error::InvalidArgument(format!(
            "--model {model} with these sizes needs about {} of memory ({} parameters), this machine has {} GiB",
            bytes.map_or("more than 2^64 bytes".into(), |b| format!("{} GiB", b >> 30)),
            params.map_or("too many".into(), |p| p.to_string()),
            memory >> 30
        ))),
    }
}

/// Trains the CNN on `data`'s images.
pub fn train_cnn(
    comm: &mut Communicator,
    data: &Dataset,
    shape: CnnShape,
    device: &Device,
    optim: &OptimizerChoice,
    opts: &TrainOptions,
    report: impl FnMut(&StepReport),
) -> Result<Outcome, Error> {
    let side = Cnn::side_of(data).map_err(Error::InvalidArgument)?;
    let (c, h, area) = (
        shape.channels as u64,
        shape.hidden as u64,
        (side * side) as u64,
    );
    let params = (|| {
        let convs = (9 * c + 9 * c * c + 18 * c * c + 36 * c * c).checked_add(6 * c)?;
        let dense = (2 * c).checked_mul(area / 16)?.checked_mul(h)?;
        convs
            .checked_add(dense)?
            .checked_add(h * (data.classes as u64 + 1))
    })();
    let per_sample = c.checked_mul(area).and_then(|x| x.checked_mul(8));
    let fits = check_fits("cnn", params, per_sample, opts.global_batch);
    // Agreed: memory differs between hosts, and a rank that stops here alone would leave the
    // others waiting for it.
    ringlet_ddp::agree::at_start(comm, fits.map_err(|e| e.to_string()), "sizing the model")?;
    device.seed(opts.seed);
    let ad = device.clone().autodiff();
    let model = Cnn::new(side, shape.channels, shape.hidden, data.classes, &ad);
    let train = Images {
        data,
        side,
        test: false,
    };
    let test = Images {
        data,
        side,
        test: true,
    };
    // Evaluated as part of the run: a rank lost meanwhile is survived like one lost in a step.
    let held_out = |comm: &Communicator, model: &Cnn| {
        let model = model.valid();
        evaluate(comm, test.len(), &mut |idx| {
            let batch = test.batch(idx, device);
            let logits = model.forward(batch.images, &mut Stages::whole());
            let predicted = logits.clone().argmax(1).reshape([idx.len()]);
            let correct = predicted.equal(batch.labels.clone()).int().sum();
            let loss = cross_entropy_sum(logits, batch.labels);
            Ok([scalar(loss)?, scalar(correct.float())?])
        })
    };
    let (model, summary, [loss, correct, count]) = fit_then(
        comm,
        model,
        optim.build(),
        &train,
        &ad,
        opts,
        report,
        held_out,
    )?;
    let params = params::flatten(&model, &params::list(&model))?;
    Ok(Outcome {
        summary,
        evaluation: format!(
            "test accuracy {:.2}% (loss {:.4}) on {count} held-out samples",
            100.0 * correct / count,
            loss / count
        ),
        metrics: serde_json::json!({"test_accuracy": correct / count, "test_loss": loss / count}),
        params,
    })
}

/// Trains the character transformer on `text`.
pub fn train_transformer(
    comm: &mut Communicator,
    text: &CharText,
    shape: LmShape,
    device: &Device,
    optim: &OptimizerChoice,
    opts: &TrainOptions,
    report: impl FnMut(&StepReport),
) -> Result<Outcome, Error> {
    let (v, t, d, heads, layers) = (
        text.vocab.len() as u64,
        shape.context as u64,
        shape.d_model as u64,
        shape.heads as u64,
        shape.layers as u64,
    );
    let params = (|| {
        let block = d.checked_mul(d)?.checked_mul(12)?.checked_add(13 * d)?;
        layers
            .checked_mul(block)?
            .checked_add((2 * v + t + 2) * d + v)
    })();
    let per_sample = (|| {
        let attention = heads.checked_mul(t)?.checked_mul(t)?.checked_mul(3)?;
        layers.checked_mul(attention.checked_add(t.checked_mul(d)?.checked_mul(16)?)?)
    })();
    let fits = check_fits("transformer", params, per_sample, opts.global_batch);
    ringlet_ddp::agree::at_start(comm, fits.map_err(|e| e.to_string()), "sizing the model")?;
    device.seed(opts.seed);
    let ad = device.clone().autodiff();
    let model = CharTransformer::new(
        text.vocab.len(),
        shape.context,
        shape.d_model,
        shape.heads,
        shape.layers,
        &ad,
    );
    let train = Windows {
        ids: &text.train,
        context: shape.context,
        disjoint: false,
    };
    let test = Windows {
        ids: &text.test,
        context: shape.context,
        disjoint: true,
    };
    // Evaluated as part of the run: a rank lost meanwhile is survived like one lost in a step.
    let held_out = |comm: &Communicator, model: &CharTransformer| {
        let model = model.valid();
        evaluate(comm, test.len(), &mut |idx| {
            let (x, y) = test.batch(idx, device);
            let logits = model.forward(x, &mut Stages::whole());
            Ok([
                scalar(cross_entropy_sum(logits, y))? / shape.context as f64,
                0.0,
            ])
        })
    };
    let (model, summary, [loss, _, count]) = fit_then(
        comm,
        model,
        optim.build(),
        &train,
        &ad,
        opts,
        report,
        held_out,
    )?;
    let params = params::flatten(&model, &params::list(&model))?;
    let per_char = loss / count;
    Ok(Outcome {
        summary,
        evaluation: format!(
            "held-out loss {per_char:.4} nats/char (perplexity {:.2}) on {count} windows of {} characters",
            per_char.exp(),
            shape.context
        ),
        metrics: serde_json::json!({"test_loss": per_char, "test_perplexity": per_char.exp()}),
        params,
    })
}

fn scalar(t: burn::tensor::Tensor<1>) -> Result<f64, Error> {
    Ok(params::to_host(t)?.first().copied().unwrap_or(f32::NAN) as f64)
}

/// Scores a chunk of held-out samples: two sums (a loss, a count).
type Eval<'a> = dyn FnMut(&[usize]) -> Result<[f64; 2], Error> + 'a;

/// Sums `[a, b]` of `eval` over the held-out samples, each rank taking every n-th, in chunks;
/// returns `[a, b, samples]` summed over all ranks (NaNs when there are none).
fn evaluate(comm: &Communicator, len: usize, eval: &mut Eval) -> Result<[f64; 3], Error> {
    let (rank, n) = (comm.rank(), comm.world_size());
    let mine: Vec<usize> = (rank..len).step_by(n).collect();
    let mut totals = [0.0f64, 0.0, mine.len() as f64];
    for chunk in mine.chunks(256) {
        let [a, b] = eval(chunk)?;
        totals[0] += a;
        totals[1] += b;
    }
    comm.all_reduce(&mut totals, ReduceOp::Sum)?;
    if totals[2] == 0.0 {
        return Ok([f64::NAN; 3]);
    }
    Ok(totals)
}
