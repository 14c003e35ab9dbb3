//! End-to-end tests over real sockets on 127.0.0.1: the client API against a live server, and the
//! server against the kinds of traffic that reach a port open to a cluster network.

use crate::protocol::{self, Request, Response, MAX_FRAME};
use crate::{ServerConfig, StoreClient, StoreServer, MAX_KEY_LEN, MAX_VALUE_LEN};
use ringlet_core::auth::{connect_handshake, JobToken, Role};
use ringlet_core::error::PeerId;
use ringlet_core::Error;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

fn token() -> JobToken {
    JobToken::new("store-test-token")
}

fn config() -> ServerConfig {
    ServerConfig {
        handshake_timeout: Duration::from_millis(300),
        frame_timeout: Duration::from_millis(300),
        ..ServerConfig::default()
    }
}

fn server_with(config: ServerConfig) -> StoreServer {
    StoreServer::bind_with("127.0.0.1:0".parse().unwrap(), token(), config).unwrap()
}

fn server() -> StoreServer {
    server_with(config())
}

fn within(ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(ms)
}

fn client(s: &StoreServer) -> StoreClient {
    StoreClient::connect(&s.local_addr().to_string(), &token(), within(5000)).unwrap()
}

/// A connection that has passed the handshake, for speaking the protocol by hand.
fn authenticated(s: &StoreServer) -> TcpStream {
    let mut stream = TcpStream::connect(s.local_addr()).unwrap();
    connect_handshake(
        &mut stream,
        &token(),
        Role::Store,
        &PeerId::addr("store"),
        within(5000),
    )
    .unwrap();
    stream
}

fn read_response(stream: &mut TcpStream) -> Response {
    let body = protocol::read_frame(stream, within(5000), Duration::from_secs(5)).unwrap();
    protocol::decode(&body).unwrap()
}

/// A fresh client can still use the store: the server survived whatever the test did.
fn assert_serves(s: &StoreServer) {
    let mut c = client(s);
    let key = format!("alive/{:?}", Instant::now());
    c.set(&key, b"yes", within(5000)).unwrap();
    assert_eq!(c.get(&key, within(5000)).unwrap(), b"yes");
}

/// The server closes `stream` within `limit` (what it sent before closing is ignored).
fn assert_closed_within(stream: &mut TcpStream, limit: Duration) {
    let started = Instant::now();
    stream
        .set_read_timeout(Some(limit + Duration::from_secs(1)))
        .unwrap();
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) => panic!("connection still open after {:?}: {e}", started.elapsed()),
        }
    }
    assert!(
        started.elapsed() < limit,
        "closed only after {:?}",
        started.elapsed()
    );
}

/// Peak virtual memory of this process, where /proc tells it.
fn vm_peak_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmPeak:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

#[test]
fn set_get_try_get_delete_round_trip() {
    let s = server();
    let mut c = client(&s);
    assert_eq!(c.server_addr(), s.local_addr().to_string());
    assert_eq!(c.try_get("k", within(1000)).unwrap(), None);
    c.set("k", b"v1", within(1000)).unwrap();
    assert_eq!(c.get("k", within(1000)).unwrap(), b"v1");
    c.set("k", b"", within(1000)).unwrap();
    assert_eq!(c.try_get("k", within(1000)).unwrap(), Some(vec![]));
    assert!(c.delete("k", within(1000)).unwrap());
    assert!(!c.delete("k", within(1000)).unwrap());
    assert_eq!(c.try_get("k", within(1000)).unwrap(), None);
    // A past deadline still gets its one attempt.
    c.set("k", b"late", Instant::now()).unwrap();
    assert_eq!(
        c.try_get("k", Instant::now()).unwrap(),
        Some(b"late".to_vec())
    );
    // Other clients see the same map.
    assert_eq!(client(&s).get("k", within(1000)).unwrap(), b"late");
}

