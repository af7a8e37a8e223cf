//! The I/O thread: receives and verifies messages; sends leave from the calling thread.
//!
//! Every socket sits behind its own mutex. A thread that sends takes that mutex and hands the
//! frames to libzmq itself (no queue, no wake-up of the I/O thread: one thread hand-off less per
//! message). The I/O thread never blocks while holding a socket: it waits in `poll(2)` on each
//! socket's `ZMQ_FD` and on a wake-up pipe, then takes the sockets that have something to do.
//!
//! `ZMQ_FD` is edge-triggered: it signals that the socket's state *may* have changed, and any
//! operation on the socket (a send from another thread included) may consume that signal. So a
//! sender checks `ZMQ_EVENTS` after its send and wakes the I/O thread when something is waiting
//! to be read; the I/O thread looks at every socket after a wake-up, after a poll timeout, and
//! whenever it left messages unread. Messages that cannot leave at once (high-water mark) queue
//! per socket, in order, and the I/O thread sends them when the socket is writable again.

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, TryRecvError};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::batching::{Batching, Before, CAP};
use crate::client_link::{channel_of, socket_of, ClientLink, LinkSent, LoopLink};
use crate::handshake::{parse_event, Handshakes};
use crate::inbox::{Delivery, DropReport, Inbox, Incoming, Taken, Waiter};
use crate::outframe::{send_frames, OutFrame, RawMsg, RecvFrame, ReleaseQueue, SendOutcome};
use crate::session::SessionCore;
use crate::socket::{monitor_endpoint, SocketKind, SocketSpec};
use crate::wakeup::{drain, pollfd, wake_pair};

/// Counters kept by the I/O thread.
#[derive(Debug, Default)]
pub struct IoStats {
    pub sent: AtomicU64,
    pub received: AtomicU64,
    pub dropped: AtomicU64,
    pub send_errors: AtomicU64,
    pub forwarded: AtomicU64,
    /// Polls that timed out although a socket had messages waiting: a lost `ZMQ_FD` signal,
    /// which only costs latency (up to one poll interval) but should never happen.
    pub late: AtomicU64,
}

type AddReply = Sender<Result<(Vec<String>, Arc<Shared>), String>>;

enum Command {
    AddSocket(Box<SocketSpec>, AddReply),
    AddLink(Box<LoopLink>, Sender<()>),
    Close,
}

/// How long one poll waits before looking at every socket again (wake-ups end it at once).
const POLL_MS: i32 = 100;
/// Messages received from one socket before the loop looks at the others.
const RECV_BURST: usize = 512;
/// Messages received per hold of a socket's mutex (senders wait at most this long).
const LOCKED_BURST: usize = 32;
/// How often a parked I/O thread (a waiting thread holds the loop) looks whether the loop
/// is free again. Messages for other threads wait at most this long after a lease ends.
const PARK: Duration = Duration::from_millis(2);
/// How long `close` keeps trying to flush queued messages.
const CLOSE_FLUSH: Duration = Duration::from_millis(2000);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One socket, shared by the I/O thread and the threads that send on it.
pub struct Shared {
    name: Arc<str>,
    kind: SocketKind,
    /// The socket's `ZMQ_FD` (valid while the socket is open).
    fd: RawFd,
    state: Mutex<SockState>,
}

struct SockState {
    /// `None` once the I/O thread has closed the socket.
    sock: Option<zmq::Socket>,
    /// Messages waiting for the socket to become writable, oldest first.
    pending: VecDeque<Vec<RawMsg>>,
}

/// What a send left for the I/O thread to do.
enum AfterSend {
    Nothing,
    /// The message was held back (batching): the I/O thread must know when to send it.
    Held,
    /// Something may be waiting to be read that the I/O thread was not told about.
    Wake,
}

impl Shared {
    /// Send `frames` now, or queue them behind earlier messages still waiting for the socket.
    ///
    /// `hold` (batching, see [`crate::batching`]): queue the message unless [`CAP`] are
    /// queued, in which case all of them leave now.
    fn send(
        &self,
        frames: Vec<RawMsg>,
        stats: &IoStats,
        inbox: &Inbox,
        hold: bool,
    ) -> Result<AfterSend, String> {
        let mut st = lock(&self.state);
        let SockState { sock, pending } = &mut *st;
        let Some(sock) = sock.as_mut() else {
            return Err(format!("socket {:?} is closed", self.name));
        };
        if hold || !pending.is_empty() {
            // behind what is held or waits for the high-water mark: keep the order
            pending.push_back(frames);
            if hold && pending.len() < CAP {
                return Ok(AfterSend::Held);
            }
            send_queue(sock, pending, stats);
        } else {
            match send_frames(sock, frames) {
                SendOutcome::Sent => {
                    stats.sent.fetch_add(1, Ordering::Relaxed);
                }
                SendOutcome::WouldBlock(frames) => pending.push_back(frames),
                SendOutcome::Failed(reason) => {
                    stats.send_errors.fetch_add(1, Ordering::Relaxed);
                    inbox.push_batch(
                        Vec::new(),
                        vec![DropReport {
                            socket: self.name.clone(),
                            kind: "SendError",
                            text: format!("send failed: {reason}"),
                        }],
                    );
                }
            }
        }
        // The send may have consumed the ZMQ_FD signal the I/O thread polls for.
        let events = sock.get_events().unwrap_or(zmq::POLLIN);
        if events.contains(zmq::POLLIN) || (!pending.is_empty() && events.contains(zmq::POLLOUT)) {
            Ok(AfterSend::Wake)
        } else {
            Ok(AfterSend::Nothing)
        }
    }
}

