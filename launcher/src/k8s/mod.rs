//! `ringrun k8s`: the Kubernetes objects of a training job ([`train`]: Indexed Jobs behind a
//! headless Service) and of a scoring service ([`serve`]: a Deployment of ringlet-serve replicas),
//! for `kubectl apply -f`. The output is JSON (a `v1` `List`), which kubectl reads as it reads
//! YAML; CI checks it against the Kubernetes API's own models and runs the training pods on
//! Docker (`launcher/tests/k8s.rs`).

pub mod serve;
pub mod train;

use clap::Parser;
use serde_json::{json, Map, Value};
use std::ffi::OsString;
use std::path::Path;

/// `ringrun k8s train|serve ARGS`: exit status 0, 1 (could not write) or 2 (bad command line).
pub fn command(args: &[OsString]) -> u8 {
    const USAGE: &str = "usage: ringrun k8s train --name NAME --image IMAGE -n N -- PROGRAM [ARGS]...\n       \
                         ringrun k8s serve --name NAME --image IMAGE --redis URL --checkpoint-claim CLAIM";
    let rest = || args[1..].iter().cloned();
    let rendered = match args.first().and_then(|a| a.to_str()) {
        Some("--help" | "-h") => {
            println!("ringrun k8s: render Kubernetes manifests (see ringrun k8s train --help, ringrun k8s serve --help)\n{USAGE}");
            return 0;
        }
        Some("train") => {
            let cli = train::TrainManifest::parse_from(
                std::iter::once(OsString::from("ringrun k8s train")).chain(rest()),
            );
            train::render(&cli).map(|list| (list, cli.output.clone()))
        }
        Some("serve") => {
            let cli = serve::ServeManifest::parse_from(
                std::iter::once(OsString::from("ringrun k8s serve")).chain(rest()),
            );
            serve::render(&cli).map(|list| (list, cli.output.clone()))
        }
        _ => {
            note!("{USAGE}");
            return 2;
        }
    };
    let (list, output) = match rendered {
        Ok(r) => r,
        Err(e) => {
            note!("{e}");
            return 2;
        }
    };
    let text = serde_json::to_string_pretty(&list).expect("JSON values serialise") + "\n";
    let written = match &output {
        // A Secret may hold the job token: readable by the owner only.
        Some(path) => write_private(path, &text).map_err(|e| format!("{}: {e}", path.display())),
        None => {
            use std::io::Write;
            std::io::stdout()
                .write_all(text.as_bytes())
                .map_err(|e| format!("standard output: {e}"))
        }
    };
    match written {
        Ok(()) => 0,
        Err(e) => {
            note!("cannot write the manifests: {e}");
            1
        }
    }
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(text.as_bytes())
}

/// An object's metadata: its name, one label, the namespace if given.
fn object_meta(name: &str, label: &str, value: &str, namespace: Option<&str>) -> Value {
    let mut m = json!({ "name": name, "labels": { label: value } });
    if let Some(ns) = namespace {
        m["namespace"] = json!(ns);
    }
    m
}

/// A container's `resources`: equal requests and limits (with both cpu and memory given, the
/// Guaranteed class, whose pods are evicted last); `None` when nothing is asked for.
fn resources(gpus: u32, cpus: Option<&str>, memory: Option<&str>) -> Option<Value> {
    let mut r = Map::new();
    for (key, value) in [
        ("nvidia.com/gpu", (gpus > 0).then(|| gpus.to_string())),
        ("cpu", cpus.map(String::from)),
        ("memory", memory.map(String::from)),
    ] {
        if let Some(v) = value {
            r.insert(key.into(), json!(v));
        }
    }
    (!r.is_empty()).then(|| json!({ "requests": r, "limits": r }))
}

/// A decimal number with one of Kubernetes' suffixes (the API server checks the rest).
pub fn parse_quantity(s: &str) -> Result<String, String> {
    const SUFFIXES: [&str; 14] = [
        "", "m", "k", "M", "G", "T", "P", "E", "Ki", "Mi", "Gi", "Ti", "Pi", "Ei",
    ];
    let number_end = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (number, suffix) = s.split_at(number_end);
    let ok = number.parse::<f64>().is_ok_and(|v| v > 0.0) && SUFFIXES.contains(&suffix);
    match ok {
        true => Ok(s.to_string()),
        false => Err(format!(
            "{s:?} is not a Kubernetes quantity (`2`, `500m`, `4Gi`)"
        )),
    }
}

/// An RFC 1123 label, as Kubernetes requires of Service names and pod host names.
pub fn dns_label(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-');
    match ok {
        true => Ok(()),
        false => Err(format!(
            "{s:?} must be 1 to 63 lower-case letters, digits or '-', not starting or ending with '-'"
        )),
    }
}
