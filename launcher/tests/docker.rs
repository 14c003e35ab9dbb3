//! `ringrun --image`: ranks as real containers on this machine's Docker engine, built from our
//! own binaries with `ringrun image build` (no base image, nothing pulled). Each test checks that
//! nothing of its job is left behind (`docker ps -a`, `docker network ls`). Skipped, with a
//! printed reason, where no engine answers; never in CI when one does.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[path = "common/docker_engine.rs"]
mod docker_engine;

use docker_engine::{docker, engine, image, text, RINGRUN};

/// A command line split at whitespace (no argument here contains any).
fn line(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

/// ringrun with output to a file, bounded.
struct Run {
    child: Child,
    log: PathBuf,
}

impl Run {
    fn start(args: &[String], tag: &str) -> Run {
        Run::start_with(args, tag, &[])
    }

    fn start_with(args: &[String], tag: &str, env: &[(&str, &Path)]) -> Run {
        let log =
            std::env::temp_dir().join(format!("ringrun-docker-{tag}-{}.log", std::process::id()));
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(RINGRUN)
            .args(args)
            .env("RINGLET_TIMEOUT", "20")
            .envs(env.iter().map(|(k, v)| (*k, *v)))
            .stdout(f.try_clone().unwrap())
            .stderr(f)
            .stdin(Stdio::null())
            .spawn()
            .unwrap();
        Run { child, log }
    }

    /// The job's container-name prefix (ringrun's pid comes first in it).
    fn prefix(&self) -> String {
        format!("ringlet-{}-", self.child.id())
    }

    fn output(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn finish(mut self, limit: Duration) -> (Option<i32>, String, String) {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return (s.code(), self.output(), self.prefix());
            }
            if Instant::now() > deadline {
                // Drop stops ringrun and removes its containers.
                panic!("ringrun did not finish:\n{}", self.output());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Run {
    /// On a failed assertion too: SIGTERM lets ringrun remove its containers; if it is still
    /// there after a while, SIGKILL it and remove what it left by name.
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = Command::new("kill")
                .args(["-TERM", &self.child.id().to_string()])
                .status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = self.child.kill();
            let _ = self.child.wait();
            let names = text(&docker(&[
                "ps",
                "-aq",
                "--filter",
                &format!("name={}", self.prefix()),
            ]));
            for id in names.split_whitespace() {
                let _ = docker(&["rm", "-f", id]);
            }
        }
        let _ = std::fs::remove_file(&self.log);
    }
}

/// Nothing of the job named `prefix` is left: no container (running or not), no network.
fn assert_no_leftovers(prefix: &str) {
    let ps = text(&docker(&["ps", "-a", "--format", "{{.Names}}"]));
    let nets = text(&docker(&["network", "ls", "--format", "{{.Name}}"]));
    assert!(
        !ps.lines().any(|l| l.starts_with(prefix)),
        "containers left: {ps}"
    );
    assert!(
        !nets.lines().any(|l| l.starts_with(prefix)),
        "networks left: {nets}"
    );
}

#[test]
fn ranks_run_as_containers_and_leave_nothing_behind() {
    if !engine() {
        return;
    }
    let img = image();
    let (code, out, prefix) = Run::start(
        &line(&format!(
            "--image {} -n 3 --cpus 0.5 -- ringlet-bench -b 1K -e 1M -f 8",
            img
        )),
        "ok",
    )
    .finish(Duration::from_secs(120));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("[0] # Out of bounds values : 0 OK"), "{out}");
    for r in 0..3 {
        assert!(out.contains(&format!("[{r}] # rank {r} peak RSS")), "{out}");
    }
    assert_no_leftovers(&prefix);
}

#[test]
fn a_failing_rank_stops_the_job_and_is_named() {
    if !engine() {
        return;
    }
    let img = image();
    let (code, out, prefix) = Run::start(
        &line(&format!(
            "--image {} -n 2 -- ringlet-train --dataset nosuch",
            img
        )),
        "fail",
    )
    .finish(Duration::from_secs(120));
    assert_eq!(code, Some(1), "{out}");
    assert!(out.contains("unknown dataset \"nosuch\""), "{out}");
    assert!(out.contains("exited with status 1"), "{out}");
    assert_no_leftovers(&prefix);
}

#[test]
fn sigterm_stops_every_container() {
    if !engine() {
        return;
    }
    let img = image();
    let run = Run::start(
        &line(&format!(
            "--image {} -n 2 -- ringlet-train --dataset synthetic:50000 --steps 1000000",
            img
        )),
        "term",
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    while !run.output().contains("local batches") {
        assert!(Instant::now() < deadline, "{}", run.output());
        std::thread::sleep(Duration::from_millis(50));
    }
    Command::new("kill")
        .args(["-TERM", &run.child.id().to_string()])
        .status()
        .unwrap();
    let (code, out, prefix) = run.finish(Duration::from_secs(60));
    assert_eq!(code, Some(143), "{out}");
    assert!(
        out.contains("got SIGTERM; stopping the containers"),
        "{out}"
    );
    assert_no_leftovers(&prefix);
}

#[test]
fn docker_errors_are_one_clear_line() {
    if !engine() {
        return;
    }
    let img = image();
    let (code, out, prefix) = Run::start(
        &line("--image ringlet-no-such-image:none -n 2 -- ringlet-train"),
        "noimage",
    )
    .finish(Duration::from_secs(60));
    assert_eq!(code, Some(1), "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.contains("No such image: ringlet-no-such-image:none"),
        "{out}"
    );
    assert_no_leftovers(&prefix);
    // A GPU asked of an engine on a machine without NVIDIA's driver (where the engine may have
    // the NVIDIA hook, the request could succeed: not tested there).
    let nvidia = Path::new("/dev/nvidiactl").exists()
        || text(&docker(&["info", "--format", "{{json .Runtimes}}"])).contains("nvidia");
    if !nvidia {
        let (code, out, prefix) = Run::start(
            &line(&format!(
                "--image {} -n 2 --gpus-per-rank 1 -- ringlet-train",
                img
            )),
            "nogpu",
        )
        .finish(Duration::from_secs(60));
        assert_eq!(code, Some(1), "{out}");
        assert_eq!(out.lines().count(), 1, "{out}");
        assert!(out.contains("could not select device driver"), "{out}");
        assert_no_leftovers(&prefix);
    }
}

/// Two engine entries that both point at the local engine: host networking, one ring.
#[test]
fn several_engines_share_one_ring() {
    if !engine() {
        return;
    }
    let img = image();
    let sock =
        std::env::var("DOCKER_HOST").unwrap_or_else(|_| "unix:///var/run/docker.sock".into());
    let hosts = format!("{sock}:1,{sock}:2");
    let (code, out, prefix) = Run::start(
        &line(&format!(
            "--image {} --hosts {} -n 3 -- ringlet-train --epochs 3",
            img, hosts
        )),
        "hosts",
    )
    .finish(Duration::from_secs(120));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("test accuracy"), "{out}");
    assert_no_leftovers(&prefix);
}

/// `docker kill` of one rank's container mid-run: ringrun restarts the job, training resumes
/// from the shared checkpoint volume, and the final parameters equal an uninterrupted run's
/// bit for bit.
#[test]
fn a_killed_container_restarts_the_job_from_its_checkpoint() {
    if !engine() {
        return;
    }
    let out = restart_after("kill", "killed");
    assert!(out.contains("exit status 137"), "{out}");
}

/// `docker pause` of one rank's container (hung, not dead): the others' collective deadline
/// catches it, and the job is restarted the same way.
#[test]
fn a_paused_container_is_caught_by_the_deadline_and_restarted() {
    if !engine() {
        return;
    }
    let out = restart_after("pause", "paused");
    assert!(out.contains("is not responding"), "{out}");
}

/// Runs the job once whole, then again with `--max-restarts 2` doing `docker ACTION` to rank 1's
/// container once two checkpoints are committed; checks the restart, the resume and that both
/// runs end with the same bits. Returns the second run's output.
fn restart_after(action: &str, tag: &str) -> String {
    let img = image();
    let dir = std::env::temp_dir().join(format!("ringrun-docker-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let vol = format!("{}:/shared", dir.display());
    // The temp dir's path has no whitespace, so the command lines split cleanly. A 5 s deadline
    // for the paused case.
    let train = "ringlet-train --dataset synthetic:20000 --steps 200 --global-batch 96 \
                 --hidden 512,512 --balance static:2,1,1 --seed 9 --checkpoint-every 10";
    let whole = line(&format!(
        "--image {img} -n 3 --timeout 5 -v {vol} -- {train} --checkpoint-dir /shared/whole --dump-params /shared/whole.params"
    ));
    let (code, out, _) =
        Run::start(&whole, &format!("{tag}-whole")).finish(Duration::from_secs(180));
    assert_eq!(code, Some(0), "{out}");

    let restarting = line(&format!(
        "--image {img} -n 3 --timeout 5 --max-restarts 2 -v {vol} -- {train} --checkpoint-dir /shared/ck --dump-params /shared/p.params"
    ));
    let run = Run::start(&restarting, tag);
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let committed = std::fs::read_dir(dir.join("ck"))
            .map(|d| {
                d.flatten()
                    .filter(|e| e.path().join("manifest.json").exists())
                    .count()
            })
            .unwrap_or(0);
        if committed >= 2 {
            break;
        }
        assert!(Instant::now() < deadline, "no checkpoint: {}", run.output());
        std::thread::sleep(Duration::from_millis(10));
    }
    let names = text(&docker(&["ps", "--format", "{{.Names}}"]));
    let victim = names
        .lines()
        .find(|n| n.starts_with(&run.prefix()) && n.ends_with("-r1"))
        .unwrap_or_else(|| panic!("rank 1's container is not running: {names}"))
        .to_string();
    let done = docker(&[action, &victim]);
    assert!(done.status.success(), "docker {action}: {}", text(&done));
    let (code, out, prefix) = run.finish(Duration::from_secs(180));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("restart 1/2 at"), "{out}");
    assert!(out.contains("(resumed at step"), "{out}");
    let same = std::fs::read(dir.join("whole.params")).unwrap()
        == std::fs::read(dir.join("p.params")).unwrap();
    // Files written by the containers (as root) are removed with the directory.
    let _ = std::fs::remove_dir_all(&dir);
    assert!(same, "the restarted run's parameters differ:\n{out}");
    assert_no_leftovers(&prefix);
    out
}

/// `--min-ranks` with containers: `docker kill` of one rank's container, and `docker pause` of
/// another (left out at the 3 s deadline, then stopped by ringrun): the others go on without a
/// restart, redo the interrupted step, and end within 1e-5 of an uninterrupted run.
#[test]
fn survivors_in_containers_go_on_without_a_lost_rank() {
    if !engine() {
        return;
    }
    let img = image();
    let dir = std::env::temp_dir().join(format!("ringrun-docker-survive-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let vol = format!("{}:/shared", dir.display());
    // The digits, which 3 and 4 ranks train to within 5e-7 of each other over these 200 steps
    // (the synthetic set at a high learning rate is chaotic: 3 and 4 ranks end 8% apart); a
    // quarter of a CPU per container makes the steps long enough to act between.
    let train =
        "ringlet-train --steps 200 --global-batch 64 --hidden 256,128 --seed 5 --log-every 10";
    let whole = line(&format!(
        "--image {img} -n 4 --cpus 0.25 -v {vol} -- {train} --dump-params /shared/whole.params"
    ));
    let (code, out, _) = Run::start(&whole, "survive-whole").finish(Duration::from_secs(180));
    assert_eq!(code, Some(0), "{out}");
    let read = |name: &str| -> Vec<f32> {
        std::fs::read(dir.join(name))
            .unwrap()
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    let reference = read("whole.params");
    for (action, victim) in [("kill", 2), ("pause", 1)] {
        let args = line(&format!(
            "--image {img} -n 4 --cpus 0.25 --min-ranks 2 --timeout 3 -v {vol} -- {train} --dump-params /shared/{action}.params"
        ));
        let run = Run::start(&args, &format!("survive-{action}"));
        let deadline = Instant::now() + Duration::from_secs(120);
        while !run.output().contains("step 20/200") {
            assert!(Instant::now() < deadline, "{}", run.output());
            std::thread::sleep(Duration::from_millis(20));
        }
        let names = text(&docker(&["ps", "--format", "{{.Names}}"]));
        let container = names
            .lines()
            .find(|n| n.starts_with(&run.prefix()) && n.ends_with(&format!("-r{victim}")))
            .unwrap_or_else(|| panic!("rank {victim}'s container is not running: {names}"))
            .to_string();
        let done = docker(&[action, &container]);
        assert!(done.status.success(), "docker {action}: {}", text(&done));
        let (code, out, prefix) = run.finish(Duration::from_secs(180));
        assert_eq!(code, Some(0), "{out}");
        assert!(
            out.contains("the job finished with 3 of 4 ranks (--min-ranks)"),
            "{out}"
        );
        assert!(out.contains("membership change (epoch 1)"), "{out}");
        assert!(!out.contains("restart"), "{out}");
        if action == "pause" {
            assert!(out.contains(&format!("rank {victim} (container")), "{out}");
            assert!(
                out.contains("was left out of epoch 1; stopping it"),
                "{out}"
            );
        }
        let got = read(&format!("{action}.params"));
        let scale = reference.iter().fold(0.0f64, |m, v| m.max(v.abs() as f64));
        let d = reference
            .iter()
            .zip(&got)
            .map(|(a, b)| (*a as f64 - *b as f64).abs() / scale)
            .fold(0.0, f64::max);
        assert!(
            d < 1e-5,
            "docker {action}: max relative difference {d}\n{out}"
        );
        println!(
            "docker {action} of rank {victim}: 3 of 4 finished, max relative difference {d:.2e}"
        );
        assert_no_leftovers(&prefix);
    }
    let _ = std::fs::remove_dir_all(&dir);
}

/// Runs `openssl` with `args` in `dir`, which must succeed.
fn openssl(dir: &Path, args: &str) {
    let out = Command::new("openssl")
        .args(args.split_whitespace())
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(out.status.success(), "openssl {args}: {}", text(&out));
}

/// A CA, a server certificate for 127.0.0.1 signed by it, our client certificate signed by it
/// (`good/`), and a stranger's self-signed one (`bad/`), each folder as DOCKER_CERT_PATH expects.
fn make_certificates(dir: &Path) {
    let ec = "-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes";
    openssl(
        dir,
        &format!("req -x509 {ec} -keyout ca-key.pem -out ca.pem -days 2 -subj /CN=test-ca"),
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").unwrap();
    for (who, cn) in [("server", "127.0.0.1"), ("client", "ringrun")] {
        openssl(
            dir,
            &format!("req -new {ec} -keyout {who}-key.pem -out {who}.csr -subj /CN={cn}"),
        );
        openssl(dir, &format!("x509 -req -in {who}.csr -CA ca.pem -CAkey ca-key.pem -CAcreateserial -out {who}-cert.pem -days 2 -extfile {who}.ext"));
    }
    for d in ["good", "bad"] {
        std::fs::create_dir_all(dir.join(d)).unwrap();
        std::fs::copy(dir.join("ca.pem"), dir.join(d).join("ca.pem")).unwrap();
    }
    std::fs::copy(dir.join("client-cert.pem"), dir.join("good/cert.pem")).unwrap();
    std::fs::copy(dir.join("client-key.pem"), dir.join("good/key.pem")).unwrap();
    openssl(
        &dir.join("bad"),
        &format!("req -x509 {ec} -keyout key.pem -out cert.pem -days 2 -subj /CN=stranger"),
    );
}

/// A TLS terminator that demands a client certificate signed by our CA, in front of the local
/// engine's socket. (stunnel, not socat: socat 1.7 sets no session id context, so the TLS 1.3
/// resumption the Docker client tries on its second connection fails there.)
struct Terminator {
    child: Child,
    port: u16,
}

impl Terminator {
    fn start(dir: &Path) -> Terminator {
        let port = {
            let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
            l.local_addr().unwrap().port()
        };
        let conf = format!(
            "foreground = yes\npid =\n[docker]\naccept = 127.0.0.1:{port}\nconnect = /var/run/docker.sock\n\
             cert = {d}/server-cert.pem\nkey = {d}/server-key.pem\nCAfile = {d}/ca.pem\n\
             verifyChain = yes\nrequireCert = yes\n",
            d = dir.display()
        );
        std::fs::write(dir.join("stunnel.conf"), conf).unwrap();
        let child = Command::new("stunnel")
            .arg(dir.join("stunnel.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("run stunnel (apt-get install stunnel4)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "stunnel did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Terminator { child, port }
    }
}

impl Drop for Terminator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// An engine behind mutual TLS is used with our certificate, as the docker CLI would; a
/// certificate it does not trust is refused with one line naming why, before anything is made;
/// plaintext to another machine is refused without connecting.
#[test]
fn engines_are_reached_over_mutual_tls_and_plaintext_is_refused() {
    if !engine() {
        return;
    }
    let tools = ["stunnel", "openssl"]
        .iter()
        .all(|t| Command::new(t).arg("version").output().is_ok());
    if !tools {
        assert!(
            std::env::var_os("CI").is_none_or(|v| v.is_empty() || v == "false"),
            "CI: stunnel and openssl are needed (.ci/run installs stunnel4 and openssl)"
        );
        ringlet_core::skipped!("stunnel or openssl is missing here");
        return;
    }
    let img = image();
    let dir = std::env::temp_dir().join(format!("ringrun-tls-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    make_certificates(&dir);
    let tls = Terminator::start(&dir);
    let args = line(&format!(
        "--image {img} --hosts tcp://127.0.0.1:{}:2 -n 2 -- ringlet-bench -b 1K -e 64K -f 8",
        tls.port
    ));
    let verify = Path::new("1");

    let good = dir.join("good");
    let (code, out, prefix) = Run::start_with(
        &args,
        "tls-good",
        &[("DOCKER_TLS_VERIFY", verify), ("DOCKER_CERT_PATH", &good)],
    )
    .finish(Duration::from_secs(120));
    assert_eq!(code, Some(0), "{out}");
    assert!(out.contains("[0] # Out of bounds values : 0 OK"), "{out}");
    assert_no_leftovers(&prefix);

    let bad = dir.join("bad");
    let (code, out, prefix) = Run::start_with(
        &args,
        "tls-bad",
        &[("DOCKER_TLS_VERIFY", verify), ("DOCKER_CERT_PATH", &bad)],
    )
    .finish(Duration::from_secs(60));
    assert_eq!(code, Some(1), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "{out}");
    assert!(
        lines[0].starts_with(&format!(
            "ringrun: docker (tcp://127.0.0.1:{}): cannot reach the engine: ",
            tls.port
        )) && lines[0].contains("UnknownCA"),
        "{out}"
    );
    assert_no_leftovers(&prefix);

    // 198.18.0.1 is never contacted: the route is refused before any connection.
    let (code, out, _) = Run::start(
        &line(&format!(
            "--image {img} --hosts tcp://198.18.0.1:2375:2 -n 2 -- ringlet-bench"
        )),
        "plain",
    )
    .finish(Duration::from_secs(30));
    assert_eq!(code, Some(2), "{out}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(
        out.contains("plaintext and unauthenticated") && out.contains("--insecure-engines"),
        "{out}"
    );
    drop(tls);
    let _ = std::fs::remove_dir_all(&dir);
}
