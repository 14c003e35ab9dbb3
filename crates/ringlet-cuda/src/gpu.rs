//! One GPU as collectives use it: typed device buffers addressed by element ranges, pinned host
//! blocks from a pool, asynchronous copies and kernels on one stream, events to poll.
//!
//! Buffers are raw bytes typed by `T: Element` (not cudarc's `DeviceRepr`), so the collective
//! code stays generic over every element type without a CUDA bound; kernels get plain device
//! addresses.

use crate::launch::Kernels;
use crate::CudaError;
use cudarc::driver::sys::CUdeviceptr;
pub use cudarc::driver::CudaEvent;
use cudarc::driver::{result, CudaSlice, DevicePtr};
use ringlet_core::{Element, ReduceOp};
use std::marker::PhantomData;
use std::ops::Range;
use std::sync::{Arc, Mutex};

/// `len` elements of `T` in device memory.
pub struct DeviceBuffer<T> {
    bytes: CudaSlice<u8>,
    len: usize,
    _t: PhantomData<T>,
}

impl<T: Element> DeviceBuffer<T> {
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// Page-locked host memory from `cuMemHostAlloc`, freed on drop.
struct PinnedBytes {
    ptr: *mut u8,
    cap: usize,
    ctx: Arc<cudarc::driver::CudaContext>,
}

// SAFETY: the allocation is owned by this value alone; moving it to another thread moves that
// ownership, and the driver's allocation is not tied to the allocating thread.
unsafe impl Send for PinnedBytes {}

impl Drop for PinnedBytes {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: ptr came from cuMemHostAlloc in this context and is freed once, here.
        let _ = unsafe { result::free_host(self.ptr.cast()) };
    }
}

type Pool = Arc<Mutex<Vec<PinnedBytes>>>;

/// A pinned host block of `len` elements, returned to its GPU's pool on drop.
pub struct Pinned<T> {
    bytes: Option<PinnedBytes>,
    len: usize,
    pool: Pool,
    _t: PhantomData<T>,
}

impl<T: Element> AsRef<[T]> for Pinned<T> {
    fn as_ref(&self) -> &[T] {
        let b = self.bytes.as_ref().expect("present until drop");
        // SAFETY: the allocation holds at least len * size_of::<T>() bytes, is page-aligned
        // (so aligned for T), initialised (zeroed when allocated), and T is plain old data.
        unsafe { std::slice::from_raw_parts(b.ptr.cast::<T>(), self.len) }
    }
}

impl<T: Element> AsMut<[T]> for Pinned<T> {
    fn as_mut(&mut self) -> &mut [T] {
        let b = self.bytes.as_mut().expect("present until drop");
        // SAFETY: as in as_ref; &mut self makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(b.ptr.cast::<T>(), self.len) }
    }
}

impl<T> Drop for Pinned<T> {
    fn drop(&mut self) {
        if let (Some(b), Ok(mut pool)) = (self.bytes.take(), self.pool.lock()) {
            pool.push(b);
        }
    }
}

/// One device, its stream and kernels, and a pool of pinned blocks.
pub struct Gpu {
    pub kernels: Kernels,
    pool: Pool,
}

impl Gpu {
    /// Device `ordinal`, its kernels compiled (or found in the kernel cache) and loaded.
    pub fn new(ordinal: usize) -> Result<Gpu, CudaError> {
        Ok(Gpu {
            kernels: Kernels::new(ordinal)?,
            pool: Arc::default(),
        })
    }

    fn bind(&self) -> Result<(), CudaError> {
        self.kernels.ctx.bind_to_thread().map_err(CudaError::from)
    }

    /// The device address of element `at` of `buf`.
    fn addr<T: Element>(&self, buf: &DeviceBuffer<T>, at: usize) -> CUdeviceptr {
        let (base, _record) = buf.bytes.device_ptr(&self.kernels.stream);
        base + (at * std::mem::size_of::<T>()) as u64
    }

    /// A zeroed device buffer.
    pub fn alloc<T: Element>(&self, len: usize) -> Result<DeviceBuffer<T>, CudaError> {
        self.bind()?;
        let bytes = self
            .kernels
            .stream
            .alloc_zeros::<u8>(byte_len::<T>(len)?.max(1))?;
        Ok(DeviceBuffer {
            bytes,
            len,
            _t: PhantomData,
        })
    }

