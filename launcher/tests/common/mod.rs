//! Running ringrun as a real process, with every wait bounded: a test that goes wrong fails with
//! what ringrun printed so far instead of hanging the suite, and never leaves ringrun running.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub fn ringrun() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringrun"));
    cmd.env_remove("RINGLET_JOB_TOKEN")
        .env_remove("RINGLET_TIMEOUT")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// `ringrun -n N [flags] -- sh -c SCRIPT`
pub fn ringrun_sh(n: usize, flags: &[&str], script: &str) -> Command {
    let mut cmd = ringrun();
    cmd.arg("-n")
        .arg(n.to_string())
        .args(flags)
        .args(["--", "sh", "-c", script]);
    cmd
}

pub struct Running {
    pub child: Child,
    lines: Receiver<Vec<u8>>,
    /// Every stdout line received so far, raw.
    pub stdout: Vec<Vec<u8>>,
    stderr: Option<JoinHandle<Vec<u8>>>,
    pub started: Instant,
}

pub struct Finished {
    pub status: ExitStatus,
    pub stdout: Vec<Vec<u8>>,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Finished {
    pub fn stdout_lines(&self) -> Vec<String> {
        self.stdout
            .iter()
            .map(|l| String::from_utf8_lossy(l).trim_end_matches('\n').to_owned())
            .collect()
    }

    pub fn code(&self) -> Option<i32> {
        self.status.code()
    }
}

impl std::fmt::Debug for Finished {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "status {:?} after {:?}\n--- stdout\n{}\n--- stderr\n{}",
            self.status,
            self.elapsed,
            self.stdout_lines().join("\n"),
            self.stderr
        )
    }
}

impl Running {
    pub fn start(mut cmd: Command) -> Running {
        let mut child = cmd.spawn().expect("start ringrun");
        let out = child.stdout.take().unwrap();
        let err = child.stderr.take().unwrap();
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            loop {
                let mut line = Vec::new();
                match r.read_until(b'\n', &mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) => {
                        if tx.send(line).is_err() {
                            return;
                        }
                    }
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut buf = Vec::new();
            let _ = BufReader::new(err).read_to_end(&mut buf);
            buf
        });
        Running {
            child,
            lines,
            stdout: Vec::new(),
            stderr: Some(stderr),
            started: Instant::now(),
        }
    }

    pub fn pid(&self) -> libc::pid_t {
        self.child.id() as libc::pid_t
    }

    /// Waits until `count` stdout lines contain `needle`; returns those lines.
    pub fn wait_for_lines(&mut self, needle: &str, count: usize, within: Duration) -> Vec<String> {
        let deadline = Instant::now() + within;
        loop {
            let found: Vec<String> = self
                .stdout
                .iter()
                .map(|l| String::from_utf8_lossy(l).trim_end().to_owned())
                .filter(|l| l.contains(needle))
                .collect();
            if found.len() >= count {
                return found;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.stdout.push(line),
                Err(_) => panic!(
                    "timed out waiting for {count} lines with {needle:?}; stdout so far:\n{}",
                    self.stdout
                        .iter()
                        .map(|l| String::from_utf8_lossy(l).into_owned())
                        .collect::<String>()
                ),
            }
        }
    }

    pub fn signal(&self, sig: libc::c_int) {
        // SAFETY: kill takes plain integers; the pid is our own unreaped child.
        assert_eq!(unsafe { libc::kill(self.pid(), sig) }, 0);
    }

    /// Waits for ringrun to exit; panics (after SIGKILLing it) if it takes longer than `within`.
    pub fn finish(mut self, within: Duration) -> Finished {
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                break status;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                let _ = self.child.wait();
                panic!(
                    "ringrun did not exit within {within:?}; stderr:\n{}",
                    String::from_utf8_lossy(&self.stderr.take().unwrap().join().unwrap())
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let elapsed = self.started.elapsed();
        // ringrun is gone, so its pipes close and both readers end.
        while let Ok(line) = self.lines.recv_timeout(Duration::from_secs(5)) {
            self.stdout.push(line);
        }
        let stderr = self.stderr.take().unwrap().join().unwrap();
        Finished {
            status,
            stdout: std::mem::take(&mut self.stdout),
            stderr: String::from_utf8_lossy(&stderr).into_owned(),
            elapsed,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        // A failed test must not leave ringrun (and through it the ranks) running.
        if self.stderr.is_some() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs to completion within `within`.
pub fn run(cmd: Command, within: Duration) -> Finished {
    Running::start(cmd).finish(within)
}

/// Whether `pid` is a live process. A zombie counts as gone: it runs nothing, and whether it is
/// reaped depends on this machine's init, not on ringrun.
pub fn alive(pid: libc::pid_t) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => false,
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.trim_start().chars().next());
            !matches!(state, Some('Z') | Some('X') | None)
        }
    }
}

/// Waits until none of `pids` is alive; panics naming the survivors after `within`.
pub fn assert_all_gone(pids: &[libc::pid_t], within: Duration) {
    let deadline = Instant::now() + within;
    loop {
        let left: Vec<_> = pids.iter().copied().filter(|&p| alive(p)).collect();
        if left.is_empty() {
            return;
        }
        if Instant::now() >= deadline {
            for &p in &left {
                // SAFETY: kill takes plain integers; cleaning up after a failed assertion.
                unsafe { libc::kill(p, libc::SIGKILL) };
            }
            panic!("processes still alive after {within:?}: {left:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The numbers after `key=` in `lines` (e.g. `[2] pid=1234`).
pub fn values_of(lines: &[String], key: &str) -> Vec<libc::pid_t> {
    lines
        .iter()
        .filter_map(|l| l.split_once(key).map(|(_, v)| v))
        .map(|v| {
            v.split_whitespace()
                .next()
                .unwrap()
                .parse()
                .unwrap_or_else(|_| panic!("bad value in {lines:?}"))
        })
        .collect()
}
