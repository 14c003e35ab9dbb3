//! What a rank needs to know to join a job, and reading it from the environment: the launcher's
//! variables (see [`bootstrap`](crate::bootstrap) for torchrun, Open MPI, PMI, Slurm and Volcano),
//! plus Ringlet's own.
//!
//! | variable | meaning | default |
//! |---|---|---|
//! | `RANK`, `WORLD_SIZE` (or a launcher's own) | this process's rank and the number of ranks | required |
//! | `LOCAL_RANK`, `LOCAL_WORLD_SIZE` (or a launcher's own) | rank and rank count on this host | the global ones |
//! | `MASTER_ADDR`, `MASTER_PORT` | where rank 0 serves the rendezvous store | required if more than one rank, unless Slurm or Volcano names the hosts, or `RINGLET_STORE_ADDR` is set; port 29500 |
//! | `RINGLET_STORE_ADDR` | `host:port` of a rendezvous store the launcher serves (`ringrun` does, for the job's life): no rank serves one, and `MASTER_*` are left to the program | rank 0 serves it at `MASTER_ADDR:MASTER_PORT` |
//! | `RINGLET_JOB_TOKEN` | the job's shared secret (set by `ringrun`) | none: a warning, and only job identity is checked |
//! | `RINGLET_TIMEOUT` | seconds: rendezvous deadline, and how long a collective may make no progress | 300 |
//! | `RINGLET_CHUNK_BYTES` | pipeline chunk of the ring (`K`/`M`/`G` suffixes), 4K to 1G | 1M |
//! | `RINGLET_SMALL_BYTES` | all-reduces of at most this many bytes use recursive doubling (⌈log2 n⌉ hops) instead of the ring; 0 to 64M | 64K |
//! | `RINGLET_SHM` | `1`: ranks of one host (same boot, same network and IPC namespaces) talk through shared memory; `0`: TCP between all | 1 |
//! | `RINGLET_ALGO` | force one all-reduce algorithm: `auto`, `ring`, `doubling`, `halving` or `two_level` (see [`algo`](crate::algo)) | auto |
//! | `RINGLET_HOST_ID` | ranks with equal values count as one host for the two-level all-reduce; 1 to 128 bytes, no control characters | the boot id and the network and IPC namespaces (without `/proc`, each rank its own host) |
//! | `RINGLET_NSOCKS` | TCP connections per peer and direction, 1 to 16; bytes are dealt to them in 512 KiB blocks, for links one connection cannot fill | 2 |
//! | `RINGLET_SOCKET_IFNAME` | interfaces for ring traffic: `eth0,ib` (prefixes), `^docker,lo` (all but), `=eth0` (exact) | the one routing to the store |
//! | `RINGLET_BUSY_POLL_US` | poll the sockets (yielding the CPU) this long before sleeping, 0 to 10000 | 50 |
//!
//! A value outside its range is refused with one line naming the variable and the range: a
//! setting that cannot work well is an error, not a slow job.

use crate::algo::AlgoSetting;
use ringlet_core::{Error, JobToken, Result, DEFAULT_TIMEOUT};
use std::collections::HashMap;
use std::time::Duration;

/// How a rank joins a job. Build it with [`Config::new`] or [`Config::from_env`], then adjust
/// fields as needed.
#[derive(Clone, Debug)]
pub struct Config {
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub local_world_size: usize,
    /// `host:port` of the rendezvous store.
    pub store_addr: String,
    /// Whether this process serves the store (rank 0 by default).
    pub serve_store: bool,
    /// `None`: connections prove only that both sides use the same store address (a warning is
    /// logged); anyone who can reach the ports could join.
    pub token: Option<JobToken>,
    pub timeout: Duration,
    pub chunk_bytes: usize,
    pub small_bytes: usize,
    /// `RINGLET_ALGO`.
    pub algo: AlgoSetting,
    /// `RINGLET_SHM`: shared memory between ranks of one host.
    pub shm: bool,
    /// `RINGLET_HOST_ID`: which ranks count as one host for the two-level all-reduce; `None`:
    /// the host key (boot id and namespaces, as for shared memory), or without `/proc` each rank
    /// its own host.
    pub host_id: Option<String>,
    /// `None`: [`DEFAULT_BUSY_POLL`].
    pub busy_poll: Option<Duration>,
    /// `RINGLET_NSOCKS`: TCP connections per peer and direction.
    pub nsocks: usize,
    /// Prefix of this communicator's store keys.
    pub name: String,
    /// Interfaces to use for ring traffic, NCCL syntax (`eth0`, `^docker,lo`, `=eth0`); `None`:
    /// the one that routes to the store.
    pub socket_ifname: Option<String>,
}

