//! The model's operations on a GPU: matrix products by cuBLAS (FP32), the rest by the kernels of
//! `kernels/model.cu` and `kernels/optim.cu`, everything queued on the device's one stream.
//! Reads wait for the stream, so a gradient read for the all-reduce is complete. The gradient
//! all-reduce queues on the same stream: device-to-device copies into bucket buffers, the TCP
//! ring's staging copies (`ringlet::gpu`) and NCCL's collectives (`ringlet::nccl`, which shares
//! this [`Gpu`] through an `Arc`) all run in order with the model's kernels.
//!
//! Every view is bounds-checked here before its device address reaches CUDA.
//!
//! - [`blas`]: cuBLAS's GEMM for row-major matrices on the device's stream;
//! - [`kernels`]: the kernels of `kernels/model.cu` and `kernels/optim.cu` on the device.

pub mod blas;
pub mod kernels;

use crate::optim::{AdamW, Sgd};
use crate::tensor::{Backend, DeviceCollective, Gemm};
use blas::Blas;
use cudarc::driver::result;
use kernels::ModelArg::{self, Ptr, Size};
use kernels::TrainKernels;
use ringlet::{Communicator, Error, NcclCommunicator, ReduceOp};
use ringlet_cuda::{CudaError, DeviceBuffer, Gpu};
use std::sync::Arc;

/// One GPU running the model.
pub struct GpuBackend {
    // Dropped first: destroying the handle waits for its work before the kernels' modules go.
    blas: Blas,
    kernels: TrainKernels,
    /// Shared with the NCCL communicator, which queues its collectives on this GPU's stream.
    gpu: Arc<Gpu>,
    name: String,
    /// The device's PCI bus id: two ranks with the same on one host share it.
    pci_bus_id: String,
}

impl GpuBackend {
    /// Device `ordinal`: its context, the kernels (compiled by NVRTC or from the kernel cache) and
    /// a cuBLAS handle on its stream. Fails with a typed error where CUDA, NVRTC, cuBLAS or the
    /// device is missing.
    pub fn new(ordinal: usize) -> Result<GpuBackend, CudaError> {
        let info = ringlet_cuda::devices()?
            .into_iter()
            .nth(ordinal)
            .ok_or_else(|| CudaError::Driver(format!("no CUDA device {ordinal}")))?;
        let (major, minor, patch) = blas::version()?;
        let gpu = Arc::new(Gpu::new(ordinal)?);
        let kernels = TrainKernels::new(&gpu.kernels)?;
        let blas = Blas::new(&gpu.kernels)?;
        Ok(GpuBackend {
            name: format!(
                "GPU {ordinal} ({}, sm_{}, cuBLAS {major}.{minor}.{patch})",
                info.name,
                info.arch()
            ),
            pci_bus_id: info.pci_bus_id.clone(),
            gpu,
            kernels,
            blas,
        })
    }

    /// The address of `buf[at..at + len]`, or an error naming `what` when it does not fit.
    fn at<T: ringlet::Element>(
        &self,
        buf: &DeviceBuffer<T>,
        at: usize,
        len: usize,
        what: &str,
    ) -> Result<u64, Error> {
        if at.checked_add(len).is_none_or(|end| end > buf.len()) {
            return Err(Error::Device(format!(
                "{what}: elements {at}..{} of a buffer of {}",
                at.saturating_add(len),
                buf.len()
            )));
        }
        Ok(self.gpu.device_addr_at(buf, at))
    }

    fn launch(&self, kernel: &str, work: usize, args: &[ModelArg]) -> Result<(), Error> {
        // SAFETY: every caller below passes the kernel's parameters in model.cu's order, with
        // addresses from `at`, which checked that each holds what the kernel touches for the
        // sizes passed alongside.
        unsafe { self.kernels.model(kernel, work as u64, args) }.map_err(Error::from)
    }
}

impl Backend for GpuBackend {
    type Buf = DeviceBuffer<f32>;
    /// Labels as `i32` (the kernels read them as `u32`; labels are class indices).
    type Labels = DeviceBuffer<i32>;

    fn describe(&self) -> String {
        self.name.clone()
    }

    fn zeros(&self, len: usize) -> Result<Self::Buf, Error> {
        self.gpu.alloc(len).map_err(Error::from)
    }

    fn len(&self, buf: &Self::Buf) -> usize {
        buf.len()
    }

