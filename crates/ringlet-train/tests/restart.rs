//! Fault tolerance with `ringrun --max-restarts`: a rank killed (or stopped) mid-run makes ringrun
//! stop the job and start every rank again; training resumes from the newest checkpoint and ends
//! with exactly the parameters of an uninterrupted run.

mod common;

use common::{args, committed, Scratch, INTERRUPTED_RUN, TRAIN};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// `ringrun`, built by the same `cargo test --workspace` next to ringlet-train.
fn ringrun() -> PathBuf {
    let p = Path::new(TRAIN).with_file_name("ringrun");
    assert!(
        p.exists(),
        "{} is missing: build the workspace (cargo test --workspace --release)",
        p.display()
    );
    p
}

fn train_args(dir: &Path, out: &str) -> Vec<String> {
    run_args(&INTERRUPTED_RUN, dir, out)
}

/// The Burn CNN's run for the same scenario: wide enough for a step to take a while.
const INTERRUPTED_CNN: [&str; 16] = [
    "--model",
    "cnn",
    "--cnn-channels",
    "32",
    "--steps",
    "150",
    "--global-batch",
    "256",
    "--balance",
    "static:2,1",
    "--seed",
    "9",
    "--checkpoint-every",
    "10",
    "--lr",
    "0.02",
];

fn run_args(base: &[&str], dir: &Path, out: &str) -> Vec<String> {
    args(base)
        .into_iter()
        .chain([
            "--checkpoint-dir".into(),
            dir.join("ckpt").display().to_string(),
            "--dump-params".into(),
            dir.join(out).display().to_string(),
            "--metrics".into(),
            dir.join(format!("{out}-m-{{rank}}.jsonl"))
                .display()
                .to_string(),
        ])
        .collect()
}

/// A ringrun job whose output goes to a file; killed (its whole group) if still running on drop.
struct Launch {
    child: Child,
    log: PathBuf,
}

