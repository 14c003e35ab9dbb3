//! The local backend: every rank is a child process of ringrun on this machine. This module owns
//! finding the program, spawning the ranks (each in its own process group, with a parent-death
//! signal and piped output) and supervising them to the end: the first failure stops the others,
//! forwarded signals, SIGKILL after the grace period, and reaping every child on every path.

use crate::job::{BindTo, Ended, JobSpec, Outcome};
use crate::output::{self, Target};
use crate::signals::{self, Signals};
use ringlet_store::StoreServer;
use std::ffi::OsStr;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc::{self, Receiver, Sender};
use std::time::{Duration, Instant};

/// Upper bound on one sleep of the supervisor. SIGCHLD normally wakes it at once; this only
/// bounds the damage of a lost wake-up.
const SAFETY_NET: Duration = Duration::from_millis(200);
/// How long to wait for a finished rank's last output before printing ringrun's verdict on it,
/// so the rank's own error message comes first.
const RANK_OUTPUT_WAIT: Duration = Duration::from_millis(200);
/// How long the other ranks have, after the first failure, to end on their own before ringrun
/// stops them. A rank that fails at the same moment (a disk-full error that every rank agrees
/// to fail on, say) then prints its own cause instead of being cut off by SIGTERM; a rank that
/// hangs is stopped this much later.
pub const FAILURE_GRACE: Duration = Duration::from_millis(500);
/// How long to wait at the end for output still in flight. Only a process that escaped its
/// rank's process group (setsid) can hold a pipe open longer; ringrun does not wait for it.
const FINAL_OUTPUT_WAIT: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot find program `{program}` in PATH or next to ringrun ({dir})")]
    NotFound { program: String, dir: String },
    #[error("cannot execute `{program}`: {source}")]
    Exec { program: String, source: io::Error },
    #[error("{what}: {source}")]
    Io {
        what: &'static str,
        source: io::Error,
    },
}

impl LaunchError {
    fn outcome(&self) -> Outcome {
        match self {
            LaunchError::NotFound { .. } | LaunchError::Exec { .. } => Outcome::LaunchFailed,
            LaunchError::Io { .. } => Outcome::Error,
        }
    }
}

/// Runs the job to completion. `signals` must have been installed before this is called.
/// `store`: the rendezvous store ringrun serves for the attempt, watched (with `--min-ranks`) for
/// the survivors' member lists.
pub fn run(spec: &JobSpec, signals: &Signals, store: Option<&StoreServer>) -> Ended {
    let program = match resolve_program(&spec.program) {
        Ok(p) => p,
        Err(e) => {
            note!("{e}");
            return Ended::new(e.outcome());
        }
    };
    let (done_tx, done_rx) = mpsc::channel();
    let mut sup = Supervisor::new(spec, done_rx);
    sup.store = store;
    for rank in 0..spec.world_size {
        if let Err(e) = sup.spawn(rank, &program, &done_tx, false) {
            note!("{e}");
            sup.kill_all_now();
            sup.await_all_output();
            return Ended::new(e.outcome());
        }
    }
    // Replacements need a sender of their own; otherwise only the pumps hold senders now, so
    // the channel reports when the last one is gone.
    if spec.min_ranks.is_some() && spec.replacements > 0 {
        sup.replacing = Some((program, done_tx));
    } else {
        drop(done_tx);
    }
    let outcome = sup.supervise(signals);
    sup.replacing = None;
    sup.await_all_output();
    // A rank killed from outside explains the job's end better than a peer that then failed.
    let cause = match sup.first_failure.take() {
        Some((first, true)) => Some(first),
        first => sup.killed_outside.take().or(first.map(|(what, _)| what)),
    };
    Ended {
        outcome,
        cause,
        replaced: sup.replaced,
    }
}

