//! Going on without a rank: after a collective failed because a rank died or hung, the survivors
//! agree through the rendezvous store on who is left and form a new communicator among
//! themselves (an *epoch*), with new links and ranks numbered by their old order.
//!
//! Agreement: each survivor announces itself under the next epoch, waits until every member it
//! does not suspect has done so (or the timeout passes), and then the first to seal the epoch
//! (an atomic add) writes the member list as it stands; the others read it. A rank that arrives
//! after the seal is not a member and is told so. The new epoch's links carry its own
//! communicator name, so a frame or a connection from an older epoch is refused. The store must
//! outlive the rank that failed: `ringrun` serves it (`RINGLET_STORE_ADDR`); a store served by a
//! rank that died is reported as such.

use super::Communicator;
use crate::config::Config;
use ringlet_core::{Error, JobToken, Result};
use ringlet_store::StoreClient;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// What a communicator joined through the store needs to form the next epoch.
#[derive(Clone)]
pub(crate) struct Rejoin {
    /// The configuration this epoch joined with (its rank, world size and name).
    pub(crate) config: Config,
    pub(crate) token: JobToken,
    pub(crate) store_sock: SocketAddr,
    /// The job's first communicator name; epochs are numbered under it.
    pub(crate) base: String,
    pub(crate) epoch: u64,
    /// The first epoch's rank of each member, by rank in this epoch.
    pub(crate) original: Vec<usize>,
    /// The first epoch's world size (the ranks a replacement may stand in for).
    pub(crate) first_world: usize,
    /// This communicator was joined by a replacement while the job ran (see `grow`).
    pub(crate) joined_late: bool,
}

impl Rejoin {
    pub(crate) fn first(config: &Config, token: &JobToken, store_sock: SocketAddr) -> Rejoin {
        Rejoin {
            config: config.clone(),
            token: token.clone(),
            store_sock,
            base: config.name.clone(),
            epoch: 0,
            original: (0..config.world_size).collect(),
            first_world: config.world_size,
            joined_late: false,
        }
    }

    /// Epoch `epoch` of the same job: `members` (first-epoch ranks), this rank `new_rank` of
    /// them, links under the epoch's own name, no store of its own.
    pub(crate) fn next(&self, epoch: u64, members: Vec<usize>, new_rank: usize) -> Rejoin {
        let mut config = self.config.clone();
        config.rank = new_rank;
        config.world_size = members.len();
        config.name = epoch_name(&self.base, epoch);
        config.serve_store = false;
        Rejoin {
            config,
            token: self.token.clone(),
            store_sock: self.store_sock,
            base: self.base.clone(),
            epoch,
            original: members,
            first_world: self.first_world,
            joined_late: false,
        }
    }

    /// Joins this epoch's communicator: new links under its own name, through the job's store.
    pub(crate) fn join(self) -> Result<Communicator> {
        let comm = Communicator::join(
            self.config.clone(),
            self.token.clone(),
            self.store_sock,
            None,
        )?;
        Ok(comm.with_rejoin(self))
    }

    pub(crate) fn key(&self, epoch: u64, what: &str) -> String {
        if what == "members" {
            return ringlet_store::epoch_members_key(&self.base, epoch);
        }
        format!("{}/epoch/{epoch}/{what}", self.base)
    }
}

/// The name of epoch `epoch`'s communicator under `base`.
fn epoch_name(base: &str, epoch: u64) -> String {
    if epoch == 0 {
        base.to_string()
    } else {
        format!("{base}@{epoch}")
    }
}

impl Communicator {
    /// The epoch of this communicator: 0 for the one a job starts with, one more for each
    /// [`shrink`](Self::shrink).
    pub fn epoch(&self) -> u64 {
        self.rejoin.as_ref().map_or(0, |r| r.epoch)
    }

    /// The rank each member had in the job's first communicator, by rank in this one.
    pub fn original_ranks(&self) -> Vec<usize> {
        self.rejoin
            .as_ref()
            .map_or_else(|| (0..self.world_size).collect(), |r| r.original.clone())
    }

    /// After `failure` (the error a collective returned), forms a communicator of the ranks that
    /// are still alive, agreed with them through the rendezvous store; every survivor must call
    /// it. Ranks are renumbered in their old order. Returns an error naming the cause when the
    /// store is gone, when this rank was too late to be counted among the survivors, or when
    /// nobody else is left and `min_ranks` is not met.
    pub fn shrink(&self, failure: &Error, min_ranks: usize) -> Result<Communicator> {
        let Some(rejoin) = &self.rejoin else {
            return Err(Error::InvalidArgument(
                "only a communicator joined through the rendezvous store can be re-formed".into(),
            ));
        };
        let timeout = rejoin.config.timeout;
        let deadline = Instant::now() + timeout;
        let me = rejoin.original[self.rank];
        let mut store = StoreClient::connect(&rejoin.config.store_addr, &rejoin.token, deadline)
            .map_err(|e| store_gone(e, &rejoin.config))?;
        // Wait for everyone not blamed for the failure; the blamed rank is not awaited.
        let suspect = failure
            .blamed_peer()
            .and_then(|p| p.rank)
            .and_then(|r| rejoin.original.get(r).copied());
        let mut epoch = rejoin.epoch + 1;
        let members = loop {
            match self.agree_members(&mut store, rejoin, epoch, suspect, deadline)? {
                Some(members) => break members,
                // Replacements were being admitted into this epoch (see `grow`): the next.
                None => epoch += 1,
            }
        };
        let alive = |r: usize| rejoin.key(epoch, &format!("alive/{r}"));
        let Some(new_rank) = members.iter().position(|&r| r == me) else {
            return Err(Error::Broken(format!(
                "rank {} (first rank {me}) was not counted among the survivors of epoch {epoch} \
                 ({members:?}): it arrived after they had agreed",
                self.rank
            )));
        };
        if members.len() < min_ranks.max(1) {
            return Err(Error::Broken(format!(
                "only {} rank(s) are left after {failure}; at least {min_ranks} are needed",
                members.len()
            )));
        }
        let comm = rejoin.next(epoch, members.clone(), new_rank).join()?;
        if new_rank == 0 {
            // Every member has joined: what the last epoch and this agreement left in the store
            // is no longer read by anyone.
            let mut forget: Vec<String> = (0..rejoin.original.len())
                .map(|r| ringlet_transport::addr_key(&rejoin.config.name, r))
                .collect();
            forget.extend(rejoin.original.iter().map(|&r| alive(r)));
            forget.push(rejoin.key(epoch, "seal"));
            // This epoch's member list stays (the launcher reads it to stop ranks left out);
            // the one before goes.
            if rejoin.epoch > 0 {
                forget.push(rejoin.key(rejoin.epoch, "members"));
            }
            for key in forget {
                if let Err(e) = store.delete(&key, deadline) {
                    tracing::warn!("could not drop {key:?} from the rendezvous store: {e}");
                    break;
                }
            }
        }
        tracing::info!(
            epoch,
            old_world = rejoin.original.len(),
            world = members.len(),
            rank = new_rank,
            "formed a new communicator without the failed rank(s)"
        );
        Ok(comm)
    }
}