/// Send the queued messages of a socket in order, until the socket would block.
fn send_queue(sock: &mut zmq::Socket, pending: &mut VecDeque<Vec<RawMsg>>, stats: &IoStats) {
    let mut sent = 0;
    while let Some(frames) = pending.pop_front() {
        match send_frames(sock, frames) {
            SendOutcome::Sent => sent += 1,
            SendOutcome::WouldBlock(frames) => {
                pending.push_front(frames);
                break;
            }
            SendOutcome::Failed(_) => {
                stats.send_errors.fetch_add(1, Ordering::Relaxed);
            }
        }
    }
    stats.sent.fetch_add(sent, Ordering::Relaxed);
}

/// The caller's side of an I/O thread. Cheap to share between threads.
pub struct IoHandle {
    commands: Sender<Command>,
    shared: Arc<LoopShared>,
    wake: Waker,
    pub inbox: Arc<Inbox>,
    pub releases: ReleaseQueue,
    pub stats: Arc<IoStats>,
    pub session: Arc<SessionCore>,
    /// Handshake outcomes of the connecting sockets (see [`Handshakes`]).
    pub handshakes: Arc<Handshakes>,
    sockets: Mutex<HashMap<String, Arc<Shared>>>,
    thread: Mutex<Option<JoinHandle<()>>>,
    closed: AtomicBool,
    batching: Arc<Batching>,
    /// The link to the controller, once opened (see [`crate::client_link`]).
    link: std::sync::OnceLock<Arc<ClientLink>>,
}

/// Wakes the I/O thread out of `poll` (one byte on a socket pair; wake-ups coalesce).
#[derive(Clone)]
struct Waker {
    tx: Arc<UnixStream>,
    pending: Arc<AtomicBool>,
}

impl Waker {
    fn wake(&self) {
        if !self.pending.swap(true, Ordering::SeqCst) {
            // A full pipe already holds a wake-up; other errors only delay until the next poll.
            let _ = (&*self.tx).write(&[1u8]);
        }
    }
}

impl IoHandle {
    /// Start an I/O thread for `session`.
    pub fn spawn(session: Arc<SessionCore>, name: &str) -> Result<IoHandle, String> {
        let (wake_tx, wake_rx) = wake_pair()?;
        let (tx, rx) = mpsc::channel();
        let inbox = Arc::new(Inbox::default());
        let releases = ReleaseQueue::new();
        let stats = Arc::new(IoStats::default());
        let waker = Waker {
            tx: Arc::new(wake_tx),
            pending: Arc::new(AtomicBool::new(false)),
        };
        let handshakes = Arc::new(Handshakes::default());
        let batching = Arc::new(Batching::new());
        let lp = Loop {
            batching: batching.clone(),
            entries: Vec::new(),
            by_name: HashMap::new(),
            link: None,
            link_ready: false,
            all: true,
            ready: Vec::new(),
            monitors_ready: Vec::new(),
            timed_out: false,
            wake_rx,
            wake_pending: waker.pending.clone(),
            commands: rx,
            inbox: inbox.clone(),
            stats: stats.clone(),
            session: session.clone(),
            handshakes: handshakes.clone(),
        };
        let shared = Arc::new(LoopShared {
            lp: Mutex::new(lp),
            leased: AtomicBool::new(false),
            park: Mutex::new(()),
            unparked: std::sync::Condvar::new(),
        });
        let runner = shared.clone();
        let thread = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(move || runner.run())
            .map_err(|e| format!("cannot start the I/O thread: {e}"))?;
        Ok(IoHandle {
            commands: tx,
            shared,
            wake: waker,
            inbox,
            releases,
            stats,
            session,
            handshakes,
            sockets: Mutex::new(HashMap::new()),
            thread: Mutex::new(Some(thread)),
            closed: AtomicBool::new(false),
            batching,
            link: std::sync::OnceLock::new(),
        })
    }

    /// Open a link to the controller (decision 0017) at `endpoint` (`ipc://@<name>`) as the
    /// client whose routing identity is `ident`, waiting up to `timeout` for its welcome; from
    /// then on the `mux` and `task` sockets' traffic goes over it.
    pub fn add_link(&self, endpoint: &str, ident: &str, timeout: Duration) -> Result<(), String> {
        if self.link.get().is_some() {
            return Err("this client has a link already".into());
        }
        let (stream, reader) =
            crate::link::open(&self.session, endpoint, ident, "client", timeout)?;
        let link = Arc::new(ClientLink::new(stream));
        let (tx, rx) = mpsc::channel();
        self.command(Command::AddLink(
            Box::new(LoopLink::new(link.clone(), reader)),
            tx,
        ))?;
        rx.recv_timeout(timeout.max(Duration::from_secs(1)))
            .map_err(|_| "the I/O thread did not take the link".to_string())?;
        let _ = self.link.set(link);
        Ok(())
    }

    /// Whether this client's traffic goes over a link that is up.
    pub fn link_up(&self) -> bool {
        self.link.get().is_some_and(|l| l.is_up())
    }

