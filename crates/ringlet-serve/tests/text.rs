//! A character transformer trained by ringlet-train, served: records hold text, predictions the
//! next character, on a real `redis-server`.

mod common;

use common::{entries, train, Redis, SERVE};
use std::collections::HashMap;
use std::process::Command;

/// One replica, as its own consumer group (so that each run scores every record), until idle.
fn serve(redis: &Redis, dir: &std::path::Path, group: &str, batch: &str) -> String {
    let out = Command::new(SERVE)
        .args([
            "run",
            "--redis",
            &redis.url(),
            "--group",
            group,
            "--consumer",
            group,
        ])
        .arg("--checkpoints")
        .arg(dir)
        .args(["--field", "text", "--batch", batch, "--max-wait-ms", "50"])
        .args([
            "--output",
            &format!("predictions-{group}"),
            "--exit-when-idle",
            "1",
        ])
        .output()
        .unwrap();
    let log = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(out.status.success(), "{log}");
    log
}

/// Held-out windows of the embedded text, of 3 to 32 characters: each record's text and the
/// character that follows it there. Served one at a time or 64 to a batch (padded to the
/// longest), the predictions are the same; they are right far more often than chance; a
/// character the model never saw sends the record to the dead letters.
#[test]
fn a_served_transformer_predicts_the_next_character() {
    let Some(redis) = Redis::start() else { return };
    let dir = std::env::temp_dir().join(format!("ringlet-serve-text-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let trained = train(
        &[
            "--model",
            "transformer",
            "--context",
            "32",
            "--d-model",
            "48",
            "--heads",
            "2",
            "--layers",
            "1",
            "--global-batch",
            "32",
            "--steps",
            "150",
            "--checkpoint-every",
            "150",
        ],
        &dir,
    );
    let text: Vec<char> = std::fs::read_to_string(sibling_data())
        .unwrap()
        .chars()
        .collect();
    let tail = &text[text.len() * 9 / 10..];
    let mut conn = redis.conn();
    let mut want = HashMap::new();
    let mut pipe = redis::pipe();
    let mut ids = Vec::new();
    for (i, start) in (0..tail.len() - 40).step_by(16).take(200).enumerate() {
        let len = 3 + i % 30;
        let s: String = tail[start..start + len].iter().collect();
        pipe.cmd("XADD").arg("records").arg("*").arg("text").arg(&s);
        ids.push(tail[start + len]);
    }
    let added: Vec<String> = pipe.query(&mut conn).unwrap();
    for (id, next) in added.iter().zip(ids) {
        want.insert(id.clone(), next);
    }
    let _: String = redis::cmd("XADD")
        .arg("records")
        .arg("*")
        .arg("text")
        .arg("In the beginning €")
        .query(&mut conn)
        .unwrap();

    let one = serve(&redis, &dir, "one", "1");
    let many = serve(&redis, &dir, "many", "64");
    let by_id = |stream: &str| -> HashMap<String, HashMap<String, String>> {
        entries(&mut redis.conn(), stream)
            .into_iter()
            .map(|(_, f)| (f["id"].clone(), f))
            .collect()
    };
    let (a, b) = (by_id("predictions-one"), by_id("predictions-many"));
    assert_eq!((a.len(), b.len()), (200, 200), "{one}{many}");
    let mut right = 0;
    for (id, next) in &want {
        let (pa, pb) = (&a[id], &b[id]);
        assert_eq!(pa["next"], pb["next"], "record {id}");
        let (ca, cb): (f64, f64) = (
            pa["confidence"].parse().unwrap(),
            pb["confidence"].parse().unwrap(),
        );
        assert!((ca - cb).abs() < 1e-4, "record {id}: {ca} vs {cb}");
        right += usize::from(pa["next"] == next.to_string());
    }
    println!("{trained}next character right for {right} of 200 held-out texts");
    // About 1 in 60 by chance (the text has 60-odd distinct characters).
    assert!(right >= 50, "{right} of 200\n{trained}");
    let dead = entries(&mut conn, "records-dead");
    assert_eq!(dead.len(), 2, "once per group: {dead:?}");
    assert!(
        dead.iter()
            .all(|(_, f)| f["reason"].contains("'€' is not in the model's vocabulary")),
        "{dead:?}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// The embedded text ringlet-train trains the transformer on.
fn sibling_data() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../ringlet-train/data/genesis-kjv.txt")
}
