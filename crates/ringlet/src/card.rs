//! What every rank tells the others when it joins: the address its peers connect to (and, for
//! ranks of its host, the socket that leads to shared memory), and the settings that shape
//! schedules. They are exchanged with one all-gather over the ring (which
//! is also the job's first barrier), so that links to any peer can be made later without the
//! store, and so that ranks whose settings differ fail at once with both values named, instead
//! of in their first collective with a frame they did not expect.

use crate::engine::{self, Deadlines};
use crate::schedule;
use crate::wire::{CallSig, Collective};
use ringlet_core::error::PeerId;
use ringlet_core::{DType, Error, ReduceOp, Result};
use ringlet_transport::Peers;

/// Bytes per card on the wire: the card as a control message (a little-endian `u32` length,
/// then its body), then zeros.
pub const CARD_LEN: usize = 512;

#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct RankCard {
    /// `host:port` of the rank's listening socket.
    pub addr: String,
    pub chunk_bytes: u64,
    pub small_bytes: u64,
    /// `RINGLET_ALGO`'s name.
    pub algo: String,
    /// The rank's host key and Unix socket name, when it takes shared memory from ranks of its
    /// host (see `ringlet_transport::shm`).
    pub shm: Option<(String, String)>,
    /// Which host the rank counts itself on for the two-level all-reduce (`RINGLET_HOST_ID`,
    /// or the host key).
    pub host: String,
}

impl RankCard {
    /// The card's `CARD_LEN` bytes; an address too long to fit is refused.
    pub fn encode(&self) -> Result<Vec<u8>> {
        let mut framed = ringlet_core::msg::encode(self);
        if framed.len() > CARD_LEN {
            return Err(Error::Config(format!(
                "our address {:?} and host id {:?} are too long to announce ({} bytes of card, at most {CARD_LEN})",
                self.addr,
                self.host,
                framed.len(),
            )));
        }
        framed.resize(CARD_LEN, 0);
        Ok(framed)
    }

    pub fn decode(block: &[u8], from: &PeerId) -> Result<RankCard> {
        let bad = |why: &str| Error::protocol(from, format!("malformed rank card: {why}"));
        if block.len() != CARD_LEN {
            return Err(bad("wrong length"));
        }
        let len = u32::from_le_bytes([block[0], block[1], block[2], block[3]]) as usize;
        if len > CARD_LEN - 4 {
            return Err(bad("length field beyond the card"));
        }
        ringlet_core::msg::decode(&block[4..4 + len], from)
    }
}

/// Every rank's card, in rank order, gathered over the ring; `cards[rank]` is `ours`.
/// It is the job's first collective (sequence number 1).
pub fn exchange<P: Peers + ?Sized>(
    peers: &mut P,
    ours: &RankCard,
    deadlines: Deadlines,
) -> Result<Vec<RankCard>> {
    let (rank, n) = (peers.rank(), peers.world_size());
    let mut all = vec![0u8; n * CARD_LEN];
    all[rank * CARD_LEN..(rank + 1) * CARD_LEN].copy_from_slice(&ours.encode()?);
    let sig = CallSig {
        collective: Collective::AllGather,
        seq: 1,
        dtype: DType::U8,
        op: ReduceOp::Sum,
        count: CARD_LEN as u64,
        root: 0,
    };
    // One frame per card (the ring cuts blocks into four when their chunk allows it).
    let plan = schedule::ring_all_gather(n * CARD_LEN, rank, n, 4 * CARD_LEN);
    let mut scratch = vec![0u8; plan.scratch_len()];
    engine::run(peers, sig, &plan, &mut all, &mut scratch, deadlines)?;
    let cards = all
        .chunks_exact(CARD_LEN)
        .enumerate()
        .map(|(r, block)| RankCard::decode(block, &peers.peer(r)))
        .collect::<Result<Vec<_>>>()?;
    agree(&cards, rank)?;
    Ok(cards)
}

/// Ranks must agree on every setting that shapes schedules; the first difference from rank 0
/// is named, with both values.
pub fn agree(cards: &[RankCard], me: usize) -> Result<()> {
    let Some(first) = cards.first() else {
        return Ok(());
    };
    for (r, c) in cards.iter().enumerate().skip(1) {
        let differs = |var: &str, a: String, b: String| {
            Err(Error::Config(format!(
                "{var} differs between ranks: rank 0 ({}) has {a}, rank {r} ({}) has {b} \
                 (seen by rank {me}); every rank must use the same value",
                first.addr, c.addr
            )))
        };
        if c.chunk_bytes != first.chunk_bytes {
            return differs(
                "RINGLET_CHUNK_BYTES",
                first.chunk_bytes.to_string(),
                c.chunk_bytes.to_string(),
            );
        }
        if c.small_bytes != first.small_bytes {
            return differs(
                "RINGLET_SMALL_BYTES",
                first.small_bytes.to_string(),
                c.small_bytes.to_string(),
            );
        }
        if c.algo != first.algo {
            return differs("RINGLET_ALGO", first.algo.clone(), c.algo.clone());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card(addr: &str) -> RankCard {
        RankCard {
            addr: addr.into(),
            chunk_bytes: 1 << 20,
            small_bytes: 64 << 10,
            algo: "auto".into(),
            shm: Some(("boot/net:1/ipc:2".into(), "ringlet-40123-77".into())),
            host: "boot/net:1/ipc:2".into(),
        }
    }

    #[test]
    fn cards_round_trip_and_refuse_garbage() {
        let c = card("198.18.0.7:40123");
        let bytes = c.encode().unwrap();
        assert_eq!(bytes.len(), CARD_LEN);
        let from = PeerId::rank(3, "x");
        assert_eq!(RankCard::decode(&bytes, &from).unwrap(), c);
        let mut bad = bytes.clone();
        bad[0] = 0xff;
        bad[1] = 0xff;
        assert!(RankCard::decode(&bad, &from)
            .unwrap_err()
            .to_string()
            .contains("rank 3"));
        assert!(RankCard::decode(&[0u8; 5], &from).is_err());
        assert!(RankCard::decode(&vec![0x5a; CARD_LEN], &from).is_err());
        assert!(card(&"h".repeat(600)).encode().is_err());
    }

    #[test]
    fn differing_settings_are_named_with_both_values() {
        let mut cards = vec![card("a:1"), card("b:2"), card("c:3")];
        agree(&cards, 1).unwrap();
        cards[2].chunk_bytes = 4096;
        let e = agree(&cards, 1).unwrap_err().to_string();
        assert!(
            e.contains("RINGLET_CHUNK_BYTES")
                && e.contains("1048576")
                && e.contains("rank 2 (c:3) has 4096"),
            "{e}"
        );
        cards[2].chunk_bytes = 1 << 20;
        cards[1].algo = "ring".into();
        let e = agree(&cards, 0).unwrap_err().to_string();
        assert!(
            e.contains("RINGLET_ALGO") && e.contains("auto") && e.contains("ring"),
            "{e}"
        );
    }
}
