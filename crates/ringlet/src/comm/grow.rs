//! Growing back: a replacement for a lost rank joins the running job at a step boundary.
//!
//! The replacement (started with [`REPLACEMENT_ENV`]`=1` and the `RANK` of the rank it stands
//! in for) asks to join through the rendezvous store — its request under `join/{rank}` and one
//! more on a request counter — and waits, polling, until the members admit it (`joined/{rank}`
//! names the epoch) or the job says it has ended (`closed`). The members call
//! [`Communicator::admit`] at their step boundaries: rank 0 reads the counter (one store round
//! trip) and broadcasts how many wait; when some do, it writes the next epoch's members (theirs
//! and the newcomers', in first-epoch rank order) and every one of them joins that epoch's
//! communicator, with new links under its own name, as after a shrink.

use super::reform::{parse_members, Rejoin};
use super::Communicator;
use crate::config::Config;
use ringlet_core::{Error, Result};
use ringlet_store::StoreClient;
use std::time::{Duration, Instant};

/// Set (to 1) in a replacement's environment by `ringrun --min-ranks --max-restarts`.
pub const REPLACEMENT_ENV: &str = "RINGLET_REPLACEMENT";

/// Whether this process was started as a replacement ([`REPLACEMENT_ENV`]).
pub(crate) fn is_replacement() -> bool {
    std::env::var(REPLACEMENT_ENV).is_ok_and(|v| v.trim() == "1")
}

fn key(base: &str, what: &str) -> String {
    format!("{base}/grow/{what}")
}

/// How often a waiting replacement looks for its admission.
const POLL: Duration = Duration::from_millis(20);

impl Communicator {
    /// Joins a running job as a replacement for first-epoch rank `config.rank` (of
    /// `config.world_size`): asks through the store and waits (up to `config.timeout`) for the
    /// members to admit it at a step boundary. `None` when the job ended first.
    pub fn join_running(config: Config) -> Result<Option<Communicator>> {
        super::join::check_config(&config)?;
        let token = super::join::effective_token(&config);
        let store_sock = super::join::resolve(&config.store_addr, config.timeout)?;
        let deadline = Instant::now() + config.timeout;
        let (base, me) = (config.name.clone(), config.rank);
        let mut store = StoreClient::connect(&config.store_addr, &token, deadline)?;
        // This request's own mark: an admission written for an earlier replacement of the same
        // rank (one that died) is not this one's.
        let nonce = format!(
            "{}.{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let (join, joined) = (
            key(&base, &format!("join/{me}")),
            key(&base, &format!("joined/{me}")),
        );
        store.set(&join, nonce.as_bytes(), deadline)?;
        store.add(&key(&base, "requests"), 1, deadline)?;
        let epoch = loop {
            if let Some(raw) = store.try_get(&joined, deadline)? {
                let text = String::from_utf8_lossy(&raw).to_string();
                if let Some((epoch, theirs)) = text.split_once(' ') {
                    if theirs == nonce {
                        break epoch.parse::<u64>().map_err(|_| {
                            Error::Broken(format!("the store names epoch {epoch:?} for rank {me}"))
                        })?;
                    }
                }
            }
            let closed = store.try_get(&key(&base, "closed"), deadline)?.is_some();
            if closed || Instant::now() + POLL >= deadline {
                // Withdrawn, so that rank 0 does not admit a process that is not there.
                if store.try_get(&join, deadline)?.as_deref() == Some(nonce.as_bytes()) {
                    store.delete(&join, deadline)?;
                    store.add(&key(&base, "handled"), 1, deadline)?;
                }
                if closed {
                    tracing::info!(
                        rank = me,
                        "the job finished before this replacement could join"
                    );
                    return Ok(None);
                }
                return Err(Error::Deadline {
                    waiting_for: format!(
                        "the running job to admit rank {me} (its members admit replacements at step boundaries)"
                    ),
                    after: config.timeout,
                });
            }
            std::thread::sleep(POLL);
        };
        let all: Vec<usize> = (0..config.world_size).collect();
        let raw = store.get(&ringlet_store::epoch_members_key(&base, epoch), deadline)?;
        let members = parse_members(&raw, &all)?;
        let new_rank = members.iter().position(|&r| r == me).ok_or_else(|| {
            Error::Broken(format!(
                "rank {me} was admitted to epoch {epoch}, whose members {members:?} leave it out"
            ))
        })?;
        let mut next = Rejoin::first(&config, &token, store_sock).next(epoch, members, new_rank);
        next.joined_late = true;
        let comm = next.join()?;
        tracing::info!(
            epoch,
            rank = new_rank,
            world = comm.world_size(),
            "joined the running job as a replacement"
        );
        Ok(Some(comm))
    }

    /// Whether this communicator was joined by a replacement while the job ran: its program
    /// must take its state from the members (they are past their start-up) instead of starting.
    pub fn is_replacement(&self) -> bool {
        self.rejoin.as_ref().is_some_and(|r| r.joined_late)
    }

