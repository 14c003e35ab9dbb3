//! A CUDA GPU as the staging [`Device`]: the TCP fallback for device buffers (pinned blocks from
//! a pool, copies and reductions queued on the GPU's stream, events polled by the engine).

use crate::staged::Device;
use ringlet_core::{Element, Error, ReduceOp, Result};
use ringlet_cuda::gpu::CudaEvent;
use ringlet_cuda::{DeviceBuffer, Gpu, Pinned};
use std::ops::Range;

impl<T: Element> Device<T> for Gpu {
    type Buffer = DeviceBuffer<T>;
    type Scratch = DeviceBuffer<T>;
    type Block = Pinned<T>;
    type Event = CudaEvent;

    fn len(&self, buf: &DeviceBuffer<T>) -> usize {
        buf.len()
    }
    fn block(&self, len: usize) -> Result<Pinned<T>> {
        self.pinned(len).map_err(Error::from)
    }
    fn scratch(&self, len: usize) -> Result<DeviceBuffer<T>> {
        self.alloc(len).map_err(Error::from)
    }
    fn download(
        &self,
        buf: &DeviceBuffer<T>,
        range: Range<usize>,
        block: &mut Pinned<T>,
    ) -> Result<()> {
        Gpu::download(self, buf, range, block).map_err(Error::from)
    }
    fn upload(
        &self,
        block: &Pinned<T>,
        buf: &mut DeviceBuffer<T>,
        range: Range<usize>,
        scratch: &mut DeviceBuffer<T>,
        reduce: Option<ReduceOp>,
        reversed: bool,
    ) -> Result<()> {
        self.upload_range(block, buf, range, scratch, reduce, reversed)
            .map_err(Error::from)
    }
    fn divide(&self, buf: &mut DeviceBuffer<T>, range: Range<usize>, n: usize) -> Result<()> {
        Gpu::divide(self, buf, range, n).map_err(Error::from)
    }
    fn record(&self) -> Result<CudaEvent> {
        Gpu::record(self).map_err(Error::from)
    }
    fn complete(&self, event: &CudaEvent) -> Result<bool> {
        Gpu::complete(self, event).map_err(Error::from)
    }
}
