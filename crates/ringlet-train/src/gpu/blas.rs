//! cuBLAS's single-precision GEMM on a device's stream, for row-major matrices.
//!
//! cuBLAS is column-major. A row-major matrix read as column-major is its transpose, so the
//! row-major `C = op(A)·op(B)` is the column-major `Cᵀ = op(B)ᵀ·op(A)ᵀ`: the same memory, the
//! operands swapped ([`Gemm::column_major`]). The handle keeps cuBLAS's default math mode, so
//! products are computed in FP32 (no TF32), as the CPU does.

use cudarc::cublas::{result, sys};
use cudarc::driver::sys::CUdeviceptr;
use ringlet_cuda::launch::Kernels;
use ringlet_cuda::CudaError;
use std::ffi::c_int;

/// `C[m, n] = beta·C + op(A)[m, k]·op(B)[k, n]`, all row-major. `op(A)` is A stored `[m, k]`,
/// or with `trans_a` the transpose of A stored `[k, m]`; likewise B (`[n, k]` with `trans_b`).
/// C is `[m, n]`, contiguous.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gemm {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
}

/// The arguments of a column-major `gemm(transa, transb, m, n, k, A, lda, B, ldb, C, ldc)`:
/// its first operand is the row-major B's memory, its second the row-major A's.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ColumnMajor {
    pub trans_first: bool,
    pub trans_second: bool,
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub ld_first: usize,
    pub ld_second: usize,
    pub ldc: usize,
}

impl Gemm {
    /// The row length of A as stored.
    pub fn a_row(&self) -> usize {
        if self.trans_a {
            self.m
        } else {
            self.k
        }
    }

    /// The row length of B as stored.
    pub fn b_row(&self) -> usize {
        if self.trans_b {
            self.k
        } else {
            self.n
        }
    }

    /// Elements of A, B and C.
    pub fn lens(&self) -> [usize; 3] {
        [self.m * self.k, self.k * self.n, self.m * self.n]
    }

    pub fn column_major(&self) -> ColumnMajor {
        ColumnMajor {
            trans_first: self.trans_b,
            trans_second: self.trans_a,
            m: self.n,
            n: self.m,
            k: self.k,
            ld_first: self.b_row(),
            ld_second: self.a_row(),
            ldc: self.n,
        }
    }
}

/// Loads cuBLAS (a CUDA 12 or 13 install, `RINGLET_CUBLAS_LIB`, or pip's `nvidia-cublas` wheels
/// of either layout): a typed [`CudaError::NoCuda`] where there is none, never cudarc's panic.
pub fn load() -> Result<(), CudaError> {
    // Logged once per process: the version and file in use.
    ringlet_cuda::libs::found(ringlet_cuda::libs::CudaLib::Cublas).map(|_| ())
}

/// cuBLAS's version (major, minor, patch): needs the library, not a GPU.
pub fn version() -> Result<(i32, i32, i32), CudaError> {
    ringlet_cuda::versions::cublas_version()
}

fn blas(e: result::CublasError) -> CudaError {
    CudaError::Driver(format!("cuBLAS: {e}"))
}

/// A cuBLAS handle bound to one device's stream.
pub struct Blas {
    handle: sys::cublasHandle_t,
    ctx: std::sync::Arc<cudarc::driver::CudaContext>,
}

impl Blas {
    /// Loads cuBLAS (a CUDA install, `RINGLET_CUBLAS_LIB`, or pip's `nvidia-cublas` wheels) and
    /// makes a handle that queues its work on `kernels`' stream.
    pub fn new(kernels: &Kernels) -> Result<Blas, CudaError> {
        load()?;
        kernels.ctx.bind_to_thread()?;
        let handle = result::create_handle().map_err(blas)?;
        let blas_handle = Blas {
            handle,
            ctx: kernels.ctx.clone(),
        };
        // SAFETY: a live handle and the live stream of the same context; the stream outlives the
        // handle (both belong to the GPU that owns this Blas).
        unsafe { result::set_stream(handle, kernels.stream.cu_stream() as sys::cudaStream_t) }
            .map_err(blas)?;
        Ok(blas_handle)
    }

