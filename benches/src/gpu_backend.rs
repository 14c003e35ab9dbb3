//! Device buffers for the sweep: NCCL's collectives (`--backend nccl`) or Ringlet's TCP ring on
//! device buffers staged through pinned host blocks (`--backend tcp --device`). The host buffers
//! are copied to the GPU before the timed calls and back before the check, so the timings are of
//! the collectives alone.

use crate::backend::{Backend, Buffers};
use ringlet::cuda::{DeviceBuffer, Gpu};
use ringlet::{Communicator, Element, Error, NcclCommunicator, ReduceOp};
use std::any::Any;
use std::cell::RefCell;
use std::sync::Arc;

pub enum Engine {
    Nccl(NcclCommunicator),
    /// The TCP ring, chunks staged through the GPU's pinned blocks and reduced by its kernels.
    Staged,
}

pub struct GpuBackend<'a> {
    pub ring: &'a Communicator,
    pub gpu: Arc<Gpu>,
    pub engine: Engine,
    /// (send, recv) on the device for the current size and type.
    resident: RefCell<Option<Box<dyn Any>>>,
}

/// The GPU this rank uses: its local rank's, modulo the devices this host has (ranks share a
/// GPU when there are more ranks than GPUs, as in gpu-check's fallback runs).
pub fn open_gpu(ring: &Communicator) -> Result<Arc<Gpu>, Error> {
    let count = ringlet::cuda::devices()?.len();
    if count == 0 {
        return Err(Error::Device("this host has no CUDA device".into()));
    }
    Ok(Arc::new(Gpu::new(ring.local_rank() % count)?))
}

impl<'a> GpuBackend<'a> {
    pub fn new(ring: &'a Communicator, gpu: Arc<Gpu>, engine: Engine) -> GpuBackend<'a> {
        GpuBackend {
            ring,
            gpu,
            engine,
            resident: RefCell::new(None),
        }
    }

    fn with<T: Element, R>(
        &self,
        f: impl FnOnce(&mut DeviceBuffer<T>, &mut DeviceBuffer<T>) -> Result<R, Error>,
    ) -> Result<R, Error> {
        let mut slot = self.resident.borrow_mut();
        let (send, recv) = slot
            .as_mut()
            .and_then(|b| b.downcast_mut::<(DeviceBuffer<T>, DeviceBuffer<T>)>())
            .ok_or_else(|| Error::InvalidArgument("no device buffers uploaded".into()))?;
        f(send, recv)
    }
}

impl Backend for GpuBackend<'_> {
    fn rank(&self) -> usize {
        self.ring.rank()
    }
    fn world_size(&self) -> usize {
        self.ring.world_size()
    }
    fn out_of_place(&self) -> bool {
        false
    }
    fn upload<T: Element>(&self, b: &Buffers<T>) -> Result<(), Error> {
        let send = self.gpu.upload(&b.send)?;
        let recv = self.gpu.upload(&b.recv)?;
        *self.resident.borrow_mut() = Some(Box::new((send, recv)));
        Ok(())
    }
    fn download<T: Element>(&self, b: &mut Buffers<T>) -> Result<(), Error> {
        self.with::<T, _>(|_, recv| self.gpu.read(recv, &mut b.recv).map_err(Error::from))
    }
    fn all_reduce<T: Element>(&self, _: &mut Buffers<T>, op: ReduceOp) -> Result<(), Error> {
        self.with::<T, _>(|_, recv| match &self.engine {
            Engine::Nccl(c) => c.all_reduce(recv, op),
            Engine::Staged => self.ring.all_reduce_device(&*self.gpu, recv, op),
        })
    }
    fn broadcast<T: Element>(&self, _: &mut Buffers<T>, root: usize) -> Result<(), Error> {
        self.with::<T, _>(|_, recv| match &self.engine {
            Engine::Nccl(c) => c.broadcast(recv, root),
            Engine::Staged => self.ring.broadcast_device(&*self.gpu, recv, root),
        })
    }
    fn all_gather<T: Element>(&self, _: &mut Buffers<T>) -> Result<(), Error> {
        self.with::<T, _>(|send, recv| match &self.engine {
            Engine::Nccl(c) => c.all_gather(send, recv),
            Engine::Staged => Err(staged_only()),
        })
    }
    fn reduce_scatter<T: Element>(&self, _: &mut Buffers<T>, op: ReduceOp) -> Result<(), Error> {
        self.with::<T, _>(|send, recv| match &self.engine {
            Engine::Nccl(c) => c.reduce_scatter(send, recv, op),
            Engine::Staged => Err(staged_only()),
        })
    }
    fn max_f64(&self, x: f64) -> Result<f64, Error> {
        self.ring.max_f64(x)
    }
    fn sum_i64(&self, x: i64) -> Result<i64, Error> {
        self.ring.sum_i64(x)
    }
    fn barrier(&self) -> Result<(), Error> {
        Backend::barrier(self.ring)
    }
}

fn staged_only() -> Error {
    Error::InvalidArgument(
        "the TCP ring on device buffers (--device) runs all_reduce and broadcast; use --backend nccl or host buffers for all_gather and reduce_scatter".into(),
    )
}
