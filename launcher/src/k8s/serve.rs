//! `ringrun k8s serve`: a Deployment of `ringlet-serve run` replicas, one consumer group on the
//! stream engine, serving the newest verified checkpoint of the training job's claim (mounted
//! read-only) or a pinned one. Replicas are interchangeable: scaling is `kubectl scale`, and a
//! replica that dies leaves its records to the others (after `--claim-idle-ms`).

use clap::Parser;
use serde_json::{json, Value};
use std::path::PathBuf;

const AFTER_HELP: &str = "\
Each pod runs
  ringlet-serve run --redis URL (--checkpoints PATH | --pin PATH/STEP) [ARGS...]
with the claim mounted read-only at --checkpoint-path. Its consumer name is its pod
name (unique), so a replaced pod is a new consumer and the old one's pending records
are claimed by the others. SIGTERM (a rollout, a scale-down) lets a replica finish
the batch in hand: terminationGracePeriodSeconds is --grace.

Example:
  ringrun k8s serve --name digits --image registry.example/ringlet:1 --replicas 3 \\
      --redis redis://redis:6379 --checkpoint-claim mnist-ck -- --batch 128 \\
    | kubectl apply -f -";

/// Render the Kubernetes Deployment of a scoring service (ringlet-serve replicas reading a
/// stream, serving checkpoints of a claim) as JSON for `kubectl apply -f`.
#[derive(Debug, Parser)]
#[command(
    name = "ringrun k8s serve",
    version,
    override_usage = "ringrun k8s serve --name <NAME> --image <IMAGE> --redis <URL> --checkpoint-claim <CLAIM> [OPTIONS] [-- <ARGS>...]",
    after_long_help = AFTER_HELP
)]
pub struct ServeManifest {
    /// The Deployment's name (lower-case letters, digits and '-', a letter first).
    #[arg(long)]
    name: String,
    /// metadata.namespace of every object.
    #[arg(long)]
    namespace: Option<String>,
    /// The container image (with ringlet-serve in its PATH).
    #[arg(long)]
    image: String,
    /// Replicas of the scoring service.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=10000))]
    replicas: u32,
    /// The stream engine (ringlet-serve's --redis).
    #[arg(long, value_name = "URL")]
    redis: String,
    /// The claim holding the training job's checkpoints (mounted read-only).
    #[arg(long, value_name = "CLAIM")]
    checkpoint_claim: String,
    /// Where the claim is mounted.
    #[arg(long, default_value = "/checkpoints")]
    checkpoint_path: PathBuf,
    /// Serve this checkpoint of the claim (`step-000000000440`) and no other, instead of the
    /// newest and each newer one.
    #[arg(long, value_name = "STEP")]
    pin: Option<String>,
    /// nvidia.com/gpu per pod.
    #[arg(long, value_name = "G", default_value_t = 0)]
    gpus_per_pod: u32,
    /// CPU cores per pod (requests and limits), a Kubernetes quantity.
    #[arg(long, value_name = "QUANTITY", value_parser = super::parse_quantity)]
    cpus: Option<String>,
    /// Memory per pod (requests and limits), a Kubernetes quantity.
    #[arg(long, value_name = "QUANTITY", value_parser = super::parse_quantity)]
    memory: Option<String>,
    /// Seconds a replica has after SIGTERM (terminationGracePeriodSeconds).
    #[arg(long, default_value_t = 30)]
    grace: u32,
    /// Write the manifests here instead of standard output.
    #[arg(long, short = 'o', value_name = "FILE")]
    pub output: Option<PathBuf>,
    /// More arguments for `ringlet-serve run` (streams, group, batch, ...).
    #[arg(
        value_name = "ARGS",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    args: Vec<String>,
}

