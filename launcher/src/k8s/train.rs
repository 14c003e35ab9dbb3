//! `ringrun k8s train`: the Kubernetes objects of a training job, for `kubectl apply -f`.
//!
//! One Indexed Job per pool of like nodes (one pool unless GPU generations differ), all behind one
//! headless Service so that rank 0's pod is reached as `<job>-0.<service>`; the job token from a
//! Secret; checkpoints on a PersistentVolumeClaim. Ranks learn their place from the variables
//! `ringlet::bootstrap` reads for Indexed Jobs: the pod's `JOB_COMPLETION_INDEX` plus its pool's
//! `RINGLET_RANK_OFFSET`, and `WORLD_SIZE` (Kubernetes does not tell a pod its Job's size).

use clap::Parser;
use ringlet_core::JobToken;
use serde_json::{json, Map, Value};
use std::path::PathBuf;

const AFTER_HELP: &str = "\
What each pod is given (its container's environment):
  JOB_COMPLETION_INDEX    set by Kubernetes: the pod's index in its Job
  RINGLET_RANK_OFFSET     the rank of its pool's first pod (rank = offset + index)
  WORLD_SIZE              the sum of the pools' ranks
  MASTER_ADDR, MASTER_PORT
                          rank 0's pod, <first job>-0.<name> through the headless
                          Service <name>, and --port: rank 0 serves the rendezvous store
  RINGLET_JOB_TOKEN       from the Secret <name>-token (rendered with 64 fresh random
                          hex digits), or from --token-secret's key `token`
  RINGLET_CHECKPOINT_DIR  with --checkpoint-claim: where the claim is mounted
  RINGLET_BALANCE         with pool weights: static:w0,w1,... one weight per rank
  RINGLET_TIMEOUT         with --timeout
  RINGLET_DATA_HOST       the node's name (downward API spec.nodeName): where a shard
                          map's host-local copies are found (--data-locality on)
ringlet-train reads the last four as --checkpoint-dir, --balance, its deadline and
--data-host.

Pools (--pool, repeatable; in rank order):
  name=NAME,ranks=N[,weight=W][,gpus=G][,node=KEY=VALUE]...
  Each pool is an Indexed Job <name>-<pool> of N pods, each asking for G GPUs
  (nvidia.com/gpu; default --gpus-per-pod) on nodes with every KEY=VALUE label, e.g.
    --pool name=h100,ranks=2,weight=3,gpus=1,node=nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3
    --pool name=t4,ranks=4,weight=1,gpus=1,node=nvidia.com/gpu.product=Tesla-T4
  Weights, given for every pool or none, split the global batch (faster GPUs take more).

Failure: each Job has backoffLimit 0, so a failed pod fails its Job; the other ranks
stop with an error naming the lost rank. To run again, delete the Jobs
(kubectl delete jobs -l ringlet.dev/job=NAME) and apply a fresh rendering: ringlet-train
resumes from the newest committed checkpoint on the claim, which that label does not
select (it is labelled ringlet.dev/checkpoints-of=NAME). Pods may start minutes apart
(image pulls, autoscaled nodes): --timeout must cover that, as it bounds the rendezvous.

Example:
  ringrun k8s train --name mnist --image registry.example/ringlet:1 -n 4 \\
      --checkpoint-claim mnist-ck --checkpoint-size 1Gi -- ringlet-train --model cnn \\
    | kubectl apply -f -";

