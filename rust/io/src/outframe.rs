//! Outgoing frames and their conversion to libzmq messages without copying.

use std::os::raw::c_void;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// Memory owned by someone else (a Python buffer) that a frame is sent from without a copy.
/// The bytes must stay valid and unchanged until the owner is released.
pub trait ExternalBuffer: Send {
    fn bytes(&self) -> &[u8];

    /// Called (on a libzmq thread) when libzmq has finished with the bytes, before the owner
    /// is parked for release: from then on the memory may change.
    fn released(&self) {}
}

/// Owners whose frames libzmq has finished with. libzmq calls back on its own threads; the owner
/// is parked here and dropped later by a thread allowed to drop it (for Python: holding the GIL).
#[derive(Clone, Default)]
pub struct ReleaseQueue {
    parked: Arc<Mutex<Vec<Box<dyn ExternalBuffer>>>>,
    /// Frames libzmq sends from an owner's memory and has not released yet.
    in_flight: Arc<AtomicUsize>,
}

impl ReleaseQueue {
    pub fn new() -> Self {
        Self::default()
    }

    fn push(&self, owner: Box<dyn ExternalBuffer>) {
        self.parked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(owner);
    }

    /// Take every parked owner (the caller drops them).
    pub fn drain(&self) -> Vec<Box<dyn ExternalBuffer>> {
        std::mem::take(&mut *self.parked.lock().unwrap_or_else(|e| e.into_inner()))
    }

    pub fn len(&self) -> usize {
        self.parked.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// How many frames are being sent from their owner's memory right now (libzmq has not
    /// finished with them): until then that memory must not change.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// One outgoing frame.
pub enum OutFrame {
    Owned(Vec<u8>),
    External(Box<dyn ExternalBuffer>),
    /// A received frame forwarded as it is (no copy).
    Received(RecvFrame),
}

impl OutFrame {
    /// The bytes this frame sends.
    pub fn bytes(&self) -> &[u8] {
        match self {
            OutFrame::Owned(v) => v,
            OutFrame::External(b) => b.bytes(),
            OutFrame::Received(m) => m.as_ref(),
        }
    }

    pub fn len(&self) -> usize {
        self.bytes().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A libzmq message we own until it is sent (then libzmq owns its data).
pub(crate) struct RawMsg(zmq_sys::zmq_msg_t);

impl Drop for RawMsg {
    fn drop(&mut self) {
        // SAFETY: self.0 was initialised by one of the zmq_msg_init* calls below; closing a message
        // that libzmq already took over (after a successful send) is a valid no-op.
        unsafe {
            zmq_sys::zmq_msg_close(&mut self.0);
        }
    }
}

struct Hint {
    queue: ReleaseQueue,
    owner: Box<dyn ExternalBuffer>,
}

unsafe extern "C" fn release_external(_data: *mut c_void, hint: *mut c_void) {
    // SAFETY: `hint` is the Box<Hint> leaked in `into_raw`, and libzmq calls this exactly once.
    let hint = unsafe { Box::from_raw(hint as *mut Hint) };
    let Hint { queue, owner } = *hint;
    owner.released();
    queue.push(owner);
    queue.in_flight.fetch_sub(1, Ordering::AcqRel);
}

unsafe extern "C" fn release_boxed(data: *mut c_void, hint: *mut c_void) {
    // SAFETY: `data`/`hint` are the pointer and length of the Box<[u8]> leaked in `into_raw`.
    let len = hint as usize;
    drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(data as *mut u8, len)) });
}

const INLINE_MAX: usize = 64;

fn copy_into_msg(bytes: &[u8]) -> RawMsg {
    let mut msg = zmq_sys::zmq_msg_t::default();
    // SAFETY: msg is a fresh zmq_msg_t; init_size allocates `len` bytes (or fails with ENOMEM, in
    // which case we fall back to an empty message rather than writing through a null pointer).
    unsafe {
        if zmq_sys::zmq_msg_init_size(&mut msg, bytes.len()) != 0 {
            zmq_sys::zmq_msg_init(&mut msg);
            return RawMsg(msg);
        }
        let dst = zmq_sys::zmq_msg_data(&mut msg) as *mut u8;
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, bytes.len());
    }
    RawMsg(msg)
}

/// A libzmq message over `v` itself (no copy, unless it is small enough to be inlined).
fn owned_into_raw(v: Vec<u8>) -> RawMsg {
    if v.len() <= INLINE_MAX {
        return copy_into_msg(&v);
    }
    let boxed = v.into_boxed_slice();
    let len = boxed.len();
    let data = Box::into_raw(boxed) as *mut u8 as *mut c_void;
    let mut msg = zmq_sys::zmq_msg_t::default();
    // SAFETY: data/len describe a leaked Box<[u8]> that release_boxed frees once.
    let rc = unsafe {
        zmq_sys::zmq_msg_init_data(&mut msg, data, len, Some(release_boxed), len as *mut c_void)
    };
    if rc != 0 {
        // SAFETY: libzmq did not take the buffer; free it ourselves.
        unsafe { release_boxed(data, len as *mut c_void) };
        return RawMsg(zmq_sys::zmq_msg_t::default());
    }
    RawMsg(msg)
}

