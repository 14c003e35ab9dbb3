//! What the end-to-end tests of ringlet-train share: scratch directories, the resume scenario's
//! flags, and counting committed checkpoints.
#![allow(dead_code)] // each test file uses its own part

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub const TRAIN: &str = env!("CARGO_BIN_EXE_ringlet-train");

/// A scratch directory, made empty and removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        let p = std::env::temp_dir().join(format!("ringlet-train-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Scratch(p)
    }
    pub fn join(&self, s: &str) -> PathBuf {
        self.0.join(s)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn args(list: &[&str]) -> Vec<String> {
    list.iter().map(|s| s.to_string()).collect()
}

/// The run the resume and restart tests interrupt: 2 ranks (split 2:1), 200 steps, a checkpoint
/// every 10, long enough per step to be killed mid-way.
pub const INTERRUPTED_RUN: [&str; 14] = [
    "--dataset",
    "synthetic:20000",
    "--steps",
    "200",
    "--global-batch",
    "96",
    "--hidden",
    "512,512",
    "--balance",
    "static:2,1",
    "--seed",
    "9",
    "--checkpoint-every",
    "10",
];

/// Checkpoints committed (manifest written) under `dir`.
pub fn committed(dir: &Path) -> usize {
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.path().join("manifest.json").exists())
                .count()
        })
        .unwrap_or(0)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The ranks of one job, their output in files; killed if still running when dropped.
pub struct Job {
    children: Vec<Child>,
    logs: Vec<PathBuf>,
    /// The job's rendezvous store, held here as ringrun holds one (a port the kernel picked,
    /// which no other test can take between choosing and binding).
    _store: ringlet_store::StoreServer,
}

impl Job {
    pub fn start(n: usize, args: &[String], dir: &Path, tag: &str) -> Job {
        Job::start_env(n, args, dir, tag, |_| Vec::new())
    }

    /// As [`start`](Job::start), rank `r` with the extra environment variables `env(r)`.
    pub fn start_env(
        n: usize,
        args: &[String],
        dir: &Path,
        tag: &str,
        env: impl Fn(usize) -> Vec<(&'static str, String)>,
    ) -> Job {
        let store = ringlet_store::StoreServer::bind(
            "127.0.0.1:0".parse().unwrap(),
            ringlet_core::JobToken::new(format!("train-test-{tag}-{}", std::process::id())),
        )
        .unwrap();
        let addr = store.local_addr().to_string();
        let mut children = Vec::new();
        let mut logs = Vec::new();
        for r in 0..n {
            let log = dir.join(format!("{tag}-rank{r}.log"));
            let f = std::fs::File::create(&log).unwrap();
            let c = Command::new(TRAIN)
                .args(args)
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", n.to_string())
                .env("LOCAL_RANK", r.to_string())
                .env("LOCAL_WORLD_SIZE", n.to_string())
                .env("RINGLET_STORE_ADDR", &addr)
                .env(
                    "RINGLET_JOB_TOKEN",
                    format!("train-test-{tag}-{}", std::process::id()),
                )
                .env("RINGLET_TIMEOUT", "30")
                // The tolerances below are those of the CPU's GEMM; a GPU machine would
                // otherwise pick its own (scripts/gpu-check.sh compares the two).
                .env("RINGLET_DEVICE", "cpu")
                .envs(env(r))
                .stdout(f.try_clone().unwrap())
                .stderr(f)
                .stdin(Stdio::null())
                .spawn()
                .expect("start ringlet-train");
            children.push(c);
            logs.push(log);
        }
        Job {
            children,
            logs,
            _store: store,
        }
    }

    /// Waits (bounded) for every rank; panics with the logs if one fails or time runs out.
    pub fn finish(mut self) -> Vec<String> {
        let deadline = Instant::now() + Duration::from_secs(240);
        for c in &mut self.children {
            loop {
                match c.try_wait().unwrap() {
                    Some(s) => {
                        assert!(s.success(), "a rank failed:\n{}", self.output());
                        break;
                    }
                    None if Instant::now() > deadline => {
                        panic!("ringlet-train did not finish in time:\n{}", self.output())
                    }
                    None => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        self.logs
            .iter()
            .map(|l| std::fs::read_to_string(l).unwrap_or_default())
            .collect()
    }

    /// Waits (bounded) for every rank; each one's exit code and the logs.
    pub fn codes(mut self, limit: Duration) -> (Vec<Option<i32>>, Vec<String>) {
        let deadline = Instant::now() + limit;
        let mut codes = Vec::new();
        for c in &mut self.children {
            loop {
                if let Some(s) = c.try_wait().unwrap() {
                    codes.push(s.code());
                    break;
                }
                assert!(Instant::now() < deadline, "ranks did not end in time");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let logs = self
            .logs
            .iter()
            .map(|l| std::fs::read_to_string(l).unwrap_or_default())
            .collect();
        (codes, logs)
    }

    pub fn output(&self) -> String {
        self.logs
            .iter()
            .map(|l| std::fs::read_to_string(l).unwrap_or_default())
            .collect::<Vec<_>>()
            .join("\n---\n")
    }

    pub fn kill(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Job {
    fn drop(&mut self) {
        self.kill();
    }
}

pub fn params(path: &Path) -> Vec<f32> {
    std::fs::read(path)
        .unwrap()
        .chunks(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect()
}

/// The largest difference of two parameter vectors, relative to the largest magnitude in `a`.
pub fn max_relative_difference(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len());
    let scale = a.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
    a.iter()
        .zip(b)
        .map(|(x, y)| (*x as f64 - *y as f64).abs() / scale)
        .fold(0.0, f64::max)
}
