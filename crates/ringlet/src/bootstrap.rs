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
//! | JobSet | `RINGLET_RANK_OFFSET` + job index × `RINGLET_RANKS_PER_JOB` + `JOB_COMPLETION_INDEX`, `WORLD_SIZE` | `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, else 0 and 1 | `MASTER_ADDR`, else `<JOBSET_NAME>-<REPLICATED_JOB_NAME>-0-0.<JOBSET_NAME>` |
//! | Kubernetes Indexed Job | `RINGLET_RANK_OFFSET` + `JOB_COMPLETION_INDEX`, `WORLD_SIZE` | `LOCAL_RANK`, `LOCAL_WORLD_SIZE`, else 0 and 1 | `MASTER_ADDR` (`<job>-0.<headless service>`) |
//! | Volcano | `VC_TASK_INDEX`, `WORLD_SIZE` or the one `VC_<TASK>_NUM` | as the global ones | `MASTER_ADDR`, else the first host of the one `VC_<TASK>_HOSTS` |
//!
//! `MASTER_PORT` (default 29500) gives the store port for every source. Missing local values
//! default to the global ones (a single host), except under Kubernetes, where a pod is a host
//! of its own (local rank 0 of 1: the pod's one GPU is device 0).
//!
//! Kubernetes gives a pod its index but not the Job's size (`spec.completions`), so the manifest
//! sets `WORLD_SIZE`. A job whose ranks need different pod templates (GPU generations on
//! different nodes) runs as several Indexed Jobs, or several replicated jobs of a JobSet, each
//! told the rank of its first pod in `RINGLET_RANK_OFFSET` (`ringrun k8s` renders them so).
//!
//! The Job controller sets `JOB_COMPLETION_INDEX` in every container of an Indexed Job. JobSet
//! puts its pods' places in annotations only, so a JobSet's pod template maps them to variables
//! with the downward API: `JOBSET_NAME` from `jobset.sigs.k8s.io/jobset-name`,
//! `REPLICATED_JOB_NAME` from `jobset.sigs.k8s.io/replicatedjob-name` and `JOB_INDEX` from
//! `jobset.sigs.k8s.io/job-index`. The default store host assumes JobSet's default subdomain
//! (the JobSet's name); with `spec.network.subdomain` set, set `MASTER_ADDR`.

use ringlet_core::{Error, Result};
use std::collections::HashMap;

/// The launcher a process found itself under.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Launcher {
    Torchrun,
    OpenMpi,
    Pmi,
    Slurm,
    JobSet,
    IndexedJob,
    Volcano,
}