#[test]
fn get_and_wait_block_until_another_client_sets() {
    let s = server();
    let addr = s.local_addr().to_string();
    let started = Instant::now();
    let getter = {
        let addr = addr.clone();
        std::thread::spawn(move || {
            let mut c = StoreClient::connect(&addr, &token(), within(5000)).unwrap();
            c.wait(&["a", "b"], within(5000)).unwrap();
            c.get("b", within(5000)).unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(100));
    let mut c = client(&s);
    c.set("a", b"1", within(1000)).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    c.set("b", b"2", within(1000)).unwrap();
    assert_eq!(getter.join().unwrap(), b"2");
    assert!(started.elapsed() >= Duration::from_millis(150));
}

#[test]
fn expired_wait_names_missing_keys_and_store() {
    let s = server();
    let addr = s.local_addr().to_string();
    let mut c = client(&s);
    c.set("ring/addr/0", b"x", within(1000)).unwrap();

    let started = Instant::now();
    let e = c
        .wait(&["ring/addr/0", "ring/addr/3"], within(300))
        .unwrap_err();
    let took = started.elapsed();
    assert!(matches!(e, Error::Deadline { .. }), "{e:?}");
    let text = e.to_string();
    assert!(text.contains(r#"keys ["ring/addr/3"] at store"#), "{text}");
    assert!(text.contains(&addr), "{text}");
    assert!(
        took >= Duration::from_millis(300) && took < Duration::from_millis(1300),
        "{took:?}"
    );

    let started = Instant::now();
    let e = c.get("ring/addr/3", within(200)).unwrap_err().to_string();
    assert!(e.contains("ring/addr/3") && e.contains(&addr), "{e}");
    assert!(started.elapsed() < Duration::from_millis(1200));
    // An expired wait is an answer, not a broken connection.
    assert_eq!(c.get("ring/addr/0", within(1000)).unwrap(), b"x");
}

#[test]
fn waits_longer_than_the_server_cap_are_re_asked() {
    let s = server_with(ServerConfig {
        max_wait: Duration::from_millis(30),
        ..config()
    });
    let addr = s.local_addr().to_string();
    let getter = std::thread::spawn(move || {
        StoreClient::connect(&addr, &token(), within(5000))
            .unwrap()
            .get("late", within(5000))
    });
    std::thread::sleep(Duration::from_millis(200));
    client(&s).set("late", b"ok", within(1000)).unwrap();
    assert_eq!(getter.join().unwrap().unwrap(), b"ok");
}

#[test]
fn concurrent_adds_give_the_exact_total() {
    let s = server();
    let addr = s.local_addr().to_string();
    let (threads, adds) = (8, 50);
    let go = Arc::new(Barrier::new(threads));
    let workers: Vec<_> = (0..threads)
        .map(|_| {
            let (addr, go) = (addr.clone(), go.clone());
            std::thread::spawn(move || {
                let mut c = StoreClient::connect(&addr, &token(), within(5000)).unwrap();
                go.wait();
                for _ in 0..adds {
                    c.add("counter", 1, within(5000)).unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let mut c = client(&s);
    let total = (threads * adds) as i64;
    assert_eq!(c.add("counter", 0, within(1000)).unwrap(), total);
    assert_eq!(
        c.get("counter", within(1000)).unwrap(),
        total.to_string().as_bytes()
    );
    assert_eq!(c.add("counter", -total - 1, within(1000)).unwrap(), -1);
    assert_eq!(c.add("fresh", 5, within(1000)).unwrap(), 5);
}

#[test]
fn add_refuses_non_integers_and_overflow_but_keeps_serving() {
    let s = server();
    let mut c = client(&s);
    c.set("text", b"hello", within(1000)).unwrap();
    let e = c.add("text", 1, within(1000)).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    assert!(e.to_string().contains("not a decimal integer"), "{e}");
    c.add("big", i64::MAX, within(1000)).unwrap();
    let e = c.add("big", 1, within(1000)).unwrap_err().to_string();
    assert!(
        e.contains("overflows") && e.contains(&s.local_addr().to_string()),
        "{e}"
    );
    assert_eq!(c.add("big", -1, within(1000)).unwrap(), i64::MAX - 1);
}

#[test]
fn wrong_token_is_refused_and_the_server_still_serves() {
    let s = server();
    let e = StoreClient::connect(
        &s.local_addr().to_string(),
        &JobToken::new("some other job"),
        within(2000),
    )
    .unwrap_err();
    assert!(matches!(e, Error::Auth { .. }), "{e:?}");
    assert!(e.to_string().contains(&s.local_addr().to_string()), "{e}");
    assert_serves(&s);
}

#[test]
fn garbage_http_and_silent_clients_are_dropped_and_others_served() {
    // A handshake timeout well above the time a bad greeting takes to be dropped, so the two
    // cannot be confused.
    let handshake = Duration::from_millis(1000);
    let s = server_with(ServerConfig {
        handshake_timeout: handshake,
        ..config()
    });

    let mut silent = TcpStream::connect(s.local_addr()).unwrap();
    let mut short_http = TcpStream::connect(s.local_addr()).unwrap();
    short_http.write_all(b"GET / HTTP/1.1\r\n\r\n").unwrap();
    // Served while the stalled connections are still open.
    assert_serves(&s);

    let mut http = TcpStream::connect(s.local_addr()).unwrap();
    http.write_all(b"GET / HTTP/1.1\r\nHost: example\r\nUser-Agent: curl/8\r\n\r\n")
        .unwrap();
    assert_closed_within(&mut http, Duration::from_millis(500));

    let mut garbage = TcpStream::connect(s.local_addr()).unwrap();
    let noise: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let _ = garbage.write_all(&noise);
    assert_closed_within(&mut garbage, Duration::from_millis(500));

    assert_closed_within(&mut silent, handshake + Duration::from_millis(1000));
    assert_closed_within(&mut short_http, handshake + Duration::from_millis(1000));
    assert_serves(&s);
}

#[test]
fn huge_length_prefix_is_refused_without_allocating_it() {
    let s = server();
    let before = vm_peak_kib();
    let mut c = authenticated(&s);
    c.write_all(&(1u32 << 30).to_le_bytes()).unwrap();
    match read_response(&mut c) {
        Response::Refused(why) => assert!(why.contains("exceeds"), "{why}"),
        other => panic!("{other:?}"),
    }
    assert_closed_within(&mut c, Duration::from_millis(500));

    // A small frame whose key claims 2^62 bytes: refused, and the connection stays usable.
    let mut c = authenticated(&s);
    let mut body = vec![4u8, 253]; // Delete, then a u64-sized string length
    body.extend_from_slice(&(1u64 << 62).to_le_bytes());
    c.write_all(&(body.len() as u32).to_le_bytes()).unwrap();
    c.write_all(&body).unwrap();
    assert!(matches!(read_response(&mut c), Response::Refused(_)));
    let request = Request::Delete { key: "k".into() };
    c.write_all(&ringlet_core::msg::encode(&request)).unwrap();
    assert!(matches!(read_response(&mut c), Response::Deleted(false)));

    if let (Some(before), Some(after)) = (before, vm_peak_kib()) {
        // Other tests run alongside, but nothing here comes near the 1 GiB claimed.
        assert!(
            after - before < 512 << 10,
            "VmPeak grew by {} KiB",
            after - before
        );
    }
    assert_serves(&s);
}

#[test]
fn truncated_and_stalled_frames_are_dropped() {
    let s = server();
    // Half a message, then close.
    let mut c = authenticated(&s);
    let framed = ringlet_core::msg::encode(&Request::Set {
        key: "half".into(),
        value: vec![7; 100],
    });
    c.write_all(&framed[..framed.len() / 2]).unwrap();
    drop(c);

    // Half a length prefix, then silence: cut off after the frame timeout.
    let mut c = authenticated(&s);
    c.write_all(&[10, 0]).unwrap();
    assert_closed_within(&mut c, config().frame_timeout + Duration::from_millis(500));

    // A body shorter than its prefix says, then silence.
    let mut c = authenticated(&s);
    c.write_all(&framed[..framed.len() - 1]).unwrap();
    assert_closed_within(&mut c, config().frame_timeout + Duration::from_millis(500));

    assert_serves(&s);
    assert_eq!(client(&s).try_get("half", within(1000)).unwrap(), None);
}

#[test]
fn oversized_keys_and_values_get_a_clear_error() {
    let s = server();
    let addr = s.local_addr().to_string();
    let mut c = client(&s);
    let big = vec![0u8; MAX_VALUE_LEN + 1];
    let e = c.set("big", &big, within(2000)).unwrap_err();
    assert!(matches!(e, Error::InvalidArgument(_)), "{e:?}");
    let text = e.to_string();
    assert!(
        text.contains("exceeds the 16777216-byte limit") && text.contains(&addr),
        "{text}"
    );
    let e = c
        .get(&"k".repeat(MAX_KEY_LEN + 1), within(2000))
        .unwrap_err()
        .to_string();
    assert!(e.contains("4096-byte limit"), "{e}");
    // The largest allowed value goes through.
    let max = vec![9u8; MAX_VALUE_LEN];
    c.set("max", &max, within(5000)).unwrap();
    assert_eq!(c.get("max", within(5000)).unwrap().len(), MAX_VALUE_LEN);

    // The server refuses them too, for clients that do not check, and keeps the connection.
    let mut raw = authenticated(&s);
    let request = Request::Set {
        key: "big".into(),
        value: big,
    };
    let framed = ringlet_core::msg::encode(&request);
    assert!(framed.len() <= MAX_FRAME + 4);
    raw.write_all(&framed).unwrap();
    match read_response(&mut raw) {
        Response::Refused(why) => assert!(why.contains("16777216-byte limit"), "{why}"),
        other => panic!("{other:?}"),
    }
    let request = Request::Add {
        key: "k".repeat(MAX_KEY_LEN + 1),
        delta: 1,
    };
    raw.write_all(&ringlet_core::msg::encode(&request)).unwrap();
    assert!(matches!(read_response(&mut raw), Response::Refused(_)));
    assert_eq!(c.try_get("big", within(1000)).unwrap(), None);
}

#[test]
fn dropping_the_server_fails_blocked_clients_promptly() {
    let s = server_with(ServerConfig {
        handshake_timeout: Duration::from_secs(30),
        ..config()
    });
    let addr = s.local_addr().to_string();
    let blocked = {
        let addr = addr.clone();
        std::thread::spawn(move || {
            let mut c = StoreClient::connect(&addr, &token(), within(5000)).unwrap();
            let started = Instant::now();
            (c.get("never", within(30_000)), started.elapsed())
        })
    };
    let mut idle = client(&s);
    // Mid-handshake connections must not hold up the drop either.
    let _silent = TcpStream::connect(s.local_addr()).unwrap();
    std::thread::sleep(Duration::from_millis(200));

    let started = Instant::now();
    drop(s);
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "drop took {:?}",
        started.elapsed()
    );

    let (result, took) = blocked.join().unwrap();
    let e = result.unwrap_err();
    assert!(matches!(e, Error::PeerLost { .. }), "{e:?}");
    assert!(e.to_string().contains(&addr), "{e}");
    assert!(took < Duration::from_secs(2), "{took:?}");

    let e = idle.set("k", b"v", within(5000)).unwrap_err();
    assert!(e.to_string().contains(&addr), "{e}");
    let e = idle.set("k", b"v", within(5000)).unwrap_err();
    assert!(matches!(e, Error::Broken(_)), "{e:?}");
}

fn free_port() -> SocketAddr {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
}

#[test]
fn connect_retries_until_the_server_is_up() {
    let addr = free_port();
    let starter = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        StoreServer::bind_with(addr, token(), config()).unwrap()
    });
    let mut c = StoreClient::connect(&addr.to_string(), &token(), within(5000)).unwrap();
    let s = starter.join().unwrap();
    c.set("k", b"v", within(1000)).unwrap();
    drop(s);
}

#[test]
fn connecting_to_nothing_fails_at_the_deadline_naming_the_store() {
    let addr = free_port().to_string();
    let started = Instant::now();
    let e = StoreClient::connect(&addr, &token(), within(300)).unwrap_err();
    assert!(matches!(e, Error::Deadline { .. }), "{e:?}");
    assert!(e.to_string().contains(&addr), "{e}");
    // The real cause, not what the last pass (left no time to try) would have said.
    assert!(e.to_string().contains("refused"), "{e}");
    assert!(!e.to_string().contains("resolved to no address"), "{e}");
    assert!(started.elapsed() < Duration::from_millis(1000));

    let e = StoreClient::connect("no-port-here", &token(), within(300)).unwrap_err();
    assert!(matches!(e, Error::Config(_)), "{e:?}");
}

/// At the connection cap a newcomer displaces the oldest connection still proving itself; only
/// when every connection has proved itself is the newcomer shed.
#[test]
fn a_newcomer_displaces_the_oldest_stranger_and_is_shed_only_by_proven_clients() {
    let s = server_with(ServerConfig {
        max_connections: 2,
        handshake_timeout: Duration::from_secs(20),
        ..config()
    });
    let mut first = TcpStream::connect(s.local_addr()).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let _second = TcpStream::connect(s.local_addr()).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    let mut third = TcpStream::connect(s.local_addr()).unwrap();
    assert_closed_within(&mut first, Duration::from_millis(500));
    // The newcomer itself was admitted (its handshake deadline is 20 s away).
    third
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let e = third.read(&mut [0u8; 1]).unwrap_err();
    assert!(
        matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
        "{e:?}"
    );
    // A client gets in at once, though the strangers' handshake deadline is 20 s away.
    let started = Instant::now();
    assert_serves(&s);
    assert!(started.elapsed() < Duration::from_secs(2));

    let proven: Vec<_> = (0..2).map(|_| authenticated(&s)).collect();
    std::thread::sleep(Duration::from_millis(50));
    let mut over = TcpStream::connect(s.local_addr()).unwrap();
    assert_closed_within(&mut over, Duration::from_millis(500));
    drop(proven);
}

/// Hundreds of idle strangers hold at most `max_unauthenticated` connections, and a rank's own
/// connection is served at once among them.
#[test]
fn a_flood_of_idle_strangers_does_not_delay_a_client() {
    let s = server_with(ServerConfig {
        max_unauthenticated: 16,
        handshake_timeout: Duration::from_secs(20),
        ..config()
    });
    let mut idle: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(s.local_addr()).unwrap())
        .collect();
    let started = Instant::now();
    assert_serves(&s);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // All but the newest 16 (less the one the client displaced) were closed.
    for old in &mut idle[..250] {
        assert_closed_within(old, Duration::from_millis(500));
    }
}

/// A write that would pass what one client may hold, or what the store may hold, is refused with
/// the limit named; deleting makes room again.
#[test]
fn writes_past_the_byte_limits_are_refused_naming_them() {
    let s = server_with(ServerConfig {
        max_bytes: 1 << 20,
        max_client_bytes: 600 << 10,
        ..config()
    });
    let (mut a, mut b) = (client(&s), client(&s));
    a.set("a/1", &vec![1; 500 << 10], within(5000)).unwrap();
    let e = a.set("a/2", &vec![1; 200 << 10], within(5000)).unwrap_err();
    assert!(e.to_string().contains("per client"), "{e}");
    b.set("b/1", &vec![2; 400 << 10], within(5000)).unwrap();
    let e = b.set("b/2", &vec![2; 150 << 10], within(5000)).unwrap_err();
    assert!(e.to_string().contains("over its limit of 1048576"), "{e}");
    // Refused writes changed nothing; a delete frees its bytes.
    assert_eq!(a.get("a/1", within(5000)).unwrap().len(), 500 << 10);
    assert!(a.delete("a/1", within(5000)).unwrap());
    b.set("b/2", &vec![2; 150 << 10], within(5000)).unwrap();
    assert_serves(&s);
}

#[test]
fn server_and_client_can_move_between_threads() {
    fn send_sync<T: Send + Sync>() {}
    fn send<T: Send>() {}
    send_sync::<StoreServer>();
    send::<StoreClient>();
}
