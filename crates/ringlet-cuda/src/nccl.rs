//! The bottom of the NCCL backend: NCCL's entry points, looked up in the library that
//! [`libs`](crate::libs) found, with typed results.
//!
//! cudarc's own NCCL loader asks for `libnccl.so` and versioned names NCCL never ships (pip's
//! `nvidia-nccl-cu12` has only `libnccl.so.2`), so the functions are resolved here, by path, into
//! a table of pointers typed with `cudarc::nccl::sys`'s types. Results are read as plain integers:
//! an enum from C with a value Rust does not know would be undefined behaviour.

use crate::libs::{self, CudaLib};
use crate::CudaError;
use cudarc::nccl::sys::{ncclComm_t, ncclUniqueId};
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
    unsafe extern "C" fn(*mut ncclComm_t, c_int, ncclUniqueId, c_int, *mut Config) -> Status;
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
        API.get_or_init(|| {
            let api = Api::open(&path)?;
            match api.version() {
                Ok(v) if v >= (2, 18, 0) => Ok(api),
                Ok((a, b, c)) => Err(format!(
                    "{} is NCCL {a}.{b}.{c}: Ringlet needs 2.18 or later",
                    path.display()
                )),
                Err(e) => Err(format!("{}: {e}", path.display())),
            }
        })
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

/// `ncclConfig_t` as NCCL 2.18 laid it out (version field 2.17: the fields NCCL reads from an
/// older config are those up to `splitShare`; the rest it resets to defaults). NCCL reads a config by the `version` it carries, so
/// this older layout is understood by every later NCCL, whatever header cudarc was built from.
#[repr(C)]
pub struct Config {
    size: usize,
    magic: u32,
    version: u32,
    blocking: c_int,
    cga_cluster_size: c_int,
    min_ctas: c_int,
    max_ctas: c_int,
    net_name: *const c_char,
    split_share: c_int,
}

impl Config {
    /// `NCCL_CONFIG_INITIALIZER` with `blocking = 0`: calls return at once (`ncclInProgress`)
    /// and their completion is polled, so every wait can have a deadline.
    pub fn non_blocking() -> Config {
        const UNDEF_INT: c_int = c_int::MIN;
        Config {
            size: std::mem::size_of::<Config>(),
            magic: 0xcafe_beef,
            version: 21700,
            blocking: 0,
            cga_cluster_size: UNDEF_INT,
            min_ctas: UNDEF_INT,
            max_ctas: UNDEF_INT,
            net_name: std::ptr::null(),
            split_share: UNDEF_INT,
        }
    }
}

/// NCCL's `ncclDataType_t` for an element type.
pub fn datatype(dtype: ringlet_core::DType) -> c_int {
    use ringlet_core::DType;
    match dtype {
        DType::U8 => 1,
        DType::I32 => 2,
        DType::I64 => 4,
        DType::F16 => 6,
        DType::F32 => 7,
        DType::F64 => 8,
        DType::BF16 => 9,
    }
}

/// NCCL's `ncclRedOp_t` for a reduction (`ncclAvg` needs NCCL 2.10, older than we accept).
pub fn redop(op: ringlet_core::ReduceOp) -> c_int {
    use ringlet_core::ReduceOp;
    match op {
        ReduceOp::Sum => 0,
        ReduceOp::Prod => 1,
        ReduceOp::Max => 2,
        ReduceOp::Min => 3,
        ReduceOp::Avg => 4,
    }
}

/// Where a non-blocking NCCL operation stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    Done,
    InProgress,
}

/// An NCCL communicator created non-blocking. Dropping it destroys it, or aborts it if
/// [`abort`](Comm::abort) was not already called and it is in error.
pub struct Comm {
    api: &'static Api,
    raw: ncclComm_t,
    gone: bool,
}

// SAFETY: an ncclComm_t may be used from any thread as long as calls on it are not concurrent;
// Comm's methods that call NCCL take &self but callers serialise them (one collective at a time
// per communicator, as NCCL requires), and Drop has &mut self.
unsafe impl Send for Comm {}

impl Comm {
    /// Starts joining the communicator of `n` ranks as `rank`; poll [`state`](Comm::state)
    /// until it is done.
    pub fn start(
        api: &'static Api,
        id: &[u8; 128],
        n: usize,
        rank: usize,
    ) -> Result<Comm, NcclError> {
        let mut raw: ncclComm_t = std::ptr::null_mut();
        let mut config = Config::non_blocking();
        let id = ncclUniqueId {
            internal: id.map(|b| b as c_char),
        };
        // SAFETY: valid out-pointer and config; the id is passed by value as NCCL expects.
        let code = unsafe {
            (api.ncclCommInitRankConfig)(&mut raw, n as c_int, id, rank as c_int, &mut config)
        };
        if code != IN_PROGRESS {
            api.check("ncclCommInitRankConfig", code)?;
        }
        if raw.is_null() {
            return Err(NcclError {
                call: "ncclCommInitRankConfig",
                code,
                message: "returned no communicator".into(),
            });
        }
        Ok(Comm {
            api,
            raw,
            gone: false,
        })
    }

