//! Finding the CUDA libraries and loading them before cudarc does.
//!
//! cudarc opens its libraries by file name (`libnvrtc.so.12`, ...), which only finds what the
//! dynamic linker's own search finds. We look further — `RINGLET_*_LIB` (a file or a directory),
//! `CUDA_HOME`/`CUDA_PATH`, `/usr/local/cuda`, the distribution's directories, and the `nvidia/*`
//! packages of pip wheels in any Python site directory — and open what we find by path, with
//! `RTLD_GLOBAL`, keeping it loaded for good. The dynamic linker then hands cudarc the library
//! already loaded under the same soname.

use crate::CudaError;
use std::ffi::CString;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// A CUDA library Ringlet may use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CudaLib {
    /// `libcuda`, the driver (installed with the GPU driver, never by pip).
    Driver,
    Nvrtc,
    Nccl,
    Cublas,
    /// Needed by `libcublas`; loaded first so that it is found where `libcublas` was.
    CublasLt,
}

impl CudaLib {
    pub fn file_names(self) -> &'static [&'static str] {
        match self {
            CudaLib::Driver => &["libcuda.so.1", "libcuda.so"],
            CudaLib::Nvrtc => &["libnvrtc.so.12", "libnvrtc.so"],
            CudaLib::Nccl => &["libnccl.so.2", "libnccl.so"],
            CudaLib::Cublas => &["libcublas.so.12", "libcublas.so"],
            CudaLib::CublasLt => &["libcublasLt.so.12", "libcublasLt.so"],
        }
    }

    /// The variable that names the library (a file, or the directory holding it).
    pub fn env(self) -> &'static str {
        match self {
            CudaLib::Driver => "RINGLET_CUDA_LIB",
            CudaLib::Nvrtc => "RINGLET_NVRTC_LIB",
            CudaLib::Nccl => "RINGLET_NCCL_LIB",
            CudaLib::Cublas => "RINGLET_CUBLAS_LIB",
            CudaLib::CublasLt => "RINGLET_CUBLASLT_LIB",
        }
    }

    /// Where a pip wheel puts it below a site directory.
    fn wheel_dir(self) -> Option<&'static str> {
        match self {
            CudaLib::Driver => None,
            CudaLib::Nvrtc => Some("nvidia/cuda_nvrtc/lib"),
            CudaLib::Nccl => Some("nvidia/nccl/lib"),
            CudaLib::Cublas | CudaLib::CublasLt => Some("nvidia/cublas/lib"),
        }
    }

    fn slot(self) -> &'static OnceLock<Result<PathBuf, String>> {
        static DRIVER: OnceLock<Result<PathBuf, String>> = OnceLock::new();
        static NVRTC: OnceLock<Result<PathBuf, String>> = OnceLock::new();
        static NCCL: OnceLock<Result<PathBuf, String>> = OnceLock::new();
        static CUBLAS: OnceLock<Result<PathBuf, String>> = OnceLock::new();
        static CUBLASLT: OnceLock<Result<PathBuf, String>> = OnceLock::new();
        match self {
            CudaLib::Driver => &DRIVER,
            CudaLib::Nvrtc => &NVRTC,
            CudaLib::Nccl => &NCCL,
            CudaLib::Cublas => &CUBLAS,
            CudaLib::CublasLt => &CUBLASLT,
        }
    }
}

/// Loads `lib` (once per process) and returns the file it came from (`None`'s stand-in: the
/// bare file name, when the system's own search found it).
pub fn load(lib: CudaLib) -> Result<PathBuf, CudaError> {
    lib.slot()
        .get_or_init(|| find_and_open(lib))
        .clone()
        .map_err(|searched| CudaError::NoCuda {
            library: lib.file_names()[0],
            searched,
            env: lib.env(),
        })
}

/// Loads `lib`, then confirms cudarc can open it by its own names too (`cudarc_sees`: that
/// library's `is_culib_present`); cudarc panics on a library it cannot open, so every CUDA call
/// goes through here first.
pub fn require(lib: CudaLib, cudarc_sees: impl FnOnce() -> bool) -> Result<(), CudaError> {
    load(lib)?;
    if cudarc_sees() {
        Ok(())
    } else {
        Err(CudaError::NoCuda {
            library: lib.file_names()[0],
            searched: "cudarc's library names".into(),
            env: lib.env(),
        })
    }
}

/// Whether `lib` can be loaded here.
pub fn present(lib: CudaLib) -> bool {
    load(lib).is_ok()
}

fn find_and_open(lib: CudaLib) -> Result<PathBuf, String> {
    find_and_open_with(lib, std::env::var_os(lib.env()).filter(|v| !v.is_empty()))
}

fn find_and_open_with(
    lib: CudaLib,
    explicit: Option<std::ffi::OsString>,
) -> Result<PathBuf, String> {
    if explicit.is_none() {
        for name in lib.file_names() {
            if open(Path::new(name)) {
                return Ok(PathBuf::from(name));
            }
        }
    }
    let dirs = search_dirs(lib);
    let mut tried = Vec::new();
    let mut files: Vec<PathBuf> = Vec::new();
    if let Some(v) = &explicit {
        let p = PathBuf::from(v);
        if p.is_dir() {
            files.extend(lib.file_names().iter().map(|n| p.join(n)));
        } else {
            files.push(p);
        }
    } else {
        for d in &dirs {
            files.extend(lib.file_names().iter().map(|n| d.join(n)));
        }
    }
    for f in files {
        if f.exists() {
            if open(&f) {
                tracing::debug!(library = %f.display(), "loaded");
                return Ok(f);
            }
            tried.push(format!("{} (failed to load: {})", f.display(), dlerror()));
        }
    }
    if explicit.is_some() {
        tried.insert(
            0,
            format!("{}={:?}", lib.env(), explicit.unwrap_or_default()),
        );
    } else {
        tried.insert(0, "the dynamic linker's path".into());
        tried.extend(dirs.iter().map(|d| d.display().to_string()));
    }
    Err(tried.join(", "))
}

