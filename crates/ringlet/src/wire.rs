//! The frame every byte of a collective travels in: a fixed 48-byte little-endian header, then
//! the payload. The header repeats the caller's whole call (collective, sequence number, dtype,
//! op, count, root) so a receiver can tell a mismatched peer from a slow one, and names the step
//! and chunk so a payload can only land where the receiver expects it.
//!
//! ```text
//! 0  magic "RGF1"     8  seq u64     24 root u32    32 chunk u32
//! 4  kind u8         16 count u64   28 step u32    36 payload_len u32
//! 5  collective u8                                 40 reserved u64 (zero)
//! 6  dtype u8
//! 7  op u8
//! ```

use ringlet_core::{DType, ReduceOp};
use std::fmt;

pub const HEADER_LEN: usize = 48;
const MAGIC: [u8; 4] = *b"RGF1";
/// Control frames (abort, stall) carry at most this much text.
pub const MAX_CONTROL_PAYLOAD: u32 = 64 << 10;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum FrameKind {
    Data = 1,
    /// The sender failed the collective; the payload says why and whom it blames.
    Abort = 2,
    /// The sender's deadline passed while it waited on its own predecessor: it is alive.
    Stalled = 3,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Collective {
    AllReduce = 1,
    Broadcast = 2,
    AllGather = 3,
    ReduceScatter = 4,
    Barrier = 5,
}

impl Collective {
    pub fn name(self) -> &'static str {
        match self {
            Collective::AllReduce => "all_reduce",
            Collective::Broadcast => "broadcast",
            Collective::AllGather => "all_gather",
            Collective::ReduceScatter => "reduce_scatter",
            Collective::Barrier => "barrier",
        }
    }

    fn from_wire(code: u8) -> Option<Collective> {
        use Collective::*;
        [AllReduce, Broadcast, AllGather, ReduceScatter, Barrier]
            .into_iter()
            .find(|c| *c as u8 == code)
    }
}

/// What one rank called: every data frame of the call carries it, and a receiver compares it with
/// its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CallSig {
    pub collective: Collective,
    pub seq: u64,
    pub dtype: DType,
    pub op: ReduceOp,
    /// Elements in the caller's buffer (its send buffer for all_gather / reduce_scatter).
    pub count: u64,
    pub root: u32,
}

impl fmt::Display for CallSig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}(count={}, dtype={}",
            self.collective.name(),
            self.count,
            self.dtype
        )?;
        match self.collective {
            Collective::AllReduce | Collective::ReduceScatter => write!(f, ", op={}", self.op)?,
            Collective::Broadcast => write!(f, ", root={}", self.root)?,
            _ => {}
        }
        write!(f, ") as collective #{}", self.seq)
    }
}

impl CallSig {
    /// Says what differs between the peer's call and ours.
    pub fn describe_mismatch(&self, theirs: &CallSig) -> String {
        let mut diffs = Vec::new();
        if theirs.seq != self.seq {
            diffs.push(format!(
                "collective number {} vs ours {}",
                theirs.seq, self.seq
            ));
        }
        if theirs.collective != self.collective {
            diffs.push(format!(
                "{} vs ours {}",
                theirs.collective.name(),
                self.collective.name()
            ));
        }
        if theirs.count != self.count {
            diffs.push(format!("count {} vs ours {}", theirs.count, self.count));
        }
        if theirs.dtype != self.dtype {
            diffs.push(format!("dtype {} vs ours {}", theirs.dtype, self.dtype));
        }
        if theirs.op != self.op {
            diffs.push(format!("op {} vs ours {}", theirs.op, self.op));
        }
        if theirs.root != self.root {
            diffs.push(format!("root {} vs ours {}", theirs.root, self.root));
        }
        format!(
            "they called {theirs}, we called {self} ({})",
            diffs.join("; ")
        )
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub kind: FrameKind,
    pub sig: CallSig,
    pub step: u32,
    pub chunk: u32,
    pub payload_len: u32,
}

impl Header {
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut b = [0u8; HEADER_LEN];
        b[0..4].copy_from_slice(&MAGIC);
        b[4] = self.kind as u8;
        b[5] = self.sig.collective as u8;
        b[6] = self.sig.dtype as u8;
        b[7] = self.sig.op as u8;
        b[8..16].copy_from_slice(&self.sig.seq.to_le_bytes());
        b[16..24].copy_from_slice(&self.sig.count.to_le_bytes());
        b[24..28].copy_from_slice(&self.sig.root.to_le_bytes());
        b[28..32].copy_from_slice(&self.step.to_le_bytes());
        b[32..36].copy_from_slice(&self.chunk.to_le_bytes());
        b[36..40].copy_from_slice(&self.payload_len.to_le_bytes());
        b
    }