    /// The link, when it carries `socket`'s messages and is up.
    fn link_for(&self, socket: &str) -> Option<(&ClientLink, u8)> {
        let link = self.link.get()?;
        let channel = channel_of(socket)?;
        link.is_up().then_some((link.as_ref(), channel))
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::SeqCst)
    }

    fn command(&self, cmd: Command) -> Result<(), String> {
        if self.is_closed() {
            return Err("the I/O thread is closed".into());
        }
        self.commands
            .send(cmd)
            .map_err(|_| "the I/O thread has stopped".to_string())?;
        self.wake.wake();
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
        self.command(Command::AddSocket(Box::new(spec), tx))?;
        let (bound, shared) = rx
            .recv_timeout(timeout)
            .map_err(|_| format!("timed out creating socket {name:?}"))??;
        lock(&self.sockets).insert(name, shared);
        Ok(bound)
    }

    pub fn has_socket(&self, name: &str) -> bool {
        lock(&self.sockets).contains_key(name)
    }

    /// Send one message on `socket` from the calling thread. Never blocks for long: when the
    /// socket cannot take the message now (high-water mark), it is queued and the I/O thread
    /// sends it as soon as it can, in order.
    pub fn send(&self, socket: &str, frames: Vec<OutFrame>) -> Result<(), String> {
        if self.is_closed() {
            return Err("the I/O thread is closed".into());
        }
        let shared = match lock(&self.sockets).get(socket) {
            None => return Err(format!("no socket named {socket:?}")),
            Some(s) if matches!(s.kind, SocketKind::Sub | SocketKind::Pull) => {
                return Err(format!(
                    "socket {socket:?} is a {:?} socket and cannot send",
                    s.kind
                ))
            }
            Some(s) => s.clone(),
        };
        let raw = frames
            .into_iter()
            .map(|f| f.into_raw(&self.releases))
            .collect();
        let now = self.batching.now();
        let hold = self.batching.hold(now);
        if self.batching.enabled() && self.batching.before_send(socket, hold) == Before::SendHeld {
            self.send_sockets_held();
        }
        if let Some((link, channel)) = self.link_for(socket) {
            let sent = link.send(channel, raw, hold)?;
            self.stats.sent.fetch_add(1, Ordering::Relaxed); // (handed over, as to libzmq)
            match sent {
                LinkSent::Done if hold => {
                    if self.batching.arm(now) {
                        self.wake.wake();
                    }
                }
                LinkSent::Done => {}
                LinkSent::Backlog => self.wake.wake(),
            }
            return Ok(());
        }
        match shared.send(raw, &self.stats, &self.inbox, hold)? {
            AfterSend::Nothing => {}
            AfterSend::Wake => self.wake.wake(),
            AfterSend::Held => {
                if self.batching.arm(now) {
                    self.wake.wake();
                }
            }
        }
        Ok(())
    }

    /// Hold back messages sent in a quick succession and send them together (see
    /// [`crate::batching`]); off by default. Turning it off sends what is held.
    pub fn set_batching(&self, on: bool) {
        self.batching.set_enabled(on);
        if !on {
            self.send_held();
        }
    }

    /// Send every held message now (a thread is about to wait for replies).
    pub fn send_held(&self) {
        self.batching.clear_held();
        self.send_sockets_held();
    }

    fn send_sockets_held(&self) {
        self.batching.disarm();
        if let Some(link) = self.link.get() {
            if let Ok(LinkSent::Backlog) = link.flush() {
                self.wake.wake();
            }
        }
        let sockets: Vec<Arc<Shared>> = lock(&self.sockets).values().cloned().collect();
        for shared in sockets {
            let mut st = lock(&shared.state);
            let SockState { sock, pending } = &mut *st;
            if let (Some(sock), false) = (sock.as_mut(), pending.is_empty()) {
                send_queue(sock, pending, &self.stats);
            }
        }
    }

    /// Interrupt the poll of a waiting thread that receives for itself (so that it looks at
    /// the inbox generation again). The I/O thread is left alone: waking it for nothing
    /// would make it take every socket's lock just when the caller sends its next request.
    pub fn wake_loop(&self) {
        if self.shared.leased.load(Ordering::SeqCst) {
            self.wake.wake();
        }
    }

    /// Wait like `inbox.wait_batch_as(timeout, max, Waiter::Priority { since })`, but receive
    /// on this thread while waiting: the I/O thread steps aside, so a reply reaches the
    /// waiting thread without a hand-off between threads (decision 0006). Falls back to the
    /// plain priority wait when another thread already holds the loop.
    pub fn wait_priority(&self, timeout: Duration, max: usize, since: u64) -> Taken {
        if self.batching.enabled() {
            self.send_held(); // what the waiter waits for may be among them
        }
        let waiter = Waiter::Priority { since };
        let now = self.inbox.wait_batch_as(Duration::ZERO, max, waiter);
        if !now.batch.is_empty() || now.woken || now.closed || timeout.is_zero() {
            return now;
        }
        if self.is_closed()
            || self
                .shared
                .leased
                .compare_exchange(false, true, Ordering::SeqCst, Ordering::SeqCst)
                .is_err()
        {
            return self.inbox.wait_batch_as(timeout, max, waiter);
        }
        let deadline = Instant::now() + timeout;
        self.inbox.enter_priority();
        // hands the loop back however this ends (a panic included: the I/O thread must not
        // stay parked)
        let _lease = Lease {
            shared: &self.shared,
            inbox: &self.inbox,
        };
        let taken = {
            // Parked (a lease ended less than PARK ago: a caller waiting again and again), the
            // I/O thread does not hold the loop and need not be woken; only one in its poll
            // is told to leave it and park (a wake-up costs the waker 10-20 µs on a VM).
            let mut lp = match self.shared.lp.try_lock() {
                Ok(lp) => lp,
                Err(TryLockError::Poisoned(e)) => e.into_inner(),
                Err(TryLockError::WouldBlock) => {
                    self.wake.wake();
                    lock(&self.shared.lp)
                }
            };
            loop {
                let busy = lp.pass();
                let taken = self.inbox.wait_batch_as(Duration::ZERO, max, waiter);
                let left = deadline.saturating_duration_since(Instant::now());
                if !taken.batch.is_empty() || taken.woken || taken.closed || left.is_zero() {
                    break taken;
                }
                let ms = if busy {
                    0
                } else {
                    left.as_millis().clamp(1, POLL_MS as u128) as i32
                };
                lp.poll_pass(ms);
            }
        };
        taken
    }

    /// Stop the thread (flushing queued messages for a bounded time) and close every socket.
    pub fn close(&self) {
        if self.closed.load(Ordering::SeqCst) {
            return;
        }
        let _ = self.command(Command::Close);
        self.shared.unparked.notify_all();
        self.closed.store(true, Ordering::SeqCst);
        let handle = lock(&self.thread).take();
        if let Some(h) = handle {
            let _ = h.join();
        }
        if let Some(link) = self.link.get() {
            link.lose(); // (flushed by the loop's shut-down) the controller sees it close now
        }
        lock(&self.sockets).clear();
        self.inbox.close();
    }
}

