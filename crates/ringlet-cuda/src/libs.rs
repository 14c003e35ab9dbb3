//! Finding the CUDA libraries and loading them before cudarc does.
//!
//! One build serves CUDA 12 and CUDA 13. cudarc is built with CUDA 13.0's bindings (the
//! `cuda-13000` feature), so it asks for `libnvrtc.so`, `libnvrtc.so.13`, then `libnvrtc.so.12`
//! (and the same for cuBLAS); every entry point Ringlet calls exists in both majors' libraries.
//!
//! cudarc opens its libraries by file name, which only finds what the dynamic linker's own search
//! finds. We look further — `RINGLET_*_LIB` (a file or a directory), `CUDA_HOME`/`CUDA_PATH`,
//! `/usr/local/cuda` and `/usr/local/cuda-<major>.<minor>` (with their `targets/<arch>/lib`), the
//! distribution's directories, and pip's wheels in any Python site directory, in both layouts
//! (CUDA 12's `nvidia/cuda_nvrtc/lib`, `nvidia/cublas/lib`; CUDA 13's `nvidia/cu13/lib`) — and
//! open what we find by path, with `RTLD_GLOBAL`, keeping it loaded for good. The dynamic linker
//! then hands cudarc the library already loaded under the same soname.
//!
//! Where several majors are installed in the directories searched, the newest one the driver
//! supports is chosen (NVRTC 13's kernels do not load on a CUDA 12 driver; cuBLAS 13 needs a
//! CUDA 13 driver). What the dynamic linker finds by itself comes first, as it does for cudarc;
//! [`found`] warns when that is a major newer than the driver's.
//! After cudarc has opened a library, [`found`] asks the dynamic linker which file cudarc's
//! symbols come from, so what is reported is what runs.

pub use crate::versions::{found, summary, Found};
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
    /// Needed by `libcublas`: taken from `libcublas`'s own directory, or `RINGLET_CUBLASLT_LIB`.
    CublasLt,
}

/// The CUDA majors Ringlet runs with, newest first.
pub const CUDA_MAJORS: [u32; 2] = [13, 12];