    /// At a step boundary, collective: admits the replacements waiting to join. `None` when
    /// none waits (one store round trip on rank 0 and a one-number broadcast); else the
    /// communicator of the next epoch, members old and new, which every member (and every
    /// newcomer, from [`join_running`](Self::join_running)) joins.
    pub fn admit(&self) -> Result<Option<Communicator>> {
        let Some(rejoin) = &self.rejoin else {
            return Ok(None);
        };
        let deadline = Instant::now() + rejoin.config.timeout;
        let epoch = rejoin.epoch + 1;
        let mut waiting = vec![0u8; rejoin.first_world];
        let mut nonces = vec![String::new(); rejoin.first_world];
        let mut found = [0i64];
        if self.rank == 0 {
            // A store failure here skips this boundary (the next one looks again) rather than
            // failing the members.
            found[0] = match self.waiting_replacements(rejoin, epoch, &mut nonces, deadline) {
                Ok(n) => n as i64,
                Err(e) => {
                    tracing::warn!("cannot look for replacements in the rendezvous store: {e}");
                    0
                }
            };
            for (w, n) in waiting.iter_mut().zip(&nonces) {
                *w = u8::from(!n.is_empty());
            }
        }
        self.broadcast(&mut found, 0)?;
        if found[0] == 0 {
            return Ok(None);
        }
        self.broadcast(&mut waiting, 0)?;
        let members: Vec<usize> = (0..rejoin.first_world)
            .filter(|&r| rejoin.original.contains(&r) || waiting[r] == 1)
            .collect();
        let newcomers: Vec<usize> = (0..rejoin.first_world)
            .filter(|&r| !rejoin.original.contains(&r) && waiting[r] == 1)
            .collect();
        let me = rejoin.original[self.rank];
        let new_rank = members
            .iter()
            .position(|&r| r == me)
            .expect("the members keep every member");
        if self.rank == 0 {
            self.announce_admission(rejoin, epoch, &members, &newcomers, &nonces, deadline)?;
        }
        // A failure here blames no rank by its number in the failed epoch (the survivors then
        // wait for every member of this one; see `shrink`).
        let comm = rejoin
            .next(epoch, members.clone(), new_rank)
            .join()
            .map_err(|e| Error::Broken(format!("joining epoch {epoch} with replacements: {e}")))?;
        tracing::info!(
            epoch,
            old_world = rejoin.original.len(),
            world = members.len(),
            rank = new_rank,
            "admitted replacement(s) for rank(s) {newcomers:?}"
        );
        Ok(Some(comm))
    }

    /// After the last step (collective in spirit: rank 0 acts): replacements still waiting,
    /// or arriving later, are told the job has ended.
    pub fn close_admissions(&self) -> Result<()> {
        let Some(rejoin) = self.rejoin.as_ref().filter(|_| self.rank == 0) else {
            return Ok(());
        };
        let deadline = Instant::now() + rejoin.config.timeout;
        let mut store = StoreClient::connect(&rejoin.config.store_addr, &rejoin.token, deadline)?;
        store.set(&key(&rejoin.base, "closed"), b"1", deadline)
    }

    /// Rank 0: the request (its nonce) of each first-epoch rank whose replacement waits, in
    /// `nonces`; their number. Claims epoch `epoch` first (its seal, as `shrink` does): when a
    /// shrink has it already, nobody is admitted at this boundary.
    fn waiting_replacements(
        &self,
        rejoin: &Rejoin,
        epoch: u64,
        nonces: &mut [String],
        deadline: Instant,
    ) -> Result<usize> {
        let mut guard = self.admissions.lock().unwrap_or_else(|p| p.into_inner());
        if guard.is_none() {
            *guard = Some(StoreClient::connect(
                &rejoin.config.store_addr,
                &rejoin.token,
                deadline,
            )?);
        }
        let store = guard.as_mut().expect("connected above");
        let requests = store.add(&key(&rejoin.base, "requests"), 0, deadline)?;
        let handled = store.add(&key(&rejoin.base, "handled"), 0, deadline)?;
        if requests <= handled {
            return Ok(0);
        }
        let mut n = 0;
        for (r, slot) in nonces.iter_mut().enumerate() {
            if rejoin.original.contains(&r) {
                continue;
            }
            if let Some(raw) = store.try_get(&key(&rejoin.base, &format!("join/{r}")), deadline)? {
                *slot = String::from_utf8_lossy(&raw).to_string();
                n += 1;
            }
        }
        if n > 0 && store.add(&rejoin.key(epoch, "seal"), 1, deadline)? != 1 {
            nonces.iter_mut().for_each(String::clear);
            return Ok(0);
        }
        Ok(n)
    }

    /// Rank 0: the next epoch's members (where the newcomers and ringrun read them), and each
    /// newcomer's admission.
    fn announce_admission(
        &self,
        rejoin: &Rejoin,
        epoch: u64,
        members: &[usize],
        newcomers: &[usize],
        nonces: &[String],
        deadline: Instant,
    ) -> Result<()> {
        let mut guard = self.admissions.lock().unwrap_or_else(|p| p.into_inner());
        let store = guard
            .as_mut()
            .ok_or_else(|| Error::Broken("no store connection to admit with".into()))?;
        let list: Vec<String> = members.iter().map(usize::to_string).collect();
        store.set(
            &ringlet_store::epoch_members_key(&rejoin.base, epoch),
            list.join(",").as_bytes(),
            deadline,
        )?;
        for &r in newcomers {
            store.delete(&key(&rejoin.base, &format!("join/{r}")), deadline)?;
            store.set(
                &key(&rejoin.base, &format!("joined/{r}")),
                format!("{epoch} {}", nonces[r]).as_bytes(),
                deadline,
            )?;
        }
        store.add(
            &key(&rejoin.base, "handled"),
            newcomers.len() as i64,
            deadline,
        )?;
        if rejoin.epoch > 0 {
            let _ = store.delete(&rejoin.key(rejoin.epoch, "members"), deadline);
        }
        Ok(())
    }
}