impl Launch {
    fn start(ringrun_args: &[&str], program_args: &[String], log: PathBuf) -> Launch {
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(ringrun())
            .args(ringrun_args)
            .arg("--")
            .arg(TRAIN)
            .args(program_args)
            .env("RINGLET_TIMEOUT", "5")
            // The same device on every machine that runs this test (ringrun passes it on).
            .env("RINGLET_DEVICE", "cpu")
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Launch { child, log }
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The pid of rank `rank` (a child of ringrun whose environment says so).
    fn rank_pid(&self, rank: usize) -> Option<u32> {
        let me = self.child.id();
        let tasks = std::fs::read_dir(format!("/proc/{me}/task")).ok()?;
        for t in tasks.flatten() {
            let kids = std::fs::read_to_string(t.path().join("children")).unwrap_or_default();
            for pid in kids
                .split_whitespace()
                .filter_map(|p| p.parse::<u32>().ok())
            {
                let env = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
                let want = format!("RANK={rank}");
                if env.split(|&b| b == 0).any(|v| v == want.as_bytes()) {
                    return Some(pid);
                }
            }
        }
        None
    }

    fn wait(mut self, limit: Duration) -> (bool, String) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return (s.success(), self.output());
            }
            assert!(
                Instant::now() < deadline,
                "ringrun did not finish:\n{}",
                self.output()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Launch {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until at least `n` checkpoints are committed under `dir/ckpt`.
fn await_commits(dir: &Path, n: usize, job: &Launch) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if committed(&dir.join("ckpt")) >= n {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "no checkpoint:\n{}",
            job.output()
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn params(p: &Path) -> Vec<u8> {
    std::fs::read(p).unwrap()
}

fn uninterrupted(dir: &Path) -> Vec<u8> {
    uninterrupted_run(&INTERRUPTED_RUN, dir)
}

fn uninterrupted_run(base: &[&str], dir: &Path) -> Vec<u8> {
    let mut a = run_args(base, dir, "whole.params");
    // Its own checkpoint directory, so the interrupted runs start from nothing.
    let i = a.iter().position(|s| s == "--checkpoint-dir").unwrap();
    a[i + 1] = dir.join("whole-ckpt").display().to_string();
    let (ok, out) =
        Launch::start(&["-n", "2"], &a, dir.join("whole.log")).wait(Duration::from_secs(120));
    assert!(ok, "{out}");
    params(&dir.join("whole.params"))
}

/// kill -9 of one rank mid-run: ringrun stops the other, starts both again, training resumes
/// from the newest checkpoint, and the final parameters equal an uninterrupted run's bitwise.
#[test]
fn a_killed_rank_restarts_the_job_from_its_checkpoint() {
    let dir = Scratch::new("restart-kill");
    let want = uninterrupted(&dir.0);
    let job = Launch::start(
        &["-n", "2", "--max-restarts", "2"],
        &train_args(&dir.0, "p.params"),
        dir.0.join("job.log"),
    );
    await_commits(&dir.0, 2, &job);
    let victim = job.rank_pid(1).expect("rank 1 is running");
    let killed_at = Instant::now();
    Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .unwrap();
    let (ok, out) = job.wait(Duration::from_secs(120));
    assert!(ok, "{out}");
    assert!(
        out.contains("restart 1/2 at")
            && out.contains(&format!("rank 1 (pid {victim}) was killed by signal 9")),
        "{out}"
    );
    assert!(out.contains("(resumed at step"), "{out}");
    assert!(out.contains("job ended after 1 restart(s)"), "{out}");
    assert_eq!(params(&dir.0.join("p.params")), want, "{out}");
    println!(
        "restarted and finished {:.1} s after the kill",
        killed_at.elapsed().as_secs_f64()
    );
}

/// The same for a Burn model (`--model cnn`) with `--max-restarts 1`: it resumes from its
/// checkpoint (parameters and momentum by name) and ends as an uninterrupted run does.
#[test]
fn a_killed_rank_restarts_a_burn_model_from_its_checkpoint() {
    let dir = Scratch::new("restart-burn");
    let want = uninterrupted_run(&INTERRUPTED_CNN, &dir.0);
    let job = Launch::start(
        &["-n", "2", "--max-restarts", "1"],
        &run_args(&INTERRUPTED_CNN, &dir.0, "p.params"),
        dir.0.join("job.log"),
    );
    await_commits(&dir.0, 2, &job);
    let victim = job.rank_pid(0).expect("rank 0 is running");
    Command::new("kill")
        .args(["-9", &victim.to_string()])
        .status()
        .unwrap();
    let (ok, out) = job.wait(Duration::from_secs(180));
    assert!(ok, "{out}");
    assert!(
        out.contains(&format!("rank 0 (pid {victim}) was killed by signal 9")),
        "{out}"
    );
    assert!(out.contains("(resumed at step"), "{out}");
    assert!(
        !out.contains("resumed at step 150"),
        "killed too late:\n{out}"
    );
    assert_eq!(params(&dir.0.join("p.params")), want, "{out}");
}

/// A rank that hangs (SIGSTOP) is caught by the other rank's collective deadline; ringrun then
/// restarts the job, which finishes with the uninterrupted run's parameters.
#[test]
fn a_hung_rank_is_caught_by_the_deadline_and_restarted() {
    let dir = Scratch::new("restart-hang");
    let want = uninterrupted(&dir.0);
    let job = Launch::start(
        &["-n", "2", "--max-restarts", "1", "--kill-grace", "1"],
        &train_args(&dir.0, "p.params"),
        dir.0.join("job.log"),
    );
    await_commits(&dir.0, 2, &job);
    let victim = job.rank_pid(1).expect("rank 1 is running");
    Command::new("kill")
        .args(["-STOP", &victim.to_string()])
        .status()
        .unwrap();
    let (ok, out) = job.wait(Duration::from_secs(120));
    assert!(ok, "{out}");
    assert!(out.contains("is not responding"), "{out}");
    assert!(out.contains("restart 1/1 at"), "{out}");
    assert!(out.contains("(resumed at step"), "{out}");
    assert_eq!(params(&dir.0.join("p.params")), want, "{out}");
}

/// Without --max-restarts a failure ends the job, and the restart count reaches the program.
#[test]
fn restarts_are_bounded_and_counted() {
    let dir = Scratch::new("restart-bounded");
    // A program that always fails: every attempt fails, ringrun gives up after K restarts.
    let log = dir.0.join("fail.log");
    let f = std::fs::File::create(&log).unwrap();
    let status = Command::new(ringrun())
        .args(["-n", "2", "--max-restarts", "2", "--", "sh", "-c"])
        .arg("echo attempt $RINGLET_RESTART; exit 3")
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .status()
        .unwrap();
    let out = std::fs::read_to_string(&log).unwrap();
    assert_eq!(status.code(), Some(1), "{out}");
    // (A rank may be stopped before it prints, once the other has failed.)
    for n in 0..3 {
        assert!(out.contains(&format!("attempt {n}")), "{out}");
    }
    assert!(!out.contains("attempt 3"), "{out}");
    assert!(out.contains("restart 2/2 at"), "{out}");
    assert!(!out.contains("restart 3/"), "{out}");
}
