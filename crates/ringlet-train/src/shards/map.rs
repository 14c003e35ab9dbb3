//! The shard map (which hosts hold local copies of which shards) and a job's layout over its
//! hosts.

use super::{bad, read_bounded, Sharded, MAX_INDEX_BYTES};
use crate::data::DataError;
use ringlet_ddp::locality::ShardLayout;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// One host's entry of a shard map.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostShards {
    pub dir: PathBuf,
    /// Training shards held: inclusive ranges, ascending and apart (as long as the map's
    /// text at most, whatever numbers it names).
    pub shards: Vec<(usize, usize)>,
    pub test: bool,
}

impl HostShards {
    /// Whether training shard `s` is held.
    pub fn holds(&self, s: usize) -> bool {
        let i = self.shards.partition_point(|&(a, _)| a <= s);
        i > 0 && s <= self.shards[i - 1].1
    }
}

/// Which hosts hold local copies of which shards.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ShardMap {
    pub hosts: BTreeMap<String, HostShards>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct MapFile {
    hosts: BTreeMap<String, HostFile>,
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct HostFile {
    dir: PathBuf,
    shards: String,
}

impl ShardMap {
    /// Reads a map for a dataset of `count` training shards.
    pub fn read(path: &Path, count: usize, deadline: Duration) -> Result<ShardMap, DataError> {
        let bytes = read_bounded(path, MAX_INDEX_BYTES, deadline)?;
        let file: MapFile = serde_json::from_slice(&bytes)
            .map_err(|e| bad(path, format!("not a shard map: {e}")))?;
        let mut hosts = BTreeMap::new();
        for (name, h) in file.hosts {
            let (shards, test) = parse_shards(&h.shards, count)
                .map_err(|why| bad(path, format!("host {name:?}: {why}")))?;
            hosts.insert(
                name,
                HostShards {
                    dir: h.dir,
                    shards,
                    test,
                },
            );
        }
        Ok(ShardMap { hosts })
    }

    /// Whether `host` holds training shard `s` locally.
    pub fn holds(&self, host: &str, s: usize) -> bool {
        self.hosts.get(host).is_some_and(|h| h.holds(s))
    }
}

/// `"0-3,7,test"` or `"all"` (with the test set): shard numbers below `count`, as merged
/// inclusive ranges.
pub fn parse_shards(spec: &str, count: usize) -> Result<(Vec<(usize, usize)>, bool), String> {
    if spec.trim() == "all" {
        return Ok((vec![(0, count.saturating_sub(1))], true));
    }
    let (mut out, mut test) = (Vec::new(), false);
    for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if part == "test" {
            test = true;
            continue;
        }
        let num = |s: &str| {
            s.trim()
                .parse::<usize>()
                .ok()
                .filter(|&v| v < count)
                .ok_or_else(|| format!("{s:?} is not a shard number below {count}"))
        };
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(part)?, num(part)?),
        };
        if a > b {
            return Err(format!("range {part:?} runs backwards"));
        }
        out.push((a, b));
    }
    out.sort_unstable();
    let mut merged: Vec<(usize, usize)> = Vec::with_capacity(out.len());
    for (a, b) in out {
        match merged.last_mut() {
            Some(last) if a <= last.1.saturating_add(1) => last.1 = last.1.max(b),
            _ => merged.push((a, b)),
        }
    }
    Ok((merged, test))
}

