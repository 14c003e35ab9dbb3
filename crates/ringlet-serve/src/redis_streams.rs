//! [`StreamEngine`] on Redis Streams: a consumer group on the input stream (made with
//! `MKSTREAM` if missing), `XREADGROUP` for new records, `XAUTOCLAIM` for a dead consumer's, and
//! a Lua script (atomic in Redis) that writes each result and acknowledges its record only while
//! the record is still pending for this consumer.

use crate::engine::{Committed, EngineError, Outcome, Record, Result, StreamEngine};
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use redis::Value;
use std::time::Duration;

/// Where the service reads and writes.
#[derive(Clone, Debug)]
pub struct Streams {
    pub input: String,
    pub output: String,
    pub dead_letter: String,
    pub group: String,
    pub consumer: String,
}

pub struct RedisStreams {
    url: String,
    client: redis::Client,
    timeout: Duration,
    conn: redis::Connection,
    streams: Streams,
    commit: redis::Script,
    /// Where the next `XAUTOCLAIM` scan starts.
    claim_cursor: String,
}

/// KEYS: input, output, dead letters. ARGV: group, consumer, outputs count, the batch's lowest
/// and highest record id and how many pending entries to list between them, then per result its
/// record id, field count and fields (outputs first, then dead letters). A result is written and
/// its record acknowledged only if the record is pending for this consumer: one that another
/// consumer claimed meanwhile is left to it.
const COMMIT: &str = r#"
local group, consumer = ARGV[1], ARGV[2]
local outputs = tonumber(ARGV[3])
local lo, hi = ARGV[4], ARGV[5]
-- This consumer's pending records in the batch's id range, in one call: its own records in
-- flight are only this batch's, so the count bounds the reply.
local mine = {}
for _, p in ipairs(redis.call('XPENDING', KEYS[1], group, lo, hi, tonumber(ARGV[6]), consumer)) do
  mine[p[1]] = true
