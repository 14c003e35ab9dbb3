//! Going on without a rank: real rank processes whose rendezvous store outlives them (served here,
//! as `ringrun` serves it, through `RINGLET_STORE_ADDR`). One is SIGKILLed or SIGSTOPped mid-loop;
//! the survivors agree on who is left, form the next epoch and finish the loop with correct sums.

mod common;

use common::Job;
use ringlet_core::JobToken;
use ringlet_store::StoreServer;
use std::time::{Duration, Instant};

/// `key=value` of a `SHRUNK ...` line.
fn field<'a>(line: &'a str, key: &str) -> &'a str {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .unwrap_or_else(|| panic!("no {key}= in {line}"))
}

/// `original=[0, 2, 3]` holds spaces: the bracketed list after `original=`.
fn original(line: &str) -> &str {
    let start = line.find("original=[").expect("original=") + "original=".len();
    let end = start + line[start..].find(']').expect("]") + 1;
    &line[start..end]
}

/// Runs 4 ranks of the shrink loop, does `harm` to rank `victim` once all loop, and checks that
/// the 3 others re-form (same epoch, same members, none of them the victim) and end with every
/// sum right. Returns the survivors' `after_ms` (failure noticed to new epoch formed).
fn survive(victim: usize, harm: i32, timeout: &str) -> Vec<u64> {
    survive_with(victim, harm, timeout, &[])
}

/// [`survive`] with more environment for the ranks.
fn survive_with(victim: usize, harm: i32, timeout: &str, env: &[(&str, &str)]) -> Vec<u64> {
    let store = StoreServer::bind(
        "127.0.0.1:0".parse().unwrap(),
        JobToken::new("shrink-test-token"),
    )
    .unwrap();
    let addr = store.local_addr().to_string();
    let stop = std::env::temp_dir().join(format!(
        "ringlet-shrink-stop-{}-{victim}",
        std::process::id()
    ));
    let _ = std::fs::remove_file(&stop);
    let stop_s = stop.to_string_lossy().into_owned();
    let mut all_env = vec![
        ("RINGLET_STORE_ADDR", addr.as_str()),
        ("RINGLET_JOB_TOKEN", "shrink-test-token"),
        ("RINGLET_TEST_STOP_FILE", &stop_s),
        ("RINGLET_TIMEOUT", timeout),
    ];
    all_env.extend_from_slice(env);
    let mut job = Job::start(4, &["shrink", "300", "1000"], &all_env);
    for r in 0..4 {
        assert!(
            job.wait_for(r, "LOOPING", Duration::from_secs(60)),
            "{}",
            job.all_outputs()
        );
    }
    let harmed = Instant::now();
    job.signal(victim, harm);
    let survivors: Vec<usize> = (0..4).filter(|&r| r != victim).collect();
    for &r in &survivors {
        assert!(
            job.wait_for(r, "SHRUNK", Duration::from_secs(60)),
            "{}",
            job.all_outputs()
        );
    }
    let noticed = harmed.elapsed();
    std::fs::write(&stop, b"stop").unwrap();
    let statuses = job.wait_ranks(&survivors, Duration::from_secs(60));
    let _ = std::fs::remove_file(&stop);
    let lines: Vec<String> = survivors
        .iter()
        .map(|&r| {
            job.output(r)
                .lines()
                .find(|l| l.starts_with("SHRUNK"))
                .unwrap()
                .to_string()
        })
        .collect();
    let want: Vec<usize> = survivors.clone();
    for (i, (&r, st)) in survivors.iter().zip(&statuses).enumerate() {
        let out = job.output(r);
        assert!(st.success(), "rank {r}: {}", job.all_outputs());
        assert!(out.contains("\nOK checks="), "rank {r}: {out}");
        assert_eq!(field(&lines[i], "epoch"), "1", "{}", lines[i]);
        assert_eq!(field(&lines[i], "world"), "3", "{}", lines[i]);
        assert_eq!(field(&lines[i], "rank"), i.to_string(), "{}", lines[i]);
        assert_eq!(original(&lines[i]), format!("{want:?}"), "{}", lines[i]);
    }
    println!(
        "victim {victim} (signal {harm}): all survivors in epoch 1 after {noticed:?}; {}",
        lines
            .iter()
            .map(|l| format!("after_ms={}", field(l, "after_ms")))
            .collect::<Vec<_>>()
            .join(" ")
    );
    drop(job);
    drop(store);
    lines
        .iter()
        .map(|l| field(l, "after_ms").parse().unwrap())
        .collect()
}