impl Launcher {
    pub fn name(self) -> &'static str {
        match self {
            Launcher::Torchrun => "torchrun-style environment (RANK, WORLD_SIZE)",
            Launcher::OpenMpi => "Open MPI (OMPI_COMM_WORLD_*)",
            Launcher::Pmi => "MPICH/Hydra PMI (PMI_RANK, PMI_SIZE)",
            Launcher::Slurm => "Slurm (SLURM_PROCID, SLURM_NTASKS)",
            Launcher::JobSet => "JobSet (JOBSET_NAME, JOB_COMPLETION_INDEX)",
            Launcher::IndexedJob => "Kubernetes Indexed Job (JOB_COMPLETION_INDEX)",
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
        None if get("JOB_COMPLETION_INDEX").is_some() => kubernetes(&get)?,
        None if get("VC_TASK_INDEX").is_some() => volcano(env, &get)?,
        None => {
            return Err(Error::Config(
                "no launcher found: set RANK and WORLD_SIZE (ringrun, torchrun and Kubeflow do), or run under \
                 mpirun, srun, a Kubernetes Indexed Job, a JobSet or a Volcano job"
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

/// A pod of an Indexed Job (`JOB_COMPLETION_INDEX`), or of a JobSet when `JOBSET_NAME` is set
/// too (see the module docs).
fn kubernetes(get: &impl Fn(&str) -> Option<String>) -> Result<Placement> {
    let jobset = get("JOBSET_NAME");
    let launcher = if jobset.is_some() {
        Launcher::JobSet
    } else {
        Launcher::IndexedJob
    };
    let world_size: usize = optional(get, "WORLD_SIZE")?.ok_or_else(|| {
        Error::Config(format!(
            "{}: WORLD_SIZE is not set: Kubernetes does not tell a pod how many there are, so the \
             manifest must (spec.completions, summed over the job's Jobs)",
            launcher.name()
        ))
    })?;
    let index: usize = number(get, "JOB_COMPLETION_INDEX")?;
    let offset: usize = optional(get, "RINGLET_RANK_OFFSET")?.unwrap_or(0);
    // Which Job of its replicated job this pod's Job is; 0 for a plain Indexed Job.
    let job_index = match &jobset {
        // Several Jobs of one replicated job would all take the ranks of the first: say so.
        Some(_) => Some(optional::<usize>(get, "JOB_INDEX")?.ok_or_else(|| {
            Error::Config(
                "JobSet: JOBSET_NAME is set but JOB_INDEX is not (map it from the pod's \
                 annotation jobset.sigs.k8s.io/job-index with the downward API)"
                    .into(),
            )
        })?),
        None => None,
    };
    let job = match (&jobset, job_index) {
        (Some(_), Some(j)) if j > 0 => {
            let per_job: usize = optional(get, "RINGLET_RANKS_PER_JOB")?.ok_or_else(|| {
                Error::Config(format!(
                    "JobSet: JOB_INDEX={j} but RINGLET_RANKS_PER_JOB is not set (the pods of each \
                     Job, its spec.completions), so this pod's rank is unknown"
                ))
            })?;
            j.checked_mul(per_job)
        }
        _ => Some(0),
    };
    let rank = job
        .and_then(|j| j.checked_add(offset)?.checked_add(index))
        .ok_or_else(|| {
            Error::Config(format!(
                "{}: the rank overflows (RINGLET_RANK_OFFSET={offset}, JOB_INDEX={job_index:?}, \
                 RINGLET_RANKS_PER_JOB, JOB_COMPLETION_INDEX={index})",
                launcher.name()
            ))
        })?;
    // JobSet names pod `<jobset>-<replicated job>-<job index>-<pod index>` in the subdomain of
    // the JobSet's name by default; rank 0 is in this replicated job only when it starts at 0.
    let store_host = match (&jobset, get("REPLICATED_JOB_NAME")) {
        (Some(set), Some(rjob)) if offset == 0 => Some(format!("{set}-{rjob}-0-0.{set}")),
        _ => None,
    };
    Ok(Placement {
        launcher,
        rank,
        world_size,
        local_rank: optional(get, "LOCAL_RANK")?.unwrap_or(0),
        local_world_size: optional(get, "LOCAL_WORLD_SIZE")?.unwrap_or(1),
        store_host,
    })
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
    fn an_indexed_job_pod_takes_its_index_and_is_a_host_of_its_own() {
        let p = detect_with(&[
            ("JOB_COMPLETION_INDEX", "2"),
            ("WORLD_SIZE", "4"),
            ("MASTER_ADDR", "train-0.train"),
        ])
        .unwrap();
        assert_eq!(
            (
                p.launcher,
                p.rank,
                p.world_size,
                p.local_rank,
                p.local_world_size,
                p.store_host.as_deref()
            ),
            (Launcher::IndexedJob, 2, 4, 0, 1, Some("train-0.train"))
        );
        // A second Job of the same training run (another GPU generation) starts at its offset.
        let p = detect_with(&[
            ("JOB_COMPLETION_INDEX", "1"),
            ("RINGLET_RANK_OFFSET", "2"),
            ("WORLD_SIZE", "4"),
        ])
        .unwrap();
        assert_eq!((p.rank, p.store_host), (3, None));
        let e = detect_with(&[("JOB_COMPLETION_INDEX", "0")])
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("WORLD_SIZE is not set") && e.contains("completions"),
            "{e}"
        );
        let e = detect_with(&[
            ("JOB_COMPLETION_INDEX", "1"),
            ("RINGLET_RANK_OFFSET", "3"),
            ("WORLD_SIZE", "4"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("rank 4 must be below world size 4"), "{e}");
        let e = detect_with(&[
            ("JOB_COMPLETION_INDEX", "1"),
            ("RINGLET_RANK_OFFSET", &usize::MAX.to_string()),
            ("WORLD_SIZE", "4"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("overflows"), "{e}");
    }

    #[test]
    fn a_jobset_pod_finds_rank_0_by_the_jobsets_pod_names() {
        let p = detect_with(&[
            ("JOBSET_NAME", "mnist"),
            ("REPLICATED_JOB_NAME", "workers"),
            ("JOB_INDEX", "0"),
            ("JOB_COMPLETION_INDEX", "3"),
            ("WORLD_SIZE", "4"),
        ])
        .unwrap();
        assert_eq!(
            (p.launcher, p.rank, p.world_size, p.store_host.as_deref()),
            (Launcher::JobSet, 3, 4, Some("mnist-workers-0-0.mnist"))
        );
        // Two Jobs of two pods: the second Job's pods are ranks 2 and 3.
        let p = detect_with(&[
            ("JOBSET_NAME", "mnist"),
            ("REPLICATED_JOB_NAME", "workers"),
            ("JOB_INDEX", "1"),
            ("JOB_COMPLETION_INDEX", "1"),
            ("RINGLET_RANKS_PER_JOB", "2"),
            ("WORLD_SIZE", "4"),
        ])
        .unwrap();
        assert_eq!(p.rank, 3);
        let e = detect_with(&[
            ("JOBSET_NAME", "mnist"),
            ("JOB_COMPLETION_INDEX", "0"),
            ("WORLD_SIZE", "4"),
        ])
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("JOB_INDEX is not") && e.contains("job-index"),
            "{e}"
        );
        let e = detect_with(&[
            ("JOBSET_NAME", "mnist"),
            ("JOB_INDEX", "1"),
            ("JOB_COMPLETION_INDEX", "0"),
            ("WORLD_SIZE", "4"),
        ])
        .unwrap_err()
        .to_string();
        assert!(e.contains("RINGLET_RANKS_PER_JOB"), "{e}");
        // A replicated job that does not hold rank 0 must be told where the store is.
        let p = detect_with(&[
            ("JOBSET_NAME", "mnist"),
            ("REPLICATED_JOB_NAME", "t4"),
            ("JOB_INDEX", "0"),
            ("JOB_COMPLETION_INDEX", "0"),
            ("RINGLET_RANK_OFFSET", "2"),
            ("WORLD_SIZE", "4"),
        ])
        .unwrap();
        assert_eq!((p.rank, p.store_host), (2, None));
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
