//! Sockets driven by the threads that use them, without an I/O thread in between.
//!
//! A process whose main thread waits for a request, runs it and answers it (an engine's shell
//! and control channels) pays two thread hand-offs per request when an I/O thread owns the
//! sockets: the I/O thread wakes to receive and wakes the main thread; the main thread queues
//! the reply and wakes the I/O thread. Here the waiting thread polls the sockets itself and
//! sends its reply itself. libzmq sockets are not thread-safe, but they may be used by any
//! thread that holds them exclusively with a memory barrier: every operation takes the one
//! mutex. A thread that needs the sockets while another one waits on them (e.g. a reply sent
//! while a watcher thread polls for control requests) interrupts that wait through an internal
//! wake-up socket, so nobody waits longer than the hand-over.

use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::handshake::{parse_event, Handshakes};
use crate::inbox::{Delivery, DropReport, Incoming};
use crate::ioloop::recv_multipart;
use crate::link::{poll_fd, LinkReader, LinkWriter, CH_MUX, CH_TASK};
use crate::outframe::{try_send, OutFrame, ReadyFrames, RecvFrame, ReleaseQueue, Sent};
use crate::session::SessionCore;
use crate::socket::{monitor_endpoint, SocketKind, SocketSpec};
use crate::wakeup::{drain, pollfd, wake_pair};

/// Most messages taken from one socket by one `recv` call (the others wait for the next).
const RECV_BURST: usize = 512;
const MAX_DROP_REPORTS: usize = 1000;

/// The routing identity under which a socket with a link delivers the link's messages of each
/// channel, and by which a reply given that identity goes back over the link (a ROUTER's
/// generated identities start with a zero byte: these cannot collide with them).
const LINK_IDENTS: [(&[u8], u8); 2] = [(b"fp-link/mux", CH_MUX), (b"fp-link/task", CH_TASK)];

/// [`DirectSockets::link_state`] values.
pub const LINK_NONE: u8 = 0;
pub const LINK_UP: u8 = 1;
pub const LINK_LOST: u8 = 2;

/// An engine link (see `link`), standing in for the ZMQ connections of one socket.
struct Link {
    /// Index of the socket whose messages it carries.
    entry: usize,
    stream: UnixStream,
    reader: LinkReader,
    writer: LinkWriter,
    /// The last read stopped at its burst limit: read again before waiting.
    more: bool,
}

fn link_channel(ident: &[u8]) -> Option<u8> {
    LINK_IDENTS
        .iter()
        .find(|(id, _)| *id == ident)
        .map(|(_, ch)| *ch)
}

fn link_ident(channel: u8) -> Option<&'static [u8]> {
    LINK_IDENTS
        .iter()
        .find(|(_, ch)| *ch == channel)
        .map(|(id, _)| *id)
}

struct Entry {
    name: Arc<str>,
    sock: zmq::Socket,
    kind: SocketKind,
    raw: bool,
    /// Handshake events of a connecting socket, and how many endpoints it connects to.
    monitor: Option<zmq::Socket>,
    endpoints: u64,
    /// Read `ZMQ_EVENTS` before blocking: the socket was used (an operation may consume its
    /// edge-triggered `ZMQ_FD` signal), its descriptor fired, or messages were left unread.
    check: bool,
}

impl Drop for Entry {
    fn drop(&mut self) {
        if self.monitor.is_some() {
            // libzmq's I/O thread sends monitor events with a *blocking* send: once our end of
            // the monitor pipe is gone, the next event of the lingering socket (a handshake
            // that fails because the peer hung up) would block that thread, and with it every
            // socket of the process. Stop the monitor before either socket is closed.
            // SAFETY: the socket pointer is valid while `self.sock` lives; a NULL endpoint with
            // no events is libzmq's documented way to stop monitoring.
            unsafe {
                zmq_sys::zmq_socket_monitor(self.sock.as_mut_ptr(), std::ptr::null(), 0);
            }
        }
    }
}

impl Entry {
    fn read_monitor(&self, handshakes: &Handshakes) {
        let Some(monitor) = &self.monitor else {
            return;
        };
        while let Ok(frames) = monitor.recv_multipart(zmq::DONTWAIT) {
            if let Some((event, value, endpoint)) = parse_event(&frames) {
                handshakes.record(&self.name, event, value, endpoint);
            }
        }
    }
}

