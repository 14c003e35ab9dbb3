//! Ranks that learn their place from other launchers' conventions (Open MPI, PMI, Slurm,
//! Kubernetes Indexed Jobs, JobSet, Volcano) instead of the torchrun variables, and a job started by a real `mpirun`.

mod common;

use common::{free_port, Job};
use std::process::Command;
use std::time::Duration;

const CHECKS: [&str; 5] = [
    "correctness",
    "0,1,1000",
    "float,int64",
    "sum,max",
    "all_reduce,broadcast,all_gather",
];

fn expect_ok(mut job: Job) {
    let statuses = job.wait_all(Duration::from_secs(120));
    let all = job.all_outputs();
    for (rank, st) in statuses.iter().enumerate() {
        assert!(st.success(), "rank {rank} failed: {st}\n{all}");
        assert!(job.output(rank).contains("OK checks="), "{all}");
    }
}

fn vars(pairs: &[(&str, String)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.clone()))
        .collect()
}

#[test]
fn open_mpi_variables_place_the_ranks() {
    let n = 3;
    expect_ok(Job::start_custom(n, &CHECKS, |r| {
        vars(&[
            ("OMPI_COMM_WORLD_RANK", r.to_string()),
            ("OMPI_COMM_WORLD_SIZE", n.to_string()),
            ("OMPI_COMM_WORLD_LOCAL_RANK", r.to_string()),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", n.to_string()),
            ("MASTER_ADDR", "127.0.0.1".into()),
        ])
    }));
}

#[test]
fn pmi_variables_place_the_ranks() {
    let n = 2;
    expect_ok(Job::start_custom(n, &CHECKS, |r| {
        vars(&[
            ("PMI_RANK", r.to_string()),
            ("PMI_SIZE", n.to_string()),
            ("MASTER_ADDR", "127.0.0.1".into()),
        ])
    }));
}

#[test]
fn slurm_variables_place_the_ranks_and_name_the_store_host() {
    // No MASTER_ADDR: the store is on the first host of the node list.
    let n = 4;
    expect_ok(Job::start_custom(n, &CHECKS, |r| {
        vars(&[
            ("SLURM_PROCID", r.to_string()),
            ("SLURM_NTASKS", n.to_string()),
            ("SLURM_LOCALID", r.to_string()),
            ("SLURM_NODEID", "0".into()),
            ("SLURM_STEP_TASKS_PER_NODE", n.to_string()),
            ("SLURM_JOB_NODELIST", "localhost,node[02-03]".into()),
        ])
    }));
}

#[test]
fn volcano_variables_place_the_ranks() {
    let n = 2;
    expect_ok(Job::start_custom(n, &CHECKS, |r| {
        vars(&[
            ("VC_TASK_INDEX", r.to_string()),
            ("VC_WORKER_NUM", n.to_string()),
            ("VC_WORKER_HOSTS", "localhost,other-worker".into()),
        ])
    }));
}

/// Two Indexed Jobs of one training run (two GPU generations, say): the second starts at its
/// rank offset, and every pod finds rank 0's pod at MASTER_ADDR, as `ringrun k8s` renders them.
#[test]
fn kubernetes_indexed_job_variables_place_the_ranks() {
    let n = 3;
    expect_ok(Job::start_custom(n, &CHECKS, |r| {
        let (offset, index) = if r < 2 { (0, r) } else { (2, r - 2) };
        vars(&[
            ("JOB_COMPLETION_INDEX", index.to_string()),
            ("RINGLET_RANK_OFFSET", offset.to_string()),
            ("WORLD_SIZE", n.to_string()),
            ("MASTER_ADDR", "localhost".into()),
        ])
    }));
}

/// A JobSet of two Jobs of two pods each; the store host is JobSet's name for the first pod
/// (here it does not resolve, so MASTER_ADDR stands in for the cluster's DNS).
#[test]
fn jobset_variables_place_the_ranks() {
    let n = 4;
    expect_ok(Job::start_custom(n, &CHECKS, |r| {
        vars(&[
            ("JOBSET_NAME", "mnist".into()),
            ("REPLICATED_JOB_NAME", "workers".into()),
            ("JOB_INDEX", (r / 2).to_string()),
            ("JOB_COMPLETION_INDEX", (r % 2).to_string()),
            ("RINGLET_RANKS_PER_JOB", "2".into()),
            ("WORLD_SIZE", n.to_string()),
            ("MASTER_ADDR", "127.0.0.1".into()),
        ])
    }));
}

#[test]
fn an_mpi_launch_without_a_store_address_says_what_to_set() {
    let mut job = Job::start_custom(2, &CHECKS, |r| {
        vars(&[
            ("OMPI_COMM_WORLD_RANK", r.to_string()),
            ("OMPI_COMM_WORLD_SIZE", "2".into()),
        ])
    });
    let statuses = job.wait_all(Duration::from_secs(30));
    for (rank, st) in statuses.iter().enumerate() {
        assert_eq!(st.code(), Some(3));
        let out = job.output(rank);
        assert!(
            out.contains("MASTER_ADDR is not set") && out.contains("Open MPI"),
            "{out}"
        );
    }
}

/// A real `mpirun` (Open MPI) starts the ranks; they find their places in its variables.
#[test]
fn ranks_started_by_mpirun_form_a_ring() {
    let Ok(version) = Command::new("mpirun").arg("--version").output() else {
        assert!(
            std::env::var("CI").is_err(),
            "mpirun is missing in CI: .ci/run installs openmpi-bin"
        );
        ringlet_core::skipped!("mpirun not installed (apt-get install openmpi-bin)");
        return;
    };
    assert!(version.status.success());
    let port = free_port().to_string();
    let out = Command::new("timeout")
        .args([
            "120",
            "mpirun",
            "--allow-run-as-root",
            "--oversubscribe",
            "-np",
            "3",
        ])
        .args([
            "-x",
            "MASTER_ADDR=127.0.0.1",
            "-x",
            &format!("MASTER_PORT={port}"),
        ])
        .args([
            "-x",
            "RINGLET_JOB_TOKEN=mpirun-test",
            "-x",
            "RINGLET_TIMEOUT=60",
        ])
        .arg(common::TESTRANK)
        .args(CHECKS)
        .env_remove("RANK")
        .env_remove("WORLD_SIZE")
        .output()
        .expect("run mpirun");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    assert_eq!(text.matches("OK checks=").count(), 3, "{text}");
}

#[test]
fn ring_traffic_follows_the_socket_ifname_setting() {
    let mut job = Job::start(
        3,
        &CHECKS,
        &[("RINGLET_SOCKET_IFNAME", "=lo"), ("RINGLET_LOG", "info")],
    );
    let statuses = job.wait_all(Duration::from_secs(120));
    let all = job.all_outputs();
    for (rank, st) in statuses.iter().enumerate() {
        assert!(st.success(), "rank {rank}: {all}");
        let out = job.output(rank);
        assert!(
            out.contains("interface=\"lo\"") || out.contains("interface=lo"),
            "chosen interface not logged: {out}"
        );
    }
    let mut job = Job::start(2, &CHECKS, &[("RINGLET_SOCKET_IFNAME", "=no-such-nic0")]);
    for (rank, st) in job.wait_all(Duration::from_secs(30)).iter().enumerate() {
        assert_eq!(st.code(), Some(3));
        let out = job.output(rank);
        assert!(
            out.contains("RINGLET_SOCKET_IFNAME") && out.contains("lo"),
            "rank {rank}: {out}"
        );
    }
}
