//! `ringrun k8s train` and `serve`: the rendered objects are checked against the Kubernetes API's own models
//! (the official Python client, `scripts/k8s-check.py`), and the training Jobs' pods run for real
//! as containers on the local Docker engine, each given what Kubernetes would give it: the
//! container's command, arguments and environment from the manifest (the token resolved from the
//! rendered Secret), `JOB_COMPLETION_INDEX`, the host name `<job>-<index>` and the DNS name
//! `<job>-<index>.<service>` of the headless Service, and the claim as a shared directory.
//! No control plane runs here: scheduling, node selectors and GPU requests are not exercised.

#[path = "common/docker_engine.rs"]
mod docker_engine;

use docker_engine::{docker, engine, image, text, RINGRUN};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// `ringrun k8s train ARGS` (or `serve ...` when `args` starts with it).
fn render(args: &str) -> Value {
    let (what, args) = match args.strip_prefix("serve ") {
        Some(rest) => ("serve", rest),
        None => ("train", args),
    };
    let out = Command::new(RINGRUN)
        .args(["k8s", what])
        .args(args.split_whitespace())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "ringrun k8s train {args}: {}",
        text(&out)
    );
    serde_json::from_slice(&out.stdout).expect("the manifests are JSON")
}

/// Whether the official client is importable; in CI its absence fails the test (.ci/run
/// installs it).
fn kubernetes_client() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import kubernetes"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        assert!(
            std::env::var_os("CI").is_none_or(|v| v.is_empty() || v == "false"),
            "CI: python3 cannot import kubernetes (.ci/run installs it with pip)"
        );
        ringlet_core::skipped!(
            "the kubernetes Python client is not installed (pip install kubernetes)"
        );
    }
    ok
}

