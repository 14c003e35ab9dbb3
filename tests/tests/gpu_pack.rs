//! `scripts/gpu-pack.sh` and `scripts/gpu-check.sh`, for real, on a machine without a GPU.
//!
//! The pack is what a GPU machine without Rust receives (carried, at most 64 MiB a call): it is
//! built here from the units `cargo test --workspace --release` has already built (the script
//! builds with `--workspace`, so nothing is compiled again in another feature set), and must
//! hold stripped, runnable binaries within 40 MiB in a folder git ignores. The check then runs
//! against that pack with `OUT` set: the GPU steps must fail quickly and clearly (no hang), the
//! whole run must end within its deadline (`GPU_CHECK_BUDGET_S`, 150 s here instead of the 360 s
//! a GPU machine gets), and its JSON must name every step.

mod common;

use common::{have_tool, run_bounded, wait_bounded};
use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

const BINARIES: [&str; 6] = [
    "ringrun",
    "ringlet-train",
    "ringlet-bench",
    "ringlet-gpu-check",
    "ringlet-train-tests",
    "ringlet-serve-tests",
];
const LIMIT_BYTES: u64 = 40 << 20;
/// The check's deadline in these tests (seconds), and what its last steps may add past it
/// (`timeout -k 5`, the report).
const BUDGET_S: u64 = 150;
const BUDGET_SLACK_S: u64 = 20;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .expect("the repository root")
}

/// `cmd`'s exit status (None: killed at `limit`), stdout and stderr, kept apart (the pack's
/// path is stdout's last line).
fn run_split(cmd: &mut Command, limit: Duration) -> (Option<ExitStatus>, String, String) {
    use std::os::unix::process::CommandExt;
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let readers: Vec<_> = [
        Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
        Box::new(child.stderr.take().unwrap()),
    ]
    .into_iter()
    .map(|mut pipe| {
        std::thread::spawn(move || {
            let mut s = String::new();
            let _ = pipe.read_to_string(&mut s);
            s
        })
    })
    .collect();
    let status = wait_bounded(&mut child, limit);
    let mut out = readers.into_iter().map(|r| r.join().unwrap_or_default());
    (status, out.next().unwrap(), out.next().unwrap())
}

struct Pack {
    /// As printed: relative to the repository root.
    rel: String,
    dir: PathBuf,
    stdout: String,
    seconds: f64,
}

/// Runs scripts/gpu-pack.sh once for every test of this file.
fn pack() -> &'static Pack {
    static PACK: OnceLock<Result<Pack, String>> = OnceLock::new();
    let made = PACK.get_or_init(|| {
        let root = root();
        let t = Instant::now();
        // The cargo that runs these tests builds the pack (CARGO is set by cargo for tests);
        // a tree `cargo test --workspace --release` built needs no compilation, a partial one
        // may take minutes.
        let (status, stdout, stderr) = run_split(
            Command::new(root.join("scripts/gpu-pack.sh")).current_dir(&root),
            Duration::from_secs(1500),
        );
        let seconds = t.elapsed().as_secs_f64();
        let all = format!("--- stdout\n{stdout}--- stderr\n{stderr}");
        match status {
            Some(st) if st.success() => {}
            Some(st) => return Err(format!("gpu-pack.sh failed ({st}):\n{all}")),
            None => return Err(format!("gpu-pack.sh ran past 1500 s:\n{all}")),
        }
        let rel = stdout.lines().last().unwrap_or("").trim().to_string();
        println!("gpu-pack.sh: {seconds:.1} s\n{stdout}");
        Ok(Pack {
            dir: root.join(&rel),
            rel,
            stdout,
            seconds,
        })
    });
    match made {
        Ok(p) => p,
        Err(e) => panic!("{e}"),
    }
}

/// Section names of a 64-bit little-endian ELF file.
fn elf_sections(path: &Path) -> Vec<String> {
    let b = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert!(
        b.len() > 64 && b[..4] == *b"\x7fELF" && b[4] == 2 && b[5] == 1,
        "{}: not a 64-bit little-endian ELF file",
        path.display()
    );
    let at = |o: usize, n: usize| -> usize {
        let mut v = [0u8; 8];
        v[..n].copy_from_slice(&b[o..o + n]);
        u64::from_le_bytes(v) as usize
    };
    let (shoff, shentsize, shnum, shstrndx) = (at(0x28, 8), at(0x3a, 2), at(0x3c, 2), at(0x3e, 2));
    let header = |i: usize| shoff + i * shentsize;
    let names = at(header(shstrndx) + 0x18, 8);
    (0..shnum)
        .map(|i| {
            let start = names + at(header(i), 4);
            let len = b[start..].iter().position(|&c| c == 0).expect("a name");
            String::from_utf8_lossy(&b[start..start + len]).into_owned()
        })
        .collect()
}