/// The objects, as a `v1` `List`.
pub fn render(t: &ServeManifest) -> Result<Value, String> {
    super::dns_label(&t.name).map_err(|e| format!("--name {e}"))?;
    if !t.name.starts_with(|c: char| c.is_ascii_lowercase()) {
        return Err(format!("--name {:?}: a letter first", t.name));
    }
    if let Some(bad) = t.args.iter().find(|a| {
        ["--redis", "--checkpoints", "--pin", "--consumer"]
            .contains(&a.split('=').next().unwrap_or(a))
    }) {
        return Err(format!(
            "{bad}: the rendering sets it (see ringrun k8s serve --help)"
        ));
    }
    let mount = t.checkpoint_path.display().to_string();
    let mut args = vec!["run".to_string(), "--redis".into(), t.redis.clone()];
    match &t.pin {
        Some(step) if step.contains('/') || step.starts_with('.') => {
            return Err(format!(
                "--pin {step:?}: a step directory of the claim, step-<N>"
            ))
        }
        Some(step) => args.extend(["--pin".into(), format!("{mount}/{step}")]),
        None => args.extend(["--checkpoints".into(), mount.clone()]),
    }
    // The pod's name: unique, so a replaced pod is a new consumer of the group.
    args.extend(["--consumer".into(), "$(POD_NAME)".into()]);
    args.extend(t.args.iter().cloned());
    let labels = json!({ "ringlet.dev/serve": t.name });
    let mut container = json!({
        "name": "replica",
        "image": t.image,
        "command": ["ringlet-serve"],
        "args": args,
        "env": [{ "name": "POD_NAME", "valueFrom": { "fieldRef": { "fieldPath": "metadata.name" } } }],
        "volumeMounts": [{ "name": "checkpoints", "mountPath": mount, "readOnly": true }],
    });
    if let Some(r) = super::resources(t.gpus_per_pod, t.cpus.as_deref(), t.memory.as_deref()) {
        container["resources"] = r;
    }
    let deployment = json!({
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": super::object_meta(&t.name, "ringlet.dev/serve", &t.name, t.namespace.as_deref()),
        "spec": {
            "replicas": t.replicas,
            "selector": { "matchLabels": labels },
            "template": {
                "metadata": { "labels": labels },
                "spec": {
                    "terminationGracePeriodSeconds": t.grace,
                    "enableServiceLinks": false,
                    "containers": [container],
                    "volumes": [{ "name": "checkpoints", "persistentVolumeClaim": {
                        "claimName": t.checkpoint_claim, "readOnly": true } }],
                },
            },
        },
    });
    Ok(json!({ "apiVersion": "v1", "kind": "List", "items": [deployment] }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render_args(args: &str) -> Result<Value, String> {
        let argv = std::iter::once("ringrun k8s serve").chain(args.split_whitespace());
        render(&ServeManifest::try_parse_from(argv).map_err(|e| e.to_string())?)
    }

    #[test]
    fn replicas_follow_the_claims_checkpoints_as_one_consumer_group() {
        let list = render_args(
            "--name digits --image i:1 --replicas 3 --redis redis://redis:6379 \
             --checkpoint-claim ck --gpus-per-pod 1 -- --batch 128",
        )
        .unwrap();
        let d = &list["items"][0];
        assert_eq!(d["spec"]["replicas"], 3);
        let pod = &d["spec"]["template"];
        assert_eq!(
            pod["metadata"]["labels"],
            d["spec"]["selector"]["matchLabels"]
        );
        let c = &pod["spec"]["containers"][0];
        assert_eq!(
            c["args"],
            json!([
                "run",
                "--redis",
                "redis://redis:6379",
                "--checkpoints",
                "/checkpoints",
                "--consumer",
                "$(POD_NAME)",
                "--batch",
                "128"
            ])
        );
        assert_eq!(c["volumeMounts"][0]["readOnly"], true);
        assert_eq!(c["resources"]["limits"]["nvidia.com/gpu"], "1");
        let pinned = render_args(
            "--name d --image i --redis r --checkpoint-claim ck --pin step-000000000440",
        )
        .unwrap();
        let args = &pinned["items"][0]["spec"]["template"]["spec"]["containers"][0]["args"];
        assert_eq!(args[3], "--pin");
        assert_eq!(args[4], "/checkpoints/step-000000000440");
        for (bad, why) in [
            (
                "--name d --image i --redis r --checkpoint-claim ck --pin ../x",
                "step directory",
            ),
            (
                "--name d --image i --redis r --checkpoint-claim ck -- --consumer x",
                "sets it",
            ),
            (
                "--name 1d --image i --redis r --checkpoint-claim ck",
                "letter first",
            ),
        ] {
            let e = render_args(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
        }
    }
}
