//! Gradient all-reduce in buckets, overlapping backward.
//!
//! The caller describes its parameters once, in forward order ([`ParamSpec`]: a name and an
//! element count). Buckets group whole parameters in *reverse* order — backward produces the
//! last layers' gradients first — and the first bucket is kept small so that communication
//! starts early. Each step the caller hands every gradient over ([`GradSync::push`]) as soon as
//! it has it; a bucket's asynchronous all-reduce starts as soon as its last parameter is in, and
//! buckets always start in bucket order, so every rank issues the same collectives in the same
//! order whatever order it pushes in. [`GradSync::finish`] waits for the sums; the caller divides
//! them by the global batch (sum-then-divide: the update one process would make with the whole
//! batch, whatever the number of ranks or the split).
//!
//! A few extra f32 slots ride in the first bucket (`scalars`: a loss sum, a count of correct
//! predictions), so per-step statistics cost no extra collective.

use ringlet::{AllReduceHandle, Communicator, Error, ReduceOp};
use std::ops::Range;
use std::time::{Duration, Instant};

/// One parameter (or a group updated together, such as a layer's weight and bias).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ParamSpec {
    pub name: String,
    /// Elements (f32) in its gradient.
    pub numel: usize,
}

impl ParamSpec {
    pub fn new(name: impl Into<String>, numel: usize) -> ParamSpec {
        ParamSpec {
            name: name.into(),
            numel,
        }
    }
}

/// Bucket sizes and whether to overlap.
#[derive(Clone, Debug, PartialEq)]
pub struct SyncOptions {
    /// The first bucket (the last parameters) closes once it holds this many bytes.
    pub first_bucket_bytes: usize,
    /// The others close at this many bytes (a parameter is never split, so a bucket may exceed
    /// its cap by one parameter).
    pub bucket_cap_bytes: usize,
    /// Start each bucket's all-reduce as soon as it is full (`false`: all of them at
    /// [`GradSync::finish`], for comparison).
    pub overlap: bool,
    /// Extra f32 values summed along with the first bucket.
    pub scalars: usize,
}

impl Default for SyncOptions {
    /// PyTorch DDP's defaults: 1 MiB first bucket, 25 MiB after it, overlapped.
    fn default() -> SyncOptions {
        SyncOptions {
            first_bucket_bytes: 1 << 20,
            bucket_cap_bytes: 25 << 20,
            overlap: true,
            scalars: 0,
        }
    }
}

/// A contiguous range of parameters (indices into the specs, so of the flat gradient too),
/// all-reduced together.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Bucket {
    /// Parameter indices, forward order.
    pub params: Range<usize>,
    /// Elements of the flat gradient (all parameters back to back, forward order).
    pub elems: Range<usize>,
}

/// Buckets in reverse parameter order: the first closes once it holds `first_bytes`, the others
/// at `cap_bytes`.
pub fn plan_buckets(numels: &[usize], first_bytes: usize, cap_bytes: usize) -> Vec<Bucket> {
    let mut starts = Vec::with_capacity(numels.len());
    let mut at = 0usize;
    for &n in numels {
        starts.push(at);
        at = at.saturating_add(n);
    }
    let mut out: Vec<Bucket> = Vec::new();
    let mut open: Option<Bucket> = None;
    for i in (0..numels.len()).rev() {
        let end = starts[i].saturating_add(numels[i]);
        let b = open.get_or_insert(Bucket {
            params: i..i + 1,
            elems: starts[i]..end,
        });
        b.params.start = i;
        b.elems.start = starts[i];
        let cap = if out.is_empty() {
            first_bytes
        } else {
            cap_bytes
        };
        if b.elems.len().saturating_mul(4) >= cap {
            out.extend(open.take());
        }
    }
    out.extend(open);
    out
}

/// What one step's synchronisation cost.
#[derive(Clone, Copy, Debug, Default)]
pub struct SyncStats {
    /// Blocked in [`GradSync::finish`] waiting for sums (the communication backward did not
    /// hide).
    pub wait: Duration,
    /// Bytes each rank all-reduced.
    pub bytes: usize,
}

/// Per-step gradient synchronisation for one model on one communicator.
pub struct GradSync<'c> {
    comm: &'c Communicator,
    specs: Vec<ParamSpec>,
    /// Start of each parameter in the flat gradient.
    starts: Vec<usize>,
    plan: Vec<Bucket>,
    /// Bucket of each parameter.
    bucket_of: Vec<usize>,
    opts: SyncOptions,
    /// Bucket buffers, handed to the all-reduce and back every step (summed values after
    /// `finish`).
    bufs: Vec<Vec<f32>>,
    handles: Vec<Option<AllReduceHandle<f32>>>,
    /// Parameters still missing per bucket this step.
    missing: Vec<usize>,
    pushed: Vec<bool>,
    /// Buckets started so far (they start in order).
    started: usize,
    /// Whether `bufs` hold this step's sums.
    summed: bool,
}

