//! How the MLP trainer sums its gradients over the ranks, decided once for the whole job.
//!
//! - **NCCL on device buffers**: every rank trains on a GPU, NCCL loads on every rank, no rank
//!   forces a path and `RINGLET_BACKEND` is not `tcp`. The gradient buffer has one slot more
//!   than the gradient, where the rank's loss sum is written before backward; one in-place
//!   all-reduce sums both and one float is read back. The gradient is never copied.
//! - **The TCP ring** otherwise. Each rank takes its own way, but all issue the same collectives
//!   (the buckets of [`plan_buckets`], in bucket order, each an f32 `Sum` all-reduce of the
//!   bucket's elements plus the loss in bucket 0), so they meet in every one:
//!   - *host buckets* (CPU ranks): [`GradSync`], each layer's gradient read into its bucket as
//!     backward produces it and each bucket's asynchronous all-reduce started once it is full,
//!     overlapping backward;
//!   - *device buckets* (GPU ranks): once backward is queued, bucket by bucket, a
//!     device-to-device copy into a bucket buffer, [`Backend::all_reduce_tcp`] (staged through
//!     pinned host blocks; `Communicator::all_reduce_device` makes the call, schedule and frames
//!     a host buffer of its length makes, small-message rule included) and a copy back. With a
//!     single bucket the gradient buffer and its loss slot are the bucket: no copies. These
//!     all-reduces block the calling thread, so they run after backward is queued rather than
//!     from its callback, where they would hold back the queueing of the layers below instead of
//!     overlapping them.
//! - **One rank**: nothing is summed and nothing copied.
//!
//! `RINGLET_GRAD_PATH` (`auto`, the default; `host`; `device`) forces a rank's TCP way — for
//! tests and comparisons; on a CPU rank `device` runs the device-bucket code on host buffers. A
//! rank forcing either rules NCCL out for the whole job.
//!
//! Every rank contributes one byte (on a device, NCCL loads, forced way, `RINGLET_BACKEND`) to an
//! all-gather and decides from the same table, so ranks never disagree.

use crate::model::{Layer, Mlp, Workspace};
use crate::tensor::{Backend, DeviceCollective};
use ringlet::topology::BackendChoice;
use ringlet::{Communicator, Error};
use ringlet_ddp::grad_sync::{plan_buckets, Bucket, SyncStats};
use ringlet_ddp::{agree, GradSync, ParamSpec, SyncOptions};
use std::ops::Range;
use std::time::Instant;

/// The variable that forces a rank's way to the TCP ring.
pub const ENV: &str = "RINGLET_GRAD_PATH";

/// `RINGLET_GRAD_PATH`: this rank's way, or `Auto` for the default decision.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Choice {
    #[default]
    Auto,
    /// Host buckets overlapped with backward.
    Host,
    /// Device buffers bucket by bucket (on a CPU: the same code on host buffers).
    Device,
}

impl Choice {
    /// `RINGLET_GRAD_PATH`, `Auto` when unset or empty.
    pub fn from_env() -> Result<Choice, String> {
        match std::env::var(ENV) {
            Err(_) => Ok(Choice::Auto),
            Ok(v) => {
                Choice::parse(&v).ok_or_else(|| format!("{ENV}={v:?} is not auto, host or device"))
            }
        }
    }

    pub fn parse(s: &str) -> Option<Choice> {
        match s.trim().to_ascii_lowercase().as_str() {
            "" | "auto" => Some(Choice::Auto),
            "host" => Some(Choice::Host),
            "device" => Some(Choice::Device),
            _ => None,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Choice::Auto => "auto",
            Choice::Host => "host",
            Choice::Device => "device",
        }
    }
}

/// What one rank does each step.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// One rank: nothing to sum.
    None,
    Nccl,
    DeviceBuckets,
    HostBuckets,
}

impl Path {
    /// As the run's summary names it.
    pub fn name(self) -> &'static str {
        match self {
            Path::None => "none",
            Path::Nccl => "nccl",
            Path::DeviceBuckets => "tcp-device-buckets",
            Path::HostBuckets => "tcp-host-buckets",
        }
    }
}

/// What one rank brings to the decision (one byte on the wire).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RankTraits {
    /// Its buffers are in device memory.
    pub on_device: bool,
    /// NCCL loads (only asked of ranks on a device).
    pub nccl: bool,
    pub forced: Choice,
    /// Its `RINGLET_BACKEND`.
    pub backend: BackendChoice,
    /// Another rank computes on the same GPU (same host, same PCI bus id): NCCL refuses two
    /// ranks on one device. Not in the byte: found from every rank's device key.
    pub shares_gpu: bool,
}

