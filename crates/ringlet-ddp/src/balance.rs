//! Per-device batch balancing: how the global batch is split into local batches.
//!
//! The split never changes the math: the global batch (and so the samples of each step, the
//! learning rate and the update) stays the same; only which rank computes which samples moves.
//! Faster ranks get more samples so that all finish their compute at about the same time.
//!
//! Every decision is made from numbers every rank holds identically (an all-reduced vector), so
//! ranks never disagree on the split.

/// `--balance`.
#[derive(Clone, Debug, PartialEq)]
pub enum Balance {
    /// Equal split (the first `global % n` ranks take one more).
    Off,
    /// Proportional to fixed weights, one per rank.
    Static(Vec<f64>),
    /// Calibrated at start-up from measured speed, re-balanced during training.
    Auto,
}

impl std::str::FromStr for Balance {
    type Err = String;
    fn from_str(s: &str) -> Result<Balance, String> {
        match s {
            "off" => Ok(Balance::Off),
            "auto" => Ok(Balance::Auto),
            _ => {
                let Some(list) = s.strip_prefix("static:") else {
                    return Err(format!("{s:?}: expected auto, off or static:w0,w1,..."));
                };
                let w = list
                    .split(',')
                    .map(|v| match v.trim().parse::<f64>() {
                        Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
                        _ => Err(format!("{v:?} in {s:?} is not a positive weight")),
                    })
                    .collect::<Result<Vec<f64>, String>>()?;
                Ok(Balance::Static(w))
            }
        }
    }
}

/// Splits `global` samples in proportion to `weights` (largest remainder), every rank getting at
/// least one sample when there are enough. The sum is exactly `global`.
pub fn split(global: usize, weights: &[f64]) -> Vec<usize> {
    let n = weights.len();
    if n == 0 {
        return Vec::new();
    }
    let total: f64 = weights.iter().sum();
    let shares: Vec<f64> = weights
        .iter()
        .map(|w| if total > 0.0 { w / total } else { 1.0 / n as f64 } * global as f64)
        .collect();
    let mut out: Vec<usize> = shares.iter().map(|s| s.floor() as usize).collect();
    let mut left = global - out.iter().sum::<usize>().min(global);
    // Remainders largest first; ties to the lower rank, so every rank computes the same split.
    let mut order: Vec<usize> = (0..n).collect();
    order.sort_by(|&a, &b| {
        let (ra, rb) = (shares[a].fract(), shares[b].fract());
        rb.total_cmp(&ra).then(a.cmp(&b))
    });
    for &r in order.iter().cycle() {
        if left == 0 {
            break;
        }
        out[r] += 1;
        left -= 1;
    }
    // A rank with no sample would still pay for every all-reduce: give it one, from the largest.
    if global >= n {
        while let Some(empty) = out.iter().position(|&b| b == 0) {
            let largest = (0..n).max_by_key(|&r| (out[r], n - r)).expect("n > 0");
            out[largest] -= 1;
            out[empty] += 1;
        }
    }
    out
}

/// The balance and the split to start from for a job's members after a membership change
/// (`members`: their first-epoch ranks, in rank order), given the job's `balance` (static weights
/// are per first-epoch rank) and the split it had (`previous`: the local batch of each of
/// `previous_members`). Static weights keep each member's own weight; `auto` keeps the members'
/// proportions of the split it had (a measured split follows measured speed), a member new to it
/// getting the mean; `off` splits evenly. Returns the split to hand [`Balancer::new`] as resumed.
pub fn for_members(
    balance: &Balance,
    members: &[usize],
    previous: &[usize],
    previous_members: &[usize],
    global: usize,
) -> (Balance, Option<Vec<usize>>) {
    match balance {
        Balance::Static(w) if members.iter().all(|&m| m < w.len()) => (
            Balance::Static(members.iter().map(|&m| w[m]).collect()),
            None,
        ),
        Balance::Auto if previous.len() == previous_members.len() && !previous.is_empty() => {
            let known: Vec<Option<f64>> = members
                .iter()
                .map(|m| {
                    let i = previous_members.iter().position(|p| p == m)?;
                    Some(previous[i].max(1) as f64)
                })
                .collect();
            let found: Vec<f64> = known.iter().flatten().copied().collect();
            if found.is_empty() {
                return (Balance::Auto, None);
            }
            let mean = found.iter().sum::<f64>() / found.len() as f64;
            let weights: Vec<f64> = known.iter().map(|k| k.unwrap_or(mean)).collect();
            (Balance::Auto, Some(split(global, &weights)))
        }
        other => (other.clone(), None),
    }
}

