//! NCCL collectives on device buffers, with the same promise as the TCP ring: every wait has a
//! deadline. The communicator is created non-blocking and polled; each collective is queued on
//! the GPU's stream and its completion polled together with NCCL's asynchronous error, and one
//! that has not finished at the deadline aborts the communicator with an error naming the
//! collective, this rank and the ranks of the communicator.
//!
//! The unique id is made by rank 0 and reaches the others over the authenticated ring that the
//! rendezvous built (the store itself is closed once the ring stands); a rank that cannot load
//! NCCL makes every rank fail with its reason.

use crate::Communicator;
use ringlet_core::{Element, Error, ReduceOp, Result};
use ringlet_cuda::nccl::{self, Api, Comm, Progress};
use ringlet_cuda::{DeviceBuffer, Gpu};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A communicator over NCCL, for buffers on one GPU per rank.
pub struct NcclCommunicator {
    // Before `gpu`: the communicator goes first, while its device's context is surely alive.
    comm: Mutex<State>,
    gpu: Arc<Gpu>,
    rank: usize,
    world_size: usize,
    hosts: Vec<String>,
    timeout: Duration,
}

struct State {
    comm: Comm,
    seq: u64,
    broken: Option<String>,
}

/// How long between polls of a queued NCCL call.
const POLL: Duration = Duration::from_micros(20);

impl Communicator {
    /// An NCCL communicator over the same ranks, each on its `gpu`. Collective: every rank calls
    /// it. Waits at most the communicator's timeout for NCCL to connect.
    pub fn nccl(&self, gpu: Arc<Gpu>) -> Result<NcclCommunicator> {
        let (rank, n) = (self.rank(), self.world_size());
        let timeout = self.inner.deadlines.timeout;
        let hosts = self.host_names()?;
        // [0] = 1 and the id when rank 0 could make one, [0] = 0 and its reason otherwise.
        let mut msg = vec![0u8; 1 + 128 + 256];
        let api = Api::load();
        if rank == 0 {
            match api
                .as_ref()
                .map_err(|e| e.to_string())
                .and_then(|api| api.unique_id().map_err(|e| e.to_string()))
            {
                Ok(id) => {
                    msg[0] = 1;
                    msg[1..129].copy_from_slice(&id);
                }
                Err(why) => {
                    let why = why.as_bytes();
                    let k = why.len().min(msg.len() - 1);
                    msg[1..1 + k].copy_from_slice(&why[..k]);
                }
            }
        }
        self.broadcast(&mut msg, 0)?;
        if msg[0] != 1 {
            let why = String::from_utf8_lossy(&msg[1..]);
            return Err(Error::Device(format!(
                "rank 0 ({}) could not make an NCCL id: {}",
                hosts[0],
                why.trim_end_matches('\0')
            )));
        }
        // Every rank says whether it has NCCL, so that one without it fails everyone at once
        // (naming it) instead of leaving them to wait for it at their deadline.
        let mut loaded = vec![0u8; n];
        self.all_gather(&[u8::from(api.is_ok())], &mut loaded)?;
        let missing: Vec<String> = (0..n)
            .filter(|&r| loaded[r] == 0)
            .map(|r| format!("rank {r} ({})", hosts[r]))
            .collect();
        let api = match api {
            Err(e) => return Err(Error::Device(format!("rank {rank} ({}): {e}", hosts[rank]))),
            Ok(_) if !missing.is_empty() => {
                return Err(Error::Device(format!(
                    "NCCL cannot be loaded on {}",
                    missing.join(", ")
                )))
            }
            Ok(api) => api,
        };
        let id: [u8; 128] = msg[1..129].try_into().expect("128 bytes");
        let started = gpu
            .kernels
            .ctx
            .bind_to_thread()
            .map_err(|e| format!("{e:?}"))
            .and_then(|()| Comm::start(api, &id, n, rank).map_err(|e| e.to_string()));
        // As with loading: a rank that cannot start fails everyone at once, named, instead of
        // leaving the others polling until their deadline.
        let mut ok = vec![0u8; n];
        self.all_gather(&[u8::from(started.is_ok())], &mut ok)?;
        let failed: Vec<String> = (0..n)
            .filter(|&r| ok[r] == 0)
            .map(|r| format!("rank {r} ({})", hosts[r]))
            .collect();
        let mut comm = match started {
            Err(e) => {
                return Err(Error::Device(format!(
                    "rank {rank} ({}) joining NCCL: {e}",
                    hosts[rank]
                )))
            }
            Ok(mut comm) if !failed.is_empty() => {
                comm.abort();
                return Err(Error::Device(format!(
                    "joining NCCL failed on {}",
                    failed.join(", ")
                )));
            }
            Ok(comm) => comm,
        };
        let start = Instant::now();
        loop {
            match comm.state() {
                Ok(Progress::Done) => break,
                Ok(Progress::InProgress) if start.elapsed() < timeout => {
                    std::thread::sleep(Duration::from_millis(1))
                }
                Ok(Progress::InProgress) => {
                    comm.abort();
                    return Err(Error::Deadline {
                        waiting_for: format!(
                            "for NCCL to connect {n} ranks ({}) on rank {rank}; aborted",
                            list(&hosts)
                        ),
                        after: start.elapsed(),
                    });
                }
                Err(e) => {
                    comm.abort();
                    return Err(Error::Device(format!(
                        "rank {rank} ({}) joining NCCL: {e}",
                        hosts[rank]
                    )));
                }
            }
        }
        Ok(NcclCommunicator {
            comm: Mutex::new(State {
                comm,
                seq: 0,
                broken: None,
            }),
            gpu,
            rank,
            world_size: n,
            hosts,
            timeout,
        })
    }