#[test]
fn the_pack_holds_stripped_runnable_binaries_within_the_carry_limit() {
    let p = pack();
    let root = root();
    assert!(
        !p.rel.is_empty() && Path::new(&p.rel).is_relative() && !p.rel.contains(".."),
        "the last line must be the pack's path relative to the repository root:\n{}",
        p.stdout
    );
    assert!(p.dir.is_dir(), "{} is not a directory", p.dir.display());
    // Carried, not copied with the working tree: git must ignore it.
    if root.join(".git").exists() && have_tool("git", &["--version"], "apt-get install git") {
        let ignored = Command::new("git")
            .args(["check-ignore", "-q", &p.rel])
            .current_dir(&root)
            .status()
            .expect("git check-ignore");
        assert!(ignored.success(), "git does not ignore {}", p.rel);
    }

    let mut total = 0;
    for entry in std::fs::read_dir(&p.dir).expect("the pack") {
        total += entry.expect("an entry").metadata().expect("its size").len();
    }
    println!("pack {}: {total} bytes", p.rel);
    assert!(
        total <= LIMIT_BYTES,
        "{} holds {total} bytes, over {LIMIT_BYTES}",
        p.rel
    );

    for name in BINARIES {
        let path = p.dir.join(name);
        let meta = std::fs::metadata(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        assert!(meta.is_file(), "{}: not a file", path.display());
        assert!(
            meta.permissions().mode() & 0o111 == 0o111,
            "{}: not executable",
            path.display()
        );
        let sections = elf_sections(&path);
        // .debug_gdb_scripts is loaded data (rustc's pretty-printer hint), not debug info.
        let debug: Vec<&String> = sections
            .iter()
            .filter(|s| s.starts_with(".debug_") && *s != ".debug_gdb_scripts")
            .collect();
        assert!(debug.is_empty(), "{name} keeps debug sections {debug:?}");
        assert!(
            !sections.iter().any(|s| s == ".symtab"),
            "{name} keeps its symbol table"
        );
        println!("{name}: {} bytes, stripped", meta.len());
    }

    // They run (stripping broke nothing).
    for name in [
        "ringrun",
        "ringlet-train",
        "ringlet-bench",
        "ringlet-gpu-check",
    ] {
        let (st, out) = run_bounded(
            Command::new(p.dir.join(name)).arg("--help"),
            Duration::from_secs(30),
        );
        assert!(st.is_some_and(|s| s.success()), "{name} --help:\n{out}");
    }
    // The test binaries hold the GPU tests the check runs (by the filter it passes them).
    for (name, filter, prefix) in [
        ("ringlet-train-tests", "gpu::", "gpu::"),
        ("ringlet-serve-tests", "gpu", "scorer::tests::gpu_"),
    ] {
        let (st, out) = run_bounded(
            Command::new(p.dir.join(name)).args([filter, "--list"]),
            Duration::from_secs(30),
        );
        assert!(st.is_some_and(|s| s.success()), "{name} --list:\n{out}");
        assert!(
            out.lines()
                .any(|l| l.starts_with(prefix) && l.ends_with(": test")),
            "no {prefix} test in {name}:\n{out}"
        );
    }
    let manifest = std::fs::read_to_string(p.dir.join("MANIFEST")).expect("the MANIFEST");
    assert!(manifest.contains("total:"), "{manifest}");
    println!("gpu-pack.sh took {:.1} s", p.seconds);
}

/// One step of gpu-check.json.
#[derive(Debug)]
struct Step {
    status: String,
    exit: Option<i32>,
    seconds: f64,
    name: String,
    key: String,
}

/// gpu-check.json, read by Python's json module (the file must be valid JSON with every field):
/// the overall exit and the steps.
fn read_report(json: &Path) -> (i32, Vec<Step>) {
    const READ: &str = r#"
import json, sys
d = json.load(open(sys.argv[1]))
for k in ("script", "pack", "gpu", "budget_s", "elapsed_s", "exit", "steps"):
    assert k in d, "no " + k
print("exit\t%d" % d["exit"])
for s in d["steps"]:
    for k in ("n", "name", "command", "exit", "seconds", "status", "key", "figures"):
        assert k in s, "step without %s: %r" % (k, s)
    assert s["status"] in ("pass", "fail", "timeout", "not-run"), s
    assert isinstance(s["figures"], dict), s
    assert (s["exit"] is None) == (s["status"] == "not-run"), s
    print("\t".join(["step", s["status"], "-" if s["exit"] is None else str(s["exit"]),
                     str(s["seconds"]), s["name"], s["key"].replace("\t", " ")]))
"#;
    let out = Command::new("python3")
        .arg("-c")
        .arg(READ)
        .arg(json)
        .output()
        .expect("python3");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{} is not the expected JSON: {}\n{}",
        json.display(),
        String::from_utf8_lossy(&out.stderr),
        std::fs::read_to_string(json).unwrap_or_default()
    );
    let mut exit = None;
    let mut steps = Vec::new();
    for line in text.lines() {
        let f: Vec<&str> = line.split('\t').collect();
        match f[0] {
            "exit" => exit = Some(f[1].parse().expect("an exit code")),
            "step" => steps.push(Step {
                status: f[1].into(),
                exit: f[2].parse().ok(),
                seconds: f[3].parse().expect("seconds"),
                name: f[4].into(),
                key: f.get(5).unwrap_or(&"").to_string(),
            }),
            _ => panic!("unexpected line {line}"),
        }
    }
    (exit.expect("the exit"), steps)
}