struct State {
    entries: Vec<Entry>,
    /// Replies held back by `send(.., hold=true)`, oldest first: (socket index, the link
    /// channel when it goes over the link, frames).
    held: Vec<(usize, Option<u8>, ReadyFrames)>,
    link: Option<Link>,
    wake_rx: UnixStream,
    /// When the handshake monitors were last read by [`DirectSockets::recv`].
    monitors_read: Instant,
}

/// How often [`DirectSockets::recv`] reads the handshake monitors. Every socket in a
/// `zmq_poll` costs syscalls of its own (libzmq checks each one's command mailbox), so the
/// monitors join the poll only this often rather than on every request.
const MONITOR_INTERVAL: Duration = Duration::from_millis(100);

/// A set of sockets used directly by the calling threads (see the module docs).
pub struct DirectSockets {
    state: Mutex<State>,
    wake_tx: UnixStream,
    session: Arc<SessionCore>,
    /// Borrowed send buffers that libzmq has finished with (drop them where convenient).
    pub releases: ReleaseQueue,
    drops: Mutex<Vec<DropReport>>,
    /// Handshake outcomes of the connecting sockets (read whenever the sockets are polled).
    pub handshakes: Handshakes,
    closed: AtomicBool,
    pub received: AtomicU64,
    pub sent: AtomicU64,
    /// Messages held back (see [`DirectSockets::send`]), readable without the lock.
    held: AtomicUsize,
    /// [`LINK_NONE`], [`LINK_UP`] or [`LINK_LOST`].
    link_state: AtomicU8,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DirectSockets {
    /// An empty set that verifies and signs with `session`.
    pub fn new(session: Arc<SessionCore>) -> Result<DirectSockets, String> {
        let (wake_tx, wake_rx) = wake_pair()?;
        Ok(DirectSockets {
            state: Mutex::new(State {
                entries: Vec::new(),
                held: Vec::new(),
                link: None,
                wake_rx,
                // due at the first receive
                monitors_read: Instant::now()
                    .checked_sub(MONITOR_INTERVAL)
                    .unwrap_or_else(Instant::now),
            }),
            wake_tx,
            session,
            releases: ReleaseQueue::new(),
            drops: Mutex::new(Vec::new()),
            handshakes: Handshakes::default(),
            closed: AtomicBool::new(false),
            received: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            held: AtomicUsize::new(0),
            link_state: AtomicU8::new(LINK_NONE),
        })
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    fn check_open(&self) -> Result<(), String> {
        if self.is_closed() {
            return Err("the sockets are closed".into());
        }
        Ok(())
    }

    /// The sockets, interrupting a thread that is waiting on them.
    fn take(&self) -> MutexGuard<'_, State> {
        match self.state.try_lock() {
            Ok(g) => g,
            Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
            Err(std::sync::TryLockError::WouldBlock) => {
                self.wake();
                lock(&self.state)
            }
        }
    }

    /// Interrupt a `recv` waiting in another thread (it returns what it has, possibly nothing).
    pub fn wake(&self) {
        // A full pipe already holds a wake-up: nothing is lost by a failed write.
        let _ = (&self.wake_tx).write(&[1u8]);
    }

    /// Create a socket (monitors and forwarding are not supported here); returns the bound
    /// endpoints.
    pub fn add_socket(&self, spec: SocketSpec) -> Result<Vec<String>, String> {
        self.check_open()?;
        if spec.forward_to.is_some() {
            return Err("direct sockets cannot forward".into());
        }
        let mut state = self.take();
        if state.entries.iter().any(|e| *e.name == *spec.name) {
            return Err(format!("a socket named {:?} already exists", spec.name));
        }
        let monitor = monitor_endpoint(&spec);
        let (sock, bound, monitor) = spec.create(crate::context(), monitor.as_deref())?;
        state.entries.push(Entry {
            name: Arc::from(spec.name.as_str()),
            sock,
            kind: spec.kind,
            raw: spec.raw,
            monitor,
            endpoints: spec.connect.len() as u64,
            check: true,
        });
        Ok(bound)
    }

    /// Open an engine link (see `link`) to the controller's `endpoint` (`ipc://@<name>`, an
    /// abstract Unix socket) for socket `socket` (the shell ROUTER): say hello as engine
    /// `uuid` (a message signed with the session key) and wait up to `timeout` for the
    /// controller's welcome. From then on the controller sends this engine's MUX and task
    /// requests over the link, which this socket delivers under the identities of
    /// [`LINK_IDENTS`]; replies to those identities go back over it.
    pub fn add_link(
        &self,
        socket: &str,
        endpoint: &str,
        uuid: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        self.check_open()?;
        let (stream, reader) = crate::link::open(&self.session, endpoint, uuid, "engine", timeout)?;
        let mut state = self.take();
        let entry = state
            .entries
            .iter()
            .position(|e| *e.name == *socket && e.kind == SocketKind::Router)
            .ok_or_else(|| format!("no ROUTER socket named {socket:?}"))?;
        state.link = Some(Link {
            entry,
            stream,
            reader,
            writer: LinkWriter::new(),
            more: false,
        });
        self.link_state.store(LINK_UP, Ordering::SeqCst);
        Ok(())
    }

    /// [`LINK_NONE`] (no link), [`LINK_UP`] or [`LINK_LOST`] (it was closed or broke: the
    /// controller considers this engine gone).
    pub fn link_state(&self) -> u8 {
        self.link_state.load(Ordering::SeqCst)
    }

    /// The link broke: drop it and say why.
    fn lose_link(&self, state: &mut State, why: String, drops: &mut Vec<DropReport>) {
        if let Some(link) = state.link.take() {
            drops.push(DropReport {
                socket: state.entries[link.entry].name.clone(),
                kind: "LinkClosed",
                text: why,
            });
            self.link_state.store(LINK_LOST, Ordering::SeqCst);
        }
    }

    /// Read the link's messages into `batch` (at most [`RECV_BURST`]).
    fn service_link(
        &self,
        state: &mut State,
        batch: &mut Vec<Incoming>,
        drops: &mut Vec<DropReport>,
    ) {
        let Some(link) = state.link.as_mut() else {
            return;
        };
        let mut got = Vec::new();
        let read = link
            .reader
            .read(link.stream.as_raw_fd(), &mut got, RECV_BURST);
        let name = state.entries[link.entry].name.clone();
        for (channel, mut frames) in got {
            self.received.fetch_add(1, Ordering::Relaxed);
            let Some(ident) = link_ident(channel) else {
                drops.push(DropReport {
                    socket: name.clone(),
                    kind: "LinkChannel",
                    text: format!("a message on unknown link channel {channel}"),
                });
                continue;
            };
            frames.insert(0, RecvFrame::from_bytes(ident));
            match self.session.parse_answerable_keeping_header(frames) {
                Ok((idents, parts, buffers, header)) => batch.push(Incoming {
                    socket: name.clone(),
                    delivery: Delivery::Message {
                        idents,
                        parts,
                        buffers,
                        header: Some(header.as_ref().to_vec()),
                    },
                }),
                Err(err) => drops.push(DropReport {
                    socket: name.clone(),
                    kind: err.kind(),
                    text: err.to_string(),
                }),
            }
        }
        match read {
            Ok(more) => link.more = more,
            Err(e) => self.lose_link(state, e.to_string(), drops),
        }
    }

    /// Write what the link has queued, waiting until `deadline` while the controller does not
    /// read; a failure (or the deadline) loses the link (a message may be cut short).
    fn flush_link(&self, state: &mut State, deadline: Instant) -> Result<(), String> {
        let Some(link) = state.link.as_mut() else {
            return Err("the engine link to the controller is closed".into());
        };
        let fd = link.stream.as_raw_fd();
        let why = loop {
            match link.writer.flush(fd) {
                Ok(true) => {
                    return Ok(());
                }
                Ok(false) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        break "the controller is not reading the engine link".to_string();
                    }
                    poll_fd(fd, libc::POLLOUT, left.as_millis().clamp(1, 100) as i32);
                }
                Err(e) => break format!("cannot write to the engine link: {e}"),
            }
        };
        let mut drops = Vec::new();
        self.lose_link(state, why.clone(), &mut drops);
        self.report(drops);
        Err(why)
    }

    /// Wait up to `timeout` for messages on any socket and return those that arrived (at most
    /// [`RECV_BURST`] per socket), and whether the wait was cut short by [`Self::wake`].
    ///
    /// `poll(2)` watches each socket's `ZMQ_FD` (and the wake-up pipe); `ZMQ_EVENTS` is read
    /// only for sockets that were used or signalled. (`zmq_poll` reads every socket's command
    /// mailbox, one syscall each, before and after every wait.)
    pub fn recv(&self, timeout: Duration) -> Result<(Vec<Incoming>, bool), String> {
        self.check_open()?;
        let mut state = lock(&self.state);
        let mut batch = Vec::new();
        let mut drops = Vec::new();
        for e in state.entries.iter_mut() {
            self.service(e, &mut batch, &mut drops);
        }
        let link_fd = state.link.as_ref().map(|l| l.stream.as_raw_fd());
        if state.link.as_ref().is_some_and(|l| l.more) {
            self.service_link(&mut state, &mut batch, &mut drops);
        }
        let State {
            entries,
            wake_rx,
            monitors_read,
            ..
        } = &mut *state;
        let mut woken = false;
        let mut link_fired = false;
        if batch.is_empty() {
            let mut fds = Vec::with_capacity(2 + 2 * entries.len());
            fds.push(pollfd(wake_rx.as_raw_fd()));
            for e in entries.iter() {
                fds.push(pollfd(e.sock.get_fd().unwrap_or(-1)));
            }
            for e in entries.iter() {
                if let Some(m) = &e.monitor {
                    fds.push(pollfd(m.get_fd().unwrap_or(-1)));
                }
            }
            if let Some(fd) = link_fd {
                fds.push(pollfd(fd));
            }
            let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs for the whole call.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
            // EINTR (a signal) or a wait that timed out: look at every socket (the caller
            // checks signals). Not after a mere check (timeout 0: the engine looks for control
            // requests between two queued ones): nothing fired, and reading each socket's
            // ZMQ_EVENTS and monitor would cost a syscall apiece, on every request.
            let look_everywhere = rc < 0 || (rc == 0 && !timeout.is_zero());
            let fired = |k: usize| look_everywhere || fds[k].revents != 0;
            if rc > 0 && fds[0].revents != 0 {
                woken = true;
                drain(wake_rx);
            }
            let monitors_end = fds.len() - usize::from(link_fd.is_some());
            let monitors_fired = fds[1 + entries.len()..monitors_end]
                .iter()
                .any(|f| f.revents != 0);
            link_fired = link_fd.is_some() && (look_everywhere || fds[monitors_end].revents != 0);
            for (k, e) in entries.iter_mut().enumerate() {
                e.check |= fired(1 + k);
            }
            if monitors_fired || look_everywhere || monitors_read.elapsed() >= MONITOR_INTERVAL {
                for e in entries.iter() {
                    e.read_monitor(&self.handshakes);
                }
                *monitors_read = Instant::now();
            }
            for e in entries.iter_mut() {
                self.service(e, &mut batch, &mut drops);
            }
        }
        if link_fired {
            self.service_link(&mut state, &mut batch, &mut drops);
        }
        drop(state);
        self.report(drops);
        Ok((batch, woken))
    }

    /// Receive from `e` if it was flagged and has messages (see [`Entry::check`]).
    fn service(&self, e: &mut Entry, batch: &mut Vec<Incoming>, drops: &mut Vec<DropReport>) {
        if !std::mem::take(&mut e.check) {
            return;
        }
        // read even for sockets that do not receive: it resets their descriptor's signal
        let events = e.sock.get_events().unwrap_or(zmq::POLLIN);
        if e.kind.receives() && events.contains(zmq::POLLIN) {
            // a full burst may leave messages: look again before the next wait
            e.check = self.receive(e, batch, drops);
        }
    }

    /// Record dropped messages (also those the caller could not convert), for
    /// [`Self::take_drops`]; at most a thousand are kept.
    pub fn report(&self, drops: Vec<DropReport>) {
        if drops.is_empty() {
            return;
        }
        let mut d = lock(&self.drops);
        let room = MAX_DROP_REPORTS.saturating_sub(d.len());
        d.extend(drops.into_iter().take(room));
    }

    /// Receive up to [`RECV_BURST`] messages; true when the burst was used up.
    fn receive(
        &self,
        e: &mut Entry,
        batch: &mut Vec<Incoming>,
        drops: &mut Vec<DropReport>,
    ) -> bool {
        for _ in 0..RECV_BURST {
            let frames = match recv_multipart(&mut e.sock) {
                Ok(Some(frames)) => frames,
                Ok(None) => return false,
                Err(text) => {
                    drops.push(DropReport {
                        socket: e.name.clone(),
                        kind: "RecvError",
                        text,
                    });
                    return false;
                }
            };
            self.received.fetch_add(1, Ordering::Relaxed);
            if e.raw {
                batch.push(Incoming {
                    socket: e.name.clone(),
                    delivery: Delivery::Raw(frames),
                });
                continue;
            }
            match self.session.parse_answerable_keeping_header(frames) {
                Ok((idents, parts, buffers, header)) => batch.push(Incoming {
                    socket: e.name.clone(),
                    delivery: Delivery::Message {
                        idents,
                        parts,
                        buffers,
                        header: Some(header.as_ref().to_vec()),
                    },
                }),
                Err(err) => drops.push(DropReport {
                    socket: e.name.clone(),
                    kind: err.kind(),
                    text: err.to_string(),
                }),
            }
        }
        true
    }

    /// Wait up to `timeout` until every connecting socket has completed a handshake with each
    /// of its endpoints (so that a peer routing to our identity finds us). False on timeout;
    /// [`Self::handshakes`] then says what failed.
    pub fn wait_connected(&self, timeout: Duration) -> Result<bool, String> {
        self.check_open()?;
        let deadline = Instant::now() + timeout;
        loop {
            let state = self.take();
            for e in &state.entries {
                e.read_monitor(&self.handshakes);
            }
            let done = state.entries.iter().all(|e| {
                e.monitor.is_none() || self.handshakes.state(&e.name).succeeded >= e.endpoints
            });
            if done {
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            let mut items: Vec<_> = state
                .entries
                .iter()
                .filter_map(|e| e.monitor.as_ref())
                .map(|m| m.as_poll_item(zmq::POLLIN))
                .collect();
            let ms = left.as_millis().clamp(1, 50) as i64;
            let _ = zmq::poll(&mut items, ms);
        }
    }

    /// Send one message on `socket`, waiting up to `timeout` while its peer is not ready
    /// (high-water mark reached).
    ///
    /// `hold`: keep the message back until [`DirectSockets::send_held`] or the next send
    /// that is not held (messages leave in the order they were given). An engine holds the
    /// replies of requests that were already queued behind the one it answers, so that they
    /// leave together (decision 0010).
    pub fn send(
        &self,
        socket: &str,
        frames: Vec<OutFrame>,
        timeout: Duration,
        hold: bool,
    ) -> Result<(), String> {
        self.check_open()?;
        let deadline = Instant::now() + timeout;
        let mut frames = frames;
        // a reply to a request that came over the link goes back over it, without the
        // link's identity
        let channel = frames.first().and_then(|f| link_channel(f.bytes()));
        if channel.is_some() {
            frames.remove(0);
        }
        let ready = ReadyFrames::new(frames, &self.releases);
        let mut state = self.take();
        let index = state
            .entries
            .iter()
            .position(|e| *e.name == *socket)
            .ok_or_else(|| format!("no socket named {socket:?}"))?;
        let entry = &state.entries[index];
        if !matches!(
            entry.kind,
            SocketKind::Router | SocketKind::Dealer | SocketKind::Pair | SocketKind::Pub
        ) {
            return Err(format!(
                "socket {socket:?} ({:?}) does not send here",
                entry.kind
            ));
        }
        if channel.is_some() && state.link.as_ref().map(|l| l.entry) != Some(index) {
            return Err("the engine link to the controller is closed".into());
        }
        if hold {
            state.held.push((index, channel, ready));
            self.held.store(state.held.len(), Ordering::SeqCst);
            return Ok(());
        }
        let sent_held = self.send_held_locked(&mut state, deadline);
        let sent = match (channel, state.link.as_mut()) {
            (Some(ch), Some(link)) => {
                link.writer.push_ready(ch, ready)?;
                self.flush_link(&mut state, deadline)
                    .map(|_| self.count_sent(1))
            }
            (Some(_), None) => Err("the engine link to the controller is closed".into()),
            (None, _) => self.send_ready(&mut state.entries[index], ready, deadline, timeout),
        };
        sent_held.and(sent)
    }

    fn count_sent(&self, n: u64) {
        self.sent.fetch_add(n, Ordering::Relaxed);
    }

    /// Number of messages held back.
    pub fn held(&self) -> usize {
        self.held.load(Ordering::SeqCst)
    }

    /// Send every held message, waiting up to `timeout` for each peer that is not ready.
    pub fn send_held(&self, timeout: Duration) -> Result<(), String> {
        if self.held() == 0 {
            return Ok(());
        }
        self.check_open()?;
        let mut state = self.take();
        self.send_held_locked(&mut state, Instant::now() + timeout)
    }

    /// Send what is held, in order; the first failure is returned after trying them all.
    fn send_held_locked(&self, state: &mut State, deadline: Instant) -> Result<(), String> {
        let held = std::mem::take(&mut state.held);
        self.held.store(0, Ordering::SeqCst);
        let mut result = Ok(());
        let mut over_link = 0;
        for (index, channel, ready) in held {
            let left = deadline.saturating_duration_since(Instant::now());
            let sent = match (channel, state.link.as_mut()) {
                (Some(ch), Some(link)) => {
                    over_link += 1;
                    link.writer.push_ready(ch, ready)
                }
                (Some(_), None) => Err("the engine link to the controller is closed".into()),
                (None, _) => self.send_ready(&mut state.entries[index], ready, deadline, left),
            };
            if let Err(e) = sent {
                result = result.and(Err(e));
            }
        }
        if over_link > 0 {
            // the held replies leave in one write
            match self.flush_link(state, deadline) {
                Ok(()) => self.count_sent(over_link),
                Err(e) => result = result.and(Err(e)),
            }
        }
        result
    }

    /// Send `ready` on `entry`, waiting until `deadline` while the peer is not ready.
    fn send_ready(
        &self,
        entry: &mut Entry,
        mut ready: ReadyFrames,
        deadline: Instant,
        timeout: Duration,
    ) -> Result<(), String> {
        let socket = &entry.name;
        entry.check = true; // a send may consume the socket's ZMQ_FD signal
        loop {
            match try_send(&mut entry.sock, ready) {
                Sent::Ok => {
                    self.sent.fetch_add(1, Ordering::Relaxed);
                    return Ok(());
                }
                Sent::Failed(_, text) => return Err(format!("send on {socket:?} failed: {text}")),
                Sent::WouldBlock(back) => {
                    let left = deadline.saturating_duration_since(Instant::now());
                    if left.is_zero() {
                        return Err(format!(
                            "send on {socket:?} timed out after {timeout:?}: the peer is not \
                             taking messages"
                        ));
                    }
                    ready = back;
                    let mut items = [entry.sock.as_poll_item(zmq::POLLOUT)];
                    let ms = left.as_millis().clamp(1, 100) as i64;
                    let _ = zmq::poll(&mut items, ms);
                }
            }
        }
    }

    /// Messages dropped since the last call (bad signatures, unparsable frames).
    pub fn take_drops(&self) -> Vec<DropReport> {
        std::mem::take(&mut *lock(&self.drops))
    }

    /// Close every socket (each lingers as its spec said). Idempotent.
    pub fn close(&self) {
        if self.closed.swap(true, Ordering::SeqCst) {
            return;
        }
        let mut state = self.take();
        let _ = self.send_held_locked(&mut state, Instant::now() + Duration::from_secs(1));
        state.link = None;
        state.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::link::{LinkLimits, LinkMessage, CH_LINK};
    use crate::session::OutgoingMessage;
    use std::os::linux::net::SocketAddrExt;
    use std::os::unix::net::SocketAddr;

    /// Send one owned frame on socket "a" (held or not), waiting up to 1 s.
    fn send_on_a(d: &DirectSockets, body: &[u8], hold: bool) -> Result<(), String> {
        d.send(
            "a",
            vec![OutFrame::Owned(body.to_vec())],
            Duration::from_secs(1),
            hold,
        )
    }

    fn session() -> Arc<SessionCore> {
        let core = SessionCore::new(
            b"k".to_vec(),
            fp_wire::Packer::Json,
            "hmac-sha256",
            "s".into(),
            "u".into(),
            16,
            fp_wire::Limits::default(),
        );
        Arc::new(core.expect("session"))
    }

    #[test]
    fn wake_interrupts_a_waiting_recv_and_send_takes_over() {
        let d = Arc::new(DirectSockets::new(session()).expect("direct"));
        let mut spec = SocketSpec::new("a", SocketKind::Pair);
        spec.bind = vec!["inproc://fp-direct-test-a".into()];
        spec.raw = true;
        d.add_socket(spec).expect("bind");
        let peer = crate::context().socket(zmq::PAIR).expect("peer");
        peer.connect("inproc://fp-direct-test-a").expect("connect");
        let waiter = {
            let d = d.clone();
            std::thread::spawn(move || {
                let t0 = Instant::now();
                let (got, woken) = d.recv(Duration::from_secs(10)).expect("recv");
                assert!(woken);
                (got.len(), t0.elapsed())
            })
        };
        std::thread::sleep(Duration::from_millis(100));
        // the send interrupts the waiting recv instead of waiting 10 s for the lock
        send_on_a(&d, b"x", false).expect("send");
        let (n, waited) = waiter.join().expect("join");
        assert_eq!(n, 0);
        assert!(waited < Duration::from_secs(5), "{waited:?}");
        assert_eq!(peer.recv_bytes(0).expect("recv"), b"x");
        peer.send(&b"y"[..], 0).expect("send");
        let (got, _) = d.recv(Duration::from_secs(5)).expect("recv");
        assert_eq!(got.len(), 1);
        assert!(matches!(&got[0].delivery, Delivery::Raw(f) if f[0].as_ref() == b"y"));
        assert!(d
            .send("nope", Vec::new(), Duration::from_secs(1), false)
            .is_err());
        // held messages leave in order, with the next send that is not held or send_held
        for body in [&b"h1"[..], b"h2"] {
            send_on_a(&d, body, true).expect("hold");
        }
        assert_eq!(d.held(), 2);
        assert!(peer.recv_bytes(zmq::DONTWAIT).is_err(), "nothing left yet");
        send_on_a(&d, b"now", false).expect("send");
        assert_eq!(d.held(), 0);
        for want in [&b"h1"[..], b"h2", b"now"] {
            assert_eq!(peer.recv_bytes(0).expect("recv"), want);
        }
        send_on_a(&d, b"h3", true).expect("hold");
        d.send_held(Duration::from_secs(1)).expect("send_held");
        assert_eq!(peer.recv_bytes(0).expect("recv"), b"h3");
        d.close();
        assert!(d.recv(Duration::from_millis(1)).is_err());
    }

    #[test]
    fn a_zero_timeout_check_reads_only_what_fired() {
        let d = DirectSockets::new(session()).expect("direct");
        let mut spec = SocketSpec::new("a", SocketKind::Pair);
        spec.bind = vec!["inproc://fp-direct-test-check".into()];
        spec.raw = true;
        d.add_socket(spec).expect("bind");
        let peer = crate::context().socket(zmq::PAIR).expect("peer");
        peer.connect("inproc://fp-direct-test-check")
            .expect("connect");
        let (got, _) = d.recv(Duration::ZERO).expect("recv");
        assert!(got.is_empty());
        let read_at = lock(&d.state).monitors_read;
        // nothing fired: no socket's events nor monitor is read (a syscall each, which the
        // engine would pay before every queued request)
        for _ in 0..3 {
            let (got, woken) = d.recv(Duration::ZERO).expect("recv");
            assert!(got.is_empty() && !woken);
        }
        assert_eq!(lock(&d.state).monitors_read, read_at);
        assert!(lock(&d.state).entries.iter().all(|e| !e.check));
        // what arrives is still seen by such checks
        peer.send(&b"m"[..], 0).expect("send");
        let t0 = Instant::now();
        let got = loop {
            let (got, _) = d.recv(Duration::ZERO).expect("recv");
            if !got.is_empty() || t0.elapsed() > Duration::from_secs(5) {
                break got;
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        assert!(
            matches!(&got[..], [m] if matches!(&m.delivery, Delivery::Raw(f) if f[0].as_ref() == b"m"))
        );
        d.close();
    }

    /// A signed message built by `core` (no routing identity).
    fn signed(core: &SessionCore, msg_type: &str) -> ReadyFrames {
        let parts = fp_wire::Parts {
            header: core.headers.header(msg_type),
            parent_header: fp_wire::Value::empty_map(),
            metadata: fp_wire::Value::empty_map(),
            content: fp_wire::Value::empty_map(),
        };
        let frames = core
            .build_frames(OutgoingMessage {
                idents: Vec::new(),
                parts,
                buffers: Vec::new(),
            })
            .expect("build");
        ReadyFrames::new(frames, &ReleaseQueue::new())
    }

    /// Read one link message from a blocking-ish non-blocking stream, waiting up to 5 s.
    fn read_one(r: &mut LinkReader, s: &UnixStream) -> Result<LinkMessage, crate::link::LinkError> {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = Vec::new();
        while got.is_empty() && Instant::now() < deadline {
            r.read(s.as_raw_fd(), &mut got, 1)?;
            poll_fd(s.as_raw_fd(), libc::POLLIN, 50);
        }
        Ok(got.remove(0))
    }

    #[test]
    fn a_link_carries_requests_and_replies_and_reports_its_loss() {
        let name = format!("fp-direct-link-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let listener = std::os::unix::net::UnixListener::bind_addr(&addr).expect("listen");
        let core = session();
        let d = Arc::new(DirectSockets::new(core.clone()).expect("direct"));
        d.add_socket(SocketSpec::new("shell", SocketKind::Router))
            .expect("socket");
        // the controller's side, in a thread: read the hello, welcome, then send a task
        let fake = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            stream.set_nonblocking(true).expect("nb");
            let mut r = LinkReader::new(LinkLimits::UNAUTHENTICATED);
            let (ch, hello) = read_one(&mut r, &stream).expect("hello");
            assert_eq!(ch, CH_LINK);
            let mut w = LinkWriter::new();
            w.push_control(crate::link::WELCOME);
            w.push_ready(CH_TASK, signed(&core, "apply_request"))
                .expect("push");
            while !w.flush(stream.as_raw_fd()).expect("flush") {}
            let reply = read_one(&mut r, &stream).expect("reply");
            (hello.len(), reply.0, stream)
        });
        assert_eq!(d.link_state(), LINK_NONE);
        d.add_link(
            "shell",
            &format!("ipc://@{name}"),
            "engine-1",
            Duration::from_secs(5),
        )
        .expect("link");
        assert_eq!(d.link_state(), LINK_UP);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut got = Vec::new();
        while got.is_empty() && Instant::now() < deadline {
            got = d.recv(Duration::from_millis(100)).expect("recv").0;
        }
        let Delivery::Message { idents, parts, .. } = &got[0].delivery else {
            panic!("not a message");
        };
        assert_eq!(&*got[0].socket, "shell");
        assert_eq!(idents[0].as_ref(), b"fp-link/task");
        assert_eq!(
            parts.header.get("msg_type").and_then(|v| v.as_str()),
            Some("apply_request")
        );
        // the reply, to that identity, goes back over the link without it
        let reply = signed(&session(), "apply_reply").into_raw();
        let mut frames = vec![OutFrame::Owned(b"fp-link/task".to_vec())];
        frames.extend(reply.iter().map(|m| OutFrame::Owned(m.bytes().to_vec())));
        d.send("shell", frames, Duration::from_secs(5), false)
            .expect("send");
        let (hello_frames, reply_channel, stream) = fake.join().expect("fake");
        assert!(hello_frames >= 6, "a signed message: {hello_frames} frames");
        assert_eq!(reply_channel, CH_TASK);
        // the controller closes the link: the engine learns it, and replies fail
        drop(stream);
        let deadline = Instant::now() + Duration::from_secs(5);
        while d.link_state() != LINK_LOST && Instant::now() < deadline {
            d.recv(Duration::from_millis(100)).expect("recv");
        }
        assert_eq!(d.link_state(), LINK_LOST);
        assert!(d.take_drops().iter().any(|r| r.kind == "LinkClosed"));
        let frames = vec![
            OutFrame::Owned(b"fp-link/mux".to_vec()),
            OutFrame::Owned(b"x".to_vec()),
        ];
        let err = d
            .send("shell", frames, Duration::from_secs(1), false)
            .expect_err("closed");
        assert!(err.contains("link"), "{err}");
    }

    #[test]
    fn wait_connected_waits_for_every_endpoint() {
        let server = crate::context().socket(zmq::ROUTER).expect("router");
        server.bind("tcp://127.0.0.1:*").expect("bind");
        let up = server.get_last_endpoint().expect("ep").expect("utf8");
        let d = DirectSockets::new(session()).expect("direct");
        let mut spec = SocketSpec::new("shell", SocketKind::Dealer);
        spec.connect = vec![up.clone()];
        d.add_socket(spec).expect("connect");
        assert!(d.wait_connected(Duration::from_secs(10)).expect("open"));
        assert_eq!(d.handshakes.state("shell").succeeded, 1);
        // a second endpoint that accepts TCP but never speaks ZMTP: not connected until the
        // timeout (a freed port could be taken meanwhile by another process's ZMQ socket)
        let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("listen");
        let gone = format!("tcp://{}", silent.local_addr().expect("addr"));
        let mut spec = SocketSpec::new("control", SocketKind::Dealer);
        spec.connect = vec![up, gone];
        d.add_socket(spec).expect("connect");
        let t0 = Instant::now();
        assert!(!d.wait_connected(Duration::from_millis(300)).expect("open"));
        assert!(t0.elapsed() < Duration::from_secs(5));
    }
}
