//! The store server: one thread accepts, one thread per connection authenticates and then answers
//! requests against a shared map. Anything on the network may connect, so every read is bounded in
//! size and time, nothing from the wire can panic a thread, and dropping the server shuts every
//! socket down so no thread outlives it.

use crate::limits::{ByteLimits, Entries, Warnings};
use crate::protocol::{self, FrameError, Request, Response};
use mio::net::TcpListener;
use mio::{Events, Interest, Poll, Token, Waker};
use ringlet_core::auth::{accept_handshake, JobToken, Role};
use ringlet_core::error::PeerId;
use ringlet_core::io::IoFailure;
use ringlet_core::{msg, Error, Result};
use std::collections::{HashMap, VecDeque};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Limits of a [`StoreServer`]; the defaults suit production, tests shorten the timeouts.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// How long a new connection has to prove it holds the job token.
    pub handshake_timeout: Duration,
    /// How long the rest of a request may take to arrive once its first byte has, and how long a
    /// reply may take to send.
    pub frame_timeout: Duration,
    /// Connections served at once. Past it, the oldest connection still proving itself is
    /// closed to make room; when every one has proved itself, the new one is closed.
    pub max_connections: usize,
    /// Connections still proving they hold the token, at most: past it the oldest is closed, so
    /// idle or slow strangers never keep a rank's own connection waiting.
    pub max_unauthenticated: usize,
    /// Bytes (keys plus values) the store holds in total, and per client (what one connection
    /// wrote and nobody has overwritten or deleted). A write past either is refused, naming it.
    pub max_bytes: usize,
    pub max_client_bytes: usize,
    /// Refused connections are logged at most once per interval, then summarised.
    pub warn_interval: Duration,
    /// Longest a single request waits for keys, whatever the client asks (clients re-ask).
    pub max_wait: Duration,
}

impl Default for ServerConfig {
    fn default() -> ServerConfig {
        ServerConfig {
            handshake_timeout: Duration::from_secs(10),
            frame_timeout: Duration::from_secs(30),
            max_connections: 1024,
            max_unauthenticated: 64,
            max_bytes: 256 << 20,
            max_client_bytes: 32 << 20,
            warn_interval: Duration::from_secs(30),
            max_wait: Duration::from_secs(600),
        }
    }
}

/// A running store. Serves until dropped.
pub struct StoreServer {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    waker: Waker,
    acceptor: Option<JoinHandle<()>>,
}

struct Shared {
    token: JobToken,
    config: ServerConfig,
    stopping: AtomicBool,
    store: Mutex<Store>,
    changed: Condvar,
    conns: Mutex<Conns>,
    refusals: Mutex<Warnings>,
}

#[derive(Default)]
struct Store {
    map: Entries,
    closed: bool,
}

/// Live connections: a handle on each socket so `drop` can shut it down under a blocked thread.
#[derive(Default)]
struct Conns {
    next_id: u64,
    sockets: HashMap<u64, TcpStream>,
    /// Connections still in the handshake, oldest first.
    unauthenticated: VecDeque<u64>,
    threads: Vec<JoinHandle<()>>,
}

const LISTENER: Token = Token(0);
const WAKE: Token = Token(1);

impl std::fmt::Debug for StoreServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreServer")
            .field("local_addr", &self.local_addr)
            .finish()
    }
}

impl StoreServer {
    /// Binds (e.g. `0.0.0.0:29500`, or `127.0.0.1:0` for any free port) and serves in background
    /// threads until dropped.
    pub fn bind(addr: SocketAddr, token: JobToken) -> Result<StoreServer> {
        StoreServer::bind_with(addr, token, ServerConfig::default())
    }

