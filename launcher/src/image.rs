//! `ringrun image build --tag T BINARY...`: a minimal image made from local binaries, with no base
//! image and nothing pulled. Each binary goes to `/usr/local/bin/`; the shared libraries it needs
//! (read from its ELF: the interpreter and `DT_NEEDED`, found along its RPATH/RUNPATH,
//! `LD_LIBRARY_PATH` and the system's library directories, recursively) go to `/usr/local/lib/`,
//! which the image's `LD_LIBRARY_PATH` names (so `$ORIGIN`-relative and cache-only locations need
//! not be rebuilt inside); the interpreter stays at the path the binaries ask for. The build
//! context is a tar made in memory and sent to the engine (`FROM scratch`).

use bollard::query_parameters::BuildImageOptions;
use futures_util::StreamExt;
use object::elf;
use object::read::elf::{Dyn, FileHeader, ProgramHeader};
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

/// The files a binary needs at run time, besides itself: its interpreter and every shared library
/// it loads, resolved to paths on this machine.
pub fn runtime_files(binary: &Path) -> Result<BTreeSet<PathBuf>, String> {
    let mut found = BTreeSet::new();
    let mut queue = vec![binary.to_path_buf()];
    let mut seen = BTreeSet::new();
    while let Some(file) = queue.pop() {
        if !seen.insert(file.clone()) {
            continue;
        }
        let (interp, needed, search) = read_elf(&file)?;
        if let Some(i) = interp {
            found.insert(i);
        }
        for name in needed {
            let lib = resolve(&name, &search).ok_or_else(|| {
                format!(
                    "{}: needs {name}, which is not on this machine",
                    file.display()
                )
            })?;
            found.insert(lib.clone());
            queue.push(lib);
        }
    }
    Ok(found)
}

type ElfDeps = (Option<PathBuf>, Vec<String>, Vec<PathBuf>);

fn read_elf(path: &Path) -> Result<ElfDeps, String> {
    let data = std::fs::read(path).map_err(|e| format!("reading {}: {e}", path.display()))?;
    let bad =
        |e: object::read::Error| format!("{}: not an ELF file we can read ({e})", path.display());
    let hdr = elf::FileHeader64::<object::Endianness>::parse(&*data).map_err(bad)?;
    let endian = hdr.endian().map_err(bad)?;
    let mut interp = None;
    for ph in hdr.program_headers(endian, &*data).map_err(bad)? {
        if let Some(i) = ph.interpreter(endian, &*data).map_err(bad)? {
            interp = Some(PathBuf::from(String::from_utf8_lossy(i).into_owned()));
        }
    }
    let sections = hdr.sections(endian, &*data).map_err(bad)?;
    let mut needed = Vec::new();
    let origin = path
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let mut search = Vec::new();
    if let Some((dyns, link)) = sections.dynamic(endian, &*data).map_err(bad)? {
        let strings = sections.strings(endian, &*data, link).map_err(bad)?;
        for d in dyns {
            let tag = d.tag32(endian);
            let Ok(s) = d.string(endian, strings) else {
                continue;
            };
            let s = String::from_utf8_lossy(s).into_owned();
            match tag {
                Some(elf::DT_NEEDED) => needed.push(s),
                Some(elf::DT_RUNPATH) | Some(elf::DT_RPATH) => search.extend(
                    s.split(':')
                        .map(|p| PathBuf::from(p.replace("$ORIGIN", &origin.to_string_lossy()))),
                ),
                _ => {}
            }
        }
    }
    if let Ok(lp) = std::env::var("LD_LIBRARY_PATH") {
        search.extend(lp.split(':').filter(|p| !p.is_empty()).map(PathBuf::from));
    }
    for dir in [
        "/lib/x86_64-linux-gnu",
        "/usr/lib/x86_64-linux-gnu",
        "/lib/aarch64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/lib64",
        "/usr/lib64",
        "/lib",
        "/usr/lib",
        "/usr/local/lib",
    ] {
        search.push(PathBuf::from(dir));
    }
    Ok((interp, needed, search))
}

