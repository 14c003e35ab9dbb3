//! Which algorithm runs an all-reduce: a pure function of the call (its size in bytes), the
//! world size, the host layout and the settings every rank agreed at join (all exchanged in
//! the rank cards), so every rank picks the same one.
//!
//! With `n` ranks, `p` the largest power of two not above `n`, `H` hosts of `L` ranks each:
//!
//! | algorithm | exchanges | bytes sent per rank | chosen for |
//! |---|---|---|---|
//! | `doubling` (recursive doubling) | ⌈log2 n⌉ (+2 where n is not a power of two) | the buffer, each exchange | buffers of at most `RINGLET_SMALL_BYTES` |
//! | `halving` (Rabenseifner: recursive halving, then doubling) | 2·log2 p (+2) | 2(p − 1)/p of the buffer | larger buffers when n is a power of two: up to [`MEDIUM_BYTES`] for 4 and 8 ranks, any size from 16 |
//! | `two_level` (ring within hosts, L rings between hosts) | 2(L − 1) + 2(H − 1) | 2(L − 1)/L of the buffer within the host, 2(H − 1)/(HL) between hosts | larger buffers when at least two hosts hold L ≥ 2 ranks each (above [`MEDIUM_BYTES`] only, if more than [`MANY_HOSTS`] hosts and n is a power of two) |
//! | `ring` (pipelined ring) | 2(n − 1) | 2(n − 1)/n of the buffer | everything else |
//!
//! `RINGLET_ALGO` forces one for every all-reduce (benchmarks, comparisons); `two_level` on a
//! layout it cannot use (one host, one rank per host, hosts of unequal size) runs the ring. All
//! keep the guarantee that every rank ends with the same bits.

use crate::schedule::{self, Schedule};
use ringlet_core::{Error, ReduceOp, Result};
use std::collections::HashMap;

/// Above this many bytes the ring beats halving-doubling on up to 8 ranks. Measured on one host
/// (4 ranks, shared memory and TCP loopback, 2 cores): halving took 0.3–0.6× the ring's time
/// from 64 KiB to 1 MiB, was level with it at 4 MiB over TCP and 1.1× slower from 16 MiB. From
/// 16 ranks halving runs at every size above small: both send the same bytes, and the ring's
/// 2(n − 1) steps cost more than halving's 2·log2 n (see `ringlet-model project`).
pub const MEDIUM_BYTES: usize = 2 << 20;

/// Above this many hosts the two-level all-reduce's 2(H − 1) steps between hosts cost more than
/// halving-doubling's 2·log2 n up to [`MEDIUM_BYTES`]: with α = 20 µs, 25 Gbit/s and 8 ranks per
/// host, `ringlet-model project` gives at 1,024 ranks (128 hosts) and 256 KiB 5.3 ms against
/// halving's 1.6 ms, and two-level ahead from 4 MiB; at 128 ranks (16 hosts) two-level is ahead
/// from 256 KiB (0.8 ms against 1.4).
pub const MANY_HOSTS: usize = 16;

/// Which ranks share a host: hosts in the order of their lowest rank, each host's ranks
/// ascending (the position in that list is the rank's local index).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostLayout {
    hosts: Vec<Vec<usize>>,
    // Both derived from `hosts` once: the all-reduce's choice asks for them on every call.
    world_size: usize,
    two_level: bool,
}

impl HostLayout {
    /// From every rank's host label (`labels[rank]`): equal labels, one host.
    pub fn from_labels<S: AsRef<str>>(labels: &[S]) -> HostLayout {
        let mut index: HashMap<&str, usize> = HashMap::new();
        let mut hosts: Vec<Vec<usize>> = Vec::new();
        for (rank, label) in labels.iter().enumerate() {
            let h = *index.entry(label.as_ref()).or_insert_with(|| {
                hosts.push(Vec::new());
                hosts.len() - 1
            });
            hosts[h].push(rank);
        }
        HostLayout::of(hosts)
    }

    /// `n` ranks on one host.
    pub fn single_host(n: usize) -> HostLayout {
        HostLayout::of(vec![(0..n).collect()])
    }

    fn of(hosts: Vec<Vec<usize>>) -> HostLayout {
        let l = hosts.first().map_or(0, Vec::len);
        HostLayout {
            world_size: hosts.iter().map(Vec::len).sum(),
            two_level: hosts.len() >= 2 && l >= 2 && hosts.iter().all(|h| h.len() == l),
            hosts,
        }
    }

    pub fn hosts(&self) -> &[Vec<usize>] {
        &self.hosts
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// At least two hosts holding the same number of ranks, at least two each: the layouts the
    /// two-level all-reduce runs on.
    pub fn two_level(&self) -> bool {
        self.two_level
    }
}

/// `RINGLET_ALGO`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AlgoSetting {
    /// By size: see the module's table.
    #[default]
    Auto,
    Ring,
    Doubling,
    Halving,
    TwoLevel,
}

/// An all-reduce algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algo {
    Ring,
    Doubling,
    Halving,
    TwoLevel,
}

impl Algo {
    pub fn name(self) -> &'static str {
        match self {
            Algo::Ring => "ring",
            Algo::Doubling => "doubling",
            Algo::Halving => "halving",
            Algo::TwoLevel => "two_level",
        }
    }
}

