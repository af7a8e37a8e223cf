//! The controller's end of links (decision 0017, framing in `fp_io::link`): a listener
//! on an abstract Unix socket, and one stream per same-host engine or client carrying its MUX
//! and task traffic, read and written by the event loop itself.
//!
//! A connection proves itself with a hello signed with the cluster key, naming its routing
//! identity (an engine's uuid, a client's session) and role; until then it may send one small
//! message and must do so within [`HELLO_TIME`]. Once bound, everything the loop would send
//! that peer on its MUX or task socket (the engine-facing ones for an engine, the
//! client-facing ones for a client) goes over the link instead, and what arrives on the link
//! is handled as if it had come from those sockets under that identity. An engine's link that
//! closes (the engine process died) unregisters the engine at once.

use foldhash::HashMap;
use std::os::fd::AsRawFd;
use std::os::linux::net::SocketAddrExt;
use std::os::unix::net::{SocketAddr, UnixListener, UnixStream};
use std::time::{Duration, Instant};

use fp_io::link::{LinkLimits, LinkMessage, LinkReader, LinkWriter};
use fp_io::ReadyFrames;

/// How long a new connection has to say a valid hello.
pub(crate) const HELLO_TIME: Duration = Duration::from_secs(5);
/// Connections that have not said hello yet, at most (more are closed at once).
const MAX_UNBOUND: usize = 64;
/// `FERROPARALLEL_LINKS=0` (or off/false/no) turns links off.
pub const ENV_ENABLE: &str = "FERROPARALLEL_LINKS";

/// Whether the environment allows engine links.
pub fn enabled_by_env() -> bool {
    let v = std::env::var(ENV_ENABLE).unwrap_or_default();
    !matches!(
        v.trim().to_ascii_lowercase().as_str(),
        "0" | "off" | "false" | "no"
    )
}

/// Whether the peer of `stream` (non-blocking) has closed it with nothing left to read.
fn peer_closed(stream: &UnixStream) -> bool {
    let mut byte = 0u8;
    // SAFETY: one writable byte for a non-blocking peek; the descriptor is the stream's own.
    let n = unsafe {
        libc::recv(
            stream.as_raw_fd(),
            (&mut byte as *mut u8).cast(),
            1,
            libc::MSG_PEEK | libc::MSG_DONTWAIT,
        )
    };
    n == 0
}