/// The CPUs rank `rank` is pinned to, if any (see `--bind-to`).
fn cpu_for(rank: usize, spec: &JobSpec) -> Option<libc::cpu_set_t> {
    if spec.bind_to == BindTo::None {
        return None;
    }
    // SAFETY: cpu_set_t is plain bits, valid when zeroed; sched_getaffinity writes at most
    // size_of::<cpu_set_t>() bytes into it; CPU_ISSET/CPU_SET index within its fixed size.
    unsafe {
        let mut allowed: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut allowed) == -1 {
            return None;
        }
        let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &allowed))
            .collect();
        let block = match spec.bind_to {
            _ if cpus.is_empty() => return None,
            BindTo::Auto if cpus.len() < spec.world_size => return None,
            // An equal share each, so a rank's own thread pools keep their cores.
            BindTo::Auto => cpus.len() / spec.world_size,
            _ => 1,
        };
        let first = (rank * block) % cpus.len();
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        for &cpu in &cpus[first..first + block] {
            libc::CPU_SET(cpu, &mut set);
        }
        Some(set)
    }
}

/// Like execvp, plus a fallback to ringrun's own directory so that binaries built next to it
/// (`target/release/ringlet-bench`) run without being installed.
pub fn resolve_program(program: &OsStr) -> Result<PathBuf, LaunchError> {
    if program.as_bytes().contains(&b'/') {
        return Ok(PathBuf::from(program));
    }
    let own_dir = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(Path::to_path_buf));
    let not_found = || LaunchError::NotFound {
        program: program.to_string_lossy().into_owned(),
        dir: own_dir
            .as_deref()
            .map_or_else(|| "unknown".into(), |d| d.display().to_string()),
    };
    if program.is_empty() {
        return Err(not_found());
    }
    if let Some(path) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&path) {
            // POSIX: an empty PATH entry means the current directory.
            let dir = if dir.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                dir
            };
            let candidate = dir.join(program);
            if is_executable_file(&candidate) {
                return Ok(candidate);
            }
        }
    }
    if let Some(dir) = &own_dir {
        let candidate = dir.join(program);
        // Not checking the mode here: if it is there but not executable, spawning says so,
        // which is a better message than "not found".
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(not_found())
}

fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

struct Rank {
    rank: usize,
    pid: libc::pid_t,
    child: Child,
    /// Set once reaped; from then on its pid and group id may belong to someone else.
    end: Option<ExitStatus>,
    /// The signal ringrun sent to stop it, if it did.
    asked_with: Option<libc::c_int>,
    /// Set when it was SIGKILLed for outliving the grace period: how long it had had.
    killed_after: Option<Duration>,
    /// The survivors of a failure formed an epoch without it (`--min-ranks`): it was stopped.
    left_out: bool,
    /// A replacement not yet in a member list the store holds (it is not left out of the
    /// epochs formed before it joins).
    joining: bool,
    pumps_done: usize,
}

struct Shutdown {
    outcome: Outcome,
    started: Instant,
    kill_at: Instant,
    killed: bool,
}

struct Supervisor<'a> {
    spec: &'a JobSpec,
    ranks: Vec<Rank>,
    done_rx: Receiver<usize>,
    shutdown: Option<Shutdown>,
    /// When the ranks are stopped after a failure (see [`FAILURE_GRACE`]).
    stop_at: Option<Instant>,
    /// How the first rank to fail on its own ended, for a restart's log line, and whether a
    /// signal killed it.
    first_failure: Option<(String, bool)>,
    /// A rank killed by a signal nobody here sent, seen while stopping the others.
    killed_outside: Option<String>,
    /// With `--min-ranks`: the store to watch for member lists, the newest epoch seen, and
    /// whether the job went on without a rank.
    store: Option<&'a StoreServer>,
    epoch_seen: u64,
    went_on: bool,
    /// With `--min-ranks` and restarts left: the program and a pump sender, to start
    /// replacements for failed ranks; how many were started.
    replacing: Option<(std::path::PathBuf, Sender<usize>)>,
    replaced: u32,
}

impl<'a> Supervisor<'a> {
    fn new(spec: &'a JobSpec, done_rx: Receiver<usize>) -> Self {
        Supervisor {
            spec,
            ranks: Vec::with_capacity(spec.world_size),
            done_rx,
            shutdown: None,
            stop_at: None,
            first_failure: None,
            killed_outside: None,
            store: None,
            epoch_seen: 0,
            went_on: false,
            replacing: None,
            replaced: 0,
        }
    }

