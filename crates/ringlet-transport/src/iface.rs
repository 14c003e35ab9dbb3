//! Choosing the network interface a rank listens on and advertises, with NCCL's and Gloo's
//! `*_SOCKET_IFNAME` syntax (`RINGLET_SOCKET_IFNAME`):
//!
//! - `eth0,ib` — interfaces whose names start with `eth0` or `ib`;
//! - `^docker,lo` — any interface except those starting with `docker` or `lo`;
//! - `=eth0` — exactly `eth0` (`^=` excludes exact names).
//!
//! Interfaces are tried in the order the system lists them; IPv4 addresses before IPv6, and
//! link-local IPv6 addresses are skipped (they need a scope to be reachable).

use ringlet_core::{Error, Result};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// A parsed `RINGLET_SOCKET_IFNAME`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IfaceFilter {
    exclude: bool,
    exact: bool,
    names: Vec<String>,
}

impl IfaceFilter {
    pub fn parse(spec: &str) -> Result<IfaceFilter> {
        let mut rest = spec.trim();
        let exclude = rest.starts_with('^');
        if exclude {
            rest = &rest[1..];
        }
        let exact = rest.starts_with('=');
        if exact {
            rest = &rest[1..];
        }
        let names: Vec<String> = rest
            .split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect();
        if names.is_empty() {
            return Err(Error::Config(format!(
                "RINGLET_SOCKET_IFNAME={spec:?} names no interface"
            )));
        }
        Ok(IfaceFilter {
            exclude,
            exact,
            names,
        })
    }

    pub fn accepts(&self, iface: &str) -> bool {
        let hit = self.names.iter().any(|n| {
            if self.exact {
                iface == n
            } else {
                iface.starts_with(n.as_str())
            }
        });
        hit != self.exclude
    }
}

/// One address of one interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IfaceAddr {
    pub name: String,
    pub ip: IpAddr,
}

/// The interfaces' addresses, in the system's order.
pub fn interface_addrs() -> Result<Vec<IfaceAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list it allocates, which we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(Error::io(
            "listing network interfaces",
            std::io::Error::last_os_error(),
        ));
    }
    let mut out = Vec::new();
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned and has not been freed; its
        // name is a NUL-terminated string and its address, when not null, is a sockaddr of the
        // family it declares, so reading it as sockaddr_in / sockaddr_in6 is valid.
        unsafe {
            let ifa = &*cur;
            let name = std::ffi::CStr::from_ptr(ifa.ifa_name)
                .to_string_lossy()
                .into_owned();
            if !ifa.ifa_addr.is_null() {
                let ip = match (*ifa.ifa_addr).sa_family as i32 {
                    libc::AF_INET => {
                        let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                        Some(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                            sin.sin_addr.s_addr,
                        ))))
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                        Some(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)))
                    }
                    _ => None,
                };
                if let Some(ip) = ip {
                    out.push(IfaceAddr { name, ip });
                }
            }
            cur = ifa.ifa_next;
        }
    }
    // SAFETY: `head` came from getifaddrs and is freed exactly once, after the last use.
    unsafe { libc::freeifaddrs(head) };
    Ok(out)
}

/// The address to listen on and advertise: the first accepted interface's IPv4 address, else
/// its first routable IPv6 one.
pub fn select(filter: &IfaceFilter, addrs: &[IfaceAddr]) -> Option<IfaceAddr> {
    let usable = |a: &&IfaceAddr| {
        filter.accepts(&a.name)
            && match a.ip {
                IpAddr::V4(_) => true,
                IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) != 0xfe80,
            }
    };
    addrs
        .iter()
        .filter(usable)
        .find(|a| a.ip.is_ipv4())
        .or_else(|| addrs.iter().find(usable))
        .cloned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(name: &str, ip: &str) -> IfaceAddr {
        IfaceAddr {
            name: name.into(),
            ip: ip.parse().unwrap(),
        }
    }

    #[test]
    fn nccl_syntax_prefixes_exclusions_and_exact_names() {
        let f = IfaceFilter::parse("eth,ib").unwrap();
        assert!(f.accepts("eth0") && f.accepts("ib1") && !f.accepts("lo"));
        let f = IfaceFilter::parse("^docker,lo").unwrap();
        assert!(f.accepts("eth0") && !f.accepts("docker0") && !f.accepts("lo"));
        let f = IfaceFilter::parse("=eth0").unwrap();
        assert!(f.accepts("eth0") && !f.accepts("eth01"));
        let f = IfaceFilter::parse("^=eth0").unwrap();
        assert!(!f.accepts("eth0") && f.accepts("eth01"));
        assert!(IfaceFilter::parse("^").is_err());
    }

    #[test]
    fn selection_prefers_ipv4_and_skips_link_local() {
        let addrs = [
            addr("lo", "127.0.0.1"),
            addr("eth0", "fe80::1"),
            addr("eth0", "2001:db8::5"),
            addr("eth0", "198.18.0.5"),
            addr("eth1", "198.19.0.5"),
        ];
        let f = IfaceFilter::parse("eth").unwrap();
        assert_eq!(select(&f, &addrs).unwrap().ip.to_string(), "198.18.0.5");
        let only_v6 = [addr("eth0", "fe80::1"), addr("eth0", "2001:db8::5")];
        assert_eq!(select(&f, &only_v6).unwrap().ip.to_string(), "2001:db8::5");
        assert!(select(&IfaceFilter::parse("ib").unwrap(), &addrs).is_none());
    }

    #[test]
    fn this_host_lists_its_loopback() {
        let addrs = interface_addrs().unwrap();
        let lo = select(&IfaceFilter::parse("=lo").unwrap(), &addrs).expect("a loopback interface");
        assert_eq!(lo.ip, IpAddr::V4(Ipv4Addr::LOCALHOST));
    }
}
