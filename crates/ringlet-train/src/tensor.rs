//! The operations the model is written in, over f32 buffers that live where a [`Backend`] keeps
//! them: [`Host`] (the CPU, `matrixmultiply`'s GEMM) or a GPU (`crate::gpu`: cuBLAS and the
//! kernels of `kernels/model.cu`). The model's forward and backward are written once, against
//! this trait.
//!
//! The gradient all-reduce can run where the buffers are too: [`Backend::all_reduce_tcp`] sums a
//! buffer over the TCP ring through ringlet's staging engine (pinned host blocks and copies on
//! the stream for a GPU; memcpy for the CPU) — the frames a host buffer's all-reduce makes, so
//! CPU and GPU ranks meet in one collective — and [`Backend::nccl`] gives a GPU an NCCL
//! communicator (`crate::grad_path` decides which way is used).
//!
//! Matrices are row-major `[rows, cols]`; a matrix operand is a buffer and the element it
//! starts at, so a layer's weights are used in place inside the flat parameter vector.

pub use crate::gpu::blas::Gemm;
use crate::optim::{AdamW, Sgd};
use ringlet::staged::HostDevice;
use ringlet::{Communicator, Error, ReduceOp};

/// Sums whole buffers across ranks where they live (NCCL on GPUs).
pub trait DeviceCollective<Buf> {
    /// In place: `buf` becomes the sum of every rank's `buf`; returns once the sum is there.
    fn all_reduce_sum(&self, buf: &mut Buf) -> Result<(), Error>;
}

/// Where the model's buffers live and how the operations run there.
pub trait Backend {
    /// `len` f32.
    type Buf;
    /// The labels of one batch.
    type Labels;

    /// What runs the model, for logs ("CPU", "GPU 0 (NVIDIA H100 ...)").
    fn describe(&self) -> String;
    /// A zeroed buffer.
    fn zeros(&self, len: usize) -> Result<Self::Buf, Error>;
    fn len(&self, buf: &Self::Buf) -> usize;
    /// `buf[at..at + host.len()] = host`.
    fn write(&self, host: &[f32], buf: &mut Self::Buf, at: usize) -> Result<(), Error>;
    /// `host = buf[at..at + host.len()]`, once everything queued before has run.
    fn read(&self, buf: &Self::Buf, at: usize, host: &mut [f32]) -> Result<(), Error>;
    fn labels(&self, y: &[u32]) -> Result<Self::Labels, Error>;
    /// `dst[dst_at..dst_at + len] = src[src_at..src_at + len]`, in order with the operations
    /// queued before and after it (on a GPU a device-to-device copy on the stream: no host copy).
    fn copy(
        &self,
        src: &Self::Buf,
        src_at: usize,
        dst: &mut Self::Buf,
        dst_at: usize,
        len: usize,
    ) -> Result<(), Error>;
    /// `buf` summed over `comm`'s ranks on the TCP ring. The collective (its call signature,
    /// frames and bits) is the one a host buffer of the same length makes, so ranks keeping
    /// their buffers on different backends meet in one all-reduce.
    fn all_reduce_tcp(&self, comm: &Communicator, buf: &mut Self::Buf) -> Result<(), Error>;
    /// Whether the buffers live in device memory (so reading them to the host is a copy over
    /// the bus worth avoiding).
    fn on_device(&self) -> bool {
        false
    }
    /// The device this backend computes on, named so that two ranks on one host using the same
    /// device name it alike (its PCI bus id); `None` on the CPU.
    fn device_id(&self) -> Option<String> {
        None
    }
    /// Why NCCL cannot sum this backend's buffers (`Ok` where it can).
    fn nccl_usable(&self) -> Result<(), String> {
        Err("its buffers are in host memory".into())
    }
    /// An NCCL communicator over `comm`'s ranks for this backend's buffers. Collective: every
    /// rank calls it, and only once all have agreed that [`nccl_usable`](Self::nccl_usable)
    /// holds everywhere.
    fn nccl(&self, comm: &Communicator) -> Result<Box<dyn DeviceCollective<Self::Buf>>, Error> {
        let _ = comm;
        Err(Error::Device(format!(
            "{} has no NCCL: {}",
            self.describe(),
            self.nccl_usable().err().unwrap_or_default()
        )))
    }