#[test]
fn survivors_of_a_killed_rank_go_on_in_a_new_epoch() {
    // Rank 0 included: the store is not its to take down.
    for victim in [2, 0] {
        survive(victim, libc::SIGKILL, "60");
    }
}

/// A survivor that suspects no one (its error named no peer) waits for every rank's word, the
/// dead one's too; once the others have sealed the new epoch it must read their list and go on,
/// not wait for the dead rank until its deadline while they wait for it in the new epoch.
#[test]
fn a_survivor_that_suspects_no_one_follows_the_others_promptly() {
    let after = survive_with(
        2,
        libc::SIGKILL,
        "60",
        &[("RINGLET_TEST_BLAME_NO_ONE", "0")],
    );
    // Rank 0 (the one suspecting no one) and the others: far from the 60 s deadline.
    assert!(
        after.iter().all(|&ms| ms < 20_000),
        "re-forming took {after:?} ms: a survivor waited for the dead rank"
    );
}

#[test]
fn survivors_of_a_stopped_rank_go_on_after_the_deadline() {
    // A stopped rank is excluded when its peers' deadline passes; it is then killed with the job.
    survive(1, libc::SIGSTOP, "3");
}

/// Without a store that outlives the ranks, losing rank 0 (which served it) cannot be survived:
/// the survivors say why, in one line, at their deadline.
#[test]
fn losing_the_rank_that_served_the_store_is_explained() {
    let stop = std::env::temp_dir().join(format!("ringlet-shrink-stop-{}-own", std::process::id()));
    let stop_s = stop.to_string_lossy().into_owned();
    let mut job = Job::start(
        3,
        &["shrink", "300", "1000"],
        &[
            ("RINGLET_TEST_STOP_FILE", &stop_s),
            ("RINGLET_TIMEOUT", "3"),
        ],
    );
    for r in 0..3 {
        assert!(
            job.wait_for(r, "LOOPING", Duration::from_secs(60)),
            "{}",
            job.all_outputs()
        );
    }
    job.signal(0, libc::SIGKILL);
    let statuses = job.wait_ranks(&[1, 2], Duration::from_secs(30));
    for (r, st) in [1, 2].into_iter().zip(statuses) {
        assert_eq!(st.code(), Some(3), "{}", job.all_outputs());
        let line = common::error_line(&job.output(r)).unwrap().to_string();
        assert!(
            line.contains("the rendezvous store at 127.0.0.1:")
                && line.contains("is gone")
                && line.contains("run under ringrun"),
            "{line}"
        );
    }
}

/// What [`under_ringrun`] saw: ringrun's exit code, the ranks' output, ringrun's own, and the
/// victim's pid.
struct Ended {
    code: Option<i32>,
    out: String,
    err: String,
    pid: i32,
}

