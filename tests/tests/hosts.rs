//! Ranks on hosts of their own: one network namespace per rank, joined by a bridge, each with
//! its own address from 198.18.0.0/15. The ring crosses real links (veth pairs), addresses are
//! chosen and advertised by each rank, and a link can be cut under a running collective.

mod common;

use common::netns::{self, NetHosts};
use common::{error_line, Job, TESTRANK};
use std::time::{Duration, Instant};

const CHECKS: [&str; 5] = [
    "correctness",
    "0,1,1000,300000",
    "float,bfloat16,int64",
    "sum,max",
    "all_reduce,broadcast,all_gather,reduce_scatter",
];

/// One rank per host, torchrun-style variables, the store on host 0.
fn start(hosts: &NetHosts, args: &[&str], env: &[(&str, &str)]) -> Job {
    start_per_host(hosts, 1, args, env)
}

/// `per_host` ranks on each host (rank r on host r / per_host).
fn start_per_host(hosts: &NetHosts, per_host: usize, args: &[&str], env: &[(&str, &str)]) -> Job {
    let n = hosts.count * per_host;
    let mut job = Job::empty(n);
    for rank in 0..n {
        let mut cmd = hosts.command(rank / per_host, TESTRANK);
        cmd.args(args)
            .env("RANK", rank.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_RANK", (rank % per_host).to_string())
            .env("LOCAL_WORLD_SIZE", per_host.to_string())
            .env("MASTER_ADDR", hosts.ip(0))
            .env("MASTER_PORT", job.port.to_string())
            .env("RINGLET_JOB_TOKEN", &job.token)
            .env("RINGLET_TIMEOUT", "60")
            .env("RINGLET_LOG", "info")
            .envs(env.iter().copied());
        job.spawn_rank(cmd);
    }
    job
}

fn correct_on(count: usize) {
    if !netns::available() {
        return;
    }
    let hosts = NetHosts::up(count, None);
    let mut job = start(&hosts, &CHECKS, &[]);
    let statuses = job.wait_all(Duration::from_secs(240));
    let all = job.all_outputs();
    for (rank, st) in statuses.iter().enumerate() {
        assert!(st.success(), "rank {rank} failed: {st}\n{all}");
        let out = job.output(rank);
        assert!(out.contains("OK checks="), "{all}");
        // Each rank found its own host's interface and address on its own.
        let ip = hosts.ip(rank);
        assert!(
            out.contains("interface=\"eth0\"") && out.contains(&format!("ip={ip}")),
            "rank {rank} should use eth0 with {ip}: {out}"
        );
    }
}

#[test]
fn collectives_are_exact_across_4_hosts() {
    correct_on(4);
}

#[test]
fn collectives_are_exact_across_8_hosts() {
    correct_on(8);
}

/// Two ranks on each of 3 hosts: each rank's partner on its host is reached by shared memory,
/// the others by TCP over the links, in one job, on every algorithm (the hosts told apart by
/// their namespaces, so `auto` and `two_level` run the two-level all-reduce).
#[test]
fn two_ranks_per_host_mix_shared_memory_and_tcp() {
    if !netns::available() {
        return;
    }
    let hosts = NetHosts::up(3, None);
    for algo in ["auto", "ring", "doubling", "halving", "two_level"] {
        let env = [
            ("RINGLET_ALGO", algo),
            ("RINGLET_LOG", "info,ringlet::comm=debug"),
        ];
        let mut job = start_per_host(&hosts, 2, &CHECKS, &env);
        let statuses = job.wait_all(Duration::from_secs(240));
        let all = job.all_outputs();
        for (rank, st) in statuses.iter().enumerate() {
            assert!(
                st.success(),
                "{algo}: rank {rank} failed: {st}
{all}"
            );
            let out = job.output(rank);
            assert!(out.contains("OK checks="), "{all}");
            assert!(
                out.contains("shared_memory_peers=1"),
                "{algo}: rank {rank} should reach exactly its host's other rank by shared memory: {out}"
            );
            assert!(
                out.contains("hosts=3 two_level=true"),
                "{algo}: rank {rank} should see 3 hosts of 2: {out}"
            );
        }
    }
}

/// A host's link goes down mid-collective: no reset, no FIN, its packets just vanish. Every
/// other rank must fail at the deadline naming the unreachable rank and its address.
#[test]
fn a_cut_link_is_named_by_every_survivor_at_the_deadline() {
    if !netns::available() {
        return;
    }
    let (n, victim, timeout) = (4, 2, 3.0);
    let hosts = NetHosts::up(n, None);
    let mut job = start(
        &hosts,
        &["loop", "100000", "262144"],
        &[("RINGLET_TIMEOUT", "3")],
    );
    for r in 0..n {
        assert!(
            job.wait_for(r, "LOOPING", Duration::from_secs(60)),
            "rank {r} never started looping\n{}",
            job.all_outputs()
        );
    }
    let t = Instant::now();
    hosts.cut(victim);
    let survivors: Vec<usize> = (0..n).filter(|&r| r != victim).collect();
    let statuses = job.wait_ranks(&survivors, Duration::from_secs(30));
    let took = t.elapsed().as_secs_f64();
    job.signal(victim, libc::SIGKILL);
    let all = job.all_outputs();
    assert!(
        took <= timeout + 5.0,
        "survivors failed after {took:.2}s, long after the {timeout}s deadline\n{all}"
    );
    let blamed = format!("rank {victim} ({}:", hosts.ip(victim));
    for (&r, st) in survivors.iter().zip(&statuses) {
        assert_eq!(st.code(), Some(3), "rank {r}\n{all}");
        let out = job.output(r);
        let err = error_line(&out).unwrap_or_else(|| panic!("rank {r} printed no error\n{all}"));
        println!("rank {r} after {took:.2}s: {err}");
        assert!(
            err.contains(&blamed),
            "rank {r} does not name {blamed}…: {err}\n{all}"
        );
    }
}
