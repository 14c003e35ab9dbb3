//! The CUDA C of `kernels/reduce.cu`, embedded, and the compilation of any [`KernelSource`] with
//! NVRTC for a device's architecture.
//!
//! A device whose architecture NVRTC knows gets machine code (a CUBIN for `sm_XY`): it loads
//! without the driver's PTX compiler, so an NVRTC newer than the driver within one CUDA major
//! works (CUDA's minor-version compatibility; PTX from it would not load). A device newer than
//! NVRTC knows gets PTX for the newest architecture NVRTC supports, compiled by the driver when
//! loaded, with a log line saying so. Compiled images are cached on disk, keyed by source,
//! options, target and NVRTC version, sealed with a checksum; a cached file that fails its seal
//! or lacks an expected kernel is compiled again.

pub use crate::kernel_cache::cache_dir;
use crate::kernel_cache::{store, verified};
use crate::libs::{self, CudaLib};
use crate::CudaError;
use cudarc::nvrtc::{result as nvrtc, sys as nvrtc_sys};
use sha2::{Digest, Sha256};
use std::ffi::CString;
use std::path::PathBuf;

/// A `.cu` file of `kernels/` and the kernels it must define (other crates define their own,
/// e.g. `ringlet-train`'s model and optimizer kernels).
pub struct KernelSource {
    pub name: &'static str,
    pub code: &'static str,
    pub kernels: fn() -> Vec<String>,
}

const TYPES: [&str; 7] = ["f32", "f64", "f16", "bf16", "i32", "i64", "u8"];

/// `acc[i] = op(acc[i], in[i])` for every op and element type, and `divide_<type>`.
pub const REDUCE: KernelSource = KernelSource {
    name: "reduce.cu",
    code: include_str!("../../../kernels/reduce.cu"),
    kernels: || {
        let mut names = Vec::new();
        for t in TYPES {
            for op in ["sum", "prod", "min", "max", "divide"] {
                names.push(format!("{op}_{t}"));
            }
        }
        names
    },
};

/// The kernels of `kernels/` that the collectives use (the trainer's own, `model.cu` and
/// `optim.cu`, are `ringlet-train`'s: it compiles them with [`compile`] too).
pub const ALL: [&KernelSource; 1] = [&REDUCE];

/// Options every kernel is compiled with: no fused multiply-add, so results round like the
/// Rust references.
const OPTIONS: [&str; 2] = ["--fmad=false", "--std=c++17"];

/// The architectures Ringlet's kernels are built and checked for, where the NVRTC found knows
/// them: Volta (sm_70, CUDA 12's NVRTC only), Turing, Ampere, Ada, Hopper, and Blackwell
/// (sm_100, sm_120).
pub const ARCHS: [u32; 8] = [70, 75, 80, 86, 89, 90, 100, 120];

/// What NVRTC makes for one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// Machine code for `sm_<arch>`.
    Sass(u32),
    /// PTX for `compute_<arch>`, for a device of a newer architecture (the driver compiles it).
    Ptx(u32),
}

impl std::fmt::Display for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Target::Sass(a) => write!(f, "sm_{a}"),
            Target::Ptx(a) => write!(f, "compute_{a} PTX"),
        }
    }
}

/// A compiled kernel source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    pub target: Target,
    /// A CUBIN (ELF) for [`Target::Sass`], PTX text for [`Target::Ptx`].
    pub bytes: Vec<u8>,
}

/// Loads NVRTC: [`CudaError::NoCuda`] where there is none.
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    // SAFETY: is_culib_present only asks whether cudarc can open the library; no NVRTC call.
    libs::require(CudaLib::Nvrtc, || unsafe { nvrtc_sys::is_culib_present() })?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: nvrtcVersion writes two ints through valid pointers to our locals.
    let status = unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) };
    if status != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(CudaError::Driver(format!("nvrtcVersion: {status:?}")));
    }
    Ok((major, minor))
}

