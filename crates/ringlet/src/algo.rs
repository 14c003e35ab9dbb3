//! Which algorithm runs an all-reduce: a pure function of the call (element count and size), the
//! world size and the settings every rank agreed at join, so every rank picks the same one.
//!
//! | algorithm | hops | bytes sent per rank | chosen for |
//! |---|---|---|---|
//! | `doubling` (recursive doubling) | ⌈log2 n⌉ (+2 on the ranks folded in when n is not a power of two) | the buffer, each hop | buffers of at most `RINGLET_SMALL_BYTES` |
//! | `ring` (pipelined ring) | 2(n − 1) | 2(n − 1)/n of the buffer | larger buffers |
//!
//! `RINGLET_ALGO` forces one for every all-reduce (benchmarks, comparisons); both keep the
//! guarantee that every rank ends with the same bits.

use crate::schedule::{self, Schedule};
use ringlet_core::{Error, ReduceOp, Result};

/// `RINGLET_ALGO`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AlgoSetting {
    /// By size: see the module's table.
    #[default]
    Auto,
    Ring,
    Doubling,
}

/// An all-reduce algorithm.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Algo {
    Ring,
    Doubling,
}

impl Algo {
    pub fn name(self) -> &'static str {
        match self {
            Algo::Ring => "ring",
            Algo::Doubling => "doubling",
        }
    }
}

impl AlgoSetting {
    pub const CHOICES: &'static str = "auto, ring or doubling";

    pub fn parse(value: &str) -> Result<AlgoSetting> {
        match value.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Ok(AlgoSetting::Auto),
            "ring" => Ok(AlgoSetting::Ring),
            "doubling" | "rd" => Ok(AlgoSetting::Doubling),
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
        }
    }

    /// The algorithm for an all-reduce of `bytes` bytes over `n` ranks.
    pub fn choose(self, bytes: usize, n: usize, small_bytes: usize) -> Algo {
        match self {
            AlgoSetting::Ring => Algo::Ring,
            AlgoSetting::Doubling => Algo::Doubling,
            AlgoSetting::Auto if bytes <= small_bytes || n == 1 => Algo::Doubling,
            AlgoSetting::Auto => Algo::Ring,
        }
    }
}

/// The schedule of `algo` for rank `rank` of `n`: an all-reduce of `count` elements, cut into
/// chunks of at most `chunk` elements.
pub fn all_reduce_schedule(
    algo: Algo,
    count: usize,
    rank: usize,
    n: usize,
    chunk: usize,
    op: ReduceOp,
) -> Schedule {
    match algo {
        Algo::Ring => schedule::ring_all_reduce(count, rank, n, chunk, op),
        Algo::Doubling => schedule::doubling_all_reduce(count, rank, n, chunk, op),
    }
}
