//! The `mpi` feature, for real: `ringlet-bench` built with it runs under Open MPI's `mpirun` with
//! no `MASTER_ADDR` (ranks bootstrap over MPI), and `--backend tcp,mpi` checks Ringlet's ring
//! and the MPI library's collectives on the same buffers in one run.
//!
//! The feature needs an MPI library and libclang at build time, so the default workspace build
//! leaves it off; these tests build the feature binary themselves, once, into its own target
//! directory (`target/mpi-feature`).

mod common;

use common::{have_tool, run_bounded};
use std::path::PathBuf;
use std::process::Command;
use std::sync::OnceLock;
use std::time::Duration;

fn mpi_tools_present() -> bool {
    have_tool("mpirun", &[], "apt-get install openmpi-bin")
        && have_tool("mpicc", &["-showme"], "apt-get install libopenmpi-dev")
}

/// Builds `ringlet-bench --features mpi`; the path of the binary.
fn mpi_bench() -> &'static PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        // target/<profile>/deps/<test exe> → target/
        let exe = std::env::current_exe().expect("test binary path");
        let target = exe.ancestors().nth(3).expect("target dir").to_path_buf();
        let dir = target.join("mpi-feature");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let (status, out) = run_bounded(
            Command::new(cargo)
                .current_dir(&root)
                .args(["build", "--release", "-p", "ringlet-bench", "--features", "mpi"])
                .arg("--target-dir")
                .arg(&dir),
            Duration::from_secs(1200),
        );
        assert!(
            status.is_some_and(|s| s.success()),
            "building ringlet-bench --features mpi failed (needs libopenmpi-dev and libclang-dev):\n{out}"
        );
        dir.join("release/ringlet-bench")
    })
}

