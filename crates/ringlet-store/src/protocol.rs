//! What store clients and the server say to each other after the handshake: one [`Request`], one
//! [`Response`], repeated. Frames are `ringlet_core::msg` frames (little-endian `u32` length, then a
//! bincode body) and are written with `msg::send`; they are read here rather than with `msg::recv`
//! because decoding must run under a byte limit: plain bincode allocates whatever length a string
//! or byte field *claims* before checking the body holds that many bytes.

use ringlet_core::io::{read_exact_by, IoFailure};
use serde::{Deserialize, Serialize};
use std::net::TcpStream;
use std::time::{Duration, Instant};

/// Longest key, in bytes.
pub const MAX_KEY_LEN: usize = 4 << 10;
/// Largest value, in bytes.
pub const MAX_VALUE_LEN: usize = 16 << 20;
/// Most keys one `wait` may name.
pub const MAX_WAIT_KEYS: usize = 1 << 16;
/// Largest frame either side accepts: a maximal value plus room for its key and the envelope, so
/// an oversized value that still fits gets a reasoned refusal rather than a dropped connection.
pub const MAX_FRAME: usize = MAX_VALUE_LEN + (64 << 10);

#[derive(Debug, Serialize, Deserialize)]
pub enum Request {
    Set {
        key: String,
        #[serde(with = "bytes")]
        value: Vec<u8>,
    },
    /// Answered with `Value` once `key` exists, or `Missing` after `wait` (zero: answer now).
    Get {
        key: String,
        wait: Duration,
    },
    /// Answered with `Done` once every key exists, or `Missing` after `wait`.
    Wait {
        #[serde(with = "bounded_keys")]
        keys: Vec<String>,
        wait: Duration,
    },
    Add {
        key: String,
        delta: i64,
    },
    Delete {
        key: String,
    },
}

#[derive(Debug, Serialize, Deserialize)]
pub enum Response {
    Done,
    Value(#[serde(with = "bytes")] Vec<u8>),
    /// The wait expired; these keys were still absent.
    Missing(Vec<String>),
    Count(i64),
    Deleted(bool),
    /// The request was understood but not carried out, for this reason.
    Refused(String),
}

/// Why no frame body could be read.
#[derive(Debug)]
pub enum FrameError {
    Io(IoFailure),
    /// The length prefix claims more than [`MAX_FRAME`]; the body was not read.
    TooLarge(usize),
}

/// Reads one frame body. The first byte may take until `first_byte_by` (an idle connection); once
/// it has arrived, the rest must arrive within `rest_within`, so a stalled sender cannot hold a
/// half-read frame open.
pub fn read_frame(
    stream: &mut TcpStream,
    first_byte_by: Instant,
    rest_within: Duration,
) -> Result<Vec<u8>, FrameError> {
    let mut len = [0u8; 4];
    read_exact_by(stream, &mut len[..1], first_byte_by).map_err(FrameError::Io)?;
    let rest_by = Instant::now() + rest_within;
    read_exact_by(stream, &mut len[1..], rest_by).map_err(FrameError::Io)?;
    let len = u32::from_le_bytes(len) as usize;
    if len > MAX_FRAME {
        return Err(FrameError::TooLarge(len));
    }
    let mut body = vec![0u8; len];
    read_exact_by(stream, &mut body, rest_by).map_err(FrameError::Io)?;
    Ok(body)
}

/// Decodes a frame body (through `ringlet_core::msg`, which bounds what bincode may allocate);
/// on failure, says why in words fit for a log line or a refusal.
pub fn decode<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, String> {
    let peer = ringlet_core::error::PeerId::addr("store peer");
    ringlet_core::msg::decode(body, &peer).map_err(|e| match e {
        ringlet_core::Error::Protocol { detail, .. } => detail,
        other => other.to_string(),
    })
}

/// Byte fields as one length-prefixed run (the same bytes bincode writes for a sequence of `u8`)
/// rather than element by element, which is far slower for 16 MiB values.
mod bytes {
    use serde::de::{Deserializer, Error, SeqAccess, Visitor};
    use serde::Serializer;

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bytes(v)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u8>, D::Error> {
        d.deserialize_byte_buf(BytesVisitor)
    }

    struct BytesVisitor;

