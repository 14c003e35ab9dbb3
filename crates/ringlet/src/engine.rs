//! Runs one collective's [`Schedule`] over a [`Link`]: a single-threaded event loop that keeps
//! sending to the next rank, receiving from the previous one and reducing, all at chunk
//! granularity, so the network, the kernel copies and the reduction overlap without threads and
//! without touching the same bytes twice.
//!
//! It also owns failure handling on the ring:
//! - every frame is checked against our own call; a mismatch, malformed frame or dead neighbour
//!   fails the collective and an abort notice is sent onward, so every rank fails with the same
//!   explanation instead of waiting for its deadline;
//! - when nothing moves for the timeout, a rank announces it is stalled (it is alive, waiting on
//!   its predecessor) and waits a short grace period. The first rank whose predecessor made no
//!   such announcement blames that predecessor, and its verdict travels the ring.

use crate::memory::{HostMemory, Memory};
use crate::schedule::{RecvSpec, Schedule, Xfer};
use crate::wire::{AbortNotice, CallSig, FrameKind, Header, HEADER_LEN, MAX_CONTROL_PAYLOAD};
use ringlet_core::error::PeerId;
use ringlet_core::{Element, Error, Result};
use ringlet_transport::{Link, Readiness};
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
    target: Option<I>,
    got: usize,
}

impl<I> Incoming<I> {
    fn new() -> Incoming<I> {
        Incoming {
            header: [0; HEADER_LEN],
            header_len: 0,
            target: None,
            got: 0,
        }
    }
}

/// Executes `schedule` for the call `sig` on `buf`, with `scratch` holding `schedule.slots`
/// chunks of `slot_len` elements.
pub fn run<T: Element, L: Link + ?Sized>(
    link: &mut L,
    sig: CallSig,
    schedule: &Schedule,
    buf: &mut [T],
    scratch: &mut [T],
    deadlines: Deadlines,
) -> Result<()> {
    let mut mem = HostMemory::new(buf, scratch, schedule.slots, schedule.slot_len);
    run_on(
        link,
        sig,
        schedule,
        &mut mem,
        std::mem::size_of::<T>(),
        deadlines,
    )
}

