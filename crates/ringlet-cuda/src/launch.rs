//! The reduction kernels of `kernels/` on a device: compiled for its architecture (through the
//! kernel cache), loaded once, launched on one stream. Other kernel sources (`ringlet-train`'s) load
//! on the same context and stream with [`Kernels::load`] and launch with [`config`]'s shape.

use crate::kernels::{self, KernelSource, REDUCE};
use crate::{device, CudaError};
use cudarc::driver::sys::CUdeviceptr;
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DevicePtr, DevicePtrMut,
    DeviceRepr, LaunchConfig, PushKernelArg,
};
use cudarc::nvrtc::Ptx;
use ringlet_core::{Element, ReduceOp};
use std::sync::Arc;

/// One device's context, stream and loaded reduction kernels.
pub struct Kernels {
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    reduce: Arc<CudaModule>,
    pub arch: u32,
}

impl Kernels {
    /// Compiles (or finds in the cache) and loads the reduction kernels on device `ordinal`.
    pub fn new(ordinal: usize) -> Result<Kernels, CudaError> {
        let info = device::devices()?
            .into_iter()
            .nth(ordinal)
            .ok_or_else(|| CudaError::Driver(format!("no CUDA device {ordinal}")))?;
        let arch = info.arch();
        // Logged once per process: the versions and files a GPU job really runs on.
        crate::libs::found(crate::libs::CudaLib::Driver)?;
        crate::libs::found(crate::libs::CudaLib::Nvrtc)?;
        let cache = kernels::cache_dir();
        let ctx = CudaContext::new(ordinal)?;
        Ok(Kernels {
            reduce: load(&ctx, &REDUCE, arch, &cache)?,
            stream: ctx.default_stream(),
            ctx,
            arch,
        })
    }

    /// `source` compiled for this device (or found in the kernel cache) and loaded on its context,
    /// for kernels other crates define and launch on [`stream`](Self::stream).
    pub fn load(&self, source: &KernelSource) -> Result<Arc<CudaModule>, CudaError> {
        load(&self.ctx, source, self.arch, &kernels::cache_dir())
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
}

/// `source` compiled for a device of `sm_<arch>` (machine code, or PTX where NVRTC does not know
/// the architecture), from the cache in `cache` or compiled now, loaded on `ctx`.
fn load(
    ctx: &Arc<CudaContext>,
    source: &KernelSource,
    arch: u32,
    cache: &std::path::Path,
) -> Result<Arc<CudaModule>, CudaError> {
    let image = kernels::compile(source, kernels::target(arch)?, Some(cache))?;
    let module = match image.target {
        // cuModuleLoadData takes either: a CUBIN as bytes, PTX as NUL-terminated text.
        kernels::Target::Sass(_) => Ptx::from_binary(image.bytes),
        kernels::Target::Ptx(_) => Ptx::from_src(String::from_utf8_lossy(&image.bytes)),
    };
    ctx.load_module(module).map_err(CudaError::from)
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
/// block per element for huge buffers. Every kernel of `kernels/` is launched with it.
pub fn config(n: u64) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65535 * 4) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}