/// Render the Kubernetes manifests of a training job (Indexed Jobs, a headless Service, a
/// Secret with the job token, a checkpoint claim) as JSON for `kubectl apply -f`.
#[derive(Debug, Parser)]
#[command(
    name = "ringrun k8s train",
    version,
    override_usage = "ringrun k8s train --name <NAME> --image <IMAGE> (-n <N> | --pool <POOL>...) [OPTIONS] -- <PROGRAM> [ARGS]...",
    after_long_help = AFTER_HELP
)]
pub struct TrainManifest {
    /// The job's name: the Service's, and the prefix of the Jobs, pods and Secret (lower-case
    /// letters, digits and '-').
    #[arg(long)]
    name: String,
    /// metadata.namespace of every object (default: kubectl's current namespace).
    #[arg(long)]
    namespace: Option<String>,
    /// The container image (e.g. one made by `ringrun image build` and pushed to a registry).
    #[arg(long)]
    image: String,
    /// Number of ranks, one pod each, in one pool (without --pool).
    #[arg(short = 'n', long = "nproc", value_name = "N", conflicts_with = "pools",
          value_parser = clap::value_parser!(u32).range(1..=MAX_RANKS as i64))]
    nproc: Option<u32>,
    /// A pool of like nodes: see below.
    #[arg(long = "pool", value_name = "POOL", value_parser = parse_pool)]
    pools: Vec<Pool>,
    /// nvidia.com/gpu per pod, for pools that do not say.
    #[arg(long, value_name = "G", default_value_t = 0)]
    gpus_per_pod: u32,
    /// CPU cores per pod (requests and limits), a Kubernetes quantity: `2`, `500m`.
    #[arg(long, value_name = "QUANTITY", value_parser = super::parse_quantity)]
    cpus: Option<String>,
    /// Memory per pod (requests and limits), a Kubernetes quantity: `4Gi`.
    #[arg(long, value_name = "QUANTITY", value_parser = super::parse_quantity)]
    memory: Option<String>,
    /// MASTER_PORT: where rank 0's pod serves the rendezvous store.
    #[arg(long, default_value_t = 29500, value_parser = clap::value_parser!(u16).range(1..))]
    port: u16,
    /// An existing Secret whose key `token` holds the job token (instead of rendering one).
    #[arg(long, value_name = "SECRET")]
    token_secret: Option<String>,
    /// The PersistentVolumeClaim (ReadWriteMany: every rank sees it) for checkpoints.
    #[arg(long, value_name = "CLAIM")]
    checkpoint_claim: Option<String>,
    /// Also render the claim, of this size (`10Gi`).
    #[arg(long, value_name = "QUANTITY", requires = "checkpoint_claim", value_parser = super::parse_quantity)]
    checkpoint_size: Option<String>,
    /// storageClassName of the rendered claim.
    #[arg(long, requires = "checkpoint_size")]
    storage_class: Option<String>,
    /// Where the claim is mounted in each pod (RINGLET_CHECKPOINT_DIR).
    #[arg(long, default_value = "/checkpoints")]
    checkpoint_path: PathBuf,
    /// RINGLET_TIMEOUT of the ranks, in seconds.
    #[arg(long, value_name = "SECONDS", value_parser = crate::parse_timeout)]
    timeout: Option<f64>,
    /// More environment for every pod, KEY=VALUE; repeatable.
    #[arg(long = "env", short = 'e', value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// Write the manifests here instead of standard output.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// The program every pod runs (its container's command), then its arguments.
    #[arg(value_name = "PROGRAM", required = true, num_args = 1.., trailing_var_arg = true,
          allow_hyphen_values = true)]
    command: Vec<String>,
}

/// More ranks than any cluster holds is a typo; it also bounds the rendered list.
const MAX_RANKS: u32 = 65536;
/// Linux refuses to start a program with an environment string over 128 KiB (MAX_ARG_STRLEN).
const MAX_ENV_VALUE: usize = 128 * 1024 - 64;
/// What the rendering sets itself (and Kubernetes sets `JOB_COMPLETION_INDEX`): `-e` may not.
const RENDERED_ENV: [&str; 10] = [
    "WORLD_SIZE",
    "RINGLET_RANK_OFFSET",
    "MASTER_ADDR",
    "MASTER_PORT",
    "RINGLET_JOB_TOKEN",
    "RINGLET_CHECKPOINT_DIR",
    "RINGLET_BALANCE",
    "RINGLET_TIMEOUT",
    "RINGLET_DATA_HOST",
    "JOB_COMPLETION_INDEX",
];