impl Drop for IoHandle {
    fn drop(&mut self) {
        self.close();
    }
}

/// The I/O thread's view of one socket.
struct Entry {
    shared: Arc<Shared>,
    raw: bool,
    forward: Option<usize>,
    /// PAIR socket receiving this socket's handshake events (connecting sockets only).
    monitor: Option<zmq::Socket>,
    monitor_fd: Option<RawFd>,
}

impl Entry {
    /// Close the socket (stopping its monitor first).
    fn close(&mut self) {
        let mut st = lock(&self.shared.state);
        if let Some(sock) = st.sock.as_mut() {
            if self.monitor.is_some() {
                // libzmq's I/O thread sends monitor events with a *blocking* send. Once our end
                // of the monitor pipe is gone, the next event (e.g. a failed reconnect handshake
                // while the socket lingers) would block that thread for good, and with it every
                // socket of the process. So stop the monitor before either socket is closed.
                // SAFETY: the socket pointer is valid while `sock` lives; a NULL endpoint with
                // no events is libzmq's documented way to stop monitoring.
                unsafe {
                    zmq_sys::zmq_socket_monitor(sock.as_mut_ptr(), std::ptr::null(), 0);
                }
            }
        }
        st.sock = None;
        st.pending.clear();
        drop(st);
        self.monitor = None;
    }
}

impl Drop for Entry {
    fn drop(&mut self) {
        self.close();
    }
}

struct Loop {
    batching: Arc<Batching>,
    entries: Vec<Entry>,
    by_name: HashMap<String, usize>,
    /// The client's link to the controller, if it has one.
    link: Option<LoopLink>,
    /// The last poll saw the link's descriptor ready.
    link_ready: bool,
    /// Look at every socket on the next pass (first pass, wake-up, timeout, busy socket).
    all: bool,
    ready: Vec<bool>,
    monitors_ready: Vec<bool>,
    /// The last poll was an idle one that timed out (see [`IoStats::late`]).
    timed_out: bool,
    wake_rx: UnixStream,
    wake_pending: Arc<AtomicBool>,
    commands: Receiver<Command>,
    inbox: Arc<Inbox>,
    stats: Arc<IoStats>,
    session: Arc<SessionCore>,
    handshakes: Arc<Handshakes>,
}

/// A waiting thread's hold on the loop (see [`IoHandle::wait_priority`]); dropping it hands
/// the loop back to the I/O thread.
struct Lease<'a> {
    shared: &'a LoopShared,
    inbox: &'a Inbox,
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        // The I/O thread is not woken: it looks again within PARK on its own. Waking a
        // sleeping thread costs the waker ~10-20 µs on a VM (an inter-processor interrupt),
        // right when the caller has its result; and a thread that calls again at once takes
        // the loop back without the I/O thread ever running in between.
        self.shared.leased.store(false, Ordering::SeqCst);
        self.inbox.leave_priority();
    }
}

/// What the I/O thread and a leasing waiter share: the loop, and who wants it.
struct LoopShared {
    lp: Mutex<Loop>,
    /// A waiting thread holds or wants the loop (see [`IoHandle::wait_priority`]).
    leased: AtomicBool,
    park: Mutex<()>,
    unparked: std::sync::Condvar,
}

impl LoopShared {
    /// The I/O thread: passes over the sockets until closed, stepping aside while a waiting
    /// thread receives for itself.
    fn run(&self) {
        loop {
            if self.leased.load(Ordering::SeqCst) {
                let g = lock(&self.park);
                let _ = self.unparked.wait_timeout(g, PARK);
                continue;
            }
            let mut lp = lock(&self.lp);
            if lp.run_commands() {
                lp.shut_down();
                return;
            }
            let busy = lp.pass();
            if self.leased.load(Ordering::SeqCst) {
                continue; // hand the loop over now
            }
            lp.poll_pass(if busy { 0 } else { POLL_MS });
        }
    }
}