    /// `c = beta·c + op(a)·op(b)` (see [`Gemm`]); `c` is another buffer than `a`'s and `b`'s.
    fn gemm(
        &self,
        g: &Gemm,
        a: (&Self::Buf, usize),
        b: (&Self::Buf, usize),
        c: (&mut Self::Buf, usize),
        beta: f32,
    ) -> Result<(), Error>;
    /// `out[r, j] = bias[j]` for `rows` rows of `cols`.
    fn fill_rows(
        &self,
        out: &mut Self::Buf,
        rows: usize,
        cols: usize,
        bias: (&Self::Buf, usize),
    ) -> Result<(), Error>;
    /// `x[..n] = x` where positive, else +0 (NaN too).
    fn relu(&self, x: &mut Self::Buf, n: usize) -> Result<(), Error>;
    /// `delta[i] = 0` where `act[i]` is not positive, for `i < n`.
    fn relu_mask(&self, delta: &mut Self::Buf, act: &Self::Buf, n: usize) -> Result<(), Error>;
    /// `out[at + j] = sum over r of m[r, j]`, rows in order.
    fn column_sums(
        &self,
        m: &Self::Buf,
        rows: usize,
        cols: usize,
        out: (&mut Self::Buf, usize),
    ) -> Result<(), Error>;
    /// The summed softmax cross-entropy of `rows` rows of logits, and how many rows' arg max is
    /// the label.
    fn softmax_loss(
        &self,
        logits: &Self::Buf,
        labels: &Self::Labels,
        rows: usize,
        classes: usize,
    ) -> Result<(f64, usize), Error>;
    /// `delta = softmax(logits) - onehot(label)` per row.
    fn softmax_grad(
        &self,
        logits: &Self::Buf,
        labels: &Self::Labels,
        rows: usize,
        classes: usize,
        delta: &mut Self::Buf,
    ) -> Result<(), Error>;
    /// One SGD-with-momentum step over `p`'s elements, as [`Sgd::step`]. `g` may be longer than
    /// `p` (the NCCL path keeps the loss sum in a slot after the gradient); only its first
    /// `p`-length elements are read.
    fn sgd(
        &self,
        opt: &Sgd,
        p: &mut Self::Buf,
        g: &Self::Buf,
        v: &mut Self::Buf,
        grad_scale: f32,
    ) -> Result<(), Error>;
    /// One AdamW step over `p`'s elements, as [`AdamW::step`] (`g` as in [`sgd`](Self::sgd)).
    #[allow(clippy::too_many_arguments)]
    fn adamw(
        &self,
        opt: &AdamW,
        p: &mut Self::Buf,
        g: &Self::Buf,
        m: &mut Self::Buf,
        v: &mut Self::Buf,
        grad_scale: f32,
        t: u32,
    ) -> Result<(), Error>;

    /// `slot` holding at least `len` elements (made anew when shorter).
    fn ensure<'a>(
        &self,
        slot: &'a mut Option<Self::Buf>,
        len: usize,
    ) -> Result<&'a mut Self::Buf, Error> {
        if slot.as_ref().is_none_or(|b| self.len(b) < len) {
            *slot = Some(self.zeros(len)?);
        }
        Ok(slot.as_mut().expect("just filled"))
    }

    /// A whole buffer's contents on the host.
    fn download(&self, buf: &Self::Buf) -> Result<Vec<f32>, Error> {
        let mut host = vec![0.0; self.len(buf)];
        self.read(buf, 0, &mut host)?;
        Ok(host)
    }

    /// A buffer holding `host`.
    fn upload(&self, host: &[f32]) -> Result<Self::Buf, Error> {
        let mut buf = self.zeros(host.len())?;
        self.write(host, &mut buf, 0)?;
        Ok(buf)
    }
}

