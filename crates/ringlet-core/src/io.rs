//! Blocking socket I/O bounded by a deadline, for handshakes and control messages. (The data
//! path is non-blocking and lives in `ringlet-transport`.)

use std::fmt;
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// A stream whose blocking reads and writes can be bounded: TCP between hosts, Unix sockets
/// between the ranks of one host.
pub trait TimedStream: Read + Write {
    fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()>;
    fn set_write_timeout(&self, d: Option<Duration>) -> io::Result<()>;
    /// A write that never raises SIGPIPE when the peer has gone (EPIPE instead): a host
    /// process that has not ignored the signal would die of it.
    fn send_quiet(&mut self, buf: &[u8]) -> io::Result<usize>;
}

impl TimedStream for TcpStream {
    fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        TcpStream::set_read_timeout(self, d)
    }
    fn set_write_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        TcpStream::set_write_timeout(self, d)
    }
    fn send_quiet(&mut self, buf: &[u8]) -> io::Result<usize> {
        // std sends with MSG_NOSIGNAL on TCP sockets.
        self.write(buf)
    }
}

impl TimedStream for UnixStream {
    fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        UnixStream::set_read_timeout(self, d)
    }
    fn set_write_timeout(&self, d: Option<Duration>) -> io::Result<()> {
        UnixStream::set_write_timeout(self, d)
    }
    fn send_quiet(&mut self, buf: &[u8]) -> io::Result<usize> {
        send_nosignal(self, buf)
    }
}

/// `send(2)` with `MSG_NOSIGNAL` on a Unix socket (std's `write` on one is a plain `write(2)`).
pub fn send_nosignal(sock: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    use std::os::fd::AsRawFd;
    // SAFETY: `buf` is valid for `buf.len()` bytes for the duration of the call; the fd is
    // open (borrowed from `sock`).
    let n = unsafe {
        libc::send(
            sock.as_raw_fd(),
            buf.as_ptr().cast(),
            buf.len(),
            libc::MSG_NOSIGNAL,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// Why a bounded read or write stopped short.
#[derive(Debug)]
pub enum IoFailure {
    /// The deadline passed first.
    TimedOut,
    /// The peer closed the connection (`read` returned 0).
    Closed,
    Other(io::Error),
}

impl std::fmt::Display for IoFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            IoFailure::TimedOut => f.write_str("deadline passed"),
            IoFailure::Closed => f.write_str("connection closed by peer"),
            IoFailure::Other(e) => write!(f, "{e}"),
        }
    }
}

fn remaining(deadline: Instant) -> Result<std::time::Duration, IoFailure> {
    let left = deadline.saturating_duration_since(Instant::now());
    if left.is_zero() {
        Err(IoFailure::TimedOut)
    } else {
        Ok(left)
    }
}

fn classify(e: io::Error) -> Option<IoFailure> {
    match e.kind() {
        io::ErrorKind::Interrupted => None,
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => Some(IoFailure::TimedOut),
        io::ErrorKind::UnexpectedEof
        | io::ErrorKind::ConnectionReset
        | io::ErrorKind::ConnectionAborted
        | io::ErrorKind::BrokenPipe => Some(IoFailure::Closed),
        _ => Some(IoFailure::Other(e)),
    }
}

/// Fills `buf` completely, or fails once `deadline` has passed.
pub fn read_exact_by<S: TimedStream + ?Sized>(
    stream: &mut S,
    buf: &mut [u8],
    deadline: Instant,
) -> Result<(), IoFailure> {
    let mut done = 0;
    while done < buf.len() {
        stream
            .set_read_timeout(Some(remaining(deadline)?))
            .map_err(IoFailure::Other)?;
        match stream.read(&mut buf[done..]) {
            Ok(0) => return Err(IoFailure::Closed),
            Ok(n) => done += n,
            Err(e) => match classify(e) {
                None => continue,
                Some(IoFailure::TimedOut) if Instant::now() < deadline => continue,
                Some(f) => return Err(f),
            },
        }
    }
    Ok(())
}

/// Writes all of `buf`, or fails once `deadline` has passed.
pub fn write_all_by<S: TimedStream + ?Sized>(
    stream: &mut S,
    buf: &[u8],
    deadline: Instant,
) -> Result<(), IoFailure> {
    let mut done = 0;
    while done < buf.len() {
        stream
            .set_write_timeout(Some(remaining(deadline)?))
            .map_err(IoFailure::Other)?;
        match stream.send_quiet(&buf[done..]) {
            Ok(0) => return Err(IoFailure::Closed),
            Ok(n) => done += n,
            Err(e) => match classify(e) {
                None => continue,
                Some(IoFailure::TimedOut) if Instant::now() < deadline => continue,
                Some(f) => return Err(f),
            },
        }
    }
    Ok(())
}

/// Writes one line to stderr with a single `write(2)`. `eprintln!` writes each formatted piece
/// separately, so a rank that ringrun stops right after a peer's failure could leave only its
/// program's prefix; one write is never cut by a signal, and lines of up to `PIPE_BUF` (4 KiB)
/// from several processes sharing a pipe never interleave.
pub fn stderr_line(args: fmt::Arguments<'_>) {
    let mut line = args.to_string();
    line.push('\n');
    let _ = io::stderr().lock().write_all(line.as_bytes());
}

/// [`stderr_line`] with `format!`'s syntax: `error_line!("ringlet-bench: {e}")`.
#[macro_export]
macro_rules! error_line {
    ($($arg:tt)*) => {
        $crate::io::stderr_line(format_args!($($arg)*))
    };
}
