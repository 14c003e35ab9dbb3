//! Shared-memory channels between two ranks of one host: one direction each, a byte ring in a
//! sealed `memfd` that the writer creates and hands to the reader over an authenticated Unix
//! socket (`SCM_RIGHTS`). Nothing is named in a filesystem, so a segment never outlives the
//! processes that map it, even after `kill -9`.
//!
//! The Unix socket stays open beside the ring as its doorbell and its liveness: a side about to
//! sleep sets its "waiting" flag in the ring and polls the socket; the other side writes a byte
//! to it only when that flag is set, so a busy channel makes no system calls. The peer's death
//! closes its end: end of file on the socket, seen by the same poll.
//!
//! The ring's positions live in memory the peer can write, so they are checked like wire data:
//! positions that disagree with the ring's size are a protocol error, never an out-of-bounds
//! access.

use ringlet_core::error::PeerId;
use ringlet_core::{Error, Result};
use std::io::{self, IoSlice, Read};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};

/// What makes two ranks "on one host" for shared memory: the same kernel boot, and the same
/// IPC and network namespaces (abstract Unix sockets are per network namespace; containers and
/// namespace hosts with their own are other hosts). `None` when it cannot be told.
pub fn host_key() -> Option<String> {
    use std::os::unix::fs::MetadataExt;
    let boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    let net = std::fs::metadata("/proc/self/ns/net").ok()?.ino();
    let ipc = std::fs::metadata("/proc/self/ns/ipc").ok()?.ino();
    Some(format!("{}/net:{net}/ipc:{ipc}", boot.trim()))
}

/// Bytes of ring per direction: a few chunks in flight (chunks are 1 MiB by default).
pub const RING_BYTES: usize = 4 << 20;
/// Bytes copied between publications of a position.
const PIECE: usize = 32 << 10;
/// The control block before the ring: each field on its own cache line.
const HEADER: usize = 256;
/// The largest ring a peer may hand us (its size comes from the peer's file).
const MAX_RING: usize = 1 << 30;

/// (Atomics throughout, padding included: the peer may write any byte of it at any time.)
#[repr(C)]
struct Control {
    /// Bytes ever written (the writer's).
    head: AtomicU64,
    _pad0: [AtomicU8; 56],
    /// Bytes ever read (the reader's).
    tail: AtomicU64,
    _pad1: [AtomicU8; 56],
    reader_waiting: AtomicU32,
    _pad2: [AtomicU8; 60],
    writer_waiting: AtomicU32,
    _pad3: [AtomicU8; 60],
}

const _: () = assert!(std::mem::size_of::<Control>() == HEADER);

/// A shared mapping, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain shared memory owned by this value; the raw pointer is only
// dereferenced through `&self`/`&mut self` of the channel that owns it.
unsafe impl Send for Mapping {}

impl Mapping {
    fn of(fd: &OwnedFd, len: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh shared mapping of `len` bytes of an fd we own; the result is checked.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                // Populated now: a ring's pages would otherwise fault in, on both sides, the
                // first time the positions sweep over them (measured: 2 ranks, 64 KiB
                // all-reduces, 20 calls on fresh rings took 3x as long).
                libc::MAP_SHARED | libc::MAP_POPULATE,
                fd.as_raw_fd(),
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping {
            ptr: ptr.cast(),
            len,
        })
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: `ptr`/`len` are exactly what mmap returned; nothing borrows them any more.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// One direction of a channel; `Writer` and `Reader` wrap it.
struct Channel {
    map: Mapping,
    cap: usize,
    sock: UnixStream,
    peer: PeerId,
    /// The peer's end of the socket closed.
    peer_closed: bool,
    /// The writer's: the reader's position when last looked at. Room is counted from it and
    /// the shared one is read again only when that is not enough: reading it on every send
    /// moves its cache line between the cores twice per message (the reader writes it).
    tail_seen: u64,
}

impl Channel {
    fn control(&self) -> &Control {
        // SAFETY: the mapping is page-aligned and at least HEADER bytes long, and Control is
        // HEADER bytes of atomics, valid for any bit pattern; both processes only use atomics.
        unsafe { &*(self.map.ptr as *const Control) }
    }

