//! Runs one collective's [`Schedule`] over [`Peers`]: a single-threaded event loop that keeps
//! sending to every peer the schedule names, receiving the frames it expects in order, and
//! reducing, all at chunk granularity, so the network, the kernel copies and the reduction
//! overlap without threads and without touching the same bytes twice.
//!
//! Each peer is a *lane*: its own queue of outgoing frames (a slow peer never holds up the
//! others) and its own incoming header. Payloads are read in the schedule's order; headers are
//! read on every lane that still owes us frames, so a notice from any peer is seen at once.
//!
//! It also owns failure handling, whatever the schedule's shape:
//! - every frame is checked against our own call; a mismatch, malformed frame or dead peer
//!   fails the collective and an abort notice goes to every rank we send to, each of which
//!   passes it on, so every rank fails with the same explanation instead of waiting for its
//!   deadline (schedules keep their send graph strongly connected, so the notice reaches all);
//! - when nothing moves for the timeout, a rank announces to the ranks it sends to that it is
//!   stalled (it is alive, waiting) and waits a short grace period. A rank whose awaited peer
//!   made no such announcement blames that peer, and its verdict travels like any abort.

mod failure;

use crate::memory::{HostMemory, Memory};
use crate::schedule::{Apply, RecvSpec, Schedule, Xfer};
use crate::wire::{AbortNotice, CallSig, FrameKind, Header, HEADER_LEN};
use ringlet_core::error::PeerId;
use ringlet_core::{Element, Error, Result};
use ringlet_transport::{Interest, Peers, Readiness};
use std::collections::VecDeque;
use std::io::IoSlice;
use std::ops::Range;
use std::time::{Duration, Instant};

/// Deadlines of one collective.
#[derive(Clone, Copy, Debug)]
pub struct Deadlines {
    /// Fail when no byte has moved for this long.
    pub timeout: Duration,
    /// After announcing a stall, how long to wait for a verdict from upstream.
    pub grace: Duration,
}

impl Deadlines {
    pub fn new(timeout: Duration) -> Deadlines {
        Deadlines {
            timeout,
            grace: (timeout / 4).clamp(Duration::from_millis(200), Duration::from_secs(5)),
        }
    }
}

struct Outgoing<O> {
    header: [u8; HEADER_LEN],
    range: Range<usize>,
    /// The memory's handle on the bytes, once it has started preparing them.
    stage: Option<O>,
    sent: usize,
    /// A stall notice (no payload): sending it is not progress of the collective.
    notice: bool,
}

struct Incoming<I> {
    header: [u8; HEADER_LEN],
    header_len: usize,
    /// A complete data header, decoded, waiting for its turn.
    parked: Option<Header>,
    /// The parked header matched the frame we expect.
    checked: bool,
    target: Option<I>,
    got: usize,
}

impl<I> Incoming<I> {
    fn new() -> Incoming<I> {
        Incoming {
            header: [0; HEADER_LEN],
            header_len: 0,
            parked: None,
            checked: false,
            target: None,
            got: 0,
        }
    }
}

/// One peer of the schedule.
struct Lane<O, I> {
    peer: usize,
    /// The schedule sends to this peer; notices go to it too.
    sends_to: bool,
    sends: VecDeque<Outgoing<O>>,
    incoming: Incoming<I>,
    /// Frames still expected from this peer.
    owed: usize,
    /// The peer announced a stall during this collective: it is alive and waiting.
    stalled: bool,
    /// The peer closed the link we send on after we were done with it; no longer watched.
    gone: bool,
}

/// Executes `schedule` for the call `sig` on `buf`, with `scratch` holding `schedule.slots`
/// chunks of `slot_len` elements.
pub fn run<T: Element, P: Peers + ?Sized>(
    peers: &mut P,
    sig: CallSig,
    schedule: &Schedule,
    buf: &mut [T],
    scratch: &mut [T],
    deadlines: Deadlines,
) -> Result<()> {
    let mut mem = HostMemory::new(buf, scratch, schedule.slots, schedule.slot_len);
    run_on(
        peers,
        sig,
        schedule,
        &mut mem,
        std::mem::size_of::<T>(),
        deadlines,
    )
}