impl RawMsg {
    /// The message's bytes.
    pub(crate) fn bytes(&self) -> &[u8] {
        let msg = &self.0 as *const zmq_sys::zmq_msg_t as *mut zmq_sys::zmq_msg_t;
        // SAFETY: zmq_msg_data/zmq_msg_size only read the message; the data stays valid and
        // unchanged for as long as the message lives (nothing writes to it once built).
        unsafe {
            let len = zmq_sys::zmq_msg_size(msg);
            if len == 0 {
                return &[];
            }
            std::slice::from_raw_parts(zmq_sys::zmq_msg_data(msg) as *const u8, len)
        }
    }
}

impl OutFrame {
    pub(crate) fn into_raw(self, queue: &ReleaseQueue) -> RawMsg {
        match self {
            OutFrame::Owned(v) => owned_into_raw(v),
            OutFrame::External(owner) if owner.bytes().len() <= INLINE_MAX => {
                let msg = copy_into_msg(owner.bytes());
                queue.push(owner);
                msg
            }
            OutFrame::External(owner) => {
                let (ptr, len) = {
                    let b = owner.bytes();
                    (b.as_ptr() as *mut c_void, b.len())
                };
                queue.in_flight.fetch_add(1, Ordering::AcqRel);
                let hint = Box::into_raw(Box::new(Hint {
                    queue: queue.clone(),
                    owner,
                }));
                let mut msg = zmq_sys::zmq_msg_t::default();
                // SAFETY: ptr/len stay valid until release_external runs, because the owner that
                // keeps them alive travels in `hint` and is only released from that callback.
                let rc = unsafe {
                    zmq_sys::zmq_msg_init_data(
                        &mut msg,
                        ptr,
                        len,
                        Some(release_external),
                        hint as *mut c_void,
                    )
                };
                if rc != 0 {
                    // SAFETY: libzmq did not take ownership; run the release path ourselves.
                    unsafe { release_external(ptr, hint as *mut c_void) };
                    return RawMsg(zmq_sys::zmq_msg_t::default());
                }
                RawMsg(msg)
            }
            OutFrame::Received(frame) => frame.0,
        }
    }
}

/// A received frame: the libzmq message itself, so its bytes are never copied.
pub struct RecvFrame(pub(crate) RawMsg);

impl RecvFrame {
    /// Receive one frame with DONTWAIT: `Ok(None)` when nothing is waiting.
    pub fn recv(sock: &mut zmq::Socket) -> Result<Option<(RecvFrame, bool)>, String> {
        let mut msg = zmq_sys::zmq_msg_t::default();
        // SAFETY: msg is a fresh message; the socket is live and owned by this thread.
        unsafe {
            zmq_sys::zmq_msg_init(&mut msg);
        }
        let frame = RawMsg(msg);
        let mut frame = RecvFrame(frame);
        // SAFETY: as above; on failure the (empty) message is closed by RawMsg's Drop.
        let rc = unsafe {
            zmq_sys::zmq_msg_recv(
                &mut frame.0 .0,
                sock.as_mut_ptr(),
                zmq_sys::ZMQ_DONTWAIT as i32,
            )
        };
        if rc < 0 {
            // SAFETY: errno of the failing call.
            let errno = unsafe { zmq_sys::zmq_errno() };
            if errno == zmq_sys::errno::EAGAIN {
                return Ok(None);
            }
            return Err(zmq::Error::from_raw(errno).to_string());
        }
        // SAFETY: frame.0 holds a received message.
        let more = unsafe { zmq_sys::zmq_msg_more(&frame.0 .0) } != 0;
        Ok(Some((frame, more)))
    }
}

impl AsRef<[u8]> for RecvFrame {
    fn as_ref(&self) -> &[u8] {
        self.0.bytes()
    }
}

/// Outcome of trying to send one message.
pub(crate) enum SendOutcome {
    Sent,
    /// The socket would block before the first frame; the frames are returned intact.
    WouldBlock(Vec<RawMsg>),
    Failed(String),
}

/// Frames converted to libzmq messages, ready to send (possibly later).
pub struct ReadyFrames(Vec<RawMsg>);

/// Outcome of [`try_send`].
pub enum Sent {
    Ok,
    /// Nothing was sent; try again when the socket is writable.
    WouldBlock(ReadyFrames),
    /// The send failed (e.g. EHOSTUNREACH on a ROUTER with ROUTER_MANDATORY); `errno` and text.
    Failed(i32, String),
}

impl ReadyFrames {
    pub fn new(frames: Vec<OutFrame>, releases: &ReleaseQueue) -> ReadyFrames {
        ReadyFrames(frames.into_iter().map(|f| f.into_raw(releases)).collect())
    }
}

