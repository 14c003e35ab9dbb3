//! `ringrun`, the command line: parses the flags, settles what every rank must agree on (world
//! size, master address and port, job token, timeout) into a [`JobSpec`], and hands it to a
//! backend that starts the ranks — [`local`] (processes on this machine) or [`docker`]
//! (containers on one or more Docker engines) — again after a failure with `--max-restarts`.
//!
//! Modules: [`job`] (the job and its environment contract, exit statuses), [`local`] (spawning and
//! supervising processes), [`docker`] (the same for containers), [`image`] (`ringrun image
//! build`), [`k8s`] (`ringrun k8s train`: Kubernetes manifests), [`output`] (relaying output with a rank prefix), [`signals`] (catching, forwarding and
//! naming signals).

// First, so that its `note!` macro is visible in the others.
#[macro_use]
mod output;
mod docker;
mod engine;
mod image;
mod job;
mod k8s;
mod local;
mod signals;

use clap::Parser;
use job::{JobSpec, Outcome};
use ringlet_store::StoreServer;
use std::ffi::OsString;
use std::process::ExitCode;
use std::time::Duration;

const AFTER_HELP: &str = "\
Environment of each rank (everything else is inherited from ringrun):
  RANK, LOCAL_RANK        the rank, 0..N-1 (one node, so both are equal)
  WORLD_SIZE, LOCAL_WORLD_SIZE
                          N
  MASTER_ADDR, MASTER_PORT
                          the torchrun contract: a free port for the program's
                          own use (with --image, rank 0 hosts the rendezvous
                          store there)
  RINGLET_STORE_ADDR      local ranks: the rendezvous store ringrun serves on
                          127.0.0.1 for the attempt (a fresh one per restart);
                          Ringlet's ranks find each other through it and none
                          serves its own, so it outlives any rank
  RINGLET_JOB_TOKEN       the secret every connection of the job must prove it
                          holds: ringrun's own RINGLET_JOB_TOKEN if set and not
                          empty, else 64 random hex digits made for this job
  RINGLET_TIMEOUT         the --timeout value, only when --timeout is given
  RINGLET_RESTART         how many times --max-restarts restarted the job (0 at first)
Standard input of every rank is /dev/null. With --image, each container is its own
node (LOCAL_RANK=0, LOCAL_WORLD_SIZE=1) and inherits only ringrun's RINGLET_*,
RUST_LOG and RUST_BACKTRACE.

Output:
  Each line a rank writes to stdout (stderr) is written whole to ringrun's
  stdout (stderr) as \"[RANK] line\"; a last line without newline gets one.

Signals:
  Each rank runs in its own process group; ringrun signals the whole group, so
  whatever a rank starts is stopped with it. SIGINT or SIGTERM sent to ringrun is
  forwarded to every rank; ranks still running --kill-grace seconds later are
  SIGKILLed, and a second SIGINT/SIGTERM kills them at once. Process ranks are
  SIGKILLed by the kernel if ringrun itself dies; containers are not (the engine
  owns them): after a SIGKILL of ringrun remove them with
  docker rm -f $(docker ps -aq --filter label=ringlet.job)

Failure:
  When a rank exits non-zero or is killed by a signal, ringrun reports it, gives
  the other ranks 0.5 s to end on their own (a rank failing at the same time
  prints its own error), then sends SIGTERM to those still running (SIGKILL after
  --kill-grace), waits for all of them and exits 1. The first failure is the one
  reported as the cause.

Restarts (--max-restarts K):
  A failed attempt (as above) is followed by a new one, up to K times: every
  rank is started again with a new rendezvous. The exit status is the last
  attempt's.

Exit status:
  0       every rank exited 0
  1       a rank failed (in the last attempt), or ringrun itself could not set up the job
  2       invalid command line
  127     PROGRAM not found or not executable (no rank is left running)
  128+S   ringrun received signal S and stopped the ranks (130: SIGINT,
          143: SIGTERM)";

/// Start N ranks of a Ringlet program: local processes, or containers on Docker engines
/// (torchrun-style launcher).
///
/// Starts N processes (or, with --image, containers) of PROGRAM, each told its place in the job
/// through the environment, relays their output with a "[RANK] " prefix, and supervises them:
/// when one rank fails the others are stopped (and, with --max-restarts, all are started again),
/// and no process or container is left behind. `ringrun image build --tag T BINARY...` makes a
/// minimal image from local binaries (and a model version); `ringrun k8s train` and `serve`
/// render the Kubernetes manifests of a training job and of a scoring service instead.
#[derive(Debug, Parser)]
#[command(
    name = "ringrun",
    version,
    override_usage = "ringrun -n <N> [OPTIONS] -- <PROGRAM> [ARGS]...\n       ringrun image build --tag <T> [--model <CHECKPOINT>] <BINARY>...\n       ringrun k8s train|serve --name <NAME> --image <IMAGE> [OPTIONS] ...",
    after_long_help = AFTER_HELP
)]
struct Cli {
    /// Number of ranks to start (WORLD_SIZE), at least 1.
    #[arg(
        short = 'n',
        long = "nproc",
        alias = "nproc-per-node",
        value_name = "N",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    nproc: u32,