    /// Copies `src` into the ring at position `pos` (wrapping).
    fn put(&mut self, pos: u64, src: &[u8]) {
        let at = (pos % self.cap as u64) as usize;
        let first = src.len().min(self.cap - at);
        // SAFETY: `at + first <= cap` and `src.len() - first <= cap`, inside the data area of
        // the mapping; the region is the writer's until `head` is published.
        unsafe {
            let data = self.map.ptr.add(HEADER);
            std::ptr::copy_nonoverlapping(src.as_ptr(), data.add(at), first);
            std::ptr::copy_nonoverlapping(src.as_ptr().add(first), data, src.len() - first);
        }
    }

    /// Copies from the ring at position `pos` (wrapping) into `dst`.
    fn take(&self, pos: u64, dst: &mut [u8]) {
        let at = (pos % self.cap as u64) as usize;
        let first = dst.len().min(self.cap - at);
        // SAFETY: as in `put`; the region was published by the writer and is the reader's until
        // `tail` moves past it.
        unsafe {
            let data = self.map.ptr.add(HEADER);
            std::ptr::copy_nonoverlapping(data.add(at), dst.as_mut_ptr(), first);
            std::ptr::copy_nonoverlapping(data, dst.as_mut_ptr().add(first), dst.len() - first);
        }
    }

    /// Bytes in the ring, checked: a peer that wrote nonsense is a protocol error.
    fn used(&self, head: u64, tail: u64) -> Result<usize> {
        match head.checked_sub(tail) {
            Some(n) if n <= self.cap as u64 => Ok(n as usize),
            _ => Err(Error::protocol(
                &self.peer,
                format!("corrupt shared-memory ring (head {head}, tail {tail})"),
            )),
        }
    }

    /// Wakes the other side if it sleeps (`flag` set). A full socket already wakes it.
    fn ring_bell(&mut self, flag: &AtomicU32) -> Result<()> {
        if flag.load(Ordering::SeqCst) == 0 {
            return Ok(());
        }
        match ringlet_core::io::send_nosignal(&self.sock, &[1]) {
            Ok(_) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(()),
            Err(e) => Err(Error::PeerLost {
                peer: self.peer.clone(),
                detail: format!("its shared-memory doorbell failed: {e}"),
            }),
        }
    }

    /// Reads (and drops) doorbell bytes; notes the peer's hang-up.
    fn drain(&mut self) {
        let mut sink = [0u8; 64];
        loop {
            match (&self.sock).read(&mut sink) {
                Ok(0) => {
                    self.peer_closed = true;
                    return;
                }
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(_) => {
                    self.peer_closed = true;
                    return;
                }
            }
        }
    }

    fn lost(&self) -> Error {
        Error::PeerLost {
            peer: self.peer.clone(),
            detail: "it closed the connection".into(),
        }
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.sock.as_raw_fd()
    }
}

/// Our end of a channel to a peer.
pub(crate) struct Writer(Channel);

/// Our end of a channel from a peer.
pub(crate) struct Reader(Channel);

impl Writer {
    /// Creates the ring, hands it to the peer over `sock` (authenticated already) and returns
    /// our end.
    pub(crate) fn create(sock: UnixStream, peer: PeerId) -> Result<Writer> {
        let io = |what: &str, e: io::Error| Error::io(format!("{what} for {peer}"), e);
        let len = HEADER + RING_BYTES;
        let fd = memfd(len).map_err(|e| io("creating a shared-memory ring", e))?;
        let map = Mapping::of(&fd, len).map_err(|e| io("mapping a shared-memory ring", e))?;
        // A peer that closed its end after the handshake (it failed and exited meanwhile) is a
        // lost peer, as a closed TCP link is: its abort notice may be waiting, and is looked for.
        send_fd(&sock, &fd).map_err(|e| match e.kind() {
            io::ErrorKind::BrokenPipe
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted => Error::PeerLost {
                peer: peer.clone(),
                detail: format!("it closed its shared-memory socket before taking the ring ({e})"),
            },
            _ => io("handing over a shared-memory ring", e),
        })?;
        sock.set_nonblocking(true)
            .map_err(|e| io("configuring a doorbell", e))?;
        Ok(Writer(Channel {
            map,
            cap: RING_BYTES,
            sock,
            peer,
            peer_closed: false,
            tail_seen: 0,
        }))
    }