    /// [`StoreServer::bind`] with limits other than the defaults.
    pub fn bind_with(
        addr: SocketAddr,
        token: JobToken,
        config: ServerConfig,
    ) -> Result<StoreServer> {
        let bind_err = |e| Error::io(format!("binding the rendezvous store to {addr}"), e);
        let mut listener = TcpListener::bind(addr).map_err(bind_err)?;
        let local_addr = listener.local_addr().map_err(bind_err)?;
        let poll = Poll::new().map_err(bind_err)?;
        poll.registry()
            .register(&mut listener, LISTENER, Interest::READABLE)
            .map_err(bind_err)?;
        let waker = Waker::new(poll.registry(), WAKE).map_err(bind_err)?;
        let config_warn_interval = config.warn_interval;
        let shared = Arc::new(Shared {
            token,
            config,
            stopping: AtomicBool::new(false),
            store: Mutex::default(),
            changed: Condvar::new(),
            conns: Mutex::default(),
            refusals: Mutex::new(Warnings::new(
                "rendezvous-store connections refused",
                config_warn_interval,
            )),
        });
        let acceptor = {
            let shared = shared.clone();
            std::thread::Builder::new()
                .name(format!("ringlet-store-accept-{}", local_addr.port()))
                .spawn(move || accept_loop(poll, listener, shared))
                .map_err(|e| Error::io("starting the rendezvous store's accept thread", e))?
        };
        tracing::debug!(%local_addr, "rendezvous store listening");
        Ok(StoreServer {
            local_addr,
            shared,
            waker,
            acceptor: Some(acceptor),
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The value at `key`, read in this process (the launcher that serves the store watches
    /// what the ranks agree on, e.g. who is left after a failure).
    pub fn get(&self, key: &str) -> Option<Vec<u8>> {
        lock(&self.shared.store).map.get(key).map(<[u8]>::to_vec)
    }
}

impl Drop for StoreServer {
    fn drop(&mut self) {
        self.shared.stopping.store(true, Ordering::SeqCst);
        if let Err(e) = self.waker.wake() {
            // The accept loop also polls the flag every second, so this only delays the join.
            tracing::warn!(addr = %self.local_addr, "waking the store's accept thread: {e}");
        }
        if let Some(t) = self.acceptor.take() {
            let _ = t.join();
        }
        // No new connections from here on. Wake waiters, then break every blocked read or write.
        lock(&self.shared.store).closed = true;
        self.shared.changed.notify_all();
        let threads = {
            let mut conns = lock(&self.shared.conns);
            for s in conns.sockets.values() {
                let _ = s.shutdown(Shutdown::Both);
            }
            std::mem::take(&mut conns.threads)
        };
        for t in threads {
            let _ = t.join();
        }
        lock(&self.shared.refusals).summarise(Instant::now());
        tracing::debug!(addr = %self.local_addr, "rendezvous store stopped");
    }
}

/// A poisoned lock only means another connection's thread panicked; the map itself is always
/// left consistent (an update checks its limits first, then changes the map with nothing in
/// between that can panic), so keep serving.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn accept_loop(mut poll: Poll, listener: TcpListener, shared: Arc<Shared>) {
    let mut events = Events::with_capacity(16);
    // After a failed accept (e.g. out of file descriptors) the pending connection raises no new
    // readiness event, so retry on a timer instead.
    let mut retry_after = None;
    while !shared.stopping.load(Ordering::SeqCst) {
        let timeout = retry_after.unwrap_or(Duration::from_secs(1));
        if let Err(e) = poll.poll(&mut events, Some(timeout)) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                tracing::warn!("rendezvous store poll failed: {e}");
                std::thread::sleep(Duration::from_millis(100));
            }
            continue;
        }
        retry_after = None;
        lock(&shared.refusals).flush(Instant::now());
        loop {
            if shared.stopping.load(Ordering::SeqCst) {
                return;
            }
            match listener.accept() {
                Ok((stream, remote)) => admit(TcpStream::from(stream), remote, &shared),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionAborted => {}
                Err(e) => {
                    tracing::warn!("rendezvous store accept failed: {e}");
                    retry_after = Some(Duration::from_millis(100));
                    break;
                }
            }
        }
    }
}

fn admit(stream: TcpStream, remote: SocketAddr, shared: &Arc<Shared>) {
    let mut conns = lock(&shared.conns);
    conns.threads.retain(|t| !t.is_finished());
    let config = &shared.config;
    // Room for the newcomer: the oldest stranger still proving itself goes first.
    while conns.unauthenticated.len() >= config.max_unauthenticated.max(1)
        || (conns.sockets.len() >= config.max_connections && !conns.unauthenticated.is_empty())
    {
        let Some(oldest) = conns.unauthenticated.pop_front() else {
            break;
        };
        // Off the live list at once, so it no longer counts against the cap; its thread ends
        // on the closed socket.
        if let Some(s) = conns.sockets.remove(&oldest) {
            let _ = s.shutdown(Shutdown::Both);
            let from = s.peer_addr().map_or("?".to_string(), |a| a.to_string());
            refused(
                shared,
                format!("closed rendezvous-store connection from {from}: it had not proved itself when more arrived"),
            );
        }
    }
    if conns.sockets.len() >= config.max_connections {
        refused(
            shared,
            format!(
                "refused rendezvous-store connection from {remote}: already serving {} connections",
                conns.sockets.len()
            ),
        );
        return;
    }
    let registered = match stream.try_clone() {
        Ok(s) => s,
        Err(e) => {
            refused(
                shared,
                format!("refused rendezvous-store connection from {remote}: {e}"),
            );
            return;
        }
    };
    let id = conns.next_id;
    conns.next_id += 1;
    conns.sockets.insert(id, registered);
    conns.unauthenticated.push_back(id);
    let thread_shared = shared.clone();
    let spawned = std::thread::Builder::new()
        .name(format!("ringlet-store-conn-{id}"))
        .stack_size(512 << 10)
        .spawn(move || {
            let _registered = Registered(id, &thread_shared);
            serve(stream, remote, id, &thread_shared);
        });
    match spawned {
        Ok(t) => conns.threads.push(t),
        Err(e) => {
            conns.sockets.remove(&id);
            conns.unauthenticated.retain(|&u| u != id);
            refused(
                shared,
                format!("refused rendezvous-store connection from {remote}: no thread for it: {e}"),
            );
        }
    }
}

/// Logs a refused connection, at most one line per interval (see [`ServerConfig::warn_interval`]).
fn refused(shared: &Shared, line: String) {
    lock(&shared.refusals).warn(Instant::now(), line);
}

/// Takes a connection off the live list when its thread ends, however it ends.
struct Registered<'a>(u64, &'a Shared);

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut conns = lock(&self.1.conns);
        conns.sockets.remove(&self.0);
        conns.unauthenticated.retain(|&u| u != self.0);
    }
}

