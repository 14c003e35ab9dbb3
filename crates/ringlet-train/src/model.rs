//! The model: a multi-layer perceptron classifier (dense layers, ReLU between them, softmax
//! cross-entropy), forward and backward written once over [`Backend`] (the CPU or a GPU).
//!
//! Parameters and gradients each live in one flat buffer, layer after layer (weights `[out, in]`
//! row-major, then biases), so a gradient bucket is a plain range of that buffer and the
//! all-reduce and the optimizer work on ranges. The loss and the gradients are *sums* over the
//! samples, not means: ranks add their sums and divide once by the global batch, which is what
//! makes n ranks compute the update one process would.

use crate::tensor::{Backend, Gemm};
use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use ringlet::Error;
use ringlet_ddp::checkpoint::Tensor;
use std::ops::Range;

/// Layer sizes, input first, classes last.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Mlp {
    pub sizes: Vec<usize>,
}

/// Where one layer's parameters sit in the flat vector.
#[derive(Clone, Debug)]
pub struct Layer {
    pub inputs: usize,
    pub outputs: usize,
    pub weight: Range<usize>,
    pub bias: Range<usize>,
}

impl Layer {
    /// Weights and biases together.
    pub fn range(&self) -> Range<usize> {
        self.weight.start..self.bias.end
    }
}

/// `flat` (laid out as the parameters are) as named tensors, per layer a weight `[out, in]` and a
/// bias: `{prefix}layers.{i}.weight` and `.bias`, the names checkpoints use (as Python tools
/// expect them).
pub fn layer_tensors(layers: &[Layer], prefix: &str, flat: &[f32]) -> Vec<Tensor> {
    layers
        .iter()
        .enumerate()
        .flat_map(|(i, l)| {
            [
                Tensor {
                    name: format!("{prefix}layers.{i}.weight"),
                    shape: vec![l.outputs, l.inputs],
                    data: flat[l.weight.clone()].to_vec(),
                },
                Tensor {
                    name: format!("{prefix}layers.{i}.bias"),
                    shape: vec![l.outputs],
                    data: flat[l.bias.clone()].to_vec(),
                },
            ]
        })
        .collect()
}

/// Activations kept from the forward pass for the backward pass, where the backend keeps them.
pub struct Workspace<B: Backend> {
    /// `acts[0]` is the input; `acts[i + 1]` layer i's output (after ReLU for hidden layers).
    acts: Vec<Option<B::Buf>>,
    delta: Option<B::Buf>,
    delta_prev: Option<B::Buf>,
    labels: Option<B::Labels>,
    batch: usize,
}

impl<B: Backend> Default for Workspace<B> {
    fn default() -> Self {
        Workspace {
            acts: Vec::new(),
            delta: None,
            delta_prev: None,
            labels: None,
            batch: 0,
        }
    }
}

impl Mlp {
    pub fn new(sizes: Vec<usize>) -> Result<Mlp, String> {
        if sizes.len() < 2 || sizes.contains(&0) {
            return Err(format!(
                "layer sizes {sizes:?}: need at least an input and an output size, none zero"
            ));
        }
        Ok(Mlp { sizes })
    }

    pub fn layers(&self) -> Vec<Layer> {
        let mut at = 0;
        self.sizes
            .windows(2)
            .map(|w| {
                let (inputs, outputs) = (w[0], w[1]);
                let weight = at..at + inputs * outputs;
                let bias = weight.end..weight.end + outputs;
                at = bias.end;
                Layer {
                    inputs,
                    outputs,
                    weight,
                    bias,
                }
            })
            .collect()
    }

    pub fn param_count(&self) -> usize {
        self.layers().last().map_or(0, |l| l.bias.end)
    }