    /// Must be called from the thread that supervises until the end: the kernel delivers the
    /// parent-death signal when the *thread* that forked a child exits, not the process.
    /// `replacement`: the process stands in for a failed rank and joins the running job.
    fn spawn(
        &mut self,
        rank: usize,
        program: &Path,
        done: &Sender<usize>,
        replacement: bool,
    ) -> Result<(), LaunchError> {
        let mut cmd = Command::new(program);
        cmd.arg0(&self.spec.program)
            .args(&self.spec.args)
            .envs(self.spec.rank_env(rank));
        if replacement {
            cmd.env(crate::job::REPLACEMENT_ENV, "1");
        }
        cmd
            // N ranks sharing a terminal's input cannot work, and in their own process groups
            // they would be stopped by SIGTTIN for trying.
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // Its own group lets ringrun signal the rank together with anything it starts, and
            // keeps the terminal's Ctrl-C from reaching ranks behind ringrun's back.
            .process_group(0);
        let parent = std::process::id() as libc::pid_t;
        let cpu = cpu_for(rank, self.spec);
        // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
        // work is allowed (another thread may have held a lock, e.g. the allocator's, at fork
        // time). It only makes the prctl, getppid and sched_setaffinity system calls, which take
        // no locks and do not allocate (the CPU set was built before the fork), and builds its
        // errors with io::Error::last_os_error / from_raw_os_error, which do not allocate either.
        unsafe {
            cmd.pre_exec(move || {
                // Binding is a hint: if the CPU set changed meanwhile, run unbound.
                if let Some(set) = &cpu {
                    libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), set);
                }
                // Ranks die with ringrun even when it is SIGKILLed and cannot clean up.
                if libc::prctl(
                    libc::PR_SET_PDEATHSIG,
                    libc::SIGKILL as libc::c_ulong,
                    0,
                    0,
                    0,
                ) == -1
                {
                    return Err(io::Error::last_os_error());
                }
                // ringrun may have died between fork and prctl; then no signal will ever come.
                if libc::getppid() != parent {
                    return Err(io::Error::from_raw_os_error(libc::ESRCH));
                }
                Ok(())
            });
        }
        let mut child = cmd.spawn().map_err(|source| LaunchError::Exec {
            program: program.display().to_string(),
            source,
        })?;
        let pid = child.id() as libc::pid_t;
        let stdout = child.stdout.take();
        let stderr = child.stderr.take();
        // Recorded before anything else can fail, so the error path kills and reaps it.
        let id = self.ranks.len();
        self.ranks.push(Rank {
            rank,
            pid,
            child,
            end: None,
            asked_with: None,
            killed_after: None,
            left_out: false,
            joining: replacement,
            pumps_done: 0,
        });
        let pump_err = |source| LaunchError::Io {
            what: "cannot start an output thread",
            source,
        };
        match stdout {
            Some(s) => drop(
                output::spawn_pump(rank, id, s, Target::Stdout, done.clone()).map_err(pump_err)?,
            ),
            None => self.ranks[id].pumps_done += 1,
        }
        match stderr {
            Some(s) => drop(
                output::spawn_pump(rank, id, s, Target::Stderr, done.clone()).map_err(pump_err)?,
            ),
            None => self.ranks[id].pumps_done += 1,
        }
        Ok(())
    }

    fn supervise(&mut self, signals: &Signals) -> Outcome {
        loop {
            self.reap_exited();
            if self.spec.min_ranks.is_some() && self.shutdown.is_none() {
                self.stop_left_out();
                self.stop_unjoined();
            }
            while let Some(sig) = signals.take() {
                self.on_signal(sig);
            }
            let now = Instant::now();
            let stop_due = self.stop_at.is_some_and(|t| now >= t);
            let all_ended = self.ranks.iter().all(|r| r.end.is_some());
            if self.shutdown.is_none() && (stop_due || (all_ended && self.stop_at.is_some())) {
                self.begin_shutdown(Outcome::RankFailed, libc::SIGTERM);
            }
            if all_ended {
                break;
            }
            let mut nap = SAFETY_NET;
            if let (Some(t), None) = (self.stop_at, &self.shutdown) {
                nap = nap.min(t.saturating_duration_since(now));
            }
            if let Some(s) = &self.shutdown {
                if !s.killed {
                    let now = Instant::now();
                    if now >= s.kill_at {
                        self.kill_remaining(self.spec.kill_grace);
                        continue;
                    }
                    nap = nap.min(s.kill_at - now);
                }
            }
            signals.wait(nap);
        }
        let outcome = self
            .shutdown
            .as_ref()
            .map_or(Outcome::Success, |s| s.outcome);
        if self.went_on && outcome == Outcome::Success {
            // A replacement that never joined did no work.
            let finished = self
                .ranks
                .iter()
                .filter(|r| !r.joining && r.end.is_some_and(|s| s.success()))
                .count();
            note!(
                "the job finished with {finished} of {} ranks (--min-ranks)",
                self.spec.world_size
            );
        }
        outcome
    }

    /// Stops the ranks the survivors of a failure left out of their newest epoch (hung ones,
    /// or ones too late to be counted): nobody will talk to them again.
    fn stop_left_out(&mut self) {
        let Some(store) = self.store else { return };
        let Some((epoch, members)) = crate::job::newest_members(store, self.epoch_seen) else {
            return;
        };
        self.epoch_seen = epoch;
        note!(
            "the survivors formed epoch {epoch} with ranks {members:?} ({} of {})",
            members.len(),
            self.spec.world_size
        );
        for r in self.ranks.iter_mut() {
            if r.joining && members.contains(&r.rank) {
                r.joining = false;
            }
            if r.end.is_none() && !r.left_out && !r.joining && !members.contains(&r.rank) {
                note!(
                    "rank {} (pid {}) was left out of epoch {epoch}; stopping it",
                    r.rank,
                    r.pid
                );
                signals::signal_group(r.pid, libc::SIGKILL);
                r.asked_with = Some(libc::SIGKILL);
                r.left_out = true;
                self.went_on = true;
            }
        }
    }

    fn reap_exited(&mut self) {
        let mut failed = false;
        let mut lost = Vec::new();
        for i in 0..self.ranks.len() {
            if self.ranks[i].end.is_some() {
                continue;
            }
            let pid = self.ranks[i].pid;
            let status = match exited_unreaped(pid) {
                Ok(false) => continue,
                Ok(true) => {
                    // The leader is a zombie, which keeps its group id from being reused, so
                    // this reaches only what the rank left behind. Those would be orphans, and
                    // they would hold our output pipes open.
                    signals::signal_group(pid, libc::SIGKILL);
                    match self.ranks[i].child.wait() {
                        Ok(status) => status,
                        Err(_) => continue,
                    }
                }
                // waitid itself failed (it should not); reap the plain way.
                Err(_) => match self.ranks[i].child.try_wait() {
                    Ok(Some(status)) => status,
                    _ => continue,
                },
            };
            self.ranks[i].end = Some(status);
            if self.report_end(i, status) {
                failed = true;
                lost.push(self.ranks[i].rank);
            }
        }
        // The others are stopped after a grace, so ranks that end on their own meanwhile are
        // reported as they ended, with their own last words, not as stopped by ringrun.
        if failed && self.shutdown.is_none() && self.stop_at.is_none() {
            if let Some(k) = self.spec.min_ranks {
                let running = self
                    .ranks
                    .iter()
                    .filter(|r| r.end.is_none() && !r.left_out)
                    .count();
                if running >= k {
                    note!(
                        "going on with {running} of {} ranks (--min-ranks {k}): the survivors re-form without it",
                        self.spec.world_size
                    );
                    self.went_on = true;
                    for rank in lost {
                        self.replace(rank);
                    }
                    return;
                }
                note!("{running} ranks left, fewer than --min-ranks {k}: stopping the job");
            }
            self.stop_at = Some(Instant::now() + FAILURE_GRACE);
        }
    }

    /// Stops replacements still waiting to join once every other rank has ended: nobody is
    /// left to admit them (the program may not admit replacements at all). Not a failure.
    fn stop_unjoined(&mut self) {
        let others_ended = self.ranks.iter().all(|r| r.end.is_some() || r.joining);
        if !others_ended {
            return;
        }
        for r in self.ranks.iter_mut() {
            if r.joining && r.end.is_none() && r.asked_with.is_none() {
                note!(
                    "the job ended before rank {}'s replacement (pid {}) joined; stopping it",
                    r.rank,
                    r.pid
                );
                signals::signal_group(r.pid, libc::SIGKILL);
                r.asked_with = Some(libc::SIGKILL);
                r.left_out = true;
            }
        }
    }

    /// Starts a replacement for failed rank `rank` while the allowance lasts; it joins the
    /// running job at the survivors' next step boundary.
    fn replace(&mut self, rank: usize) {
        let Some((program, done)) = self.replacing.clone() else {
            return;
        };
        if self.replaced >= self.spec.replacements {
            return;
        }
        self.replaced += 1;
        note!(
            "starting a replacement for rank {rank} ({}/{} of --max-restarts); it joins at the next step boundary",
            self.replaced + self.spec.restart,
            self.spec.restart + self.spec.replacements
        );
        if let Err(e) = self.spawn(rank, &program, &done, true) {
            note!("cannot start the replacement for rank {rank}: {e}");
        }
    }

    /// Prints how the rank ended where that is news; returns whether it counts as a failure.
    fn report_end(&mut self, i: usize, status: ExitStatus) -> bool {
        let r = &self.ranks[i];
        let failed = r.asked_with.is_none() && !status.success();
        if r.asked_with.is_none() && !failed {
            return false;
        }
        self.await_rank_output(i, RANK_OUTPUT_WAIT);
        let r = &self.ranks[i];
        let (rank, pid) = (r.rank, r.pid);
        if let Some(killed_after) = r
            .killed_after
            .filter(|_| status.signal() == Some(libc::SIGKILL))
        {
            let asked = r.asked_with.filter(|&s| s != libc::SIGKILL);
            match asked {
                Some(sig) => note!(
                    "stopped rank {rank} (pid {pid}) with SIGKILL: still running {} s after {}",
                    secs(killed_after),
                    signals::name(sig)
                ),
                None => note!("stopped rank {rank} (pid {pid}) with SIGKILL"),
            }
        } else if let Some(sig) = r.asked_with {
            // Killed by a signal ringrun did not send, while being stopped: something outside
            // killed it, most likely before the failure that made us stop the job (its peers
            // noticed first). That is the cause worth naming.
            if status.signal().is_some_and(|s| s != sig) {
                self.killed_outside
                    .get_or_insert(format!("rank {rank} (pid {pid}) {}", describe(status)));
            }
            if status.signal() == Some(sig) {
                note!(
                    "stopped rank {rank} (pid {pid}) with {}",
                    signals::name(sig)
                );
            } else {
                note!(
                    "stopped rank {rank} (pid {pid}) with {}; it {}",
                    signals::name(sig),
                    describe(status)
                );
            }
        } else {
            let what = format!("rank {rank} (pid {pid}) {}", describe(status));
            note!("{what}");
            self.first_failure
                .get_or_insert((what, status.signal().is_some()));
        }
        failed
    }

    fn on_signal(&mut self, sig: libc::c_int) {
        let name = signals::name(sig);
        if self.shutdown.is_none() && self.stop_at.is_some() {
            // A rank already failed and the others were about to be stopped: as while
            // stopping, the signal decides the exit status and nobody waits out a grace.
            note!("got {name} after a rank failed; killing the ranks now");
            self.begin_shutdown(Outcome::Signalled(sig), sig);
            self.kill_remaining(Duration::ZERO);
            return;
        }
        let Some(s) = self.shutdown.as_mut() else {
            note!(
                "got {name}; forwarding it to the ranks (SIGKILL after {} s)",
                secs(self.spec.kill_grace)
            );
            self.begin_shutdown(Outcome::Signalled(sig), sig);
            return;
        };
        // Asked while stopping (twice, or after a rank failed): the signal decides the exit
        // status (no restart), even when the ranks are already being killed; and the user does
        // not want to wait out the grace period.
        s.outcome = Outcome::Signalled(sig);
        if !s.killed {
            let since = s.started.elapsed();
            note!("got {name} while stopping the ranks; killing them now");
            self.kill_remaining(since);
        }
    }

    /// Asks every running rank to stop with `sig` and starts the grace period. The first cause
    /// is the one ringrun's exit status reports.
    fn begin_shutdown(&mut self, outcome: Outcome, sig: libc::c_int) {
        let now = Instant::now();
        self.shutdown = Some(Shutdown {
            outcome,
            started: now,
            kill_at: now.checked_add(self.spec.kill_grace).unwrap_or(now),
            killed: false,
        });
        for r in self.ranks.iter_mut().filter(|r| r.end.is_none()) {
            signals::signal_group(r.pid, sig);
            r.asked_with = Some(sig);
        }
    }

    /// SIGKILLs whatever still runs, `since` the ranks were asked to stop (for the report).
    fn kill_remaining(&mut self, since: Duration) {
        if let Some(s) = &mut self.shutdown {
            s.killed = true;
        }
        for r in self.ranks.iter_mut().filter(|r| r.end.is_none()) {
            signals::signal_group(r.pid, libc::SIGKILL);
            r.killed_after = Some(since);
            r.asked_with.get_or_insert(libc::SIGKILL);
        }
    }

    /// The launch failed part-way: nothing to report, nothing worth waiting for.
    fn kill_all_now(&mut self) {
        for r in self.ranks.iter_mut().filter(|r| r.end.is_none()) {
            signals::signal_group(r.pid, libc::SIGKILL);
            r.end = r.child.wait().ok();
        }
    }

    fn await_rank_output(&mut self, i: usize, within: Duration) {
        let deadline = Instant::now() + within;
        while self.ranks[i].pumps_done < 2 && self.take_pump_done(deadline) {}
    }

    fn await_all_output(&mut self) {
        let deadline = Instant::now() + FINAL_OUTPUT_WAIT;
        while self.ranks.iter().any(|r| r.pumps_done < 2) && self.take_pump_done(deadline) {}
    }

    /// Records one finished pump; false once `deadline` passes or no pump is left.
    fn take_pump_done(&mut self, deadline: Instant) -> bool {
        let left = deadline.saturating_duration_since(Instant::now());
        match self.done_rx.recv_timeout(left) {
            Ok(id) => {
                if let Some(r) = self.ranks.get_mut(id) {
                    r.pumps_done += 1;
                }
                true
            }
            Err(_) => false,
        }
    }
}

