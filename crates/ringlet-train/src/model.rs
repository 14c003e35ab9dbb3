//! The model: a multi-layer perceptron classifier (dense layers, ReLU between them, softmax
//! cross-entropy), forward and backward on the CPU with `matrixmultiply`'s GEMM.
//!
//! Parameters and gradients each live in one flat vector, layer after layer (weights `[out, in]`
//! row-major, then biases), so a gradient bucket is a plain range of that vector and the
//! all-reduce and the optimizer work on slices. The loss and the gradients are *sums* over the
//! samples, not means: ranks add their sums and divide once by the global batch, which is what
//! makes n ranks compute the update one process would.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
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

/// Activations kept from the forward pass for the backward pass.
#[derive(Default)]
pub struct Workspace {
    /// `acts[0]` is the input; `acts[i + 1]` layer i's output (after ReLU for hidden layers).
    acts: Vec<Vec<f32>>,
    delta: Vec<f32>,
    delta_prev: Vec<f32>,
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

    /// Forward pass of `batch` samples (`x`: batch × inputs): fills `ws` and returns the summed
    /// cross-entropy loss and the number of correct predictions.
    pub fn forward(
        &self,
        params: &[f32],
        x: &[f32],
        y: &[u32],
        ws: &mut Workspace,
    ) -> (f64, usize) {
        let batch = y.len();
        let layers = self.layers();
        ws.acts.resize_with(layers.len() + 1, Vec::new);
        ws.acts[0].clear();
        ws.acts[0].extend_from_slice(x);
        for (i, l) in layers.iter().enumerate() {
            let (done, rest) = ws.acts.split_at_mut(i + 1);
            let (input, out) = (&done[i], &mut rest[0]);
            out.clear();
            out.resize(batch * l.outputs, 0.0);
            for row in out.chunks_mut(l.outputs) {
                row.copy_from_slice(&params[l.bias.clone()]);
            }
            // out[batch, outputs] += input[batch, inputs] · W[outputs, inputs]ᵀ
            gemm(
                batch,
                l.inputs,
                l.outputs,
                input,
                (l.inputs, 1),
                &params[l.weight.clone()],
                (1, l.inputs),
                out,
                1.0,
            );
            if i + 1 < layers.len() {
                for v in out.iter_mut() {
                    *v = v.max(0.0);
                }
            }
        }
        let logits = &ws.acts[layers.len()];
        let classes = self.sizes[self.sizes.len() - 1];
        let (mut loss, mut correct) = (0.0f64, 0);
        for (row, &label) in logits.chunks(classes).zip(y) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
            loss += sum.ln() - (row[label as usize] - max) as f64;
            let best = row
                .iter()
                .enumerate()
                .fold(0, |b, (j, &v)| if v > row[b] { j } else { b });
            correct += usize::from(best == label as usize);
        }
        (loss, correct)
    }

    /// Backward pass after [`forward`](Mlp::forward): writes the summed gradient of each layer
    /// into `grads` (same layout as the parameters), last layer first, calling `done(layer)`
    /// as soon as that layer's gradient is complete so its all-reduce can start.
    pub fn backward(
        &self,
        params: &[f32],
        y: &[u32],
        ws: &mut Workspace,
        grads: &mut [f32],
        mut done: impl FnMut(usize, &[f32]),
    ) {
        let batch = y.len();
        let layers = self.layers();
        let classes = self.sizes[self.sizes.len() - 1];
        // d(loss)/d(logits) = softmax - onehot, per sample (the loss is a sum).
        let logits = &ws.acts[layers.len()];
        ws.delta.clear();
        ws.delta.extend_from_slice(logits);
        for (row, &label) in ws.delta.chunks_mut(classes).zip(y) {
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for v in row.iter_mut() {
                *v = (*v - max).exp();
                sum += *v;
            }
            for v in row.iter_mut() {
                *v /= sum;
            }
            row[label as usize] -= 1.0;
        }
        for (i, l) in layers.iter().enumerate().rev() {
            let input = &ws.acts[i];
            // dW[outputs, inputs] = deltaᵀ[outputs, batch] · input[batch, inputs]
            gemm(
                l.outputs,
                batch,
                l.inputs,
                &ws.delta,
                (1, l.outputs),
                input,
                (l.inputs, 1),
                &mut grads[l.weight.clone()],
                0.0,
            );
            let db = &mut grads[l.bias.clone()];
            db.fill(0.0);
            for row in ws.delta.chunks(l.outputs) {
                for (g, d) in db.iter_mut().zip(row) {
                    *g += d;
                }
            }
            done(i, &grads[l.range()]);
            if i == 0 {
                break;
            }
            // delta_prev[batch, inputs] = delta[batch, outputs] · W[outputs, inputs], masked by
            // the ReLU that produced this layer's input.
            ws.delta_prev.clear();
            ws.delta_prev.resize(batch * l.inputs, 0.0);
            gemm(
                batch,
                l.outputs,
                l.inputs,
                &ws.delta,
                (l.outputs, 1),
                &params[l.weight.clone()],
                (l.inputs, 1),
                &mut ws.delta_prev,
                0.0,
            );
            for (d, &a) in ws.delta_prev.iter_mut().zip(input.iter()) {
                if a <= 0.0 {
                    *d = 0.0;
                }
            }
            std::mem::swap(&mut ws.delta, &mut ws.delta_prev);
        }
    }
}

/// `c[m, n] = beta · c + a[m, k] · b[k, n]`, each matrix given with its (row, column) strides;
/// `c` is row-major and contiguous.
#[allow(clippy::too_many_arguments)]
fn gemm(
    m: usize,
    k: usize,
    n: usize,
    a: &[f32],
    (rsa, csa): (usize, usize),
    b: &[f32],
    (rsb, csb): (usize, usize),
    c: &mut [f32],
    beta: f32,
) {
    if m == 0 || n == 0 {
        return;
    }
    let a_end = (m - 1) * rsa + (k.max(1) - 1) * csa;
    let b_end = (k.max(1) - 1) * rsb + (n - 1) * csb;
    assert!(
        k == 0 || (a.len() > a_end && b.len() > b_end),
        "gemm operands too short"
    );
    assert!(c.len() >= m * n, "gemm output too short");
    // SAFETY: the asserts above bound every element matrixmultiply reads (a: m×k, b: k×n with
    // the given strides) and writes (c: m×n row-major); the slices do not overlap (c is &mut).
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.as_ptr(),
            rsa as isize,
            csa as isize,
            b.as_ptr(),
            rsb as isize,
            csb as isize,
            beta,
            c.as_mut_ptr(),
            n as isize,
            1,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        mlp.forward(&p, &x, &y, &mut ws);
        let mut order = Vec::new();
        mlp.backward(&p, &y, &mut ws, &mut g, |i, _| order.push(i));
        assert_eq!(order, vec![2, 1, 0], "last layer's gradient is ready first");
        let h = 1e-2f32;
        let mut worst = 0.0f64;
        for i in 0..p.len() {
            let keep = p[i];
            p[i] = keep + h;
            let up = mlp.forward(&p, &x, &y, &mut ws).0;
            p[i] = keep - h;
            let down = mlp.forward(&p, &x, &y, &mut ws).0;
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
        let grad = |x: &[f32], y: &[u32], ws: &mut Workspace| {
            let mut g = vec![0.0; p.len()];
            mlp.forward(&p, x, y, ws);
            mlp.backward(&p, y, ws, &mut g, |_, _| {});
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
        assert!(Mlp::new(vec![64, 0, 10]).is_err());
    }
}
