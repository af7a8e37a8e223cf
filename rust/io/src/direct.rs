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
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crate::handshake::{parse_event, Handshakes};
use crate::inbox::{Delivery, DropReport, Incoming};
use crate::ioloop::recv_multipart;
use crate::outframe::{try_send, OutFrame, ReadyFrames, ReleaseQueue, Sent};
use crate::session::SessionCore;
use crate::socket::{monitor_endpoint, SocketKind, SocketSpec};
use crate::wakeup::{drain, pollfd, wake_pair};

/// Most messages taken from one socket by one `recv` call (the others wait for the next).
const RECV_BURST: usize = 512;
const MAX_DROP_REPORTS: usize = 1000;

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
    /// Replies held back by `send(.., hold=true)`, oldest first: (socket index, frames).
    held: Vec<(usize, ReadyFrames)>,
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

    /// Wait up to `timeout` for messages on any socket and return those that arrived (at most
    /// [`RECV_BURST`] per socket), and whether the wait was cut short by [`Self::wake`].
    ///
    /// `poll(2)` watches each socket's `ZMQ_FD` (and the wake-up pipe); `ZMQ_EVENTS` is read
    /// only for sockets that were used or signalled. (`zmq_poll` reads every socket's command
    /// mailbox, one syscall each, before and after every wait.)
    pub fn recv(&self, timeout: Duration) -> Result<(Vec<Incoming>, bool), String> {
        self.check_open()?;
        let mut state = lock(&self.state);
        let State {
            entries,
            wake_rx,
            monitors_read,
            ..
        } = &mut *state;
        let mut batch = Vec::new();
        let mut drops = Vec::new();
        for e in entries.iter_mut() {
            self.service(e, &mut batch, &mut drops);
        }
        let mut woken = false;
        if batch.is_empty() {
            let mut fds = Vec::with_capacity(1 + 2 * entries.len());
            fds.push(pollfd(wake_rx.as_raw_fd()));
            for e in entries.iter() {
                fds.push(pollfd(e.sock.get_fd().unwrap_or(-1)));
            }
            for e in entries.iter() {
                if let Some(m) = &e.monitor {
                    fds.push(pollfd(m.get_fd().unwrap_or(-1)));
                }
            }
            let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
            // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs for the whole call.
            let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, ms) };
            // EINTR (a signal) or a timeout: look at every socket; the caller checks signals
            let fired = |k: usize| rc <= 0 || fds[k].revents != 0;
            if rc > 0 && fds[0].revents != 0 {
                woken = true;
                drain(wake_rx);
            }
            let monitors_fired = fds[1 + entries.len()..].iter().any(|f| f.revents != 0);
            for (k, e) in entries.iter_mut().enumerate() {
                e.check |= fired(1 + k);
            }
            if monitors_fired || rc <= 0 || monitors_read.elapsed() >= MONITOR_INTERVAL {
                for e in entries.iter() {
                    e.read_monitor(&self.handshakes);
                }
                *monitors_read = Instant::now();
            }
            for e in entries.iter_mut() {
                self.service(e, &mut batch, &mut drops);
            }
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
            match self.session.parse_answerable(frames) {
                Ok((idents, parts, buffers)) => batch.push(Incoming {
                    socket: e.name.clone(),
                    delivery: Delivery::Message {
                        idents,
                        parts,
                        buffers,
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
        if hold {
            state.held.push((index, ready));
            self.held.store(state.held.len(), Ordering::SeqCst);
            return Ok(());
        }
        let sent_held = self.send_held_locked(&mut state, deadline);
        let sent = self.send_ready(&mut state.entries[index], ready, deadline, timeout);
        sent_held.and(sent)
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
        for (index, ready) in held {
            let left = deadline.saturating_duration_since(Instant::now());
            if let Err(e) = self.send_ready(&mut state.entries[index], ready, deadline, left) {
                result = result.and(Err(e));
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
        state.entries.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