/// As [`run`], on any [`Memory`] holding elements of `elem_size` bytes.
pub fn run_on<P: Peers + ?Sized, M: Memory>(
    peers: &mut P,
    sig: CallSig,
    schedule: &Schedule,
    mem: &mut M,
    elem_size: usize,
    deadlines: Deadlines,
) -> Result<()> {
    let send_peers = schedule.send_peers();
    let mut lanes: Vec<Lane<M::Out, M::In>> = schedule
        .peers()
        .into_iter()
        .map(|peer| Lane {
            peer,
            sends_to: send_peers.binary_search(&peer).is_ok(),
            sends: VecDeque::new(),
            incoming: Incoming::new(),
            owed: 0,
            stalled: false,
            gone: false,
        })
        .collect();
    let lane_of = |peer: usize, lanes: &[Lane<M::Out, M::In>]| {
        lanes
            .binary_search_by_key(&peer, |l| l.peer)
            .expect("every peer of the schedule has a lane")
    };
    for x in &schedule.sends {
        let li = lane_of(x.peer, &lanes);
        lanes[li].sends.push_back(outgoing(sig, x, elem_size));
    }
    let recv_lane: Vec<usize> = schedule
        .recvs
        .iter()
        .map(|r| lane_of(r.xfer.peer, &lanes))
        .collect();
    for &li in &recv_lane {
        lanes[li].owed += 1;
    }
    let mut exec = Exec {
        peers,
        mem,
        elem_size,
        sig,
        schedule,
        deadlines,
        lanes,
        recv_lane,
        received: 0,
        ready: VecDeque::new(),
        applied: 0,
    };
    let result = exec
        .peers
        .connect(&send_peers, deadlines.timeout)
        .map_err(Failure::from)
        .and_then(|()| exec.drive());
    match result {
        Ok(()) => Ok(()),
        Err(failure) => Err(exec.fail(failure)),
    }
}

fn outgoing<O>(sig: CallSig, x: &Xfer, elem_size: usize) -> Outgoing<O> {
    let header = Header {
        kind: FrameKind::Data,
        sig,
        step: x.step,
        chunk: x.chunk,
        payload_len: (x.range.len() * elem_size) as u32,
    };
    Outgoing {
        header: header.encode(),
        range: x.range.clone(),
        stage: None,
        sent: 0,
        notice: false,
    }
}

/// How many queued sends per lane the memory may prepare ahead of the one on the wire: copies
/// of the next chunks overlap with sending this one.
const STAGE_AHEAD: usize = 3;

/// Why the loop stopped; `fail` turns it into the caller's error and tells the other ranks.
/// (Boxed: the loop returns it on the cold path only, and it is large.)
enum Failure {
    /// We detected it: tell the ranks we send to (except one at fault).
    Local(Box<Error>),
    /// A peer told us: pass the notice on (not back to the lane it came from).
    Relayed(Box<AbortNotice>, Option<usize>),
}

impl From<Error> for Failure {
    fn from(error: Error) -> Failure {
        Failure::Local(Box::new(error))
    }
}

struct Exec<'a, P: Peers + ?Sized, M: Memory> {
    peers: &'a mut P,
    mem: &'a mut M,
    elem_size: usize,
    sig: CallSig,
    schedule: &'a Schedule,
    deadlines: Deadlines,
    lanes: Vec<Lane<M::Out, M::In>>,
    /// The lane each of `schedule.recvs` arrives on.
    recv_lane: Vec<usize>,
    /// Frames fully received so far (indexes `schedule.recvs`).
    received: usize,
    /// Received frames not yet applied: (index into recvs, where the payload landed).
    ready: VecDeque<(usize, M::In)>,
    applied: usize,
}

