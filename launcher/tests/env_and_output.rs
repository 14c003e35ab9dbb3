//! The environment contract each rank sees, program lookup, and how the ranks' output is relayed.

mod common;

use common::{ringrun, ringrun_sh, run};
use std::collections::BTreeMap;
use std::time::Duration;

const T: Duration = Duration::from_secs(20);

const ENV_SCRIPT: &str = r#"echo "R=$RANK W=$WORLD_SIZE LR=$LOCAL_RANK LW=$LOCAL_WORLD_SIZE A=$MASTER_ADDR P=$MASTER_PORT TOK=${RINGLET_JOB_TOKEN:-none} TO=${RINGLET_TIMEOUT:-unset} S=${RINGLET_STORE_ADDR:-unset}""#;

/// rank -> (key -> value), from the `[rank] K=V ...` lines ENV_SCRIPT prints.
fn parse_env_lines(lines: &[String]) -> BTreeMap<usize, BTreeMap<String, String>> {
    let mut by_rank = BTreeMap::new();
    for line in lines {
        let (prefix, rest) = line.split_once("] ").expect("prefixed line");
        let rank: usize = prefix.trim_start_matches('[').parse().unwrap();
        let kv = rest
            .split_whitespace()
            .map(|p| {
                let (k, v) = p.split_once('=').unwrap();
                (k.to_owned(), v.to_owned())
            })
            .collect();
        assert!(by_rank.insert(rank, kv).is_none(), "rank {rank} twice");
    }
    by_rank
}

#[test]
fn every_rank_gets_the_torchrun_contract_and_a_generated_token() {
    let out = run(ringrun_sh(4, &[], ENV_SCRIPT), T);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let env = parse_env_lines(&out.stdout_lines());
    assert_eq!(
        env.keys().copied().collect::<Vec<_>>(),
        [0, 1, 2, 3],
        "{out:?}"
    );
    let token = &env[&0]["TOK"];
    assert_eq!(token.len(), 64, "{out:?}");
    assert!(token.chars().all(|c| c.is_ascii_hexdigit()), "{token}");
    let port: u16 = env[&0]["P"].parse().unwrap();
    assert_ne!(port, 0);
    for (rank, kv) in &env {
        assert_eq!(kv["R"], rank.to_string());
        assert_eq!(kv["LR"], rank.to_string());
        assert_eq!(kv["W"], "4");
        assert_eq!(kv["LW"], "4");
        assert_eq!(kv["A"], "127.0.0.1");
        assert_eq!(kv["P"], port.to_string(), "one port for all ranks");
        assert_eq!(&kv["TOK"], token, "one token for all ranks");
        assert_eq!(kv["TO"], "unset");
        assert_eq!(kv["S"], env[&0]["S"], "one store for all ranks");
    }
    let store = &env[&0]["S"];
    assert!(
        store.starts_with("127.0.0.1:") && store != &format!("127.0.0.1:{port}"),
        "{out:?}"
    );
    // A fresh token per job.
    let again = run(ringrun_sh(1, &[], ENV_SCRIPT), T);
    assert_ne!(&parse_env_lines(&again.stdout_lines())[&0]["TOK"], token);
}

#[test]
fn inherited_token_and_explicit_flags_are_passed_on() {
    let mut cmd = ringrun_sh(
        2,
        &[
            "--master-addr",
            "127.0.0.2",
            "--master-port",
            "4242",
            "--timeout",
            "2.5",
        ],
        ENV_SCRIPT,
    );
    cmd.env("RINGLET_JOB_TOKEN", "caller-secret");
    let out = run(cmd, T);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let env = parse_env_lines(&out.stdout_lines());
    assert_eq!(env.len(), 2, "{out:?}");
    for kv in env.values() {
        assert_eq!(kv["TOK"], "caller-secret");
        assert_eq!(kv["A"], "127.0.0.2");
        assert_eq!(kv["P"], "4242");
        assert_eq!(kv["TO"], "2.5");
    }
}

#[test]
fn an_empty_inherited_token_is_replaced() {
    let mut cmd = ringrun_sh(1, &[], ENV_SCRIPT);
    cmd.env("RINGLET_JOB_TOKEN", "");
    let out = run(cmd, T);
    assert_eq!(
        parse_env_lines(&out.stdout_lines())[&0]["TOK"].len(),
        64,
        "{out:?}"
    );
}

