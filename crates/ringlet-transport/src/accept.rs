//! The threads behind a rank's ports: they admit each other rank of the job (the token
//! handshake, then its hello checked against our job and settings), hand its links to the engine
//! through [`Arrivals`] — a rank's TCP connections once all of them are here — and refuse, and
//! log, everything else for as long as the rank lives.

use crate::setup::{JoinOptions, PeerAck, PeerHello};
use crate::shm;
use ringlet_core::auth::accept_handshake;
use ringlet_core::error::PeerId;
use ringlet_core::{msg, Error, JobToken, Result, Role};
use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a connection on our port gets to authenticate and say who it is. A real rank needs a
/// round trip or two; a short window keeps silent strangers from holding slots.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Handshakes in flight at once; more connections than this are closed unanswered (a real peer
/// retries until its deadline).
const MAX_PENDING_HANDSHAKES: usize = 256;

/// A link a peer opened to us.
pub(crate) enum Inbound {
    /// All its connections, in their announced order.
    Tcp(Vec<TcpStream>),
    Shm(shm::Reader),
}

/// TCP connections of ranks whose sets are not all here yet, and the ranks whose sets were
/// handed on whole.
#[derive(Default)]
struct Assembly {
    partial: HashMap<usize, Vec<Option<TcpStream>>>,
    delivered: HashSet<usize>,
}

/// Links the acceptors admitted and the engine has not taken yet, and the bell that wakes an
/// engine waiting for one (a socket pair: its read end sits in the engine's `ppoll`).
pub(crate) struct Arrivals {
    queue: Mutex<Vec<(usize, Inbound)>>,
    /// Ranks whose shared-memory link is admitted or being set up: one each.
    shm_claimed: Mutex<HashSet<usize>>,
    /// TCP connections by rank. A connection that arrives again while its set is incomplete
    /// replaces the first (the peer retried because that one failed on its side); once the set
    /// is handed on, the rank is connected and any further connection is refused.
    tcp: Mutex<Assembly>,
    /// Ranks that proved the job token but were refused for a setting that differs from ours:
    /// they will never connect, and the join need not wait for them.
    disagreeing: Mutex<HashMap<usize, String>>,
    streams: usize,
    bell_rx: UnixStream,
    bell_tx: UnixStream,
}

impl Arrivals {
    pub(crate) fn new(streams: usize) -> Result<Arrivals> {
        let (bell_rx, bell_tx) =
            UnixStream::pair().map_err(|e| Error::io("creating the arrival bell", e))?;
        for s in [&bell_rx, &bell_tx] {
            s.set_nonblocking(true)
                .map_err(|e| Error::io("configuring the arrival bell", e))?;
        }
        Ok(Arrivals {
            queue: Mutex::new(Vec::new()),
            shm_claimed: Mutex::new(HashSet::new()),
            tcp: Mutex::new(Assembly::default()),
            disagreeing: Mutex::new(HashMap::new()),
            streams,
            bell_rx,
            bell_tx,
        })
    }

    pub(crate) fn bell_fd(&self) -> i32 {
        self.bell_rx.as_raw_fd()
    }