/// Every step of gpu-check.sh, by a part of its name, and whether it needs a GPU.
const STEPS: [(&str, bool); 27] = [
    ("kernels compile", false),
    ("kernels vs CPU reference", true),
    ("gpu:: unit tests", true),
    ("ringlet-serve gpu tests", true),
    ("1 rank, --device gpu", true),
    ("1 rank, --device cpu", false),
    ("loss curves GPU vs CPU", true),
    ("2 ranks sharing the GPU", true),
    ("mixed: rank 0 GPU, rank 1 CPU", true),
    ("throughput, --device gpu", true),
    ("throughput, --device cpu", false),
    ("NCCL world=1 all_reduce", true),
    ("NCCL world=1 broadcast", true),
    ("NCCL world=1 all_gather", true),
    ("NCCL world=1 reduce_scatter", true),
    ("2 procs, float sum", true),
    ("2 procs, half sum", true),
    ("2 procs, bfloat16 max", true),
    ("2 procs, float avg", true),
    ("2 procs, broadcast", true),
    ("host ring for comparison, 2 procs", false),
    ("4 procs, float sum", true),
    ("4 procs, half sum", true),
    ("4 procs, bfloat16 max", true),
    ("4 procs, float avg", true),
    ("4 procs, broadcast", true),
    ("host ring for comparison, 4 procs", false),
];

/// The steps in order, each matched by exactly one name.
fn assert_every_step(steps: &[Step]) {
    let names: Vec<&str> = steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(steps.len(), STEPS.len(), "steps: {names:#?}");
    for (i, (part, _)) in STEPS.iter().enumerate() {
        assert!(
            steps[i].name.contains(part),
            "step {}: {:?}, expected one naming {part:?}; steps: {names:#?}",
            i + 1,
            steps[i].name
        );
    }
}

/// The exit the script promises: the first failing step's (1 where its command succeeded but
/// its output failed the check; 124 for a step not run for lack of time), 0 when all pass.
fn expected_exit(steps: &[Step]) -> i32 {
    steps
        .iter()
        .find(|s| s.status != "pass")
        .map_or(0, |s| match (s.status.as_str(), s.exit) {
            ("not-run", _) => 124,
            (_, Some(0)) => 1,
            (_, Some(code)) => code,
            (_, None) => 124,
        })
}