    /// He-uniform weights from `seed`, zero biases: every rank makes the same parameters.
    pub fn init(&self, seed: u64) -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6d6c_7069_6e69_7400);
        let mut p = vec![0.0f32; self.param_count()];
        for l in self.layers() {
            let bound = (6.0 / l.inputs as f32).sqrt();
            for w in &mut p[l.weight] {
                *w = rng.random_range(-bound..bound);
            }
        }
        p
    }

    /// Forward pass of `batch` samples (`x`: batch × inputs) on `be`: fills `ws` and returns
    /// the summed cross-entropy loss and the number of correct predictions.
    pub fn forward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        x: &[f32],
        y: &[u32],
        ws: &mut Workspace<B>,
    ) -> Result<(f64, usize), Error> {
        let batch = y.len();
        if x.len() != batch * self.sizes[0] {
            return Err(Error::InvalidArgument(format!(
                "a batch of {batch} labels needs {} inputs, not {}",
                batch * self.sizes[0],
                x.len()
            )));
        }
        ws.labels = Some(be.labels(y)?);
        self.layers_forward(be, params, x, batch, ws)?;
        let logits = ws.acts[self.sizes.len() - 1]
            .as_ref()
            .expect("the last layer's");
        let labels = ws.labels.as_ref().expect("set above");
        be.softmax_loss(logits, labels, batch, self.classes())
    }

    /// The logits (batch × classes, row-major) of `batch` samples, for inference: the forward
    /// pass without a loss.
    pub fn logits<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        x: &[f32],
        ws: &mut Workspace<B>,
    ) -> Result<Vec<f32>, Error> {
        let batch = x.len() / self.sizes[0];
        if x.len() != batch * self.sizes[0] {
            return Err(Error::InvalidArgument(format!(
                "{} inputs are not whole samples of {}",
                x.len(),
                self.sizes[0]
            )));
        }
        self.layers_forward(be, params, x, batch, ws)?;
        let logits = ws.acts[self.sizes.len() - 1]
            .as_ref()
            .expect("the last layer's");
        let mut out = vec![0.0f32; batch * self.classes()];
        be.read(logits, 0, &mut out)?;
        Ok(out)
    }

    /// Every layer's activations into `ws.acts`, the last one's logits.
    fn layers_forward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        x: &[f32],
        batch: usize,
        ws: &mut Workspace<B>,
    ) -> Result<(), Error> {
        let layers = self.layers();
        ws.acts.resize_with(layers.len() + 1, || None);
        ws.batch = batch;
        be.write(x, be.ensure(&mut ws.acts[0], x.len())?, 0)?;
        for (i, l) in layers.iter().enumerate() {
            let (done, rest) = ws.acts.split_at_mut(i + 1);
            let input = done[i].as_ref().expect("filled by the previous layer");
            let out = be.ensure(&mut rest[0], batch * l.outputs)?;
            be.fill_rows(out, batch, l.outputs, (params, l.bias.start))?;
            // out[batch, outputs] += input[batch, inputs] · W[outputs, inputs]ᵀ
            let g = Gemm {
                m: batch,
                n: l.outputs,
                k: l.inputs,
                trans_a: false,
                trans_b: true,
            };
            be.gemm(&g, (input, 0), (params, l.weight.start), (out, 0), 1.0)?;
            if i + 1 < layers.len() {
                be.relu(out, batch * l.outputs)?;
            }
        }
        Ok(())
    }

    /// Backward pass after [`forward`](Mlp::forward): writes the summed gradient of each layer
    /// into `grads` (same layout as the parameters), last layer first, calling `done(layer,
    /// grads)` as soon as that layer's gradient is complete so its all-reduce can start.
    pub fn backward<B: Backend>(
        &self,
        be: &B,
        params: &B::Buf,
        ws: &mut Workspace<B>,
        grads: &mut B::Buf,
        mut done: impl FnMut(usize, &B::Buf) -> Result<(), Error>,
    ) -> Result<(), Error> {
        let batch = ws.batch;
        let layers = self.layers();
        let classes = self.classes();
        let logits = ws.acts[layers.len()].as_ref().expect("forward ran");
        let labels = ws.labels.as_ref().expect("forward ran");
        // d(loss)/d(logits) = softmax - onehot, per sample (the loss is a sum).
        let delta = be.ensure(&mut ws.delta, batch * classes)?;
        be.softmax_grad(logits, labels, batch, classes, delta)?;
        for (i, l) in layers.iter().enumerate().rev() {
            let input = ws.acts[i].as_ref().expect("forward ran");
            let delta = ws.delta.as_ref().expect("made above");
            // dW[outputs, inputs] = deltaᵀ[outputs, batch] · input[batch, inputs]
            let g = Gemm {
                m: l.outputs,
                n: l.inputs,
                k: batch,
                trans_a: true,
                trans_b: false,
            };
            be.gemm(&g, (delta, 0), (input, 0), (grads, l.weight.start), 0.0)?;
            be.column_sums(delta, batch, l.outputs, (grads, l.bias.start))?;
            done(i, grads)?;
            if i == 0 {
                break;
            }
            // delta_prev[batch, inputs] = delta[batch, outputs] · W[outputs, inputs], masked by
            // the ReLU that produced this layer's input.
            let prev = be.ensure(&mut ws.delta_prev, batch * l.inputs)?;
            let g = Gemm {
                m: batch,
                n: l.inputs,
                k: l.outputs,
                trans_a: false,
                trans_b: false,
            };
            be.gemm(&g, (delta, 0), (params, l.weight.start), (prev, 0), 0.0)?;
            be.relu_mask(prev, input, batch * l.inputs)?;
            std::mem::swap(&mut ws.delta, &mut ws.delta_prev);
        }
        Ok(())
    }

    pub fn classes(&self) -> usize {
        self.sizes[self.sizes.len() - 1]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Host;

    fn data(batch: usize, inputs: usize, classes: usize) -> (Vec<f32>, Vec<u32>) {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let x = (0..batch * inputs)
            .map(|_| rng.random_range(-1.0..1.0))
            .collect();
        let y = (0..batch)
            .map(|_| rng.random_range(0..classes as u32))
            .collect();
        (x, y)
    }

    /// The analytic gradient against central differences of the loss, for every parameter of a
    /// small network (in f64-accumulated loss; f32 parameters).
    #[test]
    fn backward_matches_finite_differences() {
        let mlp = Mlp::new(vec![5, 7, 6, 3]).unwrap();
        let (x, y) = data(4, 5, 3);
        let mut p = mlp.init(3);
        // Non-zero biases, so their gradients are exercised away from the ReLU kinks' origin.
        for l in mlp.layers() {
            for (j, b) in p[l.bias].iter_mut().enumerate() {
                *b = 0.05 * (j as f32 + 1.0);
            }
        }
        let mut ws = Workspace::default();
        let mut g = vec![0.0; p.len()];
        mlp.forward(&Host, &p, &x, &y, &mut ws).unwrap();
        let mut order = Vec::new();
        mlp.backward(&Host, &p, &mut ws, &mut g, |i, _| {
            order.push(i);
            Ok(())
        })
        .unwrap();
        assert_eq!(order, vec![2, 1, 0], "last layer's gradient is ready first");
        let h = 1e-2f32;
        let mut worst = 0.0f64;
        for i in 0..p.len() {
            let keep = p[i];
            p[i] = keep + h;
            let up = mlp.forward(&Host, &p, &x, &y, &mut ws).unwrap().0;
            p[i] = keep - h;
            let down = mlp.forward(&Host, &p, &x, &y, &mut ws).unwrap().0;
            p[i] = keep;
            let numeric = (up - down) / (2.0 * h as f64);
            worst = worst.max((numeric - g[i] as f64).abs() / (1.0 + numeric.abs()));
        }
        assert!(worst < 2e-3, "worst relative gradient error {worst}");
    }

    /// The summed gradient of a batch equals the sum of the gradients of its halves: what makes
    /// data parallelism exact.
    #[test]
    fn gradients_add_over_samples() {
        let mlp = Mlp::new(vec![6, 8, 4]).unwrap();
        let (x, y) = data(10, 6, 4);
        let p = mlp.init(11);
        let mut ws = Workspace::default();
        let grad = |x: &[f32], y: &[u32], ws: &mut Workspace<Host>| {
            let mut g = vec![0.0; p.len()];
            mlp.forward(&Host, &p, x, y, ws).unwrap();
            mlp.backward(&Host, &p, ws, &mut g, |_, _| Ok(())).unwrap();
            g
        };
        let whole = grad(&x, &y, &mut ws);
        let a = grad(&x[..4 * 6], &y[..4], &mut ws);
        let b = grad(&x[4 * 6..], &y[4..], &mut ws);
        for i in 0..whole.len() {
            assert!((whole[i] - (a[i] + b[i])).abs() <= 1e-5 * (1.0 + whole[i].abs()));
        }
    }

    #[test]
    fn layout_and_refusals() {
        let mlp = Mlp::new(vec![64, 32, 10]).unwrap();
        let ls = mlp.layers();
        assert_eq!(ls[0].weight, 0..2048);
        assert_eq!(ls[0].bias, 2048..2080);
        assert_eq!(ls[1].range(), 2080..2410);
        assert_eq!(mlp.param_count(), 2410);
        assert_eq!(mlp.init(1), mlp.init(1));
        assert!(Mlp::new(vec![64]).is_err());
        let e = mlp
            .forward(
                &Host,
                &mlp.init(1),
                &[0.0; 64 * 3 - 1],
                &[0, 1, 2],
                &mut Workspace::default(),
            )
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a batch of 3 labels needs 192 inputs, not 191"),
            "{e}"
        );
        assert!(Mlp::new(vec![64, 0, 10]).is_err());
    }
}
