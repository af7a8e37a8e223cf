//! A same-host client's link to its controller (decision 0017): the client's MUX and task
//! traffic over one Unix stream instead of its ZMQ sockets.
//!
//! Threads that send write to the stream themselves (under the link's lock, without
//! blocking: what the stream does not take waits in the writer, and the I/O thread writes it
//! when the stream is writable again). The loop — the I/O thread, or a waiting thread that
//! receives for itself (decision 0006) — reads the stream in the same `poll(2)` as the
//! sockets and delivers its messages as the `mux` or `task` socket's. A link that breaks is
//! reported once and left: sends go through the ZMQ sockets again.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use crate::link::{LinkError, LinkMessage, LinkReader, LinkWriter, CH_MUX, CH_TASK};
use crate::outframe::RawMsg;

/// The sockets whose traffic a client link carries, and their channels.
pub(crate) const CHANNELS: [(&str, u8); 2] = [("mux", CH_MUX), ("task", CH_TASK)];

/// The link channel of socket `name`, if a link carries it.
pub(crate) fn channel_of(name: &str) -> Option<u8> {
    CHANNELS.iter().find(|(n, _)| *n == name).map(|(_, c)| *c)
}

/// The socket whose messages arrive on `channel`.
pub(crate) fn socket_of(channel: u8) -> Option<&'static str> {
    CHANNELS
        .iter()
        .find(|(_, c)| *c == channel)
        .map(|(n, _)| *n)
}

/// The senders' side of a client link.
pub(crate) struct ClientLink {
    stream: UnixStream,
    writer: Mutex<LinkWriter>,
    /// The writer holds bytes the stream did not take: the loop must write them.
    backlog: AtomicBool,
    lost: AtomicBool,
}

fn lock(m: &Mutex<LinkWriter>) -> MutexGuard<'_, LinkWriter> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// What a send on the link left for the loop to do.
pub(crate) enum LinkSent {
    /// Written (or held for its burst).
    Done,
    /// Part of it waits for the stream: wake the loop.
    Backlog,
}

impl ClientLink {
    pub(crate) fn new(stream: UnixStream) -> ClientLink {
        ClientLink {
            stream,
            writer: Mutex::new(LinkWriter::new()),
            backlog: AtomicBool::new(false),
            lost: AtomicBool::new(false),
        }
    }

    pub(crate) fn fd(&self) -> RawFd {
        self.stream.as_raw_fd()
    }

    pub(crate) fn is_up(&self) -> bool {
        !self.lost.load(Ordering::SeqCst)
    }

    /// Whether the loop must wait for the stream to take queued bytes.
    pub(crate) fn has_backlog(&self) -> bool {
        self.backlog.load(Ordering::SeqCst)
    }

    /// Queue a message; unless `hold`, write what is queued as far as the stream takes it.
    pub(crate) fn send(
        &self,
        channel: u8,
        frames: Vec<RawMsg>,
        hold: bool,
    ) -> Result<LinkSent, String> {
        if !self.is_up() {
            return Err("the link to the controller is closed".into());
        }
        let mut w = lock(&self.writer);
        w.push(channel, frames)?;
        if hold {
            return Ok(LinkSent::Done);
        }
        self.write(&mut w)
    }

    /// Write what is queued as far as the stream takes it.
    pub(crate) fn flush(&self) -> Result<LinkSent, String> {
        if !self.is_up() {
            return Ok(LinkSent::Done);
        }
        let mut w = lock(&self.writer);
        self.write(&mut w)
    }

    fn write(&self, w: &mut LinkWriter) -> Result<LinkSent, String> {
        match w.flush(self.fd()) {
            Ok(true) => {
                self.backlog.store(false, Ordering::SeqCst);
                Ok(LinkSent::Done)
            }
            Ok(false) => {
                self.backlog.store(true, Ordering::SeqCst);
                Ok(LinkSent::Backlog)
            }
            Err(e) => {
                self.lose();
                Err(format!("cannot write to the link to the controller: {e}"))
            }
        }
    }

    /// The link broke (or closed): nothing more goes over it.
    pub(crate) fn lose(&self) {
        self.lost.store(true, Ordering::SeqCst);
        self.backlog.store(false, Ordering::SeqCst);
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

/// The loop's side of a client link: its reader.
pub(crate) struct LoopLink {
    pub(crate) link: Arc<ClientLink>,
    reader: LinkReader,
    /// The last read stopped at its burst limit.
    pub(crate) more: bool,
}

impl LoopLink {
    pub(crate) fn new(link: Arc<ClientLink>, reader: LinkReader) -> LoopLink {
        LoopLink {
            link,
            reader,
            more: false,
        }
    }

    /// Read up to `max` messages.
    pub(crate) fn read(&mut self, out: &mut Vec<LinkMessage>, max: usize) -> Result<(), LinkError> {
        match self.reader.read(self.link.fd(), out, max) {
            Ok(more) => {
                self.more = more;
                Ok(())
            }
            Err(e) => {
                self.more = false;
                self.link.lose();
                Err(e)
            }
        }
    }
}
