//! [`Peers`] over TCP: per peer, one connection we write (we opened it) and one we read (the
//! peer opened it). Two sockets rather than one per pair keep each direction's buffers and
//! ordering independent, and make "who connects" unambiguous: whoever first sends.
//!
//! Connections to the ring neighbours are made when the job forms ([`join`](crate::join)); the
//! others when a schedule first names the peer ([`Peers::connect`]), and are kept until the
//! communicator closes. Connections from peers arrive through our port's acceptor thread,
//! which wakes a waiting engine through a socket pair.

use crate::setup::{connect_peer, Acceptor, Arrivals, JoinOptions};
use crate::{Interest, Peers, Readiness};
use ringlet_core::error::PeerId;
use ringlet_core::{Error, JobToken, Result};
use std::io::{self, IoSlice, Read};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

pub struct TcpPeers {
    opts: JoinOptions,
    token: JobToken,
    local: PeerId,
    /// Every rank's published address; `None` until learned (the ring neighbours' at join, the
    /// rest from [`learn_addresses`](Self::learn_addresses)).
    addrs: Vec<Option<String>>,
    /// Connections we opened and write to.
    to: Vec<Option<TcpStream>>,
    /// Connections the peers opened, which we read.
    from: Vec<Option<TcpStream>>,
    arrivals: Arc<Arrivals>,
    // Keeps admitting peers (and refusing, and logging, strangers) for as long as we live.
    _acceptor: Acceptor,
}

impl TcpPeers {
    pub(crate) fn new(
        opts: JoinOptions,
        token: JobToken,
        local: PeerId,
        arrivals: Arc<Arrivals>,
        acceptor: Acceptor,
    ) -> TcpPeers {
        let n = opts.world_size;
        let mut addrs = vec![None; n];
        addrs[opts.rank] = Some(local.addr.clone());
        TcpPeers {
            opts,
            token,
            local,
            addrs,
            to: (0..n).map(|_| None).collect(),
            from: (0..n).map(|_| None).collect(),
            arrivals,
            _acceptor: acceptor,
        }
    }

    /// Records `rank`'s published address.
    pub(crate) fn know(&mut self, rank: usize, addr: String) {
        self.addrs[rank] = Some(addr);
    }

    /// Adopts an open, authenticated connection to `rank`.
    pub(crate) fn adopt_to(&mut self, rank: usize, stream: TcpStream) -> Result<()> {
        configure(&stream, &self.peer(rank))?;
        self.to[rank] = Some(stream);
        Ok(())
    }

    /// Every rank's address, in rank order, as the ranks agreed them after joining: later
    /// connections go there. An address that contradicts one already known is refused.
    pub fn learn_addresses(&mut self, addrs: Vec<String>) -> Result<()> {
        if addrs.len() != self.addrs.len() {
            return Err(Error::Broken(format!(
                "{} addresses for a world of {}",
                addrs.len(),
                self.addrs.len()
            )));
        }
        for (rank, addr) in addrs.into_iter().enumerate() {
            if let Some(known) = &self.addrs[rank] {
                if *known != addr {
                    return Err(Error::Config(format!(
                        "rank {rank} is known at {known} but announced {addr}"
                    )));
                }
            }
            self.addrs[rank] = Some(addr);
        }
        Ok(())
    }

    fn check_rank(&self, peer: usize) -> Result<()> {
        if peer >= self.opts.world_size || peer == self.opts.rank {
            return Err(Error::Broken(format!(
                "rank {} has no link to rank {peer} (world size {})",
                self.opts.rank, self.opts.world_size
            )));
        }
        Ok(())
    }

    /// Moves connections the acceptor admitted into `from`.
    fn collect_arrivals(&mut self) -> Result<()> {
        for (rank, stream) in self.arrivals.take() {
            configure(&stream, &self.peer(rank))?;
            self.from[rank] = Some(stream);
        }
        Ok(())
    }

    fn lost(peer: PeerId, e: io::Error) -> Error {
        Error::PeerLost {
            peer,
            detail: format!("connection failed: {e}"),
        }
    }

    /// A peer never sends on the connection we opened, so anything readable there is its
    /// hang-up (or garbage).
    fn check_alive(&mut self, peer: usize) -> Result<()> {
        let Some(s) = self.to[peer].as_mut() else {
            return Ok(());
        };
        let mut probe = [0u8; 1];
        match s.read(&mut probe) {
            Ok(0) => Err(Error::PeerLost {
                peer: self.peer(peer),
                detail: "it closed the connection".into(),
            }),
            Ok(_) => Err(Error::protocol(
                &self.peer(peer),
                "unexpected bytes on our outgoing connection",
            )),
            Err(e)
                if e.kind() == io::ErrorKind::WouldBlock
                    || e.kind() == io::ErrorKind::Interrupted =>
            {
                Ok(())
            }
            Err(e) => Err(Self::lost(self.peer(peer), e)),
        }
    }