    /// Claims `rank`'s shared-memory link; false when it already has one.
    fn claim_shm(&self, rank: usize) -> bool {
        self.shm_claimed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rank)
    }

    /// Gives a claim back when its link could not be set up: the rank is not connected, and a
    /// later connection from it (a re-formed job, say) must not be refused as a duplicate.
    fn release_shm(&self, rank: usize) {
        self.shm_claimed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&rank);
    }

    /// Whether `rank`'s TCP connections were all here and handed on.
    fn tcp_delivered(&self, rank: usize) -> bool {
        self.tcp
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .delivered
            .contains(&rank)
    }

    /// Holds connection `index` of `rank` until all of its connections are here, then queues
    /// them as one link. A connection for a rank already handed on is dropped (it passed the
    /// admission check just before its set completed).
    fn assemble(&self, rank: usize, index: usize, stream: TcpStream) {
        let complete = {
            let mut tcp = self.tcp.lock().unwrap_or_else(|p| p.into_inner());
            if tcp.delivered.contains(&rank) {
                return;
            }
            let slots = tcp
                .partial
                .entry(rank)
                .or_insert_with(|| (0..self.streams).map(|_| None).collect());
            slots[index] = Some(stream);
            if slots.iter().all(Option::is_some) {
                tcp.delivered.insert(rank);
                tcp.partial
                    .remove(&rank)
                    .map(|s| s.into_iter().flatten().collect::<Vec<_>>())
            } else {
                None
            }
        };
        if let Some(streams) = complete {
            self.push(rank, Inbound::Tcp(streams));
        }
    }

    fn push(&self, rank: usize, link: Inbound) {
        self.queue
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push((rank, link));
        // A full bell already rings; nothing is lost by a failed write.
        let _ = (&self.bell_tx).write(&[1]);
    }

    /// Everything that arrived, draining the bell first (an arrival after the drain rings again).
    pub(crate) fn take(&self) -> Vec<(usize, Inbound)> {
        let mut sink = [0u8; 64];
        while matches!((&self.bell_rx).read(&mut sink), Ok(n) if n > 0) {}
        std::mem::take(&mut *self.queue.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Notes that `rank` was refused for a setting of the job's that it does not share.
    fn disagrees(&self, rank: usize, why: String) {
        self.disagreeing
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(rank, why);
    }

    /// Blocks until `rank` has connected (its stream stays queued), was refused for a setting
    /// that differs from ours, or `deadline` passes.
    pub(crate) fn wait_for(&self, rank: usize, deadline: Instant) -> Waited {
        loop {
            let here = self
                .queue
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .any(|(r, _)| *r == rank);
            if here {
                return Waited::Here;
            }
            if let Some(why) = self
                .disagreeing
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .get(&rank)
            {
                return Waited::Disagrees(why.clone());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Waited::TimedOut;
            }
            let mut fd = [libc::pollfd {
                fd: self.bell_fd(),
                events: libc::POLLIN,
                revents: 0,
            }];
            let ms = left.as_millis().clamp(1, 100) as i32;
            // SAFETY: one initialised pollfd, its length passed; the fd is ours and open.
            unsafe { libc::poll(fd.as_mut_ptr(), 1, ms) };
            let mut sink = [0u8; 64];
            while matches!((&self.bell_rx).read(&mut sink), Ok(n) if n > 0) {}
        }
    }
}

pub(crate) enum Waited {
    Here,
    Disagrees(String),
    TimedOut,
}

/// The threads behind our ports (TCP, and the Unix socket for shared memory). They admit each
/// other rank of the job once per kind, hand its link to the engine through [`Arrivals`], and
/// refuse everything else for as long as we live.
pub(crate) struct Acceptor {
    stop: Arc<AtomicBool>,
    /// Duplicates of the listening sockets: shutting them down wakes `accept`.
    handles: Vec<socket2::Socket>,
    threads: Vec<JoinHandle<()>>,
}

/// A listening socket the acceptor serves.
trait Listen: Send + 'static {
    type Stream: ringlet_core::io::TimedStream + Send + 'static;
    /// Whether admitted links carry shared memory.
    const SHM: bool;
    fn accept_one(&self) -> std::io::Result<(Self::Stream, String)>;
    /// Hands connection `index` of admitted rank `peer` to the engine (a shared-memory link
    /// receives its ring first; a TCP connection waits for the rank's others).
    fn deliver(
        stream: Self::Stream,
        rank: usize,
        peer: PeerId,
        index: usize,
        arrivals: &Arrivals,
        deadline: Instant,
    ) -> Result<()>;
}

impl Listen for TcpListener {
    type Stream = TcpStream;
    const SHM: bool = false;
    fn accept_one(&self) -> std::io::Result<(TcpStream, String)> {
        self.accept().map(|(s, from)| (s, from.to_string()))
    }
    fn deliver(
        stream: TcpStream,
        rank: usize,
        _: PeerId,
        index: usize,
        arrivals: &Arrivals,
        _: Instant,
    ) -> Result<()> {
        arrivals.assemble(rank, index, stream);
        Ok(())
    }
}