pub const DEFAULT_CHUNK_BYTES: usize = 1 << 20;
pub const DEFAULT_SMALL_BYTES: usize = 64 << 10;
pub const DEFAULT_MASTER_PORT: u16 = 29500;
/// Where a launcher that serves the rendezvous store itself says it is (see the module docs).
pub const STORE_ADDR_ENV: &str = "RINGLET_STORE_ADDR";
pub const DEFAULT_BUSY_POLL: Duration = Duration::from_micros(50);
/// Two connections per peer: between network-namespace hosts of this project's machine (veth
/// links, unshaped), 2 ranks' busbw is 1.2–1.9× one connection's from 1 MiB to 256 MiB, and 4
/// are no better than 2; a 1 Gbit/s link is full with either; on loopback (only with
/// `RINGLET_SHM=0`) and for 4-byte latency they are even (the README's measurements).
pub const DEFAULT_NSOCKS: usize = 2;
pub use ringlet_transport::stripe::MAX_STREAMS as MAX_NSOCKS;
/// Chunks are single frames, whose length field is 32 bits.
pub const MAX_FRAME_BYTES: usize = 1 << 30;
/// The smallest chunk: below a page, each frame's header and wake-up dominate (2 ranks on
/// loopback, 1 MiB all-reduce: 0.35 ms with 1M chunks, 1.7 ms with 4K, 30 ms with 64 B, 575 ms
/// with 1 B).
pub const MIN_CHUNK_BYTES: usize = 4 << 10;
/// The largest all-reduce recursive doubling may take: it sends the whole buffer at every one
/// of its ⌈log2 n⌉ hops, so the ring is faster long before this (the default is 64K).
pub const MAX_SMALL_BYTES: usize = 64 << 20;
/// Polling longer than this only burns a core that another rank could use.
pub const MAX_BUSY_POLL: Duration = Duration::from_millis(10);
/// Host ids travel in the rank cards, which are a few hundred bytes.
pub const MAX_HOST_ID: usize = 128;
pub use ringlet_core::MAX_TIMEOUT_SECS;

impl Config {
    pub fn new(rank: usize, world_size: usize, store_addr: impl Into<String>) -> Config {
        Config {
            rank,
            world_size,
            local_rank: rank,
            local_world_size: world_size,
            store_addr: store_addr.into(),
            serve_store: rank == 0,
            token: None,
            timeout: DEFAULT_TIMEOUT,
            chunk_bytes: DEFAULT_CHUNK_BYTES,
            small_bytes: DEFAULT_SMALL_BYTES,
            algo: AlgoSetting::Auto,
            shm: true,
            host_id: None,
            busy_poll: None,
            nsocks: DEFAULT_NSOCKS,
            name: "world".into(),
            socket_ifname: None,
        }
    }

    /// Reads the variables in the table above.
    pub fn from_env() -> Result<Config> {
        Config::from_vars(&std::env::vars().collect())
    }