    /// The communicator's asynchronous state: done, still in progress, or failed.
    pub fn state(&self) -> Result<Progress, NcclError> {
        let mut async_err: Status = SUCCESS;
        // SAFETY: a live communicator and a valid out-pointer.
        let code = unsafe { (self.api.ncclCommGetAsyncError)(self.raw, &mut async_err) };
        self.api.check("ncclCommGetAsyncError", code)?;
        match async_err {
            SUCCESS => Ok(Progress::Done),
            IN_PROGRESS => Ok(Progress::InProgress),
            e => Err(self.api.check("NCCL communicator", e).unwrap_err()),
        }
    }

    /// Ends the communicator at once, whatever is in flight (NCCL's answer to a stuck peer).
    pub fn abort(&mut self) {
        if !self.gone {
            self.gone = true;
            // SAFETY: a live communicator, aborted once.
            let _ = unsafe { (self.api.ncclCommAbort)(self.raw) };
        }
    }

    fn issued(&self, call: &'static str, code: Status) -> Result<(), NcclError> {
        if code == IN_PROGRESS {
            Ok(())
        } else {
            self.api.check(call, code)
        }
    }

    /// The calls of type [`Collective`]: all_reduce and reduce_scatter (`arg` = op), broadcast
    /// (`arg` = root).
    ///
    /// # Safety
    /// As [`all_reduce`](Comm::all_reduce).
    #[allow(clippy::too_many_arguments)]
    unsafe fn collective(
        &self,
        call: &'static str,
        f: Collective,
        send: u64,
        recv: u64,
        count: usize,
        dtype: c_int,
        arg: c_int,
        stream: *mut c_void,
    ) -> Result<(), NcclError> {
        // SAFETY: the caller's contract covers the addresses; the comm is live.
        let code = f(
            send as *const c_void,
            recv as *mut c_void,
            count,
            dtype,
            arg,
            self.raw,
            stream,
        );
        self.issued(call, code)
    }

    /// Queues an all-reduce of `count` elements on `stream`.
    ///
    /// # Safety
    /// `send` and `recv` are device addresses of at least `count` elements of `dtype` on the
    /// communicator's device, alive until the queued work completes.
    pub unsafe fn all_reduce(
        &self,
        send: u64,
        recv: u64,
        count: usize,
        dtype: c_int,
        op: c_int,
        stream: *mut c_void,
    ) -> Result<(), NcclError> {
        self.collective(
            "ncclAllReduce",
            self.api.ncclAllReduce,
            send,
            recv,
            count,
            dtype,
            op,
            stream,
        )
    }

    /// Queues a broadcast from `root`.
    ///
    /// # Safety
    /// As [`all_reduce`](Comm::all_reduce).
    pub unsafe fn broadcast(
        &self,
        send: u64,
        recv: u64,
        count: usize,
        dtype: c_int,
        root: usize,
        stream: *mut c_void,
    ) -> Result<(), NcclError> {
        self.collective(
            "ncclBroadcast",
            self.api.ncclBroadcast,
            send,
            recv,
            count,
            dtype,
            root as c_int,
            stream,
        )
    }

    /// Queues an all-gather of `count` elements from each rank.
    ///
    /// # Safety
    /// `send` holds `count` elements, `recv` `count * n`; otherwise as [`all_reduce`](Comm::all_reduce).
    pub unsafe fn all_gather(
        &self,
        send: u64,
        recv: u64,
        count: usize,
        dtype: c_int,
        stream: *mut c_void,
    ) -> Result<(), NcclError> {
        // SAFETY: the caller's contract (above) covers the addresses; the comm is live.
        let code = (self.api.ncclAllGather)(
            send as *const c_void,
            recv as *mut c_void,
            count,
            dtype,
            self.raw,
            stream,
        );
        self.issued("ncclAllGather", code)
    }

    /// Queues a reduce-scatter leaving `count` elements on each rank.
    ///
    /// # Safety
    /// `send` holds `count * n` elements, `recv` `count`; otherwise as [`all_reduce`](Comm::all_reduce).
    pub unsafe fn reduce_scatter(
        &self,
        send: u64,
        recv: u64,
        count: usize,
        dtype: c_int,
        op: c_int,
        stream: *mut c_void,
    ) -> Result<(), NcclError> {
        self.collective(
            "ncclReduceScatter",
            self.api.ncclReduceScatter,
            send,
            recv,
            count,
            dtype,
            op,
            stream,
        )
    }
}

