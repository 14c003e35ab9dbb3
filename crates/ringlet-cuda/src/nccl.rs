//! The bottom of the NCCL backend: NCCL's entry points, looked up in the library that
//! [`libs`](crate::libs) found, with typed results.
//!
//! cudarc's own NCCL loader asks for `libnccl.so` and versioned names NCCL never ships (pip's
//! `nvidia-nccl-cu12` has only `libnccl.so.2`), so the functions are resolved here, by path, into
//! a table of pointers typed with `cudarc::nccl::sys`'s types. Results are read as plain integers:
//! an enum from C with a value Rust does not know would be undefined behaviour.

use crate::libs::{self, CudaLib};
use crate::CudaError;
use cudarc::nccl::sys::{ncclComm_t, ncclConfig_t, ncclUniqueId};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::path::Path;

type Status = c_int;
const SUCCESS: Status = 0;
/// `ncclInProgress`: a non-blocking call has not finished yet.
pub const IN_PROGRESS: Status = 7;

type GetVersion = unsafe extern "C" fn(*mut c_int) -> Status;
type GetUniqueId = unsafe extern "C" fn(*mut ncclUniqueId) -> Status;
type GetErrorString = unsafe extern "C" fn(Status) -> *const c_char;
type CommInitRankConfig =
    unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int, *mut ncclConfig_t) -> Status;
type CommGetAsyncError = unsafe extern "C" fn(ncclComm_t, *mut Status) -> Status;
type CommOp = unsafe extern "C" fn(ncclComm_t) -> Status;
/// all_reduce, reduce_scatter (op), broadcast (root): send, recv, count, datatype, op or root,
/// comm, stream.
type Collective = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    c_int,
    ncclComm_t,
    *mut c_void,
) -> Status;
type AllGather = unsafe extern "C" fn(
    *const c_void,
    *mut c_void,
    usize,
    c_int,
    ncclComm_t,
    *mut c_void,
) -> Status;

/// NCCL's entry points used by Ringlet.
#[allow(non_snake_case)]
pub struct Api {
    pub ncclGetVersion: GetVersion,
    pub ncclGetUniqueId: GetUniqueId,
    pub ncclGetErrorString: GetErrorString,
    pub ncclCommInitRankConfig: CommInitRankConfig,
    pub ncclCommGetAsyncError: CommGetAsyncError,
    pub ncclCommAbort: CommOp,
    pub ncclCommDestroy: CommOp,
    pub ncclAllReduce: Collective,
    pub ncclBroadcast: Collective,
    pub ncclAllGather: AllGather,
    pub ncclReduceScatter: Collective,
}

/// An NCCL call that did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{call}: {message} (ncclResult {code})")]
pub struct NcclError {
    pub call: &'static str,
    pub code: i32,
    pub message: String,
}