    /// As [`from_env`](Self::from_env), from the variables in `env`.
    pub fn from_vars(env: &HashMap<String, String>) -> Result<Config> {
        let get = |k: &str| env.get(k).cloned();
        let placement = crate::bootstrap::detect(env)?;
        let (rank, world_size) = (placement.rank, placement.world_size);
        if let Some(addr) = get(STORE_ADDR_ENV).filter(|a| !a.trim().is_empty()) {
            let addr = addr.trim().to_string();
            let ok = addr.rsplit_once(':').is_some_and(|(host, port)| {
                !host.is_empty() && port.parse::<u16>().is_ok_and(|p| p != 0)
            });
            if !ok {
                return Err(Error::Config(format!(
                    "{STORE_ADDR_ENV}={addr:?} is not host:port with a port from 1 to 65535"
                )));
            }
            let mut c = Config::new(rank, world_size, addr);
            c.serve_store = false;
            c.local_rank = placement.local_rank;
            c.local_world_size = placement.local_world_size;
            c.read_settings(env)?;
            return Ok(c);
        }
        let store_host = match placement.store_host {
            Some(a) => a,
            None if world_size == 1 => "127.0.0.1".into(),
            None => {
                return Err(Error::Config(format!(
                    "MASTER_ADDR is not set: set it to the host of rank 0, where the rendezvous store runs \
                     (found {}; ringrun and torchrun set it for you, and Slurm's node list is used when present; \
                     under Kubernetes it is rank 0's pod: `<job>-0.<headless service>` for an Indexed Job)",
                    placement.launcher.name()
                )))
            }
        };
        let port: u16 = optional(&get, "MASTER_PORT")?.unwrap_or(DEFAULT_MASTER_PORT);
        if port == 0 && world_size > 1 {
            // Rank 0 would listen on a port nobody else knows, and the others dial port 0
            // until their deadline.
            return Err(Error::Config(
                "MASTER_PORT=0 is out of range: 1 to 65535 (the port every rank dials to reach \
                 the rendezvous store)"
                    .into(),
            ));
        }
        let mut c = Config::new(rank, world_size, join_host_port(&store_host, port));
        c.local_rank = placement.local_rank;
        c.local_world_size = placement.local_world_size;
        c.read_settings(env)?;
        Ok(c)
    }

    /// Reads Ringlet's own variables (token, timeout, chunk, ...) from `env` into `self`, leaving
    /// placement (rank, sizes, store address) alone.
    pub fn read_settings(&mut self, env: &HashMap<String, String>) -> Result<()> {
        let get = |k: &str| env.get(k).cloned();
        let c = self;
        c.token = get(JobToken::ENV)
            .filter(|s| !s.is_empty())
            .map(JobToken::new);
        if let Some(secs) = optional::<f64>(&get, "RINGLET_TIMEOUT")? {
            if !(secs > 0.0 && secs <= MAX_TIMEOUT_SECS) {
                return Err(Error::Config(format!(
                    "RINGLET_TIMEOUT={secs} must be a positive number of seconds, at most {MAX_TIMEOUT_SECS}"
                )));
            }
            c.timeout = Duration::from_secs_f64(secs);
        }
        if let Some(v) = get("RINGLET_CHUNK_BYTES") {
            c.chunk_bytes = bytes_in("RINGLET_CHUNK_BYTES", &v, MIN_CHUNK_BYTES, MAX_FRAME_BYTES)?;
        }
        if let Some(v) = get("RINGLET_SMALL_BYTES") {
            c.small_bytes = bytes_in("RINGLET_SMALL_BYTES", &v, 0, MAX_SMALL_BYTES)?;
        }
        if let Some(v) = get("RINGLET_SHM") {
            c.shm = match v.trim() {
                "1" | "" => true,
                "0" => false,
                _ => {
                    return Err(Error::Config(format!(
                        "RINGLET_SHM={v:?} is out of range: 0 or 1"
                    )))
                }
            };
        }
        if let Some(v) = get("RINGLET_ALGO") {
            c.algo = AlgoSetting::parse(&v)?;
        }
        c.host_id = get("RINGLET_HOST_ID").filter(|s| !s.is_empty());
        if let Some(v) = get("RINGLET_NSOCKS") {
            c.nsocks = v
                .trim()
                .parse()
                .ok()
                .filter(|n| (1..=MAX_NSOCKS).contains(n))
                .ok_or_else(|| {
                    Error::Config(format!(
                        "RINGLET_NSOCKS={v:?} is out of range: 1 to {MAX_NSOCKS}"
                    ))
                })?;
        }
        c.check_ranges()?;
        c.socket_ifname = get("RINGLET_SOCKET_IFNAME").filter(|s| !s.trim().is_empty());
        if let Some(us) = optional::<u64>(&get, "RINGLET_BUSY_POLL_US")? {
            let max = MAX_BUSY_POLL.as_micros();
            if u128::from(us) > max {
                return Err(Error::Config(format!(
                    "RINGLET_BUSY_POLL_US={us} is out of range: 0 to {max} microseconds"
                )));
            }
            c.busy_poll = Some(Duration::from_micros(us));
        }
        Ok(())
    }

