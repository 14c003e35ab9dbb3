//! The CUDA C of `kernels/reduce.cu`, embedded, and the compilation of any [`KernelSource`] to
//! PTX with NVRTC for a device's architecture. Compiled PTX is cached on disk, keyed by source, options, architecture and
//! NVRTC version; a cached file that does not hold every expected kernel is compiled again.

use crate::libs::{self, CudaLib};
use crate::CudaError;
use cudarc::nvrtc::{compile_ptx_with_opts, CompileError, CompileOptions};
use sha2::{Digest, Sha256};
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
/// `optim.cu`, are `ringlet-train`'s: it compiles them with [`ptx`] too).
pub const ALL: [&KernelSource; 1] = [&REDUCE];

/// Options every kernel is compiled with: no fused multiply-add, so results round like the
/// Rust references.
const OPTIONS: [&str; 2] = ["--fmad=false", "--std=c++17"];

/// Loads NVRTC: [`CudaError::NoCuda`] where there is none.
pub fn nvrtc_version() -> Result<(i32, i32), CudaError> {
    // SAFETY: is_culib_present only asks whether cudarc can open the library; no NVRTC call.
    libs::require(CudaLib::Nvrtc, || unsafe {
        cudarc::nvrtc::sys::is_culib_present()
    })?;
    let (mut major, mut minor) = (0, 0);
    // SAFETY: nvrtcVersion writes two ints through valid pointers to our locals.
    let status = unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut major, &mut minor) };
    if status != cudarc::nvrtc::sys::nvrtcResult::NVRTC_SUCCESS {
        return Err(CudaError::Driver(format!("nvrtcVersion: {status:?}")));
    }
    Ok((major, minor))
}

