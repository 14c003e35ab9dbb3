//! Joining a job's transport: listen, publish our address in the store, connect to the next rank
//! and wait for the previous one (the ring every collective can use from the start). Every
//! connection proves the job token and says which rank it is before a byte of collective traffic
//! is accepted; a stranger on our port (garbage, an HTTP probe, a wrong token, another job's
//! rank, a rank already connected) is refused and logged without disturbing the job (see
//! [`accept`](crate::accept)).

use crate::accept::{Acceptor, Arrivals, Waited};
use crate::process::ProcessPeers;
use crate::shm;
use crate::stripe::MAX_STREAMS;
use ringlet_core::auth::connect_handshake;
use ringlet_core::error::PeerId;
use ringlet_core::io::TimedStream;
use ringlet_core::{msg, Error, JobToken, Result, Role};
use ringlet_store::StoreClient;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr as UnixAddr, UnixListener, UnixStream};
use std::sync::Arc;
use std::time::{Duration, Instant};

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
    /// TCP connections per peer and direction (`RINGLET_NSOCKS`), 1 to
    /// [`MAX_STREAMS`](crate::stripe::MAX_STREAMS); every rank must use the same number.
    pub streams: usize,
}

/// What a new link says first, after the token handshake.
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct PeerHello {
    pub(crate) comm: String,
    pub(crate) rank: u64,
    pub(crate) world_size: u64,
    /// Which of the sender's `streams` connections this is (0 for shared memory).
    pub(crate) stream: u64,
    pub(crate) streams: u64,
}

/// The answer to a [`PeerHello`].
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct PeerAck {
    pub(crate) refused: Option<String>,
}

/// The store key under which rank `rank` of communicator `comm` publishes its address.
pub fn addr_key(comm: &str, rank: usize) -> String {
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
    if !(1..=MAX_STREAMS).contains(&opts.streams) {
        return Err(Error::Config(format!(
            "{} TCP streams per peer (RINGLET_NSOCKS) is out of range: 1 to {MAX_STREAMS}",
            opts.streams
        )));
    }
    let (next, prev) = ((opts.rank + 1) % n, (opts.rank + n - 1) % n);
    let listener = TcpListener::bind(SocketAddr::new(opts.bind_ip, 0))
        .map_err(|e| Error::io(format!("listening for peers on {}", opts.bind_ip), e))?;
    let port = listener
        .local_addr()
        .map_err(|e| Error::io("reading our port", e))?
        .port();
    let ours = format!("{}:{port}", opts.advertise_host);
    let arrivals = Arc::new(Arrivals::new(opts.streams)?);
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
    let to_next = connect_streams(&next_addr, &next_id, token, opts, opts.deadline)?;
    peers.adopt_to(next, to_next)?;

    let prev_id = PeerId::rank(prev, prev_addr);
    let started = Instant::now();
    match arrivals.wait_for(prev, opts.deadline) {
        Waited::Here => {}
        // It will not come: fail now, as it does, rather than at the deadline.
        Waited::Disagrees(why) => {
            return Err(Error::Config(format!("{prev_id} cannot join us: {why}")))
        }
        Waited::TimedOut => {
            return Err(Error::Timeout {
                peer: prev_id.clone(),
                waiting_for: format!("for {prev_id} to connect to our port {ours}"),
                after: started.elapsed(),
            })
        }
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

/// Opens our `opts.streams` TCP connections to a peer, in the order both sides deal bytes to
/// them (see [`stripe`](crate::stripe)).
pub(crate) fn connect_streams(
    addr: &str,
    peer: &PeerId,
    token: &JobToken,
    opts: &JoinOptions,
    deadline: Instant,
) -> Result<Vec<TcpStream>> {
    (0..opts.streams)
        .map(|i| connect_peer(addr, peer, token, opts, i, deadline))
        .collect()
}

/// Connects to a peer and proves ourselves, retrying until `deadline`: the peer's port may be
/// busy with strangers, or a connection may break during the handshake. A refused connection
/// (nobody listens: the peer is gone, since it listened before publishing its address), a token
/// mismatch or an explicit refusal is final.
fn connect_peer(
    addr: &str,
    peer: &PeerId,
    token: &JobToken,
    opts: &JoinOptions,
    stream: usize,
    deadline: Instant,
) -> Result<TcpStream> {
    let started = Instant::now();
    let mut backoff = Duration::from_millis(5);
    loop {
        let err = match try_connect(addr, peer, token, opts, stream, deadline) {
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
    introduce(&mut sock, peer, token, opts, 0, deadline)?;
    Ok(sock)
}

/// Our side of a new link's opening, over TCP or a Unix socket: the token handshake, then our
/// hello (job, rank, world size, which connection of how many), then the peer's verdict on it.
fn introduce<S: TimedStream>(
    stream: &mut S,
    peer: &PeerId,
    token: &JobToken,
    opts: &JoinOptions,
    index: usize,
    deadline: Instant,
) -> Result<()> {
    connect_handshake(stream, token, Role::Ring, peer, deadline)?;
    let hello = PeerHello {
        comm: opts.comm.clone(),
        rank: opts.rank as u64,
        world_size: opts.world_size as u64,
        stream: index as u64,
        streams: opts.streams as u64,
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
    index: usize,
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
    introduce(&mut stream, peer, token, opts, index, deadline)?;
    Ok(stream)
}