    /// Whether every setting is in its range (a `Config` built in code is checked as the
    /// variables are): the first one that is not, named with its range.
    pub fn check_ranges(&self) -> Result<()> {
        let out = |what: &str, value: String, range: String| {
            Err(Error::Config(format!(
                "{what} {value} is out of range: {range}"
            )))
        };
        if !(MIN_CHUNK_BYTES..=MAX_FRAME_BYTES).contains(&self.chunk_bytes) {
            return out(
                "chunk_bytes (RINGLET_CHUNK_BYTES)",
                self.chunk_bytes.to_string(),
                format!(
                    "{} to {} bytes",
                    show_bytes(MIN_CHUNK_BYTES),
                    show_bytes(MAX_FRAME_BYTES)
                ),
            );
        }
        if self.small_bytes > MAX_SMALL_BYTES {
            return out(
                "small_bytes (RINGLET_SMALL_BYTES)",
                self.small_bytes.to_string(),
                format!("0 to {} bytes", show_bytes(MAX_SMALL_BYTES)),
            );
        }
        if self.timeout.is_zero() || self.timeout.as_secs_f64() > MAX_TIMEOUT_SECS {
            return out(
                "timeout (RINGLET_TIMEOUT)",
                format!("{:?}", self.timeout),
                format!("more than 0, at most {MAX_TIMEOUT_SECS} seconds"),
            );
        }
        if let Some(id) = &self.host_id {
            if id.is_empty() || id.len() > MAX_HOST_ID || id.chars().any(|c| c.is_control()) {
                return out(
                    "host_id (RINGLET_HOST_ID)",
                    format!("{id:?}"),
                    format!("1 to {MAX_HOST_ID} bytes, no control characters"),
                );
            }
        }
        if !(1..=MAX_NSOCKS).contains(&self.nsocks) {
            return out(
                "nsocks (RINGLET_NSOCKS)",
                self.nsocks.to_string(),
                format!("1 to {MAX_NSOCKS}"),
            );
        }
        if self.busy_poll.is_some_and(|b| b > MAX_BUSY_POLL) {
            return out(
                "busy_poll (RINGLET_BUSY_POLL_US)",
                format!("{:?}", self.busy_poll.unwrap_or_default()),
                format!("0 to {} microseconds", MAX_BUSY_POLL.as_micros()),
            );
        }
        Ok(())
    }

    /// Polling the sockets for a while before sleeping saves the wake-up of a blocking poll
    /// (tens of µs on a VM). The poll loop yields the CPU between polls: on loopback the kernel
    /// finishes delivering packets in work that needs a CPU, and ranks spinning without yielding
    /// on every core starved it (2 ranks on 2 cores, 200 µs spin: 210 µs per 4-byte all-reduce;
    /// yielding: 6 µs; not polling: 8–30 µs; 4 ranks on 2 cores: 60 µs against 160–300 µs).
    pub fn effective_busy_poll(&self) -> Duration {
        self.busy_poll.unwrap_or(DEFAULT_BUSY_POLL)
    }
}

fn bad(var: &str, value: &str) -> Error {
    Error::Config(format!("{var}={value:?} is not valid"))
}

/// `value` of `var` as bytes (`64K`, `1M`), within `min..=max`, or one line naming both.
fn bytes_in(var: &str, value: &str, min: usize, max: usize) -> Result<usize> {
    parse_bytes(value)
        .filter(|b| (min..=max).contains(b))
        .ok_or_else(|| {
            Error::Config(format!(
                "{var}={value:?} is out of range: {} to {} bytes (K, M, G suffixes)",
                show_bytes(min),
                show_bytes(max)
            ))
        })
}