    /// A device copy of `host` (waits for the copy).
    pub fn upload<T: Element>(&self, host: &[T]) -> Result<DeviceBuffer<T>, CudaError> {
        let mut buf = self.alloc(host.len())?;
        self.write(host, &mut buf)?;
        Ok(buf)
    }

    /// `buf = host` (waits for the copy).
    pub fn write<T: Element>(
        &self,
        host: &[T],
        buf: &mut DeviceBuffer<T>,
    ) -> Result<(), CudaError> {
        assert_eq!(host.len(), buf.len, "write: lengths differ");
        self.write_at(host, buf, 0)
    }

    /// `buf[at..at + host.len()] = host` (waits for the copy).
    pub fn write_at<T: Element>(
        &self,
        host: &[T],
        buf: &mut DeviceBuffer<T>,
        at: usize,
    ) -> Result<(), CudaError> {
        assert!(
            at.checked_add(host.len()).is_some_and(|end| end <= buf.len),
            "write_at out of bounds"
        );
        self.bind()?;
        let dst = self.addr(buf, at);
        // SAFETY: dst addresses host.len() elements of buf; the copy is waited for below, so
        // `host` outlives it.
        unsafe { result::memcpy_htod_async(dst, host, self.kernels.stream.cu_stream()) }?;
        self.kernels.stream.synchronize().map_err(CudaError::from)
    }

    /// `host = buf` (waits for the copy).
    pub fn read<T: Element>(&self, buf: &DeviceBuffer<T>, host: &mut [T]) -> Result<(), CudaError> {
        assert_eq!(host.len(), buf.len, "read: lengths differ");
        self.read_at(buf, 0, host)
    }

    /// `host = buf[at..at + host.len()]`, after everything queued before (waits for the copy).
    pub fn read_at<T: Element>(
        &self,
        buf: &DeviceBuffer<T>,
        at: usize,
        host: &mut [T],
    ) -> Result<(), CudaError> {
        assert!(
            at.checked_add(host.len()).is_some_and(|end| end <= buf.len),
            "read_at out of bounds"
        );
        self.bind()?;
        let src = self.addr(buf, at);
        // SAFETY: src addresses host.len() elements of buf; waited for below.
        unsafe { result::memcpy_dtoh_async(host, src, self.kernels.stream.cu_stream()) }?;
        self.kernels.stream.synchronize().map_err(CudaError::from)
    }

    /// A pinned host block of `len` elements, from the pool when one is large enough.
    pub fn pinned<T: Element>(&self, len: usize) -> Result<Pinned<T>, CudaError> {
        let need = byte_len::<T>(len)?.max(1);
        let reused = {
            let mut pool = self.pool.lock().map_err(|_| {
                CudaError::Driver("the pinned block pool was poisoned by a panic".into())
            })?;
            pool.iter()
                .position(|b| b.cap >= need)
                .map(|i| pool.swap_remove(i))
        };
        let bytes = match reused {
            Some(b) => b,
            None => {
                self.bind()?;
                // SAFETY: a plain host allocation of `need` bytes in the current context.
                let ptr = unsafe { result::malloc_host(need, 0) }?;
                // SAFETY: the fresh allocation holds `need` bytes; zeroed once, so every block
                // (fresh or reused) is initialised memory.
                unsafe { std::ptr::write_bytes(ptr.cast::<u8>(), 0, need) };
                PinnedBytes {
                    ptr: ptr.cast(),
                    cap: need,
                    ctx: self.kernels.ctx.clone(),
                }
            }
        };
        Ok(Pinned {
            bytes: Some(bytes),
            len,
            pool: self.pool.clone(),
            _t: PhantomData,
        })
    }

    /// Queues `block[..range.len()] = buf[range]`.
    pub fn download<T: Element>(
        &self,
        buf: &DeviceBuffer<T>,
        range: Range<usize>,
        block: &mut Pinned<T>,
    ) -> Result<(), CudaError> {
        assert!(
            range.end <= buf.len && range.len() <= block.len,
            "download out of bounds"
        );
        self.bind()?;
        let src = self.addr(buf, range.start);
        let dst = &mut block.as_mut()[..range.len()];
        // SAFETY: both ends hold range.len() elements; the block is pinned and its owner keeps
        // it untouched until an event recorded after this copy has completed.
        unsafe { result::memcpy_dtoh_async(dst, src, self.kernels.stream.cu_stream()) }
            .map_err(CudaError::from)
    }

