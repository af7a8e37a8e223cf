//! The process-wide ZMQ context, made with room for many sockets.
//!
//! libzmq allows 1,023 sockets per context unless told otherwise, and the `zmq` crate gives no
//! way to set `ZMQ_MAX_SOCKETS` on a context it made. A client has about 19 sockets (its
//! channels, their handshake monitors, the data channel), so a process could hold only ~55
//! clients at once. This context is created through libzmq directly with a larger limit;
//! its sockets are ordinary `zmq::Socket`s.

use std::os::raw::{c_int, c_void};

/// Sockets one process may open (libzmq's default is 1,023); capped by libzmq's own limit.
const MAX_SOCKETS: c_int = 16_384;

/// A libzmq context that lives as long as the process (never terminated).
pub struct Context {
    raw: *mut c_void,
}

// SAFETY: libzmq contexts are thread-safe (zmq_socket and zmq_ctx_set may be called from any
// thread); the pointer is never freed.
unsafe impl Send for Context {}
// SAFETY: as above.
unsafe impl Sync for Context {}

impl Context {
    fn new() -> Context {
        // SAFETY: plain libzmq calls; a null context (out of memory) is checked on use.
        let raw = unsafe { zmq_sys::zmq_ctx_new() };
        if !raw.is_null() {
            // SAFETY: `raw` is a live context; asking for more sockets than libzmq's limit
            // only fails, leaving the default.
            unsafe {
                let limit = zmq_sys::zmq_ctx_get(raw, zmq_sys::ZMQ_SOCKET_LIMIT as c_int);
                let want = if limit > 0 {
                    MAX_SOCKETS.min(limit)
                } else {
                    MAX_SOCKETS
                };
                zmq_sys::zmq_ctx_set(raw, zmq_sys::ZMQ_MAX_SOCKETS as c_int, want);
            }
        }
        Context { raw }
    }

    /// A new socket of `kind` (closed when dropped).
    pub fn socket(&self, kind: zmq::SocketType) -> Result<zmq::Socket, zmq::Error> {
        if self.raw.is_null() {
            return Err(zmq::Error::ENOMEM);
        }
        // SAFETY: `raw` is a live context; a non-null result is a new socket that the
        // returned `zmq::Socket` owns and closes.
        unsafe {
            let sock = zmq_sys::zmq_socket(self.raw, raw_kind(kind));
            if sock.is_null() {
                return Err(zmq::Error::from_raw(zmq_sys::zmq_errno()));
            }
            Ok(zmq::Socket::from_raw(sock))
        }
    }

    /// The most sockets this context allows at once.
    pub fn max_sockets(&self) -> i32 {
        if self.raw.is_null() {
            return 0;
        }
        // SAFETY: `raw` is a live context.
        unsafe { zmq_sys::zmq_ctx_get(self.raw, zmq_sys::ZMQ_MAX_SOCKETS as c_int) }
    }
}

fn raw_kind(kind: zmq::SocketType) -> c_int {
    use zmq::SocketType::*;
    (match kind {
        PAIR => zmq_sys::ZMQ_PAIR,
        PUB => zmq_sys::ZMQ_PUB,
        SUB => zmq_sys::ZMQ_SUB,
        REQ => zmq_sys::ZMQ_REQ,
        REP => zmq_sys::ZMQ_REP,
        DEALER => zmq_sys::ZMQ_DEALER,
        ROUTER => zmq_sys::ZMQ_ROUTER,
        PULL => zmq_sys::ZMQ_PULL,
        PUSH => zmq_sys::ZMQ_PUSH,
        XPUB => zmq_sys::ZMQ_XPUB,
        XSUB => zmq_sys::ZMQ_XSUB,
        STREAM => zmq_sys::ZMQ_STREAM,
    }) as c_int
}

/// The process-wide ZMQ context.
pub fn context() -> &'static Context {
    static CTX: std::sync::OnceLock<Context> = std::sync::OnceLock::new();
    CTX.get_or_init(Context::new)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Raise the soft descriptor limit to `want` if the hard one allows; false if it cannot.
    fn descriptors(want: u64) -> bool {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        // SAFETY: get/setrlimit on a valid, owned struct.
        unsafe {
            if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
                return false;
            }
            if lim.rlim_cur >= want {
                return true;
            }
            if lim.rlim_max < want {
                return false;
            }
            lim.rlim_cur = want;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim) == 0
        }
    }

    #[test]
    fn the_context_allows_many_sockets() {
        if !descriptors(4096) {
            return; // (each socket needs a descriptor; this machine allows too few)
        }
        let ctx = context();
        assert!(ctx.max_sockets() > 4096, "{}", ctx.max_sockets());
        let socks: Vec<zmq::Socket> = (0..1500)
            .map(|_| ctx.socket(zmq::DEALER).expect("socket"))
            .collect();
        assert_eq!(socks.len(), 1500);
    }
}
