//! `ringlet-train` end to end: real rank processes on loopback. Exactness across world sizes and
//! splits, overlap changing nothing, checkpoints surviving kills and corruption, and resumed
//! training ending bit for bit where an uninterrupted run ends.

mod common;

use common::{args, committed, max_relative_difference, params, Job, Scratch, INTERRUPTED_RUN};
use std::time::{Duration, Instant};

/// Runs `n` ranks with `extra` flags on a common base; the final parameters.
fn run(dir: &Scratch, tag: &str, n: usize, extra: &[&str]) -> (Vec<f32>, Vec<String>) {
    let out = dir.join(&format!("{tag}.params"));
    let mut a = args(&[
        "--steps",
        "50",
        "--global-batch",
        "48",
        "--hidden",
        "32,16",
        "--seed",
        "3",
        "--dump-params",
    ]);
    a.push(out.display().to_string());
    a.extend(args(extra));
    let logs = Job::start(n, &a, &dir.0, tag).finish();
    (params(&out), logs)
}

/// After 50 steps, 1, 2 and 4 ranks hold the same parameters (to float rounding), with equal and
/// with unequal local batches; overlapping the all-reduce with backward changes no bit.
#[test]
fn data_parallel_training_is_exact() {
    let dir = Scratch::new("exact");
    let (one, logs) = run(&dir, "n1", 1, &[]);
    assert!(logs[0].contains("test accuracy"), "{}", logs[0]);
    for (tag, n, extra) in [
        ("n2", 2, vec![]),
        ("n4", 4, vec![]),
        ("n2-static", 2, vec!["--balance", "static:1,3"]),
        ("n4-static", 4, vec!["--balance", "static:1,2,3,4"]),
        ("n4-adamw", 4, vec!["--optimizer", "adamw"]),
    ] {
        let (p, logs) = run(&dir, tag, n, &extra);
        let reference = if tag.ends_with("adamw") {
            run(&dir, "n1-adamw", 1, &["--optimizer", "adamw"]).0
        } else {
            one.clone()
        };
        let d = max_relative_difference(&reference, &p);
        assert!(d < 1e-5, "{tag}: max relative difference {d}\n{}", logs[0]);
        println!("{tag}: max relative difference to one process {d:.2e}");
    }
    let (over, _) = run(&dir, "n4-overlap", 4, &["--first-bucket-kb", "1"]);
    let (serial, _) = run(
        &dir,
        "n4-serial",
        4,
        &["--first-bucket-kb", "1", "--no-overlap"],
    );
    assert!(over == serial, "overlap changed the result");
}

