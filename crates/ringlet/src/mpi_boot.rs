//! Joining a job that `mpirun` (or `srun --mpi`, or any MPI launcher) started, with the `mpi`
//! feature: rank and size come from `MPI_COMM_WORLD`, the local rank from a shared-memory split,
//! and rank 0 broadcasts over MPI the address of the store it serves and the job token. So no
//! `MASTER_ADDR`, port or secret needs to be exported; Ringlet's own variables (`RINGLET_*`)
//! still apply, and `MASTER_ADDR` / `MASTER_PORT`, when set, still choose where the store listens.
//!
//! MPI carries only this bootstrap: the collectives run on Ringlet's own ring.

use crate::comm::{check_config, resolve, unspecified_like, Communicator};
use crate::config::{join_host_port, Config};
use mpi::collective::Root;
use mpi::topology::Communicator as MpiCommunicator;
use ringlet_core::{Error, JobToken, Result};
use ringlet_store::StoreServer;
use ringlet_transport::iface::{interface_addrs, select, IfaceFilter};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};

/// Interfaces rank 0 does not serve the store on when nothing else says where: NCCL's default
/// exclusions (containers' bridges and loopback are not reachable from other hosts).
const DEFAULT_EXCLUDED: &str = "^lo,docker,virbr,veth";

/// Whether this process was started by an MPI launcher (Open MPI, PMIx, MPICH/Hydra), judging by
/// the variables launchers set. `RANK` (torchrun, ringrun) wins, as in [`crate::bootstrap`].
pub fn launched_by_mpi() -> bool {
    let has = |k: &str| std::env::var_os(k).is_some_and(|v| !v.is_empty());
    !has("RANK") && (has("OMPI_COMM_WORLD_SIZE") || has("PMIX_RANK") || has("PMI_SIZE"))
}

impl Communicator {
    /// Joins the job whose ranks are the members of `world` (usually `universe.world()`).
    /// Every member must call this at the same point: it is collective over `world`.
    pub fn from_mpi<C: MpiCommunicator>(world: &C) -> Result<Communicator> {
        let env: HashMap<String, String> = std::env::vars().collect();
        let rank = world.rank() as usize;
        let world_size = world.size() as usize;
        let node = world.split_shared(world.rank());
        let mut config = Config::new(rank, world_size, String::new());
        config.local_rank = node.rank() as usize;
        config.local_world_size = node.size() as usize;
        config.serve_store = false;
        config.read_settings(&env)?;
        check_config(&config)?;

        // Rank 0 decides and says it over MPI; a failure there must reach every rank, so the
        // broadcast carries either the address or the error text.
        let mut store = None;
        let mut message = String::new();
        let mut secret = String::new();
        if rank == 0 {
            // Everyone uses rank 0's token: the caller's, or a fresh one, which MPI hands out.
            let token = config.token.clone().unwrap_or_else(JobToken::generate);
            secret = token.to_env_value();
            match serve_store(&config, &env, token) {
                Ok((server, addr)) => {
                    message = format!("ok {addr}");
                    store = Some(server);
                }
                Err(e) => message = format!("error {e}"),
            }
        }
        let message = broadcast_string(world, message);
        let token = JobToken::new(broadcast_string(world, secret));
        let addr = match message.split_once(' ') {
            Some(("ok", addr)) => addr.to_string(),
            Some(("error", why)) => {
                return Err(Error::Config(format!(
                    "rank 0 could not serve the rendezvous store: {why}"
                )))
            }
            _ => {
                return Err(Error::Config(format!(
                    "unexpected bootstrap message from rank 0 over MPI: {message:?}"
                )))
            }
        };
        tracing::info!(rank, world_size, store = %addr, "bootstrapped over MPI");
        let store_sock = resolve(&addr, config.timeout)?;
        config.store_addr = addr;
        Communicator::join(config, token, store_sock, store)
    }
}

/// Rank 0: binds the store where the other ranks can reach it, returning it and its
/// advertised `host:port`.
fn serve_store(
    config: &Config,
    env: &HashMap<String, String>,
    token: JobToken,
) -> Result<(StoreServer, String)> {
    let port: u16 = match env.get("MASTER_PORT").filter(|p| !p.trim().is_empty()) {
        Some(p) => p
            .trim()
            .parse()
            .map_err(|_| Error::Config(format!("MASTER_PORT={p:?} is not valid")))?,
        None => 0,
    };
    let host: IpAddr = if let Some(host) = env.get("MASTER_ADDR").filter(|h| !h.trim().is_empty()) {
        resolve(&join_host_port(host.trim(), port), config.timeout)?.ip()
    } else if config.local_world_size == config.world_size {
        IpAddr::from([127, 0, 0, 1])
    } else {
        let spec = config.socket_ifname.as_deref().unwrap_or(DEFAULT_EXCLUDED);
        let addrs = interface_addrs()?;
        select(&IfaceFilter::parse(spec)?, &addrs)
            .ok_or_else(|| {
                Error::Config(format!(
                    "no interface matches {spec:?} to serve the store on; set RINGLET_SOCKET_IFNAME or MASTER_ADDR"
                ))
            })?
            .ip
    };
    let bind_ip = if host.is_loopback() {
        host
    } else {
        unspecified_like(host)
    };
    let server = StoreServer::bind(SocketAddr::new(bind_ip, port), token)?;
    let advertised = join_host_port(&host.to_string(), server.local_addr().port());
    Ok((server, advertised))
}

/// Rank 0's `text`, on every rank.
fn broadcast_string<C: MpiCommunicator>(world: &C, text: String) -> String {
    let root = world.process_at_rank(0);
    let mut len = text.len() as u64;
    root.broadcast_into(&mut len);
    // Addresses, tokens and error texts: anything longer is not from a well-behaved rank 0.
    let len = len.min(64 << 10);
    let mut bytes = text.into_bytes();
    bytes.resize(len as usize, 0);
    root.broadcast_into(&mut bytes[..]);
    String::from_utf8_lossy(&bytes).into_owned()
}