impl CudaLib {
    /// Its name in messages.
    pub fn title(self) -> &'static str {
        match self {
            CudaLib::Driver => "the CUDA driver",
            CudaLib::Nvrtc => "NVRTC",
            CudaLib::Nccl => "NCCL",
            CudaLib::Cublas => "cuBLAS",
            CudaLib::CublasLt => "cuBLASLt",
        }
    }

    /// The file named in "not found" messages.
    pub fn display_name(self) -> &'static str {
        match self {
            CudaLib::Driver => "libcuda.so.1",
            CudaLib::Nvrtc => "libnvrtc.so.13 or .12",
            CudaLib::Nccl => "libnccl.so.2",
            CudaLib::Cublas => "libcublas.so.13 or .12",
            CudaLib::CublasLt => "libcublasLt.so.13 or .12",
        }
    }

    /// File names, in the order cudarc asks the dynamic linker for them: unversioned first,
    /// then the newest major.
    pub fn file_names(self) -> &'static [&'static str] {
        match self {
            CudaLib::Driver => &["libcuda.so", "libcuda.so.1"],
            CudaLib::Nvrtc => &["libnvrtc.so", "libnvrtc.so.13", "libnvrtc.so.12"],
            CudaLib::Nccl => &["libnccl.so", "libnccl.so.2"],
            CudaLib::Cublas => &["libcublas.so", "libcublas.so.13", "libcublas.so.12"],
            CudaLib::CublasLt => &["libcublasLt.so", "libcublasLt.so.13", "libcublasLt.so.12"],
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

    /// Where pip's wheels put it below a site directory: CUDA 13's layout (one `cu13`
    /// directory for the toolkit's libraries), then CUDA 12's (a directory per package).
    pub fn wheel_dirs(self) -> &'static [&'static str] {
        match self {
            CudaLib::Driver => &[],
            CudaLib::Nvrtc => &["nvidia/cu13/lib", "nvidia/cuda_nvrtc/lib"],
            CudaLib::Nccl => &["nvidia/nccl/lib", "nvidia/cu13/lib"],
            CudaLib::Cublas | CudaLib::CublasLt => &["nvidia/cu13/lib", "nvidia/cublas/lib"],
        }
    }

    /// Whether the library comes in one file per CUDA major (the toolkit's), so that the
    /// driver's major decides between them.
    pub(crate) fn per_cuda_major(self) -> bool {
        matches!(self, CudaLib::Nvrtc | CudaLib::Cublas | CudaLib::CublasLt)
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

/// Loads `lib` (once per process) and returns the file it came from (the bare file name when
/// the dynamic linker's own search found it).
pub fn load(lib: CudaLib) -> Result<PathBuf, CudaError> {
    lib.slot()
        .get_or_init(|| find_and_open(lib))
        .clone()
        .map_err(|searched| CudaError::NoCuda {
            library: lib.display_name(),
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
            library: lib.display_name(),
            searched: "cudarc's library names".into(),
            env: lib.env(),
        })
    }
}

/// Whether `lib` can be loaded here.
pub fn present(lib: CudaLib) -> bool {
    load(lib).is_ok()
}

pub(crate) fn same_file(a: &Path, b: &Path) -> bool {
    match (std::fs::canonicalize(a), std::fs::canonicalize(b)) {
        (Ok(a), Ok(b)) => a == b,
        // A bare soname (found by the linker's own search) cannot be compared: trust it.
        _ => true,
    }
}

fn find_and_open(lib: CudaLib) -> Result<PathBuf, String> {
    let driver = if lib.per_cuda_major() {
        crate::versions::driver_cuda_major()
    } else {
        None
    };
    find_and_open_with(
        lib,
        std::env::var_os(lib.env()).filter(|v| !v.is_empty()),
        driver,
    )
}

fn find_and_open_with(
    lib: CudaLib,
    explicit: Option<std::ffi::OsString>,
    driver_major: Option<u32>,
) -> Result<PathBuf, String> {
    if explicit.is_none() {
        // The names cudarc asks for, in its order: what it would open anyway.
        for name in lib.file_names() {
            if open(Path::new(name)) {
                return Ok(PathBuf::from(name));
            }
        }
    }
    let mut tried = Vec::new();
    let files = match &explicit {
        Some(v) => {
            let p = PathBuf::from(v);
            if p.is_dir() {
                candidates(lib, &[p], driver_major)
            } else {
                vec![p]
            }
        }
        None => candidates(lib, &search_dirs(lib), driver_major),
    };
    for f in files {
        if f.exists() {
            if lib == CudaLib::Cublas {
                // libcublas needs its own libcublasLt (same directory, same major): loaded first
                // from there, the dynamic linker resolves the dependency even where the
                // directory is on no search path and another major's libcublasLt is.
                open_sibling_cublaslt(&f);
            }
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
        tried.extend(search_dirs(lib).iter().map(|d| d.display().to_string()));
    }
    Err(tried.join(", "))
}

/// The files of `lib` in `dirs`, in the order to try them: for a toolkit library, the newest
/// CUDA major the driver supports first (directory order among equals), majors newer than the
/// driver's last; `CUDA_HOME`/`CUDA_PATH` before everything, as the user's own choice.
pub fn candidates(lib: CudaLib, dirs: &[PathBuf], driver_major: Option<u32>) -> Vec<PathBuf> {
    let chosen: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .collect();
    let mut files: Vec<(usize, PathBuf)> = Vec::new();
    for d in dirs {
        let tier = usize::from(!chosen.iter().any(|c| d.starts_with(c)));
        for name in lib.file_names() {
            let f = d.join(name);
            if f.exists() && !files.iter().any(|(_, g)| same_file(g, &f)) {
                files.push((tier, f));
            }
        }
    }
    if lib.per_cuda_major() {
        // Cached: the key resolves links on disk.
        files.sort_by_cached_key(|(tier, f)| {
            let major = cuda_major_of(f);
            let too_new = matches!((major, driver_major), (Some(m), Some(d)) if m > d);
            (*tier, too_new, std::cmp::Reverse(major))
        });
    }
    files.into_iter().map(|(_, f)| f).collect()
}

/// The CUDA major of a toolkit library file: `libnvrtc.so.13` (or a link to
/// `libnvrtc.so.13.0.48`) is 13.
pub fn cuda_major_of(file: &Path) -> Option<u32> {
    let real = std::fs::canonicalize(file).unwrap_or_else(|_| file.to_path_buf());
    [real.as_path(), file].iter().find_map(|f| {
        let name = f.file_name()?.to_str()?;
        let (_, version) = name.split_once(".so.")?;
        version.split('.').next()?.parse().ok()
    })
}

/// Opens the `libcublasLt` beside the `libcublas` file `cublas`, of its major, if there is one.
fn open_sibling_cublaslt(cublas: &Path) {
    let (Some(dir), Some(major)) = (cublas.parent(), cuda_major_of(cublas)) else {
        return;
    };
    let lt = dir.join(format!("libcublasLt.so.{major}"));
    if lt.exists() && !open(&lt) {
        tracing::debug!(library = %lt.display(), "failed to load: {}", dlerror());
    }
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

/// CUDA installs: `CUDA_HOME`, `CUDA_PATH`, `/usr/local/cuda`, then `/usr/local/cuda-X.Y`
/// newest first (the `cuda-toolkit-X-Y` packages' trees).
pub fn toolkit_roots() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = ["CUDA_HOME", "CUDA_PATH"]
        .iter()
        .filter_map(std::env::var_os)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .collect();
    roots.push("/usr/local/cuda".into());
    roots.extend(versioned_toolkits(Path::new("/usr/local")));
    roots
}

/// `cuda-X.Y` directories of `parent`, newest version first.
pub fn versioned_toolkits(parent: &Path) -> Vec<PathBuf> {
    let mut found: Vec<((u32, u32), PathBuf)> = std::fs::read_dir(parent)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let (major, minor) = name.strip_prefix("cuda-")?.split_once('.')?;
            Some(((major.parse().ok()?, minor.parse().ok()?), e.path()))
        })
        .collect();
    found.sort_by_key(|f| std::cmp::Reverse(f.0));
    found.into_iter().map(|(_, p)| p).collect()
}