    fn write(&self, host: &[f32], buf: &mut Self::Buf, at: usize) -> Result<(), Error> {
        self.at(buf, at, host.len(), "write")?;
        self.gpu.write_at(host, buf, at).map_err(Error::from)
    }

    fn read(&self, buf: &Self::Buf, at: usize, host: &mut [f32]) -> Result<(), Error> {
        self.at(buf, at, host.len(), "read")?;
        self.gpu.read_at(buf, at, host).map_err(Error::from)
    }

    fn labels(&self, y: &[u32]) -> Result<Self::Labels, Error> {
        let signed: Vec<i32> = y.iter().map(|&v| v as i32).collect();
        self.gpu.upload(&signed).map_err(Error::from)
    }

    fn copy(
        &self,
        src: &Self::Buf,
        src_at: usize,
        dst: &mut Self::Buf,
        dst_at: usize,
        len: usize,
    ) -> Result<(), Error> {
        let from = self.at(src, src_at, len, "copy src")?;
        let to = self.at(dst, dst_at, len, "copy dst")?;
        if len == 0 {
            return Ok(());
        }
        self.gpu
            .kernels
            .ctx
            .bind_to_thread()
            .map_err(|e| Error::Device(format!("copy: {e:?}")))?;
        // SAFETY: `at` checked that both addresses hold `len` f32 of their buffers; dst is a
        // &mut buffer, so the ranges do not overlap; both buffers outlive the queued copy
        // because every later use of them is on this same stream and freeing is stream-ordered.
        unsafe { result::memcpy_dtod_async(to, from, len * 4, self.gpu.cu_stream()) }
            .map_err(|e| Error::from(CudaError::from(e)))
    }

    fn all_reduce_tcp(&self, comm: &Communicator, buf: &mut Self::Buf) -> Result<(), Error> {
        // Staged through pinned host blocks, copies on this GPU's stream: ordered after the
        // kernels and copies that produced `buf`.
        comm.all_reduce_device(&*self.gpu, buf, ReduceOp::Sum)
    }

    fn on_device(&self) -> bool {
        true
    }

    fn device_id(&self) -> Option<String> {
        Some(self.pci_bus_id.clone())
    }

    fn nccl_usable(&self) -> Result<(), String> {
        ringlet_cuda::nccl::Api::load()
            .map(|_| ())
            .map_err(|e| e.to_string())
    }

    fn nccl(&self, comm: &Communicator) -> Result<Box<dyn DeviceCollective<Self::Buf>>, Error> {
        Ok(Box::new(comm.nccl(self.gpu.clone())?))
    }

    fn gemm(
        &self,
        g: &Gemm,
        (a, at_a): (&Self::Buf, usize),
        (b, at_b): (&Self::Buf, usize),
        (c, at_c): (&mut Self::Buf, usize),
        beta: f32,
    ) -> Result<(), Error> {
        let [la, lb, lc] = g.lens();
        let (pa, pb) = (
            self.at(a, at_a, la, "gemm a")?,
            self.at(b, at_b, lb, "gemm b")?,
        );
        let pc = self.at(c, at_c, lc, "gemm c")?;
        // SAFETY: `at` checked that each address holds the product's operand; c is a &mut
        // buffer, so it is neither a's nor b's; the buffers outlive the queued product because
        // every later use of them is on the same stream, and freeing is stream-ordered.
        unsafe { self.blas.sgemm(g, pa, pb, pc, beta) }.map_err(Error::from)
    }

    fn fill_rows(
        &self,
        out: &mut Self::Buf,
        rows: usize,
        cols: usize,
        (bias, at): (&Self::Buf, usize),
    ) -> Result<(), Error> {
        let o = self.at(out, 0, rows * cols, "fill_rows out")?;
        let b = self.at(bias, at, cols, "fill_rows bias")?;
        let args = [Ptr(o), Ptr(b), Size(rows as u64), Size(cols as u64)];
        self.launch("fill_rows_f32", rows * cols, &args)
    }

    fn relu(&self, x: &mut Self::Buf, n: usize) -> Result<(), Error> {
        let p = self.at(x, 0, n, "relu")?;
        self.launch("relu_f32", n, &[Ptr(p), Size(n as u64)])
    }

    fn relu_mask(&self, delta: &mut Self::Buf, act: &Self::Buf, n: usize) -> Result<(), Error> {
        let d = self.at(delta, 0, n, "relu_mask delta")?;
        let a = self.at(act, 0, n, "relu_mask act")?;
        self.launch("relu_mask_f32", n, &[Ptr(d), Ptr(a), Size(n as u64)])
    }