fn serve(mut stream: TcpStream, remote: SocketAddr, id: u64, shared: &Shared) {
    let peer = PeerId::addr(remote.to_string());
    let config = &shared.config;
    // Accepted sockets may inherit the listener's non-blocking mode; the bounded reads below need
    // blocking ones.
    if let Err(e) = stream.set_nonblocking(false) {
        tracing::warn!(%remote, "dropping rendezvous-store connection: {e}");
        return;
    }
    let _ = stream.set_nodelay(true);
    // An authenticated client may stay quiet for the whole job, so idle reads have no deadline of
    // their own; keepalive ends those whose host died, and dropping the server ends the rest.
    let keepalive = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(60))
        .with_interval(Duration::from_secs(10));
    #[cfg(any(target_os = "linux", target_os = "macos"))]
    let keepalive = keepalive.with_retries(3);
    let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);

    let deadline = Instant::now() + config.handshake_timeout;
    if let Err(e) = accept_handshake(&mut stream, &shared.token, Role::Store, &peer, deadline) {
        // One closed to make room was counted when it was closed.
        let displaced = !lock(&shared.conns).unauthenticated.contains(&id);
        if !displaced && !shared.stopping.load(Ordering::SeqCst) {
            refused(
                shared,
                format!("refused rendezvous-store connection from {remote}: {e}"),
            );
        }
        return;
    }
    lock(&shared.conns).unauthenticated.retain(|&u| u != id);
    tracing::debug!(%remote, "rendezvous-store client connected");
    let idle = Duration::from_secs(365 * 24 * 3600);
    loop {
        let body = match protocol::read_frame(
            &mut stream,
            Instant::now() + idle,
            config.frame_timeout,
        ) {
            Ok(body) => body,
            Err(FrameError::Io(IoFailure::Closed)) => {
                tracing::debug!(%remote, "rendezvous-store client disconnected");
                return;
            }
            Err(FrameError::Io(f)) => {
                if !shared.stopping.load(Ordering::SeqCst) {
                    tracing::warn!(%remote, "dropping rendezvous-store connection: reading a request: {f}");
                }
                return;
            }
            Err(FrameError::TooLarge(len)) => {
                let why = format!(
                    "request of {len} bytes exceeds the {}-byte limit",
                    protocol::MAX_FRAME
                );
                tracing::warn!(%remote, "dropping rendezvous-store connection: {why}");
                // Best effort: the unread body means the connection cannot continue anyway.
                let _ = reply(&mut stream, &Response::Refused(why), &peer, config);
                return;
            }
        };
        let response = match protocol::decode::<Request>(&body) {
            Ok(request) => match handle(request, id, shared) {
                Some(r) => r,
                None => return,
            },
            Err(why) => Response::Refused(why),
        };
        if let Response::Refused(why) = &response {
            tracing::warn!(%remote, "refused a rendezvous-store request: {why}");
        }
        if let Err(e) = reply(&mut stream, &response, &peer, config) {
            if !shared.stopping.load(Ordering::SeqCst) {
                tracing::warn!(%remote, "dropping rendezvous-store connection: {e}");
            }
            return;
        }
    }
}

