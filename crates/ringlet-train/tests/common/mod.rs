//! What the end-to-end tests of ringlet-train share: scratch directories, the resume scenario's
//! flags, and counting committed checkpoints.
#![allow(dead_code)] // each test file uses its own part

use std::path::{Path, PathBuf};

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
