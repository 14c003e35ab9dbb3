//! [`Communicator`]: a rank's handle on the job — bootstrap, the collectives on host slices, and
//! the asynchronous all-reduce a training loop overlaps with compute.
//!
//! Collectives run one at a time, in the order they were issued, whichever thread issued them:
//! each call takes a ticket, and runs when its ticket comes up. Synchronous calls run on the
//! caller's thread; asynchronous ones on a worker thread that owns nothing but its queue.
//! Joining (the store, the links, the rank cards) is in [`join`]; going on without a failed rank
//! (a new epoch of the communicator) in [`reform`].

mod grow;
pub use grow::REPLACEMENT_ENV;
mod join;
mod reform;

#[cfg(feature = "mpi")]
pub(crate) use join::{check_config, resolve, unspecified_like};

use crate::algo::{self, Algo, AlgoSetting, HostLayout};
use crate::engine::{self, Deadlines};
use crate::schedule::{self, Schedule};
use crate::wire::{CallSig, Collective};
use ringlet_core::{Element, Error, ReduceOp, Result};
use ringlet_store::StoreServer;
use ringlet_transport::Peers;
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::Duration;

/// A rank of a job. Cheap to share across threads (`&self` everywhere).
pub struct Communicator {
    rank: usize,
    world_size: usize,
    local_rank: usize,
    pub(crate) inner: Arc<Inner>,
    worker: Mutex<Option<Worker>>,
    /// How to form the next epoch without a failed rank (joined through the store only).
    rejoin: Option<reform::Rejoin>,
    /// Rank 0's connection to the store for admitting replacements (`grow`), made at first use.
    admissions: Mutex<Option<ringlet_store::StoreClient>>,
    // Dropped last: other ranks may still be finishing their rendezvous.
    _store: Option<StoreServer>,
}

pub(crate) struct Inner {
    links: Mutex<Links>,
    order: Mutex<Order>,
    turn: Condvar,
    chunk_bytes: usize,
    pub(crate) small_bytes: usize,
    pub(crate) algo: AlgoSetting,
    /// Which ranks share a host, from the rank cards.
    pub(crate) layout: HostLayout,
    pub(crate) deadlines: Deadlines,
}

/// The transport, and what goes with using it: one collective at a time holds it.
pub(crate) type PeersBox = Box<dyn Peers>;

struct Links {
    peers: Option<PeersBox>,
    seq: u64,
    /// Reused across calls (8-byte aligned, so any element type can view it): chunks waiting
    /// to be reduced.
    scratch: Vec<u64>,
    broken: Option<String>,
    /// A collective is under way: if one is found so at the next call, it panicked.
    running: bool,
}

#[derive(Default)]
struct Order {
    issued: u64,
    running: u64,
    /// Callers asleep until their turn: without any, finishing a call wakes nobody (a wake-up
    /// is a system call per collective otherwise).
    waiting: usize,
}

type Job = Box<dyn FnOnce() + Send>;

struct Worker {
    jobs: mpsc::Sender<Job>,
    thread: JoinHandle<()>,
}

/// An all-reduce in flight; [`wait`](Self::wait) returns the reduced buffer.
#[must_use = "the all-reduce's result (and error) is only seen through wait()"]
pub struct AllReduceHandle<T> {
    result: mpsc::Receiver<Result<Vec<T>>>,
}

impl<T> AllReduceHandle<T> {
    /// Blocks until the all-reduce finished (bounded by the communicator's timeout).
    pub fn wait(self) -> Result<Vec<T>> {
        self.result.recv().unwrap_or_else(|_| {
            Err(Error::Broken(
                "the all-reduce did not complete: it panicked, or the communication thread stopped"
                    .into(),
            ))
        })
    }
}

/// What the caller asked for; with the element type and a sequence number it becomes the
/// [`CallSig`] every frame carries.
pub(crate) struct Call {
    collective: Collective,
    op: ReduceOp,
    root: usize,
    count: usize,
}

