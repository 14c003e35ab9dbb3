//! Replicas in containers: a version baked into an image, and replicas started by
//! `ringrun --image`, on a real `redis-server` and the local Docker engine.

mod common;

use common::{entries, sibling, train, Redis, SERVE};
use std::process::Command;
use std::time::{Duration, Instant};

/// Whether a Docker engine answers; in CI one must.
fn docker_up() -> bool {
    let up = Command::new("docker")
        .args(["info", "--format", "{{.ServerVersion}}"])
        .output()
        .is_ok_and(|o| o.status.success());
    if !up {
        assert!(
            std::env::var_os("CI").is_none_or(|v| v.is_empty() || v == "false"),
            "CI: no Docker engine answers"
        );
        ringlet_core::skipped!("no Docker engine answers here");
    }
    up
}

/// `ringrun image build --model` bakes a verified version into an image: a container of it
/// (host network, to reach this Redis) serves that version with no flag naming it.
#[test]
fn a_version_baked_into_an_image_serves_from_a_container() {
    let docker = |args: &[&str]| Command::new("docker").args(args).output().unwrap();
    if !docker_up() {
        return;
    }
    let Some(redis) = Redis::start() else { return };
    let work = std::env::temp_dir().join(format!("ringlet-serve-image-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    train(&["--epochs", "2", "--checkpoint-every", "100000"], &work);
    let (step, dir) = ringlet_ddp::checkpoint::steps(&work).unwrap()[0].clone();
    let tag = format!("ringlet-serve-ci:{}", std::process::id());
    let built = Command::new(sibling("ringrun"))
        .args(["image", "build", "--tag", &tag, "--model"])
        .arg(&dir)
        .arg(SERVE)
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&built.stderr).to_string();
    assert!(built.status.success(), "{said}");
    let label = docker(&[
        "image",
        "inspect",
        "--format",
        "{{index .Config.Labels \"ringlet.model.version\"}}",
        &tag,
    ]);
    let version = String::from_utf8_lossy(&label.stdout).trim().to_string();
    assert!(version.starts_with(&format!("step-{step}@")), "{version}");
    let by_version = format!("ringlet-serve-ci:{}", version.replace('@', "-"));
    assert!(said.contains(&by_version), "{said}");

    let mut conn = redis.conn();
    let mut pipe = redis::pipe();
    for i in 0..100 {
        let v: Vec<f32> = (0..64).map(|j| ((i + j) % 16) as f32).collect();
        pipe.cmd("XADD")
            .arg("records")
            .arg("*")
            .arg("features")
            .arg(serde_json::to_string(&v).unwrap());
    }
    let _: Vec<String> = pipe.query(&mut conn).unwrap();
    let url = redis.url();
    let ran = docker(&[
        "run",
        "--rm",
        "--network",
        "host",
        &by_version,
        "ringlet-serve",
        "run",
        "--redis",
        &url,
        "--exit-when-idle",
        "1",
    ]);
    let log = format!(
        "{}{}",
        String::from_utf8_lossy(&ran.stdout),
        String::from_utf8_lossy(&ran.stderr)
    );
    let _ = docker(&["rmi", &tag, &by_version]);
    let _ = std::fs::remove_dir_all(&work);
    assert!(ran.status.success(), "{log}");
    let predictions = entries(&mut conn, "predictions");
    assert_eq!(predictions.len(), 100, "{log}");
    assert!(
        predictions.iter().all(|(_, f)| f["version"] == version),
        "{log}"
    );
    println!("{said}{log}");
}

/// The address of the Docker host on the default bridge (what `host.docker.internal` resolves
/// to in a container given `host-gateway`).
fn docker_host_address() -> String {
    let out = Command::new("ip")
        .args(["-4", "-o", "addr", "show", "docker0"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let addr = text
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .map(String::from);
    addr.unwrap_or_else(|| panic!("no IPv4 address on docker0: {text}"))
}

/// `ringrun --image` starts 3 replicas as containers on the job's own network; they reach the
/// Redis on the Docker host as `host.docker.internal`, read the checkpoints from a read-only
/// volume, share the consumer group and score every record once; each prints its report.
#[test]
fn replicas_started_by_ringrun_as_containers_share_the_stream() {
    if !docker_up() {
        return;
    }
    let host = docker_host_address();
    let Some(redis) = Redis::start_on(&[&host]) else {
        return;
    };
    let work = std::env::temp_dir().join(format!("ringlet-serve-ringrun-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    train(&["--epochs", "2", "--checkpoint-every", "100000"], &work);
    let tag = format!("ringlet-serve-replicas:{}", std::process::id());
    let built = Command::new(sibling("ringrun"))
        .args(["image", "build", "--tag", &tag, SERVE])
        .output()
        .unwrap();
    assert!(
        built.status.success(),
        "{}",
        String::from_utf8_lossy(&built.stderr)
    );

    let url = redis.url_at("host.docker.internal");
    let log = work.with_extension("log");
    let f = std::fs::File::create(&log).unwrap();
    let mut job = Command::new(sibling("ringrun"))
        .args(["-n", "3", "--image", &tag, "-v"])
        .arg(format!("{}:/models:ro", work.display()))
        .args([
            "--",
            "ringlet-serve",
            "run",
            "--redis",
            &url,
            "--checkpoints",
            "/models",
        ])
        .args(["--batch", "16", "--exit-when-idle", "3"])
        .stdout(f.try_clone().unwrap())
        .stderr(f)
        .spawn()
        .unwrap();
    let output = || std::fs::read_to_string(&log).unwrap_or_default();
    // Records arrive once all three replicas serve (a blocked read does not list a consumer in
    // Redis 7.0's XINFO), so that they share the load.
    let deadline = Instant::now() + Duration::from_secs(90);
    while output().matches(" serving step-").count() < 3 {
        let running = job.try_wait().unwrap().is_none();
        assert!(Instant::now() < deadline && running, "{}", output());
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut conn = redis.conn();
    let records = 3000;
    for chunk in 0..30 {
        let mut pipe = redis::pipe();
        for i in chunk * 100..(chunk + 1) * 100 {
            let v: Vec<f32> = (0..64).map(|j| ((i * 7 + j) % 17) as f32).collect();
            pipe.cmd("XADD")
                .arg("records")
                .arg("*")
                .arg("features")
                .arg(serde_json::to_string(&v).unwrap());
        }
        let _: Vec<String> = pipe.query(&mut conn).unwrap();
        std::thread::sleep(Duration::from_millis(20));
    }
    let status = loop {
        if let Some(s) = job.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline + Duration::from_secs(60) {
            let _ = job.kill();
            panic!("the replicas did not finish:\n{}", output());
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let log = output();
    let _ = Command::new("docker").args(["rmi", &tag]).output();
    let _ = std::fs::remove_dir_all(&work);
    assert!(status.success(), "{log}");
    let predictions = entries(&mut conn, "predictions");
    let ids: std::collections::HashSet<&str> =
        predictions.iter().map(|(_, f)| f["id"].as_str()).collect();
    assert_eq!((predictions.len(), ids.len()), (records, records), "{log}");
    // Each replica's report: "ringlet-serve: <consumer> scored N records ...".
    let scored: Vec<usize> = log
        .lines()
        .filter_map(|l| l.split(" scored ").nth(1)?.split(' ').next()?.parse().ok())
        .collect();
    assert_eq!(scored.len(), 3, "{log}");
    assert_eq!(scored.iter().sum::<usize>(), records, "{log}");
    assert!(scored.iter().filter(|&&n| n > 0).count() >= 2, "{log}");
    println!("replicas scored {scored:?}\n{log}");
}
