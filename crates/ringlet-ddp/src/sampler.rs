//! One global sample order per epoch, and each rank's contiguous slice of every step.
//!
//! The order depends only on the seed and the epoch, and the position is a *global* cursor (the
//! samples of the epoch consumed so far), so a run saved by 4 ranks resumes on 3 or 8 at the same
//! sample, and the samples of every step are the same whatever the world size or split.
//!
//! [`Sampler::local`] instead takes each rank's samples from shards its host holds (see
//! [`locality`](crate::locality)), with the same cursor, epochs and global batch.

use crate::balance::offset;
use crate::locality::{EpochPlan, ShardLayout};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use ringlet::Error;

/// The order of the `len` training samples in `epoch` (a permutation fixed by seed and epoch).
pub fn epoch_order(seed: u64, epoch: u64, len: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..len).collect();
    let mut rng = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ epoch);
    order.shuffle(&mut rng);
    order
}

/// Steps through the epochs of one training set: each step takes the next `global_batch`
/// samples of the epoch's order; an epoch ends when fewer than `global_batch` are left (they
/// are skipped, as `drop_last` does).
#[derive(Clone, Debug)]
pub struct Sampler {
    seed: u64,
    len: usize,
    global_batch: usize,
    epoch: u64,
    cursor: usize,
    /// The epoch's order (exact mode; empty with locality).
    order: Vec<usize>,
    local: Option<Box<Local>>,
}

/// What a sampler with data locality keeps: the layout, the epoch's plan (made when the epoch's
/// first step is taken, from the split then), and the rank's samples of the last step.
#[derive(Clone, Debug)]
struct Local {
    layout: ShardLayout,
    plan: Option<EpochPlan>,
    /// The split to make the next plan from, when resuming mid-epoch (a checkpoint's).
    plan_from: Option<Vec<usize>>,
    mine: Vec<usize>,
}

impl Sampler {
    /// A sampler at the start of epoch 0. `global_batch` must be between 1 and `len`.
    pub fn new(seed: u64, len: usize, global_batch: usize) -> Result<Sampler, Error> {
        if global_batch == 0 || global_batch > len {
            return Err(Error::InvalidArgument(format!(
                "global batch {global_batch} must be between 1 and the {len} training samples"
            )));
        }
        Ok(Sampler {
            seed,
            len,
            global_batch,
            epoch: 0,
            cursor: 0,
            order: epoch_order(seed, 0, len),
            local: None,
        })
    }

    /// A sampler at the start of epoch 0 that takes each rank's samples from the shards its
    /// host holds (`layout`), over `layout.len()` samples.
    pub fn local(seed: u64, layout: ShardLayout, global_batch: usize) -> Result<Sampler, Error> {
        let mut s = Sampler::new(seed, layout.len(), global_batch)?;
        s.order = Vec::new();
        s.local = Some(Box::new(Local {
            layout,
            plan: None,
            plan_from: None,
            mine: Vec::new(),
        }));
        Ok(s)
    }

    /// [`new`](Self::new), or [`local`](Self::local) given a layout.
    pub fn with_layout(
        seed: u64,
        len: usize,
        global_batch: usize,
        layout: Option<ShardLayout>,
    ) -> Result<Sampler, Error> {
        match layout {
            Some(l) => Sampler::local(seed, l, global_batch),
            None => Sampler::new(seed, len, global_batch),
        }
    }

    /// With locality, the split the current epoch's plan is to be made from (a checkpoint's
    /// record of the one it was made from), instead of the split of its next step. Ignored if
    /// it does not fit the world.
    pub fn plan_from(&mut self, batches: Option<Vec<usize>>) {
        if let Some(local) = &mut self.local {
            local.plan_from = batches;
        }
    }

    /// The current epoch's plan, with locality once a step of it has been taken.
    pub fn plan(&self) -> Option<&EpochPlan> {
        self.local.as_ref()?.plan.as_ref()
    }

    /// Moves to a saved position (from a checkpoint: checked, as any number from a file is).
    pub fn seek(&mut self, epoch: u64, cursor: u64) -> Result<(), Error> {
        let cursor = usize::try_from(cursor)
            .ok()
            .filter(|&c| c <= self.len)
            .ok_or_else(|| {
                Error::Config(format!(
                    "sample cursor {cursor} is past the {} training samples",
                    self.len
                ))
            })?;
        if self.local.is_none() && epoch != self.epoch {
            self.order = epoch_order(self.seed, epoch, self.len);
        }
        if let Some(local) = &mut self.local {
            // Made again at the next step: from the split the saved plan was made from (see
            // `plan_from`), else from the split then.
            local.plan = None;
            local.plan_from = None;
        }
        (self.epoch, self.cursor) = (epoch, cursor);
        Ok(())
    }

