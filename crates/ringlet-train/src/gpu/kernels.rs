//! The trainer's kernels of `kernels/`: the optimizers (`optim.cu`) and the element-wise and
//! per-row parts of the MLP (`model.cu`), compiled by `ringlet-cuda` with NVRTC for the device
//! (through its kernel cache), loaded on the device's context and launched on its one stream.

use crate::optim::{AdamW, Sgd};
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{
    CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut, PushKernelArg,
};
use ringlet_cuda::kernels::KernelSource;
use ringlet_cuda::launch::{config, Kernels};
use ringlet_cuda::CudaError;
use std::sync::Arc;

/// SGD with momentum and AdamW for f32 parameters.
pub const OPTIM: KernelSource = KernelSource {
    name: "optim.cu",
    code: include_str!("../../../../kernels/optim.cu"),
    kernels: || vec!["sgd_momentum_f32".into(), "adamw_f32".into()],
};

/// The element-wise and per-row parts of the training binary's MLP (the GEMMs are cuBLAS's).
pub const MODEL: KernelSource = KernelSource {
    name: "model.cu",
    code: include_str!("../../../../kernels/model.cu"),
    kernels: || {
        [
            "fill_rows_f32",
            "relu_f32",
            "relu_mask_f32",
            "column_sums_f32",
            "softmax_loss_f32",
            "softmax_grad_f32",
        ]
        .map(String::from)
        .to_vec()
    },
};

/// The trainer's kernel sources.
pub const ALL: [&KernelSource; 2] = [&OPTIM, &MODEL];

/// The optimizer and model kernels loaded on one device, launched on its stream.
pub struct TrainKernels {
    stream: Arc<CudaStream>,
    optim: Arc<CudaModule>,
    model: Arc<CudaModule>,
}

impl TrainKernels {
    /// Compiles (or finds in the kernel cache) and loads `optim.cu` and `model.cu` on the device of
    /// `kernels`, to run on its stream.
    pub fn new(kernels: &Kernels) -> Result<TrainKernels, CudaError> {
        Ok(TrainKernels {
            optim: kernels.load(&OPTIM)?,
            model: kernels.load(&MODEL)?,
            stream: kernels.stream.clone(),
        })
    }

    fn function(module: &Arc<CudaModule>, name: &str) -> Result<CudaFunction, CudaError> {
        module.load_function(name).map_err(CudaError::from)
    }

    /// One SGD-with-momentum step, as [`Sgd::step`].
    pub fn sgd(
        &self,
        opt: &Sgd,
        p: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        grad_scale: f32,
    ) -> Result<(), CudaError> {
        let n = p.len();
        assert!(g.len() >= n && v.len() >= n, "sgd: buffers shorter than p");
        let s = &self.stream;
        // The guards record the kernel's reads and writes for cudarc when dropped, after it.
        let (p, _p) = p.device_ptr_mut(s);
        let (g, _g) = g.device_ptr(s);
        let (v, _v) = v.device_ptr_mut(s);
        // SAFETY: each buffer holds at least n elements (asserted), on this context.
        unsafe { self.sgd_at(opt, [p, g, v], n, grad_scale) }
    }

    /// [`sgd`](Self::sgd) on raw addresses `[p, g, v]`.
    ///
    /// # Safety
    /// Each address must hold `n` f32 on this context, alive until the kernel has run.
    pub unsafe fn sgd_at(
        &self,
        opt: &Sgd,
        [p, g, v]: [CUdeviceptr; 3],
        n: usize,
        grad_scale: f32,
    ) -> Result<(), CudaError> {
        let n = n as u64;
        let f = Self::function(&self.optim, "sgd_momentum_f32")?;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(&p).arg(&g).arg(&v).arg(&n);
        launch
            .arg(&opt.lr)
            .arg(&opt.momentum)
            .arg(&opt.weight_decay)
            .arg(&grad_scale);
        // SAFETY: matches optim.cu's signature; the caller vouches for the n elements.
        unsafe { launch.launch(config(n)) }?;
        Ok(())
    }

    /// One AdamW step (`t` from 1), as [`AdamW::step`].
    #[allow(clippy::too_many_arguments)]
    pub fn adamw(
        &self,
        opt: &AdamW,
        p: &mut CudaSlice<f32>,
        g: &CudaSlice<f32>,
        m: &mut CudaSlice<f32>,
        v: &mut CudaSlice<f32>,
        grad_scale: f32,
        t: u32,
    ) -> Result<(), CudaError> {
        let n = p.len();
        assert!(
            g.len() >= n && m.len() >= n && v.len() >= n,
            "adamw: buffers shorter than p"
        );
        let s = &self.stream;
        // The guards record the kernel's reads and writes for cudarc when dropped, after it.
        let (p, _p) = p.device_ptr_mut(s);
        let (g, _g) = g.device_ptr(s);
        let (m, _m) = m.device_ptr_mut(s);
        let (v, _v) = v.device_ptr_mut(s);
        // SAFETY: each buffer holds at least n elements (asserted), on this context.
        unsafe { self.adamw_at(opt, [p, g, m, v], n, grad_scale, t) }
    }

    /// [`adamw`](Self::adamw) on raw addresses `[p, g, m, v]`.
    ///
    /// # Safety
    /// Each address must hold `n` f32 on this context, alive until the kernel has run.
    pub unsafe fn adamw_at(
        &self,
        opt: &AdamW,
        [p, g, m, v]: [CUdeviceptr; 4],
        n: usize,
        grad_scale: f32,
        t: u32,
    ) -> Result<(), CudaError> {
        let n = n as u64;
        let (bias1, bias2) = opt.bias_corrections(t);
        let f = Self::function(&self.optim, "adamw_f32")?;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(&p).arg(&g).arg(&m).arg(&v).arg(&n);
        launch
            .arg(&opt.lr)
            .arg(&opt.beta1)
            .arg(&opt.beta2)
            .arg(&opt.eps);
        launch
            .arg(&opt.weight_decay)
            .arg(&grad_scale)
            .arg(&bias1)
            .arg(&bias2);
        // SAFETY: matches optim.cu's signature; the caller vouches for the n elements.
        unsafe { launch.launch(config(n)) }?;
        Ok(())
    }

