//! Engine links: the shell traffic between a controller and an engine on the same host over
//! one Unix stream, read and written by the threads that use it (decision 0017).
//!
//! Through libzmq every message crosses two extra threads (the sender's and the receiver's
//! libzmq I/O threads), each a wake-up; on a link the sending thread writes to the stream and
//! the kernel wakes the receiving thread directly. A link carries the same signed Jupyter
//! messages as the ZMQ shell channels (everything after the routing identity), each framed as
//!
//! ```text
//! u8 channel   (CH_MUX, CH_TASK, or CH_LINK for the link's own hello and welcome)
//! 3 bytes      zero
//! u32 LE       frame count n (1 ..= limit)
//! n × u64 LE   frame lengths
//! the frames' bytes, in order
//! ```
//!
//! This module holds the framing only: [`LinkReader`] parses what a non-blocking descriptor
//! gives into whole messages (large frames are read straight into their own allocation, which
//! becomes the received frame: no copy), [`LinkWriter`] queues messages and writes them with
//! `writev(2)` from the frames' own memory.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixStream};
use std::time::{Duration, Instant};

use fp_wire::Value;

use crate::outframe::{RawMsg, ReadyFrames, RecvFrame, ReleaseQueue};
use crate::session::{OutgoingMessage, SessionCore};

/// Channel of direct (MUX) requests and replies.
pub const CH_MUX: u8 = 0;
/// Channel of load-balanced task requests and replies.
pub const CH_TASK: u8 = 1;
/// Channel of the link's own messages (the engine's hello, the controller's welcome).
pub const CH_LINK: u8 = 0xFF;
/// `msg_type` of the signed message an engine opens its link with (content `{"uuid": ...}`).
pub const HELLO: &str = "fp_link_hello";
/// The one frame of the controller's answer to a valid hello.
pub const WELCOME: &[u8] = b"fp-link-welcome";

const HEAD: usize = 8;
/// Bytes read from the descriptor at a time into the staging buffer.
const STAGE: usize = 256 * 1024;
/// A frame at least this long whose bytes are not staged yet is read straight into place.
const DIRECT_MIN: usize = 64 * 1024;
/// Bytes one [`LinkReader::read`] takes at most: a 1 GiB message arrives over several calls,
/// so that the thread reading it (the controller's event loop) serves its other peers and
/// its heartbeat meanwhile.
const READ_BUDGET: usize = 16 << 20;
/// Most iovecs given to one `writev(2)` (Linux's IOV_MAX is 1024).
const MAX_IOV: usize = 512;

/// What a reader accepts in one message.
#[derive(Clone, Copy, Debug)]
pub struct LinkLimits {
    pub max_frames: usize,
    pub max_bytes: u64,
}

impl LinkLimits {
    /// For a peer that has not proved it holds the key: a hello fits, nothing large does.
    pub const UNAUTHENTICATED: LinkLimits = LinkLimits {
        max_frames: 16,
        max_bytes: 64 * 1024,
    };
}

/// Why a link cannot be read any more.
#[derive(Debug)]
pub enum LinkError {
    /// The peer closed it; `clean` when no message was cut short.
    Closed {
        clean: bool,
    },
    Io(io::Error),
    /// The peer broke the framing or a limit.
    Protocol(String),
}

impl fmt::Display for LinkError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LinkError::Closed { clean: true } => write!(f, "the peer closed the link"),
            LinkError::Closed { clean: false } => {
                write!(f, "the peer closed the link in the middle of a message")
            }
            LinkError::Io(e) => write!(f, "link I/O error: {e}"),
            LinkError::Protocol(why) => write!(f, "bad data on the link: {why}"),
        }
    }
}

/// One received message: its channel and frames.
pub type LinkMessage = (u8, Vec<RecvFrame>);

/// The memory of one frame being received, from `libc::malloc`: freed memory goes back to
/// the system as libzmq's received frames do (glibc unmaps large blocks at once), where the
/// extension's allocator would keep a freed 1 GiB array resident in an idle engine.
struct FrameBuf {
    ptr: *mut u8,
    cap: usize,
    len: usize,
}

