//! Which backend the job uses, decided once for all ranks: every rank describes itself (host,
//! CUDA devices, whether NCCL loads), rank 0 gathers the descriptions, decides, and broadcasts
//! the decision, so ranks never disagree. The gathered table stays available to the caller
//! (batch balancing reads it) and is printed by rank 0 with `RINGLET_DEBUG=1`.

use crate::Communicator;
use ringlet_core::{Error, ReduceOp, Result};
use ringlet_cuda::libs::{self, CudaLib};
use serde::{Deserialize, Serialize};

/// The backend asked for (`RINGLET_BACKEND`, `--backend`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// NCCL when every rank has a CUDA device and NCCL loads everywhere, else TCP.
    Auto,
    Tcp,
    Nccl,
}

impl BackendChoice {
    /// `RINGLET_BACKEND` (`auto`, `tcp`, `nccl`); `auto` when unset.
    pub fn from_env() -> Result<BackendChoice> {
        match std::env::var("RINGLET_BACKEND") {
            Err(_) => Ok(BackendChoice::Auto),
            Ok(v) if v.trim().is_empty() => Ok(BackendChoice::Auto),
            Ok(v) => BackendChoice::parse(&v).ok_or_else(|| {
                Error::Config(format!("RINGLET_BACKEND={v:?} is not auto, tcp or nccl"))
            }),
        }
    }

    pub fn parse(s: &str) -> Option<BackendChoice> {
        match s.trim().to_ascii_lowercase().as_str() {
            "auto" => Some(BackendChoice::Auto),
            "tcp" => Some(BackendChoice::Tcp),
            "nccl" => Some(BackendChoice::Nccl),
            _ => None,
        }
    }
}

/// The backend the job runs on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Backend {
    Tcp,
    Nccl,
}

/// One CUDA device of a rank's host.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Device {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (u32, u32),
    pub total_memory: u64,
    pub pci_bus_id: String,
}

/// What a rank can do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankInfo {
    pub rank: usize,
    pub host: String,
    pub local_rank: usize,
    /// The device this rank would use (its local rank modulo the devices of its host).
    pub device: Option<Device>,
    pub device_count: usize,
    /// Why there is no device, when there is none.
    pub no_device: Option<String>,
    /// Where NCCL was loaded from, or why it could not be.
    pub nccl: std::result::Result<String, String>,
    /// The CUDA versions found where there is a device: the driver's, NVRTC's and cuBLAS's
    /// ("driver 13.0, NVRTC 13.0, cuBLAS 13.1.0"; the files are in each rank's log).
    pub cuda: String,
}

/// The job's capabilities and the decision taken from them.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Topology {
    pub ranks: Vec<RankInfo>,
    pub backend: Backend,
    pub reason: String,
}

/// Bound on the encoded table rank 0 sends (a thousand ranks take about 200 KiB), and on any
/// one decode.
const MAX_TABLE_BYTES: usize = 16 << 20;
/// Bound on one rank's encoded description (about 200 bytes in practice).
const MAX_RANK_BYTES: usize = 64 << 10;

/// This process's description.
pub fn describe(rank: usize, local_rank: usize) -> RankInfo {
    let host = hostname();
    let (device, device_count, no_device) = match ringlet_cuda::devices() {
        Ok(list) if list.is_empty() => (None, 0, Some("the CUDA driver sees no device".into())),
        Ok(list) => {
            let d = &list[local_rank % list.len()];
            let device = Device {
                ordinal: d.ordinal,
                name: d.name.clone(),
                compute_capability: d.compute_capability,
                total_memory: d.total_memory,
                pci_bus_id: d.pci_bus_id.clone(),
            };
            (Some(device), list.len(), None)
        }
        Err(e) => (None, 0, Some(short(e))),
    };
    // NCCL counts only if every entry point we call resolves and it answers its version.
    let nccl = ringlet_cuda::nccl::Api::load()
        .map_err(short)
        .and_then(|api| {
            let (major, minor, patch) = api.version().map_err(|e| e.to_string())?;
            let path = libs::load(CudaLib::Nccl).map_err(short)?;
            Ok(format!("NCCL {major}.{minor}.{patch} ({})", path.display()))
        });
    // Only for the table (loading cuBLAS costs every GPU rank a moment at start-up).
    let debug = std::env::var("RINGLET_DEBUG").is_ok_and(|v| v == "1");
    let cuda = if device.is_some() && debug {
        cuda_versions()
    } else {
        "-".into()
    };
    RankInfo {
        rank,
        host,
        local_rank,
        device,
        device_count,
        no_device,
        nccl,
        cuda,
    }
}

/// "driver 13.0, NVRTC 13.0, cuBLAS 13.1.0", a library missing as "no NVRTC".
fn cuda_versions() -> String {
    [
        (CudaLib::Driver, "driver"),
        (CudaLib::Nvrtc, "NVRTC"),
        (CudaLib::Cublas, "cuBLAS"),
    ]
    .iter()
    .map(|&(lib, name)| match libs::found(lib) {
        Ok(f) => format!("{name} {}", f.version),
        Err(_) => format!("no {name}"),
    })
    .collect::<Vec<_>>()
    .join(", ")
}

