//! Sharded datasets and `--data-locality` end to end: `ringlet-shards convert`, then rank
//! processes on loopback told (by `RINGLET_DATA_HOST`) that they run on two hosts, each holding
//! a local copy of some shards.

mod common;

use common::{args, params, Job, Scratch};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const SHARDS: &str = env!("CARGO_BIN_EXE_ringlet-shards");

/// Converts the digits into 16 shards of 90 samples (the last 88) under `dir/shared`, and gives
/// host a a copy of shards 0-9, host b of 6-15; both hold the test set. Returns the map's path.
fn layout(dir: &Scratch) -> std::path::PathBuf {
    let shared = dir.join("shared");
    let out = Command::new(SHARDS)
        .args(["convert", "digits"])
        .arg(&shared)
        .args(["--shard-samples", "90"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        text.contains("1438 training samples in 16 shards"),
        "{text}"
    );
    let verify = Command::new(SHARDS)
        .arg("verify")
        .arg(&shared)
        .output()
        .unwrap();
    assert!(verify.status.success());
    for (host, shards) in [("a", 0..10), ("b", 6..16)] {
        let local = dir.join(host);
        std::fs::create_dir_all(&local).unwrap();
        for f in shards
            .map(|s| format!("train-{s:05}.safetensors"))
            .chain(["test.safetensors".to_string()])
        {
            std::fs::copy(shared.join(&f), local.join(&f)).unwrap();
        }
    }
    let map = serde_json::json!({"hosts": {
        "a": {"dir": dir.join("a"), "shards": "0-9,test"},
        "b": {"dir": dir.join("b"), "shards": "6-15,test"},
    }});
    let path = dir.join("map.json");
    std::fs::write(&path, map.to_string()).unwrap();
    path
}

/// Three ranks, rank 0 on host a and ranks 1-2 on host b; the summary and final parameters.
fn run(
    dir: &Scratch,
    tag: &str,
    map: Option<&Path>,
    extra: &[&str],
) -> (serde_json::Value, Vec<f32>, Vec<String>) {
    let (summary, dump) = (
        dir.join(&format!("{tag}.json")),
        dir.join(&format!("{tag}.params")),
    );
    let steps = extra.contains(&"--steps");
    let mut a = args(if steps { &[] } else { &["--epochs", "8"] });
    a.extend(args(&[
        "--global-batch",
        "48",
        "--hidden",
        "32",
        "--seed",
        "5",
    ]));
    a.extend([
        "--dataset".into(),
        format!("shards:{}", dir.join("shared").display()),
    ]);
    if let Some(m) = map {
        a.extend(["--shard-map".into(), m.display().to_string()]);
    }
    a.extend(["--summary".into(), summary.display().to_string()]);
    a.extend(["--dump-params".into(), dump.display().to_string()]);
    a.extend([
        "--metrics".into(),
        dir.join(&format!("{tag}-{{rank}}.jsonl"))
            .display()
            .to_string(),
    ]);
    a.extend(args(extra));
    let host = |r: usize| {
        vec![(
            "RINGLET_DATA_HOST",
            if r == 0 { "a" } else { "b" }.to_string(),
        )]
    };
    let logs = Job::start_env(3, &a, &dir.0, tag, host).finish();
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&summary).unwrap()).unwrap();
    (s, params(&dump), logs)
}

/// Local batches of `rank` over its metrics lines.
fn local_batches(dir: &Scratch, tag: &str, rank: usize) -> Vec<u64> {
    std::fs::read_to_string(dir.join(&format!("{tag}-{rank}.jsonl")))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["local_batch"]
                .as_u64()
                .unwrap()
        })
        .collect()
}

