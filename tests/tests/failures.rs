//! Failures injected into live jobs of real processes: mismatched calls, a killed rank, a
//! stopped (hung) rank, a rank that never joins. Every surviving rank must fail with an error
//! naming the culprit — promptly for a death, at the deadline for a hang — and never hang.

mod common;

use common::{error_line, Job};
use std::time::{Duration, Instant};

fn after_ms(line: &str) -> u64 {
    line.split("after_ms=")
        .nth(1)
        .and_then(|s| s.split(':').next())
        .and_then(|s| s.parse().ok())
        .unwrap_or(u64::MAX)
}

fn mismatch(n: usize, kind: &str, expect: &[&str]) {
    let mut job = Job::start(n, &["mismatch", kind], &[("RINGLET_TIMEOUT", "3")]);
    let statuses = job.wait_all(Duration::from_secs(30));
    let all = job.all_outputs();
    for (rank, st) in statuses.iter().enumerate() {
        assert_eq!(
            st.code(),
            Some(3),
            "rank {rank} should fail the collective\n{all}"
        );
        let out = job.output(rank);
        let err = error_line(&out).unwrap_or_else(|| panic!("rank {rank} printed no error\n{all}"));
        assert!(err.contains("mismatch"), "rank {rank}: {err}");
        for e in expect {
            assert!(err.contains(e), "rank {rank} error lacks {e:?}: {err}");
        }
        assert!(
            out.contains("BROKEN: communicator is broken"),
            "rank {rank} stays usable after the error\n{out}"
        );
    }
}

#[test]
fn different_counts_are_reported_with_both_counts() {
    mismatch(2, "count", &["count", "999", "1000"]);
    mismatch(3, "count", &["count", "999", "1000"]);
}

#[test]
fn broadcast_against_all_reduce_is_reported_on_every_rank_including_the_root() {
    mismatch(2, "collective", &["broadcast", "all_reduce"]);
    mismatch(3, "collective", &["broadcast", "all_reduce"]);
}

#[test]
fn different_dtypes_ops_and_roots_are_reported() {
    mismatch(3, "dtype", &["dtype"]);
    mismatch(2, "op", &["op "]);
    // Nobody sends in a broadcast whose roots disagree: found when the stalls are compared.
    mismatch(3, "root", &["root"]);
}

fn victim_job(n: usize, timeout: &str) -> Job {
    victim_job_of(n, timeout, "50000", &[])
}

fn victim_job_of(n: usize, timeout: &str, count: &str, env: &[(&str, &str)]) -> Job {
    let mut env = env.to_vec();
    env.push(("RINGLET_TIMEOUT", timeout));
    let job = Job::start(n, &["loop", "1000000", count], &env);
    for r in 0..n {
        assert!(
            job.wait_for(r, "LOOPING", Duration::from_secs(30)),
            "rank {r} never started\n{}",
            job.all_outputs()
        );
    }
    job
}

#[test]
fn a_killed_rank_is_named_by_every_survivor_within_a_second() {
    // Large buffers too: then a survivor next to the dead rank closes its connections while its
    // predecessor is still sending, and that predecessor must still blame the dead rank.
    // The last cases run over TCP with three connections per peer: a death is noticed on
    // whichever of them the survivor waits on.
    let striped: &[(&str, &str)] = &[("RINGLET_SHM", "0"), ("RINGLET_NSOCKS", "3")];
    let cases = [
        (2, 1, "50000", &[][..]),
        (4, 2, "50000", &[]),
        (5, 0, "50000", &[]),
        (4, 2, "4000000", &[]),
        (4, 3, "4000000", &[]),
        (3, 1, "4000000", striped),
        (4, 0, "50000", striped),
    ];
    for (n, victim, count, env) in cases {
        let mut job = victim_job_of(n, "60", count, env);
        let t = Instant::now();
        job.signal(victim, libc::SIGKILL);
        let survivors: Vec<usize> = (0..n).filter(|&r| r != victim).collect();
        let statuses = job.wait_ranks(&survivors, Duration::from_secs(20));
        let took = t.elapsed();
        assert!(
            took < Duration::from_secs(1),
            "survivors took {took:?} to notice (deadline is 60 s)\n{}",
            job.all_outputs()
        );
        for (&r, st) in survivors.iter().zip(&statuses) {
            let out = job.output(r);
            assert_eq!(st.code(), Some(3), "rank {r}\n{out}");
            let err =
                error_line(&out).unwrap_or_else(|| panic!("rank {r} printed no error\n{out}"));
            assert!(
                err.contains(&format!("rank {victim} (127.0.0.1:")),
                "rank {r} does not name rank {victim}: {err}"
            );
        }
    }
}