/// The reason in a few words (where we looked is in `libs`' error, for one rank at a time).
fn short(e: ringlet_cuda::CudaError) -> String {
    match e {
        ringlet_cuda::CudaError::NoCuda { library, env, .. } => {
            format!("no {library} (set {env} if it is installed somewhere unusual)")
        }
        other => other.to_string(),
    }
}

pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into our buffer.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return "?".into();
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    String::from_utf8_lossy(&buf[..end]).into_owned()
}

/// Rank 0's decision, from every rank's description.
pub fn decide(
    choice: BackendChoice,
    ranks: &[RankInfo],
) -> std::result::Result<(Backend, String), String> {
    let lacking: Vec<String> = ranks
        .iter()
        .filter_map(|r| {
            let shares = |d: &Device| {
                ranks.iter().find(|o| {
                    o.rank != r.rank
                        && o.host == r.host
                        && o.device
                            .as_ref()
                            .is_some_and(|od| od.pci_bus_id == d.pci_bus_id)
                })
            };
            let why = match (&r.no_device, &r.nccl, r.device.as_ref().and_then(shares)) {
                (Some(why), _, _) => why.clone(),
                (None, Err(why), _) => why.clone(),
                // NCCL refuses two ranks on one device.
                (None, Ok(_), Some(other)) => format!(
                    "shares its GPU with rank {} (NCCL needs a GPU per rank)",
                    other.rank
                ),
                (None, Ok(_), None) => return None,
            };
            Some(format!("rank {} ({}): {why}", r.rank, r.host))
        })
        .collect();
    match (choice, lacking.first()) {
        (BackendChoice::Tcp, _) => Ok((Backend::Tcp, "asked for tcp".into())),
        (BackendChoice::Nccl | BackendChoice::Auto, None) => Ok((
            Backend::Nccl,
            "every rank has a CUDA device and NCCL".into(),
        )),
        (BackendChoice::Auto, Some(_)) => Ok((
            Backend::Tcp,
            format!(
                "NCCL cannot serve every rank ({} of {}): {}",
                lacking.len(),
                ranks.len(),
                lacking[0]
            ),
        )),
        (BackendChoice::Nccl, Some(_)) => Err(format!(
            "the NCCL backend was asked for, but {} of {} ranks cannot use it: {}",
            lacking.len(),
            ranks.len(),
            lacking.join("; ")
        )),
    }
}

impl Communicator {
    /// Collective: gathers every rank's [`RankInfo`] on rank 0, which decides the backend for
    /// `choice` and sends the whole [`Topology`] to every rank. An impossible choice (`nccl`
    /// where a rank cannot use it) fails on every rank with the same message.
    pub fn topology(&self, choice: BackendChoice) -> Result<Topology> {
        let me = describe(self.rank(), self.local_rank());
        let mine = encode(&me)?;
        let width = {
            let mut w = [mine.len() as i64];
            self.all_reduce(&mut w, ReduceOp::Max)?;
            // Bounded before it sizes an allocation: a peer's number.
            match usize::try_from(w[0]) {
                Ok(w) if w <= MAX_RANK_BYTES => w + 4,
                _ => {
                    return Err(Error::Config(format!(
                    "a rank announced a device description of {} bytes (at most {MAX_RANK_BYTES})",
                    w[0]
                )))
                }
            }
        };
        let mut block = vec![0u8; width];
        block[..4].copy_from_slice(&(mine.len() as u32).to_le_bytes());
        block[4..4 + mine.len()].copy_from_slice(&mine);
        let mut all = vec![0u8; width * self.world_size()];
        self.all_gather(&block, &mut all)?;
        // Rank 0 decides; the verdict (or its error) travels as one length-prefixed message.
        let verdict: Vec<u8> = if self.rank() == 0 {
            let ranks = all
                .chunks_exact(width)
                .map(|b| {
                    let len = u32::from_le_bytes(b[..4].try_into().expect("4 bytes")) as usize;
                    decode::<RankInfo>(b.get(4..4 + len).unwrap_or_default())
                })
                .collect::<Result<Vec<_>>>()?;
            let outcome = decide(choice, &ranks).map(|(backend, reason)| Topology {
                ranks,
                backend,
                reason,
            });
            encode(&outcome)?
        } else {
            Vec::new()
        };
        let mut len = [verdict.len() as i64];
        self.broadcast(&mut len, 0)?;
        if !(0..=MAX_TABLE_BYTES as i64).contains(&len[0]) {
            return Err(Error::Config(format!(
                "rank 0 announced a device table of {} bytes (at most {MAX_TABLE_BYTES})",
                len[0]
            )));
        }
        let mut verdict = if self.rank() == 0 {
            verdict
        } else {
            vec![0u8; len[0] as usize]
        };
        self.broadcast(&mut verdict, 0)?;
        let topology =
            decode::<std::result::Result<Topology, String>>(&verdict)?.map_err(Error::Config)?;
        if self.rank() == 0 && std::env::var("RINGLET_DEBUG").is_ok_and(|v| v == "1") {
            eprint!("{}", table(&topology));
        }
        Ok(topology)
    }
}

