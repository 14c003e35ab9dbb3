//! The container backend: every rank is a container started through the Docker engine API
//! (`bollard`; `DOCKER_HOST` honoured), possibly on several engines. This module owns placing
//! ranks on engines, the job's network, creating and starting the containers with the rank
//! environment, relaying their output with rank prefixes, supervising them (the first failure
//! stops the others; Ctrl-C/SIGTERM stop all) and removing every container and network it made,
//! on every path.
//!
//! Networking: with one engine, the ranks share a user-defined bridge network made for the job
//! and find rank 0 by its container name; `host.docker.internal` names the Docker host there
//! (Docker's `host-gateway`), for services the ranks use. With several engines, containers use host networking,
//! so a rank's ring address is its host's: the hosts must reach each other (and rank 0's host must
//! be reachable at MASTER_ADDR: the first engine's host for `tcp://` endpoints, 127.0.0.1 when
//! every engine is local, else `--master-addr`).

use crate::job::{Ended, JobSpec, Outcome};
use crate::output::{prefixed, write_whole, Target, MAX_LINE};
use crate::signals::Signals;
use bollard::models::{ContainerCreateBody, DeviceRequest, HostConfig, NetworkCreateRequest};
use bollard::query_parameters::{
    CreateContainerOptions, KillContainerOptions, ListContainersOptions, LogsOptions,
    RemoveContainerOptions, WaitContainerOptions,
};
use bollard::Docker;
use futures_util::StreamExt;
use std::collections::HashMap;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// After SIGKILL, how long to wait for the engines to report the last containers' ends before
/// giving up on them (a stalled engine, a dead link to a remote one) and force-removing them.
const AFTER_KILL: Duration = Duration::from_secs(10);

/// The CFS period of `--cpus` quotas, in µs.
const CPU_PERIOD_US: i64 = 10_000;

/// The label every container and network of a job carries (`docker ps -a --filter label=...`).
pub const JOB_LABEL: &str = "ringlet.job";

/// One Docker engine and how many ranks it takes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Endpoint {
    pub url: String,
    pub slots: usize,
}

/// The engines of `--hosts`, in placement order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hosts(pub Vec<Endpoint>);

/// `--hosts unix:///var/run/docker.sock:2,tcp://gpu-node-2:2375:4`: each entry an engine URL and,
/// after the last ':', its slot count.
pub fn parse_hosts(s: &str) -> Result<Hosts, String> {
    s.split(',')
        .map(|entry| {
            let entry = entry.trim();
            let (url, slots) = entry
                .rsplit_once(':')
                .ok_or_else(|| format!("`{entry}`: expected ENGINE_URL:SLOTS"))?;
            let slots: usize = slots
                .parse()
                .ok()
                .filter(|&n| n > 0)
                .ok_or_else(|| format!("`{entry}`: `{slots}` is not a positive slot count"))?;
            let remote = url
                .strip_prefix("tcp://")
                .or_else(|| url.strip_prefix("http://"))
                .or_else(|| url.strip_prefix("https://"));
            match remote {
                // `tcp://node:2375` without its slot count would read as 2375 slots on `tcp://node`.
                Some(hostport) if !hostport.contains(':') => {
                    return Err(format!(
                        "`{entry}`: a tcp://, http:// or https:// engine needs its port and then the slot count (tcp://HOST:PORT:SLOTS)"
                    ))
                }
                Some(_) => {}
                None if url.starts_with("unix://") || url.starts_with("ssh://") => {}
                None => {
                    return Err(format!(
                        "`{entry}`: the engine URL must start with unix://, tcp://, http://, https:// or ssh://"
                    ))
                }
            }
            Ok(Endpoint {
                url: url.to_string(),
                slots,
            })
        })
        .collect::<Result<Vec<_>, _>>()
        .map(Hosts)
}

/// What the container backend needs beyond the [`JobSpec`].
#[derive(Clone, Debug)]
pub struct ContainerSpec {
    pub image: String,
    /// Engines in placement order; empty: the one `DOCKER_HOST` names (or the local socket).
    pub hosts: Vec<Endpoint>,
    /// `HOST:CONTAINER[:ro]` bind mounts, the same in every container.
    pub volumes: Vec<String>,
    /// Cores per rank (one value: the same for all).
    pub cpus: Vec<f64>,
    /// GPUs requested per rank from the engine's GPU runtime.
    pub gpus_per_rank: u32,
    /// Explicit device ids per rank (`--gpus 0;1;2,3`): overrides `gpus_per_rank`.
    pub gpu_map: Vec<Vec<String>>,
    /// `--master-addr` when given: where rank 0's host is reachable across several engines.
    pub master_addr: Option<String>,
    /// `--insecure-engines`: plaintext tcp:// to engines on other machines is allowed.
    pub insecure_engines: bool,
}