/// Kill every rank mid-run, resume from the newest checkpoint: the parameters at the end equal an
/// uninterrupted run's bit for bit. A flipped byte in the newest checkpoint makes the resume take
/// the one before, with a warning naming the bad one.
#[test]
fn interrupted_training_resumes_bit_for_bit() {
    let dir = Scratch::new("resume");
    let ckpt = dir.join("ckpt");
    let base = |out: &str, extra: &[&str]| {
        let mut a = args(&INTERRUPTED_RUN);
        a.extend(args(&["--keep", "3", "--dump-params"]));
        a.push(dir.join(out).display().to_string());
        a.extend(args(extra));
        a
    };
    let whole = base("whole.params", &[]);
    Job::start(2, &whole, &dir.0, "whole").finish();

    let mut a = base("resumed.params", &["--checkpoint-dir"]);
    a.push(ckpt.display().to_string());
    a.push("--metrics".into());
    a.push(dir.join("m.jsonl").display().to_string());
    let mut job = Job::start(2, &a, &dir.0, "first");
    let deadline = Instant::now() + Duration::from_secs(120);
    // Kill once a few checkpoints are committed, mid-way through the run.
    loop {
        if committed(&ckpt) >= 2 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint:\n{}",
            job.output()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    job.kill();
    let steps_done = std::fs::read_to_string(dir.join("m.jsonl"))
        .unwrap()
        .lines()
        .count();
    assert!(steps_done < 200, "killed too late ({steps_done} steps)");
    let logs = Job::start(2, &a, &dir.0, "second").finish();
    assert!(logs[0].contains("resumed at step"), "{}", logs[0]);
    assert!(
        params(&dir.join("whole.params")) == params(&dir.join("resumed.params")),
        "resumed run differs from the uninterrupted one"
    );

    // Corrupt the newest checkpoint (step 200): a resume must skip it, say so, and finish from
    // step 190 again with the same result.
    let newest = ckpt.join("step-000000000200");
    let file = newest.join("model.safetensors");
    let mut bytes = std::fs::read(&file).unwrap();
    let at = bytes.len() - 7;
    bytes[at] ^= 0x40;
    std::fs::write(&file, bytes).unwrap();
    let logs = Job::start(2, &a, &dir.0, "third").finish();
    assert!(
        logs[0].contains("skipping checkpoint") && logs[0].contains("step-000000000200"),
        "{}",
        logs[0]
    );
    assert!(logs[0].contains("resumed at step 190"), "{}", logs[0]);
    assert!(params(&dir.join("whole.params")) == params(&dir.join("resumed.params")));
}

/// A checkpoint saved by 2 ranks resumes on 4 (the data cursor is global): the end matches a
/// 2-rank uninterrupted run to float rounding.
#[test]
fn resume_with_a_different_world_size() {
    let dir = Scratch::new("reshape");
    let ckpt = dir.join("ckpt").display().to_string();
    let common = [
        "--global-batch",
        "48",
        "--hidden",
        "32",
        "--seed",
        "4",
        "--checkpoint-every",
        "15",
    ];
    let run_to = |steps: &str, n: usize, tag: &str, ck: bool| {
        let mut a = args(&["--steps", steps]);
        a.extend(args(&common));
        if ck {
            a.extend(args(&["--checkpoint-dir", &ckpt]));
        }
        a.push("--dump-params".into());
        a.push(dir.join(&format!("{tag}.params")).display().to_string());
        Job::start(n, &a, &dir.0, tag).finish()
    };
    run_to("60", 2, "whole", false);
    run_to("30", 2, "first", true);
    let logs = run_to("60", 4, "second", true);
    assert!(logs[0].contains("resumed at step 30"), "{}", logs[0]);
    let d = max_relative_difference(
        &params(&dir.join("whole.params")),
        &params(&dir.join("second.params")),
    );
    assert!(d < 1e-5, "max relative difference {d}");
}

/// The per-step JSON lines carry what the issue asks for, and the split is the static one.
#[test]
fn metrics_lines_describe_each_step() {
    let dir = Scratch::new("metrics");
    let m = dir.join("m-{rank}.jsonl").display().to_string();
    let logs = Job::start(
        2,
        &args(&[
            "--steps",
            "12",
            "--global-batch",
            "40",
            "--balance",
            "static:1,3",
            "--metrics",
            &m,
        ]),
        &dir.0,
        "m",
    )
    .finish();
    assert!(logs[0].contains("test accuracy"), "{}", logs[0]);
    for (r, want) in [(0, 10), (1, 30)] {
        let text = std::fs::read_to_string(dir.join(&format!("m-{r}.jsonl"))).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 12);
        for (i, v) in lines.iter().enumerate() {
            assert_eq!(v["step"], i as u64 + 1);
            assert_eq!(v["local_batch"], want);
            assert_eq!(v["rank"], r);
            for k in [
                "loss",
                "step_time_s",
                "compute_time_s",
                "comm_wait_s",
                "bytes_allreduced",
            ] {
                assert!(v[k].is_number(), "{k} in {v}");
            }
        }
    }
}

/// A failure on one rank alone (rank 0 cannot create the checkpoint directory) fails every rank at
/// once, naming the rank, instead of leaving the others to their deadline (30 s here).
#[test]
fn a_failure_on_one_rank_fails_every_rank_at_once() {
    let dir = Scratch::new("agree");
    // A path under a regular file: no rank can create it; only rank 0 tries.
    let file = dir.join("plain-file");
    std::fs::write(&file, b"x").unwrap();
    let bad = file.join("ckpt").display().to_string();
    let start = Instant::now();
    let (codes, logs) = Job::start(3, &args(&["--checkpoint-dir", &bad]), &dir.0, "agree")
        .codes(Duration::from_secs(60));
    assert!(
        start.elapsed() < Duration::from_secs(10),
        "took {:?}",
        start.elapsed()
    );
    assert_eq!(codes, vec![Some(1); 3], "{logs:?}");
    assert!(
        logs[0].contains("opening the checkpoint directory"),
        "{}",
        logs[0]
    );
    for l in &logs[1..] {
        assert!(
            l.contains("opening the checkpoint directory failed on rank 0"),
            "{l}"
        );
    }
}