    /// MASTER_ADDR: with --image, the address of the rendezvous store that rank 0 hosts and the
    /// other ranks connect to (local ranks use the store ringrun serves, RINGLET_STORE_ADDR, and
    /// leave MASTER_ADDR:MASTER_PORT to the program). Default: 127.0.0.1; with several --hosts engines, the host of the first
    /// tcp:// engine (127.0.0.1 when all are local). With --image on one engine it is always rank
    /// 0's container, on a network made for the job.
    #[arg(long, value_name = "ADDR")]
    master_addr: Option<String>,

    /// MASTER_PORT (with --image, the port of rank 0's rendezvous store). Default: a port free on
    /// 127.0.0.1 at launch, found by binding port 0 and releasing it.
    #[arg(
        long,
        value_name = "PORT",
        value_parser = clap::value_parser!(u16).range(1..)
    )]
    master_port: Option<u16>,

    /// The ranks' deadline in seconds (fractions allowed) for rendezvous and for each
    /// collective, exported as RINGLET_TIMEOUT. Without it the ranks use RINGLET_TIMEOUT as
    /// inherited from ringrun's environment, else their default (300 s).
    #[arg(long, value_name = "SECONDS", value_parser = parse_timeout)]
    timeout: Option<f64>,

    /// Seconds a rank has to exit after ringrun sends it SIGTERM (or forwards SIGINT) before it
    /// is SIGKILLed (fractions allowed, 0 kills at once).
    #[arg(long, value_name = "SECONDS", default_value = "5", value_parser = parse_grace)]
    kill_grace: Duration,

    /// Pin ranks to CPUs. `auto`: when ringrun may use at least N CPUs, rank i gets the i-th
    /// block of CPUs/N of them (ranks that poll their sockets otherwise sometimes share one core
    /// while another idles: measured 12.5 µs against 6.3 µs per small all-reduce); `core`: one CPU
    /// each, wrapping round; `none`: leave it to the scheduler (e.g. for several jobs at once).
    #[arg(long, value_enum, value_name = "HOW", default_value = "auto")]
    bind_to: job::BindTo,

    /// When a rank fails (exits non-zero, is killed, or reports a peer that died or hung), stop
    /// every rank and start them all again, up to K times: same world size, a new rendezvous
    /// (fresh MASTER_PORT unless --master-port is given), RINGLET_RESTART set to the restart's
    /// number. A program that checkpoints (ringlet-train --checkpoint-dir) resumes from its
    /// newest committed checkpoint. Each restart is logged with its cause. With --min-ranks,
    /// replacements of single local ranks come out of the same K.
    #[arg(long, value_name = "K", default_value_t = 0)]
    max_restarts: u32,

    /// Keep going when a rank fails while at least K ranks still run (local ranks, or
    /// containers on one engine): the others are not stopped, and RINGLET_MIN_RANKS=K tells them
    /// to re-form without the failed rank (ringlet-train and ringlet-burn's fit redo the
    /// interrupted step over the survivors; a program of its own calls Communicator::shrink).
    /// Ranks the survivors leave out (a hung one) are stopped. With --max-restarts, a failed
    /// local rank is replaced: the replacement joins at the next step boundary and takes the
    /// state from the others. Below K, the job stops as without it.
    #[arg(
        long,
        value_name = "K",
        value_parser = clap::value_parser!(u32).range(1..)
    )]
    min_ranks: Option<u32>,

    /// Run each rank as a container of IMAGE through the Docker engine API (DOCKER_HOST
    /// honoured) instead of a local process; PROGRAM is resolved inside the image. Containers
    /// share a network made for the job, where `host.docker.internal` is the Docker host (a
    /// stream engine for ringlet-serve replicas, say); every container and the network are
    /// removed at the end, whatever happens. `ringrun image build --tag T BINARY...` makes such
    /// an image.
    #[arg(long, value_name = "IMAGE")]
    image: Option<String>,

    /// Docker engines and their slot counts, ranks placed in order:
    /// `unix:///var/run/docker.sock:2,tcp://gpu-node-2:2376:4,ssh://user@gpu-node-3:4`. With
    /// more than one engine, containers use host networking (the hosts must reach each other).
    /// A tcp:// engine is reached with TLS and our client certificate (ca.pem, cert.pem, key.pem)
    /// when DOCKER_TLS_VERIFY is set, from DOCKER_CERT_PATH (else ~/.docker) as the docker CLI
    /// reads them, or from DOCKER_CERT_PATH/HOST when that folder exists. ssh://
    /// engines go through the ssh client. Plaintext tcp:// is refused except to loopback.
    #[arg(long, value_name = "ENGINES", requires = "image", value_parser = docker::parse_hosts)]
    hosts: Option<docker::Hosts>,

    /// Allow plaintext tcp:// engines on other machines (unauthenticated Docker API: whoever
    /// reaches that port is root on its machine).
    #[arg(long)]
    insecure_engines: bool,

    /// Bind mount HOST:CONTAINER[:ro] in every container (e.g. the shared checkpoint directory,
    /// at the same path everywhere); repeatable.
    #[arg(
        long = "volume",
        short = 'v',
        value_name = "HOST:CONTAINER",
        requires = "image"
    )]
    volumes: Vec<String>,

    /// CPU cores per container (at least 0.1): one value for all, or one per rank (`0.5,1,1.5`).
    #[arg(long, value_name = "CORES", value_delimiter = ',', requires = "image")]
    cpus: Vec<f64>,

    /// GPUs per container, from the engine's NVIDIA runtime.
    #[arg(long, value_name = "N", default_value_t = 0, requires = "image")]
    gpus_per_rank: u32,

    /// Explicit GPUs per rank, ranks separated by ';', a rank's devices by ',': `0;1;2,3`
    /// (one entry: the same for all). Overrides --gpus-per-rank.
    #[arg(long, value_name = "MAP", requires = "image")]
    gpus: Option<String>,

    /// The program every rank runs, then its arguments. A name without '/' is looked up in
    /// PATH, then next to the ringrun executable (so binaries built alongside it run without
    /// being installed).
    #[arg(
        value_name = "PROGRAM",
        required = true,
        num_args = 1..,
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    command: Vec<OsString>,
}