// SAFETY: the buffer is plain memory owned by this value alone.
unsafe impl Send for FrameBuf {}

impl FrameBuf {
    /// Room for exactly `cap` bytes, or a protocol error (never an abort).
    fn new(cap: usize) -> Result<FrameBuf, LinkError> {
        // SAFETY: malloc of at least one byte; a null result is handled.
        let ptr = unsafe { libc::malloc(cap.max(1)) }.cast::<u8>();
        if ptr.is_null() {
            return Err(LinkError::Protocol(format!(
                "cannot allocate a frame of {cap} bytes"
            )));
        }
        crate::hugepage::advise(ptr, cap);
        Ok(FrameBuf { ptr, cap, len: 0 })
    }

    fn room(&self) -> usize {
        self.cap - self.len
    }

    fn extend_from_slice(&mut self, bytes: &[u8]) {
        let n = bytes.len().min(self.room());
        // SAFETY: `n` bytes fit after `len` in the block; the source does not overlap it.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(self.len), n) };
        self.len += n;
    }

    /// Read from `fd` into the rest of the block.
    fn read_from(&mut self, fd: RawFd) -> Result<Got, LinkError> {
        // SAFETY: `ptr + len .. ptr + cap` is memory of this block that nothing else uses.
        let got = unsafe { read_raw(fd, self.ptr.add(self.len), self.room())? };
        if let Got::Bytes(n) = got {
            self.len += n;
        }
        Ok(got)
    }

    /// The frame over this block (which it then owns).
    fn into_frame(self) -> RecvFrame {
        let (ptr, len) = (self.ptr, self.len);
        std::mem::forget(self);
        // SAFETY: the block comes from libc::malloc, holds `len` initialized bytes, and is
        // handed over (forgotten here).
        unsafe { RecvFrame::from_malloc(ptr, len) }
    }
}

impl Drop for FrameBuf {
    fn drop(&mut self) {
        // SAFETY: the block came from libc::malloc and is freed once.
        unsafe { libc::free(self.ptr.cast()) };
    }
}

struct Body {
    channel: u8,
    lens: Vec<usize>,
    frames: Vec<RecvFrame>,
    /// The frame being filled (its capacity is its length), unless the next frame is not
    /// started yet (a frame whose bytes are all staged is copied from there in one go).
    cur: Option<FrameBuf>,
}

enum ReadState {
    Head,
    Lens { channel: u8, n: usize },
    Body(Body),
}

/// Parses the messages of a non-blocking stream.
pub struct LinkReader {
    staged: Vec<u8>,
    pos: usize,
    end: usize,
    state: ReadState,
    limits: LinkLimits,
}

/// Outcome of one `read(2)`.
enum Got {
    Bytes(usize),
    Eof,
    WouldBlock,
}

/// `read(2)` into `len` bytes at `dest`, retrying on EINTR.
///
/// # Safety
/// `dest..dest + len` must be writable memory (initialized or not) that nothing else uses
/// during the call.
unsafe fn read_raw(fd: RawFd, dest: *mut u8, len: usize) -> Result<Got, LinkError> {
    loop {
        // SAFETY: the caller guarantees `dest..dest + len` is ours to write; read(2) writes
        // at most `len` bytes there.
        let n = unsafe { libc::read(fd, dest.cast::<libc::c_void>(), len) };
        if n > 0 {
            return Ok(Got::Bytes(n as usize));
        }
        if n == 0 {
            return Ok(Got::Eof);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => continue,
            io::ErrorKind::WouldBlock => return Ok(Got::WouldBlock),
            _ => return Err(LinkError::Io(e)),
        }
    }
}

impl LinkReader {
    pub fn new(limits: LinkLimits) -> LinkReader {
        LinkReader {
            staged: vec![0; STAGE],
            pos: 0,
            end: 0,
            state: ReadState::Head,
            limits,
        }
    }

    pub fn set_limits(&mut self, limits: LinkLimits) {
        self.limits = limits;
    }

