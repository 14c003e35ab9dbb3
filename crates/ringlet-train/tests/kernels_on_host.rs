//! The GPU model's kernels (kernels/model.cu) and the optimizers (kernels/optim.cu), compiled as
//! host C++ through a small shim (tests/shim/cuda_host.h: a launch runs every block and thread
//! in turn) and checked against the CPU backend they stand in for. This pins what can go wrong in
//! them without a GPU — indexing, grid-stride loops, order of sums, the math — on machines where
//! no GPU will ever run them; scripts/gpu-check.sh runs the real thing on a GPU.
//!
//! Needs a C++ compiler (`c++`); in CI its absence fails the test, elsewhere it skips.

use rand::{RngExt, SeedableRng};
use rand_chacha::ChaCha8Rng;
use ringlet_train::optim::{AdamW, Sgd};
use ringlet_train::tensor::{Backend, Host};
use std::ffi::{c_void, CString};
use std::path::PathBuf;
use std::process::Command;

/// The shim library, built once per test process (tests run on several threads).
struct Kernels {
    handle: *mut c_void,
}

// SAFETY: the handle is only passed to dlsym, which is thread-safe; the library's launch state
// is thread_local (cuda_host.h).
unsafe impl Send for Kernels {}
// SAFETY: as above.
unsafe impl Sync for Kernels {}

impl Kernels {
    fn get_or_build() -> Option<&'static Kernels> {
        static BUILT: std::sync::OnceLock<Option<Kernels>> = std::sync::OnceLock::new();
        BUILT.get_or_init(Kernels::build).as_ref()
    }

    fn build() -> Option<Kernels> {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
        let shim = root.join("tests/shim");
        let out = std::env::temp_dir().join(format!("ringlet-kernels-{}.so", std::process::id()));
        let compiled = Command::new("c++")
            .args(["-std=c++17", "-O1", "-ffp-contract=off", "-fPIC", "-shared"])
            .arg("-include")
            .arg(shim.join("cuda_host.h"))
            .arg(format!("-I{}", root.join("../../kernels").display()))
            .arg(shim.join("kernels.cpp"))
            .arg("-o")
            .arg(&out)
            .output();
        match compiled {
            Ok(o) if o.status.success() => {}
            Ok(o) => panic!(
                "the kernels do not compile as host C++:\n{}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => {
                assert!(
                    std::env::var_os("CI").is_none(),
                    "no C++ compiler in CI ({e}): .ci/run needs g++"
                );
                ringlet_core::skipped!("no C++ compiler (c++: {e})");
                return None;
            }
        }
        let path = CString::new(out.to_str().unwrap()).unwrap();
        // SAFETY: dlopen of the library just built, by its NUL-terminated path; kept open for
        // the test's life.
        let handle = unsafe { libc::dlopen(path.as_ptr(), libc::RTLD_NOW) };
        let _ = std::fs::remove_file(&out);
        assert!(!handle.is_null(), "dlopen of the shim failed");
        Some(Kernels { handle })
    }

    /// The host function of `kernel`, typed as `F` (a matching `extern "C" fn` type).
    fn get<F: Copy>(&self, kernel: &str) -> F {
        let name = CString::new(format!("host_{kernel}")).unwrap();
        // SAFETY: dlsym on the open handle; the symbol is one of kernels.cpp's functions.
        let sym = unsafe { libc::dlsym(self.handle, name.as_ptr()) };
        assert!(!sym.is_null(), "no host_{kernel} in the shim");
        assert_eq!(std::mem::size_of::<F>(), std::mem::size_of::<*mut c_void>());
        // SAFETY: F is the extern "C" fn type of kernels.cpp's wrapper for this kernel (each
        // call site below spells out the signature it has there).
        unsafe { std::mem::transmute_copy(&sym) }
    }
}

/// Launch shapes: one thread for everything, and a grid smaller than the work (grid-stride).
const SHAPES: [(u32, u32); 3] = [(1, 1), (3, 5), (64, 256)];

fn random(rng: &mut ChaCha8Rng, n: usize, scale: f32) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-scale..scale)).collect()
}