impl Loop {
    /// One look at the sockets that need it: receive, send what is queued, deliver to the
    /// inbox. Returns true when messages were left unread (poll again without waiting).
    fn pass(&mut self) -> bool {
        // Order matters: drain the pipe, then clear the flag, then look at the sockets. A
        // waker that finds the flag still set acted before it was cleared, so the look
        // below sees its socket; one that finds it clear writes a byte the next poll sees.
        // (Clearing first would let the drain eat a byte whose flag stays set, and the
        // next waker would then not write: a lost wake-up.)
        self.drain_wake();
        self.wake_pending.store(false, Ordering::SeqCst);
        if self.batching.take_due(self.batching.now()) {
            self.all = true; // held messages are due: look at (and send on) every socket
        }
        let n = self.entries.len();
        self.ready.resize(n, true);
        self.monitors_ready.resize(n, true);
        let all = self.all;
        let mut batch = Vec::new();
        let mut drops = Vec::new();
        let mut busy = false;
        for i in 0..n {
            if all || std::mem::take(&mut self.ready[i]) {
                let before = batch.len();
                busy |= self.service(i, &mut batch, &mut drops);
                if self.timed_out && batch.len() > before {
                    self.stats.late.fetch_add(1, Ordering::Relaxed);
                }
            }
            if all || self.monitors_ready[i] {
                self.read_monitor(i);
            }
        }
        if self.link.is_some() && (all || std::mem::take(&mut self.link_ready)) {
            busy |= self.service_link(&mut batch, &mut drops);
        }
        self.inbox.push_batch(batch, drops);
        self.all = busy;
        self.timed_out = false; // counts for the pass right after the timed-out poll only
        busy
    }

    /// Write what the link holds and read its messages (up to [`RECV_BURST`]); true when
    /// messages were left unread.
    fn service_link(&mut self, batch: &mut Vec<Incoming>, drops: &mut Vec<DropReport>) -> bool {
        let Some(lk) = self.link.as_mut() else {
            return false;
        };
        let mut problem = lk.link.flush().err();
        let mut got = Vec::new();
        if let Err(e) = lk.read(&mut got, RECV_BURST) {
            problem = Some(e.to_string());
        }
        let more = lk.more;
        for (channel, frames) in got {
            let index = socket_of(channel).and_then(|name| self.by_name.get(name).copied());
            match index {
                Some(i) => {
                    self.deliver(i, vec![frames], batch, drops);
                }
                None => drops.push(DropReport {
                    socket: Arc::from("link"),
                    kind: "LinkChannel",
                    text: format!("a message on unknown link channel {channel}"),
                }),
            }
        }
        if let Some(why) = problem {
            // the sockets carry the traffic from now on
            drops.push(DropReport {
                socket: Arc::from("link"),
                kind: "LinkClosed",
                text: why,
            });
            self.link = None;
        }
        more
    }

    /// Wait up to `timeout_ms` for something to do (see [`Loop::poll`]).
    fn poll_pass(&mut self, timeout_ms: i32) {
        let timeout_ms = self.batching.poll_timeout(timeout_ms, self.batching.now());
        let mut ready = std::mem::take(&mut self.ready);
        let mut monitors_ready = std::mem::take(&mut self.monitors_ready);
        let polled = self.poll(timeout_ms, &mut ready, &mut monitors_ready);
        self.ready = ready;
        self.monitors_ready = monitors_ready;
        self.timed_out = polled == Polled::TimedOut && timeout_ms >= POLL_MS;
        self.all |= polled != Polled::Some;
    }

    /// Flush what is queued (bounded), close every socket and the inbox.
    fn shut_down(&mut self) {
        self.flush_all_until(Instant::now() + CLOSE_FLUSH);
        for e in &mut self.entries {
            e.close();
        }
        self.entries.clear();
        self.inbox.close();
    }

    fn drain_wake(&mut self) {
        drain(&self.wake_rx);
    }

    /// Wait until a socket's `ZMQ_FD`, a monitor or the wake-up pipe is readable, or
    /// `timeout_ms`. Fills `ready` / `monitors_ready` when some descriptors are readable.
    fn poll(&mut self, timeout_ms: i32, ready: &mut [bool], monitors_ready: &mut [bool]) -> Polled {
        let mut fds = Vec::with_capacity(1 + 2 * self.entries.len());
        fds.push(pollfd(self.wake_rx.as_raw_fd()));
        for e in &self.entries {
            fds.push(pollfd(e.shared.fd));
        }
        let mut monitor_of = Vec::new();
        for (i, e) in self.entries.iter().enumerate() {
            if let Some(fd) = e.monitor_fd {
                fds.push(pollfd(fd));
                monitor_of.push(i);
            }
        }
        if let Some(lk) = &self.link {
            let mut p = pollfd(lk.link.fd());
            if lk.link.has_backlog() {
                p.events |= libc::POLLOUT;
            }
            fds.push(p);
        }
        // SAFETY: `fds` is a valid array of `fds.len()` pollfd structs for the whole call.
        let rc = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
        if rc == 0 {
            return Polled::TimedOut;
        }
        if rc < 0 {
            // EINTR and friends: look at everything and poll again
            return Polled::All;
        }
        let n = self.entries.len();
        for (i, r) in ready.iter_mut().enumerate().take(n) {
            *r = fds[1 + i].revents != 0;
        }
        monitors_ready.iter_mut().for_each(|m| *m = false);
        for (k, &i) in monitor_of.iter().enumerate() {
            monitors_ready[i] = fds[1 + n + k].revents != 0;
        }
        if self.link.is_some() {
            self.link_ready = fds[1 + n + monitor_of.len()].revents != 0;
        }
        if fds[0].revents != 0 {
            Polled::All
        } else {
            Polled::Some
        }
    }

    /// Record every queued handshake event of socket `i`.
    fn read_monitor(&mut self, i: usize) {
        let entry = &self.entries[i];
        let Some(monitor) = &entry.monitor else {
            return;
        };
        while let Ok(frames) = monitor.recv_multipart(zmq::DONTWAIT) {
            if let Some((event, value, endpoint)) = parse_event(&frames) {
                self.handshakes
                    .record(&entry.shared.name, event, value, endpoint);
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
                Ok(Command::AddLink(link, reply)) => {
                    self.link = Some(*link);
                    self.link_ready = true;
                    let _ = reply.send(());
                }
                Err(TryRecvError::Empty) => return false,
                Err(TryRecvError::Disconnected) => return true,
            }
        }
    }

