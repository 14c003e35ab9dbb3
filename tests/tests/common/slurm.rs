//! A private single-host Slurm cluster for tests: its own munge daemon, key and socket, a
//! `slurmctld` and a `slurmd` on free ports, all state under one temporary directory, the
//! daemons children of the test (killed with it). Dropping the cluster cancels its jobs, stops
//! the daemons (slurmd first: otherwise it retries the dead controller for seconds) and removes
//! every trace, including step daemons that outlive slurmd.
//!
//! The node is called `localhost` (address 127.0.0.1), so the host list Slurm hands the tasks
//! resolves anywhere, whatever this machine's name.

use super::{free_port, run_bounded};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub struct Cluster {
    pub dir: PathBuf,
    conf: PathBuf,
    daemons: Vec<(&'static str, Child)>,
}

/// Whether Slurm and munge are installed (skip outside CI, fail in CI).
pub fn available() -> bool {
    super::have_tool("slurmctld", &["-V"], "apt-get install slurm-wlm")
        && super::have_tool("slurmd", &["-V"], "apt-get install slurm-wlm")
        // srun reads a configuration even for --version; this only asks whether it is there.
        && super::have_tool("sh", &["-c", "command -v srun"], "apt-get install slurm-client")
        && super::have_tool("munged", &["--version"], "apt-get install munge")
}

fn daemon(cmd: &mut Command, log: &Path) -> Child {
    let out = std::fs::File::create(log).expect("daemon log");
    // SAFETY: prctl(PR_SET_DEATHSIG) only changes this child's own signal disposition; it is
    // async-signal-safe, as pre_exec requires.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone().expect("log"))
        .stderr(out)
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"))
}

impl Cluster {
    pub fn start() -> Cluster {
        let dir = std::env::temp_dir().join(format!(
            "ringlet-slurm-{}-{}",
            std::process::id(),
            free_port()
        ));
        for sub in ["munge", "state", "spool", "log"] {
            std::fs::create_dir_all(dir.join(sub)).expect("cluster dir");
        }
        // munged insists that everyone may traverse the directories above its socket.
        for d in [dir.clone(), dir.join("munge")] {
            let _ = Command::new("chmod").arg("755").arg(&d).status();
        }
        let conf = dir.join("slurm.conf");
        let mut cluster = Cluster {
            dir: dir.clone(),
            conf: conf.clone(),
            daemons: Vec::new(),
        };
        let key = dir.join("munge/munge.key");
        let socket = dir.join("munge/munge.socket");
        let made = Command::new("mungekey")
            .args(["-c", "-k"])
            .arg(&key)
            .status()
            .is_ok_and(|s| s.success());
        assert!(made, "mungekey failed");
        let munged = daemon(
            Command::new("munged")
                .arg("-F")
                .arg("-S")
                .arg(&socket)
                .arg(format!("--key-file={}", key.display()))
                .arg(format!(
                    "--pid-file={}",
                    dir.join("munge/munged.pid").display()
                ))
                .arg(format!(
                    "--seed-file={}",
                    dir.join("munge/munged.seed").display()
                ))
                .arg(format!(
                    "--log-file={}",
                    dir.join("log/munged.log").display()
                )),
            &dir.join("log/munged.out"),
        );
        cluster.daemons.push(("munged", munged));
        cluster.wait_until("munged's socket", || socket.exists());

        let (ctld_port, slurmd_port) = (free_port(), free_port());
        let d = dir.display();
        std::fs::write(dir.join("plugstack.conf"), "").expect("plugstack.conf");
        std::fs::write(
            &conf,
            format!(
                "ClusterName=ringlet\n\
                 SlurmctldHost=localhost(127.0.0.1)\n\
                 SlurmUser=root\nSlurmdUser=root\n\
                 SlurmctldPort={ctld_port}\nSlurmdPort={slurmd_port}\n\
                 AuthType=auth/munge\nCredType=cred/munge\nAuthInfo=socket={d}/munge/munge.socket\n\
                 StateSaveLocation={d}/state\nSlurmdSpoolDir={d}/spool\n\
                 SlurmctldPidFile={d}/slurmctld.pid\nSlurmdPidFile={d}/slurmd.pid\n\
                 SlurmctldLogFile={d}/log/slurmctld.log\nSlurmdLogFile={d}/log/slurmd.log\n\
                 ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n\
                 JobAcctGatherType=jobacct_gather/none\nAccountingStorageType=accounting_storage/none\n\
                 JobCompType=jobcomp/none\nMpiDefault=none\nSwitchType=switch/none\n\
                 SchedulerType=sched/builtin\nSelectType=select/cons_tres\nSelectTypeParameters=CR_CPU\n\
                 SlurmdParameters=config_overrides\nReturnToService=2\nMailProg=/bin/true\n\
                 PlugStackConfig={d}/plugstack.conf\n\
                 NodeName=localhost NodeAddr=127.0.0.1 CPUs=64 State=UNKNOWN\n\
                 PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP\n"
            ),
        )
        .expect("slurm.conf");
        let ctld = daemon(
            Command::new("slurmctld").arg("-D").env("SLURM_CONF", &conf),
            &dir.join("log/slurmctld.out"),
        );
        cluster.daemons.push(("slurmctld", ctld));
        let slurmd = daemon(
            Command::new("slurmd")
                .args(["-D", "-N", "localhost"])
                .env("SLURM_CONF", &conf),
            &dir.join("log/slurmd.out"),
        );
        cluster.daemons.push(("slurmd", slurmd));
        // The port first: sinfo against a closed port retries for ~9 s.
        cluster.wait_until("slurmctld's port", || {
            std::net::TcpStream::connect(("127.0.0.1", ctld_port)).is_ok()
        });
        cluster.wait_until("the node to be idle", || {
            let (st, out) = run_bounded(
                Command::new("sinfo")
                    .args(["-h", "-N", "-o", "%T"])
                    .env("SLURM_CONF", &conf),
                Duration::from_secs(15),
            );
            st.is_some_and(|s| s.success()) && out.trim() == "idle"
        });
        cluster
    }

    /// Polls `ready` for up to 30 s, failing early (with the logs) if a daemon died.
    fn wait_until(&mut self, what: &str, mut ready: impl FnMut() -> bool) {
        let end = Instant::now() + Duration::from_secs(30);
        while !ready() {
            let died = self
                .daemons
                .iter_mut()
                .find_map(|(name, child)| child.try_wait().ok().flatten().map(|st| (*name, st)));
            if let Some((name, st)) = died {
                panic!(
                    "{name} exited ({st}) while waiting for {what}:\n{}",
                    self.logs()
                );
            }
            assert!(
                Instant::now() < end,
                "no {what} after 30 s:\n{}",
                self.logs()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn logs(&self) -> String {
        let mut all = String::new();
        for name in ["munged.out", "slurmctld.out", "slurmd.out"] {
            let text = std::fs::read_to_string(self.dir.join("log").join(name)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            all += &format!(
                "--- {name}\n{}\n",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        all
    }

    /// `srun ARGS` against this cluster, killed after `limit` (srun waits forever for resources
    /// it cannot get).
    pub fn srun(
        &self,
        args: &[&str],
        env: &[(&str, String)],
        limit: Duration,
    ) -> (Option<ExitStatus>, String) {
        let mut cmd = Command::new("srun");
        cmd.args(args).env("SLURM_CONF", &self.conf);
        for var in [
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "LOCAL_WORLD_SIZE",
            "MASTER_ADDR",
        ] {
            cmd.env_remove(var);
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        run_bounded(&mut cmd, limit)
    }

    fn quiet(&self, program: &str, args: &[&str]) -> String {
        run_bounded(
            Command::new(program)
                .args(args)
                .env("SLURM_CONF", &self.conf),
            Duration::from_secs(10),
        )
        .1
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Jobs first, while the daemons can still clean up after them.
        self.quiet("scancel", &["-u", "root"]);
        let end = Instant::now() + Duration::from_secs(10);
        while Instant::now() < end && !self.quiet("squeue", &["-h", "-o", "%i"]).trim().is_empty() {
            std::thread::sleep(Duration::from_millis(50));
        }
        for name in ["slurmd", "slurmctld", "munged"] {
            if let Some((_, child)) = self.daemons.iter_mut().find(|(n, _)| *n == name) {
                // SAFETY: kill(2) on our own unreaped child; no memory is involved.
                unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
                let end = Instant::now() + Duration::from_secs(3);
                while Instant::now() < end && matches!(child.try_wait(), Ok(None)) {
                    std::thread::sleep(Duration::from_millis(20));
                }
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        // slurmstepd detaches (setsid) and ignores SIGTERM; it and its tasks carry our SLURM_CONF.
        let marker = format!("SLURM_CONF={}", self.conf.display());
        if let Ok(procs) = std::fs::read_dir("/proc") {
            for p in procs.flatten() {
                let Ok(pid) = p.file_name().to_string_lossy().parse::<i32>() else {
                    continue;
                };
                let environ = std::fs::read(p.path().join("environ")).unwrap_or_default();
                if pid != std::process::id() as i32
                    && environ.split(|&b| b == 0).any(|kv| kv == marker.as_bytes())
                {
                    // SAFETY: kill(2) on a process that carries this cluster's configuration.
                    unsafe { libc::kill(pid, libc::SIGKILL) };
                }
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