/// Runs 4 ranks of the shrink loop under `ringrun -n 4 --min-ranks 2 FLAGS` with a `timeout` s
/// deadline, does `harm` to rank `victim` once all loop, and stops the loop once the 3 survivors
/// have re-formed.
fn under_ringrun(flags: &[&str], timeout: &str, victim: usize, harm: i32) -> Ended {
    let ringrun = std::path::Path::new(common::TESTRANK).with_file_name("ringrun");
    let stop = std::env::temp_dir().join(format!(
        "ringlet-shrink-ringrun-{}-{victim}-{}",
        std::process::id(),
        flags.len()
    ));
    let _ = std::fs::remove_file(&stop);
    let log = stop.with_extension("log");
    let mut child = std::process::Command::new(&ringrun)
        .args(["-n", "4", "--min-ranks", "2"])
        .args(flags)
        .arg("--")
        .arg(common::TESTRANK)
        .args(["shrink", "300", "1000"])
        .env("RINGLET_TEST_STOP_FILE", &stop)
        .env("RINGLET_TIMEOUT", timeout)
        .env_remove("RINGLET_JOB_TOKEN")
        .stdout(std::fs::File::create(&log).unwrap())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let read = || std::fs::read_to_string(&log).unwrap_or_default();
    let deadline = Instant::now() + Duration::from_secs(60);
    while read().matches("LOOPING").count() < 4 {
        assert!(Instant::now() < deadline, "{}", read());
        std::thread::sleep(Duration::from_millis(20));
    }
    let pid: i32 = read()
        .lines()
        .find(|l| l.starts_with(&format!("[{victim}] READY")))
        .and_then(|l| l.split("pid=").nth(1))
        .and_then(|p| p.trim().parse().ok())
        .expect("the victim's pid");
    // SAFETY: kill(2) on a rank of the job we started, which is still running.
    unsafe { libc::kill(pid, harm) };
    while read().matches("SHRUNK").count() < 3 {
        assert!(Instant::now() < deadline, "{}", read());
        std::thread::sleep(Duration::from_millis(20));
    }
    std::fs::write(&stop, b"stop").unwrap();
    let status = common::wait_bounded(&mut child, Duration::from_secs(60));
    let mut err = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
    let out = read();
    let _ = std::fs::remove_file(&stop);
    let _ = std::fs::remove_file(&log);
    Ended {
        code: status.and_then(|s| s.code()),
        out,
        err,
        pid,
    }
}

/// Under `ringrun --min-ranks`, a killed rank does not stop the others: they re-form and finish,
/// and ringrun exits 0 saying so; a hung rank the survivors leave out is stopped by ringrun.
#[test]
fn ringrun_min_ranks_lets_the_survivors_finish() {
    for (victim, harm) in [(2, libc::SIGKILL), (1, libc::SIGSTOP)] {
        let Ended {
            code,
            out,
            err,
            pid,
        } = under_ringrun(&[], "3", victim, harm);
        assert_eq!(code, Some(0), "{out}\n{err}");
        assert!(
            err.contains("ringrun: the job finished with 3 of 4 ranks (--min-ranks)"),
            "{err}"
        );
        if harm == libc::SIGKILL {
            assert!(err.contains("going on with 3 of 4 ranks"), "{err}");
        } else {
            assert!(
                err.contains(&format!(
                    "rank {victim} (pid {pid}) was left out of epoch 1"
                )),
                "{err}"
            );
        }
        assert_eq!(out.matches("OK checks=").count(), 3, "{out}");
    }
}

/// `--max-restarts` with `--min-ranks` starts a replacement for the killed rank; a program that
/// only shrinks (it never admits replacements) finishes without it, and ringrun stops the
/// replacement, still waiting to join, as the job ends: exit 0, 3 of 4 ranks finished.
#[test]
fn a_replacement_nobody_admits_is_stopped_when_the_job_ends() {
    let Ended { code, out, err, .. } =
        under_ringrun(&["--max-restarts", "1"], "30", 2, libc::SIGKILL);
    assert_eq!(code, Some(0), "{out}\n{err}");
    assert!(err.contains("starting a replacement for rank 2"), "{err}");
    assert!(
        err.contains("the job ended before rank 2's replacement"),
        "{err}"
    );
    assert!(
        err.contains("the job finished with 3 of 4 ranks (--min-ranks)"),
        "{err}"
    );
}