/// The CPU.
pub struct Host;

impl Backend for Host {
    type Buf = Vec<f32>;
    type Labels = Vec<u32>;

    fn describe(&self) -> String {
        "CPU".into()
    }
    fn zeros(&self, len: usize) -> Result<Vec<f32>, Error> {
        Ok(vec![0.0; len])
    }
    fn len(&self, buf: &Vec<f32>) -> usize {
        buf.len()
    }
    fn write(&self, host: &[f32], buf: &mut Vec<f32>, at: usize) -> Result<(), Error> {
        buf[at..at + host.len()].copy_from_slice(host);
        Ok(())
    }
    fn read(&self, buf: &Vec<f32>, at: usize, host: &mut [f32]) -> Result<(), Error> {
        host.copy_from_slice(&buf[at..at + host.len()]);
        Ok(())
    }
    fn labels(&self, y: &[u32]) -> Result<Vec<u32>, Error> {
        Ok(y.to_vec())
    }
    fn copy(
        &self,
        src: &Vec<f32>,
        src_at: usize,
        dst: &mut Vec<f32>,
        dst_at: usize,
        len: usize,
    ) -> Result<(), Error> {
        let fits = |at: usize, buf_len: usize| at.checked_add(len).filter(|&end| end <= buf_len);
        match (fits(src_at, src.len()), fits(dst_at, dst.len())) {
            (Some(src_end), Some(dst_end)) => {
                dst[dst_at..dst_end].copy_from_slice(&src[src_at..src_end]);
                Ok(())
            }
            _ => Err(Error::InvalidArgument(format!(
                "copy of {len} elements from {src_at} of {} to {dst_at} of {}",
                src.len(),
                dst.len()
            ))),
        }
    }
    /// Through the staging engine a GPU's buffers take (`HostDevice`: memcpy for its copies,
    /// events that complete a poll late, as a GPU's do), not `all_reduce`: the same collective
    /// either way, but a CPU rank forced to the device way (`RINGLET_GRAD_PATH=device`) then
    /// runs every part of a GPU rank's all-reduce except CUDA itself.
    fn all_reduce_tcp(&self, comm: &Communicator, buf: &mut Vec<f32>) -> Result<(), Error> {
        comm.all_reduce_device(&HostDevice { lag: 1 }, buf.as_mut_slice(), ReduceOp::Sum)
    }

    fn gemm(
        &self,
        g: &Gemm,
        (a, at_a): (&Vec<f32>, usize),
        (b, at_b): (&Vec<f32>, usize),
        (c, at_c): (&mut Vec<f32>, usize),
        beta: f32,
    ) -> Result<(), Error> {
        let [la, lb, lc] = g.lens();
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        let (a, b) = (&a[at_a..at_a + la], &b[at_b..at_b + lb]);
        let c = &mut c[at_c..at_c + lc];
        let (rsa, csa) = if g.trans_a { (1, g.m) } else { (g.k, 1) };
        let (rsb, csb) = if g.trans_b { (1, g.k) } else { (g.n, 1) };
        // SAFETY: the slices above hold exactly the m×k, k×n and m×n elements that
        // matrixmultiply reads and writes with these strides (indexing them would have panicked
        // otherwise); c is a &mut slice, so it overlaps neither operand.
        unsafe {
            matrixmultiply::sgemm(
                g.m,
                g.k,
                g.n,
                1.0,
                a.as_ptr(),
                rsa as isize,
                csa as isize,
                b.as_ptr(),
                rsb as isize,
                csb as isize,
                beta,
                c.as_mut_ptr(),
                g.n as isize,
                1,
            )
        };
        Ok(())
    }

    fn fill_rows(
        &self,
        out: &mut Vec<f32>,
        rows: usize,
        cols: usize,
        (bias, at): (&Vec<f32>, usize),
    ) -> Result<(), Error> {
        for row in out[..rows * cols].chunks_mut(cols.max(1)) {
            row.copy_from_slice(&bias[at..at + cols]);
        }
        Ok(())
    }