impl Call {
    pub(crate) fn new(collective: Collective, op: ReduceOp, root: usize, count: usize) -> Call {
        Call {
            collective,
            op,
            root,
            count,
        }
    }
}

/// Runs at most one collective at a time, in ticket order; advancing the turn even if the
/// collective panicked, so later callers are never stuck behind it.
struct Turn<'a>(&'a Inner);

impl Drop for Turn<'_> {
    fn drop(&mut self) {
        let mut o = self.0.order.lock().unwrap_or_else(|p| p.into_inner());
        o.running += 1;
        if o.waiting > 0 {
            self.0.turn.notify_all();
        }
    }
}

impl Inner {
    pub(crate) fn ticket(&self) -> u64 {
        let mut o = self.order.lock().unwrap_or_else(|p| p.into_inner());
        o.issued += 1;
        o.issued - 1
    }

    fn wait_turn(&self, ticket: u64) -> (Turn<'_>, MutexGuard<'_, Links>) {
        let mut o = self.order.lock().unwrap_or_else(|p| p.into_inner());
        while o.running != ticket {
            o.waiting += 1;
            o = self.turn.wait(o).unwrap_or_else(|p| p.into_inner());
            o.waiting -= 1;
        }
        drop(o);
        (
            Turn(self),
            self.links.lock().unwrap_or_else(|p| p.into_inner()),
        )
    }

    /// Runs one collective on host memory.
    fn run<T: Element>(
        &self,
        ticket: u64,
        call: Call,
        buf: &mut [T],
        schedule: impl FnOnce() -> Schedule,
    ) -> Result<()> {
        let deadlines = self.deadlines;
        self.run_with::<T>(ticket, call, schedule, |peers, sig, schedule, scratch| {
            let scratch = typed(scratch, schedule.scratch_len());
            engine::run(peers, sig, &schedule, buf, scratch, deadlines)
        })
    }

    /// Runs one collective: numbers it, checks the communicator is usable, hands the transport
    /// and schedule to `exec`, and marks the communicator broken on failure (the byte streams
    /// between ranks are out of step after an error).
    pub(crate) fn run_with<T: Element>(
        &self,
        ticket: u64,
        call: Call,
        schedule: impl FnOnce() -> Schedule,
        exec: impl FnOnce(&mut dyn Peers, CallSig, Schedule, &mut Vec<u64>) -> Result<()>,
    ) -> Result<()> {
        let (_turn, mut links) = self.wait_turn(ticket);
        if let Some(why) = &links.broken {
            return Err(Error::Broken(why.clone()));
        }
        if links.running {
            return Err(Error::Broken(format!(
                "collective #{} panicked, leaving the links out of step",
                links.seq
            )));
        }
        links.seq += 1;
        let sig = CallSig {
            collective: call.collective,
            seq: links.seq,
            dtype: T::DTYPE,
            op: call.op,
            count: call.count as u64,
            root: call.root as u32,
        };
        let Some(_) = links.peers else {
            return Ok(());
        };
        let schedule = schedule();
        // Until the engine returns, the communicator counts as broken: a panic on the way
        // leaves it so.
        links.running = true;
        let Links { peers, scratch, .. } = &mut *links;
        let peers = peers.as_mut().expect("checked above");
        let result = exec(peers.as_mut(), sig, schedule, scratch);
        links.running = false;
        match &result {
            Ok(()) => {}
            Err(e) => {
                links.broken = Some(e.to_string());
                // Close our connections: a peer still sending to us, or waiting on us, then
                // fails at once instead of at its deadline.
                links.peers = None;
            }
        }
        result
    }
}

impl Communicator {
    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    pub fn local_rank(&self) -> usize {
        self.local_rank
    }

    /// `RINGLET_TIMEOUT`: how long a collective may make no progress; programs bound their own
    /// waits (a checkpoint write, say) by it too.
    pub fn timeout(&self) -> Duration {
        self.inner.deadlines.timeout
    }

