//! The I/O thread: owns the sockets, sends queued frames, receives and verifies messages.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::handshake::{parse_event, Handshakes};
use crate::inbox::{Delivery, DropReport, Inbox, Incoming};
use crate::outframe::{send_frames, OutFrame, RawMsg, RecvFrame, ReleaseQueue, SendOutcome};
use crate::session::SessionCore;
use crate::socket::{monitor_endpoint, SocketKind, SocketSpec};

/// Counters kept by the I/O thread.
#[derive(Debug, Default)]
pub struct IoStats {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub dropped: AtomicU64,
    pub send_errors: AtomicU64,
    pub forwarded: AtomicU64,
}

type AddReply = Sender<Result<Vec<String>, String>>;

enum Command {
    AddSocket(Box<SocketSpec>, AddReply),
    Send {
        socket: String,
        frames: Vec<OutFrame>,
    },
    Close,
}

/// The caller's side of an I/O thread. Cheap to share between threads.
pub struct IoHandle {
    commands: Sender<Command>,
    wake: Mutex<zmq::Socket>,
    wake_pending: Arc<AtomicBool>,
    pub inbox: Arc<Inbox>,
    pub releases: ReleaseQueue,
    pub stats: Arc<IoStats>,
    pub session: Arc<SessionCore>,
    /// Handshake outcomes of the connecting sockets (see [`Handshakes`]).
    pub handshakes: Arc<Handshakes>,
    names: Mutex<HashMap<String, SocketKind>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    closed: AtomicBool,
}

/// How long one poll waits before re-checking commands (commands also wake it at once).
const POLL_MS: i64 = 100;
/// Messages received from one socket before the loop looks at the others.
const RECV_BURST: usize = 512;
/// How long `close` keeps trying to flush queued messages.
const CLOSE_FLUSH: Duration = Duration::from_millis(2000);

static WAKE_COUNTER: AtomicU64 = AtomicU64::new(0);

impl IoHandle {
    /// Start an I/O thread for `session`.
    pub fn spawn(session: Arc<SessionCore>, name: &str) -> Result<IoHandle, String> {
        let ctx = crate::context();
        let n = WAKE_COUNTER.fetch_add(1, Ordering::Relaxed);
        let endpoint = format!("inproc://fp-io-wake-{}-{n}", std::process::id());
        let wake_rx = ctx.socket(zmq::PAIR).map_err(|e| e.to_string())?;
        wake_rx.bind(&endpoint).map_err(|e| e.to_string())?;
        let wake_tx = ctx.socket(zmq::PAIR).map_err(|e| e.to_string())?;
        wake_tx.connect(&endpoint).map_err(|e| e.to_string())?;
        wake_tx.set_linger(0).map_err(|e| e.to_string())?;
        let (tx, rx) = mpsc::channel();
        let inbox = Arc::new(Inbox::default());
        let releases = ReleaseQueue::new();
        let stats = Arc::new(IoStats::default());
        let wake_pending = Arc::new(AtomicBool::new(false));
        let handshakes = Arc::new(Handshakes::default());
        let mut lp = Loop {
            sockets: Vec::new(),
            by_name: HashMap::new(),
            wake: wake_rx,
            commands: rx,
            wake_pending: wake_pending.clone(),
            inbox: inbox.clone(),
            releases: releases.clone(),
            stats: stats.clone(),
            session: session.clone(),
            handshakes: handshakes.clone(),
        };
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || lp.run())
            .map_err(|e| format!("cannot start the I/O thread: {e}"))?;
        Ok(IoHandle {
            commands: tx,
            wake: Mutex::new(wake_tx),
            wake_pending,
            inbox,
            releases,
            stats,
            session,
            handshakes,
            names: Mutex::new(HashMap::new()),
            thread: Mutex::new(Some(thread)),
            closed: AtomicBool::new(false),
        })
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    fn command(&self, cmd: Command) -> Result<(), String> {
        self.command_with(cmd, true)
    }

