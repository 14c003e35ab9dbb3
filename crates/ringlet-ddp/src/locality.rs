//! Data read where it is stored: each rank takes its samples only from shards its host holds.
//!
//! The training set is a list of shards (contiguous runs of sample ids). A [`ShardLayout`] says
//! which hosts hold a copy of each shard and on which host each rank runs. Once per epoch an
//! [`EpochPlan`] is made the same way on every rank:
//!
//! 1. **Assignment.** Every shard goes to one host that holds it. Hosts' targets are their ranks'
//!    share of the global batch (the balancer's split when the epoch starts), in samples; shards
//!    held by one host go to it, the others (largest first, in an order shuffled per epoch) to the
//!    holder furthest below its target. So the split is followed as closely as whole shards
//!    allow, and a shard held by several hosts moves between them from epoch to epoch.
//! 2. **Pools.** Each host's assigned samples are shuffled (seed, epoch, host).
//! 3. **Interleaving.** The epoch's order merges the pools evenly: the j-th sample of a pool of
//!    `P` sits at fraction `(j + ½) / P` of the epoch. Step k takes positions `k·B .. (k+1)·B` as
//!    in the exact order, so every step draws from each host in proportion to its pool and all
//!    pools run out together: every sample is used once per epoch, except the last
//!    `len mod B` positions, which are dropped (as the exact order drops them).
//! 4. **Ranks.** A host's samples of the step are split over its ranks in proportion to their
//!    local batches, each a contiguous part of the host's samples in order.
//!
//! How this differs from the exact order ([`crate::sampler::epoch_order`]): there a step's
//! samples are a uniform draw from the whole set, fixed by seed and epoch alone, the same for any
//! world size or split. Here they are a draw from each host's pool, so they depend also on the
//! shard map, on which hosts the ranks run and on the split when the epoch starts; a rank's local
//! batch is its part of its host's share rather than exactly the balancer's number (the global
//! batch is unchanged). Shards should be i.i.d. (the converter shuffles before sharding).

use crate::balance::split;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use ringlet::Error;
use std::cmp::Ordering;
use std::collections::BinaryHeap;

/// Which hosts hold which shards, and where each rank runs.
#[derive(Clone, Debug)]
pub struct ShardLayout {
    /// First sample id of each shard, and one past the last shard's (`len`).
    starts: Vec<usize>,
    /// Per shard: the hosts that may read it, ascending.
    holders: Vec<Vec<usize>>,
    /// Host of each rank.
    rank_host: Vec<usize>,
    /// Ranks of each host, ascending.
    host_ranks: Vec<Vec<usize>>,
    /// Host names, for messages.
    host_names: Vec<String>,
}

impl ShardLayout {
    /// `sizes[s]`: samples of shard `s` (ids follow shard order); `holders[s]`: indices into
    /// `host_names` of the hosts that hold it; `rank_host[r]`: rank r's host. Every shard needs a
    /// holder and every host a rank (a host without ranks could take no samples).
    pub fn new(
        sizes: &[usize],
        holders: Vec<Vec<usize>>,
        rank_host: Vec<usize>,
        host_names: Vec<String>,
    ) -> Result<ShardLayout, Error> {
        let bad = |why: String| Err(Error::InvalidArgument(why));
        let hosts = host_names.len();
        if sizes.len() != holders.len() || sizes.is_empty() {
            return bad(format!(
                "{} shard sizes for {} holder lists (at least one shard is needed)",
                sizes.len(),
                holders.len()
            ));
        }
        let mut starts = Vec::with_capacity(sizes.len() + 1);
        let mut at = 0usize;
        for &s in sizes {
            starts.push(at);
            at = at
                .checked_add(s)
                .ok_or_else(|| Error::InvalidArgument("the shard sizes overflow".into()))?;
        }
        starts.push(at);
        let mut host_ranks = vec![Vec::new(); hosts];
        for (r, &h) in rank_host.iter().enumerate() {
            match host_ranks.get_mut(h) {
                Some(v) => v.push(r),
                None => return bad(format!("rank {r}'s host {h} is not one of {hosts} hosts")),
            }
        }
        if let Some(h) = host_ranks.iter().position(Vec::is_empty) {
            return bad(format!("host {} has no rank", host_names[h]));
        }
        let mut holders = holders;
        for (s, hs) in holders.iter_mut().enumerate() {
            hs.sort_unstable();
            hs.dedup();
            if hs.is_empty() || hs.iter().any(|&h| h >= hosts) {
                return bad(format!("shard {s} has no holder among the {hosts} hosts"));
            }
        }
        Ok(ShardLayout {
            starts,
            holders,
            rank_host,
            host_ranks,
            host_names,
        })
    }

