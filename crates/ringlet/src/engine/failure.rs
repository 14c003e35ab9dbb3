//! Failure handling of the [`engine`](super): reading and passing on abort notices, announcing
//! stalls and judging them, and finding the explanation behind a peer that hung up.

use super::{Exec, Failure, Incoming, Outgoing};
use crate::memory::Memory;
use crate::wire::{AbortNotice, FrameKind, Header, HEADER_LEN, MAX_CONTROL_PAYLOAD};
use ringlet_core::error::PeerId;
use ringlet_core::{Error, Result};
use ringlet_transport::{Interest, Peers, Readiness};
use std::io::IoSlice;
use std::time::{Duration, Instant};

impl<P: Peers + ?Sized, M: Memory> Exec<'_, P, M> {
    /// Reads an abort notice's payload from lane `li` (bounded size, short deadline).
    pub(super) fn read_notice(&mut self, h: &Header, li: usize) -> Result<AbortNotice> {
        let peer = self.lanes[li].peer;
        let from = self.peers.peer(peer);
        if h.payload_len > MAX_CONTROL_PAYLOAD {
            return Err(Error::protocol(&from, "oversized abort notice"));
        }
        let mut body = vec![0u8; h.payload_len as usize];
        let deadline = Instant::now() + self.deadlines.grace.max(Duration::from_secs(1));
        let wanted = [Interest {
            peer,
            recv: true,
            send: false,
            hangup: false,
        }];
        let mut got = 0;
        while got < body.len() {
            let n = self.peers.recv(peer, &mut body[got..])?;
            got += n;
            if n == 0 && self.peers.wait(&wanted, deadline)? == Readiness::TimedOut {
                return Err(Error::protocol(&from, "abort notice cut short"));
            }
        }
        ringlet_core::msg::decode(&body, &from)
    }

    /// Tells the ranks we send to that we are alive but waiting; only between frames.
    pub(super) fn announce_stall(&mut self) {
        let header = Header {
            kind: FrameKind::Stalled,
            sig: self.sig,
            step: 0,
            chunk: 0,
            payload_len: 0,
        }
        .encode();
        for lane in self.lanes.iter_mut().filter(|l| l.sends_to) {
            // Mid-frame the peer cannot parse a notice; it will time out on us instead, which
            // is right: we are blocked on it.
            if lane.sends.front().is_some_and(|o| o.sent > 0) {
                continue;
            }
            // Queued like any frame, so a partial write of it can never be cut by the next one.
            lane.sends.push_front(Outgoing {
                header,
                range: 0..0,
                stage: None,
                sent: 0,
                notice: true,
            });
        }
    }

    pub(super) fn stall_verdict(&self, last_progress: Instant) -> Failure {
        let after = last_progress.elapsed();
        let sig = self.sig;
        let receiving = self.current_lane().filter(|_| self.can_receive());
        // A peer that said it is stalled is alive and waiting on someone else: blame one that
        // said nothing, if there is one.
        let blocked = |l: &&super::Lane<M::Out, M::In>| l.sends.iter().any(|o| !o.notice);
        let sending = self
            .lanes
            .iter()
            .position(|l| blocked(&l) && !l.stalled)
            .or_else(|| self.lanes.iter().position(|l| blocked(&l)));
        let error = match (receiving, sending) {
            (None, Some(li)) => {
                let peer = self.peers.peer(self.lanes[li].peer);
                Error::Timeout {
                    waiting_for: format!("in {sig} for {peer} to accept data"),
                    peer,
                    after,
                }
            }
            (current, _) => {
                let li = current.or(self.current_lane()).unwrap_or(0);
                let peer = self.peers.peer(self.lanes[li].peer);
                let waiting_for = if self.lanes[li].stalled {
                    format!(
                        "in {sig}; {peer} is itself waiting on another rank, and no verdict came from it"
                    )
                } else {
                    format!("in {sig} for data from {peer}")
                };
                Error::Timeout {
                    peer,
                    waiting_for,
                    after,
                }
            }
        };
        Failure::from(error)
    }

    /// Turns a failure into the caller's error after telling every peer of the schedule, so
    /// every rank fails with one explanation.
    pub(super) fn fail(&mut self, failure: Failure) -> Error {
        let me = self.peers.rank();
        let (notice, error, came_from) = match failure {
            Failure::Relayed(notice, from) => {
                let origin = PeerId::rank(notice.origin_rank as usize, notice.origin_addr.clone());
                let error = Error::Aborted {
                    origin,
                    blamed: notice
                        .blamed
                        .as_ref()
                        .map(|(rank, addr)| PeerId::rank(*rank as usize, addr.clone())),
                    detail: notice.detail.clone(),
                };
                (*notice, error, from)
            }
            Failure::Local(error) => {
                let error = *error;
                if let Some((notice, li)) = self.explanation_of(&error) {
                    return self.fail(Failure::Relayed(Box::new(notice), Some(li)));
                }
                let notice = AbortNotice {
                    origin_rank: me as u64,
                    origin_addr: self.peers.local().addr.clone(),
                    blamed: error
                        .blamed_peer()
                        .and_then(|p| p.rank.map(|r| (r as u64, p.addr.clone()))),
                    detail: error.to_string(),
                };
                (notice, error, None)
            }
        };
        // The notice is not sent back to where it came from, to the rank that started it, or to
        // a peer that is dead or not reading (the ranks around it tell the others). A relayed
        // notice goes on even to the rank it blames: a mismatched rank is alive and must hear why
        // its peers stopped.
        let unreachable = match &error {
            Error::PeerLost { peer, .. } | Error::Timeout { peer, .. } => peer.rank,
            _ => None,
        };
        let deadline = Instant::now() + self.deadlines.grace.min(Duration::from_secs(2));
        for li in 0..self.lanes.len() {
            let peer = self.lanes[li].peer;
            let skip = Some(li) == came_from
                || peer as u64 == notice.origin_rank
                || Some(peer) == unreachable;
            // Peers we only receive from are told too (over a link made now if need be): one may
            // be the rank at fault, alive and waiting on us, with no other way to hear.
            if !skip
                && self
                    .peers
                    .connect(&[peer], deadline.saturating_duration_since(Instant::now()))
                    .is_ok()
            {
                self.send_notice(li, &notice, deadline);
            }
        }
        error
    }

    /// When a peer's connection broke, that peer may only have been closing after a failure
    /// elsewhere, whose abort notice is then on its way to us, from it or from another peer.
    /// Reads (and discards) what the lanes bring, briefly, looking for it.
    fn explanation_of(&mut self, error: &Error) -> Option<(AbortNotice, usize)> {
        let Error::PeerLost { peer, .. } = error else {
            return None;
        };
        peer.rank?;
        let deadline = Instant::now() + self.deadlines.grace.min(Duration::from_millis(250));
        // The lost peer's own stream too: it may have sent a notice before it closed.
        let mut drains: Vec<Drain> = self
            .lanes
            .iter()
            .enumerate()
            .map(|(li, l)| Drain::from_incoming(li, &l.incoming))
            .collect();
        let mut junk = vec![0u8; 16 << 10];
        loop {
            let mut moved = false;
            for d in drains.iter_mut().filter(|d| !d.dead) {
                let peer = self.lanes[d.lane].peer;
                match d.step(&mut *self.peers, peer, &mut junk) {
                    Ok(Some(h)) => {
                        if let Ok(notice) = self.read_notice(&h, d.lane) {
                            return Some((notice, d.lane));
                        }
                        d.dead = true;
                    }
                    Ok(None) => moved |= d.moved,
                    Err(_) => d.dead = true,
                }
            }
            if moved {
                continue;
            }
            let wanted: Vec<Interest> = drains
                .iter()
                .filter(|d| !d.dead)
                .map(|d| Interest {
                    peer: self.lanes[d.lane].peer,
                    recv: true,
                    send: false,
                    hangup: false,
                })
                .collect();
            if wanted.is_empty() || self.peers.wait(&wanted, deadline).ok()? == Readiness::TimedOut
            {
                return None;
            }
        }
    }

    /// Best effort, bounded: finish the frame in flight on lane `li` (a notice cannot cut into
    /// it), then send the abort notice. A dead or stopped peer makes this fail fast or at the
    /// short deadline.
    fn send_notice(&mut self, li: usize, notice: &AbortNotice, deadline: Instant) {
        let peer = self.lanes[li].peer;
        if let Some(o) = self.lanes[li].sends.front() {
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
                let rest = [&frame[0][head..], &frame[1][tail..]];
                if send_all(&mut *self.peers, peer, &rest, deadline).is_err() {
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
        let _ = send_all(&mut *self.peers, peer, &[&header.encode(), body], deadline);
    }
}

/// Reading one lane's frames and throwing them away, looking for an abort notice.
struct Drain {
    lane: usize,
    header: [u8; HEADER_LEN],
    have: usize,
    /// Payload bytes of the current frame still to skip.
    skip: usize,
    dead: bool,
    moved: bool,
}

impl Drain {
    fn from_incoming<I>(lane: usize, incoming: &Incoming<I>) -> Drain {
        let mut d = Drain {
            lane,
            header: incoming.header,
            have: incoming.header_len,
            skip: 0,
            dead: false,
            moved: false,
        };
        if let Some(h) = incoming.parked {
            // Mid-frame: finish skipping its payload, then read headers afresh.
            d.skip = (h.payload_len as usize).saturating_sub(incoming.got);
            d.have = 0;
        }
        d
    }

    /// Reads what is there; `Some(header)` when an abort notice's header is complete.
    fn step<P: Peers + ?Sized>(
        &mut self,
        peers: &mut P,
        peer: usize,
        junk: &mut [u8],
    ) -> Result<Option<Header>> {
        self.moved = false;
        loop {
            let n = if self.skip > 0 {
                let take = self.skip.min(junk.len());
                let n = peers.recv(peer, &mut junk[..take])?;
                self.skip -= n;
                n
            } else if self.have < HEADER_LEN {
                let n = peers.recv(peer, &mut self.header[self.have..])?;
                self.have += n;
                n
            } else {
                let h = Header::decode(&self.header).map_err(Error::Broken)?;
                self.have = 0;
                match h.kind {
                    FrameKind::Abort => return Ok(Some(h)),
                    FrameKind::Data => self.skip = h.payload_len as usize,
                    FrameKind::Stalled => {}
                }
                continue;
            };
            if n == 0 {
                return Ok(None);
            }
            self.moved = true;
        }
    }
}

/// Sends every byte of `parts` to `peer` in order, waiting as needed until `deadline`.
fn send_all<P: Peers + ?Sized>(
    peers: &mut P,
    peer: usize,
    parts: &[&[u8]],
    deadline: Instant,
) -> Result<()> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let mut sent = 0;
    let wanted = [Interest {
        peer,
        recv: false,
        send: true,
        hangup: false,
    }];
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
        let n = peers.send(peer, &slices)?;
        sent += n;
        if n == 0 && peers.wait(&wanted, deadline)? == Readiness::TimedOut {
            return Err(Error::Deadline {
                waiting_for: "sending a control frame".into(),
                after: Duration::ZERO,
            });
        }
    }
    Ok(())
}