end
local i, n, written, dead, lost = 7, 0, 0, 0, 0
local acks = {}
while i <= #ARGV do
  local id, count = ARGV[i], tonumber(ARGV[i + 1])
  if mine[id] then
    mine[id] = nil
    local target = KEYS[2]
    if n >= outputs then target = KEYS[3]; dead = dead + 1 else written = written + 1 end
    redis.call('XADD', target, '*', 'id', id, unpack(ARGV, i + 2, i + 1 + count * 2))
    acks[#acks + 1] = id
  else
    lost = lost + 1
  end
  n = n + 1
  i = i + 2 + count * 2
end
-- In slices: Lua's unpack holds a few thousand values at most.
for k = 1, #acks, 1000 do
  redis.call('XACK', KEYS[1], group, unpack(acks, k, math.min(k + 999, #acks)))
end
local t = redis.call('TIME')
return {written, dead, lost, tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)}
"#;

impl RedisStreams {
    /// Connects (within `timeout`, which also bounds every later reply beyond a read's own wait)
    /// and makes the group if it does not exist.
    pub fn connect(url: &str, streams: Streams, timeout: Duration) -> Result<RedisStreams> {
        let fail = |what: String| EngineError::Failed {
            endpoint: url.to_string(),
            what,
        };
        let client = redis::Client::open(url).map_err(|e| fail(format!("bad address: {e}")))?;
        let conn = open(&client, timeout).map_err(|e| fail(format!("cannot connect: {e}")))?;
        let mut engine = RedisStreams {
            url: url.to_string(),
            client,
            timeout,
            conn,
            streams,
            commit: redis::Script::new(COMMIT),
            claim_cursor: "0-0".into(),
        };
        let made: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(&engine.streams.input)
            .arg(&engine.streams.group)
            .arg("0")
            .arg("MKSTREAM")
            .query(&mut engine.conn);
        match made {
            Ok(()) => {}
            Err(e) if e.code() == Some("BUSYGROUP") => {}
            Err(e) => return Err(engine.fail("making the consumer group", e)),
        }
        Ok(engine)
    }

    /// `op` on the connection; after an I/O failure (a signal interrupting a blocked read, say
    /// SIGSTOP and SIGCONT, or a dropped connection) once more on a new connection. Retrying is
    /// safe: records a lost read handed out stay pending and are taken over (by this replica
    /// too) after the idle time, and a commit that did run finds its records no longer pending.
    fn retried<T>(
        &mut self,
        doing: &str,
        mut op: impl FnMut(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T> {
        match op(&mut self.conn) {
            Err(e) if e.is_io_error() => {
                tracing::info!("{doing}: {e}; connecting again");
                self.conn = open(&self.client, self.timeout).map_err(|e| self.fail(doing, e))?;
                op(&mut self.conn).map_err(|e| self.fail(doing, e))
            }
            r => r.map_err(|e| self.fail(doing, e)),
        }
    }

    fn fail(&self, doing: &str, e: redis::RedisError) -> EngineError {
        EngineError::Failed {
            endpoint: self.url.clone(),
            what: format!("{doing}: {e}"),
        }
    }

    fn records(ids: Vec<StreamId>) -> Vec<Record> {
        ids.into_iter()
            .map(|s| Record {
                deliveries: 1,
                id: s.id,
                fields: s
                    .map
                    .into_iter()
                    .map(|(k, v)| {
                        let bytes = match v {
                            Value::BulkString(b) => b,
                            Value::SimpleString(s) => s.into_bytes(),
                            other => format!("{other:?}").into_bytes(),
                        };
                        (k, bytes)
                    })
                    .collect(),
            })
            .collect()
    }
}

impl StreamEngine for RedisStreams {
    fn read(&mut self, max: usize, wait: Duration) -> Result<Vec<Record>> {
        let s = self.streams.clone();
        // BLOCK 0 would wait forever: at least 1 ms.
        let block = wait.as_millis().clamp(1, u32::MAX as u128) as u64;
        let mut cmd = redis::cmd("XREADGROUP");
        cmd.arg("GROUP")
            .arg(&s.group)
            .arg(&s.consumer)
            .arg("COUNT")
            .arg(max.max(1))
            .arg("BLOCK")
            .arg(block)
            .arg("STREAMS")
            .arg(&s.input)
            .arg(">");
        let reply: Option<StreamReadReply> = self.retried("reading records", |c| cmd.query(c))?;
        Ok(reply
            .map(|r| {
                r.keys
                    .into_iter()
                    .flat_map(|k| Self::records(k.ids))
                    .collect()
            })
            .unwrap_or_default())
    }

    fn claim_stale(&mut self, max: usize, idle: Duration) -> Result<Vec<Record>> {
        let s = &self.streams;
        let mut cmd = redis::cmd("XAUTOCLAIM");
        cmd.arg(&s.input)
            .arg(&s.group)
            .arg(&s.consumer)
            .arg(idle.as_millis() as u64)
            .arg(&self.claim_cursor)
            .arg("COUNT")
            .arg(max.max(1));
        let reply: StreamAutoClaimReply =
            self.retried("claiming stale records", |c| cmd.query(c))?;
        self.claim_cursor = reply.next_stream_id;
        let mut records = Self::records(reply.claimed);
        // How often each was handed out (a rare path: only records a dead replica left).
        for r in &mut records {
            let mut cmd = redis::cmd("XPENDING");
            cmd.arg(&self.streams.input)
                .arg(&self.streams.group)
                .arg(&r.id)
                .arg(&r.id)
                .arg(1);
            let entry: Vec<(String, String, u64, u64)> =
                self.retried("reading delivery counts", |c| cmd.query(c))?;
            r.deliveries = entry.first().map_or(1, |e| e.3);
        }
        Ok(records)
    }

    fn another(&self) -> Result<Box<dyn StreamEngine + Send>> {
        let engine = RedisStreams::connect(&self.url, self.streams.clone(), self.timeout)?;
        Ok(Box::new(engine))
    }

    fn commit(&mut self, outputs: &[Outcome], dead: &[Outcome]) -> Result<Committed> {
        if outputs.is_empty() && dead.is_empty() {
            return Ok(Committed {
                written: 0,
                dead: 0,
                lost: 0,
                at_ms: 0,
            });
        }
        let (s, script) = (self.streams.clone(), self.commit.clone());
        let mut inv = script.prepare_invoke();
        inv.key(&s.input).key(&s.output).key(&s.dead_letter);
        // The batch's id range (ids compare as <milliseconds>-<sequence> number pairs).
        let key = |id: &str| -> (u64, u64) {
            let (a, b) = id.split_once('-').unwrap_or((id, "0"));
            (a.parse().unwrap_or(0), b.parse().unwrap_or(0))
        };
        let all = || outputs.iter().chain(dead).map(|o| o.id.as_str());
        let lo = all().min_by_key(|id| key(id)).expect("not empty");
        let hi = all().max_by_key(|id| key(id)).expect("not empty");
        let n = outputs.len() + dead.len();
        inv.arg(&s.group).arg(&s.consumer).arg(outputs.len());
        inv.arg(lo)
            .arg(hi)
            .arg(n.saturating_mul(4).saturating_add(1024));
        for o in outputs.iter().chain(dead) {
            inv.arg(&o.id).arg(o.fields.len());
            for (k, v) in &o.fields {
                inv.arg(k).arg(v);
            }
        }
        let (written, dead, lost, at_ms): (usize, usize, usize, u64) =
            self.retried("writing results", |c| inv.invoke(c))?;
        Ok(Committed {
            written,
            dead,
            lost,
            at_ms,
        })
    }
}

/// A connection whose every reply is bounded by `timeout`.
fn open(client: &redis::Client, timeout: Duration) -> redis::RedisResult<redis::Connection> {
    let conn = client.get_connection_with_timeout(timeout)?;
    conn.set_write_timeout(Some(timeout))?;
    conn.set_read_timeout(Some(timeout))?;
    Ok(conn)
}