    /// Samples in all shards.
    pub fn len(&self) -> usize {
        *self.starts.last().expect("at least one shard")
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn world_size(&self) -> usize {
        self.rank_host.len()
    }

    fn shards(&self) -> usize {
        self.holders.len()
    }

    fn size(&self, s: usize) -> usize {
        self.starts[s + 1] - self.starts[s]
    }

    /// Which shard holds sample `id`.
    pub fn shard_of(&self, id: usize) -> Option<usize> {
        (id < self.len()).then(|| self.starts.partition_point(|&s| s <= id) - 1)
    }
}

/// One epoch's order: positions hold sample ids, and the host that reads each.
#[derive(Clone, Debug)]
pub struct EpochPlan {
    pub epoch: u64,
    /// The local batches the plan was made from.
    pub batches: Vec<usize>,
    /// The host each shard is read by this epoch.
    pub assigned: Vec<usize>,
    order: Vec<usize>,
    host_at: Vec<u32>,
}

/// `seed`'s generator for `epoch`, stream `stream` (0: assignment, 1 + h: host h's pool).
fn rng(seed: u64, epoch: u64, stream: u64) -> ChaCha8Rng {
    let mut r = ChaCha8Rng::seed_from_u64(seed.wrapping_mul(0x2545_f491_4f6c_dd1d) ^ epoch);
    r.set_stream(stream);
    r
}

/// The next position of one host's pool in the merge: its key is `(2j + 1) / (2P)`.
#[derive(PartialEq, Eq)]
struct Next {
    num: u128,
    den: u128,
    host: usize,
}

impl Ord for Next {
    // Reversed (BinaryHeap pops the greatest): the smallest key first, ties to the lower host.
    fn cmp(&self, o: &Self) -> Ordering {
        (o.num * self.den)
            .cmp(&(self.num * o.den))
            .then(o.host.cmp(&self.host))
    }
}

impl PartialOrd for Next {
    fn partial_cmp(&self, o: &Self) -> Option<Ordering> {
        Some(self.cmp(o))
    }
}

impl EpochPlan {
    /// The plan of `epoch` for local batches `batches` (one per rank, summing to `global`).
    pub fn new(
        layout: &ShardLayout,
        seed: u64,
        epoch: u64,
        global: usize,
        batches: &[usize],
    ) -> Result<EpochPlan, Error> {
        if batches.len() != layout.world_size() {
            return Err(Error::InvalidArgument(format!(
                "{} local batches for a shard layout of {} ranks",
                batches.len(),
                layout.world_size()
            )));
        }
        let assigned = assign(layout, seed, epoch, global, batches);
        let hosts = layout.host_names.len();
        let mut pools: Vec<Vec<usize>> = vec![Vec::new(); hosts];
        for (s, &h) in assigned.iter().enumerate() {
            pools[h].extend(layout.starts[s]..layout.starts[s + 1]);
        }
        for (h, pool) in pools.iter_mut().enumerate() {
            pool.shuffle(&mut rng(seed, epoch, 1 + h as u64));
        }
        let mut heap: BinaryHeap<Next> = (0..hosts)
            .filter(|&h| !pools[h].is_empty())
            .map(|h| Next {
                num: 1,
                den: 2 * pools[h].len() as u128,
                host: h,
            })
            .collect();
        let (mut order, mut host_at) = (Vec::with_capacity(layout.len()), Vec::new());
        host_at.reserve(layout.len());
        let mut taken = vec![0usize; hosts];
        while let Some(mut next) = heap.pop() {
            let h = next.host;
            order.push(pools[h][taken[h]]);
            host_at.push(h as u32);
            taken[h] += 1;
            if taken[h] < pools[h].len() {
                next.num += 2;
                heap.push(next);
            }
        }
        let plan = EpochPlan {
            epoch,
            batches: batches.to_vec(),
            assigned,
            order,
            host_at,
        };
        plan.check_every_rank_gets_samples(layout, global)?;
        Ok(plan)
    }

