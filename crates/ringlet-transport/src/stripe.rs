//! One direction of a TCP link to a peer as several connections (`RINGLET_NSOCKS`): the byte
//! stream is cut into blocks of 512 KiB, dealt to the connections in turn. Both ends
//! walk the connections in the same order, so the bytes come out as they went in, and no header
//! is needed. One connection cannot always fill a link (its window, or one core's share of the
//! kernel's work); several can.
//!
//! With one connection, nothing is cut: bytes go straight through.

use std::io::{self, IoSlice, Read};
use std::net::TcpStream;

/// How many bytes go on one connection before the next takes over: a block is one system call
/// at most, so small blocks multiply them (2 ranks on loopback, 2 connections, 256 MiB
/// all-reduce: 1.7 GB/s busbw with 128 KiB blocks, 2.3 with 512 KiB, 2.6 with 1 MiB; one
/// connection 2.3). Half the default pipeline chunk, so that one chunk already uses two.
pub(crate) const STRIPE_BYTES: usize = 512 << 10;

/// The most connections per peer and direction `RINGLET_NSOCKS` may ask for (NCCL allows 64
/// per peer, across threads; on one thread more than a few only add system calls).
pub const MAX_STREAMS: usize = 16;

/// A read asking for fewer bytes than this (a frame header) reads up to this many, so that a
/// small frame's header and payload take one system call instead of two (2 ranks on loopback,
/// 4-byte all-reduce: two `recvfrom` per call before).
const LOOKAHEAD: usize = 4096;

pub(crate) struct Stripes {
    streams: Vec<TcpStream>,
    /// The connection the current block travels on.
    at: usize,
    /// Bytes of the current block not yet written (or read).
    left: usize,
    block: usize,
    /// Bytes read ahead and not yet handed out: `ahead[ahead_at..ahead_end]` (receiving side).
    ahead: Vec<u8>,
    ahead_at: usize,
    ahead_end: usize,
    /// An error met after bytes had moved in the same call: that call reported the bytes, the
    /// next one reports this (the kernel hands a reset out only once).
    send_failed: Option<io::Error>,
    recv_failed: Option<io::Error>,
}

impl Stripes {
    /// `streams` in the order both ends agree on (by the index each announced); at least one.
    pub(crate) fn new(streams: Vec<TcpStream>) -> Stripes {
        Stripes::with_block(streams, STRIPE_BYTES)
    }

    fn with_block(streams: Vec<TcpStream>, block: usize) -> Stripes {
        assert!(!streams.is_empty() && block > 0);
        Stripes {
            streams,
            at: 0,
            left: block,
            block,
            ahead: Vec::new(),
            ahead_at: 0,
            ahead_end: 0,
            send_failed: None,
            recv_failed: None,
        }
    }

    /// Every connection, for configuring them and for noticing a hang-up on any of them.
    pub(crate) fn all(&self) -> &[TcpStream] {
        &self.streams
    }

    /// The connection the next byte goes to (or comes from): the one worth waiting on.
    pub(crate) fn current(&self) -> &TcpStream {
        &self.streams[self.at]
    }

    fn advance(&mut self, n: usize) {
        if self.streams.len() == 1 {
            return;
        }
        self.left -= n;
        if self.left == 0 {
            self.at = (self.at + 1) % self.streams.len();
            self.left = self.block;
        }
    }

