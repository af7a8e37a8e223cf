//! The per-process I/O thread of ferroparallel, without any Python.
//!
//! One native thread receives on every ZMQ socket of the process; other threads send on them
//! directly, each socket behind its own lock ([`IoHandle::send`]), and collect received messages
//! in batches (`IoHandle::inbox`). Received messages are split, verified and unpacked on the I/O
//! thread; malformed ones are dropped and reported, never delivered. Outgoing buffers owned by a foreign runtime (Python) are sent without
//! a copy and handed back through a [`ReleaseQueue`] once libzmq no longer needs them, so the
//! owner can release them on a thread of its choosing.

mod batching;
mod client_link;
mod context;
pub mod curve;
mod direct;
mod handshake;
mod hugepage;
mod inbox;
mod ioloop;
pub mod link;
mod outframe;
mod peer_memory;
mod session;
mod socket;
pub mod stream;
mod wakeup;

pub use context::{context, Context};
pub use curve::{Curve, CurveKey};
pub use direct::{DirectSockets, LINK_LOST, LINK_NONE, LINK_UP};
pub use handshake::{HandshakeState, Handshakes};
pub use inbox::{Delivery, DropReport, Inbox, Incoming, Taken, Waiter};
pub use ioloop::{recv_multipart, IoHandle, IoStats};
pub use outframe::RecvFrame;
pub use outframe::{try_send, ExternalBuffer, OutFrame, ReadyFrames, ReleaseQueue, Sent};
pub use peer_memory::{
    read_process_memory, read_process_memory_parallel, read_threads, write_process_memory,
};
pub use session::{
    sign_buffers_default, OutgoingMessage, SessionCore, BUFFERS_CHANGED_KEY, SIGN_BUFFERS_ENV,
};
pub use socket::{SocketKind, SocketSpec};

/// Frames at least this long are sent from the caller's memory without a copy.
pub const ZERO_COPY_THRESHOLD: usize = 64 * 1024;
