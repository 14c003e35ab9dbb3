//! The job token and the mutual challenge–response every Ringlet connection (store or ring) opens
//! with. The token itself never crosses the wire: each side sends a fresh 32-byte nonce and proves
//! it holds the token with an HMAC-SHA256 over both nonces, bound to the direction and to the kind
//! of port, so a proof cannot be replayed or reflected. All messages have fixed sizes, so nothing a
//! stranger sends decides an allocation.
//!
//! ```text
//! connector -> acceptor  hello:   "RNGL" version role 0 0  nonce_c[32]           (40 bytes)
//! acceptor  -> connector reply:   "RNGL" version status 0 0 nonce_a[32] mac_a[32] (72 bytes)
//! connector -> acceptor  proof:   mac_c[32]                                      (32 bytes)
//! acceptor  -> connector verdict: 1 = accepted, 0 = refused                      (1 byte)
//! mac_a = HMAC(token, "ringlet-acceptor" role nonce_c nonce_a)
//! mac_c = HMAC(token, "ringlet-connector" role nonce_a nonce_c)
//! ```

use crate::error::{Error, PeerId, Result};
use crate::io::{read_exact_by, write_all_by, TimedStream};
use crate::msg::failure;
use hmac::{Hmac, Mac};
use sha2::Sha256;

use std::time::Instant;

const MAGIC: &[u8; 4] = b"RNGL";
const VERSION: u8 = 1;
const STATUS_OK: u8 = 0;
const STATUS_WRONG_ROLE: u8 = 1;
const STATUS_WRONG_VERSION: u8 = 2;

/// Which kind of port a connection is for; a proof made for one is useless on the other.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Role {
    Store = 1,
    Ring = 2,
}

/// The secret shared by every process of one job (`RINGLET_JOB_TOKEN`).
#[derive(Clone)]
pub struct JobToken(Vec<u8>);

impl std::fmt::Debug for JobToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("JobToken(<redacted>)")
    }
}

impl JobToken {
    pub const ENV: &'static str = "RINGLET_JOB_TOKEN";

    pub fn new(secret: impl AsRef<[u8]>) -> JobToken {
        JobToken(secret.as_ref().to_vec())
    }

    /// 32 random bytes from the OS, as 64 hex digits (what `ringrun` exports).
    pub fn generate() -> JobToken {
        JobToken(hex(&random_bytes()).into_bytes())
    }

    /// The token in `RINGLET_JOB_TOKEN`, if set and not empty.
    pub fn from_env() -> Option<JobToken> {
        std::env::var(Self::ENV)
            .ok()
            .filter(|s| !s.is_empty())
            .map(JobToken::new)
    }

    /// The text to export as `RINGLET_JOB_TOKEN` for child processes.
    pub fn to_env_value(&self) -> String {
        String::from_utf8_lossy(&self.0).into_owned()
    }

    fn mac(&self, label: &[u8], role: Role, first: &[u8; 32], second: &[u8; 32]) -> Hmac<Sha256> {
        let mut mac =
            Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes keys of any length");
        mac.update(label);
        mac.update(&[role as u8]);
        mac.update(first);
        mac.update(second);
        mac
    }
}

