//! `ringlet-bench` end to end: real rank processes on loopback, the table, the JSON file, and
//! the exit status when an element is wrong.

use ringlet_core::JobToken;
use ringlet_store::StoreServer;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

const BENCH: &str = env!("CARGO_BIN_EXE_ringlet-bench");

/// A rendezvous store held by the test, as ringrun holds one: bound to a port the kernel picks,
/// so no other test can take it between choosing and binding.
fn store(token: &str) -> StoreServer {
    StoreServer::bind("127.0.0.1:0".parse().unwrap(), JobToken::new(token)).unwrap()
}

/// Runs `n` ranks of ringlet-bench with `args`; returns each rank's output.
fn bench(n: usize, args: &[&str], env: &[(&str, &str)]) -> Vec<Output> {
    let store = store("bench-test");
    let addr = store.local_addr().to_string();
    let children: Vec<_> = (0..n)
        .map(|r| {
            let mut c = Command::new(BENCH);
            c.args(args)
                .env("RANK", r.to_string())
                .env("WORLD_SIZE", n.to_string())
                .env("RINGLET_STORE_ADDR", &addr)
                .env("RINGLET_JOB_TOKEN", "bench-test")
                .env("RINGLET_TIMEOUT", "30")
                .stdout(Stdio::piped())
                .stderr(Stdio::piped());
            for (k, v) in env {
                c.env(k, v);
            }
            c.spawn().expect("start ringlet-bench")
        })
        .collect();
    let start = Instant::now();
    let outs: Vec<Output> = children
        .into_iter()
        .map(|c| c.wait_with_output().expect("wait"))
        .collect();
    assert!(
        start.elapsed() < Duration::from_secs(120),
        "bench took too long"
    );
    outs
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn rows(out: &str) -> Vec<Vec<String>> {
    out.lines()
        .filter(|l| l.trim_start().starts_with(|c: char| c.is_ascii_digit()))
        .map(|l| l.split_whitespace().map(String::from).collect())
        .collect()
}

#[test]
fn every_collective_prints_checked_rows_and_json() {
    for coll in ["all_reduce", "broadcast", "all_gather", "reduce_scatter"] {
        let dir =
            std::env::temp_dir().join(format!("ringlet-bench-test-{}-{coll}", std::process::id()));
        let json = dir.with_extension("json");
        let outs = bench(
            3,
            &[
                coll,
                "-b",
                "8",
                "-e",
                "1M",
                "-f",
                "4",
                "-n",
                "3",
                "-w",
                "1",
                "-c",
                "1",
                "--json",
                json.to_str().unwrap(),
            ],
            &[],
        );
        for (r, o) in outs.iter().enumerate() {
            assert!(o.status.success(), "{coll} rank {r}: {}", text(o));
        }
        let out = text(&outs[0]);
        let table = rows(&out);
        // 8 B .. 1 MiB by 4: 8, 32, 128, 512, 2K, 8K, 32K, 128K, 512K (sizes too small for a
        // per-rank block of all_gather/reduce_scatter are skipped).
        assert!(table.len() >= 7, "{coll}: {out}");
        for row in &table {
            assert_eq!(row.len(), 10, "{coll} row {row:?}");
            assert_eq!(row[8], "0", "{coll} #wrong in {row:?}");
            // The all-reduce algorithm that ran; other collectives have one algorithm.
            let algo = &row[9];
            if coll == "all_reduce" {
                assert!(algo == "ring" || algo == "doubling", "{row:?}");
            } else {
                assert_eq!(algo, "-", "{row:?}");
            }
            let busbw: f64 = row[7].parse().unwrap();
            assert!(busbw >= 0.0);
        }
        assert!(out.contains("# Avg bus bandwidth"), "{out}");
        let doc: serde_json::Value =
            serde_json::from_slice(&std::fs::read(&json).unwrap()).unwrap();
        let jrows = doc["rows"].as_array().unwrap();
        assert_eq!(jrows.len(), table.len());
        for key in [
            "size_bytes",
            "count",
            "dtype",
            "op",
            "time_us",
            "algbw_gbps",
            "busbw_gbps",
            "wrong",
        ] {
            assert!(
                jrows[0].get(key).is_some(),
                "json lacks {key}: {}",
                jrows[0]
            );
        }
        assert!(jrows.iter().all(|r| r["time_us"].as_f64().unwrap() > 0.0));
        let _ = std::fs::remove_file(json);
    }
}

#[test]
fn every_dtype_and_op_checks_clean() {
    for d in [
        "float", "double", "half", "bfloat16", "int32", "int64", "uint8",
    ] {
        for o in ["sum", "prod", "min", "max", "avg"] {
            let outs = bench(
                2,
                &[
                    "all_reduce",
                    "-b",
                    "4",
                    "-e",
                    "256K",
                    "-f",
                    "8",
                    "-n",
                    "1",
                    "-w",
                    "0",
                    "-d",
                    d,
                    "-o",
                    o,
                ],
                &[],
            );
            for o2 in &outs {
                assert!(o2.status.success(), "{d} {o}: {}", text(o2));
            }
        }
    }
}

#[test]
fn a_wrong_element_is_counted_and_fails_the_run() {
    let outs = bench(
        2,
        &["all_reduce", "-b", "1K", "-e", "4K", "-n", "1"],
        &[("RINGLET_BENCH_CORRUPT_RANK", "1")],
    );
    let out = text(&outs[0]);
    assert!(
        !outs[0].status.success() && !outs[1].status.success(),
        "{out}"
    );
    for row in rows(&out) {
        assert_eq!(
            row[8], "1",
            "each size has exactly the damaged element: {row:?}\n{out}"
        );
    }
}

#[test]
fn bad_arguments_are_refused_clearly() {
    let o = Command::new(BENCH)
        .args(["-d", "float128"])
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown datatype"));
    let o = Command::new(BENCH)
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("set RANK and WORLD_SIZE"),
        "{}",
        text(&o)
    );
}

