//! The direct data stream: length-prefixed messages over a plain TCP connection between two
//! ferroparallel processes (decisions 0014 and 0016).
//!
//! Large buffers go from the lender's memory into the kernel and from the kernel into the
//! receiver's frames, with no broker thread in between (libzmq hands every message to its own
//! I/O thread), and their MAC is computed while they move on the sending side (by a second
//! thread), once they have arrived on the receiving side (AES-GMAC, about 4x keyed BLAKE3).
//!
//! One message on the wire:
//!
//! ```text
//! "FPds"  count: u32 BE  flags: u32 BE  count × length: u64 BE  the frames' bytes
//!         [nonce: 8 bytes  MAC: 32 bytes]
//! ```
//!
//! `flags & 4` says a nonce and a MAC follow: keyed BLAKE3 over the msg_id of the request the
//! message answers, the nonce and a keyed digest of its frames ([`fp_wire::StreamKey::mac`],
//! [`fp_wire::StreamDigest`]: keyed BLAKE3 over each frame's AES-256-GMAC tag under the nonce).
//! The sender computes that digest once per loan ([`LoanDigest`]), with a fresh random nonce,
//! however many peers fetch it; each receiver computes it over the bytes it received. (Flag
//! 1 was version 1's MAC over the request and the frames, hashed again for every fetch, flag 2
//! version 2's keyed BLAKE3 digest of the bytes: both refused.)
//! Both ends are ours: no other peer speaks this.

use fp_wire::{StreamKey, StreamNonce};
use std::io::{self, ErrorKind, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::os::fd::AsRawFd;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

/// First bytes of every message.
pub const MAGIC: [u8; 4] = *b"FPds";
const FLAG_MAC: u32 = 4;
/// Version 1's MAC flag (a peer of another ferroparallel version).
const FLAG_MAC_V1: u32 = 1;
/// Version 2's MAC flag (keyed BLAKE3 over the bytes, no nonce: another ferroparallel version).
const FLAG_MAC_V2: u32 = 2;
/// Longest a blocking read or write waits before the caller's tick is asked whether to go on.
pub const TICK: Duration = Duration::from_millis(250);
/// Frames up to this size are gathered into one write with the header.
const SMALL_FRAME: usize = 64 * 1024;

/// A loan's digest and the nonce it was computed under.
type Sealed = (StreamNonce, [u8; 32]);

/// What a receiver accepts in one message; anything larger is refused before it is read.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_bytes: u64,
    pub max_frames: u32,
    /// Once its first byte has arrived, the whole message must arrive within this time (a
    /// server waits for requests without a deadline, but not for the rest of a started one).
    pub message_time: Option<Duration>,
}

/// What authenticates one message: the stream key and the request it answers (its msg_id).
#[derive(Debug, Clone, Copy)]
pub struct MacFor<'a> {
    pub key: &'a StreamKey,
    pub context: &'a [u8],
}

/// Which frames a digest is of: the key, and each frame's address and length. (A loan holds
/// its buffers for as long as its `LoanDigest` lives: the same addresses are the same memory.)
#[derive(Debug, Clone, PartialEq, Eq)]
struct DigestOf {
    key: StreamKey,
    frames: Vec<(usize, usize)>,
}

impl DigestOf {
    fn new(key: &StreamKey, frames: &[&[u8]]) -> DigestOf {
        DigestOf {
            key: key.clone(),
            frames: frames
                .iter()
                .map(|f| (f.as_ptr() as usize, f.len()))
                .collect(),
        }
    }
}

#[derive(Debug, Default)]
enum DigestState {
    #[default]
    Empty,
    /// A send of these frames is hashing them.
    Computing(DigestOf),
    Done(DigestOf, Sealed),
}

/// The digest of one loan's frames, shared by every send of it: the first send hashes the
/// frames (while it writes them), the others, before or meanwhile, only write and then take
/// its digest. (The sender's bytes are its own: whether it hashed them once or once per
/// fetch, each receiver still hashes every byte it receives under the key.)
#[derive(Debug, Default)]
pub struct LoanDigest {
    state: Mutex<DigestState>,
    ready: Condvar,
    /// how many times a digest was stored (computed for the sends sharing it)
    stored: std::sync::atomic::AtomicU32,
}

/// What a send does about the digest of its frames.
enum Role<'a> {
    /// Known already.
    Known(Sealed),
    /// Hash them (and, with a claim, store the digest for the other sends).
    Hash(Option<Claim<'a>>),
    /// Another send is hashing them: wait for its digest once the bytes are written.
    Wait,
}

/// The right to compute a loan's digest; dropped without [`Claim::store`] (a failed send), it
/// lets the next waiting send compute it.
struct Claim<'a> {
    cache: &'a LoanDigest,
    stored: bool,
}

