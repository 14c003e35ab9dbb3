//! Joining a job: the rendezvous store (served by rank 0), our address, the links, and the
//! rank cards that end the join (settings agreed, every rank's address and host known).

use super::{Communicator, Inner, Links, Order, PeersBox};
use crate::algo::HostLayout;
use crate::card;
use crate::config::Config;
use crate::engine::Deadlines;
use ringlet_core::{Error, JobToken, Result};
use ringlet_store::{lookup, StoreClient, StoreServer};
use ringlet_transport::{join, JoinOptions, PeerInfo};
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

impl Communicator {
    /// Joins the job described by the environment (see [`Config::from_env`]); a replacement
    /// (`RINGLET_REPLACEMENT=1`, set by `ringrun --min-ranks --max-restarts`) joins the running
    /// job instead (see [`join_running`](Self::join_running)), and fails if it has ended.
    pub fn from_env() -> Result<Communicator> {
        Communicator::join_from_env()?.ok_or_else(|| {
            Error::Broken("the job finished before this replacement could join it".into())
        })
    }

    /// As [`from_env`](Self::from_env); `None` where this replacement came after the job's
    /// last step (nothing left to do).
    pub fn join_from_env() -> Result<Option<Communicator>> {
        let config = Config::from_env()?;
        if super::grow::is_replacement() {
            return Communicator::join_running(config);
        }
        Communicator::new(config).map(Some)
    }

    /// Joins the job: serves the store (if asked), publishes our ring address, connects the ring
    /// and runs a first barrier, all within `config.timeout`.
    pub fn new(config: Config) -> Result<Communicator> {
        check_config(&config)?;
        let token = effective_token(&config);
        let store_sock = resolve(&config.store_addr, config.timeout)?;
        let store = if config.serve_store && config.world_size > 1 {
            let bind_ip = if store_sock.ip().is_loopback() {
                store_sock.ip()
            } else {
                unspecified_like(store_sock.ip())
            };
            Some(StoreServer::bind(
                SocketAddr::new(bind_ip, store_sock.port()),
                token.clone(),
            )?)
        } else {
            None
        };
        Communicator::join(config, token, store_sock, store)
    }

    /// Connects the ring through the store at `store_sock` (served by `store` when this process
    /// holds it), then runs the first barrier.
    pub(crate) fn join(
        config: Config,
        token: JobToken,
        store_sock: SocketAddr,
        store: Option<StoreServer>,
    ) -> Result<Communicator> {
        let deadline = Instant::now() + config.timeout;
        let deadlines = Deadlines::new(config.timeout);
        let mut layout = HostLayout::single_host(config.world_size);
        let peers: Option<PeersBox> = if config.world_size > 1 {
            // Local choices first: a bad setting fails at once, not after waiting on the store.
            let (advertise, bind_ip) = ring_address(&config, store_sock)?;
            let mut client = StoreClient::connect(&config.store_addr, &token, deadline)?;
            let opts = JoinOptions {
                rank: config.rank,
                world_size: config.world_size,
                comm: config.name.clone(),
                bind_ip,
                advertise_host: advertise.to_string(),
                deadline,
                busy_poll: config.effective_busy_poll(),
                shm: config.shm,
                streams: config.nsocks,
            };
            let mut peers = join(&mut client, &token, &opts)?.expect("more than one rank");
            let ours = card_of(&config, peers.own_info());
            let cards = card::exchange(&mut peers, &ours, deadlines)?;
            layout = layout_of(&cards);
            let infos = cards
                .into_iter()
                .map(|c| PeerInfo {
                    addr: c.addr,
                    shm: c.shm,
                })
                .collect();
            peers.learn_peers(infos)?;
            let local = (0..config.world_size)
                .filter(|&r| peers.uses_shm(r))
                .count();
            tracing::debug!(
                rank = config.rank,
                shared_memory_peers = local,
                hosts = layout.hosts().len(),
                two_level = layout.two_level(),
                "links decided"
            );
            Some(Box::new(peers))
        } else {
            None
        };
        // Every rank has its ring links and knows every address once this returns, so none needs
        // the store any more.
        let rejoin = super::reform::Rejoin::first(&config, &token, store_sock);
        let mut comm = Communicator::assemble(&config, peers, store, layout);
        comm.rejoin = Some(rejoin);
        tracing::debug!(rank = comm.rank, world = comm.world_size, "joined");
        Ok(comm)
    }

