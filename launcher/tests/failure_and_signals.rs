//! Supervision with real processes: a failing rank stops the job, signals are forwarded and
//! escalated, and no rank (or anything a rank started) outlives ringrun — not even when ringrun is
//! SIGKILLed.

mod common;

use common::{assert_all_gone, ringrun_sh, run, values_of, Running};
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

#[test]
fn a_failing_rank_stops_the_others_and_their_children() {
    // Every other rank also starts a background sleep (a grandchild of ringrun) to show the
    // whole process group goes.
    let script = r#"
        if [ "$RANK" = 2 ]; then echo "pid=$$"; sleep 0.5; echo "rank 2 fails" >&2; exit 3; fi
        sleep 60 & echo "pid=$$ child=$!"; wait"#;
    let out = run(ringrun_sh(4, &[], script), T);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.elapsed < Duration::from_secs(10), "{out:?}");
    let lines = out.stdout_lines();
    let pids = values_of(&lines, "pid=");
    let children = values_of(&lines, "child=");
    assert_eq!((pids.len(), children.len()), (4, 3), "{out:?}");
    let cause = out
        .stderr
        .lines()
        .find(|l| l.starts_with("ringrun: rank "))
        .unwrap_or_else(|| panic!("no cause line: {out:?}"));
    assert!(cause.starts_with("ringrun: rank 2 (pid "), "{out:?}");
    assert!(cause.ends_with(") exited with status 3"), "{out:?}");
    // The rank's own last words come before ringrun's verdict on it.
    let said = out
        .stderr
        .find("[2] rank 2 fails")
        .expect("rank 2's stderr");
    assert!(said < out.stderr.find(cause).unwrap(), "{out:?}");
    for rank in [0, 1, 3] {
        assert!(
            out.stderr
                .contains(&format!("ringrun: stopped rank {rank} (pid ")),
            "{out:?}"
        );
    }
    assert_eq!(out.stderr.matches("ringrun: rank ").count(), 1, "{out:?}");
    assert_all_gone(&[pids, children].concat(), Duration::from_secs(2));
}

#[test]
fn a_rank_killed_by_a_signal_is_named() {
    let script =
        r#"echo "pid=$$"; if [ "$RANK" = 1 ]; then sleep 0.3; kill -9 $$; fi; exec sleep 60"#;
    let out = run(ringrun_sh(2, &[], script), T);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr
            .lines()
            .any(|l| l.starts_with("ringrun: rank 1 (pid ")
                && l.ends_with("was killed by signal 9 (SIGKILL)")),
        "{out:?}"
    );
    assert!(
        out.stderr.contains("ringrun: stopped rank 0 (pid "),
        "{out:?}"
    );
    assert_all_gone(
        &values_of(&out.stdout_lines(), "pid="),
        Duration::from_secs(2),
    );
}

#[test]
fn all_ranks_succeeding_is_exit_0_and_silent() {
    let out = run(ringrun_sh(3, &[], "exit 0"), T);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(out.stderr.is_empty(), "{out:?}");
}