impl RankTraits {
    fn encode(self) -> u8 {
        let forced = match self.forced {
            Choice::Auto => 0,
            Choice::Host => 1,
            Choice::Device => 2,
        };
        let backend = match self.backend {
            BackendChoice::Auto => 0,
            BackendChoice::Tcp => 1,
            BackendChoice::Nccl => 2,
        };
        u8::from(self.on_device) | u8::from(self.nccl) << 1 | forced << 2 | backend << 4
    }

    fn decode(b: u8) -> RankTraits {
        RankTraits {
            on_device: b & 1 != 0,
            nccl: b & 2 != 0,
            forced: match (b >> 2) & 3 {
                1 => Choice::Host,
                2 => Choice::Device,
                _ => Choice::Auto,
            },
            backend: match (b >> 4) & 3 {
                1 => BackendChoice::Tcp,
                2 => BackendChoice::Nccl,
                _ => BackendChoice::Auto,
            },
            shares_gpu: false,
        }
    }
}

/// A rank's device as a number every rank compares: FNV-1a of its host and the device's PCI bus
/// id (stable across processes and builds); 0 for a rank on the CPU.
fn device_key(host: &str, device: Option<&str>) -> i64 {
    let Some(device) = device else { return 0 };
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in host.bytes().chain([0]).chain(device.bytes()) {
        h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
    }
    // Never 0, the CPU's key.
    (h | 1) as i64
}

/// Marks the ranks whose device key another rank has too.
fn mark_shared(ranks: &mut [RankTraits], keys: &[i64]) {
    for (r, t) in ranks.iter_mut().enumerate() {
        t.shares_gpu = keys[r] != 0 && keys.iter().filter(|&&k| k == keys[r]).count() > 1;
    }
}

/// The job's decision: every rank's path and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub paths: Vec<Path>,
    pub reason: String,
}

/// The decision from every rank's traits (rank order). An impossible demand (`RINGLET_BACKEND=
/// nccl` where a rank cannot use it, or ranks asking for different backends) is an error, the
/// same on every rank.
pub fn decide(ranks: &[RankTraits]) -> Result<Decision, String> {
    let n = ranks.len();
    if n <= 1 {
        return Ok(Decision {
            paths: vec![Path::None; n],
            reason: "one rank".into(),
        });
    }
    let asking =
        |c: BackendChoice| -> Vec<usize> { (0..n).filter(|&r| ranks[r].backend == c).collect() };
    let (tcp, nccl) = (asking(BackendChoice::Tcp), asking(BackendChoice::Nccl));
    if !tcp.is_empty() && !nccl.is_empty() {
        return Err(format!(
            "ranks disagree on RINGLET_BACKEND: tcp on {}, nccl on {}",
            list(&tcp),
            list(&nccl)
        ));
    }
    let lacking: Vec<String> = ranks
        .iter()
        .enumerate()
        .filter_map(|(r, t)| {
            let why = if !t.on_device {
                "trains on the CPU".to_string()
            } else if t.forced != Choice::Auto {
                format!("sets {ENV}={}", t.forced.name())
            } else if !t.nccl {
                "cannot load NCCL".to_string()
            } else if t.shares_gpu {
                "shares its GPU with another rank (NCCL needs a GPU per rank)".to_string()
            } else {
                return None;
            };
            Some(format!("rank {r} {why}"))
        })
        .collect();
    let reason = match (tcp.is_empty(), nccl.is_empty(), lacking.is_empty()) {
        (false, _, _) => "RINGLET_BACKEND=tcp".to_string(),
        (true, _, true) => {
            return Ok(Decision {
                paths: vec![Path::Nccl; n],
                reason: "every rank trains on a GPU with NCCL".into(),
            })
        }
        (true, false, false) => {
            return Err(format!(
                "RINGLET_BACKEND=nccl, but {} of {n} ranks cannot use NCCL for the gradients: {}",
                lacking.len(),
                few(&lacking)
            ))
        }
        (true, true, false) => format!("no NCCL for every rank: {}", few(&lacking)),
    };
    let paths = ranks
        .iter()
        .map(|t| match (t.forced, t.on_device) {
            (Choice::Host, _) | (Choice::Auto, false) => Path::HostBuckets,
            (Choice::Device, _) | (Choice::Auto, true) => Path::DeviceBuckets,
        })
        .collect();
    Ok(Decision { paths, reason })
}

