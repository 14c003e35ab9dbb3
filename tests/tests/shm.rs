//! Shared memory between the ranks of one host, across real processes: it is what they use
//! (their address spaces map the rings), `RINGLET_SHM=0` turns it off, a rank killed with
//! `kill -9` is named by every survivor at once, and nothing is left behind in the filesystem.

mod common;

use common::{error_line, Job};
use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// Named shared memory on this host (where a named segment would linger after `kill -9`).
fn dev_shm() -> BTreeSet<String> {
    std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

fn maps_rings(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/maps"))
        .unwrap_or_default()
        .contains("memfd:ringlet-ring")
}

#[test]
fn ranks_of_one_host_share_memory_and_a_killed_one_leaves_nothing_behind() {
    let before = dev_shm();
    for shm in ["0", "1"] {
        let n = 3;
        let env = [("RINGLET_TIMEOUT", "60"), ("RINGLET_SHM", shm)];
        let mut job = Job::start(n, &["loop", "1000000", "300000"], &env);
        for r in 0..n {
            assert!(
                job.wait_for(r, "LOOPING", Duration::from_secs(30)),
                "rank {r} never started\n{}",
                job.all_outputs()
            );
        }
        for r in 0..n {
            assert_eq!(
                maps_rings(job.pid(r)),
                shm == "1",
                "RINGLET_SHM={shm}: rank {r}'s rings"
            );
        }
        let victim = 1;
        let t = Instant::now();
        job.signal(victim, libc::SIGKILL);
        let survivors = [0, 2];
        let statuses = job.wait_ranks(&survivors, Duration::from_secs(20));
        let took = t.elapsed();
        assert!(
            took < Duration::from_secs(2),
            "RINGLET_SHM={shm}: survivors took {took:?} (deadline 60 s)\n{}",
            job.all_outputs()
        );
        for (&r, st) in survivors.iter().zip(&statuses) {
            let out = job.output(r);
            assert_eq!(st.code(), Some(3), "rank {r}\n{out}");
            let err = error_line(&out).unwrap_or_else(|| panic!("rank {r}: no error\n{out}"));
            assert!(err.contains("rank 1 (127.0.0.1:"), "rank {r}: {err}");
        }
    }
    let after = dev_shm();
    let left: Vec<_> = after.difference(&before).collect();
    assert!(left.is_empty(), "left in /dev/shm: {left:?}");
}

/// Strangers on a rank's shared-memory socket (garbage, an HTTP probe, a wrong token, a holder
/// of the token that claims a rank it is not) are refused, and the job completes.
#[test]
fn strangers_on_the_shared_memory_socket_are_refused_and_the_job_completes() {
    use ringlet_core::auth::{connect_handshake, Role};
    use ringlet_core::error::PeerId;
    use ringlet_core::JobToken;
    use std::io::{Read, Write};
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::{SocketAddr, UnixStream};

    let n = 2;
    // The job runs until the strangers are done (a count of calls finished first on a fast
    // machine).
    let stop = std::env::temp_dir().join(format!("ringlet-shm-strangers-{}", std::process::id()));
    let _ = std::fs::remove_file(&stop);
    let stop_var = stop.to_str().unwrap().to_string();
    let job_env = [
        ("RINGLET_TIMEOUT", "30"),
        ("RINGLET_TEST_STOP_FILE", stop_var.as_str()),
    ];
    let mut job = Job::start(n, &["loop", "1000", "1000"], &job_env);
    for r in 0..n {
        assert!(
            job.wait_for(r, "LOOPING", Duration::from_secs(30)),
            "{}",
            job.all_outputs()
        );
    }
    let token = JobToken::new(&job.token);
    let deadline = Instant::now() + Duration::from_secs(10);
    let store = format!("127.0.0.1:{}", job.port);
    let mut client = ringlet_store::StoreClient::connect(&store, &token, deadline).unwrap();
    let addr = String::from_utf8(client.get("world/ring/0", deadline).unwrap()).unwrap();
    let port = addr.rsplit(':').next().unwrap();
    let name = format!("ringlet-{port}-{}", job.pid(0));
    let dial = || {
        let a = SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
        let s = UnixStream::connect_addr(&a).expect("rank 0's shared-memory socket");
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    };
    let closes = |mut s: UnixStream, what: &str| {
        let mut buf = [0u8; 256];
        let end = Instant::now() + Duration::from_secs(5);
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => assert!(Instant::now() < end, "{what}: not closed"),
            }
        }
    };
    let mut s = dial();
    s.write_all(&[0x5a; 300]).unwrap();
    closes(s, "garbage");
    let mut s = dial();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").unwrap();
    closes(s, "http");
    let peer = PeerId::addr(format!("@{name}"));
    let mut s = dial();
    let e = connect_handshake(&mut s, &JobToken::new("wrong"), Role::Ring, &peer, deadline);
    assert!(e.is_err(), "a wrong token was accepted");
    // The token, and a hello that claims rank 0 itself.
    let mut s = dial();
    connect_handshake(&mut s, &token, Role::Ring, &peer, deadline).unwrap();
    #[derive(serde::Serialize)]
    struct PeerHello {
        comm: String,
        rank: u64,
        world_size: u64,
        stream: u64,
        streams: u64,
    }
    let hello = PeerHello {
        comm: "world".into(),
        rank: 0,
        world_size: n as u64,
        stream: 0,
        streams: ringlet::config::DEFAULT_NSOCKS as u64,
    };
    ringlet_core::msg::send(&mut s, &hello, &peer, deadline).unwrap();
    #[derive(serde::Deserialize)]
    struct PeerAck {
        refused: Option<String>,
    }
    let ack: PeerAck = ringlet_core::msg::recv(&mut s, 4096, &peer, deadline).unwrap();
    assert!(ack.refused.unwrap().contains("claims rank 0"));
    std::fs::write(&stop, b"").unwrap();
    let statuses = job.wait_all(Duration::from_secs(60));
    let _ = std::fs::remove_file(&stop);
    let all = job.all_outputs();
    for (r, st) in statuses.iter().enumerate() {
        assert_eq!(st.code(), Some(0), "rank {r}\n{all}");
    }
    assert!(
        job.output(0).contains("refused a connection on our port"),
        "rank 0 logged no refusal\n{all}"
    );
}
