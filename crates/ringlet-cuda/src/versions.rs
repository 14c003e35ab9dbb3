//! What was found: each library's own answer to "which version are you", and the file that
//! answered — asked through the entry point cudarc resolved, so what is reported is what runs.

use crate::libs::{self, cuda_major_of, load, same_file, CudaLib};
use crate::CudaError;
use std::ffi::c_void;
use std::path::PathBuf;
use std::sync::OnceLock;

/// A library as found and used: its file and its version.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Found {
    pub lib: CudaLib,
    /// The file the symbols come from (as the dynamic linker reports it).
    pub path: PathBuf,
    /// `13.0`, `12.9.1.4`, `2.27.3`: as the library reports it.
    pub version: String,
}

impl std::fmt::Display for Found {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let what = match self.lib {
            CudaLib::Driver => "driver: CUDA",
            _ => self.lib.title(),
        };
        write!(f, "{what} {} ({})", self.version, self.path.display())
    }
}

/// `lib` loaded, its version asked and the file that answered, logged once per process.
pub fn found(lib: CudaLib) -> Result<Found, CudaError> {
    static FOUND: OnceLock<std::sync::Mutex<Vec<Found>>> = OnceLock::new();
    // Held while asking, so threads compiling kernels together log a library once.
    let mut cache = FOUND
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|p| p.into_inner());
    if let Some(f) = cache.iter().find(|f| f.lib == lib) {
        return Ok(f.clone());
    }
    let (version, symbol) = ask(lib)?;
    let ours = load(lib)?;
    let path = symbol.and_then(file_of).unwrap_or(ours.clone());
    if !same_file(&path, &ours) {
        tracing::warn!(
            "{} was found at {} but cudarc opened {} by name (the dynamic linker's search comes \
             first); using that",
            lib.title(),
            ours.display(),
            path.display()
        );
    }
    let f = Found { lib, path, version };
    tracing::info!("{f}");
    if lib.per_cuda_major() {
        let driver = driver_cuda_major();
        if let (Some(major), Some(driver)) = (cuda_major_of(&f.path), driver) {
            if major > driver {
                tracing::warn!(
                    "{f} is newer than the driver's CUDA {driver}: what it builds will not load; \
                     install the driver for CUDA {major}, or keep only a CUDA {driver} {} on the \
                     linker's path",
                    lib.title()
                );
            }
        }
    }
    cache.push(f.clone());
    Ok(f)
}

/// One line per library: what was found, or why not (the device table's CUDA column).
pub fn summary(libs: &[CudaLib]) -> Vec<String> {
    libs.iter()
        .map(|&lib| match found(lib) {
            Ok(f) => f.to_string(),
            Err(CudaError::NoCuda { env, .. }) => format!("{}: not found (set {env})", lib.title()),
            Err(e) => format!("{}: {e}", lib.title()),
        })
        .collect()
}

/// The file holding the code at `addr` (a symbol of a loaded library).
fn file_of(addr: *const std::ffi::c_void) -> Option<PathBuf> {
    let mut info = std::mem::MaybeUninit::<libc::Dl_info>::zeroed();
    // SAFETY: dladdr only reads the loader's tables and fills `info`; the file name it points to
    // belongs to the loaded object, which is never unloaded (we and cudarc keep every handle).
    unsafe {
        if libc::dladdr(addr, info.as_mut_ptr()) == 0 {
            return None;
        }
        let name = info.assume_init().dli_fname;
        if name.is_null() {
            return None;
        }
        let bytes = std::ffi::CStr::from_ptr(name).to_bytes();
        Some(PathBuf::from(
            std::ffi::OsStr::from_encoded_bytes_unchecked(bytes),
        ))
    }
}