    /// Writes what fits of `bufs`; `Ok(0)` when the ring is full.
    pub(crate) fn send(&mut self, bufs: &[IoSlice<'_>]) -> Result<usize> {
        if self.0.peer_closed {
            return Err(self.0.lost());
        }
        let c = self.0.control();
        let head = c.head.load(Ordering::Relaxed);
        let mut space = self.0.cap - self.0.used(head, self.0.tail_seen)?;
        if space < bufs.iter().map(|b| b.len()).sum() {
            let tail = c.tail.load(Ordering::Acquire);
            space = self.0.cap - self.0.used(head, tail)?;
            self.0.tail_seen = tail;
        }
        let mut pos = head;
        for b in bufs {
            // Published piece by piece, so the reader copies out one piece while we copy in the
            // next (a large frame would otherwise cross in two strictly serial copies).
            for piece in b.chunks(PIECE) {
                if space == 0 {
                    break;
                }
                let n = piece.len().min(space);
                self.0.put(pos, &piece[..n]);
                pos += n as u64;
                space -= n;
                self.0.control().head.store(pos, Ordering::SeqCst);
            }
        }
        let n = (pos - head) as usize;
        if n > 0 {
            let flag = &self.0.control().reader_waiting as *const AtomicU32;
            // SAFETY: `flag` points into our mapping, alive for this call.
            self.0.ring_bell(unsafe { &*flag })?;
        }
        Ok(n)
    }

    /// Whether a send could write something now.
    pub(crate) fn ready(&self) -> bool {
        let c = self.0.control();
        let (head, tail) = (
            c.head.load(Ordering::Relaxed),
            c.tail.load(Ordering::SeqCst),
        );
        self.0.peer_closed || head.wrapping_sub(tail) < self.0.cap as u64
    }

    /// Before sleeping: says so, then looks once more (the reader frees room and rings only if
    /// it sees the flag). `true`: no need to sleep.
    pub(crate) fn arm(&self) -> bool {
        self.0.control().writer_waiting.store(1, Ordering::SeqCst);
        self.ready()
    }

    /// After waking: clears the flag, reads the doorbell, notes a hang-up.
    pub(crate) fn disarm(&mut self) {
        self.0.control().writer_waiting.store(0, Ordering::SeqCst);
        self.0.drain();
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.0.fd()
    }
}

impl Reader {
    /// Receives the peer's ring over `sock` (authenticated already) and checks it.
    pub(crate) fn accept(sock: &UnixStream, peer: PeerId) -> Result<Reader> {
        let io = |what: &str, e: io::Error| Error::io(format!("{what} from {peer}"), e);
        let fd = recv_fd(sock).map_err(|e| io("receiving a shared-memory ring", e))?;
        let len = sealed_len(&fd).map_err(|why| Error::protocol(&peer, why))?;
        let map = Mapping::of(&fd, len).map_err(|e| io("mapping a shared-memory ring", e))?;
        let sock = sock
            .try_clone()
            .map_err(|e| io("keeping the doorbell", e))?;
        sock.set_nonblocking(true)
            .map_err(|e| io("configuring a doorbell", e))?;
        Ok(Reader(Channel {
            map,
            cap: len - HEADER,
            sock,
            peer,
            peer_closed: false,
            tail_seen: 0,
        }))
    }

