//! The store client: one authenticated connection, one request at a time. Every call is bounded by
//! the caller's deadline; waits for keys happen on the server, which answers `Missing` when the
//! time is up, so the client only needs a small margin on top for the reply to travel.

use crate::protocol::{self, FrameError, Request, Response};
use ringlet_core::auth::{connect_handshake, JobToken, Role};
use ringlet_core::error::PeerId;
use ringlet_core::io::{write_all_by, IoFailure};
use ringlet_core::{msg, Error, Result};
use std::net::{SocketAddr, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant};

/// Time allowed past a request's deadline for the server's answer to arrive.
const REPLY_MARGIN: Duration = Duration::from_secs(2);
/// Time allowed for the rest of a reply once its first byte has arrived (a value may be 16 MiB).
const TRANSFER_ALLOWANCE: Duration = Duration::from_secs(10);
const MAX_BACKOFF: Duration = Duration::from_millis(500);
/// Longest single connect attempt, so that one unresponsive address of several cannot use up
/// the whole deadline.
const MAX_CONNECT_ATTEMPT: Duration = Duration::from_secs(5);

/// A connection to the rendezvous store. After an I/O failure the connection is out of step with
/// the server, so every later call fails with [`Error::Broken`]; connect a new client.
pub struct StoreClient {
    addr: String,
    peer: PeerId,
    stream: TcpStream,
    broken: Option<String>,
}

impl std::fmt::Debug for StoreClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreClient")
            .field("addr", &self.addr)
            .finish()
    }
}

/// The latest moment to wait for bytes from the server for a request due by `deadline`. A past
/// deadline still gets one attempt, so `try_get(key, Instant::now())` works.
fn io_deadline(deadline: Instant) -> Instant {
    Instant::now().max(deadline) + REPLY_MARGIN
}

impl StoreClient {
    /// Connects to `host:port`, retrying refused or unreachable connects (the server may not be
    /// up yet) with short backoff until `deadline`, then proves it holds `token`.
    pub fn connect(addr: &str, token: &JobToken, deadline: Instant) -> Result<StoreClient> {
        let well_formed = addr
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !well_formed {
            return Err(Error::Config(format!(
                "rendezvous store address {addr:?} is not host:port"
            )));
        }
        let peer = PeerId::addr(addr);
        let started = Instant::now();
        let mut backoff = Duration::from_millis(10);
        // The cause shown at the deadline: the last attempt that got as far as an error (the
        // final pass may find no time left to try anything).
        let mut last: Option<String> = None;
        loop {
            match attempt(addr, token, &peer, deadline) {
                Ok(stream) => {
                    return Ok(StoreClient {
                        addr: addr.to_string(),
                        peer,
                        stream,
                        broken: None,
                    })
                }
                Err(Attempt::Fatal(e)) => return Err(e),
                Err(Attempt::Retry(Some(why))) => last = Some(why),
                Err(Attempt::Retry(None)) => {}
            }
            let left = deadline.saturating_duration_since(Instant::now());
            let why = last
                .as_deref()
                .unwrap_or("none was made before the deadline");
            if left.is_zero() {
                return Err(Error::Deadline {
                    waiting_for: format!(
                        "connecting to the rendezvous store at {addr} (last attempt: {why})"
                    ),
                    after: started.elapsed(),
                });
            }
            tracing::debug!(addr, "rendezvous store not reachable yet: {why}");
            std::thread::sleep(backoff.min(left));
            backoff = (backoff * 2).min(MAX_BACKOFF);
        }
    }

    /// The address given to [`StoreClient::connect`].
    pub fn server_addr(&self) -> &str {
        &self.addr
    }

    pub fn set(&mut self, key: &str, value: &[u8], deadline: Instant) -> Result<()> {
        let op = format!("set {key:?}");
        self.check(
            &op,
            protocol::check_key(key).and_then(|()| protocol::check_value(key, value)),
        )?;
        let request = Request::Set {
            key: key.to_string(),
            value: value.to_vec(),
        };
        match self.call(&request, deadline, &op)? {
            Response::Done => Ok(()),
            other => Err(self.unexpected(other, &op)),
        }
    }

