//! Collective agreement on one rank's failure, and the launcher's restart count.

use ringlet::{Communicator, Error};

/// Every rank learns whether `what` failed anywhere, so that a failure on one rank (a checkpoint
/// write on rank 0, a file only one rank cannot open) fails all of them at once, naming the
/// ranks, instead of leaving the others waiting for it at their deadline. Collective. Hands
/// back this rank's value when every rank succeeded.
pub fn agree<T>(comm: &Communicator, result: Result<T, String>, what: &str) -> Result<T, Error> {
    let mut flags = vec![0u8; comm.world_size()];
    comm.all_gather(&[u8::from(result.is_err())], &mut flags)?;
    let value = result.map_err(|why| Error::Config(format!("{what}: {why}")))?;
    let bad: Vec<String> = (0..flags.len())
        .filter(|&r| flags[r] != 0)
        .map(|r| r.to_string())
        .collect();
    if bad.is_empty() {
        Ok(value)
    } else {
        Err(Error::Config(format!(
            "{what} failed on rank {}",
            bad.join(", ")
        )))
    }
}

/// [`agree`] for a program's start-up: on a replacement's communicator
/// ([`Communicator::is_replacement`]) the members are long past their start-up and do not call
/// it, so there the result is this rank's alone.
pub fn at_start<T>(comm: &Communicator, result: Result<T, String>, what: &str) -> Result<T, Error> {
    match comm.is_replacement() {
        true => result.map_err(|why| Error::Config(format!("{what}: {why}"))),
        false => agree(comm, result, what),
    }
}

/// The environment variable `ringrun --max-restarts` sets to the restart's number.
pub const RESTART_ENV: &str = "RINGLET_RESTART";

/// How many times the launcher restarted this job (0 on the first attempt, and when no
/// launcher says): a restarted job resumes from its newest checkpoint, and says so.
pub fn restart_count() -> u32 {
    std::env::var(RESTART_ENV)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A failure on rank 1 alone fails all three ranks, each naming rank 1.
    #[test]
    fn one_ranks_failure_fails_every_rank_naming_it() {
        let results = crate::local_world::run(3, |comm| {
            let mine = if comm.rank() == 1 {
                Err("disk full".to_string())
            } else {
                Ok(comm.rank())
            };
            agree(&comm, mine, "saving a checkpoint").map_err(|e| e.to_string())
        });
        assert_eq!(
            results[1].as_ref().unwrap_err(),
            "configuration: saving a checkpoint: disk full"
        );
        for r in [0, 2] {
            let e = results[r].as_ref().unwrap_err();
            assert_eq!(e, "configuration: saving a checkpoint failed on rank 1");
        }
        let ok =
            crate::local_world::run(2, |comm| agree(&comm, Ok(comm.rank() * 10), "x").unwrap());
        assert_eq!(ok, vec![0, 10]);
    }
}