/// The default build has no MPI inside: asking for it says how to get it.
#[cfg(not(feature = "mpi"))]
#[test]
fn the_mpi_backend_without_the_feature_says_how_to_build_it() {
    let o = Command::new(BENCH)
        .args(["--backend", "tcp,mpi"])
        .env("RANK", "0")
        .env("WORLD_SIZE", "1")
        .output()
        .unwrap();
    assert!(!o.status.success());
    assert!(text(&o).contains("--features mpi"), "{}", text(&o));
}

/// Where there is no CUDA: `--backend nccl` fails on every rank naming each rank and what it
/// lacks; `auto` settles on the TCP ring, and RINGLET_DEBUG=1 prints the device table; `--device`
/// (device buffers on the TCP ring) says CUDA is missing.
#[test]
fn without_cuda_nccl_is_refused_and_auto_picks_tcp() {
    if std::path::Path::new("/dev/nvidiactl").exists() {
        ringlet_core::skipped!("this machine has an NVIDIA driver");
        return;
    }
    let outs = bench(2, &["-b", "1K", "-e", "1K", "--backend", "nccl"], &[]);
    for o in &outs {
        let t = text(o);
        assert!(!o.status.success(), "{t}");
        assert!(
            t.contains("the NCCL backend was asked for, but 2 of 2 ranks cannot use it")
                && t.contains("rank 0 (")
                && t.contains("rank 1 (")
                && t.contains("no libcuda.so.1"),
            "{t}"
        );
    }
    let outs = bench(
        2,
        &["-b", "1K", "-e", "4K", "-n", "2", "--backend", "auto"],
        &[("RINGLET_DEBUG", "1")],
    );
    let t = text(&outs[0]);
    assert!(outs.iter().all(|o| o.status.success()), "{t}");
    assert!(
        t.contains("backend tcp") && t.contains("Out of bounds values : 0 OK"),
        "{t}"
    );
    assert!(
        t.contains("ringlet: backend Tcp (NCCL cannot serve every rank (2 of 2)"),
        "{t}"
    );
    assert_eq!(
        t.matches(" none ").count(),
        2,
        "one table line per rank: {t}"
    );
    // Device buffers on the TCP ring need a GPU too: each rank says what is missing.
    let outs = bench(2, &["-b", "1K", "-e", "1K", "--device"], &[]);
    for o in &outs {
        let t = text(o);
        assert!(!o.status.success(), "{t}");
        assert!(t.contains("no CUDA: libcuda.so.1 was not found"), "{t}");
    }
}