/// The device table, one line per rank.
pub fn table(t: &Topology) -> String {
    let mut out = format!("ringlet: backend {:?} ({})\n", t.backend, t.reason);
    out += &format!(
        "ringlet: {:>4} {:<20} {:>5} {:<24} {:>6} {:>9} {:<13} {:<40} {}\n",
        "rank", "host", "local", "device", "cc", "memory", "pci", "cuda", "nccl"
    );
    for r in &t.ranks {
        let (name, cc, mem, pci) = match &r.device {
            Some(d) => (
                format!("{}: {}", d.ordinal, d.name),
                format!("{}.{}", d.compute_capability.0, d.compute_capability.1),
                format!("{:.1} GiB", d.total_memory as f64 / (1u64 << 30) as f64),
                d.pci_bus_id.clone(),
            ),
            None => ("none".into(), "-".into(), "-".into(), "-".into()),
        };
        let nccl = match &r.nccl {
            Ok(path) => path.clone(),
            Err(_) => "no".into(),
        };
        out += &format!(
            "ringlet: {:>4} {:<20} {:>5} {:<24} {:>6} {:>9} {:<13} {:<40} {}\n",
            r.rank, r.host, r.local_rank, name, cc, mem, pci, r.cuda, nccl
        );
    }
    out
}

fn encode<T: Serialize>(v: &T) -> Result<Vec<u8>> {
    bincode::serde::encode_to_vec(v, bincode::config::standard())
        .map_err(|e| Error::Config(format!("encoding the device table: {e}")))
}

fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T> {
    bincode::serde::decode_from_slice(
        bytes,
        bincode::config::standard().with_limit::<MAX_TABLE_BYTES>(),
    )
    .map(|(v, _)| v)
    .map_err(|e| Error::Config(format!("a rank's device table is malformed: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(rank: usize, device: bool, nccl: bool) -> RankInfo {
        RankInfo {
            rank,
            host: format!("node{rank}"),
            local_rank: 0,
            device: device.then(|| Device {
                ordinal: 0,
                name: "GPU".into(),
                compute_capability: (8, 0),
                total_memory: 80 << 30,
                pci_bus_id: "00000000:3b:00.0".into(),
            }),
            device_count: device as usize,
            no_device: (!device).then(|| "no CUDA: libcuda.so.1 was not found".into()),
            nccl: if nccl {
                Ok("libnccl.so.2".into())
            } else {
                Err("no NCCL".into())
            },
            cuda: if device {
                "driver 13.0, NVRTC 13.0, cuBLAS 13.1.0".into()
            } else {
                "-".into()
            },
        }
    }

    #[test]
    fn nccl_only_when_every_rank_can_use_it() {
        let all = [info(0, true, true), info(1, true, true)];
        assert_eq!(decide(BackendChoice::Auto, &all).unwrap().0, Backend::Nccl);
        assert_eq!(decide(BackendChoice::Tcp, &all).unwrap().0, Backend::Tcp);
        let mixed = [
            info(0, true, true),
            info(1, false, false),
            info(2, true, false),
        ];
        let (b, why) = decide(BackendChoice::Auto, &mixed).unwrap();
        assert_eq!(b, Backend::Tcp);
        assert!(
            why.contains("2 of 3") && why.contains("rank 1 (node1)"),
            "{why}"
        );
        // Two ranks of one host on one GPU: NCCL would refuse them.
        let mut shared = [info(0, true, true), info(1, true, true)];
        shared[1].host = shared[0].host.clone();
        let (b, why) = decide(BackendChoice::Auto, &shared).unwrap();
        assert_eq!(b, Backend::Tcp);
        assert!(why.contains("shares its GPU with rank 1"), "{why}");
        let e = decide(BackendChoice::Nccl, &mixed).unwrap_err();
        assert!(
            e.contains("rank 1 (node1): no CUDA") && e.contains("rank 2 (node2): no NCCL"),
            "{e}"
        );
    }

    #[test]
    fn the_table_round_trips_and_prints_a_line_per_rank() {
        let t = Topology {
            ranks: vec![info(0, true, true), info(1, false, false)],
            backend: Backend::Tcp,
            reason: "test".into(),
        };
        let back: Topology = decode(&encode(&t).unwrap()).unwrap();
        assert_eq!(back, t);
        let text = table(&t);
        assert_eq!(text.lines().count(), 4, "{text}");
        assert!(
            text.contains("0: GPU") && text.contains("80.0 GiB") && text.contains("none"),
            "{text}"
        );
        assert!(
            text.contains("cuda") && text.contains("driver 13.0, NVRTC 13.0, cuBLAS 13.1.0"),
            "{text}"
        );
        assert!(decode::<Topology>(&[0xff; 7]).is_err());
    }
}