/// Where compiled PTX is kept: `$RINGLET_CACHE_DIR`, else `$XDG_CACHE_HOME/ringlet`, else
/// `~/.cache/ringlet`, else the temporary directory.
pub fn cache_dir() -> PathBuf {
    let var = |k: &str| {
        std::env::var_os(k)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    var("RINGLET_CACHE_DIR")
        .or_else(|| var("XDG_CACHE_HOME").map(|d| d.join("ringlet")))
        .or_else(|| var("HOME").map(|d| d.join(".cache/ringlet")))
        .unwrap_or_else(|| std::env::temp_dir().join("ringlet-cache"))
        .join("ptx")
}

/// The PTX of `source` for `sm_<arch>` (e.g. 80), from the cache in `cache` or compiled now.
pub fn ptx(
    source: &KernelSource,
    arch: u32,
    cache: Option<&std::path::Path>,
) -> Result<String, CudaError> {
    let version = nvrtc_version()?;
    let includes = libs::include_dirs();
    let mut key = Sha256::new();
    key.update(source.code.as_bytes());
    key.update(format!("{OPTIONS:?} {arch} {version:?}").as_bytes());
    let key: String = key.finalize()[..8]
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    let file = cache.map(|dir| {
        dir.join(format!(
            "{}-sm_{arch}-nvrtc{}.{}-{key}.ptx",
            source.name.trim_end_matches(".cu"),
            version.0,
            version.1
        ))
    });
    if let Some(f) = &file {
        if let Ok(stored) = std::fs::read_to_string(f) {
            match verified(&stored) {
                Some(text) if missing_kernels(source, text).is_empty() => {
                    return Ok(text.to_string())
                }
                _ => tracing::warn!(file = %f.display(), "cached PTX is damaged; compiling again"),
            }
        }
    }
    if includes.is_empty() {
        return Err(CudaError::NoCuda {
            library: "cuda_fp16.h",
            searched: "RINGLET_CUDA_INCLUDE, CUDA_HOME/include, /usr/local/cuda/include, pip's nvidia/cuda_runtime/include".into(),
            env: "RINGLET_CUDA_INCLUDE",
        });
    }
    let mut options: Vec<String> = OPTIONS.iter().map(|s| s.to_string()).collect();
    options.push(format!("--gpu-architecture=compute_{arch}"));
    let opts = CompileOptions {
        include_paths: includes.iter().map(|d| d.display().to_string()).collect(),
        options,
        name: Some(source.name.into()),
        ..Default::default()
    };
    let text = compile_ptx_with_opts(source.code, opts)
        .map_err(|e| CudaError::Compile {
            kernel: source.name,
            arch,
            log: match e {
                CompileError::CompileError { log, .. } => log.to_string_lossy().into_owned(),
                other => format!("{other:?}"),
            },
        })?
        .to_src();
    let missing = missing_kernels(source, &text);
    if !missing.is_empty() {
        return Err(CudaError::Compile {
            kernel: source.name,
            arch,
            log: format!("the PTX lacks {}", missing.join(", ")),
        });
    }
    if let Some(file) = &file {
        store(file, &text)?;
    }
    Ok(text)
}

/// The expected kernels that `ptx` does not define.
pub fn missing_kernels(source: &KernelSource, ptx: &str) -> Vec<String> {
    (source.kernels)()
        .into_iter()
        .filter(|k| !ptx.contains(&format!(".entry {k}(")))
        .collect()
}

const SEAL: &str = "\n// ringlet-ptx sha256=";

fn digest(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The PTX of a cache file whose closing line carries the checksum of everything before it.
fn verified(stored: &str) -> Option<&str> {
    let (text, sum) = stored.rsplit_once(SEAL)?;
    (sum.trim_end() == digest(text)).then_some(text)
}

/// Writes `text`, sealed with its checksum, to `file` through a temporary file and a rename.
fn store(file: &std::path::Path, text: &str) -> Result<(), CudaError> {
    let sealed = format!("{text}{SEAL}{}\n", digest(text));
    let text = sealed.as_str();
    let dir = file.parent().expect("cache files live in a directory");
    std::fs::create_dir_all(dir)
        .map_err(|e| CudaError::io(format!("creating {}", dir.display()), e))?;
    let tmp = file.with_extension(format!("tmp{}", std::process::id()));
    std::fs::write(&tmp, text)
        .map_err(|e| CudaError::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, file).map_err(|e| CudaError::io(format!("renaming {}", tmp.display()), e))
}

/// Compiles every source for every architecture (no cache) and checks that each PTX targets its
/// architecture and defines every kernel its source names: what a crate's kernel-compile test
/// asserts.
pub fn check_compiles(sources: &[&KernelSource], archs: &[u32]) -> Result<(), String> {
    for &arch in archs {
        for source in sources {
            let text = ptx(source, arch, None).map_err(|e| e.to_string())?;
            if !text.contains(&format!(".target sm_{arch}")) {
                return Err(format!(
                    "{} for sm_{arch} targets something else: {}",
                    source.name,
                    &text[..400.min(text.len())]
                ));
            }
            let missing = missing_kernels(source, &text);
            if !missing.is_empty() {
                return Err(format!("{} for sm_{arch} lacks {missing:?}", source.name));
            }
        }
    }
    Ok(())
}

/// For tests that compile kernels: whether NVRTC loads. Where it does not, prints a SKIPPED
/// line, except in CI (`CI` set), where it fails: CI installs NVRTC from PyPI (no GPU needed).
pub fn nvrtc_or_skip() -> bool {
    match nvrtc_version() {
        Ok(v) => {
            println!("NVRTC {}.{}", v.0, v.1);
            true
        }
        Err(e) => {
            assert!(
                std::env::var_os("CI").is_none(),
                "NVRTC is missing in CI ({e}): .ci/run installs nvidia-cuda-nvrtc-cu12"
            );
            println!("SKIPPED: {e} (pip install nvidia-cuda-nvrtc-cu12 nvidia-cuda-runtime-cu12)");
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
    fn every_kernel_compiles_for_volta_ampere_and_hopper() {
        if !nvrtc_here() {
            return;
        }
        check_compiles(&ALL, &[70, 80, 90]).unwrap_or_else(|e| panic!("{e}"));
    }

    #[test]
    fn compiled_ptx_is_cached_and_a_damaged_cache_file_is_replaced() {
        if !nvrtc_here() {
            return;
        }
        let dir = temp_cache("cache");
        let first = ptx(&REDUCE, 80, Some(&dir)).unwrap();
        let files: Vec<PathBuf> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        assert_eq!(files.len(), 1, "{files:?}");
        let name = files[0].file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            name.starts_with("reduce-sm_80-nvrtc") && name.ends_with(".ptx"),
            "{name}"
        );
        // A cut-short file (a crash mid-write elsewhere, a full disk) is compiled again.
        std::fs::write(&files[0], &first[..first.len() / 2]).unwrap();
        assert_eq!(ptx(&REDUCE, 80, Some(&dir)).unwrap(), first);
        assert_eq!(
            verified(&std::fs::read_to_string(&files[0]).unwrap()),
            Some(first.as_str())
        );
        // So is a file with one flipped character.
        let mut bytes = std::fs::read(&files[0]).unwrap();
        bytes[200] ^= 1;
        std::fs::write(&files[0], bytes).unwrap();
        assert_eq!(ptx(&REDUCE, 80, Some(&dir)).unwrap(), first);
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
        let e = ptx(&broken, 80, None).unwrap_err().to_string();
        assert!(e.contains("broken.cu") && e.contains("undeclared"), "{e}");
    }
}