/// Beyond this a "timeout" is a typo, and Duration/Instant arithmetic could overflow.
const MAX_SECONDS: f64 = 1e9;

fn parse_seconds(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .trim()
        .parse()
        .map_err(|_| format!("`{s}` is not a number of seconds"))?;
    if !v.is_finite() || !(0.0..=MAX_SECONDS).contains(&v) {
        return Err(format!("`{s}` is not between 0 and {MAX_SECONDS} seconds"));
    }
    Ok(v)
}

fn parse_timeout(s: &str) -> Result<f64, String> {
    match parse_seconds(s)? {
        v if v > 0.0 && v <= ringlet_core::MAX_TIMEOUT_SECS => Ok(v),
        _ => Err(format!(
            "the timeout must be more than 0 seconds, at most {} (a year)",
            ringlet_core::MAX_TIMEOUT_SECS
        )),
    }
}

fn parse_grace(s: &str) -> Result<Duration, String> {
    Ok(Duration::from_secs_f64(parse_seconds(s)?))
}

fn main() -> ExitCode {
    // The store ringrun serves logs through tracing (refused strangers, once per interval).
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("RINGLET_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(false)
        .init();
    let args: Vec<OsString> = std::env::args_os().collect();
    if args.get(1).is_some_and(|a| a == "image") {
        return image_command(&args[2..]);
    }
    if args.get(1).is_some_and(|a| a == "k8s") {
        return ExitCode::from(k8s::command(&args[2..]));
    }
    ExitCode::from(run(Cli::parse()).exit_status())
}

/// Build a minimal image for `ringrun --image` from local binaries: each goes to /usr/local/bin,
/// the shared libraries its ELF needs to /usr/local/lib (the interpreter at its own path); FROM
/// scratch, nothing pulled, built by the engine DOCKER_HOST names.
#[derive(Debug, Parser)]
#[command(name = "ringrun image build", version)]
struct ImageBuild {
    /// The image's name (and tag).
    #[arg(long, short = 't')]
    tag: String,
    /// Allow DOCKER_HOST to be a plaintext tcp:// engine on another machine (see ringrun --help).
    #[arg(long)]
    insecure_engines: bool,
    /// Bake this model version (a ringlet-train checkpoint, `DIR/step-N`, verified first) into
    /// the image at /models/step-N, with RINGLET_SERVE_PIN pointing there, the label
    /// ringlet.model.version=step-N@<hash>, and a second tag <repository>:step-N-<hash>.
    #[arg(long, value_name = "CHECKPOINT")]
    model: Option<std::path::PathBuf>,
    /// Binaries to put in /usr/local/bin, with the shared libraries they link.
    #[arg(required = true)]
    binaries: Vec<std::path::PathBuf>,
}

fn image_command(args: &[OsString]) -> ExitCode {
    if args.first().is_none_or(|a| a != "build") {
        note!("usage: ringrun image build --tag T BINARY...");
        return ExitCode::from(2);
    }
    let cli = ImageBuild::parse_from(
        std::iter::once(OsString::from("ringrun image build")).chain(args[1..].iter().cloned()),
    );
    let model = match cli.model.as_deref().map(image::Baked::verify).transpose() {
        Ok(m) => m,
        Err(e) => {
            note!("{e}");
            return ExitCode::from(1);
        }
    };
    match image::build(
        &cli.tag,
        &cli.binaries,
        model.as_ref(),
        cli.insecure_engines,
    ) {
        Ok(tags) => {
            let with = model
                .map(|m| format!(" with model {}", m.version))
                .unwrap_or_default();
            note!("built image {}{with}", tags.join(", "));
            ExitCode::SUCCESS
        }
        Err(e) => {
            note!("{e}");
            ExitCode::from(1)
        }
    }
}

fn run(cli: Cli) -> Outcome {
    // First, so that a signal arriving while ranks start is not lost.
    let signals = match signals::Signals::install() {
        Ok(s) => s,
        Err(e) => {
            note!("cannot install signal handlers: {e}");
            return Outcome::Error;
        }
    };
    let fixed_port = cli.master_port;
    let n = cli.nproc as usize;
    // The kernel refuses quotas under 1 ms per period; containers get a 10 ms period.
    if let Some(bad) = cli.cpus.iter().find(|c| !(c.is_finite() && **c >= 0.1)) {
        note!("--cpus {bad}: each value must be at least 0.1 cores");
        return Outcome::Usage;
    }
    if !(cli.cpus.len() <= 1 || cli.cpus.len() == n) {
        note!(
            "--cpus has {} values for {n} ranks: give one, or one per rank",
            cli.cpus.len()
        );
        return Outcome::Usage;
    }
    if let Some(k) = cli.min_ranks {
        if k as usize > n {
            note!("--min-ranks {k} is more than the {n} ranks of the job");
            return Outcome::Usage;
        }
        if cli.image.is_some() && cli.hosts.as_ref().is_some_and(|h| h.0.len() > 1) {
            note!("--min-ranks with containers needs one engine (ringrun serves the store on its job network)");
            return Outcome::Usage;
        }
    }
    if let Some(hosts) = &cli.hosts {
        let slots: usize = hosts.0.iter().map(|h| h.slots).sum();
        if slots < n {
            note!("--hosts offers {slots} slots for {n} ranks");
            return Outcome::Usage;
        }
    }
    // An inherited RINGLET_TIMEOUT reaches every rank, which would each refuse it: say so once.
    if cli.timeout.is_none() {
        if let Some(v) = std::env::var("RINGLET_TIMEOUT")
            .ok()
            .filter(|v| !v.trim().is_empty())
        {
            if let Err(e) = parse_timeout(v.trim()) {
                note!("RINGLET_TIMEOUT={v}: {e} (it is passed to every rank)");
                return Outcome::Usage;
            }
        }
    }
    // How each engine is reached is decided before anything starts: plaintext to another
    // machine without --insecure-engines, or TLS with a certificate missing, is a usage error.
    if cli.image.is_some() {
        let tls = engine::TlsEnv::from_env();
        let urls: Vec<String> = match &cli.hosts {
            Some(h) => h.0.iter().map(|e| e.url.clone()).collect(),
            None => vec![engine::default_url()],
        };
        for url in urls {
            if let Err(e) = engine::route(&url, cli.insecure_engines, &tls) {
                note!("docker ({url}): {e}");
                return Outcome::Usage;
            }
        }
    }
    if let Some(map) = &cli.gpus {
        let entries = map.split(';').count();
        if !(entries == 1 || entries == n) || map.split(';').any(|e| e.trim().is_empty()) {
            note!("--gpus {map}: give one device list, or one per rank, separated by ';'");
            return Outcome::Usage;
        }
    }
    let containers = cli.image.map(|image| docker::ContainerSpec {
        image,
        hosts: cli.hosts.map(|h| h.0).unwrap_or_default(),
        volumes: cli.volumes,
        cpus: cli.cpus,
        gpus_per_rank: cli.gpus_per_rank,
        master_addr: cli.master_addr.clone(),
        insecure_engines: cli.insecure_engines,
        gpu_map: cli
            .gpus
            .map(|m| {
                m.split(';')
                    .map(|r| r.split(',').map(|d| d.trim().to_string()).collect())
                    .collect()
            })
            .unwrap_or_default(),
    });
    let mut command = cli.command.into_iter();
    let program = command.next().expect("clap requires PROGRAM");
    let mut spec = JobSpec {
        world_size: cli.nproc as usize,
        master_addr: cli.master_addr.unwrap_or_else(|| "127.0.0.1".into()),
        master_port: 0,
        store_addr: None,
        token: job::job_token(),
        // f64's Display never uses exponent notation, so any rank can parse it back.
        timeout: cli.timeout.map(|t| t.to_string()),
        kill_grace: cli.kill_grace,
        bind_to: cli.bind_to,
        program,
        args: command.collect(),
        restart: 0,
        min_ranks: cli.min_ranks.map(|k| k as usize),
        replacements: 0,
    };
    let started = std::time::Instant::now();
    loop {
        spec.master_port = match fixed_port {
            Some(p) => p,
            None => match job::free_port() {
                Ok(p) => p,
                Err(e) => {
                    note!("cannot find a free port for MASTER_PORT: {e}");
                    return Outcome::Error;
                }
            },
        };
        spec.replacements = cli.max_restarts.saturating_sub(spec.restart);
        let ended = match &containers {
            Some(cs) => docker::run(&spec, cs, &signals),
            None => {
                // Local ranks find each other through a store ringrun serves for the attempt,
                // so it outlives any rank (rank 0 included), and MASTER_PORT stays free for
                // the program's own use.
                let store = match StoreServer::bind(
                    (std::net::Ipv4Addr::LOCALHOST, 0).into(),
                    spec.token.clone(),
                ) {
                    Ok(s) => s,
                    Err(e) => {
                        note!("cannot serve the rendezvous store: {e}");
                        return Outcome::Error;
                    }
                };
                spec.store_addr = Some(store.local_addr().to_string());
                let ended = local::run(&spec, &signals, Some(&store));
                drop(store);
                ended
            }
        };
        // Replacements (--min-ranks) come out of the same allowance as restarts.
        spec.restart += ended.replaced;
        if ended.outcome != Outcome::RankFailed || spec.restart >= cli.max_restarts {
            if spec.restart > 0 {
                note!(
                    "job ended after {} restart(s), {:.1} s in all",
                    spec.restart,
                    started.elapsed().as_secs_f64()
                );
            }
            return ended.outcome;
        }
        // A Ctrl-C or SIGTERM that came while the failed attempt was being cleaned up.
        if let Some(sig) = signals.take() {
            note!("got {}; not restarting", signals::name(sig));
            return Outcome::Signalled(sig);
        }
        spec.restart += 1;
        note!(
            "restart {}/{} at {:.1} s: {}; starting all {} ranks again",
            spec.restart,
            cli.max_restarts,
            started.elapsed().as_secs_f64(),
            ended.cause.as_deref().unwrap_or("a rank failed"),
            spec.world_size
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn program_args_may_look_like_flags() {
        let cli = Cli::try_parse_from(["ringrun", "-n", "2", "--", "prog", "-n", "--x"]).unwrap();
        assert_eq!(cli.nproc, 2);
        assert_eq!(cli.command, ["prog", "-n", "--x"]);
        let cli = Cli::try_parse_from(["ringrun", "-n", "2", "prog", "--timeout", "3"]).unwrap();
        assert_eq!(cli.timeout, None);
        assert_eq!(cli.command, ["prog", "--timeout", "3"]);
    }

    #[test]
    fn seconds_are_validated() {
        assert_eq!(parse_timeout("2.5"), Ok(2.5));
        assert!(parse_timeout("0").is_err());
        assert!(parse_timeout("-1").is_err());
        assert!(parse_timeout("nan").is_err());
        assert_eq!(parse_grace("0"), Ok(Duration::ZERO));
        assert_eq!(parse_grace("0.5"), Ok(Duration::from_millis(500)));
        assert!(Cli::try_parse_from(["ringrun", "-n", "0", "--", "p"]).is_err());
        assert!(Cli::try_parse_from(["ringrun", "-n", "1"]).is_err());
    }

    #[test]
    fn help_states_the_ranks_default_timeout() {
        // The --timeout help text quotes this number.
        assert_eq!(ringlet_core::DEFAULT_TIMEOUT, Duration::from_secs(300));
    }
}