    /// Waits until `key` exists (or the deadline passes), then returns its value.
    pub fn get(&mut self, key: &str, deadline: Instant) -> Result<Vec<u8>> {
        let op = format!("get {key:?}");
        self.check(&op, protocol::check_key(key))?;
        let started = Instant::now();
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            let request = Request::Get {
                key: key.to_string(),
                wait,
            };
            match self.call(&request, deadline, &op)? {
                Response::Value(v) => return Ok(v),
                Response::Missing(missing) => self.still_missing(missing, deadline, started)?,
                other => return Err(self.unexpected(other, &op)),
            }
        }
    }

    /// The value of `key` if it exists now.
    pub fn try_get(&mut self, key: &str, deadline: Instant) -> Result<Option<Vec<u8>>> {
        let op = format!("try_get {key:?}");
        self.check(&op, protocol::check_key(key))?;
        let request = Request::Get {
            key: key.to_string(),
            wait: Duration::ZERO,
        };
        match self.call(&request, deadline, &op)? {
            Response::Value(v) => Ok(Some(v)),
            Response::Missing(_) => Ok(None),
            other => Err(self.unexpected(other, &op)),
        }
    }

    /// Waits until every key exists.
    pub fn wait(&mut self, keys: &[&str], deadline: Instant) -> Result<()> {
        let op = format!("wait for {} keys", keys.len());
        self.check(&op, protocol::check_keys(keys))?;
        let started = Instant::now();
        let keys: Vec<String> = keys.iter().map(|k| k.to_string()).collect();
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            let request = Request::Wait {
                keys: keys.clone(),
                wait,
            };
            match self.call(&request, deadline, &op)? {
                Response::Done => return Ok(()),
                Response::Missing(missing) => self.still_missing(missing, deadline, started)?,
                other => return Err(self.unexpected(other, &op)),
            }
        }
    }

    /// Atomically adds `delta` to the integer at `key` (absent counts as 0) and returns the new
    /// value. The value is stored as decimal text, so `get` reads it as such.
    pub fn add(&mut self, key: &str, delta: i64, deadline: Instant) -> Result<i64> {
        let op = format!("add {delta} to {key:?}");
        self.check(&op, protocol::check_key(key))?;
        let request = Request::Add {
            key: key.to_string(),
            delta,
        };
        match self.call(&request, deadline, &op)? {
            Response::Count(n) => Ok(n),
            other => Err(self.unexpected(other, &op)),
        }
    }

    /// Removes `key`; says whether it existed.
    pub fn delete(&mut self, key: &str, deadline: Instant) -> Result<bool> {
        let op = format!("delete {key:?}");
        self.check(&op, protocol::check_key(key))?;
        let request = Request::Delete {
            key: key.to_string(),
        };
        match self.call(&request, deadline, &op)? {
            Response::Deleted(existed) => Ok(existed),
            other => Err(self.unexpected(other, &op)),
        }
    }

    fn check(&self, op: &str, verdict: std::result::Result<(), String>) -> Result<()> {
        verdict.map_err(|why| {
            Error::InvalidArgument(format!("{op} at rendezvous store {}: {why}", self.addr))
        })
    }

    /// The server's wait ran out: fail if ours has too, else ask again (the server caps how long
    /// one request may wait).
    fn still_missing(
        &self,
        missing: Vec<String>,
        deadline: Instant,
        started: Instant,
    ) -> Result<()> {
        if Instant::now() < deadline {
            return Ok(());
        }
        Err(Error::Deadline {
            waiting_for: format!("waiting for keys {missing:?} at store {}", self.addr),
            after: started.elapsed(),
        })
    }

    fn call(&mut self, request: &Request, deadline: Instant, op: &str) -> Result<Response> {
        if let Some(why) = &self.broken {
            return Err(Error::Broken(format!(
                "connection to the rendezvous store at {} failed earlier: {why}",
                self.addr
            )));
        }
        let result = self.exchange(request, deadline, op);
        match result {
            Ok(Response::Refused(why)) => Err(Error::InvalidArgument(format!(
                "rendezvous store {} refused {op}: {why}",
                self.addr
            ))),
            Ok(response) => Ok(response),
            Err(e) => {
                self.broken = Some(e.to_string());
                Err(e)
            }
        }
    }

    fn exchange(&mut self, request: &Request, deadline: Instant, op: &str) -> Result<Response> {
        let started = Instant::now();
        let by = io_deadline(deadline);
        if let Err(f) = write_all_by(&mut self.stream, &msg::encode(request), by) {
            return Err(self.io_failure(f, op, "sending", started));
        }
        let body = match protocol::read_frame(&mut self.stream, by, TRANSFER_ALLOWANCE) {
            Ok(body) => body,
            Err(FrameError::Io(f)) => {
                return Err(self.io_failure(f, op, "awaiting the reply to", started))
            }
            Err(FrameError::TooLarge(len)) => {
                return Err(Error::protocol(
                    &self.peer,
                    format!(
                        "reply of {len} bytes to {op} exceeds the {}-byte limit",
                        protocol::MAX_FRAME
                    ),
                ))
            }
        };
        protocol::decode::<Response>(&body)
            .map_err(|why| Error::protocol(&self.peer, format!("reply to {op}: {why}")))
    }

    fn io_failure(&self, f: IoFailure, op: &str, doing: &str, started: Instant) -> Error {
        match f {
            IoFailure::TimedOut => Error::Timeout {
                peer: self.peer.clone(),
                waiting_for: format!("{doing} {op} at the rendezvous store"),
                after: started.elapsed(),
            },
            IoFailure::Closed => Error::PeerLost {
                peer: self.peer.clone(),
                detail: format!("the rendezvous store closed the connection while {doing} {op}"),
            },
            IoFailure::Other(e) => Error::io(
                format!("{doing} {op} at the rendezvous store {}", self.addr),
                e,
            ),
        }
    }

    fn unexpected(&mut self, response: Response, op: &str) -> Error {
        let e = Error::protocol(
            &self.peer,
            format!("unexpected reply to {op}: {response:?}"),
        );
        self.broken = Some(e.to_string());
        e
    }
}