impl Api {
    /// The NCCL that [`libs`] finds (`RINGLET_NCCL_LIB`, the system, pip's wheel).
    pub fn load() -> Result<&'static Api, CudaError> {
        static API: std::sync::OnceLock<Result<Api, String>> = std::sync::OnceLock::new();
        let path = libs::load(CudaLib::Nccl)?;
        API.get_or_init(|| Api::open(&path))
            .as_ref()
            .map_err(|why| CudaError::Driver(why.clone()))
    }

    /// Resolves every entry point in the library at `path`.
    pub fn open(path: &Path) -> Result<Api, String> {
        let c = CString::new(path.as_os_str().as_encoded_bytes())
            .map_err(|_| format!("{} has a NUL in its name", path.display()))?;
        // SAFETY: dlopen of a NUL-terminated path; the handle is never closed, so the function
        // pointers taken from it stay valid for the life of the process.
        let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
        if handle.is_null() {
            return Err(format!("cannot load {}", path.display()));
        }
        let sym = |name: &str| -> Result<*mut c_void, String> {
            let cname = CString::new(name).expect("symbol names have no NUL");
            // SAFETY: dlsym on a live handle with a NUL-terminated name.
            let p = unsafe { libc::dlsym(handle, cname.as_ptr()) };
            if p.is_null() {
                Err(format!(
                    "{} lacks {name}: NCCL 2.18 or later is needed",
                    path.display()
                ))
            } else {
                Ok(p)
            }
        };
        macro_rules! entry {
            ($name:ident, $ty:ty) => {
                // SAFETY: the symbol is NCCL's function of that name, whose C signature is
                // `$ty` (nccl.h, 2.18 and later).
                unsafe { std::mem::transmute::<*mut c_void, $ty>(sym(stringify!($name))?) }
            };
        }
        Ok(Api {
            ncclGetVersion: entry!(ncclGetVersion, GetVersion),
            ncclGetUniqueId: entry!(ncclGetUniqueId, GetUniqueId),
            ncclGetErrorString: entry!(ncclGetErrorString, GetErrorString),
            ncclCommInitRankConfig: entry!(ncclCommInitRankConfig, CommInitRankConfig),
            ncclCommGetAsyncError: entry!(ncclCommGetAsyncError, CommGetAsyncError),
            ncclCommAbort: entry!(ncclCommAbort, CommOp),
            ncclCommDestroy: entry!(ncclCommDestroy, CommOp),
            ncclAllReduce: entry!(ncclAllReduce, Collective),
            ncclBroadcast: entry!(ncclBroadcast, Collective),
            ncclAllGather: entry!(ncclAllGather, AllGather),
            ncclReduceScatter: entry!(ncclReduceScatter, Collective),
        })
    }

    /// `Ok` for success, the error (with NCCL's own text) otherwise.
    pub fn check(&self, call: &'static str, code: Status) -> Result<(), NcclError> {
        if code == SUCCESS {
            return Ok(());
        }
        // SAFETY: ncclGetErrorString returns a static NUL-terminated string for any code.
        let text = unsafe { (self.ncclGetErrorString)(code) };
        let message = if text.is_null() {
            "unknown error".into()
        } else {
            // SAFETY: non-null, NUL-terminated, static (see above).
            unsafe { CStr::from_ptr(text) }
                .to_string_lossy()
                .into_owned()
        };
        Err(NcclError {
            call,
            code,
            message,
        })
    }

    /// NCCL's version as (major, minor, patch).
    pub fn version(&self) -> Result<(u32, u32, u32), NcclError> {
        let mut v: c_int = 0;
        // SAFETY: writes one int through a valid pointer.
        self.check("ncclGetVersion", unsafe { (self.ncclGetVersion)(&mut v) })?;
        let v = v as u32;
        // NCCL_VERSION_CODE: major*10000 + minor*100 + patch since 2.9.
        Ok((v / 10000, v / 100 % 100, v % 100))
    }

    /// A fresh unique id (rank 0 makes it; the others receive its bytes).
    pub fn unique_id(&self) -> Result<[u8; 128], NcclError> {
        let mut id = ncclUniqueId { internal: [0; 128] };
        // SAFETY: fills the 128-byte id through a valid pointer.
        self.check("ncclGetUniqueId", unsafe {
            (self.ncclGetUniqueId)(&mut id)
        })?;
        Ok(id.internal.map(|c| c as u8))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A stand-in libnccl.so.2 built from C here: real dlopen and dlsym, NCCL's ABI for the
    /// calls it defines, no GPU.
    fn fake_nccl(dir: &Path, complete: bool) -> Option<std::path::PathBuf> {
        let mut c = String::from(
            r#"
            #include <string.h>
            typedef struct { char internal[128]; } ncclUniqueId;
            int ncclGetVersion(int *v) { *v = 22905; return 0; }
            int ncclGetUniqueId(ncclUniqueId *id) { for (int i = 0; i < 128; i++) id->internal[i] = (char)(i * 7); return 0; }
            const char *ncclGetErrorString(int r) { return r == 5 ? "invalid usage" : "other"; }
            int ncclCommInitRankConfig(void) { return 5; }
            int ncclCommGetAsyncError(void) { return 0; }
            int ncclCommAbort(void) { return 0; }
            int ncclCommDestroy(void) { return 0; }
            int ncclBroadcast(void) { return 0; }
            int ncclAllGather(void) { return 0; }
            int ncclReduceScatter(void) { return 0; }
            "#,
        );
        if complete {
            c.push_str("int ncclAllReduce(void) { return 0; }\n");
        }
        std::fs::create_dir_all(dir).ok()?;
        let src = dir.join("fake_nccl.c");
        std::fs::write(&src, c).ok()?;
        let lib = dir.join(if complete {
            "libnccl.so.2"
        } else {
            "libnccl-partial.so.2"
        });
        let ok = Command::new("cc")
            .args(["-shared", "-fPIC", "-o"])
            .arg(&lib)
            .arg(&src)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            assert!(std::env::var_os("CI").is_none(), "no C compiler in CI");
            println!("SKIPPED: no C compiler (cc) to build a stand-in libnccl");
            return None;
        }
        Some(lib)
    }

    #[test]
    fn entry_points_resolve_and_results_are_typed() {
        let dir = std::env::temp_dir().join(format!("ringlet-fake-nccl-{}", std::process::id()));
        let Some(lib) = fake_nccl(&dir, true) else {
            return;
        };
        let api = Api::open(&lib).unwrap();
        assert_eq!(api.version().unwrap(), (2, 29, 5));
        let id = api.unique_id().unwrap();
        assert_eq!(id[3], 21);
        let e = api.check("ncclCommInitRankConfig", 5).unwrap_err();
        assert_eq!(
            e.to_string(),
            "ncclCommInitRankConfig: invalid usage (ncclResult 5)"
        );
        let partial = fake_nccl(&dir, false).unwrap();
        let e = Api::open(&partial).err().unwrap();
        assert!(e.contains("lacks ncclAllReduce"), "{e}");
        assert!(Api::open(&dir.join("none.so")).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
