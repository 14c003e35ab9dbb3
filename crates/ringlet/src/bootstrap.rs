//! Who launched us, and what that launcher told us: rank, world size, local rank and size, and
//! where the rendezvous store is. Sources are tried in this order, the first that names a rank
//! winning:
//!
//! | source | rank, world size | local rank, local size | store host |
//! |---|---|---|---|
//! | torchrun, Kubeflow PyTorchJob, `ringrun` | `RANK`, `WORLD_SIZE` | `LOCAL_RANK`, `LOCAL_WORLD_SIZE` | `MASTER_ADDR` |
//! | Open MPI | `OMPI_COMM_WORLD_RANK`, `_SIZE` | `OMPI_COMM_WORLD_LOCAL_RANK`, `_LOCAL_SIZE` | `MASTER_ADDR` |
//! | MPICH/Hydra, PMI | `PMI_RANK`, `PMI_SIZE` | `MPI_LOCALRANKID`, `MPI_LOCALNRANKS` | `MASTER_ADDR` |
//! | Slurm (`srun`) | `SLURM_PROCID`, `SLURM_NTASKS` | `SLURM_LOCALID`, from `SLURM_STEP_TASKS_PER_NODE` | `MASTER_ADDR`, else the first host of `SLURM_STEP_NODELIST` / `SLURM_JOB_NODELIST` |
//! | Volcano | `VC_TASK_INDEX`, `WORLD_SIZE` or the one `VC_<TASK>_NUM` | as the global ones | `MASTER_ADDR`, else the first host of the one `VC_<TASK>_HOSTS` |
//!
//! `MASTER_PORT` (default 29500) gives the store port for every source. Missing local values
//! default to the global ones (a single host).

use ringlet_core::{Error, Result};
use std::collections::HashMap;

/// The launcher a process found itself under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    Torchrun,
    OpenMpi,
    Pmi,
    Slurm,
    Volcano,
}

impl Launcher {
    pub fn name(self) -> &'static str {
        match self {
            Launcher::Torchrun => "torchrun-style environment (RANK, WORLD_SIZE)",
            Launcher::OpenMpi => "Open MPI (OMPI_COMM_WORLD_*)",
            Launcher::Pmi => "MPICH/Hydra PMI (PMI_RANK, PMI_SIZE)",
            Launcher::Slurm => "Slurm (SLURM_PROCID, SLURM_NTASKS)",
            Launcher::Volcano => "Volcano (VC_TASK_INDEX)",
        }
    }
}

/// What the launcher told us.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub launcher: Launcher,
    pub rank: usize,
    pub world_size: usize,
    pub local_rank: usize,
    pub local_world_size: usize,
    /// The store's host, when the launcher names one.
    pub store_host: Option<String>,
}

/// Reads the first launcher's variables that are present in `env` (see the module docs).
pub fn detect(env: &HashMap<String, String>) -> Result<Placement> {
    let get = |k: &str| env.get(k).filter(|v| !v.trim().is_empty()).cloned();
    let found = if get("RANK").is_some() {
        Some((
            Launcher::Torchrun,
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "LOCAL_WORLD_SIZE",
        ))
    } else if get("OMPI_COMM_WORLD_RANK").is_some() {
        Some((
            Launcher::OpenMpi,
            "OMPI_COMM_WORLD_RANK",
            "OMPI_COMM_WORLD_SIZE",
            "OMPI_COMM_WORLD_LOCAL_RANK",
            "OMPI_COMM_WORLD_LOCAL_SIZE",
        ))
    } else if get("PMI_RANK").is_some() {
        Some((
            Launcher::Pmi,
            "PMI_RANK",
            "PMI_SIZE",
            "MPI_LOCALRANKID",
            "MPI_LOCALNRANKS",
        ))
    } else if get("SLURM_PROCID").is_some() {
        Some((
            Launcher::Slurm,
            "SLURM_PROCID",
            "SLURM_NTASKS",
            "SLURM_LOCALID",
            "",
        ))
    } else {
        None
    };
    let mut p = match found {
        Some((launcher, rank, world, local_rank, local_world)) => {
            let rank: usize = number(&get, rank)?;
            let world_size: usize = required(&get, world, launcher)?;
            Placement {
                launcher,
                rank,
                world_size,
                local_rank: optional(&get, local_rank)?.unwrap_or(rank),
                local_world_size: optional(&get, local_world)?.unwrap_or(world_size),
                store_host: None,
            }
        }
        None if get("VC_TASK_INDEX").is_some() => volcano(env, &get)?,
        None => {
            return Err(Error::Config(
                "no launcher found: set RANK and WORLD_SIZE (ringrun, torchrun and Kubeflow do), or run under \
                 mpirun, srun or a Volcano job"
                    .into(),
            ))
        }
    };
    if p.launcher == Launcher::Slurm {
        slurm_details(&get, &mut p)?;
    }
    if let Some(addr) = get("MASTER_ADDR") {
        p.store_host = Some(addr);
    }
    if p.world_size == 0 || p.rank >= p.world_size {
        return Err(Error::Config(format!(
            "{}: rank {} must be below world size {}",
            p.launcher.name(),
            p.rank,
            p.world_size
        )));
    }
    Ok(p)
}