    /// Writes what it can of `bufs` without blocking; `WouldBlock` when nothing could be
    /// written. `MSG_NOSIGNAL`: a write to a reset connection would raise SIGPIPE, which kills a
    /// host process that has not ignored it (a C++ or Python embedding).
    pub(crate) fn send(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if let Some(e) = self.send_failed.take() {
            return Err(e);
        }
        let total: usize = bufs.iter().map(|b| b.len()).sum();
        if self.streams.len() == 1 {
            return send_on(&self.streams[0], bufs);
        }
        let mut done = 0;
        let mut part: Vec<IoSlice<'_>> = Vec::with_capacity(bufs.len());
        while done < total {
            slice_of(bufs, done, self.left, &mut part);
            match send_on(&self.streams[self.at], &part) {
                Ok(n) => {
                    done += n;
                    self.advance(n);
                }
                // Bytes already written count; the next call reports the error.
                Err(e) if done > 0 => {
                    self.send_failed = Some(e);
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(done)
    }

    /// Whether bytes already read are waiting: a wait must not sleep on the socket then.
    pub(crate) fn buffered(&self) -> bool {
        self.ahead_at < self.ahead_end
    }

    /// Reads what is available into `buf` without blocking; `WouldBlock` when nothing is, and
    /// `Ok(0)` when the connection the next byte must come from is closed.
    pub(crate) fn recv(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if !self.buffered() {
            if let Some(e) = self.recv_failed.take() {
                return Err(e);
            }
        }
        if !self.buffered() && buf.len() < LOOKAHEAD {
            if self.ahead.is_empty() {
                self.ahead = vec![0; LOOKAHEAD];
            }
            let mut ahead = std::mem::take(&mut self.ahead);
            let got = self.recv_direct(&mut ahead);
            self.ahead = ahead;
            match got {
                Ok(0) => return Ok(0),
                Ok(n) => (self.ahead_at, self.ahead_end) = (0, n),
                Err(e) => return Err(e),
            }
        }
        if !self.buffered() {
            return self.recv_direct(buf);
        }
        let n = buf.len().min(self.ahead_end - self.ahead_at);
        buf[..n].copy_from_slice(&self.ahead[self.ahead_at..self.ahead_at + n]);
        self.ahead_at += n;
        if n == buf.len() {
            return Ok(n);
        }
        // The look-ahead is used up: the rest straight into `buf`, if it is there.
        match self.recv_direct(&mut buf[n..]) {
            Ok(m) => Ok(n + m),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(n),
            // Reported by the next call, which finds nothing buffered.
            Err(e) => {
                self.recv_failed = Some(e);
                Ok(n)
            }
        }
    }

    fn recv_direct(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.streams.len() == 1 {
            return read_on(&self.streams[0], buf);
        }
        let mut got = 0;
        while got < buf.len() {
            let end = got + self.left.min(buf.len() - got);
            match read_on(&self.streams[self.at], &mut buf[got..end]) {
                Ok(0) if got > 0 => break,
                Ok(0) => return Ok(0),
                Ok(n) => {
                    got += n;
                    self.advance(n);
                }
                // Bytes already read count; the next call reports the error.
                Err(e) if got > 0 => {
                    self.recv_failed = Some(e);
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(got)
    }
}

fn send_on(s: &TcpStream, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
    let socket = socket2::SockRef::from(s);
    loop {
        match socket.send_vectored_with_flags(bufs, libc::MSG_NOSIGNAL) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

fn read_on(mut s: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match s.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            r => return r,
        }
    }
}

/// Fills `out` with the bytes of `bufs` from offset `skip`, at most `take` of them.
fn slice_of<'a>(
    bufs: &'a [IoSlice<'_>],
    mut skip: usize,
    mut take: usize,
    out: &mut Vec<IoSlice<'a>>,
) {
    out.clear();
    for b in bufs {
        if take == 0 {
            break;
        }
        let b: &'a [u8] = b;
        if skip >= b.len() {
            skip -= b.len();
            continue;
        }
        let piece = &b[skip..b.len().min(skip + take)];
        skip = 0;
        take -= piece.len();
        out.push(IoSlice::new(piece));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::time::{Duration, Instant};

    /// `k` loopback connections, as (writing ends, reading ends) in matching order.
    fn pairs(k: usize) -> (Vec<TcpStream>, Vec<TcpStream>) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let (mut tx, mut rx) = (Vec::new(), Vec::new());
        for _ in 0..k {
            let s = TcpStream::connect(addr).unwrap();
            let (r, _) = l.accept().unwrap();
            for x in [&s, &r] {
                x.set_nonblocking(true).unwrap();
            }
            tx.push(s);
            rx.push(r);
        }
        (tx, rx)
    }

    /// Bytes sent in uneven vectored pieces come out whole and in order, read in uneven pieces,
    /// with the writer often finding its connection full.
    fn round_trip(k: usize, block: usize, len: u32) {
        let (tx, rx) = pairs(k);
        let (mut tx, mut rx) = (
            Stripes::with_block(tx, block),
            Stripes::with_block(rx, block),
        );
        let data: Vec<u8> = (0..len)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let mut out = vec![0u8; data.len()];
        let (mut sent, mut got, mut step) = (0, 0, 1usize);
        let deadline = Instant::now() + Duration::from_secs(30);
        while got < data.len() {
            assert!(
                Instant::now() < deadline,
                "stalled at {got} of {}",
                data.len()
            );
            step = (step * 7 + 3) % 200_003 + 1;
            if sent < data.len() {
                let end = (sent + step).min(data.len());
                let mid = sent + (end - sent) / 3;
                let bufs = [
                    IoSlice::new(&data[sent..mid]),
                    IoSlice::new(&data[mid..end]),
                ];
                match tx.send(&bufs) {
                    Ok(n) => sent += n,
                    Err(e) => assert_eq!(e.kind(), io::ErrorKind::WouldBlock),
                }
            }
            let end = (got + step / 2 + 1).min(data.len());
            match rx.recv(&mut out[got..end]) {
                Ok(0) => panic!("closed"),
                Ok(n) => got += n,
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::WouldBlock),
            }
        }
        assert!(out == data, "bytes differ");
    }

    #[test]
    fn bytes_arrive_in_order_over_any_number_of_connections() {
        round_trip(1, STRIPE_BYTES, 3_000_017);
        round_trip(2, STRIPE_BYTES, 3_000_017);
        round_trip(3, 4096, 1_000_003);
        round_trip(5, 1, 20_011);
    }

    #[test]
    fn a_closed_connection_reads_as_the_end() {
        let (tx, rx) = pairs(2);
        let mut rx = Stripes::with_block(rx, 4);
        let mut tx = Stripes::with_block(tx, 4);
        assert_eq!(tx.send(&[IoSlice::new(b"abcdef")]).unwrap(), 6);
        drop(tx);
        let mut buf = [0u8; 16];
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut got = Vec::new();
        loop {
            assert!(Instant::now() < deadline);
            match rx.recv(&mut buf) {
                Ok(0) => break,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::WouldBlock),
            }
        }
        assert_eq!(got, b"abcdef");
    }

    /// Resets a connection at once (an RST instead of an orderly close).
    fn reset(s: TcpStream) {
        socket2::SockRef::from(&s)
            .set_linger(Some(Duration::ZERO))
            .unwrap();
        drop(s);
        std::thread::sleep(Duration::from_millis(50));
    }

    /// Bytes that reached the first connection count when the next one fails; the following
    /// call reports that failure.
    #[test]
    fn an_error_after_progress_keeps_the_progress() {
        let (tx, mut rx) = pairs(2);
        reset(rx.remove(1));
        let mut tx = Stripes::with_block(tx, 16);
        assert_eq!(tx.send(&[IoSlice::new(&[7u8; 32])]).unwrap(), 16);
        assert!(tx.send(&[IoSlice::new(&[7u8; 16])]).is_err());

        let (mut tx, rx) = pairs(2);
        use std::io::Write;
        (&tx[0]).write_all(&[9u8; 16]).unwrap();
        reset(tx.remove(1));
        let mut rx = Stripes::with_block(rx, 16);
        let mut buf = [0u8; 32];
        let deadline = Instant::now() + Duration::from_secs(10);
        let n = loop {
            assert!(Instant::now() < deadline);
            match rx.recv(&mut buf) {
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                other => break other.unwrap(),
            }
        };
        assert_eq!(&buf[..n], &[9u8; 16]);
        // The reset, consumed by the first call, is what the next one reports.
        let e = rx.recv(&mut buf).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionReset, "{e}");
    }

    /// A header-sized read takes what follows too; the rest is handed out without reading the
    /// socket again, and `buffered` says so (a wait must not sleep on it).
    #[test]
    fn a_small_read_reads_ahead_and_hands_out_the_rest() {
        let (tx, rx) = pairs(1);
        let (mut tx, mut rx) = (Stripes::new(tx), Stripes::new(rx));
        let frame: Vec<u8> = (0..52u8).collect();
        assert_eq!(tx.send(&[IoSlice::new(&frame)]).unwrap(), 52);
        let mut header = [0u8; 48];
        let deadline = Instant::now() + Duration::from_secs(10);
        let n = loop {
            assert!(Instant::now() < deadline);
            match rx.recv(&mut header) {
                Ok(n) => break n,
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::WouldBlock),
            }
        };
        assert_eq!(n, 48);
        assert!(rx.buffered());
        drop(tx);
        let mut payload = [0u8; 4];
        assert_eq!(rx.recv(&mut payload).unwrap(), 4);
        assert!(!rx.buffered());
        assert_eq!([&header[..], &payload[..]].concat(), frame);
        let mut more = [0u8; 8];
        let end = loop {
            assert!(Instant::now() < deadline);
            match rx.recv(&mut more) {
                Ok(n) => break n,
                Err(e) => assert_eq!(e.kind(), io::ErrorKind::WouldBlock),
            }
        };
        assert_eq!(
            end, 0,
            "the end of the stream once the look-ahead is used up"
        );
    }

    #[test]
    fn slices_skip_and_take_across_buffers() {
        let (a, b) = (b"hello".as_slice(), b"world!".as_slice());
        let bufs = [IoSlice::new(a), IoSlice::new(b)];
        let mut out = Vec::new();
        let join = |o: &Vec<IoSlice<'_>>| {
            o.iter()
                .flat_map(|s| s.iter().copied())
                .collect::<Vec<u8>>()
        };
        slice_of(&bufs, 3, 4, &mut out);
        assert_eq!(join(&out), b"lowo");
        slice_of(&bufs, 5, 100, &mut out);
        assert_eq!(join(&out), b"world!");
        slice_of(&bufs, 11, 1, &mut out);
        assert!(out.is_empty());
    }
}
