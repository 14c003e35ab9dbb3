//! Ringlet's shared vocabulary, used by every other crate of the workspace:
//!
//! - [`dtype`]: the element types a collective moves ([`Element`], [`DType`]), the reduction ops
//!   ([`ReduceOp`]) and the reduction loops themselves;
//! - [`error`]: the one [`Error`] type, whose messages name the rank and host at fault;
//! - [`auth`]: the job token and the challenge–response handshake every connection starts with;
//! - [`msg`]: length-prefixed, size-capped control messages (bincode) for the store and the ring
//!   handshake — never for collective payloads;
//! - [`io`]: blocking socket reads and writes bounded by a deadline.

pub mod auth;
pub mod dtype;
pub mod error;
pub mod io;
pub mod msg;

pub use auth::{JobToken, Role};
pub use dtype::{half_types, DType, Element, ReduceOp};
pub use error::{Error, Result};

/// For tests that cannot run here: prints `SKIPPED: <why> [<test>]` to stderr itself (libtest
/// names each test's thread after the test). libtest holds back what `println!` prints in a test
/// that passes, so a skip said that way never reaches CI's log; a direct write to stderr does.
#[macro_export]
macro_rules! skipped {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        let thread = std::thread::current();
        let _ = writeln!(
            std::io::stderr().lock(),
            "SKIPPED: {} [{}]",
            format_args!($($arg)*),
            thread.name().unwrap_or("?")
        );
    }};
}

/// Default deadline for connecting, rendezvous and each collective when neither config nor
/// `RINGLET_TIMEOUT` sets one.
pub const DEFAULT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(300);
/// The longest deadline anything accepts, in seconds (a year): larger values overflow deadline
/// arithmetic, and are typos.
pub const MAX_TIMEOUT_SECS: f64 = 365.0 * 86400.0;