struct Placed {
    rank: usize,
    engine: usize,
    name: String,
}

/// A Docker error as one line: the engine's own message where it sent one, else the error with
/// its causes (the client library's own words, "client error (Connect)", name no cause).
pub(crate) fn docker_error(e: &bollard::errors::Error) -> String {
    if let bollard::errors::Error::DockerResponseServerError { message, .. } = e {
        return message.clone();
    }
    let mut line = e.to_string();
    let mut cause = std::error::Error::source(e);
    while let Some(c) = cause {
        let text = c.to_string();
        if !line.contains(&text) {
            line = format!("{line}: {text}");
        }
        cause = c.source();
    }
    line
}

/// Runs one attempt of the job as containers. `signals` must have been installed before.
pub fn run(spec: &JobSpec, cs: &ContainerSpec, signals: &Signals) -> Ended {
    // One thread: the supervisor's loop awaits with short timeouts, and the log pumps and waits
    // run as tasks in between.
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            note!("cannot start the Docker client's runtime: {e}");
            return Ended::new(Outcome::Error);
        }
    };
    let (writer, thread) = spawn_writer();
    let ended = rt.block_on(run_async(spec, cs, signals, writer));
    // Dropping the runtime ends the pumps, and with them the last senders: the writer drains
    // what is queued and stops. Bounded, in case our own stdout is stuck.
    drop(rt);
    if let Some(t) = thread {
        let deadline = Instant::now() + Duration::from_secs(2);
        while !t.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    ended
}

async fn run_async(spec: &JobSpec, cs: &ContainerSpec, signals: &Signals, writer: Writer) -> Ended {
    let hosts = if cs.hosts.is_empty() {
        vec![Endpoint {
            url: crate::engine::default_url(),
            slots: spec.world_size,
        }]
    } else {
        cs.hosts.clone()
    };
    // main checked that --hosts has room for every rank (a usage error).
    let mut engines = Vec::new();
    for h in &hosts {
        let docker = match crate::engine::open(&h.url, cs.insecure_engines) {
            Ok(d) => d,
            Err(e) => {
                note!("docker ({}): {e}", &h.url);
                return Ended::new(Outcome::Error);
            }
        };
        // Before anything is made there: a refused certificate or an unreachable engine is one
        // line, with nothing to clean up.
        if let Err(e) = docker.ping().await {
            note!(
                "docker ({}): cannot reach the engine: {}",
                &h.url,
                docker_error(&e)
            );
            return Ended::new(Outcome::Error);
        }
        engines.push(docker);
    }
    let job = format!(
        "ringlet-{}-{}-{}",
        std::process::id(),
        spec.master_port,
        spec.restart
    );
    let mut job_run = JobRun {
        job: job.clone(),
        engines,
        hosts,
        networks: Vec::new(),
        placed: Vec::new(),
        store: None,
    };
    let ended = job_run
        .start_and_supervise(spec, cs, signals, &writer)
        .await;
    job_run.clean_up().await;
    ended
}

struct JobRun {
    job: String,
    engines: Vec<Docker>,
    hosts: Vec<Endpoint>,
    /// (engine, network name) made for the job.
    networks: Vec<(usize, String)>,
    placed: Vec<Placed>,
    /// With `--min-ranks`: the rendezvous store ringrun serves on the job network's gateway,
    /// so that it outlives any rank, and where the survivors' member lists are read.
    store: Option<ringlet_store::StoreServer>,
}

impl JobRun {
    fn labels(&self) -> HashMap<String, String> {
        HashMap::from([(JOB_LABEL.to_string(), self.job.clone())])
    }

    fn fail(&self, engine: usize, what: &str, e: &bollard::errors::Error) -> Ended {
        note!(
            "docker ({}): {what}: {}",
            &self.hosts[engine].url,
            docker_error(e)
        );
        Ended::new(Outcome::Error)
    }

