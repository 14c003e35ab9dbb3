//! Hostile traffic against live jobs of real processes on loopback:
//!
//! - strangers on the rendezvous store and on every ring port (garbage, an HTTP probe, truncated
//!   and silent handshakes, wrong tokens and roles, forged proofs, forged ring hellos, hostile
//!   frames from an authenticated client): each is refused, no process dies, and the job finishes
//!   with verified results;
//! - a rank started with the wrong job token: it is refused, and the rank left waiting for it gives
//!   up at its deadline naming it;
//! - a ring member (this test process) that breaks the frame protocol: its neighbour fails at once
//!   with an error naming it, without panicking and without allocating what a header claims.

mod common;

use common::{error_line, Job, TESTRANK};
use ringlet::card::{RankCard, CARD_LEN};
use ringlet::config::{DEFAULT_CHUNK_BYTES, DEFAULT_NSOCKS, DEFAULT_SMALL_BYTES};
use ringlet::wire::{Collective, FrameKind, Header, HEADER_LEN};
use ringlet_core::auth::{connect_handshake, Role};
use ringlet_core::error::PeerId;
use ringlet_core::{msg, Error, JobToken};
use ringlet_store::StoreClient;
use ringlet_transport::{join, Interest, JoinOptions, Peers, ProcessPeers, Readiness};
use std::io::{ErrorKind, IoSlice, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

/// What a stranger gets to close a connection it refused.
const REFUSAL_WITHIN: Duration = Duration::from_secs(3);

const HTTP_PROBE: &[u8] =
    b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n\r\n";

/// The ring handshake's hello and answer (private to `ringlet-transport`; same fields, same
/// order, so the same bincode bytes).
#[derive(serde::Serialize)]
struct RingHello {
    comm: String,
    rank: u64,
    world_size: u64,
    stream: u64,
    streams: u64,
}

#[derive(serde::Deserialize, Debug)]
struct RingAck {
    refused: Option<String>,
}

/// The store's replies (private to `ringlet-store`; same variants in the same order).
#[derive(serde::Deserialize, Debug)]
#[allow(dead_code)]
enum StoreReply {
    Done,
    Value(Vec<u8>),
    Missing(Vec<String>),
    Count(i64),
    Deleted(bool),
    Refused(String),
}

/// Deterministic noise that cannot start with a handshake or frame magic.
fn garbage(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v: Vec<u8> = (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect();
    v[0] = 0xff;
    v
}

/// A well-formed 40-byte handshake hello: "RNGL", version, role, two zero bytes, a nonce.
fn hello(role: Role, version: u8) -> [u8; 40] {
    let mut h = [0u8; 40];
    h[..4].copy_from_slice(b"RNGL");
    h[4] = version;
    h[5] = role as u8;
    h[8..].copy_from_slice(&garbage(32, 7));
    h
}

fn dial(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("connecting to {addr}: {e}"));
    s.set_write_timeout(Some(Duration::from_secs(2))).unwrap();
    s
}

/// Reads until the other side closes (or resets) the connection and returns what it sent; panics
/// if it is still open after `within`.
fn read_to_close(s: &mut TcpStream, within: Duration, what: &str) -> Vec<u8> {
    let end = Instant::now() + within;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = end.saturating_duration_since(Instant::now());
        assert!(
            !left.is_zero(),
            "{what}: connection still open after {within:?} (received {:?})",
            String::from_utf8_lossy(&got)
        );
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut buf) {
            Ok(0) => return got,
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
                ) =>
            {
                return got
            }
            Err(e)
                if matches!(
                    e.kind(),
                    ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                ) => {}
            Err(e) => panic!("{what}: reading: {e}"),
        }
    }
}