impl Claim<'_> {
    fn store(mut self, of: DigestOf, digest: Sealed) {
        *self.cache.lock() = DigestState::Done(of, digest);
        self.cache
            .stored
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.stored = true;
        self.cache.ready.notify_all();
    }
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        if !self.stored {
            *self.cache.lock() = DigestState::Empty;
            self.cache.ready.notify_all();
        }
    }
}

impl LoanDigest {
    pub fn new() -> LoanDigest {
        LoanDigest::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, DigestState> {
        // the state is replaced whole: a panic cannot leave it half written
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the digest of some frames is known (tests and diagnostics).
    pub fn is_known(&self) -> bool {
        matches!(*self.lock(), DigestState::Done(..))
    }

    /// How many times the frames were hashed for this loan's sends (tests and diagnostics).
    pub fn times_hashed(&self) -> u32 {
        self.stored.load(std::sync::atomic::Ordering::Relaxed)
    }

    fn begin(&self, of: &DigestOf) -> Role<'_> {
        let mut state = self.lock();
        match &*state {
            DigestState::Done(known, d) if known == of => return Role::Known(*d),
            DigestState::Computing(known) if known == of => return Role::Wait,
            // other frames (the loan grew) are being hashed: hash these without sharing
            DigestState::Computing(_) => return Role::Hash(None),
            _ => {}
        }
        *state = DigestState::Computing(of.clone());
        Role::Hash(Some(Claim {
            cache: self,
            stored: false,
        }))
    }

    /// Wait for the send hashing `of` to store its digest; `None` when it failed (or other
    /// frames took its place): the caller hashes them itself.
    fn wait(
        &self,
        of: &DigestOf,
        deadline: Option<Instant>,
        tick: Tick<'_>,
    ) -> Result<Option<Sealed>, StreamError> {
        let mut state = self.lock();
        loop {
            match &*state {
                DigestState::Done(known, d) if known == of => return Ok(Some(*d)),
                DigestState::Computing(known) if known == of => {}
                _ => return Ok(None),
            }
            let (next, waited) = self
                .ready
                .wait_timeout(state, TICK)
                .unwrap_or_else(|e| e.into_inner());
            state = next;
            if waited.timed_out() {
                drop(state);
                check_deadline(deadline)?;
                tick()?;
                state = self.lock();
            }
        }
    }
}

/// The digest of `frames` under a fresh nonce; `Ok(None)` when `stop` was set meanwhile.
fn hash_frames(
    key: &StreamKey,
    frames: &[&[u8]],
    stop: Option<&std::sync::atomic::AtomicBool>,
) -> Result<Option<Sealed>, StreamError> {
    let nonce = StreamKey::fresh_nonce()
        .map_err(|e| StreamError::Io(io::Error::other(format!("no random nonce: {e}"))))?;
    let mut digest = key.digest(&nonce, frames.len() as u64);
    for f in frames {
        if stop.is_some_and(|s| s.load(std::sync::atomic::Ordering::Relaxed)) {
            return Ok(None);
        }
        digest.frame(f).map_err(|_| gmac_failed())?;
    }
    Ok(Some((nonce, digest.finish())))
}

fn gmac_failed() -> StreamError {
    StreamError::Malformed("a frame too large for AES-GMAC".into())
}

/// Why a message could not be sent or received. After any error the stream is out of step and
/// must be closed.
#[derive(Debug)]
pub enum StreamError {
    /// The peer closed the connection (`at_start`: before the first byte of a message).
    Closed {
        at_start: bool,
    },
    /// The deadline passed.
    Timeout,
    /// The caller's tick asked to stop (a signal, an abandoned fetch).
    Stopped(String),
    /// Not a message of this protocol, or larger than the receiver's limits.
    Malformed(String),
    /// The frames do not match their MAC, or the MAC is missing.
    BadMac(&'static str),
    Io(io::Error),
}

impl std::fmt::Display for StreamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StreamError::Closed { .. } => write!(f, "the peer closed the data connection"),
            StreamError::Timeout => write!(f, "timed out"),
            StreamError::Stopped(why) => write!(f, "{why}"),
            StreamError::Malformed(why) => write!(f, "malformed data stream message: {why}"),
            StreamError::BadMac(why) => write!(f, "{why}"),
            StreamError::Io(e) => write!(f, "{e}"),
        }
    }
}

impl std::error::Error for StreamError {}

/// Called whenever a read or write has waited [`TICK`]: an error stops the transfer.
pub type Tick<'a> = &'a mut dyn FnMut() -> Result<(), StreamError>;