impl Sharded {
    /// The layout of a job whose rank r runs on host `rank_hosts[r]`, and the training shards
    /// host `me` reads. Hosts are numbered in order of their lowest rank. A shard no host of the
    /// job holds (an orphan) is read from `dir` by one host, taken in turn; the orphans are
    /// returned too, so that the job can say so.
    pub fn layout(
        &self,
        rank_hosts: &[String],
        me: &str,
    ) -> Result<(ShardLayout, Vec<usize>, Vec<usize>), DataError> {
        let mut names: Vec<String> = Vec::new();
        let mut rank_host = Vec::with_capacity(rank_hosts.len());
        for h in rank_hosts {
            let i = names.iter().position(|n| n == h).unwrap_or_else(|| {
                names.push(h.clone());
                names.len() - 1
            });
            rank_host.push(i);
        }
        let Some(map) = &self.map else {
            return Err(bad(
                &self.dir,
                "data locality needs a shard map (--shard-map)".into(),
            ));
        };
        // A host the map does not name would read everything from the shared copy: most likely
        // a --data-host that does not match the map's names.
        if let Some(h) = names.iter().find(|h| !map.hosts.contains_key(h.as_str())) {
            let rank = rank_hosts
                .iter()
                .position(|r| r == h)
                .expect("named by a rank");
            let known: Vec<&str> = map.hosts.keys().take(8).map(String::as_str).collect();
            return Err(bad(
                &self.dir,
                format!(
                    "data host {h:?} (rank {rank}) is not in the shard map, which names {}{}: set --data-host (RINGLET_DATA_HOST) to its name there",
                    known.join(", "),
                    if map.hosts.len() > known.len() { ", ..." } else { "" }
                ),
            ));
        }
        let mut orphans = Vec::new();
        let holders: Vec<Vec<usize>> = (0..self.index.train.len())
            .map(|s| {
                let hs: Vec<usize> = (0..names.len())
                    .filter(|&h| map.holds(&names[h], s))
                    .collect();
                if !hs.is_empty() {
                    return hs;
                }
                orphans.push(s);
                vec![(orphans.len() - 1) % names.len()]
            })
            .collect();
        let me = names.iter().position(|n| n == me);
        let wanted = (0..holders.len())
            .filter(|&s| me.is_some_and(|m| holders[s].contains(&m)))
            .collect();
        let layout = ShardLayout::new(&self.index.sizes(), holders, rank_host, names)
            .map_err(|e| bad(&self.dir, e.to_string()))?;
        Ok((layout, wanted, orphans))
    }
}

#[cfg(test)]
mod tests {
    use super::super::{convert, tests::tmp, tests::T};
    use super::*;

    #[test]
    fn layouts_follow_the_map_and_orphans_are_read_remotely_in_turn() {
        let data = crate::data::load("synthetic:100").unwrap();
        let dir = tmp("layout");
        let index = convert(&data, &dir, 10).unwrap();
        let map = ShardMap {
            hosts: [("a", "0-3"), ("b", "2-5,test"), ("elsewhere", "6-7")]
                .into_iter()
                .map(|(h, s)| {
                    let (shards, test) = parse_shards(s, 10).unwrap();
                    (
                        h.to_string(),
                        HostShards {
                            dir: dir.clone(),
                            shards,
                            test,
                        },
                    )
                })
                .collect(),
        };
        let sharded = Sharded {
            dir: dir.clone(),
            index,
            map: Some(map),
        };
        let hosts = ["b", "a", "b"].map(String::from);
        // Hosts by lowest rank: b = 0, a = 1. Shards 6-9 have no holder in this job: b reads
        // 6 and 8, a reads 7 and 9.
        let (layout, wanted_b, orphans) = sharded.layout(&hosts, "b").unwrap();
        assert_eq!(orphans, vec![6, 7, 8, 9]);
        assert_eq!(wanted_b, vec![2, 3, 4, 5, 6, 8]);
        assert_eq!(
            sharded.layout(&hosts, "a").unwrap().1,
            vec![0, 1, 2, 3, 7, 9]
        );
        assert_eq!(layout.len(), 100);
        let (data_b, stats) = sharded.load("b", &wanted_b, T).unwrap();
        // 2-5 and the test set from b's copy; the orphans from the shared directory.
        assert_eq!((stats.local_files, stats.remote_files), (5, 2));
        assert_eq!(data_b.train_y.len(), 60);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn shard_lists_parse_and_bad_ones_are_refused() {
        assert_eq!(
            parse_shards("0-2, 7,test,1,3", 8),
            Ok((vec![(0, 3), (7, 7)], true))
        );
        assert_eq!(parse_shards("all", 3), Ok((vec![(0, 2)], true)));
        let (held, _) = parse_shards("1-2,5", 8).unwrap();
        let h = HostShards {
            dir: "/x".into(),
            shards: held,
            test: false,
        };
        let holds: Vec<usize> = (0..8).filter(|&s| h.holds(s)).collect();
        assert_eq!(holds, vec![1, 2, 5]);
        assert_eq!(parse_shards("", 3), Ok((vec![], false)));
        for bad in ["8", "3-1", "a", "0-99999999999999999999999", "-1"] {
            assert!(parse_shards(bad, 8).is_err(), "{bad}");
        }
    }
}