/// Whether `pid` has exited, without reaping it: while it is an unreaped zombie its pid and
/// process-group id cannot be reused, so its group can still be signalled safely.
fn exited_unreaped(pid: libc::pid_t) -> io::Result<bool> {
    // SAFETY: siginfo_t is plain old data, valid when all zero; a zero si_pid is also how
    // waitid(WNOHANG) tells "nothing to report" apart from an event.
    let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
    // SAFETY: `info` is a valid, writable siginfo_t for the duration of the call. WNOWAIT leaves
    // the child unreaped, so std's Child keeps sole ownership of reaping it.
    let rc = unsafe {
        libc::waitid(
            libc::P_PID,
            pid as libc::id_t,
            &mut info,
            libc::WEXITED | libc::WNOHANG | libc::WNOWAIT,
        )
    };
    if rc == -1 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: waitid reports child events with SIGCHLD-style siginfo (or left it zeroed), for
    // which si_pid is the field in use.
    Ok(unsafe { info.si_pid() } != 0)
}

/// "0.5", "5", "0.123": seconds for messages, to the millisecond.
fn secs(d: Duration) -> String {
    (d.as_millis() as f64 / 1000.0).to_string()
}

/// "exited with status 3", "was killed by signal 9 (SIGKILL)".
pub fn describe(status: ExitStatus) -> String {
    if let Some(code) = status.code() {
        format!("exited with status {code}")
    } else if let Some(sig) = status.signal() {
        let core = if status.core_dumped() {
            " (core dumped)"
        } else {
            ""
        };
        format!("was killed by signal {sig} ({}){core}", signals::name(sig))
    } else {
        format!("ended with {status}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn describes_exit_codes_and_signals() {
        assert_eq!(
            describe(ExitStatus::from_raw(3 << 8)),
            "exited with status 3"
        );
        assert_eq!(
            describe(ExitStatus::from_raw(libc::SIGKILL)),
            "was killed by signal 9 (SIGKILL)"
        );
    }

    #[test]
    fn resolves_through_path_and_leaves_paths_alone() {
        let sh = resolve_program(OsStr::new("sh")).unwrap();
        assert!(sh.is_absolute() || sh.starts_with("."), "{sh:?}");
        assert_eq!(
            resolve_program(OsStr::new("./x")).unwrap(),
            PathBuf::from("./x")
        );
        let err = resolve_program(OsStr::new("no-such-program-ringrun-test")).unwrap_err();
        assert!(err.to_string().contains("cannot find program"), "{err}");
    }
}
