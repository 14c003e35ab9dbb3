//! The one error type of Ringlet. Every variant that involves another process names it: its rank
//! (where known) and its `host:port`, so that a log line alone says where to look.

use std::time::Duration;

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A remote process, as errors name it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerId {
    pub rank: Option<usize>,
    pub addr: String,
}

impl PeerId {
    pub fn rank(rank: usize, addr: impl Into<String>) -> PeerId {
        PeerId {
            rank: Some(rank),
            addr: addr.into(),
        }
    }

    pub fn addr(addr: impl Into<String>) -> PeerId {
        PeerId {
            rank: None,
            addr: addr.into(),
        }
    }
}

impl std::fmt::Display for PeerId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.rank {
            Some(r) => write!(f, "rank {r} ({})", self.addr),
            None => write!(f, "{}", self.addr),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A peer closed its connection or reset it: it died or gave up.
    #[error("{peer} is gone: {detail}")]
    PeerLost { peer: PeerId, detail: String },

    /// Nothing arrived from (or could be sent to) a peer before the deadline.
    #[error("timed out after {after:?} {waiting_for}; {peer} is not responding")]
    Timeout {
        peer: PeerId,
        waiting_for: String,
        after: Duration,
    },

    /// A deadline passed before a peer could even be identified (rendezvous, connect).
    #[error("timed out after {after:?} {waiting_for}")]
    Deadline {
        waiting_for: String,
        after: Duration,
    },

    /// Ranks called different collectives, or the same one with different arguments.
    #[error("collective mismatch with {peer}: {detail}")]
    Mismatch { peer: PeerId, detail: String },

    /// Another rank failed and told the ring; `detail` is its own error, `blamed` the rank it
    /// holds responsible (if any).
    #[error("aborted: {origin} reported: {detail}")]
    Aborted {
        origin: PeerId,
        blamed: Option<PeerId>,
        detail: String,
    },

    /// Bytes that are not Ringlet's protocol, or violate it.
    #[error("protocol error from {peer}: {detail}")]
    Protocol { peer: PeerId, detail: String },

    /// The peer does not hold the job token (or we do not hold its).
    #[error("authentication with {peer} failed: {detail}")]
    Auth { peer: PeerId, detail: String },

    /// The caller passed something the collective cannot accept.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// Missing or malformed configuration (environment variables, flags).
    #[error("configuration: {0}")]
    Config(String),

    /// A GPU, its driver or NCCL failed (or did not finish in time).
    #[error("device: {0}")]
    Device(String),

    /// The communicator is unusable after an earlier failure.
    #[error("communicator is broken by an earlier error: {0}")]
    Broken(String),

    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
}

impl Error {
    pub fn io(context: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            context: context.into(),
            source,
        }
    }

    pub fn protocol(peer: &PeerId, detail: impl Into<String>) -> Error {
        Error::Protocol {
            peer: peer.clone(),
            detail: detail.into(),
        }
    }

    /// The peer this error blames, if it blames one.
    pub fn blamed_peer(&self) -> Option<&PeerId> {
        match self {
            Error::PeerLost { peer, .. }
            | Error::Timeout { peer, .. }
            | Error::Mismatch { peer, .. }
            | Error::Protocol { peer, .. }
            | Error::Auth { peer, .. } => Some(peer),
            Error::Aborted { origin, blamed, .. } => Some(blamed.as_ref().unwrap_or(origin)),
            _ => None,
        }
    }
}