/// Bind the link listener on the abstract socket named by `url` (`ipc://@<name>`).
pub fn listen(url: &str) -> Result<UnixListener, String> {
    let name = url
        .strip_prefix("ipc://@")
        .ok_or_else(|| format!("{url:?} is not an abstract ipc:// endpoint"))?;
    let addr = SocketAddr::from_abstract_name(name.as_bytes())
        .map_err(|e| format!("engine link {url}: {e}"))?;
    let listener =
        UnixListener::bind_addr(&addr).map_err(|e| format!("engine link: bind {url}: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("engine link: {e}"))?;
    Ok(listener)
}

pub(crate) struct Conn {
    stream: UnixStream,
    reader: LinkReader,
    pub(crate) writer: LinkWriter,
    /// The routing identity it proved, once it has.
    pub(crate) ident: Option<Vec<u8>>,
    /// A client's link (else an engine's).
    client: bool,
    opened: Instant,
    /// The last read stopped at its burst limit.
    more: bool,
    /// What the last poll saw on its descriptor.
    revents: i16,
}

#[derive(Default)]
pub(crate) struct Links {
    listener: Option<UnixListener>,
    listener_ready: bool,
    conns: HashMap<u64, Conn>,
    next_id: u64,
    by_ident: HashMap<Vec<u8>, u64>,
    /// Client links by identity.
    by_client: HashMap<Vec<u8>, u64>,
    /// Connections with output queued during this pass.
    dirty: Vec<u64>,
    /// The order of the descriptors given to the last poll (after the listener's).
    polled: Vec<u64>,
}

impl Links {
    pub(crate) fn new(listener: Option<UnixListener>) -> Links {
        Links {
            listener,
            ..Links::default()
        }
    }

    /// The descriptors to poll: the listener's, then each connection's (`POLLOUT` too when
    /// it has output waiting).
    pub(crate) fn pollfds(&mut self) -> Vec<libc::pollfd> {
        let mut fds = Vec::with_capacity(1 + self.conns.len());
        self.polled.clear();
        if let Some(l) = &self.listener {
            fds.push(libc::pollfd {
                fd: l.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        for (id, c) in &self.conns {
            let mut events = libc::POLLIN;
            if !c.writer.is_empty() {
                events |= libc::POLLOUT;
            }
            fds.push(libc::pollfd {
                fd: c.stream.as_raw_fd(),
                events,
                revents: 0,
            });
            self.polled.push(*id);
        }
        fds
    }

    /// Record what the poll saw on the descriptors of [`Self::pollfds`].
    pub(crate) fn set_revents(&mut self, fds: &[libc::pollfd]) {
        let mut rest = fds;
        if self.listener.is_some() {
            self.listener_ready = rest.first().is_some_and(|f| f.revents != 0);
            rest = rest.get(1..).unwrap_or(&[]);
        }
        for (id, f) in self.polled.iter().zip(rest) {
            if let Some(c) = self.conns.get_mut(id) {
                c.revents = f.revents;
            }
        }
    }

    /// Whether a connection has messages left from its last read (poll without waiting).
    pub(crate) fn has_more(&self) -> bool {
        self.conns.values().any(|c| c.more)
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.listener.is_none() && self.conns.is_empty()
    }

    /// Accept the connections waiting on the listener.
    pub(crate) fn accept(&mut self) -> Vec<String> {
        let mut refused = Vec::new();
        if !std::mem::take(&mut self.listener_ready) {
            return refused;
        }
        let Some(listener) = &self.listener else {
            return refused;
        };
        while let Ok((stream, _)) = listener.accept() {
            let mut unbound = self.conns.values().filter(|c| c.ident.is_none()).count();
            if unbound >= MAX_UNBOUND {
                // those whose peer has left already (not read yet) do not count
                self.conns
                    .retain(|_, c| c.ident.is_some() || !peer_closed(&c.stream));
                unbound = self.conns.values().filter(|c| c.ident.is_none()).count();
            }
            if unbound >= MAX_UNBOUND {
                refused.push(format!(
                    "refused a link: {unbound} connections have not said hello yet"
                ));
                continue; // dropped: closed
            }
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            let id = self.next_id;
            self.next_id += 1;
            self.conns.insert(
                id,
                Conn {
                    stream,
                    reader: LinkReader::new(LinkLimits::UNAUTHENTICATED),
                    writer: LinkWriter::new(),
                    ident: None,
                    client: false,
                    opened: Instant::now(),
                    more: false,
                    revents: 0,
                },
            );
        }
        refused
    }

    /// Connections to read (their descriptor fired, or messages are left) and to flush
    /// (writable with output waiting).
    pub(crate) fn ready(&mut self) -> (Vec<u64>, Vec<u64>) {
        let mut read = Vec::new();
        let mut write = Vec::new();
        for (id, c) in &mut self.conns {
            let ev = std::mem::take(&mut c.revents);
            if c.more || ev & (libc::POLLIN | libc::POLLHUP | libc::POLLERR) != 0 {
                read.push(*id);
            }
            if ev & libc::POLLOUT != 0 && !c.writer.is_empty() {
                write.push(*id);
            }
        }
        (read, write)
    }

    /// Read up to `max` messages of connection `id`.
    pub(crate) fn read(
        &mut self,
        id: u64,
        out: &mut Vec<LinkMessage>,
        max: usize,
    ) -> Result<(), String> {
        let Some(c) = self.conns.get_mut(&id) else {
            return Ok(());
        };
        match c.reader.read(c.stream.as_raw_fd(), out, max) {
            Ok(more) => {
                c.more = more;
                Ok(())
            }
            Err(e) => Err(e.to_string()),
        }
    }

    /// The identity connection `id` proved, and whether it is a client's.
    pub(crate) fn ident(&self, id: u64) -> Option<(&[u8], bool)> {
        let c = self.conns.get(&id)?;
        Some((c.ident.as_deref()?, c.client))
    }

    fn map(&self, client: bool) -> &HashMap<Vec<u8>, u64> {
        if client {
            &self.by_client
        } else {
            &self.by_ident
        }
    }

    /// The connection of the engine (or client) `ident`, if it has a link.
    pub(crate) fn conn_of(&self, ident: &[u8], client: bool) -> Option<u64> {
        let map = self.map(client);
        if map.is_empty() {
            return None;
        }
        map.get(ident).copied()
    }

    pub(crate) fn is_bound(&self, ident: &[u8], client: bool) -> bool {
        self.map(client).contains_key(ident)
    }

    /// Bind connection `id` to `ident` (a client's with `client`) and welcome it.
    pub(crate) fn bind(&mut self, id: u64, ident: Vec<u8>, client: bool, limits: LinkLimits) {
        if let Some(c) = self.conns.get_mut(&id) {
            c.reader.set_limits(limits);
            c.writer.push_control(fp_io::link::WELCOME);
            c.ident = Some(ident.clone());
            c.client = client;
            if client {
                self.by_client.insert(ident, id);
            } else {
                self.by_ident.insert(ident, id);
            }
            self.dirty.push(id);
        }
    }

    /// Queue a message for connection `id` (written at the end of the loop's pass).
    pub(crate) fn queue(
        &mut self,
        id: u64,
        channel: u8,
        frames: ReadyFrames,
    ) -> Result<(), String> {
        let Some(c) = self.conns.get_mut(&id) else {
            return Err("the engine link is closed".into());
        };
        c.writer.push_ready(channel, frames)?;
        self.dirty.push(id);
        Ok(())
    }

    /// Write what the connections in `ids` (or, with None, those given output in this pass)
    /// have queued, as far as they take it; returns those that failed, with why.
    pub(crate) fn flush(&mut self, ids: Option<Vec<u64>>) -> Vec<(u64, String)> {
        let ids = ids.unwrap_or_else(|| std::mem::take(&mut self.dirty));
        let mut failed = Vec::new();
        for id in ids {
            let Some(c) = self.conns.get_mut(&id) else {
                continue;
            };
            if let Err(e) = c.writer.flush(c.stream.as_raw_fd()) {
                failed.push((id, format!("cannot write to the engine link: {e}")));
            }
        }
        failed
    }

    /// Close connection `id`; returns the engine it was bound to (None for a client's).
    pub(crate) fn close(&mut self, id: u64) -> Option<Vec<u8>> {
        let c = self.conns.remove(&id)?;
        let ident = c.ident?;
        if c.client {
            self.by_client.remove(&ident);
            return None;
        }
        self.by_ident.remove(&ident);
        Some(ident)
    }

    /// Close the link of engine `ident`, if it has one.
    pub(crate) fn close_ident(&mut self, ident: &[u8]) {
        if let Some(id) = self.by_ident.remove(ident) {
            self.conns.remove(&id);
        }
    }

    /// Close the connections that did not say hello in time.
    pub(crate) fn expire(&mut self, now: Instant) -> usize {
        let before = self.conns.len();
        self.conns
            .retain(|_, c| c.ident.is_some() || now.duration_since(c.opened) < HELLO_TIME);
        before - self.conns.len()
    }
}

// ----- the event loop's side -----------------------------------------------------------------

use fp_io::link::{CH_LINK, CH_MUX, CH_TASK, HELLO};
use fp_io::{OutFrame, RecvFrame};
use fp_wire::split_envelope;

use crate::log::{log_at, Level};
use crate::messages::str_field;
use crate::server::{Server, BURST, MUX_C, MUX_E, TASK_C, TASK_E};

impl Server {
    /// Accept, read and flush the engine links the last poll found ready.
    pub(crate) fn service_links(&mut self) {
        if self.links.is_empty() {
            return;
        }
        let (read, write) = self.links.ready();
        let mut failed = self.links.flush(Some(write));
        for id in read {
            let mut got = Vec::new();
            let result = self.links.read(id, &mut got, BURST);
            for (channel, frames) in got {
                if !self.on_link_message(id, channel, frames) {
                    break;
                }
            }
            if let Err(why) = result {
                failed.push((id, why));
            }
        }
        for (id, why) in failed {
            self.close_link(id, &why);
        }
        // after the reads: connections whose peer left before this poll are gone by now and
        // do not count against the cap on connections waiting for their hello (a client that
        // closes its connections and opens a new one is not refused)
        for why in self.links.accept() {
            // (a flood of connections must not become a flood of log lines)
            if let Some(n) = self.count_drop() {
                log_at!(Level::Warning, "{why} ({n} dropped so far)");
            }
        }
    }

    /// Write what this pass queued on the links.
    pub(crate) fn flush_links(&mut self) {
        for (id, why) in self.links.flush(None) {
            self.close_link(id, &why);
        }
    }

    /// Send `frames` (routing identity first) over the link of that engine when it has one;
    /// gives the frames back otherwise.
    pub(crate) fn send_over_link(
        &mut self,
        i: usize,
        frames: Vec<OutFrame>,
    ) -> Option<Vec<OutFrame>> {
        let (channel, client) = match i {
            MUX_E => (CH_MUX, false),
            TASK_E => (CH_TASK, false),
            MUX_C => (CH_MUX, true),
            TASK_C => (CH_TASK, true),
            _ => return Some(frames),
        };
        let Some(id) = frames
            .first()
            .and_then(|f| self.links.conn_of(f.bytes(), client))
        else {
            return Some(frames);
        };
        let mut frames = frames;
        frames.remove(0);
        let ready = ReadyFrames::new(frames, &self.releases);
        if let Err(why) = self.links.queue(id, channel, ready) {
            log_at!(Level::Warning, "engine link: {why}");
        }
        None
    }

    /// Handle one message of connection `id`; false when the connection was closed.
    fn on_link_message(&mut self, id: u64, channel: u8, frames: Vec<RecvFrame>) -> bool {
        let Some((ident, client)) = self
            .links
            .ident(id)
            .map(|(i, c)| (RecvFrame::from_bytes(i), c))
        else {
            return self.on_link_hello(id, channel, frames);
        };
        let i = match (channel, client) {
            (CH_MUX, false) => MUX_E,
            (CH_TASK, false) => TASK_E,
            (CH_MUX, true) => MUX_C,
            (CH_TASK, true) => TASK_C,
            _ => {
                self.close_link(id, &format!("a message on link channel {channel}"));
                return false;
            }
        };
        let mut all = Vec::with_capacity(frames.len() + 1);
        all.push(ident);
        all.extend(frames);
        self.handle(i, all);
        true
    }

    /// The first message of a connection: a hello signed with the cluster key.
    fn on_link_hello(&mut self, id: u64, channel: u8, frames: Vec<RecvFrame>) -> bool {
        match self.hello_uuid(channel, frames) {
            Ok((uuid, client)) => {
                let who = if client { "client" } else { "engine" };
                log_at!(Level::Debug, "link of {who} {}", crate::server::show(&uuid));
                let limits = LinkLimits {
                    max_frames: self.session.limits.max_frames,
                    max_bytes: u64::MAX,
                };
                self.links.bind(id, uuid, client, limits);
                true
            }
            Err(why) => {
                if let Some(n) = self.count_drop() {
                    log_at!(
                        Level::Warning,
                        "closed an engine link: {why} ({n} dropped so far)"
                    );
                }
                self.links.close(id);
                false
            }
        }
    }

    /// The identity a hello names, and whether it is a client's.
    fn hello_uuid(
        &mut self,
        channel: u8,
        frames: Vec<RecvFrame>,
    ) -> Result<(Vec<u8>, bool), String> {
        if channel != CH_LINK {
            return Err("its first message is not a hello".into());
        }
        let env = split_envelope(frames, &self.session.limits).map_err(|e| e.to_string())?;
        self.session
            .verify_signature(&env, true)
            .map_err(|e| e.to_string())?;
        let header = self
            .session
            .packer
            .unpack(env.header.as_ref(), "header")
            .map_err(|e| e.to_string())?;
        if str_field(&header, "msg_type") != Some(HELLO) {
            return Err("its first message is not a hello".into());
        }
        let content = self
            .session
            .packer
            .unpack(env.content.as_ref(), "content")
            .map_err(|e| e.to_string())?;
        let uuid = str_field(&content, "uuid")
            .unwrap_or_default()
            .as_bytes()
            .to_vec();
        if uuid.is_empty() || uuid.len() > 255 {
            return Err("its hello names no valid routing identity".into());
        }
        let client = match str_field(&content, "role") {
            None | Some("engine") => false,
            Some("client") => true,
            Some(_) => return Err("its hello names an unknown role".into()),
        };
        if self.links.is_bound(&uuid, client) {
            return Err(format!("{} already has a link", crate::server::show(&uuid)));
        }
        Ok((uuid, client))
    }

    /// Close connection `id`; its engine, if it was bound to one, is gone.
    pub(crate) fn close_link(&mut self, id: u64, why: &str) {
        if let Some(uuid) = self.links.close(id) {
            self.unregister(&uuid, &format!("its engine link closed ({why})"));
        }
    }

    /// Close the connections that did not say hello within [`HELLO_TIME`].
    pub(crate) fn expire_links(&mut self) {
        let n = self.links.expire(Instant::now());
        if n > 0 {
            log_at!(
                Level::Warning,
                "closed {n} engine link connection(s) that said no hello within {HELLO_TIME:?}"
            );
        }
    }
}