/// Where rank `rank`'s samples start within the step's global window.
pub fn offset(batches: &[usize], rank: usize) -> usize {
    batches[..rank].iter().sum()
}

/// Watches compute time and re-splits the batch when the ranks' compute times differ by more
/// than the threshold. Hysteresis against noise and feedback: the trigger is the *measured*
/// imbalance (slowest rank's moving-average compute time over the mean), not a prediction; after
/// a change the averages restart and nothing changes again for `min_interval` steps; and the new
/// split is proportional to measured speed, so a balanced job stays put.
#[derive(Clone, Debug)]
pub struct Rebalancer {
    /// This rank's moving averages: seconds per sample, seconds of compute per step.
    cost: Option<f64>,
    time: Option<f64>,
    alpha: f64,
    pub threshold: f64,
    pub min_interval: u64,
    last_change: u64,
}

fn ema(old: Option<f64>, x: f64, alpha: f64) -> f64 {
    old.map_or(x, |o| o + alpha * (x - o))
}

impl Rebalancer {
    pub fn new(threshold: f64, min_interval: u64) -> Rebalancer {
        Rebalancer {
            cost: None,
            time: None,
            alpha: 0.2,
            threshold,
            min_interval,
            last_change: 0,
        }
    }

    /// Records one step: `secs` of compute for `samples` samples.
    pub fn observe(&mut self, secs: f64, samples: usize) {
        self.time = Some(ema(self.time, secs, self.alpha));
        if samples > 0 {
            self.cost = Some(ema(self.cost, secs / samples as f64, self.alpha));
        }
    }

    /// This rank's (seconds per sample, seconds per step), 0 before any observation: what every
    /// rank contributes to the all-reduced vectors [`propose`](Rebalancer::propose) reads.
    pub fn averages(&self) -> (f64, f64) {
        (self.cost.unwrap_or(0.0), self.time.unwrap_or(0.0))
    }

    /// Given every rank's averages (identical on all ranks), the split to use from `step` on, if
    /// it should change.
    pub fn propose(
        &mut self,
        step: u64,
        costs: &[f64],
        times: &[f64],
        current: &[usize],
    ) -> Option<Vec<usize>> {
        if step < self.last_change + self.min_interval || costs.iter().any(|&c| c <= 0.0) {
            return None;
        }
        let mean = times.iter().sum::<f64>() / times.len().max(1) as f64;
        let slowest = times.iter().copied().fold(0.0, f64::max);
        if mean <= 0.0 || slowest <= mean * (1.0 + self.threshold) {
            return None;
        }
        // Half-way from the current split to the one measured speed asks for: per-sample cost
        // is measured at the current split and shifts with it (fixed per-step work), so a full
        // jump overshoots and the next measurement would swing it back.
        let speeds: Vec<f64> = costs.iter().map(|c| 1.0 / c).collect();
        let global: usize = current.iter().sum();
        let target = split(global, &speeds);
        let blend: Vec<f64> = current
            .iter()
            .zip(&target)
            .map(|(&c, &t)| (c + t) as f64 / 2.0)
            .collect();
        let proposed = split(global, &blend);
        // And only when the move itself is worth it: near balance, noise in the measured times
        // can cross the threshold while the split it asks for would hardly differ.
        let predict = |b: &[usize]| {
            b.iter()
                .zip(costs)
                .map(|(&n, c)| n as f64 * c)
                .fold(0.0, f64::max)
        };
        if predict(current) <= predict(&proposed) * (1.0 + self.threshold / 2.0) {
            return None;
        }
        self.last_change = step;
        self.cost = None;
        self.time = None;
        Some(proposed)
    }
}

/// The split of one job, kept identical on every rank: the initial split (equal, static weights,
/// or measured speed) and, with `auto`, re-balancing every `every` steps from the ranks' measured
/// compute times. Usable on its own, whatever computes the model.
#[derive(Clone, Debug)]
pub struct Balancer {
    balance: Balance,
    batches: Vec<usize>,
    rebalancer: Rebalancer,
    every: u64,
}

impl Balancer {
    /// Imbalance (slowest rank's compute time over the mean) that triggers a re-split.
    pub const THRESHOLD: f64 = 0.15;