/// The first few reasons (a line stays readable with a thousand CPU ranks).
fn few(reasons: &[String]) -> String {
    let more = match reasons.len() {
        0..=4 => String::new(),
        n => format!("; and {} more", n - 4),
    };
    format!("{}{more}", reasons[..reasons.len().min(4)].join("; "))
}

/// "rank 2" or "ranks 0,1".
fn list(ranks: &[usize]) -> String {
    let s: Vec<String> = ranks.iter().map(|r| r.to_string()).collect();
    let plural = if ranks.len() == 1 { "rank" } else { "ranks" };
    format!("{plural} {}", s.join(","))
}

/// Rank 0's start-up line, such as "gradient sync: TCP ring (...); ranks 0,1 stage device
/// buffers through pinned host blocks, rank 2 host buckets overlapped with backward".
pub fn describe(d: &Decision, ranks: &[RankTraits], overlap: bool) -> String {
    let n = d.paths.len();
    match d.paths.first() {
        None | Some(Path::None) => return "gradient sync: none (one rank)".into(),
        Some(Path::Nccl) => {
            return format!("gradient sync: NCCL on device buffers ({n} GPU ranks)")
        }
        _ => {}
    }
    let mut groups: Vec<(&str, Vec<usize>)> = Vec::new();
    for (r, (p, t)) in d.paths.iter().zip(ranks).enumerate() {
        let label = match (p, t.on_device) {
            (Path::DeviceBuckets, true) => "stage device buffers through pinned host blocks",
            (Path::DeviceBuckets, false) => {
                "sum host buffers bucket by bucket after backward (the device way)"
            }
            (_, false) if overlap => "host buckets overlapped with backward",
            (_, false) => "host buckets after backward",
            (_, true) if overlap => {
                "host buckets overlapped with backward (read from the GPU layer by layer)"
            }
            (_, true) => "host buckets after backward (read from the GPU layer by layer)",
        };
        match groups.iter_mut().find(|(l, _)| *l == label) {
            Some((_, rs)) => rs.push(r),
            None => groups.push((label, vec![r])),
        }
    }
    let parts: Vec<String> = groups
        .iter()
        .map(|(l, rs)| format!("{} {l}", list(rs)))
        .collect();
    format!(
        "gradient sync: TCP ring ({}); {}",
        d.reason,
        parts.join(", ")
    )
}

/// One rank's gradient sum, each step: [`backward`](Self::backward), then
/// [`finish`](Self::finish).
pub struct GradPath<'c, B: Backend> {
    path: Path,
    how: How<'c, B>,
    /// Elements of the gradient (the gradient buffer may hold one more: the loss slot).
    count: usize,
    /// Bytes each step all-reduces (gradient and loss; 0 on one rank).
    bytes: usize,
    /// This step's local loss sum.
    loss: f32,
}

enum How<'c, B: Backend> {
    None,
    Nccl(Box<dyn DeviceCollective<B::Buf>>),
    /// `bufs` empty: one bucket, summed in place in the gradient buffer.
    Device {
        comm: &'c Communicator,
        plan: Vec<Bucket>,
        bufs: Vec<B::Buf>,
    },
    /// Boxed: it is much larger than the other ways' state.
    Host {
        sync: Box<GradSync<'c>>,
        ranges: Vec<Range<usize>>,
    },
}