    impl<'de> Visitor<'de> for BytesVisitor {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("bytes")
        }

        fn visit_bytes<E: Error>(self, v: &[u8]) -> Result<Vec<u8>, E> {
            Ok(v.to_vec())
        }

        fn visit_byte_buf<E: Error>(self, v: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(v)
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<u8>, A::Error> {
            let mut v = Vec::new();
            while let Some(b) = seq.next_element()? {
                v.push(b);
            }
            Ok(v)
        }
    }
}

/// A key list that stops decoding past [`MAX_WAIT_KEYS`]: a frame of empty strings would
/// otherwise expand some twenty-fold in memory.
mod bounded_keys {
    use super::MAX_WAIT_KEYS;
    use serde::de::{Deserializer, Error, SeqAccess, Visitor};
    use serde::{Serialize, Serializer};

    pub fn serialize<S: Serializer>(v: &Vec<String>, s: S) -> Result<S::Ok, S::Error> {
        v.serialize(s)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<String>, D::Error> {
        d.deserialize_seq(KeysVisitor)
    }

    struct KeysVisitor;

    impl<'de> Visitor<'de> for KeysVisitor {
        type Value = Vec<String>;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            write!(f, "at most {MAX_WAIT_KEYS} keys")
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Vec<String>, A::Error> {
            let mut keys = Vec::new();
            while let Some(k) = seq.next_element()? {
                if keys.len() == MAX_WAIT_KEYS {
                    return Err(A::Error::custom(format!(
                        "more than {MAX_WAIT_KEYS} keys in one wait"
                    )));
                }
                keys.push(k);
            }
            Ok(keys)
        }
    }
}

/// Checks what the server checks, so that a client can refuse before sending.
pub fn check_key(key: &str) -> Result<(), String> {
    if key.len() > MAX_KEY_LEN {
        return Err(format!(
            "key of {} bytes exceeds the {MAX_KEY_LEN}-byte limit",
            key.len()
        ));
    }
    Ok(())
}

pub fn check_value(key: &str, value: &[u8]) -> Result<(), String> {
    if value.len() > MAX_VALUE_LEN {
        return Err(format!(
            "value of {} bytes for key {key:?} exceeds the {MAX_VALUE_LEN}-byte limit",
            value.len()
        ));
    }
    Ok(())
}

pub fn check_keys(keys: &[impl AsRef<str>]) -> Result<(), String> {
    if keys.len() > MAX_WAIT_KEYS {
        return Err(format!(
            "{} keys exceed the {MAX_WAIT_KEYS}-key limit of one wait",
            keys.len()
        ));
    }
    keys.iter().try_for_each(|k| check_key(k.as_ref()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body<T: Serialize>(v: &T) -> Vec<u8> {
        ringlet_core::msg::encode(v)[4..].to_vec()
    }

    #[test]
    fn requests_round_trip() {
        let req = Request::Set {
            key: "k".into(),
            value: vec![1, 2, 3],
        };
        match decode::<Request>(&body(&req)).unwrap() {
            Request::Set { key, value } => {
                assert_eq!((key.as_str(), &value[..]), ("k", &[1, 2, 3][..]))
            }
            other => panic!("{other:?}"),
        }
        let req = Request::Wait {
            keys: vec!["a".into(), "b".into()],
            wait: Duration::from_millis(5),
        };
        assert!(
            matches!(decode::<Request>(&body(&req)).unwrap(), Request::Wait { keys, .. } if keys == ["a", "b"])
        );
    }

    #[test]
    fn claimed_lengths_inside_a_body_are_bounded() {
        // A Delete whose key claims 2^62 bytes: unbounded bincode would try to allocate it.
        for claim in [1u64 << 62, u64::MAX] {
            let mut b = vec![4u8]; // variant index of Delete
            b.push(253); // varint tag for a u64 length
            b.extend_from_slice(&claim.to_le_bytes());
            assert!(decode::<Request>(&b).is_err());
        }
    }

    #[test]
    fn too_many_wait_keys_are_refused_while_decoding() {
        let req = Request::Wait {
            keys: vec![String::new(); MAX_WAIT_KEYS + 1],
            wait: Duration::ZERO,
        };
        let err = decode::<Request>(&body(&req)).unwrap_err();
        assert!(err.contains("more than"), "{err}");
    }
}