    /// The first split. `resumed` is a checkpoint's split (use [`crate::resume::saved_split`]),
    /// kept unless the balance is static (the flag wins: the user may have changed it).
    /// With `auto` and nothing resumed, `measure(share)` is called on every rank: it times a
    /// few forward + backward passes of `share` samples and returns the median seconds of one;
    /// the speeds are all-reduced, so every rank computes the same split. Collective for `auto`.
    pub fn new(
        comm: &ringlet::Communicator,
        balance: &Balance,
        global: usize,
        every: u64,
        resumed: Option<Vec<usize>>,
        measure: impl FnOnce(usize) -> Result<f64, ringlet::Error>,
    ) -> Result<Balancer, ringlet::Error> {
        let n = comm.world_size();
        let batches = match (balance, resumed) {
            (Balance::Static(w), _) if w.len() != n => {
                return Err(ringlet::Error::InvalidArgument(format!(
                    "--balance static has {} weights for {n} ranks",
                    w.len()
                )))
            }
            (Balance::Static(w), _) => split(global, w),
            (_, Some(b))
                if b.len() == n
                    && b.iter().try_fold(0usize, |a, &x| a.checked_add(x)) == Some(global) =>
            {
                b
            }
            (Balance::Off, _) => split(global, &vec![1.0; n]),
            (Balance::Auto, _) => {
                let share = (global / n).max(1);
                // Agreed before the all-reduce: a rank whose measurement fails must not leave
                // the others waiting in it.
                let secs = crate::agree::agree(
                    comm,
                    measure(share).map_err(|e| e.to_string()),
                    "calibrating the split (--balance auto)",
                )?;
                let mut speeds = vec![0.0f64; n];
                speeds[comm.rank()] = share as f64 / secs.max(1e-9);
                comm.all_reduce(&mut speeds, ringlet::ReduceOp::Sum)?;
                if comm.rank() == 0 {
                    let shown: Vec<String> = speeds.iter().map(|s| format!("{s:.0}")).collect();
                    tracing::info!("calibration: samples/s per rank [{}]", shown.join(", "));
                }
                split(global, &speeds)
            }
        };
        let every = every.max(1);
        Ok(Balancer {
            balance: balance.clone(),
            batches,
            rebalancer: Rebalancer::new(Self::THRESHOLD, every.saturating_mul(2)),
            every,
        })
    }

    /// Every rank's local batch (sums to the global batch).
    pub fn batches(&self) -> &[usize] {
        &self.batches
    }