    fn column_sums(
        &self,
        m: &Self::Buf,
        rows: usize,
        cols: usize,
        (out, at): (&mut Self::Buf, usize),
    ) -> Result<(), Error> {
        let src = self.at(m, 0, rows * cols, "column_sums m")?;
        let dst = self.at(out, at, cols, "column_sums out")?;
        let args = [Ptr(src), Ptr(dst), Size(rows as u64), Size(cols as u64)];
        self.launch("column_sums_f32", cols, &args)
    }

    fn softmax_loss(
        &self,
        logits: &Self::Buf,
        labels: &Self::Labels,
        rows: usize,
        classes: usize,
    ) -> Result<(f64, usize), Error> {
        let z = self.at(logits, 0, rows * classes, "softmax_loss logits")?;
        let y = self.at(labels, 0, rows, "softmax_loss labels")?;
        let loss: DeviceBuffer<f64> = self.gpu.alloc(rows)?;
        let correct: DeviceBuffer<i32> = self.gpu.alloc(rows)?;
        let (l, c) = (
            self.at(&loss, 0, rows, "loss")?,
            self.at(&correct, 0, rows, "correct")?,
        );
        let args = [
            Ptr(z),
            Ptr(y),
            Ptr(l),
            Ptr(c),
            Size(rows as u64),
            Size(classes as u64),
        ];
        self.launch("softmax_loss_f32", rows, &args)?;
        let mut per_row = vec![0.0f64; rows];
        let mut hits = vec![0i32; rows];
        self.gpu.read(&loss, &mut per_row)?;
        self.gpu.read(&correct, &mut hits)?;
        // Summed on the host in row order, as the CPU sums.
        Ok((per_row.iter().sum(), hits.iter().map(|&h| h as usize).sum()))
    }

    fn softmax_grad(
        &self,
        logits: &Self::Buf,
        labels: &Self::Labels,
        rows: usize,
        classes: usize,
        delta: &mut Self::Buf,
    ) -> Result<(), Error> {
        let z = self.at(logits, 0, rows * classes, "softmax_grad logits")?;
        let y = self.at(labels, 0, rows, "softmax_grad labels")?;
        let d = self.at(delta, 0, rows * classes, "softmax_grad delta")?;
        let args = [
            Ptr(z),
            Ptr(y),
            Ptr(d),
            Size(rows as u64),
            Size(classes as u64),
        ];
        self.launch("softmax_grad_f32", rows, &args)
    }

    fn sgd(
        &self,
        opt: &Sgd,
        p: &mut Self::Buf,
        g: &Self::Buf,
        v: &mut Self::Buf,
        grad_scale: f32,
    ) -> Result<(), Error> {
        let n = p.len();
        let ptrs = [
            self.at(p, 0, n, "sgd p")?,
            self.at(g, 0, n, "sgd g")?,
            self.at(v, 0, n, "sgd v")?,
        ];
        // SAFETY: `at` checked that each address holds n f32.
        unsafe { self.kernels.sgd_at(opt, ptrs, n, grad_scale) }.map_err(Error::from)
    }

    fn adamw(
        &self,
        opt: &AdamW,
        p: &mut Self::Buf,
        g: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        grad_scale: f32,
        t: u32,
    ) -> Result<(), Error> {
        let n = p.len();
        let ptrs = [
            self.at(p, 0, n, "adamw p")?,
            self.at(g, 0, n, "adamw g")?,
            self.at(m, 0, n, "adamw m")?,
            self.at(v, 0, n, "adamw v")?,
        ];
        // SAFETY: `at` checked that each address holds n f32.
        unsafe { self.kernels.adamw_at(opt, ptrs, n, grad_scale, t) }.map_err(Error::from)
    }
}

/// NCCL queues its collectives on the stream of the `Gpu` it was made with (this backend's), and
/// waits for them, so a sum is in place when `all_reduce_sum` returns and later kernels see it.
impl DeviceCollective<DeviceBuffer<f32>> for NcclCommunicator {
    fn all_reduce_sum(&self, buf: &mut DeviceBuffer<f32>) -> Result<(), Error> {
        self.all_reduce(buf, ReduceOp::Sum)
    }
}