    fn relu(&self, x: &mut Vec<f32>, n: usize) -> Result<(), Error> {
        for v in &mut x[..n] {
            *v = if *v > 0.0 { *v } else { 0.0 };
        }
        Ok(())
    }

    fn relu_mask(&self, delta: &mut Vec<f32>, act: &Vec<f32>, n: usize) -> Result<(), Error> {
        for (d, &a) in delta[..n].iter_mut().zip(&act[..n]) {
            // Not positive, NaN included (the kernel's `!(act > 0)`).
            if a.partial_cmp(&0.0) != Some(std::cmp::Ordering::Greater) {
                *d = 0.0;
            }
        }
        Ok(())
    }

    fn column_sums(
        &self,
        m: &Vec<f32>,
        rows: usize,
        cols: usize,
        (out, at): (&mut Vec<f32>, usize),
    ) -> Result<(), Error> {
        let out = &mut out[at..at + cols];
        out.fill(0.0);
        for row in m[..rows * cols].chunks(cols.max(1)) {
            for (s, v) in out.iter_mut().zip(row) {
                *s += v;
            }
        }
        Ok(())
    }

    fn softmax_loss(
        &self,
        logits: &Vec<f32>,
        labels: &Vec<u32>,
        rows: usize,
        classes: usize,
    ) -> Result<(f64, usize), Error> {
        let (mut loss, mut correct) = (0.0f64, 0);
        for (row, &label) in logits[..rows * classes].chunks(classes).zip(labels) {
            let label = label as usize;
            if label >= classes {
                loss += f64::NAN;
                continue;
            }
            let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let sum: f64 = row.iter().map(|&v| ((v - max) as f64).exp()).sum();
            loss += sum.ln() - (row[label] - max) as f64;
            let best = row
                .iter()
                .enumerate()
                .fold(0, |b, (j, &v)| if v > row[b] { j } else { b });
            correct += usize::from(best == label);
        }
        Ok((loss, correct))
    }

    fn softmax_grad(
        &self,
        logits: &Vec<f32>,
        labels: &Vec<u32>,
        rows: usize,
        classes: usize,
        delta: &mut Vec<f32>,
    ) -> Result<(), Error> {
        let (z, d) = (&logits[..rows * classes], &mut delta[..rows * classes]);
        for ((zr, dr), &label) in z.chunks(classes).zip(d.chunks_mut(classes)).zip(labels) {
            let max = zr.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0.0f32;
            for (dv, &zv) in dr.iter_mut().zip(zr) {
                *dv = (zv - max).exp();
                sum += *dv;
            }
            for dv in dr.iter_mut() {
                *dv /= sum;
            }
            if let Some(dv) = dr.get_mut(label as usize) {
                *dv -= 1.0;
            }
        }
        Ok(())
    }

    fn sgd(
        &self,
        opt: &Sgd,
        p: &mut Vec<f32>,
        g: &Vec<f32>,
        v: &mut Vec<f32>,
        grad_scale: f32,
    ) -> Result<(), Error> {
        let g = gradient_for(p, g)?;
        opt.step(p, g, v, grad_scale);
        Ok(())
    }

    fn adamw(
        &self,
        opt: &AdamW,
        p: &mut Vec<f32>,
        g: &Vec<f32>,
        m: &mut Vec<f32>,
        v: &mut Vec<f32>,
        grad_scale: f32,
        t: u32,
    ) -> Result<(), Error> {
        let g = gradient_for(p, g)?;
        opt.step(p, g, m, v, grad_scale, t);
        Ok(())
    }
}

/// The first `p.len()` elements of `g` (a gradient buffer may hold a loss slot after them), or an
/// error where `g` is shorter than the parameters.
fn gradient_for<'g>(p: &[f32], g: &'g [f32]) -> Result<&'g [f32], Error> {
    g.get(..p.len()).ok_or_else(|| {
        Error::InvalidArgument(format!(
            "a gradient of {} elements for {} parameters",
            g.len(),
            p.len()
        ))
    })
}
