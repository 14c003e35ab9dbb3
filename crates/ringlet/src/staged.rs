//! Collectives on device buffers over the TCP ring: chunks are copied out to host blocks to be
//! sent, and received chunks are copied in and reduced on the device — the same schedules and
//! wire frames as host buffers, with copies overlapping the network (several blocks each way).
//!
//! The staging logic is written against [`Device`]; [`HostDevice`] implements it with host
//! memory, so the logic is tested across processes without a GPU. A CUDA device implements the
//! same trait with pinned blocks, one stream, events and the kernels of `kernels/`.

use crate::algo;
use crate::comm::Call;
use crate::engine;
use crate::memory::Memory;
use crate::schedule::{self, Apply, Schedule};
use crate::wire::Collective;
use crate::Communicator;
use ringlet_core::{Element, ReduceOp, Result};
use std::ops::Range;

/// What staging needs from a device. Operations are issued in order on one queue (a CUDA
/// stream) and may complete later; an [`Event`](Self::Event) marks everything issued before it.
/// Callers keep a host block untouched until the event after its last use has completed.
pub trait Device<T: Element> {
    /// The collective's buffer in device memory.
    type Buffer: ?Sized;
    /// One chunk of device memory, where received chunks are copied before being reduced.
    type Scratch;
    /// One chunk of host memory the network reads and writes (pinned, for a GPU).
    type Block: AsRef<[T]> + AsMut<[T]>;
    type Event;

    fn len(&self, buf: &Self::Buffer) -> usize;
    /// Called for every collective: a GPU implementation should hand out pinned blocks from a
    /// pool rather than allocate them each time.
    fn block(&self, len: usize) -> Result<Self::Block>;
    fn scratch(&self, len: usize) -> Result<Self::Scratch>;
    /// `block[..range.len()] = buf[range]`.
    fn download(
        &self,
        buf: &Self::Buffer,
        range: Range<usize>,
        block: &mut Self::Block,
    ) -> Result<()>;
    /// `buf[range] = block[..]`, or with `reduce`: `buf[range] = op(buf[range], block[..])`
    /// (through `scratch`); with `reversed` as well, `op(block[..], buf[range])`.
    fn upload(
        &self,
        block: &Self::Block,
        buf: &mut Self::Buffer,
        range: Range<usize>,
        scratch: &mut Self::Scratch,
        reduce: Option<ReduceOp>,
        reversed: bool,
    ) -> Result<()>;
    /// `buf[range] /= n` (an average's last step).
    fn divide(&self, buf: &mut Self::Buffer, range: Range<usize>, n: usize) -> Result<()>;
    /// Marks everything issued so far.
    fn record(&self) -> Result<Self::Event>;
    fn complete(&self, event: &Self::Event) -> Result<bool>;
}

/// Host blocks each way: while one block's bytes are on the wire the next ones are being copied.
pub const BLOCKS: usize = 3;

struct OutBlock<D: Device<T>, T: Element> {
    block: D::Block,
    len: usize,
    /// Set while staged or sending; the event marks the download.
    busy: Option<D::Event>,
}

struct InBlock<D: Device<T>, T: Element> {
    block: D::Block,
    scratch: D::Scratch,
    range: Range<usize>,
    /// Landing in progress.
    landing: bool,
    /// The upload reading this block, until it completes.
    uploading: Option<D::Event>,
}

/// A device buffer as the engine's [`Memory`].
pub struct Staged<'a, T: Element, D: Device<T>> {
    dev: &'a D,
    buf: &'a mut D::Buffer,
    outs: Vec<OutBlock<D, T>>,
    ins: Vec<InBlock<D, T>>,
    /// Device work on a block may be queued that no event covers (recording one failed): the
    /// blocks must never go back to their pool.
    uncovered: bool,
}

impl<'a, T: Element, D: Device<T>> Staged<'a, T, D> {
    /// Blocks of `chunk` elements (the longest transfer of the schedule).
    pub fn new(dev: &'a D, buf: &'a mut D::Buffer, chunk: usize) -> Result<Self> {
        let outs = (0..BLOCKS)
            .map(|_| {
                Ok(OutBlock {
                    block: dev.block(chunk)?,
                    len: 0,
                    busy: None,
                })
            })
            .collect::<Result<_>>()?;
        let ins = (0..BLOCKS)
            .map(|_| {
                Ok(InBlock {
                    block: dev.block(chunk)?,
                    scratch: dev.scratch(chunk)?,
                    range: 0..0,
                    landing: false,
                    uploading: None,
                })
            })
            .collect::<Result<_>>()?;
        Ok(Staged {
            dev,
            buf,
            outs,
            ins,
            uncovered: false,
        })
    }

