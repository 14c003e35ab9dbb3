//! A small convolutional classifier for square grey-scale images (the embedded 8×8 digits,
//! MNIST's 28×28): two convolution blocks (3×3 convolutions, ReLU, 2×2 max-pooling) and a
//! two-layer head, three stages for overlapped backward.

use super::{cross_entropy_sum, labels};
use crate::data::Dataset;
use burn::module::Module;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::pool::{MaxPool2d, MaxPool2dConfig};
use burn::nn::{Linear, LinearConfig, PaddingConfig2d, Relu};
use burn::tensor::{Device, Int, Tensor, TensorData};
use ringlet_burn::{Objective, Samples, Stages};

#[derive(Module, Debug)]
pub struct ConvBlock {
    conv1: Conv2d,
    conv2: Conv2d,
    pool: MaxPool2d,
    relu: Relu,
}

impl ConvBlock {
    fn new(inputs: usize, channels: usize, device: &Device) -> ConvBlock {
        let conv = |i| {
            Conv2dConfig::new([i, channels], [3, 3])
                .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
                .init(device)
        };
        ConvBlock {
            conv1: conv(inputs),
            conv2: conv(channels),
            pool: MaxPool2dConfig::new([2, 2]).init(),
            relu: Relu::new(),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = self.relu.forward(self.conv1.forward(x));
        self.pool.forward(self.relu.forward(self.conv2.forward(x)))
    }
}

#[derive(Module, Debug)]
pub struct Cnn {
    block1: ConvBlock,
    block2: ConvBlock,
    hidden: Linear,
    output: Linear,
    relu: Relu,
    side: usize,
}

impl Cnn {
    /// For `side`×`side` images of `classes` classes; `channels` in the first block, twice as
    /// many in the second.
    pub fn new(
        side: usize,
        channels: usize,
        hidden: usize,
        classes: usize,
        device: &Device,
    ) -> Cnn {
        let pooled = side / 4;
        Cnn {
            block1: ConvBlock::new(1, channels, device),
            block2: ConvBlock::new(channels, 2 * channels, device),
            hidden: LinearConfig::new(2 * channels * pooled * pooled, hidden).init(device),
            output: LinearConfig::new(hidden, classes).init(device),
            relu: Relu::new(),
            side,
        }
    }

    /// The image side of a dataset's samples (they must be square, at least 4×4).
    pub fn side_of(data: &Dataset) -> Result<usize, String> {
        let side = (data.features as f64).sqrt().round() as usize;
        if side * side != data.features || side < 4 {
            return Err(format!(
                "--model cnn needs square images of at least 4x4; {} has {} features per sample",
                data.name, data.features
            ));
        }
        Ok(side)
    }

    /// Logits `[n, classes]` for images `[n, 1, side, side]`; `stages` cuts between the blocks.
    pub fn forward(&self, x: Tensor<4>, stages: &mut Stages) -> Tensor<2> {
        let x = stages.cut(self.block1.forward(x));
        let x = stages.cut(self.block2.forward(x));
        let x: Tensor<2> = x.flatten(1, 3);
        self.output
            .forward(self.relu.forward(self.hidden.forward(x)))
    }
}

/// Images and labels of some samples.
pub struct ImageBatch {
    pub images: Tensor<4>,
    pub labels: Tensor<1, Int>,
}

/// A dataset's samples as `[n, 1, side, side]` images (the training set, or the test set).
pub struct Images<'a> {
    pub data: &'a Dataset,
    pub side: usize,
    pub test: bool,
}

impl Images<'_> {
    fn xy(&self) -> (&[f32], &[u32]) {
        if self.test {
            (&self.data.test_x, &self.data.test_y)
        } else {
            (&self.data.train_x, &self.data.train_y)
        }
    }
}

impl Samples for Images<'_> {
    type Batch = ImageBatch;
    fn len(&self) -> usize {
        match self.test {
            true => self.data.test_len(),
            false => self.data.train_len(),
        }
    }
    fn batch(&self, indices: &[usize], device: &Device) -> ImageBatch {
        let (xs, ys) = self.xy();
        let f = self.data.features;
        let mut x = Vec::with_capacity(indices.len() * f);
        let mut y = Vec::with_capacity(indices.len());
        for &id in indices {
            // Training sample ids are rows unless the rank holds only some shards.
            let i = match self.test {
                true => id,
                false => self
                    .data
                    .row(id)
                    .expect("the sampler hands out held samples"),
            };
            x.extend_from_slice(&xs[i * f..(i + 1) * f]);
            y.push(ys[i]);
        }
        let shape = [indices.len(), 1, self.side, self.side];
        ImageBatch {
            images: Tensor::<4>::from_data(TensorData::new(x, shape), device),
            labels: labels(&y, device),
        }
    }
    fn held(&self, n: usize) -> Vec<usize> {
        match (&self.data.held, self.test) {
            (Some(h), false) => h
                .runs
                .iter()
                .flat_map(|&(first, rows, _)| first..first + rows)
                .take(n)
                .collect(),
            _ => (0..n.min(self.len())).collect(),
        }
    }
}

impl Objective<ImageBatch> for Cnn {
    fn loss_sum(&self, batch: &ImageBatch, stages: &mut Stages) -> Tensor<1> {
        let logits = self.forward(batch.images.clone(), stages);
        cross_entropy_sum(logits, batch.labels.clone())
    }
}
