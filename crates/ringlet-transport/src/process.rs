//! [`Peers`] between processes: per peer, one link we write (we opened it) and one we read (the
//! peer opened it). Two links rather than one per pair keep each direction's buffers and
//! ordering independent, and make "who connects" unambiguous: whoever first sends.
//!
//! A link is a TCP connection, or — when both ranks are on one host and allow it — a
//! shared-memory ring with a Unix socket beside it (see [`shm`](crate::shm)). The ring
//! neighbours are connected over TCP when the job forms ([`join`](crate::join)); once the ranks
//! have told each other where they live ([`ProcessPeers::learn_peers`]), links between ranks of
//! one host move to shared memory, and links to anyone else are made when a schedule first names
//! the peer ([`Peers::connect`]), and kept until the communicator closes. Links from peers arrive
//! through our ports' acceptor threads, which wake a waiting engine through a socket pair.

use crate::accept::{Acceptor, Arrivals, Inbound};
use crate::setup::{connect_shm, connect_streams, JoinOptions};
use crate::shm;
use crate::stripe::Stripes;
use crate::{Interest, Peers, Readiness};
use ringlet_core::error::PeerId;
use ringlet_core::{Error, JobToken, Result};
use std::io::{self, IoSlice, Read};
use std::net::TcpStream;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Looks at shared memory between yields while spinning.
const SHM_SPINS: usize = 16;

/// How a rank is reached, as the ranks tell each other after joining.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerInfo {
    /// `host:port` of its TCP port.
    pub addr: String,
    /// Its [`shm::host_key`], and the name of its Unix socket, when it takes shared memory.
    pub shm: Option<(String, String)>,
}

enum Out {
    Tcp(Stripes),
    Shm(shm::Writer),
}

enum In {
    Tcp(Stripes),
    Shm(shm::Reader),
}

pub struct ProcessPeers {
    opts: JoinOptions,
    token: JobToken,
    local: PeerId,
    /// Every rank's TCP address; `None` until learned (the ring neighbours' at join, the rest
    /// from [`learn_peers`](Self::learn_peers)).
    addrs: Vec<Option<String>>,
    /// Per rank: the Unix socket name to reach it by shared memory (same host, both allow it).
    shm_names: Vec<Option<String>>,
    to: Vec<Option<Out>>,
    from: Vec<Option<In>>,
    arrivals: Arc<Arrivals>,
    /// Links that arrived while another from the same rank was still in use.
    later: Vec<(usize, In)>,
    /// Ours: (host key, Unix socket name), when we take shared memory.
    own_shm: Option<(String, String)>,
    // Keeps admitting peers (and refusing, and logging, strangers) for as long as we live.
    _acceptor: Acceptor,
}

/// One fd of a `ppoll`, and what to do with what it reports.
enum Watch {
    /// A connection from a peer, or the arrival bell: readiness only.
    Plain,
    /// Our TCP connection to `peer`: anything readable is its hang-up.
    TcpOut(usize),
    /// A shared-memory link's doorbell, armed before the poll.
    ShmIn(usize),
    ShmOut(usize),
    /// A shared-memory link we send on, watched for its peer's hang-up only.
    ShmHangup(usize),
}

impl ProcessPeers {
    pub(crate) fn new(
        opts: JoinOptions,
        token: JobToken,
        local: PeerId,
        arrivals: Arc<Arrivals>,
        own_shm: Option<(String, String)>,
        acceptor: Acceptor,
    ) -> ProcessPeers {
        let n = opts.world_size;
        let mut addrs = vec![None; n];
        addrs[opts.rank] = Some(local.addr.clone());
        ProcessPeers {
            opts,
            token,
            local,
            addrs,
            shm_names: vec![None; n],
            to: (0..n).map(|_| None).collect(),
            from: (0..n).map(|_| None).collect(),
            arrivals,
            later: Vec::new(),
            own_shm,
            _acceptor: acceptor,
        }
    }

    /// Ours, for the others: our address, and our shared-memory identity if we take it.
    pub fn own_info(&self) -> PeerInfo {
        PeerInfo {
            addr: self.local.addr.clone(),
            shm: self.own_shm.clone(),
        }
    }

    /// Records `rank`'s published address.
    pub(crate) fn know(&mut self, rank: usize, addr: String) {
        self.addrs[rank] = Some(addr);
    }