    fn free_in(&self) -> Option<usize> {
        self.ins.iter().position(|b| {
            !b.landing
                && b.uploading
                    .as_ref()
                    .is_none_or(|e| self.dev.complete(e).unwrap_or(false))
        })
    }
}

/// How long dropping a [`Staged`] waits for copies still in flight (after a failed collective)
/// before it gives up on its blocks.
const DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

impl<T: Element, D: Device<T>> Drop for Staged<'_, T, D> {
    /// A failed collective can leave copies into or out of the host blocks in flight; a block
    /// back in its pool then would be handed out and overwritten while the device still uses it.
    /// So wait for them, and if the device does not finish in time, leak the blocks instead.
    fn drop(&mut self) {
        let start = std::time::Instant::now();
        while !self.uncovered {
            match self.busy() {
                Ok(false) => return,
                Ok(true) if start.elapsed() < DRAIN => {
                    std::thread::sleep(std::time::Duration::from_micros(50))
                }
                _ => break,
            }
        }
        tracing::warn!(
            "device copies still in flight after a failed collective; leaking their host blocks"
        );
        for b in self.outs.drain(..) {
            std::mem::forget(b);
        }
        for b in self.ins.drain(..) {
            std::mem::forget(b);
        }
    }
}

impl<T: Element, D: Device<T>> Memory for Staged<'_, T, D> {
    type Out = usize;
    type In = usize;

    fn stage(&mut self, range: Range<usize>) -> Result<Option<usize>> {
        let Some(i) = self.outs.iter().position(|b| b.busy.is_none()) else {
            return Ok(None);
        };
        let b = &mut self.outs[i];
        b.len = range.len();
        let queued = self.dev.download(self.buf, range, &mut b.block);
        // Even a failed download may have queued its copy: an event must cover the block.
        match self.dev.record() {
            Ok(e) => b.busy = Some(e),
            Err(e) => {
                self.uncovered = true;
                return Err(queued.err().unwrap_or(e));
            }
        }
        queued.map(|()| Some(i))
    }

    fn staged_bytes(&mut self, i: usize) -> Result<Option<&[u8]>> {
        let b = &self.outs[i];
        let ready = match &b.busy {
            Some(e) => self.dev.complete(e)?,
            None => false,
        };
        Ok(ready.then(|| bytemuck::cast_slice(&b.block.as_ref()[..b.len])))
    }

    fn release(&mut self, i: usize) {
        self.outs[i].busy = None;
    }

    fn can_land(&self, _apply: Apply) -> bool {
        self.free_in().is_some()
    }

    fn land(&mut self, range: Range<usize>, _apply: Apply) -> Option<usize> {
        let i = self.free_in()?;
        let b = &mut self.ins[i];
        b.range = range;
        b.landing = true;
        b.uploading = None;
        Some(i)
    }

    fn landing_bytes(&mut self, i: usize) -> &mut [u8] {
        let b = &mut self.ins[i];
        bytemuck::cast_slice_mut(&mut b.block.as_mut()[..b.range.len()])
    }

    fn apply(&mut self, i: usize, op: ReduceOp, apply: Apply, divide: Option<usize>) -> Result<()> {
        let b = &mut self.ins[i];
        let reduce = (apply != Apply::Copy).then_some(op);
        let reversed = apply == Apply::ReduceRev;
        let queued = self
            .dev
            .upload(
                &b.block,
                self.buf,
                b.range.clone(),
                &mut b.scratch,
                reduce,
                reversed,
            )
            .and_then(|()| match divide {
                Some(n) => self.dev.divide(self.buf, b.range.clone(), n),
                None => Ok(()),
            });
        b.landing = false;
        // The copy out of the block may be queued even when a later step failed: an event must
        // cover it before the block is reused or returned.
        match self.dev.record() {
            Ok(e) => b.uploading = Some(e),
            Err(e) => {
                self.uncovered = true;
                return Err(queued.err().unwrap_or(e));
            }
        }
        queued
    }

    fn busy(&mut self) -> Result<bool> {
        let uploads = self.ins.iter().filter_map(|b| b.uploading.as_ref());
        let downloads = self.outs.iter().filter_map(|b| b.busy.as_ref());
        for e in uploads.chain(downloads) {
            if !self.dev.complete(e)? {
                return Ok(true);
            }
        }
        Ok(false)
    }
}