    /// Whether no message is partly read (nothing is lost if the stream ends here).
    pub fn at_boundary(&self) -> bool {
        matches!(self.state, ReadState::Head) && self.pos == self.end
    }

    /// Read what `fd` (non-blocking) has and append up to `max` whole messages to `out`.
    ///
    /// Returns true when it stopped at `max` messages or [`READ_BUDGET`] bytes (more may be
    /// ready without the descriptor becoming readable again), false when the descriptor had
    /// nothing more.
    pub fn read(
        &mut self,
        fd: RawFd,
        out: &mut Vec<LinkMessage>,
        max: usize,
    ) -> Result<bool, LinkError> {
        let start = out.len();
        let mut taken = 0;
        // A read that filled less than it asked for emptied the stream's receive queue (a
        // stream socket's read(2) takes everything queued up to the length asked): what it
        // brought is parsed, then the reader stops without another read(2) that would only
        // say EAGAIN (poll(2) reports the descriptor again when more arrives).
        let mut drained = false;
        loop {
            self.parse(out, start + max)?;
            if out.len() >= start + max || taken >= READ_BUDGET {
                return Ok(true);
            }
            if drained {
                return Ok(false);
            }
            let (got, asked) = match &mut self.state {
                ReadState::Body(Body { cur: Some(cur), .. })
                    if self.pos == self.end && cur.room() >= DIRECT_MIN =>
                {
                    let asked = cur.room();
                    (cur.read_from(fd)?, asked)
                }
                _ => {
                    if self.pos == self.end {
                        self.pos = 0;
                        self.end = 0;
                    } else if self.end == self.staged.len() {
                        self.staged.copy_within(self.pos..self.end, 0);
                        self.end -= self.pos;
                        self.pos = 0;
                    }
                    let room = self.staged.len() - self.end;
                    // SAFETY: `staged[end..]` is initialized memory of `room` bytes owned by
                    // this reader and not otherwise borrowed during the call.
                    let got =
                        unsafe { read_raw(fd, self.staged.as_mut_ptr().add(self.end), room)? };
                    if let Got::Bytes(n) = got {
                        self.end += n;
                    }
                    (got, room)
                }
            };
            match got {
                Got::Bytes(n) => {
                    taken += n;
                    drained = n < asked;
                }
                Got::WouldBlock => return Ok(false),
                Got::Eof => {
                    return Err(LinkError::Closed {
                        clean: self.at_boundary(),
                    })
                }
            }
        }
    }

