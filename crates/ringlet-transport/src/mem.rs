//! [`Peers`] between threads of one process: every rank of a job as a thread, for unit-testing
//! the collective algorithms, the engine and failure handling without sockets.
//!
//! Choices, and why:
//! - Each ordered pair of ranks has its own pipe of at most `capacity` bytes, bounded like a
//!   socket buffer: a schedule that would deadlock on TCP (both sides sending more than the
//!   buffers hold before either reads) deadlocks here too, and a test timeout catches it instead
//!   of unbounded queues hiding it. A small `capacity` also forces partial writes.
//! - One mutex and one condition variable for the whole world. Every change (bytes written, bytes
//!   read, a rank gone) wakes every waiter, which re-checks its own condition under that same
//!   lock: no wake-up is lost and nothing spins. A per-rank doorbell would save little in a world
//!   of a few test threads.
//! - Dropping a [`MemPeers`] is the rank dying (or closing after a failure), as a closed TCP
//!   connection: what it sent stays readable, then reading from it fails with `PeerLost`; sending
//!   to it fails at once; waits on it, for reading or sending, wake at once and the next `recv` or
//!   `send` reports it.

use crate::{Interest, Peers, Readiness};
use ringlet_core::error::PeerId;
use ringlet_core::{Error, Result};
use std::collections::VecDeque;
use std::io::IoSlice;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

struct World {
    /// `pipes[from * n + to]`: bytes sent by `from` and not yet read by `to`.
    pipes: Vec<VecDeque<u8>>,
    alive: Vec<bool>,
}

struct Shared {
    n: usize,
    capacity: usize,
    world: Mutex<World>,
    changed: Condvar,
}

impl Shared {
    // Nothing panics while holding the lock, and a rank dropped while its thread unwinds from a
    // failed assertion must not panic again: poisoning carries no information here.
    fn lock(&self) -> MutexGuard<'_, World> {
        self.world.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// One rank of an in-process job; see [`mem_world`]. Dropping it closes all its pipes.
pub struct MemPeers {
    rank: usize,
    local: PeerId,
    shared: Arc<Shared>,
}

/// One [`MemPeers`] per rank of a job of `n` ranks (rank `i` at index `i`), to be moved into `n`
/// threads. Each direction between two ranks buffers at most `capacity` bytes.
///
/// # Panics
/// If `capacity` is 0: nothing could ever be sent.
pub fn mem_world(n: usize, capacity: usize) -> Vec<MemPeers> {
    assert!(capacity >= 1, "mem_world: capacity must be at least 1 byte");
    let shared = Arc::new(Shared {
        n,
        capacity,
        world: Mutex::new(World {
            pipes: vec![VecDeque::new(); n * n],
            alive: vec![true; n],
        }),
        changed: Condvar::new(),
    });
    (0..n)
        .map(|rank| MemPeers {
            rank,
            local: mem_id(rank),
            shared: Arc::clone(&shared),
        })
        .collect()
}

fn mem_id(rank: usize) -> PeerId {
    PeerId::rank(rank, format!("mem:{rank}"))
}

impl MemPeers {
    fn check_peer(&self, peer: usize, what: &str) -> Result<()> {
        let n = self.shared.n;
        if peer >= n {
            let msg = format!("{what}: rank {peer} is not in a job of {n} ranks");
            return Err(Error::InvalidArgument(msg));
        }
        if peer == self.rank {
            let msg = format!("{what}: rank {peer} is this rank");
            return Err(Error::InvalidArgument(msg));
        }
        Ok(())
    }
}

/// What TCP reports for a peer that closed its end, so tests see the same error.
fn lost(peer: usize) -> Error {
    Error::PeerLost {
        peer: mem_id(peer),
        detail: "it closed the connection".into(),
    }
}

impl Peers for MemPeers {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.shared.n
    }

    fn local(&self) -> &PeerId {
        &self.local
    }

    fn peer(&self, rank: usize) -> PeerId {
        mem_id(rank)
    }

    fn connect(&mut self, peers: &[usize], _timeout: Duration) -> Result<()> {
        // Pipes always exist; only the ranks are checked.
        peers
            .iter()
            .try_for_each(|&p| self.check_peer(p, "connect"))
    }