    /// The samples rank `rank` computes in the next step, given every rank's local batch
    /// (`batches` sums to the global batch), and moves past the step.
    pub fn next_step(&mut self, batches: &[usize], rank: usize) -> Result<&[usize], Error> {
        let total = batches
            .iter()
            .try_fold(0usize, |a, &b| a.checked_add(b))
            .filter(|&t| t == self.global_batch);
        if total.is_none() || rank >= batches.len() {
            return Err(Error::InvalidArgument(format!(
                "local batches {batches:?} must sum to the global batch {} and include rank {rank}",
                self.global_batch
            )));
        }
        if self.cursor + self.global_batch > self.len {
            self.epoch = self.epoch.checked_add(1).ok_or_else(|| {
                Error::Config("the epoch count overflows (a corrupt checkpoint?)".into())
            })?;
            self.cursor = 0;
            if self.local.is_none() {
                self.order = epoch_order(self.seed, self.epoch, self.len);
            }
        }
        let start = self.cursor;
        self.cursor += self.global_batch;
        let Some(local) = self.local.as_deref_mut() else {
            let from = start + offset(batches, rank);
            return Ok(&self.order[from..from + batches[rank]]);
        };
        if local.plan.as_ref().is_none_or(|p| p.epoch != self.epoch) {
            let global = self.global_batch;
            let saved = local.plan_from.take().filter(|b| {
                b.len() == batches.len()
                    && b.iter().try_fold(0usize, |a, &x| a.checked_add(x)) == Some(global)
            });
            if start != 0 && saved.is_none() {
                tracing::warn!(
                    "data locality: epoch {} is planned mid-way (at sample {start}) from the current split: if the split, the hosts or the shard map changed since the epoch began, some of its samples may be used twice or not at all",
                    self.epoch
                );
            }
            let from = saved.as_deref().unwrap_or(batches);
            let plan = EpochPlan::new(&local.layout, self.seed, self.epoch, global, from)?;
            local.plan = Some(plan);
        }
        let plan = local.plan.as_ref().expect("made above");
        plan.take(
            &local.layout,
            start,
            self.global_batch,
            batches,
            rank,
            &mut local.mine,
        );
        Ok(&local.mine)
    }

    /// The epoch of the last step taken (or of the position sought).
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Samples of the current epoch consumed so far, over all ranks.
    pub fn cursor(&self) -> u64 {
        self.cursor as u64
    }

    pub fn global_batch(&self) -> usize {
        self.global_batch
    }

    /// Full steps in one epoch.
    pub fn steps_per_epoch(&self) -> u64 {
        (self.len / self.global_batch) as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn epoch_orders_are_permutations_fixed_by_seed_and_epoch() {
        let a = epoch_order(5, 0, 100);
        let mut s = a.clone();
        s.sort();
        assert_eq!(s, (0..100).collect::<Vec<_>>());
        assert_eq!(a, epoch_order(5, 0, 100));
        assert_ne!(a, epoch_order(5, 1, 100));
        assert_ne!(a, epoch_order(6, 0, 100));
    }

    /// Every split of every world size takes the same samples in each step, and a sampler moved
    /// to a saved position goes on as the uninterrupted one does.
    #[test]
    fn steps_cover_the_same_samples_whatever_the_split_and_resume_anywhere() {
        let one: Vec<Vec<usize>> = {
            let mut s = Sampler::new(3, 50, 12).unwrap();
            (0..10)
                .map(|_| s.next_step(&[12], 0).unwrap().to_vec())
                .collect()
        };
        for split in [vec![6, 6], vec![1, 11], vec![3, 4, 5], vec![2, 2, 2, 6]] {
            let mut ranks: Vec<Sampler> = (0..split.len())
                .map(|_| Sampler::new(3, 50, 12).unwrap())
                .collect();
            for want in &one {
                let got: Vec<usize> = ranks
                    .iter_mut()
                    .enumerate()
                    .flat_map(|(r, s)| s.next_step(&split, r).unwrap().to_vec())
                    .collect();
                assert_eq!(&got, want, "split {split:?}");
            }
        }
        let mut a = Sampler::new(3, 50, 12).unwrap();
        for _ in 0..5 {
            a.next_step(&[12], 0).unwrap();
        }
        let mut b = Sampler::new(3, 50, 12).unwrap();
        b.seek(a.epoch(), a.cursor()).unwrap();
        for want in &one[5..] {
            assert_eq!(b.next_step(&[6, 6], 0).unwrap(), &want[..6]);
        }
    }

    #[test]
    fn bad_numbers_are_errors_not_panics() {
        assert!(Sampler::new(0, 10, 0).is_err());
        assert!(Sampler::new(0, 10, 11).is_err());
        let mut s = Sampler::new(0, 10, 4).unwrap();
        assert!(s.seek(0, 11).is_err());
        assert!(s.seek(0, u64::MAX).is_err());
        assert!(s.next_step(&[usize::MAX, 5], 0).is_err());
        assert!(s.next_step(&[2, 2], 2).is_err());
        assert!(s.next_step(&[3, 2], 0).is_err());
        assert_eq!(s.next_step(&[2, 2], 1).unwrap().len(), 2);
    }
}