    /// Take the staged bytes into messages, up to `max` messages in `out`.
    fn parse(&mut self, out: &mut Vec<LinkMessage>, max: usize) -> Result<(), LinkError> {
        while out.len() < max {
            let avail = self.end - self.pos;
            match &mut self.state {
                ReadState::Head => {
                    if avail < HEAD {
                        return Ok(());
                    }
                    let h = &self.staged[self.pos..self.pos + HEAD];
                    let channel = h[0];
                    if h[1..4] != [0, 0, 0] {
                        return Err(LinkError::Protocol(
                            "reserved header bytes are not zero".into(),
                        ));
                    }
                    let n = u32::from_le_bytes([h[4], h[5], h[6], h[7]]) as usize;
                    if n == 0 || n > self.limits.max_frames {
                        return Err(LinkError::Protocol(format!(
                            "a message of {n} frames (at most {} accepted)",
                            self.limits.max_frames
                        )));
                    }
                    self.pos += HEAD;
                    self.state = ReadState::Lens { channel, n };
                }
                ReadState::Lens { channel, n } => {
                    let need = *n * 8;
                    if avail < need {
                        if need > self.staged.len() {
                            self.staged.resize(need, 0);
                        }
                        return Ok(());
                    }
                    let mut lens = Vec::with_capacity(*n);
                    let mut total: u64 = 0;
                    for chunk in self.staged[self.pos..self.pos + need].chunks_exact(8) {
                        let mut b = [0u8; 8];
                        b.copy_from_slice(chunk);
                        let len = u64::from_le_bytes(b);
                        total = total.saturating_add(len);
                        if total > self.limits.max_bytes {
                            return Err(LinkError::Protocol(format!(
                                "a message of more than {} bytes",
                                self.limits.max_bytes
                            )));
                        }
                        lens.push(
                            usize::try_from(len).map_err(|_| {
                                LinkError::Protocol(format!("a frame of {len} bytes"))
                            })?,
                        );
                    }
                    self.pos += need;
                    let frames = Vec::with_capacity(lens.len());
                    self.state = ReadState::Body(Body {
                        channel: *channel,
                        lens,
                        frames,
                        cur: None,
                    });
                }
                ReadState::Body(body) => {
                    let Some(&len) = body.lens.get(body.frames.len()) else {
                        return Err(LinkError::Protocol("a message without frames".into()));
                    };
                    if body.cur.is_none() {
                        if len <= avail && len < DIRECT_MIN {
                            // all staged: one copy into the frame's own message (a small one
                            // inline in it), no block of ours to allocate and hand over
                            let bytes = &self.staged[self.pos..self.pos + len];
                            body.frames.push(RecvFrame::from_bytes(bytes));
                            self.pos += len;
                        } else {
                            body.cur = Some(FrameBuf::new(len)?);
                        }
                    }
                    if let Some(cur) = &mut body.cur {
                        let want = cur.room();
                        let take = want.min(avail);
                        cur.extend_from_slice(&self.staged[self.pos..self.pos + take]);
                        self.pos += take;
                        if take < want {
                            return Ok(());
                        }
                        if let Some(done) = body.cur.take() {
                            body.frames.push(done.into_frame());
                        }
                    }
                    if body.frames.len() < body.lens.len() {
                        continue;
                    }
                    let channel = body.channel;
                    let frames = std::mem::take(&mut body.frames);
                    self.state = ReadState::Head;
                    out.push((channel, frames));
                }
            }
        }
        Ok(())
    }
}

/// Wait up to `ms` for `events` on `fd`.
pub(crate) fn poll_fd(fd: RawFd, events: i16, ms: i32) {
    let mut p = libc::pollfd {
        fd,
        events,
        revents: 0,
    };
    // SAFETY: one valid pollfd for the duration of the call.
    unsafe { libc::poll(&mut p, 1, ms) };
}

/// Open a link to the controller's `endpoint` (`ipc://@<name>`, an abstract Unix socket): say
/// hello as `uuid` in `role` (`"engine"` or `"client"`; a message signed by `session`) and
/// wait up to `timeout` for the welcome. Returns the (non-blocking) stream and its reader,
/// ready for messages of any size.
pub(crate) fn open(
    session: &SessionCore,
    endpoint: &str,
    uuid: &str,
    role: &str,
    timeout: Duration,
) -> Result<(UnixStream, LinkReader), String> {
    let name = endpoint
        .strip_prefix("ipc://@")
        .ok_or_else(|| format!("{endpoint:?} is not an abstract ipc:// endpoint"))?;
    let addr = SocketAddr::from_abstract_name(name.as_bytes())
        .map_err(|e| format!("bad link endpoint {endpoint:?}: {e}"))?;
    let stream = UnixStream::connect_addr(&addr)
        .map_err(|e| format!("cannot connect to {endpoint}: {e}"))?;
    stream
        .set_nonblocking(true)
        .map_err(|e| format!("link: {e}"))?;
    let parts = fp_wire::Parts {
        header: session.headers.header(HELLO),
        parent_header: Value::empty_map(),
        metadata: Value::empty_map(),
        content: Value::map([
            ("uuid", Value::Str(uuid.into())),
            ("role", Value::Str(role.into())),
        ]),
    };
    let hello = session
        .build_frames(OutgoingMessage {
            idents: Vec::new(),
            parts,
            buffers: Vec::new(),
        })
        .map_err(|e| format!("cannot build the link hello: {e}"))?;
    let mut writer = LinkWriter::new();
    writer.push_ready(CH_LINK, ReadyFrames::new(hello, &ReleaseQueue::new()))?;
    let mut reader = LinkReader::new(LinkLimits::UNAUTHENTICATED);
    let deadline = Instant::now() + timeout;
    let fd = stream.as_raw_fd();
    let mut got: Vec<LinkMessage> = Vec::new();
    loop {
        let flushed = writer.flush(fd).map_err(|e| format!("link hello: {e}"))?;
        reader
            .read(fd, &mut got, 1)
            .map_err(|e| format!("no welcome on the link: {e}"))?;
        if let Some((ch, frames)) = got.first() {
            if *ch != CH_LINK || frames.len() != 1 || frames[0].as_ref() != WELCOME {
                return Err("the controller answered the link hello with something else".into());
            }
            break;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no welcome on the link within {timeout:?}"));
        }
        let events = if flushed {
            libc::POLLIN
        } else {
            libc::POLLIN | libc::POLLOUT
        };
        poll_fd(fd, events, left.as_millis().clamp(1, 100) as i32);
    }
    reader.set_limits(LinkLimits {
        max_frames: session.limits.max_frames,
        max_bytes: u64::MAX,
    });
    Ok((stream, reader))
}