/// The architectures this NVRTC compiles for, ascending (`nvrtcGetSupportedArchs`).
pub fn supported_archs() -> Result<Vec<u32>, CudaError> {
    nvrtc_version()?;
    let mut n = 0;
    // SAFETY: writes one int through a valid pointer to our local.
    let status = unsafe { nvrtc_sys::nvrtcGetNumSupportedArchs(&mut n) };
    if status != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS || !(0..=1024).contains(&n) {
        return Err(CudaError::Driver(format!(
            "nvrtcGetNumSupportedArchs: {status:?} ({n})"
        )));
    }
    let mut archs = vec![0; n as usize];
    // SAFETY: the buffer holds the `n` ints NVRTC just said it will write.
    let status = unsafe { nvrtc_sys::nvrtcGetSupportedArchs(archs.as_mut_ptr()) };
    if status != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(CudaError::Driver(format!(
            "nvrtcGetSupportedArchs: {status:?}"
        )));
    }
    let mut archs: Vec<u32> = archs
        .into_iter()
        .filter_map(|a| u32::try_from(a).ok())
        .collect();
    archs.sort_unstable();
    Ok(archs)
}

/// What to build for a device of `sm_<arch>` with an NVRTC that supports `supported`: its own
/// machine code where NVRTC knows it; else PTX of the newest older architecture NVRTC knows;
/// an architecture older than any it knows (CUDA 13 dropped Volta) is an error saying so.
pub fn target_for(arch: u32, supported: &[u32]) -> Result<Target, String> {
    if supported.contains(&arch) {
        return Ok(Target::Sass(arch));
    }
    match supported.iter().copied().filter(|&a| a < arch).max() {
        Some(newest) => Ok(Target::Ptx(newest)),
        None => Err(format!(
            "this NVRTC compiles for sm_{} to sm_{}, not for sm_{arch}; use an older CUDA's \
             NVRTC (CUDA 13 dropped sm_70 and sm_72: pip's nvidia-cuda-nvrtc-cu12, or \
             RINGLET_NVRTC_LIB)",
            supported.first().copied().unwrap_or(0),
            supported.last().copied().unwrap_or(0)
        )),
    }
}

/// [`target_for`] with this machine's NVRTC, logging a fallback to PTX.
pub fn target(arch: u32) -> Result<Target, CudaError> {
    let supported = supported_archs()?;
    let t = target_for(arch, &supported).map_err(|log| CudaError::Compile {
        kernel: "every kernel",
        arch,
        log,
    })?;
    if let Target::Ptx(newest) = t {
        let (major, minor) = nvrtc_version()?;
        tracing::info!(
            "NVRTC {major}.{minor} does not know sm_{arch}: the kernels are PTX for compute_{newest}, compiled by the driver when loaded"
        );
    }
    Ok(t)
}

/// `source` compiled for `target`, from the cache in `cache` or compiled now.
pub fn compile(
    source: &KernelSource,
    target: Target,
    cache: Option<&std::path::Path>,
) -> Result<Image, CudaError> {
    let version = nvrtc_version()?;
    let includes = nvrtc_includes()?;
    // The headers are part of what is compiled: another install's make another image.
    let mut key = Sha256::new();
    key.update(source.code.as_bytes());
    key.update(format!("{OPTIONS:?} {target:?} {version:?} {includes:?}").as_bytes());
    let key: String = key.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let (stem, ext) = match target {
        Target::Sass(a) => (format!("sm_{a}"), "cubin"),
        Target::Ptx(a) => (format!("compute_{a}"), "ptx"),
    };
    let file = cache.map(|dir| {
        dir.join(format!(
            "{}-{stem}-nvrtc{}.{}-{key}.{ext}",
            source.name.trim_end_matches(".cu"),
            version.0,
            version.1
        ))
    });
    if let Some(f) = &file {
        if let Ok(stored) = std::fs::read(f) {
            match verified(&stored) {
                Some(bytes) => {
                    let image = Image {
                        target,
                        bytes: bytes.to_vec(),
                    };
                    if missing_kernels(source, &image).is_empty() {
                        return Ok(image);
                    }
                    tracing::warn!(file = %f.display(), "cached kernels incomplete; compiling again")
                }
                None => {
                    tracing::warn!(file = %f.display(), "cached kernels damaged; compiling again")
                }
            }
        }
    }
    let image = Image {
        target,
        bytes: nvrtc_compile(source, target, includes)?,
    };
    let missing = missing_kernels(source, &image);
    if !missing.is_empty() {
        return Err(CudaError::Compile {
            kernel: source.name,
            arch: target.arch(),
            log: format!("the {target} image lacks {}", missing.join(", ")),
        });
    }
    if let Some(file) = &file {
        // A cache that cannot be written (read-only, full) costs a compilation next time, not
        // this run.
        if let Err(e) = store(file, &image.bytes) {
            tracing::warn!("kernel cache: {e}");
        }
    }
    Ok(image)
}