fn random_bytes() -> [u8; 32] {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("the OS random source is available");
    b
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn refused(peer: &PeerId, detail: impl Into<String>) -> Error {
    Error::Auth {
        peer: peer.clone(),
        detail: detail.into(),
    }
}

/// The connecting side. Returns once both sides have proven they hold `token`.
pub fn connect_handshake<S: TimedStream + ?Sized>(
    stream: &mut S,
    token: &JobToken,
    role: Role,
    peer: &PeerId,
    deadline: Instant,
) -> Result<()> {
    let started = Instant::now();
    let io = |f| failure(f, peer, "authenticating with", started);
    let nonce_c = random_bytes();
    let mut hello = [0u8; 40];
    hello[..4].copy_from_slice(MAGIC);
    hello[4] = VERSION;
    hello[5] = role as u8;
    hello[8..].copy_from_slice(&nonce_c);
    write_all_by(stream, &hello, deadline).map_err(io)?;

    let mut reply = [0u8; 72];
    read_exact_by(stream, &mut reply, deadline).map_err(io)?;
    if &reply[..4] != MAGIC {
        return Err(Error::protocol(
            peer,
            "not a Ringlet port (bad handshake magic)",
        ));
    }
    match reply[5] {
        STATUS_OK => {}
        STATUS_WRONG_ROLE => return Err(refused(peer, format!("this is not a {role:?} port"))),
        STATUS_WRONG_VERSION => {
            return Err(refused(
                peer,
                format!(
                    "peer speaks protocol version {}, we speak {VERSION}",
                    reply[4]
                ),
            ))
        }
        s => {
            return Err(Error::protocol(
                peer,
                format!("unknown handshake status {s}"),
            ))
        }
    }
    let nonce_a: [u8; 32] = reply[8..40].try_into().expect("32-byte slice");
    token
        .mac(b"ringlet-acceptor", role, &nonce_c, &nonce_a)
        .verify_slice(&reply[40..72])
        .map_err(|_| {
            refused(
                peer,
                "peer does not hold this job's token (RINGLET_JOB_TOKEN differs)",
            )
        })?;

    let proof = token
        .mac(b"ringlet-connector", role, &nonce_a, &nonce_c)
        .finalize()
        .into_bytes();
    write_all_by(stream, &proof, deadline).map_err(io)?;
    let mut verdict = [0u8; 1];
    read_exact_by(stream, &mut verdict, deadline).map_err(io)?;
    if verdict[0] != 1 {
        return Err(refused(peer, "peer refused our token proof"));
    }
    Ok(())
}

/// The accepting side. Returns once both sides have proven they hold `token`; on any failure the
/// caller should drop the connection.
pub fn accept_handshake<S: TimedStream + ?Sized>(
    stream: &mut S,
    token: &JobToken,
    role: Role,
    peer: &PeerId,
    deadline: Instant,
) -> Result<()> {
    let started = Instant::now();
    let io = |f| failure(f, peer, "authenticating", started);
    let mut hello = [0u8; 40];
    read_exact_by(stream, &mut hello, deadline).map_err(io)?;
    if &hello[..4] != MAGIC {
        return Err(Error::protocol(
            peer,
            "not a Ringlet client (bad handshake magic)",
        ));
    }
    let mut reply = [0u8; 72];
    reply[..4].copy_from_slice(MAGIC);
    reply[4] = VERSION;
    let status = if hello[4] != VERSION {
        STATUS_WRONG_VERSION
    } else if hello[5] != role as u8 {
        STATUS_WRONG_ROLE
    } else {
        STATUS_OK
    };
    reply[5] = status;
    let nonce_c: [u8; 32] = hello[8..40].try_into().expect("32-byte slice");
    let nonce_a = random_bytes();
    if status == STATUS_OK {
        reply[8..40].copy_from_slice(&nonce_a);
        let mac = token
            .mac(b"ringlet-acceptor", role, &nonce_c, &nonce_a)
            .finalize()
            .into_bytes();
        reply[40..].copy_from_slice(&mac);
    }
    write_all_by(stream, &reply, deadline).map_err(io)?;
    if status != STATUS_OK {
        return Err(refused(
            peer,
            format!("peer asked for role {} / version {}", hello[5], hello[4]),
        ));
    }
    let mut proof = [0u8; 32];
    read_exact_by(stream, &mut proof, deadline).map_err(io)?;
    let ok = token
        .mac(b"ringlet-connector", role, &nonce_a, &nonce_c)
        .verify_slice(&proof)
        .is_ok();
    write_all_by(stream, &[ok as u8], deadline).map_err(io)?;
    if ok {
        Ok(())
    } else {
        Err(refused(peer, "peer does not hold this job's token"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    fn pair(
        client_token: JobToken,
        server_token: JobToken,
        client_role: Role,
    ) -> (Result<()>, Result<()>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let server = std::thread::spawn(move || {
            let (mut s, a) = listener.accept().unwrap();
            accept_handshake(
                &mut s,
                &server_token,
                Role::Ring,
                &PeerId::addr(a.to_string()),
                deadline,
            )
        });
        let mut c = TcpStream::connect(addr).unwrap();
        let client = connect_handshake(
            &mut c,
            &client_token,
            client_role,
            &PeerId::addr("srv"),
            deadline,
        );
        drop(c);
        (client, server.join().unwrap())
    }

    #[test]
    fn same_token_is_accepted_both_ways() {
        let t = JobToken::generate();
        let (c, s) = pair(t.clone(), t, Role::Ring);
        c.unwrap();
        s.unwrap();
    }

    #[test]
    fn wrong_token_is_refused_on_both_sides() {
        let (c, s) = pair(JobToken::new("a"), JobToken::new("b"), Role::Ring);
        assert!(matches!(c, Err(Error::Auth { .. })), "{c:?}");
        assert!(s.is_err());
    }

    #[test]
    fn wrong_role_is_refused() {
        let t = JobToken::generate();
        let (c, s) = pair(t.clone(), t, Role::Store);
        assert!(c.unwrap_err().to_string().contains("not a Store port"));
        assert!(s.is_err());
    }

    #[test]
    fn generated_tokens_differ_and_are_hex() {
        let (a, b) = (JobToken::generate(), JobToken::generate());
        assert_ne!(a.to_env_value(), b.to_env_value());
        assert_eq!(a.to_env_value().len(), 64);
        assert!(a.to_env_value().chars().all(|c| c.is_ascii_hexdigit()));
    }
}