    /// A communicator over any transport (in-process links, say) for the job `config` places
    /// it in (only rank, world size and the tuning settings are used). Runs the join's card
    /// exchange, so it returns once every rank has called it, and fails if their settings differ.
    pub fn over(mut peers: PeersBox, config: Config) -> Result<Communicator> {
        check_config(&config)?;
        if (peers.rank(), peers.world_size()) != (config.rank, config.world_size) {
            return Err(Error::InvalidArgument(format!(
                "the transport is rank {} of {}, the config rank {} of {}",
                peers.rank(),
                peers.world_size(),
                config.rank,
                config.world_size
            )));
        }
        let mut layout = HostLayout::single_host(config.world_size);
        let peers = if config.world_size > 1 {
            let info = PeerInfo {
                addr: peers.local().addr.clone(),
                shm: None,
            };
            let ours = card_of(&config, info);
            let cards = card::exchange(peers.as_mut(), &ours, Deadlines::new(config.timeout))?;
            layout = layout_of(&cards);
            Some(peers)
        } else {
            None
        };
        Ok(Communicator::assemble(&config, peers, None, layout))
    }

    fn assemble(
        config: &Config,
        peers: Option<PeersBox>,
        store: Option<StoreServer>,
        layout: HostLayout,
    ) -> Self {
        Communicator {
            rank: config.rank,
            world_size: config.world_size,
            local_rank: config.local_rank,
            inner: Arc::new(Inner {
                links: Mutex::new(Links {
                    peers,
                    // The card exchange was call 1.
                    seq: 1,
                    scratch: Vec::new(),
                    broken: None,
                    running: false,
                }),
                order: Mutex::new(Order::default()),
                turn: Condvar::new(),
                chunk_bytes: config.chunk_bytes,
                small_bytes: config.small_bytes,
                algo: config.algo,
                layout,
                deadlines: Deadlines::new(config.timeout),
            }),
            worker: Mutex::new(None),
            rejoin: None,
            admissions: Mutex::new(None),
            _store: store,
        }
    }

    /// This communicator, as epoch `rejoin.epoch` of its job.
    pub(crate) fn with_rejoin(mut self, rejoin: super::reform::Rejoin) -> Self {
        self.rejoin = Some(rejoin);
        self
    }
}

/// The address peers reach us on, and the one to listen on: from `RINGLET_SOCKET_IFNAME` when
/// set, else the local address that routes to the store. Logs the interface chosen.
fn ring_address(config: &Config, store: SocketAddr) -> Result<(IpAddr, IpAddr)> {
    use ringlet_transport::iface::{interface_addrs, select, IfaceFilter};
    let addrs = interface_addrs()?;
    let (ip, bind) = match &config.socket_ifname {
        Some(spec) => {
            let chosen = select(&IfaceFilter::parse(spec)?, &addrs).ok_or_else(|| {
                let names: std::collections::BTreeSet<&str> = addrs.iter().map(|a| a.name.as_str()).collect();
                Error::Config(format!(
                    "RINGLET_SOCKET_IFNAME={spec:?} matches no interface with a usable address (interfaces: {})",
                    names.into_iter().collect::<Vec<_>>().join(", ")
                ))
            })?;
            (chosen.ip, chosen.ip)
        }
        None => {
            let ip = route_to(store)?;
            (
                ip,
                if ip.is_loopback() {
                    ip
                } else {
                    unspecified_like(ip)
                },
            )
        }
    };
    let name = addrs
        .iter()
        .find(|a| a.ip == ip)
        .map_or("?", |a| a.name.as_str());
    tracing::info!(rank = config.rank, interface = name, %ip, "ring traffic uses this interface");
    Ok((ip, bind))
}

/// The wildcard address of `ip`'s family (listening on `0.0.0.0` does not accept IPv6 peers).
pub(crate) fn unspecified_like(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => IpAddr::from([0u8; 4]),
        IpAddr::V6(_) => IpAddr::from([0u16; 8]),
    }
}

pub(crate) fn check_config(config: &Config) -> Result<()> {
    if config.world_size == 0 || config.rank >= config.world_size {
        return Err(Error::Config(format!(
            "rank {} must be below world size {}",
            config.rank, config.world_size
        )));
    }
    config.check_ranges()
}