impl Target {
    pub fn arch(self) -> u32 {
        match self {
            Target::Sass(a) | Target::Ptx(a) => a,
        }
    }
}

/// The header directories for the NVRTC in use, searched once per process: a process loads one
/// NVRTC for good, and the search reads directories and `cuda.h` files.
fn nvrtc_includes() -> Result<&'static [PathBuf], CudaError> {
    static DIRS: std::sync::OnceLock<Vec<PathBuf>> = std::sync::OnceLock::new();
    if let Some(dirs) = DIRS.get() {
        return Ok(dirs);
    }
    let nvrtc = libs::found(CudaLib::Nvrtc)?.path;
    Ok(DIRS.get_or_init(|| crate::headers::include_dirs(Some(&nvrtc))))
}

/// One NVRTC compilation of `source` for `target`, with the headers in `includes`.
fn nvrtc_compile(
    source: &KernelSource,
    target: Target,
    includes: &[PathBuf],
) -> Result<Vec<u8>, CudaError> {
    if includes.is_empty() {
        return Err(CudaError::NoCuda {
            library: "cuda_fp16.h",
            searched: "RINGLET_CUDA_INCLUDE, the NVRTC's own install, CUDA_HOME/include, \
                       /usr/local/cuda*/include, pip's nvidia/cu13/include and \
                       nvidia/cuda_runtime/include"
                .into(),
            env: "RINGLET_CUDA_INCLUDE",
        });
    }
    let fail = |log: String| CudaError::Compile {
        kernel: source.name,
        arch: target.arch(),
        log,
    };
    let mut options: Vec<String> = OPTIONS.iter().map(|s| s.to_string()).collect();
    options.push(match target {
        Target::Sass(a) => format!("--gpu-architecture=sm_{a}"),
        Target::Ptx(a) => format!("--gpu-architecture=compute_{a}"),
    });
    options.extend(
        includes
            .iter()
            .map(|d| format!("--include-path={}", d.display())),
    );
    let code = CString::new(source.code).map_err(|_| fail("a NUL in the source".into()))?;
    let name = CString::new(source.name).map_err(|_| fail("a NUL in the name".into()))?;
    let prog = nvrtc::create_program(&code, Some(&name)).map_err(|e| fail(format!("{e:?}")))?;
    // SAFETY: `prog` was just created from `code` and `name`, which outlive it; it is destroyed
    // once, below, whatever happens in between.
    let out = unsafe {
        let compiled = nvrtc::compile_program(prog, &options);
        let out = match compiled {
            Err(_) => Err(fail(program_log(prog))),
            Ok(()) => match target {
                Target::Sass(_) => cubin(prog).map_err(fail),
                Target::Ptx(_) => nvrtc::get_ptx(prog)
                    .map(|p| {
                        let mut bytes: Vec<u8> = p.into_iter().map(|c| c as u8).collect();
                        while bytes.last() == Some(&0) {
                            bytes.pop();
                        }
                        bytes
                    })
                    .map_err(|e| fail(format!("{e:?}"))),
            },
        };
        let _ = nvrtc::destroy_program(prog);
        out
    };
    out
}

/// # Safety
/// `prog` is a live, compiled program.
unsafe fn program_log(prog: nvrtc_sys::nvrtcProgram) -> String {
    // SAFETY: the caller's promise.
    match unsafe { nvrtc::get_program_log(prog) } {
        Ok(log) => {
            let bytes: Vec<u8> = log
                .into_iter()
                .map(|c| c as u8)
                .take_while(|&b| b != 0)
                .collect();
            String::from_utf8_lossy(&bytes).into_owned()
        }
        Err(e) => format!("(no log: {e:?})"),
    }
}

/// # Safety
/// `prog` is a live program compiled for an `sm_` architecture.
unsafe fn cubin(prog: nvrtc_sys::nvrtcProgram) -> Result<Vec<u8>, String> {
    let mut size = 0usize;
    // SAFETY: the caller's promise; writes one usize through a valid pointer.
    let status = unsafe { nvrtc_sys::nvrtcGetCUBINSize(prog, &mut size) };
    if status != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS || size == 0 || size > 1 << 30 {
        return Err(format!("nvrtcGetCUBINSize: {status:?} ({size} bytes)"));
    }
    let mut bytes = vec![0u8; size];
    // SAFETY: the buffer holds the `size` bytes NVRTC just said it will write.
    let status = unsafe { nvrtc_sys::nvrtcGetCUBIN(prog, bytes.as_mut_ptr().cast()) };
    if status != nvrtc_sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(format!("nvrtcGetCUBIN: {status:?}"));
    }
    Ok(bytes)
}