#[test]
fn rendered_objects_match_the_kubernetes_api_models() {
    if !kubernetes_client() {
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/k8s-check.py");
    for (tag, args, objects) in [
        (
            "pools",
            "--name mnist --namespace ml --image registry.example/ringlet:1 \
             --pool name=h100,ranks=2,weight=3,gpus=1,node=nvidia.com/gpu.product=NVIDIA-H100-80GB-HBM3 \
             --pool name=t4,ranks=4,weight=1,gpus=1,node=nvidia.com/gpu.product=Tesla-T4 \
             --cpus 4 --memory 16Gi --checkpoint-claim mnist-ck --checkpoint-size 10Gi \
             --storage-class nfs --timeout 120 -e RINGLET_LOG=info -- ringlet-train --model cnn",
            5,
        ),
        (
            "plain",
            "--name tiny --image ringlet:local -n 2 --token-secret shared -- ringlet-train",
            2,
        ),
        (
            "serve",
            "serve --name digits --image registry.example/ringlet:1 --replicas 3 \
             --redis redis://redis:6379 --checkpoint-claim mnist-ck --cpus 1 --memory 1Gi -- --batch 128",
            1,
        ),
    ] {
        let file = std::env::temp_dir().join(format!("ringrun-k8s-{tag}-{}.json", std::process::id()));
        std::fs::write(&file, render(args).to_string()).unwrap();
        let out = Command::new("python3").arg(&script).arg(&file).output().unwrap();
        let _ = std::fs::remove_file(&file);
        let report = text(&out);
        assert!(out.status.success(), "{tag}: {report}");
        assert!(
            report.contains(&format!("{objects} of {objects} objects match")),
            "{tag}: {report}"
        );
        println!("{tag}: {}", report.trim_end().lines().last().unwrap_or_default());
    }
}

/// One pod as Kubernetes would start it.
struct Pod {
    host: String,
    dns: String,
    command: Vec<String>,
    env: Vec<(String, String)>,
    mounts: Vec<(String, String)>,
}

/// The pods of every Indexed Job in `list`, with the environment Kubernetes would give them.
fn pods(list: &Value) -> Vec<Pod> {
    let items = list["items"].as_array().unwrap();
    let secret = |name: &str, key: &str| -> String {
        items
            .iter()
            .find(|i| i["kind"] == "Secret" && i["metadata"]["name"] == name)
            .and_then(|s| s["stringData"][key].as_str())
            .unwrap_or_else(|| panic!("no rendered Secret {name} with key {key}"))
            .to_string()
    };
    let mut pods = Vec::new();
    for job in items.iter().filter(|i| i["kind"] == "Job") {
        let spec = &job["spec"];
        assert_eq!(spec["completionMode"], "Indexed");
        let pod = &spec["template"]["spec"];
        let c = &pod["containers"][0];
        let strings = |v: &Value| -> Vec<String> {
            v.as_array()
                .map(|a| a.iter().map(|s| s.as_str().unwrap().to_string()).collect())
                .unwrap_or_default()
        };
        let claims: Vec<(String, String)> = pod["volumes"]
            .as_array()
            .map(|vs| {
                vs.iter()
                    .map(|v| {
                        let claim = v["persistentVolumeClaim"]["claimName"].as_str().unwrap();
                        (v["name"].as_str().unwrap().to_string(), claim.to_string())
                    })
                    .collect()
            })
            .unwrap_or_default();
        let mounts: Vec<(String, String)> = c["volumeMounts"]
            .as_array()
            .map(|ms| {
                ms.iter()
                    .map(|m| {
                        let volume = m["name"].as_str().unwrap();
                        let claim = &claims.iter().find(|(n, _)| n == volume).unwrap().1;
                        (claim.clone(), m["mountPath"].as_str().unwrap().to_string())
                    })
                    .collect()
            })
            .unwrap_or_default();
        let completions = spec["completions"].as_u64().unwrap();
        let name = job["metadata"]["name"].as_str().unwrap();
        for index in 0..completions {
            let mut env: Vec<(String, String)> = c["env"]
                .as_array()
                .unwrap()
                .iter()
                .map(|e| {
                    let from = &e["valueFrom"];
                    let value = match (e["value"].as_str(), from["fieldRef"]["fieldPath"].as_str())
                    {
                        (Some(v), _) => v.to_string(),
                        // The node the scheduler would have put the pod on: one per pool here.
                        (None, Some("spec.nodeName")) => format!("{name}-node"),
                        (None, _) => {
                            let r = &from["secretKeyRef"];
                            secret(r["name"].as_str().unwrap(), r["key"].as_str().unwrap())
                        }
                    };
                    (e["name"].as_str().unwrap().to_string(), value)
                })
                .collect();
            // What the Job controller adds to every container of an Indexed Job's pod.
            env.push(("JOB_COMPLETION_INDEX".into(), index.to_string()));
            let host = format!("{name}-{index}");
            pods.push(Pod {
                dns: format!("{host}.{}", pod["subdomain"].as_str().unwrap()),
                host,
                command: [strings(&c["command"]), strings(&c["args"])].concat(),
                env,
                mounts: mounts.clone(),
            });
        }
    }
    pods
}

/// The job's containers, network and claim directories, removed whatever happens.
struct Cluster {
    prefix: String,
    names: Vec<String>,
    claims: PathBuf,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &self.names {
            let _ = docker(&["rm", "-f", n]);
        }
        let _ = docker(&["network", "rm", &self.prefix]);
        let _ = std::fs::remove_dir_all(&self.claims);
    }
}