    /// Adopts open, authenticated TCP connections to `rank`, in their announced order.
    pub(crate) fn adopt_to(&mut self, rank: usize, streams: Vec<TcpStream>) -> Result<()> {
        self.to[rank] = Some(Out::Tcp(configure(streams, &self.peer(rank))?));
        Ok(())
    }

    /// Every rank's [`PeerInfo`], in rank order, as the ranks agreed them after joining (call it
    /// on every rank between collectives, with no frame in flight). Later links go to these
    /// addresses; ranks of our host that take shared memory are reached by it from now on, so
    /// the TCP links the join made to them are closed (on both sides, as both decide alike).
    pub fn learn_peers(&mut self, infos: Vec<PeerInfo>) -> Result<()> {
        if infos.len() != self.addrs.len() {
            return Err(Error::Broken(format!(
                "{} peers described for a world of {}",
                infos.len(),
                self.addrs.len()
            )));
        }
        for (rank, info) in infos.into_iter().enumerate() {
            if let Some(known) = &self.addrs[rank] {
                if *known != info.addr {
                    return Err(Error::Config(format!(
                        "rank {rank} is known at {known} but announced {}",
                        info.addr
                    )));
                }
            }
            self.addrs[rank] = Some(info.addr);
            let same_host = match (&self.own_shm, &info.shm) {
                (Some((ours, _)), Some((theirs, _))) => ours == theirs,
                _ => false,
            };
            if same_host && rank != self.opts.rank {
                self.shm_names[rank] = info.shm.map(|(_, name)| name);
                self.to[rank] = None;
                self.from[rank] = None;
            }
        }
        // A shared-memory link that came early takes the place of the TCP one just closed.
        for (rank, link) in std::mem::take(&mut self.later) {
            if self.from[rank].is_none() {
                self.from[rank] = Some(link);
            } else {
                self.later.push((rank, link));
            }
        }
        Ok(())
    }

