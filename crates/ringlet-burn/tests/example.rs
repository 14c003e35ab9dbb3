//! The README's "Training your own model" program, `examples/bring_your_own_model.rs`, runs
//! under `ringrun -n 2` as a user runs it, and learns its task.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// `target/<profile>/`, where `cargo test --workspace` put ringrun and the examples.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent()
        .and_then(|deps| deps.parent())
        .unwrap()
        .to_path_buf()
}

#[test]
fn the_example_trains_under_ringrun() {
    let dir = target_dir();
    let (ringrun, example) = (
        dir.join("ringrun"),
        dir.join("examples/bring_your_own_model"),
    );
    for p in [&ringrun, &example] {
        assert!(
            p.exists(),
            "{} is missing: build the workspace and its examples (cargo test --workspace --release)",
            p.display()
        );
    }
    let log = std::env::temp_dir().join(format!("ringlet-example-{}.log", std::process::id()));
    let f = std::fs::File::create(&log).unwrap();
    let mut child = Command::new(&ringrun)
        .args(["-n", "2", "--"])
        .arg(&example)
        .env("RINGLET_TIMEOUT", "30")
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .stdin(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "the example did not finish:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    assert!(status.success(), "{out}");
    // "600 steps on 2 ranks, ... : 99.5% of the spirals' points classified right"
    let line = out
        .lines()
        .find(|l| l.contains("classified right"))
        .unwrap_or_else(|| panic!("no result line:\n{out}"));
    assert!(line.contains("600 steps on 2 ranks"), "{line}");
    let pct: f64 = line
        .rsplit(": ")
        .next()
        .and_then(|s| s.split('%').next())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or_else(|| panic!("no accuracy in {line:?}"));
    assert!(pct > 95.0, "the example learned too little: {line}");
    println!("{line}");
}
