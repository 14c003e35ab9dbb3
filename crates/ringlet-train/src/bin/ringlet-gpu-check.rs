//! `ringlet-gpu-check`: the reduction kernels of `kernels/` on this machine's first GPU against
//! `ringlet-core`'s host reducers (fresh random data, every bit compared), and the reduction
//! kernel's bandwidth against a device-to-device copy. `--compile-only` needs no GPU: it compiles
//! every kernel of `kernels/` (the collectives' and the trainer's) for every architecture with
//! the NVRTC it finds, and prints the CUDA libraries found (version and file).
//! Exits 1 on any difference or failed compilation, 2 without CUDA (or NVRTC).
//! `scripts/gpu-check.sh` runs it with the other GPU checks (the optimizer kernels are checked
//! against their references by `ringlet-train`'s GPU tests).

use clap::Parser;
use ringlet_cuda::kernels::{self as compiler, Target, ARCHS};
use ringlet_cuda::libs::{self, CudaLib};
use ringlet_train::gpu::kernels::{differing, CheckRng};

use cudarc::driver::{CudaSlice, DeviceRepr};
use ringlet_core::{Element, ReduceOp};
use ringlet_cuda::launch::{suffix, Kernels};
use ringlet_cuda::CudaError;
use std::time::Instant;

fn check_reduce<T: Element + DeviceRepr>(
    k: &Kernels,
    rng: &mut CheckRng,
    n: usize,
) -> Result<usize, CudaError> {
    let mut wrong = 0;
    let scale = if matches!(T::DTYPE, ringlet_core::DType::U8) {
        60.0
    } else {
        1000.0
    };
    for op in [
        ReduceOp::Sum,
        ReduceOp::Prod,
        ReduceOp::Min,
        ReduceOp::Max,
        ReduceOp::Avg,
    ] {
        let (a, b): (Vec<T>, Vec<T>) = (rng.vec(n, scale), rng.vec(n, scale));
        let mut acc: CudaSlice<T> = k.stream.clone_htod(&a)?;
        let src: CudaSlice<T> = k.stream.clone_htod(&b)?;
        k.reduce(op, &mut acc, &src)?;
        let mut cpu = a.clone();
        T::reduce_into(op, &mut cpu, &b);
        if op == ReduceOp::Avg {
            k.divide(&mut acc, 3)?;
            T::divide_by(&mut cpu, 3);
        }
        let gpu = k.stream.clone_dtoh(&acc)?;
        let diff = differing(&gpu, &cpu);
        println!(
            "  {:<6} {:<5} {:>9} elements {:>7} differ",
            suffix::<T>(),
            op.name(),
            n,
            diff
        );
        wrong += diff;
    }
    Ok(wrong)
}

/// Median GB/s of `f` moving `bytes` per call.
fn rate(
    k: &Kernels,
    bytes: usize,
    mut f: impl FnMut() -> Result<(), CudaError>,
) -> Result<f64, CudaError> {
    f()?;
    k.stream.synchronize()?;
    let mut times: Vec<f64> = (0..20)
        .map(|_| {
            let t = Instant::now();
            f()?;
            k.stream.synchronize()?;
            Ok(t.elapsed().as_secs_f64())
        })
        .collect::<Result<_, CudaError>>()?;
    times.sort_by(f64::total_cmp);
    Ok(bytes as f64 / times[times.len() / 2] / 1e9)
}

fn bandwidth(k: &Kernels) -> Result<(), CudaError> {
    let n = 64 << 20; // 256 MiB of f32
    let mut a: CudaSlice<f32> = k.stream.alloc_zeros(n)?;
    let b: CudaSlice<f32> = k.stream.alloc_zeros(n)?;
    let mut c: CudaSlice<f32> = k.stream.alloc_zeros(n)?;
    // A copy reads and writes n elements; the reduction reads two and writes one.
    let copy = rate(k, 2 * 4 * n, || {
        k.stream.memcpy_dtod(&b, &mut c).map_err(CudaError::from)
    })?;
    let sum = rate(k, 3 * 4 * n, || k.reduce(ReduceOp::Sum, &mut a, &b))?;
    println!(
        "  sum_f32 over 256 MiB: {sum:.0} GB/s; device-to-device copy: {copy:.0} GB/s; ratio {:.2} (target >= 0.85)",
        sum / copy
    );
    Ok(())
}

/// The CUDA libraries found: version and file, or why not.
fn print_libraries() {
    let libs = [
        CudaLib::Driver,
        CudaLib::Nvrtc,
        CudaLib::Cublas,
        CudaLib::Nccl,
    ];
    for line in libs::summary(&libs) {
        println!("{line}");
    }
}