    /// Reads what is there into `buf`; `Ok(0)` when the ring is empty. Once the peer has gone,
    /// what it wrote is still read, then `PeerLost`.
    pub(crate) fn recv(&mut self, buf: &mut [u8]) -> Result<usize> {
        let c = self.0.control();
        let tail = c.tail.load(Ordering::Relaxed);
        let head = c.head.load(Ordering::Acquire);
        let n = self.0.used(head, tail)?.min(buf.len());
        if n == 0 {
            return if self.0.peer_closed && !buf.is_empty() {
                Err(self.0.lost())
            } else {
                Ok(0)
            };
        }
        let mut at = 0;
        for piece in buf[..n].chunks_mut(PIECE) {
            self.0.take(tail + at as u64, piece);
            at += piece.len();
            // Room for the writer as soon as it is free, as it publishes piece by piece.
            self.0
                .control()
                .tail
                .store(tail + at as u64, Ordering::SeqCst);
        }
        let c = self.0.control();
        let flag = &c.writer_waiting as *const AtomicU32;
        // SAFETY: `flag` points into our mapping, alive for this call.
        self.0.ring_bell(unsafe { &*flag })?;
        Ok(n)
    }

    /// Whether a recv would find something (data, or the peer's hang-up).
    pub(crate) fn ready(&self) -> bool {
        let c = self.0.control();
        self.0.peer_closed || c.head.load(Ordering::SeqCst) != c.tail.load(Ordering::Relaxed)
    }

    /// Names the peer in errors from now on.
    pub(crate) fn rename(&mut self, peer: PeerId) {
        self.0.peer = peer;
    }

    /// As [`Writer::arm`], for data.
    pub(crate) fn arm(&self) -> bool {
        self.0.control().reader_waiting.store(1, Ordering::SeqCst);
        self.ready()
    }