    async fn start_and_supervise(
        &mut self,
        spec: &JobSpec,
        cs: &ContainerSpec,
        signals: &Signals,
        writer: &Writer,
    ) -> Ended {
        let single = self.hosts.len() == 1;
        // Placement: ranks in order, filling each engine's slots.
        let mut engine_of = Vec::with_capacity(spec.world_size);
        for (i, h) in self.hosts.iter().enumerate() {
            engine_of.extend(std::iter::repeat_n(i, h.slots));
        }
        engine_of.truncate(spec.world_size);
        let network = format!("{}-net", self.job);
        let master_addr = if single {
            format!("{}-r0", self.job)
        } else if let Some(addr) = &cs.master_addr {
            addr.clone()
        } else if let Some(host) = crate::engine::remote_host(&self.hosts[0].url) {
            host.to_string()
        } else if self.hosts.iter().all(|h| h.url.starts_with("unix://")) {
            "127.0.0.1".to_string()
        } else {
            note!("with remote engines and a local first one, say where rank 0's host is reachable: --master-addr");
            return Ended::new(Outcome::Error);
        };
        if single {
            let req = NetworkCreateRequest {
                name: network.clone(),
                driver: Some("bridge".into()),
                labels: Some(self.labels()),
                ..Default::default()
            };
            // Recorded first: a create that times out here may still happen on the engine.
            self.networks.push((0, network.clone()));
            if let Err(e) = self.engines[0].create_network(req).await {
                return self.fail(0, "creating the job's network", &e);
            }
        }
        let store_addr = match spec.min_ranks {
            Some(_) => match self.serve_store(&network, spec).await {
                Ok(a) => Some(a),
                Err(e) => {
                    note!("cannot serve the rendezvous store on the job's network: {e}");
                    return Ended::new(Outcome::Error);
                }
            },
            None => None,
        };
        let passed: Vec<String> = std::env::vars()
            .filter(|(k, _)| {
                (k.starts_with("RINGLET_") || k == "RUST_LOG" || k == "RUST_BACKTRACE")
                    && !spec.rank_env(0).iter().any(|(s, _)| s == k)
            })
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let mut cmd = vec![spec.program.to_string_lossy().into_owned()];
        cmd.extend(spec.args.iter().map(|a| a.to_string_lossy().into_owned()));
        for (rank, &engine) in engine_of.iter().enumerate() {
            let name = format!("{}-r{rank}", self.job);
            let mut env: Vec<String> = spec
                .rank_env(rank)
                .into_iter()
                .map(|(k, v)| match k {
                    "MASTER_ADDR" => format!("{k}={master_addr}"),
                    // Each container is its own node: it sees only its own devices.
                    "LOCAL_RANK" => format!("{k}=0"),
                    "LOCAL_WORLD_SIZE" => format!("{k}=1"),
                    // Containers are not replaced (only local ranks are).
                    "RINGLET_REPLACEMENTS" => format!("{k}=0"),
                    _ => format!("{k}={v}"),
                })
                .collect();
            env.extend(passed.iter().cloned());
            if let Some(a) = &store_addr {
                env.push(format!("RINGLET_STORE_ADDR={a}"));
            }
            let cpus = cs.cpus.get(rank).or(cs.cpus.first()).copied();
            let devices = match cs.gpu_map.get(rank).or(cs.gpu_map.first()) {
                Some(ids) if !cs.gpu_map.is_empty() => Some(vec![DeviceRequest {
                    driver: Some("nvidia".into()),
                    device_ids: Some(ids.clone()),
                    capabilities: Some(vec![vec!["gpu".into()]]),
                    ..Default::default()
                }]),
                _ if cs.gpus_per_rank > 0 => Some(vec![DeviceRequest {
                    driver: Some("nvidia".into()),
                    count: Some(cs.gpus_per_rank as i64),
                    capabilities: Some(vec![vec!["gpu".into()]]),
                    ..Default::default()
                }]),
                _ => None,
            };
            let body = ContainerCreateBody {
                image: Some(cs.image.clone()),
                cmd: Some(cmd.clone()),
                env: Some(env),
                labels: Some(self.labels()),
                hostname: single.then(|| format!("rank{rank}")),
                host_config: Some(HostConfig {
                    network_mode: Some(if single {
                        network.clone()
                    } else {
                        "host".into()
                    }),
                    binds: (!cs.volumes.is_empty()).then(|| cs.volumes.clone()),
                    // A service on the Docker host (a stream engine for ringlet-serve replicas,
                    // say) is `host.docker.internal` from the job's network, as on Docker
                    // Desktop; with host networking it is the host's own addresses.
                    extra_hosts: single.then(|| vec!["host.docker.internal:host-gateway".into()]),
                    // A 10 ms CFS period (Docker's --cpus uses 100 ms): a throttled rank then
                    // runs at its share within each step rather than in bursts across steps, so
                    // its measured compute time reflects its quota (what batch balancing reads).
                    cpu_period: cpus.map(|_| CPU_PERIOD_US),
                    cpu_quota: cpus.map(|c| (c * CPU_PERIOD_US as f64) as i64),
                    device_requests: devices,
                    init: Some(true),
                    ..Default::default()
                }),
                ..Default::default()
            };
            let opts = CreateContainerOptions {
                name: Some(name.clone()),
                ..Default::default()
            };
            if let Err(e) = self.engines[engine]
                .create_container(Some(opts), body)
                .await
            {
                return self.fail(engine, &format!("creating rank {rank}'s container"), &e);
            }
            self.placed.push(Placed { rank, engine, name });
        }
        for p in &self.placed {
            if let Some(sig) = signals.take() {
                note!(
                    "got {} while starting the containers",
                    crate::signals::name(sig)
                );
                return Ended::new(Outcome::Signalled(sig));
            }
            if let Err(e) = self.engines[p.engine].start_container(&p.name, None).await {
                let ended = self.fail(
                    p.engine,
                    &format!("starting rank {}'s container", p.rank),
                    &e,
                );
                let why = docker_error(&e);
                // The program is not in the image: as for a local program, 127.
                if why.contains("executable file not found")
                    || why.contains("no such file or directory")
                {
                    return Ended::new(Outcome::LaunchFailed);
                }
                return ended;
            }
        }
        self.supervise(spec, signals, writer).await
    }