#[test]
fn each_host_reads_only_its_own_shards_and_the_model_still_learns() {
    let dir = Scratch::new("locality");
    let map = layout(&dir);

    // Exact order: the same parameters with or without local copies (they are the same bytes),
    // but without locality every rank reads every shard, and the ones its host lacks come from
    // the shared copy.
    let (plain, plain_params, _) = run(&dir, "shared-only", None, &[]);
    let (off, off_params, _) = run(&dir, "off", Some(&map), &[]);
    assert!(
        plain_params == off_params,
        "local copies changed the exact run"
    );
    // a lacks 10-15, and b's two ranks each lack 0-5.
    let index: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("shared/index.json")).unwrap())
            .unwrap();
    let bytes = |s: usize| index["train"][s]["bytes"].as_u64().unwrap();
    let lacking: u64 = (10..16).map(bytes).sum::<u64>() + 2 * (0..6).map(bytes).sum::<u64>();
    let remote = off["data_remote_bytes"].as_u64().unwrap();
    let all = plain["data_remote_bytes"].as_u64().unwrap();
    println!("off: {remote} of {all} bytes from the shared copy");
    assert_eq!(remote, lacking, "{off}");
    assert_eq!(off["data_local_bytes"].as_u64().unwrap() + remote, all);

    // Locality: nothing from the shared copy. Host a holds 0-9, b 6-15: a is given 0-5 (only
    // a has them), which is already more than its third; b gets 6-15. Steps take 540 : 898 of
    // the 1438 samples, about 18 : 30 of 48, b's 30 split over its two ranks.
    let (on, on_params, logs) = run(&dir, "on", Some(&map), &["--data-locality", "on"]);
    assert_eq!(on["data_remote_bytes"], 0, "{on}");
    assert!(on["data_local_bytes"].as_u64().unwrap() > 0);
    let (b0, b1, b2) = (
        local_batches(&dir, "on", 0),
        local_batches(&dir, "on", 1),
        local_batches(&dir, "on", 2),
    );
    assert_eq!(b0.len(), 8 * 29);
    for i in 0..b0.len() {
        assert_eq!(b0[i] + b1[i] + b2[i], 48, "step {i}");
        assert!(
            (17..=19).contains(&b0[i]) && b1[i].abs_diff(b2[i]) <= 1,
            "step {i}: {} {} {}",
            b0[i],
            b1[i],
            b2[i]
        );
    }
    assert!(on_params != off_params);
    let acc = |s: &serde_json::Value| s["test_accuracy"].as_f64().unwrap();
    println!(
        "test accuracy: exact {:.4}, locality {:.4}",
        acc(&off),
        acc(&on)
    );
    assert!(acc(&on) > 0.9 && acc(&off) > 0.9, "{}", logs[0]);
    assert!(logs[0].contains("0 B from the shared copy"), "{}", logs[0]);
}

#[test]
fn a_corrupt_local_copy_or_a_host_without_shards_fails_every_rank_clearly() {
    let dir = Scratch::new("locality-bad");
    let map = layout(&dir);
    // A host the map does not name (a --data-host that does not match it, most likely).
    let mut a = args(&["--epochs", "1", "--data-locality", "on"]);
    a.extend([
        "--dataset".into(),
        format!("shards:{}", dir.join("shared").display()),
    ]);
    a.extend(["--shard-map".into(), map.display().to_string()]);
    let host = |r: usize| vec![("RINGLET_DATA_HOST", ["a", "b", "c"][r].to_string())];
    let (codes, logs) =
        Job::start_env(3, &a, &dir.0, "unknown-host", host).codes(Duration::from_secs(60));
    assert!(
        codes.iter().all(|c| *c == Some(1)),
        "{codes:?}\n{}",
        logs.join("\n")
    );
    for l in &logs {
        assert!(
            l.contains("data host \"c\" (rank 2) is not in the shard map, which names a, b"),
            "{l}"
        );
    }

    // One flipped byte in host b's copy of shard 12: every rank fails, naming the file.
    let f = dir.join("b").join("train-00012.safetensors");
    let mut bytes = std::fs::read(&f).unwrap();
    bytes[200] ^= 0x10;
    std::fs::write(&f, bytes).unwrap();
    let host = |r: usize| {
        vec![(
            "RINGLET_DATA_HOST",
            if r == 0 { "a" } else { "b" }.to_string(),
        )]
    };
    let (codes, logs) =
        Job::start_env(3, &a, &dir.0, "corrupt", host).codes(Duration::from_secs(60));
    assert!(
        codes.iter().all(|c| *c == Some(1)),
        "{codes:?}\n{}",
        logs.join("\n")
    );
    // Host b's ranks say what is wrong with which file; rank 0 (host a never reads shard 12)
    // names them.
    assert!(
        logs[0].contains("reading the shards failed on rank 1, 2"),
        "{}",
        logs[0]
    );
    for l in &logs[1..] {
        assert!(
            l.contains("train-00012.safetensors") && l.contains("SHA-256"),
            "{l}"
        );
    }
}

/// With locality, a run stopped mid-epoch and resumed from its checkpoint ends with the same
/// parameters, bit for bit, as one that ran through.
#[test]
fn a_resumed_locality_run_ends_where_an_uninterrupted_one_does() {
    let dir = Scratch::new("locality-resume");
    let map = layout(&dir);
    let ck = dir.join("ck");
    let ck = ck.display().to_string();
    let flags = ["--data-locality", "on", "--balance", "static:3,1,2"];
    let through = |steps: &str, tag: &str, more: &[&str]| {
        let mut extra = vec!["--steps", steps];
        extra.extend(flags);
        extra.extend(more);
        run(&dir, tag, Some(&map), &extra)
    };
    let (_, whole, _) = through("80", "whole", &[]);
    // 29 steps an epoch: step 40 is in the middle of the second.
    through(
        "40",
        "first",
        &["--checkpoint-dir", &ck, "--checkpoint-every", "40"],
    );
    let (s, resumed, logs) = through(
        "80",
        "rest",
        &["--checkpoint-dir", &ck, "--checkpoint-every", "1000"],
    );
    assert_eq!(s["resumed_from"], 40, "{}", logs[0]);
    assert!(whole == resumed, "the resumed run differs\n{}", logs[0]);
}