    fn command_with(&self, cmd: Command, wake: bool) -> Result<(), String> {
        if self.is_closed() {
            return Err("the I/O thread is closed".into());
        }
        self.commands
            .send(cmd)
            .map_err(|_| "the I/O thread has stopped".to_string())?;
        if wake && !self.wake_pending.swap(true, Ordering::SeqCst) {
            let wake = self.wake.lock().unwrap_or_else(|e| e.into_inner());
            // A full or failed wake socket only delays the command until the next poll timeout.
            let _ = wake.send(&b""[..], zmq::DONTWAIT);
        }
        Ok(())
    }

    /// Create a socket on the I/O thread and wait (at most `timeout`) for its bound endpoints.
    pub fn add_socket(&self, spec: SocketSpec, timeout: Duration) -> Result<Vec<String>, String> {
        if let Some(target) = &spec.forward_to {
            if !self.has_socket(target) {
                return Err(format!(
                    "forward_to names no socket: {target:?}; add it first"
                ));
            }
        }
        if self.has_socket(&spec.name) {
            return Err(format!("a socket named {:?} already exists", spec.name));
        }
        let (tx, rx) = mpsc::channel();
        let name = spec.name.clone();
        let kind = spec.kind;
        self.command(Command::AddSocket(Box::new(spec), tx))?;
        let bound = rx
            .recv_timeout(timeout)
            .map_err(|_| format!("timed out creating socket {name:?}"))??;
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name, kind);
        Ok(bound)
    }

    pub fn has_socket(&self, name: &str) -> bool {
        self.names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(name)
    }

    /// Queue frames for a socket. Never blocks.
    pub fn send(&self, socket: &str, frames: Vec<OutFrame>) -> Result<(), String> {
        self.send_with(socket, frames, true)
    }

    /// Queue frames; with `flush` false the I/O thread is not woken, so the message leaves with
    /// the next flushed one (or within one poll interval). Saves a thread wake-up for messages
    /// that are always followed by another (e.g. a busy status before a reply).
    pub fn send_with(
        &self,
        socket: &str,
        frames: Vec<OutFrame>,
        flush: bool,
    ) -> Result<(), String> {
        match self
            .names
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(socket)
        {
            None => return Err(format!("no socket named {socket:?}")),
            Some(kind) if matches!(kind, SocketKind::Sub | SocketKind::Pull) => {
                return Err(format!(
                    "socket {socket:?} is a {kind:?} socket and cannot send"
                ))
            }
            Some(_) => {}
        }
        self.command_with(
            Command::Send {
                socket: socket.to_owned(),
                frames,
            },
            flush,
        )
    }

    /// Stop the thread (flushing queued messages for a bounded time) and close every socket.
    pub fn close(&self) {
        if self.closed.load(Ordering::SeqCst) {
            return;
        }
        let _ = self.command(Command::Close);
        self.closed.store(true, Ordering::SeqCst);
        let handle = self.thread.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
        self.inbox.close();
    }
}

impl Drop for IoHandle {
    fn drop(&mut self) {
        self.close();
    }
}

struct Entry {
    name: Arc<str>,
    sock: zmq::Socket,
    kind: SocketKind,
    raw: bool,
    forward: Option<usize>,
    pending: VecDeque<Vec<RawMsg>>,
    /// PAIR socket receiving this socket's handshake events (connecting sockets only).
    monitor: Option<zmq::Socket>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        if self.monitor.is_some() {
            // libzmq's I/O thread sends monitor events with a *blocking* send. Once our end of
            // the monitor pipe is gone, the next event (e.g. a failed reconnect handshake while
            // the socket lingers) would block that thread for good, and with it every socket
            // of the process. So stop the monitor before either socket is closed.
            // SAFETY: the socket pointer is valid while `self.sock` lives; a NULL endpoint
            // with no events is libzmq's documented way to stop monitoring.
            unsafe {
                zmq_sys::zmq_socket_monitor(self.sock.as_mut_ptr(), std::ptr::null(), 0);
            }
        }
    }
}