    /// Serves the job's rendezvous store on the gateway of the job's network (the host's end of
    /// the bridge, which every container reaches); its address as the ranks see it.
    async fn serve_store(&mut self, network: &str, spec: &JobSpec) -> Result<String, String> {
        let inspected = self.engines[0]
            .inspect_network(network, None)
            .await
            .map_err(|e| docker_error(&e))?;
        let gateway: std::net::IpAddr = inspected
            .ipam
            .and_then(|i| i.config)
            .into_iter()
            .flatten()
            .find_map(|c| c.gateway.and_then(|g| g.parse().ok()))
            .ok_or("the network has no gateway address")?;
        let store = ringlet_store::StoreServer::bind((gateway, 0).into(), spec.token.clone())
            .map_err(|e| e.to_string())?;
        let addr = store.local_addr().to_string();
        self.store = Some(store);
        Ok(addr)
    }

    async fn supervise(&self, spec: &JobSpec, signals: &Signals, writer: &Writer) -> Ended {
        let (tx, mut rx) = mpsc::unbounded_channel::<(usize, Result<i64, String>)>();
        let mut pumps = Vec::new();
        for p in &self.placed {
            let docker = self.engines[p.engine].clone();
            let (name, rank) = (p.name.clone(), p.rank);
            pumps.push(tokio::spawn(pump_logs(
                docker.clone(),
                name.clone(),
                rank,
                writer.clone(),
            )));
            let tx = tx.clone();
            tokio::spawn(async move {
                let opts = WaitContainerOptions {
                    condition: "not-running".into(),
                };
                let mut waits = docker.wait_container(&name, Some(opts));
                let status = match waits.next().await {
                    Some(Ok(r)) => Ok(r.status_code),
                    Some(Err(bollard::errors::Error::DockerContainerWaitError {
                        code, ..
                    })) => Ok(code),
                    Some(Err(e)) => Err(docker_error(&e)),
                    None => Err("the engine ended the wait without a status".into()),
                };
                let _ = tx.send((rank, status));
            });
        }
        drop(tx);
        let mut running = self.placed.len();
        let mut outcome = Outcome::Success;
        // Ranks that failed on their own, before ringrun signalled them: (rank, description,
        // killed by a signal).
        let mut failures: Vec<(usize, String, bool)> = Vec::new();
        let mut stopping: Option<Instant> = None;
        // SIGTERM goes out a moment after the first failure, so that ranks failing at about the
        // same time (the dead one, and the peers that noticed) all count as failures and the
        // one killed from outside can be named as the cause.
        let mut term_at: Option<Instant> = None;
        let mut termed = false;
        // What stops the containers: the user's signal, forwarded, or SIGTERM after a failure.
        let mut stop_signal = "SIGTERM";
        let mut killed: Option<Instant> = None;
        let mut reported = vec![false; self.placed.len()];
        // With --min-ranks: ranks the survivors left out (stopped here, not failures), the
        // newest epoch seen, and whether the job went on without a rank.
        let mut left_out = vec![false; self.placed.len()];
        let (mut epoch_seen, mut went_on) = (0, false);
        while running > 0 {
            if let Some((epoch, members)) = self
                .store
                .as_ref()
                .filter(|_| !termed)
                .and_then(|s| crate::job::newest_members(s, epoch_seen))
            {
                epoch_seen = epoch;
                note!(
                    "the survivors formed epoch {epoch} with ranks {members:?} ({} of {})",
                    members.len(),
                    spec.world_size
                );
                for (r, p) in self.placed.iter().enumerate() {
                    if !reported[r] && !left_out[r] && !members.contains(&r) {
                        note!(
                            "rank {r} (container {}) was left out of epoch {epoch}; stopping it",
                            p.name
                        );
                        left_out[r] = true;
                        went_on = true;
                        let opts = KillContainerOptions {
                            signal: "SIGKILL".into(),
                        };
                        let _ = self.engines[p.engine]
                            .kill_container(&p.name, Some(opts))
                            .await;
                    }
                }
            }
            if let Some(sig) = signals.take() {
                // The user's signal decides the exit status (and prevents a restart), even when
                // the containers are already being stopped after a failure.
                outcome = Outcome::Signalled(sig);
                if stopping.is_none() {
                    note!(
                        "got {}; stopping the containers (SIGKILL after {} s)",
                        crate::signals::name(sig),
                        spec.kill_grace.as_secs_f64()
                    );
                    stopping = Some(Instant::now());
                    term_at = Some(Instant::now());
                    stop_signal = crate::signals::name(sig);
                } else if killed.is_none() {
                    killed = Some(Instant::now());
                    self.signal_all("SIGKILL").await;
                }
            }
            if term_at.is_some_and(|t| !termed && Instant::now() >= t) {
                termed = true;
                stopping = Some(Instant::now());
                self.signal_all(stop_signal).await;
            }
            if let Some(t) = stopping.filter(|_| termed) {
                if killed.is_none() && t.elapsed() >= spec.kill_grace {
                    killed = Some(Instant::now());
                    self.signal_all("SIGKILL").await;
                }
            }
            if killed.is_some_and(|k| k.elapsed() > AFTER_KILL) {
                let silent: Vec<String> = (0..self.placed.len())
                    .filter(|&r| !reported[r])
                    .map(|r| {
                        let p = &self.placed[r];
                        format!("rank {r} ({} on {})", p.name, &self.hosts[p.engine].url)
                    })
                    .collect();
                note!(
                    "no end reported for {} {} s after SIGKILL; removing them",
                    silent.join(", "),
                    AFTER_KILL.as_secs()
                );
                break;
            }
            let next = tokio::time::timeout(Duration::from_millis(50), rx.recv()).await;
            let (rank, status) = match next {
                Ok(Some(x)) => x,
                Ok(None) => break,
                Err(_) => continue,
            };
            running -= 1;
            reported[rank] = true;
            let p = &self.placed[rank];
            let (failed, what, by_signal) = match status {
                Ok(0) => (false, String::new(), false),
                _ if left_out[rank] => (false, String::new(), false),
                Ok(code) => (
                    true,
                    format!(
                        "rank {rank} (container {} on {}) {}",
                        p.name,
                        &self.hosts[p.engine].url,
                        describe_exit(code)
                    ),
                    code > 128,
                ),
                Err(why) => (
                    true,
                    format!("rank {rank} (container {}): {why}", p.name),
                    false,
                ),
            };
            if failed && !termed {
                // The rank's last lines first, then ringrun's verdict on it.
                tokio::time::sleep(Duration::from_millis(50)).await;
                note!("{what}");
                failures.push((rank, what, by_signal));
                let left = (0..self.placed.len())
                    .filter(|&r| !reported[r] && !left_out[r])
                    .count();
                if let Some(k) = spec.min_ranks.filter(|&k| left >= k && term_at.is_none()) {
                    note!(
                        "going on with {left} of {} ranks (--min-ranks {k}): the survivors re-form without it",
                        spec.world_size
                    );
                    went_on = true;
                    continue;
                }
                if let Some(k) = spec.min_ranks.filter(|_| term_at.is_none()) {
                    note!("{left} ranks left, fewer than --min-ranks {k}: stopping the job");
                }
                if term_at.is_none() {
                    if !matches!(outcome, Outcome::Signalled(_)) {
                        outcome = Outcome::RankFailed;
                    }
                    term_at = Some(Instant::now() + crate::local::FAILURE_GRACE);
                }
            }
        }
        let cause = failures
            .iter()
            .find(|f| f.2)
            .or(failures.first())
            .map(|f| f.1.clone());
        // Output still in flight, bounded.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        for p in pumps {
            let _ = tokio::time::timeout_at(deadline, p).await;
        }
        if went_on && outcome == Outcome::Success {
            let finished = (0..self.placed.len())
                .filter(|&r| !left_out[r] && !failures.iter().any(|f| f.0 == r))
                .count();
            note!(
                "the job finished with {finished} of {} ranks (--min-ranks)",
                spec.world_size
            );
        }
        Ended {
            outcome,
            cause,
            replaced: 0,
        }
    }

    async fn signal_all(&self, signal: &str) {
        for p in &self.placed {
            let opts = KillContainerOptions {
                signal: signal.into(),
            };
            // A container that already stopped answers 409: nothing to do.
            let _ = self.engines[p.engine]
                .kill_container(&p.name, Some(opts))
                .await;
        }
    }

    /// Removes every container and network of this attempt: the ones we know, and any other
    /// carrying the job's label (a create that timed out on our side but happened on the engine).
    async fn clean_up(&mut self) {
        for (i, docker) in self.engines.iter().enumerate() {
            let mut names: Vec<String> = self
                .placed
                .iter()
                .filter(|p| p.engine == i)
                .map(|p| p.name.clone())
                .collect();
            let filters = HashMap::from([(
                "label".to_string(),
                vec![format!("{JOB_LABEL}={}", self.job)],
            )]);
            let list = ListContainersOptions {
                all: true,
                filters: Some(filters),
                ..Default::default()
            };
            if let Ok(found) = docker.list_containers(Some(list)).await {
                for c in found {
                    for n in c.names.unwrap_or_default() {
                        let n = n.trim_start_matches('/').to_string();
                        if !names.contains(&n) {
                            names.push(n);
                        }
                    }
                }
            }
            for n in names {
                let opts = RemoveContainerOptions {
                    force: true,
                    v: true,
                    ..Default::default()
                };
                if let Err(e) = docker.remove_container(&n, Some(opts)).await {
                    if !matches!(
                        e,
                        bollard::errors::Error::DockerResponseServerError {
                            status_code: 404,
                            ..
                        }
                    ) {
                        note!(
                            "could not remove container {n} on {}: {}",
                            &self.hosts[i].url,
                            docker_error(&e)
                        );
                    }
                }
            }
        }
        for (i, net) in self.networks.drain(..) {
            if let Err(e) = self.engines[i].remove_network(&net).await {
                if !matches!(
                    e,
                    bollard::errors::Error::DockerResponseServerError {
                        status_code: 404,
                        ..
                    }
                ) {
                    note!(
                        "could not remove network {net} on {}: {}",
                        &self.hosts[i].url,
                        docker_error(&e)
                    );
                }
            }
        }
        // And any network of the job we did not hear back about (a create that timed out here
        // but happened there).
        for docker in &self.engines {
            let filters = HashMap::from([(
                "label".to_string(),
                vec![format!("{JOB_LABEL}={}", self.job)],
            )]);
            let opts = bollard::query_parameters::ListNetworksOptions {
                filters: Some(filters),
            };
            if let Ok(nets) = docker.list_networks(Some(opts)).await {
                for n in nets.into_iter().filter_map(|n| n.name) {
                    let _ = docker.remove_network(&n).await;
                }
            }
        }
    }
}