    pub(crate) fn chunk_elems<T>(&self) -> usize {
        (self.inner.chunk_bytes / std::mem::size_of::<T>()).max(1)
    }

    /// Which ranks share a host, as the rank cards said (the same on every rank).
    pub fn host_layout(&self) -> &HostLayout {
        &self.inner.layout
    }

    /// The algorithm an all-reduce of `bytes` bytes runs on this communicator (the same on
    /// every rank): see [`algo`](crate::algo).
    pub fn all_reduce_algorithm(&self, bytes: usize) -> Algo {
        self.inner.all_reduce_algo(bytes)
    }

    /// Reduces `buf` across all ranks, in place: afterwards every rank holds the same result,
    /// bit for bit.
    pub fn all_reduce<T: Element>(&self, buf: &mut [T], op: ReduceOp) -> Result<()> {
        let ticket = self.inner.ticket();
        all_reduce_on(
            &self.inner,
            ticket,
            self.rank,
            self.chunk_elems::<T>(),
            buf,
            op,
        )
    }

    /// Starts an all-reduce of `buf` and returns at once; collectives issued later on this
    /// communicator run after it.
    pub fn all_reduce_async<T: Element>(
        &self,
        mut buf: Vec<T>,
        op: ReduceOp,
    ) -> AllReduceHandle<T> {
        let (tx, rx) = mpsc::channel();
        let (inner, rank, chunk) = (self.inner.clone(), self.rank, self.chunk_elems::<T>());
        self.submit(move |ticket| {
            let r = all_reduce_on(&inner, ticket, rank, chunk, &mut buf, op).map(|()| buf);
            let _ = tx.send(r);
        });
        AllReduceHandle { result: rx }
    }

    /// Queues `job` with the next ticket. The ticket is taken under the worker's lock, so tickets
    /// reach the single worker in order (two threads submitting at once cannot swap them).
    fn submit(&self, job: impl FnOnce(u64) + Send + 'static) {
        let mut w = self.worker.lock().unwrap_or_else(|p| p.into_inner());
        let ticket = self.inner.ticket();
        let job: Job = Box::new(move || job(ticket));
        if w.is_none() {
            let (jobs, queue) = mpsc::channel::<Job>();
            let spawned = std::thread::Builder::new()
                .name(format!("ringlet-comm-{}", self.rank))
                .spawn(move || {
                    for job in queue {
                        // A panicking job must not take the queued ones (and their tickets)
                        // down with it; its Turn guard has already advanced the order.
                        let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                    }
                });
            match spawned {
                Ok(thread) => *w = Some(Worker { jobs, thread }),
                // No thread: run it here rather than lose the ticket later calls wait on.
                Err(_) => return job(),
            }
        }
        if let Err(unsent) = w.as_ref().expect("started above").jobs.send(job) {
            (unsent.0)();
        }
    }

    /// Copies `buf` of rank `root` to every rank.
    pub fn broadcast<T: Element>(&self, buf: &mut [T], root: usize) -> Result<()> {
        let ticket = self.inner.ticket();
        if root >= self.world_size {
            return self.refuse(
                ticket,
                format!(
                    "broadcast root {root} is not below world size {}",
                    self.world_size
                ),
            );
        }
        let (rank, n, chunk, count) = (
            self.rank,
            self.world_size,
            self.chunk_elems::<T>(),
            buf.len(),
        );
        self.inner.run(
            ticket,
            Call::new(Collective::Broadcast, ReduceOp::Sum, root, count),
            buf,
            || schedule::chain_broadcast(count, rank, n, chunk, root),
        )
    }