    /// Whether `rank` is reached through shared memory.
    pub fn uses_shm(&self, rank: usize) -> bool {
        self.shm_names.get(rank).is_some_and(Option::is_some)
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

    /// Moves links the acceptors admitted into `from`. A link from a rank we still read by
    /// another one (its shared memory, arriving before we have switched from the join's TCP
    /// link) waits in `later` until [`learn_peers`](Self::learn_peers).
    pub(crate) fn collect_arrivals(&mut self) -> Result<()> {
        for (rank, link) in self.arrivals.take() {
            let link = match link {
                Inbound::Tcp(streams) => In::Tcp(configure(streams, &self.peer(rank))?),
                Inbound::Shm(mut reader) => {
                    // The acceptor knew it only as a local process.
                    reader.rename(self.peer(rank));
                    In::Shm(reader)
                }
            };
            if self.from[rank].is_some() {
                self.later.push((rank, link));
            } else {
                self.from[rank] = Some(link);
            }
        }
        Ok(())
    }

    fn lost(peer: PeerId, e: io::Error) -> Error {
        Error::PeerLost {
            peer,
            detail: format!("connection failed: {e}"),
        }
    }

    /// A peer never sends on a TCP connection we opened, so anything readable there is its
    /// hang-up (or garbage).
    fn check_alive(&self, peer: usize) -> Result<()> {
        let Some(Out::Tcp(stripes)) = self.to[peer].as_ref() else {
            return Ok(());
        };
        stripes
            .all()
            .iter()
            .try_for_each(|s| self.check_stream(peer, s))
    }

    fn check_stream(&self, peer: usize, mut s: &TcpStream) -> Result<()> {
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

    /// Whether everything `i` asks for is on shared-memory links.
    fn on_shm(&self, i: &Interest) -> bool {
        (!i.recv || matches!(self.from[i.peer], Some(In::Shm(_))))
            && (!i.send || matches!(self.to[i.peer], Some(Out::Shm(_))))
    }

    /// Whether a link of `interests` can make progress now, as seen without a system call: a
    /// shared-memory ring with room or bytes, or a TCP link with bytes read ahead.
    fn ready_in_memory(&self, interests: &[Interest]) -> bool {
        interests.iter().any(|i| {
            (i.recv
                && match &self.from[i.peer] {
                    Some(In::Shm(r)) => r.ready(),
                    Some(In::Tcp(s)) => s.buffered(),
                    None => false,
                })
                || (i.send && matches!(&self.to[i.peer], Some(Out::Shm(w)) if w.ready()))
        })
    }

    /// One `ppoll` over what `interests` need; `Ok(true)` when something is ready.
    fn poll_once(&mut self, interests: &[Interest], timeout: Duration) -> Result<bool> {
        // A link may be queued already, its bell drained by an earlier look.
        if interests
            .iter()
            .any(|i| i.recv && self.from[i.peer].is_none())
        {
            self.collect_arrivals()?;
        }
        let mut fds: Vec<libc::pollfd> = Vec::with_capacity(interests.len() * 2 + 1);
        let mut watches: Vec<Watch> = Vec::with_capacity(fds.capacity());
        let mut ready_now = false;
        let mut awaiting_arrival = false;
        for i in interests {
            if i.recv {
                match &self.from[i.peer] {
                    Some(In::Tcp(s)) => {
                        // Bytes read ahead wait in user space, where the poll cannot see them.
                        ready_now |= s.buffered();
                        fds.push(pollfd(s.current().as_raw_fd(), libc::POLLIN));
                        watches.push(Watch::Plain);
                    }
                    Some(In::Shm(r)) => {
                        // Armed even when ready, so that disarming below is uniform.
                        ready_now |= r.arm();
                        fds.push(pollfd(r.fd(), libc::POLLIN | libc::POLLRDHUP));
                        watches.push(Watch::ShmIn(i.peer));
                    }
                    None => awaiting_arrival = true,
                }
            }
            if i.send {
                match &self.to[i.peer] {
                    Some(Out::Tcp(s)) => {
                        let current = s.current().as_raw_fd();
                        for fd in s.all().iter().map(AsRawFd::as_raw_fd) {
                            let mut events = libc::POLLIN | libc::POLLRDHUP;
                            if fd == current {
                                events |= libc::POLLOUT;
                            }
                            fds.push(pollfd(fd, events));
                            watches.push(Watch::TcpOut(i.peer));
                        }
                    }
                    Some(Out::Shm(w)) => {
                        ready_now |= w.arm();
                        fds.push(pollfd(w.fd(), libc::POLLIN | libc::POLLRDHUP));
                        watches.push(Watch::ShmOut(i.peer));
                    }
                    None => {}
                }
            } else if i.hangup {
                // Only the hang-up: no POLLOUT (always writable) and, on shared memory, no
                // doorbell bytes (none are rung for a writer that is not waiting).
                match &self.to[i.peer] {
                    Some(Out::Tcp(s)) => {
                        for fd in s.all().iter().map(AsRawFd::as_raw_fd) {
                            fds.push(pollfd(fd, libc::POLLIN | libc::POLLRDHUP));
                            watches.push(Watch::TcpOut(i.peer));
                        }
                    }
                    Some(Out::Shm(w)) => {
                        fds.push(pollfd(w.fd(), libc::POLLRDHUP));
                        watches.push(Watch::ShmHangup(i.peer));
                    }
                    None => {}
                }
            }
        }
        if awaiting_arrival {
            fds.push(pollfd(self.arrivals.bell_fd(), libc::POLLIN));
            watches.push(Watch::Plain);
        }
        let timeout = if ready_now { Duration::ZERO } else { timeout };
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
        let polled = if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                self.disarm(&watches);
                return Err(Error::io("waiting on peer connections", e));
            }
            0
        } else {
            n
        };
        self.disarm(&watches);
        for (fd, watch) in fds.iter().zip(&watches) {
            if let Watch::ShmHangup(peer) = *watch {
                if fd.revents & (libc::POLLRDHUP | libc::POLLHUP | libc::POLLERR) != 0 {
                    return Err(Error::PeerLost {
                        peer: self.peer(peer),
                        detail: "it closed the connection".into(),
                    });
                }
                continue;
            }
            let Watch::TcpOut(peer) = *watch else {
                continue;
            };
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
        Ok(ready_now || polled > 0)
    }

    /// Clears the waiting flags set for a poll, reading the doorbells (and noting hang-ups,
    /// which the next recv or send reports).
    fn disarm(&mut self, watches: &[Watch]) {
        for w in watches {
            match *w {
                Watch::ShmIn(p) => {
                    if let Some(In::Shm(r)) = self.from[p].as_mut() {
                        r.disarm();
                    }
                }
                Watch::ShmOut(p) => {
                    if let Some(Out::Shm(w)) = self.to[p].as_mut() {
                        w.disarm();
                    }
                }
                Watch::Plain | Watch::TcpOut(_) | Watch::ShmHangup(_) => {}
            }
        }
    }
}

fn pollfd(fd: i32, events: libc::c_short) -> libc::pollfd {
    libc::pollfd {
        fd,
        events,
        revents: 0,
    }
}

fn configure(streams: Vec<TcpStream>, who: &PeerId) -> Result<Stripes> {
    for s in &streams {
        s.set_nonblocking(true)
            .and_then(|_| s.set_nodelay(true))
            .map_err(|e| Error::io(format!("configuring the connection to {who}"), e))?;
    }
    Ok(Stripes::new(streams))
}

impl Peers for ProcessPeers {
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

