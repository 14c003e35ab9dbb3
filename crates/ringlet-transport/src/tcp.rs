//! [`Link`] over two non-blocking TCP connections: one we write to the next rank, one we read
//! from the previous rank. Two sockets rather than one per neighbour keep each direction's
//! buffers and ordering independent (with two ranks, next and previous are the same process).

use crate::setup::Acceptor;
use crate::{Link, Readiness};
use ringlet_core::error::PeerId;
use ringlet_core::{Error, Result};
use std::io::{self, IoSlice, Read};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

pub struct TcpLink {
    rank: usize,
    world_size: usize,
    local: PeerId,
    next: PeerId,
    prev: PeerId,
    to_next: TcpStream,
    from_prev: TcpStream,
    busy_poll: Duration,
    // Keeps refusing (and logging) strangers on our ring port for as long as the link lives.
    _acceptor: Acceptor,
}

impl TcpLink {
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn new(
        rank: usize,
        world_size: usize,
        local: PeerId,
        next: PeerId,
        prev: PeerId,
        to_next: TcpStream,
        from_prev: TcpStream,
        busy_poll: Duration,
        acceptor: Acceptor,
    ) -> Result<TcpLink> {
        for (s, who) in [(&to_next, &next), (&from_prev, &prev)] {
            s.set_nonblocking(true)
                .and_then(|_| s.set_nodelay(true))
                .map_err(|e| Error::io(format!("configuring the connection to {who}"), e))?;
        }
        Ok(TcpLink {
            rank,
            world_size,
            local,
            next,
            prev,
            to_next,
            from_prev,
            busy_poll,
            _acceptor: acceptor,
        })
    }

    fn lost(peer: &PeerId, e: io::Error) -> Error {
        Error::PeerLost {
            peer: peer.clone(),
            detail: format!("connection failed: {e}"),
        }
    }

    /// The next rank never sends on our outgoing connection, so anything readable there is its
    /// hang-up (or garbage).
    fn check_next_alive(&mut self) -> Result<()> {
        let mut probe = [0u8; 1];
        match self.to_next.read(&mut probe) {
            Ok(0) => Err(Error::PeerLost {
                peer: self.next.clone(),
                detail: "it closed the connection".into(),
            }),
            Ok(_) => Err(Error::protocol(
                &self.next,
                "unexpected bytes on the outgoing ring connection",
            )),
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                Ok(())
            }
            Err(e) => Err(Self::lost(&self.next, e)),
        }
    }

    /// One `ppoll` over the sockets we care about; `Ok(true)` when something is ready.
    fn poll_once(&mut self, want_recv: bool, want_send: bool, timeout: Duration) -> Result<bool> {
        let mut fds = [
            libc::pollfd {
                fd: if want_recv {
                    self.from_prev.as_raw_fd()
                } else {
                    -1
                },
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: if want_send {
                    self.to_next.as_raw_fd()
                } else {
                    -1
                },
                events: libc::POLLOUT | libc::POLLIN | libc::POLLRDHUP,
                revents: 0,
            },
        ];
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `fds` is a live array of two initialised pollfd structs whose length we pass;
        // `ts` outlives the call; a null sigmask leaves the signal mask unchanged.
        let n = unsafe {
            libc::ppoll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                &ts,
                std::ptr::null(),
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                return Ok(false);
            }
            return Err(Error::io("waiting on ring connections", e));
        }
        let next_events = fds[1].revents;
        if next_events & (libc::POLLIN | libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
            self.check_next_alive()?;
            if next_events & (libc::POLLHUP | libc::POLLERR) != 0 {
                return Err(Error::PeerLost {
                    peer: self.next.clone(),
                    detail: "the connection broke".into(),
                });
            }
        }
        Ok(n > 0)
    }
}

impl Link for TcpLink {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn local(&self) -> &PeerId {
        &self.local
    }

    fn next(&self) -> &PeerId {
        &self.next
    }

    fn prev(&self) -> &PeerId {
        &self.prev
    }

    fn send(&mut self, bufs: &[IoSlice<'_>]) -> Result<usize> {
        // sendmsg with MSG_NOSIGNAL: writev to a reset connection would raise SIGPIPE, which kills
        // a host process that has not ignored it (a C++ or Python embedding, say).
        let socket = socket2::SockRef::from(&self.to_next);
        loop {
            return match socket.send_vectored_with_flags(bufs, libc::MSG_NOSIGNAL) {
                Ok(n) => Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(Self::lost(&self.next, e)),
            };
        }
    }

    fn recv(&mut self, buf: &mut [u8]) -> Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        loop {
            return match self.from_prev.read(buf) {
                Ok(0) => Err(Error::PeerLost {
                    peer: self.prev.clone(),
                    detail: "it closed the connection".into(),
                }),
                Ok(n) => Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(Self::lost(&self.prev, e)),
            };
        }
    }

    fn wait(&mut self, want_recv: bool, want_send: bool, deadline: Instant) -> Result<Readiness> {
        // Polling briefly saves the sleep and wake-up of a blocking poll. Yield between polls:
        // the kernel work that completes a loopback delivery needs a CPU too.
        if !self.busy_poll.is_zero() {
            let spin_until = (Instant::now() + self.busy_poll).min(deadline);
            while Instant::now() < spin_until {
                if self.poll_once(want_recv, want_send, Duration::ZERO)? {
                    return Ok(Readiness::Ready);
                }
                std::thread::yield_now();
            }
        }
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Readiness::TimedOut);
            }
            if self.poll_once(want_recv, want_send, left)? {
                return Ok(Readiness::Ready);
            }
        }
    }
}