/// The library directories of a CUDA install.
fn toolkit_lib_dirs(root: &Path) -> [PathBuf; 4] {
    [
        root.join("lib64"),
        root.join("lib"),
        root.join(format!("targets/{}-linux/lib", std::env::consts::ARCH)),
        root.join("targets/sbsa-linux/lib"),
    ]
}

/// Directories that may hold `lib`, most specific first.
pub fn search_dirs(lib: CudaLib) -> Vec<PathBuf> {
    search_dirs_in(
        lib,
        &toolkit_roots(),
        std::env::var_os("LD_LIBRARY_PATH"),
        &python_site_dirs(),
    )
}

/// [`search_dirs`] over given CUDA installs, `LD_LIBRARY_PATH` and Python site directories.
pub fn search_dirs_in(
    lib: CudaLib,
    roots: &[PathBuf],
    ld_library_path: Option<std::ffi::OsString>,
    sites: &[PathBuf],
) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    for root in roots {
        dirs.extend(toolkit_lib_dirs(root));
    }
    if let Some(path) = ld_library_path {
        dirs.extend(std::env::split_paths(&path));
    }
    for site in sites {
        dirs.extend(lib.wheel_dirs().iter().map(|sub| site.join(sub)));
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
    // A toolkit's lib64 is often a link to targets/<arch>/lib: one directory, tried once.
    once_each(&mut dirs);
    dirs
}

/// Keeps the first of the paths naming one directory (through links).
pub(crate) fn once_each(dirs: &mut Vec<PathBuf>) {
    let mut seen = Vec::new();
    dirs.retain(|d| {
        let key = std::fs::canonicalize(d).unwrap_or_else(|_| d.clone());
        let new = !seen.contains(&key);
        seen.push(key);
        new
    });
}