    /// After step `step` (counted after it is done): records this rank's compute time for its
    /// `samples`; with `auto`, every `every` steps all ranks share their averages (one small
    /// all-reduce: collective on those steps) and the split may change. Returns the new split
    /// when it did.
    pub fn after_step(
        &mut self,
        comm: &ringlet::Communicator,
        step: u64,
        compute_secs: f64,
        samples: usize,
    ) -> Result<Option<Vec<usize>>, ringlet::Error> {
        self.rebalancer.observe(compute_secs, samples);
        if self.balance != Balance::Auto || !step.is_multiple_of(self.every) {
            return Ok(None);
        }
        let n = comm.world_size();
        let mut both = vec![0.0f64; 2 * n];
        (both[comm.rank()], both[n + comm.rank()]) = self.rebalancer.averages();
        comm.all_reduce(&mut both, ringlet::ReduceOp::Sum)?;
        let (costs, times) = both.split_at(n);
        let proposed = self.rebalancer.propose(step, costs, times, &self.batches);
        if let Some(b) = &proposed {
            self.batches = b.clone();
        }
        Ok(proposed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_sum_to_the_global_batch() {
        assert_eq!(split(10, &[1.0, 1.0, 1.0]), vec![4, 3, 3]);
        assert_eq!(split(60, &[1.0, 2.0, 3.0]), vec![10, 20, 30]);
        assert_eq!(split(7, &[1.0, 2.0, 3.0]).iter().sum::<usize>(), 7);
        assert_eq!(split(2, &[1.0, 1.0, 1.0]), vec![1, 1, 0]);
        let s = split(100, &[1.0, 1000.0]);
        assert!(s[0] >= 1 && s.iter().sum::<usize>() == 100, "{s:?}");
        for g in [1, 5, 64, 999] {
            for w in [vec![0.3], vec![1.0, 2.5, 0.1, 7.0]] {
                assert_eq!(split(g, &w).iter().sum::<usize>(), g);
            }
        }
        assert_eq!(offset(&[3, 4, 5], 2), 7);
    }

    #[test]
    fn parses_the_flag() {
        assert_eq!("off".parse::<Balance>().unwrap(), Balance::Off);
        assert_eq!("auto".parse::<Balance>().unwrap(), Balance::Auto);
        assert_eq!(
            "static:1,2.5".parse::<Balance>().unwrap(),
            Balance::Static(vec![1.0, 2.5])
        );
        assert!("static:1,-2".parse::<Balance>().is_err());
        assert!("fast".parse::<Balance>().is_err());
    }

    /// Ranks 1 : 2 : 3 times as fast move half-way to 1 : 2 : 3 of the batch; step times within the
    /// threshold change nothing, and nothing changes within the minimum interval.
    #[test]
    fn rebalances_once_and_holds() {
        let mut r = Rebalancer::new(0.1, 5);
        let equal = vec![20, 20, 20];
        let costs = [3.0, 1.5, 1.0];
        let times = [60.0, 30.0, 20.0];
        assert_eq!(r.propose(2, &costs, &times, &equal), None, "too early");
        let b = r.propose(5, &costs, &times, &equal).expect("imbalanced");
        assert_eq!(b, vec![15, 20, 25], "half-way to 10 : 20 : 30");
        assert_eq!(r.averages(), (0.0, 0.0), "averages restart after a change");
        assert_eq!(
            r.propose(8, &costs, &times, &b),
            None,
            "within the interval"
        );
        // Noisy but balanced step times: no change, whatever the per-sample costs say.
        let noisy = [3.4, 1.45, 1.02];
        assert_eq!(r.propose(20, &noisy, &[32.0, 29.0, 30.6], &b), None);
        r.observe(0.2, 10);
        r.observe(0.4, 10);
        let (cost, time) = r.averages();
        assert!((cost - 0.024).abs() < 1e-12 && (time - 0.24).abs() < 1e-12);
    }

    /// After ranks 1 and 3 of four leave: static weights follow their ranks, `auto` keeps the
    /// survivors' proportions of the measured split, `off` splits evenly.
    #[test]
    fn the_members_left_keep_their_share() {
        let (members, prev, prev_members) = ([0, 2], [10, 20, 30, 40], [0, 1, 2, 3]);
        let weights = Balance::Static(vec![1.0, 2.0, 3.0, 4.0]);
        assert_eq!(
            for_members(&weights, &members, &prev, &prev_members, 100),
            (Balance::Static(vec![1.0, 3.0]), None)
        );
        assert_eq!(
            for_members(&Balance::Auto, &members, &prev, &prev_members, 100),
            (Balance::Auto, Some(vec![25, 75]))
        );
        assert_eq!(
            for_members(&Balance::Off, &members, &prev, &prev_members, 100),
            (Balance::Off, None)
        );
        // A member the split did not know gets the mean share; no split at all: measure again.
        assert_eq!(
            for_members(&Balance::Auto, &[0, 2, 7], &prev, &prev_members, 100),
            (Balance::Auto, Some(vec![17, 50, 33]))
        );
        assert_eq!(
            for_members(&Balance::Auto, &members, &[], &[], 100),
            (Balance::Auto, None)
        );
    }

    /// `auto` splits by the speeds the ranks measured (the same split on every rank); a resumed
    /// split is kept unless the balance is static; a static one with the wrong number of weights
    /// is refused.
    #[test]
    fn the_balancer_splits_by_measured_speed_on_every_rank() {
        let splits = crate::local_world::run(3, |comm| {
            let secs = [0.3, 0.2, 0.1][comm.rank()];
            let auto = Balancer::new(&comm, &Balance::Auto, 60, 10, None, |share| {
                assert_eq!(share, 20);
                Ok(secs)
            })
            .unwrap();
            let resumed = Balancer::new(
                &comm,
                &Balance::Auto,
                60,
                10,
                Some(vec![10, 20, 30]),
                |_| panic!("a resumed split is not measured again"),
            )
            .unwrap();
            let fixed = Balancer::new(
                &comm,
                &Balance::Static(vec![1.0, 1.0, 2.0]),
                60,
                10,
                Some(vec![10, 20, 30]),
                |_| Ok(1.0),
            )
            .unwrap();
            let wrong = Balancer::new(&comm, &Balance::Static(vec![1.0]), 60, 10, None, |_| {
                Ok(1.0)
            });
            assert!(wrong
                .unwrap_err()
                .to_string()
                .contains("1 weights for 3 ranks"));
            (
                auto.batches().to_vec(),
                resumed.batches().to_vec(),
                fixed.batches().to_vec(),
            )
        });
        for s in &splits {
            assert_eq!(s, &(vec![11, 16, 33], vec![10, 20, 30], vec![15, 15, 30]));
        }
    }
}