#[test]
fn the_training_manifests_pods_train_on_docker_with_the_environment_kubernetes_gives_them() {
    if !engine() {
        return;
    }
    let img = image();
    let name = format!("rk8s{}", std::process::id());
    // Two pools (two "GPU generations"): the first pool's ranks weigh twice the second's.
    let list = render(&format!(
        "--name {name} --image {img} --pool name=big,ranks=2,weight=2 --pool name=small,ranks=1,weight=1 \
         --checkpoint-claim {name}-ck --timeout 30 -e RINGLET_LOG=info -- ringlet-train --epochs 2 --checkpoint-every 10"
    ));
    let pods = pods(&list);
    assert_eq!(pods.len(), 3);
    let mut cluster = Cluster {
        prefix: name.clone(),
        names: Vec::new(),
        claims: std::env::temp_dir().join(format!("{name}-claims")),
    };
    let made = docker(&["network", "create", &name]);
    assert!(made.status.success(), "{}", text(&made));
    cluster.names = pods.iter().map(|p| format!("{name}-{}", p.host)).collect();
    // Pods start in any order on Kubernetes, and rank 0's DNS name exists only once its pod runs:
    // start it last, 2 s after the others, whose first lookups of it fail.
    for (i, pod) in pods
        .iter()
        .enumerate()
        .skip(1)
        .chain(pods.iter().enumerate().take(1))
    {
        if i == 0 {
            std::thread::sleep(Duration::from_secs(2));
        }
        let container = &cluster.names[i];
        let mut args: Vec<String> = ["run", "-d", "--name", container, "--network", &name]
            .iter()
            .map(|s| s.to_string())
            .collect();
        args.extend(["--hostname".into(), pod.host.clone()]);
        args.extend(["--network-alias".into(), pod.dns.clone()]);
        args.extend(["--cpus".into(), "0.6".into()]);
        for (k, v) in &pod.env {
            args.extend(["-e".into(), format!("{k}={v}")]);
        }
        for (claim, path) in &pod.mounts {
            let dir = cluster.claims.join(claim);
            std::fs::create_dir_all(&dir).unwrap();
            args.extend(["-v".into(), format!("{}:{path}", dir.display())]);
        }
        // Kubernetes' command replaces the image's entrypoint, its args the image's command.
        args.extend(["--entrypoint".into(), pod.command[0].clone(), img.into()]);
        args.extend(pod.command[1..].iter().cloned());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = docker(&refs);
        assert!(out.status.success(), "docker run: {}", text(&out));
    }
    let deadline = Instant::now() + Duration::from_secs(240);
    let exits = loop {
        let mut args = vec![
            "inspect",
            "--format",
            "{{.State.Status}} {{.State.ExitCode}}",
        ];
        args.extend(cluster.names.iter().map(String::as_str));
        let states = text(&docker(&args));
        if states.lines().filter(|l| l.starts_with("exited")).count() == pods.len() {
            break states;
        }
        if Instant::now() > deadline {
            let logs: Vec<String> = cluster
                .names
                .iter()
                .map(|n| text(&docker(&["logs", n])))
                .collect();
            panic!(
                "the pods did not finish: {states}\n{}",
                logs.join("\n---\n")
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let logs: Vec<String> = cluster
        .names
        .iter()
        .map(|n| text(&docker(&["logs", n])))
        .collect();
    assert!(
        exits.lines().all(|l| l == "exited 0"),
        "{exits}\n{}",
        logs.join("\n---\n")
    );
    // Rank 0 is the first pool's first pod; the weights split every batch 2:2:1.
    let summary = logs[0]
        .lines()
        .find(|l| l.starts_with("ringlet-train:") && l.contains("steps on 3 ranks"))
        .unwrap_or_else(|| panic!("no summary from rank 0:\n{}", logs.join("\n---\n")));
    assert!(summary.contains("local batches [26, 25, 13]"), "{summary}");
    // The pods started first looked rank 0's name up again until it resolved.
    assert!(
        logs[1].contains("does not resolve yet"),
        "rank 1 never waited for rank 0's name:\n{}",
        logs[1]
    );
    // Checkpoints went to the claim, which every pod shares.
    let committed: Vec<String> = std::fs::read_dir(cluster.claims.join(format!("{name}-ck")))
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .filter(|n| n.starts_with("step-"))
        .collect();
    assert!(!committed.is_empty(), "no checkpoint on the claim");
    println!("{summary}\ncheckpoints on the claim: {committed:?}");
    drop(cluster);
    let left = text(&docker(&["ps", "-a", "--format", "{{.Names}}"]));
    assert!(!left.lines().any(|l| l.starts_with(&name)), "{left}");
    let nets = text(&docker(&["network", "ls", "--format", "{{.Name}}"]));
    assert!(!nets.lines().any(|l| l == name), "{nets}");
}
