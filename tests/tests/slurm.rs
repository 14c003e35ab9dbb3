//! Ranks started by a real Slurm: a private single-host cluster (slurmctld, slurmd, munge; see
//! `common::slurm`) runs `srun -n 4`, and the ranks find rank, size, local rank and the store
//! host in Slurm's variables alone (no MASTER_ADDR, no RANK).

mod common;

use common::slurm::{self, Cluster};
use common::{free_port, TESTRANK};
use std::path::PathBuf;
use std::time::Duration;

/// Slurm's own variables and Ringlet's settings; the store host comes from the node list.
fn job_env() -> Vec<(&'static str, String)> {
    vec![
        ("MASTER_PORT", free_port().to_string()),
        ("RINGLET_JOB_TOKEN", format!("slurm-test-{}", free_port())),
        ("RINGLET_TIMEOUT", "60".into()),
        ("RINGLET_LOG", "info".into()),
    ]
}

#[test]
fn srun_starts_a_ring_that_checks_every_collective() {
    if !slurm::available() {
        return;
    }
    let cluster = Cluster::start();
    let (status, out) = cluster.srun(
        &[
            "-n",
            "4",
            TESTRANK,
            "correctness",
            "0,1,1000,100000",
            "float,int64,half",
            "sum,min",
            "all_reduce,broadcast,all_gather,reduce_scatter",
        ],
        &job_env(),
        Duration::from_secs(180),
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "srun failed ({status:?}):\n{out}\n{}",
        cluster.logs()
    );
    assert_eq!(out.matches("OK checks=").count(), 4, "{out}");
    // The store is on the first host of the step's node list (localhost), found by every rank.
    assert!(out.contains("ip=127.0.0.1"), "{out}");
}

#[test]
fn srun_runs_the_bandwidth_benchmark() {
    if !slurm::available() {
        return;
    }
    // Built by the same `cargo test --workspace` (target/<profile>/ringlet-bench).
    let bench: PathBuf = std::env::current_exe()
        .expect("test binary path")
        .ancestors()
        .nth(2)
        .expect("profile dir")
        .join("ringlet-bench");
    assert!(
        bench.exists(),
        "{} is missing: build the workspace first (cargo test --workspace --release)",
        bench.display()
    );
    let cluster = Cluster::start();
    let (status, out) = cluster.srun(
        &[
            "-n",
            "4",
            bench.to_str().unwrap(),
            "all_reduce",
            "-b",
            "8",
            "-e",
            "8M",
            "-f",
            "32",
            "-n",
            "3",
            "-w",
            "1",
        ],
        &job_env(),
        Duration::from_secs(180),
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "srun failed ({status:?}):\n{out}\n{}",
        cluster.logs()
    );
    assert!(out.contains("4 ranks"), "{out}");
    assert!(out.contains("Out of bounds values : 0 OK"), "{out}");
    assert_eq!(out.matches("peak RSS").count(), 4, "{out}");
}

/// A collective that differs on one rank: every task reports it, and srun fails.
#[test]
fn a_mismatch_under_srun_fails_every_task_clearly() {
    if !slurm::available() {
        return;
    }
    let cluster = Cluster::start();
    let mut env = job_env();
    env.push(("RINGLET_TIMEOUT", "10".into()));
    let (status, out) = cluster.srun(
        &["-n", "3", TESTRANK, "mismatch", "count"],
        &env,
        Duration::from_secs(60),
    );
    let status = status.expect("srun finished");
    assert!(!status.success(), "{out}");
    assert_eq!(
        out.lines()
            .filter(|l| l.starts_with("ERROR") && l.contains("mismatch"))
            .count(),
        3,
        "{out}"
    );
    assert!(out.contains("Exited with exit code 3"), "{out}");
}