struct Loop {
    sockets: Vec<Entry>,
    by_name: HashMap<String, usize>,
    wake: zmq::Socket,
    commands: Receiver<Command>,
    wake_pending: Arc<AtomicBool>,
    inbox: Arc<Inbox>,
    releases: ReleaseQueue,
    stats: Arc<IoStats>,
    session: Arc<SessionCore>,
    handshakes: Arc<Handshakes>,
}

impl Loop {
    fn run(&mut self) {
        let mut closing = false;
        while !closing {
            let (wake_ready, readable, writable, monitors) = self.poll(POLL_MS);
            if wake_ready {
                while self.wake.recv_bytes(zmq::DONTWAIT).is_ok() {}
            }
            self.wake_pending.store(false, Ordering::SeqCst);
            closing = self.run_commands();
            let mut batch = Vec::new();
            let mut drops = Vec::new();
            for i in 0..self.sockets.len() {
                if readable.get(i).copied().unwrap_or(false) {
                    self.receive(i, &mut batch, &mut drops);
                }
                if writable.get(i).copied().unwrap_or(false) {
                    self.flush(i);
                }
                if monitors.get(i).copied().unwrap_or(false) {
                    self.read_monitor(i);
                }
            }
            self.inbox.push_batch(batch, drops);
        }
        self.flush_all_until(Instant::now() + CLOSE_FLUSH);
        self.sockets.clear();
        self.inbox.close();
    }

    /// Poll the wake socket, every socket and every monitor. Returns whether the wake socket
    /// is readable, and per socket: readable, writable, monitor readable.
    fn poll(&self, timeout_ms: i64) -> (bool, Vec<bool>, Vec<bool>, Vec<bool>) {
        let n = self.sockets.len();
        let mut items = Vec::with_capacity(2 * n + 1);
        items.push(self.wake.as_poll_item(zmq::POLLIN));
        for e in &self.sockets {
            let mut ev = zmq::PollEvents::empty();
            if e.kind.receives() {
                ev |= zmq::POLLIN;
            }
            if !e.pending.is_empty() {
                ev |= zmq::POLLOUT;
            }
            items.push(e.sock.as_poll_item(ev));
        }
        let mut monitor_of = Vec::new();
        for (i, e) in self.sockets.iter().enumerate() {
            if let Some(m) = &e.monitor {
                items.push(m.as_poll_item(zmq::POLLIN));
                monitor_of.push(i);
            }
        }
        if zmq::poll(&mut items, timeout_ms).is_err() {
            // EINTR and friends: treat as "nothing ready"; the loop simply polls again.
            return (false, Vec::new(), Vec::new(), Vec::new());
        }
        let wake = items[0].is_readable();
        let readable = items[1..=n].iter().map(|i| i.is_readable()).collect();
        let writable = items[1..=n].iter().map(|i| i.is_writable()).collect();
        let mut monitors = vec![false; n];
        for (k, &i) in monitor_of.iter().enumerate() {
            monitors[i] = items[n + 1 + k].is_readable();
        }
        (wake, readable, writable, monitors)
    }

    /// Record every queued handshake event of socket `i`.
    fn read_monitor(&mut self, i: usize) {
        let entry = &self.sockets[i];
        let Some(monitor) = &entry.monitor else {
            return;
        };
        while let Ok(frames) = monitor.recv_multipart(zmq::DONTWAIT) {
            if let Some((event, value, endpoint)) = parse_event(&frames) {
                self.handshakes.record(&entry.name, event, value, endpoint);
            }
        }
    }

    /// Run queued commands; returns true when asked to close.
    fn run_commands(&mut self) -> bool {
        loop {
            match self.commands.try_recv() {
                Ok(Command::Close) => return true,
                Ok(Command::AddSocket(spec, reply)) => {
                    let result = self.add_socket(*spec);
                    let _ = reply.send(result);
                }
                Ok(Command::Send { socket, frames }) => {
                    if let Some(&i) = self.by_name.get(&socket) {
                        let raw = frames
                            .into_iter()
                            .map(|f| f.into_raw(&self.releases))
                            .collect();
                        self.send(i, raw);
                    }
                }
                Err(TryRecvError::Empty) => return false,
                Err(TryRecvError::Disconnected) => return true,
            }
        }
    }