#[derive(Clone, Debug)]
pub struct Pool {
    name: String,
    ranks: u32,
    weight: Option<f64>,
    gpus: Option<u32>,
    node_selector: Vec<(String, String)>,
}

fn parse_pool(s: &str) -> Result<Pool, String> {
    let mut pool = Pool {
        name: String::new(),
        ranks: 0,
        weight: None,
        gpus: None,
        node_selector: Vec::new(),
    };
    for item in s.split(',') {
        let (key, value) = item
            .split_once('=')
            .ok_or_else(|| format!("{item:?} in --pool {s:?} is not KEY=VALUE"))?;
        let bad = || format!("{key}={value:?} in --pool {s:?} is not valid");
        match key {
            "name" => pool.name = value.to_string(),
            "ranks" => {
                pool.ranks = value
                    .parse()
                    .ok()
                    .filter(|n| (1..=MAX_RANKS).contains(n))
                    .ok_or_else(bad)?
            }
            "weight" => {
                pool.weight = Some(
                    value
                        .parse::<f64>()
                        .ok()
                        .filter(|w| *w > 0.0 && *w <= 1e6)
                        .ok_or_else(bad)?,
                )
            }
            "gpus" => pool.gpus = Some(value.parse().map_err(|_| bad())?),
            "node" => {
                let (k, v) = value
                    .split_once('=')
                    .filter(|(k, v)| !k.is_empty() && !v.is_empty())
                    .ok_or_else(bad)?;
                pool.node_selector.push((k.to_string(), v.to_string()));
            }
            _ => {
                return Err(format!(
                    "--pool {s:?}: unknown key {key:?} (name, ranks, weight, gpus, node)"
                ))
            }
        }
    }
    super::dns_label(&pool.name).map_err(|e| format!("--pool {s:?}: name {e}"))?;
    if pool.ranks == 0 {
        return Err(format!("--pool {s:?}: ranks=N is missing"));
    }
    Ok(pool)
}

fn parse_env(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, _)) if RENDERED_ENV.contains(&k) => Err(format!(
            "-e {k}: the rendering sets {k} itself (see ringrun k8s train --help)"
        )),
        Some((k, v)) if !k.is_empty() && !k.contains(char::is_whitespace) => {
            Ok((k.to_string(), v.to_string()))
        }
        _ => Err(format!("{s:?} is not KEY=VALUE")),
    }
}

