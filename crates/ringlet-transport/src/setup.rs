//! Forming the ring: listen, publish our address in the store, connect to the next rank, accept
//! the previous one. Every connection proves the job token before a byte of ring traffic is
//! accepted, and a stranger on our port (garbage, an HTTP probe, a wrong token, another job's
//! rank) is refused and logged without disturbing the job.

use crate::tcp::TcpLink;
use ringlet_core::auth::{accept_handshake, connect_handshake};
use ringlet_core::error::PeerId;
use ringlet_core::{msg, Error, JobToken, Result, Role};
use ringlet_store::StoreClient;
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// How long a connection on our ring port gets to authenticate and say who it is. A real rank
/// needs a round trip or two; a short window keeps silent strangers from holding slots.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(3);
/// Handshakes in flight at once; more connections than this are closed unanswered (the real
/// predecessor retries until the deadline).
const MAX_PENDING_HANDSHAKES: usize = 256;

/// Everything a rank needs to join a ring.
#[derive(Clone, Debug)]
pub struct RingOptions {
    pub rank: usize,
    pub world_size: usize,
    /// Names this communicator's keys in the store, so several can share one.
    pub comm: String,
    /// Address to listen on (`0.0.0.0` listens everywhere).
    pub bind_ip: IpAddr,
    /// Host (name or IP) the other ranks use to reach us.
    pub advertise_host: String,
    /// Deadline for the whole formation.
    pub deadline: Instant,
    /// See [`TcpLink`]: spin this long before sleeping in a wait.
    pub busy_poll: Duration,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct RingHello {
    comm: String,
    rank: u64,
    world_size: u64,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct RingAck {
    refused: Option<String>,
}

fn addr_key(comm: &str, rank: usize) -> String {
    format!("{comm}/ring/{rank}")
}

/// Joins the ring described by `opts`. Returns `None` for a world of one, which has no
/// neighbours.
pub fn form_ring(
    store: &mut StoreClient,
    token: &JobToken,
    opts: &RingOptions,
) -> Result<Option<TcpLink>> {
    let n = opts.world_size;
    if n <= 1 {
        return Ok(None);
    }
    let (next, prev) = ((opts.rank + 1) % n, (opts.rank + n - 1) % n);
    let listener = TcpListener::bind(SocketAddr::new(opts.bind_ip, 0))
        .map_err(|e| Error::io(format!("listening for ring peers on {}", opts.bind_ip), e))?;
    let port = listener
        .local_addr()
        .map_err(|e| Error::io("reading our ring port", e))?
        .port();
    let ours = format!("{}:{port}", opts.advertise_host);
    let (found_prev, arrivals) = mpsc::channel();
    let acceptor = Acceptor::spawn(listener, token.clone(), opts.clone(), prev, found_prev)?;
    store.set(
        &addr_key(&opts.comm, opts.rank),
        ours.as_bytes(),
        opts.deadline,
    )?;
    tracing::debug!(rank = opts.rank, %ours, "listening for ring peers");

    let next_addr = peer_addr(store, &opts.comm, next, opts.deadline)?;
    let prev_addr = peer_addr(store, &opts.comm, prev, opts.deadline)?;
    let next_id = PeerId::rank(next, next_addr.clone());
    let prev_id = PeerId::rank(prev, prev_addr);
    let to_next = connect_next(&next_addr, &next_id, token, opts)?;

    let left = opts.deadline.saturating_duration_since(Instant::now());
    let from_prev = arrivals.recv_timeout(left).map_err(|_| Error::Timeout {
        peer: prev_id.clone(),
        waiting_for: format!("for {prev_id} to connect to our ring port {ours}"),
        after: left,
    })?;
    let local = PeerId::rank(opts.rank, ours);
    TcpLink::new(
        opts.rank,
        n,
        local,
        next_id,
        prev_id,
        to_next,
        from_prev,
        opts.busy_poll,
        acceptor,
    )
    .map(Some)
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
            format!("rank {rank}'s published ring address is not text"),
        )
    })
}