    fn add_socket(&mut self, spec: SocketSpec) -> Result<Vec<String>, String> {
        let forward = match &spec.forward_to {
            Some(t) => Some(
                *self
                    .by_name
                    .get(t)
                    .ok_or_else(|| format!("forward_to names no socket: {t:?}"))?,
            ),
            None => None,
        };
        let monitor = monitor_endpoint(&spec);
        let (sock, bound, monitor) = spec.create(crate::context(), monitor.as_deref())?;
        self.by_name.insert(spec.name.clone(), self.sockets.len());
        self.sockets.push(Entry {
            name: Arc::from(spec.name.as_str()),
            sock,
            kind: spec.kind,
            raw: spec.raw,
            forward,
            pending: VecDeque::new(),
            monitor,
        });
        Ok(bound)
    }

    fn send(&mut self, i: usize, frames: Vec<RawMsg>) {
        let entry = &mut self.sockets[i];
        if !entry.pending.is_empty() {
            entry.pending.push_back(frames);
            return;
        }
        match send_frames(&mut entry.sock, frames) {
            SendOutcome::Sent => {
                self.stats.sent.fetch_add(1, Ordering::Relaxed);
            }
            SendOutcome::WouldBlock(frames) => entry.pending.push_back(frames),
            SendOutcome::Failed(reason) => {
                self.stats.send_errors.fetch_add(1, Ordering::Relaxed);
                let report = DropReport {
                    socket: entry.name.clone(),
                    kind: "SendError",
                    text: format!("send failed: {reason}"),
                };
                self.inbox.push_batch(Vec::new(), vec![report]);
            }
        }
    }

