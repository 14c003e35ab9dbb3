//! The alpha–beta cost model of the all-reduce algorithms: a message costs α (latency, per
//! step in sequence) plus β per byte, with one (α, β) for links within a host and one for the
//! network. The terms each algorithm pays — steps in sequence (a step counts as a network step
//! if any rank takes it over the network), the most bytes any rank sends to ranks of its own
//! host, and the most bytes any host sends through its network link — are read off the
//! schedules themselves (every rank's), so the model describes exactly what
//! runs, for any layout of hosts. The terms are summed, as if nothing overlapped: the schedules
//! pipeline by chunk, so where both kinds of link carry much, the model errs high. [`fit`] finds α and β from measured
//! times (`ringlet-model fit`); [`Terms::time`] predicts and projects (`ringlet-model project`).
//!
//! Bytes through a host's network link count every rank of the host: two ranks of one host
//! that each send S to other hosts put 2S through the host's link. Reductions are not a separate
//! term (γ): their cost per byte joins β in the fit.

use crate::algo::{all_reduce_schedule, Algo, HostLayout};
use ringlet_core::ReduceOp;
use std::collections::BTreeMap;

/// One kind of link.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LinkCost {
    /// Seconds per step.
    pub alpha: f64,
    /// Seconds per byte.
    pub beta: f64,
}

/// Links within a host, and between hosts.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Costs {
    pub local: LinkCost,
    pub network: LinkCost,
}

/// What an all-reduce pays: steps in sequence per kind of link, the most bytes a rank sends
/// within its host, and the most bytes a host sends to others.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Terms {
    pub local_steps: f64,
    pub local_bytes: f64,
    pub network_steps: f64,
    pub network_bytes: f64,
}

impl Terms {
    /// Predicted seconds.
    pub fn time(&self, c: &Costs) -> f64 {
        self.local_steps * c.local.alpha
            + self.local_bytes * c.local.beta
            + self.network_steps * c.network.alpha
            + self.network_bytes * c.network.beta
    }

    /// The same terms for a buffer `factor` times as large.
    pub fn scaled(&self, factor: f64) -> Terms {
        Terms {
            local_bytes: self.local_bytes * factor,
            network_bytes: self.network_bytes * factor,
            ..*self
        }
    }

    fn as_row(&self) -> [f64; 4] {
        [
            self.local_steps,
            self.local_bytes,
            self.network_steps,
            self.network_bytes,
        ]
    }
}

/// Elements per rank the terms are read at: bytes then scale linearly to any size.
const UNIT_PER_RANK: usize = 4096;

/// The terms of `algo` for an all-reduce of `bytes` bytes over the ranks of `layout`.
pub fn terms(algo: Algo, bytes: f64, layout: &HostLayout) -> Terms {
    let n = layout.world_size();
    if n < 2 {
        return Terms::default();
    }
    let count = UNIT_PER_RANK * n;
    let mut host_of = vec![0; n];
    for (h, ranks) in layout.hosts().iter().enumerate() {
        for &r in ranks {
            host_of[r] = h;
        }
    }
    let mut host_out = vec![0usize; layout.hosts().len()];
    // Every step of the algorithm, and whether some rank takes it over the network (then the
    // step waits for that).
    let mut steps = BTreeMap::new();
    let mut t = Terms::default();
    for rank in 0..n {
        // Chunks as long as the schedule allows (a few per segment): steps, not chunks, pay α.
        let s = all_reduce_schedule(algo, count, rank, layout, count, ReduceOp::Sum);
        let forwards = s.recvs.iter().flat_map(|r| &r.forwards);
        let mut local_out = 0;
        for x in s.sends.iter().chain(forwards) {
            if host_of[x.peer] == host_of[rank] {
                local_out += x.range.len();
            } else {
                host_out[host_of[rank]] += x.range.len();
            }
        }
        for r in &s.recvs {
            let remote = host_of[r.xfer.peer] != host_of[rank];
            let seen = steps.entry(r.xfer.step).or_insert(false);
            *seen |= remote;
        }
        t.local_bytes = t.local_bytes.max(local_out as f64);
    }
    t.network_steps = steps.values().filter(|&&remote| remote).count() as f64;
    t.local_steps = steps.len() as f64 - t.network_steps;
    let scale = bytes / count as f64;
    t.local_bytes *= scale;
    t.network_bytes = host_out.into_iter().max().unwrap_or(0) as f64 * scale;
    t
}