    /// Queues `g` on the stream: `c = beta·c + op(a)·op(b)`.
    ///
    /// # Safety
    /// `a`, `b` and `c` must address at least `g.lens()` f32 each on this handle's context, and
    /// stay allocated until the stream has run the product; `c` must not overlap `a` or `b`.
    pub unsafe fn sgemm(
        &self,
        g: &Gemm,
        a: CUdeviceptr,
        b: CUdeviceptr,
        c: CUdeviceptr,
        beta: f32,
    ) -> Result<(), CudaError> {
        if g.m == 0 || g.n == 0 {
            return Ok(());
        }
        let cm = g.column_major();
        let int = |v: usize| {
            c_int::try_from(v)
                .map_err(|_| CudaError::Driver(format!("cuBLAS: dimension {v} exceeds i32")))
        };
        // Leading dimensions must be at least 1 even where a dimension is 0 (k = 0: c = beta·c).
        let ld = |v: usize| int(v.max(1));
        let op = |t: bool| {
            if t {
                sys::cublasOperation_t::CUBLAS_OP_T
            } else {
                sys::cublasOperation_t::CUBLAS_OP_N
            }
        };
        let alpha = 1.0f32;
        self.ctx.bind_to_thread()?;
        // SAFETY: the caller vouches for the three buffers; the leading dimensions are those of
        // the row-major operands as stored (see Gemm::column_major), alpha and beta are host
        // values read during the call.
        unsafe {
            result::sgemm(
                self.handle,
                op(cm.trans_first),
                op(cm.trans_second),
                int(cm.m)?,
                int(cm.n)?,
                int(cm.k)?,
                &alpha,
                b as *const f32,
                ld(cm.ld_first)?,
                a as *const f32,
                ld(cm.ld_second)?,
                &beta,
                c as *mut f32,
                ld(cm.ldc)?,
            )
        }
        .map_err(blas)
    }
}

impl Drop for Blas {
    fn drop(&mut self) {
        let _ = self.ctx.bind_to_thread();
        // SAFETY: the handle was created by Blas::new and is destroyed once, here.
        let _ = unsafe { result::destroy_handle(self.handle) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// BLAS's column-major definition, element by element: the reference the mapping must meet.
    #[allow(clippy::too_many_arguments)]
    fn column_major_gemm(cm: &ColumnMajor, first: &[f32], second: &[f32], c: &mut [f32]) {
        for j in 0..cm.n {
            for i in 0..cm.m {
                let mut s = 0.0f32;
                for p in 0..cm.k {
                    let x = if cm.trans_first {
                        first[i * cm.ld_first + p]
                    } else {
                        first[p * cm.ld_first + i]
                    };
                    let y = if cm.trans_second {
                        second[p * cm.ld_second + j]
                    } else {
                        second[j * cm.ld_second + p]
                    };
                    s += x * y;
                }
                c[j * cm.ldc + i] = s;
            }
        }
    }

    /// The library loads from where users have it (CI: the `nvidia-cublas-cu12` wheel; both majors in tests/cuda_majors.rs) and its
    /// entry points resolve; a GPU is not needed for that.
    #[test]
    fn cublas_loads_and_reports_its_version() {
        match version() {
            Ok((major, minor, patch)) => {
                println!("cuBLAS {major}.{minor}.{patch}");
                assert!(major >= 11, "cuBLAS {major}.{minor}");
            }
            Err(e) => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "cuBLAS is missing in CI ({e}): .ci/run installs nvidia-cublas-cu12"
                );
                ringlet_core::skipped!("{e} (pip install nvidia-cublas, or nvidia-cublas-cu12)");
            }
        }
    }

    /// Every transpose combination gives the row-major product it describes.
    #[test]
    fn row_major_products_map_onto_column_major_blas() {
        let (m, n, k) = (3, 5, 4);
        for trans_a in [false, true] {
            for trans_b in [false, true] {
                let g = Gemm {
                    m,
                    n,
                    k,
                    trans_a,
                    trans_b,
                };
                let a: Vec<f32> = (0..m * k).map(|v| v as f32 * 0.5 - 2.0).collect();
                let b: Vec<f32> = (0..k * n).map(|v| 3.0 - v as f32 * 0.25).collect();
                let at = |i: usize, p: usize| if trans_a { a[p * m + i] } else { a[i * k + p] };
                let bt = |p: usize, j: usize| if trans_b { b[j * k + p] } else { b[p * n + j] };
                let mut c = vec![0.0f32; m * n];
                column_major_gemm(&g.column_major(), &b, &a, &mut c);
                for i in 0..m {
                    for j in 0..n {
                        let want: f32 = (0..k).map(|p| at(i, p) * bt(p, j)).sum();
                        assert_eq!(c[i * n + j], want, "{g:?} at ({i}, {j})");
                    }
                }
            }
        }
    }
}
