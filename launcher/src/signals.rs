//! Signals in both directions. Incoming: SIGINT and SIGTERM are recorded instead of killing
//! ringrun (it must stay to stop and reap the ranks), and they, like SIGCHLD, wake the supervisor
//! through a self-pipe so it sleeps until something happens rather than polling hard. Outgoing:
//! signalling a rank's whole process group, so that whatever the rank started goes too.

use signal_hook::consts::{SIGCHLD, SIGINT, SIGTERM};
use std::io::{self, Read};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// The signals ringrun forwards to the ranks.
pub const FORWARDED: [libc::c_int; 2] = [SIGINT, SIGTERM];

/// Installed handlers. They stay for the life of the process: once ringrun has children it must
/// never again die of SIGINT or SIGTERM without reaping them.
pub struct Signals {
    received: Vec<(libc::c_int, Arc<AtomicBool>)>,
    wake: UnixStream,
}

impl Signals {
    /// Must run before the first rank is spawned, so a Ctrl-C during startup is not lost.
    pub fn install() -> io::Result<Signals> {
        let (wake, wake_tx) = UnixStream::pair()?;
        let mut received = Vec::new();
        for sig in FORWARDED {
            let flag = Arc::new(AtomicBool::new(false));
            // The flag is registered before the wake-up so that it is already set when the
            // supervisor wakes and looks.
            signal_hook::flag::register(sig, Arc::clone(&flag))?;
            received.push((sig, flag));
        }
        for sig in [SIGINT, SIGTERM, SIGCHLD] {
            signal_hook::low_level::pipe::register(sig, wake_tx.try_clone()?)?;
        }
        Ok(Signals { received, wake })
    }

    /// A forwarded signal received since the last call, if any (each delivery is reported once;
    /// repeats of the same signal before the call collapse into one).
    pub fn take(&self) -> Option<libc::c_int> {
        self.received
            .iter()
            .find(|(_, flag)| flag.swap(false, Ordering::SeqCst))
            .map(|(sig, _)| *sig)
    }

    /// Sleeps until a signal (including SIGCHLD: a rank changed state) arrives or `timeout`
    /// passes. A signal that came before the call still ends the wait at once: its byte is
    /// waiting in the pipe.
    pub fn wait(&self, timeout: Duration) {
        let timeout = timeout.max(Duration::from_millis(1));
        if self.wake.set_read_timeout(Some(timeout)).is_err() {
            std::thread::sleep(timeout);
            return;
        }
        let mut buf = [0u8; 64];
        // Timeouts, EINTR and spurious wake-ups all just mean "look again".
        let _ = (&self.wake).read(&mut buf);
    }
}

/// Sends `sig` to the process group led by `pgid`. ESRCH (the group is already empty) is not an
/// error: the goal is that nothing in it runs.
pub fn signal_group(pgid: libc::pid_t, sig: libc::c_int) {
    // Never let a bogus id turn into "every process we may signal" (0 / -1 semantics).
    if pgid <= 1 {
        return;
    }
    // SAFETY: killpg takes plain integers and touches no memory of ours. Callers only pass the
    // group of a rank whose leader they have not reaped yet (alive or a zombie), which keeps the
    // id from being reused by an unrelated process group.
    unsafe {
        libc::killpg(pgid, sig);
    }
}

/// "SIGKILL" for 9, for messages.
pub fn name(sig: libc::c_int) -> &'static str {
    signal_hook::low_level::signal_name(sig).unwrap_or("unknown signal")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        assert_eq!(name(libc::SIGKILL), "SIGKILL");
        assert_eq!(name(libc::SIGTERM), "SIGTERM");
    }
}