    pub(crate) fn disarm(&mut self) {
        self.0.control().reader_waiting.store(0, Ordering::SeqCst);
        self.0.drain();
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.0.fd()
    }
}

/// An anonymous, sealed file of `len` bytes: the peer can neither shrink it under our mapping
/// (which would fault) nor grow it.
fn memfd(len: usize) -> io::Result<OwnedFd> {
    let name = c"ringlet-ring";
    // SAFETY: a NUL-terminated name and flags; the result is checked.
    let raw =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: plain calls on our fd; results checked.
    unsafe {
        if libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) != 0 {
            return Err(io::Error::last_os_error());
        }
        let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        if libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(fd)
}

/// The size of a ring a peer handed us, once we know it cannot shrink and is a sane size.
fn sealed_len(fd: &OwnedFd) -> std::result::Result<usize, String> {
    // SAFETY: fcntl and fstat on an fd we own, into a zeroed struct; results checked.
    let (seals, size) = unsafe {
        let seals = libc::fcntl(fd.as_raw_fd(), libc::F_GET_SEALS);
        let mut st: libc::stat = std::mem::zeroed();
        if libc::fstat(fd.as_raw_fd(), &mut st) != 0 {
            return Err("its shared-memory ring cannot be examined".into());
        }
        (seals, st.st_size)
    };
    if seals < 0 || seals & libc::F_SEAL_SHRINK == 0 {
        return Err("its shared-memory ring is not sealed against shrinking".into());
    }
    match usize::try_from(size) {
        Ok(len) if len > HEADER && len - HEADER <= MAX_RING => Ok(len),
        _ => Err(format!(
            "its shared-memory ring has an unusable size ({size} bytes)"
        )),
    }
}

/// Sends `fd` with one byte over `sock` (`SCM_RIGHTS`).
fn send_fd(sock: &UnixStream, fd: &OwnedFd) -> io::Result<()> {
    use rustix::net::{sendmsg, SendAncillaryBuffer, SendAncillaryMessage, SendFlags};
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds = [fd.as_fd()];
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(io::Error::other("no room for the ring's fd"));
    }
    loop {
        match sendmsg(
            sock,
            &[IoSlice::new(&[1])],
            &mut control,
            SendFlags::NOSIGNAL,
        ) {
            Ok(1) => return Ok(()),
            Ok(_) => return Err(io::Error::other("the ring's fd went out without its byte")),
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

/// Receives one fd sent by [`send_fd`] (blocking, bounded by the socket's read timeout). Only a
/// message of one byte and exactly one fd is accepted; every fd a message carries is owned at
/// once, so those we refuse are closed, and `CMSG_CLOEXEC` keeps them from children.
fn recv_fd(sock: &UnixStream) -> io::Result<OwnedFd> {
    use rustix::net::{recvmsg, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags};
    // Room for more than one fd, so that a peer sending several cannot make us drop any unseen.
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut byte = [0u8];
    let got = loop {
        match recvmsg(
            sock,
            &mut [io::IoSliceMut::new(&mut byte)],
            &mut control,
            RecvFlags::CMSG_CLOEXEC,
        ) {
            Ok(got) => break got,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(e.into()),
        }
    };
    let mut fds: Vec<OwnedFd> = Vec::new();
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(rights) = message {
            fds.extend(rights);
        }
    }
    if got.bytes != 1 || got.flags.contains(ReturnFlags::CTRUNC) || fds.len() != 1 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            "no ring in the message",
        ));
    }
    Ok(fds.remove(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, Instant};

    fn pair() -> (Writer, Reader) {
        let (a, b) = UnixStream::pair().unwrap();
        b.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let w = Writer::create(a, PeerId::rank(1, "shm")).unwrap();
        let r = Reader::accept(&b, PeerId::rank(0, "shm")).unwrap();
        (w, r)
    }

    /// A peer gone between the handshake and the hand-over (it failed and exited) is a lost
    /// peer, not an I/O error: only then is its abort notice looked for.
    #[test]
    fn a_peer_that_closed_before_taking_the_ring_is_lost() {
        let (a, b) = UnixStream::pair().unwrap();
        drop(b);
        match Writer::create(a, PeerId::rank(1, "shm")) {
            Err(Error::PeerLost { peer, detail }) => {
                assert_eq!(peer.rank, Some(1));
                assert!(detail.contains("before taking the ring"), "{detail}");
            }
            Err(e) => panic!("not PeerLost: {e}"),
            Ok(_) => panic!("a ring handed to no one"),
        }
    }

    #[test]
    fn bytes_wrap_around_the_ring_in_order() {
        let (mut w, mut r) = pair();
        let msg: Vec<u8> = (0..3 * RING_BYTES + 12345)
            .map(|i| (i * 31 % 251) as u8)
            .collect();
        let mut got = Vec::with_capacity(msg.len());
        let mut sent = 0;
        let mut buf = vec![0u8; 777_777];
        let deadline = Instant::now() + Duration::from_secs(20);
        while got.len() < msg.len() {
            assert!(Instant::now() < deadline);
            sent += w.send(&[IoSlice::new(&msg[sent..])]).unwrap();
            let n = r.recv(&mut buf).unwrap();
            got.extend_from_slice(&buf[..n]);
        }
        assert_eq!(got, msg);
        assert!(!r.ready());
    }

    #[test]
    fn doorbells_ring_only_for_a_sleeper_and_a_dead_writer_is_seen() {
        let (mut w, mut r) = pair();
        assert!(!r.arm());
        assert_eq!(w.send(&[IoSlice::new(b"ping")]).unwrap(), 4);
        // The reader slept: a byte is on its socket.
        let mut fds = [libc::pollfd {
            fd: r.fd(),
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: one initialised pollfd.
        assert_eq!(unsafe { libc::poll(fds.as_mut_ptr(), 1, 1000) }, 1);
        r.disarm();
        let mut buf = [0u8; 8];
        assert_eq!(r.recv(&mut buf).unwrap(), 4);
        drop(w);
        // SAFETY: as above.
        assert_eq!(unsafe { libc::poll(fds.as_mut_ptr(), 1, 1000) }, 1);
        r.disarm();
        assert!(r.ready());
        assert!(matches!(r.recv(&mut buf), Err(Error::PeerLost { .. })));
    }

    #[test]
    fn a_ring_with_nonsense_positions_is_a_protocol_error() {
        let (w, mut r) = pair();
        w.0.control().head.store(u64::MAX, Ordering::SeqCst);
        let mut buf = [0u8; 8];
        let e = r.recv(&mut buf).unwrap_err().to_string();
        assert!(e.contains("corrupt shared-memory ring"), "{e}");
    }
}