/// Connects to the next rank and proves ourselves, retrying until the deadline: the next rank's
/// port may be busy with strangers, or a connection may break during the handshake. Only a
/// token mismatch or an explicit refusal is final.
fn connect_next(
    addr: &str,
    peer: &PeerId,
    token: &JobToken,
    opts: &RingOptions,
) -> Result<TcpStream> {
    let started = Instant::now();
    let mut backoff = Duration::from_millis(5);
    loop {
        let err = match try_connect_next(addr, peer, token, opts) {
            Ok(stream) => return Ok(stream),
            Err(e @ (Error::Auth { .. } | Error::Config(_))) => return Err(e),
            Err(e) => e,
        };
        if Instant::now() + backoff >= opts.deadline {
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

fn try_connect_next(
    addr: &str,
    peer: &PeerId,
    token: &JobToken,
    opts: &RingOptions,
) -> Result<TcpStream> {
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
    let left = opts
        .deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1));
    let mut stream = TcpStream::connect_timeout(&target, left)
        .map_err(|e| Error::io(format!("connecting to {peer}"), e))?;
    connect_handshake(&mut stream, token, Role::Ring, peer, opts.deadline)?;
    let hello = RingHello {
        comm: opts.comm.clone(),
        rank: opts.rank as u64,
        world_size: opts.world_size as u64,
    };
    msg::send(&mut stream, &hello, peer, opts.deadline)?;
    let ack: RingAck = msg::recv(&mut stream, 4096, peer, opts.deadline)?;
    if let Some(why) = ack.refused {
        return Err(Error::Config(format!(
            "{peer} refused our ring connection: {why}"
        )));
    }
    Ok(stream)
}

/// The thread behind our ring port. It hands the authenticated connection from the expected
/// previous rank to `form_ring`, and refuses everything else for as long as the link lives.
pub(crate) struct Acceptor {
    stop: Arc<AtomicBool>,
    /// The listening socket (a duplicate of the thread's): shutting it down wakes `accept`.
    listener: TcpListener,
    thread: Option<JoinHandle<()>>,
}

impl Acceptor {
    fn spawn(
        listener: TcpListener,
        token: JobToken,
        opts: RingOptions,
        prev: usize,
        found_prev: mpsc::Sender<TcpStream>,
    ) -> Result<Acceptor> {
        let handle = listener
            .try_clone()
            .map_err(|e| Error::io("duplicating our ring port", e))?;
        let stop = Arc::new(AtomicBool::new(false));
        let stopping = stop.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ringlet-accept-{}", opts.rank))
            .spawn(move || accept_loop(listener, token, opts, prev, found_prev, stopping))
            .map_err(|e| Error::io("starting the ring acceptor thread", e))?;
        Ok(Acceptor {
            stop,
            listener: handle,
            thread: Some(thread),
        })
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // On Linux, shutting a listening socket down makes a blocked accept() return an error.
        let _ = socket2::SockRef::from(&self.listener).shutdown(std::net::Shutdown::Both);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    token: JobToken,
    opts: RingOptions,
    prev: usize,
    found_prev: mpsc::Sender<TcpStream>,
    stop: Arc<AtomicBool>,
) {
    let claimed = Arc::new(AtomicBool::new(false));
    let pending = Arc::new(AtomicUsize::new(0));
    let opts = Arc::new(opts);
    while !stop.load(Ordering::SeqCst) {
        let (stream, from) = match listener.accept() {
            Ok(c) => c,
            Err(_) if stop.load(Ordering::SeqCst) => break,
            Err(e) => {
                tracing::warn!(rank = opts.rank, "ring port accept failed: {e}");
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if stop.load(Ordering::SeqCst) {
            break;
        }
        if pending.fetch_add(1, Ordering::SeqCst) >= MAX_PENDING_HANDSHAKES {
            pending.fetch_sub(1, Ordering::SeqCst);
            tracing::warn!(rank = opts.rank, %from, "too many pending handshakes on the ring port; closing");
            continue;
        }
        let (token, job, claimed, pending, found_prev) = (
            token.clone(),
            opts.clone(),
            claimed.clone(),
            pending.clone(),
            found_prev.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("ringlet-handshake".into())
            .spawn(move || {
                let peer = PeerId::addr(from.to_string());
                if let Err(e) = admit(stream, &peer, &token, &job, prev, &claimed, &found_prev) {
                    tracing::warn!(
                        rank = job.rank,
                        "refused a connection on the ring port: {e}"
                    );
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

fn admit(
    mut stream: TcpStream,
    peer: &PeerId,
    token: &JobToken,
    opts: &RingOptions,
    prev: usize,
    claimed: &AtomicBool,
    found_prev: &mpsc::Sender<TcpStream>,
) -> Result<()> {
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    accept_handshake(&mut stream, token, Role::Ring, peer, deadline)?;
    let hello: RingHello = msg::recv(&mut stream, 4096, peer, deadline)?;
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
    } else if hello.rank != prev as u64 {
        Some(format!(
            "it claims rank {}, we expect rank {prev} to connect",
            hello.rank
        ))
    } else if claimed.swap(true, Ordering::SeqCst) {
        Some(format!("rank {prev} is already connected"))
    } else {
        None
    };
    msg::send(
        &mut stream,
        &RingAck {
            refused: refusal.clone(),
        },
        peer,
        deadline,
    )?;
    match refusal {
        Some(why) => Err(Error::Config(format!("{peer}: {why}"))),
        None => {
            // form_ring may have given up already; then the connection just closes.
            let _ = found_prev.send(stream);
            Ok(())
        }
    }
}