fn waited(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

fn check_deadline(deadline: Option<Instant>) -> Result<(), StreamError> {
    match deadline {
        Some(d) if Instant::now() >= d => Err(StreamError::Timeout),
        _ => Ok(()),
    }
}

/// Prepare a connected stream: no Nagle delay, reads and writes that wake up every [`TICK`].
pub fn configure(stream: &TcpStream) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(TICK))?;
    stream.set_write_timeout(Some(TICK))?;
    Ok(())
}

/// Connect to `tcp://host:port` within `timeout`.
pub fn connect(endpoint: &str, timeout: Duration) -> Result<TcpStream, StreamError> {
    let addr = endpoint.strip_prefix("tcp://").ok_or_else(|| {
        StreamError::Malformed(format!("{endpoint:?} is not a tcp://host:port endpoint"))
    })?;
    let mut last = io::Error::new(ErrorKind::NotFound, format!("{addr} resolves to nothing"));
    let addrs = addr.to_socket_addrs().map_err(StreamError::Io)?;
    for a in addrs {
        match TcpStream::connect_timeout(&a, timeout) {
            Ok(s) => {
                configure(&s).map_err(StreamError::Io)?;
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(StreamError::Io(last))
}

/// A listening socket bound on `host` (any free port); returns it and its `tcp://` endpoint.
pub fn listen(host: &str) -> io::Result<(TcpListener, String)> {
    let listener = TcpListener::bind((host, 0))?;
    listener.set_nonblocking(true)?;
    let local = listener.local_addr()?;
    let endpoint = if local.is_ipv6() {
        format!("tcp://[{}]:{}", local.ip(), local.port())
    } else {
        format!("tcp://{local}")
    };
    Ok((listener, endpoint))
}

/// The next connection, waiting at most `timeout` (`Ok(None)` when none came).
pub fn accept(listener: &TcpListener, timeout: Duration) -> io::Result<Option<TcpStream>> {
    let deadline = Instant::now() + timeout;
    loop {
        match listener.accept() {
            Ok((stream, _)) => {
                configure(&stream)?;
                return Ok(Some(stream));
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {}
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            // a connection that failed before we took it is not the listener's failure
            Err(e) if e.kind() == ErrorKind::ConnectionAborted => continue,
            Err(e) => return Err(e),
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = left.as_millis().clamp(1, 1000) as libc::c_int;
        // SAFETY: one valid pollfd for the duration of the call; the listener outlives it.
        unsafe { libc::poll(&mut pfd, 1, ms) };
    }
}

fn write_all(
    mut stream: &TcpStream,
    mut data: &[u8],
    deadline: Option<Instant>,
    tick: Tick<'_>,
) -> Result<(), StreamError> {
    while !data.is_empty() {
        match stream.write(data) {
            Ok(0) => return Err(StreamError::Closed { at_start: false }),
            Ok(n) => data = &data[n..],
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if waited(&e) => {
                check_deadline(deadline)?;
                tick()?;
            }
            Err(e) if e.kind() == ErrorKind::BrokenPipe => {
                return Err(StreamError::Closed { at_start: false })
            }
            Err(e) => return Err(StreamError::Io(e)),
        }
    }
    Ok(())
}

/// Fill `buf`; `first` says no byte of the message was read before it (EOF there is a clean
/// close, not a truncated message).
fn read_exact(
    stream: &TcpStream,
    buf: &mut [u8],
    first: bool,
    deadline: Option<Instant>,
    tick: Tick<'_>,
) -> Result<(), StreamError> {
    let len = buf.len();
    // SAFETY: `buf` is initialized memory of `len` bytes, exclusively ours for the call.
    unsafe { read_into(stream, buf.as_mut_ptr(), len, first, deadline, tick) }
}

/// Fill `len` bytes at `dest` from the stream.
///
/// # Safety
/// `dest..dest + len` must be writable memory (initialized or not) that nothing else reads
/// or writes during the call.
unsafe fn read_into(
    stream: &TcpStream,
    dest: *mut u8,
    len: usize,
    first: bool,
    deadline: Option<Instant>,
    tick: Tick<'_>,
) -> Result<(), StreamError> {
    let mut got = 0;
    while got < len {
        // SAFETY: `dest + got .. dest + len` is writable memory reserved for us (see above);
        // read(2) only writes into it.
        let n = unsafe {
            libc::read(
                stream.as_raw_fd(),
                dest.add(got).cast::<libc::c_void>(),
                len - got,
            )
        };
        if n > 0 {
            got += n as usize;
            continue;
        }
        if n == 0 {
            return Err(StreamError::Closed {
                at_start: first && got == 0,
            });
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            ErrorKind::Interrupted => {}
            _ if waited(&e) => {
                check_deadline(deadline)?;
                tick()?;
            }
            ErrorKind::ConnectionReset => return Err(StreamError::Closed { at_start: false }),
            _ => return Err(StreamError::Io(e)),
        }
    }
    Ok(())
}

/// Fresh allocations for frames of `lens` bytes, never zeroed (the kernel writes every byte).
fn allocate(lens: &[u64]) -> Result<Vec<Vec<u8>>, StreamError> {
    let mut frames = Vec::with_capacity(lens.len());
    for &len in lens {
        let len = usize::try_from(len)
            .map_err(|_| StreamError::Malformed("frame larger than memory".into()))?;
        let mut frame: Vec<u8> = Vec::new();
        frame.try_reserve_exact(len).map_err(|_| {
            StreamError::Malformed(format!("cannot allocate a frame of {len} bytes"))
        })?;
        frames.push(frame);
    }
    Ok(frames)
}

/// Read every frame into `frames` (allocated, empty: `len` 0, capacity the frame's length).
fn read_frames(
    stream: &TcpStream,
    frames: &mut [Vec<u8>],
    deadline: Option<Instant>,
    tick: Tick<'_>,
) -> Result<(), StreamError> {
    for frame in frames.iter_mut() {
        let len = frame.capacity();
        // SAFETY: the capacity is reserved and untouched; read_into writes all of it.
        unsafe {
            read_into(stream, frame.as_mut_ptr(), len, false, deadline, tick)?;
            frame.set_len(len);
        }
    }
    Ok(())
}

/// Send one message made of `frames`; with `mac`, their MAC follows them. The frames' digest
/// is computed on another thread while they are written, unless `loan` knows it already (or
/// another send of the same loan is computing it: this one then writes its bytes and takes
/// that digest).
pub fn send_message(
    stream: &TcpStream,
    frames: &[&[u8]],
    mac: Option<MacFor<'_>>,
    loan: Option<&LoanDigest>,
    deadline: Option<Instant>,
    tick: Tick<'_>,
) -> Result<(), StreamError> {
    let count = u32::try_from(frames.len())
        .map_err(|_| StreamError::Malformed(format!("{} frames are too many", frames.len())))?;
    let flags = if mac.is_some() { FLAG_MAC } else { 0 };
    let mut head = Vec::with_capacity(12 + 8 * frames.len());
    head.extend_from_slice(&MAGIC);
    head.extend_from_slice(&count.to_be_bytes());
    head.extend_from_slice(&flags.to_be_bytes());
    for f in frames {
        head.extend_from_slice(&(f.len() as u64).to_be_bytes());
    }
    let of = mac.map(|m| DigestOf::new(m.key, frames));
    let role = match (&of, loan) {
        (None, _) => None,
        (Some(_), None) => Some(Role::Hash(None)),
        (Some(of), Some(loan)) => Some(loan.begin(of)),
    };
    // set when a write failed: the hashing thread stops at its next piece
    let stop = std::sync::atomic::AtomicBool::new(false);
    std::thread::scope(|scope| {
        let stop = &stop;
        let (role, hashing) = match role {
            Some(Role::Hash(claim)) => {
                let key = mac.map(|m| m.key).expect("a MAC was asked for");
                let thread = scope.spawn(move || hash_frames(key, frames, Some(stop)));
                (Some(Role::Hash(claim)), Some(thread))
            }
            other => (other, None),
        };
        // small frames go out with the header in one write, large ones from their own memory
        let mut staged = head;
        let mut written = Ok(());
        for f in frames {
            if f.len() <= SMALL_FRAME {
                staged.extend_from_slice(f);
                continue;
            }
            written = write_all(stream, &staged, deadline, tick)
                .and_then(|()| write_all(stream, f, deadline, tick));
            staged.clear();
            if written.is_err() {
                stop.store(true, std::sync::atomic::Ordering::Relaxed);
                break;
            }
        }
        // joined whatever happened (it reads the frames)
        let hashed = match hashing.map(|h| h.join()) {
            Some(Ok(d)) => d,
            Some(Err(_)) => return Err(StreamError::Malformed("hashing failed".into())),
            None => Ok(None),
        };
        written?; // (a claim dropped here lets a waiting send hash the frames itself)
        let (Some(m), Some(of), Some(role)) = (mac, of, role) else {
            return write_all(stream, &staged, deadline, tick);
        };
        let digest = match role {
            Role::Known(d) => d,
            Role::Hash(claim) => {
                let d = hashed?.ok_or_else(|| StreamError::Malformed("hashing stopped".into()))?;
                if let Some(claim) = claim {
                    claim.store(of, d);
                }
                d
            }
            Role::Wait => {
                let loan = loan.expect("only a loan's send waits");
                loop {
                    if let Some(d) = loan.wait(&of, deadline, tick)? {
                        break d;
                    }
                    // the send hashing them failed: this one does it
                    match loan.begin(&of) {
                        Role::Known(d) => break d,
                        Role::Wait => continue,
                        Role::Hash(claim) => {
                            let d = hash_frames(m.key, frames, None)?
                                .ok_or_else(|| StreamError::Malformed("hashing stopped".into()))?;
                            if let Some(claim) = claim {
                                claim.store(of.clone(), d);
                            }
                            break d;
                        }
                    }
                }
            }
        };
        let (nonce, digest) = digest;
        staged.extend_from_slice(&nonce);
        staged.extend_from_slice(&m.key.mac(m.context, &nonce, &digest));
        write_all(stream, &staged, deadline, tick)
    })
}

/// Receive one message within `limits`; with `mac`, it must carry a matching MAC (it is
/// checked before the frames are returned: the digest of every received byte, under the key,
/// bound to the request). `deadline` bounds the whole message.
pub fn recv_message(
    stream: &TcpStream,
    limits: Limits,
    mac: Option<MacFor<'_>>,
    deadline: Option<Instant>,
    tick: Tick<'_>,
) -> Result<Vec<Vec<u8>>, StreamError> {
    let mut head = [0u8; 12];
    read_exact(stream, &mut head[..1], true, deadline, tick)?;
    let deadline = match (deadline, limits.message_time) {
        (Some(d), Some(t)) => Some(d.min(Instant::now() + t)),
        (None, Some(t)) => Some(Instant::now() + t),
        (d, None) => d,
    };
    read_exact(stream, &mut head[1..], false, deadline, tick)?;
    if head[..4] != MAGIC {
        return Err(StreamError::Malformed("bad magic".into()));
    }
    let count = u32::from_be_bytes([head[4], head[5], head[6], head[7]]);
    let flags = u32::from_be_bytes([head[8], head[9], head[10], head[11]]);
    if count > limits.max_frames {
        return Err(StreamError::Malformed(format!(
            "{count} frames, at most {} accepted",
            limits.max_frames
        )));
    }
    for (old, version) in [(FLAG_MAC_V1, 1), (FLAG_MAC_V2, 2)] {
        if flags == old {
            return Err(StreamError::Malformed(format!(
                "a version {version} MAC (the peer runs another ferroparallel version)"
            )));
        }
    }
    if flags & !FLAG_MAC != 0 {
        return Err(StreamError::Malformed(format!("unknown flags {flags:#x}")));
    }
    let mut lens = vec![0u8; 8 * count as usize];
    read_exact(stream, &mut lens, false, deadline, tick)?;
    let lens: Vec<u64> = lens
        .chunks_exact(8)
        .map(|c| u64::from_be_bytes([c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]]))
        .collect();
    let total = lens.iter().try_fold(0u64, |a, &l| a.checked_add(l));
    match total {
        Some(t) if t <= limits.max_bytes => {}
        _ => {
            return Err(StreamError::Malformed(format!(
                "frames announced beyond the {} bytes accepted",
                limits.max_bytes
            )))
        }
    }
    if mac.is_some() && flags & FLAG_MAC == 0 {
        return Err(StreamError::BadMac("the message carries no MAC"));
    }
    let mut frames = allocate(&lens)?;
    read_frames(stream, &mut frames, deadline, tick)?;
    if flags & FLAG_MAC != 0 {
        let mut trailer = [0u8; 40];
        read_exact(stream, &mut trailer, false, deadline, tick)?;
        if let Some(m) = mac {
            let mut nonce: StreamNonce = [0; 8];
            nonce.copy_from_slice(&trailer[..8]);
            let mut given = [0u8; 32];
            given.copy_from_slice(&trailer[8..]);
            // GMAC is one-shot and the nonce comes after the frames: each frame is
            // authenticated once every byte has arrived (about 7 ms per 128 MiB)
            let mut digest = m.key.digest(&nonce, u64::from(count));
            for f in &frames {
                digest.frame(f).map_err(|_| gmac_failed())?;
            }
            if !m.key.matches(m.context, &nonce, &digest.finish(), &given) {
                return Err(StreamError::BadMac("the frames do not match their MAC"));
            }
        }
    }
    Ok(frames)
}

#[cfg(test)]
mod tests {
    use super::*;
    use fp_wire::Auth;

    fn pair() -> (TcpStream, TcpStream) {
        let (listener, endpoint) = listen("127.0.0.1").unwrap();
        let client = connect(&endpoint, Duration::from_secs(5)).unwrap();
        let server = accept(&listener, Duration::from_secs(5)).unwrap().unwrap();
        (client, server)
    }

    fn go() -> impl FnMut() -> Result<(), StreamError> {
        || Ok(())
    }

    const ANY: Limits = Limits {
        max_bytes: 1 << 30,
        max_frames: 1 << 16,
        message_time: None,
    };

    fn key(secret: &[u8]) -> StreamKey {
        Auth::new(secret, "hmac-sha256")
            .unwrap()
            .stream_key()
            .unwrap()
    }

    fn for_req<'a>(key: &'a StreamKey, req: &'a [u8]) -> Option<MacFor<'a>> {
        Some(MacFor { key, context: req })
    }

    fn big(len: usize, seed: u8) -> Vec<u8> {
        (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
    }

    /// Send `frames` on a new connection from another thread; what the receiver got.
    fn round_trip(
        frames: &[&[u8]],
        sent: Option<MacFor<'_>>,
        loan: Option<&LoanDigest>,
        expected: Option<MacFor<'_>>,
    ) -> Result<Vec<Vec<u8>>, StreamError> {
        let (a, b) = pair();
        std::thread::scope(|scope| {
            let sender = scope.spawn(move || send_message(&a, frames, sent, loan, None, &mut go()));
            let got = recv_message(&b, ANY, expected, None, &mut go());
            drop(b); // (a refused message may be left half read)
            let _ = sender.join().unwrap();
            got
        })
    }

    /// A message as the sender writes it, with `trailer` (nonce and MAC) after the frames
    /// (flag `flags`).
    fn raw_message(frames: &[&[u8]], flags: u32, trailer: Option<&[u8]>) -> Vec<u8> {
        let mut out = MAGIC.to_vec();
        out.extend_from_slice(&(frames.len() as u32).to_be_bytes());
        out.extend_from_slice(&flags.to_be_bytes());
        for f in frames {
            out.extend_from_slice(&(f.len() as u64).to_be_bytes());
        }
        for f in frames {
            out.extend_from_slice(f);
        }
        out.extend_from_slice(trailer.unwrap_or_default());
        out
    }

    fn recv_raw(bytes: &[u8], expected: Option<MacFor<'_>>) -> Result<Vec<Vec<u8>>, StreamError> {
        let (mut a, b) = pair();
        a.write_all(bytes).unwrap();
        recv_message(&b, ANY, expected, None, &mut go())
    }

    #[test]
    fn frames_arrive_as_sent_with_their_mac() {
        let k = key(b"key");
        let big = big(40 << 20, 0);
        let frames: Vec<&[u8]> = vec![b"", b"small", &big, b"tail"];
        let got = round_trip(&frames, for_req(&k, b"req-1"), None, for_req(&k, b"req-1")).unwrap();
        assert_eq!(got.len(), 4);
        for (g, f) in got.iter().zip(&frames) {
            assert_eq!(g.as_slice(), *f);
        }
    }

    #[test]
    fn a_mac_for_another_request_or_key_is_refused() {
        let (k, other) = (key(b"key"), key(b"other"));
        for (sent, expected) in [
            (for_req(&k, b"req-1"), for_req(&k, b"req-2")),
            (for_req(&other, b"req-1"), for_req(&k, b"req-1")),
            (None, for_req(&k, b"req-1")),
        ] {
            // through a loan whose digest is known too: the MAC still binds request and key
            let loan = LoanDigest::new();
            for loan in [None, Some(&loan), Some(&loan)] {
                let err = round_trip(&[b"payload"], sent, loan, expected).unwrap_err();
                assert!(matches!(err, StreamError::BadMac(_)), "{err:?}");
            }
        }
    }

    #[test]
    fn tampered_bytes_a_replayed_mac_and_older_versions_are_refused() {
        let k = key(b"key");
        let frames: [&[u8]; 2] = [b"head", b"the payload"];
        let nonce = StreamKey::fresh_nonce().unwrap();
        let mut digest = k.digest(&nonce, 2);
        for f in frames {
            digest.frame(f).unwrap();
        }
        let digest = digest.finish();
        let trailer = |nonce: &StreamNonce, mac: [u8; 32]| [&nonce[..], &mac[..]].concat();
        let mac = k.mac(b"req-1", &nonce, &digest);
        let good = raw_message(&frames, FLAG_MAC, Some(&trailer(&nonce, mac)));
        assert_eq!(
            recv_raw(&good, for_req(&k, b"req-1")).unwrap()[1],
            frames[1]
        );
        let refused = |bytes: &[u8], req: &[u8], k: &StreamKey| {
            let err = recv_raw(bytes, for_req(k, req)).unwrap_err();
            assert!(matches!(err, StreamError::BadMac(_)), "{err:?}");
        };
        // one flipped bit in the frames' bytes, in the nonce
        let mut tampered = good.clone();
        let at = tampered.len() - 40 - 3;
        tampered[at] ^= 1;
        refused(&tampered, b"req-1", &k);
        let mut other_nonce = good.clone();
        let at = other_nonce.len() - 40;
        other_nonce[at] ^= 1;
        refused(&other_nonce, b"req-1", &k);
        // the same bytes split otherwise (the lengths are in the digest), or in one frame
        for moved in [
            &[&b"headthe"[..], &b" payload"[..]][..],
            &[b"headthe payload"],
        ] {
            let resplit = raw_message(moved, FLAG_MAC, Some(&trailer(&nonce, mac)));
            refused(&resplit, b"req-1", &k);
        }
        // a recorded reply (bytes, nonce and MAC) answering another request
        refused(&good, b"req-2", &k);
        // a receiver with another key
        refused(&good, b"req-1", &key(b"other"));
        // the digest itself in place of the MAC
        let bare = raw_message(&frames, FLAG_MAC, Some(&trailer(&nonce, digest)));
        refused(&bare, b"req-1", &k);
        // versions 1 and 2: refused as such
        for (flag, version) in [(FLAG_MAC_V1, "version 1"), (FLAG_MAC_V2, "version 2")] {
            let old = raw_message(&frames, flag, Some(&mac));
            let err = recv_raw(&old, for_req(&k, b"req-1")).unwrap_err();
            assert!(
                matches!(err, StreamError::Malformed(ref m) if m.contains(version)),
                "{err:?}"
            );
        }
    }

    #[test]
    fn each_loan_gets_its_own_nonce() {
        let k = key(b"key");
        let frames: [&[u8]; 1] = [b"payload"];
        let (a, b) = (LoanDigest::new(), LoanDigest::new());
        for loan in [&a, &b] {
            round_trip(&frames, for_req(&k, b"r"), Some(loan), for_req(&k, b"r")).unwrap();
        }
        let sealed = |loan: &LoanDigest| match &*loan.lock() {
            DigestState::Done(_, sealed) => *sealed,
            _ => panic!("hashed"),
        };
        let (sa, sb) = (sealed(&a), sealed(&b));
        assert_ne!(sa.0, sb.0);
        assert_ne!(sa.1, sb.1);
    }

    #[test]
    fn a_loan_is_hashed_once_for_every_send() {
        let k = key(b"key");
        let data = big(24 << 20, 3);
        let frames: [&[u8]; 3] = [b"meta", &data, b""];
        let loan = LoanDigest::new();
        // two sends at once (the second waits for the first one's digest, or uses it), then
        // a third with the digest known
        std::thread::scope(|scope| {
            let sends: Vec<_> = [b"req-1", b"req-2"]
                .into_iter()
                .map(|req| {
                    let (frames, loan, k) = (&frames, &loan, &k);
                    scope.spawn(move || {
                        round_trip(frames, for_req(k, req), Some(loan), for_req(k, req))
                    })
                })
                .collect();
            for s in sends {
                assert_eq!(s.join().unwrap().unwrap(), frames.map(<[u8]>::to_vec));
            }
        });
        assert!(loan.is_known());
        let got = round_trip(
            &frames,
            for_req(&k, b"req-3"),
            Some(&loan),
            for_req(&k, b"req-3"),
        );
        assert_eq!(got.unwrap(), frames.map(<[u8]>::to_vec));
        assert_eq!(loan.times_hashed(), 1);
        // other frames (a loan that grew) are hashed, not given the known digest
        let more: [&[u8]; 4] = [b"meta", &data, b"", b"more"];
        let got = round_trip(
            &more,
            for_req(&k, b"req-4"),
            Some(&loan),
            for_req(&k, b"req-4"),
        );
        assert_eq!(got.unwrap().len(), 4);
        assert_eq!(loan.times_hashed(), 2);
    }

    #[test]
    fn a_send_waiting_for_a_failed_hashing_hashes_itself() {
        let k = key(b"key");
        let frames: [&[u8]; 1] = [b"payload"];
        let loan = LoanDigest::new();
        let of = DigestOf::new(&k, &frames);
        let Role::Hash(Some(claim)) = loan.begin(&of) else {
            panic!("the first send hashes")
        };
        assert!(matches!(loan.begin(&of), Role::Wait));
        std::thread::scope(|scope| {
            let waiting = scope
                .spawn(|| round_trip(&frames, for_req(&k, b"r"), Some(&loan), for_req(&k, b"r")));
            std::thread::sleep(Duration::from_millis(100));
            drop(claim); // the hashing send failed
            assert_eq!(waiting.join().unwrap().unwrap(), vec![b"payload".to_vec()]);
        });
        assert!(loan.is_known());
        // a wrong digest stored for the loan is caught by the receiver
        let loan = LoanDigest::new();
        let Role::Hash(Some(claim)) = loan.begin(&of) else {
            panic!("the first send hashes")
        };
        claim.store(of, ([0; 8], [0; 32]));
        let err =
            round_trip(&frames, for_req(&k, b"r"), Some(&loan), for_req(&k, b"r")).unwrap_err();
        assert!(matches!(err, StreamError::BadMac(_)), "{err:?}");
    }

    #[test]
    fn oversized_and_garbage_messages_are_refused_before_reading_them() {
        let (a, b) = pair();
        let small = Limits {
            max_bytes: 100,
            max_frames: 4,
            message_time: None,
        };
        send_message(&a, &[&[0u8; 101]], None, None, None, &mut go()).unwrap();
        let err = recv_message(&b, small, None, None, &mut go()).unwrap_err();
        assert!(matches!(err, StreamError::Malformed(_)), "{err:?}");
        let (_a2, b2) = pair();
        send_message(&_a2, &[&b"x"[..]; 5], None, None, None, &mut go()).unwrap();
        assert!(matches!(
            recv_message(&b2, small, None, None, &mut go()),
            Err(StreamError::Malformed(_))
        ));
        // lengths that overflow when added
        let (mut a3, b3) = pair();
        let mut head = MAGIC.to_vec();
        head.extend_from_slice(&2u32.to_be_bytes());
        head.extend_from_slice(&0u32.to_be_bytes());
        head.extend_from_slice(&u64::MAX.to_be_bytes());
        head.extend_from_slice(&2u64.to_be_bytes());
        a3.write_all(&head).unwrap();
        assert!(matches!(
            recv_message(&b3, ANY, None, None, &mut go()),
            Err(StreamError::Malformed(_))
        ));
        let (mut a4, b4) = pair();
        a4.write_all(b"GET / HTTP/1.0\r\n\r\n").unwrap();
        assert!(matches!(
            recv_message(&b4, ANY, None, None, &mut go()),
            Err(StreamError::Malformed(_))
        ));
    }

    #[test]
    fn a_truncated_message_and_a_clean_close_are_told_apart() {
        let (a, b) = pair();
        drop(a);
        assert!(matches!(
            recv_message(&b, ANY, None, None, &mut go()),
            Err(StreamError::Closed { at_start: true })
        ));
        let (mut a, b) = pair();
        let mut head = MAGIC.to_vec();
        head.extend_from_slice(&1u32.to_be_bytes());
        head.extend_from_slice(&0u32.to_be_bytes());
        head.extend_from_slice(&10u64.to_be_bytes());
        head.extend_from_slice(b"12345");
        a.write_all(&head).unwrap();
        drop(a);
        assert!(matches!(
            recv_message(&b, ANY, None, None, &mut go()),
            Err(StreamError::Closed { at_start: false })
        ));
    }

    #[test]
    fn a_silent_peer_times_out_and_the_tick_can_stop_a_wait() {
        let (_a, b) = pair();
        let started = Instant::now();
        let deadline = Some(started + Duration::from_millis(300));
        assert!(matches!(
            recv_message(&b, ANY, None, deadline, &mut go()),
            Err(StreamError::Timeout)
        ));
        let mut ticks = 0;
        let mut stop = || {
            ticks += 1;
            Err(StreamError::Stopped("asked to stop".into()))
        };
        assert!(matches!(
            recv_message(&b, ANY, None, None, &mut stop),
            Err(StreamError::Stopped(_))
        ));
        assert_eq!(ticks, 1);
    }

    #[test]
    fn a_started_message_must_arrive_in_time_but_waiting_for_one_has_no_limit() {
        let (mut a, b) = pair();
        let limits = Limits {
            message_time: Some(Duration::from_millis(300)),
            ..ANY
        };
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(600)); // longer than message_time
            send_message(&a, &[b"late but whole"], None, None, None, &mut || Ok(())).unwrap();
            a.write_all(b"FPd").unwrap(); // and then a message that never completes
            a
        });
        let got = recv_message(&b, limits, None, None, &mut go()).unwrap();
        assert_eq!(got, vec![b"late but whole".to_vec()]);
        let started = Instant::now();
        assert!(matches!(
            recv_message(&b, limits, None, None, &mut go()),
            Err(StreamError::Timeout)
        ));
        assert!(started.elapsed() < Duration::from_secs(5));
        drop(sender.join().unwrap());
    }
}
