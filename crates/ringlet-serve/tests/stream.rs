//! End to end on a real Redis (`redis-server`, started here): ringlet-train writes checkpoints,
//! three ringlet-serve replicas score 10,000 records pushed meanwhile; one replica is killed
//! (`kill -9`) while it holds records, a newer version is committed mid-stream and then a
//! corrupt one. Every good record must be scored exactly once (by id), both good versions
//! must appear and no batch mix them, the corrupt version must be refused, malformed records
//! dead-lettered.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

mod common;

use common::{commit, entries, train, Redis, SERVE};

struct Replica {
    child: Child,
    log: PathBuf,
}

impl Replica {
    fn start(name: &str, redis: &Redis, dir: &Path, work: &Path) -> Replica {
        let log = work.join(format!("{name}.log"));
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(SERVE)
            .args(["run", "--redis", &redis.url(), "--consumer", name])
            .arg("--checkpoints")
            .arg(dir)
            .args([
                "--batch",
                "32",
                "--max-wait-ms",
                "0",
                "--claim-idle-ms",
                "1000",
            ])
            .args(["--poll-versions-ms", "50", "--exit-when-idle", "4"])
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .spawn()
            .unwrap();
        Replica { child, log }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pending_of(conn: &mut redis::Connection, consumer: &str) -> usize {
    let v: Vec<redis::Value> = redis::cmd("XPENDING")
        .arg("records")
        .arg("ringlet-serve")
        .arg("-")
        .arg("+")
        .arg(1000)
        .arg(consumer)
        .query(conn)
        .unwrap();
    v.len()
}

fn signal(child: &Child, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &child.id().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

#[test]
fn replicas_score_every_record_once_across_a_kill_and_two_new_versions() {
    let Some(redis) = Redis::start() else { return };
    let work = std::env::temp_dir().join(format!("ringlet-serve-e2e-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let (trained, served) = (work.join("trained"), work.join("served"));
    std::fs::create_dir_all(&served).unwrap();
    train(
        &["--epochs", "2", "--checkpoint-every", "20", "--keep", "5"],
        &trained,
    );
    let step = |n: u64| trained.join(format!("step-{n:012}"));
    commit(&step(20), &served, false);

    let mut replicas: Vec<Replica> = (0..3)
        .map(|i| Replica::start(&format!("r{i}"), &redis, &served, &work))
        .collect();
    let mut conn = redis.conn();
    let (total, chunk) = (10_000usize, 250usize);
    let mut malformed = HashSet::new();
    let mut good = HashSet::new();
    let mut killed_holding = 0;
    let mut r1_stopped = false;
    for start in (0..total).step_by(chunk) {
        // From 3000 on, until it happens: r1 is stopped while it waits in its blocking read,
        // Redis hands it records of the next chunk, and it is killed holding them.
        if start >= 3000 && killed_holding == 0 {
            signal(&replicas[1].child, "-STOP");
            r1_stopped = true;
        }
        let mut pipe = redis::pipe();
        for i in start..start + chunk {
            let features = if i % 397 == 5 {
                "[1, 2, \"not a number\"]".to_string()
            } else {
                let v: Vec<f32> = (0..64).map(|j| ((i * 7 + j) % 17) as f32 / 16.0).collect();
                serde_json::to_string(&v).unwrap()
            };
            pipe.cmd("XADD")
                .arg("records")
                .arg("*")
                .arg("features")
                .arg(features);
        }
        let ids: Vec<String> = pipe.query(&mut conn).unwrap();
        for (k, id) in ids.into_iter().enumerate() {
            if (start + k) % 397 == 5 {
                malformed.insert(id);
            } else {
                good.insert(id);
            }
        }
        if r1_stopped {
            std::thread::sleep(Duration::from_millis(20));
            killed_holding = pending_of(&mut conn, "r1");
            signal(
                &replicas[1].child,
                if killed_holding > 0 { "-KILL" } else { "-CONT" },
            );
            r1_stopped = false;
        }
        match start {
            5000 => commit(&step(40), &served, false),
            6500 => commit(&step(44), &served, true),
            _ => {}
        }
        std::thread::sleep(Duration::from_millis(40));
    }
    assert!(killed_holding > 0, "r1 never held a record when stopped");
    let deadline = Instant::now() + Duration::from_secs(120);
    for (i, r) in replicas.iter_mut().enumerate() {
        loop {
            if let Some(st) = r.child.try_wait().unwrap() {
                assert!(i == 1 || st.success(), "replica r{i}: {st}\n{}", r.output());
                break;
            }
            assert!(
                Instant::now() < deadline,
                "replica r{i} did not finish:\n{}",
                r.output()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let logs: Vec<String> = replicas.iter().map(Replica::output).collect();
    let all = logs.join("\n---\n");

    // Every good record scored exactly once, nothing else.
    let predictions = entries(&mut conn, "predictions");
    let mut seen: HashMap<&str, usize> = HashMap::new();
    for (_, f) in &predictions {
        *seen.entry(f["id"].as_str()).or_default() += 1;
    }
    let twice: Vec<_> = seen.iter().filter(|(_, &n)| n > 1).collect();
    assert!(twice.is_empty(), "scored more than once: {twice:?}");
    let scored: HashSet<String> = seen.keys().map(|s| s.to_string()).collect();
    assert_eq!(scored.len(), good.len(), "{all}");
    assert_eq!(scored, good);
    // Malformed ones dead-lettered once each, with the reason.
    let dead = entries(&mut conn, "records-dead");
    let dead_ids: Vec<&str> = dead.iter().map(|(_, f)| f["id"].as_str()).collect();
    assert_eq!(dead_ids.len(), malformed.len());
    assert_eq!(
        dead_ids
            .iter()
            .map(|s| s.to_string())
            .collect::<HashSet<_>>(),
        malformed
    );
    assert!(dead
        .iter()
        .all(|(_, f)| f["reason"].contains("not a JSON array")));
    // Both good versions served, the corrupt one never; one version per batch.
    let mut by_version: HashMap<&str, usize> = HashMap::new();
    let mut batch_version: HashMap<&str, &str> = HashMap::new();
    for (_, f) in &predictions {
        *by_version.entry(f["version"].as_str()).or_default() += 1;
        let v = batch_version
            .entry(f["batch"].as_str())
            .or_insert(f["version"].as_str());
        assert_eq!(*v, f["version"], "batch {} mixes versions", f["batch"]);
    }
    let mut versions: Vec<&str> = by_version.keys().copied().collect();
    versions.sort();
    assert_eq!(versions.len(), 2, "{by_version:?}");
    assert!(
        versions[0].starts_with("step-20@") && versions[1].starts_with("step-40@"),
        "{versions:?}"
    );
    assert!(
        all.contains("refused version") && all.contains("step-000000000044"),
        "{all}"
    );
    // The killed replica's records were taken over by the others.
    assert!(all.contains("took over"), "{all}");
    // The group's pending list is empty: everything was acknowledged.
    let summary: (u64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
        .arg("records")
        .arg("ringlet-serve")
        .query(&mut conn)
        .unwrap();
    assert_eq!(summary.0, 0, "{summary:?}");
    // `versions` lists the served directory: the corrupt one refused, the others with their
    // training loss and hash.
    let listed = Command::new(SERVE)
        .arg("versions")
        .arg(&served)
        .output()
        .unwrap();
    let listed = String::from_utf8_lossy(&listed.stdout).to_string();
    let lines: Vec<&str> = listed.lines().collect();
    assert_eq!(lines.len(), 3, "{listed}");
    assert!(
        lines[0].starts_with("step 44 refused:") && lines[0].contains("SHA-256 checksum mismatch"),
        "{listed}"
    );
    for (line, step) in lines[1..].iter().zip([40, 20]) {
        assert!(line.starts_with(&format!("step {step} epoch ")), "{listed}");
        assert!(
            line.contains("model mlp metrics {\"train_loss\":") && line.contains(" sha256 "),
            "{listed}"
        );
    }
    let summaries: Vec<&str> = all.lines().filter(|l| l.contains(" scored ")).collect();
    println!(
        "{} records ({} malformed), r1 killed holding {killed_holding}; versions {by_version:?}\n{listed}{}",
        good.len() + malformed.len(),
        malformed.len(),
        summaries.join("\n")
    );
    let _ = std::fs::remove_dir_all(&work);
}

/// A CNN (Burn) served from a pinned checkpoint scores the held-out digits exactly as training
/// evaluated them: the accuracy over the output stream equals the one ringlet-train printed.
#[test]
fn a_served_cnn_scores_the_held_out_digits_as_training_did() {
    served_accuracy_is_trained_accuracy("cnn");
}

/// The same for the MLP (ringlet-train's own forward pass, on the CPU).
#[test]
fn a_served_mlp_scores_the_held_out_digits_as_training_did() {
    served_accuracy_is_trained_accuracy("mlp");
}

fn served_accuracy_is_trained_accuracy(model: &str) {
    let Some(redis) = Redis::start() else { return };
    let work = std::env::temp_dir().join(format!("ringlet-serve-{model}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let printed = train(&["--model", model, "--checkpoint-every", "100000"], &work);
    // "test accuracy 95.82% (loss ...) on 359 held-out samples"
    let trained: f64 = printed
        .split("test accuracy ")
        .nth(1)
        .and_then(|r| r.split('%').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no accuracy in {printed}"));
    let (_, newest) = ringlet_ddp::checkpoint::steps(&work).unwrap()[0].clone();

    let data = ringlet_train::data::load("digits").unwrap();
    let mut conn = redis.conn();
    let mut pipe = redis::pipe();
    let f = data.features;
    for i in 0..data.test_len() {
        let v = &data.test_x[i * f..(i + 1) * f];
        pipe.cmd("XADD")
            .arg("records")
            .arg("*")
            .arg("features")
            .arg(serde_json::to_string(v).unwrap());
    }
    let ids: Vec<String> = pipe.query(&mut conn).unwrap();
    let out = Command::new(SERVE)
        .args(["run", "--redis", &redis.url(), "--exit-when-idle", "1"])
        .arg("--pin")
        .arg(&newest)
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{log}");
    let predictions: HashMap<String, usize> = entries(&mut conn, "predictions")
        .into_iter()
        .map(|(_, f)| (f["id"].clone(), f["class"].parse().unwrap()))
        .collect();
    assert_eq!(predictions.len(), ids.len(), "{log}");
    let right = ids
        .iter()
        .zip(&data.test_y)
        .filter(|(id, &y)| predictions[*id] == y as usize)
        .count();
    let served = 100.0 * right as f64 / ids.len() as f64;
    println!(
        "cnn: trained {trained:.2}%, served {served:.2}% on {} records\n{log}",
        ids.len()
    );
    assert!(
        (served - trained).abs() < 0.01,
        "trained {trained}%, served {served}%"
    );
    let _ = std::fs::remove_dir_all(&work);
}

/// A record whose replicas all died holding it (here: claimed over and over by a consumer that
/// never commits) is dead-lettered once it was handed out more than --max-deliveries times.
#[test]
fn a_record_every_replica_died_on_is_dead_lettered() {
    let Some(redis) = Redis::start() else { return };
    let work = std::env::temp_dir().join(format!("ringlet-serve-poison-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    train(&["--epochs", "1", "--checkpoint-every", "100000"], &work);
    let mut conn = redis.conn();
    let _: () = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg("records")
        .arg("ringlet-serve")
        .arg("0")
        .arg("MKSTREAM")
        .query(&mut conn)
        .unwrap();
    let features = serde_json::to_string(&vec![1.0f32; 64]).unwrap();
    let poison: String = redis::cmd("XADD")
        .arg("records")
        .arg("*")
        .arg("features")
        .arg(&features)
        .query(&mut conn)
        .unwrap();
    let fine: String = redis::cmd("XADD")
        .arg("records")
        .arg("*")
        .arg("features")
        .arg(&features)
        .query(&mut conn)
        .unwrap();
    // "ghost" reads both and commits only the second; then takes the first over 4 more times,
    // as replicas dying on it would: 5 deliveries.
    let _: redis::Value = redis::cmd("XREADGROUP")
        .arg("GROUP")
        .arg("ringlet-serve")
        .arg("ghost")
        .arg("STREAMS")
        .arg("records")
        .arg(">")
        .query(&mut conn)
        .unwrap();
    let _: u64 = redis::cmd("XACK")
        .arg("records")
        .arg("ringlet-serve")
        .arg(&fine)
        .query(&mut conn)
        .unwrap();
    for _ in 0..4 {
        let _: redis::Value = redis::cmd("XCLAIM")
            .arg("records")
            .arg("ringlet-serve")
            .arg("ghost")
            .arg(0)
            .arg(&poison)
            .query(&mut conn)
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(1100));
    let (_, dir) = ringlet_ddp::checkpoint::steps(&work).unwrap()[0].clone();
    let out = Command::new(SERVE)
        .args([
            "run",
            "--redis",
            &redis.url(),
            "--claim-idle-ms",
            "1000",
            "--max-deliveries",
            "5",
        ])
        .args(["--exit-when-idle", "1"])
        .arg("--pin")
        .arg(&dir)
        .output()
        .unwrap();
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{log}");
    let dead = entries(&mut conn, "records-dead");
    assert_eq!(dead.len(), 1, "{log}");
    assert_eq!(dead[0].1["id"], poison);
    assert!(
        dead[0].1["reason"].contains("handed out 6 times"),
        "{:?}",
        dead[0].1
    );
    assert!(entries(&mut conn, "predictions").is_empty());
    let _ = std::fs::remove_dir_all(&work);
}

/// A replica stopped (SIGSTOP) past --claim-idle-ms while Redis had handed it records: another
/// takes them over; when it goes on (its blocked read interrupted, it connects again) nothing is
/// scored twice and nothing is lost.
#[test]
fn a_replica_stopped_holding_records_and_resumed_duplicates_nothing() {
    let Some(redis) = Redis::start() else { return };
    let work = std::env::temp_dir().join(format!("ringlet-serve-stopped-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    let ck = work.join("ck");
    train(&["--epochs", "1", "--checkpoint-every", "100000"], &ck);
    let mut replicas: Vec<Replica> = (0..2)
        .map(|i| Replica::start(&format!("s{i}"), &redis, &ck, &work))
        .collect();
    let mut conn = redis.conn();
    std::thread::sleep(Duration::from_millis(500)); // both waiting in their reads
    let features = serde_json::to_string(&vec![1.0f32; 64]).unwrap();
    let mut ids = HashSet::new();
    let mut held = 0;
    for _ in 0..50 {
        signal(&replicas[1].child, "-STOP");
        let mut pipe = redis::pipe();
        for _ in 0..20 {
            pipe.cmd("XADD")
                .arg("records")
                .arg("*")
                .arg("features")
                .arg(&features);
        }
        let got: Vec<String> = pipe.query(&mut conn).unwrap();
        ids.extend(got);
        std::thread::sleep(Duration::from_millis(20));
        held = pending_of(&mut conn, "s1");
        if held > 0 {
            break;
        }
        signal(&replicas[1].child, "-CONT");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(held > 0, "s1 never held records when stopped");
    // s0 takes them over after a second; then s1 goes on with what it held.
    let deadline = Instant::now() + Duration::from_secs(30);
    while pending_of(&mut conn, "s1") > 0 {
        assert!(Instant::now() < deadline, "s0 never took s1's records over");
        std::thread::sleep(Duration::from_millis(100));
    }
    signal(&replicas[1].child, "-CONT");
    for r in replicas.iter_mut() {
        let st = r.child.wait().unwrap();
        assert!(st.success(), "{}", r.output());
    }
    let logs: Vec<String> = replicas.iter().map(Replica::output).collect();
    let predictions = entries(&mut conn, "predictions");
    let scored: Vec<&str> = predictions.iter().map(|(_, f)| f["id"].as_str()).collect();
    assert_eq!(scored.len(), ids.len(), "{logs:?}");
    assert_eq!(
        scored.iter().map(|s| s.to_string()).collect::<HashSet<_>>(),
        ids
    );
    let taken = logs[0].contains("took over");
    assert!(taken, "s0 never took s1's records over: {logs:?}");
    let _ = std::fs::remove_dir_all(&work);
}