fn card_of(config: &Config, info: PeerInfo) -> card::RankCard {
    // Without a host key (no /proc), each rank counts as a host of its own.
    let host = config
        .host_id
        .clone()
        .or_else(ringlet_transport::shm::host_key)
        .unwrap_or_else(|| format!("{}/pid:{}", info.addr, std::process::id()));
    card::RankCard {
        host,
        addr: info.addr,
        chunk_bytes: config.chunk_bytes as u64,
        small_bytes: config.small_bytes as u64,
        algo: config.algo.name().into(),
        shm: info.shm,
    }
}

fn layout_of(cards: &[card::RankCard]) -> HostLayout {
    let labels: Vec<&str> = cards.iter().map(|c| c.host.as_str()).collect();
    HostLayout::from_labels(&labels)
}

pub(crate) fn effective_token(config: &Config) -> JobToken {
    config.token.clone().unwrap_or_else(|| {
        tracing::warn!(
            "{} is not set: ring connections are not authenticated (use ringrun, or export a shared secret)",
            JobToken::ENV
        );
        JobToken::new(format!("ringlet-unauthenticated/{}", config.store_addr))
    })
}

/// The store's address, looked up again until it resolves or `timeout` is over: under
/// Kubernetes, rank 0's pod gets its DNS name (`<job>-0.<service>`) only once it runs, after the
/// other pods may have started, and rank 0 itself may start before its own name is published.
pub(crate) fn resolve(addr: &str, timeout: Duration) -> Result<SocketAddr> {
    let started = Instant::now();
    let deadline = started + timeout;
    let mut backoff = Duration::from_millis(50);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let why = match lookup(addr, left.max(Duration::from_millis(1))) {
            Ok(found) => match found.into_iter().next() {
                Some(sock) => return Ok(sock),
                None => "it resolves to no address".to_string(),
            },
            Err(e) if e.kind() == std::io::ErrorKind::InvalidInput => {
                return Err(Error::Config(format!(
                    "cannot resolve the store address {addr}: {e}"
                )))
            }
            Err(e) => e.to_string(),
        };
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::Deadline {
                waiting_for: format!("the store address {addr} to resolve (last lookup: {why})"),
                after: started.elapsed(),
            });
        }
        if backoff == Duration::from_millis(50) {
            tracing::info!("the store address {addr} does not resolve yet ({why}): looking it up again until the deadline");
        }
        std::thread::sleep(backoff.min(left));
        backoff = (backoff * 2).min(Duration::from_secs(1));
    }
}

/// The local address this host uses to reach `dest`: what our peers, who reach the same store,
/// can most likely reach us on. (A UDP connect only consults the routing table.)
fn route_to(dest: SocketAddr) -> Result<IpAddr> {
    let any: SocketAddr = if dest.is_ipv6() {
        "[::]:0"
    } else {
        "0.0.0.0:0"
    }
    .parse()
    .expect("literal address");
    let probe = UdpSocket::bind(any)
        .and_then(|s| s.connect(dest).map(|_| s))
        .and_then(|s| s.local_addr())
        .map_err(|e| Error::io(format!("finding the local address that reaches {dest}"), e))?;
    Ok(probe.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_store_name_that_never_resolves_fails_at_the_deadline_naming_it() {
        assert_eq!(
            resolve("127.0.0.1:29500", Duration::from_millis(1)).unwrap(),
            "127.0.0.1:29500".parse().unwrap()
        );
        let started = Instant::now();
        // `.invalid` never resolves (RFC 2606): it is looked up again until the deadline.
        let e = resolve(
            "rank-0.no-such-service.invalid:29500",
            Duration::from_millis(400),
        )
        .unwrap_err();
        assert!(matches!(e, Error::Deadline { .. }), "{e:?}");
        assert!(
            e.to_string()
                .contains("rank-0.no-such-service.invalid:29500"),
            "{e}"
        );
        assert!(started.elapsed() >= Duration::from_millis(400));
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "{:?}",
            started.elapsed()
        );
        let e = resolve("no-port", Duration::from_secs(5)).unwrap_err();
        assert!(matches!(e, Error::Config(_)), "{e:?}");
    }
}