fn number<T: std::str::FromStr>(get: &impl Fn(&str) -> Option<String>, var: &str) -> Result<T> {
    let v = get(var).unwrap_or_default();
    v.trim()
        .parse()
        .map_err(|_| Error::Config(format!("{var}={v:?} is not valid")))
}

fn optional<T: std::str::FromStr>(
    get: &impl Fn(&str) -> Option<String>,
    var: &str,
) -> Result<Option<T>> {
    if var.is_empty() || get(var).is_none() {
        return Ok(None);
    }
    number(get, var).map(Some)
}

fn required<T: std::str::FromStr>(
    get: &impl Fn(&str) -> Option<String>,
    var: &str,
    launcher: Launcher,
) -> Result<T> {
    optional(get, var)?
        .ok_or_else(|| Error::Config(format!("{} is set but {var} is not", launcher.name())))
}

fn slurm_details(get: &impl Fn(&str) -> Option<String>, p: &mut Placement) -> Result<()> {
    let per_node = get("SLURM_STEP_TASKS_PER_NODE").or_else(|| get("SLURM_TASKS_PER_NODE"));
    if let (Some(spec), Some(node)) = (per_node, optional::<usize>(get, "SLURM_NODEID")?) {
        let counts = tasks_per_node(&spec).ok_or_else(|| {
            Error::Config(format!("SLURM_STEP_TASKS_PER_NODE={spec:?} is not valid"))
        })?;
        if let Some(&n) = counts.get(node) {
            p.local_world_size = n;
        }
    }
    if let Some(list) = get("SLURM_STEP_NODELIST").or_else(|| get("SLURM_JOB_NODELIST")) {
        let hosts = expand_hostlist(&list)?;
        p.store_host = hosts.into_iter().next();
    }
    Ok(())
}

fn volcano(
    env: &HashMap<String, String>,
    get: &impl Fn(&str) -> Option<String>,
) -> Result<Placement> {
    let rank: usize = number(get, "VC_TASK_INDEX")?;
    let one_task = |suffix: &str| -> Option<String> {
        let mut matches = env
            .keys()
            .filter(|k| k.starts_with("VC_") && k.ends_with(suffix) && k.len() > 3 + suffix.len())
            .filter_map(|k| get(k));
        let first = matches.next();
        if matches.next().is_some() {
            None // several tasks: which one we belong to is not said
        } else {
            first
        }
    };
    let world_size = match get("WORLD_SIZE") {
        Some(_) => number(get, "WORLD_SIZE")?,
        None => one_task("_NUM")
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| {
                Error::Config(
                    "Volcano: VC_TASK_INDEX is set, but not WORLD_SIZE nor exactly one VC_<TASK>_NUM".into(),
                )
            })?,
    };
    let store_host =
        one_task("_HOSTS").and_then(|h| h.split(',').next().map(|s| s.trim().to_string()));
    Ok(Placement {
        launcher: Launcher::Volcano,
        rank,
        world_size,
        local_rank: rank,
        local_world_size: world_size,
        store_host: store_host.filter(|h| !h.is_empty()),
    })
}