/// Run where a GPU is (scripts/gpu-check.sh runs this test binary); elsewhere they skip, saying
/// why.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Mlp, Workspace};
    use crate::tensor::Host;
    use rand::{RngExt, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn gpu() -> Option<GpuBackend> {
        match GpuBackend::new(0) {
            Ok(g) => {
                println!("{}", g.describe());
                Some(g)
            }
            Err(e) => {
                ringlet_core::skipped!("no GPU to run the model on ({e})");
                None
            }
        }
    }

    fn worst(a: &[f32], b: &[f32]) -> f64 {
        a.iter()
            .zip(b)
            .map(|(&x, &y)| (x as f64 - y as f64).abs() / (1.0 + y.abs() as f64))
            .fold(0.0, f64::max)
    }

    /// Forward, backward (gradients read layer by layer as the all-reduce reads them), and
    /// training steps with both optimizers: the GPU within FP32 rounding of the CPU.
    #[test]
    fn the_gpu_model_matches_the_cpu_model() {
        let Some(be) = gpu() else { return };
        let mlp = Mlp::new(vec![64, 96, 48, 10]).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let batch = 200;
        let x: Vec<f32> = (0..batch * 64)
            .map(|_| rng.random_range(0.0..1.0))
            .collect();
        let y: Vec<u32> = (0..batch).map(|_| rng.random_range(0..10)).collect();
        let host_p = mlp.init(1);
        let dev_p = be.upload(&host_p).unwrap();

        let mut hws = Workspace::default();
        let mut dws = Workspace::default();
        let (hl, hc) = mlp.forward(&Host, &host_p, &x, &y, &mut hws).unwrap();
        let (dl, dc) = mlp.forward(&be, &dev_p, &x, &y, &mut dws).unwrap();
        println!("loss CPU {hl} GPU {dl}; correct CPU {hc} GPU {dc}");
        assert!((hl - dl).abs() <= 1e-5 * hl.abs(), "loss {dl} vs {hl}");
        assert!(hc.abs_diff(dc) <= 1, "correct {dc} vs {hc}");

        let mut hg = vec![0.0f32; host_p.len()];
        mlp.backward(&Host, &host_p, &mut hws, &mut hg, |_, _| Ok(()))
            .unwrap();
        let mut dg = be.zeros(host_p.len()).unwrap();
        let mut streamed = vec![0.0f32; host_p.len()];
        let mut order = Vec::new();
        let layers = mlp.layers();
        mlp.backward(&be, &dev_p, &mut dws, &mut dg, |i, g| {
            order.push(i);
            let r = layers[i].range();
            be.read(g, r.start, &mut streamed[r])
        })
        .unwrap();
        assert_eq!(order, vec![2, 1, 0]);
        let whole = be.download(&dg).unwrap();
        assert_eq!(
            whole, streamed,
            "a layer's gradient is final when handed over"
        );
        let w = worst(&whole, &hg);
        println!("gradient: worst relative difference {w:.2e}");
        assert!(w < 1e-4, "gradient differs by {w}");

        // The optimizers run the kernels of optim.cu (--fmad=false): from the same gradient,
        // the same bits as the CPU reference.
        let sgd = Sgd {
            lr: 0.05,
            momentum: 0.9,
            weight_decay: 1e-4,
        };
        let adamw = AdamW::default();
        let g = be.upload(&hg).unwrap();
        let (mut hp, mut hv) = (host_p.clone(), vec![0.0; host_p.len()]);
        let (mut dp, mut dv) = (be.upload(&host_p).unwrap(), be.zeros(hp.len()).unwrap());
        for _ in 0..3 {
            Host.sgd(&sgd, &mut hp, &hg, &mut hv, 1.0 / 200.0).unwrap();
            be.sgd(&sgd, &mut dp, &g, &mut dv, 1.0 / 200.0).unwrap();
        }
        assert_eq!(be.download(&dp).unwrap(), hp, "sgd");
        let (mut hp, mut hm, mut hv) = (host_p.clone(), vec![0.0; hp.len()], vec![0.0; hp.len()]);
        let mut dp = be.upload(&host_p).unwrap();
        let (mut dm, mut dv) = (be.zeros(hp.len()).unwrap(), be.zeros(hp.len()).unwrap());
        for t in 1..=3 {
            Host.adamw(&adamw, &mut hp, &hg, &mut hm, &mut hv, 1.0 / 200.0, t)
                .unwrap();
            be.adamw(&adamw, &mut dp, &g, &mut dm, &mut dv, 1.0 / 200.0, t)
                .unwrap();
        }
        assert_eq!(be.download(&dp).unwrap(), hp, "adamw");

        // A view past a buffer's end is an error naming it, not a CUDA fault.
        let short = be.zeros(10).unwrap();
        let e = be.read(&short, 5, &mut [0.0; 6]).unwrap_err().to_string();
        assert!(e.contains("read: elements 5..11 of a buffer of 10"), "{e}");
    }

    /// Device-to-device copies at offsets (bounds named, not a CUDA fault), the TCP ring's sum
    /// of device buffers bit for bit the host's (recursive-doubling and ring sizes), and NCCL's
    /// sum on the backend's own GPU (one rank: two NCCL ranks cannot share a device).
    #[test]
    fn the_gradient_sum_runs_on_device_buffers() {
        let Some(be) = gpu() else { return };
        let a = be
            .upload(&(0..100).map(|i| i as f32).collect::<Vec<_>>())
            .unwrap();
        let mut b = be.zeros(50).unwrap();
        be.copy(&a, 10, &mut b, 5, 40).unwrap();
        let got = be.download(&b).unwrap();
        let want: Vec<f32> = (0..50)
            .map(|i| {
                if (5..45).contains(&i) {
                    (i + 5) as f32
                } else {
                    0.0
                }
            })
            .collect();
        assert_eq!(got, want);
        let e = be.copy(&a, 90, &mut b, 0, 20).unwrap_err().to_string();
        assert!(
            e.contains("copy src: elements 90..110 of a buffer of 100"),
            "{e}"
        );
        drop(be);

        let value = |r: usize, i: usize| (i as f32 * 0.37 + r as f32).sin() * 1e-3;
        let sums = ringlet_ddp::local_world::run(2, |comm| {
            let be = GpuBackend::new(0).unwrap();
            [100usize, 40_000]
                .map(|n| {
                    let mine: Vec<f32> = (0..n).map(|i| value(comm.rank(), i)).collect();
                    let mut dev = be.upload(&mine).unwrap();
                    be.all_reduce_tcp(&comm, &mut dev).unwrap();
                    let mut host = mine;
                    comm.all_reduce(&mut host, ReduceOp::Sum).unwrap();
                    (be.download(&dev).unwrap(), host)
                })
                .to_vec()
        });
        for rank in &sums {
            for (dev, host) in rank {
                assert!(dev == host, "the staged sum differs from the host's");
            }
        }

        ringlet_ddp::local_world::run(1, |comm| {
            let be = GpuBackend::new(0).unwrap();
            if let Err(why) = be.nccl_usable() {
                ringlet_core::skipped!("NCCL ({why})");
                return;
            }
            let nccl = be.nccl(&comm).unwrap();
            let mut buf = be.upload(&[1.5, -2.0, 3.0]).unwrap();
            nccl.all_reduce_sum(&mut buf).unwrap();
            assert_eq!(be.download(&buf).unwrap(), vec![1.5, -2.0, 3.0]);
        });
    }

    /// Two GPU ranks on the TCP ring: one summing device buckets (three, the first small enough for recursive doubling),
    /// the other reading layers into host buckets, end bit for bit where two host-way ranks do.
    #[test]
    fn device_buckets_on_a_gpu_match_host_buckets() {
        use crate::grad_path::Choice;
        use crate::train::{self, DeviceChoice, OptimizerKind, Options};
        if gpu().is_none() {
            return;
        }
        let data = crate::data::load("digits").unwrap();
        let opts = Options {
            device: DeviceChoice::Gpu,
            hidden: vec![256, 64],
            optimizer: OptimizerKind::Sgd(Sgd {
                lr: 0.05,
                momentum: 0.9,
                weight_decay: 1e-4,
            }),
            warmup: 5,
            global_batch: 48,
            steps: 20,
            seed: 4,
            balance: ringlet_ddp::Balance::Off,
            bucket_cap_bytes: 64 << 10,
            first_bucket_bytes: 1024,
            overlap: true,
            checkpoint: None,
            rebalance_every: 0,
            calibration_steps: 0,
            locality: None,
        };
        let run = |ways: [Choice; 2]| {
            ringlet_ddp::local_world::run(2, |mut comm| {
                let way = ways[comm.rank()];
                train::train_with(&mut comm, &data, &opts, way, |_| {}).unwrap()
            })
        };
        let host = run([Choice::Host, Choice::Host]);
        let mixed = run([Choice::Device, Choice::Host]);
        assert_eq!(mixed[0].grad_sync, "tcp-device-buckets");
        for s in host.iter().chain(&mixed) {
            assert!(
                s.params == host[0].params,
                "the device way changed the result"
            );
        }
    }
}
