//! Several ranks in one process: one thread each, real loopback sockets, a fresh store and job
//! token. For tests of training code: the communicators are the real ones.

use ringlet::{Communicator, Config, JobToken};
use std::time::Duration;

/// Runs `f(comm)` on `n` ranks, one thread each (20 s collective deadline); hands back each
/// rank's result, in rank order. A rank that panics fails the call.
pub fn run<T: Send>(n: usize, f: impl Fn(Communicator) -> T + Sync) -> Vec<T> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let token = JobToken::generate();
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|r| {
                let (f, token) = (&f, token.clone());
                s.spawn(move || {
                    let mut c = Config::new(r, n, format!("127.0.0.1:{port}"));
                    c.token = Some(token);
                    c.timeout = Duration::from_secs(20);
                    f(Communicator::new(c).expect("the ranks meet"))
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().expect("a rank panicked"))
            .collect()
    })
}