#[test]
fn a_stopped_rank_is_named_by_every_survivor_at_the_deadline() {
    let (n, victim, timeout) = (4, 1, 2.0);
    let mut job = victim_job(n, "2");
    let t = Instant::now();
    job.signal(victim, libc::SIGSTOP);
    let survivors: Vec<usize> = (0..n).filter(|&r| r != victim).collect();
    let statuses = job.wait_ranks(&survivors, Duration::from_secs(30));
    let took = t.elapsed().as_secs_f64();
    job.signal(victim, libc::SIGKILL);
    let all = job.all_outputs();
    assert!(
        took >= timeout * 0.9,
        "failed after {took:.2}s, before the {timeout}s deadline\n{all}"
    );
    assert!(
        took <= timeout + 4.0,
        "failed after {took:.2}s, long after the {timeout}s deadline\n{all}"
    );
    for (&r, st) in survivors.iter().zip(&statuses) {
        let out = job.output(r);
        assert_eq!(st.code(), Some(3), "rank {r}\n{all}");
        let err = error_line(&out).unwrap_or_else(|| panic!("rank {r} printed no error\n{all}"));
        assert!(err.contains("timed out"), "rank {r}: {err}");
        assert!(
            err.contains(&format!("rank {victim} (127.0.0.1:")) && err.contains("not responding"),
            "rank {r} blames the wrong rank: {err}"
        );
    }
}

#[test]
fn a_rank_that_never_joins_fails_the_others_at_the_rendezvous_deadline() {
    // Three ranks expected, two started: both must give up at the deadline, saying what is missing.
    let mut job = Job::start(
        2,
        &["loop", "1", "10"],
        &[("WORLD_SIZE", "3"), ("RINGLET_TIMEOUT", "2")],
    );
    let t = Instant::now();
    let statuses = job.wait_all(Duration::from_secs(20));
    let took = t.elapsed().as_secs_f64();
    let all = job.all_outputs();
    assert!(
        (1.5..8.0).contains(&took),
        "gave up after {took:.2}s\n{all}"
    );
    for (r, st) in statuses.iter().enumerate() {
        assert_eq!(st.code(), Some(3), "rank {r}\n{all}");
        let err = error_line(&job.output(r))
            .map(str::to_string)
            .unwrap_or_default();
        assert!(
            err.contains("rank 2") || err.contains("world/ring/2"),
            "rank {r} does not say rank 2 is missing: {err}"
        );
        assert!(after_ms(&err) < 8000 || err.contains("after_ms=0"), "{err}");
    }
}

/// Ranks that refuse each other fail at once, not at the deadline. Each names the disagreement
/// (the variable and both counts) or, when the rank it needed has already failed for it and
/// taken the store with it, that rank as gone.
#[test]
fn ranks_that_disagree_on_tcp_streams_per_peer_all_fail_at_once() {
    let mut job = Job::start_with(
        3,
        &["loop", "10", "1000"],
        &[("RINGLET_SHM", "0"), ("RINGLET_TIMEOUT", "60")],
        |rank| vec![("RINGLET_NSOCKS", if rank == 1 { "2" } else { "1" })],
    );
    let t = Instant::now();
    let statuses = job.wait_all(Duration::from_secs(30));
    let took = t.elapsed();
    let all = job.all_outputs();
    assert!(
        took < Duration::from_secs(15),
        "took {took:?} (the deadline is 60 s)\n{all}"
    );
    let mut named = 0;
    for (rank, st) in statuses.iter().enumerate() {
        assert_eq!(st.code(), Some(3), "rank {rank}\n{all}");
        let out = job.output(rank);
        let err = error_line(&out).unwrap_or_else(|| panic!("rank {rank} printed no error\n{all}"));
        if err.contains("RINGLET_NSOCKS differs") {
            assert!(
                err.contains("uses 2") && err.contains("uses 1"),
                "rank {rank}: {err}"
            );
            named += 1;
        } else {
            assert!(err.contains("is gone"), "rank {rank}: {err}");
        }
    }
    assert!(named >= 1, "no rank names the disagreement\n{all}");
}
