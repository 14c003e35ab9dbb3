//! Joining a job's transport: listen, publish our address in the store, connect to the next rank
//! and wait for the previous one (the ring every collective can use from the start). Every
//! connection proves the job token and says which rank it is before a byte of collective traffic
//! is accepted; a stranger on our port (garbage, an HTTP probe, a wrong token, another job's
//! rank, a rank already connected) is refused and logged without disturbing the job.

use crate::process::ProcessPeers;
use crate::shm;
use ringlet_core::auth::{accept_handshake, connect_handshake};
use ringlet_core::error::PeerId;
use ringlet_core::io::TimedStream;
use ringlet_core::{msg, Error, JobToken, Result, Role};
use ringlet_store::StoreClient;
use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::{AsFd, AsRawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener, UnixStream};
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

/// Everything a rank needs to join.
#[derive(Clone, Debug)]
pub struct JoinOptions {
    pub rank: usize,
    pub world_size: usize,
    /// Names this communicator's keys in the store, so several can share one.
    pub comm: String,
    /// Address to listen on (`0.0.0.0` listens everywhere).
    pub bind_ip: IpAddr,
    /// Host (name or IP) the other ranks use to reach us.
    pub advertise_host: String,
    /// Deadline for joining.
    pub deadline: Instant,
    /// See [`ProcessPeers`]: spin this long before sleeping in a wait.
    pub busy_poll: Duration,
    /// Offer shared memory to ranks of this host (`RINGLET_SHM`).
    pub shm: bool,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct PeerHello {
    comm: String,
    rank: u64,
    world_size: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct PeerAck {
    refused: Option<String>,
}

fn addr_key(comm: &str, rank: usize) -> String {
    format!("{comm}/ring/{rank}")
}

/// Joins the job described by `opts`: returns once we are connected to the next rank and the
/// previous rank is connected to us. `None` for a world of one, which has no peers.
pub fn join(
    store: &mut StoreClient,
    token: &JobToken,
    opts: &JoinOptions,
) -> Result<Option<ProcessPeers>> {
    let n = opts.world_size;
    if n <= 1 {
        return Ok(None);
    }
    let (next, prev) = ((opts.rank + 1) % n, (opts.rank + n - 1) % n);
    let listener = TcpListener::bind(SocketAddr::new(opts.bind_ip, 0))
        .map_err(|e| Error::io(format!("listening for peers on {}", opts.bind_ip), e))?;
    let port = listener
        .local_addr()
        .map_err(|e| Error::io("reading our port", e))?
        .port();
    let ours = format!("{}:{port}", opts.advertise_host);
    let arrivals = Arc::new(Arrivals::new()?);
    // Shared memory is offered through a Unix socket in the abstract namespace of our network
    // namespace, named after our TCP port there (unique while we listen) and our pid.
    let (unix, own_shm) = match shm::host_key().filter(|_| opts.shm) {
        Some(key) => {
            let name = format!("ringlet-{port}-{}", std::process::id());
            let addr = UnixAddr::from_abstract_name(name.as_bytes())
                .map_err(|e| Error::io("naming our shared-memory socket", e))?;
            let l = UnixListener::bind_addr(&addr)
                .map_err(|e| Error::io(format!("listening for shared memory on @{name}"), e))?;
            (Some(l), Some((key, name)))
        }
        None => (None, None),
    };
    let acceptor = Acceptor::spawn(
        listener,
        unix,
        token.clone(),
        opts.clone(),
        arrivals.clone(),
    )?;
    store.set(
        &addr_key(&opts.comm, opts.rank),
        ours.as_bytes(),
        opts.deadline,
    )?;
    tracing::debug!(rank = opts.rank, %ours, "listening for peers");

    let next_addr = peer_addr(store, &opts.comm, next, opts.deadline)?;
    let prev_addr = peer_addr(store, &opts.comm, prev, opts.deadline)?;
    let local = PeerId::rank(opts.rank, ours.clone());
    let mut peers = ProcessPeers::new(
        opts.clone(),
        token.clone(),
        local,
        arrivals.clone(),
        own_shm,
        acceptor,
    );
    peers.know(next, next_addr.clone());
    peers.know(prev, prev_addr.clone());
    let next_id = PeerId::rank(next, next_addr.clone());
    let to_next = connect_peer(&next_addr, &next_id, token, opts, opts.deadline)?;
    peers.adopt_to(next, to_next)?;

    let prev_id = PeerId::rank(prev, prev_addr);
    let started = Instant::now();
    if !arrivals.wait_for(prev, opts.deadline) {
        return Err(Error::Timeout {
            peer: prev_id.clone(),
            waiting_for: format!("for {prev_id} to connect to our port {ours}"),
            after: started.elapsed(),
        });
    }
    // Installed now, before any later link from the same rank can arrive.
    peers.collect_arrivals()?;
    Ok(Some(peers))
}

fn peer_addr(
    store: &mut StoreClient,
    comm: &str,
    rank: usize,
    deadline: Instant,
) -> Result<String> {
    let raw = store.get(&addr_key(comm, rank), deadline)?;
    String::from_utf8(raw).map_err(|_| {
        Error::protocol(
            &PeerId::addr(store.server_addr().to_string()),
            format!("rank {rank}'s published address is not text"),
        )
    })
}

/// Connects to a peer and proves ourselves, retrying until `deadline`: the peer's port may be
/// busy with strangers, or a connection may break during the handshake. A refused connection
/// (nobody listens: the peer is gone, since it listened before publishing its address), a token
/// mismatch or an explicit refusal is final.
pub(crate) fn connect_peer(
    addr: &str,
    peer: &PeerId,
    token: &JobToken,
    opts: &JoinOptions,
    deadline: Instant,
) -> Result<TcpStream> {
    let started = Instant::now();
    let mut backoff = Duration::from_millis(5);
    loop {
        let err = match try_connect(addr, peer, token, opts, deadline) {
            Ok(stream) => return Ok(stream),
            Err(Attempt::Final(e)) => return Err(e),
            Err(Attempt::Retry(e)) => e,
        };
        if Instant::now() + backoff >= deadline {
            return Err(Error::Timeout {
                peer: peer.clone(),
                waiting_for: format!("connecting to {peer} (last error: {err})"),
                after: started.elapsed(),
            });
        }
        std::thread::sleep(backoff);
        backoff = (backoff * 2).min(Duration::from_millis(200));
    }
}

/// Connects to a rank of our host through its Unix socket and proves ourselves, for a
/// shared-memory link. Its socket exists (it listened before announcing it), so a failure to
/// connect means it is gone.
pub(crate) fn connect_shm(
    name: &str,
    peer: &PeerId,
    token: &JobToken,
    opts: &JoinOptions,
    deadline: Instant,
) -> Result<UnixStream> {
    let addr = UnixAddr::from_abstract_name(name.as_bytes())
        .map_err(|e| Error::Config(format!("{peer} announced an unusable socket {name:?}: {e}")))?;
    let mut sock = UnixStream::connect_addr(&addr).map_err(|e| Error::PeerLost {
        peer: peer.clone(),
        detail: format!("its shared-memory socket @{name} refused us ({e})"),
    })?;
    introduce(&mut sock, peer, token, opts, deadline)?;
    Ok(sock)
}

/// Our side of a new link's opening, over TCP or a Unix socket: the token handshake, then our
/// hello (job, rank, world size), then the peer's verdict on it.
fn introduce<S: TimedStream>(
    stream: &mut S,
    peer: &PeerId,
    token: &JobToken,
    opts: &JoinOptions,
    deadline: Instant,
) -> Result<()> {
    connect_handshake(stream, token, Role::Ring, peer, deadline)?;
    let hello = PeerHello {
        comm: opts.comm.clone(),
        rank: opts.rank as u64,
        world_size: opts.world_size as u64,
    };
    msg::send(stream, &hello, peer, deadline)?;
    let ack: PeerAck = msg::recv(stream, 4096, peer, deadline)?;
    match ack.refused {
        Some(why) => Err(Error::Config(format!(
            "{peer} refused our connection: {why}"
        ))),
        None => Ok(()),
    }
}

/// Why a connection attempt failed, and whether trying again can help.
enum Attempt {
    Retry(Error),
    Final(Error),
}

impl From<Error> for Attempt {
    /// A token mismatch or an explicit refusal is final; anything else may pass.
    fn from(e: Error) -> Attempt {
        match e {
            Error::Auth { .. } | Error::Config(_) => Attempt::Final(e),
            e => Attempt::Retry(e),
        }
    }
}

fn try_connect(
    addr: &str,
    peer: &PeerId,
    token: &JobToken,
    opts: &JoinOptions,
    deadline: Instant,
) -> std::result::Result<TcpStream, Attempt> {
    let target = addr
        .to_socket_addrs()
        .map_err(|e| {
            Error::Config(format!(
                "{peer} published an unusable address {addr:?}: {e}"
            ))
        })?
        .next()
        .ok_or_else(|| {
            Error::Config(format!(
                "{peer} published {addr:?}, which resolves to nothing"
            ))
        })?;
    let left = deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    let mut stream = TcpStream::connect_timeout(&target, left).map_err(|e| {
        if e.kind() == std::io::ErrorKind::ConnectionRefused {
            Attempt::Final(Error::PeerLost {
                peer: peer.clone(),
                detail: format!("nothing listens on its port any more ({e})"),
            })
        } else {
            Attempt::Retry(Error::io(format!("connecting to {peer}"), e))
        }
    })?;
    // A refusal is a configuration error: final (see `From<Error> for Attempt`).
    introduce(&mut stream, peer, token, opts, deadline)?;
    Ok(stream)
}

/// A link a peer opened to us.
pub(crate) enum Inbound {
    Tcp(TcpStream),
    Shm(shm::Reader),
}

/// Links the acceptors admitted and the engine has not taken yet, and the bell that wakes an
/// engine waiting for one (a socket pair: its read end sits in the engine's `ppoll`).
pub(crate) struct Arrivals {
    queue: Mutex<Vec<(usize, Inbound)>>,
    /// Ranks ever admitted, and whether by shared memory: each may connect once each way.
    admitted: Mutex<Vec<(usize, bool)>>,
    bell_rx: UnixStream,
    bell_tx: UnixStream,
}

impl Arrivals {
    fn new() -> Result<Arrivals> {
        let (bell_rx, bell_tx) =
            UnixStream::pair().map_err(|e| Error::io("creating the arrival bell", e))?;
        for s in [&bell_rx, &bell_tx] {
            s.set_nonblocking(true)
                .map_err(|e| Error::io("configuring the arrival bell", e))?;
        }
        Ok(Arrivals {
            queue: Mutex::new(Vec::new()),
            admitted: Mutex::new(Vec::new()),
            bell_rx,
            bell_tx,
        })
    }

    pub(crate) fn bell_fd(&self) -> i32 {
        self.bell_rx.as_raw_fd()
    }

    /// Claims `rank`'s single connection of this kind; false when it already has one.
    fn claim(&self, rank: usize, shm: bool) -> bool {
        let mut admitted = self.admitted.lock().unwrap_or_else(|p| p.into_inner());
        if admitted.contains(&(rank, shm)) {
            return false;
        }
        admitted.push((rank, shm));
        true
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

    /// Blocks until `rank` has connected (its stream stays queued) or `deadline` passes.
    fn wait_for(&self, rank: usize, deadline: Instant) -> bool {
        loop {
            let here = self
                .queue
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .any(|(r, _)| *r == rank);
            if here {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
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
    /// What the admitted stream becomes (a shared-memory link receives its ring first).
    fn adopt(stream: Self::Stream, peer: PeerId, deadline: Instant) -> Result<Inbound>;
}

impl Listen for TcpListener {
    type Stream = TcpStream;
    const SHM: bool = false;
    fn accept_one(&self) -> std::io::Result<(TcpStream, String)> {
        self.accept().map(|(s, from)| (s, from.to_string()))
    }
    fn adopt(stream: TcpStream, _: PeerId, _: Instant) -> Result<Inbound> {
        Ok(Inbound::Tcp(stream))
    }
}

impl Listen for UnixListener {
    type Stream = UnixStream;
    const SHM: bool = true;
    fn accept_one(&self) -> std::io::Result<(UnixStream, String)> {
        self.accept()
            .map(|(s, _)| (s, "a local process".to_string()))
    }
    fn adopt(stream: UnixStream, peer: PeerId, deadline: Instant) -> Result<Inbound> {
        let left = deadline.saturating_duration_since(Instant::now());
        stream
            .set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .map_err(|e| Error::io("configuring a shared-memory socket", e))?;
        shm::Reader::accept(&stream, peer).map(Inbound::Shm)
    }
}

impl Acceptor {
    fn spawn(
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
    } else if !arrivals.claim(hello.rank as usize, L::SHM) {
        Some(format!("rank {} is already connected", hello.rank))
    } else {
        None
    };
    msg::send(
        &mut stream,
        &PeerAck {
            refused: refusal.clone(),
        },
        peer,
        deadline,
    )?;
    match refusal {
        Some(why) => Err(Error::Config(format!("{peer}: {why}"))),
        None => {
            let rank = hello.rank as usize;
            let link = L::adopt(stream, PeerId::rank(rank, peer.addr.clone()), deadline)?;
            arrivals.push(rank, link);
            Ok(())
        }
    }
}
