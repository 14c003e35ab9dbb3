//! [`Communicator`]: a rank's handle on the job — bootstrap, the collectives on host slices, and
//! the asynchronous all-reduce a training loop overlaps with compute.
//!
//! Collectives run one at a time, in the order they were issued, whichever thread issued them:
//! each call takes a ticket, and runs when its ticket comes up. Synchronous calls run on the
//! caller's thread; asynchronous ones on a worker thread that owns nothing but its queue.

use crate::algo::{self, Algo, AlgoSetting, HostLayout};
use crate::card;
use crate::config::Config;
use crate::engine::{self, Deadlines};
use crate::schedule::{self, Schedule};
use crate::wire::{CallSig, Collective};
use ringlet_core::{Element, Error, JobToken, ReduceOp, Result};
use ringlet_store::{StoreClient, StoreServer};
use ringlet_transport::{join, JoinOptions, PeerInfo, Peers};
use std::net::{IpAddr, SocketAddr, ToSocketAddrs, UdpSocket};
use std::sync::{mpsc, Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// A rank of a job. Cheap to share across threads (`&self` everywhere).
pub struct Communicator {
    rank: usize,
    world_size: usize,
    local_rank: usize,
    pub(crate) inner: Arc<Inner>,
    worker: Mutex<Option<Worker>>,
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
    /// Joins the job described by the environment (see [`Config::from_env`]).
    pub fn from_env() -> Result<Communicator> {
        Communicator::new(Config::from_env()?)
    }

    /// Joins the job: serves the store (if asked), publishes our ring address, connects the ring
    /// and runs a first barrier, all within `config.timeout`.
    pub fn new(config: Config) -> Result<Communicator> {
        check_config(&config)?;
        let token = effective_token(&config);
        let store_sock = resolve(&config.store_addr)?;
        let store = if config.serve_store && config.world_size > 1 {
            let bind_ip = if store_sock.ip().is_loopback() {
                store_sock.ip()
            } else {
                unspecified_like(store_sock.ip())
            };
            Some(StoreServer::bind(
                SocketAddr::new(bind_ip, store_sock.port()),
                token.clone(),
            )?)
        } else {
            None
        };
        Communicator::join(config, token, store_sock, store)
    }

    /// Connects the ring through the store at `store_sock` (served by `store` when this process
    /// holds it), then runs the first barrier.
    pub(crate) fn join(
        config: Config,
        token: JobToken,
        store_sock: SocketAddr,
        store: Option<StoreServer>,
    ) -> Result<Communicator> {
        let deadline = Instant::now() + config.timeout;
        let deadlines = Deadlines::new(config.timeout);
        let mut layout = HostLayout::single_host(config.world_size);
        let peers: Option<PeersBox> = if config.world_size > 1 {
            // Local choices first: a bad setting fails at once, not after waiting on the store.
            let (advertise, bind_ip) = ring_address(&config, store_sock)?;
            let mut client = StoreClient::connect(&config.store_addr, &token, deadline)?;
            let opts = JoinOptions {
                rank: config.rank,
                world_size: config.world_size,
                comm: config.name.clone(),
                bind_ip,
                advertise_host: advertise.to_string(),
                deadline,
                busy_poll: config.effective_busy_poll(),
                shm: config.shm,
            };
            let mut peers = join(&mut client, &token, &opts)?.expect("more than one rank");
            let ours = card_of(&config, peers.own_info());
            let cards = card::exchange(&mut peers, &ours, deadlines)?;
            layout = layout_of(&cards);
            let infos = cards
                .into_iter()
                .map(|c| PeerInfo {
                    addr: c.addr,
                    shm: c.shm,
                })
                .collect();
            peers.learn_peers(infos)?;
            let local = (0..config.world_size)
                .filter(|&r| peers.uses_shm(r))
                .count();
            tracing::debug!(
                rank = config.rank,
                shared_memory_peers = local,
                hosts = layout.hosts().len(),
                two_level = layout.two_level(),
                "links decided"
            );
            Some(Box::new(peers))
        } else {
            None
        };
        // Every rank has its ring links and knows every address once this returns, so none needs
        // the store any more.
        let comm = Communicator::assemble(&config, peers, store, layout);
        tracing::debug!(rank = comm.rank, world = comm.world_size, "joined");
        Ok(comm)
    }

    /// A communicator over any transport (in-process links, say) for the job `config` places
    /// it in (only rank, world size and the tuning settings are used). Runs the join's card
    /// exchange, so it returns once every rank has called it, and fails if their settings differ.
    pub fn over(mut peers: PeersBox, config: Config) -> Result<Communicator> {
        check_config(&config)?;
        if (peers.rank(), peers.world_size()) != (config.rank, config.world_size) {
            return Err(Error::InvalidArgument(format!(
                "the transport is rank {} of {}, the config rank {} of {}",
                peers.rank(),
                peers.world_size(),
                config.rank,
                config.world_size
            )));
        }
        let mut layout = HostLayout::single_host(config.world_size);
        let peers = if config.world_size > 1 {
            let info = PeerInfo {
                addr: peers.local().addr.clone(),
                shm: None,
            };
            let ours = card_of(&config, info);
            let cards = card::exchange(peers.as_mut(), &ours, Deadlines::new(config.timeout))?;
            layout = layout_of(&cards);
            Some(peers)
        } else {
            None
        };
        Ok(Communicator::assemble(&config, peers, None, layout))
    }

    fn assemble(
        config: &Config,
        peers: Option<PeersBox>,
        store: Option<StoreServer>,
        layout: HostLayout,
    ) -> Self {
        Communicator {
            rank: config.rank,
            world_size: config.world_size,
            local_rank: config.local_rank,
            inner: Arc::new(Inner {
                links: Mutex::new(Links {
                    peers,
                    // The card exchange was call 1.
                    seq: 1,
                    scratch: Vec::new(),
                    broken: None,
                    running: false,
                }),
                order: Mutex::new(Order::default()),
                turn: Condvar::new(),
                chunk_bytes: config.chunk_bytes,
                small_bytes: config.small_bytes,
                algo: config.algo,
                layout,
                deadlines: Deadlines::new(config.timeout),
            }),
            worker: Mutex::new(None),
            _store: store,
        }
    }

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

/// The address peers reach us on, and the one to listen on: from `RINGLET_SOCKET_IFNAME` when
/// set, else the local address that routes to the store. Logs the interface chosen.
fn ring_address(config: &Config, store: SocketAddr) -> Result<(IpAddr, IpAddr)> {
    use ringlet_transport::iface::{interface_addrs, select, IfaceFilter};
    let addrs = interface_addrs()?;
    let (ip, bind) = match &config.socket_ifname {
        Some(spec) => {
            let chosen = select(&IfaceFilter::parse(spec)?, &addrs).ok_or_else(|| {
                let names: std::collections::BTreeSet<&str> = addrs.iter().map(|a| a.name.as_str()).collect();
                Error::Config(format!(
                    "RINGLET_SOCKET_IFNAME={spec:?} matches no interface with a usable address (interfaces: {})",
                    names.into_iter().collect::<Vec<_>>().join(", ")
                ))
            })?;
            (chosen.ip, chosen.ip)
        }
        None => {
            let ip = route_to(store)?;
            (
                ip,
                if ip.is_loopback() {
                    ip
                } else {
                    unspecified_like(ip)
                },
            )
        }
    };
    let name = addrs
        .iter()
        .find(|a| a.ip == ip)
        .map_or("?", |a| a.name.as_str());
    tracing::info!(rank = config.rank, interface = name, %ip, "ring traffic uses this interface");
    Ok((ip, bind))
}

/// The wildcard address of `ip`'s family (listening on `0.0.0.0` does not accept IPv6 peers).
pub(crate) fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::from([0u8; 4]),
        IpAddr::V6(_) => IpAddr::from([0u16; 8]),
    }
}