/// The objects, as a `v1` `List`.
pub fn render(t: &TrainManifest) -> Result<Value, String> {
    super::dns_label(&t.name).map_err(|e| format!("--name {e}"))?;
    // A Service's name is an RFC 1035 label: a letter first.
    if !t.name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(format!(
            "--name {:?}: a Service's name starts with a letter",
            t.name
        ));
    }
    let pools = match (&t.nproc, t.pools.is_empty()) {
        (Some(n), _) => vec![Pool {
            name: String::new(),
            ranks: *n,
            weight: None,
            gpus: None,
            node_selector: Vec::new(),
        }],
        (None, false) => t.pools.clone(),
        (None, true) => return Err("give -n N or at least one --pool".into()),
    };
    let world = pools
        .iter()
        .try_fold(0u32, |sum, p| {
            sum.checked_add(p.ranks).filter(|&w| w <= MAX_RANKS)
        })
        .ok_or_else(|| format!("more than {MAX_RANKS} ranks in all"))?;
    let job_name = |p: &Pool| match p.name.is_empty() {
        true => t.name.clone(),
        false => format!("{}-{}", t.name, p.name),
    };
    for p in &pools {
        // The pod's host name is `<job>-<index>`.
        let host = format!("{}-{}", job_name(p), p.ranks - 1);
        super::dns_label(&host).map_err(|_| {
            format!(
                "pod host name {host:?} is over 63 characters: shorten --name or the pool's name"
            )
        })?;
    }
    if let Some(dup) = pools.iter().enumerate().find_map(|(i, p)| {
        pools[..i]
            .iter()
            .any(|q| q.name == p.name)
            .then_some(&p.name)
    }) {
        return Err(format!("two pools are named {dup:?}"));
    }
    let balance = match pools.iter().filter(|p| p.weight.is_some()).count() {
        0 => None,
        k if k == pools.len() => {
            let w: Vec<String> = pools
                .iter()
                .flat_map(|p| {
                    std::iter::repeat_n(p.weight.unwrap_or(1.0).to_string(), p.ranks as usize)
                })
                .collect();
            let b = format!("static:{}", w.join(","));
            if b.len() > MAX_ENV_VALUE {
                return Err(format!(
                    "RINGLET_BALANCE would take {} bytes (one weight per rank), more than a \
                     program's environment may hold: use shorter weights",
                    b.len()
                ));
            }
            Some(b)
        }
        _ => return Err("give a weight to every pool or to none".into()),
    };
    let token_secret = t
        .token_secret
        .clone()
        .unwrap_or_else(|| format!("{}-token", t.name));
    let mut items = Vec::new();
    if t.token_secret.is_none() {
        items.push(json!({
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": metadata(t, &token_secret),
            "type": "Opaque",
            "stringData": { "token": JobToken::generate().to_env_value() },
        }));
    }
    if let (Some(claim), Some(size)) = (&t.checkpoint_claim, &t.checkpoint_size) {
        let mut spec = json!({
            "accessModes": ["ReadWriteMany"],
            "resources": { "requests": { "storage": size } },
        });
        if let Some(class) = &t.storage_class {
            spec["storageClassName"] = json!(class);
        }
        items.push(json!({
            "apiVersion": "v1",
            "kind": "PersistentVolumeClaim",
            // Not labelled ringlet.dev/job, so deleting the job's objects by that label keeps it.
            "metadata": object_meta(t, claim, "ringlet.dev/checkpoints-of"),
            "spec": spec,
        }));
    }
    items.push(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(t, &t.name),
        "spec": {
            // Headless: DNS names each pod (`<pod host name>.<service>`), no virtual IP.
            "clusterIP": "None",
            "selector": { "ringlet.dev/job": t.name },
            // Rank 0 must be found before any pod is ready.
            "publishNotReadyAddresses": true,
            "ports": [{ "name": "rendezvous", "port": t.port }],
        },
    }));
    let master = format!("{}-0.{}", job_name(&pools[0]), t.name);
    let mut offset = 0u32;
    for p in &pools {
        let mut env = vec![
            json!({ "name": "WORLD_SIZE", "value": world.to_string() }),
            json!({ "name": "RINGLET_RANK_OFFSET", "value": offset.to_string() }),
            json!({ "name": "MASTER_ADDR", "value": master }),
            json!({ "name": "MASTER_PORT", "value": t.port.to_string() }),
            json!({ "name": "RINGLET_JOB_TOKEN", "valueFrom": {
                "secretKeyRef": { "name": token_secret, "key": "token" } } }),
            // Shard maps name nodes: a pod reads the copies its node holds.
            json!({ "name": "RINGLET_DATA_HOST", "valueFrom": {
                "fieldRef": { "fieldPath": "spec.nodeName" } } }),
        ];
        let mut named = |k: &str, v: String| env.push(json!({ "name": k, "value": v }));
        if t.checkpoint_claim.is_some() {
            named(
                "RINGLET_CHECKPOINT_DIR",
                t.checkpoint_path.display().to_string(),
            );
        }
        if let Some(b) = &balance {
            named("RINGLET_BALANCE", b.clone());
        }
        if let Some(s) = t.timeout {
            named("RINGLET_TIMEOUT", s.to_string());
        }
        for (k, v) in &t.env {
            named(k, v.clone());
        }
        items.push(job(t, p, &job_name(p), env));
        offset += p.ranks;
    }
    Ok(json!({ "apiVersion": "v1", "kind": "List", "items": items }))
}

fn metadata(t: &TrainManifest, name: &str) -> Value {
    object_meta(t, name, "ringlet.dev/job")
}

