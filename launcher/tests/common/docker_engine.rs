//! The local Docker engine for the container tests (`docker.rs`, `k8s.rs`): the docker CLI,
//! whether an engine answers (skipped visibly, never in CI), and the test image built once per
//! test binary from our own binaries by `ringrun image build`.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

pub const RINGRUN: &str = env!("CARGO_BIN_EXE_ringrun");
pub const IMAGE: &str = "ringlet-ci:test";

pub fn docker(args: &[&str]) -> Output {
    Command::new("docker")
        .args(args)
        .output()
        .expect("run the docker CLI")
}

/// Whether an engine answers; in CI its absence fails the test instead.
pub fn engine() -> bool {
    let up = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !up {
        assert!(
            std::env::var_os("CI").is_none_or(|v| v.is_empty() || v == "false"),
            "CI: no Docker engine answers (docker info failed)"
        );
        ringlet_core::skipped!("no Docker engine answers here");
    }
    up
}

/// A binary built by the same `cargo test --workspace` next to ringrun.
pub fn sibling(name: &str) -> PathBuf {
    let p = Path::new(RINGRUN).with_file_name(name);
    assert!(
        p.exists(),
        "{} is missing: build the workspace (cargo test --workspace --release)",
        p.display()
    );
    p
}

/// Builds the test image once per test binary.
pub fn image() -> &'static str {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        let out = Command::new(RINGRUN)
            .args(["image", "build", "--tag", IMAGE])
            .arg(sibling("ringlet-train"))
            .arg(sibling("ringlet-bench"))
            .output()
            .unwrap();
        assert!(out.status.success(), "image build: {}", text(&out));
    });
    IMAGE
}

pub fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}