/// The header and length table of a message of `frames` on `channel`.
fn encode_head(channel: u8, lens: impl ExactSizeIterator<Item = usize>) -> Vec<u8> {
    let n = lens.len();
    let mut head = Vec::with_capacity(HEAD + 8 * n);
    head.extend_from_slice(&[channel, 0, 0, 0]);
    head.extend_from_slice(&(n as u32).to_le_bytes());
    for len in lens {
        head.extend_from_slice(&(len as u64).to_le_bytes());
    }
    head
}

struct Queued {
    head: Vec<u8>,
    frames: Vec<RawMsg>,
    /// Bytes of this message (head included) already written.
    done: usize,
}

/// Messages waiting to be written to a stream, written from the frames' own memory.
#[derive(Default)]
pub struct LinkWriter {
    queue: VecDeque<Queued>,
    /// Bytes queued and not written yet.
    pub pending: usize,
}

impl LinkWriter {
    pub fn new() -> LinkWriter {
        LinkWriter::default()
    }

    /// Queue a message (frames without any routing identity). Fails when it has no frame or
    /// more than `u32::MAX`.
    pub(crate) fn push(&mut self, channel: u8, frames: Vec<RawMsg>) -> Result<(), String> {
        if frames.is_empty() || frames.len() > u32::MAX as usize {
            return Err(format!("cannot send a message of {} frames", frames.len()));
        }
        let head = encode_head(channel, frames.iter().map(|f| f.bytes().len()));
        self.pending += head.len() + frames.iter().map(|f| f.bytes().len()).sum::<usize>();
        self.queue.push_back(Queued {
            head,
            frames,
            done: 0,
        });
        Ok(())
    }

    /// Queue a message of frames converted for sending (see [`Self::push`]).
    pub fn push_ready(&mut self, channel: u8, frames: ReadyFrames) -> Result<(), String> {
        self.push(channel, frames.into_raw())
    }