    /// Launches `name` of model.cu over `work` items (elements, rows or columns).
    ///
    /// # Safety
    /// `args` must match the kernel's parameters, and every address must hold what the kernel
    /// reads and writes for the sizes given, on this context.
    pub unsafe fn model(&self, name: &str, work: u64, args: &[ModelArg]) -> Result<(), CudaError> {
        let f = Self::function(&self.model, name)?;
        let mut launch = self.stream.launch_builder(&f);
        for a in args {
            match a {
                ModelArg::Ptr(p) => launch.arg(p),
                ModelArg::Size(n) => launch.arg(n),
            };
        }
        // SAFETY: the caller vouches for the arguments (see above).
        unsafe { launch.launch(config(work)) }?;
        Ok(())
    }
}

/// An argument of a model.cu kernel: a device address or a size (`u64`).
#[derive(Clone, Copy, Debug)]
pub enum ModelArg {
    Ptr(CUdeviceptr),
    Size(u64),
}

/// Random data for checking kernels against their CPU references: xorshift64*, uniform in
/// [-2, 2) times a scale, seeded per process so every run checks fresh numbers.
pub struct CheckRng(u64);

impl CheckRng {
    pub fn fresh() -> CheckRng {
        CheckRng(0x9E37_79B9_7F4A_7C15 ^ u64::from(std::process::id()))
    }
    pub fn uniform(&mut self) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let x = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11;
        x as f64 / (1u64 << 53) as f64 * 4.0 - 2.0
    }
    pub fn vec<T: ringlet_core::Element>(&mut self, n: usize, scale: f64) -> Vec<T> {
        (0..n)
            .map(|_| T::from_f64(self.uniform() * scale))
            .collect()
    }
}

/// Elements whose bits differ between a GPU result and its CPU reference.
pub fn differing<T: ringlet_core::Element>(gpu: &[T], cpu: &[T]) -> usize {
    let size = std::mem::size_of::<T>();
    let (gpu, cpu): (&[u8], &[u8]) = (bytemuck::cast_slice(gpu), bytemuck::cast_slice(cpu));
    gpu.chunks_exact(size)
        .zip(cpu.chunks_exact(size))
        .filter(|(a, b)| a != b)
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nvrtc_here() -> bool {
        ringlet_cuda::kernels::nvrtc_or_skip()
    }

    #[test]
    fn every_trainer_kernel_compiles_for_every_architecture_this_nvrtc_knows() {
        if !nvrtc_here() {
            return;
        }
        let archs = ringlet_cuda::kernels::archs_to_check();
        let done =
            ringlet_cuda::kernels::check_compiles(&ALL, &archs).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(done.len(), archs.len() * ALL.len());
    }

    /// The optimizer kernels on the first GPU against [`Sgd::step`] and [`AdamW::step`] on fresh
    /// random data (not a multiple of any block size), every bit compared, three steps each.
    /// Run where a GPU is (scripts/gpu-check.sh runs this test binary); elsewhere it skips.
    #[test]
    fn the_optimizer_kernels_match_their_cpu_references_bit_for_bit() {
        let k = match Kernels::new(0) {
            Ok(k) => k,
            Err(e) => {
                ringlet_core::skipped!("no GPU to run the optimizer kernels on ({e})");
                return;
            }
        };
        let tk = TrainKernels::new(&k).unwrap_or_else(|e| panic!("{e}"));
        let mut rng = CheckRng::fresh();
        let n = (1 << 22) + 3;
        let sgd = Sgd {
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 1e-4,
        };
        let adamw = AdamW::default();
        let (p0, g) = (rng.vec(n, 1.0), rng.vec(n, 10.0));
        // SGD, three steps.
        let (mut p, mut v) = (p0.clone(), vec![0f32; n]);
        let mut dp = k.stream.clone_htod(&p0).unwrap();
        let dg = k.stream.clone_htod(&g).unwrap();
        let mut dv = k.stream.clone_htod(&v).unwrap();
        for _ in 0..3 {
            sgd.step(&mut p, &g, &mut v, 0.125);
            tk.sgd(&sgd, &mut dp, &dg, &mut dv, 0.125).unwrap();
        }
        let sgd_diff = differing(&k.stream.clone_dtoh(&dp).unwrap(), &p);
        println!("  sgd_momentum_f32 3 steps {n:>9} params {sgd_diff:>7} differ");
        // AdamW, three steps.
        let (mut p, mut m, mut v) = (p0.clone(), vec![0f32; n], vec![0f32; n]);
        let mut dp = k.stream.clone_htod(&p0).unwrap();
        let mut dm = k.stream.clone_htod(&m).unwrap();
        let mut dv = k.stream.clone_htod(&v).unwrap();
        for t in 1..=3 {
            adamw.step(&mut p, &g, &mut m, &mut v, 0.125, t);
            tk.adamw(&adamw, &mut dp, &dg, &mut dm, &mut dv, 0.125, t)
                .unwrap();
        }
        let adamw_diff = differing(&k.stream.clone_dtoh(&dp).unwrap(), &p);
        println!("  adamw_f32        3 steps {n:>9} params {adamw_diff:>7} differ");
        assert_eq!(
            (sgd_diff, adamw_diff),
            (0, 0),
            "(sgd, adamw) elements differ"
        );
    }
}
