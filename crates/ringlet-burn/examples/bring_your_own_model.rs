//! Your own Burn model, trained data-parallel by Ringlet: `ringrun -n 2 -- cargo run --release
//! --example bring_your_own_model` (or any launcher: torchrun-style env, mpirun, Slurm).
//!
//! The model classifies points of two interleaved spirals. Each rank builds it, `fit` takes the
//! parameters from rank 0, gives every rank its slice of each global batch, all-reduces the
//! gradients (stage by stage, overlapping backward), and steps Burn's AdamW.

use burn::module::Module;
use burn::nn::{Linear, LinearConfig, Relu};
use burn::optim::AdamWConfig;
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use ringlet::Communicator;
use ringlet_burn::{fit, Objective, Samples, Stages, TrainOptions};

#[derive(Module, Debug)]
struct SpiralNet {
    input: Linear,
    hidden: Linear,
    output: Linear,
    relu: Relu,
}

impl SpiralNet {
    fn new(device: &Device) -> SpiralNet {
        SpiralNet {
            input: LinearConfig::new(2, 64).init(device),
            hidden: LinearConfig::new(64, 64).init(device),
            output: LinearConfig::new(64, 2).init(device),
            relu: Relu::new(),
        }
    }
    fn forward(&self, x: Tensor<2>, stages: &mut Stages) -> Tensor<2> {
        let x = stages.cut(self.relu.forward(self.input.forward(x)));
        let x = stages.cut(self.relu.forward(self.hidden.forward(x)));
        self.output.forward(x)
    }
}

/// Two spirals of 1000 points each: point i of spiral c at angle t, radius t.
struct Spirals {
    points: Vec<[f32; 2]>,
    labels: Vec<i64>,
}

impl Spirals {
    fn new() -> Spirals {
        let (mut points, mut labels) = (Vec::new(), Vec::new());
        for i in 0..2000 {
            let (c, t) = (i % 2, (i / 2) as f32 / 1000.0 * 9.0 + 0.5);
            let s = if c == 0 { 1.0 } else { -1.0 };
            points.push([s * t * t.cos() / 10.0, s * t * t.sin() / 10.0]);
            labels.push(c as i64);
        }
        Spirals { points, labels }
    }
}

impl Samples for Spirals {
    type Batch = (Tensor<2>, Tensor<1, Int>);
    fn len(&self) -> usize {
        self.points.len()
    }
    fn batch(&self, indices: &[usize], device: &Device) -> Self::Batch {
        let x: Vec<f32> = indices.iter().flat_map(|&i| self.points[i]).collect();
        let y: Vec<i64> = indices.iter().map(|&i| self.labels[i]).collect();
        let n = indices.len();
        let x = Tensor::<2>::from_data(TensorData::new(x, [n, 2]), device);
        (
            x,
            Tensor::<1, Int>::from_data(TensorData::new(y, [n]), device),
        )
    }
}

impl Objective<(Tensor<2>, Tensor<1, Int>)> for SpiralNet {
    /// The *sum* of the batch's cross-entropy: Ringlet adds the ranks' sums and divides by the
    /// global batch, so any number of ranks computes what one process would.
    fn loss_sum(&self, (x, y): &(Tensor<2>, Tensor<1, Int>), stages: &mut Stages) -> Tensor<1> {
        let logp = log_softmax(self.forward(x.clone(), stages), 1);
        let n = y.dims()[0];
        logp.gather(1, y.clone().reshape([n, 1])).sum().neg()
    }
}

fn main() -> Result<(), ringlet::Error> {
    // `fit` replaces it with the survivors' communicator if a rank is lost (ringrun --min-ranks).
    let mut comm = Communicator::from_env()?;
    let device = Device::flex().autodiff();
    device.seed(1);
    let data = Spirals::new();
    let mut opts = TrainOptions::new(200, 600);
    opts.lr = 0.01;
    let optim = AdamWConfig::new().with_weight_decay(0.0).init();
    let (model, summary) = fit(
        &mut comm,
        SpiralNet::new(&device),
        optim,
        &data,
        &device,
        &opts,
        |r| {
            if r.rank == 0 && r.step % 100 == 0 {
                println!("step {}: loss {:.4}", r.step, r.loss);
            }
        },
    )?;
    // Every rank holds the same trained model; rank 0 reports.
    if comm.rank() == 0 {
        let (x, y) = data.batch(&(0..data.len()).collect::<Vec<_>>(), &device);
        let predicted = model
            .forward(x, &mut Stages::whole())
            .argmax(1)
            .reshape([data.len()]);
        let correct = predicted.equal(y).int().sum().into_scalar::<i64>();
        println!(
            "{} steps on {} ranks, {:.0} samples/s: {:.1}% of the spirals' points classified right",
            summary.steps,
            comm.world_size(),
            summary.samples_per_s,
            100.0 * correct as f64 / data.len() as f64
        );
    }
    Ok(())
}