    fn add_socket(&mut self, spec: SocketSpec) -> Result<(Vec<String>, Arc<Shared>), String> {
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
        let fd = sock
            .get_fd()
            .map_err(|e| format!("cannot get the descriptor of socket {:?}: {e}", spec.name))?;
        let monitor_fd = match &monitor {
            Some(m) => Some(
                m.get_fd()
                    .map_err(|e| format!("cannot get the descriptor of a monitor: {e}"))?,
            ),
            None => None,
        };
        let shared = Arc::new(Shared {
            name: Arc::from(spec.name.as_str()),
            kind: spec.kind,
            fd,
            state: Mutex::new(SockState {
                sock: Some(sock),
                pending: VecDeque::new(),
            }),
        });
        self.by_name.insert(spec.name.clone(), self.entries.len());
        self.entries.push(Entry {
            shared: shared.clone(),
            raw: spec.raw,
            forward,
            monitor,
            monitor_fd,
        });
        Ok((bound, shared))
    }

    /// Receive what socket `i` has (up to [`RECV_BURST`] messages), deliver or forward it, and
    /// send what is queued for it once it is writable. Returns true when the loop should look
    /// at every socket again without waiting (messages left unread, or a forward touched
    /// another socket).
    fn service(
        &mut self,
        i: usize,
        batch: &mut Vec<Incoming>,
        drops: &mut Vec<DropReport>,
    ) -> bool {
        let shared = self.entries[i].shared.clone();
        let receives = shared.kind.receives();
        let mut rounds = 0usize;
        let mut again = false;
        loop {
            let mut received = Vec::new();
            let (readable, writable_again) = {
                let mut st = lock(&shared.state);
                let SockState { sock, pending } = &mut *st;
                let Some(sock) = sock.as_mut() else {
                    return again;
                };
                if receives {
                    while received.len() < LOCKED_BURST {
                        match recv_multipart(sock) {
                            Ok(Some(frames)) => received.push(frames),
                            Ok(None) => break,
                            Err(reason) => {
                                drops.push(DropReport {
                                    socket: shared.name.clone(),
                                    kind: "RecvError",
                                    text: reason,
                                });
                                break;
                            }
                        }
                    }
                }
                send_queue(sock, pending, &self.stats);
                // After our own operations ZMQ_FD may not signal what is already there: look.
                let events = sock.get_events().unwrap_or(zmq::POLLIN);
                (
                    receives && events.contains(zmq::POLLIN),
                    !pending.is_empty() && events.contains(zmq::POLLOUT),
                )
            };
            rounds += received.len().max(1);
            again |= self.deliver(i, received, batch, drops);
            if !readable && !writable_again {
                return again;
            }
            if rounds >= RECV_BURST {
                return true;
            }
        }
    }