fn reply(stream: &mut TcpStream, r: &Response, peer: &PeerId, config: &ServerConfig) -> Result<()> {
    msg::send(stream, r, peer, Instant::now() + config.frame_timeout)
}

/// Carries out one request. `None` means the server is shutting down and the connection should
/// close (the client then sees the store as gone).
fn handle(request: Request, client: u64, shared: &Shared) -> Option<Response> {
    let refuse = |why: String| Some(Response::Refused(why));
    let limits = ByteLimits {
        total: shared.config.max_bytes,
        per_client: shared.config.max_client_bytes,
    };
    match request {
        Request::Set { key, value } => {
            if let Err(why) =
                protocol::check_key(&key).and_then(|()| protocol::check_value(&key, &value))
            {
                return refuse(why);
            }
            if let Err(why) = lock(&shared.store).map.put(key, value, client, limits) {
                return refuse(why);
            }
            shared.changed.notify_all();
            Some(Response::Done)
        }
        Request::Get { key, wait } => {
            if let Err(why) = protocol::check_key(&key) {
                return refuse(why);
            }
            let store = wait_for(shared, std::slice::from_ref(&key), wait)?;
            Some(match store {
                Ok(store) => Response::Value(store.map.get(&key).unwrap_or_default().to_vec()),
                Err(missing) => Response::Missing(missing),
            })
        }
        Request::Wait { keys, wait } => {
            if let Err(why) = protocol::check_keys(&keys) {
                return refuse(why);
            }
            Some(match wait_for(shared, &keys, wait)? {
                Ok(_) => Response::Done,
                Err(missing) => Response::Missing(missing),
            })
        }
        Request::Add { key, delta } => {
            if let Err(why) = protocol::check_key(&key) {
                return refuse(why);
            }
            let mut store = lock(&shared.store);
            let current = match store.map.get(&key) {
                None => 0,
                Some(v) => match std::str::from_utf8(v)
                    .ok()
                    .and_then(|s| s.parse::<i64>().ok())
                {
                    Some(n) => n,
                    None => {
                        return refuse(format!(
                            "key {key:?} holds a value that is not a decimal integer"
                        ))
                    }
                },
            };
            let Some(sum) = current.checked_add(delta) else {
                return refuse(format!(
                    "adding {delta} to {current} at key {key:?} overflows i64"
                ));
            };
            let stored = store
                .map
                .put(key, sum.to_string().into_bytes(), client, limits);
            drop(store);
            if let Err(why) = stored {
                return refuse(why);
            }
            shared.changed.notify_all();
            Some(Response::Count(sum))
        }
        Request::Delete { key } => {
            if let Err(why) = protocol::check_key(&key) {
                return refuse(why);
            }
            Some(Response::Deleted(lock(&shared.store).map.remove(&key)))
        }
    }
}

/// Waits up to `wait` (capped by the config) until every key exists. Returns the locked store
/// when they all do, the keys still missing when the wait expires, and `None` on shutdown.
fn wait_for<'a>(
    shared: &'a Shared,
    keys: &[String],
    wait: Duration,
) -> Option<std::result::Result<MutexGuard<'a, Store>, Vec<String>>> {
    let until = Instant::now() + wait.min(shared.config.max_wait);
    let mut store = lock(&shared.store);
    loop {
        if store.closed {
            return None;
        }
        let missing: Vec<String> = keys
            .iter()
            .filter(|k| !store.map.contains_key(k))
            .cloned()
            .collect();
        if missing.is_empty() {
            return Some(Ok(store));
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Some(Err(missing));
        }
        store = shared
            .changed
            .wait_timeout(store, left)
            .unwrap_or_else(|p| p.into_inner())
            .0;
    }
}
