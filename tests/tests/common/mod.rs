//! Starts real rank processes (`ringlet-testrank`) on loopback with the torchrun environment,
//! collects their output, and injects failures from outside. Every wait is bounded; a `Job`
//! SIGKILLs whatever is left when dropped, so a failing test never leaves processes behind.
#![allow(dead_code)]

pub mod netns;
pub mod slurm;

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const TESTRANK: &str = env!("CARGO_BIN_EXE_ringlet-testrank");

/// A loopback port free now, below the kernel's ephemeral range (32768 and up by default):
/// rank 0 binds it a moment later, and a port the kernel hands out for "any port" (every rank's
/// own listener, another test's) could take it in between if it came from that range.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let seed = std::process::id().wrapping_mul(7919);
    for _ in 0..10_000 {
        let k = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (seed.wrapping_add(k.wrapping_mul(104_729)) % 12_000) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port between 20000 and 32000")
}

pub struct Job {
    pub port: u16,
    pub token: String,
    children: Vec<Option<Child>>,
    output: Vec<Arc<Mutex<String>>>,
    statuses: Vec<Option<ExitStatus>>,
}

impl Job {
    /// A job of `n` ranks yet to be started, with its own store port and token.
    pub fn empty(n: usize) -> Job {
        let port = free_port();
        Job {
            port,
            token: format!("test-token-{port}"),
            children: Vec::new(),
            output: Vec::new(),
            statuses: vec![None; n],
        }
    }

    /// Starts `n` ranks of `ringlet-testrank ARGS` with `env` added to the contract.
    pub fn start(n: usize, args: &[&str], env: &[(&str, &str)]) -> Job {
        Job::start_with(n, args, env, |_| Vec::new())
    }

    /// As [`start`](Self::start), with `env_of(rank)` added last: for ranks that disagree.
    pub fn start_with(
        n: usize,
        args: &[&str],
        env: &[(&str, &str)],
        env_of: impl Fn(usize) -> Vec<(&'static str, &'static str)>,
    ) -> Job {
        let mut job = Job::empty(n);
        let (port, token) = (job.port, job.token.clone());
        for rank in 0..n {
            let mut cmd = Command::new(TESTRANK);
            cmd.args(args)
                .env("RANK", rank.to_string())
                .env("WORLD_SIZE", n.to_string())
                .env("LOCAL_RANK", rank.to_string())
                .env("LOCAL_WORLD_SIZE", n.to_string())
                .env("MASTER_ADDR", "127.0.0.1")
                .env("MASTER_PORT", port.to_string())
                .env("RINGLET_JOB_TOKEN", &token)
                .env("RINGLET_TIMEOUT", "60");
            for (k, v) in env.iter().copied().chain(env_of(rank)) {
                cmd.env(k, v);
            }
            job.spawn_rank(cmd);
        }
        job
    }

    /// Starts `n` ranks of `ringlet-testrank ARGS` whose placement comes from `env_of(rank)`
    /// alone (no torchrun variables): for testing the other launchers' conventions.
    pub fn start_custom(
        n: usize,
        args: &[&str],
        env_of: impl Fn(usize) -> Vec<(String, String)>,
    ) -> Job {
        let mut job = Job::empty(n);
        let port = job.port;
        for rank in 0..n {
            let mut cmd = Command::new(TESTRANK);
            cmd.args(args)
                .env_clear()
                .env("PATH", std::env::var("PATH").unwrap_or_default())
                .env("MASTER_PORT", port.to_string())
                .env("RINGLET_JOB_TOKEN", &job.token)
                .env("RINGLET_TIMEOUT", "60")
                .envs(env_of(rank));
            job.spawn_rank(cmd);
        }
        job
    }

