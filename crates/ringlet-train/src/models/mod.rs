//! The models `ringlet-train --model` trains through `ringlet-burn`: Burn modules written as
//! stages, so that the all-reduce of the upper stages' gradients overlaps the backward of the
//! lower ones.

pub mod cnn;
pub mod transformer;

use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};

/// The sum over rows of the cross-entropy of `logits` `[n, classes]` against `targets` `[n]`
/// (and the mean over nothing: callers divide where they want a mean).
pub fn cross_entropy_sum(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    let n = targets.dims()[0];
    let logp = log_softmax(logits, 1);
    logp.gather(1, targets.reshape([n, 1])).sum().neg()
}

/// Class labels as an integer tensor.
pub fn labels(y: &[u32], device: &Device) -> Tensor<1, Int> {
    let v: Vec<i64> = y.iter().map(|&c| i64::from(c)).collect();
    Tensor::<1, Int>::from_data(TensorData::new(v, [y.len()]), device)
}