    fn send(&mut self, peer: usize, bufs: &[IoSlice<'_>]) -> Result<usize> {
        self.check_peer(peer, "send")?;
        let mut w = self.shared.lock();
        if !w.alive[peer] {
            return Err(lost(peer));
        }
        let pipe = &mut w.pipes[self.rank * self.shared.n + peer];
        let mut sent = 0;
        for buf in bufs {
            let take = buf.len().min(self.shared.capacity - pipe.len());
            pipe.extend(&buf[..take]);
            sent += take;
            if take < buf.len() {
                break;
            }
        }
        if sent > 0 {
            self.shared.changed.notify_all();
        }
        Ok(sent)
    }

    fn recv(&mut self, peer: usize, buf: &mut [u8]) -> Result<usize> {
        self.check_peer(peer, "recv")?;
        if buf.is_empty() {
            return Ok(0);
        }
        let mut w = self.shared.lock();
        let alive = w.alive[peer];
        let pipe = &mut w.pipes[peer * self.shared.n + self.rank];
        if pipe.is_empty() {
            // A dead rank's last bytes are read first, as from a closed socket.
            return if alive { Ok(0) } else { Err(lost(peer)) };
        }
        let took = buf.len().min(pipe.len());
        for (dst, src) in buf.iter_mut().zip(pipe.drain(..took)) {
            *dst = src;
        }
        // Space was freed: a sender waiting on this pipe may go on.
        self.shared.changed.notify_all();
        Ok(took)
    }

    fn wait(&mut self, interests: &[Interest], deadline: Instant) -> Result<Readiness> {
        for i in interests {
            self.check_peer(i.peer, "wait")?;
        }
        let (n, me) = (self.shared.n, self.rank);
        let mut w = self.shared.lock();
        loop {
            // A dead peer is ready either way: the caller's next recv or send reports it.
            let ready = interests.iter().any(|i| {
                let dead = !w.alive[i.peer];
                (i.recv && (dead || !w.pipes[i.peer * n + me].is_empty()))
                    || (i.send && (dead || w.pipes[me * n + i.peer].len() < self.shared.capacity))
            });
            if ready {
                return Ok(Readiness::Ready);
            }
            // A peer watched only for its hang-up: the wait itself reports it.
            if let Some(i) = interests.iter().find(|i| i.hangup && !w.alive[i.peer]) {
                return Err(Error::PeerLost {
                    peer: self.peer(i.peer),
                    detail: "it closed the connection".into(),
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(Readiness::TimedOut);
            }
            let woken = self.shared.changed.wait_timeout(w, left);
            w = woken.unwrap_or_else(PoisonError::into_inner).0;
        }
    }
}

impl Drop for MemPeers {
    fn drop(&mut self) {
        let n = self.shared.n;
        let mut w = self.shared.lock();
        w.alive[self.rank] = false;
        // Nobody will read what was sent to us; what we sent stays for its readers.
        for from in 0..n {
            w.pipes[from * n + self.rank].clear();
        }
        self.shared.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;
    use std::time::Duration;
    use Readiness::{Ready, TimedOut};

    fn world<const N: usize>(capacity: usize) -> [MemPeers; N] {
        match mem_world(N, capacity).try_into() {
            Ok(w) => w,
            Err(_) => unreachable!(),
        }
    }

    fn rx(peer: usize) -> Interest {
        Interest {
            peer,
            recv: true,
            send: false,
            hangup: false,
        }
    }

    fn tx(peer: usize) -> Interest {
        Interest {
            peer,
            recv: false,
            send: true,
            hangup: false,
        }
    }

    /// Waits on one interest for at most `ms` milliseconds: what it found, and how long it took.
    fn wait1(p: &mut MemPeers, i: Interest, ms: u64) -> (Readiness, Duration) {
        let start = Instant::now();
        let r = p.wait(&[i], start + Duration::from_millis(ms)).unwrap();
        (r, start.elapsed())
    }

    /// Ready long before the 10 s deadline a waiter was given.
    fn assert_prompt((r, took): (Readiness, Duration)) {
        assert!(
            r == Ready && took < Duration::from_secs(2),
            "{r:?} after {took:?}"
        );
    }

    fn assert_lost<T: std::fmt::Debug>(r: Result<T>, rank: usize) {
        match r {
            Err(Error::PeerLost { peer, .. }) => assert_eq!(peer, mem_id(rank)),
            other => panic!("expected rank {rank} lost, got {other:?}"),
        }
    }

    #[test]
    fn bytes_arrive_in_order_through_a_pipe_smaller_than_the_message() {
        let [mut a, mut b] = world(7);
        let msg: Vec<u8> = (0..1000u32).map(|i| (i * 31 % 251) as u8).collect();
        let expected = msg.clone();
        let sender = thread::spawn(move || {
            let (head, tail) = msg.split_at(400);
            let mut off = 0;
            while off < msg.len() {
                let bufs = if off < head.len() {
                    vec![IoSlice::new(&head[off..]), IoSlice::new(tail)]
                } else {
                    vec![IoSlice::new(&tail[off - head.len()..])]
                };
                let n = a.send(1, &bufs).unwrap();
                assert!(n <= 7, "{n} bytes in a 7-byte pipe");
                if n == 0 {
                    assert_eq!(wait1(&mut a, tx(1), 10_000).0, Ready);
                }
                off += n;
            }
            a // rank 0 must outlive the reading, or its end would close
        });
        let (mut got, mut buf) = (Vec::new(), [0u8; 64]);
        while got.len() < expected.len() {
            let n = b.recv(0, &mut buf).unwrap();
            if n == 0 {
                assert_eq!(wait1(&mut b, rx(0), 10_000).0, Ready);
            }
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, expected);
        drop(sender.join().unwrap());
    }

    #[test]
    fn wait_wakes_on_arrival_not_at_the_deadline() {
        let [mut a, mut b] = world(16);
        let sender = thread::spawn(move || {
            thread::sleep(Duration::from_millis(50));
            assert_eq!(a.send(1, &[IoSlice::new(b"hi")]).unwrap(), 2);
            a
        });
        assert_prompt(wait1(&mut b, rx(0), 10_000));
        let mut buf = [0u8; 4];
        assert_eq!(b.recv(0, &mut buf).unwrap(), 2);
        assert_eq!(&buf[..2], b"hi");
        drop(sender.join().unwrap());
    }

    #[test]
    fn wait_times_out_when_nothing_comes() {
        let [mut a, _b, _c] = world(4);
        let deadline = Instant::now() + Duration::from_millis(50);
        assert_eq!(a.wait(&[rx(1), rx(2)], deadline).unwrap(), TimedOut);
        assert!(Instant::now() >= deadline);
        // Nothing to wait for waits until the deadline; so does a full pipe for sending.
        let deadline = Instant::now() + Duration::from_millis(20);
        assert_eq!(a.wait(&[], deadline).unwrap(), TimedOut);
        assert!(Instant::now() >= deadline);
        assert_eq!(a.send(1, &[IoSlice::new(b"abcdef")]).unwrap(), 4);
        assert_eq!(a.send(1, &[IoSlice::new(b"ef")]).unwrap(), 0);
        let (r, took) = wait1(&mut a, tx(1), 20);
        assert!(r == TimedOut && took >= Duration::from_millis(20));
    }

    #[test]
    fn a_dropped_rank_drains_then_fails_and_wakes_waiters() {
        let [mut a, mut b, mut c] = world(16);
        assert_eq!(a.send(1, &[IoSlice::new(b"last")]).unwrap(), 4);
        assert_eq!(c.send(0, &[IoSlice::new(&[7; 16])]).unwrap(), 16);
        // Rank 2 waits to read from rank 0, then, its pipe to rank 0 full, to write to it.
        let waiter = thread::spawn(move || {
            let waits = [wait1(&mut c, rx(0), 10_000), wait1(&mut c, tx(0), 10_000)];
            (
                waits,
                c.recv(0, &mut [0; 4]),
                c.send(0, &[IoSlice::new(b"x")]),
            )
        });
        thread::sleep(Duration::from_millis(50));
        drop(a);
        let (waits, recv, send) = waiter.join().unwrap();
        waits.into_iter().for_each(assert_prompt);
        assert_lost(recv, 0);
        assert_lost(send, 0);
        // Rank 1 still reads what rank 0 sent before it died, then learns it is gone.
        let mut buf = [0u8; 16];
        assert_eq!(b.recv(0, &mut buf).unwrap(), 4);
        assert_eq!(&buf[..4], b"last");
        assert_lost(b.recv(0, &mut buf), 0);
        assert_lost(b.send(0, &[IoSlice::new(b"x")]), 0);
        assert_prompt(wait1(&mut b, rx(0), 10_000));
    }

    #[test]
    fn addresses_and_misuse() {
        let [mut a, ..] = world::<4>(8);
        assert_eq!((a.rank(), a.world_size()), (0, 4));
        assert_eq!(a.local(), &PeerId::rank(0, "mem:0"));
        assert_eq!(a.peer(3), PeerId::rank(3, "mem:3"));
        a.connect(&[1, 2, 3], Duration::ZERO).unwrap();
        let invalid = |r: Result<usize>| matches!(r, Err(Error::InvalidArgument(_)));
        assert!(invalid(a.send(0, &[IoSlice::new(b"x")])));
        assert!(invalid(a.send(4, &[IoSlice::new(b"x")])));
        assert!(invalid(a.recv(9, &mut [0; 1])));
        assert!(a.connect(&[1, 0], Duration::ZERO).is_err());
        assert!(a.connect(&[4], Duration::ZERO).is_err());
        assert!(a.wait(&[rx(0)], Instant::now()).is_err());
    }
}