/// The first file called `name` along `search` that is a 64-bit ELF, as the loader would take it
/// (a 32-bit library of the same name earlier on the path is skipped, as ld.so skips it).
fn resolve(name: &str, search: &[PathBuf]) -> Option<PathBuf> {
    if name.contains('/') {
        return Some(PathBuf::from(name)).filter(|p| p.exists());
    }
    search
        .iter()
        .map(|d| d.join(name))
        .find(|p| p.is_file() && is_elf64(p))
}

fn is_elf64(p: &Path) -> bool {
    let mut head = [0u8; 5];
    std::fs::File::open(p)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut head))
        .is_ok()
        && head[..4] == *b"\x7fELF"
        && head[4] == elf::ELFCLASS64
}

/// A model version baked into an image: a verified checkpoint of ringlet-train.
pub struct Baked {
    /// The checkpoint (`.../step-N`), copied to `/models/step-N`.
    pub dir: PathBuf,
    /// `step-N@<first 12 hex digits of the model file's SHA-256>`.
    pub version: String,
}

impl Baked {
    /// Verifies `dir` as resume does (manifest, sizes, SHA-256 of every file) and names it.
    pub fn verify(dir: &Path) -> Result<Baked, String> {
        use ringlet_ddp::checkpoint;
        // Shared storage may hang: the read has a deadline, as a resume's has.
        let owned = dir.to_path_buf();
        let (snap, digest) = checkpoint::within(
            dir,
            std::time::Duration::from_secs(300),
            "load checkpoint",
            move || Ok((checkpoint::load(&owned)?, checkpoint::model_digest(&owned)?)),
        )
        .map_err(|e| format!("--model: {e}"))?;
        Ok(Baked {
            dir: dir.to_path_buf(),
            version: format!(
                "step-{}@{}",
                snap.state.step,
                digest.get(..12).unwrap_or(&digest)
            ),
        })
    }

    /// The image tag for this version: `step-N-<hash>` (a tag may not hold '@').
    pub fn tag(&self) -> String {
        self.version.replace('@', "-")
    }

    fn inside(&self) -> String {
        let name = self
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned());
        format!("/models/{}", name.unwrap_or_default())
    }
}

/// The build context: a Dockerfile and `rootfs/` with every file at its path in the image (and
/// the baked model version's files under `/models/`).
pub fn context(binaries: &[PathBuf], model: Option<&Baked>) -> Result<Vec<u8>, String> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut files = BTreeSet::new();
    let mut interpreters = BTreeSet::new();
    let mut names = BTreeSet::new();
    for b in binaries {
        let name = b
            .file_name()
            .ok_or_else(|| format!("{}: not a file", b.display()))?
            .to_string_lossy()
            .into_owned();
        if !names.insert(name.clone()) {
            return Err(format!("two binaries are named {name}"));
        }
        append(&mut tar, b, &format!("rootfs/usr/local/bin/{name}"))?;
        if let (Some(i), _, _) = read_elf(b)? {
            interpreters.insert(i);
        }
        files.extend(runtime_files(b)?);
    }
    let mut libs = BTreeSet::new();
    for f in &files {
        let inside = if interpreters.contains(f) {
            // The path written in the binaries' PT_INTERP (its content, symlinks followed).
            format!("rootfs{}", f.display())
        } else {
            let name = f
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if !libs.insert(name.clone()) {
                continue;
            }
            format!("rootfs/usr/local/lib/{name}")
        };
        append(&mut tar, f, &inside)?;
    }
    let mut dockerfile =
        "FROM scratch\nCOPY rootfs/ /\nENV PATH=/usr/local/bin LD_LIBRARY_PATH=/usr/local/lib\n"
            .to_string();
    if let Some(m) = model {
        for entry in std::fs::read_dir(&m.dir).map_err(|e| format!("{}: {e}", m.dir.display()))? {
            let entry = entry.map_err(|e| format!("{}: {e}", m.dir.display()))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            append(
                &mut tar,
                &entry.path(),
                &format!("rootfs{}/{name}", m.inside()),
            )?;
        }
        // ringlet-serve run serves it without --pin or --checkpoints.
        dockerfile.push_str(&format!(
            "LABEL ringlet.model.version=\"{}\"\nENV RINGLET_SERVE_PIN={}\n",
            m.version,
            m.inside()
        ));
    }
    let mut header = tar::Header::new_gnu();
    header.set_size(dockerfile.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    tar.append_data(&mut header, "Dockerfile", dockerfile.as_bytes())
        .map_err(|e| format!("building the context: {e}"))?;
    // /tmp, writable, as programs expect.
    let mut dir = tar::Header::new_gnu();
    dir.set_entry_type(tar::EntryType::Directory);
    dir.set_mode(0o1777);
    dir.set_size(0);
    dir.set_cksum();
    tar.append_data(&mut dir, "rootfs/tmp/", std::io::empty())
        .map_err(|e| format!("building the context: {e}"))?;
    tar.into_inner()
        .map_err(|e| format!("building the context: {e}"))
}

