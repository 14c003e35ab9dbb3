//! Hosts of their own for ranks: network namespaces joined by a bridge, made and removed by
//! `scripts/netns-hosts.sh` (the same script the benchmarks use). Removed on drop, so a failing
//! test leaves no namespace, link or firewall rule behind.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

pub fn script() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/netns-hosts.sh")
}

/// Whether this process may make namespace hosts (root, `ip netns`). Outside CI a missing
/// ability skips the calling test with the reason; in CI it fails the test.
pub fn available() -> bool {
    // SAFETY: geteuid has no preconditions and touches no memory.
    let root = unsafe { libc::geteuid() } == 0;
    let netns = Command::new("ip")
        .args(["netns", "list"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let why = match (root, netns) {
        (true, true) => return true,
        (false, _) => "not root: namespace hosts need CAP_NET_ADMIN",
        (true, false) => "`ip netns` does not work (apt-get install iproute2)",
    };
    assert!(
        std::env::var_os("CI").is_none(),
        "namespace tests cannot run in CI: {why}"
    );
    ringlet_core::skipped!("{why}");
    false
}

pub struct NetHosts {
    pub name: String,
    /// `198.18.N.`: host i is `{subnet}{i + 1}`.
    pub subnet: String,
    pub count: usize,
}

impl NetHosts {
    /// `count` hosts, each link shaped to `rate` (tc tbf syntax, e.g. `1gbit`) if given.
    pub fn up(count: usize, rate: Option<&str>) -> NetHosts {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let hosts = NetHosts {
            name: format!("rt{}x{seq}", pid % 10000),
            subnet: format!("198.18.{}.", 100 + (pid as usize * 7 + seq) % 150),
            count,
        };
        let mut cmd = Command::new(script());
        cmd.args(["up", &hosts.name, &count.to_string(), &hosts.subnet]);
        cmd.args(rate);
        let out = cmd.output().expect("run netns-hosts.sh");
        assert!(
            out.status.success(),
            "netns-hosts.sh up failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        hosts
    }

    pub fn ip(&self, host: usize) -> String {
        format!("{}{}", self.subnet, host + 1)
    }

    pub fn namespace(&self, host: usize) -> String {
        format!("{}h{host}", self.name)
    }

    /// `program` to be run on `host`.
    pub fn command(&self, host: usize, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.namespace(host)])
            .arg(program);
        cmd
    }

    fn script(&self, verb: &str, host: usize) {
        let ok = Command::new(script())
            .args([verb, &self.name, &host.to_string()])
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "netns-hosts.sh {verb} {} {host} failed", self.name);
    }

    /// Takes `host`'s link down: its packets go nowhere, and no reset tells anyone.
    pub fn cut(&self, host: usize) {
        self.script("cut", host);
    }
}

impl Drop for NetHosts {
    fn drop(&mut self) {
        let _ = Command::new(script()).args(["down", &self.name]).status();
    }
}