impl Communicator {
    /// [`all_reduce`](Communicator::all_reduce) of a device buffer over Ringlet's own
    /// transport: the same algorithm, frames (and bits) as a host buffer's, each chunk reduced
    /// on the device.
    pub fn all_reduce_device<T: Element, D: Device<T>>(
        &self,
        dev: &D,
        buf: &mut D::Buffer,
        op: ReduceOp,
    ) -> Result<()> {
        let ticket = self.inner.ticket();
        let (rank, count) = (self.rank(), dev.len(buf));
        let chunk = self.chunk_elems::<T>();
        let algo = self
            .inner
            .all_reduce_algo(count.saturating_mul(std::mem::size_of::<T>()));
        let layout = &self.inner.layout;
        self.run_device(
            ticket,
            Call::new(Collective::AllReduce, op, 0, count),
            dev,
            buf,
            || algo::all_reduce_schedule(algo, count, rank, layout, chunk, op),
        )
    }

    /// [`broadcast`](Communicator::broadcast) of a device buffer over the TCP ring.
    pub fn broadcast_device<T: Element, D: Device<T>>(
        &self,
        dev: &D,
        buf: &mut D::Buffer,
        root: usize,
    ) -> Result<()> {
        let ticket = self.inner.ticket();
        let (rank, n, count) = (self.rank(), self.world_size(), dev.len(buf));
        if root >= n {
            return self.refuse(
                ticket,
                format!("broadcast root {root} is not below world size {n}"),
            );
        }
        let chunk = self.chunk_elems::<T>();
        self.run_device(
            ticket,
            Call::new(Collective::Broadcast, ReduceOp::Sum, root, count),
            dev,
            buf,
            || schedule::chain_broadcast(count, rank, n, chunk, root),
        )
    }

    fn run_device<T: Element, D: Device<T>>(
        &self,
        ticket: u64,
        call: Call,
        dev: &D,
        buf: &mut D::Buffer,
        schedule: impl FnOnce() -> Schedule,
    ) -> Result<()> {
        let deadlines = self.inner.deadlines;
        self.inner
            .run_with::<T>(ticket, call, schedule, |peers, sig, schedule, _| {
                let mut mem = Staged::new(dev, buf, schedule.longest_transfer().max(1))?;
                engine::run_on(
                    peers,
                    sig,
                    &schedule,
                    &mut mem,
                    std::mem::size_of::<T>(),
                    deadlines,
                )
            })
    }
}

/// A [`Device`] made of host memory: copies are `memcpy`, reductions the host reducers. It runs
/// the staging logic for real, without a GPU. With `lag` > 0 an event reports completion only
/// after being polled that many times, as a GPU's copies finish after the call that issued them,
/// so the engine's waiting on copies is exercised too.
#[derive(Clone, Copy, Debug, Default)]
pub struct HostDevice {
    pub lag: u32,
}

impl<T: Element> Device<T> for HostDevice {
    type Buffer = [T];
    type Scratch = Vec<T>;
    type Block = Vec<T>;
    type Event = std::cell::Cell<u32>;

    fn len(&self, buf: &[T]) -> usize {
        buf.len()
    }
    fn block(&self, len: usize) -> Result<Vec<T>> {
        Ok(vec![T::zeroed(); len])
    }
    fn scratch(&self, len: usize) -> Result<Vec<T>> {
        Ok(vec![T::zeroed(); len])
    }
    fn download(&self, buf: &[T], range: Range<usize>, block: &mut Vec<T>) -> Result<()> {
        block[..range.len()].copy_from_slice(&buf[range]);
        Ok(())
    }
    fn upload(
        &self,
        block: &Vec<T>,
        buf: &mut [T],
        range: Range<usize>,
        scratch: &mut Vec<T>,
        reduce: Option<ReduceOp>,
        reversed: bool,
    ) -> Result<()> {
        let n = range.len();
        scratch[..n].copy_from_slice(&block[..n]);
        match reduce {
            Some(op) if reversed => {
                T::reduce_into(op, &mut scratch[..n], &buf[range.clone()]);
                buf[range].copy_from_slice(&scratch[..n]);
            }
            Some(op) => T::reduce_into(op, &mut buf[range], &scratch[..n]),
            None => buf[range].copy_from_slice(&scratch[..n]),
        }
        Ok(())
    }
    fn divide(&self, buf: &mut [T], range: Range<usize>, n: usize) -> Result<()> {
        T::divide_by(&mut buf[range], n);
        Ok(())
    }
    fn record(&self) -> Result<std::cell::Cell<u32>> {
        Ok(std::cell::Cell::new(self.lag))
    }
    fn complete(&self, polls_left: &std::cell::Cell<u32>) -> Result<bool> {
        let left = polls_left.get();
        polls_left.set(left.saturating_sub(1));
        Ok(left == 0)
    }
}