impl<'c, B: Backend> GradPath<'c, B> {
    /// Decides the job's way (collective: every rank calls it at the same point) and prepares
    /// this rank's. `opts` as for [`GradSync`]; one scalar, the loss sum, is added. Rank 0 logs
    /// the decision.
    pub fn new(
        comm: &'c Communicator,
        be: &B,
        layers: &[Layer],
        opts: SyncOptions,
        forced: Choice,
    ) -> Result<GradPath<'c, B>, Error> {
        let (rank, n) = (comm.rank(), comm.world_size());
        let backend = agree(
            comm,
            BackendChoice::from_env().map_err(|e| e.to_string()),
            "reading RINGLET_BACKEND",
        )?;
        let nccl = be.on_device()
            && match be.nccl_usable() {
                Ok(()) => true,
                Err(why) => {
                    tracing::info!("rank {rank}: no NCCL for the gradients ({why})");
                    false
                }
            };
        let mine = RankTraits {
            on_device: be.on_device(),
            nccl,
            forced,
            backend,
            shares_gpu: false,
        };
        let mut all = vec![0u8; n];
        comm.all_gather(&[mine.encode()], &mut all)?;
        let mut ranks: Vec<RankTraits> = all.into_iter().map(RankTraits::decode).collect();
        let mut keys = vec![0i64; n];
        let key = device_key(&ringlet::topology::hostname(), be.device_id().as_deref());
        comm.all_gather(&[key], &mut keys)?;
        mark_shared(&mut ranks, &keys);
        let mut decision = decide(&ranks).map_err(Error::Config)?;
        if rank == 0 {
            tracing::info!("{}", describe(&decision, &ranks, opts.overlap));
        }
        let ranges: Vec<Range<usize>> = layers.iter().map(Layer::range).collect();
        let count = ranges.last().map_or(0, |r| r.end);
        let opts = SyncOptions { scalars: 1, ..opts };
        let mut nccl = None;
        if decision.paths[rank] == Path::Nccl {
            // Collective too; every rank is here, as all decided the same. A failure is agreed,
            // so every rank falls back together (unless NCCL was demanded).
            match agree(
                comm,
                be.nccl(comm).map_err(|e| e.to_string()),
                "starting NCCL for the gradients",
            ) {
                Ok(c) => nccl = Some(c),
                Err(e) if ranks.iter().any(|t| t.backend == BackendChoice::Nccl) => return Err(e),
                Err(e) => {
                    if rank == 0 {
                        tracing::warn!(
                            "gradient sync: NCCL did not start ({e}); the TCP ring instead"
                        );
                    }
                    decision.paths = vec![Path::DeviceBuckets; n];
                }
            }
        }
        let path = decision.paths[rank];
        let how = match path {
            Path::None => How::None,
            Path::Nccl => How::Nccl(nccl.expect("NCCL started on the way to this path")),
            Path::DeviceBuckets => Self::device(comm, be, &ranges, &opts)?,
            Path::HostBuckets => {
                let specs = (ranges.iter().enumerate())
                    .map(|(i, r)| ParamSpec::new(format!("layers.{i}"), r.len()))
                    .collect();
                How::Host {
                    sync: Box::new(GradSync::new(comm, specs, opts)?),
                    ranges,
                }
            }
        };
        Ok(GradPath {
            path,
            how,
            count,
            bytes: if n > 1 { (count + 1) * 4 } else { 0 },
            loss: 0.0,
        })
    }

    /// The bucket buffers of the device way: the plan [`GradSync`] makes from the same sizes.
    fn device(
        comm: &'c Communicator,
        be: &B,
        ranges: &[Range<usize>],
        opts: &SyncOptions,
    ) -> Result<How<'c, B>, Error> {
        let numels: Vec<usize> = ranges.iter().map(|r| r.len()).collect();
        let plan = plan_buckets(&numels, opts.first_bucket_bytes, opts.bucket_cap_bytes);
        let bufs = if plan.len() == 1 {
            Vec::new()
        } else {
            (plan.iter().enumerate())
                .map(|(b, k)| be.zeros(k.elems.len() + usize::from(b == 0)))
                .collect::<Result<_, Error>>()?
        };
        Ok(How::Device { comm, plan, bufs })
    }

    /// This rank's path.
    pub fn path(&self) -> Path {
        self.path
    }

    /// The buffer backward writes the gradient into: the gradient's elements, and one more (the
    /// loss slot) where the whole buffer is summed in place.
    pub fn gradient_buffer(&self, be: &B) -> Result<B::Buf, Error> {
        be.zeros(self.count + usize::from(self.in_place()))
    }

    fn in_place(&self) -> bool {
        match &self.how {
            How::Nccl(_) => true,
            How::Device { bufs, .. } => bufs.is_empty(),
            How::None | How::Host { .. } => false,
        }
    }

    /// Runs `mlp`'s backward into `grads` (from [`gradient_buffer`](Self::gradient_buffer)) with
    /// `loss`, this rank's loss sum, and on the host way hands each layer's gradient over as
    /// soon as it is computed (starting the buckets' all-reduces).
    pub fn backward(
        &mut self,
        be: &B,
        mlp: &Mlp,
        params: &B::Buf,
        ws: &mut Workspace<B>,
        grads: &mut B::Buf,
        loss: f32,
    ) -> Result<(), Error> {
        self.loss = loss;
        let in_place = self.in_place();
        match &mut self.how {
            How::None => mlp.backward(be, params, ws, grads, |_, _| Ok(())),
            How::Host { sync, ranges } => {
                sync.set_scalar(0, loss)?;
                mlp.backward(be, params, ws, grads, |layer, g| {
                    sync.push_with(layer, |dst| be.read(g, ranges[layer].start, dst))
                })
            }
            How::Nccl(_) | How::Device { .. } => {
                // Written first: the forward pass has just waited for the device (reading the
                // loss), so this small write stalls nothing.
                match &mut self.how {
                    How::Device { bufs, plan, .. } if !in_place => {
                        be.write(&[loss], &mut bufs[0], plan[0].elems.len())?
                    }
                    _ => be.write(&[loss], grads, self.count)?,
                }
                mlp.backward(be, params, ws, grads, |_, _| Ok(()))?;
                // Waits for the device, so that the step's compute time (which --balance auto
                // compares across ranks) counts the GPU's work, not just its queueing.
                be.read(grads, 0, &mut [0.0])
            }
        }
    }

    /// Sums the gradient (left in `grads`) and the loss over the ranks: the loss sum and what it
    /// cost. On the host way the sums of buckets started during backward are waited for.
    pub fn finish(&mut self, be: &B, grads: &mut B::Buf) -> Result<(f32, SyncStats), Error> {
        let t = Instant::now();
        let mut loss = [self.loss];
        match &mut self.how {
            How::None => {}
            How::Host { sync, ranges } => {
                let stats = sync.finish()?;
                for i in 0..ranges.len() {
                    be.write(sync.grad(i), grads, sync.offset(i))?;
                }
                return Ok((sync.scalar(0), stats));
            }
            How::Nccl(nccl) => {
                nccl.all_reduce_sum(grads)?;
                be.read(grads, self.count, &mut loss)?;
            }
            How::Device { comm, bufs, .. } if bufs.is_empty() => {
                be.all_reduce_tcp(comm, grads)?;
                be.read(grads, self.count, &mut loss)?;
            }
            How::Device { comm, plan, bufs } => {
                // Bucket order, as GradSync starts them: the ring meets the host ranks' calls.
                for (k, buf) in plan.iter().zip(bufs.iter_mut()) {
                    let (at, len) = (k.elems.start, k.elems.len());
                    be.copy(grads, at, buf, 0, len)?;
                    be.all_reduce_tcp(comm, buf)?;
                    be.copy(buf, 0, grads, at, len)?;
                }
                be.read(&bufs[0], plan[0].elems.len(), &mut loss)?;
            }
        }
        let stats = SyncStats {
            wait: t.elapsed(),
            bytes: self.bytes,
        };
        Ok((loss[0], stats))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traits_round_trip_through_one_byte() {
        let choices = [Choice::Auto, Choice::Host, Choice::Device];
        let backends = [BackendChoice::Auto, BackendChoice::Tcp, BackendChoice::Nccl];
        for i in 0..36 {
            let t = RankTraits {
                on_device: i & 1 != 0,
                nccl: i & 2 != 0,
                forced: choices[i / 4 % 3],
                backend: backends[i / 12],
                shares_gpu: false,
            };
            assert_eq!(RankTraits::decode(t.encode()), t);
        }
        assert_eq!(Choice::parse(" Device "), Some(Choice::Device));
        assert_eq!(Choice::parse(""), Some(Choice::Auto));
        assert_eq!(Choice::parse("gpu"), None);
    }

    #[test]
    fn ranks_on_one_gpu_of_one_host_are_marked_as_sharing_it() {
        let a = device_key("node0", Some("00000000:3b:00.0"));
        let b = device_key("node0", Some("00000000:5e:00.0"));
        let c = device_key("node1", Some("00000000:3b:00.0"));
        assert!(a != b && a != c && b != c && a != 0);
        assert_eq!(device_key("node0", None), 0);
        let keys = [a, b, a, 0, 0, c];
        let mut ranks = vec![RankTraits::decode(0b11); keys.len()];
        mark_shared(&mut ranks, &keys);
        let shared: Vec<bool> = ranks.iter().map(|t| t.shares_gpu).collect();
        // CPU ranks (key 0) share nothing, however many there are.
        assert_eq!(shared, [true, false, true, false, false, false]);
    }
}