pub(crate) fn check_config(config: &Config) -> Result<()> {
    if config.world_size == 0 || config.rank >= config.world_size {
        return Err(Error::Config(format!(
            "rank {} must be below world size {}",
            config.rank, config.world_size
        )));
    }
    config.check_ranges()
}

fn card_of(config: &Config, info: PeerInfo) -> card::RankCard {
    // Without a host key (no /proc), each rank counts as a host of its own.
    let host = config
        .host_id
        .clone()
        .or_else(ringlet_transport::shm::host_key)
        .unwrap_or_else(|| format!("{}/pid:{}", info.addr, std::process::id()));
    card::RankCard {
        host,
        addr: info.addr,
        chunk_bytes: config.chunk_bytes as u64,
        small_bytes: config.small_bytes as u64,
        algo: config.algo.name().into(),
        shm: info.shm,
    }
}

fn layout_of(cards: &[card::RankCard]) -> HostLayout {
    let labels: Vec<&str> = cards.iter().map(|c| c.host.as_str()).collect();
    HostLayout::from_labels(&labels)
}

fn effective_token(config: &Config) -> JobToken {
    config.token.clone().unwrap_or_else(|| {
        tracing::warn!(
            "{} is not set: ring connections are not authenticated (use ringrun, or export a shared secret)",
            JobToken::ENV
        );
        JobToken::new(format!("ringlet-unauthenticated/{}", config.store_addr))
    })
}

pub(crate) fn resolve(addr: &str) -> Result<SocketAddr> {
    addr.to_socket_addrs()
        .map_err(|e| Error::Config(format!("cannot resolve the store address {addr}: {e}")))?
        .next()
        .ok_or_else(|| Error::Config(format!("the store address {addr} resolves to nothing")))
}

/// The local address this host uses to reach `dest`: what our peers, who reach the same store,
/// can most likely reach us on. (A UDP connect only consults the routing table.)
fn route_to(dest: SocketAddr) -> Result<IpAddr> {
    let any: SocketAddr = if dest.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    }
    .parse()
    .expect("literal address");
    let probe = UdpSocket::bind(any)
        .and_then(|s| s.connect(dest).map(|_| s))
        .and_then(|s| s.local_addr())
        .map_err(|e| Error::io(format!("finding the local address that reaches {dest}"), e))?;
    Ok(probe.ip())
}
