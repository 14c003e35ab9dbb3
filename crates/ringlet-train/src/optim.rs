//! The optimizers' hyper-parameters and their CPU updates: the references of the kernels of
//! `kernels/optim.cu` (`crate::gpu::kernels`), operation for operation in the same order (the
//! kernels are compiled without fused multiply-add), so the two agree bit for bit.

/// SGD with momentum (PyTorch's, dampening 0): `d = g*scale + wd*p; v = momentum*v + d;
/// p -= lr*v`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sgd {
    pub lr: f32,
    pub momentum: f32,
    pub weight_decay: f32,
}

impl Sgd {
    pub fn step(&self, p: &mut [f32], g: &[f32], v: &mut [f32], grad_scale: f32) {
        assert!(
            p.len() == g.len() && p.len() == v.len(),
            "sgd: length mismatch"
        );
        for ((p, g), v) in p.iter_mut().zip(g).zip(v.iter_mut()) {
            let d = *g * grad_scale + self.weight_decay * *p;
            *v = self.momentum * *v + d;
            *p -= self.lr * *v;
        }
    }
}

/// AdamW (decoupled weight decay, PyTorch's order of operations).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamW {
    pub lr: f32,
    pub beta1: f32,
    pub beta2: f32,
    pub eps: f32,
    pub weight_decay: f32,
}

/// PyTorch's defaults: lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.01.
impl Default for AdamW {
    fn default() -> Self {
        AdamW {
            lr: 1e-3,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

impl AdamW {
    /// `(1 - beta1^t, 1 - beta2^t)` for step `t` (from 1), computed once on the host and passed
    /// to the kernel as they are.
    pub fn bias_corrections(&self, t: u32) -> (f32, f32) {
        (
            1.0 - self.beta1.powi(t as i32),
            1.0 - self.beta2.powi(t as i32),
        )
    }

    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &self,
        p: &mut [f32],
        g: &[f32],
        m: &mut [f32],
        v: &mut [f32],
        grad_scale: f32,
        t: u32,
    ) {
        let n = p.len();
        assert!(
            g.len() == n && m.len() == n && v.len() == n,
            "adamw: length mismatch"
        );
        let (bias1, bias2) = self.bias_corrections(t);
        for i in 0..n {
            let gi = g[i] * grad_scale;
            let pi = p[i] * (1.0 - self.lr * self.weight_decay);
            m[i] = self.beta1 * m[i] + (1.0 - self.beta1) * gi;
            v[i] = self.beta2 * v[i] + (1.0 - self.beta2) * (gi * gi);
            p[i] = pi - self.lr * (m[i] / bias1) / ((v[i] / bias2).sqrt() + self.eps);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sgd_momentum_accumulates_velocity() {
        let sgd = Sgd {
            lr: 0.5,
            momentum: 0.9,
            weight_decay: 0.0,
        };
        let (mut p, mut v) = (vec![1.0f32, -2.0], vec![0.0f32; 2]);
        sgd.step(&mut p, &[2.0, 4.0], &mut v, 0.5); // d = (1, 2)
        assert_eq!((p.clone(), v.clone()), (vec![0.5, -3.0], vec![1.0, 2.0]));
        sgd.step(&mut p, &[2.0, 4.0], &mut v, 0.5); // v = 0.9 v + d = (1.9, 3.8)
        assert_eq!(v, vec![1.9, 3.8]);
        assert_eq!(p, vec![0.5 - 0.95, -3.0 - 1.9]);
        let decayed = Sgd {
            lr: 0.1,
            momentum: 0.0,
            weight_decay: 0.5,
        };
        let (mut p, mut v) = (vec![2.0f32], vec![0.0f32]);
        decayed.step(&mut p, &[0.0], &mut v, 1.0); // d = 0.5 * 2
        assert_eq!(p, vec![1.9]);
    }

    #[test]
    fn adamw_matches_its_formula_in_f64() {
        let opt = AdamW {
            lr: 1e-2,
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let (mut p, mut m, mut v) = (vec![0.5f32, -1.5], vec![0f32; 2], vec![0f32; 2]);
        let g = [0.2f32, -3.0];
        let (mut p64, mut m64, mut v64) = ([0.5f64, -1.5], [0f64; 2], [0f64; 2]);
        for t in 1..=3 {
            opt.step(&mut p, &g, &mut m, &mut v, 1.0, t);
            for i in 0..2 {
                let gi = g[i] as f64;
                p64[i] *= 1.0 - 1e-2 * 0.1;
                m64[i] = 0.9 * m64[i] + 0.1 * gi;
                v64[i] = 0.999 * v64[i] + 0.001 * gi * gi;
                let mhat = m64[i] / (1.0 - 0.9f64.powi(t as i32));
                let vhat = v64[i] / (1.0 - 0.999f64.powi(t as i32));
                p64[i] -= 1e-2 * mhat / (vhat.sqrt() + 1e-8);
                assert!(
                    ((p[i] as f64) - p64[i]).abs() < 1e-6,
                    "step {t} [{i}]: {} vs {}",
                    p[i],
                    p64[i]
                );
            }
        }
        // The first step moves each parameter by about lr against its gradient's sign.
        assert!(p[0] < 0.5 && p[1] > -1.5);
    }
}