/// Python site directories where pip may have put NVIDIA's wheels: `PYTHONPATH`, the active
/// virtualenv or conda env, that of the first `python3` on `PATH`, the user's, pyenv's and the
/// system's.
pub fn python_site_dirs() -> Vec<PathBuf> {
    let mut roots: Vec<PathBuf> = Vec::new();
    for var in ["VIRTUAL_ENV", "CONDA_PREFIX"] {
        if let Some(v) = std::env::var_os(var).filter(|v| !v.is_empty()) {
            roots.push(PathBuf::from(v).join("lib"));
        }
    }
    // The environment of the `python3` a user would run: a virtualenv on PATH but not activated
    // (its bin/python3 is a link to the base interpreter: the link's own directory counts).
    if let Some(bin) = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .find(|d| d.join("python3").exists())
    {
        if let Some(prefix) = bin.parent() {
            roots.push(prefix.join("lib"));
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_explicit_file_that_is_no_library_is_reported_with_the_loader_error() {
        let dir = std::env::temp_dir().join(format!("ringlet-libs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("libnccl.so.2"), b"not an ELF file").unwrap();
        let e = find_and_open_with(CudaLib::Nccl, Some(dir.clone().into()), None).unwrap_err();
        assert!(e.starts_with("RINGLET_NCCL_LIB="), "{e}");
        assert!(e.contains("libnccl.so.2 (failed to load:"), "{e}");
        let e = find_and_open_with(CudaLib::Nccl, Some(dir.join("nowhere.so").into()), None)
            .unwrap_err();
        assert_eq!(e, format!("RINGLET_NCCL_LIB={:?}", dir.join("nowhere.so")));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_library_nowhere_is_a_typed_error_listing_the_search() {
        if present(CudaLib::Driver) {
            ringlet_core::skipped!("this machine has a CUDA driver");
            return;
        }
        let e = load(CudaLib::Driver).unwrap_err().to_string();
        assert!(e.starts_with("no CUDA: libcuda.so.1 was not found"), "{e}");
        assert!(
            e.contains("the dynamic linker's path") && e.contains("RINGLET_CUDA_LIB"),
            "{e}"
        );
    }

    /// A tree of stand-in files: two CUDA installs side by side, a CUDA 12.4 one, and a Python
    /// site directory holding both wheel layouts.
    fn stand_in_tree(tag: &str) -> PathBuf {
        let root = std::env::temp_dir().join(format!("ringlet-libs-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        let touch = |rel: &str| {
            let f = root.join(rel);
            std::fs::create_dir_all(f.parent().unwrap()).unwrap();
            std::fs::write(&f, b"stand-in").unwrap();
        };
        // /usr/local/cuda-13.1: lib64 is a link to targets/x86_64-linux/lib, as NVIDIA ships it.
        touch("local/cuda-13.1/targets/x86_64-linux/lib/libnvrtc.so.13.1.80");
        std::os::unix::fs::symlink(
            "libnvrtc.so.13.1.80",
            root.join("local/cuda-13.1/targets/x86_64-linux/lib/libnvrtc.so.13"),
        )
        .unwrap();
        std::os::unix::fs::symlink(
            "targets/x86_64-linux/lib",
            root.join("local/cuda-13.1/lib64"),
        )
        .unwrap();
        touch("local/cuda-13.0/lib64/libnvrtc.so.13");
        touch("local/cuda-12.4/lib64/libnvrtc.so.12");
        touch("local/cuda-12.4/lib64/libcublas.so.12");
        touch("local/cuda-toolkit/lib64/libnvrtc.so.11");
        touch("site/nvidia/cu13/lib/libnvrtc.so.13");
        touch("site/nvidia/cu13/lib/libcublas.so.13");
        touch("site/nvidia/cuda_nvrtc/lib/libnvrtc.so.12");
        touch("site/nvidia/cublas/lib/libcublas.so.12");
        touch("site/nvidia/nccl/lib/libnccl.so.2");
        root
    }

    fn names(files: &[PathBuf], root: &Path) -> Vec<String> {
        // Only the tree's own (the machine's system directories are searched too).
        files
            .iter()
            .filter_map(|f| f.strip_prefix(root).ok())
            .map(|f| f.display().to_string())
            .collect()
    }

    #[test]
    fn cuda_installs_are_found_newest_first_and_each_directory_once() {
        let root = stand_in_tree("installs");
        let local = root.join("local");
        assert_eq!(
            names(&versioned_toolkits(&local), &root),
            ["local/cuda-13.1", "local/cuda-13.0", "local/cuda-12.4"]
        );
        let dirs = search_dirs_in(CudaLib::Nvrtc, &versioned_toolkits(&local), None, &[]);
        let dirs: Vec<String> = names(&dirs, &root);
        // cuda-13.1's lib64 and targets/x86_64-linux/lib are one directory.
        assert_eq!(
            dirs[..3],
            [
                "local/cuda-13.1/lib64",
                "local/cuda-13.0/lib64",
                "local/cuda-12.4/lib64"
            ]
        );
        let dirs = search_dirs_in(CudaLib::Nvrtc, &versioned_toolkits(&local), None, &[]);
        let files = |driver| names(&candidates(CudaLib::Nvrtc, &dirs, driver), &root);
        // A CUDA 13 driver (or none): CUDA 13.1's NVRTC, by its soname link.
        assert_eq!(files(Some(13))[0], "local/cuda-13.1/lib64/libnvrtc.so.13");
        assert_eq!(files(None)[0], "local/cuda-13.1/lib64/libnvrtc.so.13");
        // A CUDA 12 driver: CUDA 12.4's, the CUDA 13 ones last (their PTX would not load).
        let for_12 = files(Some(12));
        assert_eq!(for_12[0], "local/cuda-12.4/lib64/libnvrtc.so.12");
        assert!(
            for_12[1..].iter().all(|f| f.ends_with(".so.13")),
            "{for_12:?}"
        );
        let real = root.join("local/cuda-13.1/lib64/libnvrtc.so.13");
        assert_eq!(cuda_major_of(&real), Some(13));
        assert_eq!(cuda_major_of(Path::new("libcublas.so.12")), Some(12));
        assert_eq!(cuda_major_of(Path::new("libnvrtc.so")), None);
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn both_wheel_layouts_are_searched_and_the_drivers_major_decides() {
        let root = stand_in_tree("wheels");
        let site = root.join("site");
        for (lib, file) in [(CudaLib::Nvrtc, "nvrtc"), (CudaLib::Cublas, "cublas")] {
            let dirs = search_dirs_in(lib, &[], None, std::slice::from_ref(&site));
            let pick = |driver| names(&candidates(lib, &dirs, driver), &root);
            assert_eq!(
                pick(Some(13))[0],
                format!("site/nvidia/cu13/lib/lib{file}.so.13")
            );
            let legacy = if file == "nvrtc" {
                "cuda_nvrtc"
            } else {
                "cublas"
            };
            assert_eq!(
                pick(Some(12)),
                [
                    format!("site/nvidia/{legacy}/lib/lib{file}.so.12"),
                    format!("site/nvidia/cu13/lib/lib{file}.so.13")
                ]
            );
        }
        let dirs = search_dirs_in(CudaLib::Nccl, &[], None, std::slice::from_ref(&site));
        assert_eq!(
            names(&candidates(CudaLib::Nccl, &dirs, Some(13)), &root),
            ["site/nvidia/nccl/lib/libnccl.so.2"]
        );
        // LD_LIBRARY_PATH comes before the wheels; the toolkit's installs before both.
        let ld = std::env::join_paths([site.join("nvidia/cu13/lib")]).unwrap();
        let dirs = search_dirs_in(
            CudaLib::Nvrtc,
            &[root.join("local/cuda-12.4")],
            Some(ld),
            std::slice::from_ref(&site),
        );
        assert_eq!(
            names(&dirs, &root)[..3],
            [
                "local/cuda-12.4/lib64",
                "site/nvidia/cu13/lib",
                "site/nvidia/cuda_nvrtc/lib"
            ]
        );
        std::fs::remove_dir_all(&root).unwrap();
    }
}
