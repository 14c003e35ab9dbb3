//! What every rank of one job must agree on, independent of how the ranks are started: the
//! [`JobSpec`], the environment contract it turns into per rank ([`JobSpec::rank_env`]), and the
//! [`Outcome`] of a run with the exit status it maps to. A backend (today only
//! [`local`](crate::local)) takes a `JobSpec` and returns an `Outcome`.

use ringlet_core::JobToken;
use std::ffi::OsString;
use std::net::{Ipv4Addr, TcpListener};
use std::time::Duration;

/// CPU binding of local ranks (`--bind-to`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum BindTo {
    /// When there are at least as many CPUs as ranks, each rank gets its own equal block of
    /// them (CPUs / N, contiguous); otherwise no binding.
    Auto,
    /// Rank i on the i-th allowed CPU (wrapping round when there are more ranks than CPUs).
    Core,
    /// Leave placement to the scheduler.
    None,
}

/// One job, fully decided: nothing in here is left for a rank to pick on its own.
#[derive(Debug)]
pub struct JobSpec {
    pub world_size: usize,
    pub master_addr: String,
    pub master_port: u16,
    /// `host:port` of the rendezvous store ringrun serves for this attempt (local ranks), given
    /// to the ranks as `RINGLET_STORE_ADDR` so that no rank serves one; `None`: rank 0 serves it
    /// at `MASTER_ADDR:MASTER_PORT` (containers).
    pub store_addr: Option<String>,
    pub token: JobToken,
    /// Seconds, already formatted for `RINGLET_TIMEOUT`; `None` leaves the variable as inherited.
    pub timeout: Option<String>,
    /// How long a rank may take to stop after being asked before it is SIGKILLed.
    pub kill_grace: Duration,
    /// Whether local ranks are pinned to CPUs.
    pub bind_to: BindTo,
    /// As the user wrote it; each backend resolves it in its own world (PATH here, an image later).
    pub program: OsString,
    pub args: Vec<OsString>,
    /// How many times the job has been restarted after a failure (`--max-restarts`).
    pub restart: u32,
    /// `--min-ranks`: a failed rank does not stop the others while this many still run.
    pub min_ranks: Option<usize>,
    /// With `--min-ranks`: replacements ringrun may still start for failed ranks (what is left
    /// of `--max-restarts`); each joins the running job at a step boundary.
    pub replacements: u32,
}

impl JobSpec {
    /// The variables that make a process rank `rank` of this job (the torchrun contract plus
    /// Ringlet's own). Everything else the rank inherits from ringrun's environment.
    pub fn rank_env(&self, rank: usize) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("RANK", rank.to_string()),
            ("WORLD_SIZE", self.world_size.to_string()),
            // Single node: every rank is local, so the local view equals the global one.
            ("LOCAL_RANK", rank.to_string()),
            ("LOCAL_WORLD_SIZE", self.world_size.to_string()),
            ("MASTER_ADDR", self.master_addr.clone()),
            ("MASTER_PORT", self.master_port.to_string()),
            (JobToken::ENV, self.token.to_env_value()),
            (RESTART_ENV, self.restart.to_string()),
        ];
        if let Some(t) = &self.timeout {
            env.push(("RINGLET_TIMEOUT", t.clone()));
        }
        if let Some(a) = &self.store_addr {
            env.push(("RINGLET_STORE_ADDR", a.clone()));
        }
        // The ranks go on without a lost one (`ringlet_ddp::membership`) only when told to.
        if let Some(k) = self.min_ranks {
            env.push(("RINGLET_MIN_RANKS", k.to_string()));
            env.push(("RINGLET_REPLACEMENTS", self.replacements.to_string()));
        }
        env
    }
}

/// Set to 1 for a process that replaces a failed rank in the running job (`--min-ranks` with
/// `--max-restarts`); ringlet's `Communicator::from_env` then joins at a step boundary.
pub const REPLACEMENT_ENV: &str = "RINGLET_REPLACEMENT";

/// How many times the job was restarted before this attempt (0 the first time), so a program can
/// tell a fresh start from a recovery.
pub const RESTART_ENV: &str = "RINGLET_RESTART";

/// The token the job runs under: the caller's, so ranks started elsewhere by hand can join, or a
/// fresh random one so that nothing outside this job can talk to its ports.
pub fn job_token() -> JobToken {
    JobToken::from_env().unwrap_or_else(JobToken::generate)
}

