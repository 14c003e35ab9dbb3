//! What keeps a long-lived store bounded while strangers knock for hours: warnings about refused
//! connections summarised once per interval instead of one line each, and the bytes the map
//! holds capped per client and in total.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// Warnings of one kind, at most one line per interval: the first of an interval is logged
/// whole, later ones are counted and summarised when the interval is over.
pub(crate) struct Warnings {
    what: &'static str,
    interval: Duration,
    /// When the last line was logged.
    logged_at: Option<Instant>,
    /// Since then: how many were not logged, and the latest of them.
    held: u64,
    latest: String,
}

impl Warnings {
    pub(crate) fn new(what: &'static str, interval: Duration) -> Warnings {
        Warnings {
            what,
            interval,
            logged_at: None,
            held: 0,
            latest: String::new(),
        }
    }

    /// Logs `line` now, or holds it for the summary when a line went out within the interval.
    pub(crate) fn warn(&mut self, now: Instant, line: String) {
        match self.logged_at {
            Some(at) if now.saturating_duration_since(at) < self.interval => {
                self.held += 1;
                self.latest = line;
            }
            _ => {
                // What the last interval held is its own summary, not this one's.
                self.summarise(now);
                tracing::warn!("{line}");
                self.logged_at = Some(now);
            }
        }
    }

    /// Logs the summary of what was held, once the interval is over (called on a timer, so a
    /// burst's count is reported even when nothing follows it).
    pub(crate) fn flush(&mut self, now: Instant) {
        let due = self
            .logged_at
            .is_none_or(|at| now.saturating_duration_since(at) >= self.interval);
        if due {
            self.summarise(now);
        }
    }

    /// Logs the summary of what was held, if anything, at once (when the server stops).
    pub(crate) fn summarise(&mut self, now: Instant) {
        if self.held > 0 {
            let summary = format!(
                "{} more {} in the last {:.0?}; the latest: {}",
                self.held,
                self.what,
                self.logged_at
                    .map_or(Duration::ZERO, |at| now.saturating_duration_since(at)),
                std::mem::take(&mut self.latest)
            );
            tracing::warn!("{summary}");
            self.held = 0;
            self.logged_at = Some(now);
        }
    }

    /// Lines held for the next summary.
    #[cfg(test)]
    pub(crate) fn held(&self) -> u64 {
        self.held
    }
}

/// The map's entries with the client that wrote each, and the bytes (key plus value) held in
/// total and per client. A client is one connection; what it wrote stays after it leaves (a
/// rank's address must outlive its connection) and counts against it until overwritten or
/// deleted.
#[derive(Default)]
pub(crate) struct Entries {
    map: HashMap<String, (Vec<u8>, u64)>,
    total: usize,
    by_client: HashMap<u64, usize>,
}

/// Limits on [`Entries`].
#[derive(Clone, Copy, Debug)]
pub(crate) struct ByteLimits {
    pub(crate) total: usize,
    pub(crate) per_client: usize,
}

impl Entries {
    pub(crate) fn get(&self, key: &str) -> Option<&[u8]> {
        self.map.get(key).map(|(v, _)| v.as_slice())
    }

    pub(crate) fn contains_key(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// Stores `value` at `key` for `client`, or says which limit it would pass (nothing changes
    /// then). Replacing an entry frees its bytes first, whoever wrote it.
    pub(crate) fn put(
        &mut self,
        key: String,
        value: Vec<u8>,
        client: u64,
        limits: ByteLimits,
    ) -> Result<(), String> {
        let size = key.len() + value.len();
        let (freed, freed_from) = match self.map.get(&key) {
            Some((old, owner)) => (key.len() + old.len(), Some(*owner)),
            None => (0, None),
        };
        let total = self.total - freed + size;
        let mine = self.by_client.get(&client).copied().unwrap_or(0)
            - if freed_from == Some(client) { freed } else { 0 };
        if total > limits.total {
            return Err(format!(
                "storing {size} bytes at {key:?} would make the store hold {total} bytes, over \
                 its limit of {}",
                limits.total
            ));
        }
        if mine + size > limits.per_client {
            return Err(format!(
                "storing {size} bytes at {key:?} would make this client's entries {} bytes, \
                 over the limit of {} per client",
                mine + size,
                limits.per_client
            ));
        }
        self.remove(&key);
        self.total += size;
        *self.by_client.entry(client).or_default() += size;
        self.map.insert(key, (value, client));
        Ok(())
    }

    /// Removes `key`; whether it was there.
    pub(crate) fn remove(&mut self, key: &str) -> bool {
        let Some((old, owner)) = self.map.remove(key) else {
            return false;
        };
        let size = key.len() + old.len();
        self.total -= size;
        if let Some(held) = self.by_client.get_mut(&owner) {
            *held -= size;
            if *held == 0 {
                self.by_client.remove(&owner);
            }
        }
        true
    }

    #[cfg(test)]
    pub(crate) fn total(&self) -> usize {
        self.total
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMITS: ByteLimits = ByteLimits {
        total: 100,
        per_client: 40,
    };

    #[test]
    fn bytes_are_counted_per_client_and_freed_on_replace_and_delete() {
        let mut e = Entries::default();
        e.put("a".into(), vec![0; 29], 1, LIMITS).unwrap();
        assert_eq!(e.total(), 30);
        // Client 1 is at 30 of 40: 11 more bytes pass its limit, a replacement of its own
        // entry does not.
        let why = e.put("b".into(), vec![0; 10], 1, LIMITS).unwrap_err();
        assert!(why.contains("over the limit of 40 per client"), "{why}");
        e.put("a".into(), vec![0; 39], 1, LIMITS).unwrap();
        assert_eq!(e.total(), 40);
        // Another client's overwrite frees client 1's bytes.
        e.put("a".into(), vec![0; 9], 2, LIMITS).unwrap();
        e.put("c".into(), vec![0; 39], 1, LIMITS).unwrap();
        assert_eq!(e.total(), 50);
        e.put("d".into(), vec![0; 39], 3, LIMITS).unwrap();
        let why = e.put("e".into(), vec![0; 39], 4, LIMITS).unwrap_err();
        assert!(why.contains("over its limit of 100"), "{why}");
        assert_eq!(e.get("e"), None);
        assert!(e.remove("d") && !e.remove("d"));
        e.put("e".into(), vec![0; 39], 4, LIMITS).unwrap();
        assert_eq!(e.total(), 90);
        assert_eq!(e.get("a"), Some(&[0u8; 9][..]));
    }

    #[test]
    fn a_burst_of_warnings_is_one_line_and_a_summary() {
        let t0 = Instant::now();
        let mut w = Warnings::new("refusals", Duration::from_secs(10));
        w.warn(t0, "first".into());
        for i in 0..1000 {
            w.warn(t0 + Duration::from_millis(i), format!("stranger {i}"));
        }
        assert_eq!(w.held(), 1000);
        w.flush(t0 + Duration::from_secs(5));
        assert_eq!(w.held(), 1000, "summarised before the interval was over");
        w.flush(t0 + Duration::from_secs(10));
        assert_eq!(w.held(), 0);
        // The summary counts as the interval's line.
        w.warn(t0 + Duration::from_secs(11), "next".into());
        assert_eq!(w.held(), 1);
    }
}