/// Bit-equality, naming the first element that differs.
fn same_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: lengths");
    if let Some(i) = (0..got.len()).find(|&i| got[i].to_bits() != want[i].to_bits()) {
        panic!(
            "{what}: element {i} is {:?}, the CPU backend gives {:?}",
            got[i], want[i]
        );
    }
}

#[test]
fn model_kernels_match_the_cpu_backend() {
    let Some(k) = Kernels::get_or_build() else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    let (rows, cols) = (37usize, 23usize);
    let (r64, c64) = (rows as u64, cols as u64);
    for (grid, block) in SHAPES {
        let shape = format!("grid {grid} block {block}");

        type FillRows = extern "C" fn(u32, u32, *mut f32, *const f32, u64, u64);
        let bias = random(&mut rng, cols + 3, 1.0);
        let (mut want, mut got) = (vec![9.0f32; rows * cols], vec![9.0f32; rows * cols]);
        Host.fill_rows(&mut want, rows, cols, (&bias, 3)).unwrap();
        k.get::<FillRows>("fill_rows_f32")(
            grid,
            block,
            got.as_mut_ptr(),
            bias[3..].as_ptr(),
            r64,
            c64,
        );
        same_bits(&got, &want, &format!("fill_rows, {shape}"));

        type Relu = extern "C" fn(u32, u32, *mut f32, u64);
        let mut x = random(&mut rng, rows * cols, 1.0);
        x[5] = f32::NAN;
        x[6] = -0.0;
        let (mut want, mut got) = (x.clone(), x.clone());
        Host.relu(&mut want, x.len()).unwrap();
        k.get::<Relu>("relu_f32")(grid, block, got.as_mut_ptr(), x.len() as u64);
        same_bits(&got, &want, &format!("relu, {shape}"));

        type Mask = extern "C" fn(u32, u32, *mut f32, *const f32, u64);
        let delta = random(&mut rng, rows * cols, 1.0);
        let mut act = random(&mut rng, rows * cols, 1.0);
        act[7] = f32::NAN;
        act[8] = 0.0;
        let (mut want, mut got) = (delta.clone(), delta.clone());
        Host.relu_mask(&mut want, &act, delta.len()).unwrap();
        k.get::<Mask>("relu_mask_f32")(
            grid,
            block,
            got.as_mut_ptr(),
            act.as_ptr(),
            delta.len() as u64,
        );
        same_bits(&got, &want, &format!("relu_mask, {shape}"));

        type Sums = extern "C" fn(u32, u32, *const f32, *mut f32, u64, u64);
        let m = random(&mut rng, rows * cols, 3.0);
        let mut want = vec![5.0f32; cols + 2];
        let mut got = want.clone();
        Host.column_sums(&m, rows, cols, (&mut want, 2)).unwrap();
        k.get::<Sums>("column_sums_f32")(grid, block, m.as_ptr(), got[2..].as_mut_ptr(), r64, c64);
        same_bits(
            &got,
            &want,
            &format!("column_sums (same order of sums), {shape}"),
        );

        let classes = 10usize;
        let z = random(&mut rng, rows * classes, 8.0);
        let mut y: Vec<u32> = (0..rows)
            .map(|_| rng.random_range(0..classes as u32))
            .collect();
        // A tie for the arg max: the first wins on both.
        let mut z = z;
        z[3 * classes + 4] = 50.0;
        z[3 * classes + 6] = 50.0;
        type Loss = extern "C" fn(u32, u32, *const f32, *const u32, *mut f64, *mut u32, u64, u64);
        let loss_kernel = |y: &[u32]| {
            let mut loss = vec![0.0f64; rows];
            let mut hits = vec![7u32; rows];
            k.get::<Loss>("softmax_loss_f32")(
                grid,
                block,
                z.as_ptr(),
                y.as_ptr(),
                loss.as_mut_ptr(),
                hits.as_mut_ptr(),
                r64,
                classes as u64,
            );
            (loss, hits)
        };
        let (loss, hits) = loss_kernel(&y);
        let (want_loss, want_hits) = Host.softmax_loss(&z, &y, rows, classes).unwrap();
        let got_loss: f64 = loss.iter().sum();
        assert!(
            (got_loss - want_loss).abs() <= 1e-12 * want_loss.abs(),
            "softmax loss {got_loss} vs {want_loss}, {shape}"
        );
        assert_eq!(
            hits.iter().sum::<u32>() as usize,
            want_hits,
            "correct, {shape}"
        );
        assert!(hits.iter().all(|&h| h <= 1));

        type Grad = extern "C" fn(u32, u32, *const f32, *const u32, *mut f32, u64, u64);
        let mut want = vec![0.0f32; rows * classes];
        let mut got = vec![1.0f32; rows * classes];
        Host.softmax_grad(&z, &y, rows, classes, &mut want).unwrap();
        k.get::<Grad>("softmax_grad_f32")(
            grid,
            block,
            z.as_ptr(),
            y.as_ptr(),
            got.as_mut_ptr(),
            r64,
            classes as u64,
        );
        for (i, (g, w)) in got.iter().zip(&want).enumerate() {
            assert!(
                (g - w).abs() <= 1e-6,
                "softmax grad [{i}] {g} vs {w}, {shape}"
            );
        }
        for row in got.chunks(classes) {
            let s: f32 = row.iter().sum();
            assert!(
                s.abs() < 1e-5,
                "a row of softmax - onehot sums to 0, not {s}"
            );
        }

        // A label out of range: NaN loss on both, no write out of the row.
        y[0] = classes as u32;
        let (loss, hits) = loss_kernel(&y);
        assert!(loss[0].is_nan() && hits[0] == 0);
        assert!(Host.softmax_loss(&z, &y, rows, classes).unwrap().0.is_nan());
    }
}