    /// Verify and queue for delivery (or forward) messages received on socket `i`. Returns
    /// true when a forward sent on another socket.
    fn deliver(
        &mut self,
        i: usize,
        received: Vec<Vec<RecvFrame>>,
        batch: &mut Vec<Incoming>,
        drops: &mut Vec<DropReport>,
    ) -> bool {
        let mut forwarded = false;
        for frames in received {
            self.stats.received.fetch_add(1, Ordering::Relaxed);
            let entry = &self.entries[i];
            if let Some(j) = entry.forward {
                let raw: Vec<RawMsg> = frames.into_iter().map(|f| f.0).collect();
                self.stats.forwarded.fetch_add(1, Ordering::Relaxed);
                let target = self.entries[j].shared.clone();
                if let Err(text) = target.send(raw, &self.stats, &self.inbox, false) {
                    drops.push(DropReport {
                        socket: target.name.clone(),
                        kind: "SendError",
                        text,
                    });
                }
                forwarded = true;
                continue;
            }
            let socket = entry.shared.name.clone();
            if entry.raw {
                batch.push(Incoming {
                    socket,
                    delivery: Delivery::Raw(frames),
                });
                continue;
            }
            match self.session.parse_answerable(frames) {
                Ok((idents, parts, buffers)) => batch.push(Incoming {
                    socket,
                    delivery: Delivery::Message {
                        idents,
                        parts,
                        buffers,
                        header: None,
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
        forwarded
    }

    /// Send what is queued on every socket, for at most until `deadline`.
    fn flush_all_until(&mut self, deadline: Instant) {
        loop {
            let mut left = self
                .link
                .as_ref()
                .is_some_and(|lk| matches!(lk.link.flush(), Ok(LinkSent::Backlog)));
            for e in &self.entries {
                let mut st = lock(&e.shared.state);
                let SockState { sock, pending } = &mut *st;
                let Some(sock) = sock.as_mut() else {
                    continue;
                };
                send_queue(sock, pending, &self.stats);
                left |= !pending.is_empty();
            }
            if !left || Instant::now() >= deadline {
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

/// Outcome of one [`Loop::poll`].
#[derive(PartialEq, Eq, Clone, Copy)]
enum Polled {
    /// Only the sockets marked ready need a look.
    Some,
    /// Woken up (or the poll failed): look at every socket.
    All,
    /// Nothing happened within the timeout: look at every socket (cheap, once per interval).
    TimedOut,
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

    /// A client's link: its `mux`/`task` messages go over it (batched ones in order), what
    /// the controller sends arrives as those sockets' messages, and when the controller
    /// closes it, that is reported and the sockets carry the traffic again.
    #[test]
    fn a_client_link_carries_mux_and_task_traffic_until_it_closes() {
        use crate::link::{LinkLimits, LinkReader, LinkWriter, CH_LINK, CH_MUX, CH_TASK};
        use std::os::linux::net::SocketAddrExt;
        use std::os::unix::net::{SocketAddr, UnixListener};
        const BURST: usize = 300;
        let name = format!("fp-ioloop-link-test-{}", std::process::id());
        let addr = SocketAddr::from_abstract_name(name.as_bytes()).expect("addr");
        let listener = UnixListener::bind_addr(&addr).expect("listen");
        // the controller's side: welcome, then echo every message back on the task channel
        let fake = std::thread::spawn(move || {
            let (stream, _) = listener.accept().expect("accept");
            stream.set_nonblocking(true).expect("nb");
            let fd = stream.as_raw_fd();
            let mut r = LinkReader::new(LinkLimits {
                max_frames: 64,
                max_bytes: 1 << 20,
            });
            let mut w = LinkWriter::new();
            let mut seen = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(20);
            while seen.len() < 1 + 1 + BURST && Instant::now() < deadline {
                let mut got = Vec::new();
                r.read(fd, &mut got, 1000).expect("read");
                for (ch, frames) in got {
                    if ch == CH_LINK {
                        w.push_control(crate::link::WELCOME);
                    } else {
                        let body = frames[0].as_ref().to_vec();
                        let echo = vec![RecvFrame::from_bytes(&body).0];
                        w.push(CH_TASK, echo).expect("push");
                    }
                    seen.push((ch, frames[0].as_ref().to_vec()));
                }
                while !w.flush(fd).expect("flush") {}
                crate::link::poll_fd(fd, libc::POLLIN, 20);
            }
            seen // (the stream closes here)
        });
        let io = io();
        let t = Duration::from_secs(5);
        for (sock, ep) in [
            ("mux", "inproc://fp-link-mux"),
            ("task", "inproc://fp-link-task"),
        ] {
            let mut spec = raw(sock, SocketKind::Dealer);
            spec.bind = vec![ep.into()];
            io.add_socket(spec, t).expect("socket");
        }
        io.add_link(&format!("ipc://@{name}"), "client-1", t)
            .expect("link");
        assert!(io.link_up());
        let one = |body: &[u8]| vec![OutFrame::Owned(body.to_vec())];
        io.send("mux", one(b"first")).expect("send");
        let mut echoes = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while echoes.is_empty() && Instant::now() < deadline {
            echoes = received(&io, Duration::from_millis(100));
        }
        assert_eq!(echoes, vec![vec![b"first".to_vec()]]);
        io.set_batching(true);
        for k in 0..BURST {
            io.send("task", one(format!("m{k}").as_bytes()))
                .expect("send");
        }
        io.send_held();
        let seen = fake.join().expect("fake");
        assert_eq!(seen[0].0, CH_LINK);
        assert_eq!(seen[1], (CH_MUX, b"first".to_vec()));
        let burst: Vec<Vec<u8>> = seen[2..].iter().map(|(_, b)| b.clone()).collect();
        let want: Vec<Vec<u8>> = (0..BURST).map(|k| format!("m{k}").into_bytes()).collect();
        assert_eq!(burst, want, "every message, in order");
        assert!(seen[2..].iter().all(|(ch, _)| *ch == CH_TASK));
        // the controller closed the link: reported, and the sockets take over
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut drops = Vec::new();
        while !drops.iter().any(|d: &DropReport| d.kind == "LinkClosed")
            && Instant::now() < deadline
        {
            received(&io, Duration::from_millis(50));
            drops.extend(io.inbox.take_drops());
        }
        assert!(drops.iter().any(|d| d.kind == "LinkClosed"), "{drops:?}");
        assert!(!io.link_up());
        io.send("mux", one(b"after")).expect("the socket takes it");
        io.close();
    }

    /// Threads sending on one socket while the I/O thread receives the echoes on it: every
    /// message arrives, in each thread's order, and no wake-up is lost (a lost `ZMQ_FD`
    /// signal would show as a poll that timed out with messages waiting).
    #[test]
    fn concurrent_direct_sends_lose_nothing() {
        threads_send_and_receive_every_echo_in_order(false);
    }

    /// The same with batching on: held messages all leave (the I/O thread's deadline sends
    /// the last ones, nobody waits in `wait_priority`), in order, none twice.
    #[test]
    fn batched_sends_all_arrive_in_order_without_a_waiter() {
        threads_send_and_receive_every_echo_in_order(true);
    }

    fn threads_send_and_receive_every_echo_in_order(batching: bool) {
        const THREADS: usize = 4;
        const EACH: usize = 2000;
        let total = THREADS * EACH;
        let t = Duration::from_secs(20);
        let (server, endpoint, echo) = echo_server(total);
        let client = Arc::new(io());
        client.set_batching(batching);
        let mut spec = raw("c", SocketKind::Dealer);
        spec.connect = vec![endpoint];
        client.add_socket(spec, t).expect("connect");
        let senders: Vec<_> = (0..THREADS)
            .map(|k| {
                let client = client.clone();
                std::thread::spawn(move || {
                    for i in 0..EACH {
                        let body = format!("{k}:{i}").into_bytes();
                        client.send("c", vec![OutFrame::Owned(body)]).expect("send");
                    }
                })
            })
            .collect();
        let mut next = [0usize; THREADS];
        let mut got = 0;
        let deadline = Instant::now() + t;
        while got < total {
            assert!(
                Instant::now() < deadline,
                "only {got} of {total} echoes arrived"
            );
            for frames in received(&client, Duration::from_millis(50)) {
                let text = String::from_utf8(frames[0].clone()).expect("utf8");
                let (k, i) = text.split_once(':').expect("k:i");
                let (k, i): (usize, usize) = (k.parse().expect("k"), i.parse().expect("i"));
                assert_eq!(i, next[k], "thread {k}: out of order");
                next[k] += 1;
                got += 1;
            }
        }
        for s in senders {
            s.join().expect("sender");
        }
        assert_eq!(echo.join().expect("echo"), total);
        assert_eq!(client.stats.sent.load(Ordering::Relaxed), total as u64);
        assert_eq!(
            client.stats.late.load(Ordering::Relaxed),
            0,
            "a wake-up was lost"
        );
        assert_eq!(
            server.stats.late.load(Ordering::Relaxed),
            0,
            "a wake-up was lost"
        );
    }

    /// An echo server on its own I/O thread; returns it, its endpoint and the echo thread.
    fn echo_server(total: usize) -> (Arc<IoHandle>, String, std::thread::JoinHandle<usize>) {
        let t = Duration::from_secs(20);
        let server = Arc::new(io());
        let mut spec = raw("echo", SocketKind::Router);
        spec.bind = vec!["tcp://127.0.0.1:*".into()];
        let endpoint = server.add_socket(spec, t).expect("bind").remove(0);
        let s = server.clone();
        let echo = std::thread::spawn(move || {
            let mut n = 0;
            let deadline = Instant::now() + t;
            while n < total && Instant::now() < deadline {
                let (batch, _) = s.inbox.wait_batch(Duration::from_millis(50), 1000);
                for inc in batch {
                    if let Delivery::Raw(frames) = inc.delivery {
                        let out = frames
                            .iter()
                            .map(|f| OutFrame::Owned(f.as_ref().to_vec()))
                            .collect();
                        s.send("echo", out).expect("echo");
                        n += 1;
                    }
                }
            }
            n
        });
        (server, endpoint, echo)
    }

    /// Threads that wait for their own echoes receive on the loop themselves (one at a
    /// time; the others wait on the inbox), the I/O thread takes over again between them,
    /// and nothing is lost, duplicated or late.
    #[test]
    fn leased_waits_receive_everything_and_hand_the_loop_back() {
        const THREADS: usize = 3;
        const EACH: usize = 200;
        let total = THREADS * EACH + 1;
        let (server, endpoint, echo) = echo_server(total);
        let client = Arc::new(io());
        let mut spec = raw("c", SocketKind::Dealer);
        spec.connect = vec![endpoint];
        client
            .add_socket(spec, Duration::from_secs(10))
            .expect("connect");
        let seen = Arc::new(Mutex::new(
            std::collections::HashMap::<Vec<u8>, usize>::new(),
        ));
        let workers: Vec<_> = (0..THREADS)
            .map(|k| {
                let client = client.clone();
                let seen = seen.clone();
                std::thread::spawn(move || {
                    for i in 0..EACH {
                        let body = format!("{k}:{i}").into_bytes();
                        client
                            .send("c", vec![OutFrame::Owned(body.clone())])
                            .expect("send");
                        let deadline = Instant::now() + Duration::from_secs(20);
                        while !lock(&seen).contains_key(&body) {
                            assert!(Instant::now() < deadline, "{k}:{i} never came back");
                            let since = client.inbox.generation();
                            let taken = client.wait_priority(Duration::from_millis(50), 100, since);
                            let mut s = lock(&seen);
                            for inc in taken.batch {
                                if let Delivery::Raw(frames) = inc.delivery {
                                    *s.entry(frames[0].as_ref().to_vec()).or_default() += 1;
                                }
                            }
                            drop(s);
                            // as the Python client does after handling a batch
                            client.inbox.wake();
                            client.wake_loop();
                        }
                    }
                })
            })
            .collect();
        for w in workers {
            w.join().expect("worker");
        }
        // the I/O thread receives again for plain waiters
        client
            .send("c", vec![OutFrame::Owned(b"after".to_vec())])
            .expect("send");
        let got = received(&client, Duration::from_secs(10));
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0][0], b"after");
        assert_eq!(echo.join().expect("echo"), total);
        let seen = lock(&seen);
        assert_eq!(seen.len(), THREADS * EACH);
        assert!(
            seen.values().all(|&n| n == 1),
            "a message was delivered twice"
        );
        assert_eq!(
            client.stats.late.load(Ordering::Relaxed),
            0,
            "a wake-up was lost"
        );
        drop(server);
    }

    /// A socket that cannot send yet (no peer) queues messages in order and sends nothing
    /// twice; closing flushes for a bounded time and returns.
    #[test]
    fn unsendable_messages_queue_and_close_returns() {
        let client = io();
        client
            .add_socket(raw("lonely", SocketKind::Dealer), Duration::from_secs(10))
            .expect("socket");
        for i in 0..10u8 {
            client
                .send("lonely", vec![OutFrame::Owned(vec![i])])
                .expect("queued");
        }
        assert_eq!(client.stats.sent.load(Ordering::Relaxed), 0);
        let t0 = Instant::now();
        client.close();
        assert!(t0.elapsed() < Duration::from_secs(10));
        assert!(client
            .send("lonely", vec![OutFrame::Owned(vec![0])])
            .is_err());
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