/// Sends `bytes` as the first thing on a new connection and expects it closed without a reply.
fn refused_silently(addr: SocketAddr, bytes: &[u8], what: &str) {
    let mut s = dial(addr);
    s.write_all(bytes).unwrap();
    let reply = read_to_close(&mut s, REFUSAL_WITHIN, what);
    assert!(
        reply.is_empty(),
        "{what} at {addr}: got a reply {:?}",
        String::from_utf8_lossy(&reply)
    );
}

/// Whether the process is running (not exited, not a zombie). Only for our own unreaped children,
/// whose pids cannot be reused.
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next());
        !matches!(state, None | Some('Z') | Some('X'))
    })
}

fn assert_all_alive(job: &Job, n: usize, after: &str) {
    for r in 0..n {
        assert!(
            alive(job.pid(r)),
            "rank {r} is not running after {after}\n{}",
            job.all_outputs()
        );
    }
}

/// Attacks every stranger can make on a port that speaks the token handshake as `role`. Returns
/// connections to hold open (silent, or stuck half-way through the hello).
fn handshake_attacks(addr: SocketAddr, token: &JobToken, role: Role) -> Vec<TcpStream> {
    let deadline = || Instant::now() + Duration::from_secs(5);
    let peer = PeerId::addr(addr.to_string());
    let other = match role {
        Role::Store => Role::Ring,
        Role::Ring => Role::Store,
    };

    refused_silently(addr, &garbage(256, addr.port() as u64), "garbage");
    refused_silently(addr, HTTP_PROBE, "an HTTP request");

    // Half a hello, then the end of the stream.
    let mut s = dial(addr);
    s.write_all(&hello(role, 1)[..20]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let reply = read_to_close(&mut s, REFUSAL_WITHIN, "truncated hello");
    assert!(reply.is_empty(), "truncated hello got a reply {reply:?}");

    // Half a hello, then nothing; and nothing at all. Held open while the job runs.
    let mut stuck = dial(addr);
    stuck.write_all(&hello(role, 1)[..20]).unwrap();
    let silent = dial(addr);

    // A client without the job's token learns nothing and is refused.
    let mut s = dial(addr);
    let e = connect_handshake(
        &mut s,
        &JobToken::new("not-the-token"),
        role,
        &peer,
        deadline(),
    )
    .expect_err("a wrong token is refused");
    assert!(
        matches!(e, Error::Auth { .. }) && e.to_string().contains("RINGLET_JOB_TOKEN differs"),
        "wrong token at {addr}: {e}"
    );
    drop(s);

    // The right token for the wrong kind of port.
    let mut s = dial(addr);
    let e = connect_handshake(&mut s, token, other, &peer, deadline())
        .expect_err("the wrong role is refused");
    assert!(
        matches!(e, Error::Auth { .. }) && e.to_string().contains(&format!("not a {other:?} port")),
        "wrong role at {addr}: {e}"
    );
    drop(s);

    // A client that answers the challenge with a forged proof gets verdict 0 and is closed.
    let mut s = dial(addr);
    s.write_all(&hello(role, 1)).unwrap();
    s.set_read_timeout(Some(REFUSAL_WITHIN)).unwrap();
    let mut reply = [0u8; 72];
    s.read_exact(&mut reply).unwrap();
    assert_eq!((&reply[..4], reply[5]), (&b"RNGL"[..], 0), "{reply:?}");
    s.write_all(&garbage(32, 99)).unwrap();
    let rest = read_to_close(&mut s, REFUSAL_WITHIN, "forged proof");
    assert_eq!(rest, [0], "verdict on a forged proof");

    // A client speaking another protocol version is told so and closed.
    let mut s = dial(addr);
    s.write_all(&hello(role, 2)).unwrap();
    let reply = read_to_close(&mut s, REFUSAL_WITHIN, "wrong version");
    assert_eq!(reply.len(), 72, "{reply:?}");
    assert_eq!((&reply[..4], reply[5]), (&b"RNGL"[..], 2), "{reply:?}");

    vec![stuck, silent]
}

/// An authenticated connection to the store or a ring port.
fn authenticated(addr: SocketAddr, token: &JobToken, role: Role) -> TcpStream {
    let mut s = dial(addr);
    let deadline = Instant::now() + Duration::from_secs(5);
    connect_handshake(
        &mut s,
        token,
        role,
        &PeerId::addr(addr.to_string()),
        deadline,
    )
    .unwrap_or_else(|e| panic!("handshake with {addr}: {e}"));
    s
}

/// Frames from a client that holds the token but not the protocol.
fn hostile_store_client(addr: SocketAddr, token: &JobToken) {
    let peer = PeerId::addr(addr.to_string());
    let deadline = || Instant::now() + Duration::from_secs(5);
    let mut s = authenticated(addr, token, Role::Store);
    // An undecodable request is refused with a reason; the connection stays usable.
    let mut frame = 8u32.to_le_bytes().to_vec();
    frame.extend_from_slice(&garbage(8, 5));
    s.write_all(&frame).unwrap();
    let reply: StoreReply = msg::recv(&mut s, 1 << 20, &peer, deadline()).unwrap();
    assert!(
        matches!(&reply, StoreReply::Refused(why) if why.contains("undecodable")),
        "{reply:?}"
    );
    // A request claiming 4 GiB is refused before its body is read, and the connection closed.
    s.write_all(&u32::MAX.to_le_bytes()).unwrap();
    let reply: StoreReply = msg::recv(&mut s, 1 << 20, &peer, deadline()).unwrap();
    assert!(
        matches!(&reply, StoreReply::Refused(why) if why.contains("4294967295")),
        "{reply:?}"
    );
    read_to_close(&mut s, REFUSAL_WITHIN, "oversized store request");

    // A request cut short by a hang-up.
    let mut s = authenticated(addr, token, Role::Store);
    let mut frame = 100u32.to_le_bytes().to_vec();
    frame.extend_from_slice(&[0u8; 10]);
    s.write_all(&frame).unwrap();
}

/// Peer hellos from holders of the token that claim no other rank of the job (their own, or one
/// beyond the world), or a rank already connected, and hellos that are not hellos.
fn forged_ring_hellos(addr: SocketAddr, token: &JobToken, rank: usize, n: usize) {
    let peer = PeerId::addr(addr.to_string());
    let deadline = || Instant::now() + Duration::from_secs(5);
    let prev = (rank + n - 1) % n;
    let k = DEFAULT_NSOCKS;
    let cases = [
        ("world", prev, n, (0, k), "already connected".to_string()),
        (
            "world",
            prev,
            n,
            (k - 1, k),
            "already connected".to_string(),
        ),
        ("world", rank, n, (0, k), format!("claims rank {rank}")),
        ("world", n, n, (0, k), format!("claims rank {n}")),
        ("world", prev, n + 1, (0, k), "world size".to_string()),
        ("another-comm", prev, n, (0, k), "communicator".to_string()),
        (
            "world",
            prev,
            n,
            (0, k + 1),
            "RINGLET_NSOCKS differs".to_string(),
        ),
        (
            "world",
            prev,
            n,
            (k, k),
            format!("claims stream {k} of {k}"),
        ),
        (
            "world",
            prev,
            n,
            (u64::MAX as usize, k),
            "claims stream".to_string(),
        ),
    ];
    for (comm, claimed, world_size, (stream, streams), expect) in cases {
        let mut s = authenticated(addr, token, Role::Ring);
        let hello = RingHello {
            comm: comm.into(),
            rank: claimed as u64,
            world_size: world_size as u64,
            stream: stream as u64,
            streams: streams as u64,
        };
        msg::send(&mut s, &hello, &peer, deadline()).unwrap();
        let ack: RingAck = msg::recv(&mut s, 4096, &peer, deadline()).unwrap();
        let why = ack.refused.unwrap_or_else(|| {
            panic!("rank {rank} accepted {comm}/rank {claimed}/world {world_size}")
        });
        assert!(
            why.contains(&expect),
            "rank {rank}: {why:?} lacks {expect:?}"
        );
        read_to_close(&mut s, REFUSAL_WITHIN, "refused ring hello");
    }
    // A hello claiming 4 GiB, and one that does not decode: closed without an answer.
    let mut s = authenticated(addr, token, Role::Ring);
    s.write_all(&u32::MAX.to_le_bytes()).unwrap();
    let reply = read_to_close(&mut s, REFUSAL_WITHIN, "oversized ring hello");
    assert!(reply.is_empty(), "{reply:?}");
    let mut s = authenticated(addr, token, Role::Ring);
    let mut frame = 6u32.to_le_bytes().to_vec();
    frame.extend_from_slice(&garbage(6, 11));
    s.write_all(&frame).unwrap();
    let reply = read_to_close(&mut s, REFUSAL_WITHIN, "undecodable ring hello");
    assert!(reply.is_empty(), "{reply:?}");
}

#[test]
fn strangers_on_the_store_and_ring_ports_of_a_live_job_are_refused_and_the_job_completes() {
    let n = 3;
    // 200 KB all-reduces until the attacks are over (they take well under 1 s; a count of calls
    // could finish first on a fast machine).
    let stop = std::env::temp_dir().join(format!("ringlet-hostile-live-{}", std::process::id()));
    let _ = std::fs::remove_file(&stop);
    let stop_var = stop.to_str().unwrap().to_string();
    let env = [
        ("RINGLET_TIMEOUT", "30"),
        ("RINGLET_TEST_STOP_FILE", stop_var.as_str()),
    ];
    let mut job = Job::start(n, &["loop", "100", "50000"], &env);
    for r in 0..n {
        assert!(
            job.wait_for(r, "LOOPING", Duration::from_secs(30)),
            "rank {r} never started\n{}",
            job.all_outputs()
        );
    }
    let attacks_started = Instant::now();
    let token = JobToken::new(&job.token);
    let store: SocketAddr = format!("127.0.0.1:{}", job.port).parse().unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut client = StoreClient::connect(&store.to_string(), &token, deadline).unwrap();
    let ring: Vec<SocketAddr> = (0..n)
        .map(|r| {
            let v = client.get(&format!("world/ring/{r}"), deadline).unwrap();
            String::from_utf8(v).unwrap().parse().unwrap()
        })
        .collect();

    let mut held = handshake_attacks(store, &token, Role::Store);
    hostile_store_client(store, &token);
    assert_all_alive(&job, n, "the attacks on the store");
    for (r, &addr) in ring.iter().enumerate() {
        held.extend(handshake_attacks(addr, &token, Role::Ring));
        forged_ring_hellos(addr, &token, r, n);
        assert_all_alive(&job, n, &format!("the attacks on rank {r}'s ring port"));
    }
    // The store still serves its clients, old and new.
    let again = client.get("world/ring/0", deadline).unwrap();
    assert_eq!(String::from_utf8(again).unwrap(), ring[0].to_string());
    let mut fresh = StoreClient::connect(&store.to_string(), &token, deadline).unwrap();
    assert_eq!(fresh.add("hostile/probe", 2, deadline).unwrap(), 2);
    let attacks_took = attacks_started.elapsed();
    assert_all_alive(&job, n, "all the attacks");
    std::fs::write(&stop, b"").unwrap();

    // Silent and half-finished handshakes are still open (their 10 s handshake timeout has not
    // passed): they must not disturb the job, nor hold a rank (or rank 0's store) at exit.
    for r in 0..n {
        assert!(
            job.wait_for(r, "OK checks", Duration::from_secs(60)),
            "rank {r} did not finish\n{}",
            job.all_outputs()
        );
    }
    let _ = std::fs::remove_file(&stop);
    let finished = Instant::now();
    let statuses = job.wait_all(Duration::from_secs(30));
    let exit_took = finished.elapsed();
    drop(held);
    assert!(
        exit_took < Duration::from_secs(3),
        "ranks took {exit_took:?} to exit after finishing\n{}",
        job.all_outputs()
    );
    let all = job.all_outputs();
    for (r, st) in statuses.iter().enumerate() {
        let out = job.output(r);
        assert_eq!(st.code(), Some(0), "rank {r} failed\n{all}");
        assert!(out.contains("OK checks="), "rank {r}\n{all}");
        assert!(!out.contains("panicked"), "rank {r}\n{all}");
        // Each refusal is logged by the process that made it.
        assert!(
            out.contains("refused a connection on our port"),
            "rank {r} logged no refusal\n{out}"
        );
    }
    assert!(
        job.output(0)
            .contains("refused rendezvous-store connection"),
        "the store logged no refusal\n{}",
        job.output(0)
    );
    eprintln!("attacks took {attacks_took:?}; exit took {exit_took:?}");
}

/// A rank of `job` started by hand, with `token` as its job token.
fn rank_command(
    job: &Job,
    rank: usize,
    token: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> Command {
    let mut cmd = Command::new(TESTRANK);
    cmd.args(args)
        .env("RANK", rank.to_string())
        .env("LOCAL_RANK", rank.to_string())
        .env("MASTER_ADDR", "127.0.0.1")
        .env("MASTER_PORT", job.port.to_string())
        .env("RINGLET_JOB_TOKEN", token);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd
}

#[test]
fn a_rank_with_the_wrong_token_is_refused_and_the_others_fail_at_the_deadline_naming_it() {
    let env = [
        ("WORLD_SIZE", "2"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("RINGLET_TIMEOUT", "2"),
    ];
    let mut job = Job::start(1, &["loop", "1", "10"], &env);
    let started = Instant::now();
    let cmd = rank_command(
        &job,
        1,
        "a-token-from-another-job",
        &["loop", "1", "10"],
        &env,
    );
    job.spawn_rank(cmd);

    let st = job.wait_ranks(&[1], Duration::from_secs(20));
    let refused_after = started.elapsed();
    let out = job.output(1);
    assert_eq!(st[0].code(), Some(3), "{}", job.all_outputs());
    let err = error_line(&out).unwrap_or_else(|| panic!("rank 1 printed no error\n{out}"));
    eprintln!("rank 1: {err}");
    assert!(
        err.contains("authentication") && err.contains("RINGLET_JOB_TOKEN"),
        "rank 1 does not say its token is wrong: {err}"
    );
    assert!(
        refused_after < Duration::from_millis(1800),
        "rank 1 was refused only after {refused_after:?} (its deadline is 2 s)\n{out}"
    );

    let st = job.wait_ranks(&[0], Duration::from_secs(20));
    let took = started.elapsed().as_secs_f64();
    let all = job.all_outputs();
    let out = job.output(0);
    assert_eq!(st[0].code(), Some(3), "{all}");
    assert!(
        (1.5..8.0).contains(&took),
        "rank 0 gave up after {took:.2}s\n{all}"
    );
    let err = error_line(&out).unwrap_or_else(|| panic!("rank 0 printed no error\n{all}"));
    assert!(
        err.contains("world/ring/1") || err.contains("rank 1"),
        "rank 0 does not say rank 1 is missing: {err}"
    );
    assert!(
        out.contains("refused rendezvous-store connection"),
        "rank 0's store did not log the refusal\n{out}"
    );
    eprintln!("rank 1 refused after {refused_after:?}; rank 0 gave up after {took:.2}s: {err}");
    assert!(!all.contains("panicked"), "{all}");
}

/// What the malicious ring member does.
#[derive(Clone, Copy, Debug)]
enum Misbehaviour {
    /// Random bytes instead of the barrier's frame.
    Garbage,
    /// An HTTP request instead of the barrier's frame.
    Http,
    /// In the first all-reduce: a data header whose call matches but which claims 4 GiB.
    HugePayload,
    /// In the first all-reduce: a data header claiming a 2^64 - 1 element call and 4 GiB.
    HugeMismatch,
    /// In the first all-reduce: an abort notice claiming 4 GiB.
    HugeAbort,
    /// In the first all-reduce: a header with an unknown dtype code.
    UnknownDtype,
    /// In the first all-reduce: a valid header, half the payload, then hang up.
    TruncatedThenClose,
    /// In the first all-reduce: a valid header, half the payload, then silence.
    TruncatedThenSilence,
}

/// Rank 1's only peer.
const RANK_0: usize = 0;

fn send_all(link: &mut ProcessPeers, bytes: &[u8], deadline: Instant) {
    let mut sent = 0;
    let room = [Interest {
        peer: RANK_0,
        recv: false,
        send: true,
        hangup: false,
    }];
    while sent < bytes.len() {
        let n = link.send(RANK_0, &[IoSlice::new(&bytes[sent..])]).unwrap();
        sent += n;
        if n == 0 {
            assert_eq!(link.wait(&room, deadline).unwrap(), Readiness::Ready);
        }
    }
}

fn recv_exact(link: &mut ProcessPeers, buf: &mut [u8], deadline: Instant) {
    let mut got = 0;
    let data = [Interest {
        peer: RANK_0,
        recv: true,
        send: false,
        hangup: false,
    }];
    while got < buf.len() {
        let n = link.recv(RANK_0, &mut buf[got..]).unwrap();
        got += n;
        if n == 0 {
            assert_eq!(
                link.wait(&data, deadline).unwrap(),
                Readiness::Ready,
                "rank 0 sent no frame"
            );
        }
    }
}

/// Reads one frame from rank 0.
fn recv_frame(link: &mut ProcessPeers, deadline: Instant) -> (Header, Vec<u8>) {
    let mut h = [0u8; HEADER_LEN];
    recv_exact(link, &mut h, deadline);
    let h = Header::decode(&h).expect("rank 0 sends valid frames");
    assert!(h.payload_len <= 1 << 20, "{h:?}");
    let mut payload = vec![0u8; h.payload_len as usize];
    recv_exact(link, &mut payload, deadline);
    (h, payload)
}

/// Starts rank 0 of a two-rank job as a real process, joins it as rank 1 from this process, and
/// misbehaves. Rank 0 must fail promptly and cleanly, with an error naming rank 1 and containing
/// every string of `expect`.
fn malicious_rank_1(what: Misbehaviour, timeout_s: u64, expect: &[&str]) {
    let timeout = timeout_s.to_string();
    let mut job = Job::start(
        1,
        &["loop", "5", "1000"],
        &[
            ("WORLD_SIZE", "2"),
            ("LOCAL_WORLD_SIZE", "2"),
            ("RINGLET_TIMEOUT", &timeout),
        ],
    );
    let token = JobToken::new(&job.token);
    let deadline = Instant::now() + Duration::from_secs(20);
    let store = format!("127.0.0.1:{}", job.port);
    let mut client = StoreClient::connect(&store, &token, deadline).unwrap();
    let opts = JoinOptions {
        rank: 1,
        world_size: 2,
        comm: "world".into(),
        bind_ip: [127, 0, 0, 1].into(),
        advertise_host: "127.0.0.1".into(),
        deadline,
        busy_poll: Duration::ZERO,
        shm: false,
        streams: DEFAULT_NSOCKS,
    };
    let mut link = join(&mut client, &token, &opts)
        .unwrap()
        .expect("two ranks have peers");
    let me = link.local().addr.clone();

    let early = matches!(what, Misbehaviour::Garbage | Misbehaviour::Http);
    let attack = if early {
        match what {
            Misbehaviour::Garbage => garbage(4096, 42),
            _ => HTTP_PROBE.to_vec(),
        }
    } else {
        // An honest join: rank 0's first frame carries its rank card; the same header with
        // ours completes the exchange.
        let (h, payload) = recv_frame(&mut link, deadline);
        assert_eq!(
            (h.sig.collective, h.sig.seq, payload.len()),
            (Collective::AllGather, 1, CARD_LEN),
            "{h:?}"
        );
        let card = RankCard {
            addr: me.clone(),
            chunk_bytes: DEFAULT_CHUNK_BYTES as u64,
            small_bytes: DEFAULT_SMALL_BYTES as u64,
            algo: "auto".into(),
            // A rank of another host: TCP stays.
            shm: None,
            host: "the fake rank's host".into(),
        };
        send_all(&mut link, &h.encode(), deadline);
        send_all(&mut link, &card.encode().unwrap(), deadline);
        // Rank 0's first all-reduce frame: the call to answer badly.
        let (h, payload) = recv_frame(&mut link, deadline);
        assert_eq!(
            (h.kind, h.sig.collective, h.sig.count),
            (FrameKind::Data, Collective::AllReduce, 1000),
            "{h:?}"
        );
        let mut bad = h;
        let mut tail = Vec::new();
        match what {
            Misbehaviour::HugePayload => bad.payload_len = u32::MAX,
            Misbehaviour::HugeMismatch => {
                bad.sig.count = u64::MAX;
                bad.payload_len = u32::MAX;
            }
            Misbehaviour::HugeAbort => {
                bad.kind = FrameKind::Abort;
                bad.payload_len = u32::MAX;
            }
            Misbehaviour::TruncatedThenClose | Misbehaviour::TruncatedThenSilence => {
                tail = vec![0u8; payload.len() / 2]
            }
            _ => {}
        }
        let mut frame = bad.encode().to_vec();
        if let Misbehaviour::UnknownDtype = what {
            frame[6] = 0xee;
        }
        // Some payload after a header claiming 4 GiB: a receiver that trusted the claim would
        // start reading (and allocating) for it.
        if matches!(
            what,
            Misbehaviour::HugePayload | Misbehaviour::HugeMismatch | Misbehaviour::HugeAbort
        ) {
            tail = vec![0x55; 4096];
        }
        frame.extend_from_slice(&tail);
        frame
    };
    let t = Instant::now();
    send_all(&mut link, &attack, deadline);
    // Hang up, or stay connected (and silent) until rank 0 has given up.
    let held = match what {
        Misbehaviour::TruncatedThenClose => {
            drop(link);
            None
        }
        _ => Some(link),
    };
    let st = job.wait_ranks(&[0], Duration::from_secs(20));
    check_rank_0(&job, st[0].code(), t.elapsed(), what, early, &me, expect);
    drop(held);
}

fn check_rank_0(
    job: &Job,
    code: Option<i32>,
    took: Duration,
    what: Misbehaviour,
    early: bool,
    me: &str,
    expect: &[&str],
) {
    let out = job.output(0);
    assert_eq!(code, Some(3), "{what:?}: rank 0 should fail\n{out}");
    assert!(
        !out.contains("panicked"),
        "{what:?}: rank 0 panicked\n{out}"
    );
    let err = error_line(&out).unwrap_or_else(|| panic!("{what:?}: no ERROR line\n{out}"));
    assert!(
        err.contains(&format!("rank 1 ({me})")),
        "{what:?}: rank 0 does not name rank 1 at {me}: {err}"
    );
    eprintln!("{what:?}: rank 0 failed after {took:?}: {err}");
    for e in expect {
        assert!(err.contains(e), "{what:?}: error lacks {e:?}: {err}");
    }
    if early {
        assert!(
            !out.contains("READY"),
            "{what:?}: the barrier passed\n{out}"
        );
    } else {
        assert!(out.contains("READY"), "{what:?}\n{out}");
        assert!(
            out.contains("BROKEN: communicator is broken"),
            "{what:?}: rank 0's communicator stays usable\n{out}"
        );
    }
    // Within its 5 s deadline; a silent sender only at the deadline (2 s plus the stall grace).
    let window = match what {
        Misbehaviour::TruncatedThenSilence => Duration::from_millis(1800)..Duration::from_secs(6),
        _ => Duration::ZERO..Duration::from_secs(3),
    };
    assert!(
        window.contains(&took),
        "{what:?}: rank 0 took {took:?} to fail, expected {window:?}\n{out}"
    );
}

#[test]
fn a_ring_member_sending_garbage_fails_its_neighbour_at_once() {
    malicious_rank_1(
        Misbehaviour::Garbage,
        5,
        &["protocol error from rank 1", "bad frame magic"],
    );
}

#[test]
fn a_ring_member_sending_http_fails_its_neighbour_at_once() {
    malicious_rank_1(
        Misbehaviour::Http,
        5,
        &["protocol error from rank 1", "bad frame magic"],
    );
}

#[test]
fn a_frame_claiming_four_gib_fails_the_receiver_without_reading_it() {
    malicious_rank_1(
        Misbehaviour::HugePayload,
        5,
        &["protocol error from rank 1", "4294967295 bytes"],
    );
    malicious_rank_1(
        Misbehaviour::HugeMismatch,
        5,
        &[
            "collective mismatch with rank 1",
            "count 18446744073709551615",
        ],
    );
    malicious_rank_1(
        Misbehaviour::HugeAbort,
        5,
        &["protocol error from rank 1", "4294967295 payload bytes"],
    );
}

#[test]
fn a_header_with_an_unknown_dtype_fails_the_receiver_at_once() {
    malicious_rank_1(
        Misbehaviour::UnknownDtype,
        5,
        &["protocol error from rank 1", "unknown dtype code 238"],
    );
}

#[test]
fn a_frame_cut_short_fails_the_receiver_when_the_sender_hangs_up_or_at_the_deadline() {
    malicious_rank_1(Misbehaviour::TruncatedThenClose, 5, &["is gone"]);
    malicious_rank_1(
        Misbehaviour::TruncatedThenSilence,
        2,
        &["timed out", "not responding"],
    );
}

/// Strangers that open connections to a rank's ring port while the ring forms, and say nothing,
/// must not keep the real predecessor out: more of them than the acceptor's 256 pending
/// handshakes get new connections closed unanswered, so the real rank must retry until the
/// strangers' 3-second handshake window runs out.
#[test]
fn silent_strangers_flooding_a_ring_port_during_formation_do_not_keep_the_real_rank_out() {
    let env = [
        ("WORLD_SIZE", "2"),
        ("LOCAL_WORLD_SIZE", "2"),
        ("RINGLET_TIMEOUT", "10"),
    ];
    let mut job = Job::start(1, &["loop", "5", "1000"], &env);
    let token = JobToken::new(&job.token);
    let deadline = Instant::now() + Duration::from_secs(10);
    let store = format!("127.0.0.1:{}", job.port);
    let mut client = StoreClient::connect(&store, &token, deadline).unwrap();
    let addr = client.get("world/ring/0", deadline).unwrap();
    let addr: SocketAddr = String::from_utf8(addr).unwrap().parse().unwrap();
    let flood: Vec<TcpStream> = (0..300).map(|_| dial(addr)).collect();
    let cmd = rank_command(&job, 1, &job.token, &["loop", "5", "1000"], &env);
    job.spawn_rank(cmd);
    let statuses = job.wait_all(Duration::from_secs(30));
    drop(flood);
    let all = job.all_outputs();
    for (r, st) in statuses.iter().enumerate() {
        assert_eq!(st.code(), Some(0), "rank {r} failed\n{all}");
    }
}
