//! One build, both CUDA majors: `ringlet-gpu-check --compile-only` finds NVRTC and cuBLAS by the
//! search a user's machine runs (here: a Python environment named by `VIRTUAL_ENV`, with the
//! home directory emptied so no other site directory is seen) and compiles every kernel for
//! every architecture that NVRTC knows.
//!
//! - CUDA 12: the Python environment of `python3` (pip's `nvidia-cuda-nvrtc-cu12`,
//!   `nvidia-cuda-runtime-cu12`, `nvidia-cublas-cu12`: the `nvidia/<package>/lib` layout);
//! - CUDA 13: `$RINGLET_CU13_PREFIX` (default `/opt/ringlet-ci/cu13`), where `.ci/run` installs
//!   `nvidia-cuda-nvrtc`, `nvidia-cuda-runtime` and `nvidia-cublas` 13 (the `nvidia/cu13/lib`
//!   layout).
//!
//! Without them each test prints a SKIPPED line, except in CI (`CI` set), where it fails.

use std::path::{Path, PathBuf};
use std::process::Command;

fn skip_or_fail(why: String) {
    assert!(
        std::env::var_os("CI").is_none(),
        "{why} (.ci/run installs it)"
    );
    ringlet_core::skipped!("{why}");
}

/// `ringlet-gpu-check --compile-only` in a Python environment at `prefix` and nothing else.
fn compile_only(prefix: &Path) -> (bool, String) {
    let home = std::env::temp_dir().join(format!("ringlet-empty-home-{}", std::process::id()));
    std::fs::create_dir_all(&home).unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ringlet-gpu-check"));
    cmd.arg("--compile-only")
        .env("HOME", &home)
        .env("VIRTUAL_ENV", prefix)
        .env("RINGLET_CACHE_DIR", home.join("cache"));
    for var in [
        "LD_LIBRARY_PATH",
        "CUDA_HOME",
        "CUDA_PATH",
        "CONDA_PREFIX",
        "PYTHONPATH",
        "RINGLET_NVRTC_LIB",
        "RINGLET_CUBLAS_LIB",
        "RINGLET_CUBLASLT_LIB",
        "RINGLET_CUDA_INCLUDE",
    ] {
        cmd.env_remove(var);
    }
    let out = cmd.output().expect("ringlet-gpu-check runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    println!("{text}");
    (out.status.success(), text)
}

/// The line starting with `what` ("NVRTC ", "cuBLAS ").
fn line<'a>(text: &'a str, what: &str) -> &'a str {
    text.lines()
        .find(|l| l.starts_with(what))
        .unwrap_or_else(|| panic!("no {what:?} line in:\n{text}"))
}

fn check(prefix: &Path, major: u32, layout: &str) {
    let (ok, text) = compile_only(prefix);
    assert!(ok, "{text}");
    let nvrtc = line(&text, "NVRTC ");
    assert!(
        nvrtc.starts_with(&format!("NVRTC {major}."))
            && nvrtc.contains(&prefix.display().to_string())
            && nvrtc.contains(&format!("{layout}/libnvrtc.so.{major}")),
        "{nvrtc}"
    );
    let cublas = line(&text, "cuBLAS ");
    assert!(
        cublas.starts_with(&format!("cuBLAS {major}."))
            && cublas.contains(&format!("libcublas.so.{major}")),
        "{cublas}"
    );
    // Every architecture of kernels::ARCHS that this NVRTC knows was compiled (sm_70 only with
    // CUDA 12), each for all three sources, and the PTX fallback for a newer device works.
    let compiled = text
        .lines()
        .filter(|l| l.starts_with("sm_") && l.contains(".cu "))
        .count();
    let archs = if major >= 13 { 7 } else { 8 };
    assert_eq!(compiled, archs * 3, "{text}");
    assert!(text.contains("PTX for every source"), "{text}");
    assert!(
        text.contains("ringlet-gpu-check: every kernel compiles"),
        "{text}"
    );
}

fn python_prefix() -> Option<PathBuf> {
    let out = Command::new("python3")
        .args(["-c", "import sys; print(sys.prefix)"])
        .output()
        .ok()?;
    out.status
        .success()
        .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

fn has_wheels(prefix: &Path, sub: &str) -> bool {
    std::fs::read_dir(prefix.join("lib"))
        .into_iter()
        .flatten()
        .flatten()
        .any(|py| py.path().join("site-packages").join(sub).is_dir())
}

#[test]
fn cuda_12_wheels_compile_every_kernel() {
    match python_prefix() {
        Some(p) if has_wheels(&p, "nvidia/cuda_nvrtc/lib") => {
            check(&p, 12, "nvidia/cuda_nvrtc/lib")
        }
        _ => skip_or_fail(
            "no CUDA 12 wheels (nvidia-cuda-nvrtc-cu12) in python3's environment".into(),
        ),
    }
}

#[test]
fn cuda_13_wheels_compile_every_kernel() {
    let prefix = std::env::var_os("RINGLET_CU13_PREFIX")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/opt/ringlet-ci/cu13"));
    if has_wheels(&prefix, "nvidia/cu13/lib") {
        check(&prefix, 13, "nvidia/cu13/lib");
    } else {
        skip_or_fail(format!(
            "no CUDA 13 wheels (nvidia-cuda-nvrtc 13) under {}",
            prefix.display()
        ));
    }
}