/// `mpirun PLACEMENT... -x VARS... BENCH ARGS...`, without any torchrun variable or store
/// address in the environment; whether it succeeded, and its output.
fn mpirun_bench(placement: &[&str], env: &[&str], args: &[&str]) -> (bool, String) {
    // Each mpirun gets its own session directory: concurrent ones sharing Open MPI's default
    // (/tmp/ompi.HOST.UID) race, one removing it while another creates its pid.N inside
    // ("orte_session_dir failed"; seen when the tests of this file ran beside a build).
    static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let session = std::env::temp_dir().join(format!(
        "ringlet-ompi-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&session).expect("a session directory for mpirun");
    let mut cmd = Command::new("mpirun");
    cmd.arg("--allow-run-as-root")
        .args(["--mca", "orte_tmpdir_base"])
        .arg(&session)
        .args(placement)
        .args(["-x", "RINGLET_TIMEOUT=60", "-x", "RINGLET_LOG=info"]);
    for e in env {
        cmd.args(["-x", e]);
    }
    cmd.arg(mpi_bench()).args(args);
    for var in [
        "RANK",
        "WORLD_SIZE",
        "MASTER_ADDR",
        "MASTER_PORT",
        "RINGLET_JOB_TOKEN",
    ] {
        cmd.env_remove(var);
    }
    let (status, out) = run_bounded(&mut cmd, Duration::from_secs(180));
    let _ = std::fs::remove_dir_all(&session);
    (status.is_some_and(|s| s.success()), out)
}

/// `mpirun -np N` on this host.
fn mpirun(n: usize, env: &[&str], args: &[&str]) -> (bool, String) {
    let n = n.to_string();
    // One host: keep Open MPI's own TCP off other interfaces (a down docker0, test bridges),
    // where its connection attempts can stall start-up.
    let placement = [
        "--oversubscribe",
        "-np",
        &n,
        "--mca",
        "btl_tcp_if_include",
        "lo",
        "--mca",
        "oob_tcp_if_include",
        "lo",
    ];
    mpirun_bench(&placement, env, args)
}

fn table_rows(out: &str) -> Vec<Vec<&str>> {
    out.lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|r| r.len() >= 9 && r[0].parse::<u64>().is_ok())
        .collect()
}

#[test]
fn bench_under_mpirun_bootstraps_over_mpi_and_matches_mpi() {
    if !mpi_tools_present() {
        return;
    }
    let (ok, out) = mpirun(
        3,
        &[],
        &[
            "all_reduce",
            "-b",
            "8",
            "-e",
            "4M",
            "-f",
            "8",
            "-n",
            "3",
            "-w",
            "1",
            "--backend",
            "tcp,mpi",
        ],
    );
    assert!(ok, "{out}");
    assert_eq!(
        out.matches("bootstrapped over MPI").count(),
        3,
        "every rank bootstraps over MPI: {out}"
    );
    assert!(out.contains("Out of bounds values : 0 OK"), "{out}");
    let rows = table_rows(&out);
    for backend in ["tcp", "mpi"] {
        let sizes: Vec<&str> = rows
            .iter()
            .filter(|r| r.last() == Some(&backend))
            .map(|r| r[0])
            .collect();
        assert_eq!(
            sizes,
            ["8", "64", "512", "4096", "32768", "262144", "2097152"],
            "{backend} rows: {out}"
        );
    }
}

#[test]
fn every_collective_and_type_agrees_with_mpi() {
    if !mpi_tools_present() {
        return;
    }
    for (collective, dtype, op) in [
        ("broadcast", "double", "sum"),
        ("all_gather", "int32", "sum"),
        ("reduce_scatter", "int64", "max"),
        ("all_reduce", "uint8", "min"),
        ("all_reduce", "double", "prod"),
    ] {
        let (ok, out) = mpirun(
            4,
            &[],
            &[
                collective,
                "-b",
                "64",
                "-e",
                "1M",
                "-f",
                "32",
                "-n",
                "2",
                "-w",
                "1",
                "-d",
                dtype,
                "-o",
                op,
                "-r",
                "2",
                "--backend",
                "mpi,tcp",
            ],
        );
        assert!(ok, "{collective} {dtype} {op}: {out}");
        assert!(out.contains("Out of bounds values : 0 OK"), "{out}");
        let rows = table_rows(&out);
        assert!(
            rows.iter().any(|r| r.last() == Some(&"mpi"))
                && rows.iter().any(|r| r.last() == Some(&"tcp")),
            "{out}"
        );
        assert!(rows.iter().all(|r| r[8] == "0"), "#wrong column: {out}");
    }
}

#[test]
fn what_mpi_cannot_do_is_refused_clearly() {
    if !mpi_tools_present() {
        return;
    }
    let (ok, out) = mpirun(
        2,
        &[],
        &["-b", "1K", "-e", "1K", "-d", "half", "--backend", "mpi"],
    );
    assert!(!ok);
    assert!(out.contains("MPI has no half datatype"), "{out}");
    let (ok, out) = mpirun(
        2,
        &[],
        &["-b", "1K", "-e", "1K", "-o", "avg", "--backend", "mpi"],
    );
    assert!(!ok);
    assert!(out.contains("MPI has no avg reduction"), "{out}");
}

/// Rank 0 cannot serve the store (its port is taken): the ranks learn why over MPI at once,
/// instead of waiting for a store that never comes.
#[test]
fn a_store_that_cannot_start_fails_every_rank_with_the_reason() {
    if !mpi_tools_present() {
        return;
    }
    let taken = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = taken.local_addr().unwrap().port();
    let (ok, out) = mpirun(
        3,
        &[&format!("MASTER_PORT={port}")],
        &["-b", "8", "-e", "8"],
    );
    assert!(!ok, "{out}");
    // Every rank gets the message; mpirun stops the job when the first of them exits, so the
    // others may be killed before they print it.
    assert!(
        out.contains("rank 0 could not serve the rendezvous store")
            && out.contains("Address already in use"),
        "{out}"
    );
    drop(taken);
}

/// mpirun across namespace hosts (its daemons started through `scripts/netns-rsh.sh`): rank 0
/// picks an interface other hosts can reach for the store (not loopback), says so over MPI, and
/// each rank's ring runs on its own host's address.
#[test]
fn mpirun_across_namespace_hosts_bootstraps_over_mpi() {
    if !mpi_tools_present() || !common::netns::available() {
        return;
    }
    let hosts = common::netns::NetHosts::up(3, None);
    let list: Vec<String> = (0..3).map(|i| hosts.ip(i)).collect();
    let net = format!("{}0/24", hosts.subnet);
    let agent = common::netns::script().with_file_name("netns-rsh.sh");
    let (hosts_arg, agent) = (list.join(","), agent.to_string_lossy().into_owned());
    let placement = [
        "-np",
        "3",
        "--host",
        &hosts_arg,
        "--mca",
        "plm_rsh_agent",
        &agent,
        "--mca",
        "oob_tcp_if_include",
        &net,
        "--mca",
        "btl",
        "self,tcp",
        "--mca",
        "btl_tcp_if_include",
        &net,
    ];
    let (ok, out) = mpirun_bench(
        &placement,
        &[],
        &[
            "all_reduce",
            "-b",
            "8",
            "-e",
            "1M",
            "-f",
            "32",
            "-n",
            "2",
            "-w",
            "1",
            "--backend",
            "tcp,mpi",
        ],
    );
    assert!(ok, "{out}");
    assert!(out.contains("Out of bounds values : 0 OK"), "{out}");
    assert!(
        out.contains(&format!("store={}:", hosts.ip(0))),
        "the store is on host 0's own address: {out}"
    );
    for ip in &list {
        assert!(
            out.contains(&format!("interface=\"eth0\" ip={ip}")),
            "a rank rings from {ip}: {out}"
        );
    }
}