/// One measured all-reduce.
#[derive(Clone, Copy, Debug)]
pub struct Sample {
    pub terms: Terms,
    /// Seconds.
    pub time: f64,
}

/// The costs that minimise the squared error of the logarithms of the predictions: a factor
/// off counts the same for a microsecond call as for a second-long one, and the same whether
/// the prediction is high or low (a plain relative error favours predicting low). A kind of
/// link no sample uses keeps zero costs; a cost that comes out negative is held at zero.
pub fn fit(samples: &[Sample]) -> Costs {
    let samples: Vec<Sample> = samples
        .iter()
        .copied()
        .filter(|s| s.time > 0.0 && s.time.is_finite())
        .collect();
    let mut free = [true; 4];
    for (k, f) in free.iter_mut().enumerate() {
        *f = samples.iter().any(|s| s.terms.as_row()[k] > 0.0);
    }
    // Start from the least relative squares (linear), then Gauss–Newton on the logarithms.
    let mut x = loop {
        let x = least_squares(&samples, &free, |s| (1.0 / s.time, 1.0));
        match (0..4).find(|&k| free[k] && x[k] < 0.0) {
            Some(k) => free[k] = false,
            None => break x,
        }
    };
    for _ in 0..100 {
        // Linearised at x: log(a·(x + d)) ≈ log(a·x) + a·d / (a·x), so each sample is a row
        // a / (a·x) with target log t − log(a·x).
        let step = least_squares(&samples, &free, |s| {
            let p = predict(&s.terms, &x).max(f64::MIN_POSITIVE);
            (1.0 / p, (s.time / p).ln())
        });
        let mut next = x;
        for k in 0..4 {
            // Halfway to a negative value at most: costs stay positive.
            next[k] = if free[k] {
                (x[k] + step[k]).max(x[k] / 2.0)
            } else {
                0.0
            };
        }
        let moved = (0..4).any(|k| (next[k] - x[k]).abs() > 1e-9 * x[k].abs());
        x = next;
        if !moved {
            break;
        }
    }
    Costs {
        local: LinkCost {
            alpha: x[0],
            beta: x[1],
        },
        network: LinkCost {
            alpha: x[2],
            beta: x[3],
        },
    }
}

fn predict(t: &Terms, x: &[f64; 4]) -> f64 {
    t.as_row().iter().zip(x).map(|(a, b)| a * b).sum()
}

/// Least squares over the `free` unknowns (the others zero), by the normal equations: sample
/// `s` contributes the row `terms · w` with target `y`, where `(w, y) = weigh(s)`.
fn least_squares(
    samples: &[Sample],
    free: &[bool; 4],
    weigh: impl Fn(&Sample) -> (f64, f64),
) -> [f64; 4] {
    let idx: Vec<usize> = (0..4).filter(|&k| free[k]).collect();
    let m = idx.len();
    // Columns scaled to unit size first: steps are ~1..1000, bytes up to 1e9.
    let scale: Vec<f64> = idx
        .iter()
        .map(|&k| {
            samples
                .iter()
                .map(|s| s.terms.as_row()[k] * weigh(s).0)
                .fold(0.0, f64::max)
                .max(f64::MIN_POSITIVE)
        })
        .collect();
    let mut a = vec![vec![0.0; m + 1]; m];
    for s in samples {
        let row = s.terms.as_row();
        let (w, y) = weigh(s);
        let v: Vec<f64> = idx
            .iter()
            .zip(&scale)
            .map(|(&k, sc)| row[k] * w / sc)
            .collect();
        for i in 0..m {
            for j in 0..m {
                a[i][j] += v[i] * v[j];
            }
            a[i][m] += v[i] * y;
        }
    }
    let y = solve(a);
    let mut x = [0.0; 4];
    for (i, &k) in idx.iter().enumerate() {
        x[k] = y[i] / scale[i];
    }
    x
}

