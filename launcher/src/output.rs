//! Relaying the ranks' output: one pump thread per rank stream copies it line by line to ringrun's
//! own stdout or stderr with a `[RANK] ` prefix. Works on any byte source, so a backend only has to
//! hand over the read ends of whatever it started.

use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::sync::mpsc::Sender;
use std::thread::JoinHandle;

/// ringrun's own one-line messages on stderr, `ringrun: ...`, each in one write. Unlike
/// `eprintln!` this never panics: a closed stderr must not stop ringrun from stopping and reaping
/// the ranks.
macro_rules! note {
    ($($arg:tt)*) => {
        $crate::output::note_line(format_args!($($arg)*))
    };
}

pub fn note_line(args: fmt::Arguments<'_>) {
    ringlet_core::error_line!("ringrun: {args}");
}

/// Where a pumped line goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Stdout,
    Stderr,
}

/// A line longer than this is cut and relayed in pieces, so a rank that never writes a newline
/// (a progress bar redrawn with `\r`) cannot make ringrun buffer without bound.
pub const MAX_LINE: usize = 1 << 20;

/// The line as written: prefix, the rank's bytes untouched (they need not be UTF-8), and a newline
/// if the rank's last line had none, so the next prefix starts on a fresh line.
pub fn prefixed(rank: usize, line: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(line.len() + 8);
    out.extend_from_slice(format!("[{rank}] ").as_bytes());
    out.extend_from_slice(line);
    if !line.ends_with(b"\n") {
        out.push(b'\n');
    }
    out
}

/// Copies `source` to `target` until EOF, then sends `rank` on `done` (so the caller can wait for
/// all pumps with a deadline instead of joining threads that a stray grandchild keeps alive).
/// `id` is what `done` receives when the source ends (the process's slot: a replacement shares
/// its rank with the process it replaces).
pub fn spawn_pump(
    rank: usize,
    id: usize,
    source: impl Read + Send + 'static,
    target: Target,
    done: Sender<usize>,
) -> io::Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name(format!("ringrun-out-{rank}"))
        .spawn(move || {
            pump(rank, source, target);
            let _ = done.send(id);
        })
}

fn pump(rank: usize, source: impl Read, target: Target) {
    let mut reader = BufReader::new(source);
    let mut line = Vec::new();
    // Once our own output is gone (reader closed the pipe) we keep draining, so ranks never
    // block on a full pipe.
    let mut sink_ok = true;
    loop {
        line.clear();
        match reader
            .by_ref()
            .take(MAX_LINE as u64)
            .read_until(b'\n', &mut line)
        {
            Ok(0) => return,
            Ok(_) => {
                if sink_ok {
                    sink_ok = write_whole(target, &prefixed(rank, &line)).is_ok();
                }
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => {
                // A read error on a pipe means the rank is gone; flush what we have.
                if !line.is_empty() && sink_ok {
                    let _ = write_whole(target, &prefixed(rank, &line));
                }
                return;
            }
        }
    }
}

/// One locked write per line: the lock is what keeps two ranks' lines from interleaving.
pub fn write_whole(target: Target, bytes: &[u8]) -> io::Result<()> {
    match target {
        Target::Stdout => {
            let mut out = io::stdout().lock();
            out.write_all(bytes)?;
            out.flush()
        }
        Target::Stderr => {
            let mut err = io::stderr().lock();
            err.write_all(bytes)?;
            err.flush()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_keeps_newline_and_adds_missing_one() {
        assert_eq!(prefixed(3, b"hi\n"), b"[3] hi\n");
        assert_eq!(prefixed(0, b"tail"), b"[0] tail\n");
        assert_eq!(prefixed(1, b"\xff\xfe\n"), b"[1] \xff\xfe\n");
    }
}