    fn connect(&mut self, peers: &[usize], timeout: Duration) -> Result<()> {
        let mut deadline = None;
        for &p in peers {
            self.check_rank(p)?;
            if self.to[p].is_some() {
                continue;
            }
            let deadline = *deadline.get_or_insert_with(|| Instant::now() + timeout);
            let id = self.peer(p);
            if let Some(name) = self.shm_names[p].clone() {
                let sock = connect_shm(&name, &id, &self.token, &self.opts, deadline)?;
                self.to[p] = Some(Out::Shm(shm::Writer::create(sock, id)?));
                tracing::debug!(rank = self.opts.rank, peer = p, "connected (shared memory)");
                continue;
            }
            let Some(addr) = self.addrs[p].clone() else {
                return Err(Error::Broken(format!(
                    "rank {p}'s address is not known to rank {}",
                    self.opts.rank
                )));
            };
            let streams = connect_streams(&addr, &id, &self.token, &self.opts, deadline)?;
            tracing::debug!(rank = self.opts.rank, peer = p, "connected (TCP)");
            self.adopt_to(p, streams)?;
        }
        Ok(())
    }

    fn send(&mut self, peer: usize, bufs: &[IoSlice<'_>]) -> Result<usize> {
        let sent = match self.to.get_mut(peer).and_then(Option::as_mut) {
            None => {
                return Err(Error::Broken(format!(
                    "rank {} sends to rank {peer} without a connection",
                    self.opts.rank
                )))
            }
            Some(Out::Shm(w)) => return w.send(bufs),
            Some(Out::Tcp(s)) => s.send(bufs),
        };
        match sent {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(Self::lost(self.peer(peer), e)),
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
        let got = match self.from[peer].as_mut() {
            None => return Ok(0),
            Some(In::Shm(r)) => return r.recv(buf),
            Some(In::Tcp(s)) => s.recv(buf),
        };
        match got {
            Ok(0) => Err(Error::PeerLost {
                peer: self.peer(peer),
                detail: "it closed the connection".into(),
            }),
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(0),
            Err(e) => Err(Self::lost(self.peer(peer), e)),
        }
    }

    fn wait(&mut self, interests: &[Interest], deadline: Instant) -> Result<Readiness> {
        // Polling briefly saves the sleep and wake-up of a blocking poll. Shared memory is
        // looked at without a system call; yield between polls: the kernel work that completes
        // a loopback delivery needs a CPU too.
        if !self.opts.busy_poll.is_zero() {
            // Shared memory is only looked at while spinning: arming its doorbells here would
            // make the other side ring them (a system call each) for every message.
            let sockets: Vec<Interest> = if interests.iter().all(|i| self.on_shm(i)) {
                Vec::new()
            } else {
                interests
                    .iter()
                    .filter(|i| !self.on_shm(i))
                    .copied()
                    .collect()
            };
            let spin_until = (Instant::now() + self.opts.busy_poll).min(deadline);
            while Instant::now() < spin_until {
                // Shared memory a few hundred times between yields (a yield is a system call,
                // and a message landing during one waits for it); yielding still lets a peer
                // that shares our core run.
                for _ in 0..SHM_SPINS {
                    if self.ready_in_memory(interests) {
                        return Ok(Readiness::Ready);
                    }
                    std::hint::spin_loop();
                }
                if !sockets.is_empty() && self.poll_once(&sockets, Duration::ZERO)? {
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