impl AlgoSetting {
    pub const CHOICES: &'static str = "auto, ring, doubling, halving or two_level";

    pub fn parse(value: &str) -> Result<AlgoSetting> {
        match value.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(AlgoSetting::Auto),
            "ring" => Ok(AlgoSetting::Ring),
            "doubling" | "rd" => Ok(AlgoSetting::Doubling),
            "halving" | "rabenseifner" => Ok(AlgoSetting::Halving),
            "two_level" | "two-level" | "hierarchical" => Ok(AlgoSetting::TwoLevel),
            _ => Err(Error::Config(format!(
                "RINGLET_ALGO={value:?} is out of range: {}",
                AlgoSetting::CHOICES
            ))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            AlgoSetting::Auto => "auto",
            AlgoSetting::Ring => "ring",
            AlgoSetting::Doubling => "doubling",
            AlgoSetting::Halving => "halving",
            AlgoSetting::TwoLevel => "two_level",
        }
    }

    /// The algorithm for an all-reduce of `bytes` bytes over the ranks of `layout`.
    pub fn choose(self, bytes: usize, layout: &HostLayout, small_bytes: usize) -> Algo {
        let n = layout.world_size();
        match self {
            AlgoSetting::Ring => Algo::Ring,
            AlgoSetting::Doubling => Algo::Doubling,
            AlgoSetting::Halving => Algo::Halving,
            AlgoSetting::TwoLevel if layout.two_level() => Algo::TwoLevel,
            AlgoSetting::TwoLevel => Algo::Ring,
            AlgoSetting::Auto if bytes <= small_bytes || n == 1 => Algo::Doubling,
            // Its rings between hosts take 2(H − 1) steps: with many hosts and a power-of-two
            // world, halving's 2·log2 n steps win up to a few MiB (`ringlet-model project`).
            AlgoSetting::Auto
                if layout.two_level()
                    && (layout.hosts().len() <= MANY_HOSTS
                        || bytes > MEDIUM_BYTES
                        || !n.is_power_of_two()) =>
            {
                Algo::TwoLevel
            }
            AlgoSetting::Auto
                if n >= 4 && n.is_power_of_two() && (bytes <= MEDIUM_BYTES || n >= 16) =>
            {
                Algo::Halving
            }
            AlgoSetting::Auto => Algo::Ring,
        }
    }
}

/// The schedule of `algo` for rank `rank` of the ranks in `layout`: an all-reduce of `count`
/// elements, cut into chunks of at most `chunk` elements.
pub fn all_reduce_schedule(
    algo: Algo,
    count: usize,
    rank: usize,
    layout: &HostLayout,
    chunk: usize,
    op: ReduceOp,
) -> Schedule {
    let n = layout.world_size();
    match algo {
        Algo::Ring => schedule::ring_all_reduce(count, rank, n, chunk, op),
        Algo::Doubling => schedule::doubling_all_reduce(count, rank, n, chunk, op),
        Algo::Halving => schedule::halving_all_reduce(count, rank, n, chunk, op),
        Algo::TwoLevel if layout.two_level() => {
            schedule::two_level_all_reduce(count, rank, layout.hosts(), chunk, op)
        }
        Algo::TwoLevel => schedule::ring_all_reduce(count, rank, n, chunk, op),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_grouped_by_label_in_rank_order() {
        let layout = HostLayout::from_labels(&["b", "a", "b", "a", "c", "c"]);
        assert_eq!(layout.hosts(), &[vec![0, 2], vec![1, 3], vec![4, 5]]);
        assert!(layout.two_level());
        assert!(!HostLayout::from_labels(&["a", "a", "b"]).two_level());
        assert!(!HostLayout::from_labels(&["a", "b", "c"]).two_level());
        assert!(!HostLayout::single_host(4).two_level());
    }

    #[test]
    fn auto_picks_by_size_world_and_layout() {
        let one = HostLayout::single_host(4);
        let two = HostLayout::from_labels(&["a", "a", "b", "b"]);
        let small = 64 << 10;
        let auto = AlgoSetting::Auto;
        assert_eq!(auto.choose(4, &two, small), Algo::Doubling);
        assert_eq!(auto.choose(1 << 20, &one, small), Algo::Halving);
        assert_eq!(auto.choose(64 << 20, &one, small), Algo::Ring);
        let many = HostLayout::from_labels(&(0..16).map(|r| r.to_string()).collect::<Vec<_>>());
        assert_eq!(auto.choose(64 << 20, &many, small), Algo::Halving);
        assert_eq!(auto.choose(1 << 20, &two, small), Algo::TwoLevel);
        let labels: Vec<String> = (0..256).map(|r| (r / 8).to_string()).collect();
        let many_hosts = HostLayout::from_labels(&labels);
        assert_eq!(auto.choose(256 << 10, &many_hosts, small), Algo::Halving);
        assert_eq!(auto.choose(64 << 20, &many_hosts, small), Algo::TwoLevel);
        let three = HostLayout::single_host(3);
        assert_eq!(auto.choose(1 << 20, &three, small), Algo::Ring);
        assert_eq!(
            AlgoSetting::TwoLevel.choose(1 << 20, &one, small),
            Algo::Ring
        );
        assert_eq!(
            AlgoSetting::parse("two-level").unwrap(),
            AlgoSetting::TwoLevel
        );
        assert!(AlgoSetting::parse("tree").is_err());
    }
}