    /// Queue the link's own message of one frame.
    pub fn push_control(&mut self, body: &[u8]) {
        let head = encode_head(CH_LINK, std::iter::once(body.len()));
        self.pending += head.len() + body.len();
        let frame = RecvFrame::from_bytes(body).0;
        self.queue.push_back(Queued {
            head,
            frames: vec![frame],
            done: 0,
        });
    }

    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }

    /// Write what `fd` (non-blocking) takes; true when everything queued is written.
    pub fn flush(&mut self, fd: RawFd) -> io::Result<bool> {
        while !self.queue.is_empty() {
            let mut iov: Vec<libc::iovec> = Vec::with_capacity(MAX_IOV.min(4 * self.queue.len()));
            'fill: for q in &self.queue {
                let mut skip = q.done;
                let parts =
                    std::iter::once(q.head.as_slice()).chain(q.frames.iter().map(|f| f.bytes()));
                for part in parts {
                    if skip >= part.len() {
                        skip -= part.len();
                        continue;
                    }
                    let rest = &part[skip..];
                    skip = 0;
                    iov.push(libc::iovec {
                        iov_base: rest.as_ptr() as *mut libc::c_void,
                        iov_len: rest.len(),
                    });
                    if iov.len() == MAX_IOV {
                        break 'fill;
                    }
                }
            }
            // SAFETY: every iovec points into a head or frame owned by `self.queue`, which is
            // not changed until writev returns; writev only reads them.
            let n = unsafe { libc::writev(fd, iov.as_ptr(), iov.len() as libc::c_int) };
            if n < 0 {
                let e = io::Error::last_os_error();
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    io::ErrorKind::WouldBlock => return Ok(false),
                    _ => return Err(e),
                }
            }
            self.advance(n as usize);
        }
        Ok(true)
    }

    /// Count `n` more bytes written: drop the messages written whole.
    fn advance(&mut self, mut n: usize) {
        self.pending = self.pending.saturating_sub(n);
        while n > 0 {
            let Some(q) = self.queue.front_mut() else {
                return;
            };
            let total = q.head.len() + q.frames.iter().map(|f| f.bytes().len()).sum::<usize>();
            let left = total - q.done;
            if n >= left {
                n -= left;
                self.queue.pop_front();
            } else {
                q.done += n;
                n = 0;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn raw(bytes: &[u8]) -> RawMsg {
        RecvFrame::from_bytes(bytes).0
    }

    fn pair() -> (UnixStream, UnixStream) {
        let (a, b) = UnixStream::pair().expect("pair");
        a.set_nonblocking(true).expect("nb");
        b.set_nonblocking(true).expect("nb");
        (a, b)
    }

    /// Write everything queued, reading on the other side meanwhile (so big messages fit).
    fn pump(
        w: &mut LinkWriter,
        a: &UnixStream,
        r: &mut LinkReader,
        b: &UnixStream,
    ) -> Vec<LinkMessage> {
        let mut out = Vec::new();
        loop {
            let drained = w.flush(a.as_raw_fd()).expect("flush");
            r.read(b.as_raw_fd(), &mut out, 1000).expect("read");
            if drained {
                while r.read(b.as_raw_fd(), &mut out, 1000).expect("read") {}
                return out;
            }
        }
    }

    #[test]
    fn messages_of_every_size_arrive_whole_and_in_order() {
        let (a, b) = pair();
        let mut w = LinkWriter::new();
        let mut r = LinkReader::new(LinkLimits {
            max_frames: 1 << 16,
            max_bytes: u64::MAX,
        });
        let big: Vec<u8> = (0..(5 << 20)).map(|i| (i % 251) as u8).collect();
        let sizes = [0usize, 1, 64, 65, 4096, DIRECT_MIN, STAGE + 3];
        for (k, &size) in sizes.iter().enumerate() {
            let frames = vec![raw(b"<IDS|MSG>"), raw(&big[..size]), raw(&big[k..k + 10])];
            w.push(CH_TASK, frames).expect("push");
        }
        w.push(CH_MUX, vec![raw(&big)]).expect("push");
        w.push_control(WELCOME);
        let got = pump(&mut w, &a, &mut r, &b);
        assert_eq!(got.len(), sizes.len() + 2);
        for (k, &size) in sizes.iter().enumerate() {
            let (ch, frames) = &got[k];
            assert_eq!(*ch, CH_TASK);
            assert_eq!(frames.len(), 3);
            assert_eq!(frames[0].as_ref(), b"<IDS|MSG>");
            assert_eq!(frames[1].as_ref(), &big[..size]);
            assert_eq!(frames[2].as_ref(), &big[k..k + 10]);
        }
        assert_eq!(got[sizes.len()].1[0].as_ref(), &big[..]);
        assert_eq!(got[sizes.len() + 1].0, CH_LINK);
        assert_eq!(got[sizes.len() + 1].1[0].as_ref(), WELCOME);
        assert!(r.at_boundary());
        assert_eq!(w.pending, 0);
    }

    /// The `VmFlags` of the mapping of `/proc/self/smaps` that holds `addr`.
    fn vm_flags(addr: usize) -> String {
        let smaps = std::fs::read_to_string("/proc/self/smaps").expect("smaps");
        let mut inside = false;
        for line in smaps.lines() {
            if let Some((range, _)) = line.split_once(' ') {
                if let Some((lo, hi)) = range.split_once('-') {
                    if let (Ok(lo), Ok(hi)) =
                        (usize::from_str_radix(lo, 16), usize::from_str_radix(hi, 16))
                    {
                        inside = (lo..hi).contains(&addr);
                        continue;
                    }
                }
            }
            if let Some(flags) = line.strip_prefix("VmFlags:") {
                if inside {
                    return flags.to_string();
                }
            }
        }
        panic!("{addr:#x} is in no mapping");
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn large_frames_are_received_into_memory_advised_huge_pages() {
        if !std::path::Path::new("/sys/kernel/mm/transparent_hugepage").exists() {
            return; // a kernel without THP refuses the advice (which is then ignored)
        }
        let (a, b) = pair();
        let mut w = LinkWriter::new();
        let mut r = LinkReader::new(LinkLimits {
            max_frames: 4,
            max_bytes: u64::MAX,
        });
        let big: Vec<u8> = (0..(8 << 20)).map(|i| (i % 241) as u8).collect();
        w.push(CH_MUX, vec![raw(&big)]).expect("push");
        let got = pump(&mut w, &a, &mut r, &b);
        let frame = got[0].1[0].as_ref();
        assert_eq!(frame, &big[..]);
        // the middle of the frame lies in its 2 MiB-aligned interior
        let middle = frame.as_ptr() as usize + frame.len() / 2;
        let flags = vm_flags(middle);
        assert!(flags.split_whitespace().any(|f| f == "hg"), "{flags}");
    }

    #[test]
    fn a_message_larger_than_the_read_budget_arrives_whole() {
        let (a, b) = pair();
        let mut w = LinkWriter::new();
        let big = vec![3u8; 3 * READ_BUDGET];
        w.push(CH_MUX, vec![raw(&big)]).expect("push");
        let mut r = LinkReader::new(LinkLimits {
            max_frames: 4,
            max_bytes: u64::MAX,
        });
        let (mut out, mut calls) = (Vec::new(), 0);
        while out.is_empty() {
            let drained = w.flush(a.as_raw_fd()).expect("flush");
            let more = r.read(b.as_raw_fd(), &mut out, 10).expect("read");
            calls += 1;
            if drained && !more && out.is_empty() {
                poll_fd(b.as_raw_fd(), libc::POLLIN, 10);
            }
        }
        // (over many calls: the socket buffer holds far less than the read budget)
        assert!(calls >= 3, "{calls} calls");
        assert_eq!(out[0].1[0].as_ref(), &big[..]);
    }

    #[test]
    fn bytes_arriving_one_at_a_time_still_make_messages() {
        let (c, d) = pair();
        let mut w = LinkWriter::new();
        w.push(CH_MUX, vec![raw(b"one"), raw(&[7u8; 300])])
            .expect("push");
        w.push(CH_TASK, vec![raw(b"two")]).expect("push");
        let mut whole = Vec::new();
        for q in &w.queue {
            whole.extend_from_slice(&q.head);
            for f in &q.frames {
                whole.extend_from_slice(f.bytes());
            }
        }
        let mut r = LinkReader::new(LinkLimits::UNAUTHENTICATED);
        let mut out = Vec::new();
        for byte in whole {
            (&c).write_all(&[byte]).expect("write");
            r.read(d.as_raw_fd(), &mut out, 10).expect("read");
        }
        assert_eq!(out.len(), 2);
        assert_eq!(out[0].0, CH_MUX);
        assert_eq!(out[0].1[0].as_ref(), b"one");
        assert_eq!(out[0].1[1].as_ref(), &[7u8; 300][..]);
        assert_eq!(out[1].1[0].as_ref(), b"two");
        assert!(r.at_boundary());
    }

    #[test]
    fn a_short_read_ends_the_call_without_another_read() {
        // On a blocking stream a second read(2) would wait for more: the reader must stop
        // after a read that came back short (it emptied the receive queue), which saves the
        // EAGAIN read per poll pass on the non-blocking links.
        let (a, b) = UnixStream::pair().expect("pair");
        let mut w = LinkWriter::new();
        w.push(CH_TASK, vec![raw(b"one")]).expect("push");
        w.push(CH_MUX, vec![raw(b"two"), raw(&[9u8; 70_000])])
            .expect("push");
        while !w.flush(a.as_raw_fd()).expect("flush") {}
        let (tx, rx) = std::sync::mpsc::channel();
        let reader = std::thread::spawn(move || {
            let mut r = LinkReader::new(LinkLimits {
                max_frames: 4,
                max_bytes: 1 << 20,
            });
            let mut out = Vec::new();
            let mut calls = 0;
            while out.len() < 2 {
                assert!(!r.read(b.as_raw_fd(), &mut out, 10).expect("read"));
                calls += 1;
            }
            tx.send((out, calls)).expect("send");
            b // (kept open until the check is done)
        });
        let (out, calls) = rx
            .recv_timeout(Duration::from_secs(5))
            .expect("the reader blocked in a read(2) after a short one");
        assert!(calls <= 2, "{calls} calls");
        assert_eq!(out[0].1[0].as_ref(), b"one");
        assert_eq!(out[1].1[1].as_ref(), &[9u8; 70_000][..]);
        drop(a);
        reader.join().expect("join");
    }

    #[test]
    fn limits_and_bad_framing_are_errors_not_allocations() {
        let cases: [(&[u8], &str); 3] = [
            (&[0, 0, 0, 0, 0, 0, 0, 0], "0 frames"),
            (&[0, 0, 0, 0, 17, 0, 0, 0], "17 frames"),
            (&[0, 1, 0, 0, 1, 0, 0, 0], "reserved"),
        ];
        for (bytes, what) in cases {
            let (a, b) = pair();
            (&a).write_all(bytes).expect("write");
            let mut r = LinkReader::new(LinkLimits::UNAUTHENTICATED);
            let err = r.read(b.as_raw_fd(), &mut Vec::new(), 10).expect_err(what);
            assert!(matches!(err, LinkError::Protocol(_)), "{what}: {err}");
        }
        // a declared frame of 1 TiB from an unauthenticated peer: refused before allocating
        let (a, b) = pair();
        let mut bytes = vec![0u8, 0, 0, 0, 1, 0, 0, 0];
        bytes.extend_from_slice(&(1u64 << 40).to_le_bytes());
        (&a).write_all(&bytes).expect("write");
        let mut r = LinkReader::new(LinkLimits::UNAUTHENTICATED);
        assert!(matches!(
            r.read(b.as_raw_fd(), &mut Vec::new(), 10),
            Err(LinkError::Protocol(_))
        ));
        // a stream that ends mid-message is not a clean close
        let (a, b) = pair();
        (&a).write_all(&[0, 0, 0, 0, 1, 0, 0, 0, 5, 0])
            .expect("write");
        drop(a);
        let mut r = LinkReader::new(LinkLimits::UNAUTHENTICATED);
        // (the first read(2) comes back short: the end of the stream is the next one's)
        assert!(matches!(
            r.read(b.as_raw_fd(), &mut Vec::new(), 10),
            Ok(false)
        ));
        assert!(matches!(
            r.read(b.as_raw_fd(), &mut Vec::new(), 10),
            Err(LinkError::Closed { clean: false })
        ));
        let (a, b) = pair();
        drop(a);
        assert!(matches!(
            LinkReader::new(LinkLimits::UNAUTHENTICATED).read(b.as_raw_fd(), &mut Vec::new(), 10),
            Err(LinkError::Closed { clean: true })
        ));
    }
}
