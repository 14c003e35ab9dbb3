//! The kernels of `kernels/` on a device: compiled for its architecture (through the PTX cache),
//! loaded once, launched on one stream.

use crate::kernels::{self, MODEL, OPTIM, REDUCE};
use crate::reference::{AdamW, Sgd};
use crate::{device, CudaError};
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    DeviceRepr, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use ringlet_core::{Element, ReduceOp};
use std::sync::Arc;

/// One device's context, stream and loaded kernels.
pub struct Kernels {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    reduce: Arc<CudaModule>,
    optim: Arc<CudaModule>,
    model: Arc<CudaModule>,
    pub arch: u32,
}

impl Kernels {
    /// Compiles (or finds in the cache) and loads every kernel on device `ordinal`.
    pub fn new(ordinal: usize) -> Result<Kernels, CudaError> {
        let info = device::devices()?
            .into_iter()
            .nth(ordinal)
            .ok_or_else(|| CudaError::Driver(format!("no CUDA device {ordinal}")))?;
        let arch = info.arch();
        let cache = kernels::cache_dir();
        let ctx = CudaContext::new(ordinal)?;
        let load = |source| -> Result<Arc<CudaModule>, CudaError> {
            let ptx = kernels::ptx(source, arch, Some(&cache))?;
            ctx.load_module(Ptx::from_src(ptx)).map_err(CudaError::from)
        };
        Ok(Kernels {
            reduce: load(&REDUCE)?,
            optim: load(&OPTIM)?,
            model: load(&MODEL)?,
            stream: ctx.default_stream(),
            ctx,
            arch,
        })
    }

    fn function(module: &Arc<CudaModule>, name: &str) -> Result<CudaFunction, CudaError> {
        module.load_function(name).map_err(CudaError::from)
    }

    /// `acc = op(acc, src)` element-wise on the device (`Avg` sums; see [`divide`](Self::divide)).
    pub fn reduce<T: Element + DeviceRepr>(
        &self,
        op: ReduceOp,
        acc: &mut CudaSlice<T>,
        src: &CudaSlice<T>,
    ) -> Result<(), CudaError> {
        let n = acc.len().min(src.len());
        // The guards record the kernel's reads and writes for cudarc when dropped, after it.
        let (a, _a) = acc.device_ptr_mut(&self.stream);
        let (s, _s) = src.device_ptr(&self.stream);
        self.reduce_at::<T>(op, a, s, n)
    }

    /// `x /= divisor` element-wise (an average's last step), as the host ring divides.
    pub fn divide<T: Element + DeviceRepr>(
        &self,
        x: &mut CudaSlice<T>,
        divisor: usize,
    ) -> Result<(), CudaError> {
        let n = x.len();
        let (p, _p) = x.device_ptr_mut(&self.stream);
        self.divide_at::<T>(p, n, divisor)
    }

    /// `acc[..n] = op(acc[..n], src[..n])` on raw device addresses (see [`crate::gpu`]).
    pub fn reduce_at<T: Element>(
        &self,
        op: ReduceOp,
        acc: CUdeviceptr,
        src: CUdeviceptr,
        n: usize,
    ) -> Result<(), CudaError> {
        let f = Self::function(&self.reduce, &format!("{}_{}", op_name(op), suffix::<T>()))?;
        let n = n as u64;
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(&acc).arg(&src).arg(&n);
        // SAFETY: the kernel takes (T*, const T*, u64); the caller's addresses hold n elements
        // of T each, on this context.
        unsafe { launch.launch(config(n)) }?;
        Ok(())
    }

    /// `x[..n] /= divisor` on a raw device address.
    pub fn divide_at<T: Element>(
        &self,
        x: CUdeviceptr,
        n: usize,
        divisor: usize,
    ) -> Result<(), CudaError> {
        let f = Self::function(&self.reduce, &format!("divide_{}", suffix::<T>()))?;
        let (n, d) = (n as u64, divisor as i64);
        let mut launch = self.stream.launch_builder(&f);
        launch.arg(&x).arg(&n).arg(&d);
        // SAFETY: the kernel takes (T*, u64, i64); the caller's address holds n elements.
        unsafe { launch.launch(config(n)) }?;
        Ok(())
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

/// The reduction kernel's name for `op` (`Avg` sums; the division is a separate kernel).
fn op_name(op: ReduceOp) -> &'static str {
    match op {
        ReduceOp::Sum | ReduceOp::Avg => "sum",
        ReduceOp::Prod => "prod",
        ReduceOp::Min => "min",
        ReduceOp::Max => "max",
    }
}

/// The kernels' type suffix for `T`.
pub fn suffix<T: Element>() -> &'static str {
    use ringlet_core::DType;
    match T::DTYPE {
        DType::F32 => "f32",
        DType::F64 => "f64",
        DType::F16 => "f16",
        DType::BF16 => "bf16",
        DType::I32 => "i32",
        DType::I64 => "i64",
        DType::U8 => "u8",
    }
}

/// A grid-stride launch: 256 threads a block, enough blocks to fill the device without one
/// block per element for huge buffers.
fn config(n: u64) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65535 * 4) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}