/// The newest member list the survivors of a failure agreed on (`--min-ranks`), if one newer
/// than epoch `after` is in `store`: (epoch, first-epoch ranks). The store keeps the newest
/// epoch's list (the one before is dropped as it forms).
pub fn newest_members(store: &ringlet_store::StoreServer, after: u64) -> Option<(u64, Vec<usize>)> {
    let mut newest = None;
    for epoch in after + 1..=after + 8 {
        if let Some(raw) = store.get(&ringlet_store::epoch_members_key("world", epoch)) {
            newest = Some((epoch, raw));
        }
    }
    let (epoch, raw) = newest?;
    let members = std::str::from_utf8(&raw).ok().and_then(|t| {
        t.split(',')
            .map(|r| r.parse::<usize>().ok())
            .collect::<Option<Vec<_>>>()
    })?;
    Some((epoch, members))
}

/// A port that was free a moment ago. Rank 0 binds it later, so another process can still take it
/// in between; the window is small and an explicit `--master-port` avoids it entirely.
pub fn free_port() -> std::io::Result<u16> {
    let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(listener.local_addr()?.port())
}

/// How one attempt at the job ended, and why when a rank failed on its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ended {
    pub outcome: Outcome,
    /// E.g. "rank 2 (pid 123) was killed by SIGKILL".
    pub cause: Option<String>,
    /// Replacements started for failed ranks during the attempt (`--min-ranks`).
    pub replaced: u32,
}

impl Ended {
    pub fn new(outcome: Outcome) -> Ended {
        Ended {
            outcome,
            cause: None,
            replaced: 0,
        }
    }
}

/// How a run ended, as far as ringrun's exit status is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Every rank exited 0.
    Success,
    /// A rank exited non-zero or was killed by a signal; the others were stopped.
    RankFailed,
    /// ringrun received this signal and stopped the ranks.
    Signalled(libc::c_int),
    /// The program could not be found or started; no rank is left running.
    LaunchFailed,
    /// ringrun itself could not do its part (already reported); no rank is left running.
    Error,
    /// The command line is invalid (already reported).
    Usage,
}

impl Outcome {
    pub fn exit_status(self) -> u8 {
        match self {
            Outcome::Success => 0,
            Outcome::RankFailed => 1,
            // Like a shell reports a child killed by a signal, so scripts see the same number
            // whether they ran the program directly or under ringrun.
            Outcome::Signalled(sig) => u8::try_from(128 + sig).unwrap_or(255),
            Outcome::LaunchFailed => 127,
            Outcome::Error => 1,
            Outcome::Usage => 2,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> JobSpec {
        JobSpec {
            world_size: 3,
            master_addr: "10.0.0.1".into(),
            master_port: 29500,
            store_addr: None,
            token: JobToken::new("secret"),
            timeout: Some("2.5".into()),
            kill_grace: Duration::from_secs(5),
            bind_to: BindTo::Auto,
            program: "prog".into(),
            args: vec![],
            restart: 1,
            min_ranks: None,
            replacements: 0,
        }
    }

    #[test]
    fn rank_env_follows_the_torchrun_contract() {
        let env = spec().rank_env(2);
        let get = |k: &str| env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("RANK"), Some("2"));
        assert_eq!(get("WORLD_SIZE"), Some("3"));
        assert_eq!(get("LOCAL_RANK"), Some("2"));
        assert_eq!(get("LOCAL_WORLD_SIZE"), Some("3"));
        assert_eq!(get("MASTER_ADDR"), Some("10.0.0.1"));
        assert_eq!(get("MASTER_PORT"), Some("29500"));
        assert_eq!(get("RINGLET_JOB_TOKEN"), Some("secret"));
        assert_eq!(get("RINGLET_TIMEOUT"), Some("2.5"));
        assert_eq!(get("RINGLET_RESTART"), Some("1"));
        assert_eq!(get("RINGLET_MIN_RANKS"), None);
        let mut s = spec();
        s.min_ranks = Some(2);
        let env = s.rank_env(0);
        assert!(env.contains(&("RINGLET_MIN_RANKS", "2".to_string())));
    }

    #[test]
    fn no_timeout_means_no_variable() {
        let mut s = spec();
        s.timeout = None;
        assert!(s.rank_env(0).iter().all(|(k, _)| *k != "RINGLET_TIMEOUT"));
    }

    #[test]
    fn exit_statuses() {
        assert_eq!(Outcome::Success.exit_status(), 0);
        assert_eq!(Outcome::RankFailed.exit_status(), 1);
        assert_eq!(Outcome::Signalled(libc::SIGINT).exit_status(), 130);
        assert_eq!(Outcome::Signalled(libc::SIGTERM).exit_status(), 143);
        assert_eq!(Outcome::LaunchFailed.exit_status(), 127);
    }

    #[test]
    fn free_port_is_nonzero() {
        assert_ne!(free_port().unwrap(), 0);
    }
}