/// The kernels `source` must define that `image` does not: PTX `.entry` lines, or a CUBIN's
/// ELF symbols (a CUBIN that is not a CUDA ELF file lacks them all).
pub fn missing_kernels(source: &KernelSource, image: &Image) -> Vec<String> {
    let defined: Vec<String> = match image.target {
        Target::Ptx(_) => {
            let text = String::from_utf8_lossy(&image.bytes);
            text.lines()
                .filter_map(|l| l.trim_start().strip_prefix(".visible .entry "))
                .chain(
                    text.lines()
                        .filter_map(|l| l.trim_start().strip_prefix(".entry ")),
                )
                .filter_map(|rest| rest.split('(').next())
                .map(|n| n.trim().to_string())
                .collect()
        }
        Target::Sass(_) => cubin_functions(&image.bytes),
    };
    (source.kernels)()
        .into_iter()
        .filter(|k| !defined.contains(k))
        .collect()
}

/// The function symbols of a CUDA ELF image (`EM_CUDA`), none for anything else.
fn cubin_functions(bytes: &[u8]) -> Vec<String> {
    use object::{Object, ObjectSymbol};
    const EM_CUDA: u16 = 190;
    let Ok(file) = object::read::elf::ElfFile64::<object::Endianness>::parse(bytes) else {
        return Vec::new();
    };
    use object::read::elf::FileHeader;
    if file.elf_header().e_machine(file.endian()) != EM_CUDA {
        return Vec::new();
    }
    file.symbols()
        .filter(|s| s.kind() == object::SymbolKind::Text)
        .filter_map(|s| s.name().ok().map(str::to_string))
        .collect()
}

/// One line per (architecture, source) compiled by [`check_compiles`].
#[derive(Clone, Debug)]
pub struct Compiled {
    pub arch: u32,
    pub target: Target,
    pub source: &'static str,
    pub kernels: usize,
    pub bytes: usize,
    pub seconds: f64,
}

/// Compiles every source for every architecture (no cache, the architectures in parallel) and
/// checks that each image is what its target calls for (a CUDA ELF file, or PTX for its
/// architecture) and defines every kernel its source names: what `ringlet-gpu-check
/// --compile-only` and the crates' kernel-compile tests assert.
pub fn check_compiles(sources: &[&KernelSource], archs: &[u32]) -> Result<Vec<Compiled>, String> {
    let supported = supported_archs().map_err(|e| e.to_string())?;
    let per_arch: Vec<Result<Vec<Compiled>, String>> = std::thread::scope(|s| {
        let jobs: Vec<_> = archs
            .iter()
            .map(|&arch| {
                let supported = &supported;
                s.spawn(move || -> Result<Vec<Compiled>, String> {
                    let target = target_for(arch, supported)?;
                    sources
                        .iter()
                        .map(|source| check_one(source, arch, target))
                        .collect()
                })
            })
            .collect();
        jobs.into_iter()
            .map(|j| {
                j.join()
                    .unwrap_or_else(|_| Err("a compile thread panicked".into()))
            })
            .collect()
    });
    let mut out = Vec::new();
    for (arch, r) in archs.iter().zip(per_arch) {
        out.extend(r.map_err(|e| format!("sm_{arch}: {e}"))?);
    }
    Ok(out)
}

fn check_one(source: &KernelSource, arch: u32, target: Target) -> Result<Compiled, String> {
    let t = std::time::Instant::now();
    let image = compile(source, target, None).map_err(|e| e.to_string())?;
    let is_target = match target {
        Target::Sass(_) => !cubin_functions(&image.bytes).is_empty(),
        Target::Ptx(a) => {
            String::from_utf8_lossy(&image.bytes).contains(&format!(".target sm_{a}"))
        }
    };
    if !is_target {
        return Err(format!(
            "{} for {target} is not a {target} image",
            source.name
        ));
    }
    let missing = missing_kernels(source, &image);
    if !missing.is_empty() {
        return Err(format!("{} for {target} lacks {missing:?}", source.name));
    }
    Ok(Compiled {
        arch,
        target,
        source: source.name,
        kernels: (source.kernels)().len(),
        bytes: image.bytes.len(),
        seconds: t.elapsed().as_secs_f64(),
    })
}