/// Ranks that trap `sig`, say so and exit 0, while a background sleep keeps them waiting.
fn trapping_ranks(n: usize, sig: &str) -> (Running, Vec<libc::pid_t>) {
    let script =
        format!(r#"trap 'echo got-{sig}; exit 0' {sig}; sleep 60 & echo "pid=$$ child=$!"; wait"#);
    let mut running = Running::start(ringrun_sh(n, &["--kill-grace", "5"], &script));
    let lines = running.wait_for_lines("pid=", n, T);
    let pids = [values_of(&lines, "pid="), values_of(&lines, "child=")].concat();
    (running, pids)
}

#[test]
fn sigterm_is_forwarded_and_ringrun_exits_143() {
    let (running, pids) = trapping_ranks(3, "TERM");
    running.signal(libc::SIGTERM);
    let out = running.finish(T);
    assert_eq!(out.code(), Some(143), "{out:?}");
    // The traps ran: the ranks got SIGTERM itself, not SIGKILL.
    for rank in 0..3 {
        assert!(
            out.stdout_lines().contains(&format!("[{rank}] got-TERM")),
            "{out:?}"
        );
    }
    assert!(out.elapsed < Duration::from_secs(4), "{out:?}");
    assert!(out.stderr.contains("ringrun: got SIGTERM"), "{out:?}");
    assert_all_gone(&pids, Duration::from_secs(2));
}

#[test]
fn sigint_is_forwarded_and_ringrun_exits_130() {
    let (running, pids) = trapping_ranks(2, "INT");
    running.signal(libc::SIGINT);
    let out = running.finish(T);
    assert_eq!(out.code(), Some(130), "{out:?}");
    for rank in 0..2 {
        assert!(
            out.stdout_lines().contains(&format!("[{rank}] got-INT")),
            "{out:?}"
        );
    }
    assert_all_gone(&pids, Duration::from_secs(2));
}

#[test]
fn a_rank_ignoring_sigterm_is_killed_after_the_grace_period() {
    // `exec` keeps the pid; the ignored disposition survives exec, so sleep ignores SIGTERM too.
    let script = r#"trap '' TERM; echo "pid=$$"; exec sleep 60"#;
    let mut running = Running::start(ringrun_sh(2, &["--kill-grace", "0.5"], script));
    let lines = running.wait_for_lines("pid=", 2, T);
    let pids = values_of(&lines, "pid=");
    running.signal(libc::SIGTERM);
    let out = running.finish(T);
    assert_eq!(out.code(), Some(143), "{out:?}");
    assert!(out.elapsed < Duration::from_secs(5), "{out:?}");
    for rank in 0..2 {
        let pid = values_of(&lines, &format!("[{rank}] pid="))[0];
        assert!(
            out.stderr.contains(&format!(
                "ringrun: stopped rank {rank} (pid {pid}) with SIGKILL: still running 0.5 s after SIGTERM"
            )),
            "{out:?}"
        );
    }
    assert_all_gone(&pids, Duration::from_secs(2));
}

#[test]
fn a_failure_with_a_stubborn_rank_still_ends_after_the_grace_period() {
    let script = r#"
        if [ "$RANK" = 1 ]; then sleep 0.3; exit 7; fi
        trap '' TERM; echo "pid=$$"; exec sleep 60"#;
    let out = run(ringrun_sh(2, &["--kill-grace", "0.5"], script), T);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(out.elapsed < Duration::from_secs(5), "{out:?}");
    assert!(out.stderr.contains(") exited with status 7"), "{out:?}");
    assert!(
        out.stderr.contains("ringrun: stopped rank 0 (pid "),
        "{out:?}"
    );
    assert!(out.stderr.contains("with SIGKILL"), "{out:?}");
    assert_all_gone(
        &values_of(&out.stdout_lines(), "pid="),
        Duration::from_secs(2),
    );
}

#[test]
fn ranks_die_when_ringrun_is_sigkilled() {
    let mut running = Running::start(ringrun_sh(3, &[], r#"echo "pid=$$"; exec sleep 60"#));
    let pids = values_of(&running.wait_for_lines("pid=", 3, T), "pid=");
    running.signal(libc::SIGKILL);
    let out = running.finish(T);
    assert_eq!(out.status.code(), None, "{out:?}");
    assert_all_gone(&pids, Duration::from_secs(2));
}

/// A rank failing a moment after another (every rank agreeing to fail on one rank's disk-full
/// error, say) is not cut off by SIGTERM: its own last words reach the output, and the cause is
/// still the first failure.
#[test]
fn a_rank_failing_just_after_another_still_says_why() {
    let script = r#"
        echo "pid=$$"
        if [ "$RANK" = 1 ]; then echo "peer failed" >&2; exit 1; fi
        if [ "$RANK" = 0 ]; then sleep 0.25; echo "No space left on device" >&2; exit 1; fi
        exec sleep 60"#;
    let out = run(ringrun_sh(3, &[], script), T);
    assert_eq!(out.code(), Some(1), "{out:?}");
    assert!(
        out.stderr.contains("[0] No space left on device"),
        "{out:?}"
    );
    assert!(
        out.stderr
            .lines()
            .any(|l| l.starts_with("ringrun: rank 0 (pid ") && l.ends_with("exited with status 1")),
        "{out:?}"
    );
    assert!(
        out.stderr.contains("ringrun: stopped rank 2 (pid "),
        "{out:?}"
    );
    assert!(!out.stderr.contains("stopped rank 0"), "{out:?}");
    let first = out
        .stderr
        .find("ringrun: rank 1 (pid ")
        .expect("rank 1's failure");
    assert!(
        first < out.stderr.find("ringrun: rank 0 (pid ").unwrap(),
        "{out:?}"
    );
    assert_all_gone(
        &values_of(&out.stdout_lines(), "pid="),
        Duration::from_secs(2),
    );
}

/// A signal while the others have their grace after a failure stops everything at once: the
/// user does not wait out --kill-grace for a rank that ignores SIGTERM.
#[test]
fn a_signal_after_a_failure_kills_at_once() {
    let script = r#"
        if [ "$RANK" = 1 ]; then echo "failing"; exit 1; fi
        trap '' TERM; echo "pid=$$"; exec sleep 60"#;
    let mut running = Running::start(ringrun_sh(2, &["--kill-grace", "5"], script));
    let lines = running.wait_for_lines("", 2, T);
    let pids = values_of(&lines, "pid=");
    // After ringrun has reaped the failure (at once, on SIGCHLD) and inside its 0.5 s grace; a
    // signal before the reap is an ordinary first signal, with the full --kill-grace.
    std::thread::sleep(Duration::from_millis(250));
    running.signal(libc::SIGTERM);
    let out = running.finish(T);
    assert_eq!(out.code(), Some(143), "{out:?}");
    assert!(out.elapsed < Duration::from_secs(3), "{out:?}");
    assert_all_gone(&pids, Duration::from_secs(2));
}
