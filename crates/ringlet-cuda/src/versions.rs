//! Each library's own answer to "which version are you", and the address of the entry point
//! that answered (so [`libs::found`](crate::libs::found) can name the file cudarc really uses).

use crate::libs::{self, CudaLib};
use crate::CudaError;
use std::ffi::c_void;

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
    // libcublas needs libcublasLt; loading it first from where we find it lets the dynamic
    // linker resolve libcublas's dependency even outside its search path.
    let _ = libs::load(CudaLib::CublasLt);
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
