//! Reaching a Docker engine safely. Whoever can talk to an engine's API is root on its machine,
//! so ringrun speaks to a remote engine the way the docker CLI does: TLS with a client
//! certificate (`DOCKER_TLS_VERIFY`, `DOCKER_CERT_PATH`), or SSH; plaintext TCP only to this
//! machine's loopback, unless the user says `--insecure-engines`.
//!
//! Certificates: `ca.pem` (the engine's CA), `cert.pem` and `key.pem` (ours), in
//! `$DOCKER_CERT_PATH` (`~/.docker` without it) as the docker CLI reads them, or, for an engine
//! with a folder of its own (docker-machine's convention, for several engines with different
//! CAs), in `$DOCKER_CERT_PATH/HOST`. TLS is used for `https://` engines, for every `tcp://`
//! engine when `DOCKER_TLS_VERIFY` is set (not empty, not `0`), and for a `tcp://` engine that has
//! a certificate folder of its own.

use bollard::{Docker, API_DEFAULT_VERSION};
use std::net::{IpAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};

/// Seconds every request's response must start within (bollard's default is 120 s); the wait
/// and log streams send their headers at once and are not cut by it.
pub const CONTROL_TIMEOUT_SECS: u64 = 30;

/// How ringrun reaches one engine, decided from its URL and the environment before connecting.
#[derive(Debug, PartialEq, Eq)]
pub enum Route {
    Unix(String),
    Ssh(String),
    Tls { url: String, certs: PathBuf },
    Plain(String),
}

/// What the environment says about TLS, read once.
#[derive(Clone, Debug)]
pub struct TlsEnv {
    /// `$DOCKER_CERT_PATH`, else `~/.docker`.
    pub cert_root: Option<PathBuf>,
    /// `DOCKER_TLS_VERIFY` set, not empty, not `0`.
    pub verify: bool,
}

impl TlsEnv {
    pub fn from_env() -> TlsEnv {
        let cert_root = match std::env::var_os("DOCKER_CERT_PATH").filter(|p| !p.is_empty()) {
            Some(p) => Some(PathBuf::from(p)),
            None => std::env::var_os("HOME").map(|h| Path::new(&h).join(".docker")),
        };
        TlsEnv {
            cert_root,
            verify: std::env::var("DOCKER_TLS_VERIFY").is_ok_and(|v| !v.is_empty() && v != "0"),
        }
    }
}

/// Decides how to reach `url`; refuses plaintext TCP to anything but loopback unless `insecure`.
pub fn route(url: &str, insecure: bool, tls: &TlsEnv) -> Result<Route, String> {
    if url.starts_with("unix://") {
        return Ok(Route::Unix(url.to_string()));
    }
    if url.starts_with("ssh://") {
        return Ok(Route::Ssh(url.to_string()));
    }
    let (https, rest) = match url.split_once("://") {
        Some(("https", rest)) => (true, rest),
        Some(("tcp" | "http", rest)) => (false, rest),
        _ => {
            return Err(format!(
                "{url}: an engine URL starts with unix://, tcp://, http://, https:// or ssh://"
            ))
        }
    };
    let hostport = rest.trim_end_matches('/');
    let host = host_of(hostport);
    if host.is_empty() {
        return Err(format!("{url}: no host"));
    }
    let own_folder = tls.cert_root.as_ref().map(|root| root.join(host));
    let own_folder = own_folder.filter(|d| d.is_dir());
    if https || tls.verify || own_folder.is_some() {
        let certs = own_folder
            .or_else(|| tls.cert_root.clone())
            .ok_or_else(|| {
                format!("{url}: no certificate folder: set DOCKER_CERT_PATH (or HOME)")
            })?;
        for f in ["ca.pem", "cert.pem", "key.pem"] {
            if !certs.join(f).is_file() {
                return Err(format!(
                    "{url}: TLS needs {} (the engine's CA, our certificate and key in {})",
                    certs.join(f).display(),
                    certs.display()
                ));
            }
        }
        return Ok(Route::Tls {
            url: format!("tcp://{hostport}"),
            certs,
        });
    }
    if insecure {
        return Ok(Route::Plain(format!("tcp://{hostport}")));
    }
    // Connect to the loopback address the check saw, not to a name that could resolve
    // elsewhere the second time.
    if let Some(ip) = loopback_ip(host) {
        let port = port_of(hostport);
        let ip = match ip {
            IpAddr::V6(v6) => format!("[{v6}]"),
            IpAddr::V4(v4) => v4.to_string(),
        };
        return Ok(Route::Plain(format!("tcp://{ip}{port}")));
    }
    Err(format!(
        "{url} is plaintext and unauthenticated: whoever reaches that port is root on its \
         machine. Use TLS (DOCKER_TLS_VERIFY=1 with ca.pem, cert.pem and key.pem in \
         DOCKER_CERT_PATH or DOCKER_CERT_PATH/{host}), an ssh:// engine, or --insecure-engines"
    ))
}

/// Connects as `route` says (no request is made yet).
pub fn connect(route: &Route) -> Result<Docker, String> {
    let docker = match route {
        Route::Unix(url) => {
            Docker::connect_with_unix(url, CONTROL_TIMEOUT_SECS, API_DEFAULT_VERSION)
        }
        Route::Ssh(url) => {
            Docker::connect_with_ssh(url, CONTROL_TIMEOUT_SECS, API_DEFAULT_VERSION, None)
        }
        Route::Plain(url) => {
            Docker::connect_with_http(url, CONTROL_TIMEOUT_SECS, API_DEFAULT_VERSION)
        }
        Route::Tls { url, certs } => Docker::connect_with_ssl(
            url,
            &certs.join("key.pem"),
            &certs.join("cert.pem"),
            &certs.join("ca.pem"),
            CONTROL_TIMEOUT_SECS,
            API_DEFAULT_VERSION,
        ),
    };
    docker.map_err(|e| e.to_string())
}

