//! Compiled kernel images on disk: one file per source, target and NVRTC version, sealed with a
//! checksum so that a cut-short or altered file is compiled again instead of loaded.

use crate::CudaError;
use sha2::{Digest, Sha256};
use std::path::PathBuf;

/// Where compiled kernels are kept: `$RINGLET_CACHE_DIR`, else `$XDG_CACHE_HOME/ringlet`, else
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
        .join("kernels")
}

const SEAL: &[u8] = b"\n// ringlet-kernels sha256=";

fn digest(bytes: &[u8]) -> String {
    Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// The image of a cache file whose trailer carries the checksum of everything before it.
pub(crate) fn verified(stored: &[u8]) -> Option<&[u8]> {
    let at = stored.windows(SEAL.len()).rposition(|w| w == SEAL)?;
    let (bytes, rest) = stored.split_at(at);
    let sum = std::str::from_utf8(&rest[SEAL.len()..]).ok()?;
    (sum.trim_end() == digest(bytes)).then_some(bytes)
}

/// Writes `bytes`, sealed with their checksum, to `file` through a temporary file and a rename.
pub(crate) fn store(file: &std::path::Path, bytes: &[u8]) -> Result<(), CudaError> {
    let mut sealed = bytes.to_vec();
    sealed.extend_from_slice(SEAL);
    sealed.extend_from_slice(digest(bytes).as_bytes());
    sealed.push(b'\n');
    let dir = file.parent().expect("cache files live in a directory");
    std::fs::create_dir_all(dir)
        .map_err(|e| CudaError::io(format!("creating {}", dir.display()), e))?;
    // Unique per process and thread: ranks as threads of one process compile the same source.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let tmp = file.with_extension(format!(
        "tmp{}-{}",
        std::process::id(),
        WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    ));
    std::fs::write(&tmp, &sealed)
        .map_err(|e| CudaError::io(format!("writing {}", tmp.display()), e))?;
    std::fs::rename(&tmp, file).map_err(|e| CudaError::io(format!("renaming {}", tmp.display()), e))
}