    /// Gathers every rank's `send` into `recv`, rank `r`'s at `recv[r * send.len()..]`.
    pub fn all_gather<T: Element>(&self, send: &[T], recv: &mut [T]) -> Result<()> {
        let ticket = self.inner.ticket();
        let (rank, n, m) = (self.rank, self.world_size, send.len());
        if recv.len() != n * m {
            return self.refuse(
                ticket,
                format!(
                    "all_gather: recv has {} elements, expected world size {n} x {m}",
                    recv.len()
                ),
            );
        }
        recv[rank * m..(rank + 1) * m].copy_from_slice(send);
        let chunk = self.chunk_elems::<T>();
        self.inner.run(
            ticket,
            Call::new(Collective::AllGather, ReduceOp::Sum, 0, m),
            recv,
            || schedule::ring_all_gather(n * m, rank, n, chunk),
        )
    }

    /// Reduces `send` (world size x `recv.len()` elements) across ranks and leaves block `rank`
    /// of the result in `recv`.
    pub fn reduce_scatter<T: Element>(
        &self,
        send: &[T],
        recv: &mut [T],
        op: ReduceOp,
    ) -> Result<()> {
        let ticket = self.inner.ticket();
        let (rank, n, m) = (self.rank, self.world_size, recv.len());
        if send.len() != n * m {
            return self.refuse(
                ticket,
                format!(
                    "reduce_scatter: send has {} elements, expected world size {n} x {m}",
                    send.len()
                ),
            );
        }
        // The ring reduces in place, and `send` is the caller's: work on a copy.
        let mut work = send.to_vec();
        let chunk = self.chunk_elems::<T>();
        self.inner.run(
            ticket,
            Call::new(Collective::ReduceScatter, op, 0, n * m),
            &mut work,
            || schedule::ring_reduce_scatter(n * m, rank, n, chunk, op),
        )?;
        recv.copy_from_slice(&work[rank * m..(rank + 1) * m]);
        Ok(())
    }

    /// Returns once every rank has called `barrier`.
    pub fn barrier(&self) -> Result<()> {
        let ticket = self.inner.ticket();
        let mut token = [0u8; 1];
        let (rank, n) = (self.rank, self.world_size);
        self.inner.run(
            ticket,
            Call::new(Collective::Barrier, ReduceOp::Sum, 0, 1),
            &mut token,
            || schedule::doubling_all_reduce(1, rank, n, 1, ReduceOp::Sum),
        )
    }

    /// Consumes a ticket without running anything, so later calls are not stuck behind it.
    pub(crate) fn refuse(&self, ticket: u64, why: String) -> Result<()> {
        let _turn = self.inner.wait_turn(ticket);
        Err(Error::InvalidArgument(why))
    }
}

fn all_reduce_on<T: Element>(
    inner: &Inner,
    ticket: u64,
    rank: usize,
    chunk: usize,
    buf: &mut [T],
    op: ReduceOp,
) -> Result<()> {
    let count = buf.len();
    let algo = inner.all_reduce_algo(std::mem::size_of_val(buf));
    inner.run(
        ticket,
        Call::new(Collective::AllReduce, op, 0, count),
        buf,
        || algo::all_reduce_schedule(algo, count, rank, &inner.layout, chunk, op),
    )
}

impl Inner {
    /// The algorithm an all-reduce of `bytes` bytes runs (the same on every rank).
    pub(crate) fn all_reduce_algo(&self, bytes: usize) -> Algo {
        self.algo.choose(bytes, &self.layout, self.small_bytes)
    }
}

impl Drop for Communicator {
    fn drop(&mut self) {
        // Let queued asynchronous collectives finish (each is bounded by the timeout).
        let worker = self
            .worker
            .get_mut()
            .unwrap_or_else(|p| p.into_inner())
            .take();
        if let Some(Worker { jobs, thread }) = worker {
            drop(jobs);
            let _ = thread.join();
        }
    }
}

/// The first `len` elements of a reusable 8-byte-aligned buffer, grown as needed.
fn typed<T: Element>(words: &mut Vec<u64>, len: usize) -> &mut [T] {
    let need = (len * std::mem::size_of::<T>()).div_ceil(8);
    if words.len() < need {
        words.resize(need, 0);
    }
    let all: &mut [T] = bytemuck::cast_slice_mut(&mut words[..need]);
    &mut all[..len]
}