/// `route` then `connect`, for the engine named by `url`.
pub fn open(url: &str, insecure: bool) -> Result<Docker, String> {
    connect(&route(url, insecure, &TlsEnv::from_env())?)
}

/// The engine `DOCKER_HOST` names, or the local socket.
pub fn default_url() -> String {
    std::env::var("DOCKER_HOST")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "unix:///var/run/docker.sock".to_string())
}

/// `node`, `10.0.0.2` or `::1` from `node:2376`, `10.0.0.2:2376` or `[::1]:2376`.
fn host_of(hostport: &str) -> &str {
    if let Some(rest) = hostport.strip_prefix('[') {
        return rest.split(']').next().unwrap_or(rest);
    }
    hostport.rsplit_once(':').map_or(hostport, |(h, _)| h)
}

/// `:2376` of `node:2376` (empty without a port).
fn port_of(hostport: &str) -> &str {
    match hostport.rfind(':') {
        Some(i) if !hostport[i..].contains(']') => &hostport[i..],
        _ => "",
    }
}

/// The loopback address `host` names, when every address it names is this machine's loopback.
fn loopback_ip(host: &str) -> Option<IpAddr> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return ip.is_loopback().then_some(ip);
    }
    let addrs: Vec<_> = (host, 0).to_socket_addrs().ok()?.collect();
    let all = !addrs.is_empty() && addrs.iter().all(|a| a.ip().is_loopback());
    all.then(|| addrs[0].ip())
}

/// The host of a remote engine's URL (`tcp://`, `http://`, `https://`, `ssh://[user@]host`), where
/// rank 0's host is reachable when the ranks use host networking.
pub fn remote_host(url: &str) -> Option<&str> {
    let (scheme, rest) = url.split_once("://")?;
    let rest = rest.trim_end_matches('/');
    let hostport = match scheme {
        "tcp" | "http" | "https" => rest,
        "ssh" => rest.rsplit_once('@').map_or(rest, |(_, h)| h),
        _ => return None,
    };
    Some(host_of(hostport)).filter(|h| !h.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hosts_are_read_from_urls() {
        assert_eq!(host_of("node:2376"), "node");
        assert_eq!(host_of("10.0.0.2:2376"), "10.0.0.2");
        assert_eq!(host_of("[::1]:2376"), "::1");
        assert_eq!(host_of("node"), "node");
        assert!(loopback_ip("127.0.0.1").is_some() && loopback_ip("::1").is_some());
        assert!(loopback_ip("localhost").is_some_and(|ip| ip.is_loopback()));
        assert!(loopback_ip("198.18.0.1").is_none());
        assert_eq!(remote_host("tcp://node:2375"), Some("node"));
        assert_eq!(remote_host("https://[fd00::1]:2376"), Some("fd00::1"));
        assert_eq!(remote_host("ssh://me@gpu-3"), Some("gpu-3"));
        assert_eq!(remote_host("ssh://me@gpu-3:2222"), Some("gpu-3"));
        assert_eq!(remote_host("unix:///var/run/docker.sock"), None);
    }

    #[test]
    fn plaintext_to_another_machine_is_refused_and_tls_needs_its_three_files() {
        let dir = std::env::temp_dir().join(format!("ringrun-certs-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("198.18.0.7")).unwrap();
        let mut env = TlsEnv {
            cert_root: Some(dir.clone()),
            verify: false,
        };

        let e = route("tcp://198.18.0.1:2375", false, &env).unwrap_err();
        assert!(e.contains("plaintext and unauthenticated"), "{e}");
        assert!(e.contains("--insecure-engines"), "{e}");
        assert_eq!(
            route("tcp://198.18.0.1:2375", true, &env).unwrap(),
            Route::Plain("tcp://198.18.0.1:2375".into())
        );
        assert_eq!(
            route("tcp://127.0.0.1:2375", false, &env).unwrap(),
            Route::Plain("tcp://127.0.0.1:2375".into())
        );
        // A name is connected to as the loopback address it was checked as.
        assert!(matches!(
            route("tcp://localhost:2375", false, &env).unwrap(),
            Route::Plain(u) if u.ends_with(":2375") && !u.contains("localhost")
        ));
        assert!(route("tcp://:2375", false, &env).is_err());
        assert!(matches!(
            route("ssh://user@node", false, &env).unwrap(),
            Route::Ssh(_)
        ));
        assert!(route("ftp://node:1", false, &env).is_err());

        // An engine with a folder of its own gets TLS, and the folder must be complete.
        let e = route("tcp://198.18.0.7:2376", false, &env).unwrap_err();
        assert!(e.contains("198.18.0.7/ca.pem"), "{e}");
        for f in ["ca.pem", "cert.pem", "key.pem"] {
            std::fs::write(dir.join("198.18.0.7").join(f), "x").unwrap();
        }
        assert_eq!(
            route("tcp://198.18.0.7:2376", false, &env).unwrap(),
            Route::Tls {
                url: "tcp://198.18.0.7:2376".into(),
                certs: dir.join("198.18.0.7"),
            }
        );
        // DOCKER_TLS_VERIFY: TLS everywhere, from the shared folder.
        env.verify = true;
        let e = route("tcp://127.0.0.1:2376", false, &env).unwrap_err();
        assert!(e.contains(&format!("{}/ca.pem", dir.display())), "{e}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