fn append(tar: &mut tar::Builder<Vec<u8>>, from: &Path, to: &str) -> Result<(), String> {
    let data = std::fs::read(from).map_err(|e| format!("reading {}: {e}", from.display()))?;
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o755);
    header.set_cksum();
    tar.append_data(&mut header, to, &*data)
        .map_err(|e| format!("adding {}: {e}", from.display()))
}

/// Builds the image `tag` from `binaries` (and `model`) on the engine `DOCKER_HOST` names; with a
/// model it is also tagged `<repository>:<version>`. Returns the tags.
pub fn build(
    tag: &str,
    binaries: &[PathBuf],
    model: Option<&Baked>,
    insecure_engines: bool,
) -> Result<Vec<String>, String> {
    let ctx = context(binaries, model)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the Docker client's runtime: {e}"))?;
    rt.block_on(async {
        let url = crate::engine::default_url();
        let docker = crate::engine::open(&url, insecure_engines)
            .map_err(|e| format!("docker ({url}): {e}"))?;
        let opts = BuildImageOptions {
            dockerfile: "Dockerfile".into(),
            t: Some(tag.to_string()),
            rm: true,
            forcerm: true,
            ..Default::default()
        };
        let mut stream = docker.build_image(opts, None, Some(bollard::body_full(ctx.into())));
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(e) = info.error_detail.and_then(|d| d.message) {
                        return Err(format!("docker build: {e}"));
                    }
                }
                Err(e) => return Err(format!("docker build: {e}")),
            }
        }
        let mut tags = vec![tag.to_string()];
        if let Some(m) = model {
            // The repository is the tag without its own `:tag` (a registry's `host:port/` stays).
            let repo = match tag.rsplit_once(':') {
                Some((repo, t)) if !t.contains('/') => repo,
                _ => tag,
            };
            let opts = bollard::query_parameters::TagImageOptions {
                repo: Some(repo.to_string()),
                tag: Some(m.tag()),
            };
            docker
                .tag_image(tag, Some(opts))
                .await
                .map_err(|e| format!("docker tag: {e}"))?;
            tags.push(format!("{repo}:{}", m.tag()));
        }
        Ok(tags)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Our own test binary links libc dynamically: its interpreter and libc are found.
    #[test]
    fn finds_the_interpreter_and_libc_of_a_real_binary() {
        let me = std::env::current_exe().unwrap();
        let files = runtime_files(&me).unwrap();
        assert!(
            files
                .iter()
                .any(|f| f.to_string_lossy().contains("ld-linux")),
            "{files:?}"
        );
        assert!(
            files.iter().any(|f| f
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libc.so"))),
            "{files:?}"
        );
        let e = runtime_files(Path::new("/etc/hostname")).unwrap_err();
        assert!(e.contains("/etc/hostname"), "{e}");
    }
}