impl<P: Peers + ?Sized, M: Memory> Exec<'_, P, M> {
    fn done(&mut self) -> Result<bool> {
        Ok(self.applied == self.schedule.recvs.len()
            && self.lanes.iter().all(|l| l.sends.is_empty())
            && !self.mem.busy()?)
    }

    fn drive(&mut self) -> Result<(), Failure> {
        // When the last progress was made, read off the clock only before a wait (reading it at
        // every step cost a tenth of a small all-reduce on shared memory): `None` once bytes
        // have moved since, and at the start (a call that never waits never reads it).
        let mut last_progress: Option<Instant> = None;
        let mut stalled_since: Option<Instant> = None;
        loop {
            let mut progressed = self.pump_sends()?;
            progressed |= self.pump_recvs()?;
            progressed |= self.apply_ready()?;
            if self.done()? {
                return Ok(());
            }
            if progressed {
                last_progress = None;
                stalled_since = None;
                continue;
            }
            let last_progress = *last_progress.get_or_insert_with(Instant::now);
            if self.mem.busy()? {
                // Copies or kernels in flight: poll them, and the sockets, without sleeping long.
                if last_progress.elapsed() >= self.deadlines.timeout {
                    return Err(Error::Deadline {
                        waiting_for: format!("the device's copies and reductions in {}", self.sig),
                        after: last_progress.elapsed(),
                    }
                    .into());
                }
                let interests = self.interests();
                let soon = Instant::now() + Duration::from_micros(20);
                self.wait_on(&interests, soon)?;
                continue;
            }
            // Asked only once the device is idle: landing places free up as its copies finish.
            let interests = self.interests();
            // (Hang-up watches alone are nothing to wait for.)
            if !interests.iter().any(|i| i.recv || i.send) {
                // The device may have caught up since `done` last looked.
                if self.done()? {
                    return Ok(());
                }
                return Err(Error::Broken(format!(
                    "internal scheduling error in {}: nothing to send or receive but not done",
                    self.sig
                ))
                .into());
            }
            // A rank whose awaited peer is stalled too waits a second grace period: the verdict
            // is made at the end of some other rank's first one and needs a moment to get here.
            let grace = if self.current_lane().is_some_and(|li| self.lanes[li].stalled) {
                2 * self.deadlines.grace
            } else {
                self.deadlines.grace
            };
            let deadline = match stalled_since {
                None => last_progress + self.deadlines.timeout,
                Some(t) => t + grace,
            };
            if self.wait_on(&interests, deadline)? == Readiness::TimedOut {
                match stalled_since {
                    None => {
                        self.announce_stall();
                        stalled_since = Some(Instant::now());
                    }
                    Some(_) => return Err(self.stall_verdict(last_progress)),
                }
            }
        }
    }

    /// Waits on the transport. A peer that closes the link we send on is a failure if we still
    /// have frames for it (its notice, if it sent one, is then looked for on every lane); one
    /// we have sent everything to may simply have finished and left: it is no longer watched.
    fn wait_on(&mut self, interests: &[Interest], deadline: Instant) -> Result<Readiness, Failure> {
        match self.peers.wait(interests, deadline) {
            Err(Error::PeerLost { peer, detail }) => {
                let done_with = self
                    .lanes
                    .binary_search_by_key(&peer.rank.unwrap_or(usize::MAX), |l| l.peer)
                    .ok()
                    .filter(|&li| !self.still_sends_to(li));
                let Some(li) = done_with else {
                    return Err(Error::PeerLost { peer, detail }.into());
                };
                // Not ours to judge: frames still owed to us by others tell (or time out).
                self.lanes[li].gone = true;
                Ok(Readiness::Ready)
            }
            other => other.map_err(Failure::from),
        }
    }

    /// Whether we still have (or will have) frames for lane `li`'s peer: then it cannot have
    /// finished this collective. (Frames it still owes us may be in flight on its other link
    /// when its hang-up arrives: those are read, or their absence times out.)
    fn still_sends_to(&self, li: usize) -> bool {
        let l = &self.lanes[li];
        let forwards_left = self.schedule.recvs[self.applied..]
            .iter()
            .flat_map(|r| &r.forwards)
            .any(|f| f.peer == l.peer);
        l.sends.iter().any(|o| !o.notice) || forwards_left
    }

    /// The lane the next expected frame arrives on.
    fn current_lane(&self) -> Option<usize> {
        self.recv_lane.get(self.received).copied()
    }

    /// What to wait for: headers on every lane that owes us frames, the payload of the
    /// expected frame if it can land, room on every lane with frames to send, and the hang-up
    /// of every peer we send to.
    fn interests(&self) -> Vec<Interest> {
        let current = self.current_lane();
        self.lanes
            .iter()
            .enumerate()
            .map(|(li, l)| Interest {
                peer: l.peer,
                recv: l.owed > 0
                    && (l.incoming.header_len < HEADER_LEN
                        || (Some(li) == current && self.can_receive())),
                send: !l.sends.is_empty(),
                // A peer we are done sending to may fail and close: that must wake us (its
                // notice may be waiting on a lane we no longer read).
                hangup: l.sends_to && !l.gone,
            })
            .filter(|i| i.recv || i.send || i.hangup)
            .collect()
    }

    /// Whether the expected frame's payload can be read now.
    fn can_receive(&self) -> bool {
        let (Some(spec), Some(li)) = (self.schedule.recvs.get(self.received), self.current_lane())
        else {
            return false;
        };
        let i = &self.lanes[li].incoming;
        i.target.is_some() || (self.may_land(spec) && self.mem.can_land(spec.apply))
    }

    /// A copy lands in place, so not over a region whose send is still queued.
    fn may_land(&self, spec: &RecvSpec) -> bool {
        spec.apply != Apply::Copy || !self.sending(&spec.xfer.range)
    }

    /// Whether a queued send (on any lane) still needs `range` as it is.
    fn sending(&self, range: &Range<usize>) -> bool {
        !range.is_empty()
            && self.lanes.iter().any(|l| {
                l.sends
                    .iter()
                    .any(|o| !o.notice && o.range.start < range.end && range.start < o.range.end)
            })
    }

    /// Asks the memory to prepare the first few queued sends of every lane.
    fn stage_ahead(&mut self, li: usize) -> Result<()> {
        for o in self.lanes[li].sends.iter_mut().take(STAGE_AHEAD) {
            if o.stage.is_none() && !o.notice {
                match self.mem.stage(o.range.clone())? {
                    Some(stage) => o.stage = Some(stage),
                    None => break,
                }
            }
        }
        Ok(())
    }

    fn pump_sends(&mut self) -> Result<bool> {
        let mut progressed = false;
        for li in 0..self.lanes.len() {
            progressed |= self.pump_lane(li)?;
        }
        Ok(progressed)
    }

    fn pump_lane(&mut self, li: usize) -> Result<bool> {
        let mut progressed = false;
        loop {
            self.stage_ahead(li)?;
            let lane = &mut self.lanes[li];
            let Some(o) = lane.sends.front_mut() else {
                break;
            };
            let payload: &[u8] = match (o.notice, o.stage) {
                (true, _) => &[],
                (false, Some(stage)) => match self.mem.staged_bytes(stage)? {
                    Some(bytes) => bytes,
                    None => break,
                },
                (false, None) => break,
            };
            let total = HEADER_LEN + payload.len();
            let n = if o.sent < HEADER_LEN {
                self.peers.send(
                    lane.peer,
                    &[IoSlice::new(&o.header[o.sent..]), IoSlice::new(payload)],
                )?
            } else {
                self.peers
                    .send(lane.peer, &[IoSlice::new(&payload[o.sent - HEADER_LEN..])])?
            };
            if n == 0 {
                break;
            }
            progressed |= !o.notice;
            o.sent += n;
            if o.sent == total {
                if let Some(stage) = o.stage {
                    self.mem.release(stage);
                }
                lane.sends.pop_front();
            }
        }
        Ok(progressed)
    }

    /// Reads a lane's next header if it owes us frames, consuming notices. `Ok(true)` when a
    /// data header is parked there.
    fn read_header(&mut self, li: usize) -> Result<bool, Failure> {
        loop {
            let lane = &mut self.lanes[li];
            if lane.incoming.parked.is_some() {
                return Ok(true);
            }
            if lane.owed == 0 {
                return Ok(false);
            }
            let at = lane.incoming.header_len;
            let n = self
                .peers
                .recv(lane.peer, &mut lane.incoming.header[at..])?;
            if n == 0 {
                return Ok(false);
            }
            lane.incoming.header_len += n;
            if lane.incoming.header_len < HEADER_LEN {
                continue;
            }
            let peer = lane.peer;
            let h = Header::decode(&lane.incoming.header)
                .map_err(|why| Error::protocol(&self.peers.peer(peer), why))?;
            match h.kind {
                FrameKind::Data => lane.incoming.parked = Some(h),
                FrameKind::Stalled => {
                    self.note_stall(li, &h, self.peers.peer(peer))?;
                    self.lanes[li].incoming = Incoming::new();
                }
                FrameKind::Abort => {
                    let notice = self.read_notice(&h, li)?;
                    return Err(Failure::Relayed(Box::new(notice), Some(li)));
                }
            }
        }
    }

    /// A peer says it is stalled: alive, and waiting on someone.
    fn note_stall(&mut self, li: usize, h: &Header, from: PeerId) -> Result<()> {
        // From an earlier collective: the peer is still in it, so it is alive and waiting. The
        // same sequence number but another call: everyone waits on everyone, because the ranks
        // called different things.
        if h.sig.seq >= self.sig.seq && h.sig != self.sig {
            return Err(Error::Mismatch {
                peer: from,
                detail: format!(
                    "it is stalled in a different call: {}",
                    self.sig.describe_mismatch(&h.sig)
                ),
            });
        }
        self.lanes[li].stalled = true;
        Ok(())
    }

    fn pump_recvs(&mut self) -> Result<bool, Failure> {
        let size = self.elem_size;
        let mut progressed = false;
        for li in 0..self.lanes.len() {
            self.read_header(li)?;
        }
        while let Some(li) = self.current_lane() {
            if !self.read_header(li)? {
                break;
            }
            let spec = &self.schedule.recvs[self.received];
            if !self.lanes[li].incoming.checked {
                self.check_data(li, spec, size)?;
                progressed = true;
            }
            if self.lanes[li].incoming.target.is_none() {
                if !self.may_land(spec) {
                    break;
                }
                match self.mem.land(spec.xfer.range.clone(), spec.apply) {
                    Some(landing) => self.lanes[li].incoming.target = Some(landing),
                    None => break,
                }
            }
            let want = spec.xfer.range.len() * size;
            let lane = &mut self.lanes[li];
            if lane.incoming.got < want {
                let landing = lane.incoming.target.expect("target chosen above");
                let dst = self.mem.landing_bytes(landing);
                let n = self.peers.recv(lane.peer, &mut dst[lane.incoming.got..])?;
                if n == 0 {
                    break;
                }
                progressed = true;
                lane.incoming.got += n;
            }
            if lane.incoming.got == want {
                let target = lane.incoming.target.take().expect("target chosen above");
                self.ready.push_back((self.received, target));
                self.received += 1;
                lane.owed -= 1;
                lane.incoming = Incoming::new();
                progressed = true;
            }
        }
        Ok(progressed)
    }

    /// Checks a parked data header against the frame we expect next from its lane.
    fn check_data(&mut self, li: usize, spec: &RecvSpec, size: usize) -> Result<()> {
        // (The peer's name is built only for an error: this runs for every frame.)
        let from = || self.peers.peer(self.lanes[li].peer);
        let h = self.lanes[li].incoming.parked.expect("a parked header");
        if h.sig != self.sig {
            return Err(Error::Mismatch {
                peer: from(),
                detail: self.sig.describe_mismatch(&h.sig),
            });
        }
        let want_len = spec.xfer.range.len() * size;
        if h.step != spec.xfer.step
            || h.chunk != spec.xfer.chunk
            || h.payload_len as usize != want_len
        {
            return Err(Error::protocol(
                &from(),
                format!(
                    "in {}: got step {} chunk {} with {} bytes, expected step {} chunk {} with {want_len} \
                     (do all ranks use the same RINGLET_CHUNK_BYTES, RINGLET_SMALL_BYTES and RINGLET_ALGO?)",
                    self.sig, h.step, h.chunk, h.payload_len, spec.xfer.step, spec.xfer.chunk
                ),
            ));
        }
        let lane = &mut self.lanes[li];
        lane.incoming.checked = true;
        lane.stalled = false;
        Ok(())
    }

    fn apply_ready(&mut self) -> Result<bool> {
        let mut progressed = false;
        while let Some(&(i, landing)) = self.ready.front() {
            let spec = &self.schedule.recvs[i];
            // Both ends of an exchange send a region and reduce into it: the reduction waits
            // until our copy of the region is out.
            if spec.apply != Apply::Copy && self.sending(&spec.xfer.range) {
                break;
            }
            self.ready.pop_front();
            let divide = spec.finish_avg.then(|| self.peers.world_size());
            self.mem
                .apply(landing, self.schedule.op, spec.apply, divide)?;
            // Staged after the apply, so a device copies the chunk out once it is reduced.
            for fwd in &spec.forwards {
                let li = self
                    .lanes
                    .binary_search_by_key(&fwd.peer, |l| l.peer)
                    .expect("every peer of the schedule has a lane");
                self.lanes[li]
                    .sends
                    .push_back(outgoing(self.sig, fwd, self.elem_size));
            }
            self.applied += 1;
            progressed = true;
        }
        Ok(progressed)
    }
}