#[test]
fn stdout_and_stderr_are_prefixed_and_a_last_partial_line_is_flushed() {
    let out = run(
        ringrun_sh(
            2,
            &[],
            r#"echo "out $RANK"; echo "err $RANK" >&2; printf '\377 raw\n'; printf "tail $RANK""#,
        ),
        T,
    );
    assert_eq!(out.code(), Some(0), "{out:?}");
    for rank in 0..2 {
        for line in [
            format!("[{rank}] out {rank}\n"),
            format!("[{rank}] tail {rank}\n"),
        ] {
            assert!(
                out.stdout.iter().any(|l| *l == line.as_bytes()),
                "missing {line:?}: {out:?}"
            );
        }
        let raw = format!("[{rank}] \u{fffd} raw").into_bytes();
        assert!(
            !out.stdout.iter().any(|l| l.starts_with(&raw)),
            "bytes were altered"
        );
        assert!(
            out.stdout
                .iter()
                .any(|l| *l == [format!("[{rank}] ").as_bytes(), b"\xff raw\n"].concat()),
            "non-UTF-8 bytes not passed through: {out:?}"
        );
        assert!(
            out.stderr.contains(&format!("[{rank}] err {rank}\n")),
            "{out:?}"
        );
    }
    assert_eq!(out.stdout.len(), 6, "{out:?}");
}

#[test]
fn lines_are_never_interleaved() {
    // Long lines from several ranks at once: each must come out whole, after its own prefix.
    let script = r#"i=0; while [ $i -lt 300 ]; do echo "r$RANK-$i-xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx-end"; i=$((i+1)); done"#;
    let out = run(ringrun_sh(4, &[], script), T);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let lines = out.stdout_lines();
    assert_eq!(lines.len(), 4 * 300);
    for line in &lines {
        let (prefix, rest) = line.split_once("] ").unwrap();
        let rank = prefix.trim_start_matches('[');
        assert!(rest.starts_with(&format!("r{rank}-")), "{line}");
        assert!(rest.ends_with("x-end"), "{line}");
        assert_eq!(line.matches('[').count(), 1, "{line}");
    }
}

#[test]
fn a_missing_program_is_one_clear_error_and_127() {
    let mut cmd = ringrun();
    cmd.args(["-n", "3", "--", "ringrun-test-no-such-program"]);
    let out = run(cmd, T);
    assert_eq!(out.code(), Some(127), "{out:?}");
    assert_eq!(out.stderr.lines().count(), 1, "{out:?}");
    assert!(
        out.stderr
            .contains("cannot find program `ringrun-test-no-such-program`"),
        "{out:?}"
    );
    assert!(out.stdout.is_empty());
}