    /// One `ppoll` over what `interests` need; `Ok(true)` when something is ready.
    fn poll_once(&mut self, interests: &[Interest], timeout: Duration) -> Result<bool> {
        // A connection may be queued already, its bell drained by an earlier look.
        if interests
            .iter()
            .any(|i| i.recv && self.from[i.peer].is_none())
        {
            self.collect_arrivals()?;
        }
        // Beside each fd: the peer whose outgoing connection it is, if it is one.
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(interests.len() * 2 + 1);
        let mut senders: Vec<Option<usize>> = Vec::with_capacity(fds.capacity());
        let mut awaiting_arrival = false;
        for i in interests {
            if i.recv {
                match &self.from[i.peer] {
                    Some(s) => {
                        fds.push(pollfd(s.as_raw_fd(), libc::POLLIN));
                        senders.push(None);
                    }
                    None => awaiting_arrival = true,
                }
            }
            if i.send {
                if let Some(s) = &self.to[i.peer] {
                    let events = libc::POLLOUT | libc::POLLIN | libc::POLLRDHUP;
                    fds.push(pollfd(s.as_raw_fd(), events));
                    senders.push(Some(i.peer));
                }
            }
        }
        if awaiting_arrival {
            fds.push(pollfd(self.arrivals.bell_fd(), libc::POLLIN));
            senders.push(None);
        }
        let ts = libc::timespec {
            tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: `fds` is a live, initialised array whose length we pass; `ts` outlives the
        // call; a null sigmask leaves the signal mask unchanged.
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
            return Err(Error::io("waiting on peer connections", e));
        }
        for (fd, sender) in fds.iter().zip(&senders) {
            let Some(peer) = *sender else { continue };
            let hangup = libc::POLLIN | libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR;
            if fd.revents & hangup != 0 {
                self.check_alive(peer)?;
                if fd.revents & (libc::POLLHUP | libc::POLLERR) != 0 {
                    return Err(Error::PeerLost {
                        peer: self.peer(peer),
                        detail: "the connection broke".into(),
                    });
                }
            }
        }
        if awaiting_arrival {
            self.collect_arrivals()?;
        }
        Ok(n > 0)
    }
}

fn pollfd(fd: i32, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

fn configure(s: &TcpStream, who: &PeerId) -> Result<()> {
    s.set_nonblocking(true)
        .and_then(|_| s.set_nodelay(true))
        .map_err(|e| Error::io(format!("configuring the connection to {who}"), e))
}

impl Peers for TcpPeers {
    fn rank(&self) -> usize {
        self.opts.rank
    }

    fn world_size(&self) -> usize {
        self.opts.world_size
    }

    fn local(&self) -> &PeerId {
        &self.local
    }

    fn peer(&self, rank: usize) -> PeerId {
        match self.addrs.get(rank) {
            Some(Some(addr)) => PeerId::rank(rank, addr.clone()),
            _ => PeerId::rank(rank, "address not known"),
        }
    }

    fn connect(&mut self, peers: &[usize], deadline: Instant) -> Result<()> {
        for &p in peers {
            self.check_rank(p)?;
            if self.to[p].is_some() {
                continue;
            }
            let Some(addr) = self.addrs[p].clone() else {
                return Err(Error::Broken(format!(
                    "rank {p}'s address is not known to rank {}",
                    self.opts.rank
                )));
            };
            let id = self.peer(p);
            let stream = connect_peer(&addr, &id, &self.token, &self.opts, deadline)?;
            tracing::debug!(rank = self.opts.rank, peer = p, "connected");
            self.adopt_to(p, stream)?;
        }
        Ok(())
    }

    fn send(&mut self, peer: usize, bufs: &[IoSlice<'_>]) -> Result<usize> {
        let Some(s) = self.to.get(peer).and_then(Option::as_ref) else {
            return Err(Error::Broken(format!(
                "rank {} sends to rank {peer} without a connection",
                self.opts.rank
            )));
        };
        // sendmsg with MSG_NOSIGNAL: writev to a reset connection would raise SIGPIPE, which kills
        // a host process that has not ignored it (a C++ or Python embedding, say).
        let socket = socket2::SockRef::from(s);
        loop {
            return match socket.send_vectored_with_flags(bufs, libc::MSG_NOSIGNAL) {
                Ok(n) => Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(Self::lost(self.peer(peer), e)),
            };
        }
    }

    fn recv(&mut self, peer: usize, buf: &mut [u8]) -> Result<usize> {
        self.check_rank(peer)?;
        if buf.is_empty() {
            return Ok(0);
        }
        if self.from[peer].is_none() {
            self.collect_arrivals()?;
        }
        let Some(s) = self.from[peer].as_mut() else {
            return Ok(0);
        };
        loop {
            return match s.read(buf) {
                Ok(0) => Err(Error::PeerLost {
                    peer: self.peer(peer),
                    detail: "it closed the connection".into(),
                }),
                Ok(n) => Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => Err(Self::lost(self.peer(peer), e)),
            };
        }
    }

    fn wait(&mut self, interests: &[Interest], deadline: Instant) -> Result<Readiness> {
        // Polling briefly saves the sleep and wake-up of a blocking poll. Yield between polls:
        // the kernel work that completes a loopback delivery needs a CPU too.
        if !self.opts.busy_poll.is_zero() {
            let spin_until = (Instant::now() + self.opts.busy_poll).min(deadline);
            while Instant::now() < spin_until {
                if self.poll_once(interests, Duration::ZERO)? {
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
            if self.poll_once(interests, left)? {
                return Ok(Readiness::Ready);
            }
        }
    }
}