/// How long a survivor waits for the others' `alive` keys before looking whether the epoch was
/// sealed without it.
const AGREE_SLICE: Duration = Duration::from_millis(100);

impl Communicator {
    /// One round of agreement on epoch `epoch`'s members (see [`shrink`](Self::shrink)); `None`
    /// when the epoch turns out to be taken by an admission of replacements (its list names a
    /// rank this epoch does not have), so the survivors move on to the next.
    fn agree_members(
        &self,
        store: &mut StoreClient,
        rejoin: &Rejoin,
        epoch: u64,
        suspect: Option<usize>,
        deadline: Instant,
    ) -> Result<Option<Vec<usize>>> {
        let me = rejoin.original[self.rank];
        let alive = |r: usize| rejoin.key(epoch, &format!("alive/{r}"));
        store.set(&alive(me), b"1", deadline)?;
        let expected: Vec<String> = rejoin
            .original
            .iter()
            .filter(|&&r| Some(r) != suspect)
            .map(|&r| alive(r))
            .collect();
        let keys: Vec<&str> = expected.iter().map(String::as_str).collect();
        let seal = rejoin.key(epoch, "seal");
        // In slices, looking between them whether another survivor has sealed: a rank that
        // suspected the wrong peer (or none: its error named a survivor, or the dead rank's
        // abort notice never reached it) would otherwise wait for the dead rank until the
        // deadline, while the others, already sealed, wait for it in the next epoch's join.
        loop {
            let slice = deadline.min(Instant::now() + AGREE_SLICE);
            match store.wait(&keys, slice) {
                Ok(()) => break,
                Err(Error::Deadline { .. }) if Instant::now() >= deadline => break,
                Err(Error::Deadline { .. }) => {
                    if store.add(&seal, 0, deadline)? > 0 {
                        break;
                    }
                }
                Err(e) => return Err(e),
            }
        }
        // The first to seal writes the members as they stand; the others read them.
        let members_key = rejoin.key(epoch, "members");
        if store.add(&seal, 1, deadline)? == 1 {
            let mut members = Vec::new();
            for &r in &rejoin.original {
                if store.try_get(&alive(r), Instant::now())?.is_some() {
                    members.push(r);
                }
            }
            let list = members
                .iter()
                .map(usize::to_string)
                .collect::<Vec<_>>()
                .join(",");
            store.set(&members_key, list.as_bytes(), deadline)?;
            return Ok(Some(members));
        }
        let raw = store.get(&members_key, deadline)?;
        let all: Vec<usize> = (0..rejoin.first_world).collect();
        let listed = parse_members(&raw, &all)?;
        if listed.iter().any(|r| !rejoin.original.contains(r)) {
            return Ok(None);
        }
        Ok(Some(listed))
    }
}

/// The store could not be reached to agree: most likely it was served by the rank that failed.
fn store_gone(e: Error, config: &Config) -> Error {
    Error::Broken(format!(
        "cannot re-form the job without the failed rank: the rendezvous store at {} is gone ({e}); \
         a store served by a rank dies with it: run under ringrun, which serves it for the job \
         (RINGLET_STORE_ADDR)",
        config.store_addr
    ))
}

/// `0,1,3`: first-epoch ranks, each a member of the epoch before.
pub(crate) fn parse_members(raw: &[u8], previous: &[usize]) -> Result<Vec<usize>> {
    let bad = || Error::Broken(format!("the agreed member list {raw:?} is malformed"));
    let text = std::str::from_utf8(raw).map_err(|_| bad())?;
    let members = text
        .split(',')
        .map(|s| s.parse::<usize>().map_err(|_| bad()))
        .collect::<Result<Vec<_>>>()?;
    if members.is_empty() || members.iter().any(|r| !previous.contains(r)) {
        return Err(bad());
    }
    Ok(members)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn member_lists_are_checked() {
        assert_eq!(parse_members(b"0,2,3", &[0, 1, 2, 3]).unwrap(), [0, 2, 3]);
        assert!(parse_members(b"0,9", &[0, 1, 2, 3]).is_err());
        assert!(parse_members(b"", &[0, 1]).is_err());
        assert!(parse_members(b"0,x", &[0, 1]).is_err());
        assert_eq!(epoch_name("world", 0), "world");
        assert_eq!(epoch_name("world", 2), "world@2");
    }
}