#[test]
fn optimizer_kernels_match_the_reference_bit_for_bit() {
    let Some(k) = Kernels::get_or_build() else {
        return;
    };
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let n = 1000;
    let sgd = Sgd {
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 1e-4,
    };
    let adamw = AdamW::default();
    type SgdK = extern "C" fn(u32, u32, *mut f32, *const f32, *mut f32, u64, f32, f32, f32, f32);
    type AdamK = extern "C" fn(
        u32,
        u32,
        *mut f32,
        *const f32,
        *mut f32,
        *mut f32,
        u64,
        f32,
        f32,
        f32,
        f32,
        f32,
        f32,
        f32,
        f32,
    );
    for (grid, block) in SHAPES {
        let p0 = random(&mut rng, n, 1.0);
        let (mut p, mut v) = (p0.clone(), vec![0.0f32; n]);
        let (mut q, mut w) = (p0.clone(), vec![0.0f32; n]);
        for _ in 0..3 {
            let g = random(&mut rng, n, 10.0);
            sgd.step(&mut p, &g, &mut v, 0.125);
            k.get::<SgdK>("sgd_momentum_f32")(
                grid,
                block,
                q.as_mut_ptr(),
                g.as_ptr(),
                w.as_mut_ptr(),
                n as u64,
                sgd.lr,
                sgd.momentum,
                sgd.weight_decay,
                0.125,
            );
        }
        same_bits(&q, &p, &format!("sgd, grid {grid} block {block}"));
        same_bits(&w, &v, "sgd momentum");

        let (mut p, mut m, mut v) = (p0.clone(), vec![0.0f32; n], vec![0.0f32; n]);
        let (mut q, mut m2, mut v2) = (p0.clone(), vec![0.0f32; n], vec![0.0f32; n]);
        for t in 1..=3 {
            let g = random(&mut rng, n, 10.0);
            adamw.step(&mut p, &g, &mut m, &mut v, 0.125, t);
            let (b1, b2) = adamw.bias_corrections(t);
            k.get::<AdamK>("adamw_f32")(
                grid,
                block,
                q.as_mut_ptr(),
                g.as_ptr(),
                m2.as_mut_ptr(),
                v2.as_mut_ptr(),
                n as u64,
                adamw.lr,
                adamw.beta1,
                adamw.beta2,
                adamw.eps,
                adamw.weight_decay,
                0.125,
                b1,
                b2,
            );
        }
        same_bits(&q, &p, &format!("adamw, grid {grid} block {block}"));
        same_bits(&m2, &m, "adamw m");
        same_bits(&v2, &v, "adamw v");
    }
}