    /// Ranks with no sample in a step would hand an empty batch to their model: refused, naming
    /// the host whose shards are too few for its ranks.
    fn check_every_rank_gets_samples(
        &self,
        layout: &ShardLayout,
        global: usize,
    ) -> Result<(), Error> {
        let hosts = layout.host_names.len();
        let mut count = vec![0usize; hosts];
        for window in self.host_at.chunks_exact(global) {
            count.iter_mut().for_each(|c| *c = 0);
            for &h in window {
                count[h as usize] += 1;
            }
            if let Some(h) = (0..hosts).find(|&h| count[h] < layout.host_ranks[h].len()) {
                let held: usize = (0..layout.shards())
                    .filter(|&s| self.assigned[s] == h)
                    .map(|s| layout.size(s))
                    .sum();
                return Err(Error::InvalidArgument(format!(
                    "with data locality, host {} reads {held} of the {} samples in epoch {}: some steps give its {} rank(s) only {} of the global batch {global}; give it more shards or raise the global batch",
                    layout.host_names[h],
                    layout.len(),
                    self.epoch,
                    layout.host_ranks[h].len(),
                    count[h],
                )));
            }
        }
        Ok(())
    }

    /// The samples `rank` computes in the step starting at position `from` (a multiple of the
    /// global batch), into `out`.
    pub fn take(
        &self,
        layout: &ShardLayout,
        from: usize,
        global: usize,
        batches: &[usize],
        rank: usize,
        out: &mut Vec<usize>,
    ) {
        out.clear();
        let h = layout.rank_host[rank];
        let ranks = &layout.host_ranks[h];
        let end = (from + global).min(self.order.len());
        out.extend(
            (from..end)
                .filter(|&p| self.host_at[p] as usize == h)
                .map(|p| self.order[p]),
        );
        let weights: Vec<f64> = ranks.iter().map(|&r| batches[r] as f64).collect();
        let parts = split(out.len(), &weights);
        let me = ranks
            .iter()
            .position(|&r| r == rank)
            .expect("rank on its host");
        let start: usize = parts[..me].iter().sum();
        out.truncate(start + parts[me]);
        out.drain(..start);
    }
}

/// Which host reads each shard this epoch (see the module's doc).
fn assign(
    layout: &ShardLayout,
    seed: u64,
    epoch: u64,
    global: usize,
    batches: &[usize],
) -> Vec<usize> {
    let len = layout.len() as f64;
    let global = global.max(1) as f64;
    let mut deficit: Vec<f64> = layout
        .host_ranks
        .iter()
        .map(|ranks| len * ranks.iter().map(|&r| batches[r] as f64).sum::<f64>() / global)
        .collect();
    let mut shards: Vec<usize> = (0..layout.shards()).collect();
    shards.shuffle(&mut rng(seed, epoch, 0));
    // Forced shards first, so that the choices after them see the targets they leave.
    shards.sort_by_key(|&s| {
        (
            layout.holders[s].len() > 1,
            std::cmp::Reverse(layout.size(s)),
        )
    });
    let mut assigned = vec![0; layout.shards()];
    for s in shards {
        let h = *layout.holders[s]
            .iter()
            .max_by(|&&a, &&b| deficit[a].total_cmp(&deficit[b]).then(b.cmp(&a)))
            .expect("every shard has a holder");
        deficit[h] -= layout.size(s) as f64;
        assigned[s] = h;
    }
    assigned
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Sampler;

    fn layout(sizes: &[usize], holders: &[&[usize]], rank_host: &[usize]) -> ShardLayout {
        let hosts = rank_host.iter().max().unwrap() + 1;
        ShardLayout::new(
            sizes,
            holders.iter().map(|h| h.to_vec()).collect(),
            rank_host.to_vec(),
            (0..hosts).map(|h| format!("h{h}")).collect(),
        )
        .unwrap()
    }

    /// Runs `epochs` epochs on every rank; returns each epoch's samples of every step.
    fn run(layout: &ShardLayout, global: usize, batches: &[usize], epochs: u64) -> Vec<Vec<usize>> {
        let n = batches.len();
        let mut samplers: Vec<Sampler> = (0..n)
            .map(|_| Sampler::local(9, layout.clone(), global).unwrap())
            .collect();
        let per_epoch = samplers[0].steps_per_epoch() as usize;
        let mut out = vec![Vec::new(); epochs as usize];
        for epoch in out.iter_mut() {
            for _ in 0..per_epoch {
                for (r, s) in samplers.iter_mut().enumerate() {
                    let mine = s.next_step(batches, r).unwrap().to_vec();
                    for &id in &mine {
                        let shard = layout.shard_of(id).unwrap();
                        let plan = s.plan().unwrap();
                        assert_eq!(
                            plan.assigned[shard], layout.rank_host[r],
                            "rank {r} read a shard of another host"
                        );
                        assert!(layout.holders[shard].contains(&layout.rank_host[r]));
                    }
                    epoch.extend(mine);
                }
            }
        }
        out
    }

    #[test]
    fn every_sample_once_per_epoch_and_only_from_local_shards() {
        // 3 hosts; host 0 has 2 ranks. Shards 0-1 only on h0, 2 only on h1, 3-4 on h1 and h2, 5
        // everywhere.
        let l = layout(
            &[40, 40, 50, 30, 30, 20],
            &[&[0], &[0], &[1], &[1, 2], &[1, 2], &[0, 1, 2]],
            &[0, 0, 1, 2],
        );
        for batches in [[4, 4, 8, 4], [2, 6, 6, 6], [5, 5, 5, 5]] {
            let epochs = run(&l, 20, &batches, 3);
            for (e, ids) in epochs.iter().enumerate() {
                let mut sorted = ids.clone();
                sorted.sort_unstable();
                let before = sorted.len();
                sorted.dedup();
                assert_eq!(sorted.len(), before, "a sample twice in epoch {e}");
                // 210 samples, global 20: 10 steps, 10 dropped.
                assert_eq!(before, 200, "epoch {e}, batches {batches:?}");
            }
        }
    }

    #[test]
    fn the_split_steers_which_host_reads_shared_shards() {
        // Two hosts hold everything: the assignment follows the split, whole shards at a time.
        let both: &[usize] = &[0, 1];
        let l = layout(&[10; 12], &[both; 12], &[0, 1]);
        let pool = |batches: [usize; 2]| {
            let plan = EpochPlan::new(&l, 1, 0, 12, &batches).unwrap();
            plan.assigned.iter().filter(|&&h| h == 0).count() * 10
        };
        assert_eq!(pool([6, 6]), 60);
        assert_eq!(pool([9, 3]), 90);
        assert_eq!(pool([3, 9]), 30);
        // Epochs move shards between holders.
        let a = EpochPlan::new(&l, 1, 0, 12, &[6, 6]).unwrap().assigned;
        let b = EpochPlan::new(&l, 1, 1, 12, &[6, 6]).unwrap().assigned;
        assert_ne!(a, b);
    }

    #[test]
    fn steps_draw_from_every_host_in_proportion() {
        let l = layout(&[100, 300], &[&[0], &[1]], &[0, 1]);
        let mut s0 = Sampler::local(3, l.clone(), 40).unwrap();
        let mut s1 = Sampler::local(3, l, 40).unwrap();
        for _ in 0..10 {
            assert_eq!(s0.next_step(&[20, 20], 0).unwrap().len(), 10);
            assert_eq!(s1.next_step(&[20, 20], 1).unwrap().len(), 30);
        }
    }

    #[test]
    fn a_resumed_sampler_goes_on_as_the_uninterrupted_one() {
        let l = layout(&[33, 47, 20], &[&[0], &[0, 1], &[1]], &[0, 1, 1]);
        let b = [6, 3, 3];
        let mut a = Sampler::local(5, l.clone(), 12).unwrap();
        let mut want = Vec::new();
        for _ in 0..20 {
            want.push(a.next_step(&b, 1).unwrap().to_vec());
        }
        let mut c = Sampler::local(5, l.clone(), 12).unwrap();
        for _ in 0..5 {
            c.next_step(&b, 1).unwrap();
        }
        let mut d = Sampler::local(5, l, 12).unwrap();
        d.seek(c.epoch(), c.cursor()).unwrap();
        for w in &want[5..] {
            assert_eq!(d.next_step(&b, 1).unwrap(), &w[..]);
        }
    }

    /// A split changed mid-epoch: a sampler resumed after it makes the epoch's plan from the
    /// split the plan was made from (as a checkpoint records it), so the epoch goes on alike.
    #[test]
    fn a_resume_after_the_split_changed_mid_epoch_keeps_the_epochs_plan() {
        let both: &[usize] = &[0, 1];
        let l = layout(&[20; 6], &[both; 6], &[0, 1]);
        let (before, after) = ([6, 6], [9, 3]);
        let mut a = Sampler::local(2, l.clone(), 12).unwrap();
        for _ in 0..3 {
            a.next_step(&before, 0).unwrap();
        }
        let made_from = a.plan().unwrap().batches.clone();
        let (epoch, cursor) = (a.epoch(), a.cursor());
        let want: Vec<Vec<usize>> = (0..4)
            .map(|_| a.next_step(&after, 0).unwrap().to_vec())
            .collect();
        let mut b = Sampler::local(2, l, 12).unwrap();
        b.seek(epoch, cursor).unwrap();
        b.plan_from(Some(made_from));
        for w in &want {
            assert_eq!(b.next_step(&after, 0).unwrap(), &w[..]);
        }
    }

    #[test]
    fn layouts_that_cannot_work_are_refused() {
        let names = |k: usize| (0..k).map(|h| format!("h{h}")).collect::<Vec<_>>();
        assert!(ShardLayout::new(&[], vec![], vec![0], names(1)).is_err());
        assert!(ShardLayout::new(&[5], vec![vec![]], vec![0], names(1)).is_err());
        assert!(ShardLayout::new(&[5], vec![vec![3]], vec![0], names(1)).is_err());
        assert!(ShardLayout::new(&[5], vec![vec![0]], vec![0], names(2)).is_err());
        assert!(
            ShardLayout::new(&[usize::MAX, 1], vec![vec![0], vec![0]], vec![0], names(1)).is_err()
        );
        // h1 holds 2 samples of 100 for its 2 ranks: most steps would give it none.
        let l = layout(&[98, 2], &[&[0], &[1]], &[0, 1, 1]);
        let err = EpochPlan::new(&l, 0, 0, 10, &[4, 3, 3])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("host h1") && err.contains("2 rank(s)"),
            "{err}"
        );
    }
}