/// Slurm's task counts per node, e.g. `2(x3),1` → `[2, 2, 2, 1]`.
pub fn tasks_per_node(spec: &str) -> Option<Vec<usize>> {
    let mut out = Vec::new();
    for part in spec.split(',') {
        let part = part.trim();
        match part.split_once("(x") {
            Some((count, times)) => {
                let times: usize = times.strip_suffix(')')?.parse().ok()?;
                let count: usize = count.parse().ok()?;
                out.extend(std::iter::repeat_n(count, times));
            }
            None => out.push(part.parse().ok()?),
        }
    }
    Some(out)
}

/// Expands Slurm's compressed host lists: `node[01-04,07],login` → `node01 node02 node03 node04
/// node07 login`; zero padding is kept, several bracket groups in one name multiply out.
pub fn expand_hostlist(list: &str) -> Result<Vec<String>> {
    let bad = |why: &str| Error::Config(format!("host list {list:?}: {why}"));
    let mut hosts = Vec::new();
    for item in split_top_level(list).map_err(&bad)? {
        let mut names = vec![String::new()];
        let mut rest = item;
        while !rest.is_empty() {
            match rest.find('[') {
                None => {
                    names.iter_mut().for_each(|n| n.push_str(rest));
                    rest = "";
                }
                Some(open) => {
                    let close = rest[open..].find(']').ok_or_else(|| bad("unclosed '['"))? + open;
                    let prefix = &rest[..open];
                    let values =
                        expand_ranges(&rest[open + 1..close]).ok_or_else(|| bad("bad range"))?;
                    names = names
                        .iter()
                        .flat_map(|n| values.iter().map(move |v| format!("{n}{prefix}{v}")))
                        .collect();
                    if names.len() > 1 << 20 {
                        return Err(bad("expands to more than a million hosts"));
                    }
                    rest = &rest[close + 1..];
                }
            }
        }
        hosts.extend(names.into_iter().filter(|n| !n.is_empty()));
    }
    if hosts.is_empty() {
        return Err(bad("no hosts"));
    }
    Ok(hosts)
}