#[test]
fn a_program_that_cannot_be_executed_is_127() {
    let dir = std::env::temp_dir().join(format!("ringrun-test-noexec-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("not-executable");
    std::fs::write(&file, "#!/bin/sh\necho hi\n").unwrap();
    let mut cmd = ringrun();
    cmd.args(["-n", "2", "--"]).arg(&file);
    let out = run(cmd, T);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(out.code(), Some(127), "{out:?}");
    assert_eq!(out.stderr.lines().count(), 1, "{out:?}");
    assert!(out.stderr.contains("cannot execute"), "{out:?}");
    assert!(out.stderr.contains("Permission denied"), "{out:?}");

    let mut cmd = ringrun();
    cmd.args(["-n", "2", "--", "./ringrun-test-no-such-file"]);
    let out = run(cmd, T);
    assert_eq!(out.code(), Some(127), "{out:?}");
    assert!(out.stderr.contains("No such file"), "{out:?}");
}

#[test]
fn programs_next_to_ringrun_are_found_without_path() {
    use std::os::unix::fs::PermissionsExt;
    let bin_dir = std::path::Path::new(env!("CARGO_BIN_EXE_ringrun"))
        .parent()
        .unwrap()
        .to_path_buf();
    let name = format!("ringrun-test-sibling-{}", std::process::id());
    let path = bin_dir.join(&name);
    std::fs::write(&path, "#!/bin/sh\necho \"sibling $RANK $1\"\n").unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut cmd = ringrun();
    // PATH still has to find `sh` for the #! line, but not the helper itself.
    cmd.env("PATH", "/usr/bin:/bin")
        .args(["-n", "2", "--", &name, "arg"]);
    let out = run(cmd, T);
    let _ = std::fs::remove_file(&path);
    assert_eq!(out.code(), Some(0), "{out:?}");
    let mut lines = out.stdout_lines();
    lines.sort();
    assert_eq!(lines, ["[0] sibling 0 arg", "[1] sibling 1 arg"]);
}

#[test]
fn usage_errors_exit_2() {
    let mut cmd = ringrun();
    cmd.args(["-n", "0", "--", "true"]);
    assert_eq!(run(cmd, T).code(), Some(2));
    let mut cmd = ringrun();
    cmd.args(["-n", "2", "--timeout", "0", "--", "true"]);
    assert_eq!(run(cmd, T).code(), Some(2));
    let mut cmd = ringrun();
    cmd.args(["-n", "2", "--timeout=-1", "--", "true"]);
    assert_eq!(run(cmd, T).code(), Some(2));
    // An inherited bad timeout is refused once, by ringrun, before any rank starts.
    for bad in ["0", "-3", "soon"] {
        let mut cmd = ringrun();
        cmd.env("RINGLET_TIMEOUT", bad)
            .args(["-n", "2", "--", "sh", "-c", "echo started"]);
        let out = run(cmd, T);
        assert_eq!(out.code(), Some(2), "{out:?}");
        assert!(out.stdout.is_empty(), "{out:?}");
        let lines: Vec<&str> = out.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{out:?}");
        assert!(
            lines[0].starts_with(&format!("ringrun: RINGLET_TIMEOUT={bad}: ")),
            "{out:?}"
        );
    }
}

/// The CPUs each rank may run on, from `/proc/self/status`, by rank.
fn allowed_cpus(flags: &[&str], n: usize) -> BTreeMap<usize, String> {
    let out = run(
        ringrun_sh(
            n,
            flags,
            "grep Cpus_allowed_list /proc/self/status | cut -f2",
        ),
        T,
    );
    assert_eq!(out.code(), Some(0), "{out:?}");
    out.stdout_lines()
        .iter()
        .map(|l| {
            let (prefix, cpus) = l.split_once("] ").expect("prefixed line");
            (
                prefix.trim_start_matches('[').parse().unwrap(),
                cpus.to_owned(),
            )
        })
        .collect()
}

/// This process's `Cpus_allowed_list` (e.g. `0-1`), which ranks inherit unless pinned.
fn own_cpu_list() -> String {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .unwrap()
        .trim()
        .to_owned()
}

fn own_cpus() -> Vec<usize> {
    own_cpu_list()
        .split(',')
        .flat_map(|part| match part.split_once('-') {
            Some((a, b)) => (a.parse().unwrap()..=b.parse().unwrap()).collect::<Vec<usize>>(),
            None => vec![part.parse().unwrap()],
        })
        .collect()
}

#[test]
fn ranks_are_pinned_to_one_cpu_each_when_there_are_enough() {
    // As many ranks as CPUs: each gets a block of exactly one.
    let cpus = own_cpus();
    let n = cpus.len();
    let pinned = allowed_cpus(&[], n);
    for (rank, list) in &pinned {
        assert_eq!(list, &cpus[*rank].to_string(), "rank {rank} of {n}");
    }
    let forced = allowed_cpus(&["--bind-to", "core"], cpus.len() + 1);
    assert_eq!(
        forced[&cpus.len()],
        cpus[0].to_string(),
        "--bind-to core wraps round"
    );
}

#[test]
fn ranks_are_not_pinned_when_outnumbering_cpus_or_asked_not_to() {
    let ours = own_cpu_list();
    for list in allowed_cpus(&[], own_cpus().len() + 1).values() {
        assert_eq!(list, &ours);
    }
    for list in allowed_cpus(&["--bind-to", "none"], 2).values() {
        assert_eq!(list, &ours);
    }
}

/// Ringlet's ranks find each other through the store ringrun serves, not one on rank 0: the job
/// runs though another process holds MASTER_PORT (which stays the program's to use).
#[test]
fn ringlet_ranks_use_ringruns_store_and_leave_master_port_alone() {
    let bench = std::path::Path::new(env!("CARGO_BIN_EXE_ringrun")).with_file_name("ringlet-bench");
    assert!(
        bench.exists(),
        "{} is missing: build the workspace (cargo test --workspace --release)",
        bench.display()
    );
    let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = holder.local_addr().unwrap().port().to_string();
    let mut cmd = ringrun();
    cmd.args(["-n", "3", "--master-port", &port, "--"])
        .arg(&bench)
        .args(["all_reduce", "-b", "1K", "-e", "4K"]);
    let out = run(cmd, T);
    assert_eq!(out.code(), Some(0), "{out:?}");
    assert!(
        out.stdout_lines()
            .iter()
            .any(|l| l == "[0] # Out of bounds values : 0 OK"),
        "{out:?}"
    );
    drop(holder);
}