/// As [`run`], on any [`Memory`] holding elements of `elem_size` bytes.
pub fn run_on<L: Link + ?Sized, M: Memory>(
    link: &mut L,
    sig: CallSig,
    schedule: &Schedule,
    mem: &mut M,
    elem_size: usize,
    deadlines: Deadlines,
) -> Result<()> {
    let mut exec = Exec {
        link,
        mem,
        elem_size,
        sig,
        schedule,
        deadlines,
        sends: schedule
            .sends
            .iter()
            .map(|x| outgoing(sig, x, elem_size))
            .collect(),
        incoming: Incoming::new(),
        received: 0,
        ready: VecDeque::new(),
        applied: 0,
        prev_stalled: false,
    };
    match exec.drive() {
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

/// How many queued sends the memory may prepare ahead of the one on the wire: copies of the
/// next chunks overlap with sending this one.
const STAGE_AHEAD: usize = 3;

/// Why the loop stopped; `fail` turns it into the caller's error and tells the ring.
/// (Boxed: the loop returns it on the cold path only, and it is large.)
enum Failure {
    /// We detected it: tell the next rank (unless it is the one at fault).
    Local(Box<Error>),
    /// A neighbour told us: pass the notice on.
    Relayed(Box<AbortNotice>),
}

impl From<Error> for Failure {
    fn from(error: Error) -> Failure {
        Failure::Local(Box::new(error))
    }
}

struct Exec<'a, L: Link + ?Sized, M: Memory> {
    link: &'a mut L,
    mem: &'a mut M,
    elem_size: usize,
    sig: CallSig,
    schedule: &'a Schedule,
    deadlines: Deadlines,
    sends: VecDeque<Outgoing<M::Out>>,
    incoming: Incoming<M::In>,
    /// Frames fully received so far (indexes `schedule.recvs`).
    received: usize,
    /// Received frames not yet applied: (index into recvs, where the payload landed).
    ready: VecDeque<(usize, M::In)>,
    applied: usize,
    /// Our predecessor announced a stall during this collective: it is alive and waiting.
    prev_stalled: bool,
}

impl<L: Link + ?Sized, M: Memory> Exec<'_, L, M> {
    fn done(&mut self) -> Result<bool> {
        Ok(self.applied == self.schedule.recvs.len()
            && self.sends.is_empty()
            && !self.mem.busy()?)
    }

    fn drive(&mut self) -> Result<(), Failure> {
        let mut last_progress = Instant::now();
        let mut stalled_since: Option<Instant> = None;
        loop {
            let mut progressed = self.pump_sends()?;
            progressed |= self.pump_recvs()?;
            progressed |= self.apply_ready()?;
            if self.done()? {
                return Ok(());
            }
            if progressed {
                last_progress = Instant::now();
                stalled_since = None;
                continue;
            }
            if self.mem.busy()? {
                // Copies or kernels in flight: poll them, and the sockets, without sleeping long.
                if last_progress.elapsed() >= self.deadlines.timeout {
                    return Err(Error::Deadline {
                        waiting_for: format!("the device's copies and reductions in {}", self.sig),
                        after: last_progress.elapsed(),
                    }
                    .into());
                }
                let soon = Instant::now() + Duration::from_micros(20);
                self.link
                    .wait(self.can_receive(), !self.sends.is_empty(), soon)?;
                continue;
            }
            // Asked only once the device is idle: landing places free up as its copies finish.
            let want_send = !self.sends.is_empty();
            let want_recv = self.can_receive();
            if !want_send && !want_recv {
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
            // A rank whose predecessor is stalled too waits a second grace period: the verdict
            // is made at the end of some other rank's first one and needs a moment to get here.
            let grace = if self.prev_stalled {
                2 * self.deadlines.grace
            } else {
                self.deadlines.grace
            };
            let deadline = match stalled_since {
                None => last_progress + self.deadlines.timeout,
                Some(t) => t + grace,
            };
            if self.link.wait(want_recv, want_send, deadline)? == Readiness::TimedOut {
                match stalled_since {
                    None => {
                        self.announce_stall();
                        stalled_since = Some(Instant::now());
                    }
                    Some(_) => return Err(self.stall_verdict(want_recv, last_progress)),
                }
            }
        }
    }

    fn can_receive(&self) -> bool {
        let Some(spec) = self.schedule.recvs.get(self.received) else {
            return false;
        };
        let i = &self.incoming;
        i.header_len < HEADER_LEN || i.target.is_some() || self.mem.can_land(spec.apply)
    }

    /// Asks the memory to prepare the first few queued sends.
    fn stage_ahead(&mut self) -> Result<()> {
        for o in self.sends.iter_mut().take(STAGE_AHEAD) {
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
        loop {
            self.stage_ahead()?;
            let Some(o) = self.sends.front_mut() else {
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
                self.link
                    .send(&[IoSlice::new(&o.header[o.sent..]), IoSlice::new(payload)])?
            } else {
                self.link
                    .send(&[IoSlice::new(&payload[o.sent - HEADER_LEN..])])?
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
                self.sends.pop_front();
            }
        }
        Ok(progressed)
    }

    fn pump_recvs(&mut self) -> Result<bool, Failure> {
        let size = self.elem_size;
        let mut progressed = false;
        while self.received < self.schedule.recvs.len() {
            if self.incoming.header_len < HEADER_LEN {
                let at = self.incoming.header_len;
                let n = self.link.recv(&mut self.incoming.header[at..])?;
                if n == 0 {
                    break;
                }
                self.incoming.header_len += n;
                if self.incoming.header_len < HEADER_LEN {
                    continue;
                }
                let spec = &self.schedule.recvs[self.received];
                if !self.accept_header(spec, size)? {
                    // A stall notice: not progress, or ranks stalled on each other would keep
                    // resetting each other's deadline.
                    self.incoming = Incoming::new();
                    continue;
                }
                progressed = true;
            }
            let spec = &self.schedule.recvs[self.received];
            if self.incoming.target.is_none() {
                match self.mem.land(spec.xfer.range.clone(), spec.apply) {
                    Some(landing) => self.incoming.target = Some(landing),
                    None => break,
                }
            }
            let want = spec.xfer.range.len() * size;
            if self.incoming.got < want {
                let landing = self.incoming.target.expect("target chosen above");
                let dst = self.mem.landing_bytes(landing);
                let n = self.link.recv(&mut dst[self.incoming.got..])?;
                if n == 0 {
                    break;
                }
                progressed = true;
                self.incoming.got += n;
            }
            if self.incoming.got == want {
                let target = self.incoming.target.take().expect("target chosen above");
                self.ready.push_back((self.received, target));
                self.received += 1;
                self.incoming = Incoming::new();
                progressed = true;
            }
        }
        Ok(progressed)
    }

    /// Checks a complete header against what we expect next. `Ok(false)`: a stall notice, consumed.
    fn accept_header(&mut self, spec: &RecvSpec, size: usize) -> Result<bool, Failure> {
        let prev = self.link.prev().clone();
        let h = Header::decode(&self.incoming.header).map_err(|why| Error::protocol(&prev, why))?;
        match h.kind {
            FrameKind::Stalled => {
                // From an earlier collective: our predecessor is still in it, so it is alive and
                // waiting on its own predecessor.
                if h.sig.seq < self.sig.seq {
                    self.prev_stalled = true;
                    return Ok(false);
                }
                // Everyone waiting on everyone: the ranks called different things.
                if h.sig != self.sig {
                    return Err(Error::Mismatch {
                        peer: prev,
                        detail: format!(
                            "it is stalled in a different call: {}",
                            self.sig.describe_mismatch(&h.sig)
                        ),
                    }
                    .into());
                }
                self.prev_stalled = true;
                Ok(false)
            }
            FrameKind::Abort => {
                let notice = self.read_notice(&h, &prev)?;
                Err(Failure::Relayed(Box::new(notice)))
            }
            FrameKind::Data => {
                if h.sig != self.sig {
                    return Err(Error::Mismatch {
                        peer: prev,
                        detail: self.sig.describe_mismatch(&h.sig),
                    }
                    .into());
                }
                let want_len = spec.xfer.range.len() * size;
                if h.step != spec.xfer.step
                    || h.chunk != spec.xfer.chunk
                    || h.payload_len as usize != want_len
                {
                    return Err(Error::protocol(
                        &prev,
                        format!(
                            "in {}: got step {} chunk {} with {} bytes, expected step {} chunk {} with {want_len} \
                             (do all ranks use the same RINGLET_CHUNK_BYTES and RINGLET_SMALL_BYTES?)",
                            self.sig, h.step, h.chunk, h.payload_len, spec.xfer.step, spec.xfer.chunk
                        ),
                    )
                    .into());
                }
                self.prev_stalled = false;
                Ok(true)
            }
        }
    }

    fn apply_ready(&mut self) -> Result<bool> {
        let mut progressed = false;
        while let Some((i, landing)) = self.ready.pop_front() {
            let spec = &self.schedule.recvs[i];
            let divide = spec.finish_avg.then(|| self.link.world_size());
            self.mem
                .apply(landing, self.schedule.op, spec.apply, divide)?;
            // Staged after the apply, so a device copies the chunk out once it is reduced.
            if let Some(fwd) = &spec.forward {
                self.sends
                    .push_back(outgoing(self.sig, fwd, self.elem_size));
            }
            self.applied += 1;
            progressed = true;
        }
        Ok(progressed)
    }

    /// Reads an abort notice's payload (bounded size, short deadline).
    fn read_notice(&mut self, h: &Header, prev: &PeerId) -> Result<AbortNotice> {
        if h.payload_len > MAX_CONTROL_PAYLOAD {
            return Err(Error::protocol(prev, "oversized abort notice"));
        }
        let mut body = vec![0u8; h.payload_len as usize];
        let deadline = Instant::now() + self.deadlines.grace.max(Duration::from_secs(1));
        let mut got = 0;
        while got < body.len() {
            let n = self.link.recv(&mut body[got..])?;
            got += n;
            if n == 0 && self.link.wait(true, false, deadline)? == Readiness::TimedOut {
                return Err(Error::protocol(prev, "abort notice cut short"));
            }
        }
        ringlet_core::msg::decode(&body, prev)
    }

    /// Tells the next rank we are alive but waiting; only possible between frames.
    fn announce_stall(&mut self) {
        // Mid-frame the next rank cannot parse a notice; it will time out on us instead, which is
        // right: we are blocked on it.
        if self.sends.front().is_some_and(|o| o.sent > 0) {
            return;
        }
        let header = Header {
            kind: FrameKind::Stalled,
            sig: self.sig,
            step: 0,
            chunk: 0,
            payload_len: 0,
        };
        // Queued like any frame, so a partial write of it can never be cut by the next one.
        self.sends.push_front(Outgoing {
            header: header.encode(),
            range: 0..0,
            stage: None,
            sent: 0,
            notice: true,
        });
    }

    fn stall_verdict(&self, want_recv: bool, last_progress: Instant) -> Failure {
        let waited = last_progress.elapsed();
        let error = if want_recv && self.prev_stalled {
            Error::Timeout {
                peer: self.link.prev().clone(),
                waiting_for: format!(
                    "in {}; {} is itself waiting on its predecessor, and no verdict came from upstream",
                    self.sig,
                    self.link.prev()
                ),
                after: waited,
            }
        } else if want_recv {
            Error::Timeout {
                peer: self.link.prev().clone(),
                waiting_for: format!("in {} for data from {}", self.sig, self.link.prev()),
                after: waited,
            }
        } else {
            Error::Timeout {
                peer: self.link.next().clone(),
                waiting_for: format!("in {} for {} to accept data", self.sig, self.link.next()),
                after: waited,
            }
        };
        Failure::from(error)
    }

    /// Turns a failure into the caller's error after telling the next rank, so the whole ring
    /// fails with one explanation.
    fn fail(&mut self, failure: Failure) -> Error {
        let me = self.link.rank();
        let (notice, error) = match failure {
            Failure::Relayed(notice) => {
                let origin = PeerId::rank(notice.origin_rank as usize, notice.origin_addr.clone());
                let error = Error::Aborted {
                    origin,
                    blamed: notice
                        .blamed
                        .as_ref()
                        .map(|(rank, addr)| PeerId::rank(*rank as usize, addr.clone())),
                    detail: notice.detail.clone(),
                };
                (*notice, error)
            }
            Failure::Local(error) => {
                let error = *error;
                if let Some(notice) = self.explanation_of(&error) {
                    return self.fail(Failure::Relayed(Box::new(notice)));
                }
                let notice = AbortNotice {
                    origin_rank: me as u64,
                    origin_addr: self.link.local().addr.clone(),
                    blamed: error
                        .blamed_peer()
                        .and_then(|p| p.rank.map(|r| (r as u64, p.addr.clone()))),
                    detail: error.to_string(),
                };
                (notice, error)
            }
        };
        // The notice goes round the ring until it reaches the rank that started it, and is not
        // sent to a next rank that is dead or not reading (the rank after it tells the others).
        let next = self.link.next().rank;
        // (A relayed notice goes on even to the rank it blames: a mismatched rank is alive and
        // must hear why its peers stopped.)
        let next_unreachable = matches!(&error, Error::PeerLost { peer, .. } | Error::Timeout { peer, .. } if peer.rank == next);
        if next != Some(notice.origin_rank as usize) && !next_unreachable {
            self.send_notice(&notice);
        }
        error
    }

    /// When the next rank's connection broke, that rank may only have been closing after a
    /// failure further round the ring, whose abort notice is then on its way to us from the
    /// previous rank. Reads (and discards) what the previous rank sent, briefly, looking for it.
    fn explanation_of(&mut self, error: &Error) -> Option<AbortNotice> {
        let next = self.link.next().rank;
        if !matches!(error, Error::PeerLost { peer, .. } if peer.rank == next) {
            return None;
        }
        let deadline = Instant::now() + self.deadlines.grace.min(Duration::from_millis(250));
        let mut header = self.incoming.header;
        let mut have = self.incoming.header_len;
        let mut skip = 0;
        if have == HEADER_LEN {
            // Mid-payload: finish skipping this frame, then read headers afresh.
            let h = Header::decode(&header).ok()?;
            skip = (h.payload_len as usize).saturating_sub(self.incoming.got);
            have = 0;
        }
        let mut junk = [0u8; 16 << 10];
        loop {
            let n = if skip > 0 {
                let take = skip.min(junk.len());
                let n = self.link.recv(&mut junk[..take]).ok()?;
                skip -= n;
                n
            } else if have < HEADER_LEN {
                let n = self.link.recv(&mut header[have..]).ok()?;
                have += n;
                n
            } else {
                let h = Header::decode(&header).ok()?;
                match h.kind {
                    FrameKind::Abort => {
                        return self.read_notice(&h, &self.link.prev().clone()).ok()
                    }
                    FrameKind::Data => skip = h.payload_len as usize,
                    FrameKind::Stalled => {}
                }
                have = 0;
                continue;
            };
            if n == 0 && self.link.wait(true, false, deadline).ok()? == Readiness::TimedOut {
                return None;
            }
        }
    }

    /// Best effort, bounded: finish the frame in flight (a notice cannot cut into it), then send
    /// the abort notice. A dead or stopped next rank makes this fail fast or at the short deadline.
    fn send_notice(&mut self, notice: &AbortNotice) {
        let deadline = Instant::now() + self.deadlines.grace.min(Duration::from_secs(2));
        if let Some(o) = self.sends.front() {
            if o.sent > 0 {
                // A frame under way has its bytes staged: they stay until released.
                let payload: &[u8] = match (o.notice, o.stage) {
                    (false, Some(stage)) => match self.mem.staged_bytes(stage) {
                        Ok(Some(bytes)) => bytes,
                        _ => return,
                    },
                    _ => &[],
                };
                let frame = [&o.header[..], payload];
                let (head, tail) = (o.sent.min(HEADER_LEN), o.sent.saturating_sub(HEADER_LEN));
                if send_all(self.link, &[&frame[0][head..], &frame[1][tail..]], deadline).is_err() {
                    return;
                }
            }
        }
        let body =
            bincode::serde::encode_to_vec(notice, bincode::config::standard()).unwrap_or_default();
        let body = &body[..body.len().min(MAX_CONTROL_PAYLOAD as usize)];
        let header = Header {
            kind: FrameKind::Abort,
            sig: self.sig,
            step: 0,
            chunk: 0,
            payload_len: body.len() as u32,
        };
        let _ = send_all(self.link, &[&header.encode(), body], deadline);
    }
}

/// Sends every byte of `parts` in order, waiting as needed until `deadline`.
fn send_all<L: Link + ?Sized>(link: &mut L, parts: &[&[u8]], deadline: Instant) -> Result<()> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut sent = 0;
    while sent < total {
        let mut skip = sent;
        let mut slices = Vec::with_capacity(parts.len());
        for p in parts {
            if skip >= p.len() {
                skip -= p.len();
            } else {
                slices.push(IoSlice::new(&p[skip..]));
                skip = 0;
            }
        }
        let n = link.send(&slices)?;
        sent += n;
        if n == 0 && link.wait(false, true, deadline)? == Readiness::TimedOut {
            return Err(Error::Deadline {
                waiting_for: "sending a control frame".into(),
                after: Duration::ZERO,
            });
        }
    }
    Ok(())
}
