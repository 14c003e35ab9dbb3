//! CUDA's headers for NVRTC: the ones that came with the NVRTC in use first.

use crate::libs::{cuda_major_of, once_each, python_site_dirs, toolkit_roots};
use std::path::{Path, PathBuf};

/// Directories with CUDA's headers (`cuda_fp16.h`) for the NVRTC at `nvrtc`:
/// `RINGLET_CUDA_INCLUDE`, then the headers that came with that NVRTC (its install's `include`,
/// or the runtime wheel beside its wheel: `nvidia/cu13/include`, `nvidia/cuda_runtime/include`),
/// then any other install — of the same CUDA major first, since a major's headers may use
/// built-ins an older NVRTC lacks.
pub fn include_dirs(nvrtc: Option<&Path>) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(v) = std::env::var_os("RINGLET_CUDA_INCLUDE").filter(|v| !v.is_empty()) {
        dirs.extend(std::env::split_paths(&v));
    }
    let real = nvrtc.and_then(|p| std::fs::canonicalize(p).ok());
    let major = nvrtc.and_then(cuda_major_of);
    if let Some(lib_dir) = real.as_deref().and_then(Path::parent) {
        // lib64/, lib/, targets/<arch>/lib/ of an install; nvidia/<pkg>/lib/ of a wheel.
        dirs.push(lib_dir.join("../include"));
        dirs.push(lib_dir.join("../../cuda_runtime/include"));
    }
    let mut others: Vec<PathBuf> = Vec::new();
    for root in toolkit_roots() {
        others.push(root.join("include"));
        others.push(root.join(format!("targets/{}-linux/include", std::env::consts::ARCH)));
    }
    for site in python_site_dirs() {
        others.push(site.join("nvidia/cu13/include"));
        others.push(site.join("nvidia/cuda_runtime/include"));
    }
    others.push("/usr/include".into());
    // Stable: the same major's headers first, in search order.
    others.sort_by_cached_key(|d| header_major(d) != major || major.is_none());
    dirs.extend(others);
    dirs.retain(|d| d.join("cuda_fp16.h").is_file());
    once_each(&mut dirs);
    dirs
}

/// The CUDA major of a header directory, from `CUDA_VERSION` in its `cuda.h` (13000 is 13).
fn header_major(dir: &Path) -> Option<u32> {
    use std::io::Read;
    let mut text = String::new();
    std::fs::File::open(dir.join("cuda.h"))
        .ok()?
        .take(1 << 20)
        .read_to_string(&mut text)
        .ok()?;
    let at = text.find("#define CUDA_VERSION ")?;
    let digits: String = text[at + 21..]
        .chars()
        .skip_while(|c| c.is_whitespace())
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse::<u32>().ok().map(|v| v / 1000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_say_their_cuda_major() {
        let dir = std::env::temp_dir().join(format!("ringlet-headers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("cuda.h"),
            "#ifndef X\n#define CUDA_VERSION 13000\n",
        )
        .unwrap();
        assert_eq!(header_major(&dir), Some(13));
        std::fs::write(dir.join("cuda.h"), "#define CUDA_VERSION   12090 // 12.9\n").unwrap();
        assert_eq!(header_major(&dir), Some(12));
        std::fs::write(dir.join("cuda.h"), "no version here").unwrap();
        assert_eq!(header_major(&dir), None);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
