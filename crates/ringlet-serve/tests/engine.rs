//! The Redis Streams engine on a real `redis-server`, step by step: what a slow replica's commit
//! does once another replica has taken its records over.

mod common;

use common::{entries, Redis};
use ringlet_serve::engine::{Outcome, StreamEngine};
use ringlet_serve::redis_streams::{RedisStreams, Streams};
use std::time::Duration;

fn replica(redis: &Redis, name: &str) -> RedisStreams {
    let streams = Streams {
        input: "records".into(),
        output: "predictions".into(),
        dead_letter: "dead".into(),
        group: "g".into(),
        consumer: name.into(),
    };
    RedisStreams::connect(&redis.url(), streams, Duration::from_secs(5)).unwrap()
}

fn results(ids: &[String], by: &str) -> Vec<Outcome> {
    ids.iter()
        .map(|id| Outcome {
            id: id.clone(),
            fields: vec![("by".into(), by.into())],
        })
        .collect()
}

/// Replica a reads 10 records and stalls; b takes 4 of them over as stale and commits them;
/// a's late commit then writes only the 6 still its own and reports 4 lost. Every record has
/// exactly one result, by the replica that held it at commit.
#[test]
fn a_slow_replicas_commit_writes_nothing_for_records_taken_over() {
    let Some(redis) = Redis::start() else { return };
    let (mut a, mut b) = (replica(&redis, "a"), replica(&redis, "b"));
    let mut conn = redis.conn();
    for i in 0..10 {
        let _: String = redis::cmd("XADD")
            .arg("records")
            .arg("*")
            .arg("n")
            .arg(i)
            .query(&mut conn)
            .unwrap();
    }
    let held: Vec<String> = a
        .read(10, Duration::from_millis(100))
        .unwrap()
        .into_iter()
        .map(|r| r.id)
        .collect();
    assert_eq!(held.len(), 10);
    std::thread::sleep(Duration::from_millis(30));
    let taken: Vec<String> = b
        .claim_stale(4, Duration::from_millis(20))
        .unwrap()
        .into_iter()
        .map(|r| {
            assert_eq!(r.deliveries, 2, "{}", r.id);
            r.id
        })
        .collect();
    assert_eq!(taken, held[..4]);
    let by_b = b.commit(&results(&taken, "b"), &[]).unwrap();
    assert_eq!((by_b.written, by_b.lost), (4, 0));
    let by_a = a.commit(&results(&held, "a"), &[]).unwrap();
    assert_eq!((by_a.written, by_a.dead, by_a.lost), (6, 0, 4));
    // A commit repeated (a retry after a lost reply, say) writes nothing again.
    let again = a.commit(&results(&held, "a"), &[]).unwrap();
    assert_eq!((again.written, again.lost), (0, 10));

    let out = entries(&mut conn, "predictions");
    assert_eq!(out.len(), 10);
    for (_, f) in &out {
        let want = if taken.contains(&f["id"]) { "b" } else { "a" };
        assert_eq!(f["by"], want, "{f:?}");
    }
    let pending: Vec<redis::Value> = redis::cmd("XPENDING")
        .arg("records")
        .arg("g")
        .arg("-")
        .arg("+")
        .arg(100)
        .query(&mut conn)
        .unwrap();
    assert!(pending.is_empty(), "{pending:?}");
}