    /// Every rank's host name, in rank order (for errors that name ranks).
    fn host_names(&self) -> Result<Vec<String>> {
        const W: usize = 64;
        let mut mine = [0u8; W];
        let name = crate::topology::hostname();
        let k = name.len().min(W);
        mine[..k].copy_from_slice(&name.as_bytes()[..k]);
        let mut all = vec![0u8; W * self.world_size()];
        self.all_gather(&mine, &mut all)?;
        Ok(all
            .chunks(W)
            .map(|c| {
                String::from_utf8_lossy(c)
                    .trim_end_matches('\0')
                    .to_string()
            })
            .collect())
    }
}

fn list(hosts: &[String]) -> String {
    let shown: Vec<String> = hosts
        .iter()
        .enumerate()
        .take(16)
        .map(|(r, h)| format!("{r} {h}"))
        .collect();
    let more = if hosts.len() > 16 { ", ..." } else { "" };
    format!("ranks {}{more}", shown.join(", "))
}

impl NcclCommunicator {
    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn world_size(&self) -> usize {
        self.world_size
    }
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// In-place all-reduce of `buf`.
    pub fn all_reduce<T: Element>(&self, buf: &mut DeviceBuffer<T>, op: ReduceOp) -> Result<()> {
        let p = self.gpu.device_addr_at(buf, 0);
        let what = format!(
            "all_reduce(count={}, dtype={}, op={})",
            buf.len(),
            T::DTYPE.name(),
            op.name()
        );
        self.run(what, |c, s| {
            // SAFETY: p addresses buf's len() elements of T on this GPU; `run` waits for the
            // collective (or aborts the communicator) before buf's borrow ends.
            unsafe {
                c.all_reduce(
                    p,
                    p,
                    buf.len(),
                    nccl::datatype(T::DTYPE),
                    nccl::redop(op),
                    s,
                )
            }
        })
    }

    /// In-place broadcast of `buf` from `root`.
    pub fn broadcast<T: Element>(&self, buf: &mut DeviceBuffer<T>, root: usize) -> Result<()> {
        if root >= self.world_size {
            return Err(Error::InvalidArgument(format!(
                "broadcast root {root} is not below world size {}",
                self.world_size
            )));
        }
        let p = self.gpu.device_addr_at(buf, 0);
        let what = format!(
            "broadcast(count={}, dtype={}, root={root})",
            buf.len(),
            T::DTYPE.name()
        );
        self.run(what, |c, s| {
            // SAFETY: as in all_reduce.
            unsafe { c.broadcast(p, p, buf.len(), nccl::datatype(T::DTYPE), root, s) }
        })
    }

    /// `recv` (world_size × `send.len()`) gets every rank's `send`, in rank order.
    pub fn all_gather<T: Element>(
        &self,
        send: &DeviceBuffer<T>,
        recv: &mut DeviceBuffer<T>,
    ) -> Result<()> {
        let count = send.len();
        if recv.len() != count * self.world_size {
            return Err(Error::InvalidArgument(format!(
                "all_gather: recv holds {} elements, not {} x {count}",
                recv.len(),
                self.world_size
            )));
        }
        let (sp, rp) = (
            self.gpu.device_addr_at(send, 0),
            self.gpu.device_addr_at(recv, 0),
        );
        let what = format!("all_gather(count={count}, dtype={})", T::DTYPE.name());
        self.run(what, |c, s| {
            // SAFETY: sizes checked above; as in all_reduce.
            unsafe { c.all_gather(sp, rp, count, nccl::datatype(T::DTYPE), s) }
        })
    }

