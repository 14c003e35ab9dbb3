//! What the service needs from a stream engine, small enough that NATS JetStream or Kafka can
//! follow Redis Streams: read new records as one consumer of a group, take over records a dead
//! consumer left pending, and write results while acknowledging their records in one atomic step.

use std::time::Duration;

/// One input record: the engine's id and its fields.
#[derive(Clone, Debug, PartialEq)]
pub struct Record {
    pub id: String,
    pub fields: Vec<(String, Vec<u8>)>,
    /// How many times the engine has handed this record out, this time included: above 1 it was
    /// taken over from a consumer that died holding it.
    pub deliveries: u64,
}

impl Record {
    pub fn field(&self, name: &str) -> Option<&[u8]> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// A result to write for the record `id` (to the output or the dead-letter stream).
#[derive(Clone, Debug, PartialEq)]
pub struct Outcome {
    pub id: String,
    pub fields: Vec<(String, String)>,
}

/// What a commit did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Committed {
    /// Predictions written (and their records acknowledged).
    pub written: usize,
    /// Dead letters written (and their records acknowledged).
    pub dead: usize,
    /// Records another consumer had taken over meanwhile: their results were not written.
    pub lost: usize,
    /// The engine's clock at the commit, in milliseconds since the epoch.
    pub at_ms: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("stream engine {endpoint}: {what}")]
    Failed { endpoint: String, what: String },
}

pub type Result<T> = std::result::Result<T, EngineError>;

pub trait StreamEngine {
    /// Up to `max` records not yet delivered to the group, waiting at most `wait` for the
    /// first; they become this consumer's until committed.
    fn read(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>>;
    /// Up to `max` records delivered to any consumer of the group and not acknowledged for at
    /// least `idle` (their consumer died), made this consumer's.
    fn claim_stale(&mut self, max: usize, idle: Duration) -> Result<Vec<Record>>;
    /// Writes `outputs` and `dead` and acknowledges their records, in one atomic step, for the
    /// records still this consumer's only: a result is never written twice.
    fn commit(&mut self, outputs: &[Outcome], dead: &[Outcome]) -> Result<Committed>;
    /// A second handle on the same streams, group and consumer (its own connection), so that
    /// one batch can be committed while the next is read and scored.
    fn another(&self) -> Result<Box<dyn StreamEngine + Send>>;
}

/// The engine's time of a record id of the form `<milliseconds>-<sequence>` (Redis Streams').
pub fn id_millis(id: &str) -> Option<u64> {
    id.split_once('-')?.0.parse().ok()
}