impl Drop for Comm {
    fn drop(&mut self) {
        if self.gone {
            return;
        }
        // ncclCommDestroy waits for work in flight, which never ends if a peer is gone: only a
        // communicator whose last operation is done is destroyed, any other is aborted.
        if self.state() != Ok(Progress::Done) {
            self.abort();
            return;
        }
        self.gone = true;
        // SAFETY: a live, healthy communicator, destroyed once.
        let _ = unsafe { (self.api.ncclCommDestroy)(self.raw) };
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
            typedef struct { size_t size; unsigned magic, version; int blocking, cga, minc, maxc;
                             const char *net; int split; } config217;
            /* A communicator that connects after two polls, then fails when told to. */
            static int polls, fail_with, aborts, destroys;
            void fake_fail_with(int code) { fail_with = code; }
            int fake_aborts(void) { return aborts; }
            int fake_destroys(void) { return destroys; }
            int ncclCommInitRankConfig(void **comm, int n, ncclUniqueId id, int rank, config217 *c) {
                if (c->magic != 0xcafebeef || c->version != 21700 || c->blocking != 0
                    || c->size != sizeof(config217) || c->net != 0 || rank >= n) return 5;
                polls = 0; *comm = (void *)&polls; return 7;
            }
            int ncclCommGetAsyncError(void *comm, int *e) {
                *e = fail_with ? fail_with : (polls++ < 2 ? 7 : 0); return 0;
            }
            int ncclCommAbort(void *comm) { aborts++; return 0; }
            int ncclCommDestroy(void *comm) { destroys++; return 0; }
            int ncclBroadcast(void) { return 0; }
            int ncclAllGather(void) { return 0; }
            int ncclReduceScatter(void) { return 0; }
            "#,
        );
        if complete {
            c.push_str("int ncclAllReduce(void) { return 7; }\n");
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
            ringlet_core::skipped!("no C compiler (cc) to build a stand-in libnccl");
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

        // The communicator: created non-blocking (the 2.17 config layout checked by the
        // stand-in), in progress until polled twice, then failing asynchronously.
        let api: &'static Api = Box::leak(Box::new(Api::open(&lib).unwrap()));
        let fake = |name: &str| {
            // SAFETY: dlopen of the stand-in built above (already loaded: same handle back).
            let h = unsafe {
                libc::dlopen(
                    CString::new(lib.as_os_str().as_encoded_bytes())
                        .unwrap()
                        .as_ptr(),
                    libc::RTLD_NOW,
                )
            };
            // SAFETY: dlsym on a live handle with a NUL-terminated name.
            let p = unsafe { libc::dlsym(h, CString::new(name).unwrap().as_ptr()) };
            assert!(!p.is_null(), "{name}");
            p
        };
        type SetFn = extern "C" fn(c_int);
        type GetFn = extern "C" fn() -> c_int;
        // SAFETY: the stand-in's own functions, defined in its C above with these signatures.
        let fail_with =
            unsafe { std::mem::transmute::<*mut c_void, SetFn>(fake("fake_fail_with")) };
        // SAFETY: as above.
        let aborts = unsafe { std::mem::transmute::<*mut c_void, GetFn>(fake("fake_aborts")) };
        // SAFETY: as above.
        let destroys = unsafe { std::mem::transmute::<*mut c_void, GetFn>(fake("fake_destroys")) };
        let e = Comm::start(api, &[0; 128], 2, 2).err().unwrap();
        assert_eq!(e.code, 5, "rank 2 of 2 is refused");
        let healthy = Comm::start(api, &[0; 128], 2, 1).unwrap();
        assert_eq!(healthy.state().unwrap(), Progress::InProgress);
        assert_eq!(healthy.state().unwrap(), Progress::InProgress);
        assert_eq!(healthy.state().unwrap(), Progress::Done);
        // A queued collective returning ncclInProgress is issued, not failed.
        // SAFETY: the stand-in's all-reduce touches no memory.
        unsafe {
            healthy.all_reduce(
                0,
                0,
                4,
                datatype(ringlet_core::DType::F32),
                redop(ringlet_core::ReduceOp::Sum),
                std::ptr::null_mut(),
            )
        }
        .unwrap();
        drop(healthy);
        assert_eq!(
            (aborts(), destroys()),
            (0, 1),
            "a healthy communicator is destroyed"
        );
        let mut failing = Comm::start(api, &[0; 128], 2, 0).unwrap();
        fail_with(3);
        let e = failing.state().unwrap_err();
        assert_eq!(e.code, 3);
        assert_eq!(e.message, "other");
        failing.abort();
        failing.abort();
        drop(failing);
        assert_eq!(
            (aborts(), destroys()),
            (1, 1),
            "aborted once, never destroyed"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