/// Gaussian elimination with partial pivoting on an augmented matrix; a singular direction
/// gets zero.
fn solve(mut a: Vec<Vec<f64>>) -> Vec<f64> {
    let m = a.len();
    for c in 0..m {
        let p = (c..m)
            .max_by(|&i, &j| a[i][c].abs().total_cmp(&a[j][c].abs()))
            .expect("rows left");
        a.swap(c, p);
        if a[c][c].abs() < 1e-12 {
            continue;
        }
        let pivot = a[c].clone();
        for (r, row) in a.iter_mut().enumerate() {
            if r != c {
                let f = row[c] / pivot[c];
                for (x, p) in row.iter_mut().zip(&pivot).skip(c) {
                    *x -= f * p;
                }
            }
        }
    }
    (0..m)
        .map(|i| {
            if a[i][i].abs() < 1e-12 {
                0.0
            } else {
                a[i][m] / a[i][i]
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terms_follow_the_textbook_counts() {
        let flat = |n| HostLayout::from_labels(&(0..n).map(|r| r.to_string()).collect::<Vec<_>>());
        let s = 1024.0 * 1024.0;
        // Ring over 8 hosts: 14 steps, 2·7/8 of the buffer out of every host.
        let t = terms(Algo::Ring, s, &flat(8));
        assert_eq!((t.network_steps, t.local_steps), (14.0, 0.0));
        assert!((t.network_bytes - 1.75 * s).abs() < 1.0, "{t:?}");
        // Doubling: 3 steps, the whole buffer each.
        let t = terms(Algo::Doubling, s, &flat(8));
        assert_eq!(t.network_steps, 3.0);
        assert!((t.network_bytes - 3.0 * s).abs() < 1.0, "{t:?}");
        // Halving-doubling: 6 steps, as many bytes as the ring.
        let t = terms(Algo::Halving, s, &flat(8));
        assert_eq!(t.network_steps, 6.0);
        assert!((t.network_bytes - 1.75 * s).abs() < 1.0, "{t:?}");
        // Two-level over 4 hosts of 2: the host's link carries 2·3/4 of the buffer.
        let layout = HostLayout::from_labels(&["a", "a", "b", "b", "c", "c", "d", "d"]);
        let t = terms(Algo::TwoLevel, s, &layout);
        assert_eq!((t.local_steps, t.network_steps), (2.0, 6.0));
        assert!((t.network_bytes - 1.5 * s).abs() < 1.0, "{t:?}");
        assert!((t.local_bytes - s).abs() < 1.0, "{t:?}");
    }

    #[test]
    fn the_fit_recovers_the_costs_it_was_given() {
        let truth = Costs {
            local: LinkCost {
                alpha: 2e-6,
                beta: 1.0 / 4e9,
            },
            network: LinkCost {
                alpha: 30e-6,
                beta: 1.0 / 119e6,
            },
        };
        let layout = HostLayout::from_labels(&["a", "a", "b", "b", "c", "c", "d", "d"]);
        let mut samples = Vec::new();
        for algo in [Algo::Ring, Algo::Doubling, Algo::Halving, Algo::TwoLevel] {
            for e in 2..28 {
                let terms = terms(algo, (1u64 << e) as f64, &layout);
                samples.push(Sample {
                    terms,
                    time: terms.time(&truth),
                });
            }
        }
        let got = fit(&samples);
        for (a, b) in [
            (got.local.alpha, truth.local.alpha),
            (got.local.beta, truth.local.beta),
            (got.network.alpha, truth.network.alpha),
            (got.network.beta, truth.network.beta),
        ] {
            assert!((a - b).abs() <= 1e-6 * b, "{got:?}");
        }
    }
}
