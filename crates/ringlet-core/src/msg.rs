//! Control messages: a little-endian `u32` length, then a bincode body. Used by the rendezvous
//! store and the ring handshake; collective payloads never go through a serializer.
//!
//! The length is checked against a caller-given cap before anything is allocated, so a peer
//! cannot make us allocate what it claims.

use crate::error::{Error, PeerId, Result};
use crate::io::{read_exact_by, write_all_by, IoFailure, TimedStream};
use serde::{de::DeserializeOwned, Serialize};

use std::time::Instant;

/// Control messages larger than this are refused unless a caller sets its own cap.
pub const DEFAULT_MAX_MESSAGE: usize = 16 << 20;

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    let body = bincode::serde::encode_to_vec(value, config())
        .expect("bincode encoding of an in-memory control message cannot fail");
    let mut framed = Vec::with_capacity(4 + body.len());
    framed.extend_from_slice(&(body.len() as u32).to_le_bytes());
    framed.extend_from_slice(&body);
    framed
}

/// Decodes a body. The limit stops bincode from allocating what a length *inside* the body
/// claims before noticing the body is shorter.
pub fn decode<T: DeserializeOwned>(body: &[u8], peer: &PeerId) -> Result<T> {
    let limited = config().with_limit::<{ DEFAULT_MAX_MESSAGE + (64 << 10) }>();
    match bincode::serde::decode_from_slice::<T, _>(body, limited) {
        Ok((v, used)) if used == body.len() => Ok(v),
        Ok((_, used)) => Err(Error::protocol(
            peer,
            format!("control message has {} trailing bytes", body.len() - used),
        )),
        Err(e) => Err(Error::protocol(
            peer,
            format!("undecodable control message: {e}"),
        )),
    }
}

pub fn send<T: Serialize, S: TimedStream + ?Sized>(
    stream: &mut S,
    value: &T,
    peer: &PeerId,
    deadline: Instant,
) -> Result<()> {
    let started = Instant::now();
    write_all_by(stream, &encode(value), deadline)
        .map_err(|f| failure(f, peer, "sending to", started))
}

pub fn recv<T: DeserializeOwned, S: TimedStream + ?Sized>(
    stream: &mut S,
    max_len: usize,
    peer: &PeerId,
    deadline: Instant,
) -> Result<T> {
    let started = Instant::now();
    let failed = |f| failure(f, peer, "receiving from", started);
    let mut len = [0u8; 4];
    read_exact_by(stream, &mut len, deadline).map_err(failed)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > max_len {
        return Err(Error::protocol(
            peer,
            format!("control message of {len} bytes exceeds the {max_len}-byte limit"),
        ));
    }
    let mut body = vec![0u8; len];
    read_exact_by(stream, &mut body, deadline).map_err(failed)?;
    decode(&body, peer)
}

/// Maps a bounded-I/O failure on a control connection to an error naming the peer.
pub fn failure(f: IoFailure, peer: &PeerId, doing: &str, started: Instant) -> Error {
    match f {
        IoFailure::TimedOut => Error::Timeout {
            peer: peer.clone(),
            waiting_for: format!("{doing} {peer}"),
            after: started.elapsed(),
        },
        IoFailure::Closed => Error::PeerLost {
            peer: peer.clone(),
            detail: format!("connection closed while {doing} it"),
        },
        IoFailure::Other(e) => Error::io(format!("{doing} {peer}"), e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, Debug, PartialEq)]
    struct Hello {
        rank: u32,
        name: String,
    }

    #[test]
    fn lengths_claimed_inside_a_body_are_bounded() {
        // A string whose varint length claims 2^62 bytes, in a 10-byte body.
        let body = [0xfdu8, 0, 0, 0, 0, 0, 0, 0, 0x40, b'x'];
        let e = decode::<String>(&body, &PeerId::addr("test")).unwrap_err();
        assert!(e.to_string().contains("undecodable"), "{e}");
    }

    #[test]
    fn round_trip_and_rejects_trailing_or_truncated_bodies() {
        let peer = PeerId::addr("test");
        let v = Hello {
            rank: 3,
            name: "x".into(),
        };
        let framed = encode(&v);
        assert_eq!(decode::<Hello>(&framed[4..], &peer).unwrap(), v);
        let mut extra = framed[4..].to_vec();
        extra.push(0);
        assert!(decode::<Hello>(&extra, &peer).is_err());
        assert!(decode::<Hello>(&framed[4..framed.len() - 1], &peer).is_err());
    }
}