/// Opens a library for good (never closed: cudarc keeps calling into it).
fn open(path: &Path) -> bool {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: dlopen with a NUL-terminated path; the handle is deliberately leaked so the
    // library stays loaded for the life of the process. Loading runs the library's
    // initialisers, which is what loading a CUDA library is for.
    let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    !handle.is_null()
}

fn dlerror() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated message owned by the C library, which we
    // copy before any other dl* call.
    unsafe {
        let msg = libc::dlerror();
        if msg.is_null() {
            "unknown error".into()
        } else {
            std::ffi::CStr::from_ptr(msg).to_string_lossy().into_owned()
        }
    }
}

/// Directories that may hold `lib`, most specific first.
pub fn search_dirs(lib: CudaLib) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            dirs.push(PathBuf::from(&home).join("lib64"));
            dirs.push(PathBuf::from(home).join("lib"));
        }
    }
    dirs.push("/usr/local/cuda/lib64".into());
    if let Some(path) = std::env::var_os("LD_LIBRARY_PATH") {
        dirs.extend(std::env::split_paths(&path));
    }
    if let Some(sub) = lib.wheel_dir() {
        dirs.extend(python_site_dirs().into_iter().map(|d| d.join(sub)));
    }
    dirs.extend(
        [
            "/usr/lib/x86_64-linux-gnu",
            "/usr/lib/aarch64-linux-gnu",
            "/usr/lib64",
            "/usr/lib",
        ]
        .map(PathBuf::from),
    );
    dirs.retain(|d| d.is_dir());
    dirs.dedup();
    dirs
}

/// Python site directories where pip may have put NVIDIA's wheels: the active virtualenv or
/// conda env, `PYTHONPATH`, the user's, the system's and pyenv's.
pub fn python_site_dirs() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            roots.push(PathBuf::from(v).join("lib"));
        }
    }
    let home = std::env::var_os("HOME").map(PathBuf::from);
    if let Some(h) = &home {
        roots.push(h.join(".local/lib"));
        if let Ok(versions) = std::fs::read_dir(h.join(".pyenv/versions")) {
            roots.extend(versions.flatten().map(|v| v.path().join("lib")));
        }
    }
    roots.extend(["/usr/local/lib", "/usr/lib", "/opt/conda/lib"].map(PathBuf::from));
    let mut sites: Vec<PathBuf> = std::env::var_os("PYTHONPATH")
        .map(|p| std::env::split_paths(&p).collect())
        .unwrap_or_default();
    for root in roots {
        let Ok(entries) = std::fs::read_dir(&root) else {
            continue;
        };
        let mut pythons: Vec<PathBuf> = entries
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with("python3"))
            .map(|e| e.path())
            .collect();
        pythons.sort();
        for py in pythons {
            sites.push(py.join("site-packages"));
            sites.push(py.join("dist-packages"));
        }
    }
    sites.retain(|d| d.is_dir());
    sites
}

/// Directories with CUDA's headers (`cuda_fp16.h`) for NVRTC: `RINGLET_CUDA_INCLUDE`, a CUDA
/// install, or the `nvidia-cuda-runtime-cu12` wheel.
pub fn include_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(v) = std::env::var_os("RINGLET_CUDA_INCLUDE").filter(|v| !v.is_empty()) {
        dirs.extend(std::env::split_paths(&v));
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(home) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            dirs.push(PathBuf::from(home).join("include"));
        }
    }
    dirs.push("/usr/local/cuda/include".into());
    dirs.extend(
        python_site_dirs()
            .into_iter()
            .map(|d| d.join("nvidia/cuda_runtime/include")),
    );
    dirs.push("/usr/include".into());
    dirs.retain(|d| d.join("cuda_fp16.h").is_file());
    dirs.dedup();
    dirs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_explicit_file_that_is_no_library_is_reported_with_the_loader_error() {
        let dir = std::env::temp_dir().join(format!("ringlet-libs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("libnccl.so.2"), b"not an ELF file").unwrap();
        let e = find_and_open_with(CudaLib::Nccl, Some(dir.clone().into())).unwrap_err();
        assert!(e.starts_with("RINGLET_NCCL_LIB="), "{e}");
        assert!(e.contains("libnccl.so.2 (failed to load:"), "{e}");
        let e = find_and_open_with(CudaLib::Nccl, Some(dir.join("nowhere.so").into())).unwrap_err();
        assert_eq!(e, format!("RINGLET_NCCL_LIB={:?}", dir.join("nowhere.so")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_library_nowhere_is_a_typed_error_listing_the_search() {
        if present(CudaLib::Driver) {
            println!("SKIPPED: this machine has a CUDA driver");
            return;
        }
        let e = load(CudaLib::Driver).unwrap_err().to_string();
        assert!(e.starts_with("no CUDA: libcuda.so.1 was not found"), "{e}");
        assert!(
            e.contains("the dynamic linker's path") && e.contains("RINGLET_CUDA_LIB"),
            "{e}"
        );
    }
}