/// `4K`, `64M`, `1G`, or the plain number.
fn show_bytes(b: usize) -> String {
    for (unit, size) in [("G", 1usize << 30), ("M", 1 << 20), ("K", 1 << 10)] {
        if b >= size && b.is_multiple_of(size) {
            return format!("{}{unit}", b / size);
        }
    }
    b.to_string()
}

fn optional<T: std::str::FromStr>(
    get: &impl Fn(&str) -> Option<String>,
    var: &str,
) -> Result<Option<T>> {
    match get(var).filter(|s| !s.trim().is_empty()) {
        None => Ok(None),
        Some(v) => v.trim().parse().map(Some).map_err(|_| bad(var, &v)),
    }
}

/// `host:port`, with brackets around an IPv6 literal.
pub fn join_host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// `1048576`, `64K`, `1M`, `2G` (powers of two).
pub fn parse_bytes(s: &str) -> Option<usize> {
    let s = s.trim();
    let (digits, mult) = match s.char_indices().last()? {
        (i, 'K' | 'k') => (&s[..i], 1usize << 10),
        (i, 'M' | 'm') => (&s[..i], 1 << 20),
        (i, 'G' | 'g') => (&s[..i], 1 << 30),
        _ => (s, 1),
    };
    digits.parse::<usize>().ok()?.checked_mul(mult)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(vars: &[(&str, &str)]) -> Result<Config> {
        Config::from_vars(
            &vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn torchrun_contract_is_read() {
        let c = cfg(&[
            ("RANK", "3"),
            ("WORLD_SIZE", "4"),
            ("LOCAL_RANK", "1"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("MASTER_ADDR", "10.1.2.3"),
            ("MASTER_PORT", "1234"),
            ("RINGLET_TIMEOUT", "2.5"),
            ("RINGLET_CHUNK_BYTES", "256K"),
        ])
        .unwrap();
        assert_eq!(
            (c.rank, c.world_size, c.local_rank, c.local_world_size),
            (3, 4, 1, 2)
        );
        assert_eq!(c.store_addr, "10.1.2.3:1234");
        assert!(!c.serve_store);
        assert_eq!(c.timeout, Duration::from_millis(2500));
        assert_eq!(c.chunk_bytes, 256 << 10);
    }

    #[test]
    fn missing_or_bad_variables_say_which() {
        let e = cfg(&[("WORLD_SIZE", "2")]).unwrap_err().to_string();
        assert!(e.contains("set RANK and WORLD_SIZE"), "{e}");
        let e = cfg(&[("RANK", "0"), ("WORLD_SIZE", "2")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("MASTER_ADDR"), "{e}");
        let e = cfg(&[("RANK", "2"), ("WORLD_SIZE", "2"), ("MASTER_ADDR", "h")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("below world size"), "{e}");
        let e = cfg(&[("RANK", "x"), ("WORLD_SIZE", "2")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("RANK=\"x\""), "{e}");
        let e = cfg(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "1"),
            ("RINGLET_TIMEOUT", "-1"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("RINGLET_TIMEOUT"), "{e}");
        for secs in ["0", "-0.5", "NaN", "inf"] {
            let e = cfg(&[
                ("RANK", "0"),
                ("WORLD_SIZE", "1"),
                ("RINGLET_TIMEOUT", secs),
            ])
            .unwrap_err()
            .to_string();
            assert!(
                e.contains("RINGLET_TIMEOUT") && e.contains("positive"),
                "{e}"
            );
        }
        let e = cfg(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "2"),
            ("MASTER_ADDR", "h"),
            ("MASTER_PORT", "0"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("MASTER_PORT=0") && e.contains("1 to 65535"),
            "{e}"
        );
    }

    #[test]
    fn a_store_served_by_the_launcher_is_used_by_every_rank() {
        let c = cfg(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "3"),
            ("RINGLET_STORE_ADDR", "127.0.0.1:4100"),
        ])
        .unwrap();
        assert_eq!(c.store_addr, "127.0.0.1:4100");
        assert!(!c.serve_store, "rank 0 must not serve a second store");
        for bad in ["127.0.0.1", "127.0.0.1:0", ":4100", "h:99999"] {
            let e = cfg(&[
                ("RANK", "1"),
                ("WORLD_SIZE", "3"),
                ("RINGLET_STORE_ADDR", bad),
            ])
            .unwrap_err()
            .to_string();
            assert!(e.contains("RINGLET_STORE_ADDR"), "{e}");
        }
    }

    const LONG_ID: &str = "hhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhhh";

    #[test]
    fn tuning_settings_out_of_range_are_refused_naming_the_range() {
        assert_eq!(LONG_ID.len(), MAX_HOST_ID + 1);
        let with = |k: &'static str, v: &'static str| {
            cfg(&[("RANK", "0"), ("WORLD_SIZE", "1"), (k, v)])
                .err()
                .map(|e| e.to_string())
        };
        for (k, v, range) in [
            ("RINGLET_CHUNK_BYTES", "1", "4K to 1G bytes"),
            ("RINGLET_CHUNK_BYTES", "4095", "4K to 1G bytes"),
            ("RINGLET_CHUNK_BYTES", "2G", "4K to 1G bytes"),
            (
                "RINGLET_CHUNK_BYTES",
                "99999999999999999999",
                "4K to 1G bytes",
            ),
            ("RINGLET_SMALL_BYTES", "65M", "0 to 64M bytes"),
            ("RINGLET_BUSY_POLL_US", "10001", "0 to 10000 microseconds"),
            (
                "RINGLET_HOST_ID",
                LONG_ID,
                "1 to 128 bytes, no control characters",
            ),
            (
                "RINGLET_HOST_ID",
                "rack\n1",
                "1 to 128 bytes, no control characters",
            ),
            (
                "RINGLET_ALGO",
                "tree",
                "auto, ring, doubling, halving or two_level",
            ),
            ("RINGLET_NSOCKS", "0", "1 to 16"),
            ("RINGLET_NSOCKS", "17", "1 to 16"),
            ("RINGLET_NSOCKS", "-1", "1 to 16"),
            ("RINGLET_NSOCKS", "99999999999999999999999", "1 to 16"),
        ] {
            let e = with(k, v).unwrap_or_else(|| panic!("{k}={v} was accepted"));
            assert!(
                e.contains(k) && e.contains(range) && !e.contains('\n'),
                "{k}={v}: {e}"
            );
        }
        for (k, v) in [
            ("RINGLET_CHUNK_BYTES", "4K"),
            ("RINGLET_CHUNK_BYTES", "1G"),
            ("RINGLET_SMALL_BYTES", "0"),
            ("RINGLET_SMALL_BYTES", "64M"),
            ("RINGLET_BUSY_POLL_US", "0"),
            ("RINGLET_BUSY_POLL_US", "10000"),
            ("RINGLET_HOST_ID", "rack 1/node 7"),
            ("RINGLET_NSOCKS", "1"),
            ("RINGLET_NSOCKS", "16"),
        ] {
            assert_eq!(with(k, v), None, "{k}={v}");
        }
        // A Config built in code is held to the same ranges.
        let mut c = Config::new(0, 1, "127.0.0.1:1");
        assert!(c.check_ranges().is_ok());
        c.chunk_bytes = 64;
        let e = c.check_ranges().unwrap_err().to_string();
        assert!(e.contains("chunk_bytes") && e.contains("4K to 1G"), "{e}");
        c.chunk_bytes = DEFAULT_CHUNK_BYTES;
        c.nsocks = 0;
        let e = c.check_ranges().unwrap_err().to_string();
        assert!(e.contains("RINGLET_NSOCKS") && e.contains("1 to 16"), "{e}");
        c.nsocks = DEFAULT_NSOCKS;
        c.busy_poll = Some(Duration::from_secs(1));
        assert!(c
            .check_ranges()
            .unwrap_err()
            .to_string()
            .contains("busy_poll"));
    }

    #[test]
    fn byte_sizes_and_ipv6_hosts() {
        assert_eq!(parse_bytes("64K"), Some(65536));
        assert_eq!(parse_bytes("3"), Some(3));
        assert_eq!(parse_bytes("1G"), Some(1 << 30));
        assert_eq!(parse_bytes("x"), None);
        assert_eq!(join_host_port("::1", 5), "[::1]:5");
    }
}