    /// `recv` gets this rank's block of the reduction of every rank's `send`.
    pub fn reduce_scatter<T: Element>(
        &self,
        send: &DeviceBuffer<T>,
        recv: &mut DeviceBuffer<T>,
        op: ReduceOp,
    ) -> Result<()> {
        let count = recv.len();
        if send.len() != count * self.world_size {
            return Err(Error::InvalidArgument(format!(
                "reduce_scatter: send holds {} elements, not {} x {count}",
                send.len(),
                self.world_size
            )));
        }
        let (sp, rp) = (
            self.gpu.device_addr_at(send, 0),
            self.gpu.device_addr_at(recv, 0),
        );
        let what = format!(
            "reduce_scatter(count={count}, dtype={}, op={})",
            T::DTYPE.name(),
            op.name()
        );
        self.run(what, |c, s| {
            // SAFETY: sizes checked above; as in all_reduce.
            unsafe { c.reduce_scatter(sp, rp, count, nccl::datatype(T::DTYPE), nccl::redop(op), s) }
        })
    }

    /// Queues one collective and waits for it: done, failed (NCCL's asynchronous error), or
    /// past the deadline (the communicator is aborted: a peer is dead or never made the call).
    fn run(
        &self,
        what: String,
        issue: impl FnOnce(&Comm, *mut std::ffi::c_void) -> std::result::Result<(), nccl::NcclError>,
    ) -> Result<()> {
        let mut st = self.comm.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(why) = &st.broken {
            return Err(Error::Broken(why.clone()));
        }
        st.seq += 1;
        let here = format!("rank {} ({})", self.rank, self.hosts[self.rank]);
        let what = format!("NCCL {what} as NCCL collective #{}", st.seq);
        let result = self.issue_and_wait(&mut st.comm, &what, &here, issue);
        if let Err(e) = &result {
            st.broken = Some(e.to_string());
        }
        result
    }

    /// Issues the call and waits for it. A non-blocking communicator may still be queueing the
    /// kernels when the call returns (`ncclInProgress`), so first its state must become done —
    /// only then does an event recorded on the stream mark the collective's end. Any failure
    /// after the call was issued aborts the communicator, so nothing is left running on the GPU.
    fn issue_and_wait(
        &self,
        comm: &mut Comm,
        what: &str,
        here: &str,
        issue: impl FnOnce(&Comm, *mut std::ffi::c_void) -> std::result::Result<(), nccl::NcclError>,
    ) -> Result<()> {
        let failed = |e: String| Error::Device(format!("{what} on {here}: {e}"));
        self.gpu
            .kernels
            .ctx
            .bind_to_thread()
            .map_err(|e| failed(format!("{e:?}")))?;
        let start = Instant::now();
        if let Err(e) = issue(comm, self.gpu.cu_stream().cast()) {
            comm.abort();
            return Err(failed(e.to_string()));
        }
        let result = self.wait_for(comm, start, &failed, what, here);
        if result.is_err() {
            comm.abort();
        }
        result
    }

    fn wait_for(
        &self,
        comm: &Comm,
        start: Instant,
        failed: &dyn Fn(String) -> Error,
        what: &str,
        here: &str,
    ) -> Result<()> {
        let too_late = || {
            Error::Deadline {
            waiting_for: format!(
                "in {what} on {here}: the NCCL communicator of {} ({}) was aborted; a rank is dead, stuck or never made this call",
                self.world_size,
                list(&self.hosts)
            ),
            after: start.elapsed(),
        }
        };
        // Queued: the communicator's state leaves ncclInProgress.
        loop {
            match comm.state().map_err(|e| failed(e.to_string()))? {
                Progress::Done => break,
                Progress::InProgress if start.elapsed() > self.timeout => return Err(too_late()),
                Progress::InProgress => std::thread::sleep(POLL),
            }
        }
        // Run: the stream passes an event recorded after the kernels; a peer's failure shows
        // as an asynchronous error meanwhile.
        let event = self.gpu.record()?;
        loop {
            comm.state().map_err(|e| failed(e.to_string()))?;
            if self
                .gpu
                .complete(&event)
                .map_err(|e| failed(e.to_string()))?
            {
                return Ok(());
            }
            if start.elapsed() > self.timeout {
                return Err(too_late());
            }
            std::thread::sleep(POLL);
        }
    }
}