enum Attempt {
    /// Worth trying again before the deadline: nothing listening yet, or the server shed us.
    /// `None` when the deadline left no time to try any address.
    Retry(Option<String>),
    Fatal(Error),
}

fn attempt(
    addr: &str,
    token: &JobToken,
    peer: &PeerId,
    deadline: Instant,
) -> std::result::Result<TcpStream, Attempt> {
    let limit = deadline
        .saturating_duration_since(Instant::now())
        .min(MAX_CONNECT_ATTEMPT);
    let targets =
        lookup(addr, limit).map_err(|e| Attempt::Retry(Some(format!("resolving {addr}: {e}"))))?;
    let (mut resolved, mut last) = (false, None);
    for target in targets {
        resolved = true;
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let mut stream = match TcpStream::connect_timeout(&target, left.min(MAX_CONNECT_ATTEMPT)) {
            Ok(s) => s,
            Err(e) if retryable(&e) => {
                last = Some(format!("connecting to {target}: {e}"));
                continue;
            }
            Err(e) => {
                return Err(Attempt::Fatal(Error::io(
                    format!("connecting to the rendezvous store at {addr} ({target})"),
                    e,
                )))
            }
        };
        let _ = stream.set_nodelay(true);
        return match connect_handshake(&mut stream, token, Role::Store, peer, io_deadline(deadline))
        {
            Ok(()) => Ok(stream),
            // A server at its connection limit, or one shutting down, closes on us.
            Err(e @ Error::PeerLost { .. }) => Err(Attempt::Retry(Some(e.to_string()))),
            Err(e) => Err(Attempt::Fatal(e)),
        };
    }
    if !resolved {
        last = Some(format!("{addr} resolved to no address"));
    }
    Err(Attempt::Retry(last))
}

/// Resolves `addr` (`host:port`), waiting at most `limit`. The system resolver cannot be
/// interrupted and may wait many seconds on a DNS server that does not answer, so a name (an IP
/// address needs no lookup) is looked up on a thread of its own, which is left to finish by
/// itself when the time is up.
pub fn lookup(addr: &str, limit: Duration) -> std::io::Result<Vec<SocketAddr>> {
    if let Ok(sock) = addr.parse::<SocketAddr>() {
        return Ok(vec![sock]);
    }
    let (tx, rx) = std::sync::mpsc::channel();
    let name = addr.to_string();
    std::thread::Builder::new()
        .name("ringlet-lookup".into())
        .spawn(move || {
            let _ = tx.send(name.to_socket_addrs().map(|a| a.collect::<Vec<_>>()));
        })?;
    rx.recv_timeout(limit).unwrap_or_else(|_| {
        Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("no answer from the resolver within {limit:?}"),
        ))
    })
}

fn retryable(e: &std::io::Error) -> bool {
    use std::io::ErrorKind::*;
    matches!(
        e.kind(),
        ConnectionRefused
            | ConnectionReset
            | ConnectionAborted
            | TimedOut
            | WouldBlock
            | Interrupted
            | HostUnreachable
            | NetworkUnreachable
            | AddrNotAvailable
            | NotConnected
    )
}
