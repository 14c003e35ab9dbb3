//! `ringlet-model` end to end: fitted to the JSON of real `ringlet-bench` runs (4 ranks on
//! loopback, every algorithm forced), and projected to 1,024 ranks.

use ringlet_core::JobToken;
use ringlet_store::StoreServer;
use std::process::{Command, Output, Stdio};

const BENCH: &str = env!("CARGO_BIN_EXE_ringlet-bench");
const MODEL: &str = env!("CARGO_BIN_EXE_ringlet-model");

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// 4 ranks of `ringlet-bench all_reduce` with `algo` forced, 4 B to 1 MiB, rows to `json`.
fn bench_json(algo: &str, json: &std::path::Path) {
    // Held by the test, as ringrun holds one: a port the kernel picked, which no other test
    // can take between choosing and binding.
    let store =
        StoreServer::bind("127.0.0.1:0".parse().unwrap(), JobToken::new("model-test")).unwrap();
    let addr = store.local_addr().to_string();
    let children: Vec<_> = (0..4)
        .map(|r| {
            Command::new(BENCH)
                .args(["-b", "4", "-e", "1M", "-f", "16", "-n", "5", "-w", "1"])
                .args(["--json", json.to_str().unwrap()])
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", "4")
                .env("RINGLET_STORE_ADDR", &addr)
                .env("RINGLET_JOB_TOKEN", "model-test")
                .env("RINGLET_TIMEOUT", "30")
                .env("RINGLET_ALGO", algo)
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("start ringlet-bench")
        })
        .collect();
    for c in children {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success(), "{algo}: {}", text(&out));
    }
}

#[test]
fn the_model_fits_real_runs_and_prints_every_row() {
    let dir = std::env::temp_dir().join(format!("ringlet-model-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut files = Vec::new();
    for algo in ["ring", "doubling", "halving"] {
        let json = dir.join(format!("{algo}.json"));
        bench_json(algo, &json);
        files.push(json);
    }
    let out = Command::new(MODEL)
        .arg("fit")
        .args(&files)
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    // 5 sizes × 3 algorithms, each with its measured and predicted time.
    let rows: Vec<Vec<&str>> = t
        .lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(rows.len(), 15, "{t}");
    for algo in ["ring", "doubling", "halving"] {
        assert_eq!(rows.iter().filter(|r| r[2] == algo).count(), 5, "{t}");
    }
    for r in &rows {
        let predicted: f64 = r[5].parse().unwrap();
        assert!(predicted > 0.0, "{t}");
    }
    // One host: the rings are links within it.
    let alpha = t
        .lines()
        .find(|l| l.starts_with("# within a host: alpha"))
        .unwrap_or_else(|| panic!("{t}"));
    assert!(!alpha.contains("unused"), "{t}");
    assert!(t.contains("rows within 15%"), "{t}");
}

#[test]
fn the_projection_shows_every_algorithm_and_the_choice() {
    let out = Command::new(MODEL)
        .args(["project", "-n", "1024", "--alpha-us", "20", "--gbit", "25"])
        .output()
        .unwrap();
    let t = text(&out);
    assert!(out.status.success(), "{t}");
    let rows: Vec<&str> = t.lines().filter(|l| l.starts_with("| ")).collect();
    // Header, then 4 B, 64 B, ... 1 GiB.
    assert_eq!(rows.len(), 9, "{t}");
    assert!(
        rows[0].contains("doubling") && rows[0].contains("halving"),
        "{t}"
    );
    assert!(
        rows[1].starts_with("| 4 B |") && rows[1].ends_with("| doubling | doubling |"),
        "{t}"
    );
    // At 1,024 ranks the ring's 2046 steps of 20 us cost 41 ms, whatever the size.
    assert!(rows[1].contains("40.92 ms"), "{t}");
    let bad = Command::new(MODEL)
        .args(["project", "-n", "1000", "--per-host", "3"])
        .output()
        .unwrap();
    assert!(!bad.status.success());
    assert!(
        text(&bad).contains("--per-host dividing -n"),
        "{}",
        text(&bad)
    );
}