/// A container's exit status; 128 + n is how its init reports death by signal n.
fn describe_exit(code: i64) -> String {
    match code {
        129..=159 => {
            let sig = (code - 128) as libc::c_int;
            let hint = if sig == libc::SIGKILL {
                ", e.g. docker kill or out of memory"
            } else {
                ""
            };
            format!(
                "was killed by signal {sig} ({}{hint}; exit status {code})",
                crate::signals::name(sig)
            )
        }
        c => format!("exited with status {c}"),
    }
}

/// Relays one container's output with its rank prefix, line by line, to the writer thread. A
/// line longer than `MAX_LINE` goes out in pieces, as local ranks' do; a full queue (our stdout
/// stuck) holds this task back, not the supervision loop.
async fn pump_logs(docker: Docker, name: String, rank: usize, out: Writer) {
    let opts = LogsOptions {
        follow: true,
        stdout: true,
        stderr: true,
        ..Default::default()
    };
    let mut logs = docker.logs(&name, Some(opts));
    let mut partial: [Vec<u8>; 2] = [Vec::new(), Vec::new()];
    let target = |idx: usize| [Target::Stdout, Target::Stderr][idx];
    while let Some(item) = logs.next().await {
        let Ok(chunk) = item else { break };
        let (idx, bytes) = match chunk {
            bollard::container::LogOutput::StdErr { message } => (1, message),
            bollard::container::LogOutput::StdOut { message }
            | bollard::container::LogOutput::Console { message } => (0, message),
            bollard::container::LogOutput::StdIn { .. } => continue,
        };
        let buf = &mut partial[idx];
        buf.extend_from_slice(&bytes);
        loop {
            let end = match buf.iter().position(|&b| b == b'\n') {
                Some(nl) => nl + 1,
                None if buf.len() >= MAX_LINE => MAX_LINE,
                None => break,
            };
            let line: Vec<u8> = buf.drain(..end).collect();
            let _ = out.send((target(idx), prefixed(rank, &line))).await;
        }
    }
    for (idx, rest) in partial.iter().enumerate() {
        if !rest.is_empty() {
            let _ = out.send((target(idx), prefixed(rank, rest))).await;
        }
    }
}