/// The [`ARCHS`] a kernel-compile test checks with this machine's NVRTC: those it supports
/// (CUDA 13's lacks sm_70), at least three of them.
pub fn archs_to_check() -> Vec<u32> {
    let supported = supported_archs().unwrap_or_default();
    ARCHS
        .iter()
        .copied()
        .filter(|a| supported.contains(a))
        .collect()
}

/// For tests that compile kernels: whether NVRTC loads. Where it does not, prints a SKIPPED
/// line, except in CI (`CI` set), where it fails: CI installs NVRTC from PyPI (no GPU needed).
pub fn nvrtc_or_skip() -> bool {
    match libs::found(CudaLib::Nvrtc) {
        Ok(f) => {
            println!("{f}");
            true
        }
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "NVRTC is missing in CI ({e}): .ci/run installs nvidia-cuda-nvrtc-cu12 and 13"
            );
            ringlet_core::skipped!(
                "{e} (pip install nvidia-cuda-nvrtc nvidia-cuda-runtime, or their -cu12 wheels)"
            );
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nvrtc_here() -> bool {
        nvrtc_or_skip()
    }

    fn temp_cache(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("ringlet-ptx-{tag}-{}", std::process::id()))
    }

    #[test]
    fn every_kernel_compiles_for_every_architecture_this_nvrtc_knows() {
        if !nvrtc_here() {
            return;
        }
        let archs = archs_to_check();
        assert!(archs.len() >= 6, "{archs:?}");
        let done = check_compiles(&ALL, &archs).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(done.len(), archs.len());
        assert!(done.iter().all(|c| matches!(c.target, Target::Sass(_))));
    }

    #[test]
    fn a_device_newer_than_nvrtc_gets_ptx_of_the_newest_it_knows_and_an_older_one_an_error() {
        let cuda13 = [75, 80, 86, 87, 88, 89, 90, 100, 103, 110, 120, 121];
        assert_eq!(target_for(90, &cuda13), Ok(Target::Sass(90)));
        assert_eq!(target_for(130, &cuda13), Ok(Target::Ptx(121)));
        assert_eq!(target_for(101, &cuda13), Ok(Target::Ptx(100)));
        let e = target_for(70, &cuda13).unwrap_err();
        assert!(e.contains("sm_75 to sm_121") && e.contains("sm_70"), "{e}");
        assert!(target_for(80, &[]).is_err());
        if nvrtc_here() {
            // The fallback compiles: PTX for the newest architecture this NVRTC knows.
            let newest = *supported_archs().unwrap().last().unwrap();
            let image = compile(&REDUCE, target(newest + 1).unwrap(), None).unwrap();
            assert_eq!(image.target, Target::Ptx(newest));
            assert!(missing_kernels(&REDUCE, &image).is_empty());
        }
    }

    #[test]
    fn compiled_kernels_are_cached_and_a_damaged_cache_file_is_replaced() {
        if !nvrtc_here() {
            return;
        }
        let dir = temp_cache("cache");
        let first = compile(&REDUCE, Target::Sass(80), Some(&dir)).unwrap();
        let files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with("reduce-sm_80-nvrtc") && name.ends_with(".cubin"),
            "{name}"
        );
        // A cut-short file (a crash mid-write elsewhere, a full disk) is compiled again.
        std::fs::write(&files[0], &first.bytes[..first.bytes.len() / 2]).unwrap();
        assert_eq!(
            compile(&REDUCE, Target::Sass(80), Some(&dir)).unwrap(),
            first
        );
        assert_eq!(
            verified(&std::fs::read(&files[0]).unwrap()),
            Some(first.bytes.as_slice())
        );
        // So is a file with one flipped bit.
        let mut bytes = std::fs::read(&files[0]).unwrap();
        bytes[200] ^= 1;
        std::fs::write(&files[0], bytes).unwrap();
        assert_eq!(
            compile(&REDUCE, Target::Sass(80), Some(&dir)).unwrap(),
            first
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_compile_error_reports_the_nvrtc_log() {
        if !nvrtc_here() {
            return;
        }
        let broken = KernelSource {
            name: "broken.cu",
            code: "extern \"C\" __global__ void k(float* x) { x[0] = undeclared; }",
            kernels: || vec!["k".into()],
        };
        let e = compile(&broken, Target::Sass(80), None)
            .unwrap_err()
            .to_string();
        assert!(e.contains("broken.cu") && e.contains("undeclared"), "{e}");
    }
}