/// The version `lib` reports and the address of a symbol cudarc resolved in it (`None` where
/// Ringlet resolves the library itself, as for NCCL, whose file is the one found).
pub(crate) fn ask(lib: CudaLib) -> Result<(String, Option<*const c_void>), CudaError> {
    match lib {
        CudaLib::Driver => {
            let (major, minor) = driver_version()?;
            // SAFETY: the library is open (driver_version required it); `get` only looks up a
            // name, and the address is used for dladdr, never called.
            let at = unsafe { cudarc::driver::sys::culib().get::<*const c_void>(b"cuInit\0") }
                .ok()
                .map(|s| *s);
            Ok((format!("{major}.{minor}"), at))
        }
        CudaLib::Nvrtc => {
            let (major, minor) = crate::kernels::nvrtc_version()?;
            // SAFETY: as above, for NVRTC (nvrtc_version required it).
            let at = unsafe { cudarc::nvrtc::sys::culib().get::<*const c_void>(b"nvrtcVersion\0") }
                .ok()
                .map(|s| *s);
            Ok((format!("{major}.{minor}"), at))
        }
        CudaLib::Cublas => {
            let (major, minor, patch) = cublas_version()?;
            // SAFETY: as above, for cuBLAS (cublas_version required it).
            let at = unsafe {
                cudarc::cublas::sys::culib().get::<*const c_void>(b"cublasGetProperty\0")
            }
            .ok()
            .map(|s| *s);
            Ok((format!("{major}.{minor}.{patch}"), at))
        }
        CudaLib::Nccl => {
            let (major, minor, patch) = crate::nccl::Api::load()?
                .version()
                .map_err(|e| CudaError::Driver(e.to_string()))?;
            Ok((format!("{major}.{minor}.{patch}"), None))
        }
        CudaLib::CublasLt => {
            libs::load(lib)?;
            Ok(("(with cuBLAS)".into(), None))
        }
    }
}

/// The CUDA version the driver supports, `(13, 0)`; needs no GPU and no `cuInit`.
pub fn driver_version() -> Result<(u32, u32), CudaError> {
    // SAFETY: is_culib_present only asks whether cudarc can open the library; no CUDA call.
    libs::require(CudaLib::Driver, || unsafe {
        cudarc::driver::sys::is_culib_present()
    })?;
    let mut v = 0;
    // SAFETY: cuDriverGetVersion writes one int through a valid pointer to our local; it may be
    // called before cuInit.
    let status = unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut v) };
    if status != cudarc::driver::sys::CUresult::CUDA_SUCCESS || v <= 0 {
        return Err(CudaError::Driver(format!("cuDriverGetVersion: {status:?}")));
    }
    Ok((v as u32 / 1000, (v as u32 % 1000) / 10))
}

/// The driver's CUDA major, where there is a driver.
pub(crate) fn driver_cuda_major() -> Option<u32> {
    driver_version().ok().map(|(major, _)| major)
}

/// cuBLAS's (major, minor, patch): needs the library, not a GPU.
pub fn cublas_version() -> Result<(i32, i32, i32), CudaError> {
    // libcublasLt comes from libcublas's own directory (libs::load opens it first), unless the
    // user names one.
    if std::env::var_os(CudaLib::CublasLt.env()).is_some_and(|v| !v.is_empty()) {
        let _ = libs::load(CudaLib::CublasLt);
    }
    // SAFETY: is_culib_present only asks whether cudarc can open the library.
    libs::require(CudaLib::Cublas, || unsafe {
        cudarc::cublas::sys::is_culib_present()
    })?;
    use cudarc::cublas::sys::{self, libraryPropertyType as P};
    let get = |what| {
        let mut v = 0;
        // SAFETY: cublasGetProperty writes one int through a valid pointer to our local.
        let status = unsafe { sys::cublasGetProperty(what, &mut v) };
        if status == sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            Ok(v)
        } else {
            Err(CudaError::Driver(format!("cublasGetProperty: {status:?}")))
        }
    };
    Ok((
        get(P::MAJOR_VERSION)?,
        get(P::MINOR_VERSION)?,
        get(P::PATCH_LEVEL)?,
    ))
}