type Line = (Target, Vec<u8>);
type Writer = mpsc::Sender<Line>;

/// Writes relayed lines on a thread of its own: a reader that stops reading our stdout blocks it,
/// never the loop that supervises the containers and answers signals.
fn spawn_writer() -> (Writer, Option<std::thread::JoinHandle<()>>) {
    let (tx, mut rx) = mpsc::channel::<Line>(1024);
    let spawned = std::thread::Builder::new()
        .name("ringrun-out".into())
        .spawn(move || {
            while let Some((target, bytes)) = rx.blocking_recv() {
                let _ = write_whole(target, &bytes);
            }
        });
    match spawned {
        Ok(h) => (tx, Some(h)),
        Err(e) => {
            note!("cannot start the output thread: {e}; container output is dropped");
            (tx, None)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_parse_with_slots() {
        let h = parse_hosts("unix:///var/run/docker.sock:2,tcp://gpu-node-2:2375:4").unwrap();
        assert_eq!(
            h.0,
            vec![
                Endpoint {
                    url: "unix:///var/run/docker.sock".into(),
                    slots: 2
                },
                Endpoint {
                    url: "tcp://gpu-node-2:2375".into(),
                    slots: 4
                }
            ]
        );
        assert!(parse_hosts("unix:///x.sock").is_err());
        assert!(parse_hosts("unix:///x.sock:0").is_err());
        assert_eq!(parse_hosts("ssh://me@h:2").unwrap().0[0].url, "ssh://me@h");
        assert_eq!(
            parse_hosts("https://h:2376:2").unwrap().0[0].url,
            "https://h:2376"
        );
        assert!(parse_hosts("ftp://h:2").is_err());
        assert!(
            parse_hosts("tcp://node:2375").is_err(),
            "port taken for slots"
        );
        assert_eq!(parse_hosts("tcp://node:2375:3").unwrap().0[0].slots, 3);
    }

    #[test]
    fn exits_are_described() {
        assert!(describe_exit(137).contains("SIGKILL"));
        assert_eq!(describe_exit(3), "exited with status 3");
        assert!(describe_exit(130).contains("signal 2"));
    }
}