    /// Queues `buf[range] = block[..]`, or with `reduce`: the block copied to `scratch` and
    /// `buf[range] = op(buf[range], scratch)` by the reduction kernel; with `reversed`,
    /// `op(scratch, buf[range])` (computed in `scratch`, then copied over `buf[range]`), so that
    /// the lower rank's operand is on the left whichever rank reduces.
    pub fn upload_range<T: Element>(
        &self,
        block: &Pinned<T>,
        buf: &mut DeviceBuffer<T>,
        range: Range<usize>,
        scratch: &mut DeviceBuffer<T>,
        reduce: Option<ReduceOp>,
        reversed: bool,
    ) -> Result<(), CudaError> {
        let n = range.len();
        assert!(
            range.end <= buf.len && n <= block.len,
            "upload out of bounds"
        );
        self.bind()?;
        let at = self.addr(buf, range.start);
        let stream = self.kernels.stream.cu_stream();
        let src = &block.as_ref()[..n];
        match reduce {
            None => {
                // SAFETY: as in download, the other way round.
                unsafe { result::memcpy_htod_async(at, src, stream) }.map_err(CudaError::from)
            }
            Some(op) => {
                assert!(n <= scratch.len, "scratch shorter than the chunk");
                let tmp = self.addr(scratch, 0);
                // SAFETY: as in download; scratch holds n elements.
                unsafe { result::memcpy_htod_async(tmp, src, stream) }?;
                if !reversed {
                    return self.kernels.reduce_at::<T>(op, at, tmp, n);
                }
                self.kernels.reduce_at::<T>(op, tmp, at, n)?;
                let bytes = n * std::mem::size_of::<T>();
                // SAFETY: both addresses hold n elements of this context's memory; the copy is
                // ordered after the kernel on the same stream.
                unsafe { result::memcpy_dtod_async(at, tmp, bytes, stream) }
                    .map_err(CudaError::from)
            }
        }
    }

    /// Queues `buf[range] /= n`.
    pub fn divide<T: Element>(
        &self,
        buf: &mut DeviceBuffer<T>,
        range: Range<usize>,
        n: usize,
    ) -> Result<(), CudaError> {
        assert!(range.end <= buf.len, "divide out of bounds");
        self.bind()?;
        let at = self.addr(buf, range.start);
        self.kernels.divide_at::<T>(at, range.len(), n)
    }

    /// An event marking everything queued so far.
    pub fn record(&self) -> Result<CudaEvent, CudaError> {
        self.bind()?;
        self.kernels
            .stream
            .record_event(Some(
                cudarc::driver::sys::CUevent_flags::CU_EVENT_DISABLE_TIMING,
            ))
            .map_err(CudaError::from)
    }

    /// Whether `event`'s work is done; an error of earlier asynchronous work shows here.
    pub fn complete(&self, event: &CudaEvent) -> Result<bool, CudaError> {
        event.try_is_complete().map_err(CudaError::from)
    }

    /// The raw stream, for NCCL calls.
    pub fn cu_stream(&self) -> cudarc::driver::sys::CUstream {
        self.kernels.stream.cu_stream()
    }

    /// The device address of element `at` of `buf` (at most its length), for NCCL, cuBLAS and
    /// the model's kernels.
    pub fn device_addr_at<T: Element>(&self, buf: &DeviceBuffer<T>, at: usize) -> CUdeviceptr {
        assert!(at <= buf.len, "device_addr_at out of bounds");
        self.addr(buf, at)
    }
}

/// The bytes of `len` elements of `T`, or an error where that overflows.
fn byte_len<T: Element>(len: usize) -> Result<usize, CudaError> {
    len.checked_mul(std::mem::size_of::<T>()).ok_or_else(|| {
        CudaError::Driver(format!(
            "{len} elements of {} bytes overflow",
            std::mem::size_of::<T>()
        ))
    })
}