    fn flush(&mut self, i: usize) {
        while let Some(frames) = self.sockets[i].pending.pop_front() {
            match send_frames(&mut self.sockets[i].sock, frames) {
                SendOutcome::Sent => {
                    self.stats.sent.fetch_add(1, Ordering::Relaxed);
                }
                SendOutcome::WouldBlock(frames) => {
                    self.sockets[i].pending.push_front(frames);
                    return;
                }
                SendOutcome::Failed(_) => {
                    self.stats.send_errors.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    }

    fn flush_all_until(&mut self, deadline: Instant) {
        while Instant::now() < deadline {
            for i in 0..self.sockets.len() {
                self.flush(i);
            }
            if self.sockets.iter().all(|e| e.pending.is_empty()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn receive(&mut self, i: usize, batch: &mut Vec<Incoming>, drops: &mut Vec<DropReport>) {
        for _ in 0..RECV_BURST {
            let frames = match recv_multipart(&mut self.sockets[i].sock) {
                Ok(Some(frames)) => frames,
                Ok(None) => return,
                Err(reason) => {
                    drops.push(DropReport {
                        socket: self.sockets[i].name.clone(),
                        kind: "RecvError",
                        text: reason,
                    });
                    return;
                }
            };
            self.stats.received.fetch_add(1, Ordering::Relaxed);
            let entry = &self.sockets[i];
            if let Some(j) = entry.forward {
                let raw: Vec<RawMsg> = frames.into_iter().map(|f| f.0).collect();
                self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
                self.send(j, raw);
                continue;
            }
            let socket = entry.name.clone();
            if entry.raw {
                batch.push(Incoming {
                    socket,
                    delivery: Delivery::Raw(frames),
                });
                continue;
            }
            match self.session.parse(frames, true, true) {
                Ok((idents, parts, buffers)) => batch.push(Incoming {
                    socket,
                    delivery: Delivery::Message {
                        idents,
                        parts,
                        buffers,
                    },
                }),
                Err(e) => {
                    self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                    drops.push(DropReport {
                        socket,
                        kind: e.kind(),
                        text: e.to_string(),
                    });
                }
            }
        }
    }
}

/// Receive one whole multipart message, or `None` if nothing is waiting.
pub fn recv_multipart(sock: &mut zmq::Socket) -> Result<Option<Vec<RecvFrame>>, String> {
    let Some((first, mut more)) = RecvFrame::recv(sock)? else {
        return Ok(None);
    };
    let mut frames = vec![first];
    while more {
        // Once the first frame is here, the rest of the message is too.
        match RecvFrame::recv(sock)? {
            Some((f, m)) => {
                frames.push(f);
                more = m;
            }
            None => break,
        }
    }
    Ok(Some(frames))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::curve::{keypair, Curve};
    use fp_wire::{Limits, Packer};

    fn io() -> IoHandle {
        let session = SessionCore::new(
            b"k".to_vec(),
            Packer::Json,
            "hmac-sha256",
            "s".into(),
            "u".into(),
            16,
            Limits::default(),
        )
        .expect("session");
        IoHandle::spawn(Arc::new(session), "fp-io-test").expect("io thread")
    }

    fn raw(name: &str, kind: SocketKind) -> SocketSpec {
        let mut spec = SocketSpec::new(name, kind);
        spec.raw = true;
        spec
    }

    /// Raw frames received by `io` within `wait`.
    fn received(io: &IoHandle, wait: Duration) -> Vec<Vec<Vec<u8>>> {
        let (batch, _) = io.inbox.wait_batch(wait, 100);
        batch
            .into_iter()
            .filter_map(|inc| match inc.delivery {
                Delivery::Raw(frames) => Some(frames.iter().map(|f| f.as_ref().to_vec()).collect()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn refused_curve_client_is_reported_and_does_not_wedge_libzmq() {
        let t = Duration::from_secs(10);
        let (_, secret) = keypair().expect("keypair");
        let (wrong, _) = keypair().expect("keypair");
        let server = io();
        let mut spec = raw("server", SocketKind::Router);
        spec.bind = vec!["tcp://127.0.0.1:*".into()];
        spec.curve = Some(Curve::server(secret).expect("server"));
        let endpoint = server.add_socket(spec, t).expect("bind").remove(0);

        let client = io();
        let mut spec = raw("query", SocketKind::Dealer);
        spec.connect = vec![endpoint.clone()];
        spec.curve = Some(Curve::client(wrong).expect("client"));
        client.add_socket(spec, t).expect("connect");
        client
            .send("query", vec![OutFrame::Owned(b"hello".to_vec())])
            .expect("queued");
        let deadline = Instant::now() + t;
        while client.handshakes.failures().is_empty() {
            assert!(Instant::now() < deadline, "no handshake failure reported");
            std::thread::sleep(Duration::from_millis(20));
        }
        let failures = client.handshakes.failures();
        assert_eq!(failures[0].0, "query");
        assert!(failures[0].2.contains("curve_serverkey"), "{failures:?}");
        assert!(received(&server, Duration::from_millis(300)).is_empty());
        // Closing the refused socket (it keeps retrying while it lingers) must leave libzmq's
        // I/O thread free: a plain pair made afterwards still talks.
        client.close();
        std::thread::sleep(Duration::from_millis(300));
        let a = io();
        let mut spec = raw("a", SocketKind::Router);
        spec.bind = vec!["tcp://127.0.0.1:*".into()];
        let ep = a.add_socket(spec, t).expect("bind").remove(0);
        let b = io();
        let mut spec = raw("b", SocketKind::Dealer);
        spec.connect = vec![ep];
        b.add_socket(spec, t).expect("connect");
        b.send("b", vec![OutFrame::Owned(b"after".to_vec())])
            .expect("queued");
        let got = received(&a, t);
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0][1], b"after");
        assert!(b.handshakes.failures().is_empty());
        // The monitor reports the handshake asynchronously: it may land after the message.
        let deadline = Instant::now() + t;
        while b.handshakes.state("b").succeeded == 0 {
            assert!(
                Instant::now() < deadline,
                "handshake success never reported"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(b.handshakes.state("b").succeeded, 1);
    }
}