fn run() -> Result<usize, CudaError> {
    print_libraries();
    let list = ringlet_cuda::devices()?;
    for d in &list {
        println!(
            "device {}: {} sm_{} {:.1} GiB pci {}",
            d.ordinal,
            d.name,
            d.arch(),
            d.total_memory as f64 / (1u64 << 30) as f64,
            d.pci_bus_id
        );
    }
    let t = Instant::now();
    let k = Kernels::new(0)?;
    println!(
        "kernels for sm_{} ready in {:.2} s (NVRTC or the kernel cache)",
        k.arch,
        t.elapsed().as_secs_f64()
    );
    let mut rng = CheckRng::fresh();
    let n = (1 << 22) + 3; // not a multiple of any block size
    println!("reductions vs ringlet-core's host reducers (bits):");
    let mut wrong = check_reduce::<f32>(&k, &mut rng, n)?;
    wrong += check_reduce::<half::f16>(&k, &mut rng, n)?;
    wrong += check_reduce::<half::bf16>(&k, &mut rng, n)?;
    wrong += check_reduce::<f64>(&k, &mut rng, n)?;
    wrong += check_reduce::<i32>(&k, &mut rng, n)?;
    wrong += check_reduce::<i64>(&k, &mut rng, n)?;
    wrong += check_reduce::<u8>(&k, &mut rng, n)?;
    println!("bandwidth:");
    bandwidth(&k)?;
    Ok(wrong)
}

/// Checks Ringlet's CUDA kernels on this machine.
#[derive(Parser)]
#[command(name = "ringlet-gpu-check", version)]
struct Args {
    /// Compile every kernel for every architecture of sm_70 to sm_120 that the NVRTC found knows
    /// (CUDA 13's no longer knows sm_70), and the PTX fallback for a newer device, and
    /// report the CUDA libraries found; needs no GPU.
    #[arg(long)]
    compile_only: bool,
}

/// Every kernel source of `kernels/`.
const SOURCES: [&compiler::KernelSource; 3] = [
    &compiler::REDUCE,
    &ringlet_train::gpu::kernels::MODEL,
    &ringlet_train::gpu::kernels::OPTIM,
];

fn compile_only() -> Result<usize, CudaError> {
    print_libraries();
    let nvrtc = libs::found(CudaLib::Nvrtc)?;
    let supported = compiler::supported_archs()?;
    println!("NVRTC {} at {}", nvrtc.version, nvrtc.path.display());
    println!("NVRTC architectures: {supported:?}");
    let known: Vec<u32> = ARCHS
        .into_iter()
        .filter(|a| supported.contains(a))
        .collect();
    let mut failed = 0;
    for arch in ARCHS.iter().filter(|a| !known.contains(a)) {
        match compiler::target_for(*arch, &supported) {
            Ok(t) => println!("sm_{arch}: {t} (this NVRTC does not know sm_{arch})"),
            Err(why) => println!("sm_{arch}: not built: {why}"),
        }
    }
    let t = Instant::now();
    match compiler::check_compiles(&SOURCES, &known) {
        Ok(done) => {
            println!(
                "{:<8} {:<10} {:>8} {:>10} {:>8}",
                "target", "source", "kernels", "bytes", "seconds"
            );
            for c in &done {
                println!(
                    "{:<8} {:<10} {:>8} {:>10} {:>8.2}",
                    c.target.to_string(),
                    c.source,
                    c.kernels,
                    c.bytes,
                    c.seconds
                );
            }
            println!(
                "compiled {} kernel sources for {} architectures in {:.1} s",
                SOURCES.len(),
                known.len(),
                t.elapsed().as_secs_f64()
            );
        }
        Err(e) => {
            println!("FAILED: {e}");
            failed += 1;
        }
    }
    // A device newer than this NVRTC knows gets PTX of the newest architecture it knows.
    let newer = supported.last().copied().unwrap_or(0) + 1;
    let target = compiler::target_for(newer, &supported).map_err(|log| CudaError::Compile {
        kernel: "every kernel",
        arch: newer,
        log,
    })?;
    for source in SOURCES {
        match compiler::compile(source, target, None) {
            Ok(image)
                if compiler::missing_kernels(source, &image).is_empty()
                    && matches!(target, Target::Ptx(_)) => {}
            Ok(_) => {
                println!(
                    "FAILED: {} for sm_{newer}: not the PTX fallback",
                    source.name
                );
                failed += 1;
            }
            Err(e) => {
                println!("FAILED: {e}");
                failed += 1;
            }
        }
    }
    println!("sm_{newer} (unknown to this NVRTC): {target} for every source");
    Ok(failed)
}

fn main() {
    let args = Args::parse();
    let outcome = if args.compile_only {
        compile_only()
    } else {
        run()
    };
    match outcome {
        Ok(0) if args.compile_only => println!("ringlet-gpu-check: every kernel compiles"),
        Ok(0) => println!("ringlet-gpu-check: every reduction kernel matches its CPU reference"),
        Ok(failed) if args.compile_only => {
            println!("ringlet-gpu-check: {failed} compilations failed");
            std::process::exit(1);
        }
        Ok(wrong) => {
            println!("ringlet-gpu-check: {wrong} elements differ");
            std::process::exit(1);
        }
        Err(e @ CudaError::NoCuda { .. }) => {
            ringlet_core::error_line!("ringlet-gpu-check: {e}");
            std::process::exit(2);
        }
        Err(e) => {
            ringlet_core::error_line!("ringlet-gpu-check: {e}");
            std::process::exit(1);
        }
    }
}
