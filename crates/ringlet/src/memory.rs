//! Where a collective's elements live, as the engine sees them. The engine moves bytes between
//! the network and a [`Memory`]; it never touches elements itself. [`HostMemory`] is a slice in
//! this process: sends go straight from it, copies land straight in it, reductions go through
//! scratch slots. Device memory plugs in the same way, staging chunks through host blocks, so
//! every algorithm is written once.

use crate::schedule::Apply;
use ringlet_core::{Element, ReduceOp, Result};
use std::ops::Range;

/// The engine's view of a collective's buffer.
pub trait Memory {
    /// A send being prepared or in flight.
    type Out: Copy;
    /// A place where a received chunk lands.
    type In: Copy;

    /// Starts preparing `range` for sending; `None`: nothing can be prepared now (staging blocks
    /// all busy), ask again later.
    fn stage(&mut self, range: Range<usize>) -> Result<Option<Self::Out>>;
    /// The bytes of a staged send, once ready (`None`: still being copied). They stay valid and
    /// unchanged until [`release`](Self::release).
    fn staged_bytes(&mut self, out: Self::Out) -> Result<Option<&[u8]>>;
    /// The send went out.
    fn release(&mut self, out: Self::Out);

    /// Whether a chunk that will be applied as `apply` can land now.
    fn can_land(&self, apply: Apply) -> bool;
    /// Where a chunk for `range` lands; `None` as for `can_land`.
    fn land(&mut self, range: Range<usize>, apply: Apply) -> Option<Self::In>;
    fn landing_bytes(&mut self, landing: Self::In) -> &mut [u8];
    /// The landed chunk is complete: copy it into its range or reduce it there with `op`, then
    /// divide the range by `divide` (an average's last step). May finish later: see `busy`.
    fn apply(
        &mut self,
        landing: Self::In,
        op: ReduceOp,
        apply: Apply,
        divide: Option<usize>,
    ) -> Result<()>;
    /// Work is in flight outside the sockets (copies, kernels): poll rather than sleep.
    fn busy(&mut self) -> Result<bool>;
}

/// A slice of host memory, with the scratch slots reductions land in.
pub struct HostMemory<'a, T> {
    buf: &'a mut [T],
    scratch: &'a mut [T],
    slot_len: usize,
    free_slots: Vec<usize>,
}

impl<'a, T: Element> HostMemory<'a, T> {
    /// `scratch` holds `slots` chunks of `slot_len` elements.
    pub fn new(buf: &'a mut [T], scratch: &'a mut [T], slots: usize, slot_len: usize) -> Self {
        assert!(scratch.len() >= slots * slot_len, "scratch too small");
        HostMemory {
            buf,
            scratch,
            slot_len,
            free_slots: (0..slots).rev().collect(),
        }
    }
}

/// A host landing: straight into the buffer, or into a scratch slot.
#[derive(Clone, Copy, Debug)]
pub enum HostLanding {
    Direct {
        start: usize,
        end: usize,
    },
    Slot {
        slot: usize,
        start: usize,
        end: usize,
    },
}

impl<T: Element> Memory for HostMemory<'_, T> {
    type Out = (usize, usize);
    type In = HostLanding;

    fn stage(&mut self, range: Range<usize>) -> Result<Option<(usize, usize)>> {
        Ok(Some((range.start, range.end)))
    }

    fn staged_bytes(&mut self, (start, end): (usize, usize)) -> Result<Option<&[u8]>> {
        Ok(Some(bytemuck::cast_slice(&self.buf[start..end])))
    }

    fn release(&mut self, _: (usize, usize)) {}

    fn can_land(&self, apply: Apply) -> bool {
        apply == Apply::Copy || !self.free_slots.is_empty()
    }

    /// Copies land in place. That is safe because the engine lands no copy over a region whose
    /// send is still queued.
    fn land(&mut self, range: Range<usize>, apply: Apply) -> Option<HostLanding> {
        let (start, end) = (range.start, range.end);
        match apply {
            Apply::Copy => Some(HostLanding::Direct { start, end }),
            Apply::Reduce | Apply::ReduceRev => self
                .free_slots
                .pop()
                .map(|slot| HostLanding::Slot { slot, start, end }),
        }
    }

    fn landing_bytes(&mut self, landing: HostLanding) -> &mut [u8] {
        match landing {
            HostLanding::Direct { start, end } => {
                bytemuck::cast_slice_mut(&mut self.buf[start..end])
            }
            HostLanding::Slot { slot, start, end } => {
                let at = slot * self.slot_len;
                bytemuck::cast_slice_mut(&mut self.scratch[at..at + (end - start)])
            }
        }
    }

    fn apply(
        &mut self,
        landing: HostLanding,
        op: ReduceOp,
        apply: Apply,
        divide: Option<usize>,
    ) -> Result<()> {
        let (start, end) = match landing {
            HostLanding::Direct { start, end } => (start, end),
            HostLanding::Slot { slot, start, end } => {
                let at = slot * self.slot_len;
                let src = &mut self.scratch[at..at + (end - start)];
                let dst = &mut self.buf[start..end];
                match apply {
                    Apply::Copy => dst.copy_from_slice(src),
                    Apply::Reduce => T::reduce_into(op, dst, src),
                    Apply::ReduceRev => {
                        T::reduce_into(op, src, dst);
                        dst.copy_from_slice(src);
                    }
                }
                self.free_slots.push(slot);
                (start, end)
            }
        };
        if let Some(n) = divide {
            T::divide_by(&mut self.buf[start..end], n);
        }
        Ok(())
    }

    fn busy(&mut self) -> Result<bool> {
        Ok(false)
    }
}