    /// Starts one more process from a prepared command (it shares the output bookkeeping).
    pub fn spawn_rank(&mut self, mut cmd: Command) {
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start ringlet-testrank");
        let buf = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stdout.take().expect("piped")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("piped")),
        ] {
            let buf = buf.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    let mut b = buf.lock().unwrap();
                    b.push_str(&line);
                    b.push('\n');
                }
            });
        }
        self.children.push(Some(child));
        self.output.push(buf);
        if self.statuses.len() < self.children.len() {
            self.statuses.push(None);
        }
    }

    pub fn output(&self, rank: usize) -> String {
        self.output[rank].lock().unwrap().clone()
    }

    pub fn pid(&self, rank: usize) -> i32 {
        self.children[rank].as_ref().expect("running").id() as i32
    }

    pub fn signal(&self, rank: usize, sig: i32) {
        // SAFETY: kill(2) on a pid we spawned and have not reaped, so it cannot be reused.
        unsafe { libc::kill(self.pid(rank), sig) };
    }

    /// Waits until rank's output contains `needle`; false at the deadline.
    pub fn wait_for(&self, rank: usize, needle: &str, timeout: Duration) -> bool {
        let end = Instant::now() + timeout;
        while Instant::now() < end {
            if self.output(rank).contains(needle) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// Waits for `ranks` to exit; panics (after killing everything) past `timeout`.
    pub fn wait_ranks(&mut self, ranks: &[usize], timeout: Duration) -> Vec<ExitStatus> {
        let end = Instant::now() + timeout;
        for &r in ranks {
            while self.statuses[r].is_none() {
                let child = self.children[r].as_mut().expect("spawned");
                if let Some(st) = child.try_wait().expect("try_wait") {
                    self.statuses[r] = Some(st);
                    break;
                }
                if Instant::now() > end {
                    let outputs: Vec<String> =
                        (0..self.children.len()).map(|i| self.output(i)).collect();
                    self.kill_all();
                    panic!("rank {r} did not exit within {timeout:?}; outputs: {outputs:#?}");
                }
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        // Give the reader threads a moment to drain the pipes of exited ranks.
        std::thread::sleep(Duration::from_millis(50));
        ranks
            .iter()
            .map(|&r| self.statuses[r].expect("waited"))
            .collect()
    }

    pub fn wait_all(&mut self, timeout: Duration) -> Vec<ExitStatus> {
        let all: Vec<usize> = (0..self.children.len()).collect();
        self.wait_ranks(&all, timeout)
    }

    pub fn kill_all(&mut self) {
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn all_outputs(&self) -> String {
        (0..self.children.len())
            .map(|r| format!("--- rank {r}\n{}", self.output(r)))
            .collect()
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        self.kill_all();
    }
}

/// `ERROR after_ms=T: ...` line of a rank's output, if any.
pub fn error_line(out: &str) -> Option<&str> {
    out.lines().find(|l| l.starts_with("ERROR"))
}

/// Whether `program` runs (`program --version` or `ARGS`). Outside CI a missing tool skips the
/// calling test with a printed reason; in CI (`CI` set) it fails the test: `.ci/run` installs
/// everything the tests need.
pub fn have_tool(program: &str, args: &[&str], install: &str) -> bool {
    let ok = Command::new(program)
        .args(if args.is_empty() {
            &["--version"][..]
        } else {
            args
        })
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none(),
            "{program} is missing in CI ({install}): .ci/run must install it"
        );
        ringlet_core::skipped!("{program} is not available here ({install})");
    }
    ok
}

/// `cmd`'s exit status and its stdout + stderr, killed (SIGKILL to its process group) if it runs
/// past `limit`.
pub fn run_bounded(cmd: &mut Command, limit: Duration) -> (Option<ExitStatus>, String) {
    use std::os::unix::process::CommandExt;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let out = Arc::new(Mutex::new(String::new()));
    let readers: Vec<_> = [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ]
    .into_iter()
    .map(|pipe| {
        let out = Arc::clone(&out);
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(|l| l.ok()) {
                let mut o = out.lock().unwrap();
                o.push_str(&line);
                o.push('\n');
            }
        })
    })
    .collect();
    let status = wait_bounded(&mut child, limit);
    for r in readers {
        let _ = r.join();
    }
    let text = out.lock().unwrap().clone();
    (status, text)
}

/// Waits for `child` (started in its own process group) up to `limit`; past it, kills the
/// whole group (SIGKILL) and returns `None`.
pub fn wait_bounded(child: &mut std::process::Child, limit: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(st) = child.try_wait().expect("wait") {
            return Some(st);
        }
        if Instant::now() > deadline {
            // SAFETY: kill(2) on the process group we created; no memory is involved.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