    /// Parses a header; the error text says what is malformed.
    pub fn decode(b: &[u8; HEADER_LEN]) -> Result<Header, String> {
        if b[0..4] != MAGIC {
            return Err(format!(
                "bad frame magic {:02x?} (not Ringlet ring traffic)",
                &b[0..4]
            ));
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        let u64_at = |i: usize| u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"));
        let kind = match b[4] {
            1 => FrameKind::Data,
            2 => FrameKind::Abort,
            3 => FrameKind::Stalled,
            k => return Err(format!("unknown frame kind {k}")),
        };
        let collective = Collective::from_wire(b[5])
            .ok_or_else(|| format!("unknown collective code {}", b[5]))?;
        let dtype = DType::from_wire(b[6]).ok_or_else(|| format!("unknown dtype code {}", b[6]))?;
        let op =
            ReduceOp::from_wire(b[7]).ok_or_else(|| format!("unknown reduce-op code {}", b[7]))?;
        if u64_at(40) != 0 {
            return Err("reserved header bytes are not zero".into());
        }
        let header = Header {
            kind,
            sig: CallSig {
                collective,
                seq: u64_at(8),
                dtype,
                op,
                count: u64_at(16),
                root: u32_at(24),
            },
            step: u32_at(28),
            chunk: u32_at(32),
            payload_len: u32_at(36),
        };
        if kind != FrameKind::Data && header.payload_len > MAX_CONTROL_PAYLOAD {
            return Err(format!(
                "control frame claims {} payload bytes",
                header.payload_len
            ));
        }
        Ok(header)
    }
}

/// The payload of an abort frame.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct AbortNotice {
    /// The rank that first failed.
    pub origin_rank: u64,
    pub origin_addr: String,
    /// The rank it blames, if any, and that rank's address.
    pub blamed: Option<(u64, String)>,
    /// The origin's error, as text.
    pub detail: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Header {
        Header {
            kind: FrameKind::Data,
            sig: CallSig {
                collective: Collective::AllReduce,
                seq: 7,
                dtype: DType::BF16,
                op: ReduceOp::Max,
                count: 1_000_003,
                root: 2,
            },
            step: 3,
            chunk: 9,
            payload_len: 4096,
        }
    }

    #[test]
    fn header_round_trips() {
        let h = sample();
        assert_eq!(Header::decode(&h.encode()).unwrap(), h);
    }

    #[test]
    fn malformed_headers_are_rejected_with_a_reason() {
        let good = sample().encode();
        let mut bad = good;
        bad[0] = b'G';
        assert!(Header::decode(&bad).unwrap_err().contains("magic"));
        let mut bad = good;
        bad[6] = 42;
        assert!(Header::decode(&bad).unwrap_err().contains("dtype"));
        let mut bad = good;
        bad[4] = FrameKind::Abort as u8;
        bad[36..40].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(Header::decode(&bad).unwrap_err().contains("payload"));
        let http: [u8; HEADER_LEN] = *b"GET / HTTP/1.1\r\nHost: localhost\r\nAccept: */*\r\n\r\n";
        assert!(Header::decode(&http).is_err());
    }

    #[test]
    fn mismatch_description_names_each_difference() {
        let ours = sample().sig;
        let theirs = CallSig {
            collective: Collective::Broadcast,
            count: 5,
            ..ours
        };
        let d = ours.describe_mismatch(&theirs);
        assert!(d.contains("broadcast vs ours all_reduce"), "{d}");
        assert!(d.contains("count 5 vs ours 1000003"), "{d}");
    }
}