/// Send one multipart message without blocking.
pub fn try_send(sock: &mut zmq::Socket, frames: ReadyFrames) -> Sent {
    match send_frames(sock, frames.0) {
        SendOutcome::Sent => Sent::Ok,
        SendOutcome::WouldBlock(f) => Sent::WouldBlock(ReadyFrames(f)),
        SendOutcome::Failed(text) => {
            // SAFETY: errno of the call that just failed inside send_frames.
            let errno = unsafe { zmq_sys::zmq_errno() };
            Sent::Failed(errno, text)
        }
    }
}

impl RecvFrame {
    /// Another handle on the same frame. libzmq shares large message bodies by reference count
    /// (no copy of the payload); small ones are copied, which is cheap.
    pub fn share(&self) -> RecvFrame {
        let mut msg = zmq_sys::zmq_msg_t::default();
        let src = &self.0 .0 as *const zmq_sys::zmq_msg_t as *mut zmq_sys::zmq_msg_t;
        // SAFETY: msg is freshly initialised; zmq_msg_copy only reads `src` (it bumps the shared
        // reference count of the body) even though its C signature takes a mutable pointer.
        unsafe {
            zmq_sys::zmq_msg_init(&mut msg);
            zmq_sys::zmq_msg_copy(&mut msg, src);
        }
        RecvFrame(RawMsg(msg))
    }
}

/// Send all frames of one message with DONTWAIT. Only the first frame may report EAGAIN:
/// once libzmq accepted it, the rest of a multipart message is always accepted.
pub(crate) fn send_frames(sock: &mut zmq::Socket, mut frames: Vec<RawMsg>) -> SendOutcome {
    let n = frames.len();
    let raw = sock.as_mut_ptr();
    for i in 0..n {
        let mut flags = zmq_sys::ZMQ_DONTWAIT as i32;
        if i + 1 < n {
            flags |= zmq_sys::ZMQ_SNDMORE as i32;
        }
        // SAFETY: raw is a live socket owned by this thread; frames[i] is an initialised message.
        let rc = unsafe { zmq_sys::zmq_msg_send(&mut frames[i].0, raw, flags) };
        if rc < 0 {
            // SAFETY: reading errno right after the failing call.
            let errno = unsafe { zmq_sys::zmq_errno() };
            if i == 0 && errno == zmq_sys::errno::EAGAIN {
                return SendOutcome::WouldBlock(frames);
            }
            return SendOutcome::Failed(zmq::Error::from_raw(errno).to_string());
        }
    }
    SendOutcome::Sent
}

impl RecvFrame {
    /// A frame holding a copy of `bytes`, for messages a process builds itself but handles like
    /// received ones (e.g. a controller re-submitting a stored request).
    pub fn from_bytes(bytes: &[u8]) -> RecvFrame {
        RecvFrame(copy_into_msg(bytes))
    }

    /// A frame over `len` bytes at `ptr`, allocated with `libc::malloc`, which the frame
    /// owns from now on (freed with `libc::free` when the last handle on it goes): no copy.
    ///
    /// # Safety
    /// `ptr` must come from `libc::malloc` (or be null with `len` 0), hold `len` initialized
    /// bytes, and not be used or freed by the caller afterwards.
    pub unsafe fn from_malloc(ptr: *mut u8, len: usize) -> RecvFrame {
        if len <= INLINE_MAX {
            // SAFETY: `ptr` holds `len` initialized bytes (caller's contract).
            let bytes = if len == 0 {
                &[][..]
            } else {
                unsafe { std::slice::from_raw_parts(ptr, len) }
            };
            let msg = copy_into_msg(bytes);
            // SAFETY: the caller handed the malloc'd block over to us; it is copied.
            unsafe { libc::free(ptr.cast()) };
            return RecvFrame(msg);
        }
        let mut msg = zmq_sys::zmq_msg_t::default();
        // SAFETY: ptr/len describe a malloc'd block that release_malloc frees once.
        let rc = unsafe {
            zmq_sys::zmq_msg_init_data(
                &mut msg,
                ptr.cast(),
                len,
                Some(release_malloc),
                std::ptr::null_mut(),
            )
        };
        if rc != 0 {
            // SAFETY: libzmq did not take the block; free it ourselves.
            unsafe { libc::free(ptr.cast()) };
            return RecvFrame(RawMsg(zmq_sys::zmq_msg_t::default()));
        }
        RecvFrame(RawMsg(msg))
    }
}

unsafe extern "C" fn release_malloc(data: *mut c_void, _hint: *mut c_void) {
    // SAFETY: `data` is the malloc'd block given to `RecvFrame::from_malloc`, freed once.
    unsafe { libc::free(data) };
}

impl ReadyFrames {
    /// The frames, to be written somewhere else than a libzmq socket (see `link`).
    pub(crate) fn into_raw(self) -> Vec<RawMsg> {
        self.0
    }
}