impl Listen for UnixListener {
    type Stream = UnixStream;
    const SHM: bool = true;
    fn accept_one(&self) -> std::io::Result<(UnixStream, String)> {
        self.accept()
            .map(|(s, _)| (s, "a local process".to_string()))
    }
    fn deliver(
        stream: UnixStream,
        rank: usize,
        peer: PeerId,
        _: usize,
        arrivals: &Arrivals,
        deadline: Instant,
    ) -> Result<()> {
        let left = deadline.saturating_duration_since(Instant::now());
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .map_err(|e| Error::io("configuring a shared-memory socket", e))?;
        let reader = shm::Reader::accept(&stream, peer)?;
        arrivals.push(rank, Inbound::Shm(reader));
        Ok(())
    }
}

impl Acceptor {
    pub(crate) fn spawn(
        tcp: TcpListener,
        unix: Option<UnixListener>,
        token: JobToken,
        opts: JoinOptions,
        arrivals: Arc<Arrivals>,
    ) -> Result<Acceptor> {
        let mut acceptor = Acceptor {
            stop: Arc::new(AtomicBool::new(false)),
            handles: Vec::new(),
            threads: Vec::new(),
        };
        let dup = |fd: std::os::fd::BorrowedFd<'_>| {
            fd.try_clone_to_owned()
                .map(socket2::Socket::from)
                .map_err(|e| Error::io("duplicating our port", e))
        };
        acceptor.handles.push(dup(tcp.as_fd())?);
        if let Some(u) = &unix {
            acceptor.handles.push(dup(u.as_fd())?);
        }
        acceptor.serve(tcp, &token, &opts, &arrivals)?;
        if let Some(u) = unix {
            acceptor.serve(u, &token, &opts, &arrivals)?;
        }
        Ok(acceptor)
    }

    fn serve<L: Listen>(
        &mut self,
        listener: L,
        token: &JobToken,
        opts: &JoinOptions,
        arrivals: &Arc<Arrivals>,
    ) -> Result<()> {
        let (token, opts, arrivals, stop) = (
            token.clone(),
            opts.clone(),
            arrivals.clone(),
            self.stop.clone(),
        );
        let thread = std::thread::Builder::new()
            .name(format!("ringlet-accept-{}", opts.rank))
            .spawn(move || accept_loop(listener, token, opts, arrivals, stop))
            .map_err(|e| Error::io("starting the acceptor thread", e))?;
        self.threads.push(thread);
        Ok(())
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // On Linux, shutting a listening socket down makes a blocked accept() return an error.
        for h in &self.handles {
            let _ = h.shutdown(std::net::Shutdown::Both);
        }
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

fn accept_loop<L: Listen>(
    listener: L,
    token: JobToken,
    opts: JoinOptions,
    arrivals: Arc<Arrivals>,
    stop: Arc<AtomicBool>,
) {
    let pending = Arc::new(AtomicUsize::new(0));
    let opts = Arc::new(opts);
    while !stop.load(Ordering::SeqCst) {
        let (stream, from) = match listener.accept_one() {
            Ok(c) => c,
            Err(_) if stop.load(Ordering::SeqCst) => break,
            Err(e) => {
                tracing::warn!(rank = opts.rank, "accept failed on our port: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if stop.load(Ordering::SeqCst) {
            break;
        }
        if pending.fetch_add(1, Ordering::SeqCst) >= MAX_PENDING_HANDSHAKES {
            pending.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(rank = opts.rank, %from, "too many pending handshakes on our port; closing");
            continue;
        }
        let (token, job, pending, arrivals) = (
            token.clone(),
            opts.clone(),
            pending.clone(),
            arrivals.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("ringlet-handshake".into())
            .spawn(move || {
                let peer = PeerId::addr(from);
                if let Err(e) = admit::<L>(stream, &peer, &token, &job, &arrivals) {
                    tracing::warn!(rank = job.rank, "refused a connection on our port: {e}");
                }
                pending.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            tracing::warn!(
                rank = opts.rank,
                "could not start a handshake thread; connection closed"
            );
        }
    }
}

fn admit<L: Listen>(
    mut stream: L::Stream,
    peer: &PeerId,
    token: &JobToken,
    opts: &JoinOptions,
    arrivals: &Arrivals,
) -> Result<()> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    accept_handshake(&mut stream, token, Role::Ring, peer, deadline)?;
    let hello: PeerHello = msg::recv(&mut stream, 4096, peer, deadline)?;
    let refusal = if hello.comm != opts.comm {
        Some(format!(
            "it belongs to communicator {:?}, we are {:?}",
            hello.comm, opts.comm
        ))
    } else if hello.world_size != opts.world_size as u64 {
        Some(format!(
            "it has world size {}, we have {}",
            hello.world_size, opts.world_size
        ))
    } else if hello.rank >= opts.world_size as u64 || hello.rank == opts.rank as u64 {
        Some(format!(
            "it claims rank {}, which is not another rank of a world of {}",
            hello.rank, opts.world_size
        ))
    } else if hello.streams != opts.streams as u64 {
        let why = format!(
            "RINGLET_NSOCKS differs: rank {} uses {} TCP streams per peer, rank {} uses {}",
            hello.rank, hello.streams, opts.rank, opts.streams
        );
        arrivals.disagrees(hello.rank as usize, why.clone());
        Some(why)
    } else if hello.stream >= hello.streams {
        Some(format!(
            "it claims stream {} of {}",
            hello.stream, hello.streams
        ))
    } else if (L::SHM && !arrivals.claim_shm(hello.rank as usize))
        || (!L::SHM && arrivals.tcp_delivered(hello.rank as usize))
    {
        Some(format!("rank {} is already connected", hello.rank))
    } else {
        None
    };
    let rank = hello.rank as usize;
    let acked = msg::send(
        &mut stream,
        &PeerAck {
            refused: refusal.clone(),
        },
        peer,
        deadline,
    );
    let admitted = match (refusal, acked) {
        (Some(why), _) => return Err(Error::Config(format!("{peer}: {why}"))),
        (None, Err(e)) => Err(e),
        (None, Ok(())) => {
            let id = PeerId::rank(rank, peer.addr.clone());
            L::deliver(stream, rank, id, hello.stream as usize, arrivals, deadline)
        }
    };
    if admitted.is_err() && L::SHM {
        arrivals.release_shm(rank);
    }
    admitted
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A connected loopback socket; its local port tells it apart.
    fn socket(l: &TcpListener) -> (TcpStream, u16) {
        let s = TcpStream::connect(l.local_addr().unwrap()).unwrap();
        let port = s.local_addr().unwrap().port();
        drop(l.accept().unwrap());
        (s, port)
    }

    /// A peer retries a connection that failed on its side before its set is complete: the
    /// retry replaces the first instead of being refused, so the link still forms; once the set
    /// is handed on, the rank counts as connected.
    #[test]
    fn a_retried_connection_replaces_its_slot_until_the_set_is_whole() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let arrivals = Arrivals::new(2).unwrap();
        let (first, _) = socket(&l);
        let (retry, retry_port) = socket(&l);
        let (second, second_port) = socket(&l);
        arrivals.assemble(3, 0, first);
        assert!(!arrivals.tcp_delivered(3));
        arrivals.assemble(3, 0, retry);
        assert!(arrivals.take().is_empty());
        arrivals.assemble(3, 1, second);
        assert!(arrivals.tcp_delivered(3));
        let mut got = arrivals.take();
        assert_eq!(got.len(), 1);
        match got.pop() {
            Some((3, Inbound::Tcp(streams))) => {
                let ports: Vec<u16> = streams
                    .iter()
                    .map(|s| s.local_addr().unwrap().port())
                    .collect();
                assert_eq!(ports, [retry_port, second_port]);
            }
            _ => panic!("expected rank 3's two connections"),
        }
        let (late, _) = socket(&l);
        arrivals.assemble(3, 1, late);
        assert!(arrivals.take().is_empty());
    }

    /// A shared-memory claim given back after a failed setup lets the peer's retry in.
    #[test]
    fn a_released_shared_memory_claim_can_be_made_again() {
        let arrivals = Arrivals::new(1).unwrap();
        assert!(arrivals.claim_shm(2));
        assert!(!arrivals.claim_shm(2));
        arrivals.release_shm(2);
        assert!(arrivals.claim_shm(2));
    }
}