fn object_meta(t: &TrainManifest, name: &str, label: &str) -> Value {
    super::object_meta(name, label, &t.name, t.namespace.as_deref())
}

/// One pool's Indexed Job.
fn job(t: &TrainManifest, p: &Pool, name: &str, env: Vec<Value>) -> Value {
    let resources = super::resources(
        p.gpus.unwrap_or(t.gpus_per_pod),
        t.cpus.as_deref(),
        t.memory.as_deref(),
    );
    let mut container = json!({
        "name": "rank",
        "image": t.image,
        "command": [t.command[0]],
        "args": t.command[1..],
        "env": env,
        "ports": [{ "name": "rendezvous", "containerPort": t.port }],
    });
    if let Some(r) = resources {
        container["resources"] = r;
    }
    let mut pod = json!({
        "subdomain": t.name,
        "restartPolicy": "Never",
        // No {SERVICE}_PORT variables from the namespace's Services: one named `master` would
        // set MASTER_PORT=tcp://... for a program that does not set its own.
        "enableServiceLinks": false,
        "containers": [container],
    });
    if !p.node_selector.is_empty() {
        let sel: Map<String, Value> = p
            .node_selector
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        pod["nodeSelector"] = Value::Object(sel);
    }
    if let Some(claim) = &t.checkpoint_claim {
        pod["volumes"] = json!([{ "name": "checkpoints",
            "persistentVolumeClaim": { "claimName": claim } }]);
        pod["containers"][0]["volumeMounts"] = json!([{ "name": "checkpoints",
            "mountPath": t.checkpoint_path.display().to_string() }]);
    }
    let mut labels = json!({ "ringlet.dev/job": t.name });
    if !p.name.is_empty() {
        labels["ringlet.dev/pool"] = json!(p.name);
    }
    json!({
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(t, name),
        "spec": {
            "completionMode": "Indexed",
            "completions": p.ranks,
            "parallelism": p.ranks,
            "backoffLimit": 0,
            "template": { "metadata": { "labels": labels }, "spec": pod },
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render_args(args: &str) -> Result<Value, String> {
        let argv = std::iter::once("ringrun k8s train").chain(args.split_whitespace());
        render(&TrainManifest::try_parse_from(argv).map_err(|e| e.to_string())?)
    }

    fn env_of(job: &Value) -> Vec<(String, String)> {
        job["spec"]["template"]["spec"]["containers"][0]["env"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| {
                let v = e["value"].as_str().map(String::from);
                (
                    e["name"].as_str().unwrap().into(),
                    v.unwrap_or_else(|| e["valueFrom"].to_string()),
                )
            })
            .collect()
    }

    #[test]
    fn pools_become_indexed_jobs_at_their_rank_offsets() {
        let list = render_args(
            "--name mnist --image img:1 --pool name=h100,ranks=2,weight=3,gpus=1,node=gpu=h100 \
             --pool name=t4,ranks=3,weight=1,node=gpu=t4 --checkpoint-claim ck -- ringlet-train --model cnn",
        )
        .unwrap();
        let items = list["items"].as_array().unwrap();
        let kinds: Vec<&str> = items.iter().map(|i| i["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds, ["Secret", "Service", "Job", "Job"]);
        let (h100, t4) = (&items[2], &items[3]);
        assert_eq!(h100["metadata"]["name"], "mnist-h100");
        assert_eq!(t4["spec"]["completions"], 3);
        assert_eq!(t4["spec"]["template"]["spec"]["nodeSelector"]["gpu"], "t4");
        let pod = &h100["spec"]["template"]["spec"];
        assert_eq!(pod["subdomain"], "mnist");
        assert_eq!(
            pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"],
            "1"
        );
        assert_eq!(pod["containers"][0]["command"], json!(["ringlet-train"]));
        assert_eq!(pod["containers"][0]["args"], json!(["--model", "cnn"]));
        let env = env_of(t4);
        let get = |k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("WORLD_SIZE"), Some("5"));
        assert_eq!(get("RINGLET_RANK_OFFSET"), Some("2"));
        assert_eq!(get("MASTER_ADDR"), Some("mnist-h100-0.mnist"));
        assert_eq!(get("RINGLET_BALANCE"), Some("static:3,3,1,1,1"));
        assert_eq!(get("RINGLET_CHECKPOINT_DIR"), Some("/checkpoints"));
        assert!(get("RINGLET_JOB_TOKEN").unwrap().contains("mnist-token"));
        let token = items[0]["stringData"]["token"].as_str().unwrap();
        assert_eq!(token.len(), 64);
        let service = &items[1];
        assert_eq!(service["spec"]["clusterIP"], "None");
        assert_eq!(service["spec"]["publishNotReadyAddresses"], true);
        // The Service selects every pod of every pool, and names their subdomain.
        for job in [h100, t4] {
            let template = &job["spec"]["template"];
            for (k, v) in service["spec"]["selector"].as_object().unwrap() {
                assert_eq!(&template["metadata"]["labels"][k], v, "{k}");
            }
            assert_eq!(template["spec"]["subdomain"], service["metadata"]["name"]);
            assert_eq!(template["spec"]["restartPolicy"], "Never");
            assert_eq!(job["spec"]["backoffLimit"], 0);
            assert_eq!(job["spec"]["parallelism"], job["spec"]["completions"]);
        }
    }

    #[test]
    fn the_claim_survives_deleting_the_jobs_objects_by_label() {
        let list =
            render_args("--name m --image i -n 2 --checkpoint-claim ck --checkpoint-size 1Gi -- p")
                .unwrap();
        let items = list["items"].as_array().unwrap();
        let claim = items
            .iter()
            .find(|i| i["kind"] == "PersistentVolumeClaim")
            .unwrap();
        assert!(claim["metadata"]["labels"].get("ringlet.dev/job").is_none());
        assert_eq!(
            claim["metadata"]["labels"]["ringlet.dev/checkpoints-of"],
            "m"
        );
    }

    #[test]
    fn bad_settings_are_refused_with_the_reason() {
        for (args, why) in [
            ("--name Mnist --image i -n 2 -- p", "lower-case"),
            ("--name m --image i -- p", "-n N or at least one --pool"),
            (
                "--name m --image i --pool name=a,ranks=1,weight=2 --pool name=b,ranks=1 -- p",
                "every pool",
            ),
            (
                "--name m --image i --pool name=a,ranks=1 --pool name=a,ranks=2 -- p",
                "two pools",
            ),
            (
                "--name m --image i --pool name=a,ranks=0 -- p",
                "ranks=\"0\"",
            ),
            (
                "--name m --image i --pool name=a,ranks=2,speed=3 -- p",
                "unknown key",
            ),
            (
                "--name m --image i --pool name=a,ranks=2,weight=-1 -- p",
                "weight=",
            ),
            (
                "--name m --image i --pool name=a,ranks=2,node=x -- p",
                "node=",
            ),
            ("--name m --image i -n 2 --cpus lots -- p", "quantity"),
            ("--name m --image i -n 2 --memory 4GiB -- p", "quantity"),
            ("--name 9m --image i -n 2 -- p", "starts with a letter"),
            (
                "--name m --image i -n 2 -e WORLD_SIZE=8 -- p",
                "sets WORLD_SIZE itself",
            ),
            ("--name m --image i -n 2 --timeout 1e12 -- p", "timeout"),
            ("--name m --image i -n 70000 -- p", "70000"),
            (
                "--name m --image i -n 2 --checkpoint-size 1Gi -- p",
                "checkpoint-claim",
            ),
        ] {
            let e = render_args(args).unwrap_err();
            assert!(e.contains(why), "{args}: {e}");
        }
        let long = "a".repeat(62);
        let e = render_args(&format!("--name {long} --image i -n 12 -- p")).unwrap_err();
        assert!(e.contains("over 63"), "{e}");
    }
}