fn out_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("ringlet-gpu-check-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn the_check_without_a_gpu_fails_fast_within_its_deadline_and_reports_every_step() {
    if Command::new("nvidia-smi")
        .arg("-L")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
    {
        ringlet_core::skipped!("this machine has a GPU; run scripts/gpu-check.sh itself here");
        return;
    }
    if !have_tool("python3", &["--version"], "apt-get install python3") {
        return;
    }
    let p = pack();
    let root = root();
    let out = out_dir("nogpu");
    let t = Instant::now();
    let (status, log) = run_bounded(
        Command::new(root.join("scripts/gpu-check.sh"))
            .arg(&p.rel)
            .current_dir(&root)
            .env("OUT", &out)
            .env("GPU_CHECK_BUDGET_S", BUDGET_S.to_string()),
        Duration::from_secs(BUDGET_S + 60),
    );
    let took = t.elapsed();
    let status =
        status.unwrap_or_else(|| panic!("gpu-check.sh ran past {BUDGET_S} + 60 s:\n{log}"));
    println!("gpu-check.sh: {status} in {took:.1?}");
    assert!(
        took <= Duration::from_secs(BUDGET_S + BUDGET_SLACK_S),
        "gpu-check.sh took {took:?} with a budget of {BUDGET_S} s:\n{log}"
    );
    assert!(
        !status.success(),
        "gpu-check.sh passed without a GPU:\n{log}"
    );
    for f in ["gpu-check.json", "gpu-check.txt", "gpu-check.log"] {
        assert!(out.join(f).is_file(), "no {f} in {}:\n{log}", out.display());
    }

    let (exit, steps) = read_report(&out.join("gpu-check.json"));
    assert_every_step(&steps);
    assert_eq!(
        status.code(),
        Some(exit),
        "the exit status and the JSON's:\n{log}"
    );
    assert_eq!(exit, expected_exit(&steps), "{steps:#?}");
    let table = std::fs::read_to_string(out.join("gpu-check.txt")).expect("the table");
    for s in &steps {
        assert!(
            table.contains(&s.name),
            "{} missing from the table:\n{table}",
            s.name
        );
        assert!(log.contains(&s.name), "{} missing from stdout", s.name);
    }
    assert!(log.contains("cannot host a multi-rank NCCL ring"), "{log}");

    for ((_, needs_gpu), s) in STEPS.iter().zip(&steps) {
        if *needs_gpu {
            // Quickly, and saying why: not a hang cut by the deadline, not a pass.
            assert_eq!(s.status, "fail", "{s:?}");
            assert!(s.seconds < 30.0, "{s:?} took {} s to fail", s.seconds);
            assert!(!s.key.is_empty(), "{s:?} fails without a reason");
        }
    }
    let by_name = |part: &str| {
        steps
            .iter()
            .find(|s| s.name.contains(part))
            .expect("a step")
    };
    for part in [
        "host ring for comparison, 2",
        "host ring for comparison, 4",
        "1 rank, --device cpu",
    ] {
        let s = by_name(part);
        assert_eq!(s.status, "pass", "{s:?}");
    }
    // Slow on a small machine: the deadline may cut it, which must then be said.
    let s = by_name("throughput, --device cpu");
    assert!(s.status == "pass" || s.status == "timeout", "{s:?}");
    assert!(by_name("host ring for comparison, 2")
        .key
        .contains("peak busbw"));
    assert!(by_name("1 rank, --device cpu").key.contains("samples/s"));
    for part in ["gpu:: unit tests", "ringlet-serve gpu tests"] {
        assert!(by_name(part).key.contains("SKIPPED"), "{:?}", by_name(part));
    }

    // NVRTC and its compile check need no GPU: CI installs pip's NVRTC, so there it must pass.
    let compile = &steps[0];
    let step_log = std::fs::read_to_string(out.join("gpu-check.log")).unwrap_or_default();
    if std::env::var_os("CI").is_none() && step_log.contains("NVRTC: not found") {
        ringlet_core::skipped!("no NVRTC here (pip install nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12); the compile step failed: {}", compile.key);
    } else {
        assert_eq!(compile.status, "pass", "{compile:?}\n{step_log}");
        assert!(compile.key.starts_with("NVRTC "), "{compile:?}");
    }
    let _ = std::fs::remove_dir_all(&out);
}

#[test]
fn a_spent_budget_leaves_every_step_visibly_not_run() {
    if !have_tool("python3", &["--version"], "apt-get install python3") {
        return;
    }
    let root = root();
    let out = out_dir("nobudget");
    let (status, log) = run_bounded(
        Command::new(root.join("scripts/gpu-check.sh"))
            .arg("target/no-such-pack")
            .current_dir(&root)
            .env("OUT", &out)
            .env("GPU_CHECK_BUDGET_S", "0"),
        Duration::from_secs(30),
    );
    let status = status.unwrap_or_else(|| panic!("gpu-check.sh with no budget ran 30 s:\n{log}"));
    assert_eq!(status.code(), Some(124), "{log}");
    let (exit, steps) = read_report(&out.join("gpu-check.json"));
    assert_eq!(exit, 124);
    assert_every_step(&steps);
    for s in &steps {
        assert_eq!(s.status, "not-run", "{s:?}");
        assert_eq!(s.key, "not run: out of time", "{s:?}");
    }
    let table = std::fs::read_to_string(out.join("gpu-check.txt")).expect("the table");
    assert_eq!(
        table.matches("not run: out of time").count(),
        STEPS.len(),
        "{table}"
    );
    let _ = std::fs::remove_dir_all(&out);
}