/// Splits at commas outside brackets.
fn split_top_level(list: &str) -> std::result::Result<Vec<&str>, &'static str> {
    let (mut items, mut depth, mut start) = (Vec::new(), 0i32, 0);
    for (i, c) in list.char_indices() {
        match c {
            '[' => depth += 1,
            ']' => depth -= 1,
            ',' if depth == 0 => {
                items.push(list[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err("unbalanced or nested brackets");
        }
    }
    if depth != 0 {
        return Err("unclosed '['");
    }
    items.push(list[start..].trim());
    Ok(items.into_iter().filter(|s| !s.is_empty()).collect())
}

/// `01-04,07` → `01 02 03 04 07` (width of the lower bound kept).
fn expand_ranges(spec: &str) -> Option<Vec<String>> {
    let mut out = Vec::new();
    for part in spec.split(',') {
        let part = part.trim();
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let width = lo.len();
        let (a, b): (u64, u64) = (lo.parse().ok()?, hi.parse().ok()?);
        if b < a || b - a > 1 << 20 {
            return None;
        }
        out.extend((a..=b).map(|v| format!("{v:0width$}")));
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn detect_with(vars: &[(&str, &str)]) -> Result<Placement> {
        detect(
            &vars
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn hostlists_expand_like_slurm() {
        assert_eq!(
            expand_hostlist("node[01-04,07]").unwrap(),
            ["node01", "node02", "node03", "node04", "node07"]
        );
        assert_eq!(
            expand_hostlist("a,b[1-2],c").unwrap(),
            ["a", "b1", "b2", "c"]
        );
        assert_eq!(
            expand_hostlist("r[1-2]n[8-9]").unwrap(),
            ["r1n8", "r1n9", "r2n8", "r2n9"]
        );
        assert_eq!(
            expand_hostlist("gpu[098-101]-ib").unwrap(),
            ["gpu098-ib", "gpu099-ib", "gpu100-ib", "gpu101-ib"]
        );
        assert_eq!(expand_hostlist("localhost").unwrap(), ["localhost"]);
        for bad in ["node[1-", "node[3-1]", "node[a-b]", "", "n[[1]]"] {
            assert!(expand_hostlist(bad).is_err(), "{bad:?} should be refused");
        }
    }

    #[test]
    fn tasks_per_node_expands_repeats() {
        assert_eq!(tasks_per_node("2(x3),1"), Some(vec![2, 2, 2, 1]));
        assert_eq!(tasks_per_node("4"), Some(vec![4]));
        assert_eq!(tasks_per_node("2(x"), None);
    }

    #[test]
    fn each_launcher_is_recognised() {
        let p = detect_with(&[
            ("OMPI_COMM_WORLD_RANK", "3"),
            ("OMPI_COMM_WORLD_SIZE", "4"),
            ("OMPI_COMM_WORLD_LOCAL_RANK", "1"),
            ("OMPI_COMM_WORLD_LOCAL_SIZE", "2"),
        ])
        .unwrap();
        assert_eq!(
            (
                p.launcher,
                p.rank,
                p.world_size,
                p.local_rank,
                p.local_world_size
            ),
            (Launcher::OpenMpi, 3, 4, 1, 2)
        );
        assert_eq!(p.store_host, None);
        let p =
            detect_with(&[("PMI_RANK", "1"), ("PMI_SIZE", "2"), ("MASTER_ADDR", "h0")]).unwrap();
        assert_eq!(
            (p.launcher, p.rank, p.world_size, p.store_host.as_deref()),
            (Launcher::Pmi, 1, 2, Some("h0"))
        );
        let p = detect_with(&[
            ("SLURM_PROCID", "5"),
            ("SLURM_NTASKS", "7"),
            ("SLURM_LOCALID", "1"),
            ("SLURM_NODEID", "2"),
            ("SLURM_STEP_TASKS_PER_NODE", "2(x3),1"),
            ("SLURM_JOB_NODELIST", "node[07-10]"),
        ])
        .unwrap();
        assert_eq!(
            (
                p.launcher,
                p.rank,
                p.world_size,
                p.local_rank,
                p.local_world_size
            ),
            (Launcher::Slurm, 5, 7, 1, 2)
        );
        assert_eq!(p.store_host.as_deref(), Some("node07"));
    }

    #[test]
    fn volcano_takes_its_task_size_and_first_host() {
        let p = detect_with(&[
            ("VC_TASK_INDEX", "2"),
            ("VC_WORKER_NUM", "4"),
            ("VC_WORKER_HOSTS", "job-worker-0.job,job-worker-1.job"),
        ])
        .unwrap();
        assert_eq!(
            (p.launcher, p.rank, p.world_size),
            (Launcher::Volcano, 2, 4)
        );
        assert_eq!(p.store_host.as_deref(), Some("job-worker-0.job"));
        let e = detect_with(&[
            ("VC_TASK_INDEX", "0"),
            ("VC_PS_NUM", "1"),
            ("VC_WORKER_NUM", "2"),
        ])
        .unwrap_err();
        assert!(e.to_string().contains("WORLD_SIZE"), "{e}");
    }

    #[test]
    fn torchrun_wins_over_the_launcher_underneath() {
        // torchrun started under srun: its own variables are the ones that describe this process.
        let p = detect_with(&[
            ("RANK", "0"),
            ("WORLD_SIZE", "8"),
            ("SLURM_PROCID", "3"),
            ("SLURM_NTASKS", "2"),
        ])
        .unwrap();
        assert_eq!((p.launcher, p.world_size), (Launcher::Torchrun, 8));
    }

    #[test]
    fn missing_or_inconsistent_values_say_what_to_set() {
        let e = detect_with(&[]).unwrap_err().to_string();
        assert!(e.contains("RANK and WORLD_SIZE"), "{e}");
        let e = detect_with(&[("OMPI_COMM_WORLD_RANK", "0")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("OMPI_COMM_WORLD_SIZE"), "{e}");
        let e = detect_with(&[("SLURM_PROCID", "4"), ("SLURM_NTASKS", "4")])
            .unwrap_err()
            .to_string();
        assert!(e.contains("below world size"), "{e}");
    }
}