impl<'c> GradSync<'c> {
    /// Plans the buckets of `params` (forward order). Every rank must describe the same
    /// parameters with the same options.
    pub fn new(
        comm: &'c Communicator,
        params: Vec<ParamSpec>,
        opts: SyncOptions,
    ) -> Result<GradSync<'c>, Error> {
        let mut starts = Vec::with_capacity(params.len());
        let mut total = 0usize;
        for p in &params {
            starts.push(total);
            total = total.checked_add(p.numel).ok_or_else(|| {
                Error::InvalidArgument("the parameters' element counts overflow".into())
            })?;
        }
        if params.is_empty() {
            return Err(Error::InvalidArgument(
                "no parameters to synchronise".into(),
            ));
        }
        let numels: Vec<usize> = params.iter().map(|p| p.numel).collect();
        let plan = plan_buckets(&numels, opts.first_bucket_bytes, opts.bucket_cap_bytes);
        let mut bucket_of = vec![0; params.len()];
        for (b, bucket) in plan.iter().enumerate() {
            for p in bucket.params.clone() {
                bucket_of[p] = b;
            }
        }
        let bufs = plan
            .iter()
            .enumerate()
            .map(|(b, k)| vec![0.0; k.elems.len() + if b == 0 { opts.scalars } else { 0 }])
            .collect();
        let n = plan.len();
        let mut sync = GradSync {
            comm,
            pushed: vec![false; params.len()],
            specs: params,
            starts,
            bucket_of,
            opts,
            bufs,
            handles: (0..n).map(|_| None).collect(),
            missing: Vec::new(),
            plan,
            started: 0,
            summed: false,
        };
        sync.reset();
        Ok(sync)
    }

    pub fn params(&self) -> &[ParamSpec] {
        &self.specs
    }

    pub fn buckets(&self) -> &[Bucket] {
        &self.plan
    }

    /// Elements of all parameters together.
    pub fn numel(&self) -> usize {
        self.plan.first().map_or(0, |b| b.elems.end)
    }

    /// Bytes each step all-reduces on each rank (gradients and scalars).
    pub fn bytes_per_step(&self) -> usize {
        (self.numel() + self.opts.scalars) * 4
    }

    fn reset(&mut self) {
        self.missing = self.plan.iter().map(|b| b.params.len()).collect();
        self.pushed.iter_mut().for_each(|p| *p = false);
        self.started = 0;
        self.summed = false;
    }

    /// Hands over parameter `index`'s local gradient sum: `fill` writes it into the bucket's
    /// buffer (a slice of exactly the parameter's length; a device can copy into it directly).
    /// Starts every bucket that is now complete, in bucket order, when overlapping.
    pub fn push_with(
        &mut self,
        index: usize,
        fill: impl FnOnce(&mut [f32]) -> Result<(), Error>,
    ) -> Result<(), Error> {
        if self.summed {
            self.reset();
        }
        let spec = self.specs.get(index).ok_or_else(|| {
            Error::InvalidArgument(format!(
                "parameter {index} does not exist ({} described)",
                self.specs.len()
            ))
        })?;
        if self.pushed[index] {
            return Err(Error::InvalidArgument(format!(
                "the gradient of {} was handed over twice in one step",
                spec.name
            )));
        }
        let b = self.bucket_of[index];
        let at = self.starts[index] - self.plan[b].elems.start;
        let buf = self.bufs[b].get_mut(at..at + spec.numel).ok_or_else(|| {
            Error::InvalidArgument(format!("the bucket buffer of {} is missing", spec.name))
        })?;
        fill(buf)?;
        self.pushed[index] = true;
        self.missing[b] -= 1;
        if self.opts.overlap {
            self.start_ready();
        }
        Ok(())
    }

    /// [`push_with`](Self::push_with) from a host slice of the parameter's length.
    pub fn push(&mut self, index: usize, grad: &[f32]) -> Result<(), Error> {
        let name = self.specs.get(index).map(|s| (s.name.clone(), s.numel));
        self.push_with(index, |dst| {
            if dst.len() != grad.len() {
                let (name, numel) = name.unwrap_or_default();
                return Err(Error::InvalidArgument(format!(
                    "the gradient of {name} has {} elements, the parameter {numel}",
                    grad.len()
                )));
            }
            dst.copy_from_slice(grad);
            Ok(())
        })
    }

    /// Sets this step's extra value `k` (before the first bucket starts: push it before the
    /// last parameters' gradients, or right after the forward pass).
    pub fn set_scalar(&mut self, k: usize, value: f32) -> Result<(), Error> {
        if self.summed {
            self.reset();
        }
        if self.started > 0 || k >= self.opts.scalars {
            return Err(Error::InvalidArgument(format!(
                "scalar {k} must be one of the {} described and set before the first bucket starts",
                self.opts.scalars
            )));
        }
        let at = self.plan[0].elems.len() + k;
        self.bufs[0][at] = value;
        Ok(())
    }

    fn start_ready(&mut self) {
        while self.started < self.plan.len() && self.missing[self.started] == 0 {
            let b = self.started;
            let buf = std::mem::take(&mut self.bufs[b]);
            self.handles[b] = Some(self.comm.all_reduce_async(buf, ReduceOp::Sum));
            self.started += 1;
        }
    }

    /// Starts what is left and waits for every bucket's sum. Every parameter must have been
    /// handed over. Afterwards [`grad`](Self::grad) and [`scalar`](Self::scalar) read the sums
    /// until the next step's first push.
    pub fn finish(&mut self) -> Result<SyncStats, Error> {
        if let Some(i) = self.pushed.iter().position(|p| !p) {
            // The buckets already started must still be waited for, or the next collective
            // would run behind them on this rank only.
            let missing = self.specs[i].name.clone();
            self.drain();
            return Err(Error::InvalidArgument(format!(
                "the gradient of {missing} was not handed over this step"
            )));
        }
        self.start_ready();
        let t = Instant::now();
        let mut first_error = None;
        for b in 0..self.plan.len() {
            match self.handles[b].take().map(AllReduceHandle::wait) {
                Some(Ok(sum)) => self.bufs[b] = sum,
                Some(Err(e)) => {
                    first_error.get_or_insert(e);
                }
                None => {}
            }
            self.restore_buffer(b);
        }
        if let Some(e) = first_error {
            self.reset();
            return Err(e);
        }
        self.summed = true;
        Ok(SyncStats {
            wait: t.elapsed(),
            bytes: if self.comm.world_size() > 1 {
                self.bytes_per_step()
            } else {
                0
            },
        })
    }

    /// Waits for the buckets in flight, ignoring their results (after a failed step), and
    /// gets every bucket buffer back for the next step.
    fn drain(&mut self) {
        for b in 0..self.plan.len() {
            if let Some(Ok(buf)) = self.handles[b].take().map(AllReduceHandle::wait) {
                self.bufs[b] = buf;
            }
            self.restore_buffer(b);
        }
        self.reset();
    }

    /// A bucket buffer lost with a failed all-reduce is made again.
    fn restore_buffer(&mut self, b: usize) {
        let len = self.plan[b].elems.len() + if b == 0 { self.opts.scalars } else { 0 };
        if self.bufs[b].len() != len {
            self.bufs[b] = vec![0.0; len];
        }
    }

    /// Parameter `index`'s gradient summed over all ranks (after [`finish`](Self::finish)).
    pub fn grad(&self, index: usize) -> &[f32] {
        let b = self.bucket_of[index];
        let at = self.starts[index] - self.plan[b].elems.start;
        &self.bufs[b][at..at + self.specs[index].numel]
    }

    /// Whether parameter `index`'s gradient was handed over this step.
    pub fn is_pushed(&self, index: usize) -> bool {
        !self.summed && self.pushed.get(index).copied().unwrap_or(false)
    }

    /// Extra value `k` summed over all ranks (after [`finish`](Self::finish)).
    pub fn scalar(&self, k: usize) -> f32 {
        self.bufs[0][self.plan[0].elems.len() + k]
    }

    /// Start of parameter `index` in the flat gradient.
    pub fn offset(&self, index: usize) -> usize {
        self.starts[index]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_cover_the_gradient_in_reverse_order() {
        // 66560, 263168, 10280 bytes.
        let numels = [16640, 65792, 2570];
        let b = plan_buckets(&numels, 1 << 10, 200_000);
        assert_eq!(
            b,
            vec![
                Bucket {
                    params: 2..3,
                    elems: 82432..85002
                },
                Bucket {
                    params: 1..2,
                    elems: 16640..82432
                },
                Bucket {
                    params: 0..1,
                    elems: 0..16640
                },
            ]
        );
        let one = plan_buckets(&numels, 25 << 20, 25 << 20);
        assert_eq!(
            one,
            vec![Bucket {
                params: 0..3,
                elems: 0..85002
            }]
        );
        // Small parameters share a bucket up to the cap.
        let many = plan_buckets(&[100; 10], 400, 1200);
        assert_eq!(
            many.iter().map(|b| b.params.clone()).collect::<Vec<_>>(),
            vec![9..10, 6..9, 3..6, 0..3]
        );
    }

    /// Three ranks hand their gradients over in different orders; every rank gets the same
    /// sums, parameter by parameter, step after step, with the scalars riding along.
    #[test]
    fn sums_arrive_whatever_order_each_rank_pushes_in() {
        let numels = [3usize, 700, 5, 260, 1];
        let specs: Vec<ParamSpec> = numels
            .iter()
            .enumerate()
            .map(|(i, &n)| ParamSpec::new(format!("p{i}"), n))
            .collect();
        let grad = |step: usize, rank: usize, i: usize| -> Vec<f32> {
            (0..numels[i])
                .map(|k| (step * 100 + rank * 10 + i) as f32 + k as f32 * 0.5)
                .collect()
        };
        let results = crate::local_world::run(3, |comm| {
            let opts = SyncOptions {
                first_bucket_bytes: 8,
                bucket_cap_bytes: 1200,
                overlap: true,
                scalars: 2,
            };
            let mut sync = GradSync::new(&comm, specs.clone(), opts).unwrap();
            assert!(sync.buckets().len() >= 3, "{:?}", sync.buckets());
            let r = comm.rank();
            let order: Vec<usize> = match r {
                0 => (0..numels.len()).rev().collect(),
                1 => (0..numels.len()).collect(),
                _ => vec![2, 4, 0, 3, 1],
            };
            let mut seen = Vec::new();
            for step in 0..3 {
                sync.set_scalar(0, r as f32 + 1.0).unwrap();
                sync.set_scalar(1, step as f32).unwrap();
                for &i in &order {
                    sync.push(i, &grad(step, r, i)).unwrap();
                }
                let stats = sync.finish().unwrap();
                assert_eq!(stats.bytes, (1 + 700 + 5 + 260 + 3 + 2) * 4);
                let grads: Vec<Vec<f32>> =
                    (0..numels.len()).map(|i| sync.grad(i).to_vec()).collect();
                seen.push((grads, sync.scalar(0), sync.scalar(1)));
            }
            seen
        });
        for (step, (grads, s0, s1)) in results[0].iter().enumerate() {
            assert_eq!(*s0, 6.0);
            assert_eq!(*s1, 3.0 * step as f32);
            for (i, g) in grads.iter().enumerate() {
                let want: Vec<f32> = (0..numels[i])
                    .map(|k| (0..3).map(|r| grad(step, r, i)[k]).sum())
                    .collect();
                assert_eq!(g, &want, "step {step} parameter {i}");
            }
        }
        assert!(results.iter().all(|r| r == &results[0]), "ranks disagree");
    }

    /// Handing a gradient over twice, or not at all, is an error naming the parameter; the
    /// buckets already started are still waited for, so the next step works.
    #[test]
    fn misuse_is_an_error_and_the_next_step_still_works() {
        crate::local_world::run(2, |comm| {
            let specs = vec![ParamSpec::new("w", 4), ParamSpec::new("b", 2)];
            let opts = SyncOptions {
                first_bucket_bytes: 4,
                ..SyncOptions::default()
            };
            let mut sync = GradSync::new(&comm, specs, opts).unwrap();
            sync.push(1, &[1.0, 2.0]).unwrap();
            let e = sync.push(1, &[1.0, 2.0]).unwrap_err().to_string();
            assert!(e.contains("the gradient of b was handed over twice"), "{e}");
            let e = sync.finish().unwrap_err().to_string();
            assert!(e.contains("the gradient of w was not handed over"), "{e}");
            let e = sync.push(0, &[1.0]).unwrap_err().to_string();
            assert!(e.contains("has 1 elements, the parameter 4"), "{e}");
            sync.push(0, &[1.0; 4]).unwrap();
            sync.push(1, &[3.0; 2]).unwrap();
            sync.finish().unwrap();
            assert_eq!(sync.grad(0), &[2.0; 4]);
            assert_eq!(sync.grad(1), &[6.0; 2]);
            let e = sync.set_scalar(0, 1.0).unwrap_err().to_string();
            assert!(e.contains("scalar 0 must be one of the 0 described"), "{e}");
        });
    }
}
